"""Caching composes with torch.compile: bounded compiled frames that do not grow with the step count, the same
outputs as without compile, whichever way the user compiles and in either order."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_MODELS, GraphCalls, denoise
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import accel
from accel.caching import CacheConfig, FirstBlockPolicy, compute_all, fora, layout_of

#: frames a technique may compile beyond the plain compiled model: with regional compilation (each block
#: compiled) none should be needed; with the whole transformer compiled, its graph is split where the
#: decisions run (at the block boundaries), a constant number of frames whatever the block count
EXTRA_FRAMES = {"blocks": 2, "repeated": 2, "whole": 5}


def _policy(model, kind: str):
    layout = layout_of(model)
    return {
        "compute-all": compute_all(layout, 20),
        "fora-2": fora(layout, 20, 2),
        "first-block": FirstBlockPolicy(threshold=0.2),
    }[kind]


def _compile(model, how: str, backend):
    """Compile ``model`` the way ``how`` says; returns what to call."""
    if how == "blocks":
        accel.compile_blocks(model, backend=backend)
        return model
    if how == "repeated":
        model.compile_repeated_blocks(backend=backend)
        return model
    return torch.compile(model, backend=backend)


def _frames(tiny, kind: str, how: str, order: str, steps: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Frames compiled by the plain model, and with caching after each run of ``steps``."""
    torch._dynamo.reset()
    model = tiny.build()
    counter = CompileCounter()
    handle = None
    if order == "after":  # accel first, compile after
        handle = accel.apply(model, CacheConfig(schedule=_policy(model, kind), count_macs=False))
        call = _compile(model, how, counter)
        plain = []
    else:
        call = _compile(model, how, counter)
        denoise(call, tiny, [1, 2], steps=steps[0], cfg=False)
        plain = [counter.frame_count]
        handle = accel.apply(call, CacheConfig(schedule=_policy(model, kind), count_macs=False))
    cached = []
    for count in steps:
        denoise(call, tiny, [1, 2], steps=count, cfg=False)
        cached.append(counter.frame_count)
    handle.remove()
    return plain, cached


@pytest.mark.parametrize("kind", ["compute-all", "fora-2", "first-block"])
@pytest.mark.parametrize("how", ["blocks", "whole"])
def test_caching_adds_a_bounded_number_of_frames_that_does_not_grow_with_steps(kind, how):
    plain, cached = _frames(TINY_MODELS["pixart"], kind, how, "before", steps=(20, 50))
    assert cached[0] - plain[0] <= EXTRA_FRAMES[how], (plain, cached)
    assert cached[1] == cached[0], f"frames grew from 20 to 50 steps: {cached}"


@pytest.mark.parametrize("how", ["blocks", "whole", "repeated"])
def test_compiling_after_accel_is_bounded_too(how):
    tiny = TINY_MODELS["wan"]  # Wan lists _repeated_blocks, so diffusers' compile_repeated_blocks works on it
    _, before = _frames(tiny, "fora-2", how, "before", steps=(20,))
    _, after = _frames(tiny, "fora-2", how, "after", steps=(20, 50))
    assert after[0] <= before[0] + EXTRA_FRAMES[how] and after[1] == after[0], (before, after)


def test_whole_model_compile_frames_do_not_grow_with_the_block_count():
    from dataclasses import replace

    counts = []
    for layers in (2, 6):
        tiny = TINY_MODELS["pixart"]
        tiny = replace(tiny, config={**tiny.config, "num_layers": layers})
        plain, cached = _frames(tiny, "fora-2", "whole", "before", steps=(12,))
        counts.append(cached[0] - plain[0])
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("name", ["pixart", "flux", "wan"])
def test_compute_all_under_compile_equals_the_compiled_model_without_the_plugin(name):
    tiny = TINY_MODELS[name]
    model = tiny.build()
    accel.compile_blocks(model, backend="aot_eager")
    reference = denoise(model, tiny, [1, 2], steps=6, cfg=True)
    with accel.apply(model, CacheConfig(schedule=compute_all(layout_of(model), 6))):
        assert torch.equal(denoise(model, tiny, [1, 2], steps=6, cfg=True), reference)


def test_caching_under_compile_matches_eager_caching():
    tiny = TINY_MODELS["pixart"]
    model = tiny.build()
    schedule = fora(layout_of(model), 8, 2)
    with accel.apply(model, CacheConfig(schedule=schedule)):
        eager = denoise(model, tiny, [1, 2], steps=8, cfg=True)
    accel.compile_blocks(model, backend="aot_eager")
    with accel.apply(model, CacheConfig(schedule=schedule)) as handle:
        compiled = denoise(model, tiny, [1, 2], steps=8, cfg=True)
        assert handle.stats().blocks_skipped > 0, "the schedule must really reuse under compile"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_inductor_compute_all_equals_inductor_without_the_plugin_and_fora_is_exact_to_its_eager_self():
    tiny = TINY_MODELS["pixart"]
    model = tiny.build()
    counter = CompileCounterWithBackend("inductor")
    accel.compile_blocks(model, backend=counter)
    reference = denoise(model, tiny, [1], steps=4, cfg=False)
    frames = counter.frame_count
    with accel.apply(model, CacheConfig(schedule=compute_all(layout_of(model), 4))):
        assert torch.equal(denoise(model, tiny, [1], steps=4, cfg=False), reference)
    assert counter.frame_count - frames <= EXTRA_FRAMES["blocks"]


