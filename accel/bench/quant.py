"""``python -m accel.bench quant``: quantization alone, caching alone, and their naive and cache-aware combinations.

On the bundled image model, in one run, on ``--images`` held-out prompts (the emoji set's test captions, one
seed each), latency interleaved (one warm-up round, ``--repeats`` timed ones, speedup of the fastest):

* ``full``: full precision, no cache;
* ``int8-weight``, ``int8-dynamic``: every linear layer quantized (torchao), no calibration;
* with ``--scheme int8-static`` (the default): ``int8-static``, every linear layer with calibrated per-layer
  activation scales (and the correction), calibrated without a cache;
* per ``--target-speedups`` value ``s``: ``cache@s``, the bundled caching front's member at about ``s``x;
  ``cache+int8@s``, the same schedule with plain int8-dynamic; ``naive@s``, the same schedule with ``--scheme``
  whose activation scales, layer selection and error correction were calibrated *without* the cache;
  ``aware@s``, all of them calibrated under the schedule (cache-aware);
* with ``--search``: ``searched``, CacheQuant's dynamic-programming schedule computed from the change matrices
  of the *quantized* model (the quantized model in the loop), at the budget of the fastest target, then
  calibrated cache-aware under it;
* with ``--nsga-generations N``: ``nsga``, the best point at the fastest target's speed of an NSGA-II search run
  for ``N`` generations with the ``--scheme`` model in the loop (:func:`accel.quant.search_schedules`: quality of
  cache + int8 against full precision, cost from a latency model fitted on the quantized model) on the
  calibration prompts, then calibrated cache-aware under it.

With ``--video``, the same comparison on the bundled video model follows in the same run
(:mod:`accel.bench.quant_video`).

Per row: measured speedup, weight memory of the transformer (bytes, ratio to full), PSNR of the decoded images
vs full compute (same seeds), FID and KID (EfficientNet-Lite0 features, against the emoji set) and the
prompt-alignment score, with the run-to-run noise of full compute over ``--seed-sets`` seed sets. A table, then
one JSON line.

``--compile`` times and scores every row with the transformer's blocks compiled (inductor; calibration and
searches run eagerly before), so every row, ``full`` included, is compiled alike.

``--device cuda`` instead times fp8, int8-dynamic and int8-weight against bf16 on a PixArt-XL-sized transformer
(:mod:`accel.bench.quant_gpu`).
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
from contextlib import nullcontext
from dataclasses import replace
from types import SimpleNamespace

import torch

import accel
from accel.bench.quant_gpu import run_gpu
from accel.caching import CacheConfig, Schedule, load_front
from accel.caching.search.command import DEFAULT_PROMPTS, model_defaults
from accel.caching.search.config import SearchConfig
from accel.caching.search.evaluator import Evaluator, EvaluatorConfig
from accel.eval.comparison import measure_methods, score_methods
from accel.eval.noise import within_noise
from accel.quant import Calibration, QuantConfig, calibrate, search_schedules
from accel.quant.schemes import STATIC_SCHEMES

logger = logging.getLogger(__name__)

#: first seed of each full-compute seed set (the first is the one every method shares)
SEED_SETS = (1000, 2000, 3000, 4000, 5000)

#: rows of searched schedules (no target speedup of their own): the DP one (--search), the NSGA-II one
SEARCHED = ("searched", "nsga")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m accel.bench quant")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=64, help="held-out prompts (one image each) per method")
    parser.add_argument("--batch", type=int, default=4, help="prompts per pipeline call, scored and timed alike")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed-sets", type=int, default=3, help="full-compute seed sets for the noise (2..5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--target-speedups", default="2,3", help="caching front members to combine, e.g. 2,3")
    parser.add_argument(
        "--min-sqnr", type=float, default=None, help="layer selection bound (dB) of the calibrated rows"
    )
    parser.add_argument("--calibration-prompts", type=int, default=8, help="how many of the search's prompts")
    parser.add_argument(
        "--scheme", default="int8-static", choices=("int8-static", "int8-dynamic"),
        help="scheme of the calibrated rows (naive, aware, searched, nsga)",
    )  # fmt: skip
    parser.add_argument("--search", action="store_true", help="add the DP schedule of the quantized model")
    parser.add_argument(
        "--nsga-generations", type=int, default=0,
        help="add the best point of an NSGA-II search with the --scheme model in the loop (0: no such row)",
    )  # fmt: skip
    parser.add_argument("--nsga-population", type=int, default=12, help="population of that search")
    parser.add_argument("--video", action="store_true", help="add the rows of the bundled video model")
    parser.add_argument("--video-prompts", type=int, default=4, help="clips per video row")
    parser.add_argument("--video-interval", type=int, default=2, help="the video rows' schedule: FORA-N")
    parser.add_argument("--no-fid", action="store_true", help="skip FID, KID and the prompt score")
    parser.add_argument(
        "--compile", action="store_true",
        help="time and score every row with the transformer's blocks compiled (inductor), after calibrating eagerly",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu: the bundled model; cuda: the PixArt-XL-sized rows")
    parser.add_argument("--gpu-steps", type=int, default=20)
    return parser


def check_arguments(args: argparse.Namespace) -> list[float]:
    """Refuse bad arguments before any model is loaded (``ValueError`` naming the flag and what it allows);
    returns the parsed ``--target-speedups``."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    for flag in ("steps", "images", "batch", "repeats", "threads", "video_interval", "gpu_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("calibration_prompts", "video_prompts"):
        if not 1 <= getattr(args, flag) <= len(DEFAULT_PROMPTS):
            raise ValueError(
                f"--{flag.replace('_', '-')} must be in 1..{len(DEFAULT_PROMPTS)} (the search's prompts), "
                f"got {getattr(args, flag)}"
            )
    if not 2 <= args.seed_sets <= len(SEED_SETS):
        raise ValueError(f"--seed-sets must be in 2..{len(SEED_SETS)}, got {args.seed_sets}")
    if args.nsga_generations < 0 or args.nsga_population < 4:
        raise ValueError("--nsga-generations must be >= 0 and --nsga-population >= 4")
    try:
        targets = [float(part) for part in args.target_speedups.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"--target-speedups must be numbers separated by commas, got {args.target_speedups!r}"
        ) from None
    if not targets or not all(1 < t < float("inf") for t in targets):
        raise ValueError(f"--target-speedups must name one or more speedups above 1, got {args.target_speedups!r}")
    return targets


