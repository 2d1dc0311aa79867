"""diffusers' own caching hooks as harness methods, through diffusers' public API.

A transformer that inherits diffusers' ``CacheMixin`` gets ``transformer.enable_cache(config)`` and
``disable_cache()``. One that does not (PixArt's) gets the public ``diffusers.hooks.apply_*`` function, and
removal takes off exactly the hooks that call added (diffusers' ``HookRegistry.remove_hook``), restoring every
``forward``, so the model is left as it was.

What each hook needs from the pipeline:

* FirstBlockCache, TaylorSeer and MagCache keep their state per ``transformer.cache_context(name)``, which
  only pipelines written for them enter. For a pipeline that does not (PixArt, Sana, DiT, SD3: each batches
  classifier-free guidance into one transformer call), the harness enters one named context around every
  transformer call through diffusers' public ``CacheMixin.cache_context``, so every call of a generation shares
  the state, as with those pipelines' single call per step.
* TaylorSeer hooks only the modules named by ``cache_identifiers``; the harness names the blocks' cacheable
  components (self-attention, cross-attention, feed-forward), keeping diffusers' other defaults.
* Pyramid Attention Broadcast and FasterCache ask for the current timestep through a callback; the harness
  reads it from the transformer's ``timestep`` argument with a forward pre-hook (removed on exit).
* MagCache also needs magnitude ratios calibrated for the model; diffusers ships them for Flux only.
  :func:`calibrate_mag_ratios` measures them from one full-compute run (MagCache's definition: the mean over
  tokens of the ratio of successive steps' residual norms, the residual being the last block's output minus
  the first block's input); pass them as the method's ``mag_ratios`` parameter.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from accel.eval.methods import Applied, UnsupportedMethod

logger = logging.getLogger(__name__)

#: methods whose hooks keep state per diffusers cache context
NEEDS_CACHE_CONTEXT = {"diffusers-fbc", "diffusers-taylorseer", "diffusers-magcache"}


def pipeline_enters_cache_context(pipe: Any) -> bool:
    """Whether the pipeline's ``__call__`` wraps its transformer calls in ``transformer.cache_context``."""
    try:
        return "cache_context" in inspect.getsource(type(pipe).__call__)
    except (OSError, TypeError):
        return False


class _TimestepProbe:
    """Remembers the timestep of the transformer's latest call (a removable forward pre-hook)."""

    def __init__(self, transformer: torch.nn.Module):
        self.value: float = 1000.0
        self.handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        if timestep is not None:
            self.value = float(torch.as_tensor(timestep).flatten()[0])

    def __call__(self) -> float:
        return self.value


