"""Sparse attention: patterns against hand-counted masks, every kernel against the float32 reference, plans as
data, and the technique on a Wan transformer (exact when dense, within a bound when sparse, undone exactly,
composing with caching and torch.compile)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from tiny_models import TINY_MODELS, denoise
from torch._dynamo.testing import CompileCounter

import accel
from accel.caching import CacheConfig, fora, layout_of
from accel.plan import Plan
from accel.sparse import (
    HeadPattern,
    LayerAttention,
    SparseAttentionConfig,
    TokenGrid,
    density,
    describe_plan,
    layer_patterns,
    make_plan,
    plan_dense_steps,
    plan_density,
    reference_attention,
    sparse_layers,
    trajectory_density,
    uniform_plan,
)
from accel.sparse.end_to_end import compare_to_dense, run_pipeline
from accel.sparse.offline import search
from accel.sparse.patterns import dense_mask
from accel.sparse.runs import CallGroup, SliceCall, group_calls, slice_calls
from accel.sparse.search import ErrorRecorder, candidate_patterns, choose, fit_cost_model, tile_densities

WAN = TINY_MODELS["wan"]

MIXED = [
    HeadPattern.dense(),
    HeadPattern(windows=((0, None, None),)),
    HeadPattern.skip(),
    HeadPattern(windows=((None, 1, 1), (0, None, None)), sink_frames=(0,)),
    HeadPattern(),
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_window_mask_matches_a_hand_count():
    grid = TokenGrid(2, 2, 3)  # 12 tokens: frame 0 = 0..5, frame 1 = 6..11
    mask = dense_mask([HeadPattern(windows=((0, 0, 1),))], grid)[0]
    # token 4 = frame 0, row 1, column 1: sees columns 0..2 of row 1 in frame 0 only
    assert mask[4].nonzero().flatten().tolist() == [3, 4, 5]
    sink = dense_mask([HeadPattern(sink_frames=(-1,))], grid)[0]
    assert sink[0].nonzero().flatten().tolist() == list(range(6, 12))


def test_text_tokens_always_see_and_are_seen():
    grid = TokenGrid(2, 2, 2, text=3, text_first=True)
    mask = dense_mask([HeadPattern(windows=((0, 0, 0),))], grid)[0]
    assert mask[:3].all() and mask[:, :3].all()
    assert mask[3:, 3:].sum() == 8  # each visual token sees itself only


@pytest.mark.parametrize(
    "pattern",
    [
        HeadPattern(windows=((1, 2, None),)),
        HeadPattern(windows=((0, 1, 1),), sink_frames=(0, -1)),
        HeadPattern(windows=((0, None, None), (None, 1, 2), (2, 0, None)), sink_frames=(1,)),
    ],
)
@pytest.mark.parametrize("grid", [TokenGrid(3, 4, 5), TokenGrid(4, 3, 2, text=4, text_first=False)])
def test_density_is_counted_exactly(pattern, grid):
    assert density(pattern, grid) == pytest.approx(dense_mask([pattern], grid).double().mean().item(), abs=1e-6)


def test_bad_patterns_are_refused():
    with pytest.raises(ValueError, match="half-widths"):
        HeadPattern(windows=((1, -1, None),))
    with pytest.raises(ValueError, match="takes no windows"):
        HeadPattern(kind="dense", windows=((1, 1, 1),))
    with pytest.raises(ValueError, match="kind"):
        HeadPattern(kind="diagonal")


@pytest.mark.parametrize("backend", ["flex", "sdpa", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_backend_meets_the_reference_bound(backend, dtype):
    grid = TokenGrid(3, 6, 8, text=5, text_first=False)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, len(MIXED), grid.length, 16, generator=generator) for _ in range(3))
    ref = reference_attention(q, k, v, MIXED, grid)
    low = [t.to(dtype) for t in (q, k, v)]
    ref_low_err = (reference_attention(*low, MIXED, grid).float() - ref).abs().max()
    out = LayerAttention(MIXED, grid, backend=backend)(*low).float()
    assert (out - ref).abs().max() <= 2 * ref_low_err + 1e-5
    assert out[:, 2].abs().max() == 0  # the skip head


@pytest.mark.parametrize("backend", ["runs", "flex"])
def test_a_layer_refuses_inputs_of_another_head_count_or_length_before_any_compute(backend):
    grid = TokenGrid(2, 4, 4)
    layer = LayerAttention(MIXED, grid, backend=backend)
    right = [torch.randn(1, len(MIXED), grid.length, 8) for _ in range(3)]
    assert layer(*right).shape == right[0].shape
    more_heads = [torch.randn(1, len(MIXED) + 1, grid.length, 8) for _ in range(3)]  # ran silently: head 5 zeros
    with pytest.raises(ValueError, match=f"expected {len(MIXED)} heads over {grid.length} tokens"):
        layer(*more_heads)
    shorter = [t[:, :, :-16] for t in right]  # one frame fewer than the grid
    with pytest.raises(ValueError, match=f"expected {len(MIXED)} heads over {grid.length} tokens"):
        layer(*shorter)
    with pytest.raises(ValueError, match="of one shape"):
        layer(right[0], right[1][:, :, :-16], right[2])


def test_bad_config_fields_are_refused_with_what_is_allowed():
    plan = make_plan([MIXED])
    with pytest.raises(TypeError, match=r"block_size must be an int .* got 32.0 \(float\)"):
        SparseAttentionConfig(plan=plan, block_size=32.0)
    with pytest.raises(ValueError, match="power of two >= 16"):
        SparseAttentionConfig(plan=plan, block_size=24)
    assert SparseAttentionConfig(plan=plan, block_size=32).block_size == 32


def test_sink_frames_outside_a_smaller_grid_are_dropped_with_one_warning(caplog):
    from accel.sparse.patterns import _say_sinks_dropped

    _say_sinks_dropped.cache_clear()
    model = WAN.build()
    with_sink = HeadPattern(windows=((0, 1, 1),), sink_frames=(0, 3))  # frame 3: a plan made for 4 frames or more
    without = HeadPattern(windows=((0, 1, 1),), sink_frames=(0,))

    def forward(pattern, frames):
        latents = torch.randn(1, 4, frames, 8, 8, generator=torch.Generator().manual_seed(0))
        kwargs = WAN.forward_kwargs(latents, WAN.conditions([3]), torch.full((1,), 500.0))
        with accel.apply(model, SparseAttentionConfig(plan=uniform_plan(model, pattern))) as handle:
            out = WAN.output(model(**kwargs))
            assert handle.stats().grids == (TokenGrid(frames, 4, 4),)
        return out

    def dropped():
        return [r for r in caplog.records if "sink frames [3] lie outside a grid of 2 frames" in r.getMessage()]

    with caplog.at_level("WARNING", logger="accel.sparse"):
        at_four = forward(with_sink, 4)  # the sink exists: no warning, and it is attended
        assert not dropped()
        assert (at_four - forward(without, 4)).abs().max() > 1e-3
        at_two = forward(with_sink, 2)
        assert len(dropped()) == 1
        forward(with_sink, 2)
        assert len(dropped()) == 1  # said once
    assert (at_two - forward(without, 2)).abs().max() < 1e-6  # dropped: the plan without that sink
    assert density(with_sink, TokenGrid(2, 4, 4)) == density(without, TokenGrid(2, 4, 4))


def test_plans_round_trip_and_describe_themselves(tmp_path):
    plan = make_plan([MIXED, MIXED[::-1]], model_class="Toy", metrics={"psnr": 30.0})
    path = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    assert layer_patterns(loaded) == [MIXED, MIXED[::-1]]
    assert describe_plan(loaded)["dense"] == 2
    grid = TokenGrid(2, 4, 4)
    assert plan_density(loaded, grid) == pytest.approx(sum(density(p, grid) for p in MIXED) / len(MIXED))


def _wan_forward(model, batch: int = 2):
    kwargs = WAN.inputs(batch, 500.0, torch.Generator().manual_seed(1), prompt_seed=[3, 4][:batch])
    return WAN.output(model(**kwargs))


def test_a_dense_plan_is_bit_identical_and_a_skip_plan_changes_what_it_should():
    model = WAN.build()
    before = _wan_forward(model)
    with accel.apply(model, SparseAttentionConfig(plan=uniform_plan(model, HeadPattern.dense()))) as handle:
        assert torch.equal(_wan_forward(model), before)
        assert [p for p in handle.patches() if p.technique == "sparse_attention"] == []
    everything = HeadPattern(windows=((None, None, None),))  # sparse, but it sees every key: through the kernels
    with accel.apply(model, SparseAttentionConfig(plan=make_plan([[HeadPattern.dense(), everything]] * 2))) as handle:
        assert (_wan_forward(model) - before).abs().max() < 1e-5
        assert handle.stats().sparse_calls == 2
    processors = [m.processor for _, m in sparse_layers(model)]
    local = uniform_plan(model, HeadPattern(windows=((0, 1, 1),)))
    with accel.apply(model, SparseAttentionConfig(plan=local)) as handle:
        sparse = _wan_forward(model)
        stats = handle.stats()
    assert stats.sparse_calls == 2 and stats.passthrough_calls == 0 and stats.grids == (TokenGrid(2, 4, 4),)
    assert not torch.equal(sparse, before)
    assert [m.processor for _, m in sparse_layers(model)] == processors  # undone exactly
    assert torch.equal(_wan_forward(model), before)


def test_sparse_wan_equals_a_reference_built_from_the_same_patterns():
    """The processor's computation, checked against the reference kernel run through the same processor."""
    model = WAN.build()
    plan = make_plan([MIXED[:2], MIXED[2:4]], model_class="WanTransformer3DModel")
    with accel.apply(model, SparseAttentionConfig(plan=plan)):
        flex = _wan_forward(model)
    with accel.apply(model, SparseAttentionConfig(plan=plan, backend="reference")):
        ref = _wan_forward(model)
    assert (flex - ref).abs().max() < 1e-4


