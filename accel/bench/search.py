"""``python -m accel.bench search``: a searched front vs every heuristic baseline and diffusers' caches.

On the bundled default model (or ``--model``), runs ``accel search`` into ``--front`` (or reuses the front an
earlier search saved there), then on held-out prompts and seeds measures for full compute, each baseline and
each front schedule: the wall-clock speedup over full compute (interleaved repeats, fastest of each), PSNR of the
decoded images vs full compute with the same seeds, and FID vs the full-compute images where the offline
scorer (:mod:`accel.eval.fid`) is installed. Reports

* ``dominated``: baselines for which some front schedule is at least as fast (measured) with better PSNR;
* ``best_speedup_within_noise``: the largest measured speedup of a front schedule whose FID to the
  full-compute images is no larger than that of a second full-compute run with other seeds (run-to-run
  noise); without the scorer, of one whose PSNR is at least ``--psnr-threshold`` (``noise_criterion`` says
  which).
"""

from __future__ import annotations

import argparse
import logging
from contextlib import nullcontext
from pathlib import Path

import torch

import accel
from accel.bench.timing import time_interleaved
from accel.caching.config import CacheConfig
from accel.caching.search.command import DEFAULT_PROMPTS, model_defaults, read_prompts
from accel.caching.search.config import SearchConfig, parse_duration
from accel.caching.search.evaluator import Evaluator, EvaluatorConfig
from accel.caching.search.front import load_front, speedup_of
from accel.caching.search.runner import search
from accel.caching.search.seeds import heuristic_schedules
from accel.caching.search.transfer import measure_transfer, transfer_table

logger = logging.getLogger(__name__)

#: held-out prompts (none is a calibration prompt): captions of the bundled model's test split
EVAL_PROMPTS = (
    "anchor",
    "airplane",
    "watch",
    "crossed swords",
    "thunder cloud and rain",
    "hot springs",
    "snowman",
    "hot beverage",
)
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
DIFFUSERS_METHODS = ("diffusers-fbc-0.08", "diffusers-pab", "diffusers-taylorseer", "diffusers-fastercache")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m accel.bench search")
    parser.add_argument("--model", help="pipeline folder or hub id; omitted: the bundled default model")
    parser.add_argument("--front", default="runs/bench-search", help="front folder: reused if it holds front.json")
    parser.add_argument("--budget", type=parse_duration, default=parse_duration("10m"), help="search time if new")
    parser.add_argument("--population", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, help="default: the bundled model's, else 4.5")
    parser.add_argument("--images", type=int, default=8, help="held-out prompts scored per method")
    parser.add_argument("--eval-prompts", help="held-out prompts file (one per line); default: built-in")
    parser.add_argument("--timing-batch", type=int, default=2, help="prompts per timed pipeline call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (ratios are steadier with 1)")
    parser.add_argument("--psnr-threshold", type=float, default=30.0)
    parser.add_argument("--no-fid", action="store_true", help="skip FID even if the scorer is installed")
    parser.add_argument("--max-sequence-length", type=int)
    parser.add_argument(
        "--transfer-steps", default="", help="also score the front resampled to these step counts, e.g. 10,30"
    )
    return parser


def _diffusers_contexts(pipe, steps: int) -> dict:
    """Context factories of diffusers' built-in caches, from the evaluation harness when it is installed."""
    try:
        from accel.eval.methods import UnsupportedMethod, apply_method, parse_method
    except ImportError as error:
        logger.info("diffusers' caches skipped: the evaluation harness is not available (%s)", error)
        return {}
    contexts = {}
    for name in DIFFUSERS_METHODS:
        method = parse_method(name)
        try:
            with apply_method(method, pipe, steps):
                pass
        except (UnsupportedMethod, ValueError, TypeError, NotImplementedError) as error:
            logger.info("%s skipped: %s", name, error)
            continue
        contexts[name] = lambda m=method: apply_method(m, pipe, steps)
    return contexts


def _fid_scorer(disabled: bool):
    if disabled:
        return None
    try:
        from accel.eval.fid import EfficientNetLite0Features, fid_kid

        feature = EfficientNetLite0Features()
    except (ImportError, ModuleNotFoundError) as error:
        logger.info("FID skipped: %s", error)
        return None
    return lambda real, fake: fid_kid(real, fake, feature=feature)[f"FID-{feature.metric_suffix}"]


def _contexts(pipe, front, baselines: dict, diffusers: dict) -> dict:
    def cached(schedule):
        return lambda: accel.apply(pipe, CacheConfig(schedule=schedule, count_macs=False))

    contexts = {"full": nullcontext}
    contexts.update({name: cached(s) for name, s in baselines.items()})
    contexts.update(diffusers)
    contexts.update({f"front-{i:02d}": cached(s) for i, s in enumerate(front)})
    return contexts


