"""``accel.sparse.search``: a per-head plan for one pipeline, and its end-to-end check against dense.

    plan = accel.sparse.search(pipe, prompts, target_density=0.3, call_kwargs=DEFAULT_VIDEO_CALL_KWARGS)
    plan.save("wan-sparse.json")

The search profiles on the calibration prompts (:func:`profile_errors`), fits the cost model on this device
(:func:`accel.sparse.search.fit_cost_model`), solves for one pattern per head (:func:`accel.sparse.search.choose`)
and checks the plan end to end (:func:`compare_to_dense`): PSNR and SSIM of the decoded output against the dense
run with the same prompts, seeds, dtype and compile settings. The figures go into the plan's ``metrics``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from accel.api import apply, resolve
from accel.plan import Plan
from accel.sparse.apply import SparseAttentionConfig, SparseHandle, call_grid
from accel.sparse.patterns import HeadPattern, TokenGrid, density
from accel.sparse.plan import make_plan, plan_density, sparse_layers, trajectory_density, uniform_plan
from accel.sparse.search import (
    Choice,
    ErrorRecorder,
    Goal,
    candidate_densities,
    candidate_patterns,
    choose,
    fit_cost_model,
    tile_densities,
)

logger = logging.getLogger(__name__)


def run_pipeline(pipe: Any, prompts: Sequence[str], steps: int, seed: int, call_kwargs: dict | None) -> torch.Tensor:
    """The pipeline's decoded output for ``prompts`` (prompt ``i`` seeded ``seed + i``), float in [0, 1]:
    ``(N, 3, H, W)`` images or ``(N, F, 3, H, W)`` videos."""
    from accel.eval.generation import generate

    kwargs = {"output_type": "pt", **(call_kwargs or {})}
    guidance = kwargs.pop("guidance_scale", None)
    if guidance is None:  # the pipeline's own default
        return _call(pipe, prompts, steps, seed, kwargs)
    return generate(pipe, prompts, [seed + i for i in range(len(prompts))], steps, guidance, kwargs)


def _call(pipe: Any, prompts: Sequence[str], steps: int, seed: int, kwargs: dict) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    output = pipe(list(prompts), num_inference_steps=steps, generator=generators, **kwargs)
    result = output.frames if hasattr(output, "frames") else output.images
    return result.float().clamp(0, 1).cpu()


def compare_to_dense(candidate: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    """PSNR (dB, over each sample, averaged) and SSIM (over frames) of ``candidate`` against ``dense``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    from accel.eval.metrics import psnr

    frames = (lambda t: t.flatten(0, 1)) if candidate.ndim == 5 else (lambda t: t)
    return {
        "psnr": float(psnr(candidate, dense).mean()),
        "ssim": float(structural_similarity_index_measure(frames(candidate), frames(dense), data_range=1.0)),
    }


def profile_errors(
    pipe: Any,
    prompts: Sequence[str],
    candidates: Sequence[HeadPattern],
    steps: int,
    profile_steps: Sequence[int],
    rows: int = 64,
    seed: int = 0,
    call_kwargs: dict | None = None,
) -> tuple[list[np.ndarray], TokenGrid]:
    """Per layer, ``(heads, candidates)`` mean relative errors measured along the dense trajectory of
    ``prompts`` at the steps ``profile_steps``; and the token grid seen."""
    target = resolve(pipe)
    layers = sparse_layers(target.transformer, target.spec)
    probe = make_plan([[HeadPattern()] * geometry.heads for geometry, _ in layers])  # every layer patched
    wanted = set(profile_steps)

    def active() -> bool:
        context = target.tracker.current
        return context is not None and context.step in wanted

    generator = torch.Generator().manual_seed(seed)
    recorders = [ErrorRecorder(candidates, rows, active, generator, _out_weight(module)) for _, module in layers]

    def factory(index: int, grid: TokenGrid, device: torch.device) -> ErrorRecorder:
        recorders[index].grid = grid
        return recorders[index]

    target.tracker.acquire()
    handle = SparseHandle(target, SparseAttentionConfig(plan=probe), kernel_factory=factory)
    try:
        run_pipeline(pipe, prompts, steps, seed, call_kwargs)
    finally:
        handle.remove()
        target.tracker.release()
    return [recorder.mean_errors() for recorder in recorders], recorders[0].grid


