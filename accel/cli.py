"""The ``accel`` command: subcommands contributed by the technique packages.

Each subcommand lives in a module exposing ``add_arguments(parser)`` and ``run(args) -> int`` and a module
docstring whose first line is the subcommand's help; a command several techniques share (``search``) has a
module whose ``select(argv)`` names the technique's own module. Modules are imported only when their subcommand runs, so
``accel --help`` stays fast and optional dependencies stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand -> module implementing it
COMMANDS = {
    "info": "accel.commands.info",
    "schedule": "accel.commands.schedule",
    "generate": "accel.eval.commands.generate",
    "eval": "accel.eval.commands.evaluate",
    "demo": "accel.eval.commands.demo",
    "search": "accel.commands.search",
}

#: one-line help per subcommand, shown without importing the module
HELP = {
    "info": "list supported models and what accel knows about one",
    "schedule": "write a heuristic caching schedule (FORA, Delta-DiT, T-GATE, compute-all) as JSON",
    "generate": "generate images or video clips with any method (full, fora-2, a schedule JSON, ...)",
    "eval": "score methods for quality vs speed and write a report",
    "demo": "evaluate the headline methods on the bundled default model in a few minutes (--video: the video model)",
    "search": "search caching schedules (a quality-vs-speed front) or, --technique sparse, a sparse attention plan",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers-accel")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per available subcommand."""
    parser = argparse.ArgumentParser(prog="accel", description="Accelerate diffusers pipelines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"diffusers-accel {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in HELP.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def subcommand(command: str, rest: list[str]) -> tuple[object, argparse.ArgumentParser, list[str]]:
    """The module that runs ``accel COMMAND``, its argument parser, and ``rest`` without the flags that picked the
    module (``--technique``). ``subcommand(c, rest)[1].parse_args(...)`` checks a command line without running it.

    Raises:
        ValueError: an unknown technique for a shared command.
        ModuleNotFoundError: the command's module (an optional part) is not installed.
    """
    module = importlib.import_module(COMMANDS[command])
    if hasattr(module, "select"):  # a command shared by techniques: the technique's own module runs it
        name, rest = module.select(rest)
        module = importlib.import_module(name)
    from accel.flags import HelpFormatter

    parser = argparse.ArgumentParser(prog=f"accel {command}", description=HELP[command], formatter_class=HelpFormatter)
    module.add_arguments(parser)
    return module, parser, rest


def main(argv: list[str] | None = None) -> int:
    """Run ``accel COMMAND ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if known.verbose else logging.INFO, format="%(message)s")
    if known.command is None:
        parser.print_help()
        return 2
    try:
        module, sub, rest = subcommand(known.command, rest)
    except ValueError as error:
        print(f"accel {known.command}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        print(f"accel {known.command} is not available in this installation: {error}", file=sys.stderr)
        return 2
    args = sub.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"accel {known.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
