"""Hook plumbing of feature caching: wraps blocks and components per instance and applies the decisions.

State lives per branch (see :mod:`accel.context`): a pipeline that calls the transformer separately for
the conditional and unconditional prediction gets separate caches, and every cached tensor keeps its batch
rows, so samples never share entries. The dynamic (first-block) policy's per-sample path is the
:class:`~accel.caching.per_sample.PerSampleBlocks` mixin.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from accel.adapters import BlockStack
from accel.api import Handle, Target, register
from accel.caching.config import CacheConfig
from accel.caching.per_sample import Decision, PerSampleBlocks
from accel.caching.policy import FirstBlockPolicy
from accel.caching.schedule import Schedule, layout_of
from accel.caching.state import Feature, FeatureCache, map_feature, residual_of, sum_features
from accel.caching.stats import CacheStats
from accel.hooks import MethodWrapper, wrap_forward


class _Plan(NamedTuple):
    mask: np.ndarray  # (steps, blocks, components) compute decisions
    may_skip: np.ndarray  # (blocks,) whether the block is ever reused whole
    may_reuse: np.ndarray  # (blocks, components) whether the component is ever reused
    whole_stack: dict[str, np.ndarray]  # stack path -> (steps,) whether every block of the stack is reused whole


@dataclass
class _BranchState:
    components: dict[tuple[int, int], FeatureCache] = field(default_factory=dict)
    blocks: dict[int, FeatureCache] = field(default_factory=dict)
    stack_skip: dict[str, tuple[int, bool]] = field(default_factory=dict)  # path -> (step, skipped at once)
    stack_sums: dict[str, tuple[tuple, FeatureCache | None]] = field(default_factory=dict)  # path -> (versions, sum)
    first_residual: FeatureCache | None = None
    compute_rows: torch.Tensor | None = None
    consecutive_reuse: torch.Tensor | None = None

    def caches(self):
        yield from self.components.values()
        yield from self.blocks.values()
        if self.first_residual is not None:
            yield self.first_residual


@dataclass(frozen=True)
class _Block:
    index: int
    stack: BlockStack
    module: torch.nn.Module
    present: np.ndarray  # indices of the schedule components this block has
    input_positions: tuple[int | None, ...]  # positional index of each output-named forward argument


def _shape_key(args: tuple, kwargs: dict) -> tuple:
    shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
    shapes += [(k, tuple(v.shape)) for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor)]
    return tuple(shapes)


class CacheEngine(PerSampleBlocks):
    """Runs one :class:`CacheConfig` on one transformer; created by ``accel.apply``."""

    def __init__(self, target: Target, config: CacheConfig):
        self.target, self.config, self.tracker = target, config, target.tracker
        self.policy = config.schedule
        self.dynamic = isinstance(self.policy, FirstBlockPolicy)
        layout = layout_of(target.transformer, target.spec)
        if isinstance(self.policy, Schedule):
            self.policy.check_layout(layout)
        self.components = layout.components
        self.blocks = [
            self._describe(i, stack, module)
            for i, (stack, module) in enumerate(target.spec.block_list(target.transformer))
        ]
        self.stats_data = CacheStats.empty(self.components)
        self.decision_log: list[Decision] = []
        self._branches: dict[int, _BranchState] = {}
        self._plans: dict[int, _Plan] = {}
        self._stacks: dict[str, list[int]] = {}  # stack path -> its block indices, in order
        for block in self.blocks:
            self._stacks.setdefault(block.stack.path, []).append(block.index)
        self._macs: dict[tuple, float] = {}
        self._active: tuple | None = None
        self._wrappers: list[MethodWrapper] = []
        try:
            for block in self.blocks:
                self._wrappers.append(wrap_forward(block.module, partial(self._block_forward, block)))
                for c in block.present:
                    module = getattr(block.module, self._module_name(block.stack, c))
                    self._wrappers.append(wrap_forward(module, partial(self._component_forward, block, int(c))))
        except BaseException:
            self.detach()
            raise
        self.tracker.add_reset_listener(self.reset)

    def _module_name(self, stack: BlockStack, component: int) -> str:
        name = self.components[component]
        return next(c.module for c in stack.components if c.name == name)

    def _describe(self, index: int, stack: BlockStack, module: torch.nn.Module) -> _Block:
        present = [
            i
            for i, name in enumerate(self.components)
            for c in stack.components
            if c.name == name and isinstance(getattr(module, c.module, None), torch.nn.Module)
        ]
        parameters = list(inspect.signature(module.forward).parameters)
        positions = tuple(parameters.index(n) if n in parameters else None for n in stack.outputs)
        return _Block(index, stack, module, np.array(present, dtype=int), positions)

    def detach(self) -> None:
        """Remove every wrapper and drop all cached state."""
        for wrapper in reversed(self._wrappers):
            wrapper.remove()
        self._wrappers.clear()
        self.tracker.remove_reset_listener(self.reset)
        self.reset()

    def reset(self) -> None:
        """Drop the cached features of all branches (a new trajectory starts)."""
        self._branches.clear()

    # -- decisions ---------------------------------------------------------------------------------------

    def _plan(self, num_steps: int | None) -> _Plan:
        """The schedule's decisions for a step count, and which blocks and stacks may be reused whole."""
        key = num_steps or 0
        if key not in self._plans:
            schedule = self.policy.resample(num_steps) if num_steps else self.policy
            mask = schedule.mask
            may_skip = np.zeros(len(self.blocks), dtype=bool)
            may_reuse = ~mask.all(axis=0)
            reused_whole = np.zeros((mask.shape[0], len(self.blocks)), dtype=bool)
            if schedule.reuse == "residual":
                for block in self.blocks:
                    if block.stack.skippable and len(block.present):
                        reused_whole[:, block.index] = (~mask[:, block.index, block.present]).all(axis=1)
                        may_skip[block.index] = reused_whole[:, block.index].any()
            whole_stack = {path: reused_whole[:, indices].all(axis=1) for path, indices in self._stacks.items()}
            self._plans[key] = _Plan(mask, may_skip, may_reuse, whole_stack)
        return self._plans[key]

    def _row(self, step: int, mask: np.ndarray, block: int) -> np.ndarray:
        if step >= mask.shape[0]:
            return np.ones(mask.shape[2], dtype=bool)
        return mask[step, block]

    # -- helpers -----------------------------------------------------------------------------------------

    def _state(self, branch: int) -> _BranchState:
        if branch not in self._branches:
            self._branches[branch] = _BranchState()
        return self._branches[branch]

    def _new_cache(self, order: int = 0) -> FeatureCache:
        return FeatureCache(order=order, dtype=self.config.cache_dtype)

    def _inputs(self, block: _Block, args: tuple, kwargs: dict) -> tuple:
        values = []
        for name, position in zip(block.stack.outputs, block.input_positions):
            if name in kwargs:
                values.append(kwargs[name])
            else:
                values.append(args[position] if position is not None and position < len(args) else None)
        return tuple(values)

    def _call(self, key: tuple, inner, args: tuple, kwargs: dict):
        """Run ``inner``, measuring its MACs the first time ``key`` is seen."""
        if not self.config.count_macs or key in self._macs:
            return inner(*args, **kwargs)
        with FlopCounterMode(display=False) as counter:
            output = inner(*args, **kwargs)
        self._macs[key] = counter.get_total_flops() / 2
        return output

    def _block_key(self, block: _Block, args: tuple, kwargs: dict) -> tuple:
        return ("block", block.stack.path, _shape_key(args, kwargs)) if self.config.count_macs else ()

    def _saved(self, key: tuple) -> None:
        self.stats_data.macs_saved += self._macs.get(key, 0.0)

    def _after_block(self, block: _Block, key: tuple) -> None:
        self.stats_data.block_calls += 1
        self.stats_data.macs_blocks += self._macs.get(key, 0.0)
        if block.index == len(self.blocks) - 1:
            held = sum(cache.nbytes for state in self._branches.values() for cache in state.caches())
            held += sum(
                kept[1].nbytes for state in self._branches.values() for kept in state.stack_sums.values() if kept[1]
            )
            self.stats_data.cache_bytes = held
            self.stats_data.peak_cache_bytes = max(self.stats_data.peak_cache_bytes, held)

    def _skip(self, block: _Block, key: tuple, inputs: tuple, residual: Feature):
        """The block reused whole: ``inputs + residual``, or ``inputs`` as they are when ``residual`` is None
        (its residual was already added at the first block of a stack skipped at once)."""
        self.stats_data.blocks_skipped += 1
        for c in block.present:
            self.stats_data.reused[self.components[c]] += 1
        self._saved(key)
        self._after_block(block, key)
        if residual is None:
            output = inputs
        else:
            output = map_feature(lambda r, x: x + r.to(x.dtype), residual, inputs)
        return output[0] if len(output) == 1 else output

    def _skip_stack(self, block: _Block, key: tuple, state: _BranchState, step: int, args, kwargs):
        """At a step that reuses every block of the stack whole, add the sum of their residuals once, at the
        first block, and pass the result through the others: one addition instead of one per block. None
        when it cannot (a block has no cached residual of this shape yet): then each block decides alone."""
        path = block.stack.path
        inputs = self._inputs(block, args, kwargs)
        if block.index != self._stacks[path][0]:
            done = state.stack_skip.get(path)
            return self._skip(block, key, inputs, None) if done == (step, True) else None
        total = self._stack_residual(state, path, step, inputs)
        state.stack_skip[path] = (step, total is not None)
        return None if total is None else self._skip(block, key, inputs, total)

    def _stack_residual(self, state: _BranchState, path: str, step: int, inputs: tuple) -> Feature:
        """The sum of the cached residuals of the stack's blocks at ``step``, or None if one is missing, of
        another shape or lacks an output. When the blocks were computed at the same steps, their sum is cached
        once per change (:meth:`FeatureCache.sum_of`) and forecast like one block."""
        caches = [state.blocks.get(i) for i in self._stacks[path]]
        if any(cache is None or not cache.matches(inputs) or not cache.complete for cache in caches):
            return None
        versions = tuple(cache.version for cache in caches)
        kept = state.stack_sums.get(path)
        if kept is None or kept[0] != versions:
            kept = state.stack_sums[path] = (versions, FeatureCache.sum_of(caches))
        if kept[1] is not None:
            return map_feature(lambda t, like: t.to(like.dtype), kept[1].predict(step), inputs)
        return sum_features([cache.predict(step) for cache in caches])

    def _run(
        self,
        block: _Block,
        key: tuple,
        state,
        step: int,
        row: np.ndarray,
        store: np.ndarray,
        inner,
        args,
        kwargs,
    ):
        """Run the block with per-component decisions ``row`` (True = compute), storing where ``store``."""
        previous, self._active = self._active, (state, step, block.index, row, store)
        try:
            output = self._call(key, inner, args, kwargs)
        finally:
            self._active = previous
        self._after_block(block, key)
        return output

    # -- forwards ----------------------------------------------------------------------------------------

    def _block_forward(self, block: _Block, inner, *args, **kwargs):
        ctx = self.tracker.current
        if ctx is None:
            return inner(*args, **kwargs)
        state = self._state(ctx.branch)
        key = self._block_key(block, args, kwargs)
        if self.dynamic:
            return self._dynamic_block(block, key, state, ctx, inner, args, kwargs)
        mask, may_skip, may_reuse, whole_stack = self._plan(ctx.num_steps)
        if ctx.step < len(mask) and whole_stack[block.stack.path][ctx.step]:
            output = self._skip_stack(block, key, state, ctx.step, args, kwargs)
            if output is not None:
                return output
        row = self._row(ctx.step, mask, block.index)
        skippable = may_skip[block.index]
        inputs = self._inputs(block, args, kwargs) if skippable else ()
        if skippable and not row[block.present].any():
            cache = state.blocks.get(block.index)
            if cache is not None and cache.matches(inputs):
                return self._skip(block, key, inputs, cache.predict(ctx.step))
        output = self._run(block, key, state, ctx.step, row, may_reuse[block.index], inner, args, kwargs)
        if skippable:
            cache = state.blocks.setdefault(block.index, self._new_cache(self.policy.forecast_order))
            cache.update(ctx.step, residual_of(output, inputs))
        return output

    def _component_forward(self, block: _Block, component: int, inner, *args, **kwargs):
        active = self._active
        if active is None or active[2] != block.index:
            return inner(*args, **kwargs)
        state, step, _, row, store = active
        name = self.components[component]
        key = ("component", block.stack.path, name, _shape_key(args, kwargs)) if self.config.count_macs else ()
        cache = state.components.get((block.index, component))
        if not row[component] and cache is not None and len(cache) and _same_batch(cache, args, kwargs):
            self.stats_data.reused[name] += 1
            self._saved(key)
            return cache.predict(step)
        output = self._call(key, inner, args, kwargs)
        self.stats_data.computed[name] += 1
        if store[component]:
            if cache is None:
                cache = state.components[(block.index, component)] = self._new_cache(self.policy.forecast_order)
            cache.update(step, output)
        return output


