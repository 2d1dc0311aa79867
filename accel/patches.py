"""The patch log: every change a technique makes to a model, each with its exact undo.

A technique never edits a model directly. It asks its :class:`PatchLog` to

* wrap a method of one instance (:meth:`PatchLog.wrap`; e.g. a block's ``forward``; :meth:`PatchLog.wrap_traced`
  for a wrapper of pure computation that compiles with what it wraps),
* set an attribute (:meth:`PatchLog.set_attribute`),
* swap an attention processor (:meth:`PatchLog.set_processor`),
* replace a submodule (:meth:`PatchLog.replace_module`) or a parameter (:meth:`PatchLog.replace_parameter`),

and the log records what changed, on which object, for which technique. :meth:`PatchLog.undo` replays the
records backwards, restoring the very objects that were there before, so outputs are bit-identical after
removal. A handle is its patch log: ``handle.patches()`` lists the records.

Techniques declare a phase; :func:`accel.apply` applies several in :data:`PHASES` order (weights, then
attention processors, then forwards), so quantized weights are in place before a processor is swapped and
forwards are wrapped last, around whatever the earlier phases installed.

Wrappers are compile-safe by construction: :meth:`PatchLog.wrap` fences the wrapper's own frame off from
``torch.compile`` (``torch.compiler.disable(recursive=False)``), so the decisions it makes run eagerly and
never become guards, while the original method it calls is traced and compiled as a frame of its own whenever
the caller is compiled. Helpers a wrapper calls for its decisions must be fenced with :func:`eager`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from accel.hooks import MethodWrapper

#: The order in which techniques are applied; each technique declares one (see :func:`accel.register`). A later
#: phase's wrappers sit outside an earlier one's: ``"tokens"`` (a technique that changes which tokens the blocks
#: see, e.g. per-token steps gathering the active ones) wraps the block forwards of ``"forwards"`` (block caching),
#: so those see the tokens the blocks compute.
PHASES = ("weights", "processors", "forwards", "tokens")

Phase = Literal["weights", "processors", "forwards", "tokens"]
PatchKind = Literal["wrap", "attribute", "processor", "module", "parameter"]

_MISSING = object()

#: module class -> its marked subclass (see :meth:`PatchLog.wrap`)
_MARKED: dict[type, type] = {}


def _marked_class(cls: type) -> type:
    """A subclass of ``cls`` with the same name and nothing else changed, made once per class."""
    if cls not in _MARKED:
        _MARKED[cls] = type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _MARKED[cls]


def eager(fn: Callable) -> Callable:
    """Run ``fn`` (and everything it calls) eagerly, outside any compiled region: for decision code."""
    return torch.compiler.disable(fn, recursive=True)


def fenced(fn: Callable) -> Callable:
    """Skip ``fn``'s own frame when compiling but compile what it calls: for a wrapper around compute."""
    return torch.compiler.disable(fn, recursive=False)


@dataclass(frozen=True)
class PatchRecord:
    """One change in a :class:`PatchLog`.

    Attributes:
        technique: the name of the technique that made it, e.g. ``"caching"``.
        kind: ``"wrap"``, ``"attribute"``, ``"processor"``, ``"module"`` or ``"parameter"``.
        owner: the object changed (a module, a scheduler, ...).
        name: the attribute, method, submodule or parameter name changed on ``owner``.
    """

    technique: str
    kind: PatchKind
    owner: Any
    name: str

    def describe(self, root: torch.nn.Module | None = None) -> str:
        """``"caching: wrap transformer_blocks.3.forward"``; modules under ``root`` are named by their path."""
        where = type(self.owner).__name__
        if root is not None and isinstance(self.owner, torch.nn.Module):
            path = next((n for n, m in root.named_modules() if m is self.owner), None)
            if path is not None:
                where = path or type(root).__name__
        return f"{self.technique}: {self.kind} {where}.{self.name}"


