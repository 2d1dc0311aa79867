"""``python -m accel.bench quant``: arguments checked before any compute, the headline numbers read from the rows
as documented, and (gpu) the PixArt-XL-sized rows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from accel.bench import quant, quant_gpu, quant_video


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed-sets", "9"], "seed-sets"),
        (["--nsga-generations", "-1"], "nsga"),
        pytest.param(
            ["--device", "cuda"], "CUDA", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")
        ),
        (["--device", "mps"], "--device must be cpu, cuda or cuda:N"),
        (["--device", "cuda", "--repeats", "0"], "--repeats must be >= 1"),
        (["--target-speedups", ""], "one or more speedups above 1"),
        (["--target-speedups", " , "], "one or more speedups above 1"),
        (["--target-speedups", "2,x"], "numbers separated by commas"),
        (["--target-speedups", "2,1"], "above 1"),
        (["--target-speedups", "0.5"], "above 1"),
        (["--target-speedups", "inf"], "above 1"),
        (["--calibration-prompts", "9"], r"--calibration-prompts must be in 1\.\.8"),
        (["--calibration-prompts", "0"], "--calibration-prompts"),
        (["--video-prompts", "9"], r"--video-prompts must be in 1\.\.8"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--images", "0"], "--images"),
        (["--batch", "-1"], "--batch"),
        (["--repeats", "0"], "--repeats"),
        (["--video-interval", "0"], "--video-interval"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_arguments_fail_before_any_compute(argv, message, monkeypatch):
    from accel.eval.runtime import RuntimeConfig

    monkeypatch.setattr(RuntimeConfig, "load_pipeline", lambda *a, **k: pytest.fail("loaded the pipeline"))
    monkeypatch.setattr(quant, "Evaluator", lambda *a, **k: pytest.fail("built the evaluator"))
    with pytest.raises(ValueError, match=message):
        quant.run(argv)


def _row(speedup: float, psnr: float, fid: float, score: float, weight_bytes: int = 100) -> dict:
    return {"speedup": speedup, "median_speedup": speedup, "ideal_speedup": speedup, "psnr": psnr, "fid": fid,
            "kid": 0.01, "prompt_score": score, "weight_bytes": weight_bytes}  # fmt: skip


def test_headline_numbers_come_from_the_rows(capsys):
    rows = {
        "full": _row(1.0, 100.0, 200.0, 12.0),
        "int8-weight": _row(0.9, 50.0, 200.0, 12.0, 26),
        "int8-dynamic": _row(0.8, 40.0, 201.0, 12.0, 26),
        "naive@2": _row(1.9, 30.0, 203.0, 11.9, 26),
        "aware@2": _row(1.8, 31.5, 202.0, 11.9, 26),
        "naive@3": _row(2.8, 25.0, 230.0, 10.0, 26),
        "aware@3": _row(3.1, 25.5, 229.0, 10.0, 26),
    }
    noise = {"fid": 5.0, "prompt_score": 0.5, "full_fids": [200.0, 204.0], "prompt_metric": "alignment"}
    args = SimpleNamespace(steps=20, images=8, batch=4, repeats=1, threads=1, scheme="int8-static")
    plans = {}
    result = quant._summarise(rows, noise, {"2": None, "3": None}, plans, args)
    assert result["int8_speedup"] == 0.8 and result["weight_memory_ratio"] == 0.26
    assert result["naive_psnr"] == 30.0 and result["aware_psnr"] == 31.5  # the first target's rows
    assert result["aware_minus_naive"] == {"2": 1.5, "3": 0.5} and result["scheme"] == "int8-static"
    # aware@3 is faster but its FID is beyond the noise: the combined point is aware@2, within the noise
    assert result["combined_row"] == "aware@2" and result["combined_within_noise"]
    assert "aware@3" in capsys.readouterr().out


def test_the_nsga_row_counts_as_a_combined_point(capsys):
    rows = {
        "full": _row(1.0, 100.0, 200.0, 12.0),
        "int8-weight": _row(0.9, 50.0, 200.0, 12.0, 26),
        "int8-dynamic": _row(0.8, 40.0, 201.0, 12.0, 26),
        "naive@2": _row(1.9, 30.0, 203.0, 11.9, 26),
        "aware@2": _row(1.8, 31.5, 202.0, 11.9, 26),
        "nsga": _row(2.6, 30.5, 202.5, 11.8, 26),
    }
    noise = {"fid": 5.0, "prompt_score": 0.5, "full_fids": [200.0, 204.0], "prompt_metric": "alignment"}
    args = SimpleNamespace(steps=20, images=8, batch=4, repeats=1, threads=1, scheme="int8-dynamic")
    result = quant._summarise(rows, noise, {"2": None, "nsga": None}, {}, args)
    assert result["naive_psnr"] == 30.0 and result["combined_row"] == "nsga" and result["combined_within_noise"]
    assert "nsga" in capsys.readouterr().out


@pytest.mark.slow  # about 20 s: a fitted latency model and one generation on the tiny pipeline
def test_the_nsga_row_is_a_member_of_a_search_with_the_quantized_model_in_the_loop(monkeypatch, one_thread):
    from conftest import build_tiny_pixart_pipeline

    from accel.quant import Calibration

    pytest.importorskip("pymoo")
    torch.manual_seed(0)
    pipe = build_tiny_pixart_pipeline()
    calls = []
    real = quant.search_schedules
    monkeypatch.setattr(quant, "search_schedules", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    calibration = Calibration(prompts=("a red apple", "a blue car"), num_inference_steps=6)
    args = SimpleNamespace(steps=6, nsga_population=4, nsga_generations=1, scheme="int8-static")
    schedule = quant._nsga_schedule(pipe, calibration, {"max_sequence_length": 16}, 4.5, [1.5], args)
    assert [(c.scheme, c.calibration) for c in calls] == [("int8-static", calibration)]
    assert schedule.num_steps == 6 and schedule.metrics["psnr"] < 80  # scored with int8 weights vs full precision
    assert not schedule.mask.all()


def test_scheme_rows_quantize_compile_and_time_each_model_and_skip_what_the_device_lacks(capsys, one_thread):
    from accel.bench.caching import pixart_workload

    def tiny():
        return pixart_workload(layers=2, heads=2, head_dim=16, sample_size=8, steps=2, text_dim=32)

    schemes = {"fp32": None, "fp8": "fp8", "int8-dynamic": "int8-dynamic"}
    result = quant_gpu.compare_schemes(tiny, schemes, repeats=1, backend="eager")
    out = capsys.readouterr().out
    assert set(result) == {"fp32", "int8-dynamic"} and "fp8: skipped" in out
    assert result["fp32"]["speedup"] == 1.0 and result["int8-dynamic"]["weight_ratio"] < 0.5
    # each scheme's first call is reported as it ends, before the table (a time-boxed GPU run keeps these lines)
    assert out.index("int8-dynamic: first call") < out.index("\nscheme")
    assert all(row["first_call_seconds"] > 0 for row in result.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rows_time_every_scheme_the_device_runs():
    result = quant.run(["--device", "cuda", "--repeats", "1", "--gpu-steps", "2"])
    assert {"bf16", "int8-dynamic", "int8-weight"} <= set(result["gpu"])
    assert result["gpu"]["int8-dynamic"]["weight_ratio"] < 0.6  # int8 data against bf16


def test_video_rows_on_a_tiny_wan(capsys, one_thread):
    from eval_helpers import TINY_VIDEO_KWARGS, build_tiny_wan_pipeline

    from accel.quant import Calibration

    pipe = build_tiny_wan_pipeline()
    originals = {name: p for name, p in pipe.transformer.named_parameters()}
    calibration = Calibration(prompts=("a red apple", "a blue car"), num_inference_steps=4, batch=2,
                              call_kwargs=TINY_VIDEO_KWARGS)  # fmt: skip
    rows = quant_video.video_rows(
        pipe, ["a green tree", "the moon"], steps=4, call_kwargs=TINY_VIDEO_KWARGS, batch=2, repeats=1,
        calibration=calibration,
    )  # fmt: skip
    assert list(rows) == [
        "full", "int8-weight", "int8-dynamic", "int8-static", "cache", "cache+int8", "naive", "aware"
    ]  # fmt: skip
    assert rows["full"]["psnr"] >= 90 and rows["full"]["speedup"] == 1.0
    for name in ("int8-weight", "int8-dynamic", "int8-static"):  # int8 alone: small error, a quarter of the weights
        assert 30 < rows[name]["psnr"] < 90 and rows[name]["weight_memory_ratio"] < 0.5
    assert rows["cache"]["weight_memory_ratio"] == 1.0 and rows["cache"]["psnr"] < 90
    assert all(rows[n]["weight_memory_ratio"] < 0.5 for n in ("cache+int8", "naive", "aware"))
    assert all(p is originals[n] for n, p in pipe.transformer.named_parameters())
    assert "aware" in capsys.readouterr().out


def test_compiled_rows_count_the_graphs_and_stay_within_the_eager_error(one_thread):
    from conftest import build_tiny_pixart_pipeline

    from accel.quant import QuantConfig

    pipe = build_tiny_pixart_pipeline(num_layers=2)
    kwargs = dict(num_inference_steps=3, output_type="latent", max_sequence_length=16, use_resolution_binning=False)

    def run():
        return pipe(["a red apple"], generator=torch.Generator().manual_seed(0), **kwargs).images

    reference = run()
    with quant.accel.apply(pipe, QuantConfig(scheme="int8-dynamic")):
        eager = run()
    quant._compile(pipe)
    assert quant._compiled_graphs() == 0
    with quant.accel.apply(pipe, QuantConfig(scheme="int8-dynamic")):
        compiled = run()
    assert 1 <= quant._compiled_graphs() <= 2  # blocks of one class share their code: one graph, maybe a resume

    def err(x):
        return float((x - reference).pow(2).mean().sqrt())

    # inductor's int8 matmuls round differently from eager's: held to the same error against full precision
    assert err(compiled) <= 2 * err(eager) + 1e-6, (err(compiled), err(eager))


def test_without_fid_nothing_is_called_within_the_noise(capsys):
    rows = {
        "full": _row(1.0, 100.0, 200.0, 12.0),
        "int8-weight": _row(0.9, 50.0, 200.0, 12.0, 26),
        "int8-dynamic": _row(0.8, 40.0, 201.0, 12.0, 26),
        "naive@2": _row(1.9, 30.0, 203.0, 11.9, 26),
        "aware@2": _row(1.8, 31.5, 202.0, 11.9, 26),
    }
    args = SimpleNamespace(steps=20, images=8, batch=4, repeats=1, threads=1, scheme="int8-static")
    result = quant._summarise(rows, None, {"2": None}, {}, args)
    assert result["combined_row"] == "aware@2" and result["combined_within_noise"] is None  # not scored: unknown
    assert all(row["within_noise"] is None for row in result["rows"].values())
    assert result["noise"] is None and "within noise" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def searched_bench():
    """The tiny pipeline, the bench's calibration and an evaluator on two prompts at 6 steps (one thread)."""
    from conftest import build_tiny_pixart_pipeline

    from accel.caching.search import Evaluator, EvaluatorConfig
    from accel.quant import Calibration

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pipe = build_tiny_pixart_pipeline()
    call = {"max_sequence_length": 16}
    calibration = Calibration(prompts=("a red apple", "a blue car"), num_inference_steps=6, batch=2, call_kwargs=call)
    evaluator = Evaluator(pipe, ["a green tree", "the moon"], EvaluatorConfig(num_steps=6), call)
    yield pipe, calibration, evaluator
    torch.set_num_threads(threads)


