"""``python -m accel.bench tokens``'s calibration and rows, on the tiny Wan pipeline (the bundled models are too
slow for the suite)."""

import math

import numpy as np
import pytest
import torch
from eval_helpers import TINY_VIDEO_KWARGS, VIDEO_PROMPTS, build_tiny_wan_pipeline

from accel.bench import token_bounds
from accel.bench import tokens as bench
from accel.bench.token_report import psnr_of
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
        assert set(knobs["predicted"]) == {"ours", "ours-all-steps", "ras", "steps", "fora", "ours-at-steps"}
        # ours at the fewer-steps row's runtime: the budget whose predicted runtime is nearest that row's
        matched = knobs["predicted"]["ours-at-steps"]
        budgets = [round(b, 2) for b in np.arange(0.05, 1.0001, 0.01)]
        assert knobs["ours-at-steps"] in budgets
        assert abs(matched - knobs["predicted"]["steps"]) <= abs(
            knobs["predicted"]["ours"] - knobs["predicted"]["steps"]
        )
        assert set(knobs["unreachable"]) <= set(knobs["predicted"])
    rows = bench.methods(model, 8, chosen)
    assert [name.split("@")[0] for name in rows][:5] == ["full", "ours", "ours-own", "ours-all-steps", "ras"]
    assert rows["ours-at-steps@25"][3].budget == chosen[0.25]["ours-at-steps"]
    ours = rows["ours@25"][3]
    assert ours.min_active == 0.8 and rows["ours-all-steps@25"][3].min_active == 0
    assert ours.grid_steps(8) == (8 if ours.budget >= 0.8 else max(3, round(8 * ours.budget / 0.8)))
    assert ours.reset_points == () and ours.dense_share == 0.3
    assert ours.leading_dense(ours.grid_steps(8)) == 2  # 0.3 of a grid of at most 8 steps: the two the rule needs


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


def test_the_sampler_allocation_runs_on_the_coarser_grid_of_its_configuration():
    model = _tiny_model("latent")
    config = TokenStepConfig(budget=0.4, buckets=4)  # min_active 0.8: a grid of 4 of the 8 steps, 0.8 of the tokens
    allocation = token_bounds.SamplerAllocation(model.pipe, config, 8, "velocity")
    assert allocation.grid == config.grid_steps(8) == 4
    with allocation, pytest.raises(ValueError, match="runs on 4 steps; the pipeline was called with 8"):
        model.generate(model.prompts, 8, 0)
    grid = model.generate(model.prompts, 4, 0)
    with allocation:
        skipped = model.generate(model.prompts, 4, 0)
    error = (skipped - grid).square().mean() / grid.square().mean()
    assert 0 < error < 0.5


def test_bounds_print_every_row_at_each_share_and_at_each_runtime_target(capsys):
    table = token_bounds.bounds(_tiny_model(), steps=8)
    assert list(table) == ["token_steps", "runtime"]
    assert list(table["token_steps"]) == ["0.5", "0.25"]
    for share, row in table["token_steps"].items():
        assert list(row) == [f"steps-{round(float(share) * 8)}", "ours", "current-context", "oracle", "random",
                             "token_steps"]  # fmt: skip
        assert all(math.isfinite(v) for v in row.values()) and abs(row["token_steps"] - float(share)) < 0.1
    assert list(table["runtime"]) == ["0.5", "0.25"]
    for row in table["runtime"].values():
        names = list(row)
        assert names[0].startswith("steps-") and names[1] == f"grid-{row['grid_steps']}"
        assert names[2:] == ["ours", "current-context", "oracle", "random", "token_steps", "grid_steps"]
        assert all(math.isfinite(v) for v in row.values())
        assert 2 <= row["grid_steps"] <= 8 and 0 < row["token_steps"] <= row["grid_steps"] / 8
    out = capsys.readouterr().out
    assert "PSNR vs full compute at equal token-steps" in out and "at the benchmark's runtime targets" in out


