"""Evaluate the headline methods on the bundled default model in a few minutes (``--video``: the video model)."""

from __future__ import annotations

import argparse

from accel.eval.commands import evaluate
from accel.eval.methods import parse_methods
from accel.pipelines.loading import BUNDLED_STEPS, is_bundled

#: output folder of ``accel demo --video`` unless ``--out`` is given
VIDEO_OUT = "report-video"


def video_defaults() -> dict:
    """The :class:`~accel.eval.config.EvalConfig` values of ``accel demo --video``: the bundled video model, its
    built-in prompts and a few caching methods (20 steps, the default); flags given override them."""
    from accel.eval.config import BUILTIN_VIDEO_PROMPTS, DEFAULT_VIDEO_METHODS
    from accel.pipelines.loading import BUNDLED_VIDEO

    return {
        "model": BUNDLED_VIDEO,
        "prompts": list(BUILTIN_VIDEO_PROMPTS),
        "prompts_source": "built-in video",
        "methods": list(DEFAULT_VIDEO_METHODS),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``accel demo``: those of ``accel eval``, every one optional (defaults: the bundled model, the
    built-in emoji prompts, the headline methods, output in ``report/``), and ``--video``."""
    evaluate.add_arguments(parser)
    parser.add_argument(
        "--video",
        action="store_true",
        help=f"the caching demo on the bundled video model instead: 4 emoji clips of 17 frames, 20 steps, full "
        f"compute and {len(video_defaults()['methods']) - 1} methods, output in {VIDEO_OUT}/ (a few minutes on a CPU)",
    )
    parser.set_defaults(out=None)
    out = parser._option_string_actions["--out"]
    out.help = f"output folder (an interrupted run there resumes) (default: report, with --video {VIDEO_OUT})"


def run(args: argparse.Namespace) -> int:
    """Run the evaluation and print the summary table."""
    args.out = args.out or (VIDEO_OUT if args.video else "report")
    defaults = video_defaults() if args.video else None
    if not args.list_methods:
        config = evaluate.config_of(args, defaults)
        methods = parse_methods(config.methods)
        what = "clips" if args.video else "prompts"
        steps = config.steps or (BUNDLED_STEPS if is_bundled(config.model) else "the pipeline's default")
        print(
            f"accel demo: {len(methods)} methods x {len(config.prompts)} {what}, {steps} steps, "
            f"on {config.model or 'the bundled default model'}; writing {args.out}/"
        )
    return evaluate.run(args, defaults)