def run(argv: list[str]) -> dict:
    """Search (or reuse), measure, print the table; return the headline numbers."""
    from accel.pipelines.loading import load_pipeline

    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs, evaluation_defaults = model_defaults(args.model)
    if args.max_sequence_length is not None:
        call_kwargs["max_sequence_length"] = args.max_sequence_length
    guidance = args.guidance_scale or evaluation_defaults.get("guidance_scale", EvaluatorConfig().guidance_scale)
    folder = Path(args.front)
    reused = (folder / "front.json").is_file()
    if not reused:
        config = SearchConfig(
            population=args.population,
            budget_seconds=args.budget,
            evaluation=EvaluatorConfig(num_steps=args.steps, guidance_scale=guidance),
        )
        search(pipe, list(DEFAULT_PROMPTS), config, folder, call_kwargs=call_kwargs, info={"model": args.model})
    front = load_front(folder)
    steps = args.steps
    pool = read_prompts(args.eval_prompts) if args.eval_prompts else list(EVAL_PROMPTS)
    prompts = [pool[i % len(pool)] for i in range(args.images)]

    def scorer(num_steps: int, seed: int) -> Evaluator:
        config = EvaluatorConfig(num_steps=num_steps, seed=seed, guidance_scale=guidance)
        return Evaluator(pipe, prompts, config, call_kwargs)

    evaluator = scorer(steps, 1000)
    baselines = {name: s for name, s in heuristic_schedules(evaluator.layout, steps).items()}
    diffusers = _diffusers_contexts(pipe, steps)
    contexts = _contexts(pipe, [s.resample(steps) for s in front], baselines, diffusers)

    rows, images = {}, {}
    for name, context in contexts.items():
        with context():
            latents = evaluator.generate(None, len(prompts))
        images[name] = evaluator.decode(latents)
        rows[name] = {"psnr": evaluator.image_psnr(latents), "latent_psnr": evaluator.latent_psnr(latents)}
    batch = min(args.timing_batch, len(prompts))
    timings = time_interleaved(
        {name: lambda: evaluator.generate(None, batch) for name in contexts},
        repeats=args.repeats,
        warmup=1,
        around=contexts,
    )
    for name, timing in timings.items():  # fastest repeat: the least disturbed by other work on a shared machine
        rows[name]["speedup"] = min(timings["full"].samples) / min(timing.samples)
        rows[name]["median_speedup"] = timings["full"].median / timing.median
        rows[name]["spread"] = timing.spread
    for name, schedule in [*baselines.items(), *((f"front-{i:02d}", s) for i, s in enumerate(front))]:
        rows[name]["ideal_speedup"] = 1 / evaluator.cost_model.relative_macs(schedule.resample(steps).mask)

    fid = _fid_scorer(args.no_fid)
    noise_fid = None
    if fid is not None:
        other = scorer(steps, 2000)
        noise_fid = fid(images["full"], other.decode(other.reference))
        for name in rows:
            rows[name]["fid"] = fid(images["full"], images[name])
    summary = _summarise(rows, front, baselines, diffusers, noise_fid, args, reused)
    transfer = {}
    for count in [int(part) for part in args.transfer_steps.split(",") if part.strip()]:
        target = scorer(count, 1000)
        measured = measure_transfer(target, front, images=True)
        print(f"front searched at {front.info.get('num_steps')} steps, resampled to {count}:")
        print(transfer_table(measured))
        transfer[str(count)] = [_round({k: r[k] for k in ("relative_macs", "psnr", "image_psnr")}) for r in measured]
    return {**summary, "transfer": transfer} if transfer else summary


def _summarise(rows, front, baselines, diffusers, noise_fid, args, reused) -> dict:
    members = [f"front-{i:02d}" for i in range(len(front))]
    baseline_names = [*baselines, *diffusers]
    dominated = [
        b
        for b in baseline_names
        if any(rows[f]["speedup"] >= rows[b]["speedup"] and rows[f]["psnr"] > rows[b]["psnr"] for f in members)
    ]
    if noise_fid is not None:
        criterion = "FID to full compute <= FID of full compute with other seeds"
        within = [f for f in members if rows[f]["fid"] <= noise_fid]
    else:
        criterion = f"PSNR >= {args.psnr_threshold} dB (FID scorer unavailable)"
        within = [f for f in members if rows[f]["psnr"] >= args.psnr_threshold]
    within_psnr = [f for f in members if rows[f]["psnr"] >= args.psnr_threshold]
    print(
        f"front from {args.front} ({'reused' if reused else 'searched now'}, {front.info.get('search_minutes')} min); "
        f"{args.steps} steps, {args.images} held-out prompts, timing batch {args.timing_batch}, "
        f"{args.repeats} repeats (speedup of the fastest), {args.threads} threads; PSNR of decoded images vs full"
    )
    header = f"{'method':<24}{'speedup':>9}{'spread':>8}{'ideal':>7}{'PSNR':>8}"
    print(header + (f"{'FID':>9}" if noise_fid is not None else ""))
    for name, row in rows.items():
        line = f"{name:<24}{row['speedup']:>8.2f}x{100 * row['spread']:>7.1f}%"
        line += f"{row.get('ideal_speedup', float('nan')):>7.2f}{row['psnr']:>8.2f}"
        if noise_fid is not None:
            line += f"{row['fid']:>9.3f}"
        print(line + ("  dominated" if name in dominated else ""))
    if noise_fid is not None:
        print(f"run-to-run noise: FID of full compute with other seeds = {noise_fid:.3f}")
    print(f"front dominates {len(dominated)} of {len(baseline_names)} baselines: {', '.join(dominated) or '-'}")

    def best(names):
        return round(max((rows[n]["speedup"] for n in names), default=1.0), 3)

    return {
        "baselines": {b: _round(rows[b]) for b in baseline_names},
        "front": {f: {**_round(rows[f]), "searched_speedup": speedup_of(s)} for f, s in zip(members, front)},
        "full": _round(rows["full"]),
        "dominated": len(dominated),
        "dominated_baselines": dominated,
        "best_speedup_within_noise": best(within),
        "noise_criterion": criterion,
        "noise_fid": None if noise_fid is None else round(noise_fid, 4),
        f"best_speedup_psnr_{args.psnr_threshold:g}": best(within_psnr),
        "search_minutes": front.info.get("search_minutes"),
        "front_reused": reused,
        "model": args.model or "default",
        "steps": args.steps,
    }


def _round(row: dict) -> dict:
    return {k: round(float(v), 4) for k, v in row.items()}
