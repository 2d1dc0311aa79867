"""Hook plumbing of feature caching: wraps blocks and components per instance and applies the decisions.

Compile-safe by design: each wrapper (``_block_forward``, ``_component_forward``) is a fenced frame (see
:mod:`accel.patches`) that asks an eager helper what to do, then either returns the reused value or calls the
original forward, which ``torch.compile`` traces as a region of its own. No decision, step index or cache
lookup is ever traced, so the compiled regions carry no guards on them and recompiles do not grow with the step
count. Every block is wrapped; a component only where the plan reuses it inside a block that runs.

State lives per branch (see :mod:`accel.context`): a pipeline that calls the transformer separately for
the conditional and unconditional prediction gets separate caches, and every cached tensor keeps its batch
rows, so samples never share entries. The dynamic (first-block) policy's per-sample path is the
:class:`~accel.caching.per_sample.PerSampleBlocks` mixin; the records the engine keeps (its blocks, the schedule's
plan for a step count, each branch's caches) and MAC counting are in :mod:`accel.caching.engine_plan`.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np

from accel.adapters import BlockStack
from accel.api import Handle, Target, register
from accel.caching.calls import COMPUTE, BlockCall, ComponentCall
from accel.caching.config import CacheConfig
from accel.caching.engine_plan import (
    BranchState,
    EngineBlock,
    SchedulePlan,
    count_call_macs,
    same_batch,
    schedule_plan,
    shape_key,
)
from accel.caching.notices import Notices
from accel.caching.per_sample import Decision, PerSampleBlocks
from accel.caching.policy import FirstBlockPolicy
from accel.caching.schedule import Schedule, layout_of
from accel.caching.state import Feature, FeatureCache, map_feature, residual_of, sum_features
from accel.caching.stats import CacheStats
from accel.caching.token_features import Streams, TokenFeatures, block_streams, component_streams
from accel.caching.tokens import TokenStepConfig
from accel.hooks import MethodWrapper
from accel.patches import PatchLog, eager

logger = logging.getLogger(__name__)


class CacheEngine(PerSampleBlocks):
    """Runs one :class:`CacheConfig` on one transformer; created by ``accel.apply``."""

    def __init__(self, target: Target, config: CacheConfig, patch_log: PatchLog):
        if TokenStepConfig in target.tracker.active:
            raise ValueError(
                "CacheConfig applied after TokenStepConfig would wrap the blocks outside its token gathering; "
                "apply both in one accel.apply(pipe, CacheConfig(...), TokenStepConfig(...)) or CacheConfig first"
            )
        self.target, self.config, self.tracker = target, config, target.tracker
        self.policy = config.schedule
        self.dynamic = isinstance(self.policy, FirstBlockPolicy)
        layout = layout_of(target.transformer, target.spec)
        if isinstance(self.policy, Schedule):
            self.policy.check_layout(layout)
        self.components = layout.components
        self.blocks = [
            EngineBlock.describe(i, stack, module, self.components)
            for i, (stack, module) in enumerate(target.spec.block_list(target.transformer))
        ]
        self.stats_data = CacheStats.empty(self.components)
        self.decision_log: list[Decision] = []
        self.notices = Notices(self.policy)
        self._branches: dict[int, BranchState] = {}
        self._plans: dict[int, SchedulePlan] = {}
        self._stacks: dict[str, list[int]] = {}  # stack path -> its block indices, in order
        for block in self.blocks:
            self._stacks.setdefault(block.stack.path, []).append(block.index)
        self._macs: dict[tuple, float] = {}
        self._active: tuple | None = None
        self._first_call: tuple | None = None  # the dynamic policy's (step, latents, rows) at a step's first call
        self.patch_log = patch_log
        self._wrapped_components: set[tuple[int, int]] = set()  # (block, component) with a wrapper installed
        self._call_wrappers: dict[int, MethodWrapper] = {}  # block -> the wrapper of its forward or compiled call
        try:
            self._install(None if self.dynamic else self._plan(None))
        except BaseException:
            self.detach()
            raise
        self.tracker.add_reset_listener(self.reset)
        self.tracker.add_call_listener(self._check_wrappers)

    def _install(self, plan: SchedulePlan | None) -> None:
        """Wrap every block (to store residuals, reuse them, and count what ran) and the components the plan
        may reuse inside a running block: a component that is only ever reused with its whole block, or
        never, runs unwrapped."""
        for block in self.blocks:
            if block.index not in self._call_wrappers:
                self._call_wrappers[block.index] = self.patch_log.wrap_call(
                    block.module, partial(self._block_forward, block)
                )
            for c in block.present:
                if (
                    plan is None
                    or (block.index, int(c)) in self._wrapped_components
                    or not plan.partial[block.index, c]
                ):
                    continue
                module = getattr(block.module, self._module_name(block.stack, c))
                self.patch_log.wrap(module, "forward", partial(self._component_forward, block, int(c)))
                self._wrapped_components.add((block.index, int(c)))

    def _module_name(self, stack: BlockStack, component: int) -> str:
        name = self.components[component]
        return next(c.module for c in stack.components if c.name == name)

    def _check_wrappers(self, args: tuple = (), kwargs: dict | None = None) -> None:
        """At each transformer call: a block compiled in place after its compiled call was wrapped (a new
        ``module.compile()``) has replaced the wrapper; wrap the new compiled call, saying so once."""
        for index, wrapper in list(self._call_wrappers.items()):
            module = self.blocks[index].module
            current = module.__dict__.get(wrapper.name)
            if wrapper.name == "_compiled_call_impl" and not wrapper.in_chain_of(current):
                logger.info(
                    "accel: block %d was compiled again after accel.apply; wrapping its new compiled call", index
                )
                self._call_wrappers[index] = self.patch_log.wrap_call(
                    module, partial(self._block_forward, self.blocks[index])
                )

    def detach(self) -> None:
        """Remove every wrapper and drop all cached state."""
        self.patch_log.undo()
        self._wrapped_components.clear()
        self._call_wrappers.clear()
        self.tracker.remove_call_listener(self._check_wrappers)
        self.tracker.remove_reset_listener(self.reset)
        self.reset()

    def reset(self) -> None:
        """Drop the cached features of all branches (a new trajectory starts). Called with the step count
        known (at ``set_timesteps``), it also wraps whatever the plan for that count may reuse, before any
        transformer call of the trajectory."""
        self.notices.end_call(self.stats_data, self.decision_log)
        self._branches.clear()
        self._first_call = None
        if not self.dynamic and self.tracker.num_steps and self.patch_log.records:
            self._install(self._plan(self.tracker.num_steps))

    # -- decisions ---------------------------------------------------------------------------------------

    def _plan(self, num_steps: int | None) -> SchedulePlan:
        """The schedule's decisions for a step count, and which blocks and stacks may be reused whole."""
        key = num_steps or 0
        if key not in self._plans:
            schedule = self.policy.resample(num_steps) if num_steps else self.policy
            if schedule.num_steps != self.policy.num_steps:
                self.notices.resampled(self.policy, schedule)
            self._plans[key] = schedule_plan(schedule, self.blocks, self._stacks)
        return self._plans[key]

    def _row(self, step: int, mask: np.ndarray, block: int) -> np.ndarray:
        if step >= mask.shape[0]:
            return np.ones(mask.shape[2], dtype=bool)
        return mask[step, block]

    # -- helpers -----------------------------------------------------------------------------------------

    def _tokens(self) -> TokenFeatures | None:
        """The current call's token view when per-token steps run the blocks on active tokens (cached features
        are then kept per token at full length; see :mod:`accel.caching.token_features`), else None."""
        handle = self.tracker.active.get(TokenStepConfig)
        return None if handle is None else handle.token_features()

    def _update(self, cache: FeatureCache, step: int, value: Feature, streams: Streams) -> None:
        """Store ``value`` computed at ``step``: as it is, or merged into the full-length per-token value (its
        tensors running over the tokens as ``streams`` say)."""
        tokens = self._tokens()
        if tokens is not None:
            value = tokens.merge(cache, value, streams)
            if value is None:
                return
        cache.update(step, value)

    def _state(self, branch: int) -> BranchState:
        if branch not in self._branches:
            self._branches[branch] = BranchState()
        return self._branches[branch]

    def _new_cache(self, order: int = 0) -> FeatureCache:
        return FeatureCache(order=order, dtype=self.config.cache_dtype)

    def _block_key(self, block: EngineBlock, args: tuple, kwargs: dict) -> tuple:
        return ("block", block.stack.path, shape_key(args, kwargs)) if self.config.count_macs else ()

    def _saved(self, key: tuple) -> None:
        self.stats_data.macs_saved += self._macs.get(key, 0.0)

    def _tally(self, component: int, reused: bool) -> None:
        ctx = self.tracker.current
        self.stats_data.add_call(self.components[component], None if ctx is None else ctx.step, reused)

    def _watch(self, ctx) -> None:
        """Watch each pipeline call for a policy that reuses nothing (see :class:`Notices`)."""
        if ctx.trajectory == self.notices.watching:
            return
        expects = self.dynamic or bool(self._plan(ctx.num_steps).may_reuse.any())
        self.notices.start_call(ctx.trajectory, ctx.num_steps, self.stats_data, len(self.decision_log), expects)

    def _after_block(self, block: EngineBlock, key: tuple) -> None:
        self.stats_data.block_calls += 1
        self.stats_data.macs_blocks += self._macs.get(key, 0.0)
        if block.index == len(self.blocks) - 1:
            held = sum(cache.nbytes for state in self._branches.values() for cache in state.caches())
            held += sum(
                kept[1].nbytes for state in self._branches.values() for kept in state.stack_sums.values() if kept[1]
            )
            self.stats_data.cache_bytes = held
            self.stats_data.peak_cache_bytes = max(self.stats_data.peak_cache_bytes, held)
            ctx = self.tracker.current
            if ctx is not None and ctx.num_steps and ctx.step >= ctx.num_steps - 1:
                self.notices.end_call(self.stats_data, self.decision_log)

    def _skip(self, block: EngineBlock, key: tuple, inputs: tuple, residual: Feature):
        """The block reused whole: ``inputs + residual``, or ``inputs`` as they are when ``residual`` is None
        (its residual was already added at the first block of a stack skipped at once)."""
        self.stats_data.blocks_skipped += 1
        for c in block.present:
            self._tally(int(c), reused=True)
        self._saved(key)
        self._after_block(block, key)
        if residual is None:
            output = inputs
        else:
            output = map_feature(lambda r, x: x + r.to(x.dtype), residual, inputs)
        return output[0] if len(output) == 1 else output

    def _skip_stack(self, block: EngineBlock, key: tuple, state: BranchState, step: int, args, kwargs):
        """At a step that reuses every block of the stack whole, add the sum of their residuals once, at the
        first block, and pass the result through the others: one addition instead of one per block. None
        when it cannot (a block has no cached residual of this shape yet): then each block decides alone."""
        path = block.stack.path
        inputs = block.inputs(args, kwargs)
        if block.index != self._stacks[path][0]:
            done = state.stack_skip.get(path)
            return self._skip(block, key, inputs, None) if done == (step, True) else None
        total = self._stack_residual(state, block.stack, step, inputs)
        state.stack_skip[path] = (step, total is not None)
        return None if total is None else self._skip(block, key, inputs, total)

    def _stack_residual(self, state: BranchState, stack: BlockStack, step: int, inputs: tuple) -> Feature:
        """The sum of the cached residuals of the stack's blocks at ``step``, or None if one is missing, of
        another shape or lacks an output. When the blocks were computed at the same steps, their sum is cached
        once per change (:meth:`FeatureCache.sum_of`) and forecast like one block."""
        path = stack.path
        caches = [state.blocks.get(i) for i in self._stacks[path]]
        tokens, streams = self._tokens(), block_streams(stack)
        like = inputs if tokens is None else tokens.like(inputs, streams)
        if any(cache is None or not cache.matches(like) or not cache.complete for cache in caches):
            return None
        versions = tuple(cache.version for cache in caches)
        kept = state.stack_sums.get(path)
        if kept is None or kept[0] != versions:
            kept = state.stack_sums[path] = (versions, FeatureCache.sum_of(caches))
        if kept[1] is not None:
            predicted = _gathered(tokens, kept[1].predict(step), streams)
            return map_feature(lambda t, like: t.to(like.dtype), predicted, inputs)
        return sum_features([_gathered(tokens, cache.predict(step), streams) for cache in caches])

    # -- forwards: fenced frames that decide eagerly and compute in the caller's compiled region ------------

    def _block_forward(self, block: EngineBlock, inner, *args, **kwargs):
        call = self._enter_block(block, args, kwargs)
        if call.output is not COMPUTE:
            return call.output
        try:
            if call.count:
                self._count(call.key, inner, call.args, call.kwargs)
            output = inner(*call.args, **call.kwargs)
        except BaseException:
            self._active = call.previous
            raise
        return self._exit_block(block, call, output)

    def _component_forward(self, block: EngineBlock, component: int, inner, *args, **kwargs):
        call = self._enter_component(block, component, args, kwargs)
        if call.output is not COMPUTE:
            return call.output
        if call.count:
            self._count(call.key, inner, args, kwargs)
        output = inner(*args, **kwargs)
        self._exit_component(block, component, call, output)
        return output

    # -- decisions around a block or component call (eager) ----------------------------------------------

    @eager
    def _count(self, key: tuple, inner, args: tuple, kwargs: dict) -> None:
        """Count ``inner``'s MACs once per input shape, to know what a reuse saves: a run on fake tensors (shapes
        only, nothing computed) under a FLOP counter, with no component inside it deciding anything. The real
        call follows, compiled where the caller is, so counting never changes an output."""
        previous, self._active = self._active, None
        try:
            self._macs[key] = count_call_macs(inner, args, kwargs)
        finally:
            self._active = previous

    def _must_count(self, key: tuple) -> bool:
        return self.config.count_macs and key not in self._macs

    @eager
    def _enter_block(self, block: EngineBlock, args: tuple, kwargs: dict) -> BlockCall:
        """What to do about one block call: a reused output, or the arguments to run it on."""
        ctx = self.tracker.current
        if ctx is None:
            return BlockCall(COMPUTE, args, kwargs, previous=self._active)
        state = self._state(ctx.branch)
        key = self._block_key(block, args, kwargs)
        self._watch(ctx)
        if self.dynamic:
            return self._enter_dynamic(block, key, state, ctx, args, kwargs)
        plan = self._plan(ctx.num_steps)
        if ctx.step < len(plan.mask) and plan.whole_stack[block.stack.path][ctx.step]:
            output = self._skip_stack(block, key, state, ctx.step, args, kwargs)
            if output is not None:
                return BlockCall(output)
        row = self._row(ctx.step, plan.mask, block.index)
        skippable = plan.may_skip[block.index]
        inputs = block.inputs(args, kwargs) if skippable else ()
        if skippable and not row[block.present].any():
            cache, tokens, streams = state.blocks.get(block.index), self._tokens(), block_streams(block.stack)
            if cache is not None and cache.matches(inputs if tokens is None else tokens.like(inputs, streams)):
                predicted = _gathered(tokens, cache.predict(ctx.step), streams)
                return BlockCall(self._skip(block, key, inputs, predicted))
            if cache is None or not len(cache):
                self.notices.nothing_cached(ctx.step, block.index, "the whole block")
        previous, self._active = self._active, (state, ctx.step, block.index, row, plan.may_reuse[block.index])
        return BlockCall(
            COMPUTE, args, kwargs, key, self._must_count(key), previous, state, ctx.step, inputs, skippable
        )

    @eager
    def _exit_block(self, block: EngineBlock, call: BlockCall, output):
        """Store what the computed block's call left behind; returns the block's output."""
        self._active = call.previous
        if call.state is None:
            return output
        if call.finish is not None:
            return call.finish(output)
        self._after_block(block, call.key)
        for c in block.present:
            if (block.index, int(c)) not in self._wrapped_components:
                self._tally(int(c), reused=False)
        if call.store:
            cache = call.state.blocks.setdefault(block.index, self._new_cache(self.policy.forecast_order))
            self._update(cache, call.step, residual_of(output, call.inputs), block_streams(block.stack))
        return output

    @eager
    def _enter_component(self, block: EngineBlock, component: int, args: tuple, kwargs: dict) -> ComponentCall:
        active = self._active
        if active is None or active[2] != block.index:
            return ComponentCall(COMPUTE)
        state, step, _, row, store = active
        name = self.components[component]
        key = ("component", block.stack.path, name, shape_key(args, kwargs)) if self.config.count_macs else ()
        cache = state.components.get((block.index, component))
        if not row[component] and cache is not None and len(cache) and same_batch(cache, args, kwargs):
            self.stats_data.add_call(name, step, reused=True)
            self._saved(key)
            streams = component_streams(block.stack, name)
            return ComponentCall(_gathered(self._tokens(), cache.predict(step), streams))
        if not row[component] and (cache is None or not len(cache)):
            self.notices.nothing_cached(step, block.index, name)
        self.stats_data.add_call(name, step, reused=False)
        return ComponentCall(COMPUTE, key, self._must_count(key), state if store[component] else None, step)

    @eager
    def _exit_component(self, block: EngineBlock, component: int, call: ComponentCall, output) -> None:
        if call.state is None:
            return
        cache = call.state.components.get((block.index, component))
        if cache is None:
            cache = call.state.components[(block.index, component)] = self._new_cache(self.policy.forecast_order)
        self._update(cache, call.step, output, component_streams(block.stack, self.components[component]))


def _gathered(tokens: TokenFeatures | None, feature: Feature, streams: Streams) -> Feature:
    """A prediction at the current call's active tokens (as it is without per-token steps)."""
    return feature if tokens is None else tokens.gather(feature, streams)


class CacheHandle(Handle):
    """Handle of an applied :class:`CacheConfig`: ``stats()``, ``reset()``, ``remove()``."""

    def __init__(self, engine: CacheEngine):
        super().__init__("caching")
        self.engine = engine
        self.patch_log = engine.patch_log

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
        self.engine.notices.forget_call()

    @property
    def decision_log(self) -> list[Decision]:
        """Dynamic policies: every :class:`Decision` made, in order."""
        return list(self.engine.decision_log)


@register(CacheConfig, name="caching", phase="forwards")
def apply_cache(target: Target, config: CacheConfig) -> CacheHandle:
    """Attach feature caching to ``target``; returns its handle. Use ``accel.apply`` rather than this."""
    return CacheHandle(CacheEngine(target, config, PatchLog("caching")))
