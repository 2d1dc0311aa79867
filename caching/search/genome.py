"""The search genome: a schedule's compute mask without step 0, flattened; constraints and their repair.

Step 0 always computes (nothing is cached before it), so it is not part of the genome:
``genome = mask[1:].reshape(-1)`` in step-major order, so that a two-point crossover exchanges runs of whole
steps. :func:`repair` is pure and idempotent: it forces the constrained steps on and breaks runs of reuse that
are longer than allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from accel.caching.schedule import Schedule, ScheduleLayout


@dataclass(frozen=True, kw_only=True)
class Constraints:
    """What every searched schedule must satisfy.

    Attributes:
        first_steps: the first steps compute every component (at least 1: step 0).
        last_steps: the last steps compute every component.
        max_consecutive_reuse: a component is recomputed after this many reused steps in a row; None: no cap.
    """

    first_steps: int = 1
    last_steps: int = 0
    max_consecutive_reuse: int | None = None

    def __post_init__(self):
        if not isinstance(self.first_steps, int) or self.first_steps < 1:
            raise ValueError(f"first_steps must be an int >= 1 (step 0 always computes), got {self.first_steps!r}")
        if not isinstance(self.last_steps, int) or self.last_steps < 0:
            raise ValueError(f"last_steps must be an int >= 0, got {self.last_steps!r}")
        if self.max_consecutive_reuse is not None and (
            not isinstance(self.max_consecutive_reuse, int) or self.max_consecutive_reuse < 1
        ):
            raise ValueError(f"max_consecutive_reuse must be an int >= 1 or None, got {self.max_consecutive_reuse!r}")

    def forced_steps(self, num_steps: int) -> list[int]:
        """The steps that compute everything, for ``num_steps`` steps."""
        first = range(min(self.first_steps, num_steps))
        last = range(max(0, num_steps - self.last_steps), num_steps)
        return sorted({*first, *last})

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {
            "first_steps": self.first_steps,
            "last_steps": self.last_steps,
            "max_consecutive_reuse": self.max_consecutive_reuse,
        }


def repair(mask: np.ndarray, constraints: Constraints) -> np.ndarray:
    """The nearest mask satisfying ``constraints``: forced steps on, over-long reuse runs broken.

    A run of reuse is broken by computing at the step where the run would exceed the cap, so runs are cut as
    late as allowed (fewest extra computes).

    Args:
        mask: bool ``(steps, blocks, components)``; not modified.

    Returns:
        a repaired copy.
    """
    result = np.array(mask, dtype=bool, copy=True)
    if result.ndim != 3:
        raise ValueError(f"mask must be (steps, blocks, components), got shape {result.shape}")
    result[constraints.forced_steps(result.shape[0])] = True
    cap = constraints.max_consecutive_reuse
    if cap is not None:
        run = np.zeros(result.shape[1:], dtype=int)
        for step in range(result.shape[0]):
            run = np.where(result[step], 0, run + 1)
            over = run > cap
            result[step][over] = True
            run[over] = 0
    return result


def satisfies(mask: np.ndarray, constraints: Constraints) -> bool:
    """Whether ``mask`` already meets ``constraints``."""
    return bool(np.array_equal(repair(mask, constraints), np.asarray(mask, dtype=bool)))


def genome_length(layout: ScheduleLayout, num_steps: int) -> int:
    """Number of genes for ``num_steps`` steps of ``layout``."""
    return (num_steps - 1) * layout.num_blocks * len(layout.components)


def mask_to_genome(mask: np.ndarray) -> np.ndarray:
    """bool ``(genome_length,)`` of a ``(steps, blocks, components)`` mask (step 0 dropped)."""
    return np.asarray(mask, dtype=bool)[1:].reshape(-1).copy()


def genome_to_mask(genome: np.ndarray, layout: ScheduleLayout, num_steps: int) -> np.ndarray:
    """The ``(steps, blocks, components)`` mask of a genome, step 0 computing everything."""
    genome = np.asarray(genome, dtype=bool)
    if genome.shape != (genome_length(layout, num_steps),):
        raise ValueError(f"genome must have {genome_length(layout, num_steps)} genes, got shape {genome.shape}")
    shape = (num_steps - 1, layout.num_blocks, len(layout.components))
    first = np.ones((1, *shape[1:]), dtype=bool)
    return np.concatenate([first, genome.reshape(shape)])


def genome_to_schedule(
    genome: np.ndarray, layout: ScheduleLayout, num_steps: int, forecast_order: int = 0, **provenance
) -> Schedule:
    """The residual-reuse :class:`Schedule` of a genome, reused residuals forecast to ``forecast_order``."""
    return Schedule(
        mask=genome_to_mask(genome, layout, num_steps),
        components=layout.components,
        model_class=layout.model_class,
        reuse="residual",
        forecast_order=forecast_order,
        provenance=provenance,
    )


def schedule_to_genome(schedule: Schedule, layout: ScheduleLayout, num_steps: int) -> np.ndarray:
    """The genome of ``schedule`` (resampled to ``num_steps`` if needed); its reuse mode is not kept."""
    schedule.check_layout(layout)
    return mask_to_genome(schedule.resample(num_steps).mask)
