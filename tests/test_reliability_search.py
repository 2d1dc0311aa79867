"""Reliability of ``accel search`` (issue 17): constraints that leave few schedules, checkpoints of another model,
the budget's unit, atomic fronts.

A stand-in evaluator scores a mask without running a model (cost = computed share, quality rising with it), so
these tests run the real search loop in milliseconds.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

import numpy as np
import pytest

from accel.caching.schedule import ScheduleLayout
from accel.caching.search import Constraints, EvaluatorConfig, SearchConfig
from accel.caching.search.nsga import GeneticSearch

pytest.importorskip("pymoo")

STEPS = 4


class MaskEvaluator:
    """What :class:`GeneticSearch` needs of an evaluator, scoring a schedule from its mask alone."""

    def __init__(self, prompts=("a", "b"), weights="0123"):
        self.layout = ScheduleLayout(model_class="Tiny", num_blocks=2, components=("attn", "ff"))
        self.prompts = list(prompts)
        self.model_identity = {"pipeline_class": "TinyPipeline", "weights": weights, "dtype": "float32"}
        self.calls = 0

    def measure(self, schedule, n=None, images=False):
        self.calls += 1
        share = float(schedule.mask.mean())
        return {"relative_macs": share, "psnr": 10 + 30 * share + schedule.forecast_order, "prompts": n}

    def objectives(self, metrics):
        return np.array([metrics["relative_macs"], -metrics["psnr"]])


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the test run) if the block takes longer than ``seconds``."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def config(**overrides):
    values = dict(population=6, generations=3, evaluation=EvaluatorConfig(num_steps=STEPS))
    return SearchConfig(**{**values, **overrides})


@pytest.mark.parametrize(
    "constraints",
    [Constraints(first_steps=10), Constraints(first_steps=2, last_steps=2)],
    ids=["first-steps-cover-all", "first-and-last-cover-all"],
)
def test_search_ends_when_constraints_leave_fewer_schedules_than_the_population(constraints, tmp_path):
    evaluator = MaskEvaluator()
    with deadline(20):
        search = GeneticSearch(evaluator, config(constraints=constraints), tmp_path, seeds={})
        front = search.run()
    assert search.exhaustive
    # every step computes: the only freedom left is the forecast order gene (orders 0 and 1)
    assert len(search.archive.order) == 2 and evaluator.calls == 2
    assert all(genome.all() or genome[:-1].all() for genome, _ in front)
    with deadline(20):  # a rerun resumes and ends at once, evaluating nothing again
        again = GeneticSearch(evaluator, config(constraints=constraints), tmp_path, seeds={})
        again.run()
    assert evaluator.calls == 2


def test_search_with_room_for_a_population_is_not_exhaustive(tmp_path):
    search = GeneticSearch(MaskEvaluator(), config(), tmp_path, seeds={})
    assert not search.exhaustive and len(search.initial_genomes()) == 6


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    """The checkpoint's fingerprint covered layout, prompts and config, not the model: model A's evaluations
    steered model B's search."""
    GeneticSearch(MaskEvaluator(weights="aaaa"), config(generations=1), tmp_path, seeds={}).run()
    other = GeneticSearch(MaskEvaluator(weights="bbbb"), config(generations=2), tmp_path, seeds={})
    with pytest.raises(ValueError, match=r"holds a search of another model \(other weights.*--restart"):
        other.run()
    same = GeneticSearch(MaskEvaluator(weights="aaaa"), config(generations=2), tmp_path, seeds={})
    assert same.load() and same.generation == 1


def test_a_latency_model_fitted_on_another_model_is_refused(tmp_path):
    from accel.caching.search.latency import LatencyModel
    from accel.caching.search.runner import _latency_model

    fitted = MaskEvaluator(weights="aaaa")
    present = np.ones((2, 2), dtype=bool)
    LatencyModel(coefficients=np.ones(7), present=present, model=fitted.model_identity).save(
        tmp_path / "latency_model.json"
    )
    settings = config(evaluation=EvaluatorConfig(num_steps=STEPS, cost="fitted"))
    assert _latency_model(fitted, settings, tmp_path, resume=True).model == fitted.model_identity
    with pytest.raises(ValueError, match="latency_model.json was fitted on another model \\(weights differ\\)"):
        _latency_model(MaskEvaluator(weights="bbbb"), settings, tmp_path, resume=True)


def test_the_model_identity_is_the_weights_content():
    from conftest import build_tiny_pixart_pipeline

    from accel.caching.search.evaluator import model_identity

    pipe = build_tiny_pixart_pipeline()
    identity = model_identity(pipe)
    assert identity == model_identity(build_tiny_pixart_pipeline())
    assert identity["transformer_class"] == "PixArtTransformer2DModel" and identity["dtype"] == "float32"
    pipe.transformer.proj_out.bias.data += 1e-6
    assert model_identity(pipe)["weights"] != identity["weights"]


@pytest.mark.parametrize("name", ["search_state.json", "arrays"])
def test_a_corrupt_checkpoint_names_its_path_and_the_way_out(tmp_path, name):
    GeneticSearch(MaskEvaluator(), config(generations=1), tmp_path, seeds={}).run()
    if name == "arrays":
        (name,) = [path.name for path in tmp_path.glob("search_state*.npz")]
    (tmp_path / name).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path / name} cannot be read .*--restart"):
        GeneticSearch(MaskEvaluator(), config(generations=2), tmp_path, seeds={}).load()
