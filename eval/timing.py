"""The one wall-clock timer of evaluations and benchmarks: CUDA work is waited for, runs are interleaved.

On a GPU, kernels run asynchronously: a call returns before its work is done. :func:`timed` therefore
synchronises CUDA before starting and before stopping the clock (where a CUDA context exists; elsewhere it is
a plain ``time.perf_counter`` difference). :func:`time_interleaved` times several callables round-robin, so
that slow drifts (another job on the machine, thermal throttling) hit all of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


def synchronize() -> None:
    """Wait for all queued CUDA work; nothing to do where no CUDA context was initialised (CPU runs)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()``'s result and the wall-clock seconds it took, its CUDA work included."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - start


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated runs.

    Attributes:
        samples: seconds of each timed repeat (warm-up runs excluded).
    """

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median seconds."""
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Half the distance between the fastest and slowest repeat, relative to the median."""
        return (max(self.samples) - min(self.samples)) / (2 * self.median)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    around: dict[str, Callable[[], AbstractContextManager]] | None = None,
) -> dict[str, Timing]:
    """Time several callables round-robin (so slow drifts hit all of them alike), after ``warmup`` rounds.

    Args:
        fns: what to time, by name; each call is timed with :func:`timed`.
        repeats: timed rounds.
        warmup: untimed rounds first.
        around: per name, a context manager factory entered before and left after each call, untimed
            (e.g. ``lambda: accel.apply(model, config)``).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    around = around or {}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + repeats):
        for name, fn in fns.items():
            with around.get(name, nullcontext)():
                _, elapsed = timed(fn)
            if round_index >= warmup:
                samples[name].append(elapsed)
    return {name: Timing(tuple(values)) for name, values in samples.items()}