def test_a_plan_for_another_model_is_refused_before_anything_changes():
    model = WAN.build()
    plan = make_plan([[HeadPattern.skip()] * 3] * 2)
    with pytest.raises(ValueError, match="has 3 head patterns but the model has 2 heads"):
        accel.apply(model, SparseAttentionConfig(plan=plan))
    with pytest.raises(ValueError, match="covers 1 attention layers"):
        accel.apply(model, SparseAttentionConfig(plan=make_plan([[HeadPattern.skip()] * 2])))
    assert all(type(m.processor).__name__ == "WanAttnProcessor" for _, m in sparse_layers(model))
    with pytest.raises(ValueError, match="not a sparse-attention plan"):
        accel.apply(model, SparseAttentionConfig(plan=fora(layout_of(model), 10, 2).to_plan()))


def test_sparse_and_caching_compose_in_one_apply():
    model = WAN.build()
    plan = SparseAttentionConfig(plan=uniform_plan(model, HeadPattern(windows=((0, None, None),))))
    cache = CacheConfig(schedule=fora(layout_of(model), 6, 2))  # every other step reuses the cached features

    def run(*configs):
        with accel.apply(model, *configs):
            return denoise(model, WAN, [1], steps=6, cfg=False)

    plain, cache_only, sparse_only = denoise(model, WAN, [1], steps=6, cfg=False), run(cache), run(plan)
    with accel.apply(model, cache, plan) as handle:
        both = denoise(model, WAN, [1], steps=6, cfg=False)
        assert {"sparse_attention", "caching"} <= {p.technique for p in handle.patches()}
        assert sum(handle[CacheConfig].stats().reused.values()) > 0
        assert handle[SparseAttentionConfig].stats().sparse_calls > 0
    caching_error = ((cache_only - plain).norm() / plain.norm()).item()
    assert caching_error > 1e-4  # the cache really reused, and it costs this much on the dense model
    # on the sparse model it costs about as much: composing neither hides nor amplifies either technique
    composed_error = ((both - sparse_only).norm() / sparse_only.norm()).item()
    assert caching_error / 2 <= composed_error <= 2 * caching_error, (composed_error, caching_error)


