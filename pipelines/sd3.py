"""Adapter for Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``).

Each ``JointTransformerBlock`` is an MMDiT block: one joint text+image attention (``attn``), an image-only
self-attention (``attn2``, only in the SD3.5 "dual attention" layers, ``None`` elsewhere), and separate
feed-forwards for the image (``ff``) and text (``ff_context``) streams.

The block is called with keyword arguments and returns ``(encoder_hidden_states, hidden_states)``. The last
block is built with ``context_pre_only=True``: it has no ``ff_context`` and returns ``None`` in place of
``encoder_hidden_states`` (the model discards it), so a cached-block replacement must hand back ``None``
there too.

The joint attention puts the image tokens first and the text last (``JointAttnProcessor2_0``); in the SD3.5
dual-attention blocks ``attn`` and ``attn2`` share one processor instance, so a technique swaps processors per
module (``set_processor``) and never mutates the shared one. Latents are ``(batch, channels, height, width)``,
patched by ``patch_size``; the model is trained with rectified flow.
"""

from diffusers import SD3Transformer2DModel

from accel.adapters import BlockStack, Component, ModelSpec, TokenLayout, register_model

#: Spec of ``SD3Transformer2DModel``: one stack of joint (MMDiT) blocks.
SD3_SPEC = ModelSpec(
    stacks=(
        BlockStack(
            path="transformer_blocks",
            components=(
                Component(name="self_attn", module="attn2"),
                Component(name="joint_attn", module="attn"),
                Component(name="ffn", module="ff"),
                Component(name="ffn_context", module="ff_context"),
            ),
            outputs=("encoder_hidden_states", "hidden_states"),
            batch_major=("hidden_states", "encoder_hidden_states", "temb"),
        ),
    ),
    token_layout=TokenLayout(input="BCHW", text="last"),
    flow_matching=True,
)

register_model(SD3Transformer2DModel, SD3_SPEC)
