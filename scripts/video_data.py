"""Clips and captions for the bundled video model's training (``scripts/train_video_model.py``).

Clips come from ``scripts/render_clips.py``, rendered on the fly and seeded (:func:`rendered_batches` renders them in
several processes for ``encode --workers N``); the text encoder is the all-MiniLM-L6-v2 copy in
``pipelines/default_model``, encoded exactly as ``WanPipeline`` does (token states, padding zeroed, no mask:
:func:`encode_text`).

The ``captions`` stage (:func:`write_captions`) stores the caption states of every object/motion pair in ``--work``;
``encode`` and ``frames`` then look captions up there (:func:`caption_states`) instead of running the text encoder,
so a machine without its weights (a lent GPU the checkout travels to without them) can encode. :func:`object_split`
keeps the train objects of ``--objects``; :func:`stage_output` and :func:`latent_statistics` read what an earlier
stage wrote to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from render_clips import FRAMES, ClipSpec, caption, load_emoji, render_clip, split_pairs, subset_split
from safetensors.torch import save_file

logger = logging.getLogger("train_video_model")  # every stage logs under the script's name

ROOT = Path(__file__).resolve().parents[1]
TEXT_DIR = ROOT / "pipelines" / "default_model"  # tokenizer/ and text_encoder/ (all-MiniLM-L6-v2, fp16)
TEXT_LENGTH = 32  # tokens; the longest caption has 22
CAPTIONS = "captions.safetensors"  # the ``captions`` stage's table in --work


# -- clips and captions --------------------------------------------------------------------------------------


def render_batch(images: np.ndarray, specs: list[ClipSpec], frames: int = FRAMES) -> torch.Tensor:
    """Clips as float ``(B, 3, frames, SIZE, SIZE)`` in [-1, 1] (the first ``frames`` of each clip's track)."""
    return as_clip_tensor(_render_uint8(images, specs, frames))


def _render_uint8(images: np.ndarray, specs: list[ClipSpec], frames: int = FRAMES) -> np.ndarray:
    return np.stack([render_clip(images[s.index], s.motion, s.seed, frames) for s in specs])  # (B, T, H, W, 3)


def as_clip_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, T, H, W, 3)`` frames as float ``(B, 3, T, H, W)`` in [-1, 1]."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def rendered_batches(images: np.ndarray, specs: list[ClipSpec], batch: int, workers: int = 1, frames: int = FRAMES):
    """:func:`render_batch` of consecutive ``batch``-sized chunks of ``specs``, in order, rendered by ``workers``
    processes (in this one when 1)."""
    chunks = [specs[start : start + batch] for start in range(0, len(specs), batch)]
    if workers <= 1:
        yield from (render_batch(images, chunk, frames) for chunk in chunks)
        return
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with ProcessPoolExecutor(workers) as pool:
        for clips in pool.map(partial(_render_uint8, images, frames=frames), chunks):
            yield as_clip_tensor(clips)


def encode_text(captions: list[str], device: str = "cpu") -> torch.Tensor:
    """MiniLM token states ``(N, TEXT_LENGTH, 384)`` with padding zeroed: what ``WanPipeline`` feeds the model."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(TEXT_DIR / "tokenizer")
    encoder = BertModel.from_pretrained(TEXT_DIR / "text_encoder", torch_dtype=torch.float32).to(device).eval()
    states = []
    with torch.no_grad():
        for start in range(0, len(captions), 256):
            tokens = tokenizer(
                captions[start : start + 256],
                padding="max_length",
                max_length=TEXT_LENGTH,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).to(device)
            hidden = encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
            states.append((hidden * tokens.attention_mask[..., None]).cpu())
    return torch.cat(states)


def write_captions(args: argparse.Namespace) -> None:
    """The ``captions`` stage: MiniLM states of the caption of every train and held-out pair (and of the empty
    prompt) of ``--objects``' split, in ``--work``/:data:`CAPTIONS`, for :func:`caption_states`."""
    _, names, split = load_emoji()
    pairs = split_pairs(object_split(split, names, args.objects))
    captions = sorted({caption(names[i], m) for part in ("train", "heldout") for i, m in pairs[part]}) + [""]
    states = encode_text(captions, args.device)
    save_file({"states": states.half().contiguous()}, args.work / CAPTIONS, metadata={"captions": json.dumps(captions)})
    logger.info("caption states of %d captions in %s", len(captions), args.work / CAPTIONS)


def caption_states(args: argparse.Namespace, captions: list[str]) -> torch.Tensor:
    """:func:`encode_text` of ``captions``, or, where ``--work`` holds the ``captions`` stage's table, those
    captions' rows of it (a ``KeyError`` naming a caption it lacks)."""
    path = args.work / CAPTIONS
    if not path.is_file():
        return encode_text(captions, args.device)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        row = {text: k for k, text in enumerate(json.loads(f.metadata()["captions"]))}
        states = f.get_tensor("states").float()
    missing = [text for text in captions if text not in row]
    if missing:
        raise KeyError(f"{path} has no states for {missing[:3]}: run the 'captions' stage again with these objects")
    return states[[row[text] for text in captions]]


# -- stage inputs and outputs --------------------------------------------------------------------------------


def object_split(split: np.ndarray, names: list[str], objects: Path | None) -> np.ndarray:
    """``split`` restricted to the train objects of the JSON list ``objects`` (:func:`subset_split`)."""
    if objects is None:
        return split
    try:
        return subset_split(split, names, json.loads(Path(objects).read_text()))
    except ValueError as error:
        raise ValueError(f"{objects}: {error}") from None


def stage_output(args: argparse.Namespace, name: str, stage: str) -> Path:
    """``args.work / name``, which the ``stage`` stage writes; a ``FileNotFoundError`` saying to run that stage
    (with the same ``--work``) when it is missing, before any compute."""
    path = args.work / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run the {stage!r} stage first "
            f"(python scripts/train_video_model.py {stage} --work {args.work})"
        )
    return path


def latent_statistics(args: argparse.Namespace) -> dict[str, list[float]]:
    """The clip latents' per-channel ``latents_mean`` and ``latents_std``, as the ``encode`` stage stored them in
    ``encoded.safetensors``'s metadata (see :func:`stage_output` for a missing file)."""
    from safetensors import safe_open

    with safe_open(stage_output(args, "encoded.safetensors", "encode"), "pt") as f:
        metadata = f.metadata()
    return {key: json.loads(metadata[key]) for key in ("latents_mean", "latents_std")}
