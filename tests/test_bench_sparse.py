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
        (["--dense-steps", "-1", "--skip-end-to-end"], "--dense-steps must be in 0..9"),
        (["--steps", "2", "--dense-steps", "2"], r"--dense-steps must be in 0..1 \(below --steps"),
        (["--steps", "2", "--dense-steps", "1"], "1 dense steps of 2 already exceed a mean density of 0.4"),
        (["--heads", "0"], "--heads must be >= 1"),
        (["--head-dim", "0"], "--head-dim must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_arguments_fail_before_any_compute(argv, message, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("the kernel rows ran before the arguments were checked")

    monkeypatch.setattr(sparse, "kernel_rows", no_compute)
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
    assert result["targets"] == {}  # nor is any target: none is reported as missed


def test_kernel_rows_of_flex_alone_report_it_as_the_backend():
    result = sparse.run(
        ["--lengths", "512", "--densities", "0.2", "--skip-end-to-end", "--repeats", "1"] + ["--backend", "flex"]
    )
    (row,) = result["kernel_rows"]
    assert row["backend"] == "flex" and "flex_ms" not in row
    assert result["flex_ratio_at_0.2"] == result["ratio_at_0.2"] == row["ratio"]
    met = row["ratio"] >= 0.5  # the kernel targets this run measured, and no GPU or end-to-end one
    assert result["targets"] == {"ratio_at_0.2_at_least_0.5": met, "flex_ratio_at_0.2_at_least_0.5": met}


def _triton_rows(ratios: dict[float, float], backend: str = "triton") -> dict:
    rows = [{"tokens": 32768, "target": t, "backend": backend, "ratio": r} for t, r in ratios.items()]
    rows.append({"tokens": 8192, "target": 0.1, "backend": backend, "ratio": 0.1})  # shorter: not the target's
    return {"kernel_rows": rows, "ratio_at_0.2": ratios.get(0.2), "flex_ratio_at_0.2": None}


@pytest.mark.parametrize(
    ("ratios", "met"),
    [({0.1: 0.72, 0.2: 0.8, 0.3: 0.75, 0.5: 0.2}, True), ({0.1: 0.72, 0.2: 0.8, 0.3: 0.69}, False)],
)
def test_cuda_triton_rows_report_the_issues_gpu_target(ratios, met):
    targets = sparse.targets(_triton_rows(ratios), "cuda")
    assert targets["triton_ratio_at_0.1_0.3_at_least_0.7"] is met
    assert targets["ratio_at_0.2_at_least_0.5"] is True and "psnr_at_least_25" not in targets


def test_cuda_rows_without_triton_say_the_gpu_target_was_not_measured(capsys):
    targets = sparse.targets(_triton_rows({0.1: 0.9, 0.2: 0.9}, backend="flex"), "cuda")
    assert "triton_ratio_at_0.1_0.3_at_least_0.7" not in targets
    assert "GPU kernel target was not measured" in capsys.readouterr().out


def test_end_to_end_loads_the_pipeline_on_the_requested_device(monkeypatch):
    import torch

    import accel.pipelines.video as video

    seen = {}

    class Pipe:
        def set_progress_bar_config(self, **kwargs):
            seen["progress"] = kwargs

    def load(**kwargs):
        seen.update(kwargs)
        return Pipe()

    monkeypatch.setattr(video, "load_default_video_pipeline", load)
    sparse._pipeline(sparse._parser().parse_args(["--device", "cuda:1", "--dtype", "bfloat16"]))
    assert seen == {"device": "cuda:1", "torch_dtype": torch.bfloat16, "progress": {"disable": True}}
    sparse._pipeline(sparse._parser().parse_args([]))
    assert seen["device"] == "cpu" and seen["torch_dtype"] == torch.float32


@pytest.mark.slow
def test_end_to_end_reports_every_headline_number():
    result = sparse.run(
        ["--lengths", "256", "--densities", "0.2", "--steps", "2", "--dense-steps", "0", "--prompts", "1"]
        + ["--repeats", "1"]
    )
    keys = {"e2e_speedup", "psnr_vs_dense", "attention_density", "uniform_psnr_at_same_density", "search_minutes"}
    assert keys | {"search_cpu_minutes"} <= set(result)
    assert set(result["targets"]) >= {"beats_uniform_by_1db", "psnr_at_least_25", "search_under_15_minutes"}


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
