"""``python -m accel.bench tokens``'s calibration and rows, on the tiny Wan pipeline (the bundled models are too
slow for the suite)."""

import math

import numpy as np
import pytest
import torch
from eval_helpers import TINY_VIDEO_KWARGS, VIDEO_PROMPTS, build_tiny_wan_pipeline

from accel.bench import token_bounds
from accel.bench import tokens as bench
from accel.caching import TokenStepConfig


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (see conftest.one_thread)."""


def test_the_runtime_fit_recovers_grid_and_token_costs():
    shares = [(1.0, 1.0), (0.5, 0.5), (1.0, 0.3), (0.4, 0.2), (0.25, 0.25)]
    ratios = [0.1 + 0.3 * grid + 0.6 * tokens for grid, tokens in shares]
    assert np.allclose(bench._fit(shares, ratios), [0.1, 0.3, 0.6])


def _tiny_model(output_type: str = "pt") -> bench.Model:
    pipe = build_tiny_wan_pipeline()

    def generate(prompts, steps, seed):
        generator = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        kwargs = {"num_inference_steps": steps, "output_type": output_type, "generator": generator}
        return pipe(list(prompts), **kwargs, **TINY_VIDEO_KWARGS).frames

    return bench.Model("video", pipe, list(VIDEO_PROMPTS[:2]), generate, tokens=48, probe=1)


def test_calibration_picks_a_knob_per_method_and_the_rows_follow_it(capsys):
    model = _tiny_model()
    chosen = bench.calibrate(model, steps=8)
    assert "runtime ratio =" in capsys.readouterr().out
    for target, knobs in chosen.items():
        assert 0.05 <= knobs["ours"] <= 1 and 0.05 <= knobs["ras"] <= 1 and 2 <= knobs["steps"] <= 8
        assert 2 <= knobs["fora"] <= 8 and knobs["steps"] <= {0.5: 8, 0.25: 6}[target]
    rows = bench.methods(model, 8, chosen)
    assert [name.split("@")[0] for name in rows][:5] == ["full", "ours", "ours-own", "ours-all-steps", "ras"]
    ours = rows["ours@25"][3]
    assert ours.min_active == 0.8 and rows["ours-all-steps@25"][3].min_active == 0
    assert ours.grid_steps(8) == (8 if ours.budget >= 0.8 else max(2, round(8 * ours.budget / 0.8)))
    assert ours.dense_steps == 1  # 3/20 of a grid of at most 8 steps
    assert ours.reset_points == ((0.4, 0.733) if ours.grid_steps(8) >= 8 else ())


@pytest.mark.parametrize(
    "shape, patch", [((2, 4, 8, 6), (2, 2)), ((2, 3, 4, 6, 8), (2, 2, 2)), ((1, 2, 3, 4, 4), (1, 2, 2))]
)
def test_tokens_of_a_sampler_velocity_round_trip_and_gather_one_patch_each(shape, patch):
    velocity = torch.randn(shape)
    tokens = token_bounds._to_tokens(velocity, patch)
    assert tokens.shape == (shape[0], math.prod(s // p for s, p in zip(shape[2:], patch)), shape[1] * math.prod(patch))
    assert torch.equal(token_bounds._from_tokens(tokens, velocity, patch), velocity)
    corner = velocity[(0, slice(None), *(slice(0, p) for p in patch))]  # the first patch is the first token
    assert torch.equal(tokens[0, 0], corner.reshape(-1))


def test_the_sampler_allocation_at_full_budget_is_the_pipeline_and_skips_at_half():
    model = _tiny_model("latent")
    full = model.generate(model.prompts, 6, 0)
    every = TokenStepConfig(budget=1.0, dense_steps=2, min_active=0)
    with token_bounds.SamplerAllocation(model.pipe, every, 6, "velocity"):
        same = model.generate(model.prompts, 6, 0)
    assert torch.equal(same, full)
    assert "step" not in vars(model.pipe.scheduler)  # the wrap is gone
    half = TokenStepConfig(budget=0.5, dense_steps=2, min_active=0)
    for selection in ("velocity", "oracle", "random"):
        with token_bounds.SamplerAllocation(model.pipe, half, 6, selection):
            skipped = model.generate(model.prompts, 6, 0)
        error = (skipped - full).square().mean() / full.square().mean()
        assert 0 < error < 0.5, selection
    with pytest.raises(ValueError, match="selection"):
        token_bounds.SamplerAllocation(model.pipe, half, 6, "best")


def test_bounds_print_every_row_at_each_share(capsys):
    table = token_bounds.bounds(_tiny_model(), steps=8)
    assert list(table) == ["0.5", "0.25"]
    for share, row in table.items():
        assert list(row) == [f"steps-{round(float(share) * 8)}", "ours", "current-context", "oracle", "random",
                             "token_steps"]  # fmt: skip
        assert all(math.isfinite(v) for v in row.values()) and abs(row["token_steps"] - float(share)) < 0.1
    assert "PSNR vs full compute at equal token-steps" in capsys.readouterr().out


class _RecordingScheduler:
    """Stands in for a pipeline's scheduler: records the velocity each step receives."""

    def __init__(self):
        self.step_index, self.received = None, []

    def step(self, model_output, timestep, sample):
        self.received.append(model_output.clone())
        return sample


