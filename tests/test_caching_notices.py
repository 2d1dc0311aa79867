"""No silent no-ops: what the cache engine says once, and what its stats show per step and per sample."""

import logging

import numpy as np
import pytest
import torch
from test_caching_engine import PIPE_KWARGS, PROMPTS, generate

import accel
from accel.caching import CacheConfig, FirstBlockPolicy, Schedule, compute_all, fora, layout_of

NOTICES = "accel.caching.notices"


def _messages(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records if r.name == NOTICES and r.levelno >= level]


def test_resampled_schedule_says_once_what_it_became(tiny_pixart_pipeline, caplog):
    pipe = tiny_pixart_pipeline
    schedule = fora(layout_of(pipe), steps=4, interval=2)
    caplog.set_level(logging.INFO, logger=NOTICES)
    with accel.apply(pipe, CacheConfig(schedule=schedule)):
        generate(pipe, steps=6)
        generate(pipe, steps=6)
    warnings = _messages(caplog, logging.WARNING)
    became = schedule.resample(6).step_pattern()
    assert len(warnings) == 1 and "4-step schedule runs at 6 steps" in warnings[0]
    assert f"C-C- became {became}" in warnings[0] and len(became) == 6


def test_schedule_at_its_own_step_count_says_nothing(tiny_pixart_pipeline, caplog):
    pipe = tiny_pixart_pipeline
    caplog.set_level(logging.INFO, logger=NOTICES)
    with accel.apply(pipe, CacheConfig(schedule=fora(layout_of(pipe), steps=6, interval=2))):
        generate(pipe, steps=6)
    assert _messages(caplog) == []


def test_first_block_policy_that_never_fires_warns_once(tiny_pixart_pipeline, caplog):
    pipe = tiny_pixart_pipeline
    caplog.set_level(logging.INFO, logger=NOTICES)
    with accel.apply(pipe, CacheConfig(schedule=FirstBlockPolicy(threshold=0.0))) as handle:
        generate(pipe, steps=5)
        generate(pipe, steps=5)
        log = handle.decision_log  # on the apply handle itself
    warnings = _messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and "threshold=0" in warnings[0] and "reused nothing" in warnings[0]
    smallest = min(c for d in log[: len(log) // 2] if d.change for c in d.change)
    assert f"{smallest:.3g}" in warnings[0]


def test_first_block_policy_that_fires_says_nothing(tiny_pixart_pipeline, caplog):
    pipe = tiny_pixart_pipeline
    caplog.set_level(logging.INFO, logger=NOTICES)
    with accel.apply(pipe, CacheConfig(schedule=FirstBlockPolicy(threshold=10.0))) as handle:
        generate(pipe, steps=5)
        stats = handle.stats()
    assert _messages(caplog, logging.WARNING) == []
    assert stats.samples_reused > 0 and 0 < stats.sample_reuse_fraction < 1


def test_reuse_with_nothing_cached_computes_and_says_so_once(tiny_pixart_pipeline, caplog):
    pipe = tiny_pixart_pipeline
    layout = layout_of(pipe)
    mask = compute_all(layout, 4).mask.copy()
    mask[0, :, 0] = False  # step 0 reuses self-attention: nothing is cached yet
    mask[2, :, 0] = False
    caplog.set_level(logging.INFO, logger=NOTICES)
    reference_mask = mask.copy()
    reference_mask[0] = True
    reference = Schedule(mask=reference_mask, components=layout.components, reuse="output")
    with accel.apply(pipe, CacheConfig(schedule=reference)):
        expected = generate(pipe, steps=4)
    with accel.apply(pipe, CacheConfig(schedule=Schedule(mask=mask, components=layout.components, reuse="output"))):
        images = generate(pipe, steps=4)
        generate(pipe, steps=4)
    said = [m for m in _messages(caplog) if "nothing is cached" in m]
    assert len(said) == 1 and "step 0" in said[0]
    assert torch.equal(images, expected)  # the step-0 reuse computed, as step 0 of the reference did


def test_stats_per_step_and_per_sample(tiny_pixart_pipeline):
    pipe = tiny_pixart_pipeline
    with accel.apply(pipe, CacheConfig(schedule=fora(layout_of(pipe), steps=6, interval=3))) as handle:
        generate(pipe, steps=6)
        stats = handle.stats()
    assert stats.step_pattern() == "C--C--"
    fractions = stats.step_reuse_fractions()
    assert fractions == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert sum(stats.step_reused) == sum(stats.reused.values())
    assert sum(stats.step_computed) == sum(stats.computed.values())
    text = str(stats)
    assert "C--C--" in text and "1:100%" in text and "per sample" not in text
    with accel.apply(pipe, CacheConfig(schedule=FirstBlockPolicy(threshold=10.0))) as handle:
        generate(pipe, steps=6)
        stats = handle.stats()
    assert sum(stats.step_samples_reused) == stats.samples_reused
    assert stats.step_samples_reused[0] == 0  # nothing to compare with at step 0
    assert "per sample:" in str(stats) and "samples reused per step: 0:0/" in str(stats)
    assert np.isclose(stats.to_dict()["sample_reuse_fraction"], stats.sample_reuse_fraction)


def test_apply_handle_forwards_only_one_techniques_attributes(tiny_pixart_pipeline):
    pipe = tiny_pixart_pipeline
    with accel.apply(pipe, CacheConfig(schedule=FirstBlockPolicy())) as handle:
        assert handle.decision_log == handle[CacheConfig].decision_log == []
        with pytest.raises(AttributeError):
            handle.no_such_thing  # noqa: B018


def test_zeroing_the_stats_mid_call_is_not_taken_for_a_policy_that_never_fired(tiny_pixart_pipeline, caplog):
    pipe = tiny_pixart_pipeline
    caplog.set_level(logging.INFO, logger=NOTICES)
    with accel.apply(pipe, CacheConfig(schedule=fora(layout_of(pipe), steps=6, interval=2))) as handle:
        generate(pipe, steps=6)
        first = sum(handle.stats().reused.values())  # the baseline the next call is watched from

        def zero_after_step_3(step, timestep, latents):
            if step == 3:
                handle.reset_stats()

        pipe(PROMPTS, num_inference_steps=6, callback=zero_after_step_3, callback_steps=1, **PIPE_KWARGS)
        assert 0 < sum(handle.stats().reused.values()) < first  # zeroed mid-call, then reused again
    assert _messages(caplog) == []
