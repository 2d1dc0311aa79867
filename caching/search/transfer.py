"""Schedules transfer across step counts: measure a front searched at one step count at another.

A front's schedules are resampled over normalised time (:meth:`Schedule.resample`) and scored against full
compute at the new step count, with the same prompts and seeds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from accel.caching.schedule import Schedule
from accel.caching.search.evaluator import Evaluator
from accel.caching.search.front import Front


def measure_transfer(evaluator: Evaluator, schedules: Iterable[Schedule], images: bool = False) -> list[dict]:
    """Score ``schedules`` at ``evaluator``'s step count.

    Args:
        evaluator: calibrated at the target step count (its reference is full compute at that count).
        schedules: e.g. a :class:`~accel.caching.search.Front` searched at another step count.
        images: also report decoded-image PSNR.

    Returns:
        one row per schedule: ``source_steps``, ``target_steps``, the metrics found when searched
        (``source_psnr``, ``source_relative_macs``) and those measured now (``psnr``, ``relative_macs``, ...).
        ``source_psnr`` and ``psnr`` are of one kind, the evaluator's quality measure (latent or image PSNR),
        whichever the schedules were searched on.
    """
    key = "image_psnr" if evaluator.config.quality == "image" else "latent_psnr"
    rows = []
    for schedule in schedules:
        measured = evaluator.measure(schedule.resample(evaluator.config.num_steps), images=images)
        rows.append(
            {
                "source_steps": schedule.num_steps,
                "target_steps": evaluator.config.num_steps,
                "source_psnr": schedule.metrics.get(key),
                "source_relative_macs": schedule.metrics.get("relative_macs"),
                **measured,
            }
        )
    return rows


def remeasure(front: Front, evaluator: Evaluator, time_repeats: int = 0, **info) -> Front:
    """The front with every schedule's metrics measured afresh with ``evaluator`` (e.g. on a newer checkpoint
    of the model it was searched on, or at another step count); ``info`` is merged into the front's info.

    The schedules are resampled to the evaluator's step count. The result is not re-filtered for dominance:
    it keeps the searched set, so the change in each member's metrics can be read off.
    """
    from accel.caching.search.runner import measure_speedups

    schedules = [s.resample(evaluator.config.num_steps) for s in front]
    measured = [replace(s, metrics={k: v for k, v in evaluator.measure(s, images=True).items()}) for s in schedules]
    if time_repeats:
        speedups = measure_speedups(evaluator, measured, time_repeats)
        measured = [s.with_metrics(speedup=round(v, 4)) for s, v in zip(measured, speedups)]
    return Front(schedules=tuple(measured), info={**front.info, **info})


def transfer_table(rows: list[dict[str, Any]]) -> str:
    """A text table of :func:`measure_transfer` rows."""
    lines = [f"{'steps':>11}{'MACs then':>11}{'MACs now':>10}{'PSNR then':>11}{'PSNR now':>10}"]
    for r in rows:
        lines.append(
            f"{r['source_steps']:>4} -> {r['target_steps']:<4}"
            f"{100 * (r['source_relative_macs'] or float('nan')):>10.0f}%"
            f"{100 * r['relative_macs']:>9.0f}%{r['source_psnr'] or float('nan'):>11.2f}{r['psnr']:>10.2f}"
        )
    return "\n".join(lines)