def run(argv: list[str]) -> dict:
    """Measure, print the table; return the headline numbers. Every argument is checked first
    (:func:`check_arguments`); ``--device cuda`` runs the GPU rows (:func:`~accel.bench.quant_gpu.run_gpu`) instead
    of the CPU ones; ``--video`` adds the video rows (:mod:`accel.bench.quant_video`)."""
    args = _parser().parse_args(argv)
    targets = check_arguments(args)
    if args.device.startswith("cuda"):
        return run_gpu(args)
    torch.set_num_threads(args.threads)
    from accel.bench.search import prompts_and_reference
    from accel.eval.runtime import RuntimeConfig
    from accel.pipelines.default import DEFAULT_FRONT_DIR

    pipe = RuntimeConfig(device="cpu").load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs, defaults = model_defaults(None)
    guidance = defaults.get("guidance_scale", EvaluatorConfig().guidance_scale)
    prompts, reference = prompts_and_reference(SimpleNamespace(eval_prompts=None, model=None, images=args.images))
    evaluator = Evaluator(
        pipe, prompts, EvaluatorConfig(num_steps=args.steps, seed=SEED_SETS[0], guidance_scale=guidance), call_kwargs
    )
    calibration = Calibration(
        prompts=DEFAULT_PROMPTS[: args.calibration_prompts],
        num_inference_steps=args.steps,
        batch=args.batch,
        call_kwargs={**call_kwargs, "guidance_scale": guidance},
    )
    front = load_front(DEFAULT_FRONT_DIR)
    schedules = {f"{t:g}": front.pick(target_speedup=t, num_steps=args.steps) for t in targets}
    if args.search:
        schedules["searched"] = _searched_schedule(pipe, calibration, evaluator, schedules, args)
    if args.nsga_generations:
        schedules["nsga"] = _nsga_schedule(pipe, calibration, call_kwargs, guidance, targets, args)
    contexts, memory, plans = method_contexts(pipe, schedules, calibration, args.min_sqnr, args.scheme)
    if args.compile:
        _compile(pipe)
    rows, images = measure_methods(evaluator, contexts, args.batch, args.repeats)
    for name, row in rows.items():
        row["weight_bytes"], row["ideal_speedup"] = memory[name], _ideal(evaluator, name, schedules)
    noise = None
    if not args.no_fid:
        noise = score_methods(
            rows, images, reference, evaluator, batch=args.batch, noise_seeds=SEED_SETS[1 : args.seed_sets],
            reference_seed=10_000,
        )  # fmt: skip
        _add_kid(rows, images, reference)
    result = _summarise(rows, noise, schedules, plans, args)
    if args.compile:
        result["compiled_graphs"] = _compiled_graphs()
        print(f"compiled blocks (inductor): {result['compiled_graphs']} graphs compiled over all rows")
    if args.video:
        from accel.bench.quant_video import run_video  # inside: quant_video imports this module's helpers

        result["video"] = run_video(args, calibration)
    return result


