"""Schedules as data, generators, pure cache state and pure policy decisions (no model needed)."""

import json

import numpy as np
import pytest
import torch

from accel.caching import (
    CacheConfig,
    FeatureCache,
    FirstBlockPolicy,
    Schedule,
    ScheduleLayout,
    compute_all,
    delta_dit,
    fora,
    load_policy,
    tgate,
)
from accel.caching.policy import first_block_decision, relative_change

LAYOUT = ScheduleLayout(
    model_class="PixArtTransformer2DModel", num_blocks=4, components=("self_attn", "cross_attn", "ffn")
)

GENERATORS = {
    "compute_all": lambda steps: compute_all(LAYOUT, steps),
    "fora2": lambda steps: fora(LAYOUT, steps, 2),
    "fora3_forecast": lambda steps: fora(LAYOUT, steps, 3, forecast_order=2),
    "delta_dit": lambda steps: delta_dit(LAYOUT, steps),
    "tgate": lambda steps: tgate(LAYOUT, steps),
}


@pytest.mark.parametrize("name", GENERATORS)
def test_json_round_trip(name, tmp_path):
    schedule = GENERATORS[name](20).with_metrics(psnr=30.5)
    path = schedule.save(tmp_path / "s.json")
    loaded = Schedule.load(path)
    assert loaded == schedule
    assert np.array_equal(loaded.mask, schedule.mask)
    assert loaded.metrics == {"psnr": 30.5}
    data = json.loads(path.read_text())
    assert data["type"] == "accel.caching.Schedule" and data["version"] == 1
    assert load_policy(data) == schedule


def test_generator_masks():
    assert compute_all(LAYOUT, 5).mask.all()
    mask = fora(LAYOUT, 6, 2).mask
    assert mask[[0, 2, 4]].all() and not mask[[1, 3, 5]].any()
    mask = fora(LAYOUT, 7, 3).mask
    assert mask[[0, 3, 6]].all() and not mask[[1, 2, 4, 5]].any()
    mask = tgate(LAYOUT, 10, gate_step=4).mask
    assert mask[:4].all() and not mask[4:, :, 1].any() and mask[:, :, [0, 2]].all()
    mask = delta_dit(LAYOUT, 8, interval=2, cached_blocks=0.5, boundary=0.5).mask
    assert not mask[1, 2:].any() and mask[1, :2].all()  # early phase: rear blocks reused
    assert not mask[5, :2].any() and mask[5, 2:].all()  # late phase: front blocks reused
    assert mask[[0, 2, 4, 6]].all()


def test_step_zero_may_reuse():  # ECAD's schedules do; the engine computes there (tests/test_caching_notices.py)
    mask = np.ones((3, 4, 3), dtype=bool)
    mask[0, 1, 2] = False
    assert Schedule(mask=mask, components=LAYOUT.components).step_pattern() == "~CC"


def test_schedule_is_immutable_and_does_not_alias_input():
    mask = np.ones((3, 4, 3), dtype=bool)
    schedule = Schedule(mask=mask, components=LAYOUT.components)
    mask[1] = False
    assert schedule.mask.all()
    with pytest.raises(ValueError):
        schedule.mask[1, 0, 0] = False


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(type="something"), "not a schedule"),
        (lambda d: d.update(version=99), "unsupported schedule version"),
        (lambda d: d.pop("mask"), "missing"),
        (lambda d: d["mask"].pop(), "list of 6 step strings"),
        (lambda d: d["mask"].__setitem__(1, "111 111"), "space-separated blocks"),
        (lambda d: d["mask"].__setitem__(1, "111 1x1 111 111"), "0/1 digits"),
        (lambda d: d.update(reuse="sometimes"), "reuse must be"),
    ],
)
def test_malformed_json_gives_clear_error(tmp_path, edit, message):
    data = fora(LAYOUT, 6, 2).to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as error:
        Schedule.load(path)
    assert "bad.json" in str(error.value)