def search(
    pipe: Any,
    prompts: Sequence[str],
    target_density: float | None = None,
    min_psnr: float | None = None,
    target_speedup: float | None = None,
    steps: int = 20,
    profile_steps: Sequence[int] | None = None,
    rows: int = 64,
    seed: int = 0,
    call_kwargs: dict | None = None,
    check_prompts: Sequence[str] | None = None,
    rounds: int = 1,
    refine: bool = True,
    dense_steps: int = 0,
) -> Plan:
    """Choose a pattern per layer and head for ``pipe``; see the module docstring.

    Args:
        pipe: a pipeline whose transformer has a sparse processor (Wan today).
        prompts: calibration prompts (a few).
        target_density: minimise the predicted error subject to this mean attention density (0..1); or
        min_psnr: minimise the predicted time subject to a predicted PSNR against dense of at least this (dB); or
        target_speedup: minimise the predicted error subject to the cost model's attention time being at most the
            dense attention time divided by this (> 1): the summed per-head costs of every layer, averaged over
            the trajectory like ``target_density`` (dense steps at the dense cost). Attention only: the rest of a
            step does not get faster.
        steps: denoising steps of the calibration and check runs.
        profile_steps: the steps profiled (default: four spread over the trajectory).
        rows: query rows drawn per attention call.
        seed: seeds of the runs and of the row draws.
        call_kwargs: extra pipeline call arguments (size, frames, guidance).
        check_prompts: prompts of the end-to-end check (default: ``prompts``).
        rounds: solve-and-calibrate rounds (:class:`Calibration`): after each solve, the (layer, pattern) pairs
            the answer uses are measured end to end, until none is left unmeasured.
        refine: with ``target_density``, improve the solved plan layer by layer end to end
            (:func:`refine_layers`).
        dense_steps: the first steps run dense (saved in the plan). ``target_density`` is then the density
            averaged over all ``steps`` (:func:`~accel.sparse.plan.trajectory_density`), so the sparse steps get
            a lower one, and only sparse steps are profiled.

    Returns:
        The plan, with ``metrics`` holding its density, predicted error and time, the end-to-end PSNR/SSIM
        against dense, the cost model's points and the search's wall and CPU time (seconds).

    Raises:
        ValueError: bad arguments, a goal the dense steps alone already miss, or a transformer with no layer to
            sparsify (checked before any compute).
    """
    goal = _check_search(pipe, prompts, target_density, min_psnr, target_speedup, steps, rows, dense_steps)
    first = dense_steps
    default_profile = np.linspace(first, steps - 1, min(4, steps - first)).round().astype(int).tolist()
    profile_steps = sorted(set(profile_steps or default_profile))
    if profile_steps[0] < first or profile_steps[-1] >= steps:
        raise ValueError(f"profile_steps must lie in {first}..{steps - 1} (the sparse steps), got {profile_steps}")
    start, cpu_start = time.perf_counter(), time.process_time()
    transformer = resolve(pipe).transformer
    geometry = sparse_layers(transformer)[0][0]
    probe_grid = grid_of_call(pipe, prompts, call_kwargs)
    candidates = candidate_patterns(probe_grid)
    errors, grid = profile_errors(pipe, prompts, candidates, steps, profile_steps, rows, seed, call_kwargs)
    parameter = next(transformer.parameters())
    cost = fit_cost_model(grid, geometry.heads, geometry.head_dim, parameter.device, parameter.dtype)
    tiles = tile_densities(candidates, grid)
    costs = np.array([cost.head_cost(p, t) for p, t in zip(candidates, tiles, strict=True)])
    densities = candidate_densities(candidates, grid)
    if goal.cost_fraction is not None:  # the sparse steps' share of the dense heads' summed cost
        goal = replace(goal, max_cost=goal.cost_fraction * cost.dense_head * sum(len(e) for e in errors))
    near = goal.sparse_density if goal.sparse_density is not None else 0.4
    probe = min((i for i, p in enumerate(candidates) if p.kind == "sparse"), key=lambda i: abs(densities[i] - near))
    calibration = Calibration(pipe, prompts, steps, seed, call_kwargs, errors, candidates, probe, dense_steps)
    choice = _solve(calibration, densities, costs, goal, rounds)
    patterns = [[candidates[i] for i in layer] for layer in choice.indices]
    refined = 0
    if goal.sparse_density is not None and refine:
        pool = _refinement_pool(patterns, candidates, densities, goal.sparse_density)
        patterns, refined = refine_layers(
            pipe, prompts, patterns, pool, grid, goal.sparse_density, steps, seed, call_kwargs, calibration.dense,
            dense_steps,
        )  # fmt: skip
    provenance = {
        "made_by": "accel.sparse.search",
        "prompts": list(prompts),
        "steps": steps,
        "profile_steps": profile_steps,
        "rows": rows,
        "seed": seed,
        "target_density": target_density,
        "min_psnr": min_psnr,
        "target_speedup": target_speedup,
        "calibration_runs": len(calibration.factors),
        "refinement_moves": refined,
        "grid": [grid.frames, grid.height, grid.width, grid.text],
    }
    plan = make_plan(patterns, type(transformer).__name__, provenance, dense_steps=dense_steps)
    dense = calibration.dense if check_prompts is None else None  # the calibration prompts' dense run, once
    check = check_plans(pipe, [plan], check_prompts or prompts, steps, seed, call_kwargs, dense)[0]
    metrics = {
        "density": plan_density(patterns, grid),
        "trajectory_density": trajectory_density(patterns, grid, steps, dense_steps),
        "predicted_psnr": -10 * float(np.log10(max(choice.error, 1e-12))),
        "predicted_ms_per_layer": choice.cost_ms / len(patterns),
        "dense_ms_per_layer": cost.dense_head * geometry.heads,
        "predicted_attention_speedup": _speedup(cost.dense_head * sum(map(len, patterns)), choice, steps, dense_steps),
        "cost_points": [list(p) for p in cost.points],
        **check,
        "search_seconds": time.perf_counter() - start,
        "search_cpu_seconds": time.process_time() - cpu_start,
    }
    _log_plan(metrics)
    return Plan.from_dict({**plan.to_dict(), "metrics": metrics})


