"""The configuration and statistics of per-token step allocation (:mod:`accel.caching.tokens` runs it):
:class:`TokenStepConfig`, the budget and how it is spent; :func:`ras_config`, RAS's released schedule;
:class:`TokenStepStats`, what a trajectory did."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from accel.caching.token_select import active_count, sparse_fraction

Selector = Literal["velocity", "ras"]


@dataclass(frozen=True, kw_only=True)
class TokenStepConfig:
    """Give tokens different numbers of denoising steps under a budget.

    Attributes:
        budget: the fraction of full compute's token-steps to compute, in (0, 1] (e.g. 0.5). Give this or
            ``speedup``.
        speedup: a target speed-up, read as the budget ``1 / speedup`` of token-steps (attention to every
            key and the work outside the blocks do not shrink, so the measured speed-up is lower).
        selector: ``"velocity"`` (ours: each row's own tokens by predicted error of their cached velocity) or
            ``"ras"`` (RAS's released rule, one selection shared by every row and branch, as a baseline).
        branches: for the velocity rule: ``"paired"``: the classifier-free-guidance branches of one prompt (rows
            or calls that take the same latents) share one selection from their averaged scores, since a fresh
            conditional velocity next to a stale unconditional one (or the reverse) is amplified by the
            guidance scale; different prompts still select alone. ``"own"``: every row and branch selects alone.
        dense_steps: the first steps compute every token (they fill the caches; at least 2 for the velocity
            rule, which needs two computed velocities to rate a token, at least 1 for RAS's).
        dense_share: in a pipeline (whose step count is known), the first ``dense_share`` of the grid's steps
            compute every token too, when that is more than ``dense_steps``; capped at half the share of tokens
            the grid's steps compute on average, so that the sparse steps keep the larger part of the budget.
            The velocity rule then rates tokens from velocities past the trajectory's first, fastest-changing
            steps. At the same grid and token-steps, 0.3 keeps 0.4-2.3 dB more PSNR than RAS's shape (3/20 of
            the grid dense, resets at 0.4 and 0.73) in 10 of 12 model, budget and seed cells on the bundled
            models, and 0.4-0.5 dB less on video on an 8-step grid (``python -m accel.bench tokens
            --dense-shapes``, docs/bench-tokens.txt). ``0``: ``dense_steps`` alone.
        reset_points: further steps that compute every token, as fractions of the trajectory (RAS resets at
            about 0.4 and 0.73); used when the pipeline's step count is known.
        buckets: sparse steps use active counts ``ceil(k * tokens / buckets)``, so compiled blocks see at most
            two sizes besides the full one.
        max_skipped_steps: a token skipped this many steps in a row is computed next, before any other;
            ``None``: twice the average gap at the step's active fraction.
        rate_floor: every token's velocity change rate is at least this share of its row's mean rate, so a
            skipped token's priority grows with time even when its velocity stood still.
        ras_starvation: RAS's ``starvation_scale`` (its released default 0.1).
        assume_flow_matching: accept a bare transformer whose adapter does not say flow matching (the caller
            vouches for its sampler); a pipeline's scheduler is always checked.
        min_active: the least share of the tokens that the steps compute on average. A budget below it also
            coarsens the pipeline's step grid, to ``budget / min_active`` of its steps (every token gets fewer
            steps, as with a smaller ``num_inference_steps``), and spends the budget on that grid; the handle
            logs the grid it ran. ``0`` never coarsens: every step of the pipeline's grid, fewer tokens (HSA's
            form). On both bundled models, at half of full compute's runtime, PSNR rises with ``min_active``
            from 0 to about 0.8 (a coarser grid, fewer tokens skipped) and there meets or passes plain fewer
            steps; below, the skipped tokens' stale keys and values cost more than a coarser grid (``python -m
            accel.bench tokens --sweep-min-active`` and ``--bounds``, docs/bench-tokens.txt). A bare transformer has no
            scheduler to coarsen: its budget is spent on every step it is called at, and the handle says so. The
            handle also says when the dense steps leave no token to skip on the grid, or alone exceed the budget.
    """

    budget: float | None = None
    speedup: float | None = None
    selector: Selector = "velocity"
    branches: Literal["paired", "own"] = "paired"
    dense_steps: int = 2
    dense_share: float = 0.3
    reset_points: tuple[float, ...] = ()
    buckets: int = 8
    max_skipped_steps: int | None = None
    rate_floor: float = 0.1
    ras_starvation: float = 0.1
    assume_flow_matching: bool = False
    min_active: float = 0.8

    def __post_init__(self):
        self._check_types()
        if (self.budget is None) == (self.speedup is None):
            raise ValueError("TokenStepConfig needs exactly one of budget (a fraction of token-steps) and speedup")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(f"TokenStepConfig.budget must be in (0, 1], got {self.budget}")
        if self.speedup is not None and not self.speedup >= 1:
            raise ValueError(f"TokenStepConfig.speedup must be >= 1, got {self.speedup}")
        if self.branches not in ("paired", "own"):
            raise ValueError(f"TokenStepConfig.branches must be 'paired' or 'own', got {self.branches!r}")
        if self.selector not in ("velocity", "ras"):
            raise ValueError(f"TokenStepConfig.selector must be 'velocity' or 'ras', got {self.selector!r}")
        if self.dense_steps < 1 or self.buckets < 1:
            raise ValueError("TokenStepConfig.dense_steps and buckets must be >= 1")
        if self.selector == "velocity" and self.dense_steps < 2:
            raise ValueError(
                "TokenStepConfig.dense_steps must be >= 2 for the velocity rule: it rates a token by the change "
                "between its two last computed velocities, and after one dense step every token rates the same "
                f"(the next step would pick its tokens blindly); got {self.dense_steps}"
            )
        if any(not 0 < p < 1 for p in self.reset_points):
            raise ValueError(f"TokenStepConfig.reset_points are fractions in (0, 1), got {self.reset_points}")
        if not 0 <= self.dense_share < 1:
            raise ValueError(f"TokenStepConfig.dense_share must be in [0, 1), got {self.dense_share}")
        if self.max_skipped_steps is not None and self.max_skipped_steps < 1:
            raise ValueError("TokenStepConfig.max_skipped_steps must be >= 1 or None")
        if self.rate_floor < 0:
            raise ValueError("TokenStepConfig.rate_floor must be >= 0")
        if not 0 <= self.min_active <= 1:
            raise ValueError(f"TokenStepConfig.min_active must be in [0, 1], got {self.min_active}")
        self._check_selector_knobs()

    def _check_types(self) -> None:
        """Numbers where numbers belong (no bools, strings or infinities), counts that are integers, and the
        reset points a sequence: checked first, so the range checks compare numbers."""
        for name in ("budget", "speedup", "dense_share", "rate_floor", "ras_starvation", "min_active"):
            value = getattr(self, name)
            if value is None and name in ("budget", "speedup"):
                continue
            if not is_real(value) or not math.isfinite(value):
                raise ValueError(f"TokenStepConfig.{name} must be a finite number, got {value!r}")
        for name in ("dense_steps", "buckets", "max_skipped_steps"):
            value = getattr(self, name)
            if not (is_count(value) or (value is None and name == "max_skipped_steps")):
                raise ValueError(f"TokenStepConfig.{name} must be an integer, got {value!r}")
        points = self.reset_points
        if not isinstance(points, (tuple, list)) or not all(is_real(p) for p in points):
            raise ValueError(f"TokenStepConfig.reset_points must be a tuple of fractions, got {points!r}")
        object.__setattr__(self, "reset_points", tuple(points))

    def _check_selector_knobs(self) -> None:
        """Refuse knobs the chosen selector never reads (set away from their defaults), rather than ignore them."""
        defaults = {f.name: f.default for f in fields(self)}
        ignored = {"ras": ("branches", "rate_floor", "max_skipped_steps"), "velocity": ("ras_starvation",)}
        unread = [name for name in ignored[self.selector] if getattr(self, name) != defaults[name]]
        if unread:
            raise ValueError(f"TokenStepConfig(selector={self.selector!r}) does not use {unread}: leave them unset")

    @property
    def fraction(self) -> float:
        """The budget as a fraction of token-steps."""
        return self.budget if self.budget is not None else 1.0 / self.speedup

    def grid_steps(self, num_steps: int) -> int:
        """Steps of the grid a pipeline call of ``num_steps`` steps runs on (see ``min_active``): ``num_steps``
        unless the budget is below ``min_active``; never fewer than ``dense_steps + 1`` (nor than 2)."""
        if self.fraction >= self.min_active:
            return num_steps
        coarse = round(num_steps * self.fraction / self.min_active)
        return min(num_steps, max(coarse, self.dense_steps + 1, 2))

    def grid_fraction(self, num_steps: int) -> float:
        """The budget on the grid of :meth:`grid_steps`: the same token-steps as ``fraction`` of the full grid."""
        return min(1.0, self.fraction * num_steps / self.grid_steps(num_steps))

    def leading_dense(self, num_steps: int | None) -> int:
        """How many steps at the start of a ``num_steps``-step grid compute every token (``None``: a bare
        transformer, whose step count is unknown: ``dense_steps``)."""
        if num_steps is None:
            return self.dense_steps
        grid_budget = min(1.0, max(self.fraction, self.min_active))  # grid_fraction up to its whole-step rounding
        share = min(self.dense_share, grid_budget / 2)
        return max(self.dense_steps, round(share * num_steps))

    def dense_at(self, step: int, num_steps: int | None) -> bool:
        """Whether ``step`` (of a grid of ``num_steps``) computes every token."""
        if step < self.leading_dense(num_steps):
            return True
        return num_steps is not None and step in {round(p * num_steps) for p in self.reset_points}

    def dense_count(self, num_steps: int) -> int:
        """How many of ``num_steps`` steps compute every token."""
        return sum(self.dense_at(step, num_steps) for step in range(num_steps))

    def active_counts(self, num_steps: int, tokens: int) -> list[int]:
        """Tokens each step computes when a pipeline is called with ``num_steps`` steps, on a model with
        ``tokens`` tokens: one count per step of :meth:`grid_steps` (what the handle will do in a pipeline, whose
        step count it knows)."""
        grid = self.grid_steps(num_steps)
        fraction = sparse_fraction(self.grid_fraction(num_steps), grid, self.dense_count(grid))
        counts, sparse = [], 0
        for step in range(grid):
            if self.dense_at(step, grid):
                counts.append(tokens)
            else:
                counts.append(active_count(sparse, fraction, tokens, self.buckets))
                sparse += 1
        return counts

    def planned_fraction(self, num_steps: int, tokens: int) -> float:
        """The fraction of the token-steps of ``num_steps`` full steps that :meth:`active_counts` computes (the
        budget, unless the dense steps alone exceed it or the smallest bucket is above the sparse steps' share)."""
        return sum(self.active_counts(num_steps, tokens)) / (num_steps * tokens)


def ras_config(budget: float, num_steps: int) -> TokenStepConfig:
    """RAS's released schedule for ``num_steps`` steps: dense for the first 4/30 of the steps, resets at 12/30
    and 22/30, its selection rule, every step of the pipeline's grid (``min_active=0``)."""
    return TokenStepConfig(
        budget=budget,
        selector="ras",
        dense_steps=max(1, round(4 * num_steps / 30)),
        dense_share=0.0,
        reset_points=(0.4, 0.733),
        min_active=0,
    )


@dataclass(frozen=True)
class TokenStepStats:
    """What per-token step allocation did in the current (or last) trajectory.

    Attributes:
        active: per step that ran, the fraction of tokens computed (mean over the step's transformer calls).
        token_steps: the fraction of the token-steps of full compute (every token at every step the pipeline
            asked for) that were computed.
        steps: ``(asked, ran)``: the pipeline's step count and the steps of the grid it ran (fewer when the
            budget is below ``min_active``).
        heat_maps: per branch (transformer call within a step), ``(rows, frames, height, width)`` int32: how
            many steps computed each token.
        grid: the ``(frames, height, width)`` token grid.
    """

    active: tuple[float, ...]
    token_steps: float
    steps: tuple[int, int]
    heat_maps: tuple[torch.Tensor, ...]
    grid: tuple[int, int, int] | None

    def mean_heat_map(self) -> torch.Tensor | None:
        """``(frames, height, width)`` float32: each token's step count averaged over every row and branch (those
        of the first branch's grid); None before any trajectory."""
        if not self.heat_maps:
            return None
        shape = self.heat_maps[0].shape[1:]
        return torch.cat([m.float() for m in self.heat_maps if m.shape[1:] == shape]).mean(0)

    def to_dict(self) -> dict:
        """JSON-ready: the active fraction per step, the token-steps fraction, the grid and the mean heat map
        (:meth:`mean_heat_map`, nested lists ``[frame][row][column]``)."""
        heat = self.mean_heat_map()
        return {
            "active": list(self.active),
            "token_steps": self.token_steps,
            "steps": list(self.steps),
            "grid": list(self.grid) if self.grid else None,
            "heat_map": None if heat is None else [[[round(v, 3) for v in row] for row in f] for f in heat.tolist()],
        }


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number (a NumPy one too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_count(value: Any) -> bool:
    """Whether ``value`` is a step count: any integer (a NumPy one too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
