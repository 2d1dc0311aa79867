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
"""

from diffusers import FluxTransformer2DModel

from accel.adapters import BlockStack, Component, ModelSpec, register_model

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
        ),
        BlockStack(
            path="single_transformer_blocks",
            components=(
                Component(name="joint_attn", module="attn"),
                Component(name="mlp", module="proj_mlp"),
            ),
            outputs=("encoder_hidden_states", "hidden_states"),
        ),
    ),
)

register_model(FluxTransformer2DModel, FLUX_SPEC)
