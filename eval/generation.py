"""Running a pipeline the same way for every method, and its samples (images or video clips) on disk.

Every sample ``i`` gets its own generator seeded ``seeds[i]``, so a prompt and seed give the same starting
noise whatever the batch it lands in: samples of different methods compare one to one.

A video pipeline (one whose ``__call__`` takes ``num_frames``, whose output has ``.frames``: Wan, LTX-Video,
HunyuanVideo, CogVideoX) gives clips ``(N, F, 3, H, W)``. A clip is stored losslessly as one PNG *filmstrip*:
its F frames side by side, ``(H, F * W)`` pixels, with the frame count in the PNG text chunk
:data:`FRAMES_KEY`. So the image code (atomic PNG writes, resuming from files on disk, reference sets) serves
clips unchanged, and :func:`load_samples` gives back ``(N, F, 3, H, W)`` from the files alone.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: PNG text chunk holding a filmstrip's frame count (absent on a plain image)
FRAMES_KEY = "accel-frames"
#: frames per second of the animated WebP files made from clips (``accel generate`` and the HTML report)
ANIMATION_FPS = 8


def generates_video(pipe: Any) -> bool:
    """Whether ``pipe`` makes video clips (its ``__call__`` takes ``num_frames``), known before any compute."""
    return "num_frames" in inspect.signature(type(pipe).__call__).parameters


def call_kwargs(pipe: Any, overrides: dict | None = None) -> dict:
    """Keyword arguments that make ``pipe(...)`` return ``(N, 3, H, W)`` float images (or ``(N, F, 3, H, W)``
    clips) in [0, 1] offline.

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

    A bundled model brings its own: the image model ``accel.pipelines.default.DEFAULT_CALL_KWARGS`` and
    ``DEFAULT_GUIDANCE_SCALE``, the video model ``accel.pipelines.video.DEFAULT_VIDEO_CALL_KWARGS`` (its clip
    size, frame count and guidance scale). Any other pipeline gets its ``__call__``'s default guidance scale
    (4.5 if none).

    Raises:
        ValueError: an override the pipeline's ``__call__`` does not name (e.g. ``num_frames`` for an image
            pipeline; a ``**kwargs`` there would swallow it unused), before any compute.
    """
    parameters = inspect.signature(type(pipe).__call__).parameters
    named = [name for name, p in parameters.items() if name != "self" and p.kind is not p.VAR_KEYWORD]
    unknown = sorted(set(overrides or {}) - set(named))
    if unknown:
        raise ValueError(
            f"{type(pipe).__name__} takes no {unknown} (pipeline arguments given as JSON); it takes: {', '.join(named)}"
        )
    kwargs = call_kwargs(pipe)
    parameter = parameters.get("guidance_scale")
    guidance = parameter.default if parameter is not None and isinstance(parameter.default, float) else 4.5
    if bundled and generates_video(pipe):
        from accel.pipelines.video import DEFAULT_VIDEO_CALL_KWARGS

        video = dict(DEFAULT_VIDEO_CALL_KWARGS)
        guidance = video.pop("guidance_scale")
        kwargs.update(video)
    elif bundled:
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
    """Samples for ``prompts`` with per-sample ``seeds``, float32 in [0, 1] on the CPU: images ``(N, 3, H, W)``,
    or clips ``(N, F, 3, H, W)`` from a video pipeline (its output has ``.frames``)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    from accel.pipelines.loading import execution_device

    device = execution_device(pipe)  # under model CPU offload the accelerator, where pipe.device says cpu
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    output = pipe(
        list(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generators,
        **kwargs,
    )
    if hasattr(output, "frames"):
        frames = output.frames
        if not isinstance(frames, torch.Tensor):  # (N, F, H, W, 3) numpy
            frames = torch.from_numpy(np.asarray(frames)).permute(0, 1, 4, 2, 3)
        return frames.float().clamp(0, 1).cpu()
    images = output.images if hasattr(output, "images") else output[0]
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
    return images.float().clamp(0, 1).cpu()


def generate_in_batches(
    pipe: Any, prompts: Sequence[str], steps: int, batch: int, kwargs: dict, seed: int = 0, desc: str = "generating"
) -> torch.Tensor:
    """:func:`generate` over ``prompts`` in batches of ``batch`` with a progress bar, sample ``i`` seeded
    ``seed + i``; ``kwargs`` holds the call arguments, ``guidance_scale`` among them."""
    from tqdm import tqdm

    kwargs = dict(kwargs)
    guidance = kwargs.pop("guidance_scale")
    chunks = []
    for start in tqdm(range(0, len(prompts), batch), desc=desc, leave=False):
        part = list(prompts[start : start + batch])
        seeds = [seed + start + i for i in range(len(part))]
        chunks.append(generate(pipe, part, seeds, steps, guidance, kwargs))
    return torch.cat(chunks)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` [0, 1] float -> uint8, rounded."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def save_png(image: torch.Tensor, path: Path, text: dict[str, str] | None = None) -> None:
    """Write one ``(3, H, W)`` uint8 or [0, 1] float image atomically (a temporary file, then a rename), with
    ``text`` in PNG text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    array = (to_uint8(image) if image.is_floating_point() else image).permute(1, 2, 0).numpy()
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    Image.fromarray(array).save(partial, format="PNG", pnginfo=info)
    partial.replace(path)


def filmstrip(clip: torch.Tensor) -> torch.Tensor:
    """A clip ``(F, 3, H, W)`` as one image ``(3, H, F * W)``: its frames side by side, first on the left."""
    return torch.cat(list(clip.unbind(0)), dim=-1)


def unstrip(strips: torch.Tensor, frames: int) -> torch.Tensor:
    """Filmstrips ``(N, 3, H, F * W)`` -> clips ``(N, F, 3, H, W)``."""
    count, channels, height, width = strips.shape
    if width % frames:
        raise ValueError(f"a filmstrip {width} pixels wide cannot hold {frames} frames of equal width")
    clips = strips.reshape(count, channels, height, frames, width // frames)  # (N, 3, H, F, W)
    return clips.permute(0, 3, 1, 2, 4).contiguous()


def save_sample(sample: torch.Tensor, path: Path) -> None:
    """Write an image ``(3, H, W)`` as a PNG, or a clip ``(F, 3, H, W)`` as a PNG filmstrip with its frame count
    (see the module docstring)."""
    if sample.ndim == 4:
        save_png(filmstrip(sample), path, {FRAMES_KEY: str(sample.shape[0])})
    else:
        save_png(sample, path)


def load_pngs(paths: Sequence[Path]) -> torch.Tensor:
    """PNG files -> ``(N, 3, H, W)`` uint8.

    Raises:
        ValueError: a file that cannot be read as an image, naming it and what to do.
    """
    from PIL import Image

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except (OSError, ValueError, SyntaxError) as error:
            raise ValueError(f"{path} cannot be read as an image ({error}); delete it and run again") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def readable_sample(path: Path) -> bool:
    """Whether a sample file is on disk and whole (PIL's ``verify``), so a resumed run can skip it; a damaged
    one is reported (and then generated again)."""
    from PIL import Image

    if not path.exists():
        return False
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, ValueError, SyntaxError) as error:
        logging.getLogger(__name__).warning("%s cannot be read (%s): generating it again", path, error)
        return False


def png_frames(path: Path) -> int | None:
    """The frame count of a PNG filmstrip written by :func:`save_sample`; None for a plain image."""
    from PIL import Image

    with Image.open(path) as image:
        value = getattr(image, "text", {}).get(FRAMES_KEY)
    return None if value is None else int(value)


def load_samples(paths: Sequence[Path]) -> torch.Tensor:
    """Samples written by :func:`save_sample`: images ``(N, 3, H, W)`` or clips ``(N, F, 3, H, W)``, uint8.

    Raises:
        ValueError: the files mix images and clips, or clips of different lengths.
    """
    counts = {png_frames(path) for path in paths}
    if len(counts) > 1:
        raise ValueError(f"{len(paths)} files mix frame counts {sorted(counts, key=str)} (None: a plain image)")
    frames = counts.pop() if counts else None
    strips = load_pngs(paths)
    return strips if frames is None else unstrip(strips, frames)


def animation_bytes(clip: torch.Tensor, size: int | None = None, lossless: bool = True) -> bytes:
    """A clip ``(F, 3, H, W)`` (uint8 or [0, 1] float) as a looping animated WebP at :data:`ANIMATION_FPS`.

    Args:
        clip: the frames.
        size: shrink the frames to fit ``size`` x ``size`` pixels (None: as they are).
        lossless: exact pixels; else WebP quality 95 (about 5x smaller, mean error about 1 of 255 levels),
            which the HTML report embeds.
    """
    import io

    from PIL import Image

    clip = to_uint8(clip) if clip.is_floating_point() else clip
    frames = [Image.fromarray(frame.permute(1, 2, 0).numpy()) for frame in clip]
    if size is not None and max(frames[0].size) > size:
        for frame in frames:
            frame.thumbnail((size, size))
    buffer = io.BytesIO()
    quality = {"lossless": True, "method": 6} if lossless else {"quality": 95}
    duration = 1000 // ANIMATION_FPS
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], duration=duration, loop=0, **quality)
    return buffer.getvalue()


def save_animation(clip: torch.Tensor, path: Path) -> None:
    """Write a clip ``(F, 3, H, W)`` as a lossless animated WebP (see :func:`animation_bytes`), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    partial.write_bytes(animation_bytes(clip))
    partial.replace(path)


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


def module_sha256(module: torch.nn.Module, digest: Any = None) -> Any:
    """SHA-256 over a module's parameters and buffers: names, dtypes, shapes and exact bytes, in name order (a
    compiled block's ``_orig_mod.`` prefix dropped). Unlike a float sum it does not change with the thread count,
    the process or the device; returns the ``hashlib`` object (updated in place if ``digest`` is given)."""
    digest = digest or hashlib.sha256()
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    for name in sorted(tensors, key=lambda n: n.replace("_orig_mod.", "")):
        _hash_tensor(f"{name.replace('_orig_mod.', '')}", tensors[name].detach(), digest)
    return digest


def _hash_tensor(name: str, tensor: torch.Tensor, digest: Any) -> None:
    """Name, dtype, shape and exact bytes of ``tensor`` into ``digest``; a tensor subclass that cannot be viewed
    as bytes (a torchao int8/float8 weight) hashes its type, its ``__tensor_flatten__`` context (e.g. how
    activations are quantized) and each inner tensor (the int8 data, scales, zero points) instead."""
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        inner, context = flatten()
        digest.update(f"{type(tensor).__qualname__}:{context!r};".encode())
        for part in inner:
            _hash_tensor(f"{name}.{part}", getattr(tensor, part), digest)
        return
    flat = tensor.contiguous().reshape(-1).cpu()
    digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def weights_checksum(pipe: Any) -> str:
    """A content hash of every weight of the pipeline's modules (:func:`module_sha256`, component by component),
    so a retrained model in the same folder never resumes another model's trials, and the same model always
    resumes its own, whatever the thread count or process."""
    digest = hashlib.sha256()
    for name in sorted(getattr(pipe, "components", {})):
        module = pipe.components[name]
        if isinstance(module, torch.nn.Module):
            digest.update(f"{name}:{type(module).__name__};".encode())
            module_sha256(module, digest)
    return digest.hexdigest()[:16]
