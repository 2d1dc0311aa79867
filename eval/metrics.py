"""Quality metrics, in a registry; each result names exactly what it computed.

==========  ============================================================================================
key         results
==========  ============================================================================================
``psnr``    ``PSNR``: mean per-image PSNR (dB) against the full-compute image with the same prompt and seed
``ssim``    ``SSIM``: mean SSIM against the same full-compute images
``lpips``   ``LPIPS-<net>``: torchmetrics LPIPS (needs torchvision and the backbone's ImageNet weights)
``fid``     ``FID-<extractor>`` and ``KID-<extractor>``: Inception-V3 where its weights are on disk, else the
            offline EfficientNet-Lite0 features of :mod:`accel.eval.fid` (the two are not comparable)
``clip``    ``CLIP-score-<model>/<weights>`` (:mod:`accel.eval.clip_score`) where open-clip weights are on
            disk (a given checkpoint, or open-clip's cache), else ``alignment-<encoders>`` from the bundled
            offline scorer of :mod:`accel.eval.alignment`
``motion``  ``motion-accuracy`` (video only): how often the motion classifier of :mod:`accel.eval.motion`
            reads each clip's motion as its prompt says; unavailable while that module is not installed
==========  ============================================================================================

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


def _floats(images: torch.Tensor) -> torch.Tensor:
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


def _per_sample_result(values: torch.Tensor, *, better: str, computed: str, **details) -> dict:
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


def _per_clip(per_frame: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """``(N * F,)`` per-frame values -> ``(N,)`` each clip's mean over its frames."""
    return per_frame.reshape(len(inputs.images), inputs.frames).mean(dim=1)


@register_metric("psnr")
def psnr_metric(suite: MetricSuite, inputs: MetricInputs) -> dict[str, dict]:
    """PSNR against full compute: per image, or per clip averaged over its frames."""
    if inputs.frames is not None:
        per_frame = psnr(_floats(inputs.frame_images), _floats(inputs.frame_reference))
        per_clip = _per_clip(per_frame, inputs)
        computed = (
            f"mean over {len(per_clip)} clips of the clip's PSNR (dB, 8-bit frames) against the full-compute clip with "
            f"the same prompt and seed, frame by frame, averaged over its {inputs.frames} frames; identical frames "
            f"count as {PSNR_CAP_DB:g} dB"
        )
        return {"PSNR": _per_sample_result(per_clip, better="higher", computed=computed)}
    per_image = psnr(_floats(inputs.images), _floats(inputs.reference))
    computed = (
        f"mean over {len(per_image)} images of PSNR (dB, 8-bit images) against the full-compute image with the same "
        f"prompt and seed; identical images count as {PSNR_CAP_DB:g} dB"
    )
    return {"PSNR": _per_sample_result(per_image, better="higher", computed=computed)}


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
        frames, reference = _floats(inputs.frame_images).double(), _floats(inputs.frame_reference).double()
        per_frame = structural_similarity_index_measure(frames, reference, data_range=1.0, reduction="none")
        per_clip = _per_clip(per_frame, inputs).float()
        return {"SSIM": _per_sample_result(per_clip, better="higher", computed=computed)}
    per_image = structural_similarity_index_measure(
        _floats(inputs.images), _floats(inputs.reference), data_range=1.0, reduction="none"
    )
    return {"SSIM": _per_sample_result(per_image, better="higher", computed=computed)}


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
    net = suite.weights.lpips_net
    name = f"LPIPS-{net}"
    computed = (
        f"mean LPIPS ({net} backbone, torchmetrics) over {inputs.samples()} against the full-compute ones, same "
        "prompts and seeds"
    )
    try:
        model = suite.cached("lpips", lambda: _lpips_model(net))
        with torch.no_grad():
            value = model(_floats(inputs.frame_images), _floats(inputs.frame_reference))
    except (ImportError, FileNotFoundError, RuntimeError, ValueError) as error:
        return {name: unavailable("lower", computed, str(error))}
    return {name: result(value, better="lower", computed=computed)}


