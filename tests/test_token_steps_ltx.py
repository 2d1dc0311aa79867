"""Per-token step allocation (accel.caching.TokenStepConfig) through a whole tiny stock ``LTXPipeline``.

test_token_steps.py drives the bare LTX transformer from a simulated loop; here the pipeline does: its explicit
``sigmas`` (which the handle resamples to a coarser grid), classifier-free guidance batched as
``[uncond, cond]``, the packed latents' (frames, height, width) sizes and the VAE decode."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import TINY_LTX_KWARGS, build_tiny_ltx_pipeline

import accel
from accel.caching import TokenStepConfig

STEPS = 12
PROMPTS = ("a red apple", "a blue car")
SEEDS = (1, 2)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (see conftest.one_thread)."""


def _generate(pipe, output_type: str = "latent", prompts=PROMPTS, seeds=SEEDS) -> torch.Tensor:
    """The pipeline's output: packed latents ``(prompts, 32 tokens, 8)``, or with ``"pt"`` the decoded clips
    ``(prompts, 9, 3, 32, 32)``; each prompt's noise from its own seed."""
    generator = [torch.Generator().manual_seed(seed) for seed in seeds]
    kwargs = {"num_inference_steps": STEPS, "output_type": output_type, "generator": generator}
    return pipe(list(prompts), **kwargs, **TINY_LTX_KWARGS).frames


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def test_full_budget_equals_the_unwrapped_pipeline_and_remove_is_exact():
    pipe = build_tiny_ltx_pipeline()
    processors = pipe.transformer.attn_processors
    reference = _generate(pipe, "pt")
    handle = accel.apply(pipe, TokenStepConfig(budget=1.0))
    assert torch.equal(_generate(pipe, "pt"), reference)
    assert handle.stats().active == (1.0,) * STEPS
    handle.remove()
    assert torch.equal(_generate(pipe, "pt"), reference)
    assert pipe.transformer.attn_processors == processors
    assert "set_timesteps" not in vars(pipe.scheduler)  # the grid wrap is gone
    assert not any("forward" in m.__dict__ for m in pipe.transformer.modules())


@pytest.mark.parametrize("min_active, grid", [(0.8, 8), (0.0, STEPS)])
def test_half_budget_stays_within_an_error_bound_of_full_compute(min_active, grid):
    """Half the token-steps stay within 15% relative RMS error of the full trajectory's final latents, the bound
    of the transformer tests (measured 0.034-0.035 here). The default ``min_active`` runs the 12 steps on the
    grid of 8 that the pipeline's resampled ``sigmas`` make, each step computing 0.75 of the tokens on average;
    ``min_active=0`` keeps the 12 steps and computes fewer tokens."""
    pipe = build_tiny_ltx_pipeline()
    reference = _generate(pipe)
    with accel.apply(pipe, TokenStepConfig(budget=0.5, min_active=min_active)) as handle:
        half = _generate(pipe)
        timesteps = len(pipe.scheduler.timesteps)
    error = _relative(half, reference)
    assert 0 < error < 0.15, error
    stats = handle.stats()
    assert timesteps == grid and stats.steps == (STEPS, grid)
    assert stats.active[:2] == (1.0, 1.0) and min(stats.active) < 1
    assert stats.token_steps == pytest.approx(0.5, abs=1 / (8 * STEPS))  # 8 buckets
    assert stats.grid == (2, 4, 4)
    (heat,) = stats.heat_maps  # rows: uncond 1, uncond 2, cond 1, cond 2
    assert heat.shape == (4, *stats.grid) and int(heat.min()) >= 2 and int(heat.max()) <= grid


def test_each_prompt_selects_its_own_tokens_for_both_guidance_branches_as_when_alone():
    pipe = build_tiny_ltx_pipeline()

    def spread() -> tuple[float, float]:
        batch = _generate(pipe)
        alone = torch.cat([_generate(pipe, prompts=[p], seeds=[s]) for p, s in zip(PROMPTS, SEEDS)])
        return float((batch - alone).abs().max()), float(alone.abs().max())

    plain, scale = spread()
    with accel.apply(pipe, TokenStepConfig(budget=0.5)) as handle:
        _generate(pipe)
        (heat,) = handle.stats().heat_maps
        accelerated, _ = spread()
    assert torch.equal(heat[0], heat[2]) and torch.equal(heat[1], heat[3])  # a prompt's CFG branches
    assert not torch.equal(heat[0], heat[1])  # two prompts
    assert accelerated <= 4 * plain + 1e-6 * scale, (accelerated, plain)
