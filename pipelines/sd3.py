"""Adapter for Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``).

Each ``JointTransformerBlock`` is an MMDiT block: one joint text+image attention (``attn``), an image-only
self-attention (``attn2``, only in the SD3.5 "dual attention" layers, ``None`` elsewhere), and separate
feed-forwards for the image (``ff``) and text (``ff_context``) streams.

The block is called with keyword arguments and returns ``(encoder_hidden_states, hidden_states)``. The last
block is built with ``context_pre_only=True``: it has no ``ff_context`` and returns ``None`` in place of
``encoder_hidden_states`` (the model discards it), so a cached-block replacement must hand back ``None``
there too.
"""

from diffusers import SD3Transformer2DModel

from accel.adapters import BlockStack, Component, ModelSpec, register_model

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
        ),
    ),
)

register_model(SD3Transformer2DModel, SD3_SPEC)
