"""The recorders of calibration's step 2: ``(x, y)`` output pairs of every computing component along a trajectory.

CacheQuant's correction (:mod:`accel.quant.correction`) fits, per (step, block, component) and output channel,
a line from a quantized component's output ``x`` to the full-precision output ``y`` the same component gives on
the same inputs. :class:`CorrectionRecorder` gathers those pairs while :func:`~accel.quant.calibrate` runs the
calibration trajectories with the chosen layers quantized (and under the caching schedule, when it has one):

* a forward pre-hook on every block runs the block once more, before its real call, through its class's
  ``forward`` (past any wrapper on the block, such as the cache's) with the full-precision weights swapped back
  in, and records each component's output there as ``y``;
* a wrapper on every component records what the quantized component computes as ``x``;
* at the block's next call of the same branch (and at the end of the trajectory), each ``y`` is paired with the
  ``x`` of the same step and fed to :class:`~accel.quant.correction.CorrectionStatistics`.

Why along the cached trajectory: where a cache reuses or extrapolates features, the steps it computes see
inputs that differ from the uncached trajectory's, and so do their quantization errors. A pre-hook sees a
block's inputs whatever the cache then does with the block, so ``y`` is the full-precision answer to the inputs
the cached trajectory really produces. A component the cache reuses at a step computed nothing there, has no
``x`` of that step and gives no pair: the correction removes the quantization error of what a step computes,
and the caching error stays the schedule's.

:func:`with_correction` turns the statistics into the plan's correction channels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from accel.patches import PatchLog, eager
from accel.plan import Plan
from accel.quant.correction import CorrectionStatistics

#: a quantized layer as :func:`~accel.quant.calibration.quantize_layers` swapped it: (linear, full-precision
#: weight, quantized weight)
Swap = tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]


def component_modules(target, layout) -> list[tuple[int, int, torch.nn.Module]]:
    """``(block index, component index in the schedule layout, module)`` of every component present."""
    found = []
    for index, (stack, block) in enumerate(target.spec.block_list(target.transformer)):
        for component in stack.components:
            module = getattr(block, component.module, None)
            if isinstance(module, torch.nn.Module) and component.name in layout.components:
                found.append((index, layout.components.index(component.name), module))
    return found


class CorrectionRecorder:
    """The recorders of the module docstring for ``target``'s components in ``layout``, with the layers
    ``swapped`` quantized; :attr:`statistics` holds what they gathered and :attr:`last_step` the last step seen.

    :meth:`install` puts the component wrappers into a patch log (undone with it) and returns the block
    pre-hooks' handles, which :meth:`uninstall` removes.
    """

    def __init__(self, target, layout, swapped: dict[str, Swap]):
        self.tracker = target.tracker
        self.blocks = [module for _, module in target.spec.block_list(target.transformer)]
        self.components = component_modules(target, layout)
        by_linear = {id(entry[0]): entry for entry in swapped.values()}
        self.swaps: dict[int, list[Swap]] = {  # block index -> the quantized layers inside it
            index: [by_linear[id(m)] for m in block.modules() if id(m) in by_linear]
            for index, block in enumerate(self.blocks)
        }
        self.statistics = CorrectionStatistics()
        self.held: dict[tuple[int, int, int], tuple[int, torch.Tensor]] = {}  # what each component last computed
        self.pending: dict[tuple[int, int, int], tuple[int, torch.Tensor]] = {}  # full-precision output, this step
        self.reference = False
        self.last_step = -1

    def install(self, log: PatchLog) -> list:
        for block, component, module in self.components:
            log.wrap(module, "forward", self._component(block, component))
        hooks = [
            module.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True)
            for index, module in enumerate(self.blocks)
        ]
        self.tracker.add_reset_listener(self.flush)
        return hooks

    def uninstall(self, hooks: list) -> None:
        for hook in hooks:
            hook.remove()
        self.tracker.remove_reset_listener(self.flush)

    def _component(self, block: int, component: int):
        def forward(inner, *args, **kwargs):
            output = inner(*args, **kwargs)
            self._record(block, component, output)
            return output

        return forward

    @eager
    def _record(self, block: int, component: int, output: Any) -> None:
        context = self.tracker.current
        if context is None or not isinstance(output, torch.Tensor):
            return
        self.last_step = max(self.last_step, context.step)
        store = self.pending if self.reference else self.held
        store[(block, component, context.branch)] = (context.step, output.detach())

    def _pre_hook(self, index: int):
        @eager
        def hook(module, args, kwargs):
            context = self.tracker.current
            if context is None:
                return None
            self._pair(lambda key: key[0] == index and key[2] == context.branch)
            self._full_precision(index, module, args, kwargs)
            return None

        return hook

    @torch.no_grad()
    def _full_precision(self, index: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """The block's forward (its class's, past any wrapper) with its full-precision weights, recording ``y``."""
        swaps = self.swaps.get(index, [])
        self.reference = True
        try:
            for linear, original, _ in swaps:
                linear._parameters["weight"] = original
            type(module).forward(module, *args, **kwargs)
        finally:
            for linear, _, quantized in swaps:
                linear._parameters["weight"] = quantized
            self.reference = False

    def _pair(self, selects: Callable[[tuple], bool]) -> None:
        """Pair the selected pending ``y`` with the ``x`` the component computed at the same step (a reused
        component has no ``x`` of its own step and gives no pair)."""
        for key in [key for key in self.pending if selects(key)]:
            step, y = self.pending.pop(key)
            held = self.held.get(key)
            if held is not None and held[1].shape == y.shape and held[0] == step:
                self.statistics.update((held[0], key[0], key[1]), held[1], y)

    def flush(self) -> None:
        """End of a trajectory: pair everything pending, forget what was computed."""
        self._pair(lambda key: True)
        self.held.clear()


def with_correction(plan: Plan, statistics: CorrectionStatistics, steps: int, layout) -> Plan:
    """``plan`` with the lines fitted to ``statistics`` over ``steps`` steps of ``layout``'s blocks and
    components: channels ``correction_scale``/``correction_shift`` over (step, block, component, channel) and
    ``corrected`` over (step, block, component) (see :func:`~accel.quant.calibrate`)."""
    if not statistics.sums:
        raise ValueError("no component outputs were recorded for the correction: do the calibration runs call it?")
    width = max(sums.shape[1] for sums in statistics.sums.values())
    blocks, components = layout.num_blocks, len(layout.components)
    scale, shift, fitted = statistics.coefficients(steps, blocks, components, width)
    axes = ("step", "block", "component", "channel")
    sizes = {"step": steps, "block": blocks, "component": components, "channel": width}
    plan = replace(plan, sizes=sizes, components=tuple(layout.components))
    plan = plan.with_channel("correction_scale", axes, scale).with_channel("correction_shift", axes, shift)
    return plan.with_channel("corrected", axes[:3], fitted)
