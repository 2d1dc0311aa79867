"""Block caching under per-token steps: cached features kept per token, over the full token sequence.

When :class:`~accel.caching.TokenStepConfig` runs the blocks on each row's active tokens only, a block's
residual (or a component's output) computed at one step covers that step's active tokens, and the next step's
active set differs. Block caching then keeps every cached feature at full length, ``(rows, tokens, ...)``:

* storing a value computed on the active tokens writes their entries into the newest stored full-length value
  (a token that was not active keeps the entry of the last step at which both it and the block ran); a first
  value is stored only when every token is active (the dense first steps), so every entry is always filled;
* reusing gathers the prediction at the current call's active tokens.

So a reused block adds to each active token the residual of its own last computed step: with every token
active this is exactly block caching, and with every block computed it is exactly per-token steps. Forecasting
caches (``forecast_order > 0``) extrapolate through the stored full-length values, in which a token inactive at
a stored step carries its earlier entry over.
"""

from __future__ import annotations

import torch

from accel.caching.state import Feature, FeatureCache, map_feature


class TokenFeatures:
    """The token view of one transformer call, for the caching engine.

    Args:
        index: ``(rows, active)`` int64, the tokens the blocks of this call see, per row.
        tokens: the full sequence length.
    """

    def __init__(self, index: torch.Tensor, tokens: int):
        self.index, self.tokens = index, tokens

    @property
    def complete(self) -> bool:
        """Whether every token is active (then a value computed now is a whole full-length one)."""
        return self.index.shape[1] == self.tokens

    def _check(self, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape[:2]) != tuple(self.index.shape):
            raise ValueError(
                f"block caching under per-token steps caches token-major features (rows, active, ...); got a "
                f"{tuple(tensor.shape)} feature for {tuple(self.index.shape)} active tokens"
            )

    def like(self, feature: Feature) -> Feature:
        """Shape stand-ins (on the meta device) of ``feature`` at full length, to match stored values against."""

        def full(tensor: torch.Tensor) -> torch.Tensor:
            return torch.empty(tensor.shape[0], self.tokens, *tensor.shape[2:], device="meta")

        return map_feature(full, feature)

    def gather(self, feature: Feature) -> Feature:
        """``(rows, tokens, ...)`` -> ``(rows, active, ...)`` at the active tokens, for each tensor."""

        def take(tensor: torch.Tensor) -> torch.Tensor:
            index = self.index.view(*self.index.shape, *([1] * (tensor.ndim - 2)))
            return tensor.gather(1, index.expand(*self.index.shape, *tensor.shape[2:]))  # (rows, active, ...)

        return map_feature(take, feature)

    def merge(self, cache: FeatureCache, feature: Feature) -> Feature | None:
        """The full-length value to store for ``feature`` (computed on the active tokens): the cache's newest
        value with the active tokens' entries replaced; ``feature`` itself (in token order) when every token is
        active; None when neither (nothing stored yet, or stored at other shapes)."""
        map_feature(self._check, feature)
        newest = cache.newest
        if newest is not None and cache.matches(self.like(feature)):

            def put(value: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
                return old.scatter(1, self._expanded(value), value.detach().to(old.dtype))

            return map_feature(put, feature, newest)
        if not self.complete:
            return None
        return map_feature(lambda value: torch.empty_like(value).scatter_(1, self._expanded(value), value), feature)

    def _expanded(self, value: torch.Tensor) -> torch.Tensor:
        """The active index broadcast to ``value: (rows, active, ...)``."""
        return self.index.view(*self.index.shape, *([1] * (value.ndim - 2))).expand_as(value)
