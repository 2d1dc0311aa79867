"""Caching schedules as data: a boolean compute mask over steps x blocks x components.

This is ECAD's genome made explicit. ``mask[step, block, component]`` is True where the component is
recomputed and False where its contribution is reused from the last step that computed it. A schedule is a
frozen value that serialises to versioned JSON::

    {"type": "accel.caching.Schedule", "version": 1, "model_class": "PixArtTransformer2DModel",
     "num_blocks": 28, "components": ["self_attn", "cross_attn", "ffn"], "num_steps": 20,
     "reuse": "residual", "forecast_order": 0,
     "mask": ["111 111 ... 111", "000 000 ... 000", ...],     # one string per step, one group per block
     "provenance": {"generator": "fora", "interval": 2}, "metrics": {"psnr": 31.2}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from accel.adapters import ModelSpec, spec_for
from accel.plan import Channel, Plan
from accel.serialization import json_type, write_json

SCHEDULE_TYPE = "accel.caching.Schedule"


def read_json(path: str | Path, what: str) -> Any:
    """Parse the JSON file ``path``; a missing file or bad JSON raises an error naming ``what`` and the path."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None


SCHEDULE_VERSION = 1

Reuse = Literal["output", "residual"]


@dataclass(frozen=True, kw_only=True)
class ScheduleLayout:
    """The shape a schedule must have for one model.

    Attributes:
        model_class: the transformer's class name.
        num_blocks: blocks over all stacks, in execution order.
        components: component names, the schedule's last axis.
    """

    model_class: str
    num_blocks: int
    components: tuple[str, ...]


def layout_of(pipe_or_transformer: Any, spec: ModelSpec | None = None) -> ScheduleLayout:
    """The :class:`ScheduleLayout` of a pipeline's transformer (or of a transformer)."""
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    model_spec = spec_for(transformer, spec)
    return ScheduleLayout(
        model_class=type(transformer).__name__,
        num_blocks=len(model_spec.block_list(transformer)),
        components=model_spec.component_names,
    )


