"""The caching engine on a stock diffusers PixArt pipeline, on tiny models, and on a hand-described toy."""

from collections import Counter

import pytest
import torch
from tiny_models import TINY_MODELS, denoise
from torch._subclasses.fake_tensor import FakeTensor

import accel
from accel.adapters import BlockStack, Component, ModelSpec
from accel.caching import CacheConfig, FirstBlockPolicy, Schedule, compute_all, fora, layout_of
from accel.hooks import wrap_forward

PIPE_KWARGS = dict(output_type="pt", max_sequence_length=16, clean_caption=False, use_resolution_binning=False)
PROMPTS = ["a red apple", "a blue car"]


def generate(pipe, prompts=PROMPTS, steps=6, guidance_scale=4.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator, **PIPE_KWARGS
    ).images


def psnr(a, b):
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


def wrapped_modules(module):
    return [name for name, m in module.named_modules() if "forward" in m.__dict__]


# -- hooks -------------------------------------------------------------------------------------------------


def test_wrappers_stack_and_remove_in_any_order():
    layer = torch.nn.Linear(2, 2)
    x = torch.randn(3, 2)
    expected = layer(x)
    inner = wrap_forward(layer, lambda f, *a: f(*a) + 1)
    outer = wrap_forward(layer, lambda f, *a: f(*a) * 2)
    assert torch.equal(layer(x), (expected + 1) * 2)
    inner.remove()  # not on top: becomes a pass-through
    assert torch.equal(layer(x), expected * 2)
    outer.remove()
    inner.remove()  # idempotent
    assert "forward" not in layer.__dict__ and torch.equal(layer(x), expected)


# -- front door --------------------------------------------------------------------------------------------


def test_apply_errors(tiny_pixart_pipeline):
    pipe = tiny_pixart_pipeline
    with pytest.raises(ValueError, match="at least one config"):
        accel.apply(pipe)
    with pytest.raises(TypeError, match="No technique registered for dict"):
        accel.apply(pipe, {"schedule": "fora"})
    with pytest.raises(TypeError, match="pipeline with a `.transformer`"):
        accel.apply(object(), CacheConfig(schedule=FirstBlockPolicy()))
    with pytest.raises(ValueError, match="(?s)No adapter for Linear.*PixArtTransformer2DModel.*ModelSpec"):
        accel.apply(torch.nn.Linear(2, 2), CacheConfig(schedule=FirstBlockPolicy()))


def test_wrong_model_schedule_is_rejected_and_leaves_model_clean(tiny_pixart_pipeline):
    pipe = tiny_pixart_pipeline
    schedule = fora(layout_of(pipe), 6)
    other = TINY_MODELS["sd3"].build()
    with pytest.raises(ValueError, match="made for PixArtTransformer2DModel, the model is SD3Transformer2DModel"):
        accel.apply(other, CacheConfig(schedule=schedule))
    assert wrapped_modules(other) == []
    blocks = Schedule(mask=schedule.mask[:, :2], components=schedule.components)
    with pytest.raises(ValueError, match="2 blocks, the model has 4"):
        accel.apply(pipe, CacheConfig(schedule=blocks))
    assert wrapped_modules(pipe.transformer) == [] and "set_timesteps" not in pipe.scheduler.__dict__


def test_applying_twice_is_refused_until_removed(tiny_pixart_pipeline):
    pipe = tiny_pixart_pipeline
    config = CacheConfig(schedule=fora(layout_of(pipe), 6))
    handle = accel.apply(pipe, config)
    with pytest.raises(ValueError, match="already applied"):
        accel.apply(pipe, config)
    handle.remove()
    with accel.apply(pipe, config) as again:
        generate(pipe)
        assert again.stats().blocks_skipped > 0
    assert wrapped_modules(pipe.transformer) == []


# -- the stock pipeline -----------------------------------------------------------------------------------


def test_compute_all_is_bit_identical_and_remove_restores(tiny_pixart_pipeline):
    pipe = tiny_pixart_pipeline
    reference = generate(pipe)
    handle = accel.apply(pipe, CacheConfig(schedule=compute_all(layout_of(pipe), 6)))
    assert torch.equal(generate(pipe), reference)
    handle.remove()
    assert wrapped_modules(pipe.transformer) == [] and "set_timesteps" not in pipe.scheduler.__dict__
    assert torch.equal(generate(pipe), reference)


