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


#: denoising steps of the bundled models when ``--steps`` is omitted (what they were trained and documented with)
BUNDLED_STEPS = 20


def load_pipeline(
    model: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    *,
    variant: str | None = None,
    revision: str | None = None,
    offload: bool = False,
) -> Any:
    """Load a diffusers pipeline.

    Args:
        model: None (or ``"bundled-default"``) for the bundled default model; ``"bundled-video"`` for the bundled
            video model; a local folder written by ``save_pretrained``; or a hub id such as
            ``"PixArt-alpha/PixArt-XL-2-512x512"`` (needs network access or the local hub cache).
        torch_dtype: dtype of the weights.
        device: where to put the pipeline (with ``offload``: the accelerator each model moves to while it runs).
        variant: weights variant, e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``
            (``DiffusionPipeline.from_pretrained(variant=...)``).
        revision: hub branch, tag or commit to load (``from_pretrained(revision=...)``).
        offload: model CPU offload (``pipe.enable_model_cpu_offload``): every model stays on the CPU and moves
            to ``device`` only while it runs; needs accelerate and an accelerator device.

    Raises:
        ValueError: a hub id that can be neither downloaded nor found in the cache, with how to pass a local
            folder instead; a variant or revision asked of a bundled model (it has one set of weights).
    """
    if is_bundled(model):
        if variant is not None or revision is not None:
            raise ValueError(
                "--variant and --revision choose among a hub or folder pipeline's weights; the bundled models have "
                "one set: leave them out, or pass --model"
            )
        load_device = "cpu" if offload else device
        if model == BUNDLED_VIDEO:
            from accel.pipelines.video import load_default_video_pipeline

            pipe = load_default_video_pipeline(torch_dtype=torch_dtype, device=load_device)
        else:
            from accel.pipelines.default import load_default_pipeline

            pipe = load_default_pipeline(torch_dtype=torch_dtype, device=load_device)
        return _place(pipe, device, offload)
    from diffusers import DiffusionPipeline

    options = {"torch_dtype": torch_dtype, "variant": variant, "revision": revision}
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        check_components(path)
        try:
            pipe = DiffusionPipeline.from_pretrained(path, **options)
        except (OSError, ValueError) as error:
            if variant is None:
                raise
            raise ValueError(f"could not load {path} with --variant {variant}: {_first_line(error)}") from error
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(model, **options)
        except Exception as error:  # hub errors come in many types: connection, not found, offline mode
            asked = "".join(f" --{k} {v}" for k, v in (("variant", variant), ("revision", revision)) if v)
            raise ValueError(
                f"could not load {model!r}{asked}: it is not a local folder, and downloading it from the Hugging "
                f"Face hub failed ({type(error).__name__}: {_first_line(error)}). "
                f"Without network access, download it elsewhere (`huggingface-cli download {model} --local-dir DIR`)"
                " and pass --model DIR."
            ) from error
    return _place(pipe, device, offload)


def check_components(path: Path) -> None:
    """Raise a clear ``ValueError`` when components ``path/model_index.json`` names have no folder (diffusers
    would fail deep inside a loader); the bundled video model's folder, whose text encoder is the image model's,
    is named as such."""
    import json

    index = json.loads((path / "model_index.json").read_text())
    named = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    missing = [name for name in named if not (path / name).is_dir()]
    if not missing:
        return
    from accel.pipelines.video import DEFAULT_VIDEO_MODEL_DIR

    if path.resolve() == DEFAULT_VIDEO_MODEL_DIR.resolve():
        raise ValueError(
            f"{path} is the bundled video model, which borrows the image model's text encoder and tokenizer: "
            f"pass --model {BUNDLED_VIDEO} (or load it with accel.pipelines.video.load_default_video_pipeline)"
        )
    raise ValueError(f"{path}/model_index.json names {missing}, which have no folder in {path}")


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else ""


def _place(pipe: Any, device: str, offload: bool) -> Any:
    """``pipe`` on ``device``, or with model CPU offload to it (diffusers' ``enable_model_cpu_offload``)."""
    if not offload:
        return pipe.to(device)
    if not hasattr(pipe, "enable_model_cpu_offload"):
        raise ValueError(f"--offload: {type(pipe).__name__} has no enable_model_cpu_offload")
    pipe.enable_model_cpu_offload(device=device)
    return pipe


def default_steps(pipe: Any, model: str | None) -> int:
    """The step count a run uses when none is given: :data:`BUNDLED_STEPS` for a bundled model, else the
    default of ``num_inference_steps`` in the pipeline's ``__call__`` (e.g. 28 for StableDiffusion3Pipeline and
    FluxPipeline, 50 for WanPipeline; FLUX.1-schnell shares FluxPipeline's 28, its model card says 4: pass
    ``--steps 4``).

    Raises:
        ValueError: the pipeline's ``__call__`` has no integer default for ``num_inference_steps``.
    """
    if is_bundled(model):
        return BUNDLED_STEPS
    import inspect

    parameter = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    default = None if parameter is None else parameter.default
    if not isinstance(default, int) or isinstance(default, bool):
        raise ValueError(f"{type(pipe).__name__}.__call__ has no default num_inference_steps: pass --steps N")
    return default


def execution_device(pipe: Any) -> torch.device:
    """Where ``pipe``'s models compute: its ``_execution_device`` (the accelerator under model CPU offload, where
    ``pipe.device`` says cpu), else ``pipe.device``, else the CPU."""
    for name in ("_execution_device", "device"):
        try:
            device = getattr(pipe, name)
        except (AttributeError, RuntimeError):
            continue
        if isinstance(device, torch.device):
            return device
    return torch.device("cpu")


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
