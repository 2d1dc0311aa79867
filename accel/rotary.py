"""Rotary position embeddings as the model families apply them, for processors that recompute attention.

Diffusers keeps Wan's rotary embedding inside ``WanAttnProcessor.__call__`` (not importable), so the processors
that replace it (sparse attention, per-token steps) share this copy, and :func:`wan_qkv`, the projections before
the attention kernel.
"""

from __future__ import annotations

import torch


def wan_rotary(hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding: the pairs ``(x[2i], x[2i+1])`` rotate by the angle in ``cos/sin[2i]``.

    Args:
        hidden_states: ``(batch, tokens, heads, head_dim)`` queries or keys.
        cos, sin: ``(batch or 1, tokens, 1, head_dim)``, as Wan's rotary module returns them (gathered to the
            same tokens as ``hidden_states``).

    Returns:
        ``hidden_states`` rotated, same shape and dtype.
    """
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


def wan_qkv(
    attn: torch.nn.Module, hidden_states: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of ``WanAttention`` self-attention as ``WanAttnProcessor`` computes them before
    its kernel: projected, normed, split into heads and rotated.

    Returns:
        Three ``(batch, tokens, heads, head_dim)`` tensors.
    """
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    if rotary_emb is not None:
        query, key = wan_rotary(query, *rotary_emb), wan_rotary(key, *rotary_emb)
    return query, key, value