class PatchLog:
    """The changes one technique made, in order, with their undos. See the module docstring.

    Args:
        technique: name recorded on every change, e.g. ``"caching"``.
    """

    def __init__(self, technique: str):
        self.technique = technique
        self._entries: list[tuple[PatchRecord, Callable[[], None]]] = []

    @property
    def records(self) -> list[PatchRecord]:
        """The changes still in place, oldest first."""
        return [record for record, _ in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def _add(self, kind: PatchKind, owner: Any, name: str, undo: Callable[[], None]) -> None:
        self._entries.append((PatchRecord(self.technique, kind, owner, name), undo))

    def wrap(self, obj: Any, name: str, fn: Callable[..., Any], mark: bool = True) -> MethodWrapper:
        """Make ``obj.name(*args, **kwargs)`` call ``fn(original, *args, **kwargs)`` on this instance only.

        ``fn``'s frame is :func:`fenced`: it runs eagerly under ``torch.compile`` while ``original`` compiles.

        With ``mark`` (the default), a module whose ``forward`` is wrapped also gets a marked class (a subclass of
        its own, with the same name) until the wrap is undone. Inside a compiled block the fenced wrapper splits
        the block's graph, and on torch 2.13 the split code's guards did not see the wrapper: after its removal the
        block kept running the split code (three graphs a call instead of one). They do check the module's class,
        so the marked class keeps the split code for while the wrapper is there. :meth:`wrap_call` does not mark:
        blocks and transformers are looked up by their exact class (adapters, diffusers' block registry).

        This is the one place the package assigns ``__class__`` (which the style guide rules out): the
        alternative that leaves classes alone, dropping the block's compiled code on removal
        (``torch._dynamo.reset_code``), would recompile the block after every ``remove()``, and ``with
        accel.apply(...)`` around each call, ``accel eval`` and the benchmarks remove after every method.
        """
        wrapper = MethodWrapper(obj, name, fenced(fn), fence=True)
        undo = wrapper.remove
        if mark and isinstance(obj, torch.nn.Module) and name == "forward" and type(obj) not in _MARKED.values():
            original = type(obj)
            obj.__class__ = _marked_class(original)

            def undo():
                wrapper.remove()
                obj.__class__ = original

        self._add("wrap", obj, name, undo)
        return wrapper

    def wrap_traced(self, obj: Any, name: str, fn: Callable[..., Any]) -> MethodWrapper:
        """Like :meth:`wrap`, but ``fn``'s frame is not fenced: under ``torch.compile`` it is traced into the
        caller's compiled region with ``original``, so it adds no graph break. ``fn`` must be pure computation
        on tensors whose values (not identities or shapes) change between calls: no decisions, no Python state
        read per call (set such tensors in place from eager code, e.g. a step listener)."""
        wrapper = MethodWrapper(obj, name, fn)
        self._add("wrap", obj, name, wrapper.remove)
        return wrapper

    def wrap_call(self, module: torch.nn.Module, fn: Callable[..., Any]) -> MethodWrapper:
        """Intercept every call of ``module``: like ``wrap(module, "forward", fn)``, except that a module compiled
        in place (``module.compile()``, diffusers' ``compile_repeated_blocks``) has its compiled call wrapped
        instead, so that ``fn`` runs before the compiled region rather than splitting it (a graph break at
        ``forward`` inside a compiled block costs about half a millisecond a call on a CPU)."""
        compiled = module.__dict__.get("_compiled_call_impl") is not None
        return self.wrap(module, "_compiled_call_impl" if compiled else "forward", fn, mark=False)

    def set_attribute(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``; undone by restoring the previous instance attribute (or its absence)."""
        previous = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name)
        setattr(obj, name, value)

        def undo():
            if previous is _MISSING:
                if name in obj.__dict__:
                    delattr(obj, name)
            else:
                setattr(obj, name, previous)

        self._add("attribute", obj, name, undo)

    def set_processor(self, attention: torch.nn.Module, processor: Any, attr: str = "processor") -> None:
        """Swap the attention processor of one diffusers ``Attention`` module (through ``set_processor`` where
        the module has it); undone by setting the previous processor object back."""
        previous = getattr(attention, attr)
        setter = getattr(attention, "set_processor", None) if attr == "processor" else None

        def assign(value):
            if setter is not None:
                setter(value)
            else:
                setattr(attention, attr, value)

        assign(processor)
        self._add("processor", attention, attr, lambda: assign(previous))

    def replace_module(self, parent: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
        """Put ``module`` in place of ``parent``'s submodule ``name`` (a ``ModuleList`` index works too)."""
        if name not in parent._modules:
            raise ValueError(f"{type(parent).__name__} has no submodule {name!r}")
        previous = parent._modules[name]
        parent._modules[name] = module
        self._add("module", parent, name, lambda: parent._modules.__setitem__(name, previous))

    def replace_parameter(self, module: torch.nn.Module, name: str, parameter: torch.nn.Parameter | Any) -> None:
        """Put ``parameter`` (a ``Parameter`` or a tensor subclass such as a quantized weight) in place of
        ``module``'s parameter ``name``; undone by putting the original ``Parameter`` object back."""
        if name not in module._parameters:
            raise ValueError(f"{type(module).__name__} has no parameter {name!r}")
        previous = module._parameters[name]
        module._parameters[name] = parameter
        self._add("parameter", module, name, lambda: module._parameters.__setitem__(name, previous))

    def undo(self) -> None:
        """Undo every change, newest first. Idempotent: an undone log is empty."""
        while self._entries:
            _, undo = self._entries.pop()
            undo()
