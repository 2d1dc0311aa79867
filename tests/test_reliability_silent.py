"""Inputs that were taken silently as something else (issue 17, finding 8): a budget without a unit, a fractional
interval, NaN changes counted as reuse, a non-boolean ``count_macs``, a fractional schedule mask."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from accel.caching import CacheConfig, FirstBlockPolicy, Schedule, delta_dit, fora, taylorseer, tgate
from accel.caching.policy import first_block_decision
from accel.caching.schedule import ScheduleLayout

LAYOUT = ScheduleLayout(model_class="Tiny", num_blocks=2, components=("self_attn", "cross_attn", "ffn"))


def test_a_budget_without_a_unit_is_refused(capsys):
    from accel.caching.search.command import add_arguments

    parser = argparse.ArgumentParser(prog="accel search")
    add_arguments(parser)
    assert parser.parse_args(["--out", "x", "--budget", "90s"]).budget_seconds == 90
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--budget", "90"])  # was 90 minutes
    assert "give a unit: 90s, 90m or 90h" in capsys.readouterr().err
    assert "a bare number is refused" in " ".join(parser.format_help().split())


@pytest.mark.parametrize(
    "make",
    [
        lambda: fora(LAYOUT, 8, 2.5),
        lambda: fora(LAYOUT, 8, 2, warmup=1.5),
        lambda: taylorseer(LAYOUT, 8, 2.5),
        lambda: taylorseer(LAYOUT, 8, 3, order=1.5),
        lambda: delta_dit(LAYOUT, 8, 2.5),
        lambda: tgate(LAYOUT, 8, 2.5),
        lambda: fora(LAYOUT, 8.0, 2),
        lambda: fora(LAYOUT, 8, True),
    ],
    ids=["fora", "warmup", "taylorseer", "order", "delta-dit", "tgate", "steps", "bool"],
)
def test_fractional_heuristic_parameters_are_refused(make):
    with pytest.raises(TypeError, match="must be a whole number"):
        make()


def test_whole_numbers_of_any_integer_type_are_taken():
    assert np.array_equal(fora(LAYOUT, np.int64(8), np.int32(2)).mask, fora(LAYOUT, 8, 2).mask)


def test_a_nan_or_infinite_change_computes():
    """NaN >= threshold is False, so a NaN change was a reuse, and a broken run reported savings."""
    policy = FirstBlockPolicy(threshold=0.08)
    change = torch.tensor([float("nan"), 0.0, float("inf"), 0.5, 0.01])
    decision = first_block_decision(policy, step=3, num_steps=10, change=change, consecutive_reuse=None, batch=5)
    assert decision.tolist() == [True, False, True, True, False]


def test_count_macs_must_be_a_boolean():
    schedule = fora(LAYOUT, 4, 2)
    with pytest.raises(TypeError, match="count_macs must be true or false, got 'false'"):
        CacheConfig(schedule=schedule, count_macs="false")
    data = {**CacheConfig(schedule=schedule).to_dict(), "count_macs": "false"}  # bool("false") was True
    with pytest.raises((TypeError, ValueError), match="count_macs"):
        CacheConfig.from_dict(data)
    assert CacheConfig.from_dict({**data, "count_macs": False}).count_macs is False


def test_a_fractional_schedule_mask_is_refused():
    with pytest.raises(ValueError, match="must hold booleans"):
        Schedule(mask=np.full((2, 2, 3), 0.5), components=LAYOUT.components)
    ones = Schedule(mask=np.ones((2, 2, 3), dtype=np.int64), components=LAYOUT.components)
    assert ones.mask.dtype == bool and ones.mask.all()


def test_policy_fields_must_be_numbers():
    with pytest.raises(TypeError, match="threshold must be a number"):
        FirstBlockPolicy(threshold="0.1")
    with pytest.raises(TypeError, match="warmup_steps must be a whole number"):
        FirstBlockPolicy(warmup_steps=1.5)
