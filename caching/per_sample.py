"""The first-block policy's path through the cache engine: per-sample decisions, later blocks on the
computing samples only.

:class:`PerSampleBlocks` is mixed into :class:`~accel.caching.engine.CacheEngine`; it runs when the config's
schedule is a :class:`~accel.caching.policy.FirstBlockPolicy`. The first block always runs and its residual
decides, per sample, whether the later blocks compute; a later block runs on the computing samples alone (every
batch-major argument sliced) and the others add their cached residual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from accel.caching.policy import first_block_decision, relative_change
from accel.caching.state import map_feature, residual_of

if TYPE_CHECKING:  # the engine's private records, for annotations only
    from accel.caching.engine import _Block, _BranchState


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

    def _dynamic_block(self, block: _Block, key: tuple, state: _BranchState, ctx, inner, args, kwargs):
        all_rows = np.ones(len(self.components), dtype=bool)
        no_store = ~all_rows
        skippable = block.stack.skippable and len(block.present) > 0
        inputs = self._inputs(block, args, kwargs) if skippable else ()
        if block.index == 0:
            output = self._run(block, key, state, ctx.step, all_rows, no_store, inner, args, kwargs)
            if skippable:
                self._decide(state, ctx, _stream(block, residual_of(output, inputs)))
            return output
        rows = state.compute_rows
        cache = state.blocks.get(block.index) if skippable else None
        if rows is None or cache is None or not cache.matches(inputs) or bool(rows.all()):
            output = self._run(block, key, state, ctx.step, all_rows, no_store, inner, args, kwargs)
            if skippable:
                state.blocks.setdefault(block.index, self._new_cache()).update(ctx.step, residual_of(output, inputs))
            return output
        residual = cache.predict(ctx.step)
        if not bool(rows.any()):
            return self._skip(block, key, inputs, residual)
        return self._compute_rows(block, key, state, ctx.step, rows, residual, inputs, inner, args, kwargs)

    def _compute_rows(self, block: _Block, key: tuple, state, step: int, rows, residual, inputs, inner, args, kwargs):
        """Run the block on the samples ``rows`` selects only (every batch-major tensor argument sliced), and
        reuse the cached ``residual`` for the others."""
        batch = rows.shape[0]
        picked = rows.nonzero().squeeze(1)
        sub_args = tuple(_take_rows(a, picked, batch) for a in args)
        sub_kwargs = {name: _take_rows(value, picked, batch) for name, value in kwargs.items()}
        output = self._run(
            block,
            key,
            state,
            step,
            np.ones(len(self.components), bool),
            np.zeros(len(self.components), bool),
            inner,
            sub_args,
            sub_kwargs,
        )
        self.stats_data.macs_saved += self._macs.get(key, 0.0) * (1 - len(picked) / batch)

        def scatter(new, old):
            merged = old.clone()
            merged[picked.to(old.device)] = new.to(old.dtype)
            return merged

        computed = residual_of(output, self._inputs(block, sub_args, sub_kwargs))
        merged = map_feature(scatter, computed, residual)
        state.blocks[block.index].update(step, merged)
        full = map_feature(lambda r, x: x + r.to(x.dtype), merged, inputs)
        return full[0] if len(full) == 1 else full

    def _decide(self, state: _BranchState, ctx, first_residual: torch.Tensor) -> None:
        previous = state.first_residual.predict(ctx.step) if state.first_residual else None
        change = relative_change(first_residual, previous)
        batch = first_residual.shape[0]
        if state.consecutive_reuse is None or state.consecutive_reuse.shape[0] != batch:
            state.consecutive_reuse = torch.zeros(batch, dtype=torch.long)
        rows = first_block_decision(self.policy, ctx.step, ctx.num_steps, change, state.consecutive_reuse, batch)
        if state.first_residual is None or change is None:
            state.first_residual = self._new_cache()
            state.first_residual.update(ctx.step, first_residual)
        else:
            state.first_residual.update_rows(ctx.step, first_residual, rows)
        state.consecutive_reuse = torch.where(rows, 0, state.consecutive_reuse + 1)
        state.compute_rows = rows
        changes = None if change is None else tuple(float(c) for c in change)
        self.decision_log.append(Decision(ctx.step, ctx.branch, tuple(bool(r) for r in rows), changes))
        self.stats_data.samples_computed += int(rows.sum())
        self.stats_data.samples_reused += int((~rows).sum())


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
