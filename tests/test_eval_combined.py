"""Techniques combined in one method (``fora-2+tokens-0.5``) and saved sparse-attention and quantization plans as
methods (``PATH.json``), through ``accel eval``'s method grammar, on the tiny PixArt and Wan pipelines (sparse
attention serves Wan's processors)."""

import pytest
import torch
from conftest import build_tiny_pixart_pipeline
from eval_helpers import TINY_VIDEO_KWARGS, build_tiny_wan_pipeline, small_config

import accel
from accel.eval.generation import call_kwargs, generate, generates_video
from accel.eval.harness import run_evaluation
from accel.eval.method_checks import check_method
from accel.eval.methods import UnsupportedMethod, apply_method, parse_method
from accel.sparse import HeadPattern, uniform_plan

STEPS = 6


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pixart_pipeline()


@pytest.fixture(scope="module")
def video():
    return build_tiny_wan_pipeline()


def _calls(pipe) -> dict:
    return call_kwargs(pipe, TINY_VIDEO_KWARGS if generates_video(pipe) else None)


def _generate(pipe, steps=STEPS):
    return generate(pipe, ["a red apple", "a blue car"], [0, 1], steps, 4.5, _calls(pipe))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def _sparse_plan(pipe, path):
    """A plan of a window of one frame, row and column around each token, for every head; saved at ``path``."""
    plan = uniform_plan(pipe.transformer, HeadPattern(windows=((1, 1, 1),)))
    plan.save(path)
    return path


def _untouched(pipe) -> bool:
    return not any("forward" in m.__dict__ for m in pipe.transformer.modules())


def test_a_combined_method_applies_every_part_in_one_call_and_records_each(pipe, caplog):
    reference = _generate(pipe)
    method = parse_method("fora-2+tokens-0.5")
    with caplog.at_level("WARNING"), apply_method(method, pipe, STEPS, True, _calls(pipe)) as applied:
        applied.reset()
        out = _generate(pipe, applied.steps)
        stats = applied.stats()
    assert applied.config["type"] == "combined"
    assert [c["type"] for c in applied.config["configs"]] == ["accel.caching.CacheConfig", "TokenStepConfig"]
    # budget 0.5 under min_active 0.8 runs 6 steps on a grid of 4: FORA is made for those, not resampled
    assert applied.config["configs"][0]["schedule"]["num_steps"] == 4 and "resampled" not in caplog.text
    assert stats["CacheConfig"]["blocks_skipped"] > 0
    assert min(stats["TokenStepConfig"]["active"]) < 1 and stats["TokenStepConfig"]["heat_map"]
    assert 0 < _relative(out, reference) < 0.5  # both techniques' errors, on random weights
    assert torch.equal(_generate(pipe), reference) and _untouched(pipe)


def test_a_sparse_plan_applies_from_its_file_alone_or_combined(video, tmp_path):
    reference = _generate(video)
    sparse = _sparse_plan(video, tmp_path / "sparse.json")
    with apply_method(parse_method(str(sparse)), video, STEPS, True) as applied:
        out = _generate(video, applied.steps)
        stats = applied.stats()
    assert applied.config["type"] == "SparseAttentionConfig"
    assert stats["density"] < 1 and stats["sparse_calls"] > 0
    assert 0 < _relative(out, reference) < 0.5
    with apply_method(parse_method(f"fora-2+{sparse}"), video, STEPS, True) as applied:
        _generate(video, applied.steps)
        stats = applied.stats()
    assert stats["CacheConfig"]["blocks_skipped"] > 0 and stats["SparseAttentionConfig"]["sparse_calls"] > 0
    with pytest.raises(UnsupportedMethod, match="does not compose with SparseAttentionConfig"):
        with apply_method(parse_method(f"tokens-0.5+{sparse}"), video, STEPS):
            pass
    assert torch.equal(_generate(video), reference) and _untouched(video)


def test_a_quantization_plan_applies_from_its_file_with_no_calibration(pipe, tmp_path, monkeypatch):
    reference = _generate(pipe)
    with apply_method(parse_method("fora-2+int8-dynamic"), pipe, STEPS, False, _calls(pipe)):
        from accel.context import tracker_for
        from accel.quant import QuantConfig

        plan = tracker_for(pipe.transformer).active[QuantConfig].plan
        calibrated = _generate(pipe)
    plan.save(tmp_path / "quant.json")
    monkeypatch.setattr("accel.quant.apply.calibrate", lambda *a, **k: pytest.fail("a saved plan calibrates"))
    method = parse_method(f"fora-2+{tmp_path / 'quant.json'}")
    with apply_method(method, pipe, STEPS, True, _calls(pipe)) as applied:
        assert torch.equal(_generate(pipe), calibrated)  # the same plan, read back
    assert applied.config["configs"][1] == {"type": "QuantConfig", "scheme": "int8-dynamic", "corrected": True}
    assert torch.equal(_generate(pipe), reference) and _untouched(pipe)


def test_method_files_are_checked_against_the_model_before_any_compute(pipe, video, tmp_path):
    plan = _sparse_plan(pipe, tmp_path / "other.json")  # PixArt's four layers
    with pytest.raises(ValueError, match="method .*other.json.*attention layers"):
        check_method(parse_method(str(plan)), video, STEPS)
    mine = _sparse_plan(video, tmp_path / "mine.json")
    check_method(parse_method(str(mine)), video, STEPS)
    with pytest.raises(ValueError, match="one part per technique: SparseAttentionConfig given twice"):
        check_method(parse_method(f"{mine}+{mine}"), video, STEPS)


def test_the_fingerprint_of_a_combined_method_follows_its_files(video, tmp_path):
    path = _sparse_plan(video, tmp_path / "plan.json")
    method = parse_method(f"fora-2+{path}")
    before = method.fingerprint()["sha256"]
    assert len(before) == 1
    uniform_plan(video.transformer, HeadPattern(windows=((0, 2, 2),))).save(path)
    assert method.fingerprint()["sha256"] != before


def test_the_report_draws_the_heat_map_of_per_token_steps_in_a_combined_method(tmp_path):
    config = small_config(methods=("full", "fora-2+tokens-0.5"), steps=STEPS)
    results = run_evaluation(config, tmp_path, pipe=build_tiny_pixart_pipeline())
    (trial,) = [t for t in results["trials"] if t["method"] == "fora-2+tokens-0.5"]
    assert trial["status"] == "ok", trial.get("reason")
    assert set(trial["technique_stats"]) == {"CacheConfig", "TokenStepConfig"}
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Per-token step counts</h2>" in page and "<code>fora-2+tokens-0.5</code>" in page


def test_accel_apply_is_what_the_method_runs(pipe):
    """The method equals applying the same configs by hand (FORA made for the grid the budget runs on)."""
    from accel.caching import CacheConfig, TokenStepConfig, fora, layout_of

    with apply_method(parse_method("fora-2+tokens-0.5"), pipe, STEPS) as applied:
        applied.reset()
        through_method = _generate(pipe)
    tokens = TokenStepConfig(budget=0.5)
    by_hand = CacheConfig(schedule=fora(layout_of(pipe), tokens.grid_steps(STEPS), 2), count_macs=False)
    with accel.apply(pipe, by_hand, tokens):
        assert torch.equal(_generate(pipe), through_method)
