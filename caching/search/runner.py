"""The search as one call: calibrate, seed, search (NSGA-II or DP only), measure the front, save it.

Typical use::

    from accel.caching.search import SearchConfig, search, load_front
    front = search(pipe, prompts, SearchConfig(budget_seconds=1800), "schedules/")
    schedule = load_front("schedules/").pick(target_speedup=2.5)
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from accel.caching.heuristics import fora
from accel.caching.schedule import Schedule
from accel.caching.search.config import SearchConfig
from accel.caching.search.evaluator import Evaluator
from accel.caching.search.front import Front
from accel.caching.search.latency import LatencyModel, fit_latency_model
from accel.caching.search.nsga import GeneticSearch
from accel.caching.search.seeds import dp_schedules, heuristic_schedules, ramp_schedules
from accel.caching.search.workers import Workers
from accel.eval.pareto import non_dominated
from accel.serialization import lock_folder

logger = logging.getLogger(__name__)


def seed_schedules(evaluator: Evaluator, config: SearchConfig) -> dict[str, Schedule]:
    """Heuristic and DP schedules for this model and step count, by name, at each of the search's forecast
    orders.

    Besides the baselines: FORA-5, FORA-3..6 after uncached first steps (20% of the steps) and the ramps of
    :func:`ramp_schedules`, so that the initial population spans the costs below FORA-4's too (which the reuse
    cap makes hard to reach by bit flips) with computes placed early. With one order every seed takes it;
    with several, each seed comes at each order, named ``NAME`` at its own order (TaylorSeer's is 1, the
    others' 0) or at the first order if its own is not searched, ``NAME@oK`` at the others.
    """
    steps = config.evaluation.num_steps
    seeds = heuristic_schedules(evaluator.layout, steps)
    warmup = max(1, round(0.2 * steps))  # cheaper seeds too, with and without uncached first steps
    for interval in (3, 4, 5, 6):
        seeds[f"fora-{interval}-warmup-{warmup}"] = fora(evaluator.layout, steps, interval, warmup=warmup)
    seeds["fora-5"] = fora(evaluator.layout, steps, 5)
    seeds.update(ramp_schedules(evaluator.layout, steps, config.constraints.max_consecutive_reuse))
    seeds.update(
        dp_schedules(evaluator.layout, evaluator.change, config.constraints, evaluator.cost_model.component_macs)
    )
    return at_orders(seeds, config.forecast_orders)


def at_orders(schedules: dict[str, Schedule], orders: tuple[int, ...]) -> dict[str, Schedule]:
    """``schedules`` at each of the forecast ``orders``, named as :func:`seed_schedules` says."""
    result = {}
    for name, schedule in schedules.items():
        own = schedule.forecast_order if schedule.forecast_order in orders else orders[0]
        for order in sorted(orders, key=lambda o: o != own):
            result[name if order == own else f"{name}@o{order}"] = replace(schedule, forecast_order=order)
    return result


def _dp_front(evaluator: Evaluator, config: SearchConfig) -> list[tuple[Schedule, dict]]:
    layout, steps = evaluator.layout, config.evaluation.num_steps
    schedules = dp_schedules(layout, evaluator.change, config.constraints, evaluator.cost_model.component_macs)
    schedules = at_orders(schedules, config.forecast_orders)
    measured = [(s, evaluator.measure(s, images=True)) for s in schedules.values()]
    objectives = np.array([evaluator.objectives(m) for _, m in measured])
    keep = non_dominated(objectives)
    logger.info(
        "DP: %d schedules, %d on the front (%d steps, %d blocks)", len(measured), keep.sum(), steps, layout.num_blocks
    )
    return [pair for pair, k in zip(measured, keep) if k]


def search(
    pipe: Any,
    prompts: list[str],
    config: SearchConfig,
    out_dir: str | Path,
    *,
    resume: bool = True,
    call_kwargs: dict | None = None,
    info: dict | None = None,
    evaluator: Evaluator | None = None,
) -> Front:
    """Search caching schedules for ``pipe`` and save the front (and the checkpoint) in ``out_dir``.

    Args:
        pipe: a diffusers pipeline with a supported transformer.
        prompts: calibration prompts.
        config: search settings.
        out_dir: output folder: ``front.json``, ``schedule-NN.json``, ``search_state.*``.
        resume: continue from a checkpoint in ``out_dir`` (False starts over).
        call_kwargs: extra pipeline arguments (see :class:`Evaluator`).
        info: extra fields for ``front.json``'s ``info`` (e.g. the model id).
        evaluator: reuse an :class:`Evaluator` already calibrated on ``pipe`` and ``prompts``.

    Returns:
        the :class:`Front`, each schedule with ``metrics`` measured on all prompts (``image_psnr`` included).

    Raises:
        accel.serialization.FolderInUse: another search is writing ``out_dir`` (its lock is held until it ends).
    """
    out_dir = Path(out_dir)
    with lock_folder(out_dir, "accel search") if Workers().is_main else nullcontext():
        return _search(pipe, prompts, config, out_dir, resume, call_kwargs, info, evaluator)


def _search(pipe, prompts, config, out_dir: Path, resume, call_kwargs, info, evaluator) -> Front:
    """:func:`search` once ``out_dir`` is locked."""
    started = time.perf_counter()
    if evaluator is None:
        evaluator = Evaluator(pipe, prompts, config.evaluation, call_kwargs)
    if config.evaluation.cost == "fitted":
        evaluator.latency_model = _latency_model(evaluator, config, out_dir, resume)
    if config.method == "dp":
        members = _dp_front(evaluator, config)
        generations, evaluations = 0, len(members)
        search_seconds = time.perf_counter() - started
    else:
        if not resume:
            for path in [out_dir / "search_state.json", *out_dir.glob("search_state*.npz")]:
                path.unlink(missing_ok=True)
        seeds = seed_schedules(evaluator, config) if config.seed_schedules else {}
        genetic = GeneticSearch(evaluator, config, out_dir, seeds)
        found = genetic.run(resume=resume)
        members = [(genetic.encoding.schedule(g, **_provenance(genetic, g)), m) for g, m in found]
        generations, evaluations = genetic.generation, len(genetic.archive.order)
        search_seconds = genetic.elapsed
        if not genetic.workers.is_main:
            return Front(schedules=())
    schedules = []
    for schedule, metrics in members:
        full = metrics if "image_psnr" in metrics else {**metrics, **evaluator.measure(schedule, images=True)}
        schedules.append(replace(schedule, metrics=_rounded(full)))
    if config.time_repeats:
        speedups = measure_speedups(evaluator, schedules, config.time_repeats)
        schedules = [s.with_metrics(speedup=round(v, 4)) for s, v in zip(schedules, speedups)]
    front_info = {
        **(info or {}),
        "model_class": evaluator.layout.model_class,
        "model_identity": evaluator.model_identity,
        "num_steps": config.evaluation.num_steps,
        "prompts": evaluator.prompts,
        "method": config.method,
        "generations": generations,
        "evaluations": evaluations,
        "search_minutes": round(search_seconds / 60, 3),
        "full_compute_seconds": round(evaluator.full_seconds, 4),
        "config": json.loads(json.dumps(asdict(config))),
    }
    front = Front(schedules=tuple(schedules), info=front_info)
    front.save(out_dir)
    logger.info("front of %d schedules written to %s", len(front), out_dir)
    return front


def _latency_model(evaluator: Evaluator, config: SearchConfig, out_dir: Path, resume: bool) -> LatencyModel:
    """The search's fitted latency model: the saved one when resuming (so scores do not change), else fitted."""
    path = out_dir / "latency_model.json"
    if resume and path.is_file():
        saved = LatencyModel.load(path)
        if saved.model is None:
            logger.warning("%s records no model identity (an older file): reused as it is", path)
        elif saved.model != evaluator.model_identity:
            differ = [k for k in evaluator.model_identity if saved.model.get(k) != evaluator.model_identity[k]]
            raise ValueError(
                f"{path} was fitted on another model ({', '.join(differ)} differ); pass another --out, or --restart "
                "to fit it again"
            )
        return saved
    model = fit_latency_model(evaluator, list(seed_schedules(evaluator, config).values()))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return model


def measure_speedups(evaluator: Evaluator, schedules: list[Schedule], repeats: int, batch: int = 2) -> list[float]:
    """Wall-clock speedup of each schedule over full compute on ``batch`` calibration prompts.

    Runs are interleaved round-robin after one warm-up round; each ratio uses the fastest repeat of each, the
    one least disturbed by other work on a shared machine.
    """
    import accel
    from accel.caching.config import CacheConfig
    from accel.eval.timing import time_interleaved

    batch = min(batch, len(evaluator.prompts))
    names = [f"schedule-{i:02d}" for i in range(len(schedules))]
    around = {
        name: (lambda s=schedule: accel.apply(evaluator.pipe, CacheConfig(schedule=s, count_macs=False)))
        for name, schedule in zip(names, schedules)
    }
    runs = {name: (lambda: evaluator.generate(None, batch)) for name in ["full", *names]}
    timings = time_interleaved(runs, repeats=repeats, warmup=1, around=around)
    fastest_full = min(timings["full"].samples)
    return [fastest_full / min(timings[name].samples) for name in names]


def _provenance(genetic: GeneticSearch, genome: np.ndarray) -> dict:
    return {
        "generator": "nsga2",
        "origin": genetic.origin(genome),
        "generation": genetic.generation,
        "seed": genetic.config.seed,
        "constraints": genetic.config.constraints.to_dict(),
    }


def _rounded(metrics: dict) -> dict:
    return {k: round(float(v), 5) if isinstance(v, (float, np.floating)) else v for k, v in metrics.items()}
