"""The caching technique's config: what to reuse when, and how to store it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from accel.caching.policy import FirstBlockPolicy
from accel.caching.schedule import Schedule
from accel.serialization import from_dict, json_type

CONFIG_TYPE = "accel.caching.CacheConfig"
CONFIG_VERSION = 1

CachePolicy = Schedule | FirstBlockPolicy

_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@json_type(CONFIG_TYPE, CONFIG_VERSION)
@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Feature caching, applied with ``accel.apply(pipe, CacheConfig(...))``.

    Attributes:
        schedule: a static :class:`~accel.caching.Schedule` (a compute mask, e.g. from
            :func:`accel.caching.fora` or ``accel search``) or a dynamic
            :class:`~accel.caching.FirstBlockPolicy`.
        cache_dtype: store cached features in this dtype to bound memory (``torch.float16`` or
            ``torch.bfloat16`` halve it); None keeps the model's dtype.
        count_macs: measure each block's and component's multiply-accumulates once per input shape (with
            ``torch.utils.flop_counter``) so that :class:`CacheStats` reports MACs saved.
    """

    schedule: CachePolicy
    cache_dtype: torch.dtype | None = None
    count_macs: bool = True

    def __post_init__(self):
        if not isinstance(self.schedule, (Schedule, FirstBlockPolicy)):
            raise TypeError(
                "CacheConfig.schedule must be a Schedule (e.g. accel.caching.fora(...) or Schedule.load(path)) "
                f"or a FirstBlockPolicy, got {type(self.schedule).__name__}"
            )
        if not isinstance(self.count_macs, bool):
            raise TypeError(f"count_macs must be true or false, got {self.count_macs!r}")
        if self.cache_dtype is not None and self.cache_dtype not in _CACHE_DTYPES.values():
            raise ValueError(f"cache_dtype must be one of {list(_CACHE_DTYPES)} or None, got {self.cache_dtype}")

    def to_dict(self) -> dict:
        """Versioned JSON-ready form."""
        dtype = next((name for name, value in _CACHE_DTYPES.items() if value == self.cache_dtype), None)
        return {
            "type": CONFIG_TYPE,
            "version": CONFIG_VERSION,
            "schedule": self.schedule.to_dict(),
            "cache_dtype": dtype,
            "count_macs": self.count_macs,
        }

    @classmethod
    def from_dict(cls, data: dict) -> CacheConfig:
        """Parse :meth:`to_dict` output; the schedule's ``type`` must be on the allow-list."""
        if data.get("type") != CONFIG_TYPE or data.get("version") != CONFIG_VERSION:
            raise ValueError(f"not a {CONFIG_TYPE} version {CONFIG_VERSION} object")
        dtype_name = data.get("cache_dtype")
        if dtype_name is not None and dtype_name not in _CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {list(_CACHE_DTYPES)}, got {dtype_name!r}")
        return cls(
            schedule=load_policy(data.get("schedule", {})),
            cache_dtype=_CACHE_DTYPES.get(dtype_name) if dtype_name else None,
            count_macs=data.get("count_macs", True),
        )


def load_policy(data: dict) -> CachePolicy:
    """A schedule or policy from its JSON form, dispatching on ``type`` over an allow-list."""
    return from_dict(data, expected=(Schedule, FirstBlockPolicy), source="caching policy")
