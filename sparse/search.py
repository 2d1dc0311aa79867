"""Choosing a pattern per layer and head offline: profile errors along the real trajectory, time the kernels,
solve an integer program.

1. **Profile** (:func:`profile_errors`): the pipeline runs dense on a few calibration prompts; at every
   attention call of the chosen steps a recorder (in place of each layer's kernel, through the same sparse
   processors) draws query rows and measures, per head and candidate pattern, the relative error of the head's
   output on those rows, ``||O_pattern - O_dense|| / ||O_dense||``, averaged over calls.
2. **Cost** (:func:`fit_cost_model`): the layer kernel is timed on this device and shape under frame windows
   (full tiles) and spatial windows (partial tiles); a plane through the points gives the time of one head from
   its tile densities in unmasked and in masked query rows (:func:`tile_densities`), beside the time of one
   dense head through SDPA.
3. **Choose** (:func:`choose`): one candidate per head minimising the summed error subject to a mean attention
   density or to a predicted time (a target speed-up), or minimising the predicted time subject to an error
   budget: a multiple-choice knapsack solved exactly by ``scipy.optimize.milp``. Heads of a layer that share a
   pattern run in the layer's one launch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from accel.sparse.kernels import LayerAttention
from accel.sparse.patterns import HeadPattern, HeadTables, TokenGrid, Window, allowed, density

logger = logging.getLogger(__name__)


def candidate_patterns(grid: TokenGrid) -> list[HeadPattern]:
    """The candidates the search chooses from on ``grid``: dense, skip, per-frame blocks, spatial
    neighbourhoods across frames (multi-diagonal), local 3-D windows, unions of a per-frame block with a
    spatial neighbourhood, each with and without the first frame as a sink stripe."""
    side = max(grid.height, grid.width)
    radii = sorted({r for r in (1, 2, side // 4, side // 2) if 0 < r < side})
    temporal: list[Window] = [(0, None, None), (1, None, None)]
    spatial: list[Window] = [(None, r, r) for r in radii]
    local: list[Window] = [(1, r, r) for r in radii]
    shapes = [(w,) for w in temporal + spatial + local] + [(t, w) for t in temporal for w in spatial]
    candidates = [HeadPattern.dense(), HeadPattern.skip()]
    for windows in shapes:
        candidates.append(HeadPattern(windows=windows))
        if grid.frames > 1:
            candidates.append(HeadPattern(windows=windows, sink_frames=(0,)))
    return candidates


class ErrorRecorder:
    """Stands in for a layer's kernel while profiling: returns dense attention (the trajectory stays the dense
    one) and accumulates each head's squared error under each candidate on sampled query rows, relative to the
    squared norm of the whole layer's output there: a head that contributes little weighs little, and the heads'
    errors add up as independent errors do (their sum estimates the layer's relative squared error). With the
    layer's output projection, errors are measured after it, where they enter the residual stream: a head the
    projection amplifies weighs more.

    Args:
        candidates: the patterns to score.
        rows: query rows drawn per call.
        active: called at each attention call; record only when it returns True (e.g. the step is profiled).
        generator: draws the rows.
        out_weight: the output projection's weight ``(width, heads * head_dim)``, or None.
    """

    all_dense = False  # the sparse processor computes queries, keys and values for it

    def __init__(
        self,
        candidates: Sequence[HeadPattern],
        rows: int,
        active: Callable[[], bool],
        generator: torch.Generator,
        out_weight: torch.Tensor | None = None,
    ):
        self.candidates, self.rows, self.active, self.generator = list(candidates), rows, active, generator
        self.out_weight = out_weight
        self.grid: TokenGrid | None = None
        self.errors: torch.Tensor | None = None  # (heads, candidates) summed relative errors
        self.calls = 0

    def __call__(self, query, key, value, scale=None):
        """Dense attention ``(batch, heads, length, head_dim)`` of ``query``, ``key``, ``value`` (each ``(batch,
        heads, length, head_dim)``), as the layer would compute without a plan; when :attr:`grid` is set and
        ``active()`` says so, the candidates' errors on sampled rows are recorded on the way."""
        out = F.scaled_dot_product_attention(query, key, value, scale=scale)
        if self.grid is not None and self.active():
            self._record(query.float(), key.float(), value.float(), scale)
        return out

    @torch.no_grad()
    def _record(self, query, key, value, scale) -> None:
        batch, heads, length, dim = query.shape
        scale = 1.0 / math.sqrt(dim) if scale is None else scale
        rows = torch.randperm(length, generator=self.generator)[: self.rows].to(query.device)
        scores = torch.einsum("bhrd,bhkd->bhrk", query[:, :, rows], key) * scale  # (batch, heads, rows, length)
        dense = torch.softmax(scores, -1) @ value
        # the layer's output on those rows: heads concatenated, or summed through the projection
        layer = dense.flatten(1) if self.out_weight is None else self._project(dense).sum(1).flatten(1)
        norm = layer.norm(dim=-1).clamp_min(1e-12)[:, None]  # (batch, 1)
        tables = HeadTables.build(self.candidates, self.grid, query.device)
        keys = torch.arange(length, device=query.device)
        errors = torch.zeros(heads, len(self.candidates), device=query.device)
        for index in range(len(self.candidates)):
            mask = allowed(tables, self.grid, torch.tensor(index, device=query.device), rows[:, None], keys[None])
            if self.candidates[index].kind == "skip":
                mask = torch.zeros_like(mask)
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
            error = self._project(weights @ value - dense).flatten(2).norm(dim=-1)  # (batch, heads)
            errors[:, index] = (error / norm).square().mean(0)
        self.errors = errors if self.errors is None else self.errors + errors
        self.calls += 1

    def _project(self, out: torch.Tensor) -> torch.Tensor:
        """Each head's part of the output projection: ``(batch, heads, rows, head_dim)`` -> ``(batch, heads, rows,
        width)`` (unchanged without a projection); summing over heads gives the projected layer output."""
        if self.out_weight is None:
            return out
        heads, dim = out.shape[1], out.shape[-1]
        weight = self.out_weight.float().to(out.device).unflatten(1, (heads, dim))  # (width, heads, head_dim)
        return torch.einsum("bhrd,whd->bhrw", out, weight)

    def mean_errors(self) -> np.ndarray:
        """``(heads, candidates)`` mean relative error over the recorded calls."""
        if self.errors is None:
            raise RuntimeError("no attention call was recorded: check the profiled steps and that the layer runs")
        return (self.errors / self.calls).cpu().numpy()


@dataclass(frozen=True)
class CostModel:
    """Measured time of one head, in milliseconds, on one device and token grid.

    A launch's tiles fall in two classes (:func:`tile_densities`): tiles of query rows whose every visited tile
    is full (the ``"runs"`` backend runs them as SDPA over slices, no mask) and tiles of rows with a partial
    tile (masked). Their prices differ, so each has its own slope.

    Attributes:
        dense_head: one head through SDPA.
        sparse_head_fixed, per_full_row_density, per_partial_row_density: one head through the sparse launch
            costs ``sparse_head_fixed + per_full_row_density * full + per_partial_row_density * partial``, with
            ``(full, partial)`` its :func:`tile_densities`.
        points: the measured ``(full, partial, ms per head)`` triples the plane was fitted to.
    """

    dense_head: float
    sparse_head_fixed: float
    per_full_row_density: float
    per_partial_row_density: float
    points: tuple[tuple[float, float, float], ...]

    def head_cost(self, pattern: HeadPattern, tiles: Sequence[float]) -> float:
        """Predicted milliseconds of one head under ``pattern`` with :func:`tile_densities` ``tiles``."""
        if pattern.kind == "skip":
            return 0.0
        if pattern.kind == "dense":
            return self.dense_head
        full, partial = tiles
        return self.sparse_head_fixed + self.per_full_row_density * full + self.per_partial_row_density * partial


def _timing_patterns(grid: TokenGrid) -> list[HeadPattern]:
    """What :func:`fit_cost_model` times: windows over whole frames (full tiles where frames fill whole blocks)
    and spatial windows over every frame (partial tiles)."""
    frames = sorted({0, max(1, grid.frames // 4), max(1, grid.frames // 2)})
    side = max(grid.height, grid.width)
    radii = sorted({r for r in (1, side // 4) if 0 < r < side})
    temporal = [HeadPattern(windows=((f, None, None),)) for f in frames]
    return temporal + [HeadPattern(windows=((None, r, r),)) for r in radii]


@torch.no_grad()
def fit_cost_model(
    grid: TokenGrid,
    heads: int,
    head_dim: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    repeats: int = 5,
) -> CostModel:
    """Time one layer (``heads`` heads of ``head_dim``, batch 1) dense and under frame and spatial windows, and
    fit :class:`CostModel` by least squares."""
    from accel.eval.timing import time_interleaved

    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, grid.length, head_dim, generator=generator).to(device, dtype) for _ in range(3))
    patterns = _timing_patterns(grid)
    kernels = [LayerAttention([pattern] * heads, grid, device, backend) for pattern in patterns]
    fns = {"dense": lambda: F.scaled_dot_product_attention(q, k, v)}
    fns.update({index: (lambda kernel=kernel: kernel(q, k, v)) for index, kernel in enumerate(kernels)})
    timings = time_interleaved(fns, repeats=repeats)
    dense = 1000 * timings["dense"].median / heads
    tiles = tile_densities(patterns, grid)
    points = tuple(
        (float(full), float(partial), 1000 * timings[i].median / heads) for i, (full, partial) in enumerate(tiles)
    )
    features = np.array([[1.0, full, partial] for full, partial, _ in points])
    (fixed, full_slope, partial_slope), *_ = np.linalg.lstsq(features, np.array([p[2] for p in points]), rcond=None)
    return CostModel(dense, *(max(float(v), 0.0) for v in (fixed, full_slope, partial_slope)), points)


def tile_densities(candidates: Sequence[HeadPattern], grid: TokenGrid, block_size: int | None = None) -> np.ndarray:
    """``(candidates, 2)``: per candidate, the fraction of the launch's tiles it visits in query rows whose
    visited tiles are all full, and in rows with a partial tile (dense: ``(1, 0)``, skip: ``(0, 0)``)."""
    from accel.sparse.blocks import block_classes
    from accel.sparse.kernels import default_block_size

    size = block_size or default_block_size(grid.length)
    values = []
    for pattern in candidates:
        if pattern.kind != "sparse":
            values.append((float(pattern.kind == "dense"), 0.0))
            continue
        partial, full = block_classes([pattern], grid, size, size)
        visited, masked_rows = (partial | full).float(), partial.any(-1, keepdim=True)
        values.append(((visited * ~masked_rows).mean().item(), (visited * masked_rows).mean().item()))
    return np.array(values)


@dataclass(frozen=True)
class Choice:
    """The solver's answer: one candidate index per head of every layer, its summed error, mean density and
    summed predicted time."""

    indices: list[list[int]]
    error: float
    density: float
    cost_ms: float


def choose(
    errors: Sequence[np.ndarray],
    densities: np.ndarray,
    costs: np.ndarray,
    target_density: float | None = None,
    max_error: float | None = None,
    max_cost: float | None = None,
) -> Choice:
    """One candidate per head (an exact integer program, ``scipy.optimize.milp``).

    Args:
        errors: per layer, ``(heads, candidates)`` mean relative errors.
        densities: ``(candidates,)`` attention density of each candidate.
        costs: ``(candidates,)`` predicted milliseconds per head.
        target_density: minimise the summed error subject to a mean density at most this; or
        max_error: minimise the predicted time subject to a summed error at most this; or
        max_cost: minimise the summed error subject to a summed predicted time (ms, over every head) at most this
            (a target speed-up: the dense heads' summed cost divided by it).

    Raises:
        ValueError: not exactly one of ``target_density``, ``max_error`` and ``max_cost``; ``densities`` or
            ``costs`` not one value per candidate; or no feasible choice.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    if sum(goal is not None for goal in (target_density, max_error, max_cost)) != 1:
        raise ValueError("give exactly one of target_density, max_error and max_cost")
    error = np.concatenate([np.asarray(e, dtype=float) for e in errors])  # (all heads, candidates)
    heads, count = error.shape
    densities, costs = np.asarray(densities, dtype=float), np.asarray(costs, dtype=float)
    if densities.shape != (count,) or costs.shape != (count,):
        raise ValueError(
            f"densities and costs need one value per candidate ({count}, the errors' last axis), got shapes "
            f"{densities.shape} and {costs.shape}"
        )
    one_each = np.kron(np.eye(heads), np.ones(count))  # each head picks exactly one candidate
    constraints = [LinearConstraint(one_each, 1, 1)]
    if target_density is not None:
        constraints.append(LinearConstraint(np.tile(densities, heads)[None], -np.inf, target_density * heads))
        objective = error.flatten()
    elif max_cost is not None:
        constraints.append(LinearConstraint(np.tile(costs, heads)[None], -np.inf, max_cost))
        objective = error.flatten()
    else:
        constraints.append(LinearConstraint(error.flatten()[None], -np.inf, max_error))
        objective = np.tile(costs, heads) + 1e-6 * error.flatten()  # ties: the more accurate
    result = milp(objective, constraints=constraints, integrality=np.ones(heads * count), bounds=Bounds(0, 1))
    if result.x is None:
        raise ValueError(f"no pattern choice meets the constraint ({result.message})")
    picks = result.x.reshape(heads, count).argmax(1)
    indices, start = [], 0
    for layer in errors:
        indices.append([int(i) for i in picks[start : start + len(layer)]])
        start += len(layer)
    return Choice(
        indices=indices,
        error=float(error[np.arange(heads), picks].sum()),
        density=float(densities[picks].mean()),
        cost_ms=float(costs[picks].sum()),
    )


@dataclass(frozen=True)
class Goal:
    """What a search solves for in the sparse steps (one field of the first three is set).

    Attributes:
        sparse_density: a mean attention density over the heads.
        max_error: a budget for the summed predicted error.
        cost_fraction: a share of the dense heads' summed predicted time.
        max_cost: that share in milliseconds, once the cost model is fitted (``dataclasses.replace``).
    """

    sparse_density: float | None = None
    max_error: float | None = None
    cost_fraction: float | None = None
    max_cost: float | None = None

    @classmethod
    def of(
        cls,
        target_density: float | None,
        min_psnr: float | None,
        target_speedup: float | None,
        steps: int,
        dense_steps: int,
    ) -> Goal:
        """The goal in the sparse steps of exactly one of a mean ``target_density`` over all ``steps``, a
        ``min_psnr`` (dB) or a ``target_speedup`` of the attention time over all ``steps``, whose first
        ``dense_steps`` run dense (density 1, the dense cost).

        Raises:
            ValueError: not exactly one goal, a goal out of range, bad step counts, or a goal the dense steps
                alone already miss.
        """
        if sum(goal is not None for goal in (target_density, min_psnr, target_speedup)) != 1:
            raise ValueError("give exactly one of target_density, min_psnr and target_speedup")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not isinstance(dense_steps, int) or isinstance(dense_steps, bool) or not 0 <= dense_steps < steps:
            raise ValueError(f"dense_steps must be an integer in 0..{steps - 1}, got {dense_steps!r}")
        sparse_steps = steps - dense_steps
        if target_density is not None:
            if not 0 < target_density <= 1:
                raise ValueError(f"target_density must be in (0, 1], got {target_density}")
            sparse_density = (target_density * steps - dense_steps) / sparse_steps
            if sparse_density <= 0:
                raise ValueError(
                    f"{dense_steps} dense steps of {steps} already exceed a mean density of {target_density}"
                )
            return cls(sparse_density=sparse_density)
        if min_psnr is not None:
            if not math.isfinite(min_psnr) or min_psnr <= 0:
                raise ValueError(f"min_psnr must be a finite number of dB above 0, got {min_psnr}")
            return cls(max_error=10 ** (-min_psnr / 10))
        if not math.isfinite(target_speedup) or target_speedup <= 1:
            raise ValueError(f"target_speedup must be a finite number above 1, got {target_speedup}")
        fraction = (steps / target_speedup - dense_steps) / sparse_steps
        if fraction <= 0:
            raise ValueError(
                f"{dense_steps} dense steps of {steps} already take more than 1/{target_speedup} of the dense "
                "attention time: no plan reaches that speed-up; ask for less or run fewer steps dense"
            )
        return cls(cost_fraction=fraction)


def candidate_densities(candidates: Sequence[HeadPattern], grid: TokenGrid) -> np.ndarray:
    """The exact attention density of each candidate on ``grid``."""
    return np.array([density(p, grid) for p in candidates])