def _compiled_pixart():
    """The tiny PixArt with its blocks compiled by a :class:`GraphCalls` backend: ``(tiny, model, backend)``."""
    tiny = TINY_MODELS["pixart"]
    model = tiny.build()
    torch._dynamo.reset()  # earlier tests' compiled entries count towards the recompile limit
    backend = GraphCalls()
    accel.compile_blocks(model, backend=backend)
    return tiny, model, backend


@pytest.mark.parametrize("count_macs", [False, True])
def test_cached_blocks_that_compute_run_their_compiled_code(count_macs):
    # counting a block's MACs runs it under a dispatch mode, which on torch 2.13 made dynamo run it eagerly for
    # good: every later call, with no frame compiled to show it (accel.compile.flop_counter)
    tiny, model, backend = _compiled_pixart()
    denoise(model, tiny, [1, 2], steps=6, cfg=True)
    assert backend.calls == 6 * 2
    with accel.apply(model, CacheConfig(schedule=fora(layout_of(model), 6, 2), count_macs=count_macs)) as handle:
        for _ in range(2):  # fora-2 over 6 steps: 2 blocks at each of 3 steps, then each block reused whole
            before = backend.calls
            denoise(model, tiny, [1, 2], steps=6, cfg=True)
            assert backend.calls - before == 3 * 2, backend.calls - before
        assert handle.stats().blocks_skipped == 2 * 3 * 2


@pytest.mark.parametrize("measure", ["macs", "memory"])
def test_measuring_a_call_s_cost_leaves_its_compiled_blocks_compiled(measure):
    from accel.eval.cost import count_macs, peak_memory

    tiny, model, backend = _compiled_pixart()

    def run():
        return denoise(model, tiny, [1], steps=2, cfg=False)

    run()
    assert (count_macs(run) if measure == "macs" else peak_memory(run, "cpu")["peak_bytes"]) > 0
    before = backend.calls
    run()
    assert backend.calls - before == 2 * 2


def test_apply_accepts_a_torch_compile_wrapper_and_a_pipeline_holding_one(tiny_pixart_pipeline):
    pipe = tiny_pixart_pipeline
    original = pipe.transformer
    pipe.transformer = torch.compile(original, backend="eager")
    with accel.apply(pipe, CacheConfig(schedule=fora(layout_of(original), 4, 2))) as handle:
        pipe(
            "red apple", num_inference_steps=4, output_type="latent", height=16, width=16, use_resolution_binning=False
        )
        assert handle.stats().blocks_skipped > 0
        assert handle.target.transformer is original
    assert "forward" not in original.transformer_blocks[0].__dict__


def test_inside_a_pipeline_call_the_step_comes_from_the_scheduler_without_reading_the_timestep(
    tiny_pixart_pipeline, monkeypatch
):
    import accel.context

    reads = []
    original = accel.context._timestep_key
    monkeypatch.setattr(accel.context, "_timestep_key", lambda value: reads.append(1) or original(value))
    pipe = tiny_pixart_pipeline
    kwargs = dict(output_type="latent", height=16, width=16, use_resolution_binning=False, guidance_scale=1.0)
    with accel.apply(pipe, CacheConfig(schedule=fora(layout_of(pipe), 6, 2))) as handle:
        pipe("red apple", num_inference_steps=6, **kwargs)
        # the first two steps read the timestep too, to see the scheduler's counter move with it; no more
        assert len(reads) == 2, "a host-device synchronisation per call that the scheduler's counter avoids"
        assert handle.stats().blocks_skipped == 3 * len(pipe.transformer.transformer_blocks)
        tracker = handle.target.tracker
        # after the trajectory, bare calls fall back to the timestep (the counter is over)
        model = pipe.transformer
        latents = torch.randn(1, 4, 8, 8)
        text = torch.randn(1, 16, 16)
        for t in (900.0, 500.0):
            model(latents, encoder_hidden_states=text, timestep=torch.tensor([t]), return_dict=False)
        assert len(reads) == 4 and tracker._step == 1 and tracker._branch == 0


def test_removing_one_handle_under_a_whole_compile_leaves_another_handle_working():
    # remove() puts the whole-compiled forward's execution strategy back; with another technique still applied its
    # wrappers must keep running (the compiled whole graph's guards fail while they are there)
    from accel.quant import QuantConfig

    torch._dynamo.reset()
    tiny = TINY_MODELS["pixart"]
    model = tiny.build()
    call = torch.compile(model, backend=GraphCalls())
    full = denoise(call, tiny, [1, 2], steps=4, cfg=False)
    cache = accel.apply(call, CacheConfig(schedule=fora(layout_of(model), 4, 2), count_macs=False))
    cached = denoise(call, tiny, [1, 2], steps=4, cfg=False)
    accel.apply(call, QuantConfig(scheme="int8-weight")).remove()
    skipped = cache.stats().blocks_skipped
    assert torch.equal(denoise(call, tiny, [1, 2], steps=4, cfg=False), cached)
    assert cache.stats().blocks_skipped == 2 * skipped > 0
    cache.remove()
    assert torch.equal(denoise(call, tiny, [1, 2], steps=4, cfg=False), full)
