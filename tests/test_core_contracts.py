"""The contract every registered technique meets, checked on the core's own toy techniques (one per phase) and
on every real technique: apply then remove is bit-identical, applying twice is refused, reset restores step-0
behaviour, two techniques compose in phase order, compiled frames stay bounded, and every change is in the
patch log under the technique's name."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from tiny_models import TINY_MODELS, GraphCalls, denoise

import accel
from accel.api import Handle, Target, register, techniques, unregister
from accel.caching import CacheConfig, FirstBlockPolicy, Schedule, TokenStepConfig, fora, layout_of
from accel.quant import QuantConfig
from accel.sparse import HeadPattern, SparseAttentionConfig, uniform_plan

TINY = TINY_MODELS["pixart"]


# -- toy techniques, one per phase ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ToyWeights:
    """Scales the first feed-forward projection's weight of every block (a parameter replacement)."""

    factor: float = 0.9


@dataclass(frozen=True, kw_only=True)
class ToyProcessor:
    """Swaps every self-attention's processor for one that scales its output."""

    factor: float = 0.9


@dataclass(frozen=True, kw_only=True)
class ToyForward:
    """Wraps every feed-forward's forward to scale its output."""

    factor: float = 0.9


class _ScaledProcessor:
    def __init__(self, inner, factor: float):
        self.inner, self.factor = inner, factor

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs) * self.factor


def _components(target: Target, kind: str, attention: str | None = None):
    for stack, block in target.spec.block_list(target.transformer):
        for component in stack.components:
            if component.kind == kind and (attention is None or component.attention == attention):
                yield getattr(block, component.module)


def _apply_weights(target: Target, config: ToyWeights) -> Handle:
    handle = Handle("toy-weights")
    for ffn in _components(target, "ffn"):
        linear = next(m for m in ffn.modules() if isinstance(m, torch.nn.Linear))
        scaled = torch.nn.Parameter(linear.weight.detach() * config.factor, requires_grad=False)
        handle.patch_log.replace_parameter(linear, "weight", scaled)
    return handle


def _apply_processor(target: Target, config: ToyProcessor) -> Handle:
    handle = Handle("toy-processor")
    for attention in _components(target, "attention", "self"):
        handle.patch_log.set_processor(attention, _ScaledProcessor(attention.processor, config.factor))
    return handle


def _apply_forward(target: Target, config: ToyForward) -> Handle:
    handle = Handle("toy-forward")
    for ffn in _components(target, "ffn"):
        handle.patch_log.wrap(ffn, "forward", lambda inner, *a, **k: inner(*a, **k) * config.factor)
    return handle


TOYS = {ToyWeights: ("weights", _apply_weights), ToyProcessor: ("processors", _apply_processor),
        ToyForward: ("forwards", _apply_forward)}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _toys_registered():
    for config_type, (phase, fn) in TOYS.items():
        register(config_type, name=f"toy-{phase}", phase=phase)(fn)
    yield
    for config_type in TOYS:
        unregister(config_type)


#: how to build a config of each registered technique for the tiny model: a technique without an entry here
#: fails test_every_registered_technique_is_under_contract
EXAMPLES = {
    CacheConfig: lambda model: CacheConfig(schedule=fora(layout_of(model), 12, 2)),
    ToyWeights: lambda model: ToyWeights(),
    ToyProcessor: lambda model: ToyProcessor(),
    ToyForward: lambda model: ToyForward(),
    SparseAttentionConfig: lambda model: SparseAttentionConfig(
        plan=uniform_plan(model, HeadPattern(windows=((0, 1, 1),), sink_frames=(0,)))
    ),
    QuantConfig: lambda model: QuantConfig(scheme="int8-dynamic"),
    TokenStepConfig: lambda model: TokenStepConfig(budget=0.5),
}
#: techniques checked on another tiny model than pixart (sparse attention has processors for video models)
MODELS = {"SparseAttentionConfig": TINY_MODELS["wan"], "TokenStepConfig": TINY_MODELS["wan"]}
#: frames a technique may compile beyond the plain compiled blocks: none is needed by a technique that wraps
#: whole blocks; one that wraps a component inside a block splits the block's graph around it (a constant)
EXTRA_FRAMES = {"ToyForward": 4, "TokenStepConfig": 4, "component-reuse": 5}
# (per-token steps: its self-attention processors, and blocks that see all tokens and one or two bucket sizes;
# self-attention reuse: the block before it and after it, for each of the two input layouts, and the attention)
#: extra variants of a technique under contract
VARIANTS = {
    "first-block": lambda model: CacheConfig(schedule=FirstBlockPolicy(threshold=0.2)),
    "component-reuse": lambda model: CacheConfig(schedule=_reusing_self_attention(model)),
}