def test_fora2_halves_component_calls_and_meets_error_bound(tiny_pixart_pipeline):
    pipe = tiny_pixart_pipeline
    reference = generate(pipe, steps=10)
    calls = Counter()
    for name, module in pipe.transformer.named_modules():
        short = name.split(".")[-1]
        if short in ("attn1", "attn2", "ff"):
            # a MAC count runs on fake tensors (shapes only): not a computation
            module.register_forward_hook(lambda m, a, o, key=short: isinstance(o, FakeTensor) or calls.update([key]))
    generate(pipe, steps=10)
    full_calls = Counter(calls)
    calls.clear()
    with accel.apply(pipe, CacheConfig(schedule=fora(layout_of(pipe), 10, 2))) as handle:
        cached = generate(pipe, steps=10)
        stats = handle.stats()
    assert all(2 * calls[k] == full_calls[k] for k in full_calls) and full_calls["ff"] == 10 * 4
    assert stats.computed == {k: 20 for k in ("self_attn", "cross_attn", "ffn")}
    assert stats.reused == stats.computed and stats.blocks_skipped == 20
    assert stats.macs_saved_fraction == pytest.approx(0.5)
    assert psnr(cached, reference) > 30  # measured ~47 dB on this tiny random model


def test_each_pipeline_call_starts_fresh(tiny_pixart_pipeline):
    pipe = tiny_pixart_pipeline
    with accel.apply(pipe, CacheConfig(schedule=fora(layout_of(pipe), 6, 3))):
        first = generate(pipe)
        generate(pipe, prompts=["a green tree"], seed=5)  # different trajectory in between
        assert torch.equal(generate(pipe), first)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5], ids=["no_cfg", "cfg"])
def test_batch_equals_each_prompt_alone(tiny_pixart_pipeline, guidance_scale):
    pipe = tiny_pixart_pipeline

    def each_alone():
        return torch.cat([generate(pipe, [p], guidance_scale=guidance_scale, seed=i) for i, p in enumerate(PROMPTS)])

    def batched():
        generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
        return pipe(
            PROMPTS, num_inference_steps=6, guidance_scale=guidance_scale, generator=generators, **PIPE_KWARGS
        ).images

    tolerance = (batched() - each_alone()).abs().max().item()  # what the unwrapped pipeline itself meets
    with accel.apply(pipe, CacheConfig(schedule=fora(layout_of(pipe), 6, 2))):
        error = (batched() - each_alone()).abs().max().item()
    assert error <= max(10 * tolerance, 1e-5)


def test_twenty_step_schedule_runs_thirty_steps(tiny_pixart_pipeline):
    pipe = tiny_pixart_pipeline
    schedule = fora(layout_of(pipe), 20, 2)
    expected = schedule.resample(30).mask
    with accel.apply(pipe, CacheConfig(schedule=schedule)) as handle:
        generate(pipe, steps=30)
        stats = handle.stats()
    assert stats.computed["ffn"] == expected[:, :, 2].sum() and stats.reused["ffn"] == (~expected[:, :, 2]).sum()


def test_cache_dtype_bounds_memory(tiny_pixart_pipeline):
    pipe = tiny_pixart_pipeline
    peaks = {}
    for dtype in (None, torch.bfloat16):
        with accel.apply(
            pipe, CacheConfig(schedule=fora(layout_of(pipe), 6, 2, reuse="output"), cache_dtype=dtype)
        ) as h:
            generate(pipe)
            peaks[dtype] = h.stats().peak_cache_bytes
    assert peaks[None] > 0 and peaks[torch.bfloat16] * 2 == peaks[None]


# -- separate cond/uncond calls (Wan-style pipelines) -------------------------------------------------------


def test_separate_branch_calls_never_share_caches():
    tiny = TINY_MODELS["pixart"]
    model = tiny.build()
    schedule = fora(layout_of(model), 8, 2)

    def separate_cfg():
        latents = tiny.latents(1, torch.Generator().manual_seed(3))
        cond, uncond = tiny.conditions([3]), tiny.conditions([None])
        for t in torch.linspace(1000, 1, 8):
            predictions = [
                tiny.prediction(model(**tiny.forward_kwargs(latents, c, t.expand(1))), latents) for c in (uncond, cond)
            ]
            latents = latents - 0.1 * (predictions[0] + 4 * (predictions[1] - predictions[0]))
        return latents

    with accel.apply(model, CacheConfig(schedule=schedule)):
        cached_separate = separate_cfg()
    reference = separate_cfg()
    with accel.apply(model, CacheConfig(schedule=compute_all(layout_of(model), 8))):
        assert torch.equal(separate_cfg(), reference)
    # Had the branches shared caches, the uncond features would be reused for cond: a gross error.
    assert (cached_separate - reference).abs().max() < 0.1 * reference.abs().max()


