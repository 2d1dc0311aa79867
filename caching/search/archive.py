"""The search's memory: every candidate evaluated, by genome and prompt count, as JSON-ready data."""

from __future__ import annotations

import numpy as np


class Archive:
    """Every evaluation so far: ``(genome, prompts) -> (objectives, metrics)``."""

    def __init__(self):
        self.entries: dict[tuple[bytes, int], tuple[np.ndarray, dict]] = {}
        self.order: list[tuple[bytes, int]] = []

    def get(self, genome: np.ndarray, prompts: int) -> tuple[np.ndarray, dict] | None:
        """``(objectives, metrics)`` of ``genome`` scored on ``prompts`` prompts, or None if never evaluated."""
        return self.entries.get((np.packbits(genome).tobytes(), prompts))

    def add(self, genome: np.ndarray, prompts: int, objectives: np.ndarray, metrics: dict) -> None:
        """Record one evaluation."""
        key = (np.packbits(genome).tobytes(), prompts)
        if key not in self.entries:
            self.order.append(key)
        self.entries[key] = (np.asarray(objectives, dtype=np.float64), metrics)

    def arrays(self, length: int) -> dict:
        """The evaluations as arrays for an npz file: genomes ``(n, length)`` bool, prompts, objectives ``(n, 2)``."""
        genomes = np.array([np.unpackbits(np.frombuffer(k[0], np.uint8))[:length] for k in self.order], dtype=bool)
        return {
            "archive_genomes": genomes.reshape(len(self.order), length),
            "archive_prompts": np.array([k[1] for k in self.order], dtype=np.int64),
            "archive_objectives": np.array([self.entries[k][0] for k in self.order]).reshape(-1, 2),
        }

    def metrics(self) -> list[dict]:
        """The metrics of every evaluation, in :meth:`arrays` order (for the JSON file)."""
        return [self.entries[k][1] for k in self.order]

    @classmethod
    def restore(cls, arrays, metrics: list[dict]) -> Archive:
        """The archive saved as :meth:`arrays` and :meth:`metrics`."""
        archive = cls()
        for genome, prompts, objectives, m in zip(
            arrays["archive_genomes"], arrays["archive_prompts"], arrays["archive_objectives"], metrics
        ):
            archive.add(genome, int(prompts), objectives, m)
        return archive


def json_default(value):
    """``json.dumps`` default for numpy scalars."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
