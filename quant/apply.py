"""``QuantConfig``'s apply function: quantized weights and the error correction, through the patch log.

At apply, the scheme is checked against the transformer's device; then, from the config's plan, from a
calibration run (:func:`accel.quant.calibrate`, under the caching schedule applied in the same
``accel.apply`` call when ``cache_aware``) or, with nothing to calibrate, for every candidate layer, each
chosen ``nn.Linear`` gets a torchao quantized weight by :meth:`~accel.patches.PatchLog.replace_parameter`
(``remove()`` puts the very original ``Parameter`` back, so outputs are bit-identical after removal). With
correction coefficients in the plan, every component gets a wrapper that applies ``a * x + b`` per channel to
what it computes (inside the cache's wrapper, so what the cache stores and reuses is the corrected output);
the coefficients of a step are chosen eagerly by a step listener, outside compiled code, and the wrapper's
arithmetic compiles with the component.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import torch

from accel.api import Handle, Target, register
from accel.context import StepContext
from accel.plan import Plan
from accel.quant.calibration import activation_ranges, calibrate, candidate_layers, quantize_layers
from accel.quant.config import QuantConfig
from accel.quant.correction_recording import component_modules
from accel.quant.schemes import (
    FULL_PRECISION,
    STATIC_SCHEMES,
    check_scheme,
    dequantized,
    sqnr,
    tensor_bytes,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantStats:
    """What quantization did to one transformer.

    Attributes:
        scheme: the config's scheme.
        weight_bytes_before: bytes of the transformer's parameters before quantization.
        weight_bytes_after: the same with the quantized weights in place (int8/float8 data and their scales).
        layers: candidate layer path -> its scheme, or ``"full"`` where it stays in full precision.
        layers_per_scheme: how many layers per scheme (and ``"full"``).
        sqnr: output SQNR (dB) per layer on its calibration inputs (from the plan; empty without calibration;
            None stands for exact).
        weight_sqnr: SQNR (dB) of each quantized weight against the original.
        corrected_components: (block, component) pairs with correction coefficients.
    """

    scheme: str
    weight_bytes_before: int
    weight_bytes_after: int
    layers: dict[str, str]
    layers_per_scheme: dict[str, int]
    sqnr: dict[str, float | None]
    weight_sqnr: dict[str, float]
    corrected_components: int

    @property
    def weight_memory_ratio(self) -> float:
        """``weight_bytes_after / weight_bytes_before``."""
        return self.weight_bytes_after / self.weight_bytes_before

    def to_dict(self) -> dict:
        """JSON-ready: every field and ``weight_memory_ratio``."""
        return {**asdict(self), "weight_memory_ratio": self.weight_memory_ratio}


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes ``module``'s parameters hold, a torchao quantized weight counted by its inner tensors."""
    return sum(tensor_bytes(parameter) for parameter in module.parameters())


class _Correction:
    """Per-component ``a * x + b`` of the current step, from a plan's correction channels.

    The decision (which step's coefficients) is made eagerly, by a step listener that copies them into one
    ``(channels,)`` scale and shift tensor per component before each transformer call; the wrappers only compute
    ``addcmul(shift, output, scale)`` on those tensors, so under ``torch.compile`` they trace into the compiled
    component (no graph break, no guard on the step). A step without a fit gets scale 1 and shift 0.
    """

    def __init__(self, plan: Plan, device: torch.device, dtype: torch.dtype):
        self.fitted = plan.channel("corrected")  # (steps, blocks, components) bool
        # (steps, blocks, components, channels); 1 and 0 where nothing was fitted
        self.scale = torch.as_tensor(plan.channel("correction_scale")).to(device, dtype)
        self.shift = torch.as_tensor(plan.channel("correction_shift")).to(device, dtype)
        self.steps = self.fitted.shape[0]
        self.current: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for block, component in zip(*self.fitted.any(axis=0).nonzero()):
            key = (int(block), int(component))
            self.current[key] = (torch.ones_like(self.scale[0, 0, 0]), torch.zeros_like(self.shift[0, 0, 0]))
        self._step: int | None = None

    def step_index(self, step: int, num_steps: int | None) -> int | None:
        """The calibrated step that stands for ``step`` of a ``num_steps``-step trajectory (nearest by position)."""
        if num_steps and num_steps != self.steps:
            step = round(step * (self.steps - 1) / max(num_steps - 1, 1))
        return step if step < self.steps else None

    @torch.no_grad()
    def on_step(self, context: StepContext) -> None:
        """Copy the coefficients of ``context``'s step into the components' tensors (identity past the plan)."""
        step = self.step_index(context.step, context.num_steps)
        if step == self._step:
            return
        for (block, component), (scale, shift) in self.current.items():
            if step is None:
                scale.fill_(1)
                shift.zero_()
            else:
                scale.copy_(self.scale[step, block, component])
                shift.copy_(self.shift[step, block, component])
        self._step = step

    def wrapper(self, block: int, component: int):
        """The traced wrapper of one component's ``forward``."""
        return partial(_affine, *self.current[(block, component)])


