"""``python -m accel.bench model --video``: is the bundled video model trained, and do its clips move as told?

Prompts are captions of held-out object/motion pairs (``heldout`` in ``data/emoji/clip_split.json``: objects
and motions both seen in training, never together); a model trained on some objects only (``objects`` in its
``training.json``) or ``--objects`` scores those objects' held-out pairs. For ``--samples`` prompts (going round
the pairs again where there are fewer) the run generates one clip each with the trained transformer and with a
freshly initialised one (``WanTransformer3DModel.from_config``, seed 0), then prints:

* per-frame FID-EffNetLite0 and KID-EffNetLite0 of ``--frames-per-clip`` evenly spaced frames of every clip
  against the same frames of ``--real-clips`` rendered clips of held-out pairs (``scripts/render_clips.py``);
  two reference rows bracket them: ``--samples`` other rendered held-out clips (other seeds) as they are
  (``rendered``: the floor a perfect model reaches at this sample count) and passed through the pipeline's
  autoencoder, encoded and decoded (``autoencoded``: the best a transformer decoded by this VAE can reach);
* motion accuracy (:mod:`accel.eval.motion`): how often the motion classifier finds the motion each clip's
  caption names, for both models, against chance (1/13), and on the rendered clips themselves;
* the alignment scorer's mean per-frame score of trained clips against their own prompt vs a shuffled one;
* seconds per denoising step at batch 1 with classifier-free guidance (a whole call, text encoding and VAE
  decoding included, divided by its steps; median of repeats);
* tokens per clip, from the pipeline's configs (latent frames x latent rows / patch x latent columns / patch).

The final JSON line carries ``targets``: the trained FID below half the untrained one, motion accuracy at
least twice chance, and at least 512 tokens per clip. FID from a few hundred frames is strongly biased (see
``accel.eval.fid``): compare the two models at equal counts, and read KID beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from tqdm import tqdm

from accel.bench.model import untrained_copy
from accel.eval.config import RUNTIME_FIELD, add_config_arguments, config_from_args
from accel.eval.generation import generate_in_batches
from accel.eval.runtime import RuntimeConfig
from accel.eval.timing import timed
from accel.pipelines.video import DEFAULT_VIDEO_CALL_KWARGS, DEFAULT_VIDEO_MODEL_DIR, load_default_video_pipeline

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
RENDER_SCRIPT = ROOT / "scripts" / "render_clips.py"
TIMING_REPEATS = 2


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class VideoBenchConfig:
    """Settings of the video model benchmark; every field is a flag (``--real-clips``, ``--device``, ...)."""

    samples: int = field(default=64, metadata=_help("clips per model, one per held-out pair (round again if fewer)"))
    steps: int = field(default=20, metadata=_help("denoising steps per clip"))
    batch: int = field(default=8, metadata=_help("clips per pipeline call"))
    real_clips: int = field(default=128, metadata=_help("rendered held-out clips the frames are compared with"))
    frames_per_clip: int = field(default=5, metadata=_help("evenly spaced frames per clip scored for FID/KID"))
    seed: int = field(default=0, metadata=_help("seed of the prompt draw; clip i is generated with seed + i"))
    model: str | None = field(default=None, metadata=_help("video pipeline folder; omitted: the bundled model"))
    motion_weights: str | None = field(default=None, metadata=_help("motion classifier; omitted: the shipped one"))
    objects: str | None = field(
        default=None, metadata=_help("JSON list of train objects whose held-out pairs are scored; omitted: the model's")
    )
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, metadata=RUNTIME_FIELD)

    def __post_init__(self) -> None:
        frames = DEFAULT_VIDEO_CALL_KWARGS["num_frames"]
        for name, low in (("samples", 2), ("steps", 1), ("batch", 1), ("real_clips", 2), ("frames_per_clip", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= {low}, got {value!r}")
        if self.frames_per_clip > frames:
            raise ValueError(
                f"--frames-per-clip must be at most {frames} (frames per clip), got {self.frames_per_clip}"
            )
        for name, kind in (("model", "folder"), ("motion_weights", "file"), ("objects", "file")):
            path = getattr(self, name)
            if path is None:
                continue
            if not Path(path).exists():
                raise ValueError(f"--{name.replace('_', '-')} {path} does not exist")
            if Path(path).is_dir() != (kind == "folder"):
                raise ValueError(f"--{name.replace('_', '-')} {path} is not a {kind}")


# -- data ----------------------------------------------------------------------------------------------------


def load_render_clips(path: Path = RENDER_SCRIPT) -> ModuleType:
    """``scripts/render_clips.py`` as a module (it needs the repository's ``data/emoji``)."""
    if not path.is_file():
        raise FileNotFoundError(f"clip renderer not found at {path}; run the video benchmark from a repository clone")
    module = sys.modules.get("render_clips")
    if module is None or Path(module.__file__).resolve() != path.resolve():
        spec = importlib.util.spec_from_file_location("render_clips", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["render_clips"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    if not module.EMOJI.is_file():
        raise FileNotFoundError(f"emoji data set not found at {module.EMOJI}; run from a clone of the repository")
    return module


@dataclass(frozen=True)
class HeldOutData:
    """What the benchmark compares against: generation prompts, and rendered clips with their captions."""

    prompts: list[str]
    real_clips: torch.Tensor  # (R, F, 3, H, W) float in [0, 1]
    real_captions: list[str]
    other_clips: torch.Tensor  # (samples, F, 3, H, W): other rendered held-out clips, for the reference rows
    pairs: int  # held-out object/motion pairs the prompts and clips are drawn from


def trained_objects(model: str | None, objects: str | None = None) -> list[str] | None:
    """The train objects to score: the JSON list in the file ``objects`` if given, else those a video pipeline
    folder's training run was restricted to (``objects`` in its ``training.json``, written by
    ``scripts/train_video_model.py export --objects``); None: all of them.

    Raises:
        ValueError: the file is not JSON, or the list is not a non-empty list of object names (strings).
    """
    if objects is not None:
        return _object_names(_read_json(Path(objects)), objects)
    summary = Path(model or DEFAULT_VIDEO_MODEL_DIR) / "training.json"
    if not summary.is_file():
        return None
    data = _read_json(summary)
    names = data.get("objects") if isinstance(data, dict) else None
    return None if names is None else _object_names(names, f"{summary}'s 'objects'")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def _object_names(names, where) -> list[str]:
    """``names`` if it is a non-empty list of non-empty strings; else a ValueError naming ``where`` it came from."""
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f'{where} must be a non-empty JSON list of object names such as ["red apple", "ghost"], '
            f"got {json.dumps(names)[:80]}"
        )
    return names


def held_out_data(config: VideoBenchConfig, render_clips: ModuleType, objects: list[str] | None = None) -> HeldOutData:
    """``config.samples`` held-out captions and ``config.real_clips`` rendered held-out clips (seeded draws) of
    the held-out pairs of ``objects`` (all train objects when None). Where there are fewer pairs than clips the
    draws go round the pairs again: every pair is prompted about equally often, and its clips differ in seed."""
    images, names, split = render_clips.load_emoji()
    split = render_clips.subset_split(split, names, objects)
    pairs = render_clips.split_pairs(split)["heldout"]
    if len(pairs) < 2:
        raise ValueError(f"the objects give {len(pairs)} held-out pair(s); the benchmark needs at least 2")
    rng = np.random.default_rng(config.seed)
    order = itertools.cycle([pairs[k] for k in rng.permutation(len(pairs))])
    prompts = [render_clips.caption(names[i], motion) for i, motion in itertools.islice(order, config.samples)]

    def draw(count: int, seed: int) -> list:  # rendered clips' specs: each pair's clips get their own seeds
        specs = render_clips.clip_specs(split, "heldout", -(-count // len(pairs)), seed=seed)
        return [specs[k] for k in rng.permutation(len(specs))[:count]]

    def render(chosen) -> torch.Tensor:  # (N, F, 3, H, W) float in [0, 1]
        rendered = np.stack([render_clips.render_clip(images[s.index], s.motion, s.seed) for s in chosen])
        return torch.from_numpy(rendered).permute(0, 1, 4, 2, 3).float() / 255

    real_specs = draw(config.real_clips, config.seed + 1)
    other_specs = draw(config.samples, config.seed + 2)  # other motions' draws and seeds
    captions = [render_clips.caption(names[s.index], s.motion) for s in real_specs]
    return HeldOutData(prompts, render(real_specs), captions, render(other_specs), len(pairs))


# -- the model -----------------------------------------------------------------------------------------------


def tokens_per_clip(pipe, call_kwargs: dict = DEFAULT_VIDEO_CALL_KWARGS) -> int:
    """Transformer tokens of one clip: latent frames x (latent height / patch) x (latent width / patch)."""
    vae, transformer = pipe.vae.config, pipe.transformer.config
    latent_frames = (call_kwargs["num_frames"] - 1) // vae.scale_factor_temporal + 1
    latent_height = call_kwargs["height"] // vae.scale_factor_spatial
    latent_width = call_kwargs["width"] // vae.scale_factor_spatial
    patch_frames, patch_height, patch_width = transformer.patch_size
    return latent_frames // patch_frames * (latent_height // patch_height) * (latent_width // patch_width)


def generate_clips(pipe, prompts: list[str], steps: int, batch: int, seed: int = 0) -> torch.Tensor:
    """Clips ``(N, F, 3, H, W)`` float in [0, 1], one per prompt, clip ``i`` seeded with ``seed + i``."""
    kwargs = {"output_type": "pt", **DEFAULT_VIDEO_CALL_KWARGS}
    return generate_in_batches(pipe, prompts, steps, batch, kwargs, seed, desc="generating clips")


def seconds_per_step(pipe, steps: int, repeats: int = TIMING_REPEATS) -> float:
    """Median wall-clock seconds per step of one clip at batch 1 with CFG (whole call / steps; warm-up first)."""
    times = []
    for index in range(repeats + 1):
        _, seconds = timed(partial(generate_clips, pipe, ["red apple sliding to the right"], steps, 1, index))
        if index:
            times.append(seconds / steps)
    return float(np.median(times))


@torch.no_grad()
def autoencoded(vae, clips: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """``clips`` ``(N, F, 3, H, W)`` in [0, 1] encoded (posterior mode) and decoded by ``vae``, same layout."""
    parameter = next(vae.parameters())
    out = []
    for start in range(0, len(clips), batch):
        video = clips[start : start + batch].permute(0, 2, 1, 3, 4) * 2 - 1  # (B, 3, F, H, W) in [-1, 1]
        video = video.to(parameter.device, parameter.dtype)
        decoded = vae.decode(vae.encode(video).latent_dist.mode()).sample
        out.append(((decoded.float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4))
    return torch.cat(out)


# -- metrics -------------------------------------------------------------------------------------------------


def frame_subset(clips: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` evenly spaced frames of every clip, ``(N, F, 3, H, W)`` -> ``(N * count, 3, H, W)``."""
    chosen = torch.from_numpy(np.linspace(0, clips.shape[1] - 1, count).round().astype(np.int64))
    return clips[:, chosen].flatten(0, 1)


def frame_features(scorer, clips: torch.Tensor, count: int) -> torch.Tensor:
    """The alignment scorer's frozen EfficientNet-Lite0 features of ``count`` frames per clip,
    ``(N * count, taps + 1280)``; the last 1280 columns are the pooled head, the FID-EffNetLite0 features."""
    frames = frame_subset(clips, count)
    chunks = [scorer.frozen_image_features(frames[i : i + 64]) for i in tqdm(range(0, len(frames), 64), leave=False)]
    return torch.cat(chunks).double().cpu()


def other_prompts(prompts: list[str]) -> list[str]:
    """For each prompt, another one of the list: the distinct prompts, in order of first appearance, shifted by
    half their number (prompts that repeat, as when the draws go round the held-out pairs, never meet themselves)."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < 2:
        raise ValueError("a shuffled prompt needs at least 2 distinct prompts")
    shift = {p: distinct[(i + len(distinct) // 2) % len(distinct)] for i, p in enumerate(distinct)}
    return [shift[p] for p in prompts]


def alignment_scores(scorer, features: torch.Tensor, prompts: list[str], count: int) -> dict[str, float]:
    """Mean per-frame alignment of generated frames with their own prompt and with another one
    (:func:`other_prompts`)."""
    shuffled = other_prompts(prompts)
    with torch.no_grad():
        images = scorer.heads.embed_image_features(features.float())  # (N * count, 384)
        own = scorer.embed_prompts(prompts).repeat_interleave(count, dim=0)
        other = scorer.embed_prompts(shuffled).repeat_interleave(count, dim=0)
    return {
        "score_matched": float(100 * (images * own).sum(-1).mean()),
        "score_shuffled": float(100 * (images * other).sum(-1).mean()),
    }


def score(
    config: VideoBenchConfig,
    data: HeldOutData,
    trained: torch.Tensor,
    untrained: torch.Tensor,
    references: dict[str, torch.Tensor] | None = None,
) -> dict:
    """FID/KID, motion accuracies and alignment scores of the two models' clips, and FID/KID of the
    ``references`` rows (``{"rendered": clips, "autoencoded": clips}``; see the module docstring)."""
    from accel.eval.alignment import load_alignment_scorer
    from accel.eval.efficientnet_lite import FEATURE_DIM
    from accel.eval.fid import FidKidConfig, fid_kid_from_features
    from accel.eval.motion import load_motion_scorer, motion_accuracy

    motion = load_motion_scorer(config.motion_weights)
    result = {
        "motion_accuracy": motion_accuracy(motion, trained, data.prompts)["accuracy"],
        "motion_accuracy_untrained": motion_accuracy(motion, untrained, data.prompts)["accuracy"],
        "motion_accuracy_real": motion_accuracy(motion, data.real_clips, data.real_captions)["accuracy"],
        "motion_chance": 1 / len(motion.motion_names),
    }
    scorer = load_alignment_scorer()
    count = config.frames_per_clip
    logger.info("frame features: %d real, 2 x %d generated", len(data.real_clips) * count, len(trained) * count)
    real = frame_features(scorer, data.real_clips, count)[:, -FEATURE_DIM:]
    trained_features = frame_features(scorer, trained, count)
    rows = {"trained": trained_features, "untrained": frame_features(scorer, untrained, count)}
    rows.update({name: frame_features(scorer, clips, count) for name, clips in (references or {}).items()})
    for name, features in rows.items():
        metrics = fid_kid_from_features(real, features[:, -FEATURE_DIM:], "EffNetLite0", FidKidConfig())
        result[f"fid_{name}"] = metrics["FID-EffNetLite0"]
        result[f"kid_{name}"] = metrics["KID-EffNetLite0"]
        result[f"kid_{name}_std"] = metrics["KID-EffNetLite0-std"]
    return {**result, **alignment_scores(scorer, trained_features, data.prompts, count)}


def targets(result: dict) -> dict[str, bool]:
    """The benchmark's pass/fail lines."""
    accuracy = result["motion_accuracy"]
    return {
        "fid_trained_below_half_untrained": result["fid_trained"] < 0.5 * result["fid_untrained"],
        "motion_accuracy_at_least_twice_chance": accuracy is not None and accuracy >= 2 * result["motion_chance"],
        "tokens_per_clip_at_least_512": result["tokens_per_clip"] >= 512,
    }


def print_table(config: VideoBenchConfig, result: dict, real_clips: int, pairs: int) -> None:
    """The human-readable summary printed before the JSON line."""
    count = config.frames_per_clip
    print(
        f"default video model, {config.samples} clips of {config.steps} steps per model ({pairs} held-out pairs), "
        f"{count} frames each vs {real_clips * count} frames of {real_clips} rendered held-out clips; "
        f"{result['tokens_per_clip']} tokens per clip"
    )
    print(f"{'':<12}{'FID-EffNetLite0':>17}{'KID-EffNetLite0':>17}{'motion accuracy':>17}")
    for name, suffix in (("trained", ""), ("untrained", "_untrained")):
        kid = f"{result[f'kid_{name}']:.4f}+-{result[f'kid_{name}_std']:.4f}"
        print(f"{name:<12}{result[f'fid_{name}']:>17.1f}{kid:>17}{result[f'motion_accuracy{suffix}']:>17.3f}")
    for name in ("rendered", "autoencoded"):
        fid, kid = "", ""
        if f"fid_{name}" in result:
            fid, kid = f"{result[f'fid_{name}']:.1f}", f"{result[f'kid_{name}']:.4f}+-{result[f'kid_{name}_std']:.4f}"
        motion = f"{result['motion_accuracy_real']:.3f}" if name == "rendered" else ""
        print(f"{name:<12}{fid:>17}{kid:>17}{motion:>17}")
    print(
        f"(rendered: FID/KID of {config.samples} other rendered held-out clips, motion accuracy of the "
        f"{real_clips} reference clips; autoencoded: the same {config.samples} clips encoded and decoded by the VAE)"
    )
    print(f"motion chance: {result['motion_chance']:.3f} (1 / {round(1 / result['motion_chance'])} motions)")
    print(
        "alignment score of generated frames: "
        f"own prompt {result['score_matched']:.1f}, shuffled {result['score_shuffled']:.1f}"
    )
    print(f"seconds per step (batch 1, CFG, {torch.get_num_threads()} threads): {result['seconds_per_step']:.3f}")
    print("targets: " + ", ".join(f"{name} {'yes' if met else 'NO'}" for name, met in result["targets"].items()))


def _rounded(result: dict) -> dict:
    digits = {"fid": 2, "kid": 4, "seconds_per_step": 4}
    return {
        key: round(value, next((d for prefix, d in digits.items() if key.startswith(prefix)), 3))
        if isinstance(value, float)
        else value
        for key, value in result.items()
    }


def run(argv: list[str]) -> dict:
    """Measure and print; return the headline numbers (the JSON line of ``python -m accel.bench model --video``)."""
    parser = argparse.ArgumentParser(prog="python -m accel.bench model --video", description=__doc__.splitlines()[0])
    add_config_arguments(parser, VideoBenchConfig)
    config = config_from_args(parser.parse_args(argv), cls=VideoBenchConfig)
    device = config.runtime.check()
    data = held_out_data(config, load_render_clips(), trained_objects(config.model, config.objects))
    from accel.eval.motion import load_motion_scorer

    load_motion_scorer(config.motion_weights)  # fails now, not after an hour of generation
    pipe = load_default_video_pipeline(config.model, torch_dtype=config.runtime.torch_dtype, device=str(device))
    config.runtime.compile_pipeline(pipe)
    pipe.set_progress_bar_config(disable=True)
    logger.info("generating %d clips of %d steps with each model", config.samples, config.steps)
    trained = generate_clips(pipe, data.prompts, config.steps, config.batch, config.seed)
    untrained = generate_clips(
        untrained_copy(pipe, config.runtime), data.prompts, config.steps, config.batch, config.seed
    )
    references = {"rendered": data.other_clips, "autoencoded": autoencoded(pipe.vae, data.other_clips, config.batch)}
    result = {"tokens_per_clip": tokens_per_clip(pipe), **score(config, data, trained, untrained, references)}
    result["seconds_per_step"] = seconds_per_step(pipe, config.steps)
    result = {**_rounded(result), "targets": targets(result)}
    print_table(config, result, len(data.real_clips), data.pairs)
    return {
        **result,
        "samples": config.samples,
        "steps": config.steps,
        "real_clips": config.real_clips,
        "held_out_pairs": data.pairs,
        "frames_per_clip": config.frames_per_clip,
        "runtime": asdict(config.runtime),
    }
