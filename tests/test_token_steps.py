"""Per-token step allocation (accel.caching.TokenStepConfig): budgets, per-sample selection, exact removal,
error bounds against full compute, compile, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import TINY_MODELS, denoise
from torch._dynamo.testing import CompileCounter

import accel
from accel.caching import TokenStepConfig
from accel.caching.token_select import (
    TokenHistory,
    active_count,
    bucket_levels,
    sparse_fraction,
    velocity_scores,
)
from accel.caching.tokens import ras_config

STEPS = 12
FAMILIES = ["wan", "pixart", "ltx", "sd3", "flux"]
CROSS_ATTENTION = ["wan", "pixart", "ltx"]  # text by cross-attention; SD3 and FLUX attend jointly


def _config(**kwargs) -> TokenStepConfig:
    return TokenStepConfig(assume_flow_matching=True, **kwargs)  # the tiny PixArt is a bare transformer


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


# -- pure decisions ----------------------------------------------------------------------------------------


def test_bucketed_counts_add_up_to_the_budget_in_at_most_two_sizes():
    tokens, buckets = 576, 8
    for fraction in (0.125, 0.3, 0.45, 0.5, 0.9):
        counts = [active_count(i, fraction, tokens, buckets) for i in range(40)]
        assert len(set(counts)) <= 2 and set(counts) <= set(bucket_levels(tokens, buckets))
        assert abs(sum(counts) / (40 * tokens) - fraction) <= 1 / (40 * buckets) + 1e-9, (fraction, counts)
    assert {active_count(i, 0.05, tokens, buckets) for i in range(40)} == {tokens // buckets}  # the floor


def test_sparse_fraction_makes_the_whole_trajectory_meet_the_budget():
    for budget, steps, dense in ((0.5, 20, 2), (0.25, 20, 5), (0.3, 40, 4)):
        fraction = sparse_fraction(budget, steps, dense)
        assert math.isclose(dense + (steps - dense) * fraction, budget * steps)
    assert sparse_fraction(0.4, None, 2) == 0.4
    config = TokenStepConfig(budget=0.3, dense_steps=2, reset_points=(0.5,), buckets=16, min_active=0)
    assert config.active_counts(20, 576)[:3] == [576, 576, config.active_counts(20, 576)[2]]
    assert config.active_counts(20, 576)[10] == 576 and abs(config.planned_fraction(20, 576) - 0.3) < 1 / 16 / 17


def test_a_budget_below_min_active_runs_a_coarser_grid_with_the_same_token_steps():
    config = TokenStepConfig(budget=0.3, dense_steps=2, reset_points=(0.5,), buckets=16, min_active=0.5)
    assert config.grid_steps(20) == 12 and math.isclose(config.grid_fraction(20), 0.5)
    counts = config.active_counts(20, 576)
    assert len(counts) == 12 and counts[:2] == [576, 576] and counts[6] == 576
    assert abs(config.planned_fraction(20, 576) - 0.3) < 12 / 20 / 16 / 10
    assert TokenStepConfig(budget=0.8).grid_steps(20) == 20 and TokenStepConfig(budget=0.01).grid_steps(20) == 3
    assert TokenStepConfig(budget=0.4).grid_steps(20) == 10  # the default min_active 0.8
    assert ras_config(0.1, 20).grid_steps(20) == 20  # RAS's released rule keeps every step
    with pytest.raises(ValueError, match="min_active"):
        TokenStepConfig(budget=0.5, min_active=1.5)


def test_dense_share_sets_the_leading_dense_steps_of_a_pipeline_grid_within_half_the_budget():
    config = TokenStepConfig(budget=0.4)  # the default min_active 0.8: a grid of 10 at 0.8 of the tokens
    counts = config.active_counts(20, 576)
    assert config.leading_dense(10) == 3 and counts[:3] == [576] * 3 and max(counts[3:]) < 576 and len(counts) == 10
    assert abs(config.planned_fraction(20, 576) - 0.4) < 1 / 16 / 2
    assert config.leading_dense(None) == 2  # a bare transformer: its step count is unknown
    assert TokenStepConfig(budget=0.4, dense_share=0).leading_dense(10) == 2
    assert TokenStepConfig(budget=0.4, dense_share=0.6).leading_dense(10) == 4  # half the grid's 0.8
    assert TokenStepConfig(budget=0.2, min_active=0).leading_dense(20) == 2  # half of 0.2 of 20 steps
    assert ras_config(0.5, 20).leading_dense(20) == 3  # RAS's own 4/30 of the steps
    for bad in (1.0, -0.1, True, "0.3"):
        with pytest.raises(ValueError, match="dense_share"):
            TokenStepConfig(budget=0.5, dense_share=bad)


def test_a_token_skipped_too_long_is_taken_first_whatever_its_velocity():
    speeds = torch.tensor([[0.1, 1.0, 2.0, 3.0]])  # token 0 is the slowest
    history = TokenHistory.start(torch.zeros(1, 4, 2), torch.tensor([1000.0]), 10)
    history.update(speeds[..., None].expand(1, 4, 2), torch.ones(1, 4, dtype=torch.bool), torch.tensor([900.0]))
    history.skipped[0, 0] = 3
    capped = velocity_scores(history, torch.tensor([800.0]), floor=0.0, max_skipped=3)
    relaxed = velocity_scores(history, torch.tensor([800.0]), floor=0.0, max_skipped=100)
    assert int(capped.argmax()) == 0 and int(relaxed.argmax()) == 3
    assert relaxed[0].tolist() == sorted(relaxed[0].tolist())  # otherwise by predicted error


# -- on tiny models ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_equals_the_unwrapped_model_and_remove_is_exact(family):
    tiny = TINY_MODELS[family]
    model = tiny.build()
    reference = denoise(model, tiny, [1, 2], steps=STEPS, cfg=True)
    handle = accel.apply(model, _config(budget=1.0))
    full = denoise(model, tiny, [1, 2], steps=STEPS, cfg=True)
    assert torch.allclose(full, reference, rtol=1e-5, atol=1e-5)
    assert {r.technique for r in handle.patches()} == {"core", "token_steps"}
    handle.remove()
    assert torch.equal(denoise(model, tiny, [1, 2], steps=STEPS, cfg=True), reference)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_half_budget_stays_within_an_error_bound_of_full_compute(family):
    """Half the token-steps stay within 15% relative RMS error of the full trajectory's final latents (about
    0.06-0.09 measured on the tiny random models, whose full-budget error is 0)."""
    tiny = TINY_MODELS[family]
    model = tiny.build()
    reference = denoise(model, tiny, [1, 2], steps=STEPS, cfg=True)
    with accel.apply(model, _config(budget=0.5)) as handle:
        half = denoise(model, tiny, [1, 2], steps=STEPS, cfg=True)
        stats = handle.stats()
    assert handle.stats().active == stats.active  # still readable after removal
    error = _relative(half, reference)
    assert error < 0.15, error
    assert min(stats.active) == pytest.approx(0.5) and stats.active[:2] == (1.0, 1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_equals_each_prompt_alone_within_the_unwrapped_tolerance(family):
    tiny = TINY_MODELS[family]
    model = tiny.build()

    def spread():
        batch = denoise(model, tiny, [1, 2, 3], steps=STEPS, cfg=True)
        alone = torch.cat([denoise(model, tiny, [seed], steps=STEPS, cfg=True) for seed in (1, 2, 3)])
        return float((batch - alone).abs().max()), float(alone.abs().max())

    plain, scale = spread()
    with accel.apply(model, _config(budget=0.5)):
        accelerated, _ = spread()
    assert accelerated <= 4 * plain + 1e-6 * scale, (accelerated, plain)


def test_every_prompt_picks_its_own_tokens_and_ras_shares_one_selection():
    tiny = TINY_MODELS["wan"]
    model = tiny.build()
    heat = {}
    for branches in ("paired", "own"):
        with accel.apply(model, _config(budget=0.4, branches=branches)) as handle:
            denoise(model, tiny, [1, 2], steps=STEPS, cfg=True)
            (heat[branches],) = handle.stats().heat_maps  # CFG batched: rows uncond 1, uncond 2, cond 1, cond 2
    assert heat["own"].shape == (4, *tiny_grid(tiny))
    assert len({tuple(row.flatten().tolist()) for row in heat["own"]}) == 4
    paired = heat["paired"]
    assert torch.equal(paired[0], paired[2]) and torch.equal(paired[1], paired[3])  # a prompt's CFG branches
    assert not torch.equal(paired[0], paired[1])  # two prompts
    assert int(paired.min()) >= 2 and int(paired.max()) <= STEPS
    with accel.apply(model, TokenStepConfig(**_ras(0.4), assume_flow_matching=True)) as h:
        denoise(model, tiny, [1, 2], steps=STEPS, cfg=True)
        (shared,) = h.stats().heat_maps
    assert all(torch.equal(row, shared[0]) for row in shared)


def tiny_grid(tiny) -> tuple[int, int, int]:
    _, frames, height, width = tiny.latent_shape
    return frames, height // 2, width // 2


def _ras(budget: float) -> dict:
    config = ras_config(budget, STEPS)
    return {name: getattr(config, name) for name in ("budget", "selector", "dense_steps", "reset_points")}


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_compiled_blocks_see_a_bounded_number_of_frames_at_any_step_count(family):
    torch._dynamo.reset()
    tiny = TINY_MODELS[family]
    model = tiny.build()
    counter = CompileCounter()
    accel.compile_blocks(model, backend=counter)
    eager_model = tiny.build()
    denoise(model, tiny, [1, 2], steps=STEPS, cfg=True)
    plain = counter.frame_count
    with accel.apply(model, _config(budget=0.3)):
        compiled = denoise(model, tiny, [1, 2], steps=STEPS, cfg=True)
        at_12 = counter.frame_count
        denoise(model, tiny, [1, 2], steps=30, cfg=True)
    with accel.apply(eager_model, _config(budget=0.3)):
        eager = denoise(eager_model, tiny, [1, 2], steps=STEPS, cfg=True)
    # per kind of block (FLUX has two stacks): the swapped processor (one frame) and the token counts (all
    # tokens and at most two bucket sizes); none more at another step count
    bound = 4 * len(accel.adapters.spec_for(model).stacks)
    assert at_12 - plain <= bound and counter.frame_count == at_12, (plain, at_12, counter.frame_count)
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-4)


def test_refuses_models_and_samplers_where_it_does_not_apply():
    pixart = TINY_MODELS["pixart"].build()
    with pytest.raises(ValueError, match="flow matching"):
        accel.apply(pixart, TokenStepConfig(budget=0.5))

    from diffusers import DDIMScheduler

    class EpsilonPipeline:  # a pipeline whose sampler predicts noise
        transformer = pixart
        scheduler = DDIMScheduler()

    with pytest.raises(ValueError, match="flow-matching sampler"):
        accel.apply(EpsilonPipeline(), TokenStepConfig(budget=0.5))
    flux = TINY_MODELS["flux"].build()
    processor = flux.transformer_blocks[0].attn.processor
    processor._attention_backend = "native"  # as diffusers' set_attention_backend leaves it, on this instance
    with pytest.raises(ValueError, match="attention backend 'native'"):
        accel.apply(flux, _config(budget=0.5))
    assert not any("forward" in m.__dict__ for m in flux.modules())
    cogvideox = TINY_MODELS["cogvideox"].build()
    with pytest.raises(ValueError, match="no self-attention processor for CogVideoXAttnProcessor2_0"):
        accel.apply(cogvideox, _config(budget=0.5))
    assert not any("forward" in m.__dict__ for m in cogvideox.modules())
    for bad in (
        {},
        {"budget": 0.0},
        {"budget": 0.5, "speedup": 2.0},
        {"speedup": 0.5},
        {"budget": 1, "dense_steps": 0},
    ):
        with pytest.raises(ValueError):
            TokenStepConfig(**bad)
    for bad, message in (
        ({"budget": True}, "budget must be a finite number"),
        ({"budget": "0.5"}, "budget must be a finite number"),
        ({"speedup": float("inf")}, "speedup must be a finite number"),
        ({"budget": 0.5, "reset_points": 0.4}, "reset_points must be a tuple"),
        ({"budget": 0.5, "buckets": 2.5}, "buckets must be an integer"),
        ({"budget": 0.5, "max_skipped_steps": 1.5}, "max_skipped_steps must be an integer"),
        ({"budget": 0.5, "selector": "ras", "branches": "own"}, r"does not use \['branches'\]"),
        ({"budget": 0.5, "ras_starvation": 0.2}, r"does not use \['ras_starvation'\]"),
    ):
        with pytest.raises(ValueError, match=message):
            TokenStepConfig(**bad)
    assert TokenStepConfig(budget=0.5, reset_points=[0.4]).reset_points == (0.4,)
    assert TokenStepConfig(speedup=4.0).fraction == 0.25


@pytest.mark.parametrize("family", FAMILIES)
def test_block_caching_composes_in_one_apply_in_either_order(family):
    """FORA (every other step) under per-token steps at half the token-steps: the cached residuals are kept per
    token, so the errors about add up: within 1.25x the sum of each technique's own error vs full compute
    (measured 0.97-1.12x on the tiny models; the tiny FLUX, 1.61x, within 1.8x: a token active at a reused
    step but not at the block's last computed one gets the residual of its own last computed step, older than
    either technique alone gives, and FLUX's four blocks add that up) and within the half-budget bound; FORA at
    interval 1 with the full budget equals the unwrapped model; remove() is exact."""
    from accel.caching import CacheConfig, fora, layout_of

    tiny = TINY_MODELS[family]
    model = tiny.build()
    reference = denoise(model, tiny, [1, 2], steps=STEPS, cfg=True)
    tokens, cache = _config(budget=0.5), CacheConfig(schedule=fora(layout_of(model), STEPS, 2))
    errors, outputs = {}, []
    for configs in ((tokens,), (cache,), (tokens, cache), (cache, tokens)):
        with accel.apply(model, *configs) as handle:
            outputs.append(denoise(model, tiny, [1, 2], steps=STEPS, cfg=True))
            errors[len(configs), type(configs[0]).__name__] = _relative(outputs[-1], reference)
            if len(configs) == 2:
                assert handle.stats()["CacheConfig"].blocks_skipped > 0
                assert min(handle.stats()["TokenStepConfig"].active) == pytest.approx(0.5)
    assert torch.equal(outputs[2], outputs[3])  # phase order, whatever the argument order
    alone = errors[1, "TokenStepConfig"] + errors[1, "CacheConfig"]
    ratio = 1.8 if family == "flux" else 1.25
    assert errors[2, "TokenStepConfig"] <= ratio * alone and errors[2, "TokenStepConfig"] < 0.15, errors
    assert torch.equal(denoise(model, tiny, [1, 2], steps=STEPS, cfg=True), reference)
    every = CacheConfig(schedule=fora(layout_of(model), STEPS, 1))
    with accel.apply(model, every, _config(budget=1.0)):
        assert torch.allclose(denoise(model, tiny, [1, 2], steps=STEPS, cfg=True), reference, rtol=1e-5, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_block_caching_under_per_token_steps_compiles_to_bounded_frames(family):
    from accel.caching import CacheConfig, fora, layout_of

    torch._dynamo.reset()
    tiny = TINY_MODELS[family]
    model = tiny.build()
    counter = CompileCounter()
    accel.compile_blocks(model, backend=counter)
    denoise(model, tiny, [1, 2], steps=STEPS, cfg=True)
    plain = counter.frame_count
    frames = []
    for steps in (STEPS, 30):
        cache = CacheConfig(schedule=fora(layout_of(model), steps, 2))
        with accel.apply(model, cache, _config(budget=0.3)):
            denoise(model, tiny, [1, 2], steps=steps, cfg=True)
        frames.append(counter.frame_count)
    at_12 = frames[0]
    # as per-token steps alone, per kind of block: the swapped processors and the token counts (all and two
    # bucket sizes)
    bound = 4 * len(accel.adapters.spec_for(model).stacks)
    assert at_12 - plain <= bound and counter.frame_count == at_12, (plain, at_12, counter.frame_count)


def test_block_caching_compositions_that_cannot_hold_are_refused_with_the_reason():
    from accel.caching import CacheConfig, FirstBlockPolicy, fora, layout_of

    tiny = TINY_MODELS["wan"]
    model = tiny.build()
    reference = denoise(model, tiny, [1], steps=4, cfg=False)
    with accel.apply(model, _config(budget=0.5)), pytest.raises(ValueError, match="in one accel.apply"):
        accel.apply(model, CacheConfig(schedule=fora(layout_of(model), STEPS, 2)))
    with pytest.raises(ValueError, match="dynamic .first-block. CacheConfig policy"):
        accel.apply(model, CacheConfig(schedule=FirstBlockPolicy()), _config(budget=0.5))
    assert torch.equal(denoise(model, tiny, [1], steps=4, cfg=False), reference)


@torch.no_grad()
def _separate_calls(model, tiny, steps: int) -> None:
    """A Wan-pipeline-style loop: the conditional and unconditional branches as two calls per step."""
    latents = tiny.latents(2, torch.Generator().manual_seed(0))
    cond, uncond = tiny.conditions([1, 2]), tiny.conditions([None, None])
    timesteps = torch.linspace(1000, 1, steps)
    for index, timestep in enumerate(timesteps):
        t = timestep.expand(2)
        v_cond = tiny.prediction(model(**tiny.forward_kwargs(latents, cond, t)), latents)
        v_uncond = tiny.prediction(model(**tiny.forward_kwargs(latents, uncond, t)), latents)
        step = (timesteps[index + 1] if index + 1 < steps else 0) / 1000 - timestep / 1000
        latents = latents + step * (v_uncond + 4.0 * (v_cond - v_uncond))


def test_cfg_branches_in_separate_calls_are_paired_by_their_latents():
    tiny = TINY_MODELS["wan"]
    model = tiny.build()
    for branches in ("paired", "own"):
        with accel.apply(model, _config(budget=0.4, branches=branches)) as handle:
            _separate_calls(model, tiny, STEPS)
            cond, uncond = handle.stats().heat_maps
        assert torch.equal(cond, uncond) == (branches == "paired"), branches
        assert not torch.equal(cond[0], cond[1])  # two prompts select apart either way


def test_sparse_attention_is_refused_in_any_order_before_anything_changes():
    from accel.sparse import HeadPattern, SparseAttentionConfig, uniform_plan

    tiny = TINY_MODELS["wan"]
    model = tiny.build()
    reference = denoise(model, tiny, [1], steps=4, cfg=False)
    sparse = SparseAttentionConfig(plan=uniform_plan(model, HeadPattern(windows=((0, 1, 1),))))
    said = "does not compose with SparseAttentionConfig: both replace the model's self-attention processors"
    with pytest.raises(ValueError, match=said):
        accel.apply(model, sparse, _config(budget=0.5))
    for first, second in ((sparse, _config(budget=0.5)), (_config(budget=0.5), sparse)):
        with accel.apply(model, first), pytest.raises(ValueError, match=said):
            accel.apply(model, second)
    assert torch.equal(denoise(model, tiny, [1], steps=4, cfg=False), reference)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_a_bare_transformer_says_its_reset_points_cannot_apply_and_per_token_timesteps_are_refused(caplog):
    tiny = TINY_MODELS["wan"]
    model = tiny.build()
    with caplog.at_level("WARNING", logger="accel.caching.tokens"):
        handle = accel.apply(model, _config(budget=0.9, reset_points=(0.5,)))
    assert "needs the step count, which a bare transformer does not know" in caplog.text
    latents = tiny.latents(1, torch.Generator().manual_seed(0))
    kwargs = tiny.forward_kwargs(latents, tiny.conditions([1]), torch.full((1,), 500.0))
    tokens = math.prod(tiny_grid(tiny))
    kwargs["timestep"] = torch.full((1, tokens), 500.0)  # Wan 2.2 image-to-video style: one per token
    with pytest.raises(ValueError, match="one timestep per sample"):
        with torch.no_grad():
            model(**kwargs)
    handle.remove()


@pytest.mark.parametrize("text_first", [True, False])
def test_per_token_features_keep_text_whole_and_visual_tokens_per_token(text_first):
    """A (joint, visual, whole) feature stored at a dense call, then merged at a sparse one: the joint tensor's
    text and the whole tensor take the new values, the visual entries change at the active tokens only, and
    gathering gives back exactly what the sparse call computed."""
    from accel.caching.state import FeatureCache
    from accel.caching.token_features import TokenFeatures

    rows, tokens, text, width = 2, 6, 3, 4
    streams = ("joint", "visual", "whole")
    dense = TokenFeatures(torch.arange(tokens).expand(rows, tokens), tokens, text_first)
    first = (torch.randn(rows, text + tokens, width), torch.randn(rows, tokens, width), torch.randn(rows, text, 5))
    cache = FeatureCache()
    cache.update(0, dense.merge(cache, first, streams))
    index = torch.tensor([[1, 4], [0, 5]])
    sparse = TokenFeatures(index, tokens, text_first)
    now = (torch.randn(rows, text + 2, width), torch.randn(rows, 2, width), torch.randn(rows, text, 5))
    stored = sparse.merge(cache, now, streams)
    cache.update(1, stored)
    assert all(torch.equal(a, b) for a, b in zip(sparse.gather(cache.predict(2), streams), now))
    joint, visual, whole = stored
    assert torch.equal(whole, now[2])
    text_part = slice(0, text) if text_first else slice(tokens, tokens + text)
    image_part = slice(text, text + tokens) if text_first else slice(0, tokens)
    assert torch.equal(joint[:, text_part], now[0][:, :text] if text_first else now[0][:, 2:])
    for tensor, old in ((joint[:, image_part], first[0][:, image_part]), (visual, first[1])):
        kept = torch.ones(rows, tokens, dtype=torch.bool).scatter_(1, index, False)
        assert torch.equal(tensor[kept], old[kept]) and not torch.equal(tensor, old)
    with pytest.raises(ValueError, match="token-major"):
        sparse.merge(cache, (now[0], now[0], now[2]), streams)  # a visual tensor of the wrong length


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("schedule", ["output", "forecast"])
def test_component_reuse_and_forecasts_compose_with_per_token_steps_on_joint_models(family, schedule):
    """Reusing components inside running blocks (image, text and, in FLUX's single-stream blocks, joint
    [text; image] outputs) and first-order forecasts of block residuals, under per-token steps at half the
    token-steps: every component the schedule reuses is reused, and the final latents stay within the
    half-budget bound of full compute."""
    from accel.caching import CacheConfig, fora, layout_of, taylorseer

    tiny = TINY_MODELS[family]
    model = tiny.build()
    reference = denoise(model, tiny, [1, 2], steps=STEPS, cfg=True)
    layout = layout_of(model)
    plan = fora(layout, STEPS, 2, reuse="output") if schedule == "output" else taylorseer(layout, STEPS, 2, 1)
    with accel.apply(model, CacheConfig(schedule=plan), _config(budget=0.5)) as handle:
        out = denoise(model, tiny, [1, 2], steps=STEPS, cfg=True)
        stats = handle.stats()["CacheConfig"]
    present = {name for name, count in stats.computed.items() if count}
    assert {name for name, count in stats.reused.items() if count} == present and len(present) >= 3, stats
    assert (stats.blocks_skipped > 0) == (schedule == "forecast"), stats
    assert min(handle.stats()["TokenStepConfig"].active) == pytest.approx(0.5)
    assert 0 < _relative(out, reference) < 0.15