def _reusing_self_attention(model) -> Schedule:
    """Every block computes, reusing its first component (self-attention) at every other step: a component
    wrapper inside each block."""
    layout = layout_of(model)
    mask = np.ones((12, layout.num_blocks, len(layout.components)), dtype=bool)
    mask[1::2, :, 0] = False
    return Schedule(mask=mask, components=layout.components)


def _configs():
    techniques = (*TOYS, CacheConfig, SparseAttentionConfig, QuantConfig, TokenStepConfig)
    return {**{t.__name__: EXAMPLES[t] for t in techniques}, **VARIANTS}


def _state(model: torch.nn.Module) -> dict:
    """Everything a technique may change: instance attributes, parameter objects, processors."""
    return {
        name: (dict(module.__dict__.get("_parameters", {})), {k: v for k, v in module.__dict__.items()
               if not k.startswith("_") and k != "training"}, getattr(module, "processor", None))
        for name, module in model.named_modules()
    }  # fmt: skip


def _run(model, tiny=TINY, steps: int = 12) -> torch.Tensor:
    return denoise(model, tiny, [1, 2], steps=steps, cfg=True)


def _tiny(name: str):
    """The tiny model a technique is checked on (the pixart one unless the technique needs another family)."""
    return MODELS.get(name, TINY)


def test_every_registered_technique_is_under_contract():
    missing = [t.config_type.__name__ for t in techniques() if t.config_type not in EXAMPLES]
    assert not missing, f"add a contract example for {missing}"


@pytest.mark.parametrize("name", list(_configs()))
def test_apply_then_remove_restores_every_object_and_bit_identical_outputs(name):
    tiny = _tiny(name)
    model = tiny.build()
    before, reference = _state(model), _run(model, tiny)
    handle = accel.apply(model, _configs()[name](model))
    changed = _run(model, tiny)
    assert handle.patches(), "a technique that changes nothing is a silent no-op"
    technique = next(iter(handle.parts.values())).patch_log.technique
    assert {record.technique for record in handle.patches()} == {"core", technique}
    assert [r.name for r in handle.patches() if r.technique == "core"] == ["forward"]  # the step tracker
    handle.remove()
    assert not torch.equal(changed, reference), "the technique should change the output"
    assert _state(model) == before
    assert torch.equal(_run(model, tiny), reference)
    assert handle.patches() == [] and handle.removed
    handle.remove()  # idempotent


@pytest.mark.parametrize("name", list(_configs()))
def test_applying_the_same_technique_twice_is_refused_and_leaves_the_first(name):
    tiny = _tiny(name)
    model = tiny.build()
    config = _configs()[name](model)
    with accel.apply(model, config):
        expected = _run(model, tiny)
        with pytest.raises(ValueError, match="already applied"):
            accel.apply(model, config)
        assert torch.equal(_run(model, tiny), expected)


