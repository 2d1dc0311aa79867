"""Adapter for Wan 2.1 / 2.2 video models (``WanTransformer3DModel``).

Each ``WanTransformerBlock`` (in ``blocks``, not ``transformer_blocks``) has a self-attention ``attn1`` with
rotary embeddings, a cross-attention ``attn2`` to the text (and, for image-to-video, image) tokens, and a
feed-forward ``ffn``. The model calls the block and the attentions with positional arguments:
``block(hidden_states, encoder_hidden_states, temb, rotary_emb)``; the block returns ``hidden_states``.
"""

from diffusers import WanTransformer3DModel

from accel.adapters import BlockStack, Component, ModelSpec, register_model

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
        ),
    ),
)

register_model(WanTransformer3DModel, WAN_SPEC)