@pytest.mark.parametrize(
    ("dense_steps", "new_frames"),
    [(0, 2), (1, 4)],  # per block: the sparse processor; with dense first steps, also their pass-through
)
def test_sparse_under_compile_recompiles_a_bounded_number_of_times_and_matches_eager(dense_steps, new_frames):
    torch._dynamo.reset()
    model = WAN.build()
    plan = uniform_plan(model, HeadPattern(windows=((0, 1, 1),), sink_frames=(0,)), dense_steps=dense_steps)
    with accel.apply(model, SparseAttentionConfig(plan=plan)):
        eager = denoise(model, WAN, [1, 2], steps=3, cfg=False)
    counter = CompileCounter()
    accel.compile_blocks(model, backend=counter)
    denoise(model, WAN, [1, 2], steps=3, cfg=False)
    plain = counter.frame_count
    with accel.apply(model, SparseAttentionConfig(plan=plan)):
        compiled = denoise(model, WAN, [1, 2], steps=3, cfg=False)
        after_three = counter.frame_count
        denoise(model, WAN, [1, 2], steps=6, cfg=False)
    assert after_three - plain <= new_frames
    assert counter.frame_count == after_three  # and never again, whatever the step count
    assert (compiled - eager).abs().max() < 1e-4


@pytest.mark.slow
def test_many_layer_variants_all_run_compiled_flex():
    import warnings

    from accel.sparse.kernels import FLEX_RECOMPILE_LIMIT, LayerAttention

    grid = TokenGrid(4, 8, 8)
    patterns = [
        HeadPattern(windows=((1, 2, 2),)),
        HeadPattern(windows=((None, 1, 1), (1, None, None))),
        HeadPattern(windows=((0, None, None),), sink_frames=(0,)),
    ]
    variants = [(batch, heads, p) for batch in (1, 2) for heads in (1, 2, 3) for p in patterns]  # 18 > 8
    assert len(variants) <= FLEX_RECOMPILE_LIMIT
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch, heads, pattern in variants:
            q, k, v = (torch.randn(batch, heads, grid.length, 16) for _ in range(3))
            LayerAttention([pattern] * heads, grid, "cpu", "flex")(q, k, v)
    assert not [w for w in caught if "without torch.compile" in str(w.message)], "flex fell back to eager"


