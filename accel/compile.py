"""Regional compilation: ``torch.compile`` each transformer block in place, for every model with an adapter.

diffusers' ``compile_repeated_blocks()`` does this for the models whose class lists ``_repeated_blocks``;
PixArt, SD3, Sana and CogVideoX list none. :func:`compile_blocks` works from the adapter's block stacks
instead, so it covers every supported model. Blocks of one class share their compiled code, so a 28-block
model compiles a block once, not 28 times.

It composes with every technique in either order: techniques make their decisions in fenced frames outside
the compiled blocks (see :mod:`accel.patches`), so the compiled code never guards on a step index.
"""

from __future__ import annotations

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


@contextmanager
def flop_counter(**kwargs: Any) -> Iterator[FlopCounterMode]:
    """``FlopCounterMode(display=False, **kwargs)`` under :func:`compiled_code_eager` (the count is the same).
    Every MAC count in the package goes through this."""
    with compiled_code_eager(), FlopCounterMode(display=False, **kwargs) as counter:
        yield counter
