"""The bundled default model: a small text-to-image PixArt trained here on rendered emoji.

It is a stock ``diffusers.PixArtAlphaPipeline``: a 12-block ``PixArtTransformer2DModel`` (64 latent tokens)
trained from scratch with rectified flow, a small ``AutoencoderKL`` (64x64x3 images, 16x16x4 latents), the
all-MiniLM-L6-v2 sentence encoder as text encoder, and ``DPMSolverMultistepScheduler`` with flow sigmas. The
weights live in ``accel/pipelines/default_model`` (fp16), and ``scripts/train_default_model.py`` reproduces
them. No download is needed.

Call it with :data:`DEFAULT_CALL_KWARGS`: PixArt's resolution binning only knows 256 px and larger models, and
captions are short::

    pipe = load_default_pipeline()
    images = pipe("red apple", num_inference_steps=20, **DEFAULT_CALL_KWARGS).images
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Where the weights are.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
#: the caching front ``accel search`` found for the bundled model (``accel.caching.load_front(DEFAULT_FRONT_DIR)``)
DEFAULT_FRONT_DIR = Path(__file__).resolve().parent / "default_front"

#: Keyword arguments every call of the default pipeline needs.
DEFAULT_CALL_KWARGS = {"use_resolution_binning": False, "max_sequence_length": 32, "clean_caption": False}

#: Guidance scale the model was checked with.
DEFAULT_GUIDANCE_SCALE = 4.0


def load_default_pipeline(
    path: str | Path | None = None, torch_dtype: torch.dtype = torch.float32, device: str = "cpu"
):
    """Load the bundled emoji PixArt pipeline.

    The components are loaded one by one and assembled into a ``PixArtAlphaPipeline``, so diffusers does not
    warn that the text encoder is a ``BertModel`` rather than PixArt's usual T5 (the pipeline only needs
    token states and an attention mask from it).

    Args:
        path: a folder with the same layout; default :data:`DEFAULT_MODEL_DIR`.
        torch_dtype: dtype to compute in (the weights are stored in fp16; float32 is right on a CPU).
        device: where to put the pipeline.

    Raises:
        FileNotFoundError: the folder or one of its components is missing.
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, BertModel

    folder = Path(path) if path is not None else DEFAULT_MODEL_DIR
    missing = [p for p in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler") if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"default model folder {folder} lacks {missing}; re-run scripts/train_default_model.py export"
        )
    pipe = PixArtAlphaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=BertModel.from_pretrained(folder / "text_encoder", torch_dtype=torch_dtype),
        vae=AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch_dtype),
        transformer=PixArtTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch_dtype),
        scheduler=DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler"),
    )
    for module in (pipe.text_encoder, pipe.vae, pipe.transformer):
        module.eval().requires_grad_(False)
    return pipe.to(device)