def _same_batch(cache: FeatureCache, args: tuple, kwargs: dict) -> bool:
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    return first is None or cache.batch_size in (None, first.shape[0])


class CacheHandle(Handle):
    """Handle of an applied :class:`CacheConfig`: ``stats()``, ``reset()``, ``remove()``."""

    def __init__(self, engine: CacheEngine):
        super().__init__()
        self.engine = engine

    def _remove(self) -> None:
        self.engine.detach()

    def stats(self) -> CacheStats:
        """A snapshot of what was computed vs reused, MACs saved and cache memory."""
        return self.engine.stats_data.snapshot()

    def reset(self) -> None:
        """Drop cached features, as at the start of a pipeline call."""
        self.engine.reset()

    def reset_stats(self) -> None:
        """Zero the counters."""
        self.engine.stats_data = CacheStats.empty(self.engine.components)
        self.engine.decision_log.clear()

    @property
    def decision_log(self) -> list[Decision]:
        """Dynamic policies: every :class:`Decision` made, in order."""
        return list(self.engine.decision_log)


@register(CacheConfig)
def apply_cache(target: Target, config: CacheConfig) -> CacheHandle:
    """Attach feature caching to ``target``; returns its handle. Use ``accel.apply`` rather than this."""
    return CacheHandle(CacheEngine(target, config))