def _affine(scale: torch.Tensor, shift: torch.Tensor, inner, *args, **kwargs):
    """``shift + inner(...) * scale`` over the output's channels (pure computation: traced under compile)."""
    output = inner(*args, **kwargs)
    if not isinstance(output, torch.Tensor):
        return output
    width = output.shape[-1]
    return torch.addcmul(shift[:width], output, scale[:width])


class QuantHandle(Handle):
    """Handle of an applied :class:`QuantConfig`: ``stats()`` and ``remove()``; :attr:`plan` is the plan used
    (None when nothing was calibrated)."""

    def __init__(self, target: Target, config: QuantConfig):
        super().__init__("quant")
        self.target, self.config = target, config
        self.plan: Plan | None = None
        self._stats: QuantStats | None = None
        self._correction: _Correction | None = None

    def install(self, plan: Plan | None) -> None:
        """Quantize the layers ``plan`` chooses (every candidate without a plan) and install its correction."""
        transformer = self.target.transformer
        layers = candidate_layers(transformer, self.target.spec, self.config.scope)
        if plan is None:
            decisions = dict.fromkeys(layers, self.config.scheme)
        else:
            decisions = dict(plan.settings.get("layers", {}))
            unknown = sorted(set(decisions) - set(layers))
            if unknown or plan.model_class not in (None, type(transformer).__name__):
                raise ValueError(
                    f"the quantization plan was made for {plan.model_class} and names layers this "
                    f"{type(transformer).__name__} lacks: {unknown[:5]}"
                )
        ranges = activation_ranges(plan) if plan is not None else {}
        if self.config.scheme in STATIC_SCHEMES:
            missing = [n for n, s in decisions.items() if s != FULL_PRECISION and n not in ranges]
            if missing:
                raise ValueError(
                    f"scheme {self.config.scheme!r} needs a calibrated activation range for every quantized "
                    f"layer; the plan has none for {missing[:5]} (calibrate with this scheme)"
                )
        before = weight_bytes(transformer)
        swapped = quantize_layers(self.patch_log, layers, decisions, self.config.scheme, ranges)
        weight_sqnr = {name: sqnr(old.detach().float(), dequantized(new)) for name, (_, old, new) in swapped.items()}
        corrected = self._install_correction(plan) if plan is not None and "corrected" in plan.channels else 0
        self.plan = plan
        self._stats = QuantStats(
            scheme=self.config.scheme,
            weight_bytes_before=before,
            weight_bytes_after=weight_bytes(transformer),
            layers={name: decisions.get(name, FULL_PRECISION) for name in layers},
            layers_per_scheme=dict(Counter(decisions.get(name, FULL_PRECISION) for name in layers)),
            sqnr=dict(plan.metrics.get("sqnr", {})) if plan is not None else {},
            weight_sqnr=weight_sqnr,
            corrected_components=corrected,
        )

    def _install_correction(self, plan: Plan) -> int:
        from accel.caching import layout_of

        layout = layout_of(self.target.transformer, self.target.spec)
        if tuple(plan.components) != tuple(layout.components) or plan.sizes.get("block") != layout.num_blocks:
            raise ValueError(
                f"the plan's correction is for {plan.sizes.get('block')} blocks of {plan.components}, this model "
                f"has {layout.num_blocks} of {layout.components}"
            )
        parameter = next(self.target.transformer.parameters())
        correction = _Correction(plan, parameter.device, parameter.dtype)
        count = 0
        for block, component, module in component_modules(self.target, layout):
            if (block, component) in correction.current:
                self.patch_log.wrap_traced(module, "forward", correction.wrapper(block, component))
                count += 1
        self._correction = correction
        self.target.tracker.add_step_listener(correction.on_step)
        return count

    def stats(self) -> QuantStats | None:
        """Memory before/after, layers per scheme, SQNR per layer (see :class:`QuantStats`)."""
        return self._stats

    def _remove(self) -> None:
        if self._correction is not None:
            self.target.tracker.remove_step_listener(self._correction.on_step)
            self._correction = None
        super()._remove()


def _cache_config(target: Target, config: QuantConfig) -> Any:
    """The CacheConfig to calibrate under: the one applied in the same ``accel.apply`` call, if cache-aware."""
    from accel.caching import CacheConfig

    if CacheConfig in target.tracker.active:
        raise ValueError(
            "QuantConfig calibrates the model it quantizes: apply it before CacheConfig, or both in one "
            "accel.apply call (then calibration runs under the caching schedule)"
        )
    if not config.cache_aware:
        return None
    return _same_call_cache(target)


