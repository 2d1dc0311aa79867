"""``python -m accel.bench tokens``'s calibration and rows, on the tiny Wan pipeline (the bundled models are too
slow for the suite)."""

import numpy as np
import pytest
import torch
from eval_helpers import TINY_VIDEO_KWARGS, VIDEO_PROMPTS, build_tiny_wan_pipeline

from accel.bench import tokens as bench


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (see conftest.one_thread)."""


def test_the_runtime_fit_recovers_grid_and_token_costs():
    shares = [(1.0, 1.0), (0.5, 0.5), (1.0, 0.3), (0.4, 0.2), (0.25, 0.25)]
    ratios = [0.1 + 0.3 * grid + 0.6 * tokens for grid, tokens in shares]
    assert np.allclose(bench._fit(shares, ratios), [0.1, 0.3, 0.6])


def test_calibration_picks_a_knob_per_method_and_the_rows_follow_it(capsys):
    pipe = build_tiny_wan_pipeline()

    def generate(prompts, steps, seed):
        generator = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        kwargs = {"num_inference_steps": steps, "output_type": "pt", "generator": generator, **TINY_VIDEO_KWARGS}
        return pipe(list(prompts), **kwargs).frames

    model = bench.Model("video", pipe, list(VIDEO_PROMPTS[:2]), generate, tokens=48, probe=1)
    chosen = bench.calibrate(model, steps=8)
    assert "runtime ratio =" in capsys.readouterr().out
    for target, knobs in chosen.items():
        assert 0.05 <= knobs["ours"] <= 1 and 0.05 <= knobs["ras"] <= 1 and 2 <= knobs["steps"] <= 8
        assert 2 <= knobs["fora"] <= 8 and knobs["steps"] <= {0.5: 8, 0.25: 6}[target]
    rows = bench.methods(model, 8, chosen)
    assert [name.split("@")[0] for name in rows][:5] == ["full", "ours", "ours-own", "ours-all-steps", "ras"]
    ours = rows["ours@25"][3]
    assert ours.min_active == 0.5 and rows["ours-all-steps@25"][3].min_active == 0
    assert ours.grid_steps(8) == (8 if ours.budget >= 0.5 else max(2, round(8 * ours.budget / 0.5)))
    assert ours.dense_steps == 1 and ours.reset_points == (0.4, 0.733)  # 3/20 of a grid of at most 8 steps