def test_dense_shapes_share_grid_and_token_steps_and_differ_in_their_dense_steps(capsys):
    found = token_bounds.shapes(0.4, 20)  # a grid of 10 steps at 0.8 of the tokens
    assert {config.grid_steps(20) for config in found.values()} == {10}
    dense = {name: [config.dense_at(step, 10) for step in range(10)] for name, config in found.items()}
    assert [i for i, d in enumerate(dense["ras-shape"]) if d] == [0, 1, 4, 7]
    assert [sum(d) for d in dense.values()] == [4, 2, 3, 4]
    assert all(abs(c.planned_fraction(20, 576) - 0.4) <= 1 / 16 for c in found.values())
    table = token_bounds.dense_shapes(_tiny_model(), steps=8)
    assert list(table) == [f"{b:g}" for b in token_bounds.SHAPE_BUDGETS]
    for row in table.values():
        assert all(len(row[name]) == len(token_bounds.SHAPE_SEEDS) for name in found)
        assert all(math.isfinite(v) for name in found for v in row[name])
    assert "ours with other dense schedules" in capsys.readouterr().out


class _RecordingScheduler:
    """Stands in for a pipeline's scheduler: records the velocity each step receives."""

    def __init__(self, steps: int):
        self.step_index, self.received = None, []
        self.timesteps = torch.linspace(1000, 0, steps + 1)[:-1]

    def step(self, model_output, timestep, sample):
        self.received.append(model_output.clone())
        return sample


def test_the_sampler_allocation_feeds_the_scheduler_fresh_velocities_of_the_fastest_changing_tokens_only():
    from types import SimpleNamespace

    scheduler = _RecordingScheduler(4)
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
            pipe.scheduler.step(velocity, scheduler.timesteps[index], torch.zeros_like(velocity))
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
    assert all(isinstance(row["reached"], bool) for row in rows.values())
    assert "ours at several min_active values" in capsys.readouterr().out


def test_the_diagnostics_are_one_or_the_other(capsys):
    for pair in (["--bounds", "--sweep-min-active"], ["--curve", "--bounds"]):
        with pytest.raises(SystemExit):
            bench.run(pair)
        assert "not allowed with argument" in capsys.readouterr().err


def test_the_speed_curve_compares_each_of_ours_with_fewer_steps_at_its_own_measured_speed(monkeypatch, capsys):
    curve = [(1.5, 30.0), (2.0, 26.0), (4.0, 18.0)]
    assert token_bounds._at_speed(curve, 1.75) == 28.0 and token_bounds._at_speed(curve, 3.0) == 22.0
    assert token_bounds._at_speed(curve, 1.0) is None and token_bounds._at_speed(curve, 5.0) is None
    monkeypatch.setattr(token_bounds, "CURVE_BUDGETS", (0.3, 0.6))
    monkeypatch.setattr(token_bounds, "CURVE_STEPS", (3, 5))
    rows = token_bounds.speed_curve(_tiny_model(), steps=8)
    assert list(rows) == ["steps-3", "steps-5", "ours-0.3", "ours-0.6"]
    assert all(row["speedup"] > 0 and math.isfinite(row["psnr"]) for row in rows.values())
    plain = sorted((rows[n]["speedup"], rows[n]["psnr"]) for n in ("steps-3", "steps-5"))
    for name in ("ours-0.3", "ours-0.6"):
        row = rows[name]
        assert row["steps_psnr"] == token_bounds._at_speed(plain, row["speedup"])
        assert (
            row["gain"] is None
            if row["steps_psnr"] is None
            else row["gain"] == round(row["psnr"] - row["steps_psnr"], 2)
        )
    assert "PSNR against measured speed-up" in capsys.readouterr().out


# -- reachability, the caching baseline and the JSON line (calibration timings stubbed) ----------------------------