@json_type(SCHEDULE_TYPE, SCHEDULE_VERSION)
@dataclass(frozen=True, kw_only=True, eq=False)
class Schedule:
    """A static caching schedule; see the module docstring.

    Attributes:
        mask: bool array ``(num_steps, num_blocks, num_components)``; True = compute. A reuse where nothing is
            cached yet (at step 0, say, as some of ECAD's schedules do) computes instead, and the engine says so
            once.
        components: names of the last mask axis, e.g. ``("self_attn", "cross_attn", "ffn")``.
        model_class: class name of the transformer it was made for (checked on apply), or None for any.
        reuse: ``"output"`` reuses each skipped component's output inside a running block;
            ``"residual"`` also skips a block whose components are all reused, adding its cached residual
            (block output minus input) instead.
        forecast_order: 0 reuses the cached value as is; ``k >= 1`` extrapolates it from the last ``k + 1``
            computed steps (first order, or TaylorSeer-style higher orders).
        provenance: how it was made (generator and parameters, search run, ...).
        metrics: measured quality and cost, when known.
    """

    mask: np.ndarray
    components: tuple[str, ...]
    model_class: str | None = None
    reuse: Reuse = "residual"
    forecast_order: int = 0
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        given = np.asarray(self.mask)
        if given.dtype != bool and not (given.dtype.kind in "iuf" and np.isin(given, (0, 1)).all()):
            raise ValueError(f"Schedule mask must hold booleans (or 0 and 1), got {given.dtype} with other values")
        mask = np.array(given, dtype=bool, copy=True)
        if mask.ndim != 3:
            raise ValueError(f"Schedule mask must be (steps, blocks, components), got shape {mask.shape}")
        if mask.shape[0] < 1 or mask.shape[1] < 1:
            raise ValueError(f"Schedule mask needs at least one step and one block, got shape {mask.shape}")
        if mask.shape[2] != len(self.components):
            raise ValueError(f"mask has {mask.shape[2]} components but {len(self.components)} names were given")
        if self.reuse not in ("output", "residual"):
            raise ValueError(f"reuse must be 'output' or 'residual', got {self.reuse!r}")
        if not isinstance(self.forecast_order, int) or not 0 <= self.forecast_order <= 4:
            raise ValueError(f"forecast_order must be an int in 0..4, got {self.forecast_order!r}")
        mask.setflags(write=False)
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "components", tuple(self.components))
        object.__setattr__(self, "provenance", dict(self.provenance))
        object.__setattr__(self, "metrics", dict(self.metrics))

    @property
    def num_steps(self) -> int:
        """Number of denoising steps the mask covers."""
        return self.mask.shape[0]

    @property
    def num_blocks(self) -> int:
        """Number of blocks the mask covers."""
        return self.mask.shape[1]

    @property
    def compute_fraction(self) -> float:
        """Fraction of (step, block, component) entries that are computed."""
        return float(self.mask.mean())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def step_pattern(self) -> str:
        """One character per step: ``C`` computes every component, ``-`` reuses every one, ``~`` some of each."""
        per_step = self.mask.reshape(self.num_steps, -1)
        return "".join("C" if row.all() else "-" if not row.any() else "~" for row in per_step)

    def should_compute(self, step: int, block: int, component: int | str) -> bool:
        """Whether ``component`` of ``block`` is recomputed at ``step`` (steps past the end compute)."""
        if isinstance(component, str):
            component = self.components.index(component)
        if step >= self.num_steps:
            return True
        return bool(self.mask[step, block, component])

    def resample(self, num_steps: int) -> Schedule:
        """The schedule for ``num_steps`` steps, sampled over normalised time ``step / (num_steps - 1)``."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if num_steps == self.num_steps:
            return self
        if num_steps == 1 or self.num_steps == 1:
            source = np.zeros(num_steps, dtype=int)
        else:
            source = np.rint(np.arange(num_steps) * (self.num_steps - 1) / (num_steps - 1)).astype(int)
        mask = self.mask[source].copy()
        mask[0] = True
        provenance = {**self.provenance, "resampled_from_steps": self.num_steps}
        return replace(self, mask=mask, provenance=provenance)

    def check_layout(self, layout: ScheduleLayout) -> None:
        """Raise ``ValueError`` saying what differs if this schedule does not fit ``layout``."""
        problems = []
        if self.model_class is not None and self.model_class != layout.model_class:
            problems.append(f"it was made for {self.model_class}, the model is {layout.model_class}")
        if self.num_blocks != layout.num_blocks:
            problems.append(f"it has {self.num_blocks} blocks, the model has {layout.num_blocks}")
        if self.components != layout.components:
            problems.append(f"its components are {list(self.components)}, the model's are {list(layout.components)}")
        if problems:
            raise ValueError("Schedule does not fit this model: " + "; ".join(problems))

    def with_metrics(self, **metrics: Any) -> Schedule:
        """A copy with ``metrics`` merged in."""
        return replace(self, metrics={**self.metrics, **metrics})

    def to_dict(self) -> dict:
        """The versioned JSON-ready form (see the module docstring)."""
        rows = [" ".join("".join("1" if v else "0" for v in block) for block in step) for step in self.mask]
        return {
            "type": SCHEDULE_TYPE,
            "version": SCHEDULE_VERSION,
            "model_class": self.model_class,
            "num_blocks": self.num_blocks,
            "components": list(self.components),
            "num_steps": self.num_steps,
            "reuse": self.reuse,
            "forecast_order": self.forecast_order,
            "mask": rows,
            "provenance": self.provenance,
            "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        """Parse :meth:`to_dict` output, with a clear ``ValueError`` on anything malformed."""
        if not isinstance(data, dict) or data.get("type") != SCHEDULE_TYPE:
            raise ValueError(f"not a schedule: expected a JSON object with type {SCHEDULE_TYPE!r}")
        if data.get("version") != SCHEDULE_VERSION:
            raise ValueError(
                f"unsupported schedule version {data.get('version')!r}; this build reads {SCHEDULE_VERSION}"
            )
        missing = [k for k in ("components", "num_blocks", "num_steps", "mask") if k not in data]
        if missing:
            raise ValueError(f"schedule is missing {missing}")
        components, rows = data["components"], data["mask"]
        if not isinstance(rows, list) or len(rows) != data["num_steps"]:
            raise ValueError(f"schedule mask must be a list of {data['num_steps']} step strings")
        mask = np.zeros((len(rows), data["num_blocks"], len(components)), dtype=bool)
        for step, row in enumerate(rows):
            blocks = row.split() if isinstance(row, str) else None
            if blocks is None or len(blocks) != data["num_blocks"]:
                raise ValueError(f"schedule mask step {step}: expected {data['num_blocks']} space-separated blocks")
            for block, bits in enumerate(blocks):
                if len(bits) != len(components) or set(bits) - {"0", "1"}:
                    raise ValueError(f"schedule mask step {step} block {block}: expected {len(components)} 0/1 digits")
                mask[step, block] = [bit == "1" for bit in bits]
        return cls(
            mask=mask,
            components=tuple(components),
            model_class=data.get("model_class"),
            reuse=data.get("reuse", "residual"),
            forecast_order=data.get("forecast_order", 0),
            provenance=data.get("provenance", {}),
            metrics=data.get("metrics", {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write the schedule as JSON to ``path`` (atomically); returns the path."""
        return write_json(self.to_dict(), path)

    def to_plan(self) -> Plan:
        """The schedule as a core :class:`~accel.plan.Plan`: channel ``"compute"`` over (step, block, component),
        the reuse semantics and forecast order in its settings."""
        steps, blocks, components = self.mask.shape
        return Plan(
            sizes={"step": steps, "block": blocks, "component": components},
            channels={"compute": Channel(("step", "block", "component"), self.mask)},
            components=self.components,
            model_class=self.model_class,
            settings={"technique": "caching", "reuse": self.reuse, "forecast_order": self.forecast_order},
            provenance=dict(self.provenance),
            metrics=dict(self.metrics),
        )

    @classmethod
    def from_ecad(cls, path: str | Path) -> Schedule:
        """Load one of ECAD's published schedule JSON files (PixArt-α/Σ) with ECAD's meaning: output reuse,
        and a reuse with nothing cached yet computes (see :mod:`accel.caching.ecad`)."""
        from accel.caching.ecad import load_ecad

        return load_ecad(path)

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        """Read a schedule JSON file; malformed files raise ``ValueError`` naming the file."""
        data = read_json(path, "schedule file")
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
