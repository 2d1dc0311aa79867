"""Records the cache engine's eager decision helpers hand to its fenced wrappers (see
:mod:`accel.caching.engine`): what to do about one block or component call, and the dynamic policy's
per-call decisions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from accel.caching.state import Feature, FeatureCache

COMPUTE = object()  # a call record's output while the call still has to run


class BlockCall(NamedTuple):
    """What a block wrapper does about one call: return ``output``, or run the block on ``args``/``kwargs`` and
    hand the result to the engine's exit (to ``finish`` where set)."""

    output: Any
    args: tuple = ()
    kwargs: dict | None = None
    key: tuple = ()
    count: bool = False
    previous: tuple | None = None
    state: Any = None
    step: int = 0
    inputs: tuple = ()
    store: bool = False
    finish: Callable[[Any], Any] | None = None


class ComponentCall(NamedTuple):
    """What a component wrapper does about one call; ``state`` is where to store the computed value (None: do
    not store)."""

    output: Any
    key: tuple = ()
    count: bool = False
    state: Any = None
    step: int = 0


class RowDecision(NamedTuple):
    """The dynamic policy's decision for one transformer call.

    Attributes:
        step: the step it was made at.
        rows: bool ``(batch,)`` on the CPU, True where the sample computes the later blocks.
        mode: ``"all"``, ``"none"`` or ``"mixed"`` (some samples compute).
        picked: mixed only: long ``(computing,)`` indices of the computing samples, on the model's device.
        mask: mixed only: ``rows`` on the model's device.
    """

    step: int
    rows: torch.Tensor
    mode: str
    picked: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class StackCall(NamedTuple):
    """One block stack's pass through the current call under the dynamic policy.

    Attributes:
        step: the step it belongs to.
        mode: the decision's mode, or ``"all"`` where the stack has no usable cached residual.
        start: the stack's input (full batch when ``mode == "all"``, the computing samples when mixed).
        base: mixed and none: input + cached stack residual, the reused samples' stack output (full batch).
        residual: mixed: the cached stack residual the computing samples' new rows are merged into.
        cache: the stack residual's cache.
    """

    step: int
    mode: str
    start: Feature = None
    base: Feature = None
    residual: Feature = None
    cache: FeatureCache | None = None
