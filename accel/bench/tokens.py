"""``python -m accel.bench tokens``: per-token step allocation against RAS, fewer steps and caching, at equal
measured runtime, on the bundled image model and the bundled video model.

For each model, a calibration first times the prompts (two clips on video) under full compute and two
settings of each method's knob, fits the runtime ratio to the share of the step grid that runs and the share of
token-steps computed (``a + c * grid + d * token-steps``, least squares; fewer steps have both equal to
``N / steps``; FORA: ``a + b / interval``; the searched front's members: ``a + b * relative MACs``), and picks
the knob whose predicted runtime is 50% and 25% of full compute. A row whose knob cannot get there (its
prediction misses by more than 10%, e.g. clamped at its fastest setting) is flagged ``unreachable`` and its
headline PSNR is ``null`` (:mod:`accel.bench.token_report`). Then every method generates all prompts (same seeds as full
compute), timed as it goes:

* ``ours``: :class:`~accel.caching.TokenStepConfig` with the velocity rule, CFG branches of a prompt paired, and
  its default ``min_active=0.8``: a budget below it also coarsens the step grid (both levers at once);
* ``ours-own``: the same with every row and branch selecting alone (the issue's per-branch requirement);
* ``ours-all-steps``: ours with ``min_active=0``, every step of the grid and fewer tokens (HSA's form);
* ``ours-at-steps``: ours with its budget picked for the fewer-steps row's predicted runtime instead of the
  target's: fewer steps take whole numbers of steps, so their row can run up to 10% off the target, and ours,
  whose budget is continuous, is compared with them here at the same runtime (the ``matched_*`` keys);
* ``ras``: RAS's released rule and dense schedule (:func:`~accel.caching.ras_config`) in the same machinery;
* ``steps-N``: fewer flow-matching steps; ``fora-k``: block caching every k steps (FORA);
* ``front-i``: the image model's bundled caching front (searched schedules), its best-quality member at the
  target; the caching baseline (``cache_*`` keys) is the better of it and FORA. The video model has no front:
  its caching baseline is FORA.

Per row: measured speed-up (on the calibration prompts, all rows interleaved, the fastest of three rounds
each), PSNR and SSIM against full compute, FID and KID (EfficientNet-Lite0 features) against full compute
with other seeds (so the full row shows the noise floor), the alignment score of each image (or frame) with
its prompt, and on video the motion accuracy; for ``ours`` the active fraction of every step.

``--bounds``, ``--sweep-min-active``, ``--dense-shapes`` and ``--curve`` run a diagnostic instead
(:mod:`accel.bench.token_bounds`): where the allocation loses its quality, at equal token-steps and at the
benchmark's runtime points, beside bounds that compute every token; ours at several ``min_active`` values at
equal runtime; ours with other dense schedules at equal token-steps; ours and fewer steps at several settings,
compared at equal measured speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

import accel
from accel.bench.token_report import (
    TOLERANCE,
    FrontKnob,
    Knob,
    Scores,
    headline,
    print_active,
    print_heat_map,
    print_table,
    reaches,
)
from accel.caching import CacheConfig, Front, TokenStepConfig, fora, layout_of, ras_config
from accel.eval.timing import time_interleaved

TARGETS = (0.5, 0.25)
#: held-out object/motion pairs of the video model's training set
VIDEO_PROMPTS = (
    "red apple sliding to the right",
    "yellow star bouncing",
    "blue car zooming in",
    "green frog rotating clockwise",
)
#: seed offset of the full-compute reference that FID and KID compare with
REFERENCE_SEED = 1000


@dataclass
class Model:
    """One bundled model under test.

    Attributes:
        name: ``"image"`` or ``"video"``.
        pipe: the pipeline.
        prompts: the evaluation prompts.
        generate: ``(prompts, steps, seed) -> (N, 3, H, W)`` images or ``(N, F, 3, H, W)`` clips in [0, 1].
        tokens: visual tokens per sample.
        probe: how many of the prompts the calibration times.
        front: the caching front searched for the model (its members need a ``relative_macs`` metric), or None:
            the caching baseline is then FORA alone.
    """

    name: str
    pipe: object
    prompts: list[str]
    generate: Callable[[list[str], int, int], torch.Tensor]
    tokens: int
    probe: int
    front: Front | None = None


def ours(budget: float, steps: int, branches: str = "paired", min_active: float = 0.8) -> TokenStepConfig:
    """Our configuration at ``budget`` for calls of ``steps`` steps, 16 buckets, the library's defaults otherwise:
    the first 0.3 of the grid's steps dense (at least 2, at most half the grid's budget), no reset points.
    RAS's shape (the first 3/20 of the grid dense, resets at 0.4 and 0.73 of the trajectory), which this used
    before, mostly keeps less at the same grid and token-steps (``--dense-shapes``, docs/bench-tokens.txt)."""
    return TokenStepConfig(budget=budget, buckets=16, branches=branches, min_active=min_active)


def ras(budget: float, steps: int) -> TokenStepConfig:
    """RAS's released rule and schedule, with 16 buckets so that low budgets are reachable."""
    return dataclasses.replace(ras_config(budget, steps), buckets=16)


