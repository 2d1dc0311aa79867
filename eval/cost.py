"""What a generation costs: wall-clock latency, multiply-accumulates, peak memory.

Latency reuses :func:`accel.bench.timing.time_interleaved`: the method and the full-compute baseline run
round-robin in the same process, so drifts (another job on the machine, thermal throttling) hit both alike
and the speedup is a ratio of medians measured side by side.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from accel.bench.timing import time_interleaved

MACS_HOW = (
    "torch.utils.flop_counter.FlopCounterMode over one whole pipeline call (text encoder, denoiser at every "
    "step, VAE decoder), MACs = counted FLOPs / 2"
)


@dataclass(frozen=True, kw_only=True)
class TimingConfig:
    """How latency is measured.

    Attributes:
        warmup: untimed rounds before the timed ones.
        repeats: timed rounds; the median is reported with the spread.
        batch: prompts per timed pipeline call (latency per image = call time / batch).
    """

    warmup: int = 1
    repeats: int = 3
    batch: int = 1

    def __post_init__(self):
        if self.warmup < 0 or self.repeats < 1 or self.batch < 1:
            raise ValueError(f"need warmup >= 0, repeats >= 1, batch >= 1; got {self}")


def latency(
    run: Callable[[], object],
    around: Callable[[], AbstractContextManager] | None,
    baseline: Callable[[], object] | None,
    config: TimingConfig,
) -> dict:
    """Time ``run`` (inside ``around()``, entered untimed) interleaved with ``baseline`` (if given).

    Returns:
        ``samples_s`` and ``median_s`` / ``spread`` (half the range over the median) per pipeline call,
        ``per_image_s``, the baseline's own samples, and ``speedup`` = baseline median / method median (1.0
        when there is no baseline, i.e. for the baseline itself).
    """
    fns = {"method": run, **({"baseline": baseline} if baseline is not None else {})}
    timings = time_interleaved(
        fns,
        repeats=config.repeats,
        warmup=config.warmup,
        around={"method": around} if around is not None else None,
    )
    method = timings["method"]
    result = {
        "samples_s": list(method.samples),
        "median_s": method.median,
        "spread": method.spread,
        "per_image_s": method.median / config.batch,
        "batch": config.batch,
        "warmup": config.warmup,
        "repeats": config.repeats,
        "speedup": 1.0,
    }
    if baseline is not None:
        base = timings["baseline"]
        result.update(baseline_samples_s=list(base.samples), baseline_median_s=base.median)
        result["speedup"] = base.median / method.median
    return result


def count_macs(run: Callable[[], object]) -> float:
    """Multiply-accumulates of one call of ``run``, counted from the real module calls (see :data:`MACS_HOW`)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 2


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_memory(run: Callable[[], object], device: torch.device | str) -> dict:
    """Peak memory of one call of ``run``, and what the number is.

    On CUDA: ``torch.cuda.max_memory_allocated`` during the call (tensors only, weights included). Elsewhere:
    the resident set size of the process (psutil), sampled every millisecond in a thread, peak minus the value
    before the call: the extra memory the call needed, allocator caching included.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return {
            "peak_bytes": int(torch.cuda.max_memory_allocated(device)),
            "what": "torch.cuda.max_memory_allocated during one pipeline call (all tensors, weights included)",
        }
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss())
    return {
        "peak_bytes": int(peak[0] - before),
        "rss_before_bytes": int(before),
        "what": "peak process RSS during one pipeline call minus RSS before it (psutil, sampled every 1 ms)",
    }