@pytest.mark.parametrize("name", list(_configs()))
def test_reset_restores_step_zero_behaviour(name):
    tiny = _tiny(name)
    model = tiny.build()
    with accel.apply(model, _configs()[name](model)) as handle:
        first = _run(model, tiny)
        denoise(model, tiny, [3], steps=5, cfg=False)  # leave state behind from another trajectory
        handle.reset()
        assert torch.equal(_run(model, tiny), first)


#: two techniques of the weights phase have no order between them (quantizing a scaled weight is not scaling a
#: quantized one); quantization composes with the other phases in tests/test_quant.py
@pytest.mark.parametrize("name", [n for n in _configs() if n not in ("ToyWeights", "QuantConfig")])
def test_two_techniques_compose_in_phase_order_whatever_the_argument_order(name):
    tiny = _tiny(name)
    model = tiny.build()
    reference = _run(model, tiny)
    outputs, orders = [], []
    for configs in ((_configs()[name](model), ToyWeights()), (ToyWeights(), _configs()[name](model))):
        with accel.apply(model, *configs) as handle:
            outputs.append(_run(model, tiny))
            orders.append([record.technique for record in handle.patches() if record.technique != "core"])
        assert torch.equal(_run(model, tiny), reference)
    assert torch.equal(outputs[0], outputs[1])
    assert orders[0] == orders[1] and orders[0][0] == "toy-weights"


def _compiled_tiny(name: str, whole: bool):
    """A fresh tiny model for technique ``name``, compiled with a :class:`GraphCalls` backend: every block in place,
    or (``whole``) the whole model through ``torch.compile``. Returns the model, what to call, the tiny spec and
    the backend."""
    torch._dynamo.reset()
    tiny = _tiny(name)
    model = tiny.build()
    backend = GraphCalls()
    if whole:
        return model, torch.compile(model, backend=backend), tiny, backend
    accel.compile_blocks(model, backend=backend)
    return model, model, tiny, backend


@pytest.mark.parametrize("name", list(_configs()))
def test_compiled_frames_stay_bounded_and_do_not_grow_with_steps(name):
    model, _, tiny, backend = _compiled_tiny(name, whole=False)
    _run(model, tiny, steps=12)
    plain, plain_calls = backend.graphs, backend.calls
    with accel.apply(model, _configs()[name](model)):
        _run(model, tiny, steps=12)
        at_12, calls = backend.graphs, backend.calls
        _run(model, tiny, steps=30)
        calls = backend.calls - calls
    assert at_12 - plain <= EXTRA_FRAMES.get(name, 2), (plain, at_12)
    assert backend.graphs == at_12, f"frames grew with the step count: {at_12} -> {backend.graphs}"
    # and the compiled code runs: at least one compiled block per step (a block dynamo gave up on compiles nothing)
    assert calls >= 30, f"{calls} compiled-graph calls in 30 steps"
    # and after removal the plain blocks run their own compiled code again, not what was compiled around the patches
    calls = backend.calls
    _run(model, tiny, steps=12)
    assert backend.calls - calls == plain_calls, (plain_calls, backend.calls - calls)


@pytest.mark.parametrize("name", list(_configs()))
def test_a_whole_compiled_transformer_runs_its_own_graphs_again_after_removal(name):
    # a fenced wrapper on a block breaks the whole transformer's graph inside its block loop, and dynamo then marks
    # the transformer's forward "skip" for the rest of the process; remove() lets its compiled graph run again
    model, compiled, tiny, backend = _compiled_tiny(name, whole=True)
    _run(compiled, tiny, steps=6)
    plain_graphs, plain_calls = backend.graphs, backend.calls
    with accel.apply(compiled, _configs()[name](model)):
        _run(compiled, tiny, steps=6)
    calls = backend.calls
    _run(compiled, tiny, steps=6)
    assert backend.calls - calls == plain_calls, (plain_calls, backend.calls - calls)
    assert plain_calls == 6 and plain_graphs == 1, (plain_graphs, plain_calls)  # one graph a step, as compiled
