"""Write a heuristic caching schedule (FORA, Delta-DiT, T-GATE, compute-all) as JSON."""

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
    parser.add_argument("generator", choices=sorted(GENERATORS))
    parser.add_argument("--model", help="pipeline folder or hub id; omitted: the bundled default model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=2, help="FORA / Delta-DiT refresh interval")
    parser.add_argument("--gate-step", type=int, default=None, help="T-GATE: first step with frozen cross-attention")
    parser.add_argument("--reuse", choices=["output", "residual"], default="residual")
    parser.add_argument("--forecast-order", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file to write")


def run(args: argparse.Namespace) -> int:
    """Build the schedule for the model's layout and save it."""
    from accel.caching import layout_of
    from accel.pipelines.loading import load_pipeline

    layout = layout_of(load_pipeline(args.model))
    schedule = GENERATORS[args.generator](layout, args)
    path = schedule.save(args.out)
    logger.info(
        "wrote %s: %d steps, %.0f%% of components computed", path, schedule.num_steps, 100 * schedule.compute_fraction
    )
    return 0
