"""A grid of default-model samples with their prompts: ``python scripts/sample_grid.py --out docs/samples.png``."""

from __future__ import annotations

import argparse

import torch
from PIL import Image, ImageDraw

from accel.pipelines.default import DEFAULT_CALL_KWARGS, DEFAULT_GUIDANCE_SCALE, load_default_pipeline

PROMPTS = [
    "red apple",
    "grinning face",
    "steam locomotive",
    "pile of poo",
    "sun with face",
    "blue heart",
    "hot beverage",
    "dog face",
    "rocket",
    "birthday cake",
    "four leaf clover",
    "crying face",
    "automobile",
    "christmas tree",
    "banana",
    "snowman",
]


def grid(images: list[Image.Image], captions: list[str], columns: int = 4, scale: int = 2) -> Image.Image:
    """Images (all the same size) in a grid, each with its caption underneath."""
    width, height = images[0].size[0] * scale, images[0].size[1] * scale
    cell_h = height + 14
    sheet = Image.new("RGB", (columns * width, -(-len(images) // columns) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * width, (i // columns) * cell_h
        sheet.paste(image.resize((width, height), Image.NEAREST), (x, y))
        draw.text((x + 2, y + height + 1), caption[:22], fill="black")
    return sheet


def main() -> None:
    """Generate the prompts with fixed seeds and save the captioned grid."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="pipeline folder; default: the bundled model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--out", default="docs/samples.png")
    args = parser.parse_args()
    pipe = load_default_pipeline(args.model)
    generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    images = pipe(
        PROMPTS,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=generators,
        **DEFAULT_CALL_KWARGS,
    ).images
    grid(images, PROMPTS).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
