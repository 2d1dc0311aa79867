"""Attention processors that run a layer's per-head patterns in place of the model's attention kernel.

A sparse processor wraps the module's own processor: it computes queries, keys and values exactly as that
processor does, hands them to the layer's :class:`~accel.sparse.kernels.LayerAttention`, and projects the
result out the same way. Calls it cannot serve (a layer whose heads are all dense, a call with an attention mask
or extra image context) go to the wrapped processor unchanged, so a dense plan is bit-identical to no plan.

Processors are registered per processor class (:data:`SPARSE_PROCESSORS`); the handle swaps them in through the
patch log.
"""

from __future__ import annotations

from typing import Any

import torch

from accel.rotary import wan_qkv
from accel.sparse.kernels import LayerAttention


class SparseLayer:
    """The mutable per-layer state a sparse processor reads: the kernel for the current token grid (set eagerly
    at every transformer call, outside compiled code) and how many calls ran sparse."""

    def __init__(self, index: int):
        self.index = index
        self.attention: LayerAttention | None = None
        self.sparse_calls = 0
        self.passthrough_calls = 0


class WanSparseProcessor:
    """Sparse self-attention for ``WanAttention`` (``WanAttnProcessor``).

    Args:
        original: the module's processor, used for the calls this one passes through.
        layer: the layer's state.
    """

    def __init__(self, original: Any, layer: SparseLayer):
        self.original, self.layer = original, layer

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Same signature and result layout as ``WanAttnProcessor.__call__``."""
        kernel = self.layer.attention
        if (
            kernel is None
            or kernel.all_dense
            or encoder_hidden_states is not None
            or attention_mask is not None
            or attn.add_k_proj is not None
        ):
            self._count(sparse=False)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        self._count(sparse=True)
        query, key, value = wan_qkv(attn, hidden_states, rotary_emb)  # (batch, tokens, heads, head_dim)
        out = kernel(*(t.transpose(1, 2) for t in (query, key, value))).transpose(1, 2)  # heads second for it
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _count(self, sparse: bool) -> None:
        # Counted in eager calls only: inside compiled code this folds away (no graph break).
        if torch.compiler.is_compiling():
            return
        if sparse:
            self.layer.sparse_calls += 1
        else:
            self.layer.passthrough_calls += 1


def _registry() -> dict[type, type]:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    return {WanAttnProcessor: WanSparseProcessor}


def sparse_processor_for(original: Any, layer: SparseLayer) -> Any:
    """The sparse processor wrapping ``original``.

    Raises:
        ValueError: no sparse processor serves ``original``'s class; the message lists the supported ones.
    """
    registry = _registry()
    cls = registry.get(type(original))
    if cls is None:
        names = ", ".join(sorted(c.__name__ for c in registry))
        raise ValueError(f"no sparse attention processor for {type(original).__name__}; supported: {names}")
    return cls(original, layer)
