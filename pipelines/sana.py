"""Adapter for Sana (``SanaTransformer2DModel``).

Each ``SanaTransformerBlock`` has a linear self-attention ``attn1`` (``SanaLinearAttnProcessor2_0``: ReLU
kernels, no attention map), a cross-attention to the caption ``attn2`` (with its own head count,
``num_cross_attention_heads`` x ``cross_attention_head_dim``) and a convolutional feed-forward ``ff``
(``GLUMBConv``, applied to tokens reshaped to ``(batch, dim, h, w)``, so it needs every token of the grid and is
not token-wise; its output has the shape of its input). The model calls the block with positional arguments
``(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep, height, width)``;
``height`` and ``width`` are the token grid, ``timestep`` the ``(batch, 6 * dim)`` modulation. The block returns
``hidden_states``. Latents are ``(batch, channels, height, width)``; Sana is trained with flow matching.
"""

from diffusers import SanaTransformer2DModel

from accel.adapters import BlockStack, Component, ModelSpec, TokenLayout, register_model

#: Spec of ``SanaTransformer2DModel``: one stack of linear self-attn / cross-attn / conv-FFN blocks.
SANA_SPEC = ModelSpec(
    stacks=(
        BlockStack(
            path="transformer_blocks",
            components=(
                Component(name="self_attn", module="attn1", kernel="linear"),
                Component(name="cross_attn", module="attn2"),
                Component(name="ffn", module="ff", token_wise=False),
            ),
            outputs=("hidden_states",),
            batch_major=("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep"),
        ),
    ),
    token_layout=TokenLayout(input="BCHW", text="cross"),
    flow_matching=True,
)

register_model(SanaTransformer2DModel, SANA_SPEC)
