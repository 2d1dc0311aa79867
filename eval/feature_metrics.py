"""The quality metrics that score with a feature network, registered in :data:`accel.eval.metrics.METRICS`.

==========  ============================================================================================
key         results
==========  ============================================================================================
``fid``     ``FID-<extractor>`` and ``KID-<extractor>``: Inception-V3 where its weights are on disk, else the
            offline EfficientNet-Lite0 features of :mod:`accel.eval.fid` (the two are not comparable)
``clip``    ``CLIP-score-<model>/<weights>`` (:mod:`accel.eval.clip_score`) where open-clip weights are on
            disk (a given checkpoint, or open-clip's cache), else ``alignment-<encoders>`` from the bundled
            offline scorer of :mod:`accel.eval.alignment`
``motion``  ``motion-accuracy`` (video only): how often the motion classifier of :mod:`accel.eval.motion`
            reads each clip's motion as its prompt says; unavailable while that module is not installed
==========  ============================================================================================

Where the real scorer's weights are missing (offline), FID/KID and the prompt score fall back to the bundled
stand-ins and their results say so (``stand_in``); :func:`stand_in_note` turns that into a report's first lines.
Results, weights and video clips follow the rules of :mod:`accel.eval.metrics`, which imports this module at its
end, so importing either registers these metrics.
"""

from __future__ import annotations

import torch

from accel.eval.metrics import (
    EVAL_EXTRA,
    MetricInputs,
    MetricSuite,
    MetricWeights,
    clip_means,
    per_sample_result,
    register_metric,
    result,
    unavailable,
    unit_floats,
)


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
    """FID and KID of every image or frame against the suite's real set, on Inception-V3 or its stand-in."""
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
    """The prompt score (CLIP score, or the bundled alignment scorer): per image, or per clip over its frames."""
    try:
        scorer, fallback = suite.cached("clip", lambda: load_prompt_scorer(suite.weights))
    except (ImportError, FileNotFoundError, OSError) as error:
        if suite.weights.clip is not None:
            raise
        reason = f"neither CLIP score nor the bundled alignment scorer is available: {error}"
        return {"alignment": unavailable("higher", "prompt-image alignment", reason)}
    scores = torch.as_tensor(scorer.score(unit_floats(inputs.frame_images), inputs.frame_prompts)).float()
    name = getattr(scorer, "metric_name", "alignment")
    if inputs.frames is not None:
        scores = clip_means(scores, inputs)
    if fallback is None:
        computed = f"mean CLIP score over {inputs.samples()}, max(100 cos, 0), open-clip {name} (Hessel et al. 2021)"
        return {name: per_sample_result(scores, better="higher", computed=computed)}
    computed = (
        f"mean prompt-image alignment score over {inputs.samples()} of the bundled offline scorer {name} "
        "(accel.eval.alignment; "
        "comparable with itself only, not with CLIP scores)"
    )
    stand_in = f"{name} instead of CLIP score: {fallback}"
    return {name: per_sample_result(scores, better="higher", computed=computed, note=fallback, stand_in=stand_in)}


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


#: the ``motion`` metric's result name
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
        values = motion_accuracy(scorer, unit_floats(inputs.images), list(inputs.prompts))
    except (ImportError, FileNotFoundError, OSError, RuntimeError, ValueError) as error:
        reason = f"the motion classifier of accel.eval.motion could not score these clips: {error}"
        return {MOTION_NAME: unavailable("higher", computed, reason)}
    scalars = (int, float, str)
    details = {k: v for k, v in values.items() if k != "accuracy" and isinstance(v, scalars) and v == v}  # no NaN
    if values.get("accuracy") is None:
        reason = f"none of the {len(inputs.prompts)} prompts names a motion the classifier knows ({details})"
        return {MOTION_NAME: unavailable("higher", computed, reason)}
    return {MOTION_NAME: result(values["accuracy"], better="higher", computed=computed, **details)}