def _compile(pipe) -> None:
    """Compile every block of ``pipe``'s transformer (inductor), with room for every row's recompiles. The
    calibration runs and searches before it ran eagerly; each row's first (warm-up) call compiles what it needs:
    a quantized weight type recompiles a block, and a caching schedule that reuses components splits it at them
    (the correction's ``a * x + b`` compiles inside its component)."""
    from accel.eval.runtime import RuntimeConfig

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    RuntimeConfig(device="cpu", compile=True).compile_pipeline(pipe)  # as every command's --compile does


def _compiled_graphs() -> int:
    """Graphs dynamo compiled since :func:`_compile` (its ``unique_graphs`` counter)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _ideal(evaluator: Evaluator, name: str, schedules: dict[str, Schedule]) -> float:
    """``1 / relative MACs`` of the row's schedule (1 without one)."""
    key = name.split("@")[-1] if "@" in name else (name if name in SEARCHED else None)
    if key not in schedules:
        return 1.0
    return 1 / evaluator.cost_model.relative_macs(schedules[key].mask)


def method_contexts(
    pipe, schedules: dict[str, Schedule], calibration: Calibration, min_sqnr, scheme: str
) -> tuple[dict, dict, dict]:
    """Context factories of every row, the transformer's weight bytes under each, and the calibrated plans
    (of ``scheme``).

    A schedule's rows are named ``cache@KEY``, ``cache+int8@KEY``, ``naive@KEY`` and ``aware@KEY`` (without the
    suffix for the key ``""``); a searched schedule's key names its one row, calibrated under it."""
    from accel.quant.apply import weight_bytes

    def applied(*configs):
        return lambda: accel.apply(pipe, *configs)

    contexts = {
        "full": nullcontext,
        "int8-weight": applied(QuantConfig(scheme="int8-weight")),
        "int8-dynamic": applied(QuantConfig(scheme="int8-dynamic")),
    }
    plans = {}
    calibrated = QuantConfig(scheme=scheme, min_sqnr=min_sqnr, correct=True, calibration=calibration)
    naive = plans["naive"] = calibrate(pipe, calibrated, cache=None)
    if scheme != "int8-dynamic":
        contexts[scheme] = applied(QuantConfig(scheme=scheme, plan=naive))
    for key, schedule in schedules.items():
        cache = CacheConfig(schedule=schedule, count_macs=False)
        suffix = f"@{key}" if key else ""
        aware = calibrate(pipe, calibrated, cache=cache)
        plans[key if key in SEARCHED else f"aware{suffix}"] = aware
        if key not in SEARCHED:
            contexts[f"cache{suffix}"] = applied(cache)
            contexts[f"cache+int8{suffix}"] = applied(cache, QuantConfig(scheme="int8-dynamic", correct=False))
            contexts[f"naive{suffix}"] = applied(cache, QuantConfig(scheme=scheme, plan=naive, cache_aware=False))
            contexts[f"aware{suffix}"] = applied(cache, QuantConfig(scheme=scheme, plan=aware))
        else:
            contexts[key] = applied(cache, QuantConfig(scheme=scheme, plan=aware))
    memory = {}
    for name, context in contexts.items():
        with context():
            memory[name] = weight_bytes(pipe.transformer)
    return contexts, memory, plans


