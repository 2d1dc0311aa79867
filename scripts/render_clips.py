"""Captioned clips of one emoji moving on white, rendered on the fly from ``data/emoji/emoji64.npz``.

A clip is ``FRAMES`` frames of ``SIZE`` x ``SIZE`` RGB: one emoji of the bundled set, shrunk to about half
the frame, moving one of the :data:`MOTIONS` ways (sliding left/right/up/down, bouncing, zooming in/out,
rotating either way, orbiting, falling, shaking, standing still). Its caption names the object and the motion:
``"red apple sliding to the right"``. Nothing but the emoji file and a few numbers per clip is needed, so no
video is stored: :func:`render_clip` turns a :class:`ClipSpec` (emoji index, motion, seed) into frames, and
the same spec always gives the same frames.

Splits (:func:`split_pairs`, recorded in ``data/emoji/clip_split.json``):

- ``train``: the emoji file's train objects with every motion except one held-out motion per object;
- ``heldout``: those held-out object/motion pairs: objects and motions both seen in training, never together;
- ``test``: the emoji file's test objects (never seen) with every motion.

Usage: ``python scripts/render_clips.py --preview runs/clips.png`` writes a grid (one clip per row) and
re-checks the recorded split.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger("render_clips")

ROOT = Path(__file__).resolve().parents[1]
EMOJI = ROOT / "data" / "emoji" / "emoji64.npz"
SPLIT_FILE = ROOT / "data" / "emoji" / "clip_split.json"
FRAMES = 17
SIZE = 64
SPLIT_SEED = 0


@dataclass(frozen=True)
class Motion:
    """One way to move: the caption phrase and the track it follows."""

    name: str
    phrase: str


#: Every motion, in label order (the label of a motion is its index here).
MOTIONS: tuple[Motion, ...] = (
    Motion("slide_right", "sliding to the right"),
    Motion("slide_left", "sliding to the left"),
    Motion("slide_up", "sliding up"),
    Motion("slide_down", "sliding down"),
    Motion("bounce", "bouncing"),
    Motion("zoom_in", "zooming in"),
    Motion("zoom_out", "zooming out"),
    Motion("rotate_clockwise", "rotating clockwise"),
    Motion("rotate_counterclockwise", "rotating counterclockwise"),
    Motion("orbit", "orbiting in a circle"),
    Motion("fall", "falling down"),
    Motion("shake", "shaking"),
    Motion("still", "standing still"),
)
MOTION_INDEX = {motion.name: index for index, motion in enumerate(MOTIONS)}


@dataclass(frozen=True)
class ClipSpec:
    """What a clip shows: emoji ``index`` into the emoji file, ``motion`` name, and the ``seed`` of its details."""

    index: int
    motion: str
    seed: int


def load_emoji() -> tuple[np.ndarray, list[str], np.ndarray]:
    """The emoji images ``(N, 64, 64, 3)`` uint8 on white, their names, and their split (``"train"``/``"test"``)."""
    data = np.load(EMOJI, allow_pickle=False)
    return data["images"], [str(c) for c in data["captions"]], data["split"]


def caption(name: str, motion: str) -> str:
    """``"red apple sliding to the right"``."""
    return f"{name} {MOTIONS[MOTION_INDEX[motion]].phrase}"


def track(motion: str, seed: int, frames: int = FRAMES) -> np.ndarray:
    """Per-frame ``(x, y, scale, angle)`` of the emoji, ``(frames, 4)``.

    ``x, y`` is the emoji centre in [-1, 1] frame units (y down), ``scale`` its size relative to the frame,
    ``angle`` its clockwise rotation in radians. The seed draws the details (size, speed, start, lane).
    """
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, frames)
    scale = np.full(frames, rng.uniform(0.5, 0.65))
    lane = rng.uniform(-0.3, 0.3)  # the fixed coordinate of a straight slide
    span = rng.uniform(0.45, 0.6)  # half the distance travelled
    x, y, angle = np.full(frames, lane), np.full(frames, rng.uniform(-0.2, 0.2)), np.zeros(frames)
    forward = -span + 2 * span * t
    if motion == "slide_right":
        x = forward
    elif motion == "slide_left":
        x = -forward
    elif motion == "slide_down":
        x, y = np.full(frames, rng.uniform(-0.3, 0.3)), forward
    elif motion == "slide_up":
        x, y = np.full(frames, rng.uniform(-0.3, 0.3)), -forward
    elif motion == "bounce":
        x = np.full(frames, rng.uniform(-0.3, 0.3))
        y = 0.5 - 1.0 * np.abs(np.sin(np.pi * rng.choice([2.0, 3.0]) * t + rng.uniform(0, 0.3)))
    elif motion in ("zoom_in", "zoom_out"):
        x, y = x * 0.5, y * 0.5
        small, large = rng.uniform(0.25, 0.35), rng.uniform(0.85, 1.0)
        scale = small * (large / small) ** (t if motion == "zoom_in" else 1 - t)
    elif motion in ("rotate_clockwise", "rotate_counterclockwise"):
        sign = 1.0 if motion == "rotate_clockwise" else -1.0
        x, y = x * 0.5, y * 0.5
        angle = sign * rng.uniform(1.0, 1.5) * np.pi * t
    elif motion == "orbit":
        radius, phase = rng.uniform(0.35, 0.5), rng.uniform(0, 2 * np.pi)
        x = radius * np.cos(phase - 2 * np.pi * t)  # counterclockwise on screen (y points down)
        y = radius * np.sin(phase - 2 * np.pi * t)
    elif motion == "fall":
        landing = rng.uniform(0.7, 0.85)  # fraction of the clip after which it lies on the floor
        y = -0.6 + 1.2 * np.minimum(t / landing, 1.0) ** 2
    elif motion == "shake":
        x = x * 0.5 + rng.uniform(0.12, 0.18) * np.sin(2 * np.pi * rng.choice([3.0, 4.0]) * t)
    elif motion != "still":
        raise ValueError(f"unknown motion {motion!r}; known: {sorted(MOTION_INDEX)}")
    return np.stack([x, y, scale, angle], axis=1).astype(np.float32)


def render_clip(image: np.ndarray, motion: str, seed: int, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """Frames ``(frames, size, size, 3)`` uint8 of the emoji ``image`` (``(64, 64, 3)`` uint8 on white) moving."""
    x, y, scale, angle = torch.from_numpy(track(motion, seed, frames)).unbind(1)
    ink = 1 - torch.from_numpy(image).permute(2, 0, 1).float().div(255)  # (3, 64, 64), 0 on white
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # output pixel p -> sprite pixel R(-angle) (p - centre) / scale; affine_grid's theta maps output to input
    # (affine_grid: x is the column, left -1 to right +1; y the row, top -1 to bottom +1)
    rows = (torch.stack([cos, sin, -(cos * x + sin * y)], 1), torch.stack([-sin, cos, sin * x - cos * y], 1))
    grid = F.affine_grid(torch.stack(rows, 1), [frames, 3, size, size], align_corners=False)
    sprite = ink.expand(frames, -1, -1, -1)
    warped = F.grid_sample(sprite, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return ((1 - warped).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def split_pairs(split: np.ndarray, seed: int = SPLIT_SEED) -> dict[str, list[tuple[int, str]]]:
    """Object/motion pairs of each split: ``train``, ``heldout`` (one motion per train object) and ``test``."""
    rng = np.random.default_rng(seed)
    pairs: dict[str, list[tuple[int, str]]] = {"train": [], "heldout": [], "test": []}
    for index, part in enumerate(split):
        held = int(rng.integers(len(MOTIONS)))  # drawn for every object, so a subset keeps its held-out motions
        if part not in ("train", "test"):  # e.g. "unused": an object a training run leaves out
            continue
        for label, motion in enumerate(MOTIONS):
            if part == "test":
                pairs["test"].append((index, motion.name))
            else:
                pairs["heldout" if label == held else "train"].append((index, motion.name))
    return pairs


def subset_split(split: np.ndarray, names: list[str], objects: list[str] | None) -> np.ndarray:
    """``split`` with every train object not named in ``objects`` set aside (``"unused"``), for a run on those
    objects only; ``split`` itself when ``objects`` is None. Held-out pairs of the kept objects are unchanged:
    :func:`split_pairs` draws each object's held-out motion from the object's index, not from the list."""
    if objects is None:
        return split
    unknown = sorted(set(objects) - {name for name, part in zip(names, split) if part == "train"})
    if unknown:
        raise ValueError(f"not train objects of the emoji file: {unknown}")
    return np.array([part if part != "train" or name in objects else "unused" for name, part in zip(names, split)])


def clip_specs(split: np.ndarray, part: str, clips_per_object: int, seed: int = 0) -> list[ClipSpec]:
    """``clips_per_object`` clips of every object of split ``part``, its motions drawn without repeats (seeded)."""
    by_object: dict[int, list[str]] = {}
    for index, motion in split_pairs(split)[part]:
        by_object.setdefault(index, []).append(motion)
    rng = np.random.default_rng(seed)
    specs = []
    for index, motions in by_object.items():
        order = rng.permutation(len(motions))
        for k in range(clips_per_object):
            motion = motions[order[k % len(motions)]]
            specs.append(ClipSpec(index=index, motion=motion, seed=int(rng.integers(2**31))))
    return specs


def split_record(split: np.ndarray) -> dict:
    """The JSON recorded in :data:`SPLIT_FILE`: motions, frame geometry and the held-out pairs."""
    pairs = split_pairs(split)
    return {
        "version": 1,
        "frames": FRAMES,
        "size": SIZE,
        "split_seed": SPLIT_SEED,
        "motions": {motion.name: motion.phrase for motion in MOTIONS},
        "counts": {part: len(items) for part, items in pairs.items()},
        "heldout": [[index, motion] for index, motion in pairs["heldout"]],
    }


def save_preview(path: Path, specs: list[ClipSpec], frames_shown: int = 9) -> None:
    """A PNG grid: one clip per row, ``frames_shown`` evenly spaced frames."""
    from PIL import Image

    images, names, _ = load_emoji()
    rows = []
    for spec in specs:
        clip = render_clip(images[spec.index], spec.motion, spec.seed)
        rows.append(np.concatenate(list(clip[np.linspace(0, FRAMES - 1, frames_shown).round().astype(int)]), axis=1))
        logger.info("row %d: %s", len(rows), caption(names[spec.index], spec.motion))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def main() -> None:
    """Check (or with ``--write-split`` rewrite) the recorded split; optionally write a preview grid."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preview", type=Path, help="write a PNG with one clip of every motion per row")
    parser.add_argument("--write-split", action="store_true", help=f"(re)write {SPLIT_FILE.name}")
    args = parser.parse_args()
    if not EMOJI.is_file():
        parser.error(f"emoji data set not found at {EMOJI}; run from a clone of the repository")
    if args.preview is not None and not args.preview.parent.is_dir():
        parser.error(f"--preview {args.preview}: folder {args.preview.parent} does not exist")
    if not args.write_split and not SPLIT_FILE.is_file():
        parser.error(f"{SPLIT_FILE} not found; write it with --write-split")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _, _, split = load_emoji()
    record = split_record(split)
    if args.write_split:
        SPLIT_FILE.write_text(json.dumps(record, indent=0) + "\n")
    elif json.loads(SPLIT_FILE.read_text()) != record:
        raise SystemExit(f"{SPLIT_FILE} does not match the split this script makes; re-run with --write-split")
    logger.info("split: %s", record["counts"])
    if args.preview:
        rng = np.random.default_rng(1)
        train = np.flatnonzero(split == "train")
        specs = [ClipSpec(int(rng.choice(train)), m.name, int(rng.integers(2**31))) for m in MOTIONS]
        save_preview(args.preview, specs)


if __name__ == "__main__":
    main()
