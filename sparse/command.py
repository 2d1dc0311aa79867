"""Search a sparse-attention plan (one pattern per layer and head) for a video pipeline.

``accel search --technique sparse --model bundled-video --target-density 0.4 --out plan.json`` (or
``--min-psnr`` or ``--target-speedup`` in place of ``--target-density``) profiles the calibration prompts, fits the
kernel cost model on this machine, solves for a plan and checks it against dense
(:func:`accel.sparse.search`); the plan, with its measured figures, is saved as versioned JSON for
``accel.sparse.SparseAttentionConfig(plan=Plan.load(...))``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

from accel.flags import add_config_arguments, config_from_args

logger = logging.getLogger(__name__)

#: calibration prompts when no --prompts file is given: training captions of the bundled video model
DEFAULT_PROMPTS = ("red apple sliding to the right", "yellow star bouncing")


@dataclass(frozen=True, kw_only=True)
class SparseSearchOptions:
    """The settings of ``accel search --technique sparse`` besides its goal (its flags, through :mod:`accel.flags`).

    Attributes:
        model: pipeline folder, hub id or bundled-video.
        steps: denoising steps of the calibration runs.
        rows: query rows sampled per attention call.
        dense_steps: first steps run dense (the target density is then averaged).
        seed: sample i is generated with seed + i (the sampled query rows too).
        pipeline_kwargs: extra pipeline call arguments, as JSON.
        threads: torch.set_num_threads for the run (CPU); omitted: torch's default.
    """

    model: str = "bundled-video"
    steps: int = 20
    rows: int = 64
    dense_steps: int = 0
    seed: int = 0
    pipeline_kwargs: dict = field(default_factory=dict)
    threads: int | None = None

    def __post_init__(self):
        if self.steps < 1 or self.rows < 1:
            raise ValueError(f"steps and rows must be >= 1, got {self.steps} and {self.rows}")
        if not 0 <= self.dense_steps < self.steps:
            raise ValueError(f"--dense-steps must be in 0..{self.steps - 1} (below --steps), got {self.dense_steps}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``accel search --technique sparse``: files, the goal, one per :class:`SparseSearchOptions` field."""
    parser.add_argument("--prompts", help="calibration prompts: a text file (one per line) or a JSON list")
    parser.add_argument("--out", required=True, help="the plan's JSON file")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-density", type=float, help="mean attention density to meet (0..1]")
    goal.add_argument("--min-psnr", type=float, help="predicted PSNR against dense to keep (dB)")
    goal.add_argument(
        "--target-speedup", type=float, help="predicted attention speed-up over dense to meet (> 1; the cost model's)"
    )
    add_config_arguments(parser, SparseSearchOptions)


def run(args: argparse.Namespace) -> int:
    """Run the search and save the plan; returns 0."""
    import torch

    from accel.eval.generation import pipeline_defaults
    from accel.pipelines.loading import is_bundled, load_pipeline
    from accel.sparse.offline import search
    from accel.sparse.search import Goal
    from accel.textconfig import read_prompts

    options = config_from_args(args, SparseSearchOptions)
    try:  # the goal, checked before the model loads
        Goal.of(args.target_density, args.min_psnr, args.target_speedup, options.steps, options.dense_steps)
    except ValueError as error:
        raise ValueError(f"{error} (--target-density, --min-psnr, --target-speedup)") from error
    out = Path(args.out)
    if out.suffix != ".json":
        raise ValueError(f"--out names the plan's JSON file, e.g. plan.json; got {out}")
    prompts = read_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    if options.threads:
        torch.set_num_threads(options.threads)
    pipe = load_pipeline(options.model)
    pipe.set_progress_bar_config(disable=True)
    kwargs, guidance = pipeline_defaults(pipe, is_bundled(options.model), options.pipeline_kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "output_type"}
    plan = search(
        pipe,
        prompts,
        target_density=args.target_density,
        min_psnr=args.min_psnr,
        target_speedup=args.target_speedup,
        steps=options.steps,
        rows=options.rows,
        seed=options.seed,
        call_kwargs={**kwargs, "guidance_scale": guidance},
        dense_steps=options.dense_steps,
    )
    path = plan.save(out)
    metrics = plan.metrics
    logger.info(
        "wrote %s: density %.3f, PSNR %.2f dB / SSIM %.3f against dense, %.1f s",
        path,
        metrics["density"],
        metrics["psnr"],
        metrics["ssim"],
        metrics["search_seconds"],
    )
    return 0