def _check_search(pipe, prompts, target_density, min_psnr, target_speedup, steps, rows, dense_steps) -> Goal:
    """:func:`search`'s arguments checked (before any compute) and turned into its goal in the sparse steps."""
    goal = Goal.of(target_density, min_psnr, target_speedup, steps, dense_steps)
    if not prompts or steps < 1 or rows < 1:
        raise ValueError("search needs at least one prompt, steps >= 1 and rows >= 1")
    transformer = resolve(pipe).transformer
    if not sparse_layers(transformer):
        raise ValueError(
            f"{type(transformer).__name__} has no self- or joint-attention layer with a softmax kernel: there is "
            "nothing for a sparse-attention plan to cover"
        )
    return goal


def _solve(calibration: Calibration, densities: np.ndarray, costs: np.ndarray, goal: Goal, rounds: int) -> Choice:
    """Solve, measure the (layer, pattern) pairs the answer relies on, solve again: up to ``rounds`` rounds."""
    for _ in range(rounds):
        choice = choose(calibration.weighted(), densities, costs, goal.sparse_density, goal.max_error, goal.max_cost)
        missing = calibration.unmeasured(choice.indices)
        if not missing:
            return choice
        for layer, candidate in sorted(missing):
            calibration.measure(layer, candidate)
    return choose(calibration.weighted(), densities, costs, goal.sparse_density, goal.max_error, goal.max_cost)


def _speedup(dense_ms: float, choice: Choice, steps: int, dense_steps: int) -> float | None:
    """The cost model's attention speed-up over a trajectory (dense steps at ``dense_ms``), or None when the plan's
    predicted time is zero (every head skipped)."""
    total = dense_steps * dense_ms + (steps - dense_steps) * choice.cost_ms
    return steps * dense_ms / total if total > 0 else None


def _log_plan(metrics: dict) -> None:
    """Log the plan's figures, and warn when the cost model predicts it no faster than dense."""
    logger.info("sparse plan: density %.3f, PSNR %.2f dB vs dense", metrics["density"], metrics["psnr"])
    if metrics["predicted_ms_per_layer"] >= metrics["dense_ms_per_layer"]:
        logger.warning(
            "accel.sparse: on this device and token grid the cost model puts the plan's attention at %.2f ms a layer "
            "against %.2f ms dense: it meets its target but will not be faster (sparse kernels pay off on "
            "longer sequences and on GPUs)",
            metrics["predicted_ms_per_layer"],
            metrics["dense_ms_per_layer"],
        )


