"""Self-attention over active queries with every key: current keys and values for the active tokens, a per-layer
cache for the others.

A block under per-token step allocation sees only its sample's active tokens, ``(rows, active, width)``, in
the order of :attr:`ActiveTokens.index`. Its self-attention processor here computes queries, keys and values
for those tokens exactly as the model's own processor does (projections, query/key norms, rotary embeddings
already gathered to the active positions), writes the keys and values into the layer's full-length cache at
the active positions, and attends from the active queries to the whole cache: current entries for the tokens
computed now, the entries of their last computed step for the others. A step that computes every token
(index ``0..tokens-1``) fills the cache and equals the model's attention.

The processors read their :class:`ActiveTokens` and cache through the handle, which sets them eagerly before
each transformer call; inside a compiled block they are ordinary tensor inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from accel.rotary import wan_qkv


class ActiveTokens:
    """What the processors of one transformer call read, set eagerly by the handle.

    Attributes:
        index: ``(rows, active)`` int64, the visual tokens computed at this call, per row, ascending.
        caches: per self-attention layer (execution order), the ``(keys, values)`` of every token, each
            ``(rows, tokens, heads, head_dim)``, for the current branch.
        tokens: the full number of visual tokens of the current call.
    """

    def __init__(self):
        self.index: torch.Tensor | None = None
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.tokens = 0


def _merge(cache: torch.Tensor, index: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Write ``current: (rows, active, heads, head_dim)`` into ``cache: (rows, tokens, heads, head_dim)`` at
    ``index: (rows, active)`` in place; returns the cache."""
    where = index[:, :, None, None].expand_as(current)
    return cache.scatter_(1, where, current.to(cache.dtype))


class TokenAttention:
    """Base of the processors: the wrapped original and the layer's slot in :class:`ActiveTokens`."""

    def __init__(self, original: Any, active: ActiveTokens, layer: int):
        self.original, self.active, self.layer = original, active, layer

    @staticmethod
    def refuse_mask(attention_mask: torch.Tensor | None) -> None:
        """Raise if the call carries an attention mask: the active queries attend to every token's key here."""
        if attention_mask is not None:
            raise ValueError("per-token steps do not support an attention mask in self- or joint attention")

    def cached(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values of every token, ``(rows, tokens, heads, head_dim)`` each, after writing
        the active tokens' current ``key`` and ``value`` (``(rows, active, heads, head_dim)``) into them."""
        keys, values = self.active.caches[self.layer]
        return _merge(keys, self.active.index, key), _merge(values, self.active.index, value)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``(rows, active, heads, head_dim)`` attention of the active queries over every cached key and value
        after writing the current ``key`` and ``value`` of the active tokens into the cache."""
        keys, values = self.cached(key, value)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        return out.transpose(1, 2)


class WanTokenAttention(TokenAttention):
    """Self-attention of ``WanAttention`` (``WanAttnProcessor``) over the active tokens; rotary embeddings
    arrive gathered to the active positions."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        """Same signature and result layout as ``WanAttnProcessor.__call__`` for self-attention."""
        self.refuse_mask(attention_mask)
        query, key, value = wan_qkv(attn, hidden_states, rotary_emb)  # (rows, active, heads, head_dim)
        out = self.attend(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class LTXTokenAttention(TokenAttention):
    """Self-attention of LTX-Video's ``LTXAttention`` (``LTXVideoAttnProcessor``) over the active tokens; the
    rotary embedding arrives gathered to the active positions."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        """Same signature and result as ``LTXVideoAttnProcessor.__call__`` for self-attention without a mask."""
        self.refuse_mask(attention_mask)
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query, key = apply_rotary_emb(query, image_rotary_emb), apply_rotary_emb(key, image_rotary_emb)
        # (rows, active, heads * head_dim) -> (rows, active, heads, head_dim)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        out = self.attend(query, key, value).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class DefaultTokenAttention(TokenAttention):
    """Self-attention of a diffusers ``Attention`` with ``AttnProcessor2_0`` (PixArt, DiT, ...): no group or
    spatial norm, no mask."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        """Same signature and result as ``AttnProcessor2_0.__call__`` for self-attention on token sequences."""
        self.refuse_mask(attention_mask)
        residual = hidden_states
        projections = (attn.to_q, attn.to_k, attn.to_v)
        query, key, value = split_heads(attn, hidden_states, projections, attn.norm_q, attn.norm_k)
        out = self.attend(query, key, value).flatten(2, 3).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def split_heads(attn, states: torch.Tensor, projections, norm_q, norm_k) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values of ``states: (rows, sequence, width)`` by the three ``projections``, each split
    into ``(rows, sequence, heads, head_dim)``, the queries and keys through their per-head norms where the
    module has them (None: none), as diffusers' ``AttnProcessor2_0`` and ``JointAttnProcessor2_0`` compute them."""
    query, key, value = (projection(states).unflatten(2, (attn.heads, -1)) for projection in projections)
    query = query if norm_q is None else norm_q(query)
    key = key if norm_k is None else norm_k(key)
    return query, key, value


def _check_default(attn: torch.nn.Module) -> None:
    if attn.group_norm is not None or attn.spatial_norm is not None:
        raise ValueError("per-token steps: an attention with a group or spatial norm is not token-wise")


def _registry() -> dict[type, tuple[type, Any]]:
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from accel.caching.token_joint import FluxTokenAttention, SD3TokenAttention

    return {
        JointAttnProcessor2_0: (SD3TokenAttention, None),
        FluxAttnProcessor: (FluxTokenAttention, None),
        WanAttnProcessor: (WanTokenAttention, None),
        LTXVideoAttnProcessor: (LTXTokenAttention, None),
        AttnProcessor2_0: (DefaultTokenAttention, _check_default),
    }


def token_processor_for(attn: torch.nn.Module, original: Any, active: ActiveTokens, layer: int) -> TokenAttention:
    """The processor running ``attn``'s self-attention over active queries, wrapping ``original``.

    Raises:
        ValueError: no processor here serves ``original``'s class (the message lists those that do), the
            module has parts that mix tokens, or ``original`` has an attention backend or parallel config set
            (diffusers' ``set_attention_backend``, context parallelism), which these processors would not use.
    """
    registry = _registry()
    found = registry.get(type(original))
    if found is None:
        names = ", ".join(sorted(c.__name__ for c in registry))
        raise ValueError(f"per-token steps have no self-attention processor for {type(original).__name__}; "
                         f"supported: {names}")  # fmt: skip
    backend, parallel = getattr(original, "_attention_backend", None), getattr(original, "_parallel_config", None)
    if backend is not None or parallel is not None:
        raise ValueError(
            f"per-token steps run their own attention (SDPA over the cached keys and values), so "
            f"{type(original).__name__}'s attention backend {backend!r} / parallel config {parallel!r} would go "
            "unused: reset them, or run without TokenStepConfig"
        )
    cls, check = found
    if check is not None:
        check(attn)
    return cls(original, active, layer)
