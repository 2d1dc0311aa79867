"""accel beside diffusers' own hook registry (issue 17, finding 9), on the tiny Flux transformer: applied after
diffusers' cache it refuses (diffusers' ``disable_cache()`` would strip its wrappers silently); applied before,
both work, and in either removal order no accel wrapper is left on the blocks."""

from __future__ import annotations

import pytest
import torch
from diffusers import FirstBlockCacheConfig
from tiny_models import TINY_MODELS, denoise

import accel
from accel.caching import CacheConfig, fora, layout_of

TINY = TINY_MODELS["flux"]
STEPS = 4


def _blocks(transformer):
    return [transformer.transformer_blocks[0], transformer.single_transformer_blocks[0], transformer]


def _instance_state(transformer) -> list:
    """What each block (and the transformer) holds as an instance ``forward``: absent, a bound method of its
    class, or something else (a wrapper left behind)."""
    state = []
    for module in _blocks(transformer):
        forward = module.__dict__.get("forward")
        bound = (
            getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward
        )
        state.append("absent" if forward is None else "bound" if bound else type(forward).__name__)
    return state


def _run(transformer):
    with torch.no_grad(), transformer.cache_context("cond"):
        return denoise(transformer, TINY, [0], STEPS, cfg=False)


def _fbc():
    return FirstBlockCacheConfig(threshold=0.0)  # computes every step: outputs stay those of the model


def test_applying_after_diffusers_hooks_is_refused_and_changes_nothing():
    transformer = TINY.build()
    transformer.enable_cache(_fbc())
    before = [module.__dict__.get("forward") for module in _blocks(transformer)]
    with pytest.raises(ValueError, match="carries diffusers hooks \\(fbc_block_hook, fbc_leader_block_hook\\)"):
        accel.apply(transformer, CacheConfig(schedule=fora(layout_of(transformer), STEPS, 2)))
    assert [module.__dict__.get("forward") for module in _blocks(transformer)] == before
    transformer.disable_cache()
    accel.apply(transformer, CacheConfig(schedule=fora(layout_of(transformer), STEPS, 2))).remove()  # now allowed


@pytest.mark.parametrize("first_removed", ["diffusers", "accel"])
def test_applied_before_diffusers_hooks_both_work_and_removal_leaves_no_wrapper(first_removed):
    alone = TINY.build()
    reference = _run(alone)
    alone.enable_cache(_fbc())
    _run(alone)
    alone.disable_cache()
    baseline = _instance_state(alone)  # what diffusers' enable/disable leaves by itself

    transformer = TINY.build()
    handle = accel.apply(transformer, CacheConfig(schedule=fora(layout_of(transformer), STEPS, 2)))
    transformer.enable_cache(_fbc())
    handle.reset()
    _run(transformer)
    assert handle.stats().reuse_fraction > 0  # accel's wrappers run under diffusers' hooks
    if first_removed == "diffusers":
        transformer.disable_cache()
        handle.remove()
    else:
        handle.remove()  # accel's wrappers sat under diffusers' hooks: it takes itself out of their chain
        transformer.disable_cache()
    state = _instance_state(transformer)  # nothing of accel's left: as diffusers alone leaves them, or cleaner
    assert all(now in ("absent", then) for now, then in zip(state, baseline)), (state, baseline)
    assert torch.equal(_run(transformer), reference)


# -- accelerate's offload hooks (``enable_model_cpu_offload``), on the tiny PixArt pipeline ---------------------

CALL = dict(
    num_inference_steps=STEPS,
    output_type="pt",
    max_sequence_length=16,
    height=16,
    width=16,
    use_resolution_binning=False,
)


def _accel_left(module) -> bool:
    """Whether an accel wrapper is still reachable from the module's forward (directly or as accelerate's
    ``_old_forward``)."""
    return any(
        getattr(module.__dict__.get(name), "_accel_wrapper", None) is not None for name in ("forward", "_old_forward")
    )


@pytest.mark.parametrize("order", ["offload-first", "accel-first"])
def test_accel_and_model_offload_in_either_order(order, one_thread):
    from conftest import build_tiny_pixart_pipeline

    pipe = build_tiny_pixart_pipeline()
    schedule = fora(layout_of(pipe), STEPS, 2)
    if order == "offload-first":
        pipe.enable_model_cpu_offload(device="cpu")
        handle = accel.apply(pipe, CacheConfig(schedule=schedule))
    else:
        handle = accel.apply(pipe, CacheConfig(schedule=schedule))
        pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the offload hooks move the model around every call: accel keeps working
        handle.reset()
        pipe("a red apple", **CALL)
        assert handle.stats().reuse_fraction == pytest.approx(0.5)
    handle.remove()
    pipe.remove_all_hooks()
    blocks = pipe.transformer.transformer_blocks
    assert not _accel_left(pipe.transformer) and not any(_accel_left(block) for block in blocks)
