"""Block-sparse attention as dense SDPA over runs of whole tiles: the fast CPU link of the fallback chain.

A window over frames (Sparse-vDiT's diagonal and multi-diagonal patterns) visits, for each query block, one or a
few contiguous runs of key blocks, every tile of them **full** (all pairs allowed) when frames fill whole blocks.
Such a query range needs no mask at all: its attention is plain SDPA over slices of ``key`` and ``value``. A
slice is a view, so a single run costs no copy, and SDPA's CPU flash kernel computes a visited tile about three
times faster than compiled FlexAttention does (``python -m accel.bench sparse``, one thread, 8,192 tokens).

:class:`RunsAttention` splits one launch's ``(head, query block)`` rows in two:

* rows whose visited tiles are all full: consecutive query blocks with the same key runs, and then heads with
  the same query range and runs, are merged into one SDPA call each (several runs are concatenated);
* rows with a partial tile: FlexAttention with a block mask restricted to those rows (compiled), as the
  ``"flex"`` backend runs them.

Rows that visit no tile get zeros, as in :func:`accel.sparse.reference.reference_attention`. A layout that would
need more than :data:`MAX_CALLS` SDPA calls runs every row through FlexAttention instead (the calls are unrolled
into a compiled graph).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from accel.sparse.blocks import block_classes
from accel.sparse.patterns import HeadPattern, HeadTables, TokenGrid, allowed

logger = logging.getLogger(__name__)

#: the most SDPA calls one launch unrolls; past it, every row runs through FlexAttention
MAX_CALLS = 512


@dataclass(frozen=True)
class SliceCall:
    """One SDPA call: ``heads[0]:heads[1]`` x ``queries[0]:queries[1]`` attending to the ``keys`` runs
    (``(start, stop)`` token ranges, ascending)."""

    heads: tuple[int, int]
    queries: tuple[int, int]
    keys: tuple[tuple[int, int], ...]


def _ranges(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending ``indices`` as maximal ``[start, stop)`` ranges of consecutive integers."""
    ranges: list[list[int]] = []
    for index in indices:
        if ranges and ranges[-1][1] == index:
            ranges[-1][1] = index + 1
        else:
            ranges.append([index, index + 1])
    return [(start, stop) for start, stop in ranges]


def key_runs(full_row: torch.Tensor, block: int, length: int) -> tuple[tuple[int, int], ...]:
    """The contiguous token ranges covered by the True entries of ``full_row`` (``(kv_blocks,)`` bool), each
    block ``block`` tokens, clipped to ``length``."""
    blocks = _ranges(full_row.nonzero().flatten().tolist())
    return tuple((start * block, min(stop * block, length)) for start, stop in blocks)


def slice_calls(full: torch.Tensor, flex_rows: torch.Tensor, block: int, length: int) -> list[SliceCall]:
    """The SDPA calls of the rows that are not in ``flex_rows``: consecutive query blocks of a head with the same
    key runs form one query range, and the heads sharing a query range and runs form ranges of consecutive heads.

    Args:
        full: ``(heads, q_blocks, kv_blocks)`` bool: the full tiles.
        flex_rows: ``(heads, q_blocks)`` bool: rows left to FlexAttention.
        block: the tile size (queries and keys).
        length: the sequence length.
    """
    heads_of: dict[tuple, list[int]] = {}  # (query range, key runs) -> heads, ascending
    for head in range(full.shape[0]):
        row_runs = [None if flex else key_runs(row, block, length) for row, flex in zip(full[head], flex_rows[head])]
        for runs, group in itertools.groupby(enumerate(row_runs), key=lambda item: item[1]):
            if runs:  # None: FlexAttention's row; (): no key, zeros
                blocks = [q_block for q_block, _ in group]
                queries = (blocks[0] * block, min((blocks[-1] + 1) * block, length))
                heads_of.setdefault((queries, runs), []).append(head)
    return [
        SliceCall(heads, queries, runs)
        for (queries, runs), heads_list in heads_of.items()
        for heads in _ranges(heads_list)
    ]


class RunsAttention:
    """A block-sparse launch as SDPA over runs of full tiles plus FlexAttention for rows with partial tiles.

    Args:
        patterns: one sparse :class:`HeadPattern` per head of the launch.
        grid: the tokens of the calls it will serve.
        device: where the calls run.
        block: the tile size (queries and keys), a power of two >= 16.
    """

    def __init__(self, patterns: Sequence[HeadPattern], grid: TokenGrid, device: torch.device | str, block: int):
        from torch.nn.attention.flex_attention import create_block_mask

        self.grid, self.block = grid, block
        partial, full = block_classes(patterns, grid, block, block)
        flex_rows = partial.any(-1)  # (heads, q_blocks)
        self.calls = slice_calls(full, flex_rows, block, grid.length)
        if len(self.calls) > MAX_CALLS:
            logger.debug("%d SDPA calls in one launch (> %d): FlexAttention for every row", len(self.calls), MAX_CALLS)
            self.calls, flex_rows = [], torch.ones_like(flex_rows)
        self.visited = (partial | full).sum().item() / max(1, full.numel())
        self.block_mask = None
        if flex_rows.any():
            tables, rows = HeadTables.build(patterns, grid, device), flex_rows.to(device)

            def mask_mod(batch, head, query, key):
                return allowed(tables, grid, head, query, key) & rows[head, query // block]

            self.block_mask = create_block_mask(
                mask_mod, None, len(patterns), grid.length, grid.length, device=device, BLOCK_SIZE=block
            )

    def density(self) -> float:
        """The fraction of tiles the launch visits (full or partial)."""
        return self.visited

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None):
        """Attention ``(batch, heads, length, head_dim)`` of ``query``, ``key``, ``value`` of that shape."""
        from accel.sparse.kernels import flex_attention

        if self.block_mask is not None:
            out = flex_attention(query, key, value, self.block_mask, scale)
        else:
            out = torch.zeros_like(query)
        for call in self.calls:
            (h0, h1), (q0, q1) = call.heads, call.queries
            keys = [key[:, h0:h1, start:stop] for start, stop in call.keys]  # views: no copy for one run
            values = [value[:, h0:h1, start:stop] for start, stop in call.keys]
            if len(keys) > 1:
                keys, values = [torch.cat(keys, 2)], [torch.cat(values, 2)]
            out[:, h0:h1, q0:q1] = F.scaled_dot_product_attention(
                query[:, h0:h1, q0:q1], keys[0], values[0], scale=scale
            )
        return out
