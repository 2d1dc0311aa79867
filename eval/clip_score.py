"""CLIP score through open-clip, the default alignment metric where its weights are available.

Same interface as :class:`accel.eval.alignment.AlignmentScorer`:
``score(images, prompts) -> (N,)``. Follows the CLIP-score definition
(Hessel et al. 2021, as in torchmetrics): ``max(100 x cosine, 0)``.

Nothing is downloaded unless the caller allows it: by default the weights must be
a local checkpoint file or already in open-clip's cache. Where they are not,
:func:`load_clip_scorer` raises ``FileNotFoundError`` and callers fall back to
:func:`accel.eval.alignment.load_alignment_scorer`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from accel.eval.fid import to_unit_float

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer(nn.Module):
    """An open-clip model and tokenizer with CLIP's preprocessing done on tensors.

    Args:
        model: An open-clip ``CLIP`` model (``encode_image``, ``encode_text``).
        tokenizer: The matching open-clip tokenizer (list of strings -> (N, T) token ids).
        image_size: Input side length of the visual tower.
        name: Label for results, e.g. ``"CLIP-ViT-B-32/openai"``.
    """

    def __init__(self, model: nn.Module, tokenizer, image_size: int, name: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.metric_name = f"CLIP-score-{name}"
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 or [0, 1] float -> (N, D) unit-norm."""
        x = to_unit_float(images).to(self.mean.device)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True).clamp(0, 1)
        return F.normalize(self.model.encode_image((x - self.mean) / self.std).float(), dim=-1)

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """N prompts -> (N, D) unit-norm."""
        tokens = self.tokenizer(list(prompts)).to(self.mean.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N, 3, H, W) [0, 1] float images and N prompts -> (N,) CLIP score, ``max(100 cos, 0)``."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        cosine = (self.embed_images(images) * self.embed_prompts(prompts)).sum(-1)
        return (100.0 * cosine).clamp(min=0.0)


def load_clip_scorer(
    model_name: str = "ViT-B-32",
    pretrained: str = "openai",
    *,
    checkpoint_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    allow_download: bool = False,
    device: str | torch.device = "cpu",
) -> ClipScorer:
    """An open-clip CLIP scorer, offline unless ``allow_download``.

    Args:
        model_name: open-clip architecture name.
        pretrained: open-clip pretrained tag, used when ``checkpoint_path`` is None.
        checkpoint_path: A local checkpoint file for ``model_name``; takes precedence over ``pretrained``.
        cache_dir: open-clip's download cache to look in.
        allow_download: Let open-clip fetch missing weights.
        device: Where the scorer runs.

    Raises:
        ModuleNotFoundError: open-clip is not installed (extra ``open-clip``).
        FileNotFoundError: the weights are not available offline; the message says how to provide them.
    """
    try:
        import open_clip
    except ImportError as error:
        raise ModuleNotFoundError("CLIP score needs open-clip: pip install 'diffusers-accel[open-clip]'") from error
    if checkpoint_path is not None:
        if not Path(checkpoint_path).is_file():
            raise FileNotFoundError(f"CLIP checkpoint not found: {checkpoint_path}")
        source, label = str(checkpoint_path), Path(checkpoint_path).name
    elif allow_download:
        source, label = pretrained, pretrained
    else:
        source, label = _cached_checkpoint(open_clip, model_name, pretrained, cache_dir), pretrained
    model, _, _ = open_clip.create_model_and_transforms(
        model_name, pretrained=source, cache_dir=None if cache_dir is None else str(cache_dir)
    )
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    return ClipScorer(model, open_clip.get_tokenizer(model_name), int(size), f"{model_name}/{label}").to(device)


def _cached_checkpoint(open_clip, model_name: str, pretrained: str, cache_dir: str | Path | None) -> str:
    """The local file of an open-clip Hugging Face Hub checkpoint, looked up in the cache without any download.

    Raises:
        ValueError: unknown model/tag.
        FileNotFoundError: not cached; the message says how to provide the weights.
    """
    from huggingface_hub import try_to_load_from_cache

    config = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not config:
        raise ValueError(f"unknown open-clip model/tag {model_name}/{pretrained}; see open_clip.list_pretrained()")
    repo = (config.get("hf_hub") or "").strip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if repo:
            path = try_to_load_from_cache(repo, filename, cache_dir=None if cache_dir is None else str(cache_dir))
            if isinstance(path, str) and Path(path).is_file():
                return path
    raise FileNotFoundError(
        f"open-clip weights {model_name}/{pretrained} are not in the local Hugging Face cache. Pass "
        "checkpoint_path=<local copy>, or allow_download=True where there is network access. Offline, use "
        "accel.eval.alignment.load_alignment_scorer() instead (metric alignment-EffNetLite0-MiniLM)."
    )
