"""Every denoiser of a pipeline is accelerated (issue 17, finding 10): Wan 2.2 has two transformers, the
high-noise ``transformer`` and the low-noise ``transformer_2``; accel wrapped only the first, so the steps the
second ran went uncached without a word."""

from __future__ import annotations

import torch
from eval_helpers import TINY_VIDEO_KWARGS, build_tiny_wan22_pipeline

import accel
from accel.caching import CacheConfig, fora, layout_of

STEPS = 8


def _generate(pipe):
    generator = torch.Generator().manual_seed(0)
    call = dict(TINY_VIDEO_KWARGS, num_inference_steps=STEPS, guidance_scale=1.0, output_type="pt")
    return pipe("a red apple", generator=generator, **call).frames


def _calls(pipe) -> dict[str, int]:
    """Counts each transformer's calls with forward pre-hooks; returns the live counter."""
    counts = {"transformer": 0, "transformer_2": 0}
    for name in counts:
        getattr(pipe, name).register_forward_pre_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


def test_both_wan22_experts_are_cached_and_removal_is_exact(one_thread):
    pipe = build_tiny_wan22_pipeline()
    reference = _generate(pipe)
    counts = _calls(pipe)
    with accel.apply(pipe, CacheConfig(schedule=fora(layout_of(pipe), STEPS, 2))) as handle:
        assert set(handle.others) == {"transformer_2"}
        handle.reset()
        cached = _generate(pipe)
        first, second = handle[CacheConfig].stats(), handle.others["transformer_2"][CacheConfig].stats()
        total = handle.stats()
    assert counts["transformer"] > 0 and counts["transformer_2"] > 0  # both experts ran
    assert first.reuse_fraction > 0 and second.reuse_fraction > 0  # and both reused
    assert total.block_calls == first.block_calls + second.block_calls
    assert total.block_calls == 2 * (counts["transformer"] + counts["transformer_2"])  # 2 blocks each: every call
    assert cached.shape == reference.shape
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name)
        assert "forward" not in module.__dict__ and all("forward" not in b.__dict__ for b in module.blocks)
    assert torch.equal(_generate(pipe), reference)


def test_a_wan22_pipeline_with_one_expert_set_is_accelerated_on_it(one_thread):
    pipe = build_tiny_wan22_pipeline()
    pipe.transformer_2 = None  # a Wan 2.2 pipeline may carry either expert alone
    with accel.apply(pipe, CacheConfig(schedule=fora(layout_of(pipe), STEPS, 2))) as handle:
        assert handle.others == {} and handle.target.transformer is pipe.transformer


def test_the_search_says_it_calibrates_one_expert_only(one_thread):
    import pytest

    from accel.caching.search import Evaluator, EvaluatorConfig

    with pytest.raises(ValueError, match="transformer_2.*one denoiser"):
        Evaluator(build_tiny_wan22_pipeline(), ["a red apple"], EvaluatorConfig(num_steps=STEPS))