def test_not_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Schedule.load(path)
    with pytest.raises(FileNotFoundError, match="schedule file not found"):
        Schedule.load(tmp_path / "missing.json")


def test_check_layout_names_each_mismatch():
    schedule = fora(LAYOUT, 6, 2)
    other = ScheduleLayout(model_class="SD3Transformer2DModel", num_blocks=2, components=("joint_attn", "ffn"))
    with pytest.raises(ValueError) as error:
        schedule.check_layout(other)
    text = str(error.value)
    assert "PixArtTransformer2DModel" in text and "4 blocks" in text and "components" in text
    schedule.check_layout(LAYOUT)


def test_resample_over_normalised_time():
    schedule = fora(LAYOUT, 20, 2)
    longer = schedule.resample(30)
    assert longer.mask.shape == (30, 4, 3)
    assert longer.mask[0].all()
    source = np.rint(np.arange(30) * 19 / 29).astype(int)
    assert np.array_equal(longer.mask[1:], schedule.mask[source][1:])
    assert abs(longer.compute_fraction - schedule.compute_fraction) < 0.1
    assert longer.provenance["resampled_from_steps"] == 20
    assert schedule.resample(20) is schedule
    assert schedule.resample(1).mask.all()


def test_should_compute():
    schedule = fora(LAYOUT, 4, 2)
    assert schedule.should_compute(0, 0, "ffn") and not schedule.should_compute(1, 3, 2)
    assert schedule.should_compute(10, 0, 0)  # past the end: compute


def test_config_validation_and_round_trip():
    with pytest.raises(TypeError, match="must be a Schedule"):
        CacheConfig(schedule="fora-2")
    with pytest.raises(ValueError, match="cache_dtype"):
        CacheConfig(schedule=fora(LAYOUT, 4), cache_dtype=torch.int8)
    for policy in (fora(LAYOUT, 4), FirstBlockPolicy(threshold=0.1, max_consecutive_reuse=3)):
        config = CacheConfig(schedule=policy, cache_dtype=torch.bfloat16)
        assert CacheConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="caching policy: type .os.system. is not one of"):
        load_policy({"type": "os.system"})


def test_policy_validation():
    with pytest.raises(ValueError, match="warmup_steps"):
        FirstBlockPolicy(warmup_steps=0)
    with pytest.raises(ValueError, match="threshold"):
        FirstBlockPolicy(threshold=-1)


# -- pure state ------------------------------------------------------------------------------------------


def test_feature_cache_plain_reuse_keeps_last():
    cache = FeatureCache()
    with pytest.raises(LookupError):
        cache.predict(0)
    cache.update(0, torch.ones(2, 3))
    cache.update(2, torch.full((2, 3), 5.0))
    assert len(cache) == 1
    assert torch.equal(cache.predict(7), torch.full((2, 3), 5.0))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_forecast_is_exact_for_polynomials_of_its_order(order):
    coefficients = torch.randn(order + 1, 2, 3, dtype=torch.float64)

    def value(step):
        return sum(c * step**power for power, c in enumerate(coefficients))

    cache = FeatureCache(order=order)
    for step in (0, 1, 3, 4, 7)[-(order + 1) :]:  # non-uniform spacing
        cache.update(step, value(step))
    torch.testing.assert_close(cache.predict(9), value(9), rtol=1e-9, atol=1e-9)


def test_forecast_coefficients_follow_each_update_and_count_in_memory():
    cache = FeatureCache(order=1)
    cache.update(0, torch.zeros(2, 3))
    cache.update(1, torch.ones(2, 3))
    values_only = cache.nbytes
    assert torch.equal(cache.predict(3), torch.full((2, 3), 3.0))
    assert torch.equal(cache.predict(4), torch.full((2, 3), 4.0))  # the same coefficients, another step
    assert cache.nbytes == values_only + torch.ones(2, 3).nbytes  # the slope is held besides the two values
    cache.update(2, torch.full((2, 3), 5.0))  # slope now 4 through steps 1 and 2
    assert torch.equal(cache.predict(3), torch.full((2, 3), 9.0))
    cache.reset()
    with pytest.raises(LookupError):
        cache.predict(5)


