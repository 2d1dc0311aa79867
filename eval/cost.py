"""What a generation costs: wall-clock latency, multiply-accumulates, peak memory.

Latency reuses :func:`accel.eval.timing.time_interleaved`: the method and the full-compute baseline run
round-robin in the same process, so drifts (another job on the machine, thermal throttling) hit both alike
and the speedup is a ratio of medians measured side by side.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from accel.compile import compiled_code_eager, flop_counter
from accel.eval.timing import time_interleaved

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
        batch: prompts per timed pipeline call (latency per image, or per clip, = call time / batch).
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
    unit: str = "image",
) -> dict:
    """Time ``run`` (inside ``around()``, entered untimed) interleaved with ``baseline`` (if given).

    Args:
        unit: what one prompt gives, ``"image"`` or ``"clip"``: names the per-sample latency.

    Returns:
        ``samples_s`` and ``median_s`` / ``spread`` (half the range over the median) per pipeline call,
        ``per_image_s`` (``per_clip_s`` for clips), the baseline's own samples, and ``speedup`` = baseline
        median / method median (1.0 when there is no baseline, i.e. for the baseline itself), and
        ``speedup_fastest`` = ratio of the fastest repeats (less sensitive to other jobs on the machine).
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
        f"per_{unit}_s": method.median / config.batch,
        "batch": config.batch,
        "warmup": config.warmup,
        "repeats": config.repeats,
        "speedup": 1.0,
        "speedup_fastest": 1.0,
    }
    if baseline is not None:
        base = timings["baseline"]
        result.update(baseline_samples_s=list(base.samples), baseline_median_s=base.median)
        result["speedup"] = base.median / method.median
        result["speedup_fastest"] = min(base.samples) / min(method.samples)  # steadier on a shared machine
    return result


def count_macs(run: Callable[[], object]) -> float:
    """Multiply-accumulates of one call of ``run``, counted from the real module calls (see :data:`MACS_HOW`)."""
    with flop_counter() as counter:
        run()
    return counter.get_total_flops() / 2


class _LiveTensorBytes(TorchDispatchMode):
    """Bytes held by storages that tensor operations allocated while the mode is active, and their peak.

    A storage counts from the first operation that returns a tensor on it (unless an input of that operation
    already used it: a view or in-place update of a tensor made before, such as a weight) until the last
    tensor on it made under the mode is garbage. Storages made outside tensor operations are not seen.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors alive]
        self._tensors: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in self._tensors:
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer == 0 or (pointer in inputs and pointer not in self._storages):
            return
        if pointer not in self._storages:
            self._storages[pointer] = [storage.nbytes(), 0]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._storages[pointer][1] += 1
        self._tensors.add(id(tensor))
        weakref.finalize(tensor, self._release, id(tensor), pointer)

    def _release(self, tensor_id: int, pointer: int) -> None:
        self._tensors.discard(tensor_id)
        entry = self._storages.get(pointer)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                self.live -= entry[0]
                del self._storages[pointer]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


#: what ``peak_bytes`` of :func:`peak_memory` (the reports' "peak MiB") is, on every device
PEAK_WHAT = (
    "peak bytes of tensors allocated during one pipeline call and alive at once, above those allocated before it "
    "(activations and caches; weights excluded)"
)


def peak_memory(run: Callable[[], object], device: torch.device | str) -> dict:
    """Peak memory of one call of ``run``, and what each number is.

    ``peak_bytes`` means one thing on every device: the peak of tensor memory allocated during the call and
    alive at once, above what was allocated before it (activations, caches, text embeddings, latents; the
    weights excluded, unless the call itself moves them, as model CPU offload does). On CUDA it is
    ``torch.cuda.max_memory_allocated`` during the call minus ``torch.cuda.memory_allocated`` before it (the
    allocator's own counters, in its 512-byte blocks); elsewhere the same quantity tracked per tensor operation,
    with compiled code run eagerly (a dispatch mode does not see inside a compiled graph, and would stop it
    from running compiled later: :func:`accel.compile.compiled_code_eager`).
    ``total_peak_bytes`` (CUDA only) is the peak with the weights: what the device must hold. On the CPU also
    ``rss_increase_bytes``: the process's peak resident set during the call minus before it (psutil, sampled
    every millisecond; allocator caching makes it 0 once earlier calls grew the heap).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        total = int(torch.cuda.max_memory_allocated(device))
        return {
            "peak_bytes": total - int(before),
            "what": PEAK_WHAT + " (torch.cuda.max_memory_allocated during the call minus memory_allocated before)",
            "total_peak_bytes": total,
            "total_what": "torch.cuda.max_memory_allocated during one pipeline call (all tensors, weights included)",
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
        with compiled_code_eager(), _LiveTensorBytes() as tracker:  # compiled code: its eager peak
            run()
    finally:
        done.set()
        sampler.join()
    return {
        "peak_bytes": int(tracker.peak),
        "what": PEAK_WHAT + " (tracked per tensor operation, compiled code run eagerly)",
        "rss_increase_bytes": int(max(peak[0], _rss()) - before),
        "rss_what": "peak process RSS during the call minus RSS before it (psutil, sampled every 1 ms)",
    }
