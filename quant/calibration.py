"""Calibration: layer sensitivity and correction statistics measured along real (and cached) trajectories.

:func:`calibrate` runs the calibration prompts through the pipeline (or a callable that drives a bare
transformer) twice, each time under the caching schedule given, if any, so that every statistic comes from the
trajectory the cache produces and not from the uncached one:

1. *ranges and sensitivity*: recorders on the candidate linear layers keep ``rows_per_call`` input rows per call
   and the largest input magnitude of all calls (a static scheme's activation scale; along a cached trajectory,
   where reused and extrapolated features feed the computed steps, the ranges differ from the uncached ones);
   each layer's SQNR is then ``linear(x)`` in full precision against the quantized layer on those rows. Layers
   under ``min_sqnr`` stay in full precision.
2. *correction* (``correct=True``): with the chosen layers quantized, the recorders of
   :mod:`accel.quant.correction_recording` pair each computing component's quantized output ``x`` with the
   output ``y`` it gives when its block runs again on the same inputs with its full-precision weights (in a
   forward pre-hook, so it sees the inputs of the cached trajectory, whatever the cache does with the block);
   the pairs feed :class:`~accel.quant.correction.CorrectionStatistics`, whose fitted lines become the plan's
   correction channels.

The recorders are temporary: they go through a patch log (component wrappers, weight swaps) or torch hook
handles (the block pre-hooks) that are undone before :func:`calibrate` returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

import accel
from accel.api import resolve
from accel.patches import PatchLog
from accel.plan import Plan
from accel.quant.config import Calibration, QuantConfig
from accel.quant.correction_recording import CorrectionRecorder, with_correction
from accel.quant.schemes import (
    FULL_PRECISION,
    STATIC_SCHEMES,
    ActivationRange,
    check_scheme,
    quantized_weight,
    sqnr,
)

logger = logging.getLogger(__name__)

Runner = Callable[[], Any]


def candidate_layers(transformer: torch.nn.Module, spec, scope: str) -> dict[str, torch.nn.Linear]:
    """The linear layers a config may quantize, by their path in ``transformer``: inside the blocks
    (``scope="blocks"``) or everywhere (``"all"``)."""
    names = {id(module): name for name, module in transformer.named_modules()}
    if scope == "all":
        roots = [transformer]
    else:
        roots = [block for _, block in spec.block_list(transformer)]
    layers = {}
    for root in roots:
        for module in root.modules():
            if isinstance(module, torch.nn.Linear):
                layers[names[id(module)]] = module
    return layers


def pipeline_runner(pipe: Any, calibration: Calibration) -> Runner:
    """A callable that runs ``calibration``'s prompts through ``pipe`` (final latents, no decoding)."""
    from accel.eval.generation import call_kwargs

    overrides = {"output_type": "latent", "num_inference_steps": calibration.num_inference_steps}
    kwargs = call_kwargs(pipe, {**overrides, **calibration.call_kwargs})
    prompts = list(calibration.prompts)

    def run() -> None:
        for start in range(0, len(prompts), calibration.batch):
            chunk = prompts[start : start + calibration.batch]
            generators = [torch.Generator().manual_seed(calibration.seed + start + i) for i in range(len(chunk))]
            pipe(chunk, generator=generators, **kwargs)

    return run


def _under(pipe_or_transformer: Any, cache: Any, run: Runner) -> None:
    """Run ``run()`` with ``cache`` (a CacheConfig, or None) applied for the duration."""
    if cache is None:
        run()
        return
    with accel.apply(pipe_or_transformer, replace(cache, count_macs=False)):
        run()


