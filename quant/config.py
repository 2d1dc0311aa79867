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

    Applied alone, with a dynamic or weight-only scheme and no ``min_sqnr``, it needs no data: every selected
    linear layer is quantized. Applied together with a :class:`~accel.caching.CacheConfig` (a static
    ``Schedule``) in one ``accel.apply`` call on a pipeline, it is cache-aware by default: calibration prompts
    (``calibration``, or the defaults) run through the pipeline at apply, along the trajectory the schedule
    produces (``cache_aware``), and the error correction is fitted there (``correct=None`` resolves to True).
    Where a cache comes but no correction can be calibrated (a bare transformer, a ``FirstBlockPolicy``, a cache
    applied in an earlier ``accel.apply`` call), it quantizes without one and logs a warning that says why and
    how to ask for it. ``min_sqnr`` and the static scheme (whose activation scales are measured) always
    calibrate. What calibration makes is a plan (:func:`accel.quant.calibrate` returns the same one;
    ``plan.save(path)``); a config holding a plan applies it without calibrating.

    Attributes:
        scheme: ``"int8-weight"``, ``"int8-dynamic"`` (W8A8, per-token scales at run time), ``"int8-static"``
            (W8A8 with per-layer activation scales from calibration: always calibrates, along the cached
            trajectory when cache-aware) or ``"fp8"`` (GPUs with float8 matmuls); see :mod:`accel.quant.schemes`.
        layers: ``"blocks"``: the linear layers inside the transformer blocks; ``"all"``: every linear layer of
            the transformer (also its embedders and output projection). None (the default): the plan's scope
            with a plan, else ``"all"`` (:attr:`scope`); given with a plan, it must be the plan's.
        min_sqnr: keep in full precision every layer whose output SQNR (dB), measured on its inputs along the
            calibration trajectories, is below this (mixed precision); None quantizes every selected layer (with
            a plan: the plan's bound, whatever it was).
        correct: CacheQuant's decoupled error correction: per step, block, component and output channel, a
            linear map ``a * x + b`` (``a = cov(y, x) / var(x)``, ``b = mean(y) - a * mean(x)``) fitted on
            calibration data from the quantized component output ``x`` to the full-precision one ``y`` on the
            same inputs, applied where the component computes, so the cache stores and reuses corrected values.
            None (the default): correct when applied with a ``CacheConfig`` (see above; to
            :func:`~accel.quant.calibrate`: when given a ``cache``), and with a plan, whatever the plan holds.
            True always calibrates (two passes of the calibration prompts at apply); False never corrects.
        cache_aware: calibrate under the caching schedule of a ``CacheConfig`` applied in the same
            ``accel.apply`` call (False: calibrate on the uncached trajectory, the naive combination; with a
            cache, ``correct=None`` still fits the correction there, as ``python -m accel.bench quant``'s naive
            rows do; ``correct=False`` for plain quantization).
        calibration: the calibration prompts and settings (defaults when None and calibration runs, at the step
            count of the cache's schedule when calibrating under one; give ``call_kwargs`` such as sizes and
            guidance here where the pipeline's own defaults are not what it will run). Refused
            where nothing can calibrate (with a plan, or with ``correct=False``, no ``min_sqnr`` and a scheme
            without calibrated scales).
        plan: a plan from :func:`accel.quant.calibrate` (or ``Plan.load``): its layers and coefficients are
            used as they are, with no calibration run. ``layers``, a ``min_sqnr`` or ``correct`` that disagree
            with it, or ``cache_aware=False`` with a plan calibrated under a cache, raise ``ValueError``.
    """

    scheme: Scheme = "int8-dynamic"
    layers: Literal["blocks", "all"] | None = None
    min_sqnr: float | None = None
    correct: bool | None = None
    cache_aware: bool = True
    calibration: Calibration | None = None
    plan: Plan | None = None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"QuantConfig.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.layers not in ("blocks", "all", None):
            raise ValueError(f"QuantConfig.layers must be 'blocks', 'all' or None, got {self.layers!r}")
        if self.min_sqnr is not None and not isinstance(self.min_sqnr, (int, float)):
            raise TypeError(f"QuantConfig.min_sqnr must be a number of dB or None, got {self.min_sqnr!r}")
        if self.correct is not None and not isinstance(self.correct, bool):
            raise TypeError(f"QuantConfig.correct must be True, False or None, got {self.correct!r}")
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            raise TypeError(f"QuantConfig.calibration must be a Calibration, got {type(self.calibration).__name__}")
        if self.plan is not None:
            self._check_plan()
        elif self.calibration is not None and self.correct is False and not self._calibrates_anyway:
            raise ValueError(
                "QuantConfig.calibration is given but nothing calibrates: correct=False, no min_sqnr and "
                f"scheme {self.scheme!r} needs no activation scales; drop calibration or set correct/min_sqnr"
            )

    @property
    def scope(self) -> Literal["blocks", "all"]:
        """The layers quantized: ``layers``, else the plan's scope, else ``"all"``."""
        if self.layers is not None:
            return self.layers
        return self.plan.settings.get("layer_scope", "all") if self.plan is not None else "all"

    def _check_plan(self) -> None:
        """Refuse a plan of another technique or scheme, and settings that disagree with the plan's."""
        plan = self.plan
        if not isinstance(plan, Plan):
            raise TypeError(f"QuantConfig.plan must be an accel Plan, got {type(plan).__name__}")
        settings = plan.settings
        planned = settings.get("scheme")
        if settings.get("technique") != "quant" or planned != self.scheme:
            raise ValueError(
                f"QuantConfig.plan must be a quantization plan for scheme {self.scheme!r} "
                f"(from accel.quant.calibrate), got one for {planned!r}"
            )
        wrong = []
        scope = settings.get("layer_scope", self.scope)
        if self.layers is not None and scope != self.layers:
            wrong.append(f"layers={scope!r} (given {self.layers!r}: its other layers would stay in full precision)")
        if self.min_sqnr is not None and self.min_sqnr != settings.get("min_sqnr"):
            wrong.append(f"min_sqnr={settings.get('min_sqnr')!r} (given {self.min_sqnr!r})")
        corrected = "corrected" in plan.channels
        if self.correct is not None and self.correct != corrected:
            wrong.append(f"correct={corrected} (given {self.correct})")
        if not self.cache_aware and settings.get("schedule") is not None:
            wrong.append("a caching schedule (given cache_aware=False, the uncached calibration)")
        if self.calibration is not None:
            wrong.append("its calibration already run (given calibration=..., which a plan does not use)")
        if wrong:
            raise ValueError(
                "QuantConfig settings disagree with its plan, which was calibrated with "
                + "; ".join(wrong)
                + ". Leave them out (min_sqnr/correct None) or calibrate a plan with these settings"
            )

    @property
    def _calibrates_anyway(self) -> bool:
        """Whether calibration runs whatever comes with this config: a bound or a static scheme."""
        return self.min_sqnr is not None or self.scheme in STATIC_SCHEMES

    @property
    def needs_calibration(self) -> bool:
        """Whether applying this config runs calibration prompts whatever it is applied with (activation ranges
        of a static scheme, layer selection or ``correct=True``, and no plan). ``correct=None`` also calibrates
        when applied with a ``CacheConfig`` (see the class docstring)."""
        return self.plan is None and (self.correct is True or self._calibrates_anyway)

    def corrects(self, with_cache: bool) -> bool:
        """Whether calibrating this config fits the correction, applied (or calibrated) with a cache or not."""
        return self.correct if self.correct is not None else with_cache
