"""The evaluation harness on the tiny PixArt pipeline: trials, results.json, resume, reports."""

import json
import math

import pytest
from conftest import build_tiny_pixart_pipeline
from eval_helpers import PROMPTS, small_config

import accel.eval.harness as harness
from accel.eval.cost import TimingConfig
from accel.eval.harness import RESULTS_TYPE, run_evaluation
from accel.eval.methods import parse_method

METHODS = ("full", "fora-2", "steps-2", "diffusers-fbc-0.08", "diffusers-pab", "diffusers-magcache")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pixart_pipeline()


@pytest.fixture
def counted(monkeypatch):
    """Counts the harness's pipeline calls."""
    calls = []
    generate = harness.generate

    def counting(pipe, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return generate(pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(harness, "generate", counting)
    return calls


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, pipe):
    out = tmp_path_factory.mktemp("eval")
    import torch

    threads = torch.get_num_threads()
    results = run_evaluation(small_config(methods=METHODS, metrics=("psnr", "ssim", "fid")), out, pipe=pipe)
    torch.set_num_threads(threads)
    return out, results


def test_results_json_schema(evaluated):
    out, results = evaluated
    saved = json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN/inf
    assert saved == results and saved["type"] == RESULTS_TYPE and saved["version"] == 1
    run = saved["run"]
    assert run["config"]["prompts"] == list(PROMPTS) and run["seeds"] == [0, 1, 2, 3]
    assert (
        len(run["prompts_sha256"]) == 64 and run["prompts_source"] == "built-in" and run["prompts_file_sha256"] is None
    )
    assert {"torch", "diffusers", "accel", "transformers", "accelerate"} <= set(run["versions"])
    assert run["device"].startswith("cpu") and run["num_processes"] == 1
    assert [t["method"] for t in saved["trials"]] == list(METHODS)
    for trial in saved["trials"]:
        assert {"method", "kind", "params", "key", "status"} <= set(trial)
        if trial["status"] != "ok":
            continue
        assert {"config", "steps", "latency", "macs", "memory", "metrics", "images"} <= set(trial)
        assert len(trial["latency"]["samples_s"]) == 1 and trial["latency"]["speedup"] > 0
        assert trial["macs"]["per_image"] > 0 and "FlopCounterMode" in trial["macs"]["how"]
        assert trial["memory"]["peak_bytes"] > 0 and "weights excluded" in trial["memory"]["what"]
        for name, value in trial["metrics"].items():
            assert {"value", "better", "computed"} <= set(value), name
            assert value["value"] is not None or value["unavailable"]
        assert len(list((out / trial["images"]).glob("*.png"))) == len(PROMPTS)


def test_fidelity_of_full_is_capped_and_of_fora_finite(evaluated):
    trials = {t["method"]: t for t in evaluated[1]["trials"]}
    assert trials["full"]["metrics"]["PSNR"]["value"] == 100.0 and trials["full"]["metrics"]["SSIM"]["value"] == 1.0
    assert trials["full"]["latency"]["speedup"] == 1.0
    psnr = trials["fora-2"]["metrics"]["PSNR"]["value"]
    assert math.isfinite(psnr) and 30 < psnr < 100
    assert (
        trials["steps-2"]["steps"] == 2 and trials["steps-2"]["macs"]["per_image"] < trials["full"]["macs"]["per_image"]
    )
    # the cached features of FORA take memory that full compute does not hold
    assert trials["fora-2"]["memory"]["peak_bytes"] > trials["full"]["memory"]["peak_bytes"]
    stats = trials["fora-2"]["technique_stats"]
    assert stats["reuse_fraction"] == pytest.approx(0.5)
    assert trials["fora-2"]["config"]["schedule"]["provenance"]["generator"] == "fora"
    assert trials["full"]["metrics"]["FID-EffNetLite0"]["value"] == pytest.approx(0, abs=1e-3)
    assert "KID-EffNetLite0" in trials["fora-2"]["metrics"]


def test_unsupported_is_recorded_with_its_reason(evaluated):
    trials = {t["method"]: t for t in evaluated[1]["trials"]}
    assert trials["diffusers-fbc-0.08"]["status"] == "ok"  # in a cache context the harness supplies
    assert trials["diffusers-fbc-0.08"]["config"]["harness_cache_context"] is True
    assert trials["diffusers-magcache"]["status"] == "unsupported"  # no magnitude ratios for this model
    assert "calibrate_mag_ratios" in trials["diffusers-magcache"]["reason"]
    assert trials["diffusers-pab"]["status"] == "ok"
    assert trials["diffusers-pab"]["config"]["applied_with"] == "diffusers.hooks.apply_pyramid_attention_broadcast"


def test_reports_name_every_method(evaluated):
    out, _ = evaluated
    markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for method in METHODS:
        assert method in markdown and method in page
    assert "Pareto" in markdown and "<svg" in page and "data:image/png;base64," in page
    assert "calibrate_mag_ratios" in markdown and "http" not in page.replace("http://www.w3.org/2000/svg", "")


def test_resume_skips_finished_trials(tmp_path, pipe, counted, one_thread):  # noqa: F811
    config = small_config(methods=("full", "fora-2", "steps-2"))
    first = run_evaluation(config, tmp_path, pipe=pipe)
    assert len(counted) > 0
    counted.clear()
    again = run_evaluation(config, tmp_path, pipe=pipe)
    assert counted == [] and again["trials"] == first["trials"]
    # an interrupted trial: its images are on disk but its result is not; only its cost is measured again
    next((tmp_path / "trials").glob("fora-2-*.json")).unlink()
    run_evaluation(config, tmp_path, pipe=pipe)
    assert counted and all(n == config.timing.batch for n in counted)
    # a metric asked for later is computed from the saved images, without generating anything
    counted.clear()
    more = run_evaluation(
        small_config(methods=("full", "fora-2", "steps-2"), metrics=("psnr", "fid")), tmp_path, pipe=pipe
    )
    assert counted == []
    for trial in more["trials"]:
        assert {"PSNR", "SSIM", "FID-EffNetLite0"} <= set(trial["metrics"]) and trial["metric_keys"][-1] == "fid"


def test_trial_key_follows_what_changes_the_images(tmp_path, pipe, one_thread):  # noqa: F811
    context = harness.build_context(small_config(), tmp_path, pipe)
    method = parse_method("fora-2")
    key = harness.trial_key(context, method)
    same = small_config(timing=TimingConfig(warmup=2, repeats=5), metrics=("psnr",), methods=("full",))
    assert harness.trial_key(harness.build_context(same, tmp_path, pipe), method) == key
    for change in (dict(steps=5), dict(seed=1), dict(prompts=PROMPTS[:2]), dict(guidance_scale=2.0)):
        assert harness.trial_key(harness.build_context(small_config(**change), tmp_path, pipe), method) != key


def test_run_to_run_noise_of_the_prompt_score_over_other_seed_sets(tmp_path, pipe, counted, one_thread):  # noqa: F811
    from accel.eval.report import markdown_report, noise_lines

    config = small_config(methods=("full", "fora-2"), metrics=("psnr", "clip"), noise_seed_sets=2)
    results = run_evaluation(config, tmp_path, pipe=pipe)
    noise = results["noise"]
    assert noise["seeds"] == [0, 4, 8]  # the run's own seeds, then two sets of 4 prompts each
    (name,) = noise["values"]  # the prompt score only: PSNR compares with the same seed's image
    values = noise["values"][name]
    assert len(values) == 3 and noise["noise"][name] == pytest.approx(max(values) - min(values))
    full = next(t for t in results["trials"] if t["method"] == "full")
    assert values[0] == pytest.approx(full["metrics"][name]["value"])
    assert len(list(tmp_path.glob("images/noise-*/*.png"))) == 2 * len(PROMPTS)
    (line,) = noise_lines(results)
    assert line.startswith(f"{name}: noise ") and "over 3 full-compute seed sets" in line
    assert "## Run-to-run noise" in markdown_report(results)
    assert "<h2>Run-to-run noise</h2>" in (tmp_path / "report.html").read_text()
    calls = len(counted)
    assert run_evaluation(config, tmp_path, pipe=pipe)["noise"] == noise and len(counted) == calls  # resumed
