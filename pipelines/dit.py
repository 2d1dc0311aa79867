"""Adapter for class-conditional DiT (``DiTTransformer2DModel``).

The blocks are ``BasicTransformerBlock`` with ``ada_norm_zero``: a self-attention ``attn1`` and a feed-forward
``ff``. DiT has no text, so ``attn2`` is ``None`` and is not listed. The model calls each block with
``hidden_states`` positionally and the rest by keyword; the block returns ``hidden_states``.
"""

from diffusers import DiTTransformer2DModel

from accel.adapters import BlockStack, Component, ModelSpec, register_model

#: Spec of ``DiTTransformer2DModel``: one stack of self-attn / FFN blocks.
DIT_SPEC = ModelSpec(
    stacks=(
        BlockStack(
            path="transformer_blocks",
            components=(
                Component(name="self_attn", module="attn1"),
                Component(name="ffn", module="ff"),
            ),
            outputs=("hidden_states",),
        ),
    ),
)

register_model(DiTTransformer2DModel, DIT_SPEC)
