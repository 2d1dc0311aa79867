"""The search genome: a schedule's compute mask without step 0, flattened, then its forecast order; constraints
and their repair.

Step 0 always computes (nothing is cached before it), so it is not part of the genome: the mask genes are
``mask[1:].reshape(-1)`` in step-major order, so that a two-point crossover exchanges runs of whole steps
(:class:`Encoding`). :func:`repair` is pure and idempotent: it forces the constrained steps on and breaks runs
of reuse that are longer than allowed.
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


@dataclass(frozen=True, kw_only=True)
class Encoding:
    """How a schedule is written as genes: its compute mask without step 0, then its forecast order.

    The mask genes come first, ``mask[1:].reshape(-1)`` in step-major order. When the search chooses among
    several forecast orders, ``len(forecast_orders) - 1`` order genes follow, and the schedule forecasts to
    ``forecast_orders[k]`` where ``k`` counts the order genes that are set, so one bit flip moves to a
    neighbouring order. With one order there are no order genes.

    Attributes:
        layout: the model's schedule layout.
        num_steps: denoising steps.
        forecast_orders: the forecast orders a schedule may use, the first being the default.
    """

    layout: ScheduleLayout
    num_steps: int
    forecast_orders: tuple[int, ...] = (0,)

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not self.forecast_orders or len(set(self.forecast_orders)) != len(self.forecast_orders):
            raise ValueError(f"forecast_orders must be distinct and not empty, got {self.forecast_orders!r}")

    @property
    def mask_shape(self) -> tuple[int, int, int]:
        """``(steps, blocks, components)``."""
        return self.num_steps, self.layout.num_blocks, len(self.layout.components)

    @property
    def mask_genes(self) -> int:
        """Genes of the mask (every step but step 0)."""
        steps, blocks, components = self.mask_shape
        return (steps - 1) * blocks * components

    @property
    def length(self) -> int:
        """Genes in all."""
        return self.mask_genes + len(self.forecast_orders) - 1

    def _check(self, genome: np.ndarray) -> np.ndarray:
        genome = np.asarray(genome, dtype=bool)
        if genome.shape != (self.length,):
            raise ValueError(f"genome must have {self.length} genes, got shape {genome.shape}")
        return genome

    def mask(self, genome: np.ndarray) -> np.ndarray:
        """The bool ``(steps, blocks, components)`` mask of ``genome``, step 0 computing everything."""
        genes = self._check(genome)[: self.mask_genes]
        first = np.ones((1, *self.mask_shape[1:]), dtype=bool)
        return np.concatenate([first, genes.reshape(self.num_steps - 1, *self.mask_shape[1:])])

    def forecast_order(self, genome: np.ndarray) -> int:
        """The forecast order ``genome`` selects."""
        return self.forecast_orders[int(self._check(genome)[self.mask_genes :].sum())]

    def genome(self, mask: np.ndarray, forecast_order: int | None = None) -> np.ndarray:
        """The genome of ``mask`` (step 0 dropped) forecasting to ``forecast_order`` (None: the first order).

        Raises:
            ValueError: the mask has another shape, or the order is not one of :attr:`forecast_orders`.
        """
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.mask_shape:
            raise ValueError(f"mask must have shape {self.mask_shape}, got {mask.shape}")
        order = self.forecast_orders[0] if forecast_order is None else forecast_order
        if order not in self.forecast_orders:
            raise ValueError(f"forecast order {order} is not one of {self.forecast_orders}")
        genes = np.zeros(len(self.forecast_orders) - 1, dtype=bool)
        genes[: self.forecast_orders.index(order)] = True
        return np.concatenate([mask[1:].reshape(-1), genes])

    def with_mask(self, genome: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``genome`` with its mask replaced by ``mask`` (its order genes kept)."""
        return np.concatenate([self.genome(mask)[: self.mask_genes], self._check(genome)[self.mask_genes :]])

    def schedule(self, genome: np.ndarray, **provenance) -> Schedule:
        """The residual-reuse :class:`Schedule` of ``genome``."""
        return Schedule(
            mask=self.mask(genome),
            components=self.layout.components,
            model_class=self.layout.model_class,
            reuse="residual",
            forecast_order=self.forecast_order(genome),
            provenance=provenance,
        )

    def from_schedule(self, schedule: Schedule) -> np.ndarray:
        """The genome of ``schedule`` resampled to :attr:`num_steps`: its mask, and its forecast order where it is
        one of :attr:`forecast_orders` (else the first). Its reuse mode is not kept."""
        schedule.check_layout(self.layout)
        order = schedule.forecast_order if schedule.forecast_order in self.forecast_orders else None
        return self.genome(schedule.resample(self.num_steps).mask, order)
