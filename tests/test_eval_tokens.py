"""Per-token step allocation in ``accel eval``: the ``tokens-B`` method and the heat map of per-token step counts
in ``report.html``, for images (tiny PixArt) and video (tiny Wan)."""

import re

import pytest
from conftest import build_tiny_pixart_pipeline
from eval_helpers import TINY_VIDEO_KWARGS, VIDEO_PROMPTS, build_tiny_wan_pipeline, small_config

from accel.eval.harness import run_evaluation
from accel.eval.methods import parse_method


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (see conftest.one_thread)."""


def test_the_tokens_method_takes_a_fraction_of_token_steps():
    assert parse_method("tokens-0.5").params == {"budget": 0.5}
    for bad in ("tokens-0", "tokens-1.5"):
        with pytest.raises(ValueError, match="fraction of token-steps"):
            parse_method(bad)


def _check_report(out, results, frames: int, steps: int) -> None:
    (trial,) = [t for t in results["trials"] if t["method"] == "tokens-0.5"]
    assert trial["status"] == "ok", trial.get("reason")
    stats = trial["technique_stats"]
    heat, grid = stats["heat_map"], stats["grid"]
    assert [len(heat), len(heat[0]), len(heat[0][0])] == grid and grid[0] == frames
    values = [v for frame in heat for row in frame for v in row]
    assert 2 <= min(values) and max(values) <= steps  # every token computed at the two dense steps
    assert abs(sum(values) / (len(values) * steps) - stats["token_steps"]) < 1e-3
    page = (out / "report.html").read_text()
    section = page[page.index("<h2>Per-token step counts</h2>") :]
    assert section.count("<svg") == frames + 1  # one grid per latent frame, then the bars of the steps
    cells = re.findall(r"<rect [^>]*><title>([0-9.]+) steps</title>", section)
    assert sorted(float(c) for c in cells) == pytest.approx(sorted(values), abs=0.01)
    bars = re.findall(r"<title>step (\d+): (\d+)% of tokens</title>", section)
    assert [int(step) for step, _ in bars] == list(range(len(stats["active"])))
    assert [int(share) for _, share in bars] == [round(100 * a) for a in stats["active"]]
    assert [int(share) for _, share in bars][:2] == [100, 100] and min(int(s) for _, s in bars) < 100
    assert "<h2>Per-token step counts</h2>" not in page[: page.index("<h2>All methods</h2>")]


def test_image_report_draws_the_heat_map_of_a_tokens_method(tmp_path):
    config = small_config(methods=("full", "tokens-0.5"), steps=6)
    results = run_evaluation(config, tmp_path, pipe=build_tiny_pixart_pipeline())
    _check_report(tmp_path, results, frames=1, steps=6)


def test_video_report_draws_one_heat_map_per_frame(tmp_path):
    config = small_config(
        prompts=VIDEO_PROMPTS,
        steps=6,
        methods=("full", "tokens-0.5"),
        metrics=("psnr",),
        pipeline_kwargs=TINY_VIDEO_KWARGS,
    )
    results = run_evaluation(config, tmp_path, pipe=build_tiny_wan_pipeline())
    _check_report(tmp_path, results, frames=3, steps=6)


@pytest.mark.parametrize(
    "config, said",
    [
        ({"budget": 0.1, "reset_points": (0.4, 0.733)}, "no token is skipped, this is 3 plain steps"),
        ({"budget": 0.1, "dense_steps": 2}, "the 2 dense steps of the 3-step grid alone compute 0.20 of the"),
        ({"budget": 0.5}, None),
    ],
)
def test_the_handle_says_when_its_dense_steps_skip_nothing_or_exceed_the_budget(caplog, config, said):
    import torch

    from accel import apply
    from accel.caching import TokenStepConfig

    pipe = build_tiny_wan_pipeline()
    with caplog.at_level("WARNING", logger="accel.caching.tokens"), apply(pipe, TokenStepConfig(**config)):
        kwargs = {"num_inference_steps": 10, "output_type": "latent", "generator": torch.Generator().manual_seed(0)}
        pipe(list(VIDEO_PROMPTS[:1]), **kwargs, **TINY_VIDEO_KWARGS)
    if said:
        assert said in caplog.text
    else:
        assert "dense steps" not in caplog.text and "no token is skipped" not in caplog.text


def test_a_budget_below_min_active_runs_the_pipeline_on_a_coarser_grid(caplog):
    """Budget 0.25 on 10 steps (min_active 0.5) is the same allocation as budget 0.5 on 5 steps, and says so."""
    import torch

    from accel import apply
    from accel.caching import TokenStepConfig

    pipe = build_tiny_wan_pipeline()
    original = pipe.scheduler.set_timesteps

    def run(steps: int, config: TokenStepConfig):
        with apply(pipe, config) as handle:
            latents = pipe(
                list(VIDEO_PROMPTS[:2]),
                num_inference_steps=steps,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
                **TINY_VIDEO_KWARGS,
            ).frames
        return latents, handle.stats()

    with caplog.at_level("WARNING", logger="accel.caching.tokens"):
        coarse, stats = run(10, TokenStepConfig(budget=0.25, min_active=0.5))
    assert "10 steps run on a grid of 5" in caplog.text
    fewer, fewer_stats = run(5, TokenStepConfig(budget=0.5, min_active=0))
    assert torch.equal(coarse, fewer)
    assert stats.steps == (10, 5) and fewer_stats.steps == (5, 5)
    assert stats.active == fewer_stats.active and abs(stats.token_steps - fewer_stats.token_steps / 2) < 1e-9
    assert pipe.scheduler.set_timesteps == original  # the wrap is undone
    import numpy as np

    # a NumPy count is a count too
    numpy_count, numpy_stats = run(np.int64(10), TokenStepConfig(budget=0.25, min_active=0.5))
    assert numpy_stats.steps == (10, 5) and torch.equal(numpy_count, coarse)


def test_explicit_sigmas_and_timesteps_are_resampled_over_the_same_range():
    import numpy as np
    import torch

    from accel.caching.tokens import _resample

    sigmas = np.linspace(1.0, 0.05, 20)
    assert np.allclose(_resample(sigmas, 5), np.linspace(1.0, 0.05, 5))
    assert _resample([999, 749, 499, 249, 0], 3) == [999, 499, 0]
    tensor = _resample(torch.tensor([1.0, 0.5, 0.0]), 5)
    assert tensor.dtype == torch.float32 and torch.allclose(tensor, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
