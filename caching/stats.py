"""What feature caching did: computed vs reused calls, MACs saved, cache memory."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field


@dataclass
class CacheStats:
    """Counters kept since the handle was created (or ``reset_stats()``).

    Attributes:
        computed: per component name, calls that ran.
        reused: per component name, calls served from the cache (including components of skipped blocks).
        block_calls: block forwards seen (run or skipped).
        blocks_skipped: block forwards replaced whole by input + cached residual.
        samples_computed: dynamic policies: per-sample decisions to compute the later blocks.
        samples_reused: dynamic policies: per-sample decisions to reuse them.
        step_computed: per denoising step index, component calls that ran (summed over calls and trajectories).
        step_reused: per denoising step index, component calls served from the cache.
        step_samples_computed: dynamic policies: per step index, samples that computed the later blocks.
        step_samples_reused: dynamic policies: per step index, samples that reused them.
        macs_blocks: MACs the seen block calls cost without caching (measured per input shape).
        macs_saved: MACs not spent thanks to reuse.
        cache_bytes: memory held by cached features after the last transformer call.
        peak_cache_bytes: the most ever held.
    """

    computed: dict[str, int]
    reused: dict[str, int]
    block_calls: int = 0
    blocks_skipped: int = 0
    samples_computed: int = 0
    samples_reused: int = 0
    macs_blocks: float = 0.0
    macs_saved: float = 0.0
    cache_bytes: int = 0
    peak_cache_bytes: int = 0
    step_computed: list[int] = field(default_factory=list)
    step_reused: list[int] = field(default_factory=list)
    step_samples_computed: list[int] = field(default_factory=list)
    step_samples_reused: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, components: tuple[str, ...]) -> CacheStats:
        """Zeroed counters for the given component names."""
        return cls(computed=dict.fromkeys(components, 0), reused=dict.fromkeys(components, 0))

    def add_call(self, component: str, step: int | None, reused: bool) -> None:
        """Count one call of ``component`` at ``step`` (None: outside a tracked denoising step)."""
        (self.reused if reused else self.computed)[component] += 1
        if step is not None:
            _bump(self.step_reused if reused else self.step_computed, step, 1)

    def add_samples(self, step: int, computed: int, reused: int) -> None:
        """Count a dynamic policy's per-sample decisions at ``step``."""
        self.samples_computed += computed
        self.samples_reused += reused
        _bump(self.step_samples_computed, step, computed)
        _bump(self.step_samples_reused, step, reused)

    def snapshot(self) -> CacheStats:
        """An independent copy."""
        return copy.deepcopy(self)

    @property
    def reuse_fraction(self) -> float:
        """Reused / (computed + reused) component calls."""
        total = sum(self.computed.values()) + sum(self.reused.values())
        return sum(self.reused.values()) / total if total else 0.0

    @property
    def sample_reuse_fraction(self) -> float:
        """Dynamic policies: reused / all per-sample decisions (0 without any)."""
        total = self.samples_computed + self.samples_reused
        return self.samples_reused / total if total else 0.0

    def step_reuse_fractions(self) -> list[float | None]:
        """Per step index, the share of component calls served from the cache (None: no call at that step)."""
        steps = max(len(self.step_computed), len(self.step_reused))
        computed = self.step_computed + [0] * (steps - len(self.step_computed))
        reused = self.step_reused + [0] * (steps - len(self.step_reused))
        return [r / (c + r) if c + r else None for c, r in zip(computed, reused)]

    def step_pattern(self) -> str:
        """One character per step: ``C`` every component call computed, ``-`` every one reused, ``~`` some."""
        marks = {None: " ", 0.0: "C", 1.0: "-"}
        return "".join(marks.get(f, "~") for f in self.step_reuse_fractions())

    @property
    def macs_saved_fraction(self) -> float:
        """Share of the blocks' MACs that caching saved."""
        return self.macs_saved / self.macs_blocks if self.macs_blocks else 0.0

    def to_dict(self) -> dict:
        """Plain-JSON form, with the derived fractions."""
        return {
            **asdict(self),
            "reuse_fraction": self.reuse_fraction,
            "sample_reuse_fraction": self.sample_reuse_fraction,
            "macs_saved_fraction": self.macs_saved_fraction,
        }

    def __str__(self) -> str:
        lines = [f"{'component':<14}{'computed':>10}{'reused':>10}"]
        lines += [f"{name:<14}{self.computed[name]:>10}{self.reused[name]:>10}" for name in self.computed]
        lines.append(f"blocks skipped whole: {self.blocks_skipped} of {self.block_calls}")
        if self.samples_computed or self.samples_reused:  # a dynamic policy: reuse is per sample
            lines.append(
                f"per sample: {self.samples_reused} of {self.samples_computed + self.samples_reused} sample-steps "
                f"reused the later blocks ({100 * self.sample_reuse_fraction:.0f}%)"
            )
            per_step = enumerate(zip(self.step_samples_computed, self.step_samples_reused))
            lines.append("samples reused per step: " + " ".join(f"{i}:{r}/{c + r}" for i, (c, r) in per_step))
        elif fractions := self.step_reuse_fractions():
            lines.append(f"per step (C computed, - reused, ~ some): {self.step_pattern()}")
            shares = (f"{i}:{'n/a' if f is None else f'{100 * f:.0f}%'}" for i, f in enumerate(fractions))
            lines.append("component calls reused per step: " + " ".join(shares))
        lines.append(
            f"MACs saved: {self.macs_saved / 1e9:.3f} G of {self.macs_blocks / 1e9:.3f} G in blocks "
            f"({100 * self.macs_saved_fraction:.1f}%)"
        )
        lines.append(f"cache memory: {self.cache_bytes / 2**20:.2f} MiB (peak {self.peak_cache_bytes / 2**20:.2f} MiB)")
        return "\n".join(lines)


def _bump(counts: list[int], index: int, amount: int) -> None:
    if index >= len(counts):
        counts.extend([0] * (index + 1 - len(counts)))
    counts[index] += amount
