"""Sparse attention: patterns against hand-counted masks, every kernel against the float32 reference, plans as
data, and the technique on a Wan transformer (exact when dense, within a bound when sparse, undone exactly,
composing with caching and torch.compile)."""

from __future__ import annotations

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
    plan_density,
    reference_attention,
    sparse_layers,
    uniform_plan,
)
from accel.sparse.patterns import dense_mask

WAN = TINY_MODELS["wan"]

MIXED = [
    HeadPattern.dense(),
    HeadPattern(window=(0, None, None)),
    HeadPattern.skip(),
    HeadPattern(window=(None, 1, 1), sink_frames=(0,)),
    HeadPattern(),
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_window_mask_matches_a_hand_count():
    grid = TokenGrid(2, 2, 3)  # 12 tokens: frame 0 = 0..5, frame 1 = 6..11
    mask = dense_mask([HeadPattern(window=(0, 0, 1))], grid)[0]
    # token 4 = frame 0, row 1, column 1: sees columns 0..2 of row 1 in frame 0 only
    assert mask[4].nonzero().flatten().tolist() == [3, 4, 5]
    sink = dense_mask([HeadPattern(sink_frames=(-1,))], grid)[0]
    assert sink[0].nonzero().flatten().tolist() == list(range(6, 12))


def test_text_tokens_always_see_and_are_seen():
    grid = TokenGrid(2, 2, 2, text=3, text_first=True)
    mask = dense_mask([HeadPattern(window=(0, 0, 0))], grid)[0]
    assert mask[:3].all() and mask[:, :3].all()
    assert mask[3:, 3:].sum() == 8  # each visual token sees itself only


@pytest.mark.parametrize(
    "pattern", [HeadPattern(window=(1, 2, None)), HeadPattern(window=(0, 1, 1), sink_frames=(0, -1))]
)
@pytest.mark.parametrize("grid", [TokenGrid(3, 4, 5), TokenGrid(4, 3, 2, text=4, text_first=False)])
def test_density_is_counted_exactly(pattern, grid):
    assert density(pattern, grid) == pytest.approx(dense_mask([pattern], grid).double().mean().item(), abs=1e-6)


def test_bad_patterns_are_refused():
    with pytest.raises(ValueError, match="half-widths"):
        HeadPattern(window=(1, -1, None))
    with pytest.raises(ValueError, match="takes no window"):
        HeadPattern(kind="dense", window=(1, 1, 1))
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
    everything = HeadPattern(window=(None, None, None))  # sparse kind, but it sees every key: through the kernels
    with accel.apply(model, SparseAttentionConfig(plan=make_plan([[HeadPattern.dense(), everything]] * 2))) as handle:
        assert (_wan_forward(model) - before).abs().max() < 1e-5
        assert handle.stats().sparse_calls == 2
    processors = [m.processor for _, m in sparse_layers(model)]
    with accel.apply(model, SparseAttentionConfig(plan=uniform_plan(model, HeadPattern(window=(0, 1, 1))))) as handle:
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
    plan = uniform_plan(model, HeadPattern(window=(0, None, None)))
    with accel.apply(model, SparseAttentionConfig(plan=plan)):
        sparse_only = denoise(model, WAN, [1], steps=6, cfg=False)
    with accel.apply(model, CacheConfig(schedule=fora(layout_of(model), 6, 1)), SparseAttentionConfig(plan=plan)) as h:
        both = denoise(model, WAN, [1], steps=6, cfg=False)
        names = [p.technique for p in h.patches()]
    assert "sparse_attention" in names and "caching" in names
    assert torch.equal(both, sparse_only)  # interval-1 caching computes everything


def test_sparse_under_compile_adds_no_frames_and_matches_eager():
    torch._dynamo.reset()
    model = WAN.build()
    plan = uniform_plan(model, HeadPattern(window=(0, 1, 1), sink_frames=(0,)))
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
    assert after_three - plain <= 2  # the blocks recompile once for the sparse processors
    assert counter.frame_count == after_three  # and never again, whatever the step count
    assert (compiled - eager).abs().max() < 1e-4
