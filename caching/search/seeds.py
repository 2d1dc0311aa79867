"""Starting points of the search: the literature's heuristics and the dynamic-programming schedules.

:func:`dp_schedules` is also the whole of ``accel search --algorithm dp``: given the change matrices of one
full-compute run it returns CacheQuant's and BAC's schedules for a range of update budgets, in milliseconds.
"""

from __future__ import annotations

import math

import numpy as np

from accel.caching.heuristics import delta_dit, fora, taylorseer, tgate
from accel.caching.schedule import Schedule, ScheduleLayout
from accel.caching.search.dp import bac_mask, cachequant_mask
from accel.caching.search.genome import Constraints, repair


def heuristic_schedules(layout: ScheduleLayout, num_steps: int) -> dict[str, Schedule]:
    """The baselines by name: FORA-2/3/4, TaylorSeer-2/3/4 (first order), Delta-DiT (refresh every 2 and 3
    steps) and T-GATE where it applies."""
    schedules = {f"fora-{n}": fora(layout, num_steps, n) for n in (2, 3, 4)}
    schedules.update({f"taylorseer-{n}": taylorseer(layout, num_steps, n) for n in (2, 3, 4)})
    schedules["delta-dit"] = delta_dit(layout, num_steps, 2)
    schedules["delta-dit-3"] = delta_dit(layout, num_steps, 3)
    if "cross_attn" in layout.components:
        schedules["tgate"] = tgate(layout, num_steps)
    return schedules


def ramp_schedules(layout: ScheduleLayout, num_steps: int, max_reuse: int | None = None) -> dict[str, Schedule]:
    """Seeds that compute every component at steps spaced ever wider, dense where the early, structure-forming
    steps change most, sparse late: ``k`` computes (4 up to half the steps) at ``round(last * (i / (k - 1)) **
    power)`` for powers 1.5 and 2.

    With a reuse cap ``max_reuse``, the last compute is at ``num_steps - 1 - max_reuse`` (so the final run of
    reuse is just allowed) and ramps with a longer run than the cap are left out, so every seed already meets
    the constraint instead of being repaired into a costlier schedule; without one, at ``num_steps * ((k - 1) /
    k) ** power``.
    """
    if max_reuse is not None and max_reuse >= num_steps - 1:
        max_reuse = None  # a cap no run of reuse can reach: as without one
    schedules = {}
    for power in (1.5, 2.0):
        for computes in range(4, num_steps // 2 + 1):
            if max_reuse is None:
                last = num_steps * ((computes - 1) / computes) ** power
            else:
                last = num_steps - 1 - max_reuse
            steps = sorted({round(last * (i / (computes - 1)) ** power) for i in range(computes)})
            if max_reuse is not None and np.diff(steps, append=num_steps).max() > max_reuse + 1:
                continue
            name = f"ramp-{len(steps)}-p{power:g}"  # rounding may merge computes: named by the count kept
            if name in schedules:
                continue
            mask = np.zeros((num_steps, layout.num_blocks, len(layout.components)), dtype=bool)
            mask[steps] = True
            schedules[name] = Schedule(
                mask=mask,
                components=layout.components,
                model_class=layout.model_class,
                reuse="residual",
                provenance={"generator": "ramp", "computes": len(steps), "power": power},
            )
    return schedules


def update_budgets(num_steps: int, constraints: Constraints) -> list[int]:
    """Refresh-step counts for the DP schedules: from about 2/3 of the steps down to about 1/6."""
    least = len(constraints.forced_steps(num_steps))
    budgets = {max(least, min(num_steps - 1, math.ceil(num_steps / ratio))) for ratio in (1.5, 2, 2.5, 3, 4, 5, 6)}
    return sorted(budgets, reverse=True)


def dp_schedules(
    layout: ScheduleLayout,
    change: np.ndarray,
    constraints: Constraints,
    weights: np.ndarray | None = None,
    budgets: list[int] | None = None,
    union_quantile: float = 0.75,
) -> dict[str, Schedule]:
    """CacheQuant and BAC schedules from change matrices, repaired to ``constraints``.

    Args:
        layout: the model's schedule layout.
        change: ``(blocks, components, steps, steps)`` from :meth:`FeatureRecorder.change_matrices`.
        constraints: forced steps are refresh steps of every DP; the reuse cap is applied by repair.
        weights: ``(blocks, components)`` weights of CacheQuant's summed change (e.g. MACs).
        budgets: refresh steps per schedule; default :func:`update_budgets`.
        union_quantile: BAC's error quantile for the bubbling union.

    Returns:
        ``{"cachequant-K": ..., "bac-K": ...}``.
    """
    num_steps = change.shape[-1]
    forced = constraints.forced_steps(num_steps)
    ffn = layout.components.index("ffn") if "ffn" in layout.components else None
    result = {}
    for budget in budgets or update_budgets(num_steps, constraints):
        masks = {
            "cachequant": cachequant_mask(change, budget, weights, forced),
            "bac": bac_mask(change, budget, ffn, union_quantile, forced=forced),
        }
        for name, mask in masks.items():
            result[f"{name}-{budget}"] = Schedule(
                mask=repair(mask, constraints),
                components=layout.components,
                model_class=layout.model_class,
                reuse="residual",
                provenance={
                    "generator": name,
                    "updates": budget,
                    **({"union_quantile": union_quantile} if name == "bac" else {}),
                },
            )
    return result