def test_sum_of_caches_forecasts_the_sum_of_their_forecasts():
    a, b, late = FeatureCache(order=1), FeatureCache(order=1), FeatureCache(order=1)
    for step, (x, y) in enumerate([(torch.randn(2, 3), torch.randn(2, 3)) for _ in range(2)]):
        a.update(step, x)
        b.update(step, y)
        late.update(step + 1, x)
    summed = FeatureCache.sum_of([a, b])
    torch.testing.assert_close(summed.predict(5), a.predict(5) + b.predict(5))
    assert FeatureCache.sum_of([a, late]) is None  # stored at other steps: no common forecast
    with_none = FeatureCache(order=1)
    with_none.update(0, (torch.zeros(2), None))
    assert FeatureCache.sum_of([with_none]) is None  # an output missing: no sum


def test_forecast_with_tuples_and_none():
    cache = FeatureCache(order=1)
    cache.update(0, (torch.zeros(2), None))
    cache.update(1, (torch.ones(2), None))
    predicted = cache.predict(3)
    assert predicted[1] is None and torch.equal(predicted[0], torch.full((2,), 3.0))


def test_cache_dtype_halves_memory_and_restores_dtype():
    full, half = FeatureCache(), FeatureCache(dtype=torch.bfloat16)
    value = torch.randn(4, 16, 32)
    full.update(0, value)
    half.update(0, value)
    assert half.nbytes * 2 == full.nbytes
    restored = half.predict(1)
    assert restored.dtype == torch.float32
    torch.testing.assert_close(restored, value, rtol=1e-2, atol=1e-2)  # bf16 has 8 mantissa bits


def test_update_rows_keeps_other_samples():
    cache = FeatureCache()
    cache.update(0, torch.zeros(3, 2))
    cache.update_rows(1, torch.ones(3, 2), torch.tensor([True, False, True]))
    assert torch.equal(cache.predict(2), torch.tensor([[1.0, 1], [0, 0], [1, 1]]))


# -- pure policy decisions -------------------------------------------------------------------------------


def test_relative_change_per_sample():
    previous = torch.ones(2, 4, 3)
    current = previous.clone()
    current[1] *= 1.5
    change = relative_change(current, previous)
    torch.testing.assert_close(change, torch.tensor([0.0, 0.5]))
    assert relative_change(current, None) is None


def test_first_block_decision_rules():
    policy = FirstBlockPolicy(threshold=0.1, warmup_steps=2, final_steps=1, max_consecutive_reuse=2)
    change = torch.tensor([0.05, 0.2, 0.05])
    streak = torch.tensor([0, 0, 2])
    assert first_block_decision(policy, 1, 10, change, streak, 3).all()  # warm-up
    assert first_block_decision(policy, 9, 10, change, streak, 3).all()  # final step
    assert first_block_decision(policy, 5, 10, None, streak, 3).all()  # no history
    assert first_block_decision(policy, 5, 10, change, streak, 3).tolist() == [False, True, True]


def test_fora_warmup_computes_the_first_steps_then_counts_the_interval_from_there():
    layout = ScheduleLayout(model_class="X", num_blocks=2, components=("self_attn", "ffn"))
    schedule = fora(layout, 10, 3, warmup=4)
    assert schedule.mask[:, 0, 0].tolist() == [True] * 4 + [True, False, False, True, False, False]
    assert schedule.provenance["warmup"] == 4
    assert fora(layout, 10, 3).mask[:, 0, 0].tolist() == [True, False, False] * 3 + [True]
    with pytest.raises(ValueError, match="warmup"):
        fora(layout, 10, 3, warmup=11)
