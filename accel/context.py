"""Step and branch tracking, shared by every technique applied to one transformer.

Many pipelines (PixArt, SD3, Sana, DiT) do not tell their transformer which step it is at. The tracker
works it out itself: it wraps the transformer's ``forward`` and the pipeline scheduler's ``set_timesteps``
(per instance), and derives from the timesteps the transformer receives

* ``step``: a new step starts whenever the timestep changes;
* ``branch``: the n-th transformer call within one step (pipelines that run the conditional and
  unconditional branch as separate calls get branch 0 and 1, so their caches never mix);
* a new trajectory (all state reset) at every ``set_timesteps`` call, or, for a bare transformer, whenever
  the timestep goes up instead of down.

The tracker's bookkeeping runs eagerly, outside compiled code (its wrapper is fenced, see
:mod:`accel.patches`). Inside a pipeline call whose scheduler counts its steps (``scheduler.step_index``, as
diffusers' flow-matching, DPM-Solver, UniPC and Euler schedulers do) and whose timesteps do not repeat, the
step is read from that counter: after the first steps of a trajectory (where the timestep is read too, to
see the counter move with it), no host-device synchronisation at all. Otherwise (a bare transformer, or a
scheduler without a step counter) the timestep tensor is read, one synchronisation per transformer call.
Per-block decisions read only host values.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from accel.patches import PatchLog, eager


@dataclass(frozen=True)
class StepContext:
    """Where the denoising loop is during one transformer call.

    Attributes:
        step: 0-based index of the denoising step within the current trajectory.
        branch: 0-based index of this call among the calls made at the same step.
        num_steps: steps of the current trajectory when known (from the scheduler), else ``None``.
        trajectory: how many trajectories (pipeline calls) the tracker has started, counting from 1.
    """

    step: int
    branch: int
    num_steps: int | None
    trajectory: int


def _timestep_key(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value)


def _count_steps(timesteps: Any) -> int | None:
    """Number of runs of equal consecutive values, i.e. the steps this tracker will count."""
    if timesteps is None or len(timesteps) == 0:
        return None
    values = torch.as_tensor(timesteps).detach().float().flatten()
    return int((values[1:] != values[:-1]).sum()) + 1


class StepTracker:
    """Knows the step and branch of every call of one transformer; see the module docstring.

    Use :func:`tracker_for` to get the shared instance of a transformer rather than building one.
    """

    def __init__(self, transformer: torch.nn.Module, timestep_arg: str = "timestep"):
        self.transformer = transformer
        self.current: StepContext | None = None
        self.num_steps: int | None = None
        self.active: dict[type, Any] = {}
        self._listeners: list[Callable[[], None]] = []
        self._call_listeners: list[Callable[[tuple, dict], None]] = []
        self._step_listeners: list[Callable[[StepContext], None]] = []
        self._timestep_arg = timestep_arg
        self._timestep_position = self._position_of(transformer, timestep_arg)
        self.patch_log = PatchLog("core")
        self.patch_log.wrap_call(transformer, self._forward)
        self._schedulers: set[int] = set()
        self._clock: Any = None  # the scheduler whose step_index counts this trajectory's steps, if any
        self._clock_trusted = False  # whether the clock was seen to move with the timestep in this trajectory
        self._probe: tuple | None = None  # (clock key, timestep) of the trajectory's first call, until trusted
        self._last_key: float | None = None
        self._step = -1
        self._branch = 0
        self._trajectory = 0
        self._users = 0

    @staticmethod
    def _position_of(module: torch.nn.Module, name: str) -> int | None:
        parameters = list(inspect.signature(module.forward).parameters)
        return parameters.index(name) if name in parameters else None

    def watch_scheduler(self, scheduler: Any) -> None:
        """Start a new trajectory whenever ``scheduler.set_timesteps`` is called (once per scheduler)."""
        if scheduler is None or id(scheduler) in self._schedulers or not hasattr(scheduler, "set_timesteps"):
            return
        self._schedulers.add(id(scheduler))

        def set_timesteps(inner, *args, **kwargs):
            result = inner(*args, **kwargs)
            timesteps = getattr(scheduler, "timesteps", None)
            steps = _count_steps(timesteps)
            self.reset(num_steps=steps)
            counts_steps = hasattr(scheduler, "step_index") and steps is not None and steps == len(timesteps)
            self._clock = scheduler if counts_steps else None
            self._clock_trusted, self._probe = False, None
            return result

        self.patch_log.wrap(scheduler, "set_timesteps", set_timesteps)

    def add_reset_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` at the start of every trajectory."""
        self._listeners.append(fn)

    def add_call_listener(self, fn: Callable[[tuple, dict], None]) -> None:
        """Call ``fn(args, kwargs)`` (eagerly, with the transformer's positional and keyword arguments) at the start
        of every transformer call that is not re-entrant."""
        self._call_listeners.append(fn)

    def add_step_listener(self, fn: Callable[[StepContext], None]) -> None:
        """Call ``fn(context)`` (eagerly) at every transformer call that is not re-entrant, once its step and branch
        are known, before the transformer runs."""
        self._step_listeners.append(fn)

    def remove_step_listener(self, fn: Callable[[StepContext], None]) -> None:
        """Stop calling ``fn`` at calls."""
        if fn in self._step_listeners:
            self._step_listeners.remove(fn)

    def remove_call_listener(self, fn: Callable[[tuple, dict], None]) -> None:
        """Stop calling ``fn`` at calls."""
        if fn in self._call_listeners:
            self._call_listeners.remove(fn)

    def remove_reset_listener(self, fn: Callable[[], None]) -> None:
        """Stop calling ``fn`` on resets."""
        if fn in self._listeners:
            self._listeners.remove(fn)

    def reset(self, num_steps: int | None = None) -> None:
        """Start a new trajectory: the next call is step 0, and every listener drops its state."""
        self.num_steps = num_steps
        self._last_key = None
        self._step = -1
        self._branch = 0
        for fn in list(self._listeners):
            fn()

    def _clock_key(self) -> tuple | None:
        """The step key from the watched scheduler's step counter, or None once it cannot be trusted (no such
        scheduler, or its trajectory is over: later calls are bare calls)."""
        if self._clock is None:
            return None
        index = self._clock.step_index
        if index is not None and (not isinstance(index, int) or index >= (self.num_steps or 0)):
            self._clock = None
            self.reset()  # the pipeline's trajectory is over: a later bare call starts a new one
            return None
        return ("step_index", -1 if index is None else index)

    def _check_clock(self, key: tuple, timestep: float | None) -> tuple | None:
        """Until the scheduler's counter has been seen to move, read the timestep too (the first calls of a
        trajectory only): a timestep that changes while the counter stands still means nobody steps this
        scheduler (e.g. a hand-written loop), and the timesteps count the steps instead."""
        if self._probe is None:
            self._probe = (key, timestep)
        elif key != self._probe[0]:
            self._clock_trusted = True
        elif timestep != self._probe[1]:
            self._clock = None
            return None
        return key

    def _advance(self, key: Any) -> None:
        if self._step >= 0 and key is not None and key == self._last_key:
            self._branch += 1
            return
        ordered = isinstance(key, float) and isinstance(self._last_key, float)
        if self._step >= 0 and ordered and key > self._last_key:
            self.reset()  # the noise level went up: a new trajectory on a bare transformer
        if self._step < 0:
            self._trajectory += 1
        self._step += 1
        self._branch = 0
        self._last_key = key

    def _timestep(self, args: tuple, kwargs: dict) -> Any:
        if self._timestep_arg in kwargs:
            return kwargs[self._timestep_arg]
        position = self._timestep_position
        return args[position] if position is not None and position < len(args) else None

    @eager
    def _begin(self, args: tuple, kwargs: dict) -> bool:
        """Enter a transformer call: advance step and branch; False for a re-entrant call."""
        if self.current is not None:  # re-entrant call (e.g. a technique calling the model): no new step
            return False
        for fn in list(self._call_listeners):
            fn(args, kwargs)
        key = self._clock_key()
        if key is not None and not self._clock_trusted:
            key = self._check_clock(key, _timestep_key(self._timestep(args, kwargs)))
        self._advance(key if key is not None else _timestep_key(self._timestep(args, kwargs)))
        self.current = StepContext(self._step, self._branch, self.num_steps, self._trajectory)
        try:
            for fn in list(self._step_listeners):
                fn(self.current)
        except BaseException:
            self.current = None  # the call does not happen: the next one is not re-entrant
            raise
        return True

    @eager
    def _end(self) -> None:
        self.current = None

    def _forward(self, inner, *args, **kwargs):
        if not self._begin(args, kwargs):
            return inner(*args, **kwargs)
        try:
            return inner(*args, **kwargs)
        except BaseException:
            self._clock = None  # an interrupted pipeline call: what follows may be bare calls
            raise
        finally:
            self._end()

    def acquire(self) -> None:
        """Count one more technique using this tracker."""
        self._users += 1

    def release(self) -> None:
        """Count one technique fewer; the last one out unwraps everything."""
        self._users -= 1
        if self._users <= 0:
            self.patch_log.undo()
            _TRACKERS.pop(self.transformer, None)


_TRACKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tracker_for(transformer: torch.nn.Module, timestep_arg: str = "timestep") -> StepTracker:
    """The step tracker of ``transformer``, created on first use (nothing is stored on the module)."""
    tracker = _TRACKERS.get(transformer)
    if tracker is None:
        tracker = StepTracker(transformer, timestep_arg)
        _TRACKERS[transformer] = tracker
    return tracker
