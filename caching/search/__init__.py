"""Schedule search: a Pareto front of caching schedules, quality vs speed, for one model.

* :func:`search`: NSGA-II (pymoo) over compute masks, seeded with FORA / TaylorSeer / Delta-DiT / T-GATE,
  ramps of computes spaced ever wider and the dynamic-programming schedules, checkpointed every generation;
  or the DP schedules alone. ``SearchConfig.forecast_orders`` lets candidates forecast their reused
  residuals (TaylorSeer-style) instead of reusing them as they are; with several orders, the order is a gene.
* :mod:`accel.caching.search.dp`: CacheQuant's and BAC's dynamic programmes, pure functions on change matrices.
* :func:`load_front` / :class:`Front`: the saved front, and ``front.pick(target_speedup=2.5)``.
* :func:`measure_transfer`: how a front searched at one step count does at another.

``accel search`` is the command line (:mod:`accel.caching.search.command`).
"""

from accel.caching.search.config import SearchConfig, parse_duration
from accel.caching.search.dp import bac_mask, bubbling_union, cachequant_mask, optimal_refresh_steps
from accel.caching.search.evaluator import Evaluator, EvaluatorConfig
from accel.caching.search.features import CostModel
from accel.caching.search.front import Front, load_front
from accel.caching.search.genome import Constraints, Encoding, repair
from accel.caching.search.runner import search
from accel.caching.search.seeds import dp_schedules, heuristic_schedules, ramp_schedules
from accel.caching.search.transfer import measure_transfer, remeasure

__all__ = [
    "Constraints",
    "CostModel",
    "Encoding",
    "Evaluator",
    "EvaluatorConfig",
    "Front",
    "SearchConfig",
    "bac_mask",
    "bubbling_union",
    "cachequant_mask",
    "dp_schedules",
    "heuristic_schedules",
    "load_front",
    "measure_transfer",
    "optimal_refresh_steps",
    "ramp_schedules",
    "parse_duration",
    "remeasure",
    "repair",
    "search",
]
