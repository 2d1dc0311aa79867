"""Train the motion classifier of ``accel.eval.motion`` on rendered clips, on one CPU thread in a few minutes.

Clips come from ``scripts/render_clips.py``, rendered on the fly (seeded): random object/motion pairs of the
``train`` split, each with a fresh seed. Every clip is degraded at random before training, so that blurry and
noisy generated clips are read too: Gaussian blur (sigma up to 1.6 px at 64 x 64), a blend with neighbouring
frames, per-channel ink gain, a channel permutation, brightness and contrast, per-frame flicker and pixel
noise. Labels are the motion indices of ``render_clips.MOTIONS``.

At the end the classifier is measured on rendered clips it never saw: the ``heldout`` split (one clip of each
training object with its held-out motion) and the ``test`` split (unseen objects, ``--test-clips`` clips
each), clean and degraded (blur sigma 1, noise 0.03). The numbers go into the weights' metadata::

    python scripts/train_motion_classifier.py                  # -> eval/weights/motion_classifier.safetensors
    python scripts/train_motion_classifier.py --steps 50 --out runs/motion_try.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from render_clips import MOTION_INDEX, MOTIONS, ClipSpec, clip_specs, load_emoji, render_clip, split_pairs  # noqa: E402

from accel.eval.motion import MotionClassifierConfig, MotionScorer, clip_planes, save_motion_scorer  # noqa: E402

logger = logging.getLogger("train_motion_classifier")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "eval" / "weights" / "motion_classifier.safetensors"


def render(images: np.ndarray, specs: list[ClipSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips ``(B, F, 3, 64, 64)`` float in [0, 1] and their labels ``(B,)`` int64."""
    clips = np.stack([render_clip(images[s.index], s.motion, s.seed) for s in specs])  # (B, F, H, W, 3)
    labels = torch.tensor([MOTION_INDEX[s.motion] for s in specs])
    return torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255, labels


def gaussian_blur(clip: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur every frame of ``clip`` ``(F, 3, H, W)`` with a Gaussian of ``sigma`` pixels (separable)."""
    if sigma < 0.1:
        return clip
    radius = max(1, math.ceil(2.5 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=clip.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    flat = clip.reshape(-1, 1, *clip.shape[-2:])  # (F * 3, 1, H, W)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(clip.shape)


def degrade(clips: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, temporal blend, colour changes, flicker and noise of clips ``(B, F, 3, H, W)`` in [0, 1]."""

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    batch, frames = clips.shape[:2]
    sigmas = uniform(0.0, 1.6, batch)
    out = torch.stack([gaussian_blur(clip, float(sigma)) for clip, sigma in zip(clips, sigmas)])
    blend = uniform(0.0, 0.25, batch, 1, 1, 1, 1) * (torch.rand(batch, 1, 1, 1, 1, generator=generator) < 0.4)
    padded = torch.cat([out[:, :1], out, out[:, -1:]], dim=1)
    out = (1 - 2 * blend) * out + blend * (padded[:, :-2] + padded[:, 2:])
    out = 1 - (1 - out) * uniform(0.6, 1.2, batch, 1, 3, 1, 1)  # ink gain per channel, white stays white
    permute = torch.rand(batch, generator=generator) < 0.5
    order = torch.randperm(3, generator=generator)
    out[permute] = out[permute][:, :, order]
    out = out * uniform(0.75, 1.05, batch, 1, 1, 1, 1) + uniform(-0.05, 0.12, batch, 1, 1, 1, 1)
    out = out + 0.02 * torch.randn(batch, frames, 1, 1, 1, generator=generator)  # per-frame flicker
    out = out + uniform(0.0, 0.06, batch, 1, 1, 1, 1) * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1)


def fixed_degradation(clips: torch.Tensor) -> torch.Tensor:
    """The evaluation's degradation: blur sigma 1 px, then Gaussian noise of std 0.03 (seeded)."""
    generator = torch.Generator().manual_seed(0)
    blurred = torch.stack([gaussian_blur(clip, 1.0) for clip in clips])
    return (blurred + 0.03 * torch.randn(blurred.shape, generator=generator)).clamp(0, 1)