def _searched_schedule(pipe, calibration, evaluator: Evaluator, schedules: dict, args) -> Schedule:
    """CacheQuant's DP schedule from the change matrices of the ``--scheme`` model on the calibration prompts,
    with as many refresh steps as the fastest target's schedule computes on average (the quantized model in the
    loop)."""
    from accel.caching.search.dp import cachequant_mask
    from accel.caching.search.features import record_features
    from accel.quant.calibration import pipeline_runner

    fastest = max(schedules.values(), key=lambda s: 1 / max(s.mask.mean(), 1e-9))
    updates = max(2, int(round(fastest.mask.mean() * args.steps)))
    layout = evaluator.layout
    with accel.apply(pipe, _in_the_loop(args.scheme, calibration)):
        with record_features(pipe.transformer, layout.components, sketch_size=4096) as recorder:
            pipeline_runner(pipe, replace(calibration, batch=len(calibration.prompts)))()  # one trajectory
    mask = cachequant_mask(recorder.change_matrices(), updates)
    return Schedule(
        mask=mask,
        components=tuple(layout.components),
        model_class=layout.model_class,
        forecast_order=fastest.forecast_order,
        provenance={"method": f"cachequant-dp on the {args.scheme} model", "num_updates": updates},
    )


def _nsga_schedule(pipe, calibration: Calibration, call_kwargs: dict, guidance: float, targets, args) -> Schedule:
    """The best-quality member at least as fast as the fastest target (by the fitted latency model) of an NSGA-II
    search run with the ``--scheme`` model in the loop on the calibration prompts."""
    config = SearchConfig(
        population=args.nsga_population,
        generations=args.nsga_generations,
        evaluation=EvaluatorConfig(num_steps=args.steps, guidance_scale=guidance, cost="fitted"),
    )
    with tempfile.TemporaryDirectory() as out:
        front = search_schedules(
            pipe, list(calibration.prompts), _in_the_loop(args.scheme, calibration), config, out, resume=False,
            call_kwargs=call_kwargs,
        )  # fmt: skip
    logger.info("NSGA-II with %s in the loop: %d schedules on the front", args.scheme, len(front))
    return front.pick(target_speedup=max(targets), num_steps=args.steps)


def _in_the_loop(scheme: str, calibration: Calibration) -> QuantConfig:
    """The quantization a schedule search runs with: ``scheme`` as it is, with no correction (a static scheme
    calibrates its activation scales once, without a cache, on the calibration prompts)."""
    static = scheme in STATIC_SCHEMES
    return QuantConfig(scheme=scheme, correct=False, calibration=calibration if static else None)


def _add_kid(rows: dict, images: dict, reference: torch.Tensor) -> None:
    """KID (EfficientNet-Lite0 features, against the FID reference) of every row."""
    from accel.eval.fid import EfficientNetLite0Features, FidKidConfig, extract_features, fid_kid_from_features

    feature = EfficientNetLite0Features()
    real = extract_features(reference, feature)
    for name, decoded in images.items():
        scores = fid_kid_from_features(real, extract_features(decoded, feature), "x", FidKidConfig(kid_subsets=50))
        rows[name]["kid"] = scores["KID-x"]