# -- dynamic per-sample policy ----------------------------------------------------------------------------


def test_first_block_policy_decides_per_sample():
    tiny = TINY_MODELS["pixart"]
    model = tiny.build()
    seeds = [1, 2]
    logs = {}
    outputs = {}
    threshold = 0.04
    for key, batch in {"both": seeds, "first": seeds[:1], "second": seeds[1:]}.items():
        with accel.apply(model, CacheConfig(schedule=FirstBlockPolicy(threshold=threshold))) as handle:
            outputs[key] = denoise(model, tiny, batch, steps=12, cfg=False)
            logs[key] = [decision.compute for decision in handle[CacheConfig].decision_log]
    together = logs["both"]
    assert [flags[0] for flags in together] == [flags[0] for flags in logs["first"]]
    assert [flags[1] for flags in together] == [flags[0] for flags in logs["second"]]
    assert any(a != b for a, b in together), "the two samples should disagree at some step"
    torch.testing.assert_close(outputs["both"], torch.cat([outputs["first"], outputs["second"]]), atol=1e-5, rtol=0)
    reference = denoise(model, tiny, seeds, steps=12, cfg=False)
    relative = (outputs["both"] - reference).norm() / reference.norm()
    assert 0 < relative < 0.1


def test_first_block_policy_runs_the_later_blocks_on_the_computing_samples_only():
    tiny = TINY_MODELS["pixart"]
    model = tiny.build()
    seen = []
    last = model.transformer_blocks[-1].ff  # called inside the block: sees the rows the block runs on

    def record(module, args, kwargs):
        seen.append(len(args[0] if args else kwargs["hidden_states"]))

    hook = last.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with accel.apply(model, CacheConfig(schedule=FirstBlockPolicy(threshold=0.04))) as handle:
            denoise(model, tiny, [1, 2], steps=12, cfg=False)
            decisions = handle[CacheConfig].decision_log
            saved = handle[CacheConfig].stats().macs_saved
    finally:
        hook.remove()
    assert any(sum(d.compute) == 1 for d in decisions), "the two samples should disagree at some step"
    assert 1 in seen and sum(seen) == sum(sum(d.compute) for d in decisions)
    assert saved > 0


# -- hand-described toy: forecasting ----------------------------------------------------------------------


class ToyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ff = torch.nn.Linear(4, 4)

    def forward(self, hidden_states, timestep):
        return hidden_states + self.ff(timestep.view(-1, 1, 1).expand_as(hidden_states) / 1000)


class Toy(torch.nn.Module):
    """Each block adds a residual that is linear in the timestep, hence in the step index."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(ToyBlock() for _ in range(3))

    def forward(self, hidden_states, timestep):
        for block in self.blocks:
            hidden_states = block(hidden_states, timestep)
        return hidden_states


TOY_SPEC = ModelSpec(stacks=(BlockStack(path="blocks", components=(Component(name="ffn", module="ff"),)),))


@pytest.mark.parametrize("reuse", ["output", "residual"])
def test_first_order_forecast_is_exact_on_linear_features(reuse):
    toy = Toy().double().requires_grad_(False)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    timesteps = torch.linspace(1000, 0, 10, dtype=torch.float64)
    reference = [toy(x, t.expand(2)) for t in timesteps]
    layout = layout_of(toy, TOY_SPEC)
    for order, exact in ((1, True), (0, False)):
        schedule = fora(layout, 10, 3, reuse=reuse, forecast_order=order)
        with accel.apply(toy, CacheConfig(schedule=schedule), spec=TOY_SPEC):
            outputs = [toy(x, t.expand(2)) for t in timesteps]
        errors = [float((o - r).abs().max()) for o, r in zip(outputs, reference)]
        # steps 4, 5, 7, 8 reuse with two computed points (0, 3 or 3, 6) behind them
        assert all((errors[s] < 1e-10) == exact for s in (4, 5, 7, 8)), errors


def test_reset_restores_step_zero_behaviour():
    toy = Toy().requires_grad_(False)
    x = torch.randn(2, 5, 4)
    t = torch.tensor([500.0, 500.0])
    schedule = fora(layout_of(toy, TOY_SPEC), 4, 2)
    with accel.apply(toy, CacheConfig(schedule=schedule), spec=TOY_SPEC) as handle:
        toy(x, t)  # step 0: computes
        toy(x, t - 100)  # step 1: reuses
        assert handle.stats().reused["ffn"] == 3
        handle.reset()
        toy(x, t - 200)  # a new trajectory even though the timestep went down: step 0 again
        assert handle.stats().computed["ffn"] == 6 and handle.stats().reused["ffn"] == 3
