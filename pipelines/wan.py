"""Adapter for Wan 2.1 / 2.2 video models (``WanTransformer3DModel``).

Each ``WanTransformerBlock`` (in ``blocks``, not ``transformer_blocks``) has a self-attention ``attn1`` with
rotary embeddings, a cross-attention ``attn2`` to the text (and, for image-to-video, image) tokens, and a
feed-forward ``ffn``. The model calls the block and the attentions with positional arguments:
``block(hidden_states, encoder_hidden_states, temb, rotary_emb)``; the block returns ``hidden_states``.

``temb`` is ``(batch, 6, dim)``, or ``(batch, tokens, 6, dim)`` with per-token timesteps (Wan 2.2 TI2V; then it
runs over the tokens along dimension 1 too). ``rotary_emb`` is a ``(cos, sin)`` pair of ``(1, tokens, 1,
head_dim)``, shared by the batch. For image-to-video, ``encoder_hidden_states`` holds the image tokens before
the text. Latents are ``(batch, channels, frames, height, width)`` and ``patch_size`` a ``(frames, height,
width)`` triple; Wan is trained with flow matching.
"""

from diffusers import WanTransformer3DModel

from accel.adapters import BlockStack, Component, ModelSpec, TokenLayout, register_model

#: Spec of ``WanTransformer3DModel``: one stack of self-attn / cross-attn / FFN blocks.
WAN_SPEC = ModelSpec(
    stacks=(
        BlockStack(
            path="blocks",
            components=(
                Component(name="self_attn", module="attn1"),
                Component(name="cross_attn", module="attn2"),
                Component(name="ffn", module="ffn"),
            ),
            outputs=("hidden_states",),
            batch_major=("hidden_states", "encoder_hidden_states", "temb"),
            shared=("rotary_emb",),
            token_axes=(("hidden_states", 1), ("rotary_emb", 1)),
        ),
    ),
    token_layout=TokenLayout(input="BCFHW", text="cross"),
    flow_matching=True,
)

register_model(WanTransformer3DModel, WAN_SPEC)
