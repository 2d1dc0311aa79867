"""The first-block policy's path through the cache engine: per-sample decisions, later blocks on the
computing samples only.

:class:`PerSampleBlocks` is mixed into :class:`~accel.caching.engine.CacheEngine`; it runs when the config's
schedule is a :class:`~accel.caching.policy.FirstBlockPolicy`. The first block always runs and its residual
decides, per sample, whether the later blocks compute. Each block stack keeps one cached residual (its output
minus its input; for the first stack, minus the first block's output): a sample that reuses takes input +
residual at the stack's first block and passes through the others, and the computing samples run each block
alone (every batch-major argument sliced) and refresh their rows of the stack residual at its last block.

GPU-friendly: the decision reads the per-sample change once per transformer call (one host-device
synchronisation, in :meth:`PerSampleBlocks._decide`, which also brings back whether the call's rows pair as CFG
branches of the same latents, or follow the step's first call); the row indices are copied to the device once per call;
every later block decides from host values. When every sample computes, a block costs what it costs
unwrapped, plus one subtraction per stack to refresh its residual.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch

from accel.caching.calls import COMPUTE, BlockCall, RowDecision, StackCall
from accel.caching.policy import first_block_decision, paired_change, relative_change, same_halves
from accel.caching.state import as_tuple, map_feature, residual_of

if TYPE_CHECKING:  # the engine's records, for annotations only
    from accel.caching.engine_plan import BranchState, EngineBlock


class Decision(NamedTuple):
    """One per-sample decision of a dynamic policy.

    Attributes:
        step: denoising step.
        branch: transformer call within the step.
        compute: per sample, whether the later blocks were computed.
        change: per sample, the relative change of the first block's residual (None without history).
    """

    step: int
    branch: int
    compute: tuple[bool, ...]
    change: tuple[float, ...] | None


class PerSampleBlocks:
    """The dynamic-policy methods of the cache engine (a mixin: it uses the engine's state and helpers)."""

    def _stack_span(self, block: EngineBlock) -> tuple[int, int]:
        """First and last block index of ``block``'s stack that the stack residual covers."""
        indices = self._stacks[block.stack.path]
        return (indices[0] + 1 if indices[0] == 0 else indices[0]), indices[-1]

    def _enter_dynamic(self, block: EngineBlock, key: tuple, state: BranchState, ctx, args, kwargs) -> BlockCall:
        """Called eagerly by the engine before a block under the dynamic policy."""
        skippable = block.stack.skippable and len(block.present) > 0
        inputs = block.inputs(args, kwargs) if skippable else ()
        compute = BlockCall(COMPUTE, args, kwargs, key, self._must_count(key), self._active, state, ctx.step)
        if not skippable:
            return compute
        if block.index == 0:
            return compute._replace(finish=partial(self._decide, block, key, state, ctx, inputs))
        span = self._stack_span(block)
        first, last = block.index == span[0], block.index == span[1]
        if first:
            self._open_stack(block, state, ctx.step, inputs)
        stack = state.stack_calls.get(block.stack.path)
        if stack is None or stack.step != ctx.step:
            return compute
        finish = partial(self._finish_block, block, key, state, stack, inputs, first, last)
        if stack.mode == "all":
            return compute._replace(finish=finish)
        if stack.mode == "none":
            return BlockCall(self._skip(block, key, inputs, stack.residual if first else None))
        picked = state.rows.picked
        batch = state.rows.rows.shape[0]
        sub_args = tuple(_take_rows(a, picked, batch) for a in args)
        sub_kwargs = {name: _take_rows(value, picked, batch) for name, value in kwargs.items()}
        self.stats_data.macs_saved += self._macs.get(key, 0.0) * (1 - len(picked) / batch)
        return compute._replace(args=sub_args, kwargs=sub_kwargs, finish=finish)

    def _open_stack(self, block: EngineBlock, state: BranchState, step: int, inputs: tuple) -> None:
        """At a stack's first block: this call's mode for the stack, and what its samples start from."""
        decision, cache = state.rows, state.stack_residuals.get(block.stack.path)
        mode = "all" if decision is None or decision.step != step else decision.mode
        if mode != "all" and (cache is None or not cache.matches(inputs) or not cache.complete):
            mode = "all"
        if mode == "all":
            stack = StackCall(step, mode, start=inputs, cache=cache)
        else:
            residual = cache.predict(step)
            base = map_feature(lambda r, x: x + r.to(x.dtype), residual, inputs)
            start = (
                None if mode == "none" else tuple(_take_rows(x, decision.picked, len(decision.rows)) for x in inputs)
            )
            stack = StackCall(step, mode, start=start, base=base, residual=residual, cache=cache)
        state.stack_calls[block.stack.path] = stack

    def _finish_block(self, block, key, state, stack: StackCall, inputs, first: bool, last: bool, output):
        """After a block ran on all samples or on the computing ones: the full-batch output, and at the stack's
        last block its refreshed residual."""
        self._after_block(block, key)
        for c in block.present:
            self._tally(int(c), reused=False)
        computed = as_tuple(output)
        if stack.mode == "all":
            if last:
                cache = state.stack_residuals.setdefault(block.stack.path, self._new_cache())
                cache.update(stack.step, residual_of(output, stack.start))
            return output
        picked = state.rows.picked
        base = stack.base if first else inputs  # the reused samples' rows already hold their stack output
        full = map_feature(lambda b, new: b.index_copy(0, picked, new.to(b.dtype)), base, computed)
        if last:
            fresh = residual_of(output, stack.start)
            merged = map_feature(lambda old, new: old.index_copy(0, picked, new.to(old.dtype)), stack.residual, fresh)
            stack.cache.update(stack.step, merged)
        return full[0] if len(full) == 1 else full

    def _decide(self, block: EngineBlock, key: tuple, state: BranchState, ctx, inputs: tuple, output):
        """After the first block: which samples compute the later blocks at this call."""
        self._after_block(block, key)
        for c in block.present:
            self._tally(int(c), reused=False)
        residual = _stream(block, residual_of(output, inputs))
        cache = state.first_residual
        previous = cache.predict(ctx.step) if cache is not None and cache.matches(residual) else None
        change = relative_change(residual, previous)
        paired, latents = self.policy.branches == "paired", _stream(block, inputs)
        flags = self._pair_flags(ctx, latents) if paired else None
        change, flags = _to_host(change, flags)  # the one host-device synchronisation of the call
        if flags is not None and change is not None and flags[0]:
            change = paired_change(change)
        batch = residual.shape[0]
        if state.consecutive_reuse is None or state.consecutive_reuse.shape[0] != batch:
            state.consecutive_reuse = torch.zeros(batch, dtype=torch.long)
        rows = first_block_decision(self.policy, ctx.step, ctx.num_steps, change, state.consecutive_reuse, batch)
        if paired and ctx.branch == 0:
            self._first_call = (ctx.step, latents, rows)
        elif flags is not None and flags[1]:  # the other CFG branch of the step's first call, in its own call
            rows = self._first_call[2].clone()
        mode = "all" if bool(rows.all()) else "none" if not bool(rows.any()) else "mixed"
        decision = RowDecision(ctx.step, rows, mode)
        if mode == "mixed":
            device = residual.device
            decision = decision._replace(
                picked=rows.nonzero().squeeze(1).to(device, non_blocking=True),
                mask=rows.to(device, non_blocking=True),
            )
        if previous is None:
            state.first_residual = self._new_cache()
            state.first_residual.update(ctx.step, residual)
        elif mode == "all":
            cache.update(ctx.step, residual)
        elif mode == "mixed":
            cache.update_rows(ctx.step, residual, decision.mask)
        state.rows = decision
        state.consecutive_reuse = torch.where(rows, 0, state.consecutive_reuse + 1)
        changes = None if change is None else tuple(change.tolist())
        self.decision_log.append(Decision(ctx.step, ctx.branch, tuple(rows.tolist()), changes))
        self.stats_data.add_samples(ctx.step, int(rows.sum()), int((~rows).sum()))
        return output

    def _pair_flags(self, ctx, latents: torch.Tensor) -> torch.Tensor:
        """``(2,)`` bool on the latents' device: the call's two halves take the same latents (both CFG branches
        batched); a later call of the step takes the latents of the step's first call (the other branch)."""
        first = self._first_call
        follows = first is not None and ctx.branch > 0 and first[0] == ctx.step and first[1].shape == latents.shape
        same = (first[1] == latents).all() if follows else torch.zeros((), dtype=torch.bool, device=latents.device)
        return torch.stack([same_halves(latents), same])


def _to_host(change: torch.Tensor | None, flags: torch.Tensor | None) -> tuple:
    """``change`` (float, ``(batch,)``) and ``flags`` (bool) copied to the host in one transfer."""
    parts = [t.float() for t in (change, flags) if t is not None]
    if not parts:
        return None, None
    host = torch.cat(parts).cpu()
    split = 0 if change is None else change.shape[0]
    return (None if change is None else host[:split]), (None if flags is None else host[split:].bool().tolist())


def _stream(block, residual: tuple) -> torch.Tensor:
    """The image-stream part of a block residual: the ``hidden_states`` output, else the first one."""
    names = block.stack.outputs
    return residual[names.index("hidden_states") if "hidden_states" in names else 0]


def _take_rows(value, picked: torch.Tensor, batch: int):
    """``value``'s samples ``picked``: a tensor whose leading dimension is ``batch`` is taken as batch-major and
    sliced, tuples and lists (e.g. per-sample rotary embeddings) are sliced leaf-wise, anything else is shared."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, picked.to(value.device)) if value.ndim and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(part, picked, batch) for part in value)
    return value
