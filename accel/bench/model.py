"""``python -m accel.bench model``: is the bundled default model really trained, and are its scorers sound?

Prints, in one run:

* FID-EffNetLite0 and KID-EffNetLite0 of ``--samples`` generated images against the whole emoji set, for the
  trained model and for the same pipeline with a freshly initialised (untrained) transformer;
* the alignment scorer's held-out retrieval (true caption among the first 100 held-out captions, top-1/top-5)
  and its mean score of generated images against their own prompt vs a shuffled prompt;
* seconds per denoising step at batch 1 with classifier-free guidance (median of repeats).

``--video`` runs the bundled video model's benchmark instead (:mod:`accel.bench.video_model`).

FID from a few hundred images is strongly biased (see ``accel.eval.fid``): compare the two models at equal
sample counts, and read KID beside it.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch

from accel.eval.config import add_runtime_arguments, runtime_from_args
from accel.eval.generation import generate_in_batches
from accel.eval.runtime import RuntimeConfig
from accel.eval.timing import timed
from accel.pipelines.default import DEFAULT_CALL_KWARGS, DEFAULT_GUIDANCE_SCALE, load_default_pipeline

DATA_FILE = Path(__file__).resolve().parents[2] / "data" / "emoji" / "emoji64.npz"


def load_dataset(path: str | Path = DATA_FILE) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """The emoji set: uint8 images ``(N, 3, 64, 64)``, captions, and the split labels."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"emoji data set not found at {path}; run from a clone of the repository or pass --data"
        )
    data = np.load(path, allow_pickle=False)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()
    return images, [str(c) for c in data["captions"]], data["split"]


def generate(pipe, prompts: list[str], steps: int, batch: int, seed: int = 0) -> torch.Tensor:
    """Images ``(N, 3, 64, 64)`` float in [0, 1], one per prompt, sample ``i`` seeded with ``seed + i``."""
    kwargs = {"output_type": "pt", "guidance_scale": DEFAULT_GUIDANCE_SCALE, **DEFAULT_CALL_KWARGS}
    return generate_in_batches(pipe, prompts, steps, batch, kwargs, seed)


def untrained_copy(pipe, runtime: RuntimeConfig | None = None):
    """The same pipeline with its transformer re-initialised from its config (seed 0), on the trained one's
    device and dtype (and compiled if ``runtime`` says so)."""
    torch.manual_seed(0)
    transformer = type(pipe.transformer).from_config(pipe.transformer.config).eval().requires_grad_(False)
    transformer.to(pipe.transformer.device, pipe.transformer.dtype)
    untrained = copy.copy(pipe)
    untrained.register_modules(transformer=transformer)
    if runtime is not None:
        runtime.compile_pipeline(untrained)
    return untrained


def seconds_per_step(pipe, steps: int = 20, repeats: int = 3) -> float:
    """Median wall-clock seconds per denoising step of one 20-step image at batch 1, CFG on (warm-up first)."""
    times = []
    for index in range(repeats + 1):
        _, seconds = timed(partial(generate, pipe, ["red apple"], steps, batch=1, seed=index))
        if index:
            times.append(seconds / steps)
    return float(np.median(times))


