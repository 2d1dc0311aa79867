"""Adapter for class-conditional DiT (``DiTTransformer2DModel``).

The blocks are ``BasicTransformerBlock`` with ``ada_norm_zero``: a self-attention ``attn1`` and a feed-forward
``ff``. DiT has no text, so ``attn2`` is ``None`` and is not listed. The model calls each block with
``hidden_states`` positionally and the rest by keyword (``timestep`` and ``class_labels`` are ``(batch,)``,
the block embeds them itself); the block returns ``hidden_states``. Latents are ``(batch, channels, height,
width)``, patched by ``patch_size``; the checkpoints predict noise with a learned sigma (DDPM).
"""

from diffusers import DiTTransformer2DModel

from accel.adapters import BlockStack, Component, ModelSpec, TokenLayout, register_model

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
            batch_major=("hidden_states", "timestep", "class_labels"),
        ),
    ),
    token_layout=TokenLayout(input="BCHW", text="none"),
    flow_matching=False,
)

register_model(DiTTransformer2DModel, DIT_SPEC)
