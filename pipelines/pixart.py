"""Adapter for PixArt-alpha / PixArt-sigma (``PixArtTransformer2DModel``)."""

from diffusers import PixArtTransformer2DModel

from accel.adapters import BlockStack, Component, ModelSpec, register_model

PIXART_SPEC = ModelSpec(
    stacks=(
        BlockStack(
            path="transformer_blocks",
            components=(
                Component(name="self_attn", module="attn1"),
                Component(name="cross_attn", module="attn2"),
                Component(name="ffn", module="ff"),
            ),
            outputs=("hidden_states",),
        ),
    ),
)

register_model(PixArtTransformer2DModel, PIXART_SPEC)