def scorer_checks(images: torch.Tensor, captions: list[str], split: np.ndarray, generated, prompts) -> dict:
    """Held-out retrieval of the alignment scorer and matched-vs-shuffled scores of generated images."""
    from accel.eval.alignment import load_alignment_scorer, retrieval_accuracy

    scorer = load_alignment_scorer()
    held_out = np.flatnonzero(split == "test")[:100]
    with torch.no_grad():
        image_embeddings = scorer.embed_images(images[held_out].float() / 255)
        text_embeddings = scorer.embed_prompts([captions[i] for i in held_out])
        retrieval = retrieval_accuracy(image_embeddings, text_embeddings)
        shuffled = [prompts[(i + len(prompts) // 2) % len(prompts)] for i in range(len(prompts))]
        matched_scores = scorer.score(generated, prompts)
        shuffled_scores = scorer.score(generated, shuffled)
    return {
        "scorer_top1": retrieval["top1"],
        "scorer_top5": retrieval["top5"],
        "score_matched": float(matched_scores.mean()),
        "score_shuffled": float(shuffled_scores.mean()),
    }


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before anything loads, counts below what the run needs and paths that are not there.

    Raises:
        ValueError: ``--samples`` below 2 (FID/KID need two images a side), ``--steps`` or ``--batch`` below 1,
            ``--data`` not a file, ``--model`` not a folder.
    """
    for name, low in (("samples", 2), ("steps", 1), ("batch", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not Path(args.data).is_file():
        raise ValueError(f"--data {args.data} is not a file (the emoji set, data/emoji/emoji64.npz)")
    if args.model is not None and not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model} is not a folder")


def run(argv: list[str]) -> dict:
    """Measure and print; return the headline numbers. ``--video``: the video model's benchmark instead
    (:mod:`accel.bench.video_model`, which takes the remaining arguments)."""
    if "--video" in argv:
        from accel.bench.video_model import run as run_video

        return run_video([arg for arg in argv if arg != "--video"])
    parser = argparse.ArgumentParser(prog="python -m accel.bench model")
    parser.add_argument(
        "--video", action="store_true", help="benchmark the bundled video model instead (see --video --help)"
    )
    parser.add_argument("--samples", type=int, default=500, help="images per model (>= 2)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--batch", type=int, default=50, help="images per pipeline call")
    parser.add_argument("--data", default=DATA_FILE, help="the emoji set (.npz) FID/KID compare with")
    parser.add_argument("--model", default=None, help="pipeline folder; default: the bundled model")
    add_runtime_arguments(parser, loading=False)  # the bench loads its model itself: no --variant or --offload
    args = parser.parse_args(argv)
    check_arguments(args)
    runtime = runtime_from_args(args)
    device = runtime.check()
    from accel.eval.fid import fid_kid

    images, captions, split = load_dataset(args.data)
    pipe = load_default_pipeline(args.model, torch_dtype=runtime.torch_dtype, device=str(device))
    runtime.compile_pipeline(pipe)
    pipe.set_progress_bar_config(disable=True)
    prompts = [captions[i % len(captions)] for i in np.random.default_rng(0).permutation(len(captions))]
    prompts = (prompts * (args.samples // len(prompts) + 1))[: args.samples]
    trained = generate(pipe, prompts, args.steps, args.batch)
    untrained = generate(untrained_copy(pipe, runtime), prompts, args.steps, args.batch)
    fid_trained = fid_kid(images, trained)
    fid_untrained = fid_kid(images, untrained)
    checks = scorer_checks(images, captions, split, trained, prompts)
    per_step = seconds_per_step(pipe, args.steps)
    print(f"default model, {args.samples} samples of {args.steps} steps vs {len(images)} dataset images")
    print(f"{'':<12}{'FID-EffNetLite0':>17}{'KID-EffNetLite0':>17}")
    for name, result in (("trained", fid_trained), ("untrained", fid_untrained)):
        print(f"{name:<12}{result['FID-EffNetLite0']:>17.1f}{result['KID-EffNetLite0']:>17.4f}")
    print(
        "alignment scorer, held-out retrieval among 100: "
        f"top-1 {checks['scorer_top1']:.2f}, top-5 {checks['scorer_top5']:.2f}"
    )
    print(
        "alignment score of generated images: "
        f"own prompt {checks['score_matched']:.1f}, shuffled {checks['score_shuffled']:.1f}"
    )
    print(f"seconds per step (batch 1, CFG, {torch.get_num_threads()} threads): {per_step:.3f}")
    return {
        "fid_trained": round(fid_trained["FID-EffNetLite0"], 2),
        "fid_untrained": round(fid_untrained["FID-EffNetLite0"], 2),
        "kid_trained": round(fid_trained["KID-EffNetLite0"], 4),
        "kid_untrained": round(fid_untrained["KID-EffNetLite0"], 4),
        **{k: round(v, 3) for k, v in checks.items()},
        "seconds_per_step": round(per_step, 4),
        "samples": args.samples,
        "runtime": asdict(runtime),
    }
