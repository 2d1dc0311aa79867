"""Attention patterns of one head, in token-layout terms, and the masks they make.

A self-attention (or joint-attention) call of a video DiT runs over the visual tokens of a ``(frames, height,
width)`` grid in raster order (frames slowest, columns fastest), plus, in joint attention, ``text`` text tokens
before or after them. A :class:`HeadPattern` says which keys each query of one head sees:

* ``dense``: every key (the model as trained);
* ``skip``: none; the head contributes zeros to the output projection;
* ``sparse``: the union of

  - **windows** (diagonal bands), each with half-widths ``(frames, rows, columns)``: a query at ``(f, y, x)``
    sees the keys at ``(f', y', x')`` with ``|f - f'| <= w[0]``, ``|y - y'| <= w[1]``, ``|x - x'| <= w[2]``
    (``None`` on an axis: unbounded). ``(0, None, None)`` is a per-frame block diagonal; ``(None, 1, 1)`` sees
    its own spatial neighbourhood in every frame: the multi-diagonal pattern of frame-major attention maps;
    a head that needs both takes both;
  - **stripes** (vertical stripes of the attention map): the keys of the frames ``sink_frames`` (negative
    indices count from the last frame), which every query sees;

  and, always, every text key; text queries see every key. A sparse head with neither part sees only text.

Because the parameters are in frames, rows and columns, one pattern reads the same at another resolution or
length. :func:`allowed` is the specification every kernel is tested against.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch

Kind = Literal["dense", "skip", "sparse"]

#: half-widths ``(frames, rows, columns)`` of one window; ``None``: unbounded on that axis
Window = tuple[int | None, int | None, int | None]

logger = logging.getLogger(__name__)


def _window_order(window: Window) -> tuple:
    return tuple(-1 if w is None else w for w in window)


@dataclass(frozen=True, kw_only=True)
class HeadPattern:
    """Which keys the queries of one head see; see the module docstring.

    Attributes:
        kind: ``"dense"``, ``"skip"`` or ``"sparse"``.
        windows: for ``sparse``: windows, each half-widths ``(frames, rows, columns)``, each ``>= 0`` or
            ``None`` (unbounded).
        sink_frames: for ``sparse``: frames whose keys every query sees (negative: counted from the last frame).
            On a grid with fewer frames, those outside it are dropped, with a warning logged once.
    """

    kind: Kind = "sparse"
    windows: tuple[Window, ...] = ()
    sink_frames: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in ("dense", "skip", "sparse"):
            raise ValueError(f"HeadPattern.kind must be 'dense', 'skip' or 'sparse', got {self.kind!r}")
        if self.kind != "sparse" and (self.windows or self.sink_frames):
            raise ValueError(f"a {self.kind!r} head takes no windows or sink_frames")
        windows = []
        for window in self.windows:
            window = tuple(window)
            if len(window) != 3 or any(w is not None and (not isinstance(w, int) or w < 0) for w in window):
                raise ValueError(
                    f"HeadPattern.windows must hold (frames, rows, columns) half-widths, each an int >= 0 or "
                    f"None; got {self.windows!r}"
                )
            windows.append(window)
        object.__setattr__(self, "windows", tuple(sorted(set(windows), key=_window_order)))
        if any(not isinstance(f, int) for f in self.sink_frames):
            raise ValueError(f"HeadPattern.sink_frames must be ints, got {self.sink_frames!r}")
        object.__setattr__(self, "sink_frames", tuple(sorted(set(self.sink_frames))))

    @classmethod
    def dense(cls) -> HeadPattern:
        """Every key."""
        return cls(kind="dense")

    @classmethod
    def skip(cls) -> HeadPattern:
        """No key: the head's output is zero."""
        return cls(kind="skip")

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        data = asdict(self)
        data["windows"] = [list(w) for w in self.windows]
        data["sink_frames"] = list(self.sink_frames)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> HeadPattern:
        """Inverse of :meth:`to_dict`."""
        unknown = set(data) - {"kind", "windows", "sink_frames"}
        if unknown:
            raise ValueError(f"unknown HeadPattern fields {sorted(unknown)}")
        return cls(
            kind=data.get("kind", "sparse"),
            windows=tuple(tuple(w) for w in data.get("windows", ())),
            sink_frames=tuple(data.get("sink_frames", ())),
        )

    def describe(self) -> str:
        """A short label, e.g. ``window(0,*,*)+sink(0)``."""
        if self.kind != "sparse":
            return self.kind
        parts = []
        for window in self.windows:
            parts.append("window(" + ",".join("*" if w is None else str(w) for w in window) + ")")
        if self.sink_frames:
            parts.append("sink(" + ",".join(map(str, self.sink_frames)) + ")")
        return "+".join(parts) or "text-only"


