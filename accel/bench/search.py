"""``python -m accel.bench search``: a searched front vs every heuristic baseline and diffusers' caches.

On the bundled default model (or ``--model``), runs ``accel search`` into ``--front`` (or reuses the front an
earlier search saved there), then measures, in one run, on ``--images`` held-out prompts (the captions of the
emoji set's test split for the bundled model, each with its own seed), for full compute, every baseline and
every front schedule:

* the wall-clock speedup over full compute (``--batch`` prompts per call, interleaved repeats after a warm-up,
  fastest of each: the least disturbed on a shared machine; the median ratio is reported too);
* PSNR of the decoded images vs full compute with the same seeds;
* FID (EfficientNet-Lite0 features, :mod:`accel.eval.fid`) against a reference set: the whole emoji set for the
  bundled model, else full compute with other seeds; and the prompt-image score (open-clip CLIP score where its
  weights are on disk, else the bundled alignment scorer).

Run-to-run noise is measured, not assumed: full compute is run with ``--seed-sets`` different seed sets and the
noise of FID (and of the prompt score) is the spread (max - min) of their values. Then

* a front schedule *dominates* a baseline when it is at least as fast (measured), has higher PSNR, and its FID
  and prompt score are no worse than the baseline's beyond the noise;
* ``best_speedup_within_noise`` is the largest measured speedup of a front schedule whose FID and prompt score
  are within the noise of full compute's (worse by at most the noise; better is within).

Each method's row also carries the standard error of its mean prompt score's difference from full compute's
over the prompts (same prompts and seeds, so paired): how much of a gap the choice of prompts alone explains.

The baselines: FORA-2/3/4, TaylorSeer-2/3/4, Delta-DiT (2, 3), T-GATE, accel's first-block cache, and diffusers'
FirstBlockCache, TaylorSeer, Pyramid Attention Broadcast, FasterCache and MagCache (ratios calibrated on the
search's calibration prompts with :func:`accel.eval.diffusers_cache.calibrate_mag_ratios`).

This module is the driver (flags, data, table); the measuring is :mod:`accel.eval.comparison` and the rules
are :mod:`accel.eval.noise`, the same PSNR, timer and noise model as ``accel eval``'s.
"""

from __future__ import annotations

import argparse
import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import accel
from accel.caching.config import CacheConfig
from accel.caching.search.command import DEFAULT_PROMPTS, model_defaults, read_prompts
from accel.caching.search.config import SearchConfig, parse_duration
from accel.caching.search.evaluator import Evaluator, EvaluatorConfig
from accel.caching.search.front import load_front, speedup_of
from accel.caching.search.runner import search
from accel.caching.search.seeds import heuristic_schedules
from accel.caching.search.transfer import measure_transfer, transfer_table
from accel.eval.comparison import dynamic_method_contexts, measure_methods, score_methods
from accel.eval.config import add_runtime_arguments, runtime_from_args
from accel.eval.noise import dominates, why_not_dominated, within_noise

logger = logging.getLogger(__name__)

#: held-out prompts for a ``--model`` without ``--eval-prompts`` (the bundled model uses its test captions)
EVAL_PROMPTS = (
    "a yellow star above a small house",
    "a red car next to a green tree",
    "a smiling sun over blue water",
    "an apple and a cat",
    "a dog under the moon",
    "a blue house with a red door",
    "two trees in the snow",
    "a face in the clouds",
)
#: accel's dynamic baseline and diffusers' caches, as evaluation-harness method names
DYNAMIC_METHODS = (
    "fbc-0.08",
    "diffusers-fbc-0.08",
    "diffusers-taylorseer",
    "diffusers-pab",
    "diffusers-fastercache",
    "diffusers-magcache",
)
#: first seed of each full-compute seed set (the first is the one every method shares)
SEED_SETS = (1000, 2000, 3000, 4000, 5000)
#: seed of the generated FID reference set (models without a data set)
REFERENCE_SEED = 10_000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m accel.bench search")
    parser.add_argument("--model", help="pipeline folder or hub id; omitted: the bundled default model")
    parser.add_argument("--front", default="runs/bench-search", help="front folder: reused if it holds front.json")
    parser.add_argument("--budget", type=parse_duration, default=parse_duration("10m"), help="search time if new")
    parser.add_argument("--population", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, help="default: the bundled model's, else 4.5")
    parser.add_argument("--images", type=int, default=128, help="held-out prompts (one image each) per method")
    parser.add_argument("--eval-prompts", help="held-out prompts file (one per line)")
    parser.add_argument("--seed-sets", type=int, default=3, help="full-compute seed sets for the noise (2..5)")
    parser.add_argument("--batch", type=int, default=4, help="prompts per pipeline call, scored and timed alike")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (ratios are steadier with 1)")
    parser.add_argument("--psnr-threshold", type=float, default=30.0, help="the criterion when FID is off")
    parser.add_argument("--no-fid", action="store_true", help="skip FID and the prompt score")
    parser.add_argument("--max-sequence-length", type=int)
    parser.add_argument(
        "--transfer-steps", default="", help="also score the front resampled to these step counts, e.g. 10,30"
    )
    add_runtime_arguments(parser)
    return parser


