"""Block tables: which key blocks each (head, query block) of a block-sparse launch must visit.

A block-sparse attention kernel tiles the ``(length, length)`` attention map of each head into
``(q_block, kv_block)`` tiles. A tile is

* **empty** when no (query, key) pair in it is allowed: the kernel never visits it;
* **full** when every pair is allowed: the kernel visits it without evaluating the mask;
* **partial** otherwise: the kernel visits it and evaluates :func:`accel.sparse.patterns.allowed` per element.

:class:`BlockTable` lists the full and the partial key blocks of every (head, query block) in FlexAttention's
``BlockMask`` layout (counts plus ascending indices), without its batch axis. It is built once per layer and
token grid, on the device of the launch, by evaluating :func:`~accel.sparse.patterns.allowed` in chunks of query
blocks, so it is exact by construction.

Padding: when ``length`` is not a multiple of the block size, the last blocks reach past the sequence. A query
block's rows past the end never count (their outputs are not stored); a key block that reaches past the end is
never full, so the kernel always masks out the keys past the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from accel.sparse.patterns import HeadPattern, HeadTables, TokenGrid, allowed

#: the most mask elements one chunk of :func:`build_block_table` evaluates at once
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class BlockTable:
    """The key blocks each (head, query block) visits: FlexAttention's ``BlockMask`` fields without batch.

    Attributes:
        kv_num_blocks: ``(heads, q_blocks)`` int32: how many partial key blocks each query block visits.
        kv_indices: ``(heads, q_blocks, kv_blocks)`` int32: the partial key blocks, ascending, first
            ``kv_num_blocks`` entries valid (the rest is unspecified).
        full_kv_num_blocks: ``(heads, q_blocks)`` int32: how many full key blocks each query block visits.
        full_kv_indices: ``(heads, q_blocks, kv_blocks)`` int32: the full key blocks, ascending, likewise.
        q_block, kv_block: the tile size in tokens (query rows, key columns).
        length: the sequence length the table was built for.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    q_block: int
    kv_block: int
    length: int

    @property
    def heads(self) -> int:
        """The number of heads the table covers (its first axis)."""
        return self.kv_num_blocks.shape[0]

    def density(self) -> float:
        """The fraction of tiles (full or partial) the launch visits."""
        visited = self.kv_num_blocks.sum() + self.full_kv_num_blocks.sum()
        return visited.item() / max(1, self.kv_indices.numel())

    def dense_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The table as two ``(heads, q_blocks, kv_blocks)`` bool tensors: ``(partial, full)``."""
        blocks = torch.arange(self.kv_indices.shape[-1], device=self.kv_indices.device)
        result = []
        for count, indices in ((self.kv_num_blocks, self.kv_indices), (self.full_kv_num_blocks, self.full_kv_indices)):
            listed = blocks < count[..., None]  # (heads, q_blocks, kv_blocks): which entries are valid
            dense = torch.zeros_like(listed)
            result.append(dense.scatter_(-1, indices.long(), listed))
        return result[0], result[1]


def _check_block(name: str, size: int) -> None:
    if not isinstance(size, int) or size < 16 or size & (size - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (a Triton tile), got {size!r}")


def block_classes(
    patterns: Sequence[HeadPattern],
    grid: TokenGrid,
    q_block: int = 128,
    kv_block: int = 128,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tiles are partial and which are full, as two ``(heads, q_blocks, kv_blocks)`` bool tensors.

    ``skip`` heads have no tile; see the module docstring for padding.
    """
    _check_block("q_block", q_block)
    _check_block("kv_block", kv_block)
    tables = HeadTables.build(patterns, grid, device)
    length = grid.length
    q_blocks, kv_blocks = -(-length // q_block), -(-length // kv_block)
    keys = torch.arange(kv_blocks * kv_block, device=device)  # padded to whole key blocks
    key_valid = keys < length
    partial = torch.zeros(len(patterns), q_blocks, kv_blocks, dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    step = max(1, _CHUNK_ELEMENTS // (q_block * keys.numel()))  # query blocks per chunk
    for head, pattern in enumerate(patterns):
        if pattern.kind == "skip":
            continue
        head_index = torch.tensor(head, device=device)
        for start in range(0, q_blocks, step):
            stop = min(start + step, q_blocks)
            queries = torch.arange(start * q_block, stop * q_block, device=device)
            mask = allowed(tables, grid, head_index, queries[:, None], keys[None, :])  # (rows, keys)
            inside = (queries < length)[:, None] & key_valid[None, :]
            shape = (stop - start, q_block, kv_blocks, kv_block)
            any_allowed = (mask & inside).view(shape).any(3).any(1)  # (chunk, kv_blocks)
            # rows past the end count as allowed; keys past the end never do (such a key block is never full)
            every_allowed = (mask & key_valid[None, :] | (queries >= length)[:, None]).view(shape).all(3).all(1)
            full[head, start:stop] = every_allowed
            partial[head, start:stop] = any_allowed & ~every_allowed
    return partial, full


def _listing(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``(heads, q_blocks)`` and ascending indices ``(heads, q_blocks, kv_blocks)`` of the True blocks."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)  # listed blocks first, ascending
    return counts, indices.to(torch.int32).contiguous()


def build_block_table(
    patterns: Sequence[HeadPattern],
    grid: TokenGrid,
    q_block: int = 128,
    kv_block: int = 128,
    device: torch.device | str = "cpu",
) -> BlockTable:
    """The :class:`BlockTable` of ``patterns`` (one per head of the launch) on ``grid``.

    Args:
        patterns: one :class:`HeadPattern` per head; ``dense`` heads get only full tiles, ``skip`` heads none.
        grid: the tokens of the call.
        q_block, kv_block: the tile size, each a power of two >= 16.
        device: where the table lives (the launch's device).
    """
    partial, full = block_classes(patterns, grid, q_block, kv_block, device)
    kv_num_blocks, kv_indices = _listing(partial)
    full_kv_num_blocks, full_kv_indices = _listing(full)
    return BlockTable(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_block, kv_block, grid.length)


def flex_block_mask(
    patterns: Sequence[HeadPattern],
    grid: TokenGrid,
    block: int,
    device: torch.device | str = "cpu",
    tiles: tuple[torch.Tensor, torch.Tensor] | None = None,
    tables: HeadTables | None = None,
):
    """A FlexAttention ``BlockMask`` of ``patterns`` (one per head of the launch) on ``grid``, from their tiles.

    ``create_block_mask`` would evaluate the mask over every (head, query, key) at once and sum it in int64: 96 GiB
    at 12 heads and 32,768 tokens. :func:`block_classes` walks it in chunks instead; its partial tiles evaluate
    :func:`~accel.sparse.patterns.allowed` per element, its full tiles nothing. ``tiles``, the ``(partial, full)``
    of :func:`block_classes` on ``device`` where the caller has them (possibly with some query blocks' rows
    cleared, whose outputs are then zero), saves walking them again; ``tables``, the patterns' ``HeadTables`` on
    ``device``, building them again.
    """
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = tiles if tiles is not None else block_classes(patterns, grid, block, block, device)
    (counts, indices), (full_counts, full_indices) = _listing(partial), _listing(full)
    tables = tables if tables is not None else HeadTables.build(patterns, grid, device)

    def mask_mod(batch, head, query, key):
        return allowed(tables, grid, head, query, key)

    return BlockMask.from_kv_blocks(
        counts[None], indices[None], full_counts[None], full_indices[None], BLOCK_SIZE=block, mask_mod=mask_mod,
        seq_lengths=(grid.length, grid.length),
    )  # fmt: skip
