"""Sparse-attention plans: one :class:`~accel.sparse.patterns.HeadPattern` per layer and head, as a core
:class:`~accel.plan.Plan`.

The plan's ``"pattern"`` channel runs over ``("block", "head")``: entry ``[layer, head]`` indexes the pattern
table ``settings["patterns"]`` (pattern dicts). ``block`` counts the model's sparsifiable attention layers
(self- and joint attention with a softmax kernel, in execution order: :func:`sparse_layers`), so a plan made
for one model checks against another before anything is patched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from accel.adapters import ModelSpec, spec_for
from accel.geometry import AttentionGeometry
from accel.plan import Plan
from accel.sparse.patterns import HeadPattern, TokenGrid, density

#: ``Plan.settings["technique"]`` of a sparse-attention plan
TECHNIQUE = "sparse_attention"


def sparse_layers(
    transformer: torch.nn.Module, spec: ModelSpec | None = None
) -> list[tuple[AttentionGeometry, torch.nn.Module]]:
    """The attention modules a sparse plan covers, in execution order, with their geometry: every self- or
    joint-attention component with a softmax kernel."""
    spec = spec_for(transformer, spec)
    layers, index = [], {}
    for stack, block in spec.block_list(transformer):
        position = index[stack.path] = index.get(stack.path, -1) + 1
        for component in stack.components:
            module = getattr(block, component.module, None)
            if component.kind != "attention" or component.attention == "cross" or component.kernel != "softmax":
                continue
            if module is None:
                continue
            heads = int(getattr(module, component.heads_attr))
            geometry = AttentionGeometry(
                stack=stack.path,
                block=position,
                component=component.name,
                attention=component.attention,
                heads=heads,
                head_dim=int(getattr(module, component.inner_dim_attr)) // heads,
            )
            layers.append((geometry, module))
    return layers


def make_plan(
    patterns: Sequence[Sequence[HeadPattern]],
    model_class: str | None = None,
    provenance: dict | None = None,
    metrics: dict | None = None,
    dense_steps: int = 0,
) -> Plan:
    """A plan from one list of head patterns per layer, whose first ``dense_steps`` denoising steps run dense
    attention (the steps that lay out the picture: sparse errors there carry through every later step)."""
    if not patterns or any(not layer for layer in patterns):
        raise ValueError("a sparse plan needs at least one layer, each with at least one head")
    _check_dense_steps(dense_steps)
    table: list[HeadPattern] = []
    heads = max(len(layer) for layer in patterns)
    values = np.full((len(patterns), heads), -1, dtype=np.int64)
    for layer, layer_patterns in enumerate(patterns):
        for head, pattern in enumerate(layer_patterns):
            if pattern not in table:
                table.append(pattern)
            values[layer, head] = table.index(pattern)
    return Plan(
        sizes={"block": len(patterns), "head": heads},
        channels={},
        model_class=model_class,
        settings={"technique": TECHNIQUE, "patterns": [p.to_dict() for p in table], "dense_steps": dense_steps},
        provenance=provenance or {},
        metrics=metrics or {},
    ).with_channel("pattern", ("block", "head"), values)


def _check_dense_steps(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"dense_steps must be an integer >= 0, got {value!r}")
    return value


def plan_dense_steps(plan: Plan) -> int:
    """How many first denoising steps ``plan`` runs dense (0 for plans saved before the setting existed)."""
    return _check_dense_steps(plan.settings.get("dense_steps", 0))


def layer_patterns(plan: Plan) -> list[list[HeadPattern]]:
    """The head patterns of every layer of ``plan`` (inverse of :func:`make_plan`).

    Raises:
        ValueError: ``plan`` is not a sparse-attention plan.
    """
    if plan.settings.get("technique") != TECHNIQUE or "pattern" not in plan.channels:
        raise ValueError(
            f"not a sparse-attention plan (settings technique {plan.settings.get('technique')!r}, channels "
            f"{sorted(plan.channels)}); make one with accel.sparse.make_plan or accel.sparse.search"
        )
    table = [HeadPattern.from_dict(d) for d in plan.settings["patterns"]]
    values = plan.channel("pattern")
    if values.max() >= len(table):
        raise ValueError(f"the plan's pattern channel indexes {values.max()} of a table of {len(table)} patterns")
    return [[table[i] for i in row if i >= 0] for row in values]


def uniform_plan(
    transformer: torch.nn.Module, pattern: HeadPattern, spec: ModelSpec | None = None, dense_steps: int = 0
) -> Plan:
    """The same ``pattern`` for every head of every sparsifiable layer of ``transformer`` (after the first
    ``dense_steps`` steps, which run dense)."""
    layers = sparse_layers(transformer, spec)
    if not layers:
        raise ValueError(f"{type(transformer).__name__} has no self- or joint-attention layer to sparsify")
    return make_plan(
        [[pattern] * geometry.heads for geometry, _ in layers],
        model_class=type(transformer).__name__,
        provenance={"made_by": "uniform_plan", "pattern": pattern.to_dict()},
        dense_steps=dense_steps,
    )


def plan_density(plan: Plan | Sequence[Sequence[HeadPattern]], grid: TokenGrid) -> float:
    """The mean over layers and heads of the fraction of (query, key) pairs computed on ``grid``."""
    patterns = layer_patterns(plan) if isinstance(plan, Plan) else plan
    values = [density(p, grid) for layer in patterns for p in layer]
    return float(np.mean(values))


def trajectory_density(
    plan: Plan | Sequence[Sequence[HeadPattern]], grid: TokenGrid, steps: int, dense_steps: int | None = None
) -> float:
    """The attention density averaged over a ``steps``-step trajectory: the first ``dense_steps`` steps (default:
    the plan's) count as 1, the others as :func:`plan_density`."""
    if dense_steps is None:
        dense_steps = plan_dense_steps(plan) if isinstance(plan, Plan) else 0
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dense = min(dense_steps, steps)
    return (dense + (steps - dense) * plan_density(plan, grid)) / steps


def check_plan(plan: Plan, transformer: torch.nn.Module, spec: ModelSpec | None = None) -> list[list[HeadPattern]]:
    """The plan's layer patterns, after checking that they fit ``transformer`` layer by layer.

    Raises:
        ValueError: the plan has another number of layers, or a layer another number of heads.
    """
    patterns = layer_patterns(plan)
    layers = sparse_layers(transformer, spec)
    if len(patterns) != len(layers):
        raise ValueError(
            f"the sparse plan covers {len(patterns)} attention layers but {type(transformer).__name__} has "
            f"{len(layers)} (plan made for {plan.model_class or 'an unnamed model'})"
        )
    for index, (layer, (geometry, _)) in enumerate(zip(patterns, layers, strict=True)):
        if len(layer) != geometry.heads:
            raise ValueError(
                f"sparse plan layer {index} ({geometry.stack}[{geometry.block}].{geometry.component}) has "
                f"{len(layer)} head patterns but the model has {geometry.heads} heads"
            )
    return patterns


def describe_plan(plan: Plan) -> dict[str, Any]:
    """Counts of each pattern label over all heads, e.g. ``{"dense": 40, "window(0,*,*)": 8}``."""
    counts: dict[str, int] = {}
    for layer in layer_patterns(plan):
        for pattern in layer:
            counts[pattern.describe()] = counts.get(pattern.describe(), 0) + 1
    return counts
