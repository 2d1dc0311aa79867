"""The one Pareto rule of accel: which points no other point beats on every objective.

The schedule search keeps the non-dominated rows of its ``(cost, -psnr)`` objectives; the evaluation report
draws the front of speedup against each metric. Both go through :func:`non_dominated`.
"""

from __future__ import annotations

import numpy as np


def non_dominated(objectives: np.ndarray, *, unique: bool = True) -> np.ndarray:
    """bool ``(n,)``: the rows of ``objectives`` (``(n, k)``, all minimised) that no other row dominates.

    A row dominates another when it is no worse in every objective and better in at least one.

    Args:
        objectives: ``(n, k)``, minimised.
        unique: of several identical rows keep only the first (else all of them).
    """
    objectives = np.asarray(objectives, dtype=np.float64).reshape(len(objectives), -1)
    no_worse = (objectives[:, None, :] <= objectives[None, :, :]).all(axis=2)  # [i, j]: i no worse than j
    better = (objectives[:, None, :] < objectives[None, :, :]).any(axis=2)
    keep = ~(no_worse & better).any(axis=0)
    if unique:
        same = (objectives[:, None, :] == objectives[None, :, :]).all(axis=2)
        keep &= ~np.tril(same, k=-1).any(axis=1)  # an identical row before it
    return keep


def pareto_front(points: list[tuple[str, float, float]], higher_is_better: bool) -> list[str]:
    """Names of the points no other point beats on both speedup (higher) and quality, sorted by speedup.

    Points identical in both are all kept.

    Args:
        points: ``(name, speedup, quality)``.
        higher_is_better: the quality's direction.
    """
    if not points:
        return []
    sign = -1.0 if higher_is_better else 1.0
    objectives = np.array([(-speed, sign * quality) for _, speed, quality in points])
    keep = non_dominated(objectives, unique=False)
    return [name for _, name in sorted((speed, name) for (name, speed, _), k in zip(points, keep) if k)]
