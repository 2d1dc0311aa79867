"""Candidate evaluation across processes (``accelerate launch`` / ``torchrun``), or locally."""

from __future__ import annotations

import time


class Workers:
    """Maps candidate evaluation over the processes of an ``accelerate launch`` (or runs it locally).

    Every process runs the same deterministic search; each evaluates its share of the candidates and the
    results are gathered to all, so all processes keep identical archives. Only the main process writes.
    """

    def __init__(self):
        self.num_processes, self.index, self._state = 1, 0, None
        try:
            import torch
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes (torchrun) talk over gloo
            if state.num_processes > 1:
                self._state, self.num_processes, self.index = state, state.num_processes, state.process_index
        except ImportError:
            pass

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def agree(self, flag: bool) -> bool:
        """The main process's ``flag`` on every process (so that all stop at the same generation)."""
        if self._state is None:
            return flag
        from accelerate.utils import broadcast_object_list

        return bool(broadcast_object_list([flag], from_process=0)[0])

    def map(self, fn, items: list, deadline: float | None, progress=None):
        """Yield ``(item, fn(item))``; stops early (locally) when ``deadline`` passes."""
        if self._state is None or not items:
            for item in items:
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                result = fn(item)
                if progress is not None:
                    progress.update(1)
                yield item, result
            return
        from accelerate.utils import gather_object

        mine = [(i, fn(item)) for i, item in enumerate(items) if i % self.num_processes == self.index]
        if progress is not None:
            progress.update(len(items))
        for i, result in sorted(gather_object(mine), key=lambda pair: pair[0]):
            yield items[i], result
