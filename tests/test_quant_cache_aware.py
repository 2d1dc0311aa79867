"""Quantization with a cache (issue 14): the default config under a cache calibrates and corrects under its
schedule (or says why it cannot), a plan's settings agree with what it was calibrated with, and the corrected
value is what the cache stores and reuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TINY_MODELS, denoise

import accel
from accel.caching import CacheConfig, FirstBlockPolicy, Schedule, fora, layout_of
from accel.plan import Plan
from accel.quant import Calibration, QuantConfig, calibrate

TINY = TINY_MODELS["pixart"]
STEPS = 12
CALIBRATION = Calibration(prompts=("a red cat", "a blue dog"), num_inference_steps=6, batch=2)


def _run(model, prompts=(5, 6)) -> torch.Tensor:
    return denoise(model, TINY, list(prompts), steps=STEPS, cfg=True)


def _calibration_run(model):
    return lambda: denoise(model, TINY, [1, 2, 3], steps=STEPS, cfg=True)


def _reusing_self_attention(model) -> Schedule:
    """Every block computes; self-attention (component 0) is reused at every odd step."""
    layout = layout_of(model)
    mask = np.ones((STEPS, layout.num_blocks, len(layout.components)), dtype=bool)
    mask[1::2, :, 0] = False
    return Schedule(mask=mask, components=layout.components)


# -- the default config under a cache ---------------------------------------------------------------------------


def test_the_default_config_under_a_cache_calibrates_and_corrects_under_its_schedule(tiny_pixart_pipeline, caplog):
    pipe = tiny_pixart_pipeline
    cache = CacheConfig(schedule=fora(layout_of(pipe), 6, 2))
    config = QuantConfig(scheme="int8-dynamic", calibration=CALIBRATION)  # correct=None: the example
    assert not config.needs_calibration  # nothing to calibrate on its own ...
    with caplog.at_level("WARNING", logger="accel.quant.apply"), accel.apply(pipe, cache, config) as handle:
        plan = handle[QuantConfig].plan
        stats = handle[QuantConfig].stats()
    assert plan is not None and plan.settings["schedule"] == cache.schedule.to_dict()  # ... but under a cache
    assert stats.corrected_components == 4 * 3 and not caplog.text
    expected = calibrate(pipe, QuantConfig(correct=True, calibration=CALIBRATION), cache=cache)
    for name in ("correction_scale", "correction_shift", "corrected"):
        assert (plan.channel(name) == expected.channel(name)).all()
    # cache_aware=False: corrected as well, calibrated on the uncached trajectory (the naive combination)
    with accel.apply(pipe, cache, QuantConfig(calibration=CALIBRATION, cache_aware=False)) as handle:
        naive = handle[QuantConfig].plan
    assert naive.settings["schedule"] is None and "corrected" in naive.channels
    # no calibration given: the default prompts, at the schedule's own step count (not the default 20)
    with accel.apply(pipe, cache, QuantConfig(scheme="int8-dynamic")) as handle:
        assert handle[QuantConfig].plan.sizes["step"] == cache.schedule.num_steps == 6
    # correct=False: plain int8 under the cache, as asked
    with accel.apply(pipe, cache, QuantConfig(correct=False)) as handle:
        assert handle[QuantConfig].plan is None and handle[QuantConfig].stats().corrected_components == 0


def test_the_default_config_without_a_cache_calibrates_nothing_and_says_so_when_given_prompts(
    tiny_pixart_pipeline, caplog, monkeypatch
):
    pipe = tiny_pixart_pipeline
    monkeypatch.setattr("accel.quant.apply.calibrate", lambda *a, **k: pytest.fail("calibrated"))
    with caplog.at_level("WARNING", logger="accel.quant.apply"):
        with accel.apply(pipe, QuantConfig()) as handle:
            assert handle.plan is None
        assert not caplog.text
        with accel.apply(pipe, QuantConfig(calibration=CALIBRATION)) as handle:
            assert handle.plan is None
    assert "calibration is given but nothing calibrates" in caplog.text and "correct=True" in caplog.text
    with pytest.raises(ValueError, match="nothing calibrates"):
        QuantConfig(correct=False, calibration=CALIBRATION)


def test_a_cache_the_default_config_cannot_calibrate_under_is_named_in_a_warning(tiny_pixart_pipeline, caplog):
    model = TINY.build()
    schedule = fora(layout_of(model), STEPS, 2)
    cases = {
        "bare transformer": (model, (CacheConfig(schedule=schedule),)),
        "FirstBlockPolicy": (tiny_pixart_pipeline, (CacheConfig(schedule=FirstBlockPolicy(threshold=0.2)),)),
    }
    for reason, (target, caches) in cases.items():
        caplog.clear()
        with caplog.at_level("WARNING", logger="accel.quant.apply"), accel.apply(target, *caches, QuantConfig()) as h:
            assert h[QuantConfig].plan is None and h[QuantConfig].stats().corrected_components == 0
        assert "without the error correction" in caplog.text and reason in caplog.text, caplog.text
    caplog.clear()
    with accel.apply(model, CacheConfig(schedule=schedule)), caplog.at_level("WARNING", logger="accel.quant.apply"):
        with accel.apply(model, QuantConfig()) as handle:
            assert handle.plan is None
    assert "earlier accel.apply call" in caplog.text


def test_calibrating_under_a_first_block_policy_is_refused_before_any_run(tiny_pixart_pipeline):
    model = TINY.build()
    dynamic = CacheConfig(schedule=FirstBlockPolicy(threshold=0.2))
    with pytest.raises(ValueError, match="static Schedule, not a FirstBlockPolicy"):
        calibrate(model, QuantConfig(correct=True), cache=dynamic, run=lambda: pytest.fail("a calibration run"))
    with pytest.raises(ValueError, match="static Schedule, not a FirstBlockPolicy"):
        accel.apply(tiny_pixart_pipeline, dynamic, QuantConfig(correct=True, calibration=CALIBRATION))
    assert all(type(p) is torch.nn.Parameter for p in tiny_pixart_pipeline.transformer.parameters())


# -- a plan's settings ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plans():
    """A corrected plan calibrated under FORA-2 (layers="blocks", min_sqnr 20), and the same without a cache."""
    model = TINY.build()
    cache = CacheConfig(schedule=fora(layout_of(model), STEPS, 2))
    config = QuantConfig(layers="blocks", min_sqnr=20.0, correct=True)
    aware = calibrate(model, config, cache=cache, run=_calibration_run(model))
    naive = calibrate(model, config, run=_calibration_run(model))
    return {"aware": aware, "naive": naive, "cache": cache}


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"layers": "all"}, "layers='blocks' .*other layers would stay in full precision"),
        ({"min_sqnr": 30.0}, "min_sqnr=20.0"),
        ({"correct": False}, "correct=True"),
        ({"cache_aware": False}, "caching schedule"),
        ({"calibration": CALIBRATION}, "does not use"),
    ],
)
def test_settings_that_disagree_with_the_plan_are_refused(plans, settings, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(plan=plans["aware"], **{"layers": "blocks", **settings})
    agreeing = QuantConfig(plan=plans["aware"], layers="blocks", min_sqnr=20.0, correct=True)
    assert agreeing.plan is plans["aware"]
    assert QuantConfig(plan=plans["aware"]).scope == "blocks" and QuantConfig().scope == "all"  # unset: the plan's


def test_a_plan_without_correction_refuses_correct_true(plans):
    uncorrected = Plan(sizes={}, model_class=plans["naive"].model_class, settings=plans["naive"].settings)
    with pytest.raises(ValueError, match="correct=False"):
        QuantConfig(plan=uncorrected, layers="blocks", correct=True)


def test_a_cache_calibrated_plan_without_a_cache_and_a_naive_plan_on_purpose(plans, caplog):
    model = TINY.build()
    with caplog.at_level("WARNING", logger="accel.quant.apply"):
        with accel.apply(model, QuantConfig(plan=plans["aware"], layers="blocks")):
            pass
        assert "calibrated under a caching schedule and is applied without a cache" in caplog.text
        caplog.clear()
        naive = QuantConfig(plan=plans["naive"], layers="blocks", cache_aware=False)  # the naive combination
        with accel.apply(model, plans["cache"], naive):
            pass
        assert not caplog.text
        with accel.apply(model, plans["cache"], QuantConfig(plan=plans["naive"], layers="blocks")):
            pass
        assert "calibrated without a cache" in caplog.text


def test_a_corrected_plan_applied_after_a_cache_is_refused(plans):
    model = TINY.build()
    with accel.apply(model, plans["cache"]):
        with pytest.raises(ValueError, match="outside the cache"):
            accel.apply(model, QuantConfig(plan=plans["aware"], layers="blocks"))
        assert all(type(p) is torch.nn.Parameter for p in model.parameters())


# -- the corrected value is what the cache stores ---------------------------------------------------------------


def test_a_reused_step_returns_the_corrected_value_the_cache_stored():
    model = TINY.build()
    cache = CacheConfig(schedule=_reusing_self_attention(model), count_macs=False)  # the hook sees real calls only
    plan = calibrate(model, QuantConfig(correct=True), cache=cache, run=_calibration_run(model))
    scale, shift = torch.as_tensor(plan.channel("correction_scale")), torch.as_tensor(plan.channel("correction_shift"))
    module = model.transformer_blocks[0].attn1
    seen = []  # per call (one per step): what the component returned, and what it computes without correction

    def hook(module, args, kwargs, output):
        with torch.no_grad():
            seen.append((output.detach().clone(), type(module).forward(module, *args, **kwargs)))

    with accel.apply(model, cache, QuantConfig(plan=plan)):
        handle = module.register_forward_hook(hook, with_kwargs=True)
        _run(model)
        handle.remove()
    assert len(seen) == STEPS
    for step in range(0, STEPS, 2):  # computes: the raw output corrected with this step's coefficients
        output, raw = seen[step]
        torch.testing.assert_close(output, torch.addcmul(shift[step, 0, 0], raw, scale[step, 0, 0]))
        assert float((output - raw).abs().max()) > 1e-4, "the correction must change what is stored"
        reused, raw_next = seen[step + 1]  # reused: exactly the corrected value of the step before
        assert torch.equal(reused, output)
        assert not torch.equal(reused, raw_next)


def test_remove_after_a_corrected_and_cached_apply_restores_the_model_bit_for_bit():
    model = TINY.build()
    originals = {name: p for name, p in model.named_parameters()}
    forwards = {name: m.__dict__.get("forward") for name, m in model.named_modules()}
    reference = _run(model)
    cache = CacheConfig(schedule=_reusing_self_attention(model))
    plan = calibrate(model, QuantConfig(correct=True), cache=cache, run=_calibration_run(model))
    handle = accel.apply(model, cache, QuantConfig(plan=plan))
    changed = _run(model)
    assert handle[QuantConfig].stats().corrected_components == 2 * 3
    handle.remove()
    assert 20 < float(accel.quant.sqnr(reference, changed)) < 80  # it did change the output, within a bound
    assert all(p is originals[n] for n, p in model.named_parameters())
    assert {name: m.__dict__.get("forward") for name, m in model.named_modules()} == forwards
    assert torch.equal(_run(model), reference)
