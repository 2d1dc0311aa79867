"""Block-sparse attention as SDPA over runs of visited tiles: the fast CPU link of the fallback chain.

A window over frames (Sparse-vDiT's diagonal and multi-diagonal patterns) visits, for each query block, one or a
few contiguous runs of key blocks, every tile of them **full** (all pairs allowed) when frames fill whole blocks.
Such a query range needs no mask at all: its attention is plain SDPA over slices of ``key`` and ``value``. A
slice is a view, so a single run costs no copy, and SDPA's CPU flash kernel computes a visited tile about three
times faster than compiled FlexAttention does (dense through both, 8,192 tokens, one thread: 255-285 ms against
800 ms; in ``python -m accel.bench sparse`` this backend reaches about twice FlexAttention's share of the ideal).

:class:`RunsAttention` groups one launch's ``(head, query block)`` rows into SDPA calls: consecutive query blocks
with the same runs of visited key blocks, then heads with the same query range and runs, make one call (several
runs are concatenated). A call over full tiles only needs no mask. A call with partial tiles gets an additive
float mask over its runs, built once, while the masks of the launch fit in :data:`MASK_BYTES` (a float mask
costs SDPA's CPU kernel about 8%); past that, the rows with a partial tile run through FlexAttention with a block
mask restricted to them (compiled), as the ``"flex"`` backend runs them.

Calls that step along the sequence together, as the frames of a window over frames do (each frame's queries
attending to the same number of keys, starting one frame further on), run as one batched SDPA call over
overlapping views of the keys and values (``Tensor.unfold``: no copy), a :class:`CallGroup`: on a GPU, one small
call per frame leaves most of the chip idle.

Rows that see no key get zeros, as in :func:`accel.sparse.reference.reference_attention`. A layout that would
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

from accel.sparse.blocks import block_classes, flex_block_mask
from accel.sparse.patterns import HeadPattern, HeadTables, TokenGrid, allowed

logger = logging.getLogger(__name__)

#: the most SDPA calls one launch unrolls; past it, every row runs through FlexAttention
MAX_CALLS = 512

#: the most bytes of additive masks one launch keeps for its rows with partial tiles; past it, those rows run
#: through FlexAttention (a float mask costs SDPA about 8% on CPU, FlexAttention's tile about 3x SDPA's)
MASK_BYTES = 64 << 20


@dataclass(frozen=True)
class SliceCall:
    """One SDPA call: ``heads[0]:heads[1]`` x ``queries[0]:queries[1]`` attending to the ``keys`` runs
    (``(start, stop)`` token ranges, ascending)."""

    heads: tuple[int, int]
    queries: tuple[int, int]
    keys: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class CallGroup:
    """``count`` mask-free one-run calls of heads ``heads[0]:heads[1]`` as one batched SDPA call: call ``i``'s
    queries are ``[queries + i * query_length, queries + (i + 1) * query_length)`` and its keys
    ``[keys + i * key_step, keys + i * key_step + key_length)``."""

    heads: tuple[int, int]
    queries: int
    query_length: int
    keys: int
    key_length: int
    key_step: int
    count: int

    def calls(self) -> list[SliceCall]:
        """The calls it stands for."""
        return [
            SliceCall(
                self.heads,
                (self.queries + i * self.query_length, self.queries + (i + 1) * self.query_length),
                ((self.keys + i * self.key_step, self.keys + i * self.key_step + self.key_length),),
            )
            for i in range(self.count)
        ]


def group_calls(calls: Sequence[SliceCall], masked: Sequence[bool], smallest: int = 3):
    """Split ``calls`` into :class:`CallGroup` s of at least ``smallest`` mask-free one-run calls that step along
    the sequence together (same heads, query and key lengths; each call's queries right after the last one's, its
    keys a constant step further) and the calls left over, as ``(groups, [(call, index in calls)...])``."""
    by_shape: dict[tuple, list[tuple[SliceCall, int]]] = {}
    rest = []
    for index, (call, mask) in enumerate(zip(calls, masked, strict=True)):
        if mask or len(call.keys) != 1:
            rest.append((call, index))
            continue
        (k0, k1), (q0, q1) = call.keys[0], call.queries
        by_shape.setdefault((call.heads, q1 - q0, k1 - k0), []).append((call, index))
    groups = []
    for (heads, q_len, k_len), members in by_shape.items():
        members.sort(key=lambda item: item[0].queries[0])
        start = 0
        while start < len(members):
            stop = start + 1
            if stop < len(members):
                step = members[stop][0].keys[0][0] - members[start][0].keys[0][0]
                while (
                    stop < len(members)
                    and members[stop][0].queries[0] == members[stop - 1][0].queries[0] + q_len
                    and members[stop][0].keys[0][0] == members[stop - 1][0].keys[0][0] + step
                ):
                    stop += 1
            if stop - start >= smallest:
                first = members[start][0]
                groups.append(CallGroup(heads, first.queries[0], q_len, first.keys[0][0], k_len, step, stop - start))
            else:
                rest.extend(members[start:stop])
            start = stop
    return groups, sorted(rest, key=lambda item: item[1])


def _ranges(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending ``indices`` as maximal ``[start, stop)`` ranges of consecutive integers."""
    ranges: list[list[int]] = []
    for index in indices:
        if ranges and ranges[-1][1] == index:
            ranges[-1][1] = index + 1
        else:
            ranges.append([index, index + 1])
    return [(start, stop) for start, stop in ranges]