def _summarise(rows: dict, noise: dict | None, schedules: dict, plans: dict, args) -> dict:
    full = rows["full"]
    for row in rows.values():
        row["weight_memory_ratio"] = row["weight_bytes"] / full["weight_bytes"]
        row["within_noise"] = None if noise is None else bool(within_noise(row, full, noise))  # None: not scored
    _print_table(rows, noise, args)
    first = f"@{next(iter(k for k in schedules if k not in SEARCHED))}" if schedules else ""
    combined = [n for n in rows if n.startswith("aware") or n in SEARCHED]
    within = [n for n in combined if rows[n]["within_noise"]]
    best = max(within or combined, key=lambda n: rows[n]["speedup"]) if combined else None
    kept = {name: plan.settings["layers"] for name, plan in plans.items()}
    return {
        "int8_speedup": round(rows["int8-dynamic"]["speedup"], 3),
        "int8_weight_speedup": round(rows["int8-weight"]["speedup"], 3),
        "weight_memory_ratio": round(rows["int8-dynamic"]["weight_memory_ratio"], 4),
        "scheme": args.scheme,
        "naive_psnr": round(rows.get(f"naive{first}", {}).get("psnr", float("nan")), 3),
        "aware_psnr": round(rows.get(f"aware{first}", {}).get("psnr", float("nan")), 3),
        "aware_minus_naive": {
            key: round(rows[f"aware@{key}"]["psnr"] - rows[f"naive@{key}"]["psnr"], 3)
            for key in schedules
            if f"aware@{key}" in rows and f"naive@{key}" in rows
        },
        "combined_speedup": None if best is None else round(rows[best]["speedup"], 3),
        "combined_row": best,
        "combined_within_noise": None if best is None or noise is None else rows[best]["within_noise"],
        "noise": None if noise is None else {k: v for k, v in noise.items() if k in ("fid", "prompt_score")},
        "full_precision_layers": {name: sum(v == "full" for v in layers.values()) for name, layers in kept.items()},
        "layer_sqnr_min_median": {name: _spread(plan.metrics["sqnr"]) for name, plan in plans.items()},
        "steps": args.steps,
        "images": args.images,
        "rows": {name: {k: _rounded(v) for k, v in row.items()} for name, row in rows.items()},
    }


def _rounded(value):
    """A row's value for the JSON line: a number to 4 decimals, None (not measured) as it is."""
    return None if value is None else round(float(value), 4)


def _spread(sqnrs: dict) -> list:
    """``[min, median]`` of the layers' SQNR (dB; exact layers left out)."""
    values = sorted(v for v in sqnrs.values() if v is not None)
    return [values[0], values[len(values) // 2]] if values else []


def _print_table(rows: dict, noise: dict | None, args) -> None:
    print(
        f"bundled image model, {args.steps} steps, {args.images} held-out prompts, batch {args.batch}, "
        f"{args.repeats} repeats (speedup of the fastest), {args.threads} thread(s); PSNR of decoded images vs full"
    )
    header = f"{'method':<18}{'speedup':>9}{'median':>8}{'ideal':>7}{'weights MB':>11}{'ratio':>7}{'PSNR':>8}"
    print(header + (f"{'FID':>9}{'KID':>9}{'prompt':>8}  within noise" if noise else ""))
    for name, row in rows.items():
        line = f"{name:<18}{row['speedup']:>8.2f}x{row['median_speedup']:>7.2f}x{row['ideal_speedup']:>7.2f}"
        line += f"{row['weight_bytes'] / 2**20:>11.2f}{row['weight_memory_ratio']:>7.3f}{row['psnr']:>8.2f}"
        if noise:
            line += f"{row['fid']:>9.2f}{row['kid']:>9.4f}{row['prompt_score']:>8.2f}  {row['within_noise']}"
        print(line)
    if noise:
        print(
            f"run-to-run noise over {len(noise['full_fids'])} full-compute seed sets: FID {noise['fid']:.2f} "
            f"(values {', '.join(f'{v:.2f}' for v in noise['full_fids'])}), {noise['prompt_metric']} "
            f"{noise['prompt_score']:.3f}"
        )
