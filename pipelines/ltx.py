"""Adapter for LTX-Video (``LTXVideoTransformer3DModel``).

Each ``LTXVideoTransformerBlock`` has a self-attention ``attn1`` with rotary embeddings, a cross-attention
``attn2`` to the text and a feed-forward ``ff``. The block is called with keyword arguments and returns
``hidden_states``.

The pipeline packs the latents into ``(batch, tokens, channels)`` by the config's ``patch_size`` and
``patch_size_t`` (1 and 1 in the released models) and passes the latent's ``num_frames``, ``height`` and
``width``. Unlike Wan and FLUX, the rotary embedding ``image_rotary_emb`` is built per sample: a ``(cos, sin)``
pair of ``(batch, tokens, head_dim)``. LTX-Video is trained with rectified flow.
"""

from diffusers import LTXVideoTransformer3DModel

from accel.adapters import SELF_CROSS_FFN, BlockStack, ModelSpec, TokenLayout, register_model

#: Spec of ``LTXVideoTransformer3DModel``: one stack of self-attn / cross-attn / FFN blocks.
LTX_SPEC = ModelSpec(
    stacks=(
        BlockStack(
            path="transformer_blocks",
            components=SELF_CROSS_FFN,
            outputs=("hidden_states",),
            batch_major=(
                "hidden_states",
                "encoder_hidden_states",
                "temb",
                "image_rotary_emb",
                "encoder_attention_mask",
            ),
            token_axes=(("hidden_states", 1), ("image_rotary_emb", 1)),
        ),
    ),
    token_layout=TokenLayout(
        input="packed",
        text="cross",
        patch_size_t_key="patch_size_t",
        grid_args=("num_frames", "height", "width"),
    ),
    flow_matching=True,
)

register_model(LTXVideoTransformer3DModel, LTX_SPEC)
