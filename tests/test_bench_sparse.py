"""``python -m accel.bench sparse``: arguments checked before any compute, kernel rows that time what they say,
and (slow) the end-to-end comparison on the bundled video model."""

from __future__ import annotations

import pytest

from accel.bench import sparse


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lengths", "1000"], "multiples of 256"),
        (["--densities", "0.2,1.5"], "densities must lie"),
        (["--densities", "a"], "comma-separated"),
        (["--target-density", "0"], "target-density"),
        (["--prompts", "9"], "--prompts"),
        (["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--repeats", "0"], "cuda|repeats"),
    ],
)
def test_bad_arguments_fail_before_any_compute(argv, message):
    with pytest.raises(ValueError, match=message):
        sparse.run(argv)


def test_kernel_rows_time_the_pattern_nearest_each_density():
    result = sparse.run(["--lengths", "512", "--densities", "0.3", "--skip-end-to-end", "--repeats", "1"])
    (row,) = result["kernel_rows"]
    assert row["tokens"] == 512 and row["density"] == 0.5  # 2 frames: one frame of two, or all
    assert row["sdpa_ms"] > 0 and row["sparse_ms"] > 0
    assert row["ratio"] == pytest.approx(row["sdpa_ms"] / row["sparse_ms"] * row["density"], rel=0.01)
    assert row["backend"] == result["kernel_backend"] == "runs"  # what plans run on here; flex timed beside it
    assert row["flex_ratio"] == pytest.approx(row["sdpa_ms"] / row["flex_ms"] * row["density"], rel=0.01)
    assert result["flex_ratio_at_0.2"] is None and result["ratio_at_0.2"] is None  # 0.2 was not measured


def test_kernel_rows_of_flex_alone_report_it_as_the_backend():
    result = sparse.run(
        ["--lengths", "512", "--densities", "0.2", "--skip-end-to-end", "--repeats", "1"] + ["--backend", "flex"]
    )
    (row,) = result["kernel_rows"]
    assert row["backend"] == "flex" and "flex_ms" not in row
    assert result["flex_ratio_at_0.2"] == result["ratio_at_0.2"] == row["ratio"]


@pytest.mark.slow
def test_end_to_end_reports_every_headline_number():
    result = sparse.run(["--lengths", "256", "--densities", "0.2", "--steps", "2", "--prompts", "1", "--repeats", "1"])
    keys = {"e2e_speedup", "psnr_vs_dense", "attention_density", "uniform_psnr_at_same_density", "search_minutes"}
    assert keys <= set(result) and set(result["targets"]) >= {"beats_uniform_by_1db", "psnr_at_least_25"}


def test_sensitivity_rows_score_the_smallest_changes_at_their_densities():
    result = sparse.run(
        ["--lengths", "256", "--densities", "0.2", "--skip-end-to-end", "--repeats", "1"]
        + ["--sensitivity", "--steps", "2", "--prompts", "1"]
    )
    rows = {row["change"]: row for row in result["sensitivity"]}
    assert set(rows) == {
        "one head skipped, first layer",
        "one head skipped, last layer",
        "head 0 of every layer: frames +-1",
        "every head: frames +-1 after 0 dense steps",
        "every head: frames +-1 after 1 dense steps",
        "dense, whole pipeline under bf16 autocast",
    }
    heads = 8 * 4  # the bundled video model: 8 blocks of 4 heads
    assert rows["one head skipped, first layer"]["density"] == pytest.approx(1 - 1 / heads, abs=1e-4)
    band = rows["every head: frames +-1 after 0 dense steps"]["density"]  # 3 of 9 latent frames, fewer at the ends
    assert band == pytest.approx((9 * 3 - 2) / 81, abs=1e-4)
    assert rows["every head: frames +-1 after 1 dense steps"]["density"] == pytest.approx((1 + band) / 2, abs=1e-4)
    assert all(0 < row["psnr"] < 100 and 0 < row["ssim"] <= 1 for row in rows.values())
    floor = rows["dense, whole pipeline under bf16 autocast"]  # a rounding-level change: near-identical clips
    assert floor["psnr"] > 35 and floor["ssim"] > 0.98, floor