def accuracy(model: MotionScorer, images: np.ndarray, specs: list[ClipSpec], degraded: bool = False) -> float:
    """Fraction of ``specs``' clips classified right (rendered in chunks, optionally degraded)."""
    correct = 0
    for start in range(0, len(specs), 128):
        clips, labels = render(images, specs[start : start + 128])
        if degraded:
            clips = fixed_degradation(clips)
        correct += int((model.predict(clips).argmax(1) == labels).sum())
    return correct / len(specs)


def evaluate(model: MotionScorer, images: np.ndarray, split: np.ndarray, test_clips: int) -> dict:
    """Held-out accuracies, clean and degraded, on the ``heldout`` and ``test`` splits and both together."""
    specs = {"heldout": clip_specs(split, "heldout", 1, seed=1), "test": clip_specs(split, "test", test_clips, seed=1)}
    metrics: dict = {}
    for degraded in (False, True):
        suffix = "_degraded" if degraded else ""
        for part, part_specs in specs.items():
            metrics[f"accuracy_{part}{suffix}"] = round(accuracy(model, images, part_specs, degraded), 4)
        counts = {part: len(part_specs) for part, part_specs in specs.items()}
        total = sum(metrics[f"accuracy_{part}{suffix}"] * counts[part] for part in specs) / sum(counts.values())
        metrics[f"accuracy_heldout_and_test{suffix}"] = round(total, 4)
    metrics["clips_heldout"], metrics["clips_test"] = len(specs["heldout"]), len(specs["test"])
    metrics["chance"] = round(1 / len(MOTIONS), 4)
    return metrics


def train(args: argparse.Namespace) -> tuple[MotionScorer, dict]:
    """Train for ``args.steps`` steps of ``args.batch`` fresh clips; return the model and its held-out metrics."""
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images, _, split = load_emoji()
    pairs = split_pairs(split)["train"]
    config = MotionClassifierConfig(
        motion_names=tuple(m.name for m in MOTIONS), motion_phrases=tuple(m.phrase for m in MOTIONS)
    )
    model = MotionScorer(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    start, running = time.perf_counter(), []
    for step in (progress := tqdm(range(args.steps), desc="training")):
        picks = rng.integers(len(pairs), size=args.batch)
        specs = [ClipSpec(pairs[i][0], pairs[i][1], int(rng.integers(2**31))) for i in picks]
        clips, labels = render(images, specs)
        logits = model(clip_planes(degrade(clips, generator), config.size))
        loss = F.cross_entropy(logits, labels, label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running.append((loss.item(), (logits.argmax(1) == labels).float().mean().item()))
        if (step + 1) % 50 == 0:
            mean_loss, mean_accuracy = np.mean(running[-50:], axis=0)
            progress.set_postfix(loss=f"{mean_loss:.3f}", accuracy=f"{mean_accuracy:.2f}")
            logger.info("step %d: loss %.3f, training accuracy %.3f", step + 1, mean_loss, mean_accuracy)
    minutes = (time.perf_counter() - start) / 60
    model.eval()
    metrics = evaluate(model, images, split, args.test_clips)
    metrics.update(steps=args.steps, batch=args.batch, seed=args.seed, training_minutes=round(minutes, 1))
    return model, metrics


def main() -> None:
    """Parse options, train, report and save."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="training steps, each of --batch fresh clips")
    parser.add_argument("--batch", type=int, default=32, help="clips per step (>= 2: BatchNorm)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clip draws, degradations and weights")
    parser.add_argument("--test-clips", type=int, default=3, help="clips per test-split object at evaluation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the weights go (.safetensors)")
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 2 or args.test_clips < 1 or args.threads < 1:
        parser.error("--steps, --test-clips and --threads must be >= 1, --batch >= 2")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.out.suffix != ".safetensors" or args.out.is_dir():
        parser.error(f"--out must name a .safetensors file, got {args.out}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model, metrics = train(args)
    logger.info("held-out metrics: %s", json.dumps(metrics))
    save_motion_scorer(model, args.out, metrics)
    logger.info("wrote %s (%.0f kB)", args.out, args.out.stat().st_size / 1024)


if __name__ == "__main__":
    main()
