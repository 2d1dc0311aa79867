"""The method grammar: parsing, errors, and every method applied to a stock PixArt pipeline and removed."""

import json

import pytest
import torch
from conftest import build_tiny_pixart_pipeline
from eval_helpers import self_attention_calls

from accel.caching import CacheConfig, FirstBlockPolicy, fora, layout_of
from accel.eval.generation import call_kwargs, generate
from accel.eval.methods import FORMS, Method, UnsupportedMethod, apply_method, parse_method, parse_methods

EXAMPLES = {
    "full": ("full", {}),
    "steps-3": ("steps", {"steps": 3}),
    "fora-2": ("fora", {"interval": 2}),
    "taylorseer-3": ("taylorseer", {"interval": 3}),
    "delta-dit": ("delta-dit", {"interval": 2}),
    "delta-dit-3": ("delta-dit", {"interval": 3}),
    "tgate": ("tgate", {}),
    "tgate-2": ("tgate", {"gate_step": 2}),
    "fbc-0.08": ("fbc", {"threshold": 0.08}),
    "tokens-0.5": ("tokens", {"budget": 0.5}),
    "diffusers-fbc-0.1": ("diffusers-fbc", {"threshold": 0.1}),
    "diffusers-taylorseer": ("diffusers-taylorseer", {}),
    "diffusers-pab": ("diffusers-pab", {}),
    "diffusers-fastercache": ("diffusers-fastercache", {}),
    "diffusers-magcache": ("diffusers-magcache", {}),
    "cache-dit-F1B0-0.12": ("cache-dit", {"threshold": 0.12, "first": 1, "last": 0, "taylorseer": False}),
    "runs/best.json": ("json", {"path": "runs/best.json"}),
    "front@2": ("front", {"front": "front", "target_speedup": 2.0}),
    "int8-dynamic": ("quant", {"scheme": "int8-dynamic"}),
    "fora-2+int8-dynamic": (
        "combined",
        {
            "parts": [
                {"kind": "fora", "params": {"interval": 2}},
                {"kind": "quant", "params": {"scheme": "int8-dynamic"}},
            ]
        },
    ),
    "front@2+tokens-0.5+plans/sparse.json": (
        "combined",
        {
            "parts": [
                {"kind": "front", "params": {"front": "front", "target_speedup": 2.0}},
                {"kind": "tokens", "params": {"budget": 0.5}},
                {"kind": "json", "params": {"path": "plans/sparse.json"}},
            ]
        },
    ),
}
STEPS = 4


def test_examples_cover_every_form():
    assert {kind for kind, _ in EXAMPLES.values()} == set(FORMS)


@pytest.mark.parametrize("name", EXAMPLES)
def test_parse(name):
    method = parse_method(name)
    assert (method.kind, method.params) == EXAMPLES[name]
    assert method.name == name and "/" not in method.slug


