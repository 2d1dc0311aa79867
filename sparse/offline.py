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
from typing import Any

import numpy as np
import torch

from accel.api import apply, resolve
from accel.plan import Plan
from accel.sparse.apply import SparseAttentionConfig, SparseHandle
from accel.sparse.patterns import HeadPattern, TokenGrid, density
from accel.sparse.plan import make_plan, sparse_layers, uniform_plan
from accel.sparse.search import (
    ErrorRecorder,
    block_densities,
    candidate_densities,
    candidate_patterns,
    choose,
    fit_cost_model,
)

logger = logging.getLogger(__name__)


def run_pipeline(pipe: Any, prompts: Sequence[str], steps: int, seed: int, call_kwargs: dict | None) -> torch.Tensor:
    """The pipeline's decoded output for ``prompts`` (one generator per prompt, seeded ``seed + i``) as float in
    [0, 1]: ``(N, 3, H, W)`` images or ``(N, F, 3, H, W)`` videos."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    output = pipe(
        list(prompts), num_inference_steps=steps, generator=generators, output_type="pt", **(call_kwargs or {})
    )
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
    recorders = [ErrorRecorder(candidates, rows, active, generator) for _ in layers]

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
    steps: int = 20,
    profile_steps: Sequence[int] | None = None,
    rows: int = 64,
    seed: int = 0,
    call_kwargs: dict | None = None,
    check_prompts: Sequence[str] | None = None,
) -> Plan:
    """Choose a pattern per layer and head for ``pipe``; see the module docstring.

    Args:
        pipe: a pipeline whose transformer has a sparse processor (Wan today).
        prompts: calibration prompts (a few).
        target_density: minimise the predicted error subject to this mean attention density (0..1); or
        min_psnr: minimise the predicted time subject to a predicted PSNR against dense of at least this (dB).
        steps: denoising steps of the calibration and check runs.
        profile_steps: the steps profiled (default: four spread over the trajectory).
        rows: query rows drawn per attention call.
        seed: seeds of the runs and of the row draws.
        call_kwargs: extra pipeline call arguments (size, frames, guidance).
        check_prompts: prompts of the end-to-end check (default: ``prompts``).

    Returns:
        The plan, with ``metrics`` holding its density, predicted error and time, the end-to-end PSNR/SSIM
        against dense, the cost model's points and the search's wall time.

    Raises:
        ValueError: bad arguments (checked before any compute).
    """
    if (target_density is None) == (min_psnr is None):
        raise ValueError("give exactly one of target_density and min_psnr")
    if target_density is not None and not 0 < target_density <= 1:
        raise ValueError(f"target_density must be in (0, 1], got {target_density}")
    if not prompts or steps < 1 or rows < 1:
        raise ValueError("search needs at least one prompt, steps >= 1 and rows >= 1")
    profile_steps = sorted(set(profile_steps or np.linspace(0, steps - 1, 4).round().astype(int).tolist()))
    if profile_steps[0] < 0 or profile_steps[-1] >= steps:
        raise ValueError(f"profile_steps must lie in 0..{steps - 1}, got {profile_steps}")
    start = time.perf_counter()
    transformer = resolve(pipe).transformer
    geometry = sparse_layers(transformer)[0][0]
    probe_grid = _grid_of_call(pipe, prompts, call_kwargs)
    candidates = candidate_patterns(probe_grid)
    errors, grid = profile_errors(pipe, prompts, candidates, steps, profile_steps, rows, seed, call_kwargs)
    parameter = next(transformer.parameters())
    cost = fit_cost_model(grid, geometry.heads, geometry.head_dim, parameter.device, parameter.dtype)
    blocks = block_densities(candidates, grid)
    costs = np.array([cost.head_cost(p, b) for p, b in zip(candidates, blocks, strict=True)])
    densities = candidate_densities(candidates, grid)
    weights = layer_sensitivity(pipe, prompts, errors, candidates, densities, target_density, steps, seed, call_kwargs)
    weighted = [w * e for w, e in zip(weights, errors, strict=True)]
    max_error = None if min_psnr is None else 10 ** (-min_psnr / 10)
    choice = choose(weighted, densities, costs, target_density, max_error)
    patterns = [[candidates[i] for i in layer] for layer in choice.indices]
    plan = make_plan(
        patterns,
        model_class=type(transformer).__name__,
        provenance={
            "made_by": "accel.sparse.search",
            "prompts": list(prompts),
            "steps": steps,
            "profile_steps": profile_steps,
            "rows": rows,
            "seed": seed,
            "target_density": target_density,
            "min_psnr": min_psnr,
            "layer_weights": [float(w) for w in weights],
            "grid": [grid.frames, grid.height, grid.width, grid.text],
        },
    )
    check = check_plans(pipe, [plan], check_prompts or prompts, steps, seed, call_kwargs)[0]
    metrics = {
        "density": choice.density,
        "predicted_psnr": -10 * float(np.log10(max(choice.error, 1e-12))),
        "predicted_ms_per_layer": choice.cost_ms / len(patterns),
        "dense_ms_per_layer": cost.dense_head * geometry.heads,
        "cost_points": [list(p) for p in cost.points],
        **check,
        "search_seconds": time.perf_counter() - start,
    }
    logger.info("sparse plan: density %.3f, PSNR %.2f dB vs dense", choice.density, check["psnr"])
    return Plan.from_dict({**plan.to_dict(), "metrics": metrics})


def layer_sensitivity(
    pipe: Any,
    prompts: Sequence[str],
    errors: Sequence[np.ndarray],
    candidates: Sequence[HeadPattern],
    densities: np.ndarray,
    target_density: float | None,
    steps: int,
    seed: int,
    call_kwargs: dict | None,
) -> np.ndarray:
    """Per layer, the factor that turns the profiled (local) head errors into end-to-end output MSE.

    A local error does not say how much it costs at the output: errors of early layers propagate through the
    later ones and through the steps, and guidance scales them. So each layer in turn runs one probe pattern
    on all its heads (the sparse candidate closest to ``target_density``, else to 0.4) while the others stay
    dense; the output MSE against dense divided by the layer's profiled error under the probe is its factor.
    """
    goal = target_density if target_density is not None else 0.4
    sparse = [i for i, p in enumerate(candidates) if p.kind == "sparse"]
    probe = min(sparse, key=lambda i: abs(densities[i] - goal))
    transformer = resolve(pipe).transformer
    dense_patterns = [[HeadPattern.dense()] * len(layer) for layer in errors]
    dense = run_pipeline(pipe, prompts, steps, seed, call_kwargs)
    weights = []
    for index, layer in enumerate(errors):
        patterns = [list(p) for p in dense_patterns]
        patterns[index] = [candidates[probe]] * len(layer)
        plan = make_plan(patterns, model_class=type(transformer).__name__)
        with apply(pipe, SparseAttentionConfig(plan=plan)):
            mse = float((run_pipeline(pipe, prompts, steps, seed, call_kwargs) - dense).square().mean())
        weights.append(mse / max(float(layer[:, probe].sum()), 1e-12))
    return np.array(weights)


def check_plans(
    pipe: Any, plans: Sequence[Plan], prompts: Sequence[str], steps: int, seed: int, call_kwargs: dict | None
) -> list[dict[str, float]]:
    """PSNR/SSIM of each plan's output against the dense output of the same prompts and seeds."""
    dense = run_pipeline(pipe, prompts, steps, seed, call_kwargs)
    results = []
    for plan in plans:
        with apply(pipe, SparseAttentionConfig(plan=plan)):
            results.append(compare_to_dense(run_pipeline(pipe, prompts, steps, seed, call_kwargs), dense))
    return results