class Calibration:
    """Turns the profiled (local) head errors into predicted end-to-end output MSE, measured per layer and pattern.

    A local error does not say what it costs at the output: errors of early layers propagate through the later
    ones and through the steps, guidance scales them, and a pattern that drops far frames hurts differently from
    one that drops far pixels. So for a (layer, pattern) pair the pipeline runs with that pattern on all the
    layer's heads and every other layer dense; the output MSE against dense divided by the layer's summed
    profiled error under the pattern is the pair's factor. Pairs not measured yet use the layer's probe factor.

    Args:
        pipe, prompts, steps, seed, call_kwargs: the calibration runs (as in :func:`search`).
        errors: per layer, ``(heads, candidates)`` profiled errors.
        candidates: the candidate patterns.
        probe: the candidate measured first in every layer.
        dense_steps: the first steps the plans run dense.
    """

    def __init__(self, pipe, prompts, steps, seed, call_kwargs, errors, candidates, probe: int, dense_steps: int = 0):
        self.pipe, self.prompts, self.steps, self.seed, self.call_kwargs = pipe, prompts, steps, seed, call_kwargs
        self.errors, self.candidates, self.probe, self.dense_steps = errors, candidates, probe, dense_steps
        self.model_class = type(resolve(pipe).transformer).__name__
        self.dense = run_pipeline(pipe, prompts, steps, seed, call_kwargs)
        self.factors: dict[tuple[int, int], float] = {}
        for layer in range(len(errors)):
            self.measure(layer, probe)

    def measure(self, layer: int, candidate: int) -> float:
        """Measure (and keep) the factor of one (layer, candidate) pair."""
        patterns = [[HeadPattern.dense()] * len(e) for e in self.errors]
        patterns[layer] = [self.candidates[candidate]] * len(self.errors[layer])
        plan = make_plan(patterns, model_class=self.model_class, dense_steps=self.dense_steps)
        with apply(self.pipe, SparseAttentionConfig(plan=plan)):
            output = run_pipeline(self.pipe, self.prompts, self.steps, self.seed, self.call_kwargs)
        mse = float((output - self.dense).square().mean())
        self.factors[layer, candidate] = mse / max(float(self.errors[layer][:, candidate].sum()), 1e-12)
        return self.factors[layer, candidate]

    def weighted(self) -> list[np.ndarray]:
        """Per layer, ``(heads, candidates)`` predicted output MSE of each head's choice."""
        result = []
        for layer, errors in enumerate(self.errors):
            factors = [self.factors.get((layer, c), self.factors[layer, self.probe]) for c in range(errors.shape[1])]
            result.append(errors * np.array(factors)[None])
        return result

    def unmeasured(self, indices: list[list[int]]) -> set[tuple[int, int]]:
        """The sparse (layer, candidate) pairs of a choice whose factor is still a guess."""
        return {
            (layer, c)
            for layer, picks in enumerate(indices)
            for c in set(picks)
            if self.candidates[c].kind == "sparse" and (layer, c) not in self.factors
        }


def _refinement_pool(
    patterns: list[list[HeadPattern]], candidates: Sequence[HeadPattern], densities: np.ndarray, target: float
) -> list[HeadPattern]:
    """Patterns a layer may switch to: the three the plan uses most, and the two candidates just under the
    target density (what a uniform plan would use)."""
    counts: dict[HeadPattern, int] = {}
    for layer in patterns:
        for pattern in layer:
            counts[pattern] = counts.get(pattern, 0) + 1
    pool = sorted(counts, key=counts.get, reverse=True)[:3]
    under = sorted(
        (i for i, p in enumerate(candidates) if p.kind == "sparse" and densities[i] <= target + 1e-9),
        key=lambda i: -densities[i],
    )
    return pool + [candidates[i] for i in under[:2] if candidates[i] not in pool]


