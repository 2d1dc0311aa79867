"""Pattern-based sparse attention (Sparse-vDiT): per layer and head, a pattern in token-layout terms (dense,
skip, window over frames/rows/columns, sink-frame stripes, their union), chosen offline and run through a
fallback chain of kernels.

    plan = accel.sparse.uniform_plan(pipe.transformer, HeadPattern(windows=((1, None, None),)))
    with accel.apply(pipe, accel.sparse.SparseAttentionConfig(plan=plan)) as handle:
        video = pipe(prompt).frames
    print(handle.stats())
"""

from accel.sparse.apply import SparseAttentionConfig, SparseHandle, SparseStats
from accel.sparse.end_to_end import check_plans
from accel.sparse.kernels import LayerAttention
from accel.sparse.offline import best_uniform_plan, search
from accel.sparse.patterns import HeadPattern, TokenGrid, density
from accel.sparse.plan import (
    check_plan,
    describe_plan,
    layer_patterns,
    make_plan,
    plan_dense_steps,
    plan_density,
    sparse_layers,
    trajectory_density,
    uniform_plan,
)
from accel.sparse.reference import reference_attention

__all__ = [
    "HeadPattern",
    "LayerAttention",
    "SparseAttentionConfig",
    "SparseHandle",
    "SparseStats",
    "TokenGrid",
    "best_uniform_plan",
    "check_plans",
    "check_plan",
    "density",
    "describe_plan",
    "layer_patterns",
    "make_plan",
    "plan_dense_steps",
    "plan_density",
    "reference_attention",
    "search",
    "sparse_layers",
    "trajectory_density",
    "uniform_plan",
]
