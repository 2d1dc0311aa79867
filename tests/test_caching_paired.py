"""The first-block policy's paired CFG branches (``FirstBlockPolicy(branches="paired")``, the default): one
prompt's two branches decide together, batched (rows whose latents are the same) or in separate calls (Wan)."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import TINY_VIDEO_KWARGS, build_tiny_wan_pipeline
from tiny_models import TINY_MODELS, denoise

import accel
from accel.caching import CacheConfig, FirstBlockPolicy
from accel.caching.policy import paired_change, same_halves
from accel.serialization import from_dict


def test_same_halves_and_paired_change():
    rows = torch.arange(6.0).reshape(3, 2)
    assert same_halves(torch.cat([rows, rows])) and not same_halves(rows) and not same_halves(rows[:0])
    assert not same_halves(torch.cat([rows, rows + 1]))
    torch.testing.assert_close(paired_change(torch.tensor([0.1, 0.3, 0.5, 0.1])), torch.tensor([0.3, 0.2, 0.3, 0.2]))


def test_branches_is_validated_and_a_version_1_policy_keeps_deciding_alone():
    with pytest.raises(ValueError, match="'paired' or 'own'"):
        FirstBlockPolicy(branches="both")
    policy = FirstBlockPolicy(threshold=0.1)
    assert policy.branches == "paired" and policy.to_dict()["version"] == 2
    assert from_dict(policy.to_dict()) == policy
    old = {"type": "accel.caching.FirstBlockPolicy", "version": 1, "threshold": 0.1, "warmup_steps": 1}
    old |= {"final_steps": 0, "max_consecutive_reuse": None}
    assert from_dict(old) == FirstBlockPolicy(threshold=0.1, branches="own")


def _decisions(model, tiny, branches: str, threshold: float) -> tuple[list, torch.Tensor]:
    with accel.apply(model, CacheConfig(schedule=FirstBlockPolicy(threshold=threshold, branches=branches))) as handle:
        out = denoise(model, tiny, [1, 2], steps=12, cfg=True)
        return [d.compute for d in handle[CacheConfig].decision_log], out


def test_batched_branches_of_a_prompt_decide_together_and_other_prompts_alone():
    tiny = TINY_MODELS["pixart"]
    model = tiny.build()
    reference = denoise(model, tiny, [1, 2], steps=12, cfg=True)
    own, _ = _decisions(model, tiny, "own", 0.04)
    assert any(flags[:2] != flags[2:] for flags in own), "alone, a prompt's two branches disagree at some step"
    paired, out = _decisions(model, tiny, "paired", 0.04)
    assert all(flags[:2] == flags[2:] for flags in paired)  # rows (uncond 1, uncond 2, cond 1, cond 2)
    assert any(flags[0] != flags[1] for flags in paired), "the two prompts still decide apart"
    assert any(not all(flags) for flags in paired), "paired branches still reuse"
    relative = (out - reference).norm() / reference.norm()
    assert 0 < relative < 0.1


def test_branches_in_separate_calls_follow_the_first_call_of_the_step(one_thread):
    pipe = build_tiny_wan_pipeline()
    call = {"num_inference_steps": 10, "guidance_scale": 4.0, "output_type": "pt", **TINY_VIDEO_KWARGS}

    def run(branches: str, threshold: float) -> tuple[dict, torch.Tensor]:
        policy = FirstBlockPolicy(threshold=threshold, branches=branches)
        with accel.apply(pipe, CacheConfig(schedule=policy)) as handle:
            frames = pipe("a red apple", generator=torch.Generator().manual_seed(0), **call).frames
            by_step = {}
            for decision in handle[CacheConfig].decision_log:
                by_step.setdefault(decision.step, {})[decision.branch] = decision.compute
            return by_step, frames

    def disagree(by_step: dict) -> bool:
        return any(branches[0] != branches[1] for branches in by_step.values())

    full = pipe("a red apple", generator=torch.Generator().manual_seed(0), **call).frames
    probe = FirstBlockPolicy(threshold=0.0, branches="own")  # computes everything, logging each call's change
    with accel.apply(pipe, CacheConfig(schedule=probe)) as handle:
        pipe("a red apple", generator=torch.Generator().manual_seed(0), **call)
        first = [d.change[0] for d in handle[CacheConfig].decision_log if d.change is not None][:2]
    assert first[0] != first[1]  # step 1's change, cond and uncond: between them one reuses, one computes
    threshold = sum(first) / 2
    assert disagree(run("own", threshold)[0])
    by_step, frames = run("paired", threshold)
    assert all(len(branches) == 2 for branches in by_step.values())  # Wan runs cond and uncond in two calls
    assert not disagree(by_step)
    assert any(not all(branches[0]) for branches in by_step.values()), "the pair reuses at some step"
    mse = float(((frames - full) ** 2).mean())
    assert 10 * torch.log10(torch.tensor(1 / mse)) > 25  # frames in [0, 1]
