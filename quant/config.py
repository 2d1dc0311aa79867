"""The quantization technique's configs: the scheme, which layers, and how to calibrate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from accel.plan import Plan
from accel.quant.schemes import SCHEMES, STATIC_SCHEMES, Scheme

#: a few short prompts to calibrate on when none are given (the caching search's defaults are in this style)
DEFAULT_CALIBRATION_PROMPTS = (
    "christmas tree",
    "house building",
    "rainbow",
    "smiling face",
    "red apple",
    "blue car",
    "cat",
    "sun and moon",
)


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """How the calibration trajectories are made: calibration prompts through the pipeline.

    Attributes:
        prompts: calibration prompts (one image each).
        num_inference_steps: denoising steps of each calibration run (the correction coefficients are per step;
            at another step count the nearest calibrated step's are used).
        batch: prompts per pipeline call.
        seed: prompt ``i`` starts from the noise of ``torch.Generator().manual_seed(seed + i)``.
        rows_per_call: input rows kept per linear layer and call to measure its SQNR.
        call_kwargs: further pipeline call arguments (e.g. ``guidance_scale``, sizes).
    """

    prompts: tuple[str, ...] = DEFAULT_CALIBRATION_PROMPTS
    num_inference_steps: int = 20
    batch: int = 4
    seed: int = 0
    rows_per_call: int = 64
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.prompts, str) or not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError(f"Calibration.prompts must be a non-empty tuple of strings, got {self.prompts!r}")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        for name in ("num_inference_steps", "batch", "rows_per_call"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Calibration.{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "call_kwargs", MappingProxyType(dict(self.call_kwargs)))


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Post-training quantization of the transformer's linear layers through torchao, applied with
    ``accel.apply(pipe, QuantConfig(...))``.

    Without ``min_sqnr``, ``correct`` or ``plan``, and with a dynamic or weight-only scheme, it needs no data:
    every selected linear layer is quantized. With them (or the static scheme, whose activation scales are
    measured), calibration prompts run through the pipeline first (``calibration``), along the trajectory that
    a :class:`~accel.caching.CacheConfig` applied in the same ``accel.apply`` call produces (``cache_aware``),
    and the result is a plan (:func:`accel.quant.calibrate` returns the same one; ``plan.save(path)``); a config
    holding a plan applies it without calibrating.

    Attributes:
        scheme: ``"int8-weight"``, ``"int8-dynamic"`` (W8A8, per-token scales at run time), ``"int8-static"``
            (W8A8 with per-layer activation scales from calibration: always calibrates, along the cached
            trajectory when cache-aware) or ``"fp8"`` (GPUs with float8 matmuls); see :mod:`accel.quant.schemes`.
        layers: ``"blocks"``: the linear layers inside the transformer blocks; ``"all"``: every linear layer of
            the transformer (also its embedders and output projection).
        min_sqnr: keep in full precision every layer whose output SQNR (dB), measured on its inputs along the
            calibration trajectories, is below this (mixed precision); None quantizes every selected layer.
        correct: CacheQuant's decoupled error correction: per step, block, component and output channel, a
            linear map ``a * x + b`` (``a = cov(y, x) / var(x)``, ``b = mean(y) - a * mean(x)``) fitted on
            calibration data from the quantized component output ``x`` to the full-precision one ``y`` on the
            same inputs, applied where the component computes, so the cache stores and reuses corrected values.
        cache_aware: calibrate under the caching schedule of a ``CacheConfig`` applied in the same
            ``accel.apply`` call (False: calibrate on the uncached trajectory, the naive combination).
        calibration: the calibration prompts and settings (defaults when None and calibration is needed).
        plan: a plan from :func:`accel.quant.calibrate` (or ``Plan.load``): its layers and coefficients are
            used as they are, with no calibration run.
    """

    scheme: Scheme = "int8-dynamic"
    layers: Literal["blocks", "all"] = "all"
    min_sqnr: float | None = None
    correct: bool = False
    cache_aware: bool = True
    calibration: Calibration | None = None
    plan: Plan | None = None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"QuantConfig.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.layers not in ("blocks", "all"):
            raise ValueError(f"QuantConfig.layers must be 'blocks' or 'all', got {self.layers!r}")
        if self.min_sqnr is not None and not isinstance(self.min_sqnr, (int, float)):
            raise TypeError(f"QuantConfig.min_sqnr must be a number of dB or None, got {self.min_sqnr!r}")
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            raise TypeError(f"QuantConfig.calibration must be a Calibration, got {type(self.calibration).__name__}")
        if self.plan is not None:
            if not isinstance(self.plan, Plan):
                raise TypeError(f"QuantConfig.plan must be an accel Plan, got {type(self.plan).__name__}")
            planned = self.plan.settings.get("scheme")
            if self.plan.settings.get("technique") != "quant" or planned != self.scheme:
                raise ValueError(
                    f"QuantConfig.plan must be a quantization plan for scheme {self.scheme!r} "
                    f"(from accel.quant.calibrate), got one for {planned!r}"
                )

    @property
    def needs_calibration(self) -> bool:
        """Whether applying this config runs calibration prompts (activation ranges of a static scheme, layer
        selection or correction, and no plan)."""
        return self.plan is None and (self.min_sqnr is not None or self.correct or self.scheme in STATIC_SCHEMES)