def _applied(model: Model, config) -> Callable[[], AbstractContextManager]:
    return lambda: accel.apply(model.pipe, config)


def _fit(shares: list[tuple[float, float]], ratios: list[float]) -> np.ndarray:
    """Least-squares ``(a, c, d)`` of ``ratio = a + c * grid share + d * token-step share``."""
    design = np.array([[1.0, grid, tokens] for grid, tokens in shares])
    return np.linalg.lstsq(design, np.asarray(ratios), rcond=None)[0]


def _shares(config: TokenStepConfig | None, steps: int, model: Model, row_steps: int | None = None) -> tuple:
    """``(grid share, token-step share)`` of a run: a token config on ``steps`` steps, or ``row_steps`` plain."""
    if config is None:
        return (row_steps / steps,) * 2
    return config.grid_steps(steps) / steps, config.planned_fraction(steps, model.tokens)


def measured_speedups(model: Model, runs: dict[str, tuple], repeats: int = 3) -> dict[str, float]:
    """Per run ``name -> (context factory, steps)``, full compute's time over the run's on the probe prompts:
    interleaved rounds after one warm-up call, the fastest round of each (the machine is shared)."""
    probe = model.prompts[: model.probe]
    model.generate(probe, runs["full"][1], 0)
    fns = {name: (lambda n=n: model.generate(probe, n, 0)) for name, (_, n) in runs.items()}
    timings = time_interleaved(fns, repeats=repeats, warmup=0, around={k: c for k, (c, _) in runs.items()})
    return {name: min(timings["full"].samples) / min(timing.samples) for name, timing in timings.items()}


def _front_cache(model: Model, index: int, steps: int) -> CacheConfig:
    """Block caching with the ``index``-th member of the model's front, resampled to ``steps`` steps."""
    return CacheConfig(schedule=model.front.schedules[index].resample(steps))


def _front_macs(front: Front) -> list[float]:
    """Each member's ``relative_macs`` metric (what the front's runtime is fitted on)."""
    if any("relative_macs" not in member.metrics for member in front):
        raise ValueError("bench tokens: every member of the caching front needs a relative_macs metric")
    return [float(member.metrics["relative_macs"]) for member in front]