def refine_layers(
    pipe: Any,
    prompts: Sequence[str],
    patterns: list[list[HeadPattern]],
    pool: Sequence[HeadPattern],
    grid: TokenGrid,
    target_density: float,
    steps: int,
    seed: int,
    call_kwargs: dict | None,
    dense: torch.Tensor,
    dense_steps: int = 0,
) -> tuple[list[list[HeadPattern]], int]:
    """Greedy end-to-end improvement of a plan: layer by layer, try giving every head of the layer one pattern of
    ``pool``; keep the change that raises the PSNR against ``dense`` (the dense output of ``prompts``) most while
    the mean density stays within ``target_density`` (in the sparse steps: the first ``dense_steps`` run dense).
    The profile's per-head errors do not add up the way errors do at the output (they compound through layers and
    steps), so the solver's answer is checked and corrected where it matters.

    Returns:
        The refined patterns and the number of layers changed.
    """
    from accel.eval.metrics import psnr

    def score(candidate: list[list[HeadPattern]]) -> float:
        with apply(pipe, SparseAttentionConfig(plan=make_plan(candidate, dense_steps=dense_steps))):
            return float(psnr(run_pipeline(pipe, prompts, steps, seed, call_kwargs), dense).mean())

    current, moves = score(patterns), 0
    for index, layer in enumerate(patterns):
        best = None
        for pattern in pool:
            trial = [list(p) for p in patterns]
            trial[index] = [pattern] * len(layer)
            if trial[index] == layer or plan_density(trial, grid) > target_density + 1e-9:
                continue
            value = score(trial)
            if value > current + 0.01 and (best is None or value > best[0]):
                best = (value, trial)
        if best is not None:
            current, patterns, moves = best[0], best[1], moves + 1
            logger.info("refined layer %d: PSNR %.2f dB", index, current)
    return patterns, moves


def check_plans(
    pipe: Any,
    plans: Sequence[Plan],
    prompts: Sequence[str],
    steps: int,
    seed: int,
    call_kwargs: dict | None,
    dense: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """PSNR/SSIM of each plan's output against the dense output of the same prompts and seeds (``dense``, when
    the caller has it already)."""
    if dense is None:
        dense = run_pipeline(pipe, prompts, steps, seed, call_kwargs)
    results = []
    for plan in plans:
        with apply(pipe, SparseAttentionConfig(plan=plan)):
            results.append(compare_to_dense(run_pipeline(pipe, prompts, steps, seed, call_kwargs), dense))
    return results


def best_uniform_plan(
    pipe: Any,
    prompts: Sequence[str],
    target: float,
    steps: int,
    seed: int = 0,
    call_kwargs: dict | None = None,
    dense_steps: int = 0,
) -> tuple[Plan, dict[str, float]]:
    """The best single pattern for every head at attention density at most ``target`` (averaged over the
    trajectory, whose first ``dense_steps`` steps run dense): each candidate that fits is run end to end and the
    highest PSNR against dense wins."""
    transformer = resolve(pipe).transformer
    grid = grid_of_call(pipe, prompts, call_kwargs)
    fitting = [
        p
        for p in candidate_patterns(grid)
        if p.kind == "sparse" and (dense_steps + (steps - dense_steps) * density(p, grid)) / steps <= target + 1e-9
    ]
    if not fitting:
        raise ValueError(
            f"no uniform candidate pattern has density <= {target} on {grid} with {dense_steps} dense steps"
        )
    plans = [uniform_plan(transformer, pattern, dense_steps=dense_steps) for pattern in fitting]
    checks = check_plans(pipe, plans, prompts, steps, seed, call_kwargs)
    best = int(np.argmax([c["psnr"] for c in checks]))
    return plans[best], checks[best]


def grid_of_call(pipe: Any, prompts: Sequence[str], call_kwargs: dict | None) -> TokenGrid:
    """The token grid of one transformer call of ``pipe`` with ``call_kwargs`` (one 1-step call, listened to)."""
    target = resolve(pipe)
    seen: list[TokenGrid] = []

    def listen(args: tuple, kwargs: dict) -> None:
        seen.append(call_grid(target, args, kwargs))
        raise _Stop

    target.tracker.acquire()
    target.tracker.add_call_listener(listen)
    try:
        run_pipeline(pipe, prompts[:1], 1, 0, call_kwargs)
    except _Stop:
        pass
    finally:
        target.tracker.remove_call_listener(listen)
        target.tracker.release()
    return seen[0]


def _out_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The output projection's weight of a diffusers attention module (``to_out[0]``), if it has one."""
    out = getattr(module, "to_out", None)
    first = out[0] if isinstance(out, torch.nn.ModuleList | torch.nn.Sequential) and len(out) else out
    weight = getattr(first, "weight", None)
    return weight.detach() if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


class _Stop(Exception):
    """Ends a pipeline call once the first transformer call has shown its grid."""
