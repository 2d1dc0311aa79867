"""Many methods side by side on one calibrated :class:`~accel.caching.search.Evaluator`: decoded images, PSNR
against full compute, interleaved timings, FID and prompt scores, and the run-to-run noise.

The measuring half of ``python -m accel.bench search`` (which prints and judges the rows): a method is a
context factory (entered around each pipeline call), ``"full"`` (a ``nullcontext``) among them. Every number
comes from the one PSNR (:func:`accel.eval.metrics.psnr`), the one timer (:mod:`accel.eval.timing`) and the
one noise model (:mod:`accel.eval.noise`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from accel.eval.metrics import psnr
from accel.eval.noise import paired_standard_error, run_to_run_noise
from accel.eval.timing import time_interleaved

logger = logging.getLogger(__name__)

Context = Callable[[], AbstractContextManager]


def generate_in_batches(evaluator, context: Context, n: int, batch: int, seed: int | None = None) -> torch.Tensor:
    """Final latents of the evaluator's first ``n`` prompts, ``batch`` per pipeline call, each call inside
    ``context()``; seeds from ``seed`` (default: the evaluator's)."""
    chunks = []
    for start in range(0, n, batch):
        with context():
            chunks.append(evaluator.generate(None, min(batch, n - start), start, seed))
    return torch.cat(chunks)


def measure_methods(evaluator, contexts: dict[str, Context], batch: int, repeats: int) -> tuple[dict, dict]:
    """Decoded images (kept on the CPU) of every method on all the evaluator's prompts, their PSNR against
    ``"full"``'s, and
    interleaved timings of one ``batch``-prompt call (one warm-up round, ``repeats`` timed ones).

    Returns:
        ``(rows, images)``: per method ``{"psnr", "speedup"`` (fastest repeats' ratio to full compute's),
        ``"median_speedup", "spread"}`` and its decoded images.
    """
    n = len(evaluator.prompts)
    images = {}
    for name, context in tqdm(contexts.items(), desc="methods", unit="method"):
        images[name] = evaluator.decode(generate_in_batches(evaluator, context, n, batch)).cpu()
    rows = {name: {"psnr": float(psnr(im, images["full"], 1.0).mean())} for name, im in images.items()}
    timings = time_interleaved(
        {name: lambda: evaluator.generate(None, min(batch, n)) for name in contexts},
        repeats=repeats,
        warmup=1,
        around=contexts,
    )
    for name, timing in timings.items():
        rows[name]["speedup"] = min(timings["full"].samples) / min(timing.samples)
        rows[name]["median_speedup"] = timings["full"].median / timing.median
        rows[name]["spread"] = timing.spread
    return rows, images


@dataclass
class Scorers:
    """FID and prompt-score functions over decoded images, with the reference features computed once."""

    fid: Callable[[torch.Tensor], float]
    prompt_scores: Callable[[torch.Tensor], torch.Tensor]  # one per image, with its own prompt
    prompt_metric: str


def load_scorers(reference: torch.Tensor, prompts: Sequence[str]) -> Scorers:
    """FID on EfficientNet-Lite0 features against ``reference``, and the prompt score (CLIP where its weights
    are on disk, else the bundled alignment scorer) of each image against its own prompt."""
    from accel.eval.feature_metrics import load_prompt_scorer
    from accel.eval.fid import EfficientNetLite0Features, extract_features, frechet_distance
    from accel.eval.metrics import MetricWeights

    feature = EfficientNetLite0Features()
    real = extract_features(reference, feature)
    scorer, _ = load_prompt_scorer(MetricWeights())

    def prompt_scores(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.as_tensor(scorer.score(images.float(), list(prompts))).float().cpu()

    return Scorers(
        fid=lambda images: float(frechet_distance(real, extract_features(images, feature))),
        prompt_scores=prompt_scores,
        prompt_metric=getattr(scorer, "metric_name", "alignment"),
    )


def score_methods(
    rows: dict,
    images: dict,
    reference: torch.Tensor | None,
    evaluator,
    *,
    batch: int,
    noise_seeds: Sequence[int],
    reference_seed: int,
) -> dict:
    """Add FID, prompt score and its paired standard error to every row; return the run-to-run noise.

    Args:
        rows, images: from :func:`measure_methods` (``"full"`` among them).
        reference: the FID reference images, uint8 or in ``[0, 1]``; None: full compute with seeds from
            ``reference_seed``.
        evaluator: the evaluator the images came from.
        batch: prompts per pipeline call.
        noise_seeds: first seeds of the extra full-compute seed sets (at least one) that, with the evaluator's
            own, measure the noise.
        reference_seed: see ``reference``.

    Returns:
        ``{"fid", "prompt_score"}``: the noise (:func:`~accel.eval.noise.run_to_run_noise`), with the values it
        came from (``"full_fids"``, ``"full_prompt_scores"``), ``"reference"`` (what FID compared with) and
        ``"prompt_metric"``.
    """
    prompts = evaluator.prompts
    if reference is None:
        reference = evaluator.decode(evaluator.generate(None, len(prompts), seed=reference_seed)).cpu()
        reference_label = f"{len(reference)} full-compute images with seeds from {reference_seed}"
    else:
        reference_label = f"the {len(reference)} images of the emoji set"
    scorers = load_scorers(reference, prompts)
    full_scores = scorers.prompt_scores(images["full"])
    for name, im in tqdm(images.items(), desc="FID", unit="method"):
        scores = scorers.prompt_scores(im)
        rows[name]["fid"] = scorers.fid(im)
        rows[name]["prompt_score"] = float(scores.mean())
        rows[name]["prompt_score_se"] = paired_standard_error(scores, full_scores)
    fids, scores = [rows["full"]["fid"]], [rows["full"]["prompt_score"]]
    for seed in noise_seeds:
        decoded = evaluator.decode(generate_in_batches(evaluator, nullcontext, len(prompts), batch, seed)).cpu()
        fids.append(scorers.fid(decoded))
        scores.append(float(scorers.prompt_scores(decoded).mean()))
    return {
        **run_to_run_noise({"fid": fids, "prompt_score": scores}),
        "full_fids": fids,
        "full_prompt_scores": scores,
        "reference": reference_label,
        "prompt_metric": scorers.prompt_metric,
    }


def dynamic_method_contexts(pipe: Any, steps: int, names: Sequence[str], calibration) -> dict[str, Context]:
    """Context factories of evaluation-harness methods (accel's first-block cache, diffusers' caches) by name;
    those that cannot run on ``pipe`` are skipped (logged). MagCache's ratios are calibrated on
    ``calibration`` (an evaluator: one full-compute prompt)."""
    from accel.eval.diffusers_cache import calibrate_mag_ratios
    from accel.eval.methods import Method, UnsupportedMethod, apply_method, parse_method

    contexts = {}
    for name in names:
        method = parse_method(name)
        if method.kind == "diffusers-magcache":
            ratios = calibrate_mag_ratios(pipe.transformer, lambda: calibration.generate(None, 1))
            method = Method(name=name, kind=method.kind, params={"mag_ratios": [round(r, 5) for r in ratios]})
        try:
            with apply_method(method, pipe, steps):
                pass
        except (UnsupportedMethod, ValueError, TypeError, NotImplementedError) as error:
            logger.info("%s skipped: %s", name, error)
            continue
        contexts[name] = lambda m=method: apply_method(m, pipe, steps)
    return contexts
