"""Moved to :mod:`accel.eval.timing` (the one timer of evaluations and benchmarks); names kept for importers."""

from accel.eval.timing import Timing, time_interleaved, timed

__all__ = ["Timing", "time_interleaved", "timed"]
