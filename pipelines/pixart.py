"""Adapter for PixArt-alpha / PixArt-sigma (``PixArtTransformer2DModel``).

Each ``BasicTransformerBlock`` has a self-attention ``attn1``, a cross-attention to the caption ``attn2`` and
a feed-forward ``ff``. The model calls the block with ``hidden_states`` positionally and the rest by keyword;
``timestep`` is the block's ``(batch, 6 * dim)`` modulation and ``encoder_attention_mask`` a ``(batch, 1,
text)`` bias. The block returns ``hidden_states``. Latents are ``(batch, channels, height, width)``, patched by
``patch_size``.

The published checkpoints predict noise (DDPM / DPM-Solver, learned sigma); a PixArt trained with rectified
flow (the bundled default model) says so through its scheduler, see :func:`accel.adapters.is_flow_matching`.
"""

from diffusers import PixArtTransformer2DModel

from accel.adapters import SELF_CROSS_FFN, BlockStack, ModelSpec, TokenLayout, register_model

#: Spec of ``PixArtTransformer2DModel``: one stack of self-attn / cross-attn / FFN blocks.
PIXART_SPEC = ModelSpec(
    stacks=(
        BlockStack(
            path="transformer_blocks",
            components=SELF_CROSS_FFN,
            outputs=("hidden_states",),
            batch_major=("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep"),
        ),
    ),
    token_layout=TokenLayout(input="BCHW", text="cross"),
    flow_matching=False,
)

register_model(PixArtTransformer2DModel, PIXART_SPEC)
