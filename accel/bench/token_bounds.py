"""Diagnostics of per-token step allocation on the bundled models (``python -m accel.bench tokens`` with a flag).

* ``--bounds`` (:func:`bounds`): where the allocation loses its quality. At equal token-steps (no timing), the
  allocation as built (the skipped tokens' keys and values come from the per-layer cache) beside the same
  allocation with every token's context current (:class:`SamplerAllocation`: the model computes every token,
  only the skipped tokens' velocities are the cached ones), an oracle selection, a random one, and fewer steps;
  then the same at the benchmark's runtime targets, with ours in its default form and its calibrated budget,
  beside full compute on ours' grid (the best any allocation on that grid can approach).
* ``--sweep-min-active`` (:func:`min_active_sweep`): ours at several ``min_active`` values, each at the budget
  whose predicted runtime is 50% and 25% of full compute's, beside fewer steps, with measured speed-ups: what
  the default ``min_active`` rests on.
* ``--dense-shapes`` (:func:`dense_shapes`): ours with other dense schedules (RAS's shape, two, 0.3 and 0.4
  of the grid's steps dense) at equal token-steps and grid, on two seeds: what ``dense_share`` rests on.
* ``--curve`` (:func:`speed_curve`): ours at several budgets and fewer steps at several step counts, every run
  timed in one interleaved round, and each of ours compared with fewer steps at its own measured speed-up
  (the PSNR of the steps curve interpolated there): equal speed without a calibration's misses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Literal

import torch

import accel
from accel.bench.token_report import psnr_of
from accel.bench.tokens import TARGETS, Model, calibrate, measured_speedups, ours
from accel.caching import TokenStepConfig
from accel.caching.token_select import TokenHistory, select, velocity_scores
from accel.geometry import patch_size

#: the token shares of the bounds and the first steps that compute every token there
BOUND_SHARES = (0.5, 0.25)
BOUND_DENSE_STEPS = 2
Selection = Literal["velocity", "oracle", "random"]


def _to_tokens(velocity: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """``(rows, channels, *dims)`` -> ``(rows, tokens, channels * prod(patch))``, one entry per patch of
    ``patch`` latent pixels (the token order is the grid's; the inverse is :func:`_from_tokens`)."""
    rows, channels, *dims = velocity.shape
    split = [v for d, p in zip(dims, patch, strict=True) for v in (d // p, p)]
    n = len(dims)
    order = [0, *range(2, 2 + 2 * n, 2), 1, *range(3, 3 + 2 * n, 2)]
    return velocity.reshape(rows, channels, *split).permute(order).reshape(rows, -1, channels * math.prod(patch))


def _from_tokens(tokens: torch.Tensor, like: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`_to_tokens`, shaped like ``like``."""
    rows, channels, *dims = like.shape
    n = len(dims)
    grid = [d // p for d, p in zip(dims, patch, strict=True)]
    blocks = tokens.reshape(rows, *grid, channels, *patch)
    order = [0, n + 1] + [v for i in range(n) for v in (1 + i, n + 2 + i)]
    return blocks.permute(order).reshape(like.shape)


class SamplerAllocation:
    """Per-token step allocation with every token's context current: the model computes every token at every
    step, and before the scheduler's update the velocity of the tokens a step skips is replaced by the one cached
    when they were last computed (what per-token steps feed the sampler), so only the skipped tokens' own
    velocities are stale, not the keys and values the computed tokens attend to. It costs full compute; it
    bounds what a fresher attention cache could give.

    Args:
        pipe: the pipeline (its ``scheduler.step`` is wrapped while the context is open).
        config: the allocation's schedule (:meth:`TokenStepConfig.active_counts`) and velocity rule settings.
        steps: the step count of the call the allocation is planned for. A configuration that coarsens the grid
            (``min_active > 0`` below its budget) runs on :meth:`TokenStepConfig.grid_steps` of it: call the
            pipeline with :attr:`grid` steps.
        selection: ``"velocity"`` (our rule on the guided velocity of each prompt), ``"oracle"`` (the tokens whose
            velocity changed most since cached, known only after computing them) or ``"random"``.
    """

    def __init__(self, pipe, config: TokenStepConfig, steps: int, selection: Selection):
        if selection not in ("velocity", "oracle", "random"):
            raise ValueError(f"selection must be 'velocity', 'oracle' or 'random', got {selection!r}")
        self.pipe, self.config, self.steps, self.selection = pipe, config, steps, selection
        self.grid = config.grid_steps(steps)
        dims = patch_size(pipe.transformer)
        self.patches = {4: dims[1:], 5: dims}  # images (rows, C, H, W), clips (rows, C, F, H, W)

    def __enter__(self) -> SamplerAllocation:
        scheduler, original = self.pipe.scheduler, self.pipe.scheduler.step
        history: list[TokenHistory] = []
        generator = torch.Generator().manual_seed(0)

        def step(model_output, timestep, sample, *args, **kwargs):
            patch = self.patches[model_output.ndim]
            velocity = _to_tokens(model_output.float(), patch)
            rows, tokens, _ = velocity.shape
            index = scheduler.step_index or 0
            time = torch.as_tensor(timestep, dtype=torch.float32).flatten()[:1].expand(rows)
            if index == 0 and len(scheduler.timesteps) != self.grid:  # a call's steps share its timesteps
                raise ValueError(f"the allocation runs on {self.grid} steps; the pipeline was called with "
                                 f"{len(scheduler.timesteps)}")  # fmt: skip
            count = self.config.active_counts(self.steps, tokens)[index]
            if not history or index == 0:  # a pipeline call starts
                history[:] = [TokenHistory.start(velocity, time, self.grid)]
                return original(model_output, timestep, sample, *args, **kwargs)
            past = history[0]
            if count == tokens:
                past.update(velocity, torch.ones(rows, tokens, dtype=torch.bool), time)
                return original(model_output, timestep, sample, *args, **kwargs)
            if self.selection == "velocity":
                skipped = self.config.max_skipped_steps or max(2, math.ceil(2 * tokens / count))
                scores = velocity_scores(past, time, self.config.rate_floor, skipped)
            elif self.selection == "oracle":
                scores = (velocity - past.last).square().mean(-1)
            else:
                scores = torch.rand(rows, tokens, generator=generator)
            active = torch.zeros(rows, tokens, dtype=torch.bool).scatter_(1, select(scores, count), True)
            mixed = _from_tokens(past.update(velocity, active, time), model_output, patch)
            return original(mixed.to(model_output.dtype), timestep, sample, *args, **kwargs)

        scheduler.step = step
        return self

    def __exit__(self, *exc) -> None:
        del self.pipe.scheduler.step  # the class's method again


def bounds(model: Model, steps: int) -> dict:
    """Where per-token steps lose quality: :func:`bounds_at_token_steps` (``"token_steps"``) and
    :func:`bounds_at_runtime` (``"runtime"``), against one full-compute run."""
    full = model.generate(model.prompts, steps, 0)
    return {
        "token_steps": bounds_at_token_steps(model, steps, full),
        "runtime": bounds_at_runtime(model, steps, full),
    }


def _scorer(model: Model, steps: int, full: torch.Tensor | None) -> Callable[[torch.Tensor], float]:
    """PSNR (dB, two decimals) of samples against ``full`` (full compute of the prompts at seed 0; generated
    when None)."""
    full = model.generate(model.prompts, steps, 0) if full is None else full
    return lambda samples: round(psnr_of(samples, full), 2)


def _bound_rows(
    model: Model, config: TokenStepConfig, steps: int, score: Callable[[torch.Tensor], float]
) -> dict[str, float]:
    """``ours`` (``config`` as built) and :class:`SamplerAllocation` of the same schedule with our rule
    (``current-context``), the oracle and random selections, each scored by ``score``."""
    with accel.apply(model.pipe, config):
        row = {"ours": score(model.generate(model.prompts, steps, 0))}
    for name, selection in (("current-context", "velocity"), ("oracle", "oracle"), ("random", "random")):
        with SamplerAllocation(model.pipe, config, steps, selection) as allocation:
            row[name] = score(model.generate(model.prompts, allocation.grid, 0))
    return row


def bounds_at_token_steps(model: Model, steps: int, full: torch.Tensor | None = None) -> dict:
    """At equal token-steps (no timing), PSNR against full compute (``full``, or generated), per share of
    :data:`BOUND_SHARES` on every step of the grid (``min_active=0``, the first steps dense):

    * ``steps-N``: fewer steps with the same token-steps;
    * ``ours``: :class:`~accel.caching.TokenStepConfig` itself (skipped tokens' keys and values from the cache);
    * ``current-context``: :class:`SamplerAllocation` with our rule (the same allocation, every token computed);
    * ``oracle``, ``random``: :class:`SamplerAllocation` choosing by the true change of velocity, or at random.
    """
    score = _scorer(model, steps, full)
    table = {}
    for share in BOUND_SHARES:
        config = TokenStepConfig(budget=share, dense_steps=BOUND_DENSE_STEPS, dense_share=0.0, buckets=16, min_active=0)
        row = {f"steps-{round(share * steps)}": score(model.generate(model.prompts, round(share * steps), 0))}
        row.update(_bound_rows(model, config, steps, score))
        row["token_steps"] = round(config.planned_fraction(steps, model.tokens), 3)
        table[str(share)] = row
    print(f"\n{model.name} model: PSNR vs full compute at equal token-steps, {steps} steps, {model.tokens} tokens")
    for share, row in table.items():
        print(f"  share {share}: " + "  ".join(f"{name} {value}" for name, value in row.items()))
    return table


def bounds_at_runtime(model: Model, steps: int, full: torch.Tensor | None = None) -> dict:
    """The benchmark's own rows (the calibration times its runs; the rows are not timed): per target of
    :data:`~accel.bench.tokens.TARGETS`, ours (the library's default form, its budget calibrated to the target
    like the benchmark's) beside the same allocation with every token's context current, the oracle and random
    selections, fewer steps at the target (``steps-N``) and full compute on ours' grid (``grid-G``: what any
    allocation on that grid approaches as its context and velocities get current). PSNR against full compute
    (``full``, or generated); ``token_steps`` and ``grid_steps``: ours' plan."""
    chosen = calibrate(model, steps)
    score = _scorer(model, steps, full)
    table = {}
    for target in TARGETS:
        knobs = chosen[target]
        config = ours(knobs["ours"], steps)
        grid = config.grid_steps(steps)
        row = {f"steps-{knobs['steps']}": score(model.generate(model.prompts, knobs["steps"], 0))}
        row[f"grid-{grid}"] = score(model.generate(model.prompts, grid, 0))
        row.update(_bound_rows(model, config, steps, score))
        row.update(token_steps=round(config.planned_fraction(steps, model.tokens), 3), grid_steps=grid)
        table[f"{target:g}"] = row
    print(f"\n{model.name} model: PSNR vs full compute at the benchmark's runtime targets, {steps} steps")
    for target, row in table.items():
        print(f"  at {target}: " + "  ".join(f"{name} {value}" for name, value in row.items()))
    return table


#: the min_active values of :func:`min_active_sweep`
MIN_ACTIVES = (0.0, 0.5, 0.65, 0.8, 0.9)


def min_active_sweep(model: Model, steps: int, values: tuple[float, ...] = MIN_ACTIVES) -> dict:
    """Per target of :data:`~accel.bench.tokens.TARGETS`, fewer steps and ours at each ``min_active`` of
    ``values`` (its budget calibrated to the target like the benchmark's rows): PSNR against full compute on
    every prompt, speed-up measured on the probe prompts (interleaved, the fastest of three rounds); ``reached``:
    whether the calibration predicts the row within tolerance of its target (else flagged ``unreachable``)."""
    chosen = calibrate(model, steps, values)
    full = model.generate(model.prompts, steps, 0)
    runs, calibrated, rows = {"full": (nullcontext, steps)}, {}, {}
    for target in TARGETS:
        knobs, tag = chosen[target], f"@{round(100 * target)}"
        name = f"steps-{knobs['steps']}{tag}"
        runs[name], calibrated[name] = (nullcontext, knobs["steps"]), (target, "steps")
        for value in values:
            config = ours(knobs[f"min_active-{value:g}"], steps, min_active=value)
            name = f"min_active-{value:g}{tag}"
            runs[name] = (lambda config=config: accel.apply(model.pipe, config), steps)
            calibrated[name] = (target, f"min_active-{value:g}")
    for name, (target, method) in calibrated.items():
        context, row_steps = runs[name]
        with context():
            samples = model.generate(model.prompts, row_steps, 0)
        reached = method not in chosen[target]["unreachable"]
        rows[name] = {"psnr": round(psnr_of(samples, full), 2), "reached": reached}
    for name, speedup in measured_speedups(model, runs).items():
        if name in rows:
            rows[name]["speedup"] = round(speedup, 2)
    print(f"\n{model.name} model: ours at several min_active values, {steps} steps (PSNR vs full compute)")
    for name, row in rows.items():
        flag = "" if row["reached"] else "  unreachable"
        print(f"  {name:<18} speed-up {row['speedup']:.2f}x  PSNR {row['psnr']:.2f}{flag}")
    return rows


#: the budgets of ours and the step counts of fewer steps that :func:`speed_curve` runs (of a 20-step call)
CURVE_BUDGETS = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
CURVE_STEPS = (2, 3, 4, 5, 6, 8, 10, 12)


def speed_curve(model: Model, steps: int) -> dict:
    """PSNR against full compute (every prompt) and measured speed-up (the probe prompts, interleaved, fastest
    of three rounds) of ours at :data:`CURVE_BUDGETS` and of fewer steps at :data:`CURVE_STEPS`; for each of
    ours, ``steps_psnr``: the fewer-steps curve's PSNR at ours' speed-up (linear between its two neighbours;
    None outside the curve's range) and ``gain``, ours' PSNR minus it."""
    full = model.generate(model.prompts, steps, 0)
    runs = {"full": (nullcontext, steps)}
    runs.update({f"steps-{n}": (nullcontext, n) for n in CURVE_STEPS if n < steps})
    configs = {f"ours-{b:g}": ours(b, steps) for b in CURVE_BUDGETS}
    runs.update({name: (lambda c=c: accel.apply(model.pipe, c), steps) for name, c in configs.items()})
    rows = {}
    for name, (context, row_steps) in runs.items():
        if name != "full":
            with context():
                rows[name] = {"psnr": round(psnr_of(model.generate(model.prompts, row_steps, 0), full), 2)}
    for name, speedup in measured_speedups(model, runs).items():
        if name in rows:
            rows[name]["speedup"] = round(speedup, 2)
    plain = sorted((rows[n]["speedup"], rows[n]["psnr"]) for n in rows if n.startswith("steps-"))
    for name in configs:
        rows[name]["steps_psnr"] = _at_speed(plain, rows[name]["speedup"])
        known = rows[name]["steps_psnr"] is not None
        rows[name]["gain"] = round(rows[name]["psnr"] - rows[name]["steps_psnr"], 2) if known else None
    print(f"\n{model.name} model: PSNR against measured speed-up, {steps}-step calls")
    for name, row in rows.items():
        versus = (
            f"  fewer steps at that speed {row['steps_psnr']:.2f}, gain {row['gain']:+.2f}"
            if row.get("gain") is not None
            else ""
        )
        print(f"  {name:<10} speed-up {row['speedup']:.2f}x  PSNR {row['psnr']:.2f}{versus}")
    return rows


def _at_speed(curve: list[tuple[float, float]], speedup: float) -> float | None:
    """The PSNR of ``curve`` (``(speed-up, PSNR)`` pairs sorted by speed-up) at ``speedup``, linear between the
    neighbouring points; None outside the curve."""
    for (low, low_psnr), (high, high_psnr) in zip(curve, curve[1:]):
        if low <= speedup <= high:
            share = 0.0 if high == low else (speedup - low) / (high - low)
            return round(low_psnr + share * (high_psnr - low_psnr), 2)
    return None


#: the budgets of :func:`dense_shapes` (on the default ``min_active`` 0.8: grids of 8, 10 and 11 of 20 steps)
SHAPE_BUDGETS = (0.3, 0.4, 0.45)
SHAPE_SEEDS = (0, 1)


def shapes(budget: float, steps: int) -> dict[str, TokenStepConfig]:
    """Ours at ``budget`` for calls of ``steps`` steps with other dense schedules, the same grid and token-steps:
    ``ras-shape`` (the first 3/20 of the grid's steps, at least 2, and resets at 0.4 and 0.73 of it), ``dense-2``
    (``dense_share=0``), ``dense-0.3`` (the default) and ``dense-0.4``."""
    base = ours(budget, steps)
    ras_shape = max(2, round(0.15 * base.grid_steps(steps)))
    return {
        "ras-shape": dataclasses.replace(base, dense_share=0.0, dense_steps=ras_shape, reset_points=(0.4, 0.733)),
        "dense-2": dataclasses.replace(base, dense_share=0.0),
        "dense-0.3": base,
        "dense-0.4": dataclasses.replace(base, dense_share=0.4),
    }


def dense_shapes(model: Model, steps: int) -> dict:
    """PSNR against full compute of ours under each schedule of :func:`shapes`, per budget of
    :data:`SHAPE_BUDGETS` and seed of :data:`SHAPE_SEEDS` (no timing: the schedules share the grid and, within a
    bucket, the token-steps, which set the runtime; each budget's ``grid_steps`` and ``token_steps``, each
    schedule's planned share, say so)."""
    configs = {f"{budget:g}": shapes(budget, steps) for budget in SHAPE_BUDGETS}
    table = {
        key: {
            "grid_steps": found["dense-0.3"].grid_steps(steps),
            "token_steps": {name: round(c.planned_fraction(steps, model.tokens), 3) for name, c in found.items()},
        }
        for key, found in configs.items()
    }
    for seed in SHAPE_SEEDS:
        full = model.generate(model.prompts, steps, seed)
        for key, found in configs.items():
            for name, config in found.items():
                with accel.apply(model.pipe, config):
                    psnr = round(psnr_of(model.generate(model.prompts, steps, seed), full), 2)
                table[key].setdefault(name, []).append(psnr)
    print(f"\n{model.name} model: ours with other dense schedules, {steps}-step calls, PSNR vs full per seed")
    for key, row in table.items():
        cells = "  ".join(f"{name} {'/'.join(f'{v:.2f}' for v in row[name])}" for name in configs[key])
        shares = sorted(set(row["token_steps"].values()))
        print(f"  budget {key} ({row['grid_steps']} grid steps): {cells}  token-steps {shares}")
    return table
