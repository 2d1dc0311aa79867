"""Adapter for CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``).

Each ``CogVideoXBlock`` runs one joint attention ``attn1`` over the concatenated text and video tokens and one
feed-forward ``ff``, also over the concatenated tokens (there is no separate text feed-forward). The block is
called with keyword arguments and returns ``(hidden_states, encoder_hidden_states)``.
"""

from diffusers import CogVideoXTransformer3DModel

from accel.adapters import BlockStack, Component, ModelSpec, register_model

#: Spec of ``CogVideoXTransformer3DModel``: one stack of joint-attention / joint-FFN blocks.
COGVIDEOX_SPEC = ModelSpec(
    stacks=(
        BlockStack(
            path="transformer_blocks",
            components=(
                Component(name="joint_attn", module="attn1"),
                Component(name="ffn", module="ff"),
            ),
            outputs=("hidden_states", "encoder_hidden_states"),
        ),
    ),
)

register_model(CogVideoXTransformer3DModel, COGVIDEOX_SPEC)