def _tiny_image_model() -> bench.Model:
    """The tiny PixArt pipeline as the benchmark's image model, 16 tokens, with a front of FORA schedules that
    carries the metrics a searched front has (members A..D: relative MACs 0.9, 0.47, 0.44, 0.2)."""
    from conftest import build_tiny_pixart_pipeline

    from accel.caching import Front, fora, layout_of

    pipe = build_tiny_pixart_pipeline()
    kwargs = {"output_type": "pt", "height": 16, "width": 16, "use_resolution_binning": False, "clean_caption": False}

    def generate(prompts, steps, seed):
        generator = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        return pipe(list(prompts), num_inference_steps=steps, generator=generator, **kwargs).images

    members = [(1, 0.9, 45.0), (2, 0.47, 30.0), (3, 0.44, 33.0), (6, 0.2, 20.0)]
    front = Front(
        schedules=tuple(
            fora(layout_of(pipe), 20, k).with_metrics(relative_macs=macs, psnr=psnr, speedup=1 / macs)
            for k, macs, psnr in members
        )
    )
    return bench.Model("image", pipe, ["a red apple", "a blue car"], generate, tokens=16, probe=1, front=front)


def _stub_runtime(model, steps):
    """Predicted runtime ratios as a calibration could fit them: ``0.1 + 0.2 x grid + 0.7 x token-steps``,
    FORA ``0.3 + 0.6 / interval`` (at best 0.3 + 0.6 / steps: it cannot reach 25%), the front ``0.1 + 0.9 x
    relative MACs`` (member D at 0.28: it misses 25% by more than 10%)."""
    predict = {
        "tokens": lambda config, n=steps: (
            0.1 + 0.2 * bench._shares(config, steps, model, n)[0] + 0.7 * bench._shares(config, steps, model, n)[1]
        ),
        "fora": lambda interval: 0.3 + 0.6 / interval,
    }
    if model.front is not None:
        predict["front"] = lambda i: 0.1 + 0.9 * model.front.schedules[i].metrics["relative_macs"]
    return predict


def test_rows_that_cannot_reach_their_target_are_flagged_and_the_front_member_is_the_best_near_it(monkeypatch):
    monkeypatch.setattr(bench, "_runtime", _stub_runtime)
    chosen = bench.calibrate(_tiny_image_model(), steps=16)
    half, quarter = chosen[0.5], chosen[0.25]
    assert abs(half["predicted"]["ours"] - 0.5) <= 0.05 and "ours" not in half["unreachable"]
    assert half["fora"] == 3 and half["predicted"]["fora"] == pytest.approx(0.5)
    # members B (predicted 0.523, PSNR 30) and C (0.496, PSNR 33) are both within 10% of 0.5: the better, C
    assert half["front"] == 2 and "front" not in half["unreachable"]
    assert quarter["fora"] == 16 and quarter["front"] == 3  # the fastest settings
    assert {"fora", "front", "ras"} <= set(quarter["unreachable"])  # RAS's dense steps alone cost 0.3 and more
    assert "ours" not in quarter["unreachable"] and "steps" not in quarter["unreachable"]
    for target, knobs in chosen.items():
        for name in ("ours", "ours-all-steps", "ras", "steps", "fora", "front"):
            missed = abs(knobs["predicted"][name] - target) > bench.TOLERANCE * target
            assert (name in knobs["unreachable"]) == missed, (target, name)


class _StubScores:
    """Stands in for :class:`accel.bench.token_report.Scores` (whose scorers need downloaded weights): the real
    PSNR, zeros for the rest."""

    def __init__(self, model, full, reference):
        self.model, self.full = model, full

    def __call__(self, samples):
        row = {"psnr": psnr_of(samples, self.full), "ssim": 0.0, "fid": 0.0, "kid": 0.0, "alignment": 0.0}
        return row | ({"motion": 0.0} if samples.ndim == 5 else {})


#: the issue's keys of the JSON line (per model: bare for video, prefixed ``image_`` for images)
REQUIRED = {
    "psnr_at_50", "ras_psnr_at_50", "steps_psnr_at_50", "cache_psnr_at_50",
    "psnr_at_25", "ras_psnr_at_25", "steps_psnr_at_25", "speedup_at_50", "speedup_at_25",
}  # fmt: skip


def _no_model(count):
    raise AssertionError("a skipped model was loaded")