@dataclass(frozen=True)
class TokenGrid:
    """The tokens of one attention call.

    Attributes:
        frames, height, width: the visual token grid.
        text: the number of text tokens in the same sequence (joint attention), else 0.
        text_first: whether the text tokens come before the visual ones.
    """

    frames: int
    height: int
    width: int
    text: int = 0
    text_first: bool = True

    def __post_init__(self):
        if min(self.frames, self.height, self.width) < 1 or self.text < 0:
            raise ValueError(f"a token grid needs frames, height, width >= 1 and text >= 0, got {self}")

    @property
    def visual(self) -> int:
        """The number of visual tokens."""
        return self.frames * self.height * self.width

    @property
    def length(self) -> int:
        """The sequence length: visual plus text tokens."""
        return self.visual + self.text


_UNBOUNDED = 1 << 30


def _sinks_on(pattern: HeadPattern, grid: TokenGrid) -> tuple[int, ...]:
    """The sink frames of ``pattern`` that exist on ``grid`` (negative ones count from the last frame); the others
    are dropped, and said once per (sink frames, frame count) in the process."""
    inside = tuple(f for f in pattern.sink_frames if -grid.frames <= f < grid.frames)
    if len(inside) < len(pattern.sink_frames):
        _say_sinks_dropped(pattern.sink_frames, grid.frames)
    return inside


@functools.cache
def _say_sinks_dropped(sink_frames: tuple[int, ...], frames: int) -> None:
    dropped = [f for f in sink_frames if not -frames <= f < frames]
    logger.warning(
        "accel.sparse: sink frames %s lie outside a grid of %d frames and are dropped (a plan made for more frames "
        "applied to fewer); the heads that had them keep the rest of their pattern there (said once)",
        dropped,
        frames,
    )


@dataclass(frozen=True)
class HeadTables:
    """Per-head pattern parameters as tensors, so that one mask function serves every head of a launch.

    Attributes:
        window: ``(heads, windows, 3)`` int64 half-widths; unbounded axes hold a huge value; ``-1`` rows: unused.
        sinks: ``(heads, frames)`` bool: the key frames every query of the head sees.
        dense: ``(heads,)`` bool: the head sees every key.
    """

    window: torch.Tensor
    sinks: torch.Tensor
    dense: torch.Tensor

    @classmethod
    def build(cls, patterns: Sequence[HeadPattern], grid: TokenGrid, device: torch.device | str = "cpu") -> HeadTables:
        """Tables for ``patterns`` (``skip`` heads get an empty mask) on ``grid``."""
        count = max([len(p.windows) for p in patterns] + [1])
        window = torch.full((len(patterns), count, 3), -1, dtype=torch.int64)
        sinks = torch.zeros(len(patterns), grid.frames, dtype=torch.bool)
        dense = torch.tensor([p.kind == "dense" for p in patterns], dtype=torch.bool)
        for head, pattern in enumerate(patterns):
            for index, half_widths in enumerate(pattern.windows):
                window[head, index] = torch.tensor([_UNBOUNDED if w is None else w for w in half_widths])
            for frame in _sinks_on(pattern, grid):
                sinks[head, frame] = True
        return cls(window.to(device), sinks.to(device), dense.to(device))