def test_a_plan_applied_again_reuses_its_layers_launches():
    model = WAN.build()
    plan = uniform_plan(model, HeadPattern(windows=((0, 1, 1),), sink_frames=(0,)))
    kernels = []
    for _ in range(2):
        with accel.apply(model, SparseAttentionConfig(plan=plan)) as handle:
            denoise(model, WAN, [1], steps=2, cfg=False)
            (built,) = handle[SparseAttentionConfig]._kernels.values()
            assert all(kernel.block_density() is not None for kernel in built)  # a sparse launch was built
            kernels.append(built)
    assert all(a is b for a, b in zip(*kernels, strict=True))


def test_dense_first_steps_run_the_original_attention_and_count_in_the_mean_density(tmp_path):
    model = WAN.build()
    plain = denoise(model, WAN, [1], steps=3, cfg=False)
    local = HeadPattern(windows=((0, 1, 1),))
    with accel.apply(model, SparseAttentionConfig(plan=uniform_plan(model, local, dense_steps=3))) as handle:
        assert torch.equal(denoise(model, WAN, [1], steps=3, cfg=False), plain)  # every step dense
        assert handle.stats().sparse_calls == 0 and handle.stats().dense_step_calls == 3
    plan = Plan.load(uniform_plan(model, local, dense_steps=1).save(tmp_path / "p.json"))
    assert plan_dense_steps(plan) == 1
    with accel.apply(model, SparseAttentionConfig(plan=plan)) as handle:
        one_dense = denoise(model, WAN, [1], steps=3, cfg=False)
        stats = handle.stats()
    with accel.apply(model, SparseAttentionConfig(plan=plan, dense_steps=0)):  # the config overrides the plan
        none_dense = denoise(model, WAN, [1], steps=3, cfg=False)
    assert stats.dense_step_calls == 1 and stats.sparse_calls == 2 * 2  # two sparse steps, two layers
    assert stats.mean_density == pytest.approx((1 + 2 * stats.density) / 3)
    assert stats.mean_density == pytest.approx(trajectory_density(plan, stats.grids[0], 3))
    assert not torch.equal(one_dense, none_dense) and not torch.equal(one_dense, plain)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="dense_steps"):
            SparseAttentionConfig(plan=plan, dense_steps=bad)


