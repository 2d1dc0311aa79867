"""Which tokens each transformer call of per-token steps computes: the selection side of
:class:`~accel.caching.tokens.TokenStepHandle`.

:class:`TokenSelection` is mixed into the handle, whose state it reads (the config, the branches, the current
call); the scores and counts it combines are the pure functions of :mod:`accel.caching.token_select`. Per call:
every token at a dense step, else a bucketed count of each row's highest velocity-rule scores, with the CFG branches
of one prompt sharing their mean scores (``branches="paired"``), or RAS's one shared selection.
"""

from __future__ import annotations

import math

import torch

from accel.caching.policy import paired_change
from accel.caching.token_select import TokenHistory, active_count, ras_scores, select, sparse_fraction, velocity_scores


class TokenBranch:
    """The state of one branch (one transformer call within each step): history and attention caches."""

    def __init__(self, rows: int, tokens: int):
        self.rows, self.tokens = rows, tokens
        self.history: TokenHistory | None = None
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []


class TokenSelection:
    """The selection methods of the per-token steps handle (a mixin: it uses the handle's config, target,
    branches, shared selections and current call)."""

    def _index(self, branch: TokenBranch, context, time: torch.Tensor, device) -> torch.Tensor:
        config, rows, tokens = self.config, branch.rows, branch.tokens
        num_steps = context.num_steps
        if branch.history is None or config.dense_at(context.step, num_steps):
            return torch.arange(tokens, device=device).expand(rows, tokens)
        dense = config.dense_count(num_steps) if num_steps else config.dense_steps
        fraction = sparse_fraction(self._grid_budget, num_steps, dense)
        sparse_index = context.step - sum(config.dense_at(s, num_steps) for s in range(context.step))
        count = active_count(sparse_index, fraction, tokens, config.buckets)
        if config.selector == "ras":
            return self._ras_index_for(context, count).expand(rows, count)
        return self._velocity_index(branch, context, time, count)

    def _scores(self, branch: TokenBranch, time: torch.Tensor, count: int) -> torch.Tensor:
        """Each row's velocity-rule scores, as multiples of the row's mean (so rows can be averaged)."""
        skipped = self.config.max_skipped_steps or max(2, math.ceil(2 * branch.tokens / count))
        scores = velocity_scores(branch.history, time, self.config.rate_floor, skipped)
        return scores / scores.mean(-1, keepdim=True)

    def _velocity_index(self, branch: TokenBranch, context, time: torch.Tensor, count: int) -> torch.Tensor:
        """Our rule. ``branches="paired"``: the CFG branches of one prompt share a selection from their mean
        scores, whether batched (the two halves of the rows take the same latents) or in separate calls (a
        later call of the step takes the latents of the step's first call); other prompts select alone."""
        paired = self.config.branches == "paired"
        shared = self._shared
        if paired and context.branch > 0 and self._paired_calls and shared and shared[0] == context.step:
            if shared[1].shape[0] == branch.rows:
                return shared[1]
        scores = self._scores(branch, time, count)
        if paired and context.branch == 0 and self._paired_calls:
            others = [b for key, b in self._branches.items() if key != 0 and b.history is not None]
            others = [b for b in others if (b.rows, b.tokens) == (branch.rows, branch.tokens)]
            scores = sum([scores] + [self._scores(b, time, count) for b in others]) / (1 + len(others))
        if paired and self._call.get("halves"):
            scores = paired_change(scores)
        index = select(scores, count)
        if context.branch == 0:
            self._shared = (context.step, index)
        return index

    def _ras_index_for(self, context, count: int) -> torch.Tensor:
        """RAS: one selection per step, made at the step's first call from every branch's last velocities."""
        if self._ras_index is None or self._ras_index[0] != context.step:
            histories = [b.history for b in self._branches.values() if b.history is not None]
            channels = int(self.target.transformer.config.out_channels)
            width = histories[0].last.shape[-1]
            channels = channels if width % channels == 0 else width
            scores = ras_scores(histories, channels, self.config.ras_starvation)
            index = select(scores[None], count, highest=False)
            histories[0].drops += 1
            histories[0].drops.scatter_(0, index[0], -1, reduce="add")  # the cached ones count one more drop
            self._ras_index = (context.step, index)
        return self._ras_index[1]
