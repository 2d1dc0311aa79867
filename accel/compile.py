"""Regional compilation: ``torch.compile`` each transformer block in place, for every model with an adapter.

diffusers' ``compile_repeated_blocks()`` does this for the models whose class lists ``_repeated_blocks``;
PixArt, SD3, Sana and CogVideoX list none. :func:`compile_blocks` works from the adapter's block stacks
instead, so it covers every supported model. Blocks of one class share their compiled code, so a 28-block
model compiles a block once, not 28 times.

It composes with every technique in either order: techniques make their decisions in fenced frames outside
the compiled blocks (see :mod:`accel.patches`), so the compiled code never guards on a step index.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from accel.adapters import ModelSpec

#: recompiles a block's shared code may make when one process compares many methods (``accel eval --compile``,
#: the benchmarks): each quantized weight type, caching wrapper set and input layout (the first block's input is
#: a transposed view, the others' are contiguous) is an entry of its own, and once dynamo's default of 8 is
#: spent it runs the block eagerly without a word beyond one log line
COMPARISON_RECOMPILE_LIMIT = 64


def compile_blocks(pipe_or_transformer: Any, spec: ModelSpec | None = None, **compile_kwargs: Any) -> int:
    """Compile every block of the transformer's block stacks in place (``module.compile(**compile_kwargs)``).

    Args:
        pipe_or_transformer: a pipeline with a ``.transformer``, or the transformer (a ``torch.compile``
            wrapper is looked through).
        spec: the model's adapter spec when it has no registered adapter.
        **compile_kwargs: passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).

    Returns:
        The number of blocks compiled.
    """
    from accel.adapters import spec_for
    from accel.api import resolve_transformer

    transformer = resolve_transformer(pipe_or_transformer)
    blocks = spec_for(transformer, spec).block_list(transformer)
    for _, block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


@contextmanager
def compiled_code_eager() -> Iterator[None]:
    """Run ``torch.compile``'d code eagerly inside the block, leaving it compiled for later calls.

    For work under a ``TorchDispatchMode`` (a FLOP counter, a tensor-memory tracker): calling a compiled
    function (a block compiled in place, say) under such a mode makes dynamo stop running that function's
    compiled code for good. On torch 2.13 every later call ran eagerly, with no recompile and no log line.
    Under ``torch.compiler.set_stance("force_eager")`` the compiled function runs its Python instead and keeps its
    compiled code.
    """
    with torch.compiler.set_stance("force_eager"):
        yield


def _int_mm_flops(a_shape: torch.Size, b_shape: torch.Size, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``torch._int_mm`` (the int8 x int8 matmul of torchao's W8A8 layers) does a float matmul's ``2 m k n``."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


#: FLOP formulas ``FlopCounterMode`` lacks: without them a torchao int8-dynamic or int8-static model counts no
#: linear MACs (int8 weight-only dequantizes and runs a float matmul, which it counts already)
EXTRA_FLOP_FORMULAS = {torch.ops.aten._int_mm: _int_mm_flops}


@contextmanager
def flop_counter(**kwargs: Any) -> Iterator[FlopCounterMode]:
    """``FlopCounterMode(display=False, **kwargs)`` under :func:`compiled_code_eager` (the count is the same),
    with :data:`EXTRA_FLOP_FORMULAS` added to any ``custom_mapping``. Every MAC count in the package goes through
    this, so quantized models count their int8 matmuls everywhere."""
    mapping = {**EXTRA_FLOP_FORMULAS, **kwargs.pop("custom_mapping", {})}
    with compiled_code_eager(), FlopCounterMode(display=False, custom_mapping=mapping, **kwargs) as counter:
        yield counter


def _forward_codes(module: torch.nn.Module) -> set[types.CodeType]:
    """The code objects of the ``forward`` of every module class in ``module``'s tree, decorated ones (a
    ``functools.wraps`` chain) included: the frames dynamo compiles when the tree is compiled whole."""
    codes = set()
    for cls in {type(m) for m in module.modules()}:
        function = cls.forward
        while function is not None:
            code = getattr(function, "__code__", None)
            if code is not None:
                codes.add(code)
            function = getattr(function, "__wrapped__", None)
    return codes


def compiled_forward_codes(module: torch.nn.Module) -> list[types.CodeType]:
    """Those of :func:`_forward_codes` that ``torch.compile`` has compiled code for (none where the private
    dynamo API this reads is missing)."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # pragma: no cover - older or newer torch without it: nothing is restored
        return []
    return [code for code in _forward_codes(module) if _debug_get_cache_entry_list(code)]


def resume_compiled_code(codes: list[types.CodeType]) -> None:
    """Let dynamo run the compiled code of ``codes`` again after a technique is removed.

    With the whole transformer compiled (``torch.compile(pipe.transformer)``), a technique's fenced wrapper on a
    block breaks the transformer's graph inside its loop over the blocks. Dynamo cannot resume inside a loop, so
    it marks the transformer's ``forward`` code "skip" for the rest of the process (``ConvertFrameReturn``'s
    default, for every instance of that class), and the blocks compile one by one instead. Nothing in the
    compiled code's guards changes back on removal, so after ``remove()`` the plain transformer kept running the
    split code (5 graphs a call on the tests' tiny PixArt instead of 1). :func:`accel.apply` takes
    :func:`compiled_forward_codes` before applying and passes them here after removal, which puts their
    execution strategy back to the default: the whole-transformer graph compiled before apply (still in the
    code's cache) runs again. A code that was not compiled before apply is left as dynamo set it.
    """
    if not codes:
        return
    try:
        from torch._C._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # pragma: no cover - see compiled_forward_codes
        return
    for code in codes:
        set_code_exec_strategy(code, FrameExecStrategy(FrameAction.DEFAULT, FrameAction.DEFAULT))
