"""Write a caching schedule as JSON: a heuristic (FORA, Delta-DiT, T-GATE, compute-all) for a model, or one of
ECAD's published schedules imported (``accel schedule import FILE --out OUT``)."""

from __future__ import annotations

import argparse
import logging

from accel.caching import compute_all, delta_dit, fora, tgate

logger = logging.getLogger(__name__)

GENERATORS = {
    "fora": lambda layout, a: fora(layout, a.steps, a.interval, reuse=a.reuse, forecast_order=a.forecast_order),
    "delta-dit": lambda layout, a: delta_dit(layout, a.steps, a.interval, reuse=a.reuse),
    "tgate": lambda layout, a: tgate(layout, a.steps, a.gate_step),
    "compute-all": lambda layout, a: compute_all(layout, a.steps),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``accel schedule``."""
    parser.add_argument("generator", choices=[*sorted(GENERATORS), "import"], help="what to write; import: FILE")
    parser.add_argument("file", nargs="?", help="import: an ECAD schedule JSON file (PixArt-alpha / PixArt-Sigma)")
    parser.add_argument(
        "--model",
        help="pipeline folder or hub id whose layout the schedule must fit (only its transformer/config.json is "
        "read); default: the bundled model",
    )
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--interval", type=int, default=2, help="FORA / Delta-DiT interval")
    parser.add_argument("--gate-step", type=int, default=None, help="T-GATE: first step with frozen cross-attention")
    parser.add_argument(
        "--reuse",
        choices=["output", "residual"],
        default="residual",
        help="output: a skipped component's cached output is used inside a running block; residual: also skip a "
        "block whose components are all reused, adding its cached residual (block output minus input)",
    )
    parser.add_argument(
        "--forecast-order",
        type=int,
        default=0,
        help="0: reuse the cached value as is; k >= 1: extrapolate it from the last k + 1 computed steps",
    )
    parser.add_argument("--out", required=True, help="JSON file to write")


def run(args: argparse.Namespace) -> int:
    """Build (or import) the schedule, check it fits the model's layout, and save it."""
    from accel.caching import Schedule, layout_of
    from accel.pipelines.loading import load_transformer_skeleton

    if (args.generator == "import") != (args.file is not None):
        raise ValueError("give FILE with `accel schedule import FILE`, and only then")
    layout = layout_of(load_transformer_skeleton(args.model))
    if args.generator == "import":
        schedule = Schedule.from_ecad(args.file)
        schedule.check_layout(layout)
    else:
        schedule = GENERATORS[args.generator](layout, args)
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