# --- the search ----------------------------------------------------------------------------------------------------


def test_choose_is_the_exact_optimum_of_the_multiple_choice_program():
    rng = np.random.default_rng(0)
    errors = [rng.random((2, 4)), rng.random((1, 4))]
    densities = np.array([1.0, 0.0, 0.3, 0.6])
    choice = choose(errors, densities, np.zeros(4), target_density=0.5)
    flat = np.concatenate(errors)
    best = min(
        (picks for picks in itertools.product(range(4), repeat=3) if densities[list(picks)].mean() <= 0.5 + 1e-9),
        key=lambda picks: flat[np.arange(3), list(picks)].sum(),
    )
    assert [i for layer in choice.indices for i in layer] == list(best)
    assert choice.density <= 0.5 + 1e-9
    costs = np.array([4.0, 0.0, 1.0, 2.0])
    budget = choose(errors, densities, costs, max_error=flat[:, 0].sum() + 0.5)
    assert budget.error <= flat[:, 0].sum() + 0.5 + 1e-9 and budget.cost_ms < 12.0
    with pytest.raises(ValueError, match="exactly one"):
        choose(errors, densities, costs)
    fast = choose(errors, densities, costs, max_cost=5.0)  # a target speed-up: 12 ms dense over 5 ms
    best = min(
        (picks for picks in itertools.product(range(4), repeat=3) if costs[list(picks)].sum() <= 5.0 + 1e-9),
        key=lambda picks: flat[np.arange(3), list(picks)].sum(),
    )
    assert [i for layer in fast.indices for i in layer] == list(best) and fast.cost_ms <= 5.0 + 1e-9
    with pytest.raises(ValueError, match="one value per candidate"):
        choose(errors, densities[:3], costs, target_density=0.5)
    with pytest.raises(ValueError, match="one value per candidate"):
        choose(errors, densities, costs[:3], max_cost=5.0)


def test_candidates_cover_the_named_pattern_families():
    labels = {p.describe() for p in candidate_patterns(TokenGrid(9, 8, 8))}
    assert {"dense", "skip", "window(0,*,*)", "window(*,1,1)", "window(*,1,1)+window(1,*,*)+sink(0)"} <= labels


def test_the_recorder_scores_a_pattern_that_sees_everything_as_exact_and_skip_as_total_loss():
    grid = TokenGrid(2, 4, 4)
    candidates = [HeadPattern.dense(), HeadPattern(windows=((None, None, None),)), HeadPattern.skip()]
    recorder = ErrorRecorder(candidates, rows=8, active=lambda: True, generator=torch.Generator().manual_seed(0))
    recorder.grid = grid
    q, k, v = (torch.randn(1, 3, grid.length, 8) for _ in range(3))
    recorder(q, k, v)
    errors = recorder.mean_errors()  # (heads, candidates): squared share of the layer's output
    assert np.allclose(errors[:, :2], 0, atol=1e-10)
    assert errors[:, 2].sum() == pytest.approx(1.0, rel=1e-5)  # skipping every head loses the whole output