def _finite_rows(rows: dict, names: list[str], evaluator, schedules: dict) -> None:
    """Every row has the bench's fields, finite (``weight_bytes`` and ``ideal_speedup`` set as ``run`` sets them)."""
    import math

    for name in names:
        row = rows[name]
        assert {"psnr", "speedup", "median_speedup", "spread"} <= set(row), row
        assert all(math.isfinite(v) for v in row.values()), row
        assert quant._ideal(evaluator, name, schedules) > 1.0  # the searched schedule's MACs are fewer


def test_the_searched_row_is_the_dp_schedule_of_the_quantized_models_changes(searched_bench, monkeypatch):
    from accel.caching import fora
    from accel.caching.search import dp
    from accel.caching.search.features import record_features
    from accel.eval.comparison import measure_methods
    from accel.quant.calibration import pipeline_runner

    pipe, calibration, evaluator = searched_bench
    seen = []
    real = dp.cachequant_mask
    monkeypatch.setattr(dp, "cachequant_mask", lambda change, updates: seen.append(change) or real(change, updates))
    schedules = {"2": fora(evaluator.layout, 6, 2)}
    args = SimpleNamespace(steps=6, scheme="int8-dynamic")
    schedule = quant._searched_schedule(pipe, calibration, evaluator, schedules, args)

    def changes(*configs):  # the change matrices of one trajectory over the calibration prompts
        with quant.accel.apply(pipe, *configs) if configs else quant.nullcontext():
            with record_features(pipe.transformer, evaluator.layout.components, sketch_size=4096) as recorder:
                pipeline_runner(pipe, calibration)()
        return recorder.change_matrices()

    quantized, full = changes(quant.QuantConfig(scheme="int8-dynamic")), changes()
    assert len(seen) == 1 and np.allclose(seen[0], quantized) and not np.allclose(seen[0], full)
    updates = max(2, round(schedules["2"].mask.mean() * 6))
    assert (schedule.mask == real(quantized, updates)).all() and "int8-dynamic" in schedule.provenance["method"]
    contexts, memory, plans = quant.method_contexts(pipe, {"searched": schedule}, calibration, None, "int8-dynamic")
    assert list(contexts) == ["full", "int8-weight", "int8-dynamic", "searched"]
    assert plans["searched"].settings["schedule"] == schedule.to_dict()  # calibrated cache-aware under it
    rows, _ = measure_methods(evaluator, contexts, batch=2, repeats=1)
    _finite_rows(rows, ["searched"], evaluator, {"searched": schedule})
    assert 15 < rows["searched"]["psnr"] < 80 and memory["searched"] < 0.5 * memory["full"]


