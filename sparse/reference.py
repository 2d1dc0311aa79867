"""Pure-PyTorch sparse attention: the specification every kernel is tested against.

It materialises the ``(heads, length, length)`` mask of :func:`accel.sparse.patterns.dense_mask` and runs a
masked softmax in float32, so it is for tests and small shapes only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from accel.sparse.patterns import HeadPattern, TokenGrid, dense_mask


def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, grid: TokenGrid) -> None:
    """Raise ``ValueError`` unless ``query``, ``key``, ``value`` are ``(batch, heads, length, head_dim)`` tensors
    of one dtype and device matching ``heads`` and ``grid``."""
    if query.ndim != 4 or key.shape != query.shape or value.shape[:3] != query.shape[:3]:
        raise ValueError(
            f"query, key, value must be (batch, heads, length, head_dim) of one shape, got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[1] != heads or query.shape[2] != grid.length:
        raise ValueError(f"expected {heads} heads over {grid.length} tokens ({grid}), got shape {tuple(query.shape)}")
    if not (query.dtype == key.dtype == value.dtype) or not (query.device == key.device == value.device):
        raise ValueError("query, key and value must share one dtype and device")


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    patterns: Sequence[HeadPattern],
    grid: TokenGrid,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each head over the keys its pattern allows, computed in float32.

    Args:
        query, key, value: ``(batch, heads, length, head_dim)``, any float dtype; ``length == grid.length``.
        patterns: one :class:`HeadPattern` per head.
        grid: the tokens of the call.
        scale: softmax scale; default ``1 / sqrt(head_dim)``.

    Returns:
        ``(batch, heads, length, head_dim)`` in the input dtype. A query that sees no key (a skip head, or a
        text-only pattern without text) gets zeros.
    """
    check_qkv(query, key, value, len(patterns), grid)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    mask = dense_mask(patterns, grid, query.device)  # (heads, length, length)
    scores = torch.einsum("bhqd,bhkd->bhqk", query.float(), key.float()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: 0
    return torch.einsum("bhqk,bhkd->bhqd", weights, value.float()).to(query.dtype)
