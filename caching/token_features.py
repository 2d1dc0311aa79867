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

In MMDiT models (SD3, FLUX) a feature also holds text, which per-token steps compute at every call. Each tensor
of a feature has a :data:`Stream`: ``"visual"`` (the active image tokens along dimension 1), ``"whole"``
(computed whole at every call, as the text stream: stored and reused as it is) or ``"joint"`` (the text and the
active image tokens in one sequence, text first or last as the model orders it: FLUX's single-stream blocks).
:func:`block_streams` and :func:`component_streams` read them from the model's adapter.
"""

from __future__ import annotations

from typing import Literal

import torch

from accel.adapters import BlockStack
from accel.caching.state import Feature, FeatureCache, map_feature

#: how one tensor of a cached feature runs over the tokens; see the module docstring
Stream = Literal["visual", "whole", "joint"]

#: one :data:`Stream` for every tensor of a feature, or a tuple as the feature's (a tuple of tensors)
Streams = Stream | tuple


def block_streams(stack: BlockStack) -> tuple[Stream, ...]:
    """The streams of a block's outputs (its residual's tensors): ``hidden_states`` runs over the active
    visual tokens; every other output (the text, ``encoder_hidden_states``) is computed whole."""
    return tuple("visual" if name == "hidden_states" else "whole" for name in stack.outputs)


def component_streams(stack: BlockStack, name: str) -> Streams:
    """The streams of the output of ``stack``'s component ``name``.

    A joint attention that receives the text separately returns ``(image, text)``; one whose block merged the
    text and image tokens (FLUX's single-stream blocks) returns the joint sequence, and so do the token-wise
    components of such a block (they run on the same merged sequence); the text stream's feed-forward
    (``ffn_context``) is whole; every other component runs over the visual tokens.
    """
    component = next(c for c in stack.components if c.name == name)
    merged = any(c.attention == "joint" and c.streams == "merged" for c in stack.components)
    if component.attention == "joint":
        return "joint" if component.streams == "merged" else ("visual", "whole")
    if merged and component.token_wise:
        return "joint"
    return "whole" if name == "ffn_context" else "visual"


class TokenFeatures:
    """The token view of one transformer call, for the caching engine.

    Args:
        index: ``(rows, active)`` int64, the visual tokens the blocks of this call see, per row.
        tokens: the full number of visual tokens.
        text_first: where a ``"joint"`` tensor holds its text: before the visual tokens (FLUX) or after them.
    """

    def __init__(self, index: torch.Tensor, tokens: int, text_first: bool = True):
        self.index, self.tokens, self.text_first = index, tokens, text_first

    @property
    def complete(self) -> bool:
        """Whether every token is active (then a value computed now is a whole full-length one)."""
        return self.index.shape[1] == self.tokens

    def _text(self, tensor: torch.Tensor, stream: Stream) -> int:
        """How many text entries ``tensor`` (a current, active-token one) holds along dimension 1 (a whole one:
        all of it)."""
        if stream == "whole":
            return tensor.shape[1] if tensor.ndim > 1 else 0
        active = self.index.shape[1]
        size = tensor.shape[1] if tensor.ndim > 1 else -1
        if (
            tuple(tensor.shape[:1]) != tuple(self.index.shape[:1])
            or size < active
            or (stream == "visual" and size != active)
        ):
            raise ValueError(
                f"block caching under per-token steps caches token-major features (rows, active, ...); got a "
                f"{tuple(tensor.shape)} {stream} feature for {tuple(self.index.shape)} active tokens"
            )
        return size - active

    def _split(self, tensor: torch.Tensor, text: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text part, visual part)`` of a joint ``tensor`` holding ``text`` text entries."""
        if self.text_first:
            return tensor[:, :text], tensor[:, text:]
        visual = tensor.shape[1] - text
        return tensor[:, visual:], tensor[:, :visual]

    def _join(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return torch.cat([text, visual] if self.text_first else [visual, text], 1)

    def like(self, feature: Feature, streams: Streams = "visual") -> Feature:
        """Shape stand-ins (on the meta device) of ``feature`` at full length, to match stored values against."""

        def full(tensor: torch.Tensor, stream: Stream) -> torch.Tensor:
            if stream == "whole":
                return torch.empty(tensor.shape, device="meta")
            size = self._text(tensor, stream) + self.tokens
            return torch.empty(tensor.shape[0], size, *tensor.shape[2:], device="meta")

        return map_feature(full, feature, _spread(streams, feature))

    def gather(self, feature: Feature, streams: Streams = "visual") -> Feature:
        """``(rows, tokens, ...)`` -> ``(rows, active, ...)`` at the active tokens, for each visual tensor and
        the visual part of each joint one (``feature`` is a stored, full-length value)."""

        def take(tensor: torch.Tensor, stream: Stream) -> torch.Tensor:
            if stream == "whole":
                return tensor
            if stream == "visual":
                return tensor.gather(1, self._expanded(tensor))
            text, visual = self._split(tensor, tensor.shape[1] - self.tokens)
            return self._join(text, visual.gather(1, self._expanded(visual)))

        return map_feature(take, feature, _spread(streams, feature))

    def merge(self, cache: FeatureCache, feature: Feature, streams: Streams = "visual") -> Feature | None:
        """The full-length value to store for ``feature`` (computed on the active tokens): the cache's newest
        value with the active tokens' entries (and every whole tensor, and the text of every joint one)
        replaced; ``feature`` itself (in token order) when every token is active; None when neither (nothing
        stored yet, or stored at other shapes)."""
        streams = _spread(streams, feature)
        map_feature(self._text, feature, streams)  # checks the shapes
        newest = cache.newest
        if newest is not None and cache.matches(self.like(feature, streams)):
            return map_feature(self._put, feature, newest, streams)
        if not self.complete:
            return None
        return map_feature(lambda value, stream: self._put(value, None, stream), feature, streams)

    def _put(self, value: torch.Tensor, old: torch.Tensor | None, stream: Stream) -> torch.Tensor:
        """``old`` (a stored full-length tensor, or None when every token is active) with ``value``'s entries."""
        value = value.detach()
        if stream == "whole":
            return value if old is None else value.to(old.dtype)
        text, visual = (None, value) if stream == "visual" else self._split(value, self._text(value, stream))
        if old is None:
            visual = torch.empty_like(visual).scatter_(1, self._expanded(visual), visual)
        else:
            old_visual = old if stream == "visual" else self._split(old, old.shape[1] - self.tokens)[1]
            visual = old_visual.scatter(1, self._expanded(visual), visual.to(old.dtype))
            text = None if text is None else text.to(old.dtype)
        return visual if text is None else self._join(text, visual)

    def _expanded(self, tensor: torch.Tensor) -> torch.Tensor:
        """The active index broadcast to ``(rows, active, *tensor.shape[2:])``."""
        index = self.index.view(*self.index.shape, *([1] * (tensor.ndim - 2)))
        return index.expand(*self.index.shape, *tensor.shape[2:])


def _spread(streams: Streams, feature: Feature) -> Feature:
    """``streams`` in ``feature``'s structure: one stream repeated over a tuple feature's tensors."""
    if isinstance(streams, str) and isinstance(feature, tuple):
        return tuple(_spread(streams, part) for part in feature)
    return streams
