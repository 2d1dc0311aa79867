"""Quantization (accel.quant): torchao weights through the patch log, layer selection by measured SQNR,
cache-aware calibration and CacheQuant's error correction, plans as data, compile and batch contracts."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tiny_models import TINY_MODELS, GraphCalls, denoise
from torch._dynamo.testing import CompileCounter

import accel
from accel.caching import CacheConfig, fora, layout_of
from accel.plan import INLINE_LIMIT, Plan
from accel.quant import Calibration, QuantConfig, calibrate, check_scheme, fit_lines, sqnr
from accel.quant.correction import CorrectionStatistics
from accel.quant.schemes import FULL_PRECISION, tensor_bytes

TINY = TINY_MODELS["pixart"]
STEPS = 12
EVAL_PROMPTS = [5, 6, 7, 8]


def _run(model, prompts=EVAL_PROMPTS, steps: int = STEPS) -> torch.Tensor:
    return denoise(model, TINY, prompts, steps=steps, cfg=True)


def _calibration_run(model):
    return lambda: denoise(model, TINY, [1, 2, 3, 4], steps=STEPS, cfg=True)


def _latent_psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    return sqnr(reference, output)


# -- configs and schemes -------------------------------------------------------------------------------------


def test_config_rejects_unknown_schemes_and_foreign_plans():
    with pytest.raises(ValueError, match="int8-weight"):
        QuantConfig(scheme="int4")
    with pytest.raises(ValueError, match="'blocks', 'all' or None"):
        QuantConfig(layers="attention")
    with pytest.raises(ValueError, match="quantization plan"):
        QuantConfig(plan=Plan(sizes={"block": 2}))
    with pytest.raises(ValueError, match="prompts"):
        Calibration(prompts="a cat")


def test_fp8_on_a_cpu_names_what_it_needs():
    model = TINY.build()
    with pytest.raises(RuntimeError, match="compute capability >= 8.9"):
        check_scheme("fp8", "cpu")
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        accel.apply(model, QuantConfig(scheme="fp8"))
    assert not any(type(p) is not torch.nn.Parameter for p in model.parameters()), "nothing may stay quantized"
    # calibrating checks the device before any calibration run (it used to run them, then fail in torchao)
    for config in (QuantConfig(scheme="fp8", correct=True), QuantConfig(scheme="fp8", min_sqnr=20.0)):
        with pytest.raises(RuntimeError, match="CUDA GPU"):
            calibrate(model, config, run=lambda: pytest.fail("a calibration run"))


@pytest.mark.parametrize("scheme,bound", [("int8-weight", 35.0), ("int8-dynamic", 30.0)])
def test_int8_schemes_stay_within_an_error_bound_and_remove_restores_the_originals(scheme, bound):
    model = TINY.build()
    originals = {name: p for name, p in model.named_parameters()}
    reference = _run(model)
    with accel.apply(model, QuantConfig(scheme=scheme)) as handle:
        quantized = _run(model)
        stats = handle.stats()
        replaced = [n for n, p in model.named_parameters() if p is not originals[n]]
    assert _latent_psnr(quantized, reference) >= bound
    assert not torch.equal(quantized, reference)
    assert sorted(replaced) == sorted(f"{layer}.weight" for layer in stats.layers)
    assert all(p is originals[n] for n, p in model.named_parameters())
    assert torch.equal(_run(model), reference)


def test_stats_count_weight_memory_and_layers():
    model = TINY.build()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    with accel.apply(model, QuantConfig(scheme="int8-dynamic", layers="blocks")) as handle:
        stats = handle.stats()
    blocks = {n: m for n, m in linears.items() if n.startswith("transformer_blocks.")}
    assert set(stats.layers) == set(blocks) and stats.layers_per_scheme == {"int8-dynamic": len(blocks)}
    assert stats.weight_bytes_before == before
    # int8 data is a quarter of float32; scales and zero points add at most 8 bytes per output channel
    fp32 = sum(m.weight.numel() * 4 for m in blocks.values())
    saved = stats.weight_bytes_before - stats.weight_bytes_after
    assert fp32 * 3 / 4 - 8 * sum(m.out_features for m in blocks.values()) <= saved <= fp32 * 3 / 4
    assert min(stats.weight_sqnr.values()) > 30


def test_quantized_weight_bytes_count_the_inner_tensors():
    from accel.quant.schemes import quantized_weight

    linear = torch.nn.Linear(64, 32)
    weight = quantized_weight(linear, "int8-weight")
    names, _ = weight.__tensor_flatten__()
    assert tensor_bytes(weight) == sum(getattr(weight, n).numel() * getattr(weight, n).element_size() for n in names)
    assert tensor_bytes(weight) <= 0.3 * tensor_bytes(linear.weight)


def test_a_batch_quantizes_each_sample_on_its_own():
    model = TINY.build()
    with accel.apply(model, QuantConfig(scheme="int8-dynamic")):
        together = _run(model, [1, 2])
        alone = torch.cat([_run(model, [1]), _run(model, [2])])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_static_int8_matches_a_torch_reference_within_the_error_bound():
    from accel.quant.schemes import ActivationRange, quantized_weight

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 64)
    x = torch.randn(2, 40, 96)
    with torch.no_grad():
        reference = linear(x)
    activation = ActivationRange(float(x.abs().max()), 3)
    weight = quantized_weight(linear, "int8-static", activation)
    with torch.no_grad():
        kernel = torch.nn.functional.linear(x, weight, linear.bias)
    # the same maths in plain torch: per-row int8 weights, one int8 activation scale, float accumulation
    w_scale = linear.weight.abs().amax(1, keepdim=True) / 127
    w_int = (linear.weight / w_scale).round().clamp(-128, 127)
    x_int = (x / activation.scale).round().clamp(-128, 127)
    lowprec = ((x_int @ w_int.T) * activation.scale * w_scale.T + linear.bias).detach()

    def err(a):
        return float((a - reference).pow(2).mean().sqrt())

    assert err(kernel) <= 2 * err(lowprec) + 1e-6, (err(kernel), err(lowprec))
    assert sqnr(reference, kernel) > 30


def test_static_int8_calibrates_its_activation_ranges_along_the_cached_trajectory():
    model = TINY.build()
    cache = CacheConfig(schedule=fora(layout_of(model), STEPS, 3), count_macs=False)  # hooks read real values
    seen: dict[str, float] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, max(seen.get(name, 0.0), float(args[0].abs().max())))
        )
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    with accel.apply(model, cache):
        _calibration_run(model)()
    for hook in hooks:
        hook.remove()
    config = QuantConfig(scheme="int8-static")
    assert config.needs_calibration  # its scales come from data
    aware = calibrate(model, config, cache=cache, run=_calibration_run(model))
    naive = calibrate(model, config, run=_calibration_run(model))
    ranges = aware.settings["activation_ranges"]
    assert set(ranges) == set(seen) and all(ranges[n][0] == pytest.approx(v, rel=1e-6) for n, v in seen.items())
    assert ranges != naive.settings["activation_ranges"]  # another trajectory, other ranges
    reference = _run(model)
    originals = {name: p for name, p in model.named_parameters()}
    with accel.apply(model, QuantConfig(scheme="int8-static", plan=naive)) as handle:
        quantized = _run(model)
        assert handle.stats().layers_per_scheme == {"int8-static": len(seen)}
    assert 25 <= _latent_psnr(quantized, reference) < 90
    assert all(p is originals[n] for n, p in model.named_parameters()) and torch.equal(_run(model), reference)


def test_static_int8_without_calibrated_ranges_says_so_before_quantizing():
    model = TINY.build()
    dynamic = calibrate(model, QuantConfig(min_sqnr=20.0), run=_calibration_run(model))
    borrowed = replace(dynamic, settings={**dynamic.settings, "scheme": "int8-static"})
    with pytest.raises(ValueError, match="activation range"):
        accel.apply(model, QuantConfig(scheme="int8-static", plan=borrowed))
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    with pytest.raises(ValueError, match="calibrates on prompts through a"):
        accel.apply(model, QuantConfig(scheme="int8-static"))


# -- compile ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,correct", [("int8-dynamic", False), ("int8-dynamic", True), ("int8-static", False)])
def test_compiled_frames_stay_bounded_and_outputs_match_eager(scheme, correct):
    model = TINY.build()
    config = QuantConfig(scheme=scheme)
    if correct or scheme == "int8-static":
        plan = calibrate(model, QuantConfig(scheme=scheme, correct=correct), run=_calibration_run(model))
        config = QuantConfig(scheme=scheme, plan=plan)
    with accel.apply(model, config):
        eager = _run(model)
    torch._dynamo.reset()
    counter = CompileCounter()
    accel.compile_blocks(model, backend=counter)
    _run(model)
    plain = counter.frame_count
    with accel.apply(model, config):
        compiled = _run(model)
        at_12 = counter.frame_count
        _run(model, steps=30)
    # quantized weights recompile each block once; the correction's arithmetic compiles inside the components
    assert at_12 - plain <= 2, (plain, at_12)
    assert counter.frame_count == at_12, "frames grew with the step count"
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_the_correction_under_a_cache_adds_no_graph_break_and_matches_eager():
    model = TINY.build()
    cache = CacheConfig(schedule=fora(layout_of(model), STEPS, 3))
    plan = calibrate(model, QuantConfig(correct=True), cache=cache, run=_calibration_run(model))
    configs = {"plain": QuantConfig(), "corrected": QuantConfig(plan=plan)}
    eager = {}
    for name, config in configs.items():
        with accel.apply(model, cache, config):
            eager[name] = _run(model)
    assert _latent_psnr(eager["corrected"], eager["plain"]) < 80, "the correction must change the output"
    torch._dynamo.reset()  # earlier tests' compiled entries count towards the recompile limit
    backend = GraphCalls()
    accel.compile_blocks(model, backend=backend)
    calls = {}
    for name, config in configs.items():
        with accel.apply(model, cache, config) as handle:
            before = backend.calls
            compiled = _run(model)
            calls[name] = backend.calls - before
            if name == "corrected":
                assert handle[QuantConfig].stats().corrected_components == 2 * 3
        torch.testing.assert_close(compiled, eager[name], rtol=1e-4, atol=1e-5)
    # every computing block runs as one compiled graph: a fenced wrapper would split it into more calls
    assert calls["corrected"] == calls["plain"] == 2 * STEPS // 3, calls


# -- sensitivity ------------------------------------------------------------------------------------------------


def test_layers_under_the_sqnr_bound_stay_in_full_precision():
    model = TINY.build()
    config = QuantConfig(scheme="int8-dynamic")
    plan = calibrate(model, config, run=_calibration_run(model))
    measured = plan.metrics["sqnr"]
    assert set(measured) == set(plan.settings["layers"]) and all(v > 20 for v in measured.values())
    bound = sorted(measured.values())[len(measured) // 2]
    selective = calibrate(model, QuantConfig(scheme="int8-dynamic", min_sqnr=bound), run=_calibration_run(model))
    expected = {n: FULL_PRECISION if v < bound else "int8-dynamic" for n, v in measured.items()}
    assert selective.settings["layers"] == expected
    with accel.apply(model, QuantConfig(scheme="int8-dynamic", min_sqnr=bound, plan=selective)) as handle:
        stats = handle.stats()
    assert stats.layers == expected and stats.sqnr == selective.metrics["sqnr"]
    assert stats.layers_per_scheme[FULL_PRECISION] == sum(v < bound for v in measured.values()) > 0


def test_a_bound_above_every_layer_keeps_the_model_exact():
    model = TINY.build()
    reference = _run(model)
    config = QuantConfig(scheme="int8-dynamic", min_sqnr=1000.0)
    plan = calibrate(model, config, run=_calibration_run(model))
    with accel.apply(model, QuantConfig(scheme="int8-dynamic", plan=plan)) as handle:
        assert torch.equal(_run(model), reference)
        assert handle.stats().layers_per_scheme == {FULL_PRECISION: len(plan.settings["layers"])}


# -- correction -------------------------------------------------------------------------------------------------


def test_fit_lines_recovers_exact_lines_and_leaves_constant_channels_unscaled():
    x = torch.randn(500, 3, dtype=torch.float64)
    x[:, 2] = 0.5
    y = x * torch.tensor([2.0, -1.0, 4.0], dtype=torch.float64) + torch.tensor([3.0, 0.25, 1.0], dtype=torch.float64)
    statistics = CorrectionStatistics()
    statistics.update((0, 0, 0), x[:200], y[:200])
    statistics.update((0, 0, 0), x[200:], y[200:])
    a, b = fit_lines(statistics.sums[(0, 0, 0)])
    torch.testing.assert_close(a, torch.tensor([2.0, -1.0, 1.0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(b, torch.tensor([3.0, 0.25, 2.5]), rtol=0, atol=1e-5)


def test_fitted_lines_never_increase_the_squared_error_on_the_pairs_they_were_fitted_to():
    # the least-squares line per channel can always fall back to a = 1, b = 0, so in sample it is never worse
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=generator, dtype=torch.float64) * torch.tensor([1, 2, 0.5, 3, 1, 1e-3])
    y = 0.9 * x + 0.1 + 0.3 * torch.randn(500, 6, generator=generator, dtype=torch.float64)
    statistics = CorrectionStatistics()
    statistics.update((0, 0, 0), x, y)
    a, b = fit_lines(statistics.sums[(0, 0, 0)])
    corrected = ((a.double() * x + b.double() - y) ** 2).mean(0)
    assert torch.all(corrected <= ((x - y) ** 2).mean(0) + 1e-9), (corrected, ((x - y) ** 2).mean(0))


def test_correction_fitted_under_the_cache_costs_held_out_prompts_at_most_1_db():
    # Out of sample the correction is not a guaranteed gain (issue 14, open): on a Xeon with AMX-int8 it moved the
    # held-out PSNR of this tiny model by -0.46 to +0.19 dB over weight seeds 0-5 (int8-dynamic's error on random
    # weights is noise a per-channel line cannot fit). What must hold is that it never costs much.
    model = TINY.build()
    cache = CacheConfig(schedule=fora(layout_of(model), STEPS, 3))
    with accel.apply(model, cache):
        cached = _run(model)  # the quantization error is measured against the same schedule in full precision
    config = QuantConfig(scheme="int8-dynamic", correct=True)
    naive = calibrate(model, config, run=_calibration_run(model))
    aware = calibrate(model, config, cache=cache, run=_calibration_run(model))
    assert aware.settings["schedule"] == cache.schedule.to_dict() and naive.settings["schedule"] is None
    psnrs = {}
    for name, quant in {"plain": QuantConfig(), "aware": QuantConfig(plan=aware)}.items():
        with accel.apply(model, cache, quant) as handle:
            psnrs[name] = _latent_psnr(_run(model), cached)
            if name == "aware":
                assert handle[QuantConfig].stats().corrected_components == 2 * 3
    assert psnrs["aware"] >= psnrs["plain"] - 1.0, psnrs


def test_the_correction_is_fitted_where_components_compute():
    model = TINY.build()
    schedule = fora(layout_of(model), STEPS, 3)
    cache = CacheConfig(schedule=schedule)
    plan = calibrate(model, QuantConfig(correct=True), cache=cache, run=_calibration_run(model))
    fitted = plan.channel("corrected")  # (steps, blocks, components)
    assert fitted.shape == schedule.mask.shape and (fitted == schedule.mask).all()


# -- plans and the front door -----------------------------------------------------------------------------------


def test_apply_with_a_cache_calibrates_under_its_schedule(tiny_pixart_pipeline):
    pipe = tiny_pixart_pipeline
    calibration = Calibration(prompts=("a red cat", "a blue dog"), num_inference_steps=6, batch=2)
    cache = CacheConfig(schedule=fora(layout_of(pipe), 6, 2))
    config = QuantConfig(scheme="int8-dynamic", correct=True, min_sqnr=20.0, calibration=calibration)
    expected = calibrate(pipe, config, cache=cache)
    with accel.apply(pipe, cache, config) as handle:
        plan = handle[QuantConfig].plan
    assert plan.settings == expected.settings
    for name in ("correction_scale", "correction_shift", "corrected"):
        assert (plan.channel(name) == expected.channel(name)).all()
    naive = QuantConfig(scheme="int8-dynamic", correct=True, cache_aware=False, calibration=calibration)
    with accel.apply(pipe, cache, naive) as handle:
        assert handle[QuantConfig].plan.settings["schedule"] is None


def test_a_saved_plan_applies_without_calibrating(tmp_path, monkeypatch):
    model = TINY.build()
    plan = calibrate(model, QuantConfig(correct=True, min_sqnr=40.0), run=_calibration_run(model))
    with accel.apply(model, QuantConfig(plan=plan)):
        expected = _run(model)
    # the tiny plan's channels (12 steps x 2 blocks x 3 components x 16 channels) are under the inline limit: a
    # lower limit sends the correction coefficients to the safetensors sidecar, as a real model's are
    assert 64 < plan.channel("correction_scale").size <= INLINE_LIMIT
    monkeypatch.setattr("accel.plan.INLINE_LIMIT", 64)
    plan.save(tmp_path / "quant.json")
    assert (tmp_path / "quant.safetensors").is_file()
    saved = json.loads((tmp_path / "quant.json").read_text())
    assert {saved["channels"][n].get("stored") for n in ("correction_scale", "correction_shift")} == {"safetensors"}
    loaded = Plan.load(tmp_path / "quant.json")
    for name in ("correction_scale", "correction_shift", "corrected"):
        assert (loaded.channel(name) == plan.channel(name)).all()
    assert loaded.settings == plan.settings and loaded.metrics == plan.metrics
    monkeypatch.setattr("accel.quant.apply.calibrate", lambda *a, **k: pytest.fail("calibrated"))
    with accel.apply(model, QuantConfig(plan=loaded)) as handle:
        assert torch.equal(_run(model), expected)
        assert handle.stats().corrected_components == 2 * 3


def test_a_plan_calibrated_without_the_cache_it_is_applied_with_says_so(caplog):
    model = TINY.build()
    cache = CacheConfig(schedule=fora(layout_of(model), STEPS, 2))
    plans = {aware: calibrate(model, QuantConfig(correct=True), cache=cache if aware else None,
                              run=_calibration_run(model)) for aware in (True, False)}  # fmt: skip
    for aware, plan in plans.items():
        caplog.clear()
        with caplog.at_level("WARNING", logger="accel.quant.apply"), accel.apply(model, cache, QuantConfig(plan=plan)):
            pass
        assert ("calibrated without a cache" in caplog.text) == (not aware)


def test_calibrating_needs_a_pipeline_or_a_runner_and_an_uncached_model():
    model = TINY.build()
    with pytest.raises(ValueError, match="pipeline"):
        accel.apply(model, QuantConfig(min_sqnr=20.0))
    with accel.apply(model, CacheConfig(schedule=fora(layout_of(model), STEPS, 2))):
        with pytest.raises(ValueError, match="before CacheConfig"):
            accel.apply(model, QuantConfig(correct=True))


def test_quantization_composes_with_caching_in_phase_order():
    model = TINY.build()
    reference = _run(model)
    cache = CacheConfig(schedule=fora(layout_of(model), STEPS, 2))
    outputs, orders = [], []
    for configs in ((cache, QuantConfig()), (QuantConfig(), cache)):
        with accel.apply(model, *configs) as handle:
            outputs.append(_run(model))
            orders.append([r.technique for r in handle.patches() if r.technique != "core"])
        assert torch.equal(_run(model), reference)
    assert torch.equal(outputs[0], outputs[1]) and orders[0] == orders[1] and orders[0][0] == "quant"


def test_weight_hashes_see_quantized_weights_and_their_scheme():
    from accel.eval.generation import module_sha256

    model = TINY.build()
    digests = {"full": module_sha256(model).hexdigest()}
    for scheme in ("int8-weight", "int8-dynamic"):
        with accel.apply(model, QuantConfig(scheme=scheme)):
            digests[scheme] = module_sha256(model).hexdigest()
            assert module_sha256(model).hexdigest() == digests[scheme]  # the same bytes hash alike
            layer = model.transformer_blocks[0].ff.net[2]
            layer.weight.qdata[0, 0] += 1  # one int8 value changes the hash
            changed = module_sha256(model).hexdigest()
            layer.weight.qdata[0, 0] -= 1
            assert changed != digests[scheme]
    # int8-weight and int8-dynamic hold the same int8 data and scales; what differs is how activations go
    assert len(set(digests.values())) == 3
    assert module_sha256(model).hexdigest() == digests["full"]


@pytest.mark.parametrize("scheme", ["int8-weight", "int8-dynamic"])
def test_the_search_cost_model_counts_the_int8_matmuls(scheme):
    from accel.caching.search.features import count_macs

    model = TINY.build()
    kwargs = TINY.inputs(2, 500.0, torch.Generator().manual_seed(0))
    components = tuple(layout_of(model).components)
    full = count_macs(model, components, (), kwargs)
    with accel.apply(model, QuantConfig(scheme=scheme)):
        quantized = count_macs(model, components, (), kwargs)
    assert full.call_macs > 0 and quantized.call_macs == pytest.approx(full.call_macs, rel=1e-9)
    assert (quantized.component_macs == full.component_macs).all()


@pytest.mark.parametrize("scheme", ["int8-weight", "int8-dynamic"])
def test_the_caching_stats_count_the_int8_matmuls(scheme):
    """The caching engine's own MAC count (``count_macs=True``) sees a quantized model's matmuls, the int8 x int8
    ones of W8A8 included, so its saved share means the same with and without quantization."""
    model = TINY.build()
    cache = CacheConfig(schedule=fora(layout_of(model), STEPS, 3))
    with accel.apply(model, cache) as handle:
        _run(model, prompts=[5])
        full = handle.stats()
    with accel.apply(model, QuantConfig(scheme=scheme), cache) as handle:
        _run(model, prompts=[5])
        quantized = handle.stats()["CacheConfig"]
    assert full.macs_blocks > 0 and quantized.macs_blocks == pytest.approx(full.macs_blocks, rel=1e-9)
    assert quantized.macs_saved == pytest.approx(full.macs_saved, rel=1e-9) and full.macs_saved > 0
