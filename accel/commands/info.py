"""List supported models and what accel knows about one."""

from __future__ import annotations

import argparse

from accel.adapters import spec_for, supported_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``accel info``."""
    parser.add_argument(
        "--model",
        help="pipeline folder or hub id (only its transformer/config.json is read); default: the bundled model",
    )
    parser.add_argument("--list", action="store_true", help="only list the supported transformer classes")


def run(args: argparse.Namespace) -> int:
    """Print the supported classes, then the blocks and components of the chosen model's transformer, built from its
    config alone (no weights are read or downloaded)."""
    print("Supported transformer classes:", ", ".join(supported_models()))
    if args.list:
        return 0
    from accel.caching import layout_of
    from accel.pipelines.loading import load_transformer_skeleton

    transformer = load_transformer_skeleton(args.model)
    layout = layout_of(transformer)
    spec = spec_for(transformer)
    print(f"model: {layout.model_class}, {layout.num_blocks} blocks, components {', '.join(layout.components)}")
    for stack in spec.stacks:
        parts = ", ".join(f"{c.name}={c.module}" for c in stack.components)
        print(f"  {stack.path}: {parts}; returns {stack.outputs}")
    return 0
