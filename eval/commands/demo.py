"""Evaluate the headline methods on the bundled default model in a few minutes."""

from __future__ import annotations

import argparse

from accel.eval.commands import evaluate
from accel.eval.methods import parse_methods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``accel demo``: those of ``accel eval``, every one optional (defaults: the bundled model, the
    built-in emoji prompts, the headline methods, output in ``report/``)."""
    evaluate.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run the evaluation and print the summary table."""
    if not args.list_methods:
        config = evaluate.config_of(args)
        methods = parse_methods(config.methods)
        print(
            f"accel demo: {len(methods)} methods x {len(config.prompts)} prompts, {config.steps} steps, "
            f"on {config.model or 'the bundled default model'}; writing {args.out}/"
        )
    return evaluate.run(args)