@pytest.fixture
def stubbed(monkeypatch):
    """The benchmark on the tiny models: stub runtime fit and scores, real generation and timing."""
    monkeypatch.setattr(bench, "_runtime", _stub_runtime)
    monkeypatch.setattr(bench, "Scores", _StubScores)


def test_skip_video_runs_the_image_model_alone_with_the_front_as_a_caching_row(stubbed, monkeypatch, capsys):
    monkeypatch.setattr(bench, "_video_model", _no_model)
    monkeypatch.setattr(bench, "_image_model", lambda count: _tiny_image_model())
    result = bench.run(["--skip-video", "--steps", "8", "--images", "2"])
    assert REQUIRED <= {key.removeprefix("image_") for key in result} and "psnr_at_50" not in result
    assert list(result["details"]) == ["image"]
    rows = result["details"]["image"]["rows"]
    assert {name.split("-")[0] for name in rows if name.endswith("@50")} >= {"fora", "front"}
    for tag in ("50", "25"):  # the caching baseline: the better of the FORA and front rows that reach the target
        cached = {name: row for name, row in rows.items() if name.endswith(f"@{tag}") and "-" in name}
        cached = {n.split("@")[0]: r for n, r in cached.items() if n.startswith(("fora-", "front-")) and r["reached"]}
        best = max(cached, key=lambda name: cached[name]["psnr"], default=None)
        assert result[f"image_cache_row_at_{tag}"] == best, tag
        assert result[f"image_cache_psnr_at_{tag}"] == (None if best is None else round(cached[best]["psnr"], 2))
    _check_reachability(result, "image_")
    out = capsys.readouterr().out
    assert "unreachable" in out and "no searched caching front" not in out
    _check_active(rows, out, "image")


def test_skip_image_runs_the_video_model_alone_with_fora_as_the_labelled_caching_baseline(stubbed, monkeypatch, capsys):
    monkeypatch.setattr(bench, "_image_model", _no_model)
    monkeypatch.setattr(bench, "_video_model", lambda count: _tiny_model())
    result = bench.run(["--skip-image", "--steps", "8", "--clips", "2"])
    assert REQUIRED <= set(result) and not any(key.startswith("image_") for key in result)
    assert list(result["details"]) == ["video"] and result["details"]["video"]["cache_baseline"].startswith("FORA")
    assert result["cache_row_at_50"].startswith("fora-")
    assert not any(name.startswith("front-") for name in result["details"]["video"]["rows"])
    _check_reachability(result, "")
    out = capsys.readouterr().out
    assert "video: no searched caching front for this model: its caching rows are FORA" in out
    _check_active(result["details"]["video"]["rows"], out, "video")
    with pytest.raises(ValueError, match="no model to run"):
        bench.run(["--skip-image", "--skip-video"])


def _check_reachability(result: dict, prefix: str) -> None:
    """A row that misses its target has a null headline PSNR; its measured numbers stay in the details."""
    rows = result["details"]["image" if prefix else "video"]["rows"]
    assert rows["ras@25"]["reached"] is False and result[f"{prefix}ras_psnr_at_25"] is None
    assert math.isfinite(rows["ras@25"]["psnr"]) and result[f"{prefix}ras_speedup_at_25"] > 0
    assert rows["ours@50"]["reached"] and result[f"{prefix}psnr_at_50"] == round(rows["ours@50"]["psnr"], 2)
    matched = rows["ours-at-steps@50"]
    assert result[f"{prefix}matched_psnr_at_50"] == (round(matched["psnr"], 2) if matched["reached"] else None)
    assert result[f"{prefix}matched_speedup_at_50"] == round(matched["speedup"], 2)


def _check_active(rows: dict, out: str, name: str) -> None:
    """``ours@50`` and ``ours@25`` record and print their per-step active fraction (dense steps first)."""
    for row in ("ours@50", "ours@25"):
        active = rows[row]["active"]
        assert active[0] == 1.0 and len(active) == rows[row]["grid_steps"] and min(active) < 1
        assert f"{name} {row}: active fraction per step ({len(active)} ran): " in out
