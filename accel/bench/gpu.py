"""``python -m accel.bench gpu``: the caching comparisons at real model sizes on a CUDA device, in minutes.

Two random-weight transformers in bf16: a PixArt-XL-sized ``PixArtTransformer2DModel`` (28 blocks, width
1152, 1024 tokens) and a Wan2.1-1.3B-sized ``WanTransformer3DModel`` (30 blocks, 12 x 128, about 8k tokens
by default), each in a 20-step loop with CFG batched. For each: eager and with every block compiled
(inductor); full compute, compute-all (overhead), FORA-2/3, the first-block policy that never reuses
(overhead) and at a threshold that does, and, on Wan, diffusers' own FirstBlockCache. Speedups are against
full compute in the same mode (eager or compiled); the compiled tables also count the frames caching compiles
beyond the plain compiled model. ``--tiny`` shrinks both models so that the script can be checked on a CPU.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from accel.bench.caching import Workload, compare, compiled_comparison, full_macs, print_table, wan_workload
from accel.bench.caching import pixart_workload as _pixart
from accel.caching import FirstBlockPolicy, compute_all, fora, layout_of
from accel.eval.runtime import RuntimeConfig


def _methods(model: torch.nn.Module, steps: int) -> dict:
    layout = layout_of(model)
    return {
        "compute-all": compute_all(layout, steps),
        "fora-2": fora(layout, steps, 2),
        "fora-3": fora(layout, steps, 3),
        "fbc-never": FirstBlockPolicy(threshold=0.0),
        "fbc-0.08": FirstBlockPolicy(threshold=0.08),
    }


def _diffusers_fbc(model: torch.nn.Module, steps: int):
    """diffusers' FirstBlockCache (threshold 0.08) as a context-manager factory, through the harness's adapter."""
    from accel.eval.diffusers_cache import apply_diffusers_cache

    @contextmanager
    def applied():
        with apply_diffusers_cache(SimpleNamespace(transformer=model), "diffusers-fbc", {"threshold": 0.08}, steps):
            yield

    return applied


def _bench(work: Workload, steps: int, repeats: int, backend: str, with_diffusers: bool) -> dict:
    methods = _methods(work.model, steps)
    others = {"diffusers-fbc": _diffusers_fbc(work.model, steps)} if with_diffusers else {}
    total = full_macs(work.loop)
    saved: dict[str, float] = {}
    eager = compare(work, methods, repeats, saved, others=others)
    rows = print_table(f"eager: {work.name}, {steps} steps", eager, total, saved)
    compiled, recompiles = compiled_comparison(work, methods, repeats, backend, others=others)
    compiled_rows = print_table(f"compiled blocks ({backend}): {work.name}", compiled, total, saved)
    result = {
        "tokens": work.tokens,
        "full_seconds": round(eager["full"].median, 4),
        "compiled_full_seconds": round(compiled["full"].median, 4),
        "compiled_speedup": round(eager["full"].median / compiled["full"].median, 3),
        "recompiles": recompiles,
    }
    for prefix, table, timings in (("", rows, eager), ("compiled_", compiled_rows, compiled)):
        for name in timings:
            if name != "full":
                result[f"{prefix}{name.replace('-', '_').replace('.', '')}_speedup"] = round(table[name][0], 3)
    result["fora2_ideal"] = round(rows["fora-2"][1], 3)
    print(f"compiled full vs eager full: {result['compiled_speedup']}x; frames compiled by caching: {recompiles}")
    return result


def run(argv: list[str]) -> dict:
    """Measure both models; print their tables; return ``{"pixart": {...}, "wan": {...}}``."""
    parser = argparse.ArgumentParser(prog="python -m accel.bench gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--models", default="pixart,wan", help="comma list of pixart, wan")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, to check the script on a CPU")
    args = parser.parse_args(argv)
    runtime = RuntimeConfig(device=args.device, dtype=args.dtype, compile=True)
    runtime.check()
    dtype, device = runtime.torch_dtype, args.device
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = set(models) - {"pixart", "wan"}
    if unknown:
        raise ValueError(f"--models: unknown {sorted(unknown)}; use pixart, wan")
    if device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, {runtime.dtype}")
    result = {}
    if "pixart" in models:
        size = dict(layers=2, heads=2, head_dim=16, sample_size=8) if args.tiny else dict(
            layers=28, heads=16, head_dim=72, sample_size=64)  # fmt: skip
        work = _pixart(**size, steps=args.steps, text_dim=4096 if not args.tiny else 32, device=device, dtype=dtype)
        result["pixart"] = _bench(work, args.steps, args.repeats, args.backend, with_diffusers=False)
    if "wan" in models:
        size = dict(layers=2, heads=2, head_dim=16, frames=3, height=8, width=8, text_dim=32, ffn_dim=64) if args.tiny \
            else dict(frames=21, height=30, width=52)  # fmt: skip
        work = wan_workload(**size, steps=args.steps, device=device, dtype=dtype)
        result["wan"] = _bench(work, args.steps, args.repeats, args.backend, with_diffusers=True)
    return result
