"""The front door: ``accel.apply(pipe_or_transformer, *configs) -> Handle``.

Each technique registers one apply function for its frozen config class with :func:`register`, with a
name and a phase; :func:`apply` dispatches on ``type(config)`` and applies several configs in phase order
(:data:`accel.patches.PHASES`). Every apply function returns a :class:`Handle`, whose changes to the model
are recorded in its :class:`~accel.patches.PatchLog` and undone exactly by ``remove()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from accel.adapters import ModelSpec, spec_for
from accel.compile import compiled_forward_codes, resume_compiled_code
from accel.context import StepTracker, tracker_for
from accel.patches import PHASES, PatchLog, PatchRecord


@dataclass(frozen=True)
class Target:
    """What a technique's apply function works on.

    Attributes:
        transformer: the denoiser module being accelerated.
        spec: its adapter spec (blocks and components).
        tracker: the shared step tracker of the transformer.
        pipeline: the diffusers pipeline it came from, or ``None`` for a bare transformer.
        configs: every config of the same :func:`apply` call, so that a technique can depend on another one
            applied with it (cache-aware quantization calibrates under the caching schedule).
    """

    transformer: torch.nn.Module
    spec: ModelSpec
    tracker: StepTracker
    pipeline: Any | None = None
    configs: tuple = ()


class Handle:
    """Undo handle returned by every apply function; also a context manager.

    A handle is its patch log: a technique records every change it makes in :attr:`patch_log`, and
    :meth:`remove` undoes them, newest first. Subclasses may extend :meth:`_remove` (calling the base) and
    override :meth:`stats` and :meth:`reset`.

    Args:
        technique: the name recorded on every change, e.g. ``"caching"``.
    """

    def __init__(self, technique: str = "technique"):
        self._removed = False
        self.patch_log = PatchLog(technique)

    def patches(self) -> list[PatchRecord]:
        """The changes this handle made that are still in place, oldest first."""
        return self.patch_log.records

    @property
    def removed(self) -> bool:
        """Whether :meth:`remove` has run."""
        return self._removed

    def remove(self) -> None:
        """Undo everything the technique added. Idempotent."""
        if not self._removed:
            self._removed = True
            self._remove()

    def _remove(self) -> None:
        self.patch_log.undo()

    def stats(self) -> Any:
        """What the technique did so far (technique-specific object)."""
        return None

    def reset(self) -> None:
        """Drop all per-trajectory state, as at the start of a pipeline call."""

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


class ApplyHandle(Handle):
    """The handle :func:`apply` returns: one technique handle per config, removed in reverse order."""

    def __init__(self, target: Target, parts: dict[type, Handle]):
        super().__init__("accel")
        self.target = target
        self.parts = parts
        #: the same configs on the pipeline's other denoisers (Wan 2.2's ``transformer_2``), by attribute name;
        #: removed, reset and counted in :meth:`stats` with this handle
        self.others: dict[str, ApplyHandle] = {}
        #: forward code the transformer had compiled before apply, run compiled again after removal
        #: (:func:`accel.compile.resume_compiled_code`)
        self.compiled_codes = compiled_forward_codes(target.transformer)

    def patches(self) -> list[PatchRecord]:
        """Every change in place: the core's step tracking (technique ``"core"``, shared by all techniques on
        this transformer) while it is needed, then each technique's, in the order they were applied."""
        core = self.target.tracker.patch_log.records if not self.removed else []
        own = core + [record for part in self.parts.values() for record in part.patches()]
        return own + [record for other in self.others.values() for record in other.patches()]

    def __getitem__(self, config_type: type) -> Handle:
        """The handle of one technique, e.g. ``handle[CacheConfig].decision_log``."""
        if config_type not in self.parts:
            raise KeyError(f"no {getattr(config_type, '__name__', config_type)} was applied with this handle")
        return self.parts[config_type]

    def __getattr__(self, name: str) -> Any:
        """With one technique applied, its handle's own attributes (e.g. ``handle.decision_log``) are the
        apply handle's too; with several, ``handle[ConfigType].name`` says which."""
        parts = self.__dict__.get("parts")
        if name.startswith("_") or not parts:
            raise AttributeError(name)
        if len(parts) == 1:
            return getattr(next(iter(parts.values())), name)
        raise AttributeError(f"{name!r}: several techniques are applied; use handle[ConfigType].{name}")

    def _remove(self) -> None:
        for other in reversed(list(self.others.values())):
            other.remove()
        for config_type, part in reversed(list(self.parts.items())):
            part.remove()
            self.target.tracker.active.pop(config_type, None)
            self.target.tracker.release()
        resume_compiled_code(self.compiled_codes)

    def stats(self) -> Any:
        """The technique's stats if one config was applied, else ``{config class name: stats}``; with other
        denoisers, summed over all of them (:func:`merge_stats`)."""
        if len(self.parts) == 1:
            own = next(iter(self.parts.values())).stats()
        else:
            own = {config_type.__name__: part.stats() for config_type, part in self.parts.items()}
        return merge_stats(own, *(other.stats() for other in self.others.values()))

    def reset(self) -> None:
        """Start a new trajectory: the next transformer call is step 0 and every technique drops its state."""
        self.target.tracker.reset()
        for part in self.parts.values():
            part.reset()
        for other in self.others.values():
            other.reset()


