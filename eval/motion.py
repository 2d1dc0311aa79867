"""Which way does a clip move? A small classifier of the 13 motions of the bundled video model's clips.

The bundled video model (:mod:`accel.pipelines.video`) is trained on rendered clips of one emoji moving one of
13 ways, captioned ``"red apple sliding to the right"``. :class:`MotionScorer` tells those motions apart, so a
generated clip can be checked against the motion its prompt names (:func:`motion_accuracy`).

Architecture (early fusion, about 0.2M parameters): every frame is reduced to an "ink" plane (``1 - min(R, G,
B)``: 0 on white, high on any saturated or dark colour, so the object's colour does not matter), resized to
32 x 32; the 17 ink planes, their 16 differences between neighbouring frames and two coordinate planes are
stacked as 35 channels and go through four 3 x 3 convolutions (BatchNorm, ReLU, three of them with stride 2),
global average pooling and a linear layer to one logit per motion.

``scripts/train_motion_classifier.py`` trains it on rendered clips of the training split (light blur, noise
and colour augmentation, so that blurry generated clips are read too) and ships it as
``weights/motion_classifier.safetensors`` inside this package. The metadata holds the config (versioned JSON,
the motion names and their caption phrases included, so nothing outside the package is needed) and the
accuracy on held-out rendered clips.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "motion_classifier.safetensors"
CONFIG_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class MotionClassifierConfig:
    """Shape of the classifier and the motions it knows.

    Attributes:
        motion_names: Motion names in label order (``"slide_right"``, ...).
        motion_phrases: Their caption phrases, same order (``"sliding to the right"``, ...).
        frames: Frames per clip.
        size: Side of the square resolution the ink planes are resized to.
        widths: Output channels of the four convolutions.
    """

    motion_names: tuple[str, ...]
    motion_phrases: tuple[str, ...]
    frames: int = 17
    size: int = 32
    widths: tuple[int, ...] = (48, 48, 96, 128)

    def __post_init__(self) -> None:
        if len(self.motion_names) < 2 or len(self.motion_names) != len(self.motion_phrases):
            raise ValueError(
                f"need at least 2 motions and one phrase per motion, got {len(self.motion_names)} names "
                f"and {len(self.motion_phrases)} phrases"
            )
        if len(set(self.motion_names)) != len(self.motion_names) or len(set(self.motion_phrases)) != len(
            self.motion_phrases
        ):
            raise ValueError("motion names and phrases must be unique")
        if not isinstance(self.frames, int) or self.frames < 2:
            raise ValueError(f"frames must be an int >= 2, got {self.frames!r}")
        if not isinstance(self.size, int) or self.size < 16 or self.size % 8:
            raise ValueError(f"size must be a multiple of 8, at least 16, got {self.size!r}")
        if len(self.widths) != 4 or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"widths must be 4 positive ints, got {self.widths!r}")

    @property
    def in_channels(self) -> int:
        """Input planes: ``frames`` ink planes, ``frames - 1`` differences and 2 coordinates."""
        return 2 * self.frames + 1

    def to_json(self) -> str:
        """Versioned JSON, ``{"type": "MotionClassifierConfig", "version": 1, ...fields}``."""
        return json.dumps({"type": type(self).__name__, "version": CONFIG_VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> MotionClassifierConfig:
        """Inverse of :meth:`to_json`; rejects other types and versions."""
        data = json.loads(text)
        if data.pop("type", None) != cls.__name__ or data.pop("version", None) != CONFIG_VERSION:
            raise ValueError(f"not a {cls.__name__} version {CONFIG_VERSION}: {text}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})


def check_clips(clips: torch.Tensor, frames: int) -> torch.Tensor:
    """Validate clips and return them as float32 in [0, 1].

    Args:
        clips: (N, frames, 3, H, W), float in [0, 1] or uint8 in [0, 255]; H, W at least 8.
        frames: The frame count the classifier was trained on.

    Raises:
        TypeError: not a tensor, or neither floating point nor uint8.
        ValueError: any other shape (the message says how to get there from a pipeline's ``(N, F, H, W, 3)``).
    """
    if not isinstance(clips, torch.Tensor):
        raise TypeError(f"expected clips as a torch.Tensor (N, F, 3, H, W), got {type(clips).__name__}")
    if clips.dim() != 5 or clips.shape[2] != 3 or clips.shape[1] != frames or min(clips.shape[-2:]) < 8:
        raise ValueError(
            f"expected clips of shape (N, {frames}, 3, H, W) with H, W >= 8, got {tuple(clips.shape)}; "
            "a pipeline's frames (N, F, H, W, 3) become that with .permute(0, 1, 4, 2, 3)"
        )
    if clips.dtype == torch.uint8:
        return clips.float() / 255
    if not clips.is_floating_point():
        raise TypeError(f"expected float or uint8 clips, got {clips.dtype}")
    return clips.float()


def clip_planes(clips: torch.Tensor, size: int) -> torch.Tensor:
    """The classifier's input: ink planes, their frame differences and two coordinate planes.

    Args:
        clips: (N, F, 3, H, W) float in [0, 1].
        size: Side the planes are resized to.

    Returns:
        (N, 2F + 1, size, size) float32.
    """
    n, frames, _, height, width = clips.shape
    ink = 1 - clips.amin(dim=2)  # (N, F, H, W): 0 on white
    if (height, width) != (size, size):
        ink = F.interpolate(ink, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    difference = ink[:, 1:] - ink[:, :-1]  # (N, F - 1, size, size)
    axis = torch.linspace(-1, 1, size, device=clips.device)
    coordinates = torch.stack(torch.meshgrid(axis, axis, indexing="ij")).expand(n, -1, -1, -1)  # (N, 2, s, s)
    return torch.cat([ink, difference, coordinates], dim=1)


def _conv(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MotionScorer(nn.Module):
    """The motion classifier. Build a trained one with :func:`load_motion_scorer`.

    ``forward``: (N, 2F + 1, size, size) planes (:func:`clip_planes`) -> (N, num_motions) logits;
    ``predict``: (N, F, 3, H, W) clips -> (N, num_motions) logits, in eval mode and without gradients.

    Args:
        config: Shape and motions.
        metrics: Accuracy numbers stored with the weights (informational).
    """

    def __init__(self, config: MotionClassifierConfig, metrics: dict | None = None):
        super().__init__()
        self.config = config
        self.metrics = dict(metrics or {})
        widths = config.widths
        self.body = nn.Sequential(
            _conv(config.in_channels, widths[0], 1),
            _conv(widths[0], widths[1], 2),
            _conv(widths[1], widths[2], 2),
            _conv(widths[2], widths[3], 2),
        )
        self.classifier = nn.Linear(widths[3], len(config.motion_names))

    @property
    def motion_names(self) -> tuple[str, ...]:
        """Motion names in label order."""
        return self.config.motion_names

    @property
    def motions(self) -> dict[str, str]:
        """Motion name -> caption phrase, in label order."""
        return dict(zip(self.config.motion_names, self.config.motion_phrases))

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        """(N, 2F + 1, size, size) -> (N, num_motions) logits."""
        return self.classifier(self.body(planes).mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, clips: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Motion logits of clips.

        Args:
            clips: (N, F, 3, H, W) float in [0, 1] (or uint8), F = ``config.frames``; any H, W >= 8.
            batch_size: Clips per forward pass.

        Returns:
            (N, num_motions) float32 logits on the CPU; label ``k`` is ``motion_names[k]``.
        """
        clips = check_clips(clips, self.config.frames)
        was_training = self.training
        self.eval()  # BatchNorm statistics, not the batch's
        device = self.classifier.weight.device
        chunks = [
            self(clip_planes(clips[start : start + batch_size].to(device), self.config.size)).float().cpu()
            for start in range(0, len(clips), batch_size)
        ]
        self.train(was_training)
        return torch.cat(chunks) if chunks else torch.zeros(0, len(self.motion_names))


def save_motion_scorer(scorer: MotionScorer, path: str | Path, metrics: dict | None = None) -> None:
    """Write the classifier as safetensors; config, motions (name -> phrase) and metrics go into the metadata."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in scorer.state_dict().items()}
    metadata = {
        "config": scorer.config.to_json(),
        "motions": json.dumps(scorer.motions),
        "metrics": json.dumps(metrics if metrics is not None else scorer.metrics),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(
            f"motion classifier weights not found at {path}; train them: scripts/train_motion_classifier.py"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a safetensors file ({error})") from None
    missing = sorted({"config", "motions", "metrics"} - set(metadata))
    if missing:
        raise ValueError(
            f"{path} is not a motion classifier written by save_motion_scorer (its metadata lacks {missing}); "
            "train one with scripts/train_motion_classifier.py"
        )
    return metadata


def load_motion_scorer(path: str | Path | None = None, device: str | torch.device = "cpu") -> MotionScorer:
    """The trained motion classifier, in eval mode.

    Args:
        path: Weights written by :func:`save_motion_scorer`; default: the copy shipped in ``accel.eval``.
        device: Where it runs.

    Raises:
        FileNotFoundError: no weights at ``path``.
        ValueError: the file is not safetensors, or not a classifier :func:`save_motion_scorer` wrote.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    metadata = _read_metadata(path)
    scorer = MotionScorer(MotionClassifierConfig.from_json(metadata["config"]), json.loads(metadata["metrics"]))
    scorer.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    return scorer.to(device).eval().requires_grad_(False)


@lru_cache(maxsize=8)
def _stored_motions(path: Path) -> tuple[tuple[str, str], ...]:
    return tuple(json.loads(_read_metadata(path)["motions"]).items())


def motion_of_prompt(prompt: str, motions: dict[str, str] | None = None) -> str | None:
    """The motion a caption names, by its phrase: ``"red apple sliding to the right"`` -> ``"slide_right"``.

    Phrases match whole words, case-insensitively; where several match, the longest wins.

    Args:
        prompt: A caption.
        motions: Motion name -> phrase; default: the shipped classifier's (read from its metadata).

    Returns:
        The motion name, or ``None`` when the prompt names no known motion.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"expected the prompt as a str, got {type(prompt).__name__}")
    pairs = motions.items() if motions is not None else _stored_motions(DEFAULT_WEIGHTS)
    found = [(len(phrase), name) for name, phrase in pairs if re.search(rf"\b{re.escape(phrase)}\b", prompt, re.I)]
    return max(found)[1] if found else None


def motion_accuracy(scorer: MotionScorer, clips: torch.Tensor, prompts: list[str], batch_size: int = 64) -> dict:
    """How often the classifier finds the motion each clip's prompt names.

    Clips whose prompt names no motion the classifier knows are left out (and not run).

    Args:
        scorer: A trained :class:`MotionScorer`.
        clips: (N, F, 3, H, W) float in [0, 1]; ``clips[i]`` was made for ``prompts[i]``.
        prompts: N captions.
        batch_size: Clips per forward pass.

    Returns:
        ``{"accuracy": fraction correct (None when nothing was scored), "chance": 1 / num_motions,
        "scored": clips scored, "total": N}``.
    """
    clips = check_clips(clips, scorer.config.frames)
    if len(clips) != len(prompts):
        raise ValueError(f"got {len(clips)} clips but {len(prompts)} prompts")
    labels = {name: index for index, name in enumerate(scorer.motion_names)}
    wanted = [motion_of_prompt(prompt, scorer.motions) for prompt in prompts]
    keep = [i for i, motion in enumerate(wanted) if motion is not None]
    accuracy = None
    if keep:
        predicted = scorer.predict(clips[keep], batch_size).argmax(dim=1).numpy()
        accuracy = float(np.mean(predicted == np.array([labels[wanted[i]] for i in keep])))
    return {"accuracy": accuracy, "chance": 1 / len(labels), "scored": len(keep), "total": len(prompts)}


__all__ = [
    "MotionClassifierConfig",
    "MotionScorer",
    "check_clips",
    "clip_planes",
    "load_motion_scorer",
    "motion_accuracy",
    "motion_of_prompt",
    "save_motion_scorer",
]
