"""Adapter for LTX-Video (``LTXVideoTransformer3DModel``).

Each ``LTXVideoTransformerBlock`` has a self-attention ``attn1`` with rotary embeddings, a cross-attention
``attn2`` to the text and a feed-forward ``ff``. The block is called with keyword arguments and returns
``hidden_states``.
"""

from diffusers import LTXVideoTransformer3DModel

from accel.adapters import SELF_CROSS_FFN, BlockStack, ModelSpec, register_model

#: Spec of ``LTXVideoTransformer3DModel``: one stack of self-attn / cross-attn / FFN blocks.
LTX_SPEC = ModelSpec(
    stacks=(
        BlockStack(
            path="transformer_blocks",
            components=SELF_CROSS_FFN,
            outputs=("hidden_states",),
        ),
    ),
)

register_model(LTXVideoTransformer3DModel, LTX_SPEC)
