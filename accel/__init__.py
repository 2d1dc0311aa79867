"""diffusers-accel: learned feature caching, per-token step allocation, sparse attention and cache-aware
quantization for diffusers pipelines, through one front door::

    import accel
    handle = accel.apply(pipe, accel.caching.CacheConfig(schedule=...), accel.quant.QuantConfig(scheme="int8-dynamic"))
    images = pipe(prompts, num_inference_steps=20).images
    print(handle.stats())
    handle.remove()
"""

from accel import caching, quant, sparse  # the techniques register themselves on import
from accel.adapters import BlockStack, Component, ModelSpec, register_model, supported_models
from accel.api import ApplyHandle, Handle, apply, register
from accel.compile import compile_blocks
from accel.patches import PatchLog, PatchRecord

__version__ = "0.1.0"

__all__ = [
    "ApplyHandle",
    "BlockStack",
    "Component",
    "Handle",
    "ModelSpec",
    "PatchLog",
    "PatchRecord",
    "apply",
    "caching",
    "compile_blocks",
    "quant",
    "register",
    "register_model",
    "sparse",
    "supported_models",
]
