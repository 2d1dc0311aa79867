"""Writes that survive concurrency and interruption (issue 17, findings 5 and 7): every process writes through a
temporary file of its own, a run locks its output folder, and a kill at any point leaves the previous state or
the new one, whole: trial and results JSON, a search front, a search checkpoint."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from accel.caching import fora
from accel.caching.schedule import ScheduleLayout
from accel.caching.search import EvaluatorConfig, Front, SearchConfig, load_front
from accel.eval.harness import _write_json
from accel.serialization import FolderInUse, lock_folder

LAYOUT = ScheduleLayout(model_class="Tiny", num_blocks=2, components=("attn", "ff"))
FORK = multiprocessing.get_context("fork")  # the children only write files: no re-import, so they start at once


def _hammer(path: str, writer: int, writes: int, failures) -> None:
    for index in range(writes):
        try:
            _write_json(Path(path), {"writer": writer, "index": index, "pad": "x" * 4000})
        except OSError:
            failures.value += 1


def test_two_processes_writing_one_results_file_never_fail_or_tear_it(tmp_path):
    """Every process wrote through the same temporary name: 2 x 300 writes gave failed renames and torn reads."""
    path = tmp_path / "results.json"
    failures = FORK.Value("i", 0)
    writers = [FORK.Process(target=_hammer, args=(str(path), w, 300, failures)) for w in range(2)]
    for writer in writers:
        writer.start()
    reads = torn = 0
    while any(writer.is_alive() for writer in writers):
        try:
            data = json.loads(path.read_text())
            assert data["pad"] == "x" * 4000
            reads += 1
        except FileNotFoundError:
            continue  # before the first write
        except (ValueError, AssertionError):
            torn += 1
    for writer in writers:
        writer.join()
    assert failures.value == 0 and torn == 0 and all(w.exitcode == 0 for w in writers)
    assert reads > 0 and json.loads(path.read_text())["index"] == 299
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_a_second_run_on_a_locked_output_folder_is_refused_before_any_compute(tmp_path):
    from conftest import build_tiny_pixart_pipeline
    from eval_helpers import small_config

    from accel.eval.harness import run_evaluation

    with lock_folder(tmp_path, "accel eval"):
        with pytest.raises(FolderInUse, match=f"{tmp_path} is in use by accel eval \\(pid {os.getpid()}\\)"):
            run_evaluation(small_config(methods=("full",)), tmp_path, pipe=build_tiny_pixart_pipeline())
        assert not (tmp_path / "trials").exists()
    with lock_folder(tmp_path, "accel eval"):  # released on exit: the folder can be taken again
        pass


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    ready = FORK.Event()

    def hold():
        with lock_folder(tmp_path, "accel search"):
            ready.set()
            time.sleep(60)

    holder = FORK.Process(target=hold)
    holder.start()
    assert ready.wait(30)
    with pytest.raises(FolderInUse, match=f"accel search \\(pid {holder.pid}\\)"):
        with lock_folder(tmp_path, "accel eval"):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    with lock_folder(tmp_path, "accel eval"):
        pass


# -- interruption at random points ---------------------------------------------------------------------------


def _fronts() -> list[Front]:
    """Two fronts of different sizes and contents."""
    return [
        Front(schedules=tuple(fora(LAYOUT, 6, n).with_metrics(ideal_speedup=n, psnr=40 - n) for n in sizes))
        for sizes in ((2, 3), (2, 3, 4, 5, 6))
    ]


def _save_fronts_forever(folder: str, ready) -> None:
    fronts = _fronts()
    fronts[0].save(folder)
    ready.set()
    for index in range(10**9):
        fronts[index % 2].save(folder)


def _save_results_forever(folder: str, ready) -> None:
    documents = [{"trials": [{"method": f"m{i}"} for i in range(n)]} for n in (3, 40)]
    _write_json(Path(folder) / "results.json", documents[0])
    ready.set()
    for index in range(10**9):
        _write_json(Path(folder) / "results.json", documents[index % 2])


def _checkpoint_forever(folder: str, ready) -> None:
    from test_reliability_search import MaskEvaluator

    from accel.caching.search.nsga import GeneticSearch

    config = SearchConfig(population=6, generations=10**6, evaluation=EvaluatorConfig(num_steps=4))
    search = GeneticSearch(MaskEvaluator(), config, folder, seeds={})
    search.autosave_seconds = 0.0  # save after every evaluation too: many chances to be killed mid-write
    if not search.load():  # resume what the killed one saved
        search.save()
    ready.set()
    search.run(resume=False)  # (already resumed)


def _with_own_progress_lock(target, *args) -> None:
    """Run ``target`` in a forked child after giving tqdm a lock of the child's own. A forked child inherits
    tqdm's write lock, whose multiprocessing half is a semaphore shared with the parent: a child killed while its
    progress bar held it (the search's) left it held, and the parent's next progress bar waited forever (seen as a
    whole-suite hang in a later test that loads a model with a progress bar)."""
    import threading

    import tqdm.auto
    import tqdm.std

    for bar in (tqdm.std.tqdm, tqdm.auto.tqdm):  # the class that first took a lock in the parent keeps its own
        bar.set_lock(threading.RLock())
    target(*args)


def _hold_the_progress_lock(ready) -> None:
    from tqdm.auto import tqdm

    tqdm.get_lock().acquire()
    ready.set()
    time.sleep(60)


def test_a_child_killed_holding_the_progress_lock_leaves_the_parents_bars_working():
    """The child's lock is its own (:func:`_with_own_progress_lock`): without it, the parent's next bar waits
    forever (checked by hand in a separate process, not here: it would hang the rest of the session)."""
    import threading

    from tqdm.auto import tqdm

    tqdm(total=1, disable=False).close()  # the parent's lock exists before the fork, as in a long session
    ready = FORK.Event()
    child = FORK.Process(target=_with_own_progress_lock, args=(_hold_the_progress_lock, ready))
    child.start()
    assert ready.wait(60)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    done = threading.Event()
    threading.Thread(target=lambda: (tqdm(total=1, disable=False).close(), done.set()), daemon=True).start()
    assert done.wait(30)


def _kill_at_random_points(target, folder, check, kills: int = 6) -> None:
    rng = random.Random(0)
    for _ in range(kills):
        ready = FORK.Event()
        child = FORK.Process(target=_with_own_progress_lock, args=(target, str(folder), ready))
        child.start()
        assert ready.wait(60)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        check()


def test_a_front_killed_while_saving_is_the_old_one_or_the_new_one(tmp_path):
    """``Front.save`` deleted the old schedule files, wrote the new ones, then front.json: a kill in between left
    a front.json naming files that were gone."""
    sizes = {len(front) for front in _fronts()}

    def check():
        front = load_front(tmp_path)
        assert len(front) in sizes
        expected = next(f for f in _fronts() if len(f) == len(front))
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(front, expected))

    _kill_at_random_points(_save_fronts_forever, tmp_path, check)


def test_results_killed_while_saving_are_the_old_or_the_new(tmp_path):
    def check():
        assert len(json.loads((tmp_path / "results.json").read_text())["trials"]) in (3, 40)

    _kill_at_random_points(_save_results_forever, tmp_path, check)


def test_a_search_checkpoint_killed_at_random_points_resumes(tmp_path):
    from test_reliability_search import MaskEvaluator

    from accel.caching.search.nsga import GeneticSearch

    config = SearchConfig(population=6, generations=10**6, evaluation=EvaluatorConfig(num_steps=4))
    evaluations = []

    def check():
        search = GeneticSearch(MaskEvaluator(), config, tmp_path, seeds={})
        assert search.load()
        evaluations.append(len(search.archive.order))
        assert len(list(tmp_path.glob("search_state*.npz"))) <= 2  # the current arrays (and one being written)

    _kill_at_random_points(_checkpoint_forever, tmp_path, check)
    assert evaluations == sorted(evaluations)  # each run resumed where the killed one was: nothing lost


def test_a_second_search_on_a_locked_output_folder_is_refused(tmp_path):
    from test_reliability_search import MaskEvaluator

    from accel.caching.search import search

    config = SearchConfig(population=4, generations=1, seed_schedules=False, evaluation=EvaluatorConfig(num_steps=4))
    evaluator = MaskEvaluator()
    with lock_folder(tmp_path, "accel search"):
        with pytest.raises(FolderInUse, match="in use by accel search"):
            search(None, evaluator.prompts, config, tmp_path, evaluator=evaluator)
    assert evaluator.calls == 0 and not (tmp_path / "search_state.json").exists()
