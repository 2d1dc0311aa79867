"""Write a caching schedule as JSON: a heuristic (FORA, Delta-DiT, T-GATE, compute-all) for a model, or one of
ECAD's published schedules imported (``accel schedule import FILE --out OUT``)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Literal

from accel.caching import compute_all, delta_dit, fora, tgate
from accel.flags import add_config_arguments, config_from_args

logger = logging.getLogger(__name__)

GENERATORS = {
    "fora": lambda layout, o: fora(layout, o.steps, o.interval, reuse=o.reuse, forecast_order=o.forecast_order),
    "delta-dit": lambda layout, o: delta_dit(layout, o.steps, o.interval, reuse=o.reuse),
    "tgate": lambda layout, o: tgate(layout, o.steps, o.gate_step),
    "compute-all": lambda layout, o: compute_all(layout, o.steps),
}


@dataclass(frozen=True, kw_only=True)
class ScheduleOptions:
    """The settings of ``accel schedule`` (its flags, through :mod:`accel.flags`).

    Attributes:
        model: pipeline folder or hub id whose layout the schedule must fit (only its transformer/config.json is
            read); omitted: the bundled model.
        steps: denoising steps.
        interval: FORA / Delta-DiT interval.
        gate_step: T-GATE: first step with frozen cross-attention; omitted: 40% of the steps.
        reuse: output: a skipped component's cached output is used inside a running block; residual: also skip a
            block whose components are all reused, adding its cached residual (block output minus input).
        forecast_order: 0: reuse the cached value as is; k >= 1: extrapolate it from the last k + 1 computed steps.
    """

    model: str | None = None
    steps: int = 20
    interval: int = 2
    gate_step: int | None = None
    reuse: Literal["output", "residual"] = "residual"
    forecast_order: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``accel schedule``: the generator (or import FILE), one per :class:`ScheduleOptions` field, --out."""
    parser.add_argument("generator", choices=[*sorted(GENERATORS), "import"], help="what to write; import: FILE")
    parser.add_argument("file", nargs="?", help="import: an ECAD schedule JSON file (PixArt-alpha / PixArt-Sigma)")
    add_config_arguments(parser, ScheduleOptions)
    parser.add_argument("--out", required=True, help="JSON file to write")


def run(args: argparse.Namespace) -> int:
    """Build (or import) the schedule, check it fits the model's layout, and save it."""
    from accel.caching import Schedule, layout_of
    from accel.pipelines.loading import load_transformer_skeleton

    if (args.generator == "import") != (args.file is not None):
        raise ValueError("give FILE with `accel schedule import FILE`, and only then")
    options = config_from_args(args, ScheduleOptions)
    layout = layout_of(load_transformer_skeleton(options.model))
    if args.generator == "import":
        schedule = Schedule.from_ecad(args.file)
        schedule.check_layout(layout)
    else:
        schedule = GENERATORS[args.generator](layout, options)
    path = schedule.save(args.out)
    logger.info(
        "wrote %s: %d steps, %.0f%% of components computed, reuse=%s; per step (C computes all, - reuses all, "
        "~ some): %s",
        path,
        schedule.num_steps,
        100 * schedule.compute_fraction,
        schedule.reuse,
        schedule.step_pattern(),
    )
    return 0