def test_search_on_a_wan_pipeline_meets_its_density_and_records_its_figures(tmp_path, caplog):
    from eval_helpers import TINY_VIDEO_KWARGS, build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline()
    with pytest.raises(ValueError, match="exactly one"):
        search(pipe, ["a red apple"], steps=2)
    with pytest.raises(ValueError, match="already exceed"):
        search(pipe, ["a red apple"], target_density=0.3, steps=3, dense_steps=1, call_kwargs=TINY_VIDEO_KWARGS)
    plan = search(
        pipe, ["a red apple"], target_density=0.5, steps=3, rows=8, call_kwargs=TINY_VIDEO_KWARGS, dense_steps=1
    )
    grid = TokenGrid(*plan.provenance["grid"][:3])
    assert grid == TokenGrid(3, 4, 4) and plan_dense_steps(plan) == 1
    assert plan_density(plan, grid) <= 0.25 + 1e-9  # one dense step of three: the sparse ones average 0.25
    assert trajectory_density(plan, grid, 3) == pytest.approx(plan.metrics["trajectory_density"])
    assert plan.metrics["trajectory_density"] <= 0.5 + 1e-9
    assert {"psnr", "ssim", "density", "predicted_psnr", "search_seconds"} <= set(plan.metrics)
    # a plan the cost model predicts no faster than dense says so
    slower = plan.metrics["predicted_ms_per_layer"] >= plan.metrics["dense_ms_per_layer"]
    assert slower == any("will not be faster" in record.getMessage() for record in caplog.records)
    dense = run_pipeline(pipe, ["a red apple"], 3, 0, TINY_VIDEO_KWARGS)
    loaded = Plan.load(plan.save(tmp_path / "p.json"))
    assert {k: loaded.metrics[k] for k in ("psnr", "ssim")} == {k: plan.metrics[k] for k in ("psnr", "ssim")}
    with accel.apply(pipe, SparseAttentionConfig(plan=loaded)):
        again = run_pipeline(pipe, ["a red apple"], 3, 0, TINY_VIDEO_KWARGS)
    assert compare_to_dense(again, dense)["psnr"] == pytest.approx(plan.metrics["psnr"], abs=1e-3)


def test_search_by_target_speedup_meets_its_predicted_time():
    from eval_helpers import TINY_VIDEO_KWARGS, build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline()
    plan = search(pipe, ["a red apple"], target_speedup=2.0, steps=2, rows=8, call_kwargs=TINY_VIDEO_KWARGS)
    metrics = plan.metrics
    assert metrics["predicted_ms_per_layer"] <= metrics["dense_ms_per_layer"] / 2 + 1e-9  # no dense steps
    assert metrics["predicted_attention_speedup"] is None or metrics["predicted_attention_speedup"] >= 2 - 1e-9
    assert plan.provenance["target_speedup"] == 2.0 and 0 < metrics["psnr"] < 100


def test_search_by_min_psnr_meets_its_predicted_psnr():
    from eval_helpers import TINY_VIDEO_KWARGS, build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline()
    plan = search(pipe, ["a red apple"], min_psnr=20.0, steps=2, rows=8, call_kwargs=TINY_VIDEO_KWARGS)
    assert plan.metrics["predicted_psnr"] >= 20.0 - 1e-6 and plan.provenance["min_psnr"] == 20.0


@pytest.mark.parametrize(
    ("goal", "message"),
    [
        ({"target_speedup": 1.0}, "target_speedup must be a finite number above 1"),
        ({"target_speedup": float("inf")}, "target_speedup must be a finite number above 1"),
        ({"target_speedup": float("nan")}, "target_speedup must be a finite number above 1"),
        ({"target_speedup": 4.0, "dense_steps": 1}, "no plan reaches that speed-up"),  # 1 of 3 steps > 1/4
        ({"min_psnr": 0.0}, "min_psnr must be a finite number of dB above 0"),
        ({"min_psnr": float("nan")}, "min_psnr must be a finite number of dB above 0"),
        ({"min_psnr": 20.0, "target_speedup": 2.0}, "exactly one"),
    ],
)
def test_search_refuses_a_bad_goal_before_any_compute(goal, message, monkeypatch):
    import accel.sparse.offline as offline

    def no_compute(*args, **kwargs):
        raise AssertionError("computed before checking its arguments")

    monkeypatch.setattr(offline, "grid_of_call", no_compute)
    with pytest.raises(ValueError, match=message):
        search(WAN.build(), ["a red apple"], steps=3, **goal)


def test_search_on_a_model_with_no_layer_to_sparsify_says_so():
    with pytest.raises(ValueError, match="no self- or joint-attention layer .* nothing for a sparse-attention plan"):
        search(TINY_MODELS["sana"].build(), ["a red apple"], target_density=0.5, steps=2)