@pytest.mark.parametrize(
    "name, message",
    [
        ("fora", "unknown method 'fora'"),
        ("fora-x", "unknown method"),
        ("fora-0", "fora-N: N must be >= 1"),
        ("steps-0", "steps-N: N must be >= 1"),
        ("fbc-", "unknown method"),
        ("diffusers-firstblock", "unknown method"),
        ("steps-3+int8-dynamic", "'steps-3' cannot be combined"),
        ("full+tokens-0.5", "'full' cannot be combined"),
        ("diffusers-pab+int8-dynamic", "'diffusers-pab' cannot be combined"),
        ("fora-2+taylorseer-3", "one part per technique: CacheConfig given twice"),
        ("int8-weight+fora-2+int8-dynamic", "QuantConfig given twice"),
        ("fora-2+int4", "unknown method 'int4'"),
        ("fora-2+", "unknown method"),
    ],
)
def test_parse_errors_list_the_valid_forms(name, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_method(name)
    if "unknown" in message:
        for form in FORMS.values():
            assert form.usage in str(info.value)


def test_parse_methods_puts_full_first_and_refuses_repeats():
    assert [m.name for m in parse_methods("fora-2, steps-3")] == ["full", "fora-2", "steps-3"]
    assert [m.name for m in parse_methods(["fora-2", "full"])] == ["full", "fora-2"]
    with pytest.raises(ValueError, match="listed twice: fora-2"):
        parse_methods("fora-2,fora-2")
    with pytest.raises(ValueError, match="no methods"):
        parse_methods(" , ")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pixart_pipeline()


def _generate(pipe, steps=STEPS):
    return generate(pipe, ["a red apple", "a blue car"], [0, 1], steps, 4.5, call_kwargs(pipe))


def _instance_state(module):
    return sorted(n for n, m in module.named_modules() if "forward" in m.__dict__ or hasattr(m, "_diffusers_hook"))


@pytest.mark.parametrize("name", [n for n in EXAMPLES if not n.endswith(".json") and "@" not in n])
def test_every_method_runs_or_is_unsupported_and_leaves_the_model_as_it_was(pipe, name, one_thread):  # noqa: F811
    torch.manual_seed(0)
    reference = _generate(pipe)
    method = parse_method(name)
    try:
        with apply_method(method, pipe, STEPS, instrument=True) as applied:
            applied.reset()
            images = _generate(pipe, applied.steps)
            json.dumps(applied.config)  # the config is recorded as JSON
    except UnsupportedMethod as error:  # MagCache without ratios for this model, only
        assert method.kind == "diffusers-magcache" and "calibrate_mag_ratios" in str(error)
    else:
        mse = float(((images - reference) ** 2).mean())
        psnr = 10 * torch.log10(torch.tensor(1 / mse)) if mse else torch.tensor(float("inf"))
        assert psnr > 30, f"{name}: PSNR {psnr:.1f} dB vs full compute"
        if method.kind == "full":
            assert mse == 0
    assert _instance_state(pipe.transformer) == []
    assert torch.equal(_generate(pipe), reference)


def test_json_methods_schedule_and_cache_config(tmp_path, pipe, one_thread):  # noqa: F811
    schedule_path = fora(layout_of(pipe), STEPS, 2).save(tmp_path / "fora.json")
    config_path = tmp_path / "fbc.json"
    config_path.write_text(json.dumps(CacheConfig(schedule=FirstBlockPolicy(threshold=0.1)).to_dict()))
    reference = _generate(pipe)
    for path in (schedule_path, config_path):
        method = parse_method(str(path))
        assert method.kind == "json" and len(method.fingerprint()["sha256"]) == 64
        with apply_method(method, pipe, STEPS) as applied:
            assert applied.config["type"] == "accel.caching.CacheConfig"
            images = _generate(pipe)
        assert not torch.equal(images, reference)
    assert torch.equal(_generate(pipe), reference)


def test_json_method_errors(tmp_path, pipe):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        with apply_method(parse_method(str(bad)), pipe, STEPS):
            pass
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"type": "something.else"}))
    with pytest.raises(ValueError, match="expected a Schedule, a CacheConfig, a sparse-attention plan or a quant"):
        with apply_method(parse_method(str(other)), pipe, STEPS):
            pass
    with pytest.raises(FileNotFoundError, match="method file not found"):
        with apply_method(parse_method(str(tmp_path / "missing.json")), pipe, STEPS):
            pass


def test_a_diffusers_hook_failing_inside_the_pipeline_is_unsupported_not_fatal(pipe):
    reference = _generate(pipe)
    with pytest.raises(UnsupportedMethod, match="pab hooks failed on PixArtTransformer2DModel: RuntimeError: boom"):
        with apply_method(parse_method("diffusers-pab"), pipe, STEPS):
            raise RuntimeError("boom")
    assert _instance_state(pipe.transformer) == [] and torch.equal(_generate(pipe), reference)


def test_diffusers_context_hooks_skip_blocks_on_a_pipeline_without_cache_context(pipe, one_thread):  # noqa: F811
    from accel.eval.diffusers_cache import calibrate_mag_ratios, pipeline_enters_cache_context

    assert not pipeline_enters_cache_context(pipe)  # the harness supplies the context
    full_calls = self_attention_calls(pipe, lambda: _generate(pipe, 8))
    assert full_calls == 8 * len(pipe.transformer.transformer_blocks)
    ratios = calibrate_mag_ratios(pipe.transformer, lambda: _generate(pipe, 8))
    assert len(ratios) == 8 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    methods = {
        "diffusers-fbc-1.0": parse_method("diffusers-fbc-1.0"),  # threshold so high that every later step reuses
        "diffusers-taylorseer": parse_method("diffusers-taylorseer"),
        "diffusers-magcache": Method(
            name="diffusers-magcache", kind="diffusers-magcache", params={"mag_ratios": ratios}
        ),
    }
    for name, method in methods.items():
        with apply_method(method, pipe, 8) as applied:
            assert applied.config["harness_cache_context"] is True
            calls = self_attention_calls(pipe, lambda: _generate(pipe, 8))
            applied.reset()
            again = self_attention_calls(pipe, lambda: _generate(pipe, 8))
        assert 0 < calls < full_calls, f"{name} computed {calls} of {full_calls} block calls"
        assert again == calls, f"{name}: a reset generation runs the same way"
    assert _instance_state(pipe.transformer) == []


