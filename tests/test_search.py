"""Schedule search on the tiny PixArt pipeline: cost model vs the engine, a short search, resume, the CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import build_tiny_pixart_pipeline

import accel
from accel.caching import CacheConfig, compute_all, fora
from accel.caching.search import (
    Constraints,
    Evaluator,
    EvaluatorConfig,
    Front,
    SearchConfig,
    load_front,
    measure_transfer,
    search,
)
from accel.caching.search.genome import satisfies
from accel.caching.search.nsga import GeneticSearch
from accel.caching.search.runner import seed_schedules
from accel.caching.search.transfer import remeasure

pytest.importorskip("pymoo")

PROMPTS = ["a red apple", "a blue car", "a green tree", "the moon"]
CALL = {"max_sequence_length": 16}
STEPS = 6


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def evaluator():
    torch.manual_seed(0)
    return Evaluator(build_tiny_pixart_pipeline(), PROMPTS, EvaluatorConfig(num_steps=STEPS), CALL)


def small_config(**overrides):
    values = dict(
        population=6, generations=2, prompts_start=2, prompts_growth=1, evaluation=EvaluatorConfig(num_steps=STEPS)
    )
    return SearchConfig(**{**values, **overrides})


def test_evaluator_reference_and_cost_model_match_the_engine(evaluator):
    layout = evaluator.layout
    assert evaluator.change.shape == (4, 3, STEPS, STEPS)
    assert np.allclose(np.diagonal(evaluator.change, axis1=2, axis2=3), 0)
    assert torch.equal(evaluator.generate(None, 2, seed=evaluator.config.seed), evaluator.generate(None, 2))
    assert not torch.equal(evaluator.generate(None, 1, 1, seed=7), evaluator.generate(None, 1, 1))
    full = evaluator.measure(compute_all(layout, STEPS))
    assert full["psnr"] >= 90 and full["relative_macs"] == 1.0
    schedule = fora(layout, STEPS, 3)
    pipe = evaluator.pipe
    with accel.apply(pipe, CacheConfig(schedule=schedule)) as handle:
        evaluator.generate(None, 2)
        stats = handle.stats()
    model = evaluator.cost_model
    saved = STEPS * model.call_macs - model.step_macs(schedule.mask).sum()
    assert saved / (STEPS * model.block_macs.sum()) == pytest.approx(stats.macs_saved_fraction, rel=1e-9)
    measured = evaluator.measure(schedule, images=True)
    assert 20 < measured["psnr"] < 90 and measured["image_psnr"] > 20


def test_two_generation_search_returns_a_valid_front(evaluator, tmp_path):
    constraints = Constraints(first_steps=1, last_steps=1, max_consecutive_reuse=2)
    config = small_config(constraints=constraints, time_repeats=1)
    front = search(evaluator.pipe, PROMPTS, config, tmp_path, evaluator=evaluator)
    assert len(front) >= 2
    for schedule in front:
        schedule.check_layout(evaluator.layout)
        assert schedule.num_steps == STEPS and satisfies(schedule.mask, constraints)
        assert schedule.metrics["prompts"] == len(PROMPTS) and "image_psnr" in schedule.metrics
        assert schedule.metrics["speedup"] > 0  # measured wall clock
    front = Front(schedules=tuple(s.with_metrics(speedup=s.metrics["ideal_speedup"]) for s in front))  # steady
    speeds = [s.metrics["ideal_speedup"] for s in front]
    psnrs = [s.metrics["psnr"] for s in front]
    assert speeds == sorted(speeds) and psnrs == sorted(psnrs, reverse=True)  # a front: faster is worse
    loaded = load_front(tmp_path)
    assert len(loaded) == len(front) and all("speedup" in s.metrics for s in loaded)
    picked = loaded.pick(target_speedup=1.2)
    assert picked.metrics["speedup"] >= 1.2 or picked is loaded.schedules[-1]
    assert json.loads((tmp_path / "front.json").read_text())["info"]["generations"] == 2


def test_resume_continues_exactly(evaluator, tmp_path):
    seeds = dict(list(seed_schedules(evaluator, small_config()).items())[:4])
    straight = GeneticSearch(evaluator, small_config(generations=3), tmp_path / "a", seeds)
    straight.run()
    first = GeneticSearch(evaluator, small_config(generations=1), tmp_path / "b", seeds)
    first.run()
    resumed = GeneticSearch(evaluator, small_config(generations=3), tmp_path / "b", seeds)
    assert resumed.load() and resumed.generation == 1
    resumed.run()
    for attribute in ("X", "F", "rank"):
        assert np.array_equal(straight._algorithm.pop.get(attribute), resumed._algorithm.pop.get(attribute))
    assert straight.archive.order == resumed.archive.order
    with pytest.raises(ValueError, match="other settings"):
        GeneticSearch(evaluator, small_config(seed=1), tmp_path / "b", seeds).load()


def test_interrupted_run_loses_nothing(evaluator, tmp_path, monkeypatch):
    seeds = dict(list(seed_schedules(evaluator, small_config()).items())[:4])
    straight = GeneticSearch(evaluator, small_config(generations=3), tmp_path / "a", seeds)
    straight.run()
    total = len(straight.archive.order)
    calls = []
    measure = evaluator.measure

    def interrupted(*args, **kwargs):
        if len(calls) == total // 2:
            raise KeyboardInterrupt
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(evaluator, "measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        GeneticSearch(evaluator, small_config(generations=3), tmp_path / "b", seeds).run()
    monkeypatch.setattr(evaluator, "measure", measure)
    resumed = GeneticSearch(evaluator, small_config(generations=3), tmp_path / "b", seeds)
    assert resumed.load() and len(resumed.archive.order) == total // 2  # every evaluation made was kept
    resumed.run()
    assert resumed.archive.order == straight.archive.order  # and none was run twice
    assert np.array_equal(straight._algorithm.pop.get("X"), resumed._algorithm.pop.get("X"))


def test_fitted_latency_cost_is_saved_and_reused(evaluator, tmp_path):
    config = small_config(generations=1, evaluation=EvaluatorConfig(num_steps=STEPS, cost="fitted"))
    try:
        front = search(evaluator.pipe, PROMPTS, config, tmp_path, evaluator=evaluator)
        saved = (tmp_path / "latency_model.json").read_text()
        assert all(0 < s.metrics["fitted_relative_seconds"] <= 1.5 for s in front)
        longer = small_config(generations=2, evaluation=config.evaluation)
        search(evaluator.pipe, PROMPTS, longer, tmp_path, evaluator=evaluator)
        assert (tmp_path / "latency_model.json").read_text() == saved  # resumed with the same cost model
    finally:
        evaluator.latency_model = None


def test_dp_method_and_transfer(evaluator, tmp_path):
    front = search(evaluator.pipe, PROMPTS, small_config(method="dp"), tmp_path, evaluator=evaluator)
    assert len(front) >= 2 and {s.provenance["generator"] for s in front} <= {"cachequant", "bac"}
    other = Evaluator(evaluator.pipe, PROMPTS[:2], EvaluatorConfig(num_steps=STEPS + 2), CALL)
    rows = measure_transfer(other, front)
    assert len(rows) == len(front) and all(r["target_steps"] == STEPS + 2 for r in rows)
    assert all(r["psnr"] > 20 for r in rows)
    assert [r["source_psnr"] for r in rows] == [s.metrics["latent_psnr"] for s in front]  # one kind then and now
    images = Evaluator(evaluator.pipe, PROMPTS[:2], EvaluatorConfig(num_steps=STEPS + 2, quality="image"), CALL)
    assert [r["source_psnr"] for r in measure_transfer(images, front)] == [s.metrics["image_psnr"] for s in front]
    again = remeasure(front, other, time_repeats=1, remeasured="test")
    assert len(again) == len(front) and again.info["remeasured"] == "test"
    assert all(s.num_steps == STEPS + 2 and s.metrics["prompts"] == 2 and "speedup" in s.metrics for s in again)


def test_forecast_order_reaches_every_searched_schedule(evaluator, tmp_path):
    with pytest.raises(ValueError, match="forecast_orders"):
        small_config(forecast_orders=(3,))
    with pytest.raises(ValueError, match="repeats"):
        small_config(forecast_orders=(0, 0))
    config = small_config(generations=1, forecast_orders=(1,))
    assert {s.forecast_order for s in seed_schedules(evaluator, config).values()} == {1}
    front = search(evaluator.pipe, PROMPTS, config, tmp_path, evaluator=evaluator)
    assert len(front) >= 1 and {s.forecast_order for s in load_front(tmp_path)} == {1}
    # the objective is the forecast schedule's: re-measuring the saved schedule gives the stored PSNR
    first = front.schedules[0]
    assert evaluator.measure(first)["psnr"] == pytest.approx(first.metrics["psnr"], abs=1e-3)


def test_forecast_order_as_a_gene(evaluator, tmp_path):
    config = small_config(generations=2, forecast_orders=(0, 1), structured_mutation=1.0)
    seeds = seed_schedules(evaluator, config)
    assert seeds["taylorseer-2"].forecast_order == 1 and seeds["taylorseer-2@o0"].forecast_order == 0
    assert seeds["fora-2"].forecast_order == 0 and seeds["fora-2@o1"].forecast_order == 1
    genetic = GeneticSearch(evaluator, config, tmp_path / "unused", seeds)
    assert genetic.length == genetic.encoding.mask_genes + 1
    rng = np.random.default_rng(0)
    start = genetic.encoding.from_schedule(seeds["fora-2"])
    orders = {genetic.encoding.forecast_order(genetic.mutate(start, rng)) for _ in range(60)}
    assert orders == {0, 1}  # mutation reaches the other order
    front = search(evaluator.pipe, PROMPTS, config, tmp_path, evaluator=evaluator)
    assert {s.forecast_order for s in front} <= {0, 1}
    for schedule in front:  # each member is scored with its own order
        assert evaluator.measure(schedule)["psnr"] == pytest.approx(schedule.metrics["psnr"], abs=1e-3)


def test_cli_reads_forecast_orders():
    import argparse

    from accel.caching.search.command import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--model", "m", "--forecast-orders", "0,2", "--generations", "1"])
    assert config_from_args(args).forecast_orders == (0, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--forecast-orders", "zero"])


def test_cli_dp_search(tmp_path):
    from accel.cli import main

    pipe = build_tiny_pixart_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "front"
    argv = ["search", "--model", str(tmp_path / "model"), "--prompts", str(prompts), "--steps", "5"]
    argv += ["--out", str(out), "--algorithm", "dp", "--max-sequence-length", "16", "--last-steps", "1"]
    assert main(argv) == 0
    front = load_front(out)
    assert len(front) >= 1 and front.info["num_steps"] == 5 and all(s.mask[-1].all() for s in front)
