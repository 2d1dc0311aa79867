"""``SparseAttentionConfig`` and its apply function: a sparse plan on a transformer, through the patch log.

At apply, the plan is checked against the model (layers, heads) before anything changes; then every layer with
a non-dense head gets a sparse processor (:mod:`accel.sparse.processors`). At each transformer call, eagerly and
outside compiled code, the handle reads the call's token grid and gives every layer its
:class:`~accel.sparse.kernels.LayerAttention` for that grid (built once per grid and reused), so compiled
blocks see the same objects call after call and do not recompile.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from accel.api import Handle, Target, register
from accel.context import StepContext
from accel.geometry import token_grid
from accel.plan import Plan
from accel.sparse.kernels import BACKENDS, Backend, LayerAttention, check_backend, shared_layer_attention
from accel.sparse.patterns import TokenGrid
from accel.sparse.plan import check_plan, plan_dense_steps, plan_density
from accel.sparse.processors import SparseLayer, sparse_processor_for

logger = logging.getLogger(__name__)

#: ``(layer index, grid, device) -> kernel``: what runs a patched layer's attention on a grid
KernelFactory = Callable[[int, TokenGrid, torch.device], Any]


@dataclass(frozen=True, kw_only=True)
class SparseAttentionConfig:
    """Run each attention head of a model under its pattern from ``plan``.

    Attributes:
        plan: a sparse-attention plan (:func:`accel.sparse.make_plan`, :func:`accel.sparse.uniform_plan`,
            :func:`accel.sparse.search` or ``Plan.load``).
        backend: ``"auto"`` (the Triton kernel on CUDA when triton is installed, FlexAttention on CUDA without
            it, else ``"runs"``), ``"triton"`` (checked at apply: triton installed, the model on CUDA),
            ``"runs"`` (SDPA over key slices where whole tiles allow it, FlexAttention for the other rows;
            :mod:`accel.sparse.runs`), ``"flex"``, ``"sdpa"`` (materialised mask) or ``"reference"``.
        block_size: the block mask's tile; default by sequence length
            (:func:`accel.sparse.kernels.default_block_size`).
        dense_steps: run the first this many denoising steps with dense attention; ``None`` (default) takes the
            plan's own setting (:func:`accel.sparse.plan_dense_steps`).
    """

    plan: Plan
    backend: Backend = "auto"
    block_size: int | None = None
    dense_steps: int | None = None

    def __post_init__(self):
        if not isinstance(self.plan, Plan):
            raise TypeError(f"SparseAttentionConfig.plan must be an accel Plan, got {type(self.plan).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"SparseAttentionConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int) or isinstance(self.block_size, bool)):
            raise TypeError(
                f"SparseAttentionConfig.block_size must be an int (a power of two >= 16) or None, got "
                f"{self.block_size!r} ({type(self.block_size).__name__})"
            )
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"SparseAttentionConfig.block_size must be a power of two >= 16, got {self.block_size}")
        if self.dense_steps is not None and (
            not isinstance(self.dense_steps, int) or isinstance(self.dense_steps, bool) or self.dense_steps < 0
        ):
            raise ValueError(f"SparseAttentionConfig.dense_steps must be an integer >= 0, got {self.dense_steps!r}")


@dataclass(frozen=True)
class SparseStats:
    """What a sparse plan did so far.

    Attributes:
        grids: the token grids seen.
        density: the plan's attention density on the last grid (fraction of query-key pairs computed) in a
            sparse step.
        mean_density: the density averaged over the transformer calls so far, dense steps counting as 1.
        block_density: the fraction of tiles the sparse launches compute, averaged over sparse layers, or None.
        dense_step_calls: transformer calls in the plan's dense first steps.
        sparse_calls: eager attention calls that ran the sparse kernels (compiled calls are not counted).
        passthrough_calls: eager calls of patched layers that went to the original processor (dense steps
            included).
    """

    grids: tuple[TokenGrid, ...]
    density: float | None
    mean_density: float | None
    block_density: float | None
    dense_step_calls: int
    sparse_calls: int
    passthrough_calls: int

    def to_dict(self) -> dict:
        """JSON-ready: every field, each grid as a dict of its fields."""
        return {**dataclasses.asdict(self), "grids": [dataclasses.asdict(grid) for grid in self.grids]}


def call_grid(target: Target, args: tuple, kwargs: dict) -> TokenGrid:
    """The token grid of one transformer call, from its positional and keyword arguments."""
    inputs = dict(kwargs)
    if "hidden_states" not in inputs and args:
        inputs["hidden_states"] = args[0]
    return TokenGrid(*token_grid(target.transformer, target.spec, inputs))


class SparseHandle(Handle):
    """Handle of :class:`SparseAttentionConfig`: per-layer state, the grid listener, and the processor swaps."""

    def __init__(self, target: Target, config: SparseAttentionConfig, kernel_factory: KernelFactory | None = None):
        super().__init__("sparse_attention")
        self.target, self.config = target, config
        self._kernel_factory = kernel_factory or self._layer_attention
        self.patterns = check_plan(config.plan, target.transformer, target.spec)
        parameter = next(target.transformer.parameters(), None)
        check_backend(config.backend, parameter.device if parameter is not None else "cpu")
        self.dense_steps = plan_dense_steps(config.plan) if config.dense_steps is None else config.dense_steps
        self._densities: list[float] = []  # per transformer call
        self._dense_calls = 0
        self._grid_densities: dict[TokenGrid, float] = {}
        self.layers: list[SparseLayer] = []
        self._kernels: dict[tuple, list[LayerAttention | None]] = {}
        self._grid: TokenGrid | None = None
        from accel.sparse.plan import sparse_layers

        modules = sparse_layers(target.transformer, target.spec)
        components = {c.name: c for stack in target.spec.stacks for c in stack.components}
        planned = []
        for index, ((geometry, module), patterns) in enumerate(zip(modules, self.patterns, strict=True)):
            if all(p.kind == "dense" for p in patterns):
                continue
            attr = components[geometry.component].processor_attr
            layer = SparseLayer(index)
            planned.append((module, sparse_processor_for(getattr(module, attr), layer), attr))
            self.layers.append(layer)
        for module, processor, attr in planned:  # every processor was found before the first swap
            self.patch_log.set_processor(module, processor, attr)
        target.tracker.add_call_listener(self._on_call)
        target.tracker.add_step_listener(self._on_step)
        if not self.layers:
            logger.warning("the sparse plan is dense in every layer: nothing is patched, outputs are unchanged")

    def _on_call(self, args: tuple, kwargs: dict) -> None:
        if not self.layers:
            return
        grid = call_grid(self.target, args, kwargs)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
        key = (grid, str(device))
        if key not in self._kernels:
            self._kernels[key] = [self._kernel_factory(layer.index, grid, device) for layer in self.layers]
        for layer, kernel in zip(self.layers, self._kernels[key], strict=True):
            layer.attention = kernel
        self._grid = grid

    def _on_step(self, context: StepContext) -> None:
        """In the dense first steps every patched layer passes through; the density of each call is recorded."""
        if not self.layers or self._grid is None:
            return
        if context.step < self.dense_steps:
            for layer in self.layers:
                layer.attention = None
            self._dense_calls += 1
            self._densities.append(1.0)
        else:
            self._densities.append(self._grid_density(self._grid))

    def _grid_density(self, grid: TokenGrid) -> float:
        if grid not in self._grid_densities:
            self._grid_densities[grid] = plan_density(self.patterns, grid)
        return self._grid_densities[grid]

    def _layer_attention(self, index: int, grid: TokenGrid, device: torch.device) -> LayerAttention:
        patterns = tuple(self.patterns[index])
        return shared_layer_attention(patterns, grid, str(device), self.config.backend, self.config.block_size)

    def stats(self) -> SparseStats:
        """Grids seen, density on the last grid and call counts; see :class:`SparseStats`."""
        blocks = [
            kernel.block_density()
            for kernels in self._kernels.values()
            for kernel in kernels
            if isinstance(kernel, LayerAttention) and kernel.block_density() is not None
        ]
        return SparseStats(
            grids=tuple(dict.fromkeys(grid for grid, _ in self._kernels)),
            density=self._grid_density(self._grid) if self._grid is not None else None,
            mean_density=sum(self._densities) / len(self._densities) if self._densities else None,
            block_density=sum(blocks) / len(blocks) if blocks else None,
            dense_step_calls=self._dense_calls,
            sparse_calls=sum(layer.sparse_calls for layer in self.layers),
            passthrough_calls=sum(layer.passthrough_calls for layer in self.layers),
        )

    def _remove(self) -> None:
        self.target.tracker.remove_call_listener(self._on_call)
        self.target.tracker.remove_step_listener(self._on_step)
        for layer in self.layers:
            layer.attention = None
        super()._remove()


@register(SparseAttentionConfig, name="sparse_attention", phase="processors")
def apply_sparse(target: Target, config: SparseAttentionConfig) -> SparseHandle:
    """Swap in sparse processors for ``config.plan``; see :class:`SparseHandle`."""
    from accel.caching.token_checks import SPARSE_REFUSAL
    from accel.caching.tokens import TokenStepConfig

    if TokenStepConfig in target.tracker.active:
        raise ValueError(SPARSE_REFUSAL)
    return SparseHandle(target, config)