def _feature_extractor(weights: MetricWeights) -> tuple[torch.nn.Module, str | None]:
    """Inception-V3 where possible, else EfficientNet-Lite0 with the reason it fell back."""
    from accel.eval.fid import EfficientNetLite0Features, load_inception_features

    try:
        return load_inception_features(weights.inception, download=weights.download), None
    except (ModuleNotFoundError, FileNotFoundError) as error:
        if weights.inception is not None:
            raise
        reason = f"Inception-V3 unavailable ({error}); --weights-inception PATH to use it"
        return EfficientNetLite0Features(), reason


@register_metric("fid")
def fid(suite: MetricSuite, inputs: MetricInputs) -> dict[str, dict]:
    try:
        from accel.eval.fid import FidKidConfig, extract_features, fid_kid_from_features

        feature, fallback = suite.cached("fid-feature", lambda: _feature_extractor(suite.weights))
    except (ImportError, FileNotFoundError, OSError) as error:
        if isinstance(error, FileNotFoundError) and suite.weights.inception is not None:
            raise
        reason = f"no FID feature extractor: {error} ({EVAL_EXTRA})"
        return {"FID": unavailable("lower", "FID", reason), "KID": unavailable("lower", "KID", reason)}
    suffix = feature.metric_suffix
    real = suite.real if suite.real is not None else inputs.frame_reference
    real_features = suite.cached("fid-real", lambda: extract_features(real, feature))
    fake_features = extract_features(inputs.frame_images, feature)
    what = f"between this method's {inputs.samples()} and {suite.real_label} ({len(real_features)} images)"
    caveat = "biased upwards with few images: compare only at equal image counts (within one report); prefer KID"
    paired = suite.real is None  # the full-compute images of the same prompts and seeds
    stand_in = {"fallback": fallback, "stand_in": f"FID-{suffix} instead of Inception-V3: {fallback}"}
    notes = {"extractor": suffix, "note": caveat, "paired": paired, **(stand_in if fallback else {})}
    try:
        values = fid_kid_from_features(real_features, fake_features, suffix, FidKidConfig(), paired=paired)
    except (ValueError, ImportError) as error:
        return {
            f"FID-{suffix}": unavailable("lower", f"FID {what}", str(error)),
            f"KID-{suffix}": unavailable("lower", f"KID {what}", str(error)),
        }
    estimator = "unbiased over pairs i != j, the same prompt and seed" if paired else "unbiased two-sample"
    kid_what = f"KID ({estimator}; mean of {FidKidConfig().kid_subsets} subsets of {values['kid_subset_size']}) {what}"
    fid_se = values[f"FID-{suffix}-se"]
    kid_std = values[f"KID-{suffix}-std"]
    return {
        f"FID-{suffix}": result(values[f"FID-{suffix}"], better="lower", computed=f"FID {what}", se=fid_se, **notes),
        f"KID-{suffix}": result(
            values[f"KID-{suffix}"], better="lower", computed=kid_what, std=kid_std, se=kid_std, **notes
        ),
    }


def load_prompt_scorer(weights: MetricWeights) -> tuple[object, str | None]:
    """open-clip's CLIP score where its weights are on disk, else the bundled alignment scorer and why."""
    try:
        from accel.eval.clip_score import load_clip_scorer

        try:
            return load_clip_scorer(weights.clip_model, checkpoint_path=weights.clip), None
        except FileNotFoundError:  # not in open-clip's cache
            if weights.clip is not None or not weights.download:
                raise
        try:
            return load_clip_scorer(weights.clip_model, allow_download=True), None
        except Exception as error:  # hub and network errors come in many types
            raise FileNotFoundError(f"not on disk, and downloading it failed ({_first_line(error)})") from error
    except (ImportError, FileNotFoundError, ValueError) as error:
        if weights.clip is not None:
            raise
        fallback = f"CLIP score unavailable ({error}); --weights-clip PATH points at a local open-clip checkpoint"
    from accel.eval.alignment import load_alignment_scorer

    return load_alignment_scorer(), fallback