def best_uniform_plan(
    pipe: Any, prompts: Sequence[str], target: float, steps: int, seed: int = 0, call_kwargs: dict | None = None
) -> tuple[Plan, dict[str, float]]:
    """The best single pattern for every head at attention density at most ``target``: each candidate that
    fits is run end to end and the highest PSNR against dense wins."""
    transformer = resolve(pipe).transformer
    grid = _grid_of_call(pipe, prompts, call_kwargs)
    fitting = [p for p in candidate_patterns(grid) if p.kind == "sparse" and density(p, grid) <= target]
    if not fitting:
        raise ValueError(f"no uniform candidate pattern has density <= {target} on {grid}")
    plans = [uniform_plan(transformer, pattern) for pattern in fitting]
    checks = check_plans(pipe, plans, prompts, steps, seed, call_kwargs)
    best = int(np.argmax([c["psnr"] for c in checks]))
    return plans[best], checks[best]


def _grid_of_call(pipe: Any, prompts: Sequence[str], call_kwargs: dict | None) -> TokenGrid:
    """The token grid of one transformer call of ``pipe`` with ``call_kwargs`` (one 1-step call, listened to)."""
    target = resolve(pipe)
    seen: list[TokenGrid] = []

    def listen(args: tuple, kwargs: dict) -> None:
        from accel.adapters import token_grid

        inputs = dict(kwargs)
        if "hidden_states" not in inputs and args:
            inputs["hidden_states"] = args[0]
        seen.append(TokenGrid(*token_grid(target.transformer, target.spec, inputs)))
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


class _Stop(Exception):
    """Ends a pipeline call once the first transformer call has shown its grid."""