def record_layer_inputs(
    pipe_or_transformer, layers: dict, run: Runner, cache, rows_per_call: int
) -> tuple[dict[str, torch.Tensor], dict[str, ActivationRange]]:
    """Input rows ``(rows, in_features)`` of every layer of ``layers`` along the trajectories ``run`` makes
    (under ``cache``): at most ``rows_per_call`` evenly spaced rows per call, float32 on the CPU; and each
    layer's :class:`~accel.quant.schemes.ActivationRange` (largest input magnitude over every call, all rows)."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    ranges: dict[str, ActivationRange] = {}
    log = PatchLog("quant-calibration")

    def recorder(name: str):
        def forward(inner, x, *args, **kwargs):
            flat = x.detach().reshape(-1, x.shape[-1])
            stride = max(1, flat.shape[0] // rows_per_call)
            rows[name].append(flat[::stride][:rows_per_call].float().cpu())
            absmax = float(flat.abs().amax()) if flat.numel() else 0.0
            seen = ranges.get(name)
            ranges[name] = ActivationRange(max(absmax, seen.absmax if seen else 0.0), x.ndim)
            return inner(x, *args, **kwargs)

        return forward

    try:
        for name, linear in layers.items():
            log.wrap(linear, "forward", recorder(name))
        _under(pipe_or_transformer, cache, run)
    finally:
        log.undo()
    return {name: torch.cat(kept) for name, kept in rows.items() if kept}, ranges


def activation_ranges(plan: Plan) -> dict[str, ActivationRange]:
    """The calibrated activation range of every layer a plan of a static scheme names (empty for others)."""
    return {name: ActivationRange(*value) for name, value in plan.settings.get("activation_ranges", {}).items()}


@torch.no_grad()
def layer_sqnr(linear: torch.nn.Linear, weight: torch.Tensor, inputs: torch.Tensor, ndim: int = 2) -> float:
    """SQNR (dB) of ``linear`` with ``weight`` (quantized) in place of its own, on ``inputs`` ``(rows, in)``
    (given as a tensor of ``ndim`` dimensions, the rank a static scheme's scale was made for)."""
    x = inputs.to(linear.weight.device).reshape([1] * (ndim - 2) + list(inputs.shape))
    bias = linear.bias
    reference = F.linear(x.float(), linear.weight.float(), None if bias is None else bias.float())
    quantized = F.linear(x.to(linear.weight.dtype), weight, bias)
    return sqnr(reference, quantized.float())


def quantize_layers(
    log: PatchLog, layers: dict, decisions: dict, scheme: str, ranges: dict
) -> dict[str, tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]]:
    """Quantize the layers ``decisions`` picks (a static scheme with their activation ``ranges``), each weight
    swapped through ``log``; ``{name: (linear, original weight, quantized weight)}``."""
    swapped = {}
    for name, linear in layers.items():
        if decisions.get(name, FULL_PRECISION) == FULL_PRECISION:
            continue
        original = linear.weight
        weight = quantized_weight(linear, scheme, ranges.get(name))
        log.replace_parameter(linear, "weight", weight)
        swapped[name] = (linear, original, weight)
    return swapped


def _finite(value: float) -> float | None:
    return round(value, 3) if value != float("inf") else None


def calibrate(
    pipe_or_transformer: Any,
    config: QuantConfig,
    *,
    cache: Any = None,
    run: Runner | None = None,
    spec=None,
) -> Plan:
    """Measure layer sensitivity (and, with ``config.correct``, fit the error correction) along the calibration
    trajectories, under ``cache`` when given; returns the plan ``QuantConfig(plan=...)`` applies as it is.

    ``config.correct=None`` fits the correction when ``cache`` is given. The scheme is checked against the
    transformer's device (:func:`~accel.quant.check_scheme`) and a dynamic cache refused before any calibration
    run.

    Args:
        pipe_or_transformer: the pipeline (or its transformer, with ``run``), not quantized yet.
        config: the scheme, layer scope, ``min_sqnr``, ``correct`` and ``calibration`` settings.
        cache: a :class:`~accel.caching.CacheConfig` with a static schedule to calibrate under (cache-aware),
            or None (the uncached trajectory).
        run: drives the calibration trajectories (e.g. a denoising loop over a bare transformer); default: the
            pipeline over ``config.calibration``'s prompts.
        spec: the model spec, for a transformer without a registered adapter.

    Returns:
        A :class:`~accel.plan.Plan` whose settings name each candidate layer's scheme (or ``"full"``) and hold
        the schedule calibrated under (and, for a static scheme, ``activation_ranges``: each layer's
        ``[absmax, ndim]``), whose metrics hold each layer's SQNR (dB), and, with ``correct``,
        channels ``correction_scale``/``correction_shift`` over (step, block, component, channel) and
        ``corrected`` over (step, block, component).

    Raises:
        ValueError: ``cache`` holds a ``FirstBlockPolicy``, or a bare transformer without ``run``.
        RuntimeError: the scheme cannot run on the transformer's device (e.g. fp8 on a CPU).
    """
    _refuse_dynamic_cache(cache)
    target = resolve(pipe_or_transformer, spec)
    check_scheme(config.scheme, next(target.transformer.parameters()).device)  # before any calibration run
    calibration = _calibration_settings(config, cache)
    run = _runner(target, calibration, run)
    target.tracker.acquire()
    try:
        layers = candidate_layers(target.transformer, target.spec, config.scope)
        inputs, seen = record_layer_inputs(pipe_or_transformer, layers, run, cache, calibration.rows_per_call)
        ranges = seen if config.scheme in STATIC_SCHEMES else {}
        sqnrs = _layer_sqnrs(layers, inputs, seen, config.scheme, ranges)
        decisions = _decisions(layers, sqnrs, config, ranges)
        plan = _layer_plan(target, config, calibration, cache, decisions, sqnrs, ranges)
        if config.corrects(cache is not None):
            plan = _with_correction(plan, pipe_or_transformer, target, layers, decisions, config.scheme, ranges, run,
                                    cache)  # fmt: skip
    finally:
        target.tracker.release()
    logger.info("quantization plan: %d of %d layers quantized", sum(v != FULL_PRECISION for v in decisions.values()),
                len(decisions))  # fmt: skip
    return plan