def _runtime(model: Model, steps: int) -> dict[str, Callable]:
    """Time the calibration's runs and fit them (see the module docstring); returns the predicted runtime ratio
    of each method family: ``tokens(config or None, row_steps)``, ``fora(interval)`` and, for a model with a
    front, ``front(member index)`` (``a + b * relative MACs``, fitted on its members with the most and fewest)."""
    layout = layout_of(model.pipe)
    configs = {"ours-all-0.5": ours(0.5, steps, min_active=0), "ours-all-0.2": ours(0.2, steps, min_active=0)}
    configs["ours-0.2"] = ours(0.2, steps)
    probes = {"full": (nullcontext, steps)}
    probes.update({name: (_applied(model, config), steps) for name, config in configs.items()})
    probes.update({f"steps-{n}": (nullcontext, n) for n in (steps // 2, steps // 4)})
    probes.update({f"fora-{k}": (_applied(model, CacheConfig(schedule=fora(layout, steps, k))), steps) for k in (2, 4)})
    macs = _front_macs(model.front) if model.front is not None else []
    ends = sorted({int(np.argmax(macs)), int(np.argmin(macs))}) if macs else []
    probes.update({f"front-{i}": (_applied(model, _front_cache(model, i, steps)), steps) for i in ends})
    ratios = {name: 1 / speedup for name, speedup in measured_speedups(model, probes).items()}
    shares = {"full": (1.0, 1.0), **{name: _shares(config, steps, model) for name, config in configs.items()}}
    shares.update({f"steps-{n}": (n / steps, n / steps) for n in (steps // 2, steps // 4)})
    fit = _fit(list(shares.values()), [ratios[name] for name in shares])
    slope = (ratios["fora-2"] - ratios["fora-4"]) / (1 / 2 - 1 / 4)
    fora_fit = (ratios["fora-4"] - slope / 4, slope)
    predict = {
        "tokens": lambda config, n=steps: float(fit @ np.array([1.0, *_shares(config, steps, model, n)])),
        "fora": lambda interval: fora_fit[0] + fora_fit[1] / interval,
    }
    line = f"FORA-2/4 {ratios['fora-2']:.2f}/{ratios['fora-4']:.2f}"
    if ends:
        front_fit = np.polyfit([macs[i] for i in ends], [ratios[f"front-{i}"] for i in ends], len(ends) - 1)
        predict["front"] = lambda i: float(np.polyval(front_fit, macs[i]))
        line += ", front " + "/".join(f"{ratios[f'front-{i}']:.2f}" for i in ends) + " (members with most/fewest MACs)"
    print(
        f"{model.name}: calibration on {model.probe} prompts: runtime ratio = {fit[0]:.2f} + {fit[1]:.2f} x grid "
        f"share + {fit[2]:.2f} x token-step share, {line}"
    )
    return predict


def _knobs(model: Model, steps: int, predict: dict[str, Callable], min_actives: tuple[float, ...]) -> dict:
    """Every method's :class:`Knob`: budgets 0.05..1 (ours, RAS), steps from 2 (PixArt's pipeline treats a
    1-step call as a distilled model's), FORA intervals, front members."""
    tokens, budgets = predict["tokens"], [round(float(b), 2) for b in np.arange(0.05, 1.0001, 0.01)]
    knobs = {
        "ours": Knob(budgets, budgets[0], lambda b: tokens(ours(b, steps))),
        "ours-all-steps": Knob(budgets, budgets[0], lambda b: tokens(ours(b, steps, min_active=0))),
        "ras": Knob(budgets, budgets[0], lambda b: tokens(ras(b, steps))),
        "steps": Knob(range(2, steps + 1), 2, lambda n: tokens(None, n)),
        "fora": Knob(range(2, steps + 1), steps, predict["fora"]),
    }
    for m in min_actives:
        knobs[f"min_active-{m:g}"] = Knob(budgets, budgets[0], lambda b, m=m: tokens(ours(b, steps, min_active=m)))
    if "front" in predict:
        members = range(len(model.front))
        fastest = min(members, key=predict["front"])
        knobs["front"] = FrontKnob(members, fastest, predict["front"], front=model.front)
    return knobs


def calibrate(model: Model, steps: int, min_actives: tuple[float, ...] = ()) -> dict[float, dict]:
    """Per target runtime ratio, the knob of every method (see the module docstring), and for each value ``m`` of
    ``min_actives`` the budget of ours with ``min_active=m`` (key ``"min_active-m"``); ``"predicted"``: each
    method's predicted runtime ratio there, ``"unreachable"``: the methods that miss the target
    (:func:`~accel.bench.token_report.reaches`)."""
    knobs = _knobs(model, steps, _runtime(model, steps), min_actives)
    knob_of = {**knobs, "ours-at-steps": knobs["ours"]}  # ours aimed at the fewer-steps row's runtime
    chosen = {}
    for target in TARGETS:
        picked = {name: knob.pick(target) for name, knob in knobs.items()}
        predicted = {name: knobs[name].predict(value) for name, value in picked.items()}
        picked["ours-at-steps"] = knobs["ours"].pick(predicted["steps"])
        predicted["ours-at-steps"] = knobs["ours"].predict(picked["ours-at-steps"])
        missed = [name for name in picked if not reaches(predicted[name], target)]
        chosen[target] = {**picked, "predicted": predicted, "unreachable": missed}
        said = [
            f"{name} ({predicted[name]:.2f}{' clamped' * (picked[name] == knob_of[name].fastest)})" for name in missed
        ]
        print(f"  at {target:g}: chosen {picked}; unreachable within {TOLERANCE:.0%}: {', '.join(said) or 'none'}")
    return chosen


def methods(model: Model, steps: int, chosen: dict[float, dict]) -> dict[str, tuple]:
    """``name -> (target, context factory, steps, token config or None, calibrated method)`` of every row; with a
    front, its member at each target is a caching row beside FORA."""
    rows: dict[str, tuple] = {"full": (1.0, nullcontext, steps, None, None)}
    layout = layout_of(model.pipe)
    for target, knobs in chosen.items():
        tag = f"@{round(100 * target)}"
        for name, method, config in (
            ("ours", "ours", ours(knobs["ours"], steps)),
            ("ours-own", "ours", ours(knobs["ours"], steps, "own")),
            ("ours-all-steps", "ours-all-steps", ours(knobs["ours-all-steps"], steps, min_active=0)),
            ("ras", "ras", ras(knobs["ras"], steps)),
            ("ours-at-steps", "ours-at-steps", ours(knobs["ours-at-steps"], steps)),
        ):
            rows[f"{name}{tag}"] = (target, _applied(model, config), steps, config, method)
        rows[f"steps-{knobs['steps']}{tag}"] = (target, nullcontext, knobs["steps"], None, "steps")
        cache = CacheConfig(schedule=fora(layout, steps, knobs["fora"]))
        rows[f"fora-{knobs['fora']}{tag}"] = (target, _applied(model, cache), steps, None, "fora")
        if "front" in knobs:
            member = _applied(model, _front_cache(model, knobs["front"], steps))
            rows[f"front-{knobs['front']}{tag}"] = (target, member, steps, None, "front")
    return rows


def _generate_row(model: Model, name: str, context, row_steps: int) -> tuple[torch.Tensor, dict]:
    """One row's samples of every prompt, and for ``ours@*`` the handle's per-step active fractions (and at 25%
    the heat map of sample 0)."""
    with context() as handle:
        samples = model.generate(model.prompts, row_steps, 0)
        if not name.startswith("ours@"):
            return samples, {}
        stats = handle.stats()
    found = {"active": list(stats.active)}
    if name == "ours@25":
        found["heat_map"] = {"grid": stats.grid, "counts": stats.heat_maps[0][0].tolist(), "steps": stats.steps}
    return samples, found


def evaluate(model: Model, steps: int) -> dict:
    """Calibrate, generate every row, score; print the table; returns the rows, a heat map and the knobs. A row
    records its predicted runtime ratio and whether it reaches its target (``predicted``, ``reached``)."""
    chosen = calibrate(model, steps)
    full = model.generate(model.prompts, steps, 0)
    reference = model.generate(model.prompts, steps, REFERENCE_SEED)
    scores = Scores(model, full, reference)
    rows, heat = {}, None
    every = methods(model, steps, chosen)
    for name, (target, context, row_steps, config, method) in every.items():
        samples, found = (full, {}) if name == "full" else _generate_row(model, name, context, row_steps)
        heat = found.pop("heat_map", heat)
        rows[name] = {"target": target, **scores(samples), **found}
        if method is not None:
            rows[name]["predicted"] = chosen[target]["predicted"][method]
            rows[name]["reached"] = method not in chosen[target]["unreachable"]
        if config is not None:
            rows[name]["token_steps"] = config.planned_fraction(row_steps, model.tokens) * row_steps / steps
            rows[name]["grid_steps"] = config.grid_steps(row_steps)
    speedups = measured_speedups(model, {name: (context, n) for name, (_, context, n, *_) in every.items()})
    for name, speedup in speedups.items():
        rows[name]["speedup"] = speedup
    print_table(model, steps, rows)
    print_active(model.name, rows)
    baseline = "the better of FORA and the searched front's member" if model.front else "FORA (the model has no front)"
    return {"rows": rows, "heat_map": heat, "knobs": {str(k): v for k, v in chosen.items()}, "cache_baseline": baseline}


def _image_model(count: int) -> Model:
    from accel.bench.model import generate, load_dataset
    from accel.caching import load_front
    from accel.pipelines.default import DEFAULT_FRONT_DIR, load_default_pipeline

    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    _, captions, split = load_dataset()
    held_out = np.flatnonzero(split == "test")
    prompts = [captions[i] for i in held_out[np.linspace(0, len(held_out) - 1, count).round().astype(int)]]
    patch = pipe.transformer.config.patch_size
    tokens = (pipe.transformer.config.sample_size // patch) ** 2
    run = lambda p, steps, seed: generate(pipe, p, steps, len(p), seed)  # noqa: E731
    return Model("image", pipe, prompts, run, tokens, count, front=load_front(DEFAULT_FRONT_DIR))


def _video_model(count: int) -> Model:
    from accel.bench.video_model import generate_clips, tokens_per_clip
    from accel.pipelines.video import load_default_video_pipeline

    pipe = load_default_video_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = list(VIDEO_PROMPTS[:count])
    run = lambda p, steps, seed: generate_clips(pipe, p, steps, len(p), seed)  # noqa: E731
    return Model("video", pipe, prompts, run, tokens_per_clip(pipe), min(2, count))


def run(argv: list[str]) -> dict:
    """Run the benchmark; returns the JSON line's fields (video keys bare, image keys prefixed ``image_``)."""
    parser = argparse.ArgumentParser(prog="python -m accel.bench tokens", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=8, help="image prompts (held-out captions)")
    parser.add_argument("--clips", type=int, default=4, help=f"video prompts (1..{len(VIDEO_PROMPTS)})")
    parser.add_argument("--skip-image", action="store_true")
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    diagnostic = parser.add_mutually_exclusive_group()
    diagnostic.add_argument(
        "--bounds", action="store_true", help="where the quality goes, beside bounds that compute every token, instead"
    )
    diagnostic.add_argument(
        "--curve", action="store_true", help="ours and fewer steps at several settings, compared at equal speed"
    )
    diagnostic.add_argument(
        "--dense-shapes", action="store_true", help="ours with other dense schedules at equal token-steps instead"
    )
    diagnostic.add_argument(
        "--sweep-min-active", action="store_true", help="ours at several min_active values and equal runtime instead"
    )
    args = parser.parse_args(argv)
    if args.steps < 8 or not 1 <= args.clips <= len(VIDEO_PROMPTS) or args.images < 2:
        raise ValueError(f"--steps >= 8, --images >= 2, --clips in 1..{len(VIDEO_PROMPTS)}")
    if args.skip_image and args.skip_video:
        raise ValueError("--skip-image and --skip-video together leave no model to run")
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = ("bounds", "curve", "dense_shapes", "sweep_min_active")
    chosen = next((flag for flag in flags if getattr(args, flag)), None)
    if chosen:
        from accel.bench import token_bounds

        diagnostic = {
            "bounds": token_bounds.bounds,
            "curve": token_bounds.speed_curve,
            "dense_shapes": token_bounds.dense_shapes,
            "sweep_min_active": token_bounds.min_active_sweep,
        }[chosen]
        name = "min_active_sweep" if chosen == "sweep_min_active" else chosen  # the JSON key earlier runs wrote
        models = [] if args.skip_video else [_video_model(args.clips)]
        models += [] if args.skip_image else [_image_model(args.images)]
        return {name: {model.name: diagnostic(model, args.steps) for model in models}}
    result, details = {}, {}
    if not args.skip_video:
        details["video"] = evaluate(_video_model(args.clips), args.steps)
        result.update(headline(details["video"]["rows"]))
    if not args.skip_image:
        details["image"] = evaluate(_image_model(args.images), args.steps)
        result.update(headline(details["image"]["rows"], "image_"))
    for name, found in details.items():
        print_heat_map(name, found["heat_map"])
    result["details"] = json.loads(json.dumps(details, default=float))
    return result
