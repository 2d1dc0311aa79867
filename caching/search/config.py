"""The search's config: what to search, within which limits, and how candidates are scored."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from accel.caching.search.evaluator import EvaluatorConfig
from accel.caching.search.genome import Constraints

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr)\s*$")
_UNIT_SECONDS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"30m"``, ``"2h"``, ``"90s"`` (the unit is required: a bare ``"90"`` is refused, since it was
    read as minutes where seconds were as likely meant)."""
    match = _DURATION.match(str(text))
    if not match:
        bare = re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", str(text))
        hint = f"; give a unit: {str(text).strip()}s, {str(text).strip()}m or {str(text).strip()}h" if bare else ""
        raise ValueError(f"cannot read the duration {text!r}{hint or '; write e.g. 30m, 2h or 90s'}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """``accel search``: NSGA-II over compute masks, seeded with heuristics and DP schedules.

    Attributes:
        method: ``"nsga2"`` (evolutionary, seeded) or ``"dp"`` (only the dynamic-programming schedules).
        population: NSGA-II population size.
        generations: stop after this many generations (None: only the budget stops it).
        budget_seconds: wall-clock limit of the search, summed over resumed runs (None: no limit).
        seed: random seed of the search.
        prompts_start: calibration prompts used in the first generations.
        prompts_growth: generations between doublings of the prompt count (0: all prompts from the start).
        mutation_rate: per-gene flip probability (0: 2 / genome length).
        structured_mutation: probability of one extra move on a whole step, block run or component column.
        seed_schedules: start from the heuristics and DP schedules (else random masks only).
        forecast_orders: how a searched schedule may fill a reused component: 0 reuses the cached residual,
            1 extrapolates it linearly from the last two computes (TaylorSeer-style), 2 quadratically. With
            several orders, each schedule's order is a gene of its own (the first order is the seeds' default).
        max_front: at most this many schedules in the saved front (evenly spread in cost).
        time_repeats: time the front against full compute with this many interleaved repeats and store the
            measured ``speedup`` (fastest repeat) in each schedule's metrics; 0 skips timing.
        constraints: what every schedule must satisfy.
        evaluation: how candidates are run and scored.
    """

    method: Literal["nsga2", "dp"] = "nsga2"
    population: int = 24
    generations: int | None = None
    budget_seconds: float | None = None
    seed: int = 0
    prompts_start: int = 2
    prompts_growth: int = 4
    mutation_rate: float = 0.0
    structured_mutation: float = 0.5
    seed_schedules: bool = True
    forecast_orders: tuple[int, ...] = (0, 1)
    max_front: int = 16
    time_repeats: int = 0
    constraints: Constraints = field(default_factory=Constraints)
    evaluation: EvaluatorConfig = field(default_factory=EvaluatorConfig)

    def __post_init__(self):
        if self.method not in ("nsga2", "dp"):
            raise ValueError(f"method must be 'nsga2' or 'dp', got {self.method!r}")
        if self.population < 4:
            raise ValueError(f"population must be >= 4, got {self.population}")
        if self.generations is not None and self.generations < 1:
            raise ValueError(f"generations must be >= 1 or None, got {self.generations}")
        if self.method == "nsga2" and self.generations is None and self.budget_seconds is None:
            raise ValueError("give a generation count or a time budget, or the search never stops")
        if self.budget_seconds is not None and self.budget_seconds <= 0:
            raise ValueError(f"budget_seconds must be > 0, got {self.budget_seconds}")
        if self.prompts_start < 1 or self.prompts_growth < 0:
            raise ValueError("prompts_start must be >= 1 and prompts_growth >= 0")
        if not 0.0 <= self.mutation_rate <= 1.0 or not 0.0 <= self.structured_mutation <= 1.0:
            raise ValueError("mutation_rate and structured_mutation are probabilities in [0, 1]")
        if self.time_repeats < 0:
            raise ValueError(f"time_repeats must be >= 0, got {self.time_repeats}")
        orders = self.forecast_orders
        if not isinstance(orders, tuple) or not orders or any(o not in (0, 1, 2) for o in orders):
            raise ValueError(f"forecast_orders must be a non-empty tuple of orders 0, 1 or 2, got {orders!r}")
        if len(set(orders)) != len(orders):
            raise ValueError(f"forecast_orders repeats an order: {orders!r}")
        if self.max_front < 1:
            raise ValueError(f"max_front must be >= 1, got {self.max_front}")

    def prompts_at(self, generation: int, total: int) -> int:
        """Calibration prompts used to score generation ``generation`` (0 = the initial population)."""
        if self.prompts_growth == 0:
            return total
        return min(total, self.prompts_start * 2 ** (generation // self.prompts_growth))

    def fingerprint(self) -> dict:
        """The settings a resumed search must share with the checkpoint (limits and front size may change)."""
        data = asdict(self)
        for key in ("generations", "budget_seconds", "max_front", "time_repeats"):
            data.pop(key)
        return data
