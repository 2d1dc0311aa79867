"""Running a pipeline the same way for every method, and images on disk.

Every sample ``i`` gets its own generator seeded ``seeds[i]``, so a prompt and seed give the same starting
noise whatever the batch it lands in: images of different methods compare one to one.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def call_kwargs(pipe: Any, overrides: dict | None = None) -> dict:
    """Keyword arguments that make ``pipe(...)`` return ``(N, 3, H, W)`` float images in [0, 1] offline.

    Turns off caption cleaning (needs extra packages) and resolution binning (resizes outside its bins) where
    the pipeline has them, and caps ``max_sequence_length`` at the tokenizer's limit. ``overrides`` win.
    """
    parameters = inspect.signature(type(pipe).__call__).parameters
    kwargs: dict = {"output_type": "pt"}
    if "clean_caption" in parameters:
        kwargs["clean_caption"] = False
    if "use_resolution_binning" in parameters:
        kwargs["use_resolution_binning"] = False
    limit = getattr(getattr(pipe, "tokenizer", None), "model_max_length", None)
    default = parameters.get("max_sequence_length")
    if default is not None and isinstance(default.default, int) and isinstance(limit, int):
        kwargs["max_sequence_length"] = min(default.default, limit)
    return {**kwargs, **(overrides or {})}


def pipeline_defaults(pipe: Any, bundled: bool, overrides: dict | None = None) -> tuple[dict, float]:
    """Call arguments (see :func:`call_kwargs`) and guidance scale for ``pipe``.

    The bundled default model brings its own (``accel.pipelines.default.DEFAULT_CALL_KWARGS`` and
    ``DEFAULT_GUIDANCE_SCALE``); any other pipeline gets its ``__call__``'s default guidance scale (4.5 if none).
    """
    kwargs = call_kwargs(pipe)
    parameter = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    guidance = parameter.default if parameter is not None and isinstance(parameter.default, float) else 4.5
    if bundled:
        from accel.pipelines.default import DEFAULT_CALL_KWARGS, DEFAULT_GUIDANCE_SCALE

        kwargs.update(DEFAULT_CALL_KWARGS)
        guidance = DEFAULT_GUIDANCE_SCALE
    return {**kwargs, **(overrides or {})}, float(guidance)


@torch.no_grad()
def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance_scale: float,
    kwargs: dict,
) -> torch.Tensor:
    """Images for ``prompts`` with per-sample ``seeds``: ``(N, 3, H, W)`` float32 in [0, 1] on the CPU."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = getattr(pipe, "device", torch.device("cpu"))
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    output = pipe(
        list(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generators,
        **kwargs,
    )
    images = output.images if hasattr(output, "images") else output[0]
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
    return images.float().clamp(0, 1).cpu()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` [0, 1] float -> uint8, rounded."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write one ``(3, H, W)`` uint8 or [0, 1] float image atomically (a temporary file, then a rename)."""
    from PIL import Image

    array = (to_uint8(image) if image.is_floating_point() else image).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    Image.fromarray(array).save(partial, format="PNG")
    partial.replace(path)


def load_pngs(paths: Sequence[Path]) -> torch.Tensor:
    """PNG files -> ``(N, 3, H, W)`` uint8."""
    from PIL import Image

    arrays = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_image_set(path: str | Path) -> torch.Tensor:
    """A reference image set for FID: an ``.npz`` with an ``images`` array ``(N, H, W, 3)`` uint8, or a folder
    of PNG/JPEG files. Returns ``(N, 3, H, W)`` uint8."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference image set not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data.files:
                raise ValueError(f"{path} has no 'images' array (found {data.files})")
            images = np.asarray(data["images"])
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{path}: 'images' must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise ValueError(f"no PNG or JPEG files in {path}")
    return load_pngs(files)


def weights_checksum(pipe: Any) -> str:
    """A fingerprint of every weight of the pipeline's modules (sum and sum of squares per module), so a
    retrained model in the same folder never resumes another model's trials."""
    digest = hashlib.sha256()
    for name in sorted(getattr(pipe, "components", {})):
        module = pipe.components[name]
        if isinstance(module, torch.nn.Module):
            total = torch.zeros(2, dtype=torch.float64)
            for parameter in module.parameters():
                values = parameter.detach().double()
                total += torch.stack([values.sum(), (values * values).sum()]).cpu()
            digest.update(f"{name}:{type(module).__name__}:{total.tolist()}".encode())
    return digest.hexdigest()[:16]
