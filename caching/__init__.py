"""Feature caching: schedules of what to recompute or reuse at each step, and the engine that runs them.

Typical use::

    import accel
    layout = accel.caching.layout_of(pipe)
    handle = accel.apply(pipe, accel.caching.CacheConfig(schedule=accel.caching.fora(layout, steps=20)))
"""

from accel.caching import engine as _engine  # noqa: F401  (registers CacheConfig with accel.apply)
from accel.caching import tokens as _tokens  # noqa: F401  (registers TokenStepConfig with accel.apply)
from accel.caching.config import CacheConfig, load_policy
from accel.caching.engine import CacheHandle
from accel.caching.heuristics import compute_all, delta_dit, fora, taylorseer, tgate
from accel.caching.policy import FirstBlockPolicy
from accel.caching.schedule import Schedule, ScheduleLayout, layout_of
from accel.caching.search.front import Front, load_front
from accel.caching.state import FeatureCache
from accel.caching.stats import CacheStats
from accel.caching.tokens import TokenStepConfig, TokenStepHandle, TokenStepStats, ras_config

__all__ = [
    "CacheConfig",
    "CacheHandle",
    "CacheStats",
    "FeatureCache",
    "FirstBlockPolicy",
    "Front",
    "Schedule",
    "TokenStepConfig",
    "TokenStepHandle",
    "TokenStepStats",
    "ScheduleLayout",
    "compute_all",
    "delta_dit",
    "fora",
    "layout_of",
    "load_front",
    "load_policy",
    "ras_config",
    "taylorseer",
    "tgate",
]