def _same_call_cache(target: Target) -> Any:
    """The CacheConfig of the same ``accel.apply`` call, or None."""
    from accel.caching import CacheConfig

    return next((c for c in target.configs if isinstance(c, CacheConfig)), None)


def _resolved(target: Target, config: QuantConfig) -> QuantConfig:
    """``config`` (without a plan) with ``correct=None`` decided by what it is applied with (see
    :class:`QuantConfig`): True under a static schedule applied in the same call to a pipeline; otherwise
    unchanged, with a warning where a cache comes but no correction can be calibrated, or where ``calibration``
    is given and nothing calibrates."""
    from accel.caching import CacheConfig, FirstBlockPolicy

    if config.correct is not None:
        return config
    cache = _same_call_cache(target)
    unused = config.calibration is not None and not config.needs_calibration
    if CacheConfig in target.tracker.active:
        reason = "the CacheConfig was applied in an earlier accel.apply call; apply both in one call"
    elif cache is None:
        if unused:
            logger.warning(
                "accel.quant: QuantConfig.calibration is given but nothing calibrates: correct=None corrects "
                "only under a CacheConfig applied in the same accel.apply call; pass correct=True to calibrate "
                "the correction without a cache"
            )
        return config
    elif isinstance(cache.schedule, FirstBlockPolicy):
        reason = "a FirstBlockPolicy decides at run time; cache-aware calibration needs a static Schedule"
    elif target.pipeline is None:
        reason = (
            "a bare transformer has no pipeline to run calibration prompts through; pass "
            "plan=accel.quant.calibrate(transformer, QuantConfig(correct=True), cache=cache, run=...)"
        )
    else:
        return replace(config, correct=True)
    logger.warning(
        "accel.quant: QuantConfig(correct=None) applied with a cache quantizes without the error correction%s: %s",
        " (its calibration settings unused)" if unused else "",
        reason,
    )
    return config


def _check_schedule(target: Target, config: QuantConfig, plan: Plan) -> None:
    """What a plan applied with or without a cache must agree with: a plan with correction applied after a
    cache (in an earlier call) is refused, since its correction would sit outside the cache; a warning when a
    plan is applied with another caching schedule than it was calibrated under (or none, or without a cache
    when it was calibrated under one): its correction and layer choice were measured on another trajectory."""
    from accel.caching import CacheConfig, Schedule

    earlier = target.tracker.active.get(CacheConfig)
    if earlier is not None and "corrected" in plan.channels:
        raise ValueError(
            "a quantization plan with error correction must be applied before CacheConfig, or both in one "
            "accel.apply call: applied after, its correction would sit outside the cache, which would store and "
            "reuse uncorrected features"
        )
    calibrated = plan.settings.get("schedule")
    cache = _same_call_cache(target) or getattr(getattr(earlier, "engine", None), "config", None)
    if cache is None and earlier is None:
        if calibrated is not None:
            logger.warning(
                "accel.quant: the plan was calibrated under a caching schedule and is applied without a cache: its "
                "correction and layer choice were measured on the cached trajectory; apply it with that "
                "CacheConfig in the same accel.apply call, or calibrate without a cache"
            )
        return
    if cache is None or not config.cache_aware or not isinstance(cache.schedule, Schedule):
        return
    if calibrated != cache.schedule.to_dict():
        logger.warning(
            "accel.quant: the plan was calibrated %s, and is applied with another caching schedule; calibrate "
            "under this one (accel.quant.calibrate(pipe, config, cache=...)) for cache-aware statistics, or "
            "pass cache_aware=False for the naive combination on purpose",
            "without a cache" if calibrated is None else "under another schedule",
        )


@register(QuantConfig, name="quant", phase="weights")
def apply_quant(target: Target, config: QuantConfig) -> QuantHandle:
    """Quantize ``target``'s linear layers; returns the handle. Use ``accel.apply`` rather than this."""
    parameter = next(target.transformer.parameters())
    check_scheme(config.scheme, parameter.device)
    plan = config.plan
    if plan is not None:
        _check_schedule(target, config, plan)
    elif (resolved := _resolved(target, config)).needs_calibration:
        cache = _cache_config(target, resolved)
        if target.pipeline is None:
            raise ValueError(
                f"QuantConfig with min_sqnr, correct or scheme {config.scheme!r} calibrates on prompts through a "
                "pipeline: apply it to the pipeline, or pass plan=accel.quant.calibrate(transformer, config, run=...)"
            )
        plan = calibrate(target.pipeline, resolved, cache=cache, spec=target.spec)
    handle = QuantHandle(target, config)
    try:
        handle.install(plan)
    except BaseException:
        handle.remove()
        raise
    return handle
