"""Score methods for quality vs speed and write a report."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from accel.eval.config import EvalConfig, add_config_arguments, config_from_args, read_prompts
from accel.eval.methods import usage

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``accel eval``: one per :class:`~accel.eval.config.EvalConfig` field, plus files and output."""
    parser.add_argument("--prompts", dest="prompts_file", help="prompts: a text file (one per line) or a JSON list")
    parser.add_argument("--config", dest="config_file", help="EvalConfig JSON; flags given override it")
    parser.add_argument("--out", default="report", help="output folder (an interrupted run there resumes)")
    parser.add_argument("--list-methods", action="store_true", help="print the method grammar and exit")
    add_config_arguments(parser, EvalConfig)
    parser.epilog = "methods:\n" + usage()


def config_of(args: argparse.Namespace, defaults: dict | None = None) -> EvalConfig:
    """The :class:`EvalConfig` the flags describe, over ``defaults`` (EvalConfig values, e.g. those of
    ``accel demo --video``) and a ``--config`` file (which overrides the defaults)."""
    base = dict(defaults or {})
    if args.config_file:
        path = Path(args.config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = json.loads(path.read_text())
        except ValueError as error:
            raise ValueError(f"--config {path} is not valid JSON ({error}); fix it or leave it out") from None
        if not isinstance(loaded, dict):
            raise ValueError(
                f"--config {path} must hold a JSON object of EvalConfig fields, got {type(loaded).__name__}"
            )
        base.update(loaded)
    if args.prompts_file:
        path = Path(args.prompts_file)
        base["prompts"] = list(read_prompts(path))
        base["prompts_source"] = str(path)
    return config_from_args(args, base)


def summarize(results: dict) -> str:
    """The summary table and the Pareto fronts, as text."""
    from accel.eval.report import fronts, noise_lines, summary_rows, text_table

    lines = [text_table(*summary_rows(results)), ""]
    lines += [f"Pareto front, speedup vs {name}: {' -> '.join(front)}" for name, front in fronts(results).items()]
    lines += [f"run-to-run {line}" for line in noise_lines(results)]
    unsupported = [t for t in results["trials"] if t.get("status") != "ok"]
    lines += [f"unsupported {t['method']}: {t['reason']}" for t in unsupported]
    return "\n".join(lines)


def run(args: argparse.Namespace, defaults: dict | None = None) -> int:
    """Evaluate, write ``results.json``, ``report.md`` and ``report.html``, print the summary (``defaults``: see
    :func:`config_of`)."""
    if args.list_methods:
        print(usage())
        return 0
    from accel.eval.harness import run_evaluation
    from accel.eval.runtime import report_interrupted
    from accel.eval.trials import saved_progress

    try:
        results = run_evaluation(config_of(args, defaults), args.out)
    except KeyboardInterrupt:
        return report_interrupted(saved_progress(Path(args.out)))
    if results is not None:
        print(summarize(results))
        print(f"\nreport: {Path(args.out) / 'report.html'} (data: {Path(args.out) / 'results.json'})")
    return 0
