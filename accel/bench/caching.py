"""``python -m accel.bench caching``: wall-clock speedup of caching schedules on a CPU-sized DiT.

The model is a ``PixArtTransformer2DModel`` with PixArt-XL's depth (28 blocks) and a small width, run in a
20-step denoising loop with classifier-free guidance batched as in the PixArt pipeline. Random weights: speed
does not depend on what the weights learned. For every schedule it reports the measured speedup over the
unwrapped model and the ideal speedup set by the share of the transformer's MACs the schedule skips
(``1 / (1 - skipped)``); the compute-all schedule measures the plugin's overhead.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from diffusers import PixArtTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

import accel
from accel.bench.timing import time_interleaved
from accel.caching import CacheConfig, compute_all, delta_dit, fora, layout_of


def build_model(layers: int, heads: int, head_dim: int, sample_size: int, text_dim: int) -> PixArtTransformer2DModel:
    """A randomly initialised PixArt transformer of the given size, in eval mode."""
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=sample_size,
        num_layers=layers,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,
        caption_channels=text_dim,
        cross_attention_dim=heads * head_dim,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    return model.eval().requires_grad_(False)


def make_loop(
    model: torch.nn.Module, steps: int, batch: int, sample_size: int, text_dim: int
) -> Callable[[], torch.Tensor]:
    """A denoising loop: ``steps`` Euler steps, CFG batched as ``cat([uncond, cond])``."""
    generator = torch.Generator().manual_seed(0)
    latents0 = torch.randn(batch, 4, sample_size, sample_size, generator=generator)
    text = torch.randn(2 * batch, 16, text_dim, generator=generator)
    timesteps = torch.linspace(1000, 1, steps)

    @torch.no_grad()
    def loop() -> torch.Tensor:
        latents = latents0
        for t in timesteps:
            x = torch.cat([latents, latents])
            out = model(x, encoder_hidden_states=text, timestep=t.expand(2 * batch), return_dict=False)[0]
            uncond, cond = out[:, :4].chunk(2)
            latents = latents - (uncond + 4.5 * (cond - uncond)) / steps
        return latents

    return loop


def full_macs(model: torch.nn.Module, loop: Callable[[], torch.Tensor]) -> float:
    """MACs of one unwrapped loop, counted from the real calls."""
    with FlopCounterMode(display=False) as counter:
        loop()
    return counter.get_total_flops() / 2


def run(argv: list[str]) -> dict:
    """Measure and print the table; return the headline numbers."""
    parser = argparse.ArgumentParser(prog="python -m accel.bench caching")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sample-size", type=int, default=32, help="latent side; tokens = (side / 2) ** 2")
    parser.add_argument("--batch", type=int, default=1, help="prompts per call (doubled by CFG)")
    args = parser.parse_args(argv)

    text_dim = 384
    model = build_model(args.layers, args.heads, args.head_dim, args.sample_size, text_dim)
    loop = make_loop(model, args.steps, args.batch, args.sample_size, text_dim)
    layout = layout_of(model)
    schedules = {
        "compute-all": compute_all(layout, args.steps),
        "fora-2": fora(layout, args.steps, 2),
        "fora-3": fora(layout, args.steps, 3),
        "delta-dit": delta_dit(layout, args.steps),
    }
    total = full_macs(model, loop)

    saved = {}
    for name, schedule in schedules.items():  # MACs counted once, outside the timed runs
        with accel.apply(model, CacheConfig(schedule=schedule)) as handle:
            loop()
            saved[name] = handle.stats().macs_saved

    def applied(name: str):
        return lambda: accel.apply(model, CacheConfig(schedule=schedules[name], count_macs=False))

    timings = time_interleaved(
        {"full": loop, **dict.fromkeys(schedules, loop)},
        repeats=args.repeats,
        warmup=1,
        around={name: applied(name) for name in schedules},
    )
    full = timings["full"].median
    print(
        f"PixArt-style DiT: {args.layers} blocks, width {args.heads * args.head_dim}, "
        f"{(args.sample_size // 2) ** 2} tokens, {args.steps} steps, CFG batch {2 * args.batch}; "
        f"{total / 1e9:.2f} GMACs per loop; {args.repeats} repeats, medians"
    )
    print(f"{'method':<12}{'seconds':>9}{'spread':>8}{'speedup':>9}{'ideal':>7}{'of ideal':>10}")
    rows = {}
    for name, timing in timings.items():
        speedup = full / timing.median
        ideal = total / (total - saved.get(name, 0.0))
        rows[name] = (speedup, ideal)
        print(
            f"{name:<12}{timing.median:>9.3f}{100 * timing.spread:>7.1f}%{speedup:>9.3f}{ideal:>7.2f}"
            f"{100 * speedup / ideal:>9.1f}%"
        )
    overhead = timings["compute-all"].median / full - 1
    print(f"overhead of the compute-all schedule vs unwrapped: {100 * overhead:+.2f}%")
    return {
        "overhead": round(overhead, 4),
        "fora2_speedup": round(rows["fora-2"][0], 3),
        "fora2_ideal": round(rows["fora-2"][1], 3),
        "fora3_speedup": round(rows["fora-3"][0], 3),
        "fora3_ideal": round(rows["fora-3"][1], 3),
        "delta_dit_speedup": round(rows["delta-dit"][0], 3),
        "delta_dit_ideal": round(rows["delta-dit"][1], 3),
    }
