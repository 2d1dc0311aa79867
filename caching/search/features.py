"""What the full-compute run tells the search: per-component feature changes across steps, and MACs.

:func:`record_features` hooks every scheduled component of a transformer (per instance, removed afterwards),
keeps a fixed random sketch of each output at every step, and turns them into change matrices
``change[block, component, i, j] = |f_j - f_i|_1 / |f_j|_1``: the relative error at step ``j`` of reusing the
output computed at step ``i``. :func:`count_macs` measures the MACs of one transformer call per block and per
component (``torch.utils.flop_counter``, the same counter the caching engine's :class:`CacheStats` uses);
:class:`CostModel` turns a compute mask into MACs without running anything.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from accel.adapters import spec_for
from accel.compile import flop_counter


@dataclass(frozen=True, kw_only=True, eq=False)
class CostModel:
    """MACs of one transformer call, split by block and component.

    Attributes:
        block_macs: ``(blocks,)`` MACs of each block's forward.
        component_macs: ``(blocks, components)`` MACs of each component (0 where a block lacks it).
        other_macs: MACs of the transformer outside its blocks (embeddings, final layer): always spent.
    """

    block_macs: np.ndarray
    component_macs: np.ndarray
    other_macs: float

    @property
    def call_macs(self) -> float:
        """MACs of one full transformer call."""
        return float(self.block_macs.sum() + self.other_macs)

    def step_macs(self, mask: np.ndarray) -> np.ndarray:
        """``(steps,)`` MACs spent per call at each step under ``mask`` with residual reuse.

        A block whose components are all reused is skipped whole (its input plus the cached residual); otherwise
        only the reused components' MACs are saved.
        """
        mask = np.asarray(mask, dtype=bool)
        present = self.component_macs > 0  # (blocks, components)
        skipped = ~(mask & present).any(axis=2)  # (steps, blocks)
        partial = ((~mask) * self.component_macs).sum(axis=2)  # MACs of reused components
        spent = np.where(skipped, 0.0, self.block_macs - partial)
        return spent.sum(axis=1) + self.other_macs

    def relative_macs(self, mask: np.ndarray) -> float:
        """MACs under ``mask`` as a fraction of computing everything (1.0 = no saving)."""
        mask = np.asarray(mask, dtype=bool)
        return float(self.step_macs(mask).sum() / (mask.shape[0] * self.call_macs))

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {
            "block_macs": self.block_macs.tolist(),
            "component_macs": self.component_macs.tolist(),
            "other_macs": self.other_macs,
        }

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        """Parse :meth:`to_dict` output."""
        return cls(
            block_macs=np.asarray(data["block_macs"], dtype=np.float64),
            component_macs=np.asarray(data["component_macs"], dtype=np.float64),
            other_macs=float(data["other_macs"]),
        )


def _scheduled_modules(transformer: torch.nn.Module, components: tuple[str, ...]):
    """``(block index, component index, module)`` of every scheduled component, and the block modules."""
    spec = spec_for(transformer)
    blocks = spec.block_list(transformer)
    found = []
    for b, (stack, block) in enumerate(blocks):
        for component in stack.components:
            module = getattr(block, component.module, None)
            if isinstance(module, torch.nn.Module) and component.name in components:
                found.append((b, components.index(component.name), module))
    return found, [block for _, block in blocks]


def count_macs(transformer: torch.nn.Module, components: tuple[str, ...], args: tuple, kwargs: dict) -> CostModel:
    """Count the MACs of one ``transformer(*args, **kwargs)`` call per block and component (torchao's int8
    matmuls included: :data:`accel.compile.EXTRA_FLOP_FORMULAS`)."""
    found, blocks = _scheduled_modules(transformer, components)
    root = type(transformer).__name__
    names = {id(module): f"{root}.{name}" if name else root for name, module in transformer.named_modules()}
    with torch.no_grad(), flop_counter() as counter:
        transformer(*args, **kwargs)
    per_module = {name: sum(counts.values()) / 2 for name, counts in counter.get_flop_counts().items()}
    block_macs = np.array([per_module.get(names[id(block)], 0.0) for block in blocks])
    component_macs = np.zeros((len(blocks), len(components)))
    for b, c, module in found:
        component_macs[b, c] = per_module.get(names[id(module)], 0.0)
    total = counter.get_total_flops() / 2
    return CostModel(block_macs=block_macs, component_macs=component_macs, other_macs=float(total - block_macs.sum()))


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((t for t in (_first_tensor(o) for o in output) if t is not None), None)
    return None


class FeatureRecorder:
    """Records sketches of every scheduled component's output per step; use :func:`record_features`.

    Attributes:
        first_call: ``(args, kwargs)`` of the first transformer call (for :func:`count_macs`).
    """

    def __init__(self, transformer: torch.nn.Module, components: tuple[str, ...], sketch_size: int, seed: int):
        self.transformer, self.components, self.sketch_size = transformer, components, sketch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.first_call: tuple[tuple, dict] | None = None
        self.found, blocks = _scheduled_modules(transformer, components)
        self.num_blocks = len(blocks)
        self.timestep_arg = spec_for(transformer).timestep_arg
        self._indices: dict[tuple[int, int], torch.Tensor] = {}
        self._sketches: dict[tuple[int, int], dict[int, list[torch.Tensor]]] = {}
        self._step, self._last_key = -1, None

    def _on_call(self, module, args, kwargs) -> None:
        if self.first_call is None:
            self.first_call = (args, dict(kwargs))
        timestep = kwargs.get(self.timestep_arg)
        key = None if timestep is None else float(torch.as_tensor(timestep).float().mean())
        if key is None or key != self._last_key:
            self._step += 1
            self._last_key = key

    def _on_output(self, b: int, c: int, output) -> None:
        tensor = _first_tensor(output)
        if tensor is None:
            return
        flat = tensor.detach().float().reshape(-1)
        index = self._indices.get((b, c))
        if index is None or index.numel() > flat.numel():
            count = min(self.sketch_size, flat.numel())
            index = torch.randperm(flat.numel(), generator=self.generator)[:count]
            self._indices[(b, c)] = index
        self._sketches.setdefault((b, c), {}).setdefault(self._step, []).append(flat[index.to(flat.device)].cpu())

    @contextmanager
    def attached(self):
        """Hooks attached inside the ``with`` block, removed after."""
        handles = [self.transformer.register_forward_pre_hook(self._on_call, with_kwargs=True)]
        for b, c, module in self.found:
            handles.append(module.register_forward_hook(lambda m, a, out, b=b, c=c: self._on_output(b, c, out)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def change_matrices(self) -> np.ndarray:
        """``(blocks, components, steps, steps)`` float64; NaN where a block lacks a component."""
        steps = self._step + 1
        change = np.full((self.num_blocks, len(self.components), steps, steps), np.nan)
        for (b, c), per_step in self._sketches.items():
            if len(per_step) != steps:
                continue
            sketches = torch.stack([torch.cat(per_step[s]) for s in range(steps)]).double()  # (steps, sketch)
            distance = torch.cdist(sketches, sketches, p=1)  # (steps, steps)
            scale = sketches.abs().sum(dim=1).clamp_min(1e-12)  # |f_j|_1
            change[b, c] = (distance / scale[None, :]).numpy()
        return change


def record_features(transformer: torch.nn.Module, components: tuple[str, ...], sketch_size: int = 4096, seed: int = 0):
    """A :class:`FeatureRecorder` context: run the full-compute pipeline inside it, then read its results."""
    return FeatureRecorder(transformer, components, sketch_size, seed).attached()
