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
"""

from diffusers import HunyuanVideoTransformer3DModel

from accel.adapters import BlockStack, Component, ModelSpec, register_model

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
        ),
        BlockStack(
            path="single_transformer_blocks",
            components=(
                Component(name="joint_attn", module="attn"),
                Component(name="mlp", module="proj_mlp"),
            ),
            outputs=("hidden_states", "encoder_hidden_states"),
        ),
    ),
)

register_model(HunyuanVideoTransformer3DModel, HUNYUAN_VIDEO_SPEC)
