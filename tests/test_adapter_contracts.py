"""Caching contracts for every built-in adapter, on tiny seeded models in a simulated pipeline loop.

For each model: a compute-all schedule changes nothing (bit for bit); ``remove()`` restores the model exactly;
FORA-2 runs exactly half of the component computations; caching keeps the samples of a batch independent
(a batch of two prompts matches each prompt alone as closely as the unaccelerated model does); a schedule
made for 20 steps drives a 30-step run; a step that reuses a whole stack adds the summed residuals once and
gives what block-by-block reuse gives; the first-block policy decides per sample; a schedule made for another
model is refused.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_models import TINY_MODELS, TinyModel, denoise
from torch._subclasses.fake_tensor import FakeTensor

import accel
from accel.adapters import spec_for
from accel.caching import CacheConfig, FirstBlockPolicy, compute_all, fora, layout_of, taylorseer
from accel.caching.engine import CacheEngine

TINY = list(TINY_MODELS.values())
STEPS = 6
PROMPTS = (11, 12)


@pytest.fixture(params=TINY, ids=[tiny.name for tiny in TINY])
def tiny(request) -> TinyModel:
    return request.param


def _forward_overrides(model: torch.nn.Module) -> list[str]:
    return [name or "<root>" for name, module in model.named_modules() if "forward" in module.__dict__]


@contextmanager
def _count_component_computations(model: torch.nn.Module):
    """Count, per component name, the calls that really run each component's own forward.

    A forward hook would also fire when the cache engine serves a reused output (the module is still
    called), so the count sits underneath the engine instead: an instance-level ``forward`` installed before
    ``accel.apply`` is the inner function the engine's wrapper calls only when it computes.
    """
    counts: Counter = Counter()
    wrapped = []
    for stack, block in spec_for(model).block_list(model):
        for component in stack.components:
            module = getattr(block, component.module, None)
            if not isinstance(module, torch.nn.Module):
                continue
            original = module.forward

            def counting(*args, _name=component.name, _original=original, **kwargs):
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                if not any(isinstance(t, FakeTensor) for t in tensors):  # a MAC count on shapes computes nothing
                    counts[_name] += 1
                return _original(*args, **kwargs)

            module.forward = counting
            wrapped.append(module)
    try:
        yield counts
    finally:
        for module in wrapped:
            del module.forward


def _separately(model: torch.nn.Module, tiny: TinyModel, cfg: bool) -> torch.Tensor:
    return torch.cat([denoise(model, tiny, [prompt], STEPS, cfg) for prompt in PROMPTS])


@pytest.mark.parametrize("cfg", [False, True], ids=["no_cfg", "cfg"])
def test_compute_all_is_bit_identical(tiny, cfg):
    model = tiny.build()
    reference = denoise(model, tiny, PROMPTS, STEPS, cfg)
    schedule = compute_all(layout_of(model), STEPS)
    with accel.apply(model, CacheConfig(schedule=schedule)):
        cached = denoise(model, tiny, PROMPTS, STEPS, cfg)
    assert torch.equal(cached, reference)


def test_remove_restores_forwards_and_outputs(tiny):
    model = tiny.build()
    assert _forward_overrides(model) == []
    reference = denoise(model, tiny, PROMPTS, STEPS, cfg=True)

    handle = accel.apply(model, CacheConfig(schedule=fora(layout_of(model), STEPS)))
    assert _forward_overrides(model), "apply wraps the transformer, its blocks and components"
    cached = denoise(model, tiny, PROMPTS, STEPS, cfg=True)
    assert handle.stats().reuse_fraction > 0
    assert not torch.equal(cached, reference), "FORA-2 reused something, so it cannot be exact here"
    handle.remove()
    handle.remove()  # idempotent

    assert _forward_overrides(model) == []
    assert torch.equal(denoise(model, tiny, PROMPTS, STEPS, cfg=True), reference)


@pytest.mark.parametrize("reuse", ["residual", "output"])
def test_fora_2_computes_half_the_components(tiny, reuse):
    model = tiny.build()
    with _count_component_computations(model) as full:
        denoise(model, tiny, PROMPTS, STEPS, cfg=True)
    with _count_component_computations(model) as cached:
        schedule = fora(layout_of(model), STEPS, interval=2, reuse=reuse)
        with accel.apply(model, CacheConfig(schedule=schedule)) as handle:
            denoise(model, tiny, PROMPTS, STEPS, cfg=True)
            stats = handle.stats()

    assert set(full) == set(spec_for(model).component_names)
    assert cached == Counter({name: count // 2 for name, count in full.items()})
    assert stats.computed == dict(cached)
    assert sum(stats.reused.values()) == sum(cached.values())


def test_fora_2_residual_skips_every_block_at_reuse_steps(tiny):
    # SD3's last block (context_pre_only) returns (None, hidden_states): it must be skipped like the others.
    model = tiny.build()
    with accel.apply(model, CacheConfig(schedule=fora(layout_of(model), STEPS, interval=2))) as handle:
        denoise(model, tiny, PROMPTS, STEPS, cfg=True)
        stats = handle.stats()
    assert stats.block_calls == STEPS * layout_of(model).num_blocks
    assert stats.blocks_skipped == stats.block_calls // 2


@pytest.mark.parametrize("cfg", [False, True], ids=["no_cfg", "cfg"])
def test_batch_of_prompts_matches_each_prompt_alone(tiny, cfg):
    model = tiny.build()
    batched = denoise(model, tiny, PROMPTS, STEPS, cfg)
    tolerance = max(10 * (batched - _separately(model, tiny, cfg)).abs().max().item(), 1e-5)

    schedule = fora(layout_of(model), STEPS, interval=2)
    with accel.apply(model, CacheConfig(schedule=schedule)) as handle:
        cached_batched = denoise(model, tiny, PROMPTS, STEPS, cfg)
        cached_alone = _separately(model, tiny, cfg)
        assert handle.stats().reuse_fraction > 0
    assert (cached_batched - cached_alone).abs().max().item() <= tolerance
    assert not torch.equal(cached_batched, batched), "prompts must differ from the uncached run: caching engaged"


def test_20_step_schedule_runs_30_steps(tiny):
    model = tiny.build()
    scheduler = FlowMatchEulerDiscreteScheduler()
    pipeline = SimpleNamespace(transformer=model, scheduler=scheduler)  # what accel.apply reads of a pipeline
    layout = layout_of(model)
    schedule = fora(layout, 20, interval=3)
    expected = schedule.resample(30).mask
    with _count_component_computations(model) as counts:
        with accel.apply(pipeline, CacheConfig(schedule=schedule)) as handle:
            scheduler.set_timesteps(30)  # as the pipeline does before its loop: the step count becomes known
            latents = denoise(model, tiny, PROMPTS, 30, cfg=True)
            stats = handle.stats()

    assert torch.isfinite(latents).all()
    assert stats.block_calls == 30 * layout.num_blocks
    per_block = [
        [layout.components.index(c.name) for c in stack.components if getattr(block, c.module, None) is not None]
        for stack, block in spec_for(model).block_list(model)
    ]
    for name in layout.components:
        column = layout.components.index(name)
        wanted = sum(int(expected[:, b, column].sum()) for b, present in enumerate(per_block) if column in present)
        assert counts[name] == wanted, f"{name}: computed {counts[name]} times, the resampled schedule says {wanted}"


@pytest.mark.parametrize("make", [fora, taylorseer], ids=["fora", "taylorseer"])
def test_a_stack_reused_whole_equals_block_by_block_reuse(tiny, make, monkeypatch):
    model = tiny.build()
    schedule = make(layout_of(model), STEPS, 3)
    at_once = []
    original = CacheEngine._skip_stack

    def counting(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        at_once.append(output is not None)
        return output

    monkeypatch.setattr(CacheEngine, "_skip_stack", counting)
    with accel.apply(model, CacheConfig(schedule=schedule)):
        fast = denoise(model, tiny, PROMPTS, STEPS, cfg=True)
    monkeypatch.setattr(CacheEngine, "_skip_stack", lambda self, *args, **kwargs: None)
    with accel.apply(model, CacheConfig(schedule=schedule)):
        block_by_block = denoise(model, tiny, PROMPTS, STEPS, cfg=True)
    torch.testing.assert_close(fast, block_by_block, rtol=1e-4, atol=1e-5)
    skippable = all(stack.skippable for stack in spec_for(model).stacks)
    # SD3's last block returns no text stream (context_pre_only), so its stack is reused block by block.
    assert any(at_once) == (skippable and tiny.name != "sd3"), "a stack of whole-reusable blocks is skipped at once"


def test_first_block_policy_decides_per_sample(tiny):
    """Two samples of one batch decide differently, and each decides as it would alone."""
    model = tiny.build()
    probe = FirstBlockPolicy(threshold=0.0)  # computes everything, logging each sample's change
    with accel.apply(model, CacheConfig(schedule=probe)) as handle:
        denoise(model, tiny, PROMPTS, STEPS, cfg=False)
        first_changes = handle[CacheConfig].decision_log[1].change  # step 1: change relative to step 0
    assert first_changes[0] != first_changes[1]
    policy = FirstBlockPolicy(threshold=sum(first_changes) / 2)  # between the two: one reuses, one computes
    decisions, outputs = {}, {}
    for key, prompts in {"batch": PROMPTS, "first": PROMPTS[:1], "second": PROMPTS[1:]}.items():
        with accel.apply(model, CacheConfig(schedule=policy)) as handle:
            outputs[key] = denoise(model, tiny, prompts, STEPS, cfg=False)
            decisions[key] = [decision.compute for decision in handle[CacheConfig].decision_log]
    assert decisions["batch"][1][0] != decisions["batch"][1][1]
    assert [d[0] for d in decisions["batch"]] == [d[0] for d in decisions["first"]]
    assert [d[1] for d in decisions["batch"]] == [d[0] for d in decisions["second"]]
    tolerance = (denoise(model, tiny, PROMPTS, STEPS, cfg=False) - _separately(model, tiny, False)).abs().max()
    alone = torch.cat([outputs["first"], outputs["second"]])
    assert (outputs["batch"] - alone).abs().max() <= max(10 * float(tolerance), 1e-5)


def test_schedule_for_another_model_is_refused(tiny):
    model = tiny.build()
    other = TINY_MODELS["dit" if tiny.name != "dit" else "pixart"].build()
    schedule = fora(layout_of(other), STEPS, interval=2)
    with pytest.raises(ValueError, match="Schedule does not fit this model"):
        accel.apply(model, CacheConfig(schedule=schedule))
    assert _forward_overrides(model) == []
