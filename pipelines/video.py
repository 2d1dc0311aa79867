"""The bundled default video model: a small text-to-video Wan trained here on rendered emoji clips.

It is a stock ``diffusers.WanPipeline``: an 8-block ``WanTransformer3DModel`` (576 tokens per clip: 9 latent
frames of 8 x 8 patches) trained from scratch with rectified flow, a small ``AutoencoderKLWan`` (17 frames of
64 x 64 RGB <-> 9 x 16 x 16 x 8 latents: temporal factor 2, spatial factor 4), ``UniPCMultistepScheduler`` with
flow sigmas, and as text encoder the image model's all-MiniLM-L6-v2 (``pipelines/default_model``; the folder
here does not hold a second copy). ``scripts/train_video_model.py`` reproduces the weights; no download is
needed. Captions name an emoji and a motion (``scripts/render_clips.py``)::

    pipe = load_default_video_pipeline()
    frames = pipe("red apple sliding to the right", num_inference_steps=20, **DEFAULT_VIDEO_CALL_KWARGS).frames
    # frames: (1, 17, 64, 64, 3) float in [0, 1]

The folder is a ``save_pretrained`` folder without the text encoder and tokenizer, so diffusers loads it given
those two: ``WanPipeline.from_pretrained(DEFAULT_VIDEO_MODEL_DIR, text_encoder=..., tokenizer=...)``; a loaded
pipeline's ``save_pretrained(folder)`` writes a complete folder that ``WanPipeline.from_pretrained`` (and
``accel eval --model folder``) loads alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from accel.pipelines.default import DEFAULT_MODEL_DIR

#: Where the weights are.
DEFAULT_VIDEO_MODEL_DIR = Path(__file__).resolve().parent / "default_video_model"

#: Keyword arguments every call of the default video pipeline needs: its clip size and caption length.
DEFAULT_VIDEO_CALL_KWARGS = {
    "height": 64,
    "width": 64,
    "num_frames": 17,
    "max_sequence_length": 32,
    "guidance_scale": 4.0,
}


def load_default_video_pipeline(
    path: str | Path | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    text_path: str | Path | None = None,
):
    """Load the bundled emoji Wan pipeline.

    ``WanPipeline`` calls its text encoder as ``text_encoder(input_ids, attention_mask).last_hidden_state``,
    which a ``BertModel`` answers as T5 would, so MiniLM serves unchanged.

    Args:
        path: a folder with ``transformer``, ``vae`` and ``scheduler``; default :data:`DEFAULT_VIDEO_MODEL_DIR`.
        torch_dtype: dtype to compute in (the weights are stored in fp16; float32 is right on a CPU).
        device: where to put the pipeline.
        text_path: a folder with ``text_encoder`` and ``tokenizer``; default the image model's folder.

    Raises:
        FileNotFoundError: a folder or one of its components is missing.
        TypeError: ``torch_dtype`` is not a floating-point ``torch.dtype`` (checked before anything loads).
        ValueError: ``device`` is not a device torch knows (checked before anything loads).
    """
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise TypeError(f"torch_dtype must be a floating-point torch.dtype such as torch.float32, got {torch_dtype!r}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r} ({error})") from None
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, BertModel

    folder = Path(path) if path is not None else DEFAULT_VIDEO_MODEL_DIR
    text_folder = Path(text_path) if text_path is not None else DEFAULT_MODEL_DIR
    missing = [str(folder / p) for p in ("transformer", "vae", "scheduler") if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"default video model lacks {missing}; re-run scripts/train_video_model.py export")
    missing = [str(text_folder / p) for p in ("text_encoder", "tokenizer") if not (text_folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"video model's text encoder lacks {missing}; text_path must be a folder with the image model's "
            f"text_encoder and tokenizer (default {DEFAULT_MODEL_DIR})"
        )
    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(text_folder / "tokenizer"),
        text_encoder=BertModel.from_pretrained(text_folder / "text_encoder", torch_dtype=torch_dtype),
        vae=AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch_dtype),
        transformer=WanTransformer3DModel.from_pretrained(folder / "transformer", torch_dtype=torch_dtype),
        scheduler=UniPCMultistepScheduler.from_pretrained(folder / "scheduler"),
    )
    for module in (pipe.text_encoder, pipe.vae, pipe.transformer):
        module.eval().requires_grad_(False)
    return pipe.to(device)
