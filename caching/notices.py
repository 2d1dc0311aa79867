"""What the cache engine says once: behaviour a user did not ask for in so many words.

* a schedule made for another step count is resampled (:func:`resampled`), and what it became;
* a reuse at a step where nothing is cached yet computes instead (ECAD's schedules do this on purpose);
* a policy that reused nothing in a whole pipeline call (a first-block threshold that never fires).

Each message is logged once per handle (logger ``accel.caching.notices``), so a loop over many calls logs it once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from accel.caching.policy import FirstBlockPolicy
from accel.caching.schedule import Schedule
from accel.caching.stats import CacheStats

logger = logging.getLogger(__name__)


class SaidOnce:
    """Messages a handle logs at most once each (by key), so that a loop over many calls says a thing once.

    Args:
        log: the logger the messages go to.
    """

    def __init__(self, log: logging.Logger):
        self.log = log
        self.said: set[str] = set()

    def once(self, key: str, level: int, message: str, *args) -> None:
        """Log ``message % args`` at ``level`` unless a message with ``key`` was logged before."""
        if key not in self.said:
            self.said.add(key)
            self.log.log(level, "accel: " + message + " (said once)", *args)


class Notices(SaidOnce):
    """The says-once messages of one cache engine, and the per-call bookkeeping that finds a policy that never
    fired.

    Args:
        policy: the engine's schedule or dynamic policy.
    """

    def __init__(self, policy: Schedule | FirstBlockPolicy):
        super().__init__(logger)
        self.policy = policy
        self._trajectory: int | None = None  # the call being watched
        self._pending = False
        self._expects_reuse = False
        self._steps: int | None = None
        self._reused_before = 0
        self._log_start = 0

    @property
    def watching(self) -> int | None:
        """The trajectory (pipeline call) being watched, if any."""
        return self._trajectory

    def resampled(self, source: Schedule, result: Schedule) -> None:
        """Say that ``source`` runs as ``result`` at another step count."""
        self.once(
            f"resampled-{result.num_steps}",
            logging.WARNING,
            "the %d-step schedule runs at %d steps, resampled over normalised time: %s became %s "
            "(per step: C computes every component, - reuses every one, ~ some); make the schedule for %d steps "
            "to choose the steps yourself",
            source.num_steps,
            result.num_steps,
            source.step_pattern(),
            result.step_pattern(),
            result.num_steps,
        )

    def nothing_cached(self, step: int, block: int, what: str) -> None:
        """Say that a reuse at ``step`` found nothing cached and computed instead."""
        self.once(
            "nothing-cached",
            logging.INFO,
            "step %d reuses %s of block %d, but nothing is cached for it yet: computed instead, and so is every "
            "such reuse",
            step,
            what,
            block,
        )

    def start_call(self, trajectory: int, num_steps: int | None, stats: CacheStats, log_length: int, expects: bool):
        """At a block call: when it belongs to a new pipeline call (trajectory), start watching that call."""
        if trajectory == self._trajectory:
            return
        self.end_call(stats, ())
        self._trajectory, self._pending, self._steps = trajectory, True, num_steps
        self._expects_reuse = expects
        self._reused_before = _reuses(stats)
        self._log_start = log_length

    def forget_call(self) -> None:
        """Stop watching the current call (its counters were zeroed); the next block call starts a new watch."""
        self._trajectory, self._pending = None, False

    def end_call(self, stats: CacheStats, decisions: Sequence) -> None:
        """At the end of a watched call (its last step, or the next trajectory): warn once if the policy was to
        reuse and reused nothing. ``decisions`` is the engine's whole decision log."""
        if not self._pending:
            return
        self._pending = False
        if not self._expects_reuse or _reuses(stats) > self._reused_before:
            return
        steps = f"{self._steps} steps" if self._steps else "its steps"
        if isinstance(self.policy, FirstBlockPolicy):
            changes = [c for d in decisions[self._log_start :] if d.change is not None for c in d.change]
            smallest = f"{min(changes):.3g}" if changes else "never measured"
            self.once(
                "idle",
                logging.WARNING,
                "FirstBlockPolicy(threshold=%g) reused nothing in a pipeline call of %s: the smallest relative "
                "change of a sample's first-block residual was %s; a threshold above it reuses (the decisions are "
                "in handle.decision_log)",
                self.policy.threshold,
                steps,
                smallest,
            )
        else:
            self.once(
                "idle",
                logging.WARNING,
                "the schedule reuses at some of %s, but nothing was reused in this pipeline call: no cached "
                "feature fitted (a batch or shape other than the cached one's?)",
                steps,
            )


def _reuses(stats: CacheStats) -> int:
    return sum(stats.reused.values()) + stats.samples_reused
