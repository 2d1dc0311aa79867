"""Loading pipelines for the CLI and the harness: the bundled default model, a local folder, or a hub id."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def load_pipeline(model: str | None = None, torch_dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """Load a diffusers pipeline.

    Args:
        model: None for the bundled default model; a local folder written by ``save_pretrained``; or a hub id
            such as ``"PixArt-alpha/PixArt-XL-2-512x512"`` (needs network access or the local hub cache).
        torch_dtype: dtype of the weights.
        device: where to put the pipeline.

    Raises:
        ValueError: a hub id that can be neither downloaded nor found in the cache, with how to pass a local
            folder instead.
    """
    if model is None:
        from accel.pipelines.default import load_default_pipeline

        return load_default_pipeline(torch_dtype=torch_dtype, device=device)
    from diffusers import DiffusionPipeline

    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch_dtype)
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype)
        except Exception as error:  # hub errors come in many types: connection, not found, offline mode
            raise ValueError(
                f"could not load {model!r}: it is not a local folder, and downloading it from the Hugging Face hub "
                f"failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                f"Without network access, download it elsewhere (`huggingface-cli download {model} --local-dir DIR`)"
                " and pass --model DIR."
            ) from error
    return pipe.to(device)