def test_accel_search_technique_sparse_writes_a_plan_that_loads(tmp_path):
    import json

    from eval_helpers import TINY_VIDEO_KWARGS, build_tiny_wan_pipeline

    from accel.cli import main

    build_tiny_wan_pipeline().save_pretrained(tmp_path / "wan")
    argv = ["search", "--technique", "sparse", "--model", str(tmp_path / "wan"), "--target-density", "0.5"]
    argv += ["--steps", "2", "--rows", "8", "--out", str(tmp_path / "plan.json")]
    argv += ["--pipeline-kwargs", json.dumps(TINY_VIDEO_KWARGS)]
    assert main(argv) == 0
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.model_class == "WanTransformer3DModel" and plan.metrics["density"] <= 0.5 + 1e-9
    assert main(["search", "--technique", "pruning", "--out", "x"]) == 2
    for bad in (["--target-speedup", "1"], ["--min-psnr", "nan"]):  # refused before the model loads
        bad_argv = [a for a in argv if a not in ("--target-density", "0.5")] + bad
        bad_argv[bad_argv.index("--out") + 1] = str(tmp_path / "bad.json")
        assert main(bad_argv) == 1 and not (tmp_path / "bad.json").exists()
    fast_argv = [a for a in argv if a not in ("--target-density", "0.5")] + ["--target-speedup", "2"]
    fast_argv[fast_argv.index("--out") + 1] = str(tmp_path / "fast.json")
    assert main(fast_argv) == 0
    fast = Plan.load(tmp_path / "fast.json")
    assert fast.provenance["target_speedup"] == 2.0
    assert fast.metrics["predicted_ms_per_layer"] <= fast.metrics["dense_ms_per_layer"] / 2 + 1e-9


# frames of 32 tokens, blocks of 32: a window over whole frames visits whole (full) tiles
ALIGNED = TokenGrid(4, 4, 8)
SLICED = [
    HeadPattern(windows=((0, None, None),)),  # one run per query frame
    HeadPattern(windows=((1, None, None),), sink_frames=(-1,)),  # two runs for the first frames
    HeadPattern.skip(),
    HeadPattern(windows=((1, None, None),)),
    HeadPattern(windows=((None, 1, 1),)),  # partial tiles: FlexAttention's rows
    HeadPattern(),  # sees no key: zeros
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_bytes", [64 << 20, 0])  # partial tiles: masked SDPA, or FlexAttention
def test_runs_backend_slices_whole_tiles_and_meets_the_reference_bound(dtype, mask_bytes, monkeypatch):
    monkeypatch.setattr(accel.sparse.runs, "MASK_BYTES", mask_bytes)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, len(SLICED), ALIGNED.length, 16, generator=generator) for _ in range(3))
    ref = reference_attention(q, k, v, SLICED, ALIGNED)
    low = [t.to(dtype) for t in (q, k, v)]
    ref_low_err = (reference_attention(*low, SLICED, ALIGNED).float() - ref).abs().max()
    kernel = LayerAttention(SLICED, ALIGNED, backend="runs", block_size=32)
    out = kernel(*low).float()
    assert (out - ref).abs().max() <= 2 * ref_low_err + 1e-5
    assert out[:, 2].abs().max() == 0 and out[:, 5].abs().max() == 0  # skip head; a head that sees nothing
    # the launch holds the sparse heads 0, 1, 3, 4, 5 as 0..4; head 0's four frames step along together: a group
    assert [(g.heads, g.count, g.key_step) for g in kernel.launch.groups] == [((0, 1), 4, 32)]
    calls = kernel.launch.calls + kernel.launch.groups[0].calls()
    assert {call.heads for call in calls} >= {(0, 1), (1, 3)}  # heads 1 and 3 share the middle frames' runs
    assert any(len(call.keys) == 2 for call in calls)  # the sink: two runs, concatenated
    masked = [call.heads for call, mask in zip(calls, kernel.launch.masks) if mask is not None]
    if mask_bytes:  # the spatial window's rows: SDPA with a mask, the frame windows' without
        assert kernel.launch.block_mask is None and set(masked) == {(3, 4)}
    else:
        assert kernel.launch.block_mask is not None and not masked


