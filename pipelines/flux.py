"""Adapter for FLUX.1 (``FluxTransformer2DModel``), also used by the Kontext and Fill pipelines.

Two stacks run in order:

* ``transformer_blocks`` (double-stream MMDiT blocks): joint text+image attention ``attn``, image feed-forward
  ``ff`` and text feed-forward ``ff_context``; called with keyword arguments, returns
  ``(encoder_hidden_states, hidden_states)``.
* ``single_transformer_blocks`` (single-stream blocks): the block concatenates text and image tokens, runs
  a joint attention ``attn`` and, in parallel, an MLP whose first projection is ``proj_mlp``; ``proj_out``
  then mixes both branches under the block's gate and is left uncached. Returns
  ``(encoder_hidden_states, hidden_states)`` split back from the joint sequence. ``proj_mlp`` widens the
  tokens (``dim -> mlp_ratio * dim``), so its output can only be reused as is, not as input plus residual.
  Its attention receives the text and image tokens already concatenated in ``hidden_states``.

Text comes first in every joint sequence. The pipeline packs 2x2 latent pixels into each token before the
forward (``hidden_states`` is ``(batch, tokens, 4 * channels)``, the config's ``patch_size`` is 1), and passes
one ``(frame, row, column)`` id per image token in ``img_ids``, from which the token grid is read. The rotary
embedding ``image_rotary_emb`` is a ``(cos, sin)`` pair of ``(text + image tokens, head_dim)``, shared by the
batch. FLUX is trained with rectified flow.
"""

from diffusers import FluxTransformer2DModel

from accel.adapters import BlockStack, Component, ModelSpec, TokenLayout, register_model

# Both kinds of block take the same arguments.
_ARGUMENTS = dict(
    batch_major=("hidden_states", "encoder_hidden_states", "temb"),
    shared=("image_rotary_emb",),
    token_axes=(("hidden_states", 1), ("image_rotary_emb", 0)),
)

#: Spec of ``FluxTransformer2DModel``: double-stream blocks, then single-stream blocks.
FLUX_SPEC = ModelSpec(
    stacks=(
        BlockStack(
            path="transformer_blocks",
            components=(
                Component(name="joint_attn", module="attn"),
                Component(name="ffn", module="ff"),
                Component(name="ffn_context", module="ff_context"),
            ),
            outputs=("encoder_hidden_states", "hidden_states"),
            **_ARGUMENTS,
        ),
        BlockStack(
            path="single_transformer_blocks",
            components=(
                Component(name="joint_attn", module="attn", streams="merged"),
                Component(name="mlp", module="proj_mlp"),
            ),
            outputs=("encoder_hidden_states", "hidden_states"),
            **_ARGUMENTS,
        ),
    ),
    token_layout=TokenLayout(input="packed", text="first", packed_patch=(1, 2, 2), position_ids_arg="img_ids"),
    flow_matching=True,
)

register_model(FluxTransformer2DModel, FLUX_SPEC)
