"""Search a sparse-attention plan (one pattern per layer and head) for a video pipeline.

``accel search --technique sparse --model bundled-video --target-density 0.4 --out plan.json`` profiles the
calibration prompts, fits the kernel cost model on this machine, solves for a plan and checks it against dense
(:func:`accel.sparse.search`); the plan, with its measured figures, is saved as versioned JSON for
``accel.sparse.SparseAttentionConfig(plan=Plan.load(...))``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from accel.flags import json_object

logger = logging.getLogger(__name__)

#: calibration prompts when no --prompts file is given: training captions of the bundled video model
DEFAULT_PROMPTS = ("red apple sliding to the right", "yellow star bouncing")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``accel search --technique sparse``."""
    parser.add_argument("--model", default="bundled-video", help="pipeline folder, hub id or bundled-video")
    parser.add_argument("--prompts", help="calibration prompts: a text file (one per line) or a JSON list")
    parser.add_argument("--out", required=True, help="the plan's JSON file")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-density", type=float, help="mean attention density to meet (0..1]")
    goal.add_argument("--min-psnr", type=float, help="predicted PSNR against dense to keep (dB)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the calibration runs")
    parser.add_argument("--rows", type=int, default=64, help="query rows sampled per attention call")
    parser.add_argument(
        "--dense-steps", type=int, default=0, help="first steps run dense (the target density is then averaged)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="sample i is generated with seed + i (the sampled query rows too)"
    )
    parser.add_argument(
        "--pipeline-kwargs", type=json_object, default={}, help="extra pipeline call arguments, as JSON"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the run (CPU); omitted: torch's default")


def run(args: argparse.Namespace) -> int:
    """Run the search and save the plan; returns 0."""
    import torch

    from accel.eval.generation import pipeline_defaults
    from accel.pipelines.loading import is_bundled, load_pipeline
    from accel.sparse.offline import search
    from accel.textconfig import read_prompts

    if args.target_density is not None and not 0 < args.target_density <= 1:
        raise ValueError(f"--target-density must be in (0, 1], got {args.target_density}")
    if not 0 <= args.dense_steps < args.steps:
        raise ValueError(f"--dense-steps must be in 0..{args.steps - 1} (below --steps), got {args.dense_steps}")
    out = Path(args.out)
    if out.suffix != ".json":
        raise ValueError(f"--out names the plan's JSON file, e.g. plan.json; got {out}")
    prompts = read_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    kwargs, guidance = pipeline_defaults(pipe, is_bundled(args.model), args.pipeline_kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "output_type"}
    plan = search(
        pipe,
        prompts,
        target_density=args.target_density,
        min_psnr=args.min_psnr,
        steps=args.steps,
        rows=args.rows,
        seed=args.seed,
        call_kwargs={**kwargs, "guidance_scale": guidance},
        dense_steps=args.dense_steps,
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