def test_slice_calls_merge_query_blocks_and_heads_that_share_their_runs():
    full = torch.zeros(3, 4, 4, dtype=torch.bool)
    full[:, :2, :2] = True  # every head: query blocks 0-1 see key blocks 0-1
    full[:, 2:, 3] = True  # query blocks 2-3 see key block 3 ...
    full[1, 2:, 0] = True  # ... and head 1 also block 0
    flex = torch.zeros(3, 4, dtype=torch.bool)
    flex[2, 3] = True  # head 2's last query block: FlexAttention's
    calls = set(slice_calls(full, flex, block=16, length=60))
    assert calls == {
        SliceCall((0, 3), (0, 32), ((0, 32),)),
        SliceCall((0, 1), (32, 60), ((48, 60),)),  # clipped to the length
        SliceCall((1, 2), (32, 60), ((0, 16), (48, 60))),
        SliceCall((2, 3), (32, 48), ((48, 60),)),
    }


def test_group_calls_batches_calls_that_step_along_the_sequence_together():
    def call(heads, q0, k0, k1, q_len=16):
        return SliceCall(heads, (q0, q0 + q_len), ((k0, k1),))

    window = [call((0, 2), 16 * i, max(0, 16 * i - 16), min(96, 16 * i + 32)) for i in range(6)]  # a frame window
    other = [call((2, 3), 0, 0, 32), call((2, 3), 16, 16, 48)]  # two in step: fewer than three
    masked = [call((3, 4), 16 * i, 16 * i, 16 * i + 32) for i in range(4)]
    calls = window + other + masked
    groups, rest = group_calls(calls, [False] * 8 + [True] * 4)
    # the first and last frame see fewer keys: left as calls; the four in between step by one frame
    assert groups == [CallGroup((0, 2), 16, 16, 0, 48, 16, 4)]
    assert groups[0].calls() == window[1:5]
    assert [index for _, index in rest] == [0, 5, 6, 7, 8, 9, 10, 11]


def test_runs_backend_compiles_to_one_graph_without_recompiles():
    kernel = LayerAttention(SLICED, ALIGNED, backend="runs", block_size=32)
    counter = CompileCounter()
    compiled = torch.compile(kernel.__call__, backend=counter, fullgraph=True)
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, len(SLICED), ALIGNED.length, 16, generator=generator) for _ in range(3))
        assert (compiled(q, k, v) - kernel(q, k, v)).abs().max() < 1e-5
    assert counter.frame_count == 1


def test_tile_densities_split_unmasked_and_masked_rows_and_the_cost_model_prices_both():
    frames, spatial = HeadPattern(windows=((0, None, None),)), HeadPattern(windows=((None, 1, 1),))
    tiles = tile_densities([HeadPattern.dense(), HeadPattern.skip(), frames, spatial], ALIGNED, block_size=32)
    assert tiles.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.25, 0.0], [0.0, 1.0]]  # 1 frame of 4; every tile partial
    cost = fit_cost_model(ALIGNED, heads=2, head_dim=16, repeats=1)
    assert {(full > 0, partial > 0) for full, partial, _ in cost.points} == {(True, False), (False, True)}
    assert cost.head_cost(HeadPattern.skip(), (0.0, 0.0)) == 0 and cost.head_cost(HeadPattern.dense(), (1, 0)) > 0
    assert cost.head_cost(HeadPattern.dense(), (1.0, 0.0)) == cost.dense_head
    plane = cost.sparse_head_fixed + 0.25 * cost.per_full_row_density + 0.5 * cost.per_partial_row_density
    assert cost.head_cost(frames, (0.25, 0.5)) == pytest.approx(plane)


def test_runs_backend_masked_calls_take_sdpas_fused_kernel_not_the_math_path():
    kernel = LayerAttention(SLICED, ALIGNED, backend="runs", block_size=32)
    assert any(mask is not None for mask in kernel.launch.masks)
    q, k, v = (torch.randn(1, len(SLICED), ALIGNED.length, 16) for _ in range(3))
    with torch.profiler.profile() as profiler:
        kernel(q, k, v)
    ops = {event.name for event in profiler.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_softmax" not in ops  # a 3-D mask sent masked calls to the unfused math path (4x slower)
