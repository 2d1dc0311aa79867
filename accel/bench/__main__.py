"""Entry point: ``python -m accel.bench NAME [options]``."""

from __future__ import annotations

import importlib
import json
import sys

from accel.bench import BENCHMARKS


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark named by the first argument; print its table and a final JSON line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m accel.bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]])
    try:
        result = module.run(argv[1:])
    except (ValueError, FileNotFoundError) as error:  # e.g. --device cuda without CUDA: one line, no traceback
        print(f"python -m accel.bench {argv[0]}: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
