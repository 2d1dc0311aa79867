"""A fitted wall-clock model of a schedule: counted work plus per-call overhead, from a few timed runs.

On small models MACs are a poor proxy for time: running a block or reusing a component has a fixed cost (hooks,
norms, modulation, kernel launches) that can outweigh the arithmetic saved. :class:`LatencyModel` predicts a
run's seconds from what the mask makes the engine do, summed over steps:

``seconds = c_step * steps + c_block * blocks run + sum_c (c_compute[c] * computed[c] + c_reuse[c] * reused[c])
+ c_forecast * order * forecasts``

where a block is *run* unless all its components are reused (then it is skipped whole), ``reused[c]``
counts reuses inside run blocks, and ``forecasts`` counts the cached tensors a forecasting schedule (order
``>= 1``) extrapolates: each reuse inside a run block, each skipped block at a step where another block runs,
and one sum at a step that skips every block. The non-negative coefficients are fitted by least squares to
timed runs of a few schedules (:func:`fit_latency_model`); the fitted model is a pure function, deterministic,
and saved with the search so a resumed run scores exactly as before.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from accel.caching.schedule import Schedule
from accel.serialization import write_json

logger = logging.getLogger(__name__)


def latency_features(mask: np.ndarray, present: np.ndarray, forecast_order: int = 0) -> np.ndarray:
    """``(3 + 2 * components,)`` counts: steps, blocks run, computed and reused-in-run per component, then
    ``forecast_order`` times the forecasts.

    Args:
        mask: bool ``(steps, blocks, components)``.
        present: bool ``(blocks, components)``: which blocks have which components.
        forecast_order: the schedule's forecast order (0: reused values are not extrapolated).
    """
    mask = np.asarray(mask, dtype=bool) & present
    run = mask.any(axis=2)  # (steps, blocks): not skipped whole
    computed = mask.sum(axis=(0, 1))
    reused = (run[:, :, None] & ~mask & present).sum(axis=(0, 1))
    some_run = run.any(axis=1)  # (steps,): the stack is not skipped whole
    forecasts = reused.sum() + (~run & some_run[:, None]).sum() + (~some_run).sum()
    counts = [mask.shape[0], run.sum(), *computed, *reused, forecast_order * forecasts]
    return np.array(counts, dtype=np.float64)


@dataclass(frozen=True, kw_only=True, eq=False)
class LatencyModel:
    """Seconds of one pipeline run as a linear function of :func:`latency_features`.

    Attributes:
        coefficients: non-negative seconds per unit of each feature.
        present: bool ``(blocks, components)``.
        fixed_seconds: time outside the denoising loop's transformer work that no schedule changes.
        model: the identity of the model it was fitted on (:func:`accel.caching.search.evaluator.model_identity`),
            None if unknown (a file written before it was recorded).
    """

    coefficients: np.ndarray
    present: np.ndarray
    fixed_seconds: float = 0.0
    model: dict | None = None

    def seconds(self, mask: np.ndarray, forecast_order: int = 0) -> float:
        """Predicted seconds of a run under ``mask`` forecasting to ``forecast_order``."""
        features = latency_features(mask, self.present, forecast_order)
        return float(self.fixed_seconds + features @ self.coefficients)

    def relative(self, mask: np.ndarray, forecast_order: int = 0) -> float:
        """Predicted time relative to computing everything."""
        full = np.ones_like(np.asarray(mask, dtype=bool))
        return self.seconds(mask, forecast_order) / self.seconds(full)

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {
            "type": "accel.caching.search.LatencyModel",
            "version": 2,
            "coefficients": self.coefficients.tolist(),
            "present": self.present.astype(int).tolist(),
            "fixed_seconds": self.fixed_seconds,
            **({"model": self.model} if self.model is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> LatencyModel:
        """Parse :meth:`to_dict` output (version 1, without the forecast term, reads as a zero one)."""
        if data.get("type") != "accel.caching.search.LatencyModel" or data.get("version") not in (1, 2):
            raise ValueError("not an accel.caching.search.LatencyModel version 1 or 2 object")
        coefficients = np.asarray(data["coefficients"], dtype=np.float64)
        if data["version"] == 1:
            coefficients = np.append(coefficients, 0.0)
        return cls(
            coefficients=coefficients,
            present=np.asarray(data["present"], dtype=bool),
            fixed_seconds=float(data["fixed_seconds"]),
            model=data.get("model"),
        )

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically."""
        write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        """Read :meth:`save` output.

        Raises:
            ValueError: a corrupt or foreign file, naming it and what to do.
        """
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} cannot be read as a latency model ({error}); delete it to fit it again") from None


def fit_latency_model(evaluator, schedules: list[Schedule], repeats: int = 2, batch: int = 2) -> LatencyModel:
    """Time ``schedules`` (plus full compute) on ``batch`` calibration prompts and fit a :class:`LatencyModel`.

    Runs are interleaved round-robin after a warm-up; each schedule's fastest repeat is used (the least
    disturbed by other work). Needs at least as many distinct schedules as features to be well posed.
    """
    from scipy.optimize import nnls

    import accel
    from accel.bench.timing import time_interleaved
    from accel.caching.config import CacheConfig
    from accel.caching.heuristics import compute_all

    steps = evaluator.config.num_steps
    schedules = [compute_all(evaluator.layout, steps), *(s.resample(steps) for s in schedules)]
    names = [f"s{i}" for i in range(len(schedules))]
    around = {
        name: (lambda s=s: accel.apply(evaluator.pipe, CacheConfig(schedule=s, count_macs=False)))
        for name, s in zip(names, schedules)
    }
    batch = min(batch, len(evaluator.prompts))
    timings = time_interleaved(
        {name: (lambda: evaluator.generate(None, batch)) for name in names}, repeats=repeats, warmup=1, around=around
    )
    present = evaluator.cost_model.component_macs > 0
    features = np.stack([latency_features(s.mask, present, s.forecast_order) for s in schedules])
    seconds = np.array([min(timings[name].samples) for name in names])
    coefficients, _ = nnls(features, seconds)
    model = LatencyModel(coefficients=coefficients, present=present, model=evaluator.model_identity)
    predicted = features @ coefficients
    error = float(np.median(np.abs(predicted - seconds) / seconds))
    logger.info("latency model fitted on %d timed schedules: median error %.1f%%", len(schedules), 100 * error)
    return model