def test_the_sampler_allocation_feeds_the_scheduler_fresh_velocities_of_the_fastest_changing_tokens_only():
    from types import SimpleNamespace

    scheduler = _RecordingScheduler()
    pipe = SimpleNamespace(scheduler=scheduler, transformer=build_tiny_wan_pipeline().transformer)  # patch (1, 2, 2)
    config = TokenStepConfig(budget=0.75, dense_steps=2, min_active=0, buckets=2)  # 4 steps: 2 dense, then 1 of 2
    velocities = [torch.zeros(1, 1, 1, 2, 4)]
    for change in ((1.0, 0.1), (0.05, 0.5), (0.5, 0.5)):  # token 0 (left half) changes fastest, then slows
        step = velocities[-1].clone()
        step[..., :2] += change[0]
        step[..., 2:] += change[1]
        velocities.append(step)
    with token_bounds.SamplerAllocation(pipe, config, 4, "velocity"):
        for index, velocity in enumerate(velocities):
            scheduler.step_index = index
            pipe.scheduler.step(velocity, torch.tensor(1000.0 - 250 * index), torch.zeros_like(velocity))
    received = scheduler.received
    assert torch.equal(received[1], velocities[1])  # dense
    assert torch.equal(received[2][..., :2], velocities[2][..., :2])  # token 0 computed
    assert torch.equal(received[2][..., 2:], velocities[1][..., 2:])  # token 1 keeps its velocity of step 1
    # token 0's predicted error is now 0.05 / 250 x 250, token 1's (skipped) 0.1 / 250 x 500: token 1 computes
    assert torch.equal(received[3][..., 2:], velocities[3][..., 2:])
    assert torch.equal(received[3][..., :2], velocities[2][..., :2])


def test_the_min_active_sweep_times_and_scores_fewer_steps_and_each_value_at_both_targets(capsys):
    rows = token_bounds.min_active_sweep(_tiny_model(), steps=8, values=(0.0, 0.8))
    for tag in ("@50", "@25"):
        named = [name for name in rows if name.endswith(tag)]
        assert len(named) == 3 and named[0].startswith("steps-")
        assert [name.split("@")[0] for name in named[1:]] == ["min_active-0", "min_active-0.8"]
    assert all(row["speedup"] > 0 and math.isfinite(row["psnr"]) for row in rows.values())
    assert "ours at several min_active values" in capsys.readouterr().out


def test_the_two_diagnostics_are_one_or_the_other(capsys):
    with pytest.raises(SystemExit):
        bench.run(["--bounds", "--sweep-min-active"])
    assert "not allowed with argument" in capsys.readouterr().err
