"""Token geometry: the heads of each attention and the grid of visual tokens, read from a model and its adapter.

Techniques that work per head or per token need the shapes the adapter's :class:`~accel.adapters.ModelSpec`
implies for one model and one call:

* :func:`attention_geometry`: the heads and head width of every attention component of every block, read where
  each :class:`~accel.adapters.Component` says (its ``heads_attr`` and ``inner_dim_attr``);
* :func:`token_grid`: the ``(frames, height, width)`` grid the visual tokens of one forward call form, from the
  model's :class:`~accel.adapters.TokenLayout`;
* :func:`patch_size`: the ``(frames, height, width)`` extent of one visual token in latent pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from accel.adapters import ModelSpec, TokenLayout, spec_for


@dataclass(frozen=True, kw_only=True)
class AttentionGeometry:
    """The heads of one attention component in one block.

    Attributes:
        stack: the :attr:`~accel.adapters.BlockStack.path` of the block.
        block: the block's index within its stack.
        component: the component's name, e.g. ``"self_attn"``.
        attention: ``"self"``, ``"cross"`` or ``"joint"``.
        heads: the number of query heads.
        head_dim: the width of one head; ``heads * head_dim`` is the query projection's width.
    """

    stack: str
    block: int
    component: str
    attention: str
    heads: int
    head_dim: int


def attention_geometry(transformer: torch.nn.Module, spec: ModelSpec | None = None) -> list[AttentionGeometry]:
    """Heads and head width of every attention component of every block, in execution order.

    Read from the modules themselves (:attr:`~accel.adapters.Component.heads_attr`,
    :attr:`~accel.adapters.Component.inner_dim_attr`), so a model whose layers differ (Sana's cross-attention has
    its own head count) is described as built. A block that lacks a component (SD3's ``attn2`` outside the
    dual-attention layers) has no entry for it.
    """
    spec = spec_for(transformer, spec)
    found = []
    index = {}
    for stack, block in spec.block_list(transformer):
        position = index[stack.path] = index.get(stack.path, -1) + 1
        for component in stack.components:
            module = getattr(block, component.module, None)
            if component.kind != "attention" or module is None:
                continue
            heads = int(getattr(module, component.heads_attr))
            width = int(getattr(module, component.inner_dim_attr))
            if width % heads:
                raise ValueError(f"{stack.path}[{position}].{component.module}: width {width} is not {heads} heads")
            found.append(
                AttentionGeometry(
                    stack=stack.path,
                    block=position,
                    component=component.name,
                    attention=component.attention,
                    heads=heads,
                    head_dim=width // heads,
                )
            )
    return found


def _layout(transformer: torch.nn.Module, spec: ModelSpec | None) -> TokenLayout:
    layout = spec_for(transformer, spec).token_layout
    if layout is None:
        raise ValueError(f"The spec of {type(transformer).__name__} has no token_layout; pass one in its ModelSpec")
    return layout


def patch_size(transformer: torch.nn.Module, spec: ModelSpec | None = None) -> tuple[int, int, int]:
    """The ``(frames, height, width)`` extent of one visual token in latent pixels: the model's patch size from
    its config times the pipeline's packing (:attr:`~accel.adapters.TokenLayout.packed_patch`)."""
    layout = _layout(transformer, spec)
    patch = _model_patch(transformer, layout)
    return tuple(p * q for p, q in zip(patch, layout.packed_patch, strict=True))


def _model_patch(transformer: torch.nn.Module, layout: TokenLayout) -> tuple[int, int, int]:
    config = transformer.config
    size = config[layout.patch_size_key] if layout.patch_size_key in config else 1
    if isinstance(size, Sequence):
        if len(size) != 3:
            raise ValueError(f"{layout.patch_size_key}={size!r} is neither an int nor a (frames, height, width) triple")
        return tuple(int(p) for p in size)
    temporal = config.get(layout.patch_size_t_key) if layout.patch_size_t_key else None
    return (int(temporal or 1), int(size), int(size))


def token_grid(
    transformer: torch.nn.Module, spec: ModelSpec | None, inputs: Mapping[str, Any] | Sequence[int]
) -> tuple[int, int, int]:
    """The ``(frames, height, width)`` grid of visual tokens one forward call makes; frames is 1 for images.

    Args:
        transformer: the model.
        spec: its spec, or ``None`` for the registered one.
        inputs: the forward's keyword arguments, or just the shape of ``hidden_states`` (batch first), e.g.
            ``(2, 16, 21, 60, 104)`` for a Wan video latent. Packed layouts (FLUX, LTX-Video) need the
            keyword arguments: the grid comes from the position ids or the size arguments.

    Raises:
        ValueError: the grid cannot be read from ``inputs``, or the latent does not divide into patches.
    """
    layout = _layout(transformer, spec)
    if layout.input == "packed":
        if not isinstance(inputs, Mapping):
            raise ValueError(f"{type(transformer).__name__} takes packed tokens; pass the forward's keyword arguments")
        if layout.position_ids_arg is not None:
            return _grid_from_ids(inputs[layout.position_ids_arg])
        sizes = tuple(int(inputs[name]) for name in layout.grid_args)
    else:
        shape = tuple(inputs["hidden_states"].shape if isinstance(inputs, Mapping) else inputs)
        dims = {"BCHW": (None, 2, 3), "BCFHW": (2, 3, 4), "BFCHW": (1, 3, 4)}[layout.input]
        if len(shape) != len(layout.input):
            raise ValueError(f"hidden_states of {type(transformer).__name__} is {layout.input}, got shape {shape}")
        sizes = tuple(1 if dim is None else shape[dim] for dim in dims)
    patch = _model_patch(transformer, layout)
    if any(size % p for size, p in zip(sizes, patch, strict=True)):
        raise ValueError(f"latent (frames, height, width) {sizes} does not divide into patches {patch}")
    return tuple(size // p for size, p in zip(sizes, patch, strict=True))


def _grid_from_ids(ids: torch.Tensor) -> tuple[int, int, int]:
    # FLUX: one (frame, row, column) id per token, (tokens, 3) or the deprecated (1, tokens, 3).
    ids = ids[0] if ids.ndim == 3 else ids
    grid = tuple(int(torch.unique(ids[:, axis]).numel()) for axis in range(3))
    if math.prod(grid) != ids.shape[0]:
        raise ValueError(f"the {ids.shape[0]} position ids do not form one (frames, height, width) grid: {grid}")
    return grid