def allowed(
    tables: HeadTables, grid: TokenGrid, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor
) -> torch.Tensor:
    """Whether ``query`` may see ``key`` in ``head``: the specification of every kernel (FlexAttention's
    ``mask_mod`` is this function with the tables bound).

    Args:
        tables: per-head parameters (:meth:`HeadTables.build`).
        grid: the tokens of the call.
        head, query, key: int64 tensors that broadcast together (head indices into the tables, token indices).

    Returns:
        bool tensor of the broadcast shape.
    """
    area = grid.height * grid.width
    offset = 0 if not grid.text or not grid.text_first else grid.text
    vq, vk = query - offset, key - offset
    text_q = (vq < 0) | (vq >= grid.visual)
    text_k = (vk < 0) | (vk >= grid.visual)
    vq, vk = vq.clamp(0, grid.visual - 1), vk.clamp(0, grid.visual - 1)
    fq, fk = vq // area, vk // area
    yq, yk = (vq % area) // grid.width, (vk % area) // grid.width
    xq, xk = vq % grid.width, vk % grid.width
    df, dy, dx = (fq - fk).abs(), (yq - yk).abs(), (xq - xk).abs()
    in_window = torch.zeros_like(df, dtype=torch.bool)
    for index in range(tables.window.shape[1]):  # a few windows: unrolled, one scalar test each (kernel-friendly)
        window = tables.window[head, index]  # (..., 3)
        in_window = in_window | ((df <= window[..., 0]) & (dy <= window[..., 1]) & (dx <= window[..., 2]))
    sink = tables.sinks[head, fk]
    return tables.dense[head] | text_q | text_k | in_window | sink


def dense_mask(patterns: Sequence[HeadPattern], grid: TokenGrid, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``(heads, length, length)`` bool mask of ``patterns`` on ``grid`` (skip heads: all False)."""
    tables = HeadTables.build(patterns, grid, device)
    tokens = torch.arange(grid.length, device=device)
    heads = torch.arange(len(patterns), device=device)
    mask = allowed(tables, grid, heads[:, None, None], tokens[None, :, None], tokens[None, None, :])
    skip = torch.tensor([p.kind == "skip" for p in patterns], device=device)
    return mask & ~skip[:, None, None]


def _band_pairs(length: int, half_width: int | None) -> int:
    """The number of ordered pairs ``(a, b)`` in ``range(length)`` with ``|a - b| <= half_width``."""
    if half_width is None or half_width >= length - 1:
        return length * length
    w = half_width
    return length * (2 * w + 1) - w * (w + 1)


def _spatial_union(grid: TokenGrid, windows: Sequence[Window]) -> int:
    """The (query, key) position pairs within one frame pair that any of ``windows`` covers (inclusion-exclusion:
    the intersection of windows centred on one query is the window of the smallest half-widths)."""
    total = 0
    for size in range(1, len(windows) + 1):
        for subset in itertools.combinations(windows, size):
            rows = _smallest([w[1] for w in subset])
            columns = _smallest([w[2] for w in subset])
            total += (-1) ** (size + 1) * _band_pairs(grid.height, rows) * _band_pairs(grid.width, columns)
    return total


def _smallest(half_widths: Sequence[int | None]) -> int | None:
    bounded = [w for w in half_widths if w is not None]
    return min(bounded) if bounded else None


def density(pattern: HeadPattern, grid: TokenGrid) -> float:
    """The fraction of (query, key) pairs ``pattern`` computes on ``grid`` (dense 1, skip 0), counted exactly
    without building the mask."""
    if pattern.kind != "sparse":
        return float(pattern.kind == "dense")
    area = grid.height * grid.width
    sinks = {f % grid.frames for f in _sinks_on(pattern, grid)}
    by_offset: dict[int, int] = {}  # frame offset -> covered position pairs of one frame pair
    visual = 0
    for fq in range(grid.frames):
        for fk in range(grid.frames):
            if fk in sinks:
                visual += area * area
                continue
            offset = abs(fq - fk)
            if offset not in by_offset:
                active = [w for w in pattern.windows if w[0] is None or offset <= w[0]]
                by_offset[offset] = _spatial_union(grid, active)
            visual += by_offset[offset]
    text_pairs = grid.length**2 - grid.visual**2
    return (visual + text_pairs) / grid.length**2
