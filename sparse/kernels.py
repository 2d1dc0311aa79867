"""Running one layer's per-head patterns: the fallback chain of kernels.

:class:`LayerAttention` is built eagerly, once per layer and token grid, outside compiled code: it groups the
heads by kind (dense heads run through SDPA, sparse heads through one block-sparse launch, skip heads are
zeros) and prepares the launch's inputs. Calling it is plain tensor code, so a compiled block traces it.

Backends, each tested against :func:`accel.sparse.reference.reference_attention`:

* ``"triton"``: the block-sparse flash-attention kernel of :mod:`accel.sparse.triton_attention` (every sparse
  head in one launch, full tiles unmasked, the mask computed in-kernel in partial ones); GPU tensors only
  (CPU under the Triton interpreter), needs the ``triton`` extra;
* ``"runs"``: :mod:`accel.sparse.runs`: SDPA per query range over slices of ``key``/``value``, unmasked where
  the range's tiles are all full (windows over whole frames), with an additive mask where some are partial, and
  FlexAttention (compiled) for those rows when their masks would not fit in a budget; any device;
* ``"flex"``: FlexAttention with a block mask whose ``mask_mod`` is :func:`accel.sparse.patterns.allowed`
  over per-head tables, so every sparse head of the layer shares one launch; compiled (on CPU and GPU);
* ``"sdpa"``: SDPA with a materialised boolean mask (``heads x length x length``): the last resort;
* ``"reference"``: the float32 specification.

The fallback chain is triton -> runs -> flex -> sdpa -> reference: ``"auto"`` picks ``"triton"`` when the
layer's device is CUDA, else ``"runs"`` (:func:`auto_backend`); on CUDA every backend but ``"sdpa"`` and
``"reference"`` needs triton installed (compiled FlexAttention too: inductor writes its kernels in Triton), and
says so when it is missing; ``"sdpa"`` (memory quadratic in the length) and
``"reference"`` (float32, for tests) are only ever chosen by name.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from accel.sparse.blocks import flex_block_mask
from accel.sparse.patterns import HeadPattern, TokenGrid, dense_mask
from accel.sparse.reference import check_qkv, reference_attention
from accel.sparse.runs import RunsAttention

Backend = Literal["auto", "triton", "runs", "flex", "sdpa", "reference"]
BACKENDS = ("auto", "triton", "runs", "flex", "sdpa", "reference")

logger = logging.getLogger(__name__)


def auto_backend(device: torch.device | str) -> str:
    """The first link of the fallback chain that runs on ``device``: ``"triton"`` on CUDA, else ``"runs"``.

    Raises:
        ImportError: on CUDA without triton (see :func:`check_backend`).
    """
    if torch.device(device).type != "cuda":
        return "runs"
    _require_triton_on_cuda("auto")
    return "triton"


def _require_triton_on_cuda(backend: str) -> None:
    """On CUDA every sparse backend but ``"sdpa"`` and ``"reference"`` needs triton: the Triton kernel itself,
    and compiled FlexAttention (alone or inside ``"runs"``), whose kernels inductor writes in Triton."""
    if importlib.util.find_spec("triton") is None:
        raise ImportError(
            f"sparse attention backend {backend!r} on CUDA needs triton (the Triton kernel, or compiled "
            "FlexAttention, which inductor writes in Triton): pip install 'diffusers-accel[triton]', or choose "
            "backend='sdpa' (a dense mask per head: memory quadratic in the length)"
        )


def check_backend(backend: Backend, device: torch.device | str) -> None:
    """Raise before any change to a model if ``backend`` cannot run on ``device``: on CUDA every backend but
    ``"sdpa"`` and ``"reference"`` needs triton installed (``ImportError`` naming the extra); ``"triton"`` needs a
    CUDA device (``ValueError``), except under the Triton interpreter (CPU tensors, for tests)."""
    if torch.device(device).type == "cuda" and backend in ("auto", "triton", "runs", "flex"):
        _require_triton_on_cuda(backend)
    if backend != "triton":
        return
    triton_attention = importlib.import_module("accel.sparse.triton_attention")  # ImportError names the extra
    if torch.device(device).type != "cuda" and not triton_attention.INTERPRETED:
        raise ValueError(
            f"the 'triton' sparse-attention backend needs a CUDA model, but it is on {torch.device(device)}; move "
            "it to a GPU first, or use backend 'auto', 'runs' or 'flex' here"
        )


#: recompiles the compiled FlexAttention may make in one process. Each (batch, heads in the launch, head width,
#: pattern structure) is a variant of its own, and a searched plan has many (its layers launch different head
#: counts and unions). Past dynamo's default of 8, flex ran its unfused eager fallback (the full score matrix)
#: with one UserWarning: seen in ``python -m accel.bench sparse`` and reproduced by
#: tests/test_sparse.py::test_many_layer_variants_all_run_compiled_flex (slow).
FLEX_RECOMPILE_LIMIT = 256


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # torch.compile takes recompile_limit in newer releases (2.13 here), not in 2.11: there the global limit (8) holds
    has_limit = "recompile_limit" in inspect.signature(torch.compile).parameters
    limit = {"recompile_limit": FLEX_RECOMPILE_LIMIT} if has_limit else {}
    return torch.compile(flex_attention, dynamic=False, **limit)


def flex_attention(query, key, value, block_mask, scale=None):
    """FlexAttention, compiled (directly when already inside compiled code)."""
    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention as flex

        return flex(query, key, value, block_mask=block_mask, scale=scale)
    return _compiled_flex()(query, key, value, block_mask=block_mask, scale=scale)


def default_block_size(length: int) -> int:
    """Block size of the block mask: 128 (the kernels' tile) for long sequences, finer for short ones so that
    small grids can still be sparse."""
    return 128 if length >= 4096 else 64 if length >= 1024 else 32


def block_mask_for(
    patterns: Sequence[HeadPattern], grid: TokenGrid, device: torch.device | str, block_size: int | None = None
):
    """A FlexAttention ``BlockMask`` for ``patterns`` (one per head of the launch) on ``grid``
    (:func:`~accel.sparse.blocks.flex_block_mask`, at ``block_size`` or :func:`default_block_size`)."""
    return flex_block_mask(patterns, grid, block_size or default_block_size(grid.length), device)


@functools.lru_cache(maxsize=256)
def shared_layer_attention(
    patterns: tuple[HeadPattern, ...], grid: TokenGrid, device: str, backend: Backend, block_size: int | None
) -> LayerAttention:
    """The :class:`LayerAttention` of these arguments, made once per process (it holds no call state): building
    a layer's block mask walks every tile, so a plan applied again (a benchmark's rounds, an evaluation's
    methods, a user's ``with accel.apply(...)`` per call) reuses the first build instead of paying it inside
    its first call again."""
    return LayerAttention(patterns, grid, device, backend, block_size)


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


class LayerAttention:
    """One layer's attention heads under per-head patterns, on one token grid.

    Args:
        patterns: one pattern per head.
        grid: the tokens of the calls it will serve.
        device: where the calls run.
        backend: one of :data:`BACKENDS`.
        block_size: the block mask's block size (``"flex"``, ``"triton"``); default :func:`default_block_size`.
    """

    def __init__(
        self,
        patterns: Sequence[HeadPattern],
        grid: TokenGrid,
        device: torch.device | str = "cpu",
        backend: Backend = "auto",
        block_size: int | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.patterns, self.grid = tuple(patterns), grid
        self.backend = auto_backend(device) if backend == "auto" else backend
        kinds = [p.kind for p in self.patterns]
        self.dense_heads = [h for h, kind in enumerate(kinds) if kind == "dense"]
        self.sparse_heads = [h for h, kind in enumerate(kinds) if kind == "sparse"]
        self.all_dense = len(self.dense_heads) == len(kinds)
        sparse = [self.patterns[h] for h in self.sparse_heads]
        self.block_mask = self.mask = self.launch = None
        if sparse and self.backend == "triton":
            from accel.sparse.triton_attention import TritonSparseAttention  # ImportError names the extra

            size = block_size or default_block_size(grid.length)
            self.launch = TritonSparseAttention.build(sparse, grid, device, size, size)
        elif sparse and self.backend == "runs":
            self.launch = RunsAttention(sparse, grid, device, block_size or default_block_size(grid.length))
        elif sparse and self.backend == "flex":
            self.block_mask = block_mask_for(sparse, grid, device, block_size)
        elif sparse and self.backend == "sdpa":
            self.mask = dense_mask(sparse, grid, device)
        self._index = {
            name: torch.tensor(heads, dtype=torch.long, device=device)
            for name, heads in (("dense", self.dense_heads), ("sparse", self.sparse_heads))
        }

    def block_density(self) -> float | None:
        """The fraction of (query block, key block) tiles the sparse heads' launch computes, or None."""
        if self.launch is not None:
            return self.launch.density()
        if self.block_mask is None:
            return None
        return 1.0 - self.block_mask.sparsity() / 100.0

    def _sparse(self, query, key, value, scale):
        if self.backend in ("triton", "runs"):
            return self.launch(query, key, value, scale)
        if self.backend == "flex":
            return flex_attention(query, key, value, self.block_mask, scale)
        if self.backend == "sdpa":
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=self.mask, scale=scale)
            return out.masked_fill(~self.mask.any(-1, keepdim=True), 0.0)  # rows that see no key: 0, not NaN
        return reference_attention(query, key, value, [self.patterns[h] for h in self.sparse_heads], self.grid, scale)

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
    ) -> torch.Tensor:
        """Attention output ``(batch, heads, length, head_dim)`` of ``query``, ``key``, ``value``, each
        ``(batch, heads, length, head_dim)``.

        Raises:
            ValueError: in eager calls, the inputs do not have this layer's heads and grid length (:meth:`check`);
                compiled calls skip the check (shapes are fixed by the compiled graph's guards).
        """
        eager = not torch.compiler.is_compiling()
        if eager:
            self.check(query, key, value)
        if self.all_dense or (eager and _is_fake(query)):
            # fake tensors: a shape-only run (the cache engine counting MACs) counts the heads as dense
            return F.scaled_dot_product_attention(query, key, value, scale=scale)
        out = torch.zeros_like(query)
        for name, run in (("dense", F.scaled_dot_product_attention), ("sparse", self._sparse)):
            heads = self._index[name]
            if len(heads):
                part = run(*(t.index_select(1, heads) for t in (query, key, value)), scale=scale)
                out = out.index_copy(1, heads, part.to(out.dtype))
        return out

    def check(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Raise ``ValueError`` if the inputs do not fit this layer's heads and grid (eager callers)."""
        check_qkv(query, key, value, len(self.patterns), self.grid)
