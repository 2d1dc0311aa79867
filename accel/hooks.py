"""Per-instance method wrapping, undone exactly by a handle.

``wrap_forward(module, fn)`` makes ``module(...)`` call ``fn(original_forward, *args, **kwargs)``. Only the
instance changes (an instance attribute ``forward``), never its class. Removing the wrapper restores the
previous attribute; if no instance attribute existed before, it is deleted again, so the object is exactly as
it was. Wrappers stack: if another wrapper was added on top later, removing an inner one turns it into a
pass-through instead of breaking the chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_MISSING = object()

WrapperFn = Callable[..., Any]


class MethodWrapper:
    """Handle for an instance-level wrap of one method; :meth:`remove` (idempotent) undoes it.

    With ``fence=True`` the installed method's own frame is skipped by ``torch.compile`` (what it calls is
    still compiled); :meth:`accel.patches.PatchLog.wrap` sets it.
    """

    def __init__(self, obj: Any, name: str, fn: WrapperFn, fence: bool = False):
        self.obj, self.name = obj, name
        self._fn: WrapperFn | None = fn
        self._previous = obj.__dict__.get(name, _MISSING)
        inner = getattr(obj, name)  # the bound method, or an earlier instance-level wrapper

        def method(*args, **kwargs):
            if self._fn is None:
                return inner(*args, **kwargs)
            return self._fn(inner, *args, **kwargs)

        if fence:  # the dispatch frame itself stays out of compiled code too (see accel.patches)
            method = torch.compiler.disable(method, recursive=False)
        method.__wrapped__ = inner  # keeps inspect.signature pointing at the real signature
        method._accel_wrapper = self
        self._method = method
        setattr(obj, name, method)

    @property
    def method(self) -> Any:
        """The function installed on the instance."""
        return self._method

    def in_chain_of(self, method: Any) -> bool:
        """Whether this wrapper's installed method is ``method`` or in the chain of wrappers below it (a wrapper
        added later on the same attribute sits above it)."""
        while method is not None:
            if method is self._method:
                return True
            method = getattr(method, "__wrapped__", None)
        return False

    @property
    def active(self) -> bool:
        """Whether the wrapper still intercepts calls."""
        return self._fn is not None

    def remove(self) -> None:
        """Undo the wrapping. Safe to call more than once."""
        if self._fn is None:
            return
        self._fn = None
        previous = self._previous
        while getattr(previous, "_accel_wrapper", None) is not None and not previous._accel_wrapper.active:
            previous = previous._accel_wrapper._previous  # unwind inner wrappers removed earlier
        if self.obj.__dict__.get(self.name) is self._method:
            if previous is _MISSING:
                delattr(self.obj, self.name)
            else:
                setattr(self.obj, self.name, previous)
        elif not self._unlink_from_hooks(previous):
            pass  # something else wrapped on top of us; we stay in its chain as a pass-through

    def _unlink_from_hooks(self, previous: Any) -> bool:
        """If diffusers' hook registry or accelerate's hooks (``_old_forward``: offloading) wrapped this method
        after us, put what we wrapped in our place in their chain, so that calls skip us at once and removing
        their hooks later restores the method as it was before us, not our pass-through. Returns whether we were
        found there."""
        if self.name != "forward":
            return False
        below = getattr(type(self.obj), self.name).__get__(self.obj) if previous is _MISSING else previous
        found = False
        if self.obj.__dict__.get("_old_forward") is self._method:  # accelerate.hooks.add_hook_to_module
            self.obj._old_forward = below
            found = True
        registry = self.obj.__dict__.get("_diffusers_hook")
        for reference in getattr(registry, "_fn_refs", []):
            for attribute in ("forward", "original_forward"):
                if getattr(reference, attribute, None) is self._method:
                    setattr(reference, attribute, below)
                    found = True
        return found


def wrap_method(obj: Any, name: str, fn: WrapperFn) -> MethodWrapper:
    """Make ``obj.name(*args, **kwargs)`` call ``fn(original_method, *args, **kwargs)`` on this instance only."""
    return MethodWrapper(obj, name, fn)


def wrap_forward(module: torch.nn.Module, fn: WrapperFn) -> MethodWrapper:
    """Make ``module(*args, **kwargs)`` call ``fn(original_forward, *args, **kwargs)``.

    Args:
        module: the module instance to intercept.
        fn: called with the forward it replaces followed by the call's arguments; returns the output.

    Returns:
        A :class:`MethodWrapper` whose ``remove()`` restores the module.
    """
    return MethodWrapper(module, "forward", fn)
