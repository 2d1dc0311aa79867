"""Loading pipelines for the CLI and the harness: a bundled model, a local folder, or a hub id."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: ``--model`` name of the bundled text-to-video model (:mod:`accel.pipelines.video`); omitting ``--model`` (None)
#: or ``"bundled-default"`` gives the bundled text-to-image model. A local folder of that name: ``./bundled-video``.
BUNDLED_VIDEO = "bundled-video"
BUNDLED_IMAGE = "bundled-default"


def is_bundled(model: str | None) -> bool:
    """Whether ``model`` names a bundled model (which then brings its own call arguments)."""
    return model in (None, BUNDLED_IMAGE, BUNDLED_VIDEO)


def load_pipeline(model: str | None = None, torch_dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """Load a diffusers pipeline.

    Args:
        model: None (or ``"bundled-default"``) for the bundled default model; ``"bundled-video"`` for the bundled
            video model; a local folder written by ``save_pretrained``; or a hub id such as
            ``"PixArt-alpha/PixArt-XL-2-512x512"`` (needs network access or the local hub cache).
        torch_dtype: dtype of the weights.
        device: where to put the pipeline.

    Raises:
        ValueError: a hub id that can be neither downloaded nor found in the cache, with how to pass a local
            folder instead.
    """
    if model is None or model == BUNDLED_IMAGE:
        from accel.pipelines.default import load_default_pipeline

        return load_default_pipeline(torch_dtype=torch_dtype, device=device)
    if model == BUNDLED_VIDEO:
        from accel.pipelines.video import load_default_video_pipeline

        return load_default_video_pipeline(torch_dtype=torch_dtype, device=device)
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


def transformer_config_path(model: str | None = None) -> Path:
    """The ``transformer/config.json`` of a pipeline (see :func:`load_pipeline` for ``model``); a hub id downloads
    that one file (or finds it in the local hub cache), never the weights.

    Raises:
        ValueError: no such file, with what to pass instead.
    """
    if model is None or model in (BUNDLED_IMAGE, BUNDLED_VIDEO):
        if model == BUNDLED_VIDEO:
            from accel.pipelines.video import DEFAULT_VIDEO_MODEL_DIR as folder
        else:
            from accel.pipelines.default import DEFAULT_MODEL_DIR as folder
        return folder / "transformer" / "config.json"
    path = Path(model).expanduser()
    if path.exists():
        found = path / "transformer" / "config.json"
        if not found.is_file():
            raise ValueError(f"{path} has no transformer/config.json: is it a diffusers pipeline folder?")
        return found
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model, "config.json", subfolder="transformer"))
    except Exception as error:  # hub errors come in many types: connection, not found, offline mode
        raise ValueError(
            f"could not read the transformer config of {model!r}: it is not a local folder, and fetching "
            f"transformer/config.json from the Hugging Face hub failed ({type(error).__name__}). Pass --model DIR, a "
            "folder with the pipeline (or just its transformer/config.json)."
        ) from error


def load_transformer_skeleton(model: str | None = None) -> torch.nn.Module:
    """A pipeline's transformer built from its ``config.json`` alone, with its parameters on the meta device (no
    weights read, nothing computed): its class, blocks and components, for ``accel info`` and ``accel schedule``.

    Raises:
        ValueError: the config cannot be found, or names a class diffusers does not have.
    """
    import diffusers

    path = transformer_config_path(model)
    config = json.loads(path.read_text())
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"{path}: _class_name {config.get('_class_name')!r} is not a diffusers model class")
    with torch.device("meta"):
        return cls.from_config(config)
