"""Adapter for PixArt-alpha / PixArt-sigma (``PixArtTransformer2DModel``)."""

from diffusers import PixArtTransformer2DModel

from accel.adapters import SELF_CROSS_FFN, BlockStack, ModelSpec, register_model

PIXART_SPEC = ModelSpec(
    stacks=(
        BlockStack(
            path="transformer_blocks",
            components=SELF_CROSS_FFN,
            outputs=("hidden_states",),
        ),
    ),
)

register_model(PixArtTransformer2DModel, PIXART_SPEC)
