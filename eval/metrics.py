"""Quality metrics, in a registry; each result names exactly what it computed.

This module holds the registry (:func:`register_metric`, :data:`METRICS`, :func:`metric_keys`), the suite that
runs it (:class:`MetricSuite`) and the pixel metrics against full compute:

==========  ============================================================================================
key         results
==========  ============================================================================================
``psnr``    ``PSNR``: mean per-image PSNR (dB) against the full-compute image with the same prompt and seed
``ssim``    ``SSIM``: mean SSIM against the same full-compute images
``lpips``   ``LPIPS-<net>``: torchmetrics LPIPS (needs torchvision and the backbone's ImageNet weights)
==========  ============================================================================================

The metrics that score with a feature network, ``fid``, ``clip`` and ``motion``, are in
:mod:`accel.eval.feature_metrics`; this module imports it at its end, so the registry holds every metric
whenever this module is imported.

Video clips ``(N, F, 3, H, W)``: PSNR and SSIM compare each clip with the full-compute clip of the same prompt
and seed, frame by frame, averaged over the frames (one value per clip, then the mean over clips); LPIPS,
FID/KID and the prompt score take every frame as an image (``N * F`` frames, each with its clip's prompt).
:data:`METRIC_MEDIA` says what each key scores; :func:`metric_keys` picks or checks the keys for a run.

All metrics read the images as saved (8-bit PNG). A result is a dict with ``value`` (None when the metric
could not be computed), ``better`` (``"higher"`` or ``"lower"``), ``computed`` (a sentence) and, when
``value`` is None, ``unavailable`` (why, and how to make it available). A weight file the user named that
does not exist raises ``FileNotFoundError`` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: PSNR of identical images is infinite; it is reported as this many dB (JSON has no infinity)
PSNR_CAP_DB = 100.0

LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


@dataclass(frozen=True, kw_only=True)
class MetricWeights:
    """Where the metrics find weight files (all optional).

    Attributes:
        inception: torch-fidelity's ``pt_inception-2015-12-05-6726825d.pth``; None: its download location.
        clip: an open-clip checkpoint file; None: open-clip's cache if it holds ``clip_model``'s OpenAI weights,
            else the bundled alignment scorer.
        clip_model: the open-clip architecture of that checkpoint.
        lpips_net: LPIPS backbone (its torchvision weights must be in ``<torch hub dir>/checkpoints``).
        download: fetch the Inception-V3 FID weights and the CLIP checkpoint when they are not on disk, as their
            libraries do (torch-fidelity into the torch hub folder, open-clip into its cache; needs network and
            the ``inception`` / ``open-clip`` extras); where that fails (offline) the bundled stand-ins score
            and the report's first lines say so. False: only weights already on disk.
    """

    inception: str | None = None
    clip: str | None = None
    clip_model: str = "ViT-B-32"
    lpips_net: str = "alex"
    download: bool = True

    def __post_init__(self):
        if not isinstance(self.download, bool):
            raise TypeError(f"download must be true or false, got {self.download!r}")
        if self.lpips_net not in LPIPS_BACKBONE_FILES:
            raise ValueError(f"lpips_net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {self.lpips_net!r}")
        for name in ("inception", "clip"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{name} weights file not found: {path}")


def result(value: float | None, *, better: str, computed: str, **details) -> dict:
    """One metric's result (see the module docstring)."""
    return {"value": None if value is None else float(value), "better": better, "computed": computed, **details}


def unavailable(better: str, computed: str, reason: str) -> dict:
    """A metric that could not be computed, and why."""
    return result(None, better=better, computed=computed, unavailable=reason)


@dataclass(frozen=True, kw_only=True)
class MetricInputs:
    """What one trial's metrics see.

    Attributes:
        images: ``(N, 3, H, W)`` uint8, the method's images; or ``(N, F, 3, H, W)`` uint8, its video clips.
        reference: the full-compute images (or clips) of the same prompts and seeds, the same shape.
        prompts: the N prompts.
    """

    images: torch.Tensor
    reference: torch.Tensor
    prompts: tuple[str, ...]

    def __post_init__(self):
        if self.images.ndim not in (4, 5) or self.images.shape[-3] != 3:
            raise ValueError(f"expected (N, 3, H, W) images or (N, F, 3, H, W) clips, got {tuple(self.images.shape)}")

    @property
    def frames(self) -> int | None:
        """Frames per clip; None for images."""
        return self.images.shape[1] if self.images.ndim == 5 else None

    @property
    def frame_images(self) -> torch.Tensor:
        """Every frame as an image, ``(N * F, 3, H, W)`` (the images themselves for images)."""
        return self.images.flatten(0, 1) if self.frames else self.images

    @property
    def frame_reference(self) -> torch.Tensor:
        """The reference's frames, ``(N * F, 3, H, W)``."""
        return self.reference.flatten(0, 1) if self.reference.ndim == 5 else self.reference

    @property
    def frame_prompts(self) -> list[str]:
        """Each frame's prompt (its clip's), ``N * F`` of them."""
        return [prompt for prompt in self.prompts for _ in range(self.frames or 1)]

    def samples(self) -> str:
        """``"4 images"`` or ``"68 frames of 4 clips"``, for the ``computed`` sentences."""
        if self.frames is None:
            return f"{len(self.images)} images"
        return f"{len(self.frame_images)} frames of {len(self.images)} clips"


