"""The caching schedule search with the quantized model in the loop (accel.quant.search_schedules), on the tiny
PixArt pipeline: candidates run on int8 weights and are scored against full precision, the weights come back."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_pixart_pipeline

import accel
from accel.caching.search import Evaluator, EvaluatorConfig, SearchConfig
from accel.eval.generation import weights_checksum
from accel.quant import QuantConfig, search_schedules

pytest.importorskip("pymoo")

PROMPTS = ["a red apple", "a blue car"]
CALL = {"max_sequence_length": 16}
STEPS = 6


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (see conftest.one_thread)."""


def _config(cost: str = "latency") -> SearchConfig:
    return SearchConfig(
        population=4, generations=1, prompts_growth=0, forecast_orders=(0,), max_front=4, time_repeats=1,
        evaluation=EvaluatorConfig(num_steps=STEPS, cost=cost),
    )  # fmt: skip


def test_a_mac_cost_is_refused_before_any_compute(tmp_path):
    with pytest.raises(ValueError, match="measured cost"):
        search_schedules(None, PROMPTS, QuantConfig(), _config("macs"), tmp_path)


def test_a_scheme_the_device_cannot_run_is_refused_before_the_evaluator_runs(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tiny_models import TINY_MODELS

    monkeypatch.setattr("accel.quant.schedule_search.Evaluator", lambda *a, **k: pytest.fail("evaluator built"))
    pipe = SimpleNamespace(transformer=TINY_MODELS["pixart"].build())  # on the CPU: no float8 matmuls
    with pytest.raises(RuntimeError, match="'fp8' needs a CUDA GPU"):
        search_schedules(pipe, PROMPTS, QuantConfig(scheme="fp8"), _config(), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("cost", ["latency", "fitted"])
def test_the_search_scores_candidates_on_the_quantized_model_against_full_precision(tmp_path, cost):
    torch.manual_seed(0)
    pipe = build_tiny_pixart_pipeline()
    originals = {name: p for name, p in pipe.transformer.named_parameters()}
    checksum = weights_checksum(pipe)
    config = _config(cost)
    evaluator = Evaluator(pipe, PROMPTS, config.evaluation, CALL)
    quant = QuantConfig(scheme="int8-dynamic")
    front = search_schedules(pipe, PROMPTS, quant, config, tmp_path, call_kwargs=CALL, evaluator=evaluator)

    # the weights are the originals again, bit for bit
    assert all(p is originals[n] for n, p in pipe.transformer.named_parameters())
    assert weights_checksum(pipe) == checksum
    assert len(front) >= 1 and front.info["quant"]["scheme"] == "int8-dynamic"
    assert front.info["model_identity"]["weights"] != checksum  # the quantized weights' identity
    for schedule in front:
        assert schedule.metrics["speedup"] > 0
    if cost == "fitted":  # fitted on the quantized model, and keyed by its identity
        saved = json.loads((tmp_path / "latency_model.json").read_text())
        assert saved["model"] == front.info["model_identity"]
        assert front.info["quant"]["cost_relative_to"] == "quantized model"
    # each member's recorded PSNR is that of cache + int8 against the full-precision reference, not of the cache
    # alone: measured again by hand, under both, it matches the first and not the second
    schedule = front.schedules[0]
    with accel.apply(pipe, quant):
        combined = evaluator.latent_psnr(evaluator.generate(schedule, len(PROMPTS)))
    cached_only = evaluator.latent_psnr(evaluator.generate(schedule, len(PROMPTS)))
    assert schedule.metrics["latent_psnr"] == pytest.approx(combined, abs=1e-4)
    assert abs(cached_only - combined) > 0.1
    # the reference is full precision: the quantized model's own full compute is measured against it
    with accel.apply(pipe, quant):
        quantized_full = evaluator.latent_psnr(evaluator.generate(None, len(PROMPTS)))
    assert 20 < quantized_full < 80 and evaluator.latent_psnr(evaluator.generate(None, len(PROMPTS))) > 90
    assert weights_checksum(pipe) == checksum


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quant-scheme", "int8-dynamic"], "needs a measured cost"),
        (["--quant-scheme", "int8-dynamic", "--cost", "latency", "--report"], "replays the front in full precision"),
        (["--quant-scheme", "fp8", "--cost", "fitted"], "'fp8' needs a CUDA GPU"),
    ],
)
def test_cli_quant_search_is_refused_before_the_model_loads(flags, message, tmp_path, monkeypatch, capsys):
    from accel.cli import main
    from accel.eval.runtime import RuntimeConfig

    monkeypatch.setattr(RuntimeConfig, "load_pipeline", lambda *a, **k: pytest.fail("loaded the pipeline"))
    assert main(["search", "--out", str(tmp_path / "front"), "--algorithm", "dp", *flags]) == 1
    assert message in capsys.readouterr().err


def test_cli_searches_with_the_quantized_model_in_the_loop_and_marks_the_front(tmp_path, model_dir):
    from accel.caching import load_front
    from accel.caching.schedule import Schedule
    from accel.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "front"
    argv = ["search", "--model", str(model_dir), "--prompts", str(prompts), "--steps", "5", "--out", str(out)]
    argv += ["--algorithm", "dp", "--max-sequence-length", "16", "--quant-scheme", "int8-dynamic", "--cost", "latency"]
    assert main(argv) == 0
    front = load_front(out)
    assert front.info["quant"]["scheme"] == "int8-dynamic" and front.info["quant"]["weight_memory_ratio"] < 0.5
    assert front.info["model_identity"]["quant_scheme"] == "int8-dynamic"
    files = sorted(out.glob("schedule-*.json"))
    assert len(files) == len(front) >= 1
    for path in files:  # each schedule file says it was scored with int8 weights, against full precision
        schedule = Schedule.load(path)
        assert schedule.provenance["quant"]["scheme"] == "int8-dynamic"
        assert schedule.metrics["latent_psnr"] < 80