def test_the_nsga_row_is_searched_with_the_quantized_model_in_the_loop(searched_bench, monkeypatch):
    from dataclasses import replace

    from accel.eval.comparison import measure_methods

    pytest.importorskip("pymoo")
    pipe, calibration, evaluator = searched_bench
    calls = []
    real = quant.search_schedules

    def measured(pipe, prompts, config, search, out, **kwargs):  # the bench's search, with the measured latency
        calls.append((config, search))  # cost instead of the fitted one (fitting takes ~15 s more here)
        return real(pipe, prompts, config, replace(search, evaluation=replace(search.evaluation, cost="latency")),
                    out, **kwargs)  # fmt: skip

    monkeypatch.setattr(quant, "search_schedules", measured)
    args = SimpleNamespace(steps=6, nsga_population=4, nsga_generations=1, scheme="int8-dynamic")
    schedule = quant._nsga_schedule(pipe, calibration, {"max_sequence_length": 16}, 4.5, [1.5], args)
    ((config, search),) = calls
    assert config.scheme == "int8-dynamic" and config.correct is False and config.calibration is None
    assert search.generations == 1 and search.evaluation.cost == "fitted"  # what the bench asks for
    assert schedule.num_steps == 6 and not schedule.mask.all()
    assert schedule.metrics["latent_psnr"] < 80  # scored with int8 weights against full precision
    contexts, memory, _ = quant.method_contexts(pipe, {"nsga": schedule}, calibration, None, "int8-dynamic")
    rows, _ = measure_methods(evaluator, {"full": contexts["full"], "nsga": contexts["nsga"]}, batch=2, repeats=1)
    _finite_rows(rows, ["nsga"], evaluator, {"nsga": schedule})
    assert memory["nsga"] < 0.5 * memory["full"]
