"""What feature caching did: computed vs reused calls, MACs saved, cache memory."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass


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

    @classmethod
    def empty(cls, components: tuple[str, ...]) -> CacheStats:
        """Zeroed counters for the given component names."""
        return cls(computed=dict.fromkeys(components, 0), reused=dict.fromkeys(components, 0))

    def snapshot(self) -> CacheStats:
        """An independent copy."""
        return copy.deepcopy(self)

    @property
    def reuse_fraction(self) -> float:
        """Reused / (computed + reused) component calls."""
        total = sum(self.computed.values()) + sum(self.reused.values())
        return sum(self.reused.values()) / total if total else 0.0

    @property
    def macs_saved_fraction(self) -> float:
        """Share of the blocks' MACs that caching saved."""
        return self.macs_saved / self.macs_blocks if self.macs_blocks else 0.0

    def to_dict(self) -> dict:
        """Plain-JSON form, with the derived fractions."""
        return {
            **asdict(self),
            "reuse_fraction": self.reuse_fraction,
            "macs_saved_fraction": self.macs_saved_fraction,
        }

    def __str__(self) -> str:
        lines = [f"{'component':<14}{'computed':>10}{'reused':>10}"]
        lines += [f"{name:<14}{self.computed[name]:>10}{self.reused[name]:>10}" for name in self.computed]
        lines.append(f"blocks skipped whole: {self.blocks_skipped} of {self.block_calls}")
        if self.samples_computed or self.samples_reused:
            lines.append(f"per-sample decisions: {self.samples_computed} compute, {self.samples_reused} reuse")
        lines.append(
            f"MACs saved: {self.macs_saved / 1e9:.3f} G of {self.macs_blocks / 1e9:.3f} G in blocks "
            f"({100 * self.macs_saved_fraction:.1f}%)"
        )
        lines.append(f"cache memory: {self.cache_bytes / 2**20:.2f} MiB (peak {self.peak_cache_bytes / 2**20:.2f} MiB)")
        return "\n".join(lines)
