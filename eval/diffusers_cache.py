"""diffusers' own caching hooks as harness methods, through diffusers' public API.

A transformer that inherits diffusers' ``CacheMixin`` gets ``transformer.enable_cache(config)`` and
``disable_cache()``. One that does not (PixArt's) gets the public ``diffusers.hooks.apply_*`` function, and
removal takes off exactly the hooks that call added (diffusers' ``HookRegistry.remove_hook``), restoring every
``forward``, so the model is left as it was.

What each hook needs from the pipeline:

* FirstBlockCache, TaylorSeer and MagCache keep their state per ``transformer.cache_context(name)``, which
  only pipelines written for them enter. Elsewhere the method is :class:`UnsupportedMethod`.
* Pyramid Attention Broadcast and FasterCache ask for the current timestep through a callback; the harness
  reads it from the transformer's ``timestep`` argument with a forward pre-hook (removed on exit).
* MagCache also needs magnitude ratios calibrated for the model; diffusers ships them for Flux only.
"""

from __future__ import annotations

import inspect
import logging
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
    if kind == "diffusers-taylorseer":
        return TaylorSeerCacheConfig()
    if kind == "diffusers-pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, current_timestep_callback=timestep)
    if kind == "diffusers-fastercache":
        return FasterCacheConfig(current_timestep_callback=timestep, tensor_format="BCHW")
    if kind == "diffusers-magcache":
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        if "Flux" not in type(transformer).__name__:
            raise UnsupportedMethod(
                f"MagCache needs magnitude ratios calibrated for {type(transformer).__name__}; diffusers ships them "
                "for Flux only (MagCacheConfig(calibrate=True) measures them, a step the harness does not automate)"
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
def apply_diffusers_cache(pipe: Any, kind: str, params: dict, steps: int) -> Iterator[Applied]:
    """Apply one of diffusers' caching hooks to ``pipe.transformer`` for the ``with`` block.

    Raises:
        UnsupportedMethod: the pipeline does not enter ``cache_context`` though the hook needs it, the hook
            needs something this model lacks, or the pipeline call fails with the hooks on (the error chained).
    """
    transformer = pipe.transformer
    if kind in NEEDS_CACHE_CONTEXT and not pipeline_enters_cache_context(pipe):
        raise UnsupportedMethod(
            f"{type(pipe).__name__} does not call transformer.cache_context(...) in its denoising loop, which "
            f"diffusers' {kind.removeprefix('diffusers-')} hooks need to keep their state"
        )
    probe = _TimestepProbe(transformer)
    try:
        config = _make_config(kind, params, steps, transformer, probe)
        with _hooks_applied(transformer, config) as via:
            from diffusers.hooks import HookRegistry

            def reset() -> None:
                HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks(recurse=True)

            try:
                yield Applied(steps=steps, config={**_config_dict(config), "applied_with": via}, reset=reset)
            except Exception as error:  # a third-party hook failing on this model is recorded, not fatal
                raise UnsupportedMethod(
                    f"diffusers' {kind.removeprefix('diffusers-')} hooks failed on {type(transformer).__name__}: "
                    f"{type(error).__name__}: {error}"
                ) from error
    finally:
        probe.handle.remove()
