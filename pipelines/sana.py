"""Adapter for Sana (``SanaTransformer2DModel``).

Each ``SanaTransformerBlock`` has a linear self-attention ``attn1``, a cross-attention to the caption
``attn2`` and a convolutional feed-forward ``ff`` (``GLUMBConv``, applied to tokens reshaped to
``(batch, dim, h, w)``; its output has the shape of its input). The model calls the block with
positional arguments
``(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep, height, width)``;
the block returns ``hidden_states``.
"""

from diffusers import SanaTransformer2DModel

from accel.adapters import SELF_CROSS_FFN, BlockStack, ModelSpec, register_model

#: Spec of ``SanaTransformer2DModel``: one stack of self-attn / cross-attn / conv-FFN blocks.
SANA_SPEC = ModelSpec(
    stacks=(
        BlockStack(
            path="transformer_blocks",
            components=SELF_CROSS_FFN,
            outputs=("hidden_states",),
        ),
    ),
)

register_model(SanaTransformer2DModel, SANA_SPEC)
