"""The built-in adapters describe their models correctly: blocks, components and what each block returns."""

import inspect

import pytest
import torch
from tiny_models import TINY_MODELS, TinyModel, block_count

from accel.adapters import ModelSpec, spec_for, supported_models

TINY = list(TINY_MODELS.values())


@pytest.fixture(params=TINY, ids=[tiny.name for tiny in TINY])
def tiny(request) -> TinyModel:
    return request.param


def _run_capturing_blocks(model: torch.nn.Module, tiny: TinyModel, spec: ModelSpec) -> list[tuple]:
    """One forward; for each block call in execution order, (block, bound arguments by name, returned value)."""
    calls = []
    handles = []
    for _, block in spec.block_list(model):

        def pre_hook(module, args, kwargs):
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            calls.append([module, dict(bound.arguments), None])

        def post_hook(module, args, kwargs, output):
            calls[-1][2] = output

        handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook, with_kwargs=True))
    try:
        model(**tiny.inputs(2, 500.0, torch.Generator().manual_seed(0), [1, 2]))
    finally:
        for handle in handles:
            handle.remove()
    return [tuple(call) for call in calls]


def test_every_tiny_model_class_has_an_adapter():
    assert sorted(tiny.model_class.__name__ for tiny in TINY) == supported_models()


def test_spec_is_registered_for_the_exact_class(tiny):
    model = tiny.build()
    spec = spec_for(model)
    assert isinstance(spec, ModelSpec)

    subclass = type(f"Custom{tiny.model_class.__name__}", (tiny.model_class,), {})
    with pytest.raises(ValueError, match="No adapter"):
        spec_for(subclass.__new__(subclass))


def test_block_list_finds_every_block_in_execution_order(tiny):
    model = tiny.build()
    spec = spec_for(model)
    blocks = [block for _, block in spec.block_list(model)]

    assert len(blocks) == block_count(tiny)
    assert len({id(block) for block in blocks}) == len(blocks)
    executed = [call[0] for call in _run_capturing_blocks(model, tiny, spec)]
    assert executed == blocks, "every listed block runs exactly once per forward, in the listed order"


def test_every_component_is_a_submodule_of_the_first_block(tiny):
    model = tiny.build()
    spec = spec_for(model)
    for stack in spec.stacks:
        first = next(block for block_stack, block in spec.block_list(model) if block_stack is stack)
        for component in stack.components:
            submodule = getattr(first, component.module, None)
            assert isinstance(submodule, torch.nn.Module), (
                f"{type(first).__name__}.{component.module} ({component.name}) is not a submodule"
            )
            assert any(submodule is module for module in first.modules())


def test_block_outputs_match_the_named_inputs(tiny):
    model = tiny.build()
    spec = spec_for(model)
    stacks = [stack for stack, _ in spec.block_list(model)]
    for stack, (block, arguments, returned) in zip(stacks, _run_capturing_blocks(model, tiny, spec), strict=True):
        where = f"{type(block).__name__} in {stack.path}"
        if len(stack.outputs) == 1:
            assert isinstance(returned, torch.Tensor), f"{where} returns {type(returned).__name__}, not a tensor"
            returned = (returned,)
        else:
            assert isinstance(returned, tuple), f"{where} returns {type(returned).__name__}, not a tuple"
        assert len(returned) == len(stack.outputs), f"{where} returns {len(returned)} values"
        assert any(value is not None for value in returned)
        for name, value in zip(stack.outputs, returned, strict=True):
            if name is None or value is None:  # e.g. SD3's last block returns no context
                continue
            assert name in arguments, f"{where} has no argument {name!r}"
            assert value.shape == arguments[name].shape, f"{where}: output {name!r} {tuple(value.shape)}"


def test_unknown_model_error_lists_the_supported_classes():
    with pytest.raises(ValueError) as error:
        spec_for(torch.nn.Linear(2, 2))
    message = str(error.value)
    assert "Linear" in message
    for tiny in TINY:
        assert tiny.model_class.__name__ in message
    assert "spec=" in message
