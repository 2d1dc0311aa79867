"""The patch log's primitives undo exactly; the allow-listed JSON loader refuses what it should; plans
round-trip (large channels through safetensors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from accel.caching import CacheConfig, FirstBlockPolicy, Schedule, fora, layout_of
from accel.patches import PatchLog
from accel.plan import INLINE_LIMIT, Channel, Plan
from accel.serialization import from_dict, load, registered_types


def test_patch_log_undoes_every_kind_of_change_newest_first():
    from diffusers.models.attention_processor import Attention, AttnProcessor

    parent = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    attention = Attention(query_dim=8, heads=2, dim_head=4)
    weight, first, processor = parent[0].weight, parent[0], attention.processor
    log = PatchLog("demo")
    log.replace_parameter(parent[0], "weight", torch.nn.Parameter(torch.zeros(2, 2)))
    log.replace_module(parent, "0", torch.nn.Identity())
    log.set_attribute(parent, "flag", 1)
    log.set_processor(attention, AttnProcessor())
    log.wrap(parent, "forward", lambda inner, x: inner(x) + 1)
    assert [r.kind for r in log.records] == ["parameter", "module", "attribute", "processor", "wrap"]
    assert all(r.technique == "demo" for r in log.records)
    assert "demo: module Sequential.0" == log.records[1].describe()
    log.undo()
    assert parent[0] is first and parent[0].weight is weight and attention.processor is processor
    assert "flag" not in parent.__dict__ and "forward" not in parent.__dict__ and len(log) == 0
    log.undo()  # idempotent


def test_patch_log_refuses_to_replace_what_is_not_there():
    log = PatchLog("demo")
    with pytest.raises(ValueError, match="no submodule"):
        log.replace_module(torch.nn.Sequential(), "3", torch.nn.Identity())
    with pytest.raises(ValueError, match="no parameter"):
        log.replace_parameter(torch.nn.ReLU(), "weight", torch.nn.Parameter(torch.zeros(1)))


def test_every_config_and_plan_type_is_on_the_allow_list():
    names = set(registered_types())
    assert {"accel.caching.Schedule", "accel.caching.FirstBlockPolicy", "accel.caching.CacheConfig",
            "accel.Plan"} <= names  # fmt: skip


def test_loader_refuses_unknown_types_other_versions_and_unexpected_kinds(tmp_path):
    policy = FirstBlockPolicy(threshold=0.1)
    assert from_dict(policy.to_dict()) == policy
    with pytest.raises(ValueError, match="is not one of"):
        from_dict({"type": "os.system", "version": 1})
    with pytest.raises(ValueError, match="version 9 is not supported"):
        from_dict({**policy.to_dict(), "version": 9})
    with pytest.raises(ValueError, match="is not one of"):
        from_dict(policy.to_dict(), expected=Schedule)
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object"):
        load(path)


def test_cache_config_round_trips_through_the_loader():
    from tiny_models import TINY_MODELS

    model = TINY_MODELS["pixart"].build()
    config = CacheConfig(schedule=fora(layout_of(model), 10, 2), cache_dtype=torch.bfloat16)
    loaded = from_dict(json.loads(json.dumps(config.to_dict())), expected=CacheConfig)
    assert loaded.cache_dtype == torch.bfloat16 and np.array_equal(loaded.schedule.mask, config.schedule.mask)


def test_plan_round_trips_small_channels_inline_and_large_ones_in_safetensors(tmp_path):
    from tiny_models import TINY_MODELS

    model = TINY_MODELS["pixart"].build()
    plan = fora(layout_of(model), 10, 2).to_plan()
    assert plan.channel("compute").shape == (10, 2, 3) and plan.settings["technique"] == "caching"
    tokens = INLINE_LIMIT + 1
    plan = plan.with_channel("budget", ("step", "token"), np.random.rand(10, tokens), token=tokens)
    plan = plan.with_channel("pattern", ("block", "head"), np.array([[0, 1], [2, 0]]), head=2)
    plan.save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["channels"]["budget"]["stored"] == "safetensors" and "values" in data["channels"]["pattern"]
    loaded = Plan.load(tmp_path / "plan.json")
    for name in ("compute", "budget", "pattern"):
        assert np.array_equal(loaded.channel(name), plan.channel(name))
        assert loaded.channel(name).dtype == plan.channel(name).dtype


def test_plan_checks_axes_and_shapes():
    with pytest.raises(ValueError, match="distinct names"):
        Channel(("step", "pixel"), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="has shape"):
        Plan(sizes={"step": 3}, channels={"x": Channel(("step",), np.zeros(4))})
    with pytest.raises(KeyError, match="has no channel"):
        Plan(sizes={"step": 3}).channel("x")
