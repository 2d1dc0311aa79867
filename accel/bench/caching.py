"""``python -m accel.bench caching``: wall-clock speedup of caching schedules on a PixArt-XL-deep DiT.

The model is a ``PixArtTransformer2DModel`` with PixArt-XL's depth (28 blocks) and a small width, run in a
20-step denoising loop with classifier-free guidance batched as in the PixArt pipeline. Random weights: speed
does not depend on what the weights learned. For every schedule it reports the measured speedup over the
unwrapped model and the ideal speedup set by the share of the transformer's MACs the schedule skips
(``1 / (1 - skipped)``); the compute-all schedule measures the plugin's overhead, and the first-block policy
with a threshold that never reuses measures the dynamic policy's.

``--compile`` adds the same comparisons with every block compiled (:func:`accel.compile_blocks`, inductor),
against the compiled model without the plugin, and counts the frames caching compiles beyond it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

import accel
from accel.caching import CacheConfig, FirstBlockPolicy, compute_all, delta_dit, fora, layout_of
from accel.compile import flop_counter
from accel.eval.runtime import DTYPES, canonical_dtype
from accel.eval.timing import Timing, time_interleaved


@dataclass
class Workload:
    """A random-weight transformer and a denoising loop over it.

    Attributes:
        name: what it is, for the table's title.
        model: the transformer, in eval mode.
        loop: one denoising loop (CFG batched); returns the final latents.
        tokens: image/video tokens per sample.
    """

    name: str
    model: torch.nn.Module
    loop: Callable[[], torch.Tensor]
    tokens: int


def pixart_workload(
    layers: int = 28,
    heads: int = 6,
    head_dim: int = 64,
    sample_size: int = 32,
    steps: int = 20,
    batch: int = 1,
    text_dim: int = 384,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Workload:
    """A random PixArt transformer and a ``steps``-step Euler loop, CFG batched as ``cat([uncond, cond])``."""
    from diffusers import PixArtTransformer2DModel

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
    model = model.to(device, dtype).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    latents0 = torch.randn(batch, 4, sample_size, sample_size, generator=generator).to(device, dtype)
    text = torch.randn(2 * batch, 16, text_dim, generator=generator).to(device, dtype)
    timesteps = torch.linspace(1000, 1, steps, device=device)

    @torch.no_grad()
    def loop() -> torch.Tensor:
        latents = latents0
        for t in timesteps:
            x = torch.cat([latents, latents])
            out = model(x, encoder_hidden_states=text, timestep=t.expand(2 * batch), return_dict=False)[0]
            uncond, cond = out[:, :4].chunk(2)
            latents = latents - (uncond + 4.5 * (cond - uncond)) / steps
        return latents

    title = f"PixArt-style DiT: {layers} blocks, width {heads * head_dim}, {(sample_size // 2) ** 2} tokens"
    return Workload(title, model, loop, (sample_size // 2) ** 2)


def wan_workload(
    layers: int = 30,
    heads: int = 12,
    head_dim: int = 128,
    frames: int = 21,
    height: int = 60,
    width: int = 104,
    steps: int = 20,
    batch: int = 1,
    text_dim: int = 4096,
    ffn_dim: int = 8960,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Workload:
    """A random Wan transformer (Wan2.1-1.3B's shape by default: 30 blocks, 12 x 128, 21 x 60 x 104 latents,
    about 32k tokens) and a flow-matching Euler loop with CFG batched."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=ffn_dim,
        num_layers=layers,
    )
    model = model.to(device, dtype).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    latents0 = torch.randn(batch, 16, frames, height, width, generator=generator).to(device, dtype)
    text = torch.randn(2 * batch, 32, text_dim, generator=generator).to(device, dtype)
    timesteps = torch.linspace(999, 1, steps, device=device)

    @torch.no_grad()
    def loop() -> torch.Tensor:
        latents = latents0
        for t in timesteps:
            x = torch.cat([latents, latents])
            out = model(x, timestep=t.expand(2 * batch), encoder_hidden_states=text, return_dict=False)[0]
            uncond, cond = out.chunk(2)
            latents = latents - (uncond + 5.0 * (cond - uncond)) / steps
        return latents

    tokens = frames * (height // 2) * (width // 2)
    return Workload(f"Wan-style DiT: {layers} blocks, width {heads * head_dim}, {tokens} tokens", model, loop, tokens)


def full_macs(loop: Callable[[], torch.Tensor]) -> float:
    """MACs of one unwrapped loop, counted from the real calls."""
    with flop_counter() as counter:
        loop()
    return counter.get_total_flops() / 2


#: the policies :func:`default_methods` builds, by name
METHOD_NAMES = ("compute-all", "fora-2", "fora-3", "delta-dit", "fbc-never")


def default_methods(model: torch.nn.Module, steps: int) -> dict[str, object]:
    """The caching policies every comparison times: compute-all (the overhead), FORA-2/3, Delta-DiT and the
    first-block policy with a threshold that never reuses (its overhead)."""
    layout = layout_of(model)
    return {
        "compute-all": compute_all(layout, steps),
        "fora-2": fora(layout, steps, 2),
        "fora-3": fora(layout, steps, 3),
        "delta-dit": delta_dit(layout, steps),
        "fbc-never": FirstBlockPolicy(threshold=0.0),
    }


def compare(
    work: Workload,
    methods: dict[str, object],
    repeats: int,
    saved: dict[str, float] | None = None,
    others: dict[str, Callable] | None = None,
) -> dict[str, Timing]:
    """Time the unwrapped loop (``"full"``) and each policy applied, interleaved, one warm-up round first;
    with ``saved`` given, also count each policy's saved MACs (in a run of its own, untimed). ``others`` adds
    methods applied by a context-manager factory of their own (e.g. diffusers' hooks)."""
    if saved is not None:
        for name, policy in methods.items():
            with accel.apply(work.model, CacheConfig(schedule=policy)) as handle:
                work.loop()
                saved[name] = handle.stats().macs_saved

    def applied(name: str):
        return lambda: accel.apply(work.model, CacheConfig(schedule=methods[name], count_macs=False))

    around = {name: applied(name) for name in methods} | (others or {})
    return time_interleaved(
        {"full": work.loop, **dict.fromkeys(around, work.loop)}, repeats=repeats, warmup=1, around=around
    )


def print_table(title: str, timings: dict[str, Timing], total: float, saved: dict[str, float]) -> dict:
    """Print seconds, speedup, ideal and share of ideal per method; returns ``{name: (speedup, ideal)}``."""
    full = timings["full"].median
    print(title)
    print(f"{'method':<14}{'seconds':>9}{'spread':>8}{'speedup':>9}{'ideal':>7}{'of ideal':>10}")
    rows = {}
    for name, timing in timings.items():
        speedup = full / timing.median
        ideal = total / (total - saved.get(name, 0.0))
        rows[name] = (speedup, ideal)
        print(
            f"{name:<14}{timing.median:>9.3f}{100 * timing.spread:>7.1f}%{speedup:>9.3f}{ideal:>7.2f}"
            f"{100 * speedup / ideal:>9.1f}%"
        )
    return rows


def compiled_comparison(
    work: Workload, methods: dict[str, object], repeats: int, backend: str, others: dict[str, Callable] | None = None
) -> tuple:
    """Compile every block in place with a frame-counting ``backend``, time full vs each method, and count the
    frames the methods compiled beyond the plain compiled model's. Returns ``(timings, recompiles)``."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    accel.compile_blocks(work.model, backend=counter)
    work.loop()  # compile the plain blocks first
    plain_frames = counter.frame_count
    timings = compare(work, methods, repeats, others=others)
    return timings, counter.frame_count - plain_frames


def run(argv: list[str]) -> dict:
    """Measure and print the tables; return the headline numbers."""
    parser = argparse.ArgumentParser(prog="python -m accel.bench caching")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sample-size", type=int, default=32, help="latent side; tokens = (side / 2) ** 2")
    parser.add_argument("--batch", type=int, default=1, help="prompts per call (doubled by CFG)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--dtype", default="fp32", help="bf16, fp16 or fp32")
    parser.add_argument("--compile", action="store_true", help="also time with every block compiled (inductor)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for --compile")
    parser.add_argument(
        "--methods",
        default="compute-all,fora-2,fora-3,delta-dit,fbc-never",
        help="comma list of compute-all, fora-2, fora-3, delta-dit, fbc-never (compute-all and fora-2 are needed)",
    )
    args = parser.parse_args(argv)

    from accel.eval.runtime import RuntimeConfig

    runtime = RuntimeConfig(device=args.device, dtype=canonical_dtype(args.dtype), compile=args.compile)
    runtime.check()
    chosen = [name.strip() for name in args.methods.split(",") if name.strip()]  # checked before any compute
    if set(chosen) - set(METHOD_NAMES) or not {"compute-all", "fora-2"} <= set(chosen):
        raise ValueError(f"--methods: use names from {', '.join(METHOD_NAMES)}, compute-all and fora-2 among them")
    work = pixart_workload(
        args.layers, args.heads, args.head_dim, args.sample_size, args.steps, args.batch,
        device=args.device, dtype=DTYPES[runtime.dtype],
    )  # fmt: skip
    every = default_methods(work.model, args.steps)
    methods = {name: every[name] for name in chosen}
    total = full_macs(work.loop)
    saved: dict[str, float] = {}
    timings = compare(work, methods, args.repeats, saved)
    title = (
        f"{work.name}, {args.steps} steps, CFG batch {2 * args.batch}, {runtime.dtype} on {args.device}; "
        f"{total / 1e9:.2f} GMACs per loop; {args.repeats} repeats, medians"
    )
    rows = print_table(f"eager: {title}", timings, total, saved)
    overhead = timings["compute-all"].median / timings["full"].median - 1
    print(f"overhead of compute-all vs unwrapped: {100 * overhead:+.2f}%")
    result = {"overhead": round(overhead, 4)}
    if "fbc-never" in timings:
        result["fbc_overhead"] = round(timings["fbc-never"].median / timings["full"].median - 1, 4)
        print(f"overhead of the first-block policy never reusing: {100 * result['fbc_overhead']:+.2f}%")
    for name in ("fora-2", "fora-3", "delta-dit"):
        if name in rows:
            key = name.replace("-", "_").replace("fora_", "fora")
            result[f"{key}_speedup"], result[f"{key}_ideal"] = round(rows[name][0], 3), round(rows[name][1], 3)
    if args.compile:
        eager_full = timings["full"].median
        compiled, recompiles = compiled_comparison(work, methods, args.repeats, args.backend)
        compiled_rows = print_table(
            f"compiled blocks ({args.backend}), speedups vs compiled full:", compiled, total, saved
        )
        compiled_overhead = compiled["compute-all"].median / compiled["full"].median - 1
        print(
            f"compiled full vs eager full: {eager_full / compiled['full'].median:.3f}x; compute-all overhead "
            f"{100 * compiled_overhead:+.2f}%; frames compiled by caching beyond the plain compiled model: {recompiles}"
        )
        result.update(
            compiled_speedup=round(eager_full / compiled["full"].median, 3),
            compiled_overhead=round(compiled_overhead, 4),
            compiled_fora2_speedup=round(compiled_rows["fora-2"][0], 3),
            recompiles=recompiles,
        )
        if "fbc-never" in compiled:
            result["compiled_fbc_overhead"] = round(compiled["fbc-never"].median / compiled["full"].median - 1, 4)
    return result
