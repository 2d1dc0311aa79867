"""The caching schedule search with the quantized model in the loop: the front of the combination.

CacheQuant's point is that caching and quantization are not orthogonal: a schedule chosen on the full-precision
model is not the best one for the quantized model. :func:`search_schedules` runs the caching search
(:func:`accel.caching.search.search`: NSGA-II seeded with heuristics and DP schedules, or the DP schedules alone)
with the transformer quantized by a :class:`~accel.quant.QuantConfig` while every candidate runs:

* the reference outputs, the change matrices' shapes and the MACs per component come from the full-precision
  model (an :class:`~accel.caching.search.Evaluator` built before quantizing), so each candidate's PSNR is that
  of *cache + quantization* against full precision and full compute;
* the change matrices the DP seeds are computed from are then recorded again on the quantized model;
* the model identity that checkpoints and fitted latency models are keyed by is that of the quantized weights,
  so a full-precision search's checkpoint is never resumed by a quantized one (and the reverse);
* the cost must be measured (``EvaluatorConfig.cost`` ``"latency"`` or ``"fitted"``): MACs are the same with
  int8 weights, so a MAC cost cannot see what quantization changes in time. ``"latency"`` is each candidate's
  wall clock over the *full-precision* full-compute run; ``"fitted"`` is a latency model fitted on the quantized
  model, so relative to the quantized model's full compute (it ranks candidates alike);
* with ``SearchConfig.time_repeats``, each front member's ``speedup`` is timed (quantized + cached) against
  the full-precision model with full compute, interleaved.

The quantization is removed when the search ends (``remove()``: the original weights, bit for bit). A correction
(``QuantConfig.correct``) is calibrated once, without a cache, since one calibration per candidate schedule
would cost more than the search; calibrate under the picked schedule afterwards for the cache-aware correction.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import accel
from accel.caching.config import CacheConfig
from accel.caching.schedule import Schedule
from accel.caching.search.config import SearchConfig
from accel.caching.search.evaluator import Evaluator, model_identity
from accel.caching.search.features import record_features
from accel.caching.search.front import Front
from accel.caching.search.runner import search
from accel.quant.config import QuantConfig
from accel.quant.schemes import check_scheme

logger = logging.getLogger(__name__)


def search_schedules(
    pipe: Any,
    prompts: list[str],
    quant: QuantConfig,
    config: SearchConfig,
    out_dir: str | Path,
    *,
    resume: bool = True,
    call_kwargs: dict | None = None,
    info: dict | None = None,
    evaluator: Evaluator | None = None,
) -> Front:
    """Search caching schedules for ``pipe`` with its transformer quantized by ``quant``; save the front in
    ``out_dir`` (as :func:`accel.caching.search.search` does) and return it.

    Args:
        pipe: a diffusers pipeline with a supported transformer, in full precision (it is left so).
        prompts: calibration prompts of the search.
        quant: how the transformer is quantized while candidates run (a plan, or a scheme; a config that needs
            calibration is calibrated once, on the uncached trajectory).
        config: the search's settings; ``config.evaluation.cost`` must be ``"latency"`` or ``"fitted"``.
        out_dir: output folder (``front.json``, ``schedule-NN.json``, checkpoints).
        resume: continue from a checkpoint of the same quantized model in ``out_dir``.
        call_kwargs: extra pipeline arguments (see :class:`~accel.caching.search.Evaluator`).
        info: extra fields for ``front.json``'s ``info``.
        evaluator: an :class:`~accel.caching.search.Evaluator` already built on the full-precision ``pipe`` and
            ``prompts`` (its change matrices and model identity are replaced by the quantized model's).

    Returns:
        the :class:`~accel.caching.search.Front`; ``front.info["quant"]`` says how the model was quantized, and
        so does every member's ``provenance["quant"]`` (its scores hold with that quantization applied).

    Raises:
        ValueError: a MAC cost, or an ``evaluator`` built with another cost.
        RuntimeError: the scheme cannot run on the transformer's device (e.g. fp8 on a CPU); checked, like the
            cost, before any pipeline run.
    """
    if config.evaluation.cost == "macs":
        raise ValueError(
            "a quantized search needs a measured cost: SearchConfig(evaluation=EvaluatorConfig(cost='latency' or "
            "'fitted')); MACs are the same with int8 weights, so they cannot see what quantization changes in time"
        )
    check_scheme(quant.scheme, next(pipe.transformer.parameters()).device)  # before the evaluator's runs
    if evaluator is None:
        evaluator = Evaluator(pipe, prompts, config.evaluation, call_kwargs)
    elif evaluator.config != config.evaluation:
        raise ValueError("the evaluator was built with another EvaluatorConfig than config.evaluation")
    with accel.apply(pipe, quant) as handle:
        stats = handle[QuantConfig].stats()
        plan = handle[QuantConfig].plan  # timed under each schedule as it ran in the search (no new calibration)
        applied = QuantConfig(scheme=quant.scheme, layers=quant.scope, plan=plan, correct=None if plan else False)
        with record_features(
            pipe.transformer, evaluator.layout.components, evaluator.config.sketch_size, evaluator.config.seed
        ) as recorder:
            evaluator.generate(None, len(evaluator.prompts))
        evaluator.change = recorder.change_matrices()
        evaluator.model_identity = {**model_identity(pipe), "quant_scheme": quant.scheme}
        quant_info = {
            "scheme": quant.scheme,
            "layers": quant.scope,
            "layers_per_scheme": stats.layers_per_scheme,
            "weight_memory_ratio": round(stats.weight_memory_ratio, 4),
            "calibrated": applied.plan is not None,
            "cost_relative_to": "full precision" if config.evaluation.cost == "latency" else "quantized model",
        }
        logger.info("searching with %s in the loop (%s)", quant.scheme, stats.layers_per_scheme)
        front = search(
            pipe, prompts, replace(config, time_repeats=0), out_dir, resume=resume, call_kwargs=call_kwargs,
            info={**(info or {}), "quant": quant_info}, evaluator=evaluator,
        )  # fmt: skip
    if not len(front):  # a non-main process of a multi-process search: the main one saves
        return front
    marked = {"scheme": quant.scheme, "layers": quant.scope, "replay": "with this QuantConfig applied"}
    front = replace(front, schedules=tuple(replace(s, provenance={**s.provenance, "quant": marked}) for s in front))
    if config.time_repeats:
        speedups = measure_combined_speedups(evaluator, list(front.schedules), applied, config.time_repeats)
        front = replace(front, schedules=tuple(s.with_metrics(speedup=round(v, 4)) for s, v in zip(front, speedups)))
    front.save(out_dir)
    return front


def measure_combined_speedups(
    evaluator: Evaluator, schedules: list[Schedule], quant: QuantConfig, repeats: int, batch: int = 2
) -> list[float]:
    """Wall-clock speedup of each schedule run on the model quantized by ``quant`` over the full-precision model
    with full compute, on ``batch`` calibration prompts; interleaved after a warm-up round, fastest repeat of
    each (quantizing happens outside the timed calls)."""
    from accel.eval.timing import time_interleaved

    batch = min(batch, len(evaluator.prompts))
    names = [f"schedule-{i:02d}" for i in range(len(schedules))]
    around = {
        name: (lambda s=schedule: accel.apply(evaluator.pipe, quant, CacheConfig(schedule=s, count_macs=False)))
        for name, schedule in zip(names, schedules)
    }
    runs = {name: (lambda: evaluator.generate(None, batch)) for name in ["full", *names]}
    timings = time_interleaved(runs, repeats=repeats, warmup=1, around=around)
    fastest_full = min(timings["full"].samples)
    return [fastest_full / min(timings[name].samples) for name in names]