def key_runs(row: torch.Tensor, block: int, length: int) -> tuple[tuple[int, int], ...]:
    """The contiguous token ranges covered by the True entries of ``row`` (``(kv_blocks,)`` bool), each block
    ``block`` tokens, clipped to ``length``."""
    blocks = _ranges(row.nonzero().flatten().tolist())
    return tuple((start * block, min(stop * block, length)) for start, stop in blocks)


def slice_calls(visited: torch.Tensor, flex_rows: torch.Tensor, block: int, length: int) -> list[SliceCall]:
    """The SDPA calls of the rows that are not in ``flex_rows``: consecutive query blocks of a head with the same
    key runs form one query range, and the heads sharing a query range and runs form ranges of consecutive heads.

    Args:
        visited: ``(heads, q_blocks, kv_blocks)`` bool: the tiles the launch visits (full or partial).
        flex_rows: ``(heads, q_blocks)`` bool: rows left to FlexAttention.
        block: the tile size (queries and keys).
        length: the sequence length.
    """
    heads_of: dict[tuple, list[int]] = {}  # (query range, key runs) -> heads, ascending
    for head in range(visited.shape[0]):
        rows = zip(visited[head], flex_rows[head])
        row_runs = [None if flex else key_runs(row, block, length) for row, flex in rows]
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
    """A block-sparse launch as SDPA calls over runs of visited tiles (masked where a tile is partial), with
    FlexAttention for the rows with partial tiles when their masks would not fit in :data:`MASK_BYTES`.

    Args:
        patterns: one sparse :class:`HeadPattern` per head of the launch.
        grid: the tokens of the calls it will serve.
        device: where the calls run.
        block: the tile size (queries and keys), a power of two >= 16.
    """

    def __init__(self, patterns: Sequence[HeadPattern], grid: TokenGrid, device: torch.device | str, block: int):
        partial, full = (t.cpu() for t in block_classes(patterns, grid, block, block, device))  # walked in Python
        visited = partial | full
        self.visited = visited.sum().item() / max(1, full.numel())
        masked_rows = partial.any(-1)  # (heads, q_blocks)
        mask_bytes = 4 * block * block * (visited & masked_rows[..., None]).sum().item()
        flex_rows = masked_rows if mask_bytes > MASK_BYTES else torch.zeros_like(masked_rows)
        self.calls = slice_calls(visited, flex_rows, block, grid.length)
        if len(self.calls) > MAX_CALLS:
            logger.debug("%d SDPA calls in one launch (> %d): FlexAttention for every row", len(self.calls), MAX_CALLS)
            self.calls, flex_rows = [], torch.ones_like(flex_rows)
        tables = HeadTables.build(patterns, grid, device)
        masks = [_call_mask(tables, grid, call, partial, block, device) for call in self.calls]
        self.groups, rest = group_calls(self.calls, [mask is not None for mask in masks])
        self.calls, self.masks = [call for call, _ in rest], [masks[index] for _, index in rest]
        self.block_mask = None
        if flex_rows.any():  # the tiles walked above, restricted to those rows
            tiles = tuple((t & flex_rows[..., None]).to(device) for t in (partial, full))
            self.block_mask = flex_block_mask(patterns, grid, block, device, tiles, tables)

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
        for group in self.groups:
            (h0, h1), q0, q_len = group.heads, group.queries, group.query_length
            q_end, k_end = q0 + group.count * q_len, group.keys + (group.count - 1) * group.key_step + group.key_length
            for b in range(query.shape[0]):  # (count, heads, length, head_dim) views, one per call of the group
                q = query[b, h0:h1, q0:q_end].unflatten(1, (group.count, q_len)).transpose(0, 1)
                k, v = (
                    x[b, h0:h1, group.keys : k_end].unfold(1, group.key_length, group.key_step).permute(1, 0, 3, 2)
                    for x in (key, value)
                )
                result = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (count, heads, q_len, head_dim)
                out[b, h0:h1, q0:q_end] = result.transpose(0, 1).flatten(1, 2)
        for call, mask in zip(self.calls, self.masks, strict=True):
            (h0, h1), (q0, q1) = call.heads, call.queries
            keys = [key[:, h0:h1, start:stop] for start, stop in call.keys]  # views: no copy for one run
            values = [value[:, h0:h1, start:stop] for start, stop in call.keys]
            if len(keys) > 1:
                keys, values = [torch.cat(keys, 2)], [torch.cat(values, 2)]
            out[:, h0:h1, q0:q1] = F.scaled_dot_product_attention(
                query[:, h0:h1, q0:q1], keys[0], values[0], attn_mask=None if mask is None else mask.to(query.dtype),
                scale=scale,
            )  # fmt: skip
        return out