def merge_stats(first: Any, *others: Any) -> Any:
    """Technique statistics of several denoisers as one: counts added field by field (numbers summed, lists
    element-wise, dicts key-wise) for dataclass or dict stats of the same type; None counts as nothing."""
    merged = first
    for other in others:
        merged = _add(merged, other)
    return merged


def _add(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return b if a is None else a
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        return dataclasses.replace(
            a, **{f.name: _add(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a) if f.init}
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return {key: _add(a.get(key), b.get(key)) for key in {**a, **b}}
    if isinstance(a, list) and isinstance(b, list):
        longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
        return [_add(x, shorter[i]) if i < len(shorter) else x for i, x in enumerate(longer)]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a + b
    return a


Applier = Callable[[Target, Any], Handle]


@dataclass(frozen=True)
class Technique:
    """A registered technique.

    Attributes:
        config_type: its frozen config class.
        apply: ``fn(target, config) -> Handle``.
        name: recorded on its patches, e.g. ``"caching"``.
        phase: when it is applied among several (one of :data:`accel.patches.PHASES`).
    """

    config_type: type
    apply: Applier
    name: str
    phase: str


_TECHNIQUES: dict[type, Technique] = {}


def register(config_type: type, *, name: str | None = None, phase: str = "forwards") -> Callable[[Applier], Applier]:
    """Decorator registering ``fn(target, config) -> Handle`` as the apply function for ``config_type``.

    Args:
        name: the technique's name on its patches (default: the config class name).
        phase: ``"weights"``, ``"processors"`` or ``"forwards"``; :func:`apply` applies in that order.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")

    def decorator(fn: Applier) -> Applier:
        _TECHNIQUES[config_type] = Technique(config_type, fn, name or config_type.__name__, phase)
        return fn

    return decorator


def unregister(config_type: type) -> None:
    """Remove the technique registered for ``config_type`` (for plugins and tests); unknown types are ignored."""
    _TECHNIQUES.pop(config_type, None)


def techniques() -> list[Technique]:
    """Every registered technique, in phase order."""
    return sorted(_TECHNIQUES.values(), key=lambda t: PHASES.index(t.phase))


def unwrap_compiled(module: Any) -> Any:
    """The module a ``torch.compile(module)`` wrapper (``OptimizedModule``) compiles, or ``module`` itself."""
    while isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        module = module._orig_mod
    return module


def resolve_transformer(pipe_or_transformer: Any) -> torch.nn.Module:
    """A pipeline's ``.transformer``, or the module itself; a ``torch.compile`` wrapper is looked through."""
    transformer = pipe_or_transformer
    if not isinstance(transformer, torch.nn.Module):
        transformer = getattr(pipe_or_transformer, "transformer", None)
        if not isinstance(transformer, torch.nn.Module):
            raise TypeError(
                "accel needs a diffusers pipeline with a `.transformer` or a transformer nn.Module, "
                f"got {type(pipe_or_transformer).__name__}"
            )
    return unwrap_compiled(transformer)


#: pipeline attributes holding a denoiser besides ``transformer``: Wan 2.2's low-noise expert
EXTRA_DENOISERS = ("transformer_2",)


def denoisers(pipe: Any) -> dict[str, torch.nn.Module]:
    """A pipeline's denoisers by attribute name: ``transformer`` and those of :data:`EXTRA_DENOISERS` that are set
    (Wan 2.2's ``transformer`` and ``transformer_2``, the high- and low-noise experts), compile wrappers looked
    through."""
    found = {}
    for name in ("transformer", *EXTRA_DENOISERS):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            found[name] = unwrap_compiled(module)
    return found


def resolve(pipe_or_transformer: Any, spec: ModelSpec | None = None, transformer: Any = None) -> Target:
    """Find the transformer (see :func:`resolve_transformer`; or ``transformer``, one of the pipeline's
    :func:`denoisers`), its spec and tracker."""
    if transformer is None:
        transformer = resolve_transformer(pipe_or_transformer)
    transformer = unwrap_compiled(transformer)
    pipeline = None if isinstance(pipe_or_transformer, torch.nn.Module) else pipe_or_transformer
    model_spec = spec_for(transformer, spec)
    tracker = tracker_for(transformer, model_spec.timestep_arg)
    if pipeline is not None:
        tracker.watch_scheduler(getattr(pipeline, "scheduler", None))
    return Target(transformer=transformer, spec=model_spec, tracker=tracker, pipeline=pipeline)


def diffusers_hooks(module: torch.nn.Module) -> dict[str, list[str]]:
    """``{submodule name: [hook names]}`` of the hooks diffusers' hook registry (``diffusers.hooks.HookRegistry``,
    e.g. ``transformer.enable_cache(...)``) holds on ``module`` and its submodules (``""``: the module itself)."""
    found = {}
    for name, submodule in module.named_modules():
        registry = submodule.__dict__.get("_diffusers_hook")
        order = list(getattr(registry, "_hook_order", []) or [])
        if order:
            found[name] = order
    return found


def check_no_diffusers_hooks(transformer: torch.nn.Module) -> None:
    """Refuse a transformer that carries diffusers' own hooks (e.g. its ``enable_cache``): they wrap the same
    ``forward`` methods, and removing them (``disable_cache()``) restores the forwards they saw, stripping accel's
    wrappers without a word. Applied before diffusers' hooks, accel coexists with them.

    Raises:
        ValueError: which modules carry which hooks, and the two ways out.
    """
    found = diffusers_hooks(transformer)
    if found:
        names = sorted({hook for hooks in found.values() for hook in hooks})
        where = ", ".join(name or type(transformer).__name__ for name in list(found)[:3])
        more = f" and {len(found) - 3} more modules" if len(found) > 3 else ""
        raise ValueError(
            f"{type(transformer).__name__} carries diffusers hooks ({', '.join(names)}) on {where}{more}; their "
            "removal (disable_cache()) would strip accel's wrappers. Remove them first (transformer.disable_cache()), "
            "or apply accel before enabling them"
        )


def apply(pipe_or_transformer: Any, *configs: Any, spec: ModelSpec | None = None) -> ApplyHandle:
    """Apply acceleration techniques to a diffusers pipeline or transformer.

    Args:
        pipe_or_transformer: a pipeline with a ``.transformer`` attribute, or the transformer itself.
        *configs: one frozen config per technique, e.g. ``accel.caching.CacheConfig(...)``.
        spec: describe the model's blocks by hand when it has no registered adapter.

    Returns:
        An :class:`ApplyHandle`; ``handle.remove()`` (or leaving a ``with`` block) restores the model. A
        pipeline with several denoisers (Wan 2.2's ``transformer`` and ``transformer_2``) gets the configs on
        each, every one counting its steps from its own first call (its cache starts empty there); the handle
        is the first's, with the others in ``handle.others``, removed, reset and counted with it.

    Raises:
        TypeError: a config of an unknown type.
        ValueError: no configs, an unsupported model, a technique applied twice to the same model, or a model
            carrying diffusers' own hooks (:func:`check_no_diffusers_hooks`).
    """
    if not configs:
        raise ValueError("accel.apply needs at least one config, e.g. accel.caching.CacheConfig(...)")
    for config in configs:
        if type(config) not in _TECHNIQUES:
            known = ", ".join(sorted(cls.__name__ for cls in _TECHNIQUES))
            raise TypeError(f"No technique registered for {type(config).__name__}; known configs: {known}")
    if len({type(config) for config in configs}) != len(configs):
        raise ValueError("accel.apply got two configs of the same type; pass one per technique")
    found = {} if isinstance(pipe_or_transformer, torch.nn.Module) else denoisers(pipe_or_transformer)
    if len(found) > 1:  # every denoiser is accelerated (Wan 2.2: both experts)
        return _apply_each(pipe_or_transformer, found, configs, spec)
    return _apply_one(pipe_or_transformer, next(iter(found.values()), None), configs, spec)


def _apply_each(pipe: Any, found: dict[str, torch.nn.Module], configs: tuple, spec: ModelSpec | None) -> ApplyHandle:
    """The configs applied to each denoiser of ``pipe``: the first's handle, holding the others'."""
    for module in found.values():
        check_no_diffusers_hooks(module)
    handles: dict[str, ApplyHandle] = {}
    try:
        for name, module in found.items():
            handles[name] = _apply_one(pipe, module, configs, spec)
    except BaseException:
        for handle in reversed(list(handles.values())):
            handle.remove()
        raise
    first, *rest = handles
    handles[first].others = {name: handles[name] for name in rest}
    return handles[first]


def _apply_one(pipe_or_transformer: Any, transformer: Any, configs: tuple, spec: ModelSpec | None) -> ApplyHandle:
    """The configs applied to one transformer (``transformer``, or the one of ``pipe_or_transformer``)."""
    check_no_diffusers_hooks(transformer if transformer is not None else resolve_transformer(pipe_or_transformer))
    target = dataclasses.replace(resolve(pipe_or_transformer, spec, transformer), configs=tuple(configs))
    parts: dict[type, Handle] = {}
    handle = ApplyHandle(target, parts)
    target.tracker.acquire()  # held while applying, so a failure below unwraps a fresh tracker
    ordered = sorted(configs, key=lambda c: PHASES.index(_TECHNIQUES[type(c)].phase))
    try:
        for config in ordered:
            if type(config) in target.tracker.active:
                raise ValueError(
                    f"{type(config).__name__} is already applied to this {type(target.transformer).__name__}; "
                    "call remove() on the earlier handle first"
                )
            part = _TECHNIQUES[type(config)].apply(target, config)
            target.tracker.acquire()
            parts[type(config)] = part
            target.tracker.active[type(config)] = part
    except BaseException:
        handle.remove()
        raise
    finally:
        target.tracker.release()
    return handle
