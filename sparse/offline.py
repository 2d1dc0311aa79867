"""``accel.sparse.search``: a per-head plan for one pipeline, and its end-to-end check against dense.

    plan = accel.sparse.search(pipe, prompts, target_density=0.3, call_kwargs=DEFAULT_VIDEO_CALL_KWARGS)
    plan.save("wan-sparse.json")

The search profiles on the calibration prompts (:func:`profile_errors`), fits the cost model on this device
(:func:`accel.sparse.search.fit_cost_model`), solves for one pattern per head (:func:`accel.sparse.search.choose`)
with the profiled errors calibrated end to end (:mod:`accel.sparse.calibration`), and checks the plan end to end
(:func:`accel.sparse.end_to_end.compare_to_dense`): PSNR and SSIM of the decoded output against the dense run
with the same prompts, seeds, dtype and compile settings. The figures go into the plan's ``metrics``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from accel.api import resolve
from accel.plan import Plan
from accel.sparse.apply import SparseAttentionConfig, SparseHandle
from accel.sparse.calibration import Calibration, refine_layers, refinement_pool, solve_in_rounds
from accel.sparse.end_to_end import check_plans, grid_of_call, run_pipeline
from accel.sparse.patterns import HeadPattern, TokenGrid, density
from accel.sparse.plan import make_plan, plan_density, sparse_layers, trajectory_density, uniform_plan
from accel.sparse.search import (
    Choice,
    CostModel,
    ErrorRecorder,
    Goal,
    candidate_densities,
    candidate_patterns,
    fit_cost_model,
    tile_densities,
)

logger = logging.getLogger(__name__)


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
        rounds: solve-and-calibrate rounds (:class:`~accel.sparse.calibration.Calibration`): after each solve,
            the (layer, pattern) pairs the answer uses are measured end to end, until none is left unmeasured.
        refine: with ``target_density``, improve the solved plan layer by layer end to end
            (:func:`~accel.sparse.calibration.refine_layers`).
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
    profile_steps = _profile_steps(profile_steps, steps, dense_steps)
    start, cpu_start = time.perf_counter(), time.process_time()
    space = _measure_space(pipe, prompts, steps, profile_steps, rows, seed, call_kwargs)
    goal = space.with_max_cost(goal)
    calibration = Calibration(
        pipe, prompts, steps, seed, call_kwargs, space.errors, space.candidates, space.probe(goal), dense_steps
    )
    choice, patterns, refined = _choose_patterns(calibration, space, goal, rounds, refine)
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
        "grid": [space.grid.frames, space.grid.height, space.grid.width, space.grid.text],
    }
    plan = make_plan(patterns, space.model_class, provenance, dense_steps=dense_steps)
    dense = calibration.dense if check_prompts is None else None  # the calibration prompts' dense run, once
    check = check_plans(pipe, [plan], check_prompts or prompts, steps, seed, call_kwargs, dense)[0]
    metrics = {**_predicted_metrics(space, patterns, choice, steps, dense_steps), **check}
    metrics.update(search_seconds=time.perf_counter() - start, search_cpu_seconds=time.process_time() - cpu_start)
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


def _profile_steps(profile_steps: Sequence[int] | None, steps: int, dense_steps: int) -> list[int]:
    """The steps :func:`search` profiles, sorted: ``profile_steps``, or four spread over the sparse steps.

    Raises:
        ValueError: a step outside the sparse steps ``dense_steps..steps - 1``.
    """
    default = np.linspace(dense_steps, steps - 1, min(4, steps - dense_steps)).round().astype(int).tolist()
    chosen = sorted(set(profile_steps or default))
    if chosen[0] < dense_steps or chosen[-1] >= steps:
        raise ValueError(f"profile_steps must lie in {dense_steps}..{steps - 1} (the sparse steps), got {chosen}")
    return chosen


@dataclass(frozen=True)
class _SearchSpace:
    """What :func:`search` chooses from, on the token grid its profile saw.

    Attributes:
        model_class: the transformer's class name.
        heads: the heads of a sparse layer.
        candidates: the candidate patterns (:func:`~accel.sparse.search.candidate_patterns`).
        errors: per layer, ``(heads, candidates)`` profiled mean relative errors.
        grid: the token grid of the profiled calls.
        cost: the cost model fitted on this device.
        costs: ``(candidates,)`` the predicted milliseconds of one head under each candidate.
        densities: ``(candidates,)`` each candidate's attention density on ``grid``.
    """

    model_class: str
    heads: int
    candidates: list[HeadPattern]
    errors: list[np.ndarray]
    grid: TokenGrid
    cost: CostModel
    costs: np.ndarray
    densities: np.ndarray

    def with_max_cost(self, goal: Goal) -> Goal:
        """``goal``, a speed-up's cost fraction priced: the sparse steps' share of the dense heads' summed cost."""
        if goal.cost_fraction is None:
            return goal
        return replace(goal, max_cost=goal.cost_fraction * self.cost.dense_head * sum(len(e) for e in self.errors))

    def probe(self, goal: Goal) -> int:
        """The candidate :class:`Calibration` measures first in every layer: the sparse one whose density is
        nearest the goal's (0.4 for a goal of error or time)."""
        near = goal.sparse_density if goal.sparse_density is not None else 0.4
        sparse = (i for i, p in enumerate(self.candidates) if p.kind == "sparse")
        return min(sparse, key=lambda i: abs(self.densities[i] - near))


