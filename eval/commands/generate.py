"""Generate images or video clips with any method (full, fora-2, a schedule JSON, ...).

Images are written as PNG files. A video pipeline's clips (``--model bundled-video``, or a Wan, LTX-Video, ...
folder) are written twice: losslessly as a PNG filmstrip (frames side by side, frame count in the PNG, the form
``accel eval`` stores; :mod:`accel.eval.generation`) and as a looping animated WebP to watch.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from accel.eval.config import RUNTIME_FIELD, STEPS_DEFAULT_HELP, add_config_arguments, check_size, config_from_args
from accel.eval.methods import usage
from accel.eval.runtime import RuntimeConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """One ``accel generate`` call."""

    method: str = field(default="full", metadata={"help": "method (see `accel eval --list-methods`)"})
    target_speedup: float | None = field(
        default=None,
        metadata={
            "help": "pick from a front: the best schedule at >= this measured speedup of the front folder --method "
            "names (the bundled model's front when --method is omitted); the same as --method DIR@S"
        },
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "pipeline folder or hub id; bundled-video: the bundled video model; omitted: the bundled one"
        },
    )
    steps: int | None = field(
        default=None, metadata={"help": f"denoising steps (steps-N overrides); {STEPS_DEFAULT_HELP}"}
    )
    height: int | None = field(
        default=None, metadata={"help": "image (or clip) height in pixels; omitted: the model's"}
    )
    width: int | None = field(default=None, metadata={"help": "image (or clip) width in pixels; omitted: the model's"})
    seed: int = field(default=0, metadata={"help": "image i of a prompt is generated with seed + i"})
    num_images: int = field(default=1, metadata={"help": "images (clips, for a video model) per prompt"})
    guidance_scale: float | None = field(
        default=None, metadata={"help": "classifier-free guidance scale; omitted: the model's"}
    )
    pipeline_kwargs: dict = field(default_factory=dict, metadata={"help": "extra pipeline call arguments, as JSON"})
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, metadata=RUNTIME_FIELD)
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (CPU); omitted: torch's"})

    def __post_init__(self):
        if (self.steps is not None and self.steps < 1) or self.num_images < 1:
            raise ValueError(f"steps and num_images must be >= 1, got {self.steps} and {self.num_images}")
        check_size(self.height, self.width)
        if self.target_speedup is not None and not self.target_speedup > 0:
            raise ValueError(f"target_speedup must be > 0, got {self.target_speedup}")

    @property
    def method_name(self) -> str:
        """The method to run: ``method``, or ``FRONT@S`` with a target speedup."""
        if self.target_speedup is None:
            return self.method
        front = "front" if self.method == "full" else self.method
        return f"{front}@{self.target_speedup:g}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``accel generate``: one per :class:`GenerateConfig` field, the prompts and the output folder."""
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--out", required=True, help="folder for the PNG files (and a video's WebP animations)")
    add_config_arguments(parser, GenerateConfig)
    parser.epilog = "methods:\n" + usage()


def run(args: argparse.Namespace) -> int:
    """Generate every prompt's images (or clips) with the method and save them."""
    from accel.eval.generation import generate, pipeline_defaults
    from accel.eval.method_checks import check_method, check_steps
    from accel.eval.methods import UnsupportedMethod, apply_method, parse_method
    from accel.eval.runtime import check_output_dir, report_interrupted
    from accel.pipelines.loading import default_steps, is_bundled

    config = config_from_args(args, cls=GenerateConfig)
    config.runtime.check()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    method = parse_method(config.method_name)
    out = check_output_dir(args.out)
    pipe = config.runtime.load_pipeline(config.model)
    steps = config.steps or default_steps(pipe, config.model)
    check_steps(pipe, steps, "--steps")
    check_method(method, pipe, steps)
    overrides = {**config.pipeline_kwargs, **check_size(config.height, config.width)}
    kwargs, guidance = pipeline_defaults(pipe, is_bundled(config.model), overrides)
    guidance = guidance if config.guidance_scale is None else config.guidance_scale
    prompts = [p for p in args.prompt for _ in range(config.num_images)]
    seeds = [config.seed + i for p in args.prompt for i in range(config.num_images)]
    try:
        with apply_method(method, pipe, steps, True, {**kwargs, "guidance_scale": guidance}) as applied:
            applied.reset()
            samples = generate(pipe, prompts, seeds, applied.steps, guidance, kwargs)
            stats = applied.stats()
    except UnsupportedMethod as error:
        raise ValueError(f"{method.name} cannot run on this pipeline: {error}") from None
    except KeyboardInterrupt:
        return report_interrupted("nothing was written (the images are saved once all are made)")
    save(samples, prompts, seeds, out / method.slug)
    if stats and "reuse_fraction" in stats:  # caching
        logger.info(
            "%s: %.0f%% of component calls reused, %.0f%% of block MACs saved",
            method.name,
            100 * stats["reuse_fraction"],
            100 * stats["macs_saved_fraction"],
        )
    elif stats and stats.get("token_steps") is not None:  # per-token steps
        logger.info("%s: %.0f%% of token-steps computed", method.name, 100 * stats["token_steps"])
    return 0


def save(samples: torch.Tensor, prompts: list[str], seeds: list[int], stem: Path) -> None:
    """Write sample ``i`` as ``<stem>-<i>-seed<seed>.png`` (a clip also as ``.webp``) and print its path and prompt.

    Args:
        samples: images ``(N, 3, H, W)`` or clips ``(N, F, 3, H, W)``, float in [0, 1].
        prompts: the N prompts.
        seeds: the N seeds.
        stem: the output folder and the method's slug.
    """
    from accel.eval.generation import save_animation, save_sample

    for index, (sample, prompt, seed) in enumerate(zip(samples, prompts, seeds)):
        path = stem.with_name(f"{stem.name}-{index:03d}-seed{seed}.png")
        save_sample(sample, path)
        if sample.ndim == 4:  # a clip: (F, 3, H, W)
            save_animation(sample, path.with_suffix(".webp"))
            print(f"{path}\t{path.with_suffix('.webp')}\t{prompt}")
        else:
            print(f"{path}\t{prompt}")