@register_metric("clip")
def clip(suite: MetricSuite, inputs: MetricInputs) -> dict[str, dict]:
    try:
        scorer, fallback = suite.cached("clip", lambda: load_prompt_scorer(suite.weights))
    except (ImportError, FileNotFoundError, OSError) as error:
        if suite.weights.clip is not None:
            raise
        reason = f"neither CLIP score nor the bundled alignment scorer is available: {error}"
        return {"alignment": unavailable("higher", "prompt-image alignment", reason)}
    scores = torch.as_tensor(scorer.score(_floats(inputs.frame_images), inputs.frame_prompts)).float()
    name = getattr(scorer, "metric_name", "alignment")
    if inputs.frames is not None:
        scores = _per_clip(scores, inputs)
    if fallback is None:
        computed = f"mean CLIP score over {inputs.samples()}, max(100 cos, 0), open-clip {name} (Hessel et al. 2021)"
        return {name: _per_sample_result(scores, better="higher", computed=computed)}
    computed = (
        f"mean prompt-image alignment score over {inputs.samples()} of the bundled offline scorer {name} "
        "(accel.eval.alignment; "
        "comparable with itself only, not with CLIP scores)"
    )
    stand_in = f"{name} instead of CLIP score: {fallback}"
    return {name: _per_sample_result(scores, better="higher", computed=computed, note=fallback, stand_in=stand_in)}


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def stand_in_note(results: dict) -> str:
    """One sentence naming the offline stand-ins that scored in place of Inception-V3 FID and CLIP score, and
    why (each metric result's ``stand_in``), for a report's first lines; "" when the real scorers ran."""
    found = {}
    for trial in results.get("trials", []):
        for name, value in trial.get("metrics", {}).items():
            if isinstance(value, dict) and value.get("stand_in"):
                found.setdefault(name, value["stand_in"])
    if not found:
        return ""
    notes = dict.fromkeys(found.values())  # FID and KID share one stand-in and one reason: said once
    return "Offline stand-in scorers, not comparable with published numbers: " + "; ".join(notes)


MOTION_NAME = "motion-accuracy"


@register_metric("motion", media=("video",))
def motion(suite: MetricSuite, inputs: MetricInputs) -> dict[str, dict]:
    """How often the motion classifier of :mod:`accel.eval.motion` reads each clip's motion as its prompt says."""
    computed = (
        f"fraction of {len(inputs.images)} clips whose motion the classifier of accel.eval.motion reads as the one "
        "their prompt names"
    )
    if inputs.frames is None:
        return {MOTION_NAME: unavailable("higher", computed, "motion scores video clips; these are images")}
    try:
        from accel.eval.motion import load_motion_scorer, motion_accuracy
    except ImportError as error:
        reason = f"accel.eval.motion (the motion classifier) is not importable in this installation: {error}"
        return {MOTION_NAME: unavailable("higher", computed, reason)}
    try:
        scorer = suite.cached("motion", load_motion_scorer)
        values = motion_accuracy(scorer, _floats(inputs.images), list(inputs.prompts))
    except (ImportError, FileNotFoundError, OSError, RuntimeError, ValueError) as error:
        reason = f"the motion classifier of accel.eval.motion could not score these clips: {error}"
        return {MOTION_NAME: unavailable("higher", computed, reason)}
    scalars = (int, float, str)
    details = {k: v for k, v in values.items() if k != "accuracy" and isinstance(v, scalars) and v == v}  # no NaN
    if values.get("accuracy") is None:
        reason = f"none of the {len(inputs.prompts)} prompts names a motion the classifier knows ({details})"
        return {MOTION_NAME: unavailable("higher", computed, reason)}
    return {MOTION_NAME: result(values["accuracy"], better="higher", computed=computed, **details)}
