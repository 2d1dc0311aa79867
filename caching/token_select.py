"""Pure decisions of per-token step allocation: how many tokens are active at each step, and which.

Nothing here touches a model. :func:`sparse_fraction` turns a budget (a fraction of the token-steps of full
compute) into the active fraction of the sparse steps and :func:`active_count` that into a per-step active count,
in a few bucket sizes (:func:`bucket_levels`); :class:`TokenHistory` keeps, per sample (batch
row) and token, the last velocities the model produced, when, and how long ago; the selectors rank tokens:

* :func:`velocity_scores` (ours): the error of reusing a token's cached velocity grows with how fast that
  velocity was changing when it was last computed and with the time since, ``rate * elapsed``. Every token's
  rate is floored at a share of its sample's mean rate, so a skipped token's score keeps growing, and a token
  skipped for ``max_skipped`` steps is taken before any other of its row: no token starves. Every row ranks
  its own tokens only, so a prompt's selection never depends on the others in its batch.
* :func:`ras_scores`: the rule RAS (region-adaptive sampling) released: the per-patch standard deviation over
  channels of the last update, scaled by ``exp(starvation * drop_count)``; the patches with the *lowest*
  scores stay active, one selection shared by every row and branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def bucket_levels(tokens: int, buckets: int) -> list[int]:
    """The active-token counts a sparse step may use: ``ceil(k * tokens / buckets)`` for ``k = 1..buckets``."""
    return sorted({max(1, math.ceil(k * tokens / buckets)) for k in range(1, buckets + 1)})


def sparse_fraction(budget: float, num_steps: int | None, dense: int) -> float:
    """The active fraction of the sparse steps that makes the whole trajectory compute ``budget`` of its
    token-steps, with ``dense`` of its ``num_steps`` steps computing every token. With ``num_steps`` unknown
    (a bare transformer) the sparse steps run at ``budget`` itself."""
    if num_steps is None or num_steps <= dense:
        return budget
    return min(1.0, max(0.0, (budget * num_steps - dense) / (num_steps - dense)))


def active_count(sparse_index: int, fraction: float, tokens: int, buckets: int) -> int:
    """Active tokens at the ``sparse_index``-th sparse step: a bucket level, chosen by error diffusion so that
    the counts of the sparse steps so far add up to ``fraction * tokens`` per step (two adjacent levels
    alternate; a fraction on a level uses that level only)."""
    levels = bucket_levels(tokens, buckets)
    target = fraction * tokens
    low = max([level for level in levels if level <= target + 1e-9], default=levels[0])
    high = min([level for level in levels if level >= target - 1e-9], default=levels[-1])
    if high == low:
        return low
    share = (target - low) / (high - low)  # the share of sparse steps at the higher level
    return high if math.floor((sparse_index + 1) * share + 1e-9) > math.floor(sparse_index * share + 1e-9) else low


@dataclass
class TokenHistory:
    """Per row and token, what the model last produced; every tensor has the rows first.

    Attributes:
        last: ``(rows, tokens, width)`` the latest velocity of each token (computed or carried over).
        previous: ``(rows, tokens, width)`` the velocity computed before the latest computed one.
        time_last: ``(rows, tokens)`` the timestep at which ``last`` was computed.
        time_previous: ``(rows, tokens)`` the timestep at which ``previous`` was computed.
        skipped: ``(rows, tokens)`` steps since the token was last computed.
        computed: ``(rows, tokens)`` how many steps computed the token (the heat map).
        drops: ``(tokens,)`` RAS's drop counter (starts at minus the step count).
    """

    last: torch.Tensor
    previous: torch.Tensor
    time_last: torch.Tensor
    time_previous: torch.Tensor
    skipped: torch.Tensor
    computed: torch.Tensor
    drops: torch.Tensor

    @classmethod
    def start(cls, velocity: torch.Tensor, time: torch.Tensor, num_steps: int | None) -> TokenHistory:
        """The history after a step that computed every token of ``velocity: (rows, tokens, width)`` at the
        per-row timestep ``time: (rows,)``."""
        rows, tokens, _ = velocity.shape
        times = time.to(velocity.device, torch.float32).expand(rows)[:, None].expand(rows, tokens).clone()
        zeros = torch.zeros(rows, tokens, dtype=torch.int32, device=velocity.device)
        return cls(
            last=velocity.clone(),
            previous=velocity.clone(),
            time_last=times,
            time_previous=times.clone(),
            skipped=zeros,
            computed=zeros + 1,
            drops=torch.full((tokens,), -float(num_steps or 0), device=velocity.device),
        )

    def update(self, velocity: torch.Tensor, active: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """Record a step: ``velocity: (rows, tokens, width)`` holds the computed tokens where ``active: (rows,
        tokens)`` is true; the others carry their last computed velocity over. Returns the velocity of every
        token."""
        now = time.to(self.time_last.device, torch.float32).expand(active.shape[0])[:, None]
        mask = active[..., None]
        self.previous = torch.where(mask, self.last, self.previous)
        self.time_previous = torch.where(active, self.time_last, self.time_previous)
        self.last = torch.where(mask, velocity, self.last)
        self.time_last = torch.where(active, now.expand_as(self.time_last), self.time_last)
        self.skipped = torch.where(active, 0, self.skipped + 1)
        self.computed = self.computed + active.to(self.computed.dtype)
        return self.last


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).mean(-1).sqrt()


def velocity_scores(history: TokenHistory, time: torch.Tensor, floor: float, max_skipped: int) -> torch.Tensor:
    """``(rows, tokens)`` priorities of our rule (see the module docstring): predicted error of the cached
    velocity ``(rate + floor * mean rate) * elapsed``; tokens skipped ``max_skipped`` steps or more rank first
    in their row, the longest skipped first. Each row's scores depend on that row alone."""
    now = time.to(history.time_last.device, torch.float32).expand(history.last.shape[0])[:, None]
    span = (history.time_previous - history.time_last).clamp_min(1e-6)
    rate = _rms(history.last - history.previous) / span
    rate = rate + floor * rate.mean(-1, keepdim=True) + 1e-12
    elapsed = (history.time_last - now).clamp_min(0) + 1e-6
    scores = rate * elapsed
    starved = history.skipped >= max_skipped
    top = scores.amax(-1, keepdim=True)  # (rows, 1): each row's own highest, never another prompt's
    return torch.where(starved, top + 1 + history.skipped.float(), scores)


def ras_scores(histories: list[TokenHistory], channels: int, starvation: float) -> torch.Tensor:
    """``(tokens,)`` RAS's metric, shared by every row of every branch: the std over the ``channels`` of each
    latent pixel of the last velocity (laid out ``(pixels of the patch, channels)`` per token, channels last),
    averaged over the patch's pixels and over the rows, times ``exp(starvation * drops)``. RAS caches the
    highest; the lowest stay active."""
    metrics = []
    for history in histories:
        rows, tokens, width = history.last.shape
        pixels = history.last.float().view(rows, tokens, width // channels, channels)
        metrics.append(pixels.std(-1).mean(-1))  # (rows, tokens)
    metric = torch.cat(metrics).mean(0)
    return metric * torch.exp(starvation * histories[0].drops)


def select(scores: torch.Tensor, count: int, highest: bool = True) -> torch.Tensor:
    """``(rows, count)`` sorted token indices of each row's ``count`` highest (or lowest) scores."""
    return torch.topk(scores, count, dim=-1, largest=highest).indices.sort(-1).values