def _call_mask(
    tables: HeadTables, grid: TokenGrid, call: SliceCall, partial: torch.Tensor, block: int, device
) -> torch.Tensor | None:
    """The additive float32 mask ``(1, heads, queries, keys)`` of one call over its key runs (0 where allowed,
    -inf where not), or None when its tiles are all full. Four dimensions: SDPA's CPU flash kernel takes a 4-D
    mask, and a 3-D one sends the call to the unfused math path (4x slower at 576 tokens)."""
    (h0, h1), (q0, q1) = call.heads, call.queries
    kv_blocks = [b for start, stop in call.keys for b in range(start // block, -(-stop // block))]
    if not partial[h0:h1, q0 // block : -(-q1 // block)][..., kv_blocks].any():
        return None
    heads = torch.arange(h0, h1, device=device)[:, None, None]
    queries = torch.arange(q0, q1, device=device)[None, :, None]
    keys = torch.cat([torch.arange(start, stop, device=device) for start, stop in call.keys])[None, None, :]
    allowed_pairs = allowed(tables, grid, heads, queries, keys)  # (heads, queries, keys)
    # every pattern lets a query see itself, a sink frame or the text, so no row of a visited tile is empty
    # (an empty row would be NaN under SDPA where the reference gives 0)
    assert allowed_pairs.any(-1).all(), "a query row of a visited tile sees no key"
    return torch.zeros(allowed_pairs.shape, device=device).masked_fill(~allowed_pairs, float("-inf"))[None]
