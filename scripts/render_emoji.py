"""Render the Noto Color Emoji font into a small captioned image dataset.

Every single-codepoint emoji in the font's character map is drawn at the
font's native bitmap size (109 px, ``embedded_color=True``), centred on a white
canvas, downscaled to 64x64 with a Lanczos filter and captioned with its
lowercased Unicode name (``"grinning face"``, ``"red apple"``).

The result is written as one compressed ``.npz`` file with the arrays

- ``images``: ``(N, 64, 64, 3)`` uint8, RGB on white,
- ``captions``: ``(N,)`` unicode strings,
- ``codepoints``: ``(N,)`` int32,
- ``split``: ``(N,)`` unicode, ``"train"`` or ``"test"``; the held-out test
  split is every 10th item of a seeded permutation (seed 0), so it is fixed
  for everyone who uses the file.

Usage (needs the Debian package ``fonts-noto-color-emoji``)::

    python scripts/render_emoji.py --out data/emoji/emoji64.npz
"""

from __future__ import annotations

import argparse
import logging
import unicodedata
from pathlib import Path

import numpy as np
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
NATIVE_SIZE = 109  # the only size the CBDT bitmap strikes exist at
CANVAS = 160
SPLIT_SEED = 0
TEST_EVERY = 10

# Codepoints that are in the font but are not emoji pictures on their own.
_SKIPPED_RANGES = (
    (0x0000, 0x00A8),  # ASCII, digits (keycap bases), controls
    (0x1F1E6, 0x1F1FF),  # regional indicator letters (flag halves)
    (0x1F3FB, 0x1F3FF),  # skin-tone modifiers
    (0xE0000, 0xE007F),  # tag characters
    (0xFE00, 0xFE0F),  # variation selectors
    (0x200B, 0x200F),  # zero-width joiner and friends
    (0x20E3, 0x20E3),  # combining keycap
)


def list_codepoints(font_path: Path) -> list[int]:
    """Return the sorted single codepoints of the font that are emoji pictures.

    Args:
        font_path: Path to ``NotoColorEmoji.ttf``.

    Returns:
        Codepoints present in the font's best character map, minus modifiers,
        joiners, tags, regional indicators and unnamed characters.
    """
    cmap = TTFont(str(font_path)).getBestCmap()
    kept = []
    for codepoint in sorted(cmap):
        if any(low <= codepoint <= high for low, high in _SKIPPED_RANGES):
            continue
        if not unicodedata.name(chr(codepoint), ""):
            continue
        kept.append(codepoint)
    return kept


def render(codepoint: int, font: ImageFont.FreeTypeFont, size: int) -> np.ndarray | None:
    """Draw one emoji centred on white and downscale it.

    Args:
        codepoint: The Unicode codepoint to draw.
        font: The emoji font loaded at ``NATIVE_SIZE``.
        size: Output side length in pixels.

    Returns:
        ``(size, size, 3)`` uint8 RGB array, or ``None`` when the glyph is empty.
    """
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (255, 255, 255, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((CANVAS // 2, CANVAS // 2), chr(codepoint), font=font, embedded_color=True, anchor="mm")
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        return None
    left, top, right, bottom = bbox
    side = max(right - left, bottom - top, NATIVE_SIZE)
    cx, cy = (left + right) // 2, (top + bottom) // 2
    crop = canvas.crop((cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side))
    white = Image.new("RGBA", crop.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, crop).convert("RGB")
    return np.asarray(rgb.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def make_split(count: int) -> np.ndarray:
    """Return the fixed train/test split: every 10th item of a seed-0 permutation is ``"test"``."""
    order = np.random.default_rng(SPLIT_SEED).permutation(count)
    split = np.full(count, "train", dtype="<U5")
    split[order[::TEST_EVERY]] = "test"
    return split


def main() -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--font", type=Path, default=DEFAULT_FONT)
    parser.add_argument("--out", type=Path, default=Path("data/emoji/emoji64.npz"))
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    font = ImageFont.truetype(str(args.font), NATIVE_SIZE)
    images, captions, codepoints = [], [], []
    for codepoint in list_codepoints(args.font):
        image = render(codepoint, font, args.size)
        if image is None:
            continue
        images.append(image)
        captions.append(unicodedata.name(chr(codepoint)).lower())
        codepoints.append(codepoint)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        images=np.stack(images),
        captions=np.array(captions),
        codepoints=np.array(codepoints, dtype=np.int32),
        split=make_split(len(images)),
    )
    logger.info("wrote %d emoji to %s", len(images), args.out)


if __name__ == "__main__":
    main()