def prompts_and_reference(args) -> tuple[list[str], torch.Tensor | None]:
    """Held-out prompts (``--images`` of them) and the FID reference images (None: generate one)."""
    if args.eval_prompts:
        pool, reference = read_prompts(args.eval_prompts), None
    elif args.model is None:
        from accel.bench.model import load_dataset

        images, captions, split = load_dataset()
        pool, reference = [captions[i] for i in np.flatnonzero(split == "test")], images
    else:
        pool, reference = list(EVAL_PROMPTS), None
    return [pool[i % len(pool)] for i in range(args.images)], reference


def _front(args, pipe, call_kwargs: dict, guidance: float):
    """The front saved in ``--front``, searched now (and saved there) if there is none; and whether reused."""
    folder = Path(args.front)
    reused = (folder / "front.json").is_file()
    if not reused:
        config = SearchConfig(
            population=args.population,
            budget_seconds=args.budget,
            evaluation=EvaluatorConfig(num_steps=args.steps, guidance_scale=guidance),
        )
        search(pipe, list(DEFAULT_PROMPTS), config, folder, call_kwargs=call_kwargs, info={"model": args.model})
    return load_front(folder), reused


def _transfer(front, scorer, prompts: list[str], args) -> dict:
    """PSNR of the front resampled to each of ``--transfer-steps`` (on ``2 * --batch`` prompts)."""
    transfer = {}
    for count in [int(part) for part in args.transfer_steps.split(",") if part.strip()]:
        target = scorer(count, SEED_SETS[0], prompts[: 2 * args.batch])
        measured = measure_transfer(target, front, images=True)
        print(f"front searched at {front.info.get('num_steps')} steps, resampled to {count}:")
        print(transfer_table(measured))
        transfer[str(count)] = [_round({k: r[k] for k in ("relative_macs", "psnr", "image_psnr")}) for r in measured]
    return transfer


def run(argv: list[str]) -> dict:
    """Search (or reuse), measure, print the table; return the headline numbers."""
    args = _parser().parse_args(argv)
    if not 2 <= args.seed_sets <= len(SEED_SETS):
        raise SystemExit(f"--seed-sets must be in 2..{len(SEED_SETS)}, got {args.seed_sets}")
    runtime = runtime_from_args(args)
    runtime.check()
    torch.set_num_threads(args.threads)
    pipe = runtime.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs, evaluation_defaults = model_defaults(args.model)
    if args.max_sequence_length is not None:
        call_kwargs["max_sequence_length"] = args.max_sequence_length
    guidance = args.guidance_scale or evaluation_defaults.get("guidance_scale", EvaluatorConfig().guidance_scale)
    front, reused = _front(args, pipe, call_kwargs, guidance)
    steps = args.steps
    prompts, reference = prompts_and_reference(args)

    def scorer(num_steps: int, seed: int, prompt_list: list[str] = prompts) -> Evaluator:
        config = EvaluatorConfig(num_steps=num_steps, seed=seed, guidance_scale=guidance, sketch_size=16)
        return Evaluator(pipe, prompt_list, config, call_kwargs)

    evaluator = scorer(steps, SEED_SETS[0])
    baselines = heuristic_schedules(evaluator.layout, steps)
    dynamic = dynamic_method_contexts(pipe, steps, DYNAMIC_METHODS, scorer(steps, 0, list(DEFAULT_PROMPTS)))
    members = {f"front-{i:02d}": s.resample(steps) for i, s in enumerate(front)}

    def cached(schedule):
        return lambda: accel.apply(pipe, CacheConfig(schedule=schedule, count_macs=False))

    contexts = {
        "full": nullcontext,
        **{name: cached(s) for name, s in baselines.items()},
        **dynamic,
        **{name: cached(s) for name, s in members.items()},
    }
    rows, images = measure_methods(evaluator, contexts, args.batch, args.repeats)
    for name, schedule in {**baselines, **members}.items():
        rows[name]["ideal_speedup"] = 1 / evaluator.cost_model.relative_macs(schedule.mask)
    noise = None
    if not args.no_fid:
        noise_seeds = SEED_SETS[1 : args.seed_sets]
        noise = score_methods(
            rows, images, reference, evaluator, batch=args.batch, noise_seeds=noise_seeds, reference_seed=REFERENCE_SEED
        )
    summary = _summarise(rows, front, list(baselines) + list(dynamic), noise, args, reused)
    transfer = _transfer(front, scorer, prompts, args)
    return {**summary, "transfer": transfer} if transfer else summary


