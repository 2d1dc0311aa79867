"""``python -m accel.bench tokens``: per-token step allocation against RAS, fewer steps and caching, at equal
measured runtime, on the bundled image model and the bundled video model.

For each model, a calibration first times the prompts (two clips on video) under full compute and two
settings of each method's knob, fits the runtime ratio to the share of the step grid that runs and the share of
token-steps computed (``a + c * grid + d * token-steps``, least squares; fewer steps have both equal to
``N / steps``; FORA: ``a + b / interval``), and picks the knob whose predicted runtime is 50% and 25% of full
compute. Then every method generates all prompts (same seeds as full compute), timed as it goes:

* ``ours``: :class:`~accel.caching.TokenStepConfig` with the velocity rule, CFG branches of a prompt paired, and
  its default ``min_active=0.8``: a budget below it also coarsens the step grid (both levers at once);
* ``ours-own``: the same with every row and branch selecting alone (the issue's per-branch requirement);
* ``ours-all-steps``: ours with ``min_active=0``, every step of the grid and fewer tokens (HSA's form);
* ``ras``: RAS's released rule and dense schedule (:func:`~accel.caching.ras_config`) in the same machinery;
* ``steps-N``: fewer flow-matching steps; ``fora-k``: block caching every k steps (FORA).

Per row: measured speed-up (on the calibration prompts, all rows interleaved, the fastest of three rounds
each), PSNR and SSIM against full compute, FID and KID (EfficientNet-Lite0 features) against full compute
with other seeds (so the full row shows the noise floor), the alignment score of each image (or frame) with
its prompt, and on video the motion accuracy.

``--bounds`` and ``--sweep-min-active`` run a diagnostic instead (:mod:`accel.bench.token_bounds`): where the
allocation loses its quality, at equal token-steps and without timing; ours at several ``min_active`` values at
equal runtime.
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
from accel.caching import CacheConfig, TokenStepConfig, fora, layout_of, ras_config
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
    """

    name: str
    pipe: object
    prompts: list[str]
    generate: Callable[[list[str], int, int], torch.Tensor]
    tokens: int
    probe: int


def ours(budget: float, steps: int, branches: str = "paired", min_active: float = 0.8) -> TokenStepConfig:
    """Our configuration at ``budget`` for calls of ``steps`` steps, 16 buckets. Its dense schedule follows the
    budget each step of the grid spends (``max(budget, min_active)``) and the grid's length: from 0.4, RAS's
    shape (the first 3/20 of the grid's steps, at least one, and resets at 0.4 and 0.73 of the trajectory where
    the grid has at least 8 steps: on a shorter one they leave few sparse steps, on 3 steps none); below, two
    steps first and one reset at 0.5 from 0.25, none lower (low budgets cannot pay for them)."""
    grid_budget = max(budget, min_active)
    if grid_budget >= 0.4:
        grid = TokenStepConfig(budget=budget, dense_steps=1, min_active=min_active).grid_steps(steps)
        dense, resets = max(1, round(0.15 * grid)), (0.4, 0.733) if grid >= 8 else ()
    else:
        dense, resets = 2, (0.5,) if grid_budget >= 0.25 else ()
    return TokenStepConfig(
        budget=budget,
        dense_steps=dense,
        reset_points=resets,
        buckets=16,
        branches=branches,
        min_active=min_active,
    )


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


def _speedups(model: Model, runs: dict[str, tuple], repeats: int = 3) -> dict[str, float]:
    """Per run ``name -> (context factory, steps)``, full compute's time over the run's on the probe prompts:
    interleaved rounds after one warm-up call, the fastest round of each (the machine is shared)."""
    probe = model.prompts[: model.probe]
    model.generate(probe, runs["full"][1], 0)
    fns = {name: (lambda n=n: model.generate(probe, n, 0)) for name, (_, n) in runs.items()}
    timings = time_interleaved(fns, repeats=repeats, warmup=0, around={k: c for k, (c, _) in runs.items()})
    return {name: min(timings["full"].samples) / min(timing.samples) for name, timing in timings.items()}


