"""Plans: a technique's decisions as data, over steps x blocks x components, with room for per-head and
per-token channels.

A :class:`Plan` holds named channels, each an array over named axes:

* ``("step", "block", "component")``: a caching schedule's compute mask;
* ``("block", "head")``: a sparse-attention pattern per layer and head;
* ``("step", "token")`` or ``("block", "token")``: per-token step budgets or activity;
* ``("step", "block", "component", "channel")``: per-channel correction coefficients of quantized features;

plus the sizes of those axes, the model it was made for, free-form ``settings`` (a channel's meaning, pattern
parameters), ``provenance`` and measured ``metrics``. It saves as versioned JSON through the one allow-listed
loader (:mod:`accel.serialization`); channels with many values go to a safetensors file beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from accel.serialization import json_type, load, write_json

PLAN_TYPE = "accel.Plan"
PLAN_VERSION = 1

#: axes a channel may run over
AXES = ("step", "block", "component", "head", "token", "channel")

#: channels with more values than this are stored in a safetensors file beside the JSON
INLINE_LIMIT = 4096

_DTYPES = {"bool": np.bool_, "int64": np.int64, "float32": np.float32}


@dataclass(frozen=True)
class Channel:
    """One named array of a plan.

    Attributes:
        axes: the axis names, in order, from :data:`AXES`.
        values: the array (bool, int64 or float32), one dimension per axis.
    """

    axes: tuple[str, ...]
    values: np.ndarray

    def __post_init__(self):
        unknown = [axis for axis in self.axes if axis not in AXES]
        if unknown or len(set(self.axes)) != len(self.axes):
            raise ValueError(f"channel axes must be distinct names from {AXES}, got {self.axes}")
        values = np.asarray(self.values)
        kind = {"b": "bool", "i": "int64", "u": "int64", "f": "float32"}.get(values.dtype.kind)
        if kind is None:
            raise ValueError(f"channel values must be bool, integer or float, got {values.dtype}")
        if values.ndim != len(self.axes):
            raise ValueError(f"channel over {self.axes} needs {len(self.axes)} dimensions, got shape {values.shape}")
        object.__setattr__(self, "values", values.astype(_DTYPES[kind]))

    @property
    def dtype_name(self) -> str:
        """``"bool"``, ``"int64"`` or ``"float32"``."""
        return next(name for name, dtype in _DTYPES.items() if self.values.dtype == dtype)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Decisions of one or more techniques as named arrays; see the module docstring.

    Attributes:
        sizes: the length of every axis the channels use, e.g. ``{"step": 20, "block": 28, "component": 3}``.
        channels: ``{name: Channel}``.
        components: the component names, in the order of the ``component`` axis (when it is used).
        model_class: the transformer class it was made for, or None.
        settings: what the channels mean beyond their values (JSON-ready).
        provenance: how it was made (JSON-ready).
        metrics: what was measured with it (JSON-ready).
    """

    sizes: dict[str, int]
    channels: dict[str, Channel] = field(default_factory=dict)
    components: tuple[str, ...] = ()
    model_class: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for axis, size in self.sizes.items():
            if axis not in AXES or not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"sizes must map axis names from {AXES} to positive integers, got {self.sizes}")
        if "component" in self.sizes and len(self.components) != self.sizes["component"]:
            raise ValueError(f"{self.sizes['component']} components sized, {len(self.components)} named")
        for name, channel in self.channels.items():
            if not isinstance(channel, Channel):
                raise TypeError(f"channel {name!r} must be a Channel, got {type(channel).__name__}")
            expected = tuple(self.sizes.get(axis, -1) for axis in channel.axes)
            if channel.values.shape != expected:
                raise ValueError(f"channel {name!r} over {channel.axes} has shape {channel.values.shape}, "
                                 f"the plan's sizes give {expected}")  # fmt: skip

    def channel(self, name: str) -> np.ndarray:
        """The values of channel ``name``; ``KeyError`` naming the channels there are."""
        if name not in self.channels:
            raise KeyError(f"plan has no channel {name!r}; it has {sorted(self.channels)}")
        return self.channels[name].values

    def with_channel(self, name: str, axes: tuple[str, ...], values: Any, **sizes: int) -> Plan:
        """A copy with channel ``name`` set (new axes sized by ``sizes``)."""
        return replace(self, sizes={**self.sizes, **sizes}, channels={**self.channels, name: Channel(axes, values)})

    def to_dict(self, sidecar: dict[str, np.ndarray] | None = None) -> dict:
        """Versioned JSON-ready form. With ``sidecar`` given, channels over :data:`INLINE_LIMIT` values go
        into it (by channel name) and are marked ``"stored": "safetensors"``."""
        channels = {}
        for name, channel in self.channels.items():
            entry: dict[str, Any] = {"axes": list(channel.axes), "dtype": channel.dtype_name}
            if sidecar is not None and channel.values.size > INLINE_LIMIT:
                sidecar[name] = channel.values
                entry["stored"] = "safetensors"
            else:
                entry["values"] = channel.values.tolist()
            channels[name] = entry
        return {
            "type": PLAN_TYPE,
            "version": PLAN_VERSION,
            "model_class": self.model_class,
            "sizes": dict(self.sizes),
            "components": list(self.components),
            "channels": channels,
            "settings": self.settings,
            "provenance": self.provenance,
            "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, data: dict, sidecar: dict[str, np.ndarray] | None = None) -> Plan:
        """Parse :meth:`to_dict` output (``sidecar`` holds the channels stored beside it)."""
        channels = {}
        for name, entry in data.get("channels", {}).items():
            dtype = _DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise ValueError(f"channel {name!r}: dtype must be one of {sorted(_DTYPES)}")
            if entry.get("stored") == "safetensors":
                if sidecar is None or name not in sidecar:
                    raise ValueError(f"channel {name!r} is stored in a safetensors file that was not found")
                values = np.asarray(sidecar[name])
            else:
                values = np.asarray(entry["values"])
            channels[name] = Channel(tuple(entry["axes"]), values.astype(dtype))
        return cls(
            sizes={str(k): v for k, v in data["sizes"].items()},
            channels=channels,
            components=tuple(data.get("components", ())),
            model_class=data.get("model_class"),
            settings=dict(data.get("settings", {})),
            provenance=dict(data.get("provenance", {})),
            metrics=dict(data.get("metrics", {})),
        )

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (JSON) and, for large channels, ``path`` with suffix ``.safetensors`` beside it."""
        from safetensors.numpy import save_file

        path = Path(path)
        sidecar: dict[str, np.ndarray] = {}
        data = self.to_dict(sidecar)
        if sidecar:
            save_file({k: np.ascontiguousarray(v) for k, v in sidecar.items()}, str(path.with_suffix(".safetensors")))
        return write_json(data, path)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan written by :meth:`save` (through the allow-listed loader)."""
        path = Path(path)
        tensors = path.with_suffix(".safetensors")
        sidecar = None
        if tensors.exists():
            from safetensors.numpy import load_file

            sidecar = load_file(str(tensors))
        return load(path, expected=Plan, sidecar=sidecar)


json_type(PLAN_TYPE, PLAN_VERSION)(Plan)