def _refuse_dynamic_cache(cache: Any) -> None:
    """Refuse a cache that decides at run time (a ``FirstBlockPolicy``): no calibration trajectory stands for it."""
    from accel.caching import FirstBlockPolicy

    if cache is not None and isinstance(cache.schedule, FirstBlockPolicy):
        raise ValueError(
            "cache-aware quantization calibrates under a static Schedule, not a FirstBlockPolicy (it decides at run "
            "time, so no trajectory stands for it): pass a Schedule (e.g. a front member) or cache=None"
        )


def _calibration_settings(config: QuantConfig, cache: Any) -> Calibration:
    """``config.calibration``, or the default settings, under a cache at the step count its schedule is for."""
    if config.calibration is not None:
        return config.calibration
    if cache is not None:
        return Calibration(num_inference_steps=cache.schedule.num_steps)
    return Calibration()


def _runner(target, calibration: Calibration, run: Runner | None) -> Runner:
    """``run``, or (given a pipeline) the pipeline over ``calibration``'s prompts (:func:`pipeline_runner`)."""
    if run is not None:
        return run
    if target.pipeline is None:
        raise ValueError("calibrating a bare transformer needs run=..., a callable that drives its trajectories")
    return pipeline_runner(target.pipeline, calibration)


def _layer_sqnrs(
    layers: dict[str, torch.nn.Linear],
    inputs: dict[str, torch.Tensor],
    seen: dict[str, ActivationRange],
    scheme: str,
    ranges: dict[str, ActivationRange],
) -> dict[str, float]:
    """The SQNR (dB) of every layer that saw calls, quantized with ``scheme`` (a static one at the layer's
    calibrated ``ranges``), on its recorded ``inputs`` (see :func:`layer_sqnr`)."""
    return {
        name: layer_sqnr(linear, quantized_weight(linear, scheme, ranges.get(name)), inputs[name], seen[name].ndim)
        for name, linear in layers.items()
        if name in inputs
    }


def _decisions(
    layers: dict[str, torch.nn.Linear], sqnrs: dict[str, float], config: QuantConfig, ranges: dict
) -> dict[str, str]:
    """Each candidate layer's scheme: ``config.scheme``, or full precision for a layer under ``config.min_sqnr``
    and, with a static scheme, for a layer no calibration call reached (it has no activation range)."""
    static, bound = config.scheme in STATIC_SCHEMES, config.min_sqnr
    return {
        name: FULL_PRECISION
        if (bound is not None and sqnrs.get(name, float("inf")) < bound) or (static and name not in ranges)
        else config.scheme
        for name in layers
    }


def _layer_plan(target, config: QuantConfig, calibration: Calibration, cache, decisions, sqnrs, ranges) -> Plan:
    """The plan of step 1 (see :func:`calibrate`'s Returns): each layer's scheme and SQNR, the schedule
    calibrated under and, for a static scheme, the activation ranges; where the runs came from."""
    static = config.scheme in STATIC_SCHEMES
    return Plan(
        sizes={},
        model_class=type(target.transformer).__name__,
        settings={
            "technique": "quant",
            "scheme": config.scheme,
            "layer_scope": config.scope,
            "min_sqnr": config.min_sqnr,
            "layers": decisions,
            "schedule": None if cache is None else cache.schedule.to_dict(),
            **({"activation_ranges": {name: r.to_list() for name, r in ranges.items()}} if static else {}),
        },
        provenance={"prompts": list(calibration.prompts), "seed": calibration.seed,
                    "num_inference_steps": calibration.num_inference_steps},
        metrics={"sqnr": {name: _finite(value) for name, value in sqnrs.items()}},
    )  # fmt: skip


def _with_correction(plan: Plan, pipe_or_transformer, target, layers, decisions, scheme, ranges, run, cache) -> Plan:
    """``plan`` with the correction fitted along the trajectories ``run`` makes under ``cache`` (step 2 of the
    module docstring), the layers ``decisions`` picks quantized for the duration."""
    from accel.caching import layout_of

    layout = layout_of(target.transformer, target.spec)
    log = PatchLog("quant-calibration")
    hooks: list = []
    recorder = None
    try:
        recorder = CorrectionRecorder(target, layout, quantize_layers(log, layers, decisions, scheme, ranges))
        hooks = recorder.install(log)
        _under(pipe_or_transformer, cache, lambda: (run(), recorder.flush()))
    finally:
        if recorder is not None:
            recorder.uninstall(hooks)
        log.undo()
    return with_correction(plan, recorder.statistics, recorder.last_step + 1, layout)
