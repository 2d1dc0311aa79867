"""Dynamic-programming schedulers: pure functions from feature-change matrices to compute masks.

A *change matrix* ``change[i, j]`` (``i < j``) is how far the feature computed at step ``j`` is from the one
computed at step ``i``, i.e. the error made at step ``j`` by reusing what step ``i`` computed (relative L1
distance, see :mod:`accel.caching.search.features`). Entries with ``i >= j`` are ignored.

* :func:`optimal_refresh_steps`: split the steps into ``num_updates`` contiguous groups, each computed at its
  first step and reused for the rest, minimising the summed change; exact, ``O(num_updates * steps**2)``.
* :func:`cachequant_mask`: CacheQuant's dynamic-programming schedule (Liu et al., CVPR 2025): one set of
  refresh steps for the whole model, from the change summed over blocks and components.
* :func:`bac_mask`: BAC's schedule (Ji et al., ICLR 2026): refresh steps chosen per component by the same
  dynamic programme under a per-component update budget, then the *bubbling union*: upstream components with
  large caching errors also refresh whenever a downstream feed-forward network does, so the FFN never
  recomputes on stale inputs; processed from the last block to the first, the unions bubble upwards.

Everything here is plain numpy on arrays; nothing touches a model.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _check_square(change: np.ndarray) -> np.ndarray:
    change = np.asarray(change, dtype=np.float64)
    if change.ndim != 2 or change.shape[0] != change.shape[1]:
        raise ValueError(f"a change matrix must be (steps, steps), got shape {change.shape}")
    return change


def group_costs(change: np.ndarray) -> np.ndarray:
    """``cost[a, b]``: summed change of the group of steps ``a .. b - 1`` computed at ``a`` and reused after.

    Args:
        change: ``(steps, steps)``; see the module docstring.

    Returns:
        ``(steps, steps + 1)`` float64; entries with ``b <= a`` are ``inf``.
    """
    change = _check_square(change)
    steps = change.shape[0]
    cost = np.full((steps, steps + 1), np.inf)
    for a in range(steps):
        # the group a..b-1 reuses step a at steps a+1..b-1
        tail = np.concatenate([[0.0], np.cumsum(change[a, a + 1 :])])  # tail[k] = sum of the first k reuses
        cost[a, a + 1 :] = tail[: steps - a]
    return cost


def optimal_refresh_steps(change: np.ndarray, num_updates: int, forced: Iterable[int] = (0,)) -> np.ndarray:
    """The steps to compute so that reusing in between costs the least total change.

    Args:
        change: ``(steps, steps)`` change matrix.
        num_updates: how many steps compute (groups); at least the number of ``forced`` steps.
        forced: steps that must compute (step 0 always does).

    Returns:
        bool ``(steps,)``, True at the ``num_updates`` refresh steps.
    """
    change = _check_square(change)
    steps = change.shape[0]
    forced_steps = sorted({0, *(int(s) for s in forced)})
    if any(not 0 <= s < steps for s in forced_steps):
        raise ValueError(f"forced steps must be in 0..{steps - 1}, got {forced_steps}")
    if not len(forced_steps) <= num_updates <= steps:
        raise ValueError(f"num_updates must be in {len(forced_steps)}..{steps} (forced steps {forced_steps})")
    cost = group_costs(change)
    is_forced = np.zeros(steps + 1, dtype=bool)
    is_forced[forced_steps] = True
    # a group [a, b) is allowed when no forced step lies strictly inside it
    inside = np.concatenate([[0], np.cumsum(is_forced[:steps])])  # inside[k] = forced steps < k
    best = np.full((num_updates + 1, steps + 1), np.inf)
    parent = np.zeros((num_updates + 1, steps + 1), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, num_updates + 1):
        for b in range(1, steps + 1):
            a = np.arange(b)
            allowed = inside[b] - inside[a + 1] == 0
            candidates = np.where(allowed, best[k - 1, a] + cost[a, b], np.inf)
            parent[k, b] = int(np.argmin(candidates))
            best[k, b] = candidates[parent[k, b]]
    if not np.isfinite(best[num_updates, steps]):
        raise ValueError("no schedule satisfies the forced steps with this many updates")
    mask = np.zeros(steps, dtype=bool)
    b = steps
    for k in range(num_updates, 0, -1):
        a = parent[k, b]
        mask[a] = True
        b = a
    return mask


def cachequant_mask(
    change: np.ndarray, num_updates: int, weights: np.ndarray | None = None, forced: Iterable[int] = (0,)
) -> np.ndarray:
    """CacheQuant's schedule: every component refreshes at the same ``num_updates`` optimal steps.

    Args:
        change: ``(blocks, components, steps, steps)`` change matrices.
        weights: ``(blocks, components)`` weight of each matrix in the sum (e.g. MACs); default all 1.
        forced: steps that must compute.

    Returns:
        bool mask ``(steps, blocks, components)``.
    """
    change = np.asarray(change, dtype=np.float64)
    if change.ndim != 4:
        raise ValueError(f"change must be (blocks, components, steps, steps), got shape {change.shape}")
    w = np.ones(change.shape[:2]) if weights is None else np.asarray(weights, dtype=np.float64)
    total = np.nan_to_num(np.einsum("bc,bcij->ij", w, change))
    steps = optimal_refresh_steps(total, num_updates, forced)
    return np.broadcast_to(steps[:, None, None], (change.shape[2], *change.shape[:2])).copy()


def reuse_error(change: np.ndarray, refresh: np.ndarray) -> float:
    """Summed change of reusing, at every non-refresh step, the last refresh step's feature.

    Args:
        change: ``(steps, steps)``.
        refresh: bool ``(steps,)``; step 0 must be True.
    """
    change = _check_square(change)
    last, total = 0, 0.0
    for step, computed in enumerate(refresh):
        if computed:
            last = step
        else:
            total += change[last, step]
    return total


def bubbling_union(
    mask: np.ndarray,
    errors: np.ndarray,
    ffn: int,
    threshold: float,
    window_blocks: int = 1,
) -> np.ndarray:
    """BAC's bubbling union: upstream components with a large error refresh whenever a downstream FFN does.

    Feed-forward networks are visited from the last block to the first. For the FFN of block ``b``, every
    component executed before it within ``window_blocks`` blocks (the earlier components of block ``b`` and all
    components of blocks ``b - window_blocks .. b - 1``) whose error is above ``threshold`` gets the FFN's
    refresh steps added to its own. Because FFNs of earlier blocks are visited later and see the enlarged
    sets, refreshes bubble up through chains of high-error components.

    Args:
        mask: bool ``(steps, blocks, components)`` per-component refresh steps.
        errors: ``(blocks, components)`` caching error of each component under ``mask``.
        ffn: index of the feed-forward component on the last axis.
        threshold: errors above it count as significant.
        window_blocks: how many preceding blocks count as upstream.

    Returns:
        a new mask, a superset of ``mask``.
    """
    result = np.array(mask, dtype=bool, copy=True)
    if result.ndim != 3:
        raise ValueError(f"mask must be (steps, blocks, components), got shape {result.shape}")
    num_blocks = result.shape[1]
    for block in range(num_blocks - 1, -1, -1):
        refresh = result[:, block, ffn].copy()
        for upstream in range(max(0, block - window_blocks), block + 1):
            for component in range(result.shape[2]):
                if upstream == block and component >= ffn:
                    continue
                if errors[upstream, component] > threshold:
                    result[:, upstream, component] |= refresh
    return result


def bac_mask(
    change: np.ndarray,
    num_updates: int,
    ffn: int | None,
    union_quantile: float = 0.75,
    window_blocks: int = 1,
    forced: Iterable[int] = (0,),
) -> np.ndarray:
    """BAC's schedule: per-component optimal refresh steps under a budget, then :func:`bubbling_union`.

    Args:
        change: ``(blocks, components, steps, steps)`` change matrices.
        num_updates: refresh steps per component before the union adds more.
        ffn: index of the feed-forward component, or None to skip the union.
        union_quantile: components whose error is above this quantile of all errors count as significant.
        window_blocks: see :func:`bubbling_union`.
        forced: steps that must compute.

    Returns:
        bool mask ``(steps, blocks, components)``.
    """
    change = np.nan_to_num(np.asarray(change, dtype=np.float64))
    if change.ndim != 4:
        raise ValueError(f"change must be (blocks, components, steps, steps), got shape {change.shape}")
    if not 0.0 <= union_quantile <= 1.0:
        raise ValueError(f"union_quantile must be in [0, 1], got {union_quantile}")
    num_blocks, num_components, steps, _ = change.shape
    mask = np.zeros((steps, num_blocks, num_components), dtype=bool)
    errors = np.zeros((num_blocks, num_components))
    forced = tuple(forced)
    for block in range(num_blocks):
        for component in range(num_components):
            refresh = optimal_refresh_steps(change[block, component], num_updates, forced)
            mask[:, block, component] = refresh
            errors[block, component] = reuse_error(change[block, component], refresh)
    if ffn is None:
        return mask
    threshold = float(np.quantile(errors, union_quantile))
    return bubbling_union(mask, errors, ffn, threshold, window_blocks)
