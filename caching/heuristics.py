"""Schedule generators from the literature: baselines and seeds for the search.

Each returns a :class:`~accel.caching.schedule.Schedule` for a :class:`ScheduleLayout` (see
:func:`accel.caching.layout_of`) and a step count, with its parameters recorded as provenance.

* :func:`compute_all`: every component at every step (the reference, and the overhead check).
* :func:`fora`: FORA (Selvaraju et al. 2024), recompute every ``interval`` steps, reuse in between.
* :func:`delta_dit`: Delta-DiT (Chen et al. 2024), cache the rear blocks in the early (outline) phase and the
  front blocks in the late (detail) phase, refreshing every ``interval`` steps.
* :func:`taylorseer`: TaylorSeer (Liu et al. 2025), FORA's refresh steps with the reused features forecast by
  a Taylor expansion from the last computes instead of reused as is.
* :func:`tgate`: T-GATE (Zhang et al. 2024), cross-attention computed up to ``gate_step`` and frozen after.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from accel.caching.schedule import Reuse, Schedule, ScheduleLayout


def _whole(value: object, name: str, low: int = 1) -> int:
    """``value`` as an int ``>= low``; a fraction, bool or string is refused (``interval=2.5`` ran as another
    interval before, without a word)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a whole number >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _full(layout: ScheduleLayout, steps: int) -> np.ndarray:
    steps = _whole(steps, "steps")
    return np.ones((steps, layout.num_blocks, len(layout.components)), dtype=bool)


def _schedule(layout: ScheduleLayout, mask: np.ndarray, reuse: Reuse, forecast_order: int, **provenance) -> Schedule:
    return Schedule(
        mask=mask,
        components=layout.components,
        model_class=layout.model_class,
        reuse=reuse,
        forecast_order=forecast_order,
        provenance=provenance,
    )


def compute_all(layout: ScheduleLayout, steps: int) -> Schedule:
    """Compute everything at every step: output equals the unaccelerated model."""
    return _schedule(layout, _full(layout, steps), "residual", 0, generator="compute_all")


def fora(
    layout: ScheduleLayout,
    steps: int,
    interval: int = 2,
    reuse: Reuse = "residual",
    forecast_order: int = 0,
    warmup: int = 0,
) -> Schedule:
    """FORA: compute all components every ``interval`` steps (0, N, 2N, ...) and reuse them in between.

    ``warmup`` steps are computed first and the interval counts from there (TaylorSeer's and MagCache's
    uncached first steps, when the early, structure-forming steps matter most).
    """
    interval = _whole(interval, "interval")
    warmup = _whole(warmup, "warmup", 0)
    if not 0 <= warmup <= steps:
        raise ValueError(f"warmup must be in 0..{steps}, got {warmup}")
    mask = _full(layout, steps)
    after = np.arange(steps) - warmup
    mask[(after >= 0) & (after % interval != 0)] = False
    provenance = {"interval": interval, **({"warmup": warmup} if warmup else {})}
    return _schedule(layout, mask, reuse, forecast_order, generator="fora", **provenance)


def taylorseer(layout: ScheduleLayout, steps: int, interval: int = 3, order: int = 1) -> Schedule:
    """TaylorSeer: compute everything every ``interval`` steps; in between, forecast each component's residual
    to order ``order`` (1: linear, diffusers' default) from its last ``order + 1`` computes."""
    order = _whole(order, "order (order 0 is FORA)")
    schedule = fora(layout, steps, interval, "residual", order)
    return replace(schedule, provenance={"generator": "taylorseer", "interval": interval, "order": order})


def delta_dit(
    layout: ScheduleLayout,
    steps: int,
    interval: int = 2,
    cached_blocks: float = 0.5,
    boundary: float = 0.5,
    reuse: Reuse = "residual",
) -> Schedule:
    """Delta-DiT: before ``boundary`` (a fraction of the steps) the rear ``cached_blocks`` fraction of blocks
    is reused between refreshes every ``interval`` steps; after it, the front fraction."""
    if not 0 < cached_blocks <= 1 or not 0 <= boundary <= 1:
        raise ValueError("cached_blocks must be in (0, 1] and boundary in [0, 1]")
    interval = _whole(interval, "interval")
    mask = _full(layout, steps)
    count = max(1, round(cached_blocks * layout.num_blocks))
    switch = round(boundary * steps)
    for step in range(steps):
        if step % interval == 0:
            continue
        blocks = slice(layout.num_blocks - count, None) if step < switch else slice(0, count)
        mask[step, blocks] = False
    return _schedule(
        layout,
        mask,
        reuse,
        0,
        generator="delta_dit",
        interval=interval,
        cached_blocks=cached_blocks,
        boundary=boundary,
    )


def tgate(layout: ScheduleLayout, steps: int, gate_step: int | None = None) -> Schedule:
    """T-GATE: cross-attention computed for steps ``< gate_step`` (default: 40% of the steps), then reused."""
    if "cross_attn" not in layout.components:
        raise ValueError(f"T-GATE needs a cross-attention component; {layout.model_class} has {layout.components}")
    gate = max(1, round(0.4 * _whole(steps, "steps"))) if gate_step is None else _whole(gate_step, "gate_step")
    if not 1 <= gate <= steps:
        raise ValueError(f"gate_step must be in 1..{steps}, got {gate}")
    mask = _full(layout, steps)
    mask[gate:, :, layout.components.index("cross_attn")] = False
    return _schedule(layout, mask, "output", 0, generator="tgate", gate_step=gate)