def calibrate(model: Model, steps: int, min_actives: tuple[float, ...] = ()) -> dict[float, dict]:
    """Per target runtime ratio, the knob of every method (see the module docstring), and for each value ``m`` of
    ``min_actives`` the budget of ours with ``min_active=m`` (key ``"min_active-m"``)."""
    layout = layout_of(model.pipe)
    configs = {"ours-all-0.5": ours(0.5, steps, min_active=0), "ours-all-0.2": ours(0.2, steps, min_active=0)}
    configs["ours-0.2"] = ours(0.2, steps)
    probes = {"full": (nullcontext, steps)}
    probes.update({name: (_applied(model, config), steps) for name, config in configs.items()})
    probes.update({f"steps-{n}": (nullcontext, n) for n in (steps // 2, steps // 4)})
    probes.update({f"fora-{k}": (_applied(model, CacheConfig(schedule=fora(layout, steps, k))), steps) for k in (2, 4)})
    ratios = {name: 1 / speedup for name, speedup in _speedups(model, probes).items()}
    shares = {"full": (1.0, 1.0), **{name: _shares(config, steps, model) for name, config in configs.items()}}
    shares.update({f"steps-{n}": (n / steps, n / steps) for n in (steps // 2, steps // 4)})
    fit = _fit(list(shares.values()), [ratios[name] for name in shares])
    fora_ratios = [ratios["fora-2"], ratios["fora-4"]]
    fora_slope = (fora_ratios[0] - fora_ratios[1]) / (1 / 2 - 1 / 4)
    fora_fit = (fora_ratios[1] - fora_slope / 4, fora_slope)
    budgets = np.round(np.arange(0.05, 1.0001, 0.01), 2)

    def predict(config: TokenStepConfig | None, row_steps: int = steps) -> float:
        return float(fit @ np.array([1.0, *_shares(config, steps, model, row_steps)]))

    chosen = {}
    for target in TARGETS:

        def best(build, target=target):
            return float(min(budgets, key=lambda b: abs(predict(build(b)) - target)))

        # two steps at least: PixArt's pipeline treats a 1-step call as a distilled model's
        number = min(range(2, steps + 1), key=lambda n: abs(predict(None, n) - target))
        interval = min(range(2, steps + 1), key=lambda k: abs(fora_fit[0] + fora_fit[1] / k - target))
        chosen[target] = {
            "ours": best(lambda b: ours(b, steps)),
            "ours-all-steps": best(lambda b: ours(b, steps, min_active=0)),
            "ras": best(lambda b: ras(b, steps)),
            "steps": number,
            "fora": interval,
            **{f"min_active-{m:g}": best(lambda b, m=m: ours(b, steps, min_active=m)) for m in min_actives},
        }
    print(
        f"{model.name}: calibration on {model.probe} prompts: runtime ratio = {fit[0]:.2f} + {fit[1]:.2f} x grid "
        f"share + {fit[2]:.2f} x token-step share, FORA-2/4 {fora_ratios[0]:.2f}/{fora_ratios[1]:.2f}; "
        f"chosen {chosen}"
    )
    return chosen


def methods(model: Model, steps: int, chosen: dict[float, dict]) -> dict[str, tuple]:
    """``name -> (target, context factory, steps, token config or None)`` of every row."""
    rows: dict[str, tuple] = {"full": (1.0, nullcontext, steps, None)}
    layout = layout_of(model.pipe)
    for target, knobs in chosen.items():
        tag = f"@{round(100 * target)}"
        for name, config in (
            ("ours", ours(knobs["ours"], steps)),
            ("ours-own", ours(knobs["ours"], steps, "own")),
            ("ours-all-steps", ours(knobs["ours-all-steps"], steps, min_active=0)),
            ("ras", ras(knobs["ras"], steps)),
        ):
            rows[f"{name}{tag}"] = (target, _applied(model, config), steps, config)
        rows[f"steps-{knobs['steps']}{tag}"] = (target, nullcontext, knobs["steps"], None)
        cache = CacheConfig(schedule=fora(layout, steps, knobs["fora"]))
        rows[f"fora-{knobs['fora']}{tag}"] = (target, _applied(model, cache), steps, None)
    return rows


def frames_of(samples: torch.Tensor) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` as they are, clips ``(N, F, 3, H, W)`` as ``(N * F, 3, H, W)`` frames."""
    return samples.flatten(0, 1) if samples.ndim == 5 else samples


def psnr_of(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean PSNR (dB) of the images or frames of ``samples`` in [0, 1] against ``reference``'s."""
    from accel.eval.metrics import psnr

    return float(psnr(frames_of(samples).float(), frames_of(reference).float(), 1.0).mean())


class Scores:
    """PSNR/SSIM against full compute, FID/KID against a full-compute reference, alignment, motion."""

    def __init__(self, model: Model, full: torch.Tensor, reference: torch.Tensor):
        from accel.eval.alignment import load_alignment_scorer

        self.model, self.full = model, full
        self.scorer = load_alignment_scorer()
        self.real = self._features(reference)[:, -1280:]

    def _features(self, samples: torch.Tensor) -> torch.Tensor:
        frames = frames_of(samples).float()
        with torch.no_grad():
            return torch.cat([self.scorer.frozen_image_features(frames[i : i + 64]) for i in range(0, len(frames), 64)])

    def __call__(self, samples: torch.Tensor) -> dict:
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        from accel.eval.fid import FidKidConfig, fid_kid_from_features

        frames, full = frames_of(samples).float(), frames_of(self.full).float()
        features = self._features(samples)
        fid = fid_kid_from_features(self.real.double(), features[:, -1280:].double(), "E", FidKidConfig())
        per_frame = samples.shape[1] if samples.ndim == 5 else 1
        prompts = [p for p in self.model.prompts for _ in range(per_frame)]
        with torch.no_grad():
            images = self.scorer.heads.embed_image_features(features.float())
            texts = self.scorer.embed_prompts(prompts)
        row = {
            "psnr": psnr_of(samples, self.full),
            "ssim": float(ssim(frames, full, data_range=1.0)),
            "fid": fid["FID-E"],
            "kid": fid["KID-E"],
            "alignment": float(100 * (images * texts).sum(-1).mean()),
        }
        if samples.ndim == 5:
            from accel.eval.motion import load_motion_scorer, motion_accuracy

            row["motion"] = motion_accuracy(load_motion_scorer(), samples, self.model.prompts)["accuracy"]
        return row


def evaluate(model: Model, steps: int) -> dict:
    """Calibrate, generate every row, score; print the table; returns the rows and a heat map."""
    chosen = calibrate(model, steps)
    full = model.generate(model.prompts, steps, 0)
    reference = model.generate(model.prompts, steps, REFERENCE_SEED)
    scores = Scores(model, full, reference)
    rows, heat = {}, None
    every = methods(model, steps, chosen)
    for name, (target, context, row_steps, config) in every.items():
        samples = full
        if name != "full":
            with context() as handle:
                samples = model.generate(model.prompts, row_steps, 0)
                if name == "ours@25":
                    stats = handle.stats()
                    heat = {"grid": stats.grid, "counts": stats.heat_maps[0][0].tolist(), "steps": stats.steps}
        rows[name] = {"target": target, **scores(samples)}
        if config is not None:
            rows[name]["token_steps"] = config.planned_fraction(row_steps, model.tokens) * row_steps / steps
            rows[name]["grid_steps"] = config.grid_steps(row_steps)
    speedups = _speedups(model, {name: (context, n) for name, (_, context, n, _) in every.items()})
    for name, speedup in speedups.items():
        rows[name]["speedup"] = speedup
    print_table(model, steps, rows)
    return {"rows": rows, "heat_map": heat, "knobs": {str(k): v for k, v in chosen.items()}}


def print_table(model: Model, steps: int, rows: dict) -> None:
    """One line per row."""
    print(f"\n{model.name} model: {len(model.prompts)} prompts, {steps} steps, {model.tokens} tokens per sample")
    motion = model.name == "video"
    header = (
        f"{'method':<16}{'target':>7}{'tokens':>7}{'speedup':>8}{'PSNR':>7}{'SSIM':>7}{'FID':>8}{'KID':>8}{'align':>7}"
    )
    print(header + ("  motion" if motion else ""))
    for name, row in rows.items():
        tokens = f"{row['token_steps']:.2f}" if "token_steps" in row else "-"
        line = (
            f"{name:<16}{row['target']:>7.2f}{tokens:>7}{row['speedup']:>8.2f}{row['psnr']:>7.2f}"
            f"{row['ssim']:>7.3f}{row['fid']:>8.2f}{row['kid']:>8.4f}{row['alignment']:>7.2f}"
        )
        print(line + (f"  {row['motion']:.2f}" if motion else ""))


def print_heat_map(name: str, heat: dict | None) -> None:
    """Per-token step counts of the first sample, as digits (``+`` for 10 or more), frame by frame."""
    if not heat:
        return
    counts = np.asarray(heat["counts"])
    asked, ran = heat["steps"]
    print(f"{name}: steps computed per token of sample 0 at the 25% point ({ran} of {asked} ran), frames side by side")
    frames = [["".join(str(v) if v < 10 else "+" for v in line) for line in frame] for frame in counts]
    for row in range(counts.shape[1]):
        print("  " + " ".join(frame[row] for frame in frames))


def _image_model(count: int) -> Model:
    from accel.bench.model import generate, load_dataset
    from accel.pipelines.default import load_default_pipeline

    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    _, captions, split = load_dataset()
    held_out = np.flatnonzero(split == "test")
    prompts = [captions[i] for i in held_out[np.linspace(0, len(held_out) - 1, count).round().astype(int)]]
    patch = pipe.transformer.config.patch_size
    tokens = (pipe.transformer.config.sample_size // patch) ** 2
    return Model("image", pipe, prompts, lambda p, steps, seed: generate(pipe, p, steps, len(p), seed), tokens, count)


def _video_model(count: int) -> Model:
    from accel.bench.video_model import generate_clips, tokens_per_clip
    from accel.pipelines.video import load_default_video_pipeline

    pipe = load_default_video_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = list(VIDEO_PROMPTS[:count])
    run = lambda p, steps, seed: generate_clips(pipe, p, steps, len(p), seed)  # noqa: E731
    return Model("video", pipe, prompts, run, tokens_per_clip(pipe), min(2, count))


def _headline(rows: dict, prefix: str = "") -> dict:
    """The issue's keys from one model's rows."""
    result = {}
    for target, tag in ((0.5, "50"), (0.25, "25")):
        at = {name.split("@")[0]: row for name, row in rows.items() if row["target"] == target}
        steps = next(row for name, row in at.items() if name.startswith("steps-"))
        cache = next(row for name, row in at.items() if name.startswith("fora-"))
        result.update({
            f"{prefix}psnr_at_{tag}": round(at["ours"]["psnr"], 2),
            f"{prefix}own_psnr_at_{tag}": round(at["ours-own"]["psnr"], 2),
            f"{prefix}ras_psnr_at_{tag}": round(at["ras"]["psnr"], 2),
            f"{prefix}steps_psnr_at_{tag}": round(steps["psnr"], 2),
            f"{prefix}cache_psnr_at_{tag}": round(cache["psnr"], 2),
            f"{prefix}speedup_at_{tag}": round(at["ours"]["speedup"], 2),
            f"{prefix}ras_speedup_at_{tag}": round(at["ras"]["speedup"], 2),
            f"{prefix}steps_speedup_at_{tag}": round(steps["speedup"], 2),
            f"{prefix}cache_speedup_at_{tag}": round(cache["speedup"], 2),
            f"{prefix}all_steps_psnr_at_{tag}": round(at["ours-all-steps"]["psnr"], 2),
            f"{prefix}all_steps_speedup_at_{tag}": round(at["ours-all-steps"]["speedup"], 2),
        })  # fmt: skip
    return result


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
    diagnostic.add_argument("--bounds", action="store_true", help="the diagnostic at equal token-steps instead")
    diagnostic.add_argument(
        "--sweep-min-active", action="store_true", help="ours at several min_active values and equal runtime instead"
    )
    args = parser.parse_args(argv)
    if args.steps < 8 or not 1 <= args.clips <= len(VIDEO_PROMPTS) or args.images < 2:
        raise ValueError(f"--steps >= 8, --images >= 2, --clips in 1..{len(VIDEO_PROMPTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bounds or args.sweep_min_active:
        from accel.bench.token_bounds import bounds, min_active_sweep

        models = [] if args.skip_video else [_video_model(args.clips)]
        models += [] if args.skip_image else [_image_model(args.images)]
        if args.bounds:
            return {"bounds": {model.name: bounds(model, args.steps) for model in models}}
        return {"min_active_sweep": {model.name: min_active_sweep(model, args.steps) for model in models}}
    result, details = {}, {}
    if not args.skip_video:
        details["video"] = evaluate(_video_model(args.clips), args.steps)
        result.update(_headline(details["video"]["rows"]))
    if not args.skip_image:
        details["image"] = evaluate(_image_model(args.images), args.steps)
        result.update(_headline(details["image"]["rows"], "image_"))
    for name, found in details.items():
        print_heat_map(name, found["heat_map"])
    result["details"] = json.loads(json.dumps(details, default=float))
    return result