def test_front_method_picks_the_best_schedule_at_the_target_speed(tmp_path, pipe):
    from accel.caching import Front

    layout = layout_of(pipe)
    front = Front(
        schedules=tuple(
            fora(layout, STEPS, n).with_metrics(speedup=speed, psnr=psnr)
            for n, speed, psnr in ((2, 1.8, 35.0), (3, 2.5, 30.0), (4, 3.2, 25.0))
        )
    )
    front.save(tmp_path / "front")
    with apply_method(parse_method(f"{tmp_path / 'front'}@2"), pipe, STEPS) as applied:
        assert applied.config["schedule"]["provenance"]["interval"] == 3  # the best PSNR at >= 2x
    with pytest.raises(UnsupportedMethod, match="searched for another model"):
        with apply_method(parse_method("front@2"), pipe, STEPS):  # the bundled model's front on the tiny model
            pass
    with pytest.raises(FileNotFoundError, match="no front.json"):
        with apply_method(parse_method(f"{tmp_path}@2"), pipe, STEPS):
            pass


def test_calibrated_mag_ratios_match_diffusers_own_calibration_mode(pipe, capsys, one_thread):  # noqa: F811
    import ast

    from diffusers.hooks import MagCacheConfig
    from diffusers.models.cache_utils import CacheMixin

    from accel.eval.diffusers_cache import _hooks_applied, calibrate_mag_ratios

    ours = calibrate_mag_ratios(pipe.transformer, lambda: _generate(pipe, 6))
    capsys.readouterr()
    with _hooks_applied(pipe.transformer, MagCacheConfig(calibrate=True, num_inference_steps=6)):
        with CacheMixin.cache_context(pipe.transformer, "calibration"):
            _generate(pipe, 6)
    printed = capsys.readouterr().out  # diffusers prints the ratios at the end of a calibration run
    theirs = ast.literal_eval(printed.strip().splitlines()[-1])
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert _instance_state(pipe.transformer) == []


def test_a_quantized_caching_method_calibrates_and_corrects_under_its_cache_and_fp8_needs_a_gpu(
    pipe, one_thread, monkeypatch
):  # noqa: F811
    method = parse_method("fora-2+int8-dynamic")
    calls = {**call_kwargs(pipe), "guidance_scale": 4.5}
    with apply_method(method, pipe, STEPS, True, calls) as applied:
        applied.reset()
        _generate(pipe, applied.steps)
        stats = applied.stats()
        plan = apply_handle_plan(pipe)
    cache, quant = applied.config["configs"]
    assert quant == {"type": "QuantConfig", "scheme": "int8-dynamic", "corrected": True}
    assert stats["CacheConfig"]["blocks_skipped"] > 0
    assert stats["QuantConfig"]["corrected_components"] > 0  # cache-aware: corrected along the FORA trajectory
    assert stats["QuantConfig"]["weight_memory_ratio"] < 0.5
    # calibrated under the very schedule it runs, at the generation's step count
    assert plan.sizes["step"] == STEPS and plan.settings["schedule"] == cache["schedule"]
    json.dumps(stats)
    calibrations = []
    monkeypatch.setattr("accel.quant.apply.calibrate", lambda *a, **k: calibrations.append(1))
    with apply_method(method, pipe, STEPS, False, calls):  # the same method again: its plan, no calibration
        assert apply_handle_plan(pipe) is plan
    assert calibrations == []
    for name in ("fp8", "fora-2+fp8"):
        with pytest.raises(UnsupportedMethod, match="CUDA"):
            with apply_method(parse_method(name), pipe, STEPS):
                pass
    assert _instance_state(pipe.transformer) == []


def apply_handle_plan(pipe):
    """The plan of the quantization applied to ``pipe``'s transformer now (through the core's active handles)."""
    from accel.context import tracker_for
    from accel.quant import QuantConfig

    return tracker_for(pipe.transformer).active[QuantConfig].plan
