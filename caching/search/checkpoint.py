"""The NSGA-II search's checkpoint: ``search_state.json`` and the ``search_state-*.npz`` it names, in the output
folder, no pickle.

It holds the population with its ranks, the archive of every evaluation and pymoo's random generator state, and
is switched atomically (:meth:`CheckpointedSearch.save`), so a run resumed from it continues bit-identically to an
uninterrupted one. :class:`CheckpointedSearch` is mixed into :class:`~accel.caching.search.nsga.GeneticSearch`,
whose state it reads and writes.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from accel.caching.search.archive import Archive, json_default
from accel.serialization import write_atomically, write_json

logger = logging.getLogger(__name__)

STATE_VERSION = 1

_DISCARD = "run again with --restart to discard the checkpoint (or move it away)"


def read_checkpoint_json(path: Path) -> dict:
    """The checkpoint's JSON; a corrupt file raises a one-line ``ValueError`` naming it and what to do."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"checkpoint {path} cannot be read ({error}); {_DISCARD}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} is not a JSON object; {_DISCARD}")
    return state


class CheckpointedSearch:
    """The checkpoint methods of the genetic search (a mixin: it uses the search's archive, algorithm, config,
    evaluator and output folder, and its ``_restore_population``)."""

    def _paths(self) -> tuple[Path, Path]:
        """The checkpoint's JSON, and the arrays file it names (``search_state.npz`` in checkpoints before names)."""
        json_path = self.out_dir / "search_state.json"
        try:
            name = json.loads(json_path.read_text()).get("arrays_file", "search_state.npz")
        except (OSError, ValueError, AttributeError):
            name = "search_state.npz"
        if not isinstance(name, str) or "/" in name or "\\" in name:
            name = "search_state.npz"
        return json_path, self.out_dir / name

    def _fingerprint(self) -> dict:
        fingerprint = {
            "model": self.evaluator.model_identity,
            "layout": asdict(self.layout),
            "prompts": self.evaluator.prompts,
            "search": self.config.fingerprint(),
        }
        return json.loads(json.dumps(fingerprint))  # as read back from JSON: tuples become lists

    def snapshot(self) -> None:
        """Remember the search state at a generation boundary: what :meth:`save` writes besides the archive."""
        algorithm = self._algorithm
        pop = algorithm.pop
        self._snapshot = {
            "arrays": {
                "population": pop.get("X").astype(bool),
                "population_objectives": pop.get("F"),
                "population_rank": pop.get("rank").astype(np.int64),
                "population_crowding": pop.get("crowding").astype(np.float64),
            },
            "generation": self.generation,
            "n_iter": algorithm.n_iter,
            "random_state": json.loads(json.dumps(algorithm.random_state.bit_generator.state)),
        }

    def save(self) -> None:
        """Write the last :meth:`snapshot` and the whole archive, atomically: the arrays to a new
        ``search_state-<token>.npz`` first, then ``search_state.json``, which names it, is switched in one rename
        (the commit point), then the arrays files it no longer names are removed. An interruption at any point
        leaves the previous checkpoint or the new one, whole.

        Between generation boundaries this keeps the evaluations made since (nothing is lost) while the state
        stays that of the last boundary, so a resumed run redoes the same generation, from the archive.
        """
        if not self.workers.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        json_path = self.out_dir / "search_state.json"
        npz_path = self.out_dir / f"search_state-{os.getpid()}-{time.time_ns():x}.npz"
        snapshot = self._snapshot or {"arrays": {}, "generation": 0, "n_iter": None, "random_state": None}
        arrays = {**self.archive.arrays(self.length), **snapshot["arrays"]}

        def write_npz(temporary: Path) -> None:
            with temporary.open("wb") as file:
                np.savez_compressed(file, **arrays)

        write_atomically(npz_path, write_npz)
        state = {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "generation": snapshot["generation"],
            "n_iter": snapshot["n_iter"],
            "elapsed_seconds": self.elapsed,
            "random_state": snapshot["random_state"],
            "archive_metrics": self.archive.metrics(),
            "arrays_file": npz_path.name,
        }
        write_json(state, json_path, default=json_default)
        for old in self.out_dir.glob("search_state*.npz"):
            if old != npz_path:
                old.unlink(missing_ok=True)
        self._last_save = time.perf_counter()

    def load(self) -> bool:
        """Restore from the checkpoint in ``out_dir``; False if there is none."""
        json_path, npz_path = self._paths()
        if not json_path.exists():
            return False
        state = read_checkpoint_json(json_path)
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"{json_path} is a version {state.get('version')} checkpoint, this accel writes version "
                f"{STATE_VERSION}; pass another --out, or --restart to discard it"
            )
        saved, current = state.get("fingerprint") or {}, self._fingerprint()
        differ = [name for name in current if saved.get(name) != current[name]]
        if differ:
            what = {
                "model": "another model (other weights, class or dtype)",
                "layout": "another model layout",
                "prompts": "other calibration prompts",
                "search": "other settings of the search config",
            }
            found = ", ".join(what.get(name, f"other {name}") for name in differ)
            raise ValueError(
                f"{self.out_dir} holds a search of {found}; pass another --out, or --restart to discard it"
            )
        try:
            with np.load(npz_path) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"checkpoint {npz_path} cannot be read ({error}); {_DISCARD}") from None
        self.archive = Archive.restore(arrays, state["archive_metrics"])
        self.elapsed = state["elapsed_seconds"]
        if state["generation"] > 0:
            self._restore_population(state, arrays)
        logger.info(
            "resumed %s at generation %d (%d evaluations)", self.out_dir, self.generation, len(self.archive.order)
        )
        return True
