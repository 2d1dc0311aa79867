"""A Pareto front of schedules on disk: one Schedule JSON per member plus ``front.json``; and picking one.

``front.json``::

    {"type": "accel.caching.search.Front", "version": 1,
     "schedules": ["schedule-00.json", ...],     # fastest last
     "members": [{...Schedule...}, ...],         # the same schedules, what load_front reads (optional)
     "info": {"model": ..., "num_steps": 20, "prompts": [...], "search_minutes": 12.5, ...}}

Each schedule's ``metrics`` hold what was measured: ``relative_macs``, ``ideal_speedup``, ``psnr`` (the
search's quality measure, dB vs full compute), ``latent_psnr``, ``image_psnr`` and, once timed, ``speedup``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from accel.caching.schedule import Schedule
from accel.caching.search.archive import json_default
from accel.serialization import write_json

logger = logging.getLogger(__name__)

FRONT_TYPE = "accel.caching.search.Front"
FRONT_VERSION = 1


def non_dominated(objectives: np.ndarray) -> np.ndarray:
    """bool ``(n,)``: rows of ``objectives`` (``(n, k)``, all minimised) that no other row dominates.

    Of several identical rows only the first is kept.
    """
    objectives = np.asarray(objectives, dtype=np.float64)
    keep = np.ones(len(objectives), dtype=bool)
    for i, row in enumerate(objectives):
        others = np.delete(objectives, i, axis=0)
        dominated = ((others <= row).all(axis=1) & (others < row).any(axis=1)).any()
        duplicate = (objectives[:i] == row).all(axis=1).any()
        keep[i] = not dominated and not duplicate
    return keep


def speedup_of(schedule: Schedule) -> float:
    """The measured wall-clock ``speedup`` if known, else the fitted model's ``predicted_speedup``, else the
    ``ideal_speedup`` from MACs."""
    for key in ("speedup", "predicted_speedup", "ideal_speedup"):
        if key in schedule.metrics:
            return float(schedule.metrics[key])
    raise ValueError("schedule has no speedup, predicted_speedup or ideal_speedup metric; was it measured?")


@dataclass(frozen=True, kw_only=True, eq=False)
class Front:
    """Schedules on a quality-vs-speed front, slowest (best quality) first.

    Attributes:
        schedules: members, each with ``metrics``.
        info: how the front was made (model, steps, prompts, search time, ...).
    """

    schedules: tuple[Schedule, ...]
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        schedules = tuple(sorted(self.schedules, key=speedup_of))
        object.__setattr__(self, "schedules", schedules)
        object.__setattr__(self, "info", dict(self.info))

    def __len__(self) -> int:
        return len(self.schedules)

    def __iter__(self):
        return iter(self.schedules)

    def pick(
        self, target_speedup: float | None = None, *, min_psnr: float | None = None, num_steps: int | None = None
    ) -> Schedule:
        """The best schedule for a speed, or the fastest for a quality.

        Args:
            target_speedup: the best-quality member at least this fast; if none is, the fastest member
                (with a warning).
            min_psnr: instead, the fastest member with ``psnr >= min_psnr``; if none, the best-quality one.
            num_steps: resample the pick to this many steps (see :meth:`Schedule.resample`).
        """
        if (target_speedup is None) == (min_psnr is None):
            raise ValueError("pass exactly one of target_speedup or min_psnr")
        if not self.schedules:
            raise ValueError("the front is empty")
        if target_speedup is not None:
            fast = [s for s in self.schedules if speedup_of(s) >= target_speedup]
            if fast:
                chosen = max(fast, key=lambda s: (s.metrics.get("psnr", 0.0), speedup_of(s)))
            else:
                chosen = self.schedules[-1]
                logger.warning("no schedule reaches %.2fx; the fastest is %.2fx", target_speedup, speedup_of(chosen))
        else:
            good = [s for s in self.schedules if s.metrics.get("psnr", -np.inf) >= min_psnr]
            chosen = good[-1] if good else max(self.schedules, key=lambda s: s.metrics.get("psnr", -np.inf))
        return chosen.resample(num_steps) if num_steps else chosen

    def save(self, directory: str | Path) -> Path:
        """Write ``schedule-NN.json`` files and ``front.json`` into ``directory``; returns front.json's path.

        ``front.json`` holds every member too (``members``), and it alone is what :func:`load_front` reads, so
        switching it (atomically, after the schedule files are written) switches the front whole: an interruption
        at any point leaves the old front or the new one. Schedule files the new front no longer names are removed
        last.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = [f"schedule-{index:02d}.json" for index in range(len(self.schedules))]
        for name, schedule in zip(names, self.schedules):
            schedule.save(directory / name)
        document = {
            "type": FRONT_TYPE,
            "version": FRONT_VERSION,
            "schedules": names,
            "members": [schedule.to_dict() for schedule in self.schedules],
            "info": self.info,
        }
        path = write_json(document, directory / "front.json", default=json_default)
        for old in directory.glob("schedule-*.json"):
            if old.name not in names:
                old.unlink(missing_ok=True)
        return path

    def table(self) -> str:
        """A text table of the members' metrics."""
        lines = [f"{'#':>3}{'speedup':>9}{'MACs':>7}{'PSNR':>8}{'order':>6}  generator"]
        for i, s in enumerate(self.schedules):
            m = s.metrics
            lines.append(
                f"{i:>3}{speedup_of(s):>8.2f}x{100 * m.get('relative_macs', float('nan')):>6.0f}%"
                f"{m.get('psnr', float('nan')):>8.2f}{s.forecast_order:>6}  {s.provenance.get('generator', '?')}"
            )
        return "\n".join(lines)


def load_front(directory: str | Path) -> Front:
    """Read a front written by ``accel search`` (or :meth:`Front.save`) from ``directory``."""
    directory = Path(directory)
    path = directory / "front.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no front.json in {directory}; run `accel search --out {directory}` first") from None
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); run `accel search --out {directory}` again") from None
    if not isinstance(data, dict) or data.get("type") != FRONT_TYPE or data.get("version") != FRONT_VERSION:
        raise ValueError(f"{path} is not a {FRONT_TYPE} version {FRONT_VERSION} file")
    members = data.get("members")
    if members is not None:  # the front as it was saved, whole (schedule files may be mid-rewrite)
        try:
            schedules = tuple(Schedule.from_dict(member) for member in members)
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{path}: a member is not a valid schedule ({error})") from None
        return Front(schedules=schedules, info=data.get("info", {}))
    names = data.get("schedules", [])
    if any(not isinstance(n, str) or "/" in n or "\\" in n or n.startswith(".") for n in names):
        raise ValueError(f"{path}: schedule entries must be plain file names in the same folder")
    return Front(schedules=tuple(Schedule.load(directory / name) for name in names), info=data.get("info", {}))
