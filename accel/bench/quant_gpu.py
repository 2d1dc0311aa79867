"""The GPU rows of ``python -m accel.bench quant`` (:mod:`accel.bench.quant`): fp8 / int8 on a PixArt-XL-sized
transformer under compile.

``--device cuda`` (:func:`run_gpu`) times fp8, int8-dynamic and int8-weight against bf16 on a random-weight
PixArt-XL-sized transformer (28 blocks, width 1152, 4096 tokens) in a 20-step loop with every block compiled
(inductor), instead of the bundled model's rows.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

import accel
from accel.quant import QuantConfig


@contextmanager
def _quantized(model: torch.nn.Module, scheme: str | None):
    with ExitStack() as stack:
        if scheme is not None:
            stack.enter_context(accel.apply(model, QuantConfig(scheme=scheme)))
        yield


def run_gpu(args) -> dict:
    """bf16 vs fp8, int8-dynamic and int8-weight on a random PixArt-XL-sized transformer, blocks compiled."""
    from accel.bench.caching import pixart_workload

    if not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")

    def make_workload():
        return pixart_workload(
            layers=28, heads=16, head_dim=72, sample_size=128, steps=args.gpu_steps, text_dim=4096,
            device=args.device, dtype=torch.bfloat16,
        )  # fmt: skip

    schemes = {"bf16": None, "fp8": "fp8", "int8-dynamic": "int8-dynamic", "int8-weight": "int8-weight"}
    print(f"PixArt-XL-sized DiT (28 blocks, width 1152, 4096 tokens), {args.gpu_steps} steps, bf16, blocks compiled")
    return {"device": torch.cuda.get_device_name(), "gpu": compare_schemes(make_workload, schemes, args.repeats)}


def compare_schemes(make_workload, schemes: dict[str, str | None], repeats: int, backend: str = "inductor") -> dict:
    """One workload per scheme (quantized once, every block compiled with ``backend``), timed interleaved; the
    first scheme is the baseline. A scheme the device cannot run is skipped, saying why. Each scheme's first
    call (compilation, when the backend compiles) is timed and printed as it ends, so a run stopped early still
    shows how far it got. Prints a table; returns ``{scheme: {"seconds", "speedup", "weight_ratio",
    "first_call_seconds"}}``."""
    from accel.eval.timing import time_interleaved, timed
    from accel.quant.apply import weight_bytes

    loops, memory, first = {}, {}, {}
    with ExitStack() as stack:
        for name, scheme in schemes.items():
            work = make_workload()
            try:
                stack.enter_context(_quantized(work.model, scheme))
            except RuntimeError as error:  # e.g. fp8 on a device without float8 matmuls
                print(f"{name}: skipped ({error})")
                continue
            accel.compile_blocks(work.model, backend=backend)
            first[name] = timed(work.loop)[1]
            print(f"{name}: first call (quantize done, blocks compiled) {first[name]:.1f} s", flush=True)
            loops[name], memory[name] = work.loop, weight_bytes(work.model)
        timings = time_interleaved(loops, repeats=repeats, warmup=0)
    baseline = next(iter(timings))
    print(f"{'scheme':<14}{'seconds':>9}{'speedup':>9}{'weights GB':>11}{'ratio':>7}")
    result = {}
    for name, timing in timings.items():
        speedup = timings[baseline].median / timing.median
        ratio = memory[name] / memory[baseline]
        print(f"{name:<14}{timing.median:>9.3f}{speedup:>8.2f}x{memory[name] / 2**30:>11.3f}{ratio:>7.3f}")
        result[name] = {
            "seconds": round(timing.median, 4),
            "speedup": round(speedup, 3),
            "weight_ratio": ratio,
            "first_call_seconds": round(first[name], 2),
        }
    return result
