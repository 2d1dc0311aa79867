"""The one PSNR, Pareto rule, timer and noise model that ``accel eval``, the search and the benchmarks share."""

import numpy as np
import pytest
import torch

from accel.caching.search.front import non_dominated as search_non_dominated
from accel.eval.metrics import PSNR_CAP_DB, psnr
from accel.eval.noise import run_to_run_noise, within
from accel.eval.pareto import non_dominated, pareto_front
from accel.eval.timing import time_interleaved, timed


def test_psnr_per_sample_with_a_peak_each_and_a_cap():
    reference = torch.zeros(3, 2, 4, 4)
    candidate = reference.clone()
    candidate[1] += 0.1  # mse 0.01 -> 20 dB at peak 1
    candidate[2] += 0.2  # mse 0.04 at peak 2 -> 10 log10(4 / 0.04) = 20 dB
    values = psnr(candidate, reference, torch.tensor([1.0, 1.0, 2.0]))
    assert values[0] == PSNR_CAP_DB and values.dtype == torch.float32
    assert values[1:].tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    assert psnr(candidate.to(torch.bfloat16), reference)[1] == pytest.approx(20.0, abs=0.05)


def test_psnr_of_8_bit_images_matches_the_metric():
    from accel.eval.metrics import METRICS, MetricInputs, MetricSuite

    generator = torch.Generator().manual_seed(0)
    reference = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=generator)
    images = (reference.int() + torch.randint(-3, 4, reference.shape, generator=generator)).clamp(0, 255).byte()
    inputs = MetricInputs(images=images, reference=reference, prompts=("a", "b"))
    value = METRICS["psnr"](MetricSuite(["psnr"]), inputs)["PSNR"]["value"]
    assert value == pytest.approx(float(psnr(images.float() / 255, reference.float() / 255).mean()))


def test_non_dominated_is_the_search_front_rule():
    rng = np.random.default_rng(0)
    for _ in range(20):
        objectives = rng.integers(0, 4, size=(12, 2)).astype(float)  # small integers: ties and duplicates
        assert non_dominated(objectives).tolist() == search_non_dominated(objectives).tolist()
    duplicates = np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    assert non_dominated(duplicates).tolist() == [True, False, True]
    assert non_dominated(duplicates, unique=False).tolist() == [True, True, True]


def test_pareto_front_of_speedup_and_quality_in_either_direction():
    points = [("full", 1.0, 40.0), ("a", 2.0, 30.0), ("b", 2.0, 25.0), ("c", 3.0, 20.0), ("d", 1.5, 20.0)]
    assert pareto_front(points, higher_is_better=True) == ["full", "a", "c"]
    lower = [("full", 1.0, 5.0), ("a", 2.0, 6.0), ("b", 2.0, 4.0), ("c", 0.5, 1.0)]
    assert pareto_front(lower, higher_is_better=False) == ["c", "b"]
    assert pareto_front([("x", 1.0, 1.0), ("y", 1.0, 1.0)], True) == ["x", "y"]  # ties stay, both
    assert pareto_front([], True) == []


def test_timer_returns_the_result_and_times_each_callable_round_robin():
    calls = []
    result, seconds = timed(lambda: calls.append("x") or 7)
    assert result == 7 and seconds >= 0 and calls == ["x"]
    order = []
    timings = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=2, warmup=1)
    assert order == ["a", "b"] * 3 and all(len(t.samples) == 2 for t in timings.values())
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved({"a": lambda: None}, repeats=0)


def test_timer_waits_for_cuda_work(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append("sync"))
    timed(lambda: synced.append("run"))
    assert synced == ["sync", "run", "sync"]


def test_noise_is_the_spread_over_seed_sets():
    assert run_to_run_noise({"fid": [10.0, 12.5, 11.0], "prompt_score": [5.0, 5.0]}) == {
        "fid": 2.5,
        "prompt_score": 0.0,
    }
    with pytest.raises(ValueError, match="two runs"):
        run_to_run_noise({"fid": [10.0]})


def test_within_noise_is_one_sided_in_either_direction():
    assert within(9.5, 10.0, 0.5, "higher") and within(20.0, 10.0, 0.5, "higher")  # better is within
    assert not within(9.4, 10.0, 0.5, "higher")
    assert within(10.5, 10.0, 0.5, "lower") and within(1.0, 10.0, 0.5, "lower")
    assert not within(10.6, 10.0, 0.5, "lower")