def _summarise(rows, front, baseline_names, noise, args, reused) -> dict:
    members = [f"front-{i:02d}" for i in range(len(front))]
    dominated = {b: [f for f in members if dominates(rows[f], rows[b], noise)] for b in baseline_names}
    if noise is not None:
        criterion = "FID and prompt score within the full-compute seed-set spread of full compute's"
        within = [f for f in members if within_noise(rows[f], rows["full"], noise)]
    else:
        criterion = f"PSNR >= {args.psnr_threshold} dB (FID not measured)"
        within = [f for f in members if rows[f]["psnr"] >= args.psnr_threshold]
    within_psnr = [f for f in members if rows[f]["psnr"] >= args.psnr_threshold]
    _print_table(rows, dominated, noise, args, front, reused)
    beaten = [b for b in baseline_names if dominated[b]]
    missed = [b for b in baseline_names if not dominated[b]]
    print(
        f"front dominates {len(beaten)} of {len(baseline_names)} baselines; not dominated: {', '.join(missed) or '-'}"
    )
    misses = {name: why_not_dominated(rows, members, name, noise) for name in missed}
    for name, reason in misses.items():
        print(f"  {name}: {reason}")

    def best(names):
        return round(max((rows[n]["speedup"] for n in names), default=1.0), 3)

    print(f"best measured speedup within noise ({criterion}): {best(within):.2f}x")
    return {
        "baselines": len(baseline_names),
        "dominated": len(beaten),
        "dominated_baselines": beaten,
        "nearest_misses": misses,
        "best_speedup_within_noise": best(within),
        "noise_criterion": criterion,
        "noise": None if noise is None else {k: (round(v, 4) if isinstance(v, float) else v) for k, v in noise.items()},
        f"best_speedup_psnr_{args.psnr_threshold:g}": best(within_psnr),
        "search_minutes": front.info.get("search_minutes"),
        "front_reused": reused,
        "model": args.model or "default",
        "steps": args.steps,
        "images": args.images,
        "rows": {name: _round(row) for name, row in rows.items()},
        "searched_speedups": {f: speedup_of(s) for f, s in zip(members, front)},
    }


def _print_table(rows: dict, dominated: dict, noise: dict | None, args, front, reused: bool) -> None:
    """The per-method table and the noise line; ``SE`` is the prompt score's
    :func:`~accel.eval.noise.paired_standard_error`."""
    print(
        f"front from {args.front} ({'reused' if reused else 'searched now'}, {front.info.get('search_minutes')} min); "
        f"{args.steps} steps, {args.images} held-out prompts, batch {args.batch}, {args.repeats} repeats (speedup of "
        f"the fastest), {args.threads} threads; PSNR of decoded images vs full compute with the same seeds"
    )
    header = f"{'method':<24}{'speedup':>9}{'median':>8}{'ideal':>7}{'PSNR':>8}"
    print(header + (f"{'FID':>9}{'prompt':>8}{'SE':>6}" if noise else "") + "  dominated by")
    for name, row in rows.items():
        line = f"{name:<24}{row['speedup']:>8.2f}x{row['median_speedup']:>7.2f}x"
        line += f"{row.get('ideal_speedup', float('nan')):>7.2f}{row['psnr']:>8.2f}"
        if noise:
            line += f"{row['fid']:>9.2f}{row['prompt_score']:>8.2f}{row['prompt_score_se']:>6.2f}"
        print(line + ("  " + ", ".join(dominated[name]) if dominated.get(name) else ""))
    if noise:
        print(
            f"run-to-run noise over {len(noise['full_fids'])} full-compute seed sets: FID {noise['fid']:.2f} "
            f"(values {', '.join(f'{v:.2f}' for v in noise['full_fids'])}; reference: {noise['reference']}), "
            f"{noise['prompt_metric']} {noise['prompt_score']:.3f} "
            f"(values {', '.join(f'{v:.3f}' for v in noise['full_prompt_scores'])})"
        )


def _round(row: dict) -> dict:
    return {k: round(float(v), 4) for k, v in row.items()}