MetricFn = Callable[["MetricSuite", MetricInputs], dict[str, dict]]
METRICS: dict[str, MetricFn] = {}
#: metric key -> what it scores: ``("image", "video")``, or ``("video",)`` for a video-only metric
METRIC_MEDIA: dict[str, tuple[str, ...]] = {}


def register_metric(key: str, media: tuple[str, ...] = ("image", "video")) -> Callable[[MetricFn], MetricFn]:
    """Decorator adding a metric function ``fn(suite, inputs) -> {result name: result}`` under ``key``, for the
    ``media`` it scores."""

    def decorator(fn: MetricFn) -> MetricFn:
        METRICS[key] = fn
        METRIC_MEDIA[key] = tuple(media)
        return fn

    return decorator


def metric_keys(keys: Sequence[str] | None, media: str, pipeline: str = "the pipeline") -> tuple[str, ...]:
    """The metrics of a run whose pipeline makes ``media`` (``"image"`` or ``"video"``).

    Args:
        keys: the keys asked for; None: every registered metric that scores ``media``.
        media: what the pipeline makes.
        pipeline: its name, for the error message.

    Raises:
        ValueError: an unknown key, or one that cannot score ``media`` (e.g. ``motion`` on an image pipeline).
    """
    if keys is None:
        return tuple(key for key in METRICS if media in METRIC_MEDIA[key])
    unknown = [k for k in keys if k not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
    wrong = [k for k in keys if media not in METRIC_MEDIA[k]]
    if wrong:
        raise ValueError(
            f"metrics {wrong} score {' or '.join(METRIC_MEDIA[wrong[0]])} only, but {pipeline} makes {media}s; "
            f"leave them out of --metrics (those for {media}s: {', '.join(metric_keys(None, media))})"
        )
    return tuple(keys)


class MetricSuite:
    """The chosen metrics with their models loaded once and reused across trials.

    Args:
        keys: metric keys (see :data:`METRICS`).
        weights: where to find weight files.
        real: ``(M, 3, H, W)`` uint8 reference set for FID/KID; None: the full-compute images, which must then be
            the same for every trial the suite scores (one suite per run).
        real_label: how the report names that set.
    """

    def __init__(
        self,
        keys: Sequence[str],
        weights: MetricWeights = MetricWeights(),
        real: torch.Tensor | None = None,
        real_label: str = "",
    ):
        unknown = [k for k in keys if k not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
        self.keys, self.weights, self.real = tuple(keys), weights, real
        self.real_label = real_label or "the full-compute images of the same prompts and seeds"
        self.cache: dict = {}

    def compute(self, inputs: MetricInputs, keys: Sequence[str] | None = None) -> dict[str, dict]:
        """The chosen metrics (or those of ``keys`` among them) on one trial's images."""
        results: dict[str, dict] = {}
        for key in self.keys if keys is None else [k for k in self.keys if k in keys]:
            results.update(METRICS[key](self, inputs))
        return results

    def cached(self, name: str, build: Callable[[], object]) -> object:
        """``build()`` once per suite; an exception is remembered and raised again on every later call."""
        if name not in self.cache:
            try:
                self.cache[name] = build()
            except (ImportError, FileNotFoundError, OSError, RuntimeError, ValueError) as error:
                self.cache[name] = error
        value = self.cache[name]
        if isinstance(value, Exception):
            raise value
        return value


def unit_floats(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] as float32 in [0, 1]."""
    return images.float() / 255.0


EVAL_EXTRA = "pip install 'diffusers-accel[eval]'"


def psnr(candidate: torch.Tensor, reference: torch.Tensor, peak: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per-sample PSNR in dB, capped at :data:`PSNR_CAP_DB` (identical samples).

    The one PSNR of accel: the ``psnr`` metric, the schedule search and the benchmarks all use it.

    Args:
        candidate: ``(batch, ...)``, any float or integer dtype (compared in float32).
        reference: the same shape.
        peak: the signal's peak-to-peak range, a scalar or one per sample ``(batch,)``: 1 for images in
            ``[0, 1]``, each reference sample's range for latents.

    Returns:
        ``(batch,)`` float32.
    """
    dims = tuple(range(1, reference.ndim))
    mse = (candidate.float() - reference.float()).pow(2).mean(dim=dims)
    peak = torch.as_tensor(peak, dtype=torch.float32, device=mse.device)
    return (10 * torch.log10(peak**2 / mse)).clamp(max=PSNR_CAP_DB)  # mse 0 -> inf -> the cap


def per_sample_result(values: torch.Tensor, *, better: str, computed: str, **details) -> dict:
    """A metric's mean over samples with its spread: the worst sample (``min``/``max``), the standard error of the
    mean (``se``) and every sample's value (``per_sample``, in prompt order), from which the report draws its
    noise and per-image values."""
    values = values.double().flatten()
    worst = float(values.min() if better == "higher" else values.max())
    se = float(values.std() / len(values) ** 0.5) if len(values) > 1 else 0.0
    key = "min" if better == "higher" else "max"
    return result(
        values.mean(), better=better, computed=computed, **{key: worst}, se=se, per_sample=values.tolist(), **details
    )


def clip_means(per_frame: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """``(N * F,)`` per-frame values -> ``(N,)`` each clip's mean over its frames."""
    return per_frame.reshape(len(inputs.images), inputs.frames).mean(dim=1)


@register_metric("psnr")
def psnr_metric(suite: MetricSuite, inputs: MetricInputs) -> dict[str, dict]:
    """PSNR against full compute: per image, or per clip averaged over its frames."""
    if inputs.frames is not None:
        per_frame = psnr(unit_floats(inputs.frame_images), unit_floats(inputs.frame_reference))
        per_clip = clip_means(per_frame, inputs)
        computed = (
            f"mean over {len(per_clip)} clips of the clip's PSNR (dB, 8-bit frames) against the full-compute clip with "
            f"the same prompt and seed, frame by frame, averaged over its {inputs.frames} frames; identical frames "
            f"count as {PSNR_CAP_DB:g} dB"
        )
        return {"PSNR": per_sample_result(per_clip, better="higher", computed=computed)}
    per_image = psnr(unit_floats(inputs.images), unit_floats(inputs.reference))
    computed = (
        f"mean over {len(per_image)} images of PSNR (dB, 8-bit images) against the full-compute image with the same "
        f"prompt and seed; identical images count as {PSNR_CAP_DB:g} dB"
    )
    return {"PSNR": per_sample_result(per_image, better="higher", computed=computed)}


@register_metric("ssim")
def ssim(suite: MetricSuite, inputs: MetricInputs) -> dict[str, dict]:
    """SSIM against full compute: over the images, or per clip averaged over its frames."""
    computed = "mean SSIM (torchmetrics, Gaussian 11x11) against the full-compute images, same prompts and seeds"
    if inputs.frames is not None:
        computed = (
            f"mean over {len(inputs.images)} clips of the clip's SSIM (torchmetrics, Gaussian 11x11) against the "
            f"full-compute clip with the same prompt and seed, frame by frame, averaged over its {inputs.frames} frames"
        )
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure
    except ImportError as error:
        return {"SSIM": unavailable("higher", computed, f"SSIM needs torchmetrics ({error}): {EVAL_EXTRA}")}
    if inputs.frames is not None:  # float64: in float32 identical near-white frames score 0.9995
        frames, reference = unit_floats(inputs.frame_images).double(), unit_floats(inputs.frame_reference).double()
        per_frame = structural_similarity_index_measure(frames, reference, data_range=1.0, reduction="none")
        per_clip = clip_means(per_frame, inputs).float()
        return {"SSIM": per_sample_result(per_clip, better="higher", computed=computed)}
    per_image = structural_similarity_index_measure(
        unit_floats(inputs.images), unit_floats(inputs.reference), data_range=1.0, reduction="none"
    )
    return {"SSIM": per_sample_result(per_image, better="higher", computed=computed)}


def _lpips_model(net: str):
    try:
        import torchvision  # noqa: F401
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    except ImportError as error:
        raise ImportError(f"LPIPS needs torchvision ({error}): pip install 'diffusers-accel[lpips]'") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS-{net} needs the torchvision ImageNet weights {path.name}; copy a local copy to {path} "
            f"(from https://download.pytorch.org/models/{path.name})"
        )
    return LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).eval()


@register_metric("lpips")
def lpips(suite: MetricSuite, inputs: MetricInputs) -> dict[str, dict]:
    """LPIPS against full compute over every image or frame (each frame as an image)."""
    net = suite.weights.lpips_net
    name = f"LPIPS-{net}"
    computed = (
        f"mean LPIPS ({net} backbone, torchmetrics) over {inputs.samples()} against the full-compute ones, same "
        "prompts and seeds"
    )
    try:
        model = suite.cached("lpips", lambda: _lpips_model(net))
        with torch.no_grad():
            value = model(unit_floats(inputs.frame_images), unit_floats(inputs.frame_reference))
    except (ImportError, FileNotFoundError, RuntimeError, ValueError) as error:
        return {name: unavailable("lower", computed, str(error))}
    return {name: result(value, better="lower", computed=computed)}


# The feature-network metrics register themselves with register_metric when their module is imported; importing
# it here, after everything it takes from this module is defined, puts them in METRICS (after the pixel metrics,
# in the same order as before) for everyone who imports this module. It imports this module at its top, so either
# import order works.
from accel.eval import feature_metrics as _feature_metrics  # noqa: E402, F401