def calibrate_mag_ratios(transformer: torch.nn.Module, run: Callable[[], Any]) -> list[float]:
    """MagCache's magnitude ratios of ``transformer``, measured while ``run()`` does one full-compute generation.

    Step ``t``'s ratio is the mean over batch and tokens of ``|r_t| / |r_{t-1}|``, with ``r`` the residual of
    the block stack (last block's output minus first block's input) at each transformer call; the first is 1.

    Returns:
        one ratio per transformer call of ``run()`` (per step, for pipelines that batch guidance in one call).
    """
    from accel.adapters import spec_for

    blocks = transformer.get_submodule(spec_for(transformer).stacks[0].path)
    first, last = blocks[0], blocks[len(blocks) - 1]
    state: dict[str, Any] = {"input": None, "previous": None, "ratios": []}

    def record_input(module, args, kwargs):
        if state["input"] is None:  # only the first block of a call
            state["input"] = kwargs.get("hidden_states", args[0] if args else None)

    def record_output(module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        residual = (hidden - state["input"]).float()
        norms = torch.linalg.vector_norm(residual, dim=-1)
        previous = state["previous"]
        state["ratios"].append(1.0 if previous is None else float((norms / (previous + 1e-8)).mean()))
        state["previous"], state["input"] = norms, None

    handles = [
        first.register_forward_pre_hook(record_input, with_kwargs=True),
        last.register_forward_hook(record_output, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return state["ratios"]


def component_patterns(transformer: torch.nn.Module) -> list[str]:
    """Module-name patterns of every cacheable component of ``transformer`` (from accel's adapter), e.g.
    ``transformer_blocks\\.\\d+\\.attn1``: what diffusers' TaylorSeer hooks, which by itself hooks nothing unless
    told which modules to cache."""
    from accel.adapters import spec_for

    return [
        rf"{re.escape(stack.path)}\.\d+\.{re.escape(component.module)}"
        for stack in spec_for(transformer).stacks
        for component in stack.components
    ]


def _make_config(kind: str, params: dict, steps: int, transformer: torch.nn.Module, timestep: Callable[[], float]):
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    if kind == "diffusers-fbc":
        return FirstBlockCacheConfig(threshold=params["threshold"])
    if kind == "diffusers-taylorseer":  # diffusers' defaults, on the modules accel's adapter caches
        return TaylorSeerCacheConfig(cache_identifiers=component_patterns(transformer))
    if kind == "diffusers-pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, current_timestep_callback=timestep)
    if kind == "diffusers-fastercache":
        return FasterCacheConfig(current_timestep_callback=timestep, tensor_format="BCHW")
    if kind == "diffusers-magcache":
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        if params.get("mag_ratios") is not None:
            return MagCacheConfig(num_inference_steps=steps, mag_ratios=list(params["mag_ratios"]))
        if "Flux" not in type(transformer).__name__:
            raise UnsupportedMethod(
                f"MagCache needs magnitude ratios calibrated for {type(transformer).__name__}; diffusers ships them "
                "for Flux only (accel.eval.diffusers_cache.calibrate_mag_ratios measures them; pass them as the "
                "method's mag_ratios parameter, as python -m accel.bench search does)"
            )
        return MagCacheConfig(num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS)
    raise ValueError(f"not a diffusers cache method: {kind}")


def _config_dict(config: Any) -> dict:
    fields = {}
    for name, value in vars(config).items():
        if callable(value):
            fields[name] = "<callback>"
        elif isinstance(value, torch.Tensor):
            fields[name] = value.tolist()
        elif isinstance(value, (int, float, str, bool, type(None), list, tuple)):
            fields[name] = list(value) if isinstance(value, tuple) else value
        else:
            fields[name] = str(value)
    return {"type": f"diffusers.hooks.{type(config).__name__}", **fields}


def _registries(module: torch.nn.Module) -> dict[str, Any]:
    return {name: sub._diffusers_hook for name, sub in module.named_modules() if hasattr(sub, "_diffusers_hook")}


@contextmanager
def _hooks_applied(transformer: torch.nn.Module, config: Any) -> Iterator[str]:
    """Enable ``config`` through ``enable_cache`` where the model has it, else through ``diffusers.hooks.apply_*``."""
    if hasattr(transformer, "enable_cache"):
        transformer.enable_cache(config)
        try:
            yield "transformer.enable_cache"
        finally:
            transformer.disable_cache()
        return
    import diffusers.hooks as hooks

    apply_fn = {
        "FirstBlockCacheConfig": hooks.apply_first_block_cache,
        "TaylorSeerCacheConfig": hooks.apply_taylorseer_cache,
        "PyramidAttentionBroadcastConfig": hooks.apply_pyramid_attention_broadcast,
        "FasterCacheConfig": hooks.apply_faster_cache,
        "MagCacheConfig": hooks.apply_mag_cache,
    }[type(config).__name__]
    before = {name: set(registry.hooks) for name, registry in _registries(transformer).items()}
    own_forward = {name for name, sub in transformer.named_modules() if "forward" in sub.__dict__}
    try:
        apply_fn(transformer, config)
        yield f"diffusers.hooks.{apply_fn.__name__}"
    finally:
        modules = dict(transformer.named_modules())
        for name, registry in _registries(transformer).items():
            for hook_name in set(registry.hooks) - before.get(name, set()):
                registry.remove_hook(hook_name, recurse=False)
            if name not in before and not registry.hooks:
                del modules[name]._diffusers_hook
            if name not in own_forward:
                modules[name].__dict__.pop("forward", None)


@contextmanager
def _harness_context(transformer: torch.nn.Module, enter: bool) -> Iterator[None]:
    """When ``enter`` (the pipeline enters none itself), every transformer call of the block runs inside one
    named diffusers cache context, through the public ``CacheMixin.cache_context``, entered per call so that
    the hooks' ``reset`` (which clears the context) between generations does not leave calls without one."""
    if not enter:
        yield
        return
    from diffusers.models.cache_utils import CacheMixin

    open_contexts = []

    def enter_context(module, args, kwargs):
        context = CacheMixin.cache_context(module, "accel-harness")
        context.__enter__()
        open_contexts.append(context)

    def leave_context(module, args, kwargs, output):
        open_contexts.pop().__exit__(None, None, None)

    handles = [
        transformer.register_forward_pre_hook(enter_context, with_kwargs=True),
        transformer.register_forward_hook(leave_context, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while open_contexts:  # a call that raised
            open_contexts.pop().__exit__(None, None, None)


@contextmanager
def apply_diffusers_cache(pipe: Any, kind: str, params: dict, steps: int) -> Iterator[Applied]:
    """Apply one of diffusers' caching hooks to ``pipe.transformer`` for the ``with`` block.

    Raises:
        UnsupportedMethod: the hook needs something this model lacks, or the pipeline call fails with the hooks
            on (the error chained).
    """
    transformer = pipe.transformer
    supply_context = kind in NEEDS_CACHE_CONTEXT and not pipeline_enters_cache_context(pipe)
    probe = _TimestepProbe(transformer)
    try:
        config = _make_config(kind, params, steps, transformer, probe)
        with _hooks_applied(transformer, config) as via, _harness_context(transformer, supply_context):
            from diffusers.hooks import HookRegistry

            def reset() -> None:
                HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks(recurse=True)

            applied = {**_config_dict(config), "applied_with": via, "harness_cache_context": supply_context}
            try:
                yield Applied(steps=steps, config=applied, reset=reset)
            except Exception as error:  # a third-party hook failing on this model is recorded, not fatal
                raise UnsupportedMethod(
                    f"diffusers' {kind.removeprefix('diffusers-')} hooks failed on {type(transformer).__name__}: "
                    f"{type(error).__name__}: {error}"
                ) from error
    finally:
        probe.handle.remove()
