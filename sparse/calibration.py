"""End-to-end calibration of the sparse-attention search (:func:`accel.sparse.search`): what the profiled head
errors cost at the output.

The profile (:func:`accel.sparse.offline.profile_errors`) measures each head's local error; errors of early
layers propagate through the later ones and the steps, so the search runs the pipeline with trial plans and
compares the decoded output against dense: :class:`Calibration` turns local errors into predicted output MSE per
(layer, pattern), :func:`solve_in_rounds` measures the pairs each solve relies on and solves again, and
:func:`refine_layers` improves the solved plan layer by layer where the PSNR against dense says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from accel.api import apply, resolve
from accel.sparse.apply import SparseAttentionConfig
from accel.sparse.end_to_end import run_pipeline
from accel.sparse.patterns import HeadPattern, TokenGrid
from accel.sparse.plan import make_plan, plan_density
from accel.sparse.search import Choice, Goal, choose

logger = logging.getLogger(__name__)


class Calibration:
    """Turns the profiled (local) head errors into predicted end-to-end output MSE, measured per layer and pattern.

    A local error does not say what it costs at the output: errors of early layers propagate through the later
    ones and through the steps, guidance scales them, and a pattern that drops far frames hurts differently from
    one that drops far pixels. So for a (layer, pattern) pair the pipeline runs with that pattern on all the
    layer's heads and every other layer dense; the output MSE against dense divided by the layer's summed
    profiled error under the pattern is the pair's factor. Pairs not measured yet use the layer's probe factor.

    Args:
        pipe, prompts, steps, seed, call_kwargs: the calibration runs (as in :func:`accel.sparse.search`).
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


def solve_in_rounds(
    calibration: Calibration, densities: np.ndarray, costs: np.ndarray, goal: Goal, rounds: int
) -> Choice:
    """Solve, measure the (layer, pattern) pairs the answer relies on, solve again: up to ``rounds`` rounds."""
    for _ in range(rounds):
        choice = choose(calibration.weighted(), densities, costs, goal.sparse_density, goal.max_error, goal.max_cost)
        missing = calibration.unmeasured(choice.indices)
        if not missing:
            return choice
        for layer, candidate in sorted(missing):
            calibration.measure(layer, candidate)
    return choose(calibration.weighted(), densities, costs, goal.sparse_density, goal.max_error, goal.max_cost)


def refinement_pool(
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
