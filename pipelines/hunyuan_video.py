"""Adapter for HunyuanVideo (``HunyuanVideoTransformer3DModel``).

Two stacks run in order (the text token refiner inside ``context_embedder`` runs once per forward and is not
cached):

* ``transformer_blocks`` (dual-stream MMDiT blocks): joint attention ``attn``, video feed-forward ``ff`` and
  text feed-forward ``ff_context``.
* ``single_transformer_blocks`` (single-stream blocks): joint attention ``attn`` and, in parallel, an MLP
  whose first projection is ``proj_mlp`` (widening, so reusable only as is, not as input plus residual).

Unlike Flux, both kinds of block return ``(hidden_states, encoder_hidden_states)``, in that order. The model
calls them with positional arguments
``(hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb, token_replace_emb,
first_frame_num_tokens)``; the plain blocks swallow the last two through ``*args``. The image-to-video variant
(``image_condition_type="token_replace"``) uses the TokenReplace block classes, which have the same attributes
and return order.

The joint sequence puts the video tokens first and the text last; even the single-stream blocks split the
concatenated tokens again and hand their attention separate streams. ``attention_mask`` is ``(batch, 1, 1,
video + text tokens)`` (it masks the text padding). The rotary embedding is a ``(cos, sin)`` pair of ``(video
tokens, head_dim)`` shared by the batch, named ``freqs_cis`` in the dual-stream blocks and
``image_rotary_emb`` in the single-stream ones. Latents are ``(batch, channels, frames, height, width)``,
patched by ``patch_size_t`` x ``patch_size`` x ``patch_size``; HunyuanVideo is trained with flow matching.
"""

from diffusers import HunyuanVideoTransformer3DModel

from accel.adapters import BlockStack, Component, ModelSpec, TokenLayout, register_model


def _arguments(rotary: str) -> dict:
    # The two kinds of block take the same arguments; only the rotary embedding's name differs.
    return dict(
        batch_major=("hidden_states", "encoder_hidden_states", "temb", "attention_mask"),
        shared=(rotary,),
        token_axes=(("hidden_states", 1), ("attention_mask", 3), (rotary, 0)),
    )


#: Spec of ``HunyuanVideoTransformer3DModel``: dual-stream blocks, then single-stream blocks.
HUNYUAN_VIDEO_SPEC = ModelSpec(
    stacks=(
        BlockStack(
            path="transformer_blocks",
            components=(
                Component(name="joint_attn", module="attn"),
                Component(name="ffn", module="ff"),
                Component(name="ffn_context", module="ff_context"),
            ),
            outputs=("hidden_states", "encoder_hidden_states"),
            **_arguments(rotary="freqs_cis"),
        ),
        BlockStack(
            path="single_transformer_blocks",
            components=(
                Component(name="joint_attn", module="attn"),
                Component(name="mlp", module="proj_mlp"),
            ),
            outputs=("hidden_states", "encoder_hidden_states"),
            **_arguments(rotary="image_rotary_emb"),
        ),
    ),
    token_layout=TokenLayout(input="BCFHW", text="last", patch_size_t_key="patch_size_t"),
    flow_matching=True,
)

register_model(HunyuanVideoTransformer3DModel, HUNYUAN_VIDEO_SPEC)
