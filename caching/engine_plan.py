"""What the cache engine (:mod:`accel.caching.engine`) knows before and between calls: the blocks it wraps,
the schedule's plan for a step count, each branch's cached state, and the MACs of a call.

These are plain records and pure functions; the engine owns the wrappers and makes every decision.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map_only

from accel.adapters import BlockStack
from accel.caching.calls import RowDecision, StackCall
from accel.caching.schedule import Schedule
from accel.caching.state import FeatureCache
from accel.compile import flop_counter


class SchedulePlan(NamedTuple):
    """A schedule's decisions at one step count, and what they allow the engine to skip.

    Attributes:
        mask: ``(steps, blocks, components)`` compute decisions.
        may_skip: ``(blocks,)`` whether the block is ever reused whole.
        may_reuse: ``(blocks, components)`` whether the component is ever reused.
        partial: ``(blocks, components)`` whether it is ever reused inside a block that runs (it needs a
            wrapper of its own).
        whole_stack: stack path -> ``(steps,)`` whether every block of the stack is reused whole.
    """

    mask: np.ndarray
    may_skip: np.ndarray
    may_reuse: np.ndarray
    partial: np.ndarray
    whole_stack: dict[str, np.ndarray]


@dataclass(frozen=True)
class EngineBlock:
    """One wrapped block.

    Attributes:
        index: its position in the transformer's block list.
        stack: the block stack it belongs to.
        module: the block.
        present: indices of the schedule's components this block has.
        input_positions: the positional index, in ``forward``'s signature, of each argument named by the stack's
            ``outputs`` (None where ``forward`` has no such parameter).
    """

    index: int
    stack: BlockStack
    module: torch.nn.Module
    present: np.ndarray
    input_positions: tuple[int | None, ...]

    @classmethod
    def describe(cls, index: int, stack: BlockStack, module: torch.nn.Module, components: tuple[str, ...]):
        """The record of ``module``, block ``index`` of ``stack``, under a schedule of ``components``."""
        present = [
            i
            for i, name in enumerate(components)
            for c in stack.components
            if c.name == name and isinstance(getattr(module, c.module, None), torch.nn.Module)
        ]
        parameters = list(inspect.signature(module.forward).parameters)
        positions = tuple(parameters.index(n) if n in parameters else None for n in stack.outputs)
        return cls(index, stack, module, np.array(present, dtype=int), positions)

    def inputs(self, args: tuple, kwargs: dict) -> tuple:
        """The call's values of the arguments its outputs replace (what a residual is added to)."""
        values = []
        for name, position in zip(self.stack.outputs, self.input_positions):
            if name in kwargs:
                values.append(kwargs[name])
            else:
                values.append(args[position] if position is not None and position < len(args) else None)
        return tuple(values)


@dataclass
class BranchState:
    """The cached state of one branch (one transformer call per step, e.g. CFG's conditional one)."""

    components: dict[tuple[int, int], FeatureCache] = field(default_factory=dict)
    blocks: dict[int, FeatureCache] = field(default_factory=dict)
    stack_skip: dict[str, tuple[int, bool]] = field(default_factory=dict)  # path -> (step, skipped at once)
    stack_sums: dict[str, tuple[tuple, FeatureCache | None]] = field(default_factory=dict)  # path -> (versions, sum)
    rows: RowDecision | None = None  # the dynamic policy's decision of the current call
    first_residual: FeatureCache | None = None
    consecutive_reuse: torch.Tensor | None = None
    stack_residuals: dict[str, FeatureCache] = field(default_factory=dict)  # dynamic: path -> stack residual
    stack_calls: dict[str, StackCall] = field(default_factory=dict)  # dynamic: path -> this call's stack pass

    def caches(self) -> Iterator[FeatureCache]:
        """Every feature cache the branch holds."""
        yield from self.components.values()
        yield from self.blocks.values()
        yield from self.stack_residuals.values()
        if self.first_residual is not None:
            yield self.first_residual


def schedule_plan(schedule: Schedule, blocks: list[EngineBlock], stacks: dict[str, list[int]]) -> SchedulePlan:
    """The :class:`SchedulePlan` of ``schedule`` (already at the call's step count) over ``blocks``, whose
    stacks ``stacks`` lists (path -> block indices)."""
    mask = schedule.mask
    may_skip = np.zeros(len(blocks), dtype=bool)
    reused_whole = np.zeros((mask.shape[0], len(blocks)), dtype=bool)
    if schedule.reuse == "residual":
        for block in blocks:
            if block.stack.skippable and len(block.present):
                reused_whole[:, block.index] = (~mask[:, block.index, block.present]).all(axis=1)
                may_skip[block.index] = reused_whole[:, block.index].any()
    whole_stack = {path: reused_whole[:, indices].all(axis=1) for path, indices in stacks.items()}
    partial_reuse = (~mask & ~reused_whole[:, :, None]).any(axis=0)
    return SchedulePlan(mask, may_skip, ~mask.all(axis=0), partial_reuse, whole_stack)


def shape_key(args: tuple, kwargs: dict) -> tuple:
    """The shapes of a call's tensor arguments: MACs are counted once per key."""
    shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
    shapes += [(k, tuple(v.shape)) for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor)]
    return tuple(shapes)


def count_call_macs(inner: Callable, args: tuple, kwargs: dict) -> float:
    """The MACs of ``inner(*args, **kwargs)``, run on fake tensors (shapes only, nothing computed) under the FLOP
    counter. The caller keeps anything inside ``inner`` from deciding while it runs."""
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        fake_args, fake_kwargs = tree_map_only(torch.Tensor, fake.from_tensor, (args, kwargs))
        with flop_counter() as counter, torch.no_grad():
            inner(*fake_args, **fake_kwargs)
    return counter.get_total_flops() / 2


def same_batch(cache: FeatureCache, args: tuple, kwargs: dict) -> bool:
    """Whether ``cache`` holds rows for the batch of a call whose first tensor argument is in ``args``/``kwargs``
    (True when it has none, or the cache has no batch yet)."""
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    return first is None or cache.batch_size in (None, first.shape[0])
