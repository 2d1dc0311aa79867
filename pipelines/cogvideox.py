"""Adapter for CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``).

Each ``CogVideoXBlock`` runs one joint attention ``attn1`` over the concatenated text and video tokens and one
feed-forward ``ff``, also over the concatenated tokens (there is no separate text feed-forward). The block is
called with keyword arguments and returns ``(hidden_states, encoder_hidden_states)``.

The joint sequence puts the text first (``CogVideoXAttnProcessor2_0``). Latents are ``(batch, frames, channels,
height, width)``, frames patched by ``patch_size_t`` (``None`` in 1.0, i.e. 1; 2 in 1.5). The optional rotary
embedding (``use_rotary_positional_embeddings``, passed by the pipeline) is a ``(cos, sin)`` pair of ``(video
tokens, head_dim)``, shared by the batch. The checkpoints predict v (DDIM / DPM-Solver), not flow.
"""

from diffusers import CogVideoXTransformer3DModel

from accel.adapters import BlockStack, Component, ModelSpec, TokenLayout, register_model

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
            batch_major=("hidden_states", "encoder_hidden_states", "temb"),
            shared=("image_rotary_emb",),
            token_axes=(("hidden_states", 1), ("image_rotary_emb", 0)),
        ),
    ),
    token_layout=TokenLayout(input="BFCHW", text="first", patch_size_t_key="patch_size_t"),
    flow_matching=False,
)

register_model(CogVideoXTransformer3DModel, COGVIDEOX_SPEC)