def _measure_space(pipe, prompts, steps, profile_steps, rows, seed, call_kwargs) -> _SearchSpace:
    """Profile the candidates along the dense trajectory (:func:`profile_errors`) and fit the cost model on this
    device (:func:`~accel.sparse.search.fit_cost_model`); the arguments as in :func:`search`."""
    transformer = resolve(pipe).transformer
    geometry = sparse_layers(transformer)[0][0]
    candidates = candidate_patterns(grid_of_call(pipe, prompts, call_kwargs))
    errors, grid = profile_errors(pipe, prompts, candidates, steps, profile_steps, rows, seed, call_kwargs)
    parameter = next(transformer.parameters())
    cost = fit_cost_model(grid, geometry.heads, geometry.head_dim, parameter.device, parameter.dtype)
    tiles = tile_densities(candidates, grid)
    costs = np.array([cost.head_cost(p, t) for p, t in zip(candidates, tiles, strict=True)])
    densities = candidate_densities(candidates, grid)
    return _SearchSpace(type(transformer).__name__, geometry.heads, candidates, errors, grid, cost, costs, densities)


def _choose_patterns(
    calibration: Calibration, space: _SearchSpace, goal: Goal, rounds: int, refine: bool
) -> tuple[Choice, list[list[HeadPattern]], int]:
    """Solve in calibration rounds (:func:`~accel.sparse.calibration.solve_in_rounds`), then, for a density goal
    with ``refine``, improve the answer layer by layer end to end (:func:`~accel.sparse.calibration.refine_layers`):
    the solver's choice, the patterns per layer and head, and the number of layers refining changed."""
    choice = solve_in_rounds(calibration, space.densities, space.costs, goal, rounds)
    patterns = [[space.candidates[i] for i in layer] for layer in choice.indices]
    if goal.sparse_density is None or not refine:
        return choice, patterns, 0
    pool = refinement_pool(patterns, space.candidates, space.densities, goal.sparse_density)
    patterns, refined = refine_layers(
        calibration.pipe, calibration.prompts, patterns, pool, space.grid, goal.sparse_density, calibration.steps,
        calibration.seed, calibration.call_kwargs, calibration.dense, calibration.dense_steps,
    )  # fmt: skip
    return choice, patterns, refined


def _predicted_metrics(
    space: _SearchSpace, patterns: list[list[HeadPattern]], choice: Choice, steps: int, dense_steps: int
) -> dict[str, Any]:
    """The plan's attention density (in the sparse steps and over the trajectory) and what the solver and the
    cost model predict for it (PSNR from the solver's error; milliseconds a layer; the attention speed-up), with
    the cost model's measured points."""
    dense_head = space.cost.dense_head
    return {
        "density": plan_density(patterns, space.grid),
        "trajectory_density": trajectory_density(patterns, space.grid, steps, dense_steps),
        "predicted_psnr": -10 * float(np.log10(max(choice.error, 1e-12))),
        "predicted_ms_per_layer": choice.cost_ms / len(patterns),
        "dense_ms_per_layer": dense_head * space.heads,
        "predicted_attention_speedup": _speedup(dense_head * sum(map(len, patterns)), choice, steps, dense_steps),
        "cost_points": [list(p) for p in space.cost.points],
    }


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


def _out_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The output projection's weight of a diffusers attention module (``to_out[0]``), if it has one."""
    out = getattr(module, "to_out", None)
    first = out[0] if isinstance(out, torch.nn.ModuleList | torch.nn.Sequential) and len(out) else out
    weight = getattr(first, "weight", None)
    return weight.detach() if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None
