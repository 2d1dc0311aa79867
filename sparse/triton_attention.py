"""Block-sparse flash attention in Triton for the sparse heads of one layer (forward only).

Every sparse head of a layer shares one launch over the grid ``(query tiles, batch * heads)``. A program loads
its query tile once and visits only the key tiles its (head, query tile) needs, as listed by a
:class:`~accel.sparse.blocks.BlockTable` built on the host: first the **full** tiles, with no mask at all, then the
**partial** ones, where the element mask is computed in the kernel exactly as
:func:`accel.sparse.patterns.allowed` defines it: a text query sees every key; otherwise the key is in the
head's **stripes** (a text key, a key of a sink frame: one int8 per head and key, loaded as one contiguous vector
per tile) or within one of the head's windows (half-widths read from a per-head table, compared with frame, row
and column of query and key, derived in-kernel from the token index). Reading the stripes rather than deriving
them halved the partial-tile loop's register spills on sm_90 (176 -> 88 bytes at the (128, 64, 8 warps) tile,
head_dim 128). Softmax is online (flash attention) in float32, with ``exp2`` and the scale folded in; a query
row that sees no key gives zeros.

Tiles: the table's tiles are ``(q_block, kv_block)`` (powers of two, e.g. 128 x 128); the kernel's tiles
``(BLOCK_M, BLOCK_N)`` divide them, so a program reads table row ``query tile * BLOCK_M // q_block`` and walks
each listed key tile in ``kv_block // BLOCK_N`` steps. On a GPU the kernel is autotuned over a few
``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` configs that fit the table; under the Triton interpreter
(``TRITON_INTERPRET=1`` when this module is imported, CPU tensors) it runs one fixed config.

:class:`TritonSparseAttention` holds one launch's precomputed inputs and is the launcher; the launch itself
is the custom op ``torch.ops.accel.sparse_attention`` with a fake implementation, so compiled code traces it as
one opaque call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Triton sparse-attention kernel needs triton: pip install 'diffusers-accel[triton]'"
    ) from error

from accel.sparse.blocks import BlockTable, build_block_table
from accel.sparse.patterns import HeadPattern, HeadTables, TokenGrid, allowed

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@triton.jit
def _coordinates(tokens, text_offset, visual, area, width):
    """Frame, row, column and is-text of ``tokens`` (int32), as :func:`~accel.sparse.patterns.allowed`."""
    index = tokens - text_offset
    text = (index < 0) | (index >= visual)
    index = tl.minimum(tl.maximum(index, 0), visual - 1)
    frame = index // area
    row = (index % area) // width
    column = index % width
    return frame, row, column, text


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32. ``UPCAST`` (the interpreter, bfloat16 only): multiply in float32, which
    is exact for bfloat16 operands; the interpreter multiplies bfloat16 bit patterns as integers."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _attend(
    acc, m_i, l_i, q, frame_q, row_q, column_q, text_q,
    k_base, v_base, stride_kn, stride_vn, block_list, block_count, window_base, stripes_base,
    seq_len, text_offset, visual, area, width,
    offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, NUM_WINDOWS: tl.constexpr, SPARSE_KV: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of one query tile over ``block_count`` listed key tiles."""
    d_valid = offs_d < HEAD_DIM
    for index in range(0, block_count):
        block = tl.load(block_list + index)
        for step in range(0, SPARSE_KV // BLOCK_N):
            offs_n = block * SPARSE_KV + step * BLOCK_N + tl.arange(0, BLOCK_N)
            n_valid = offs_n < seq_len  # always true in a full tile: it lies inside the sequence
            if MASKED:
                k_mask = d_valid[:, None] & n_valid[None, :]
                v_mask = n_valid[:, None] & d_valid[None, :]
            else:
                k_mask = d_valid[:, None]
                v_mask = d_valid[None, :]
            k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=k_mask, other=0.0)  # (D, N)
            qk = _dot(q, k, DOT_PRECISION, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N) float32
            if MASKED:
                frame_k, row_k, column_k, _ = _coordinates(offs_n, text_offset, visual, area, width)
                stripe = tl.load(stripes_base + offs_n, mask=n_valid, other=0) != 0  # (BLOCK_N,): text, sink frames
                keep = text_q[:, None] | stripe[None, :]
                for window in tl.static_range(NUM_WINDOWS):
                    half_frames = tl.load(window_base + 3 * window)
                    half_rows = tl.load(window_base + 3 * window + 1)
                    half_columns = tl.load(window_base + 3 * window + 2)
                    keep = keep | (
                        (tl.abs(frame_q[:, None] - frame_k[None, :]) <= half_frames)
                        & (tl.abs(row_q[:, None] - row_k[None, :]) <= half_rows)
                        & (tl.abs(column_q[:, None] - column_k[None, :]) <= half_columns)
                    )
                qk = tl.where(keep & n_valid[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key so far
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=v_mask, other=0.0)  # (N, D)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _sparse_attention_kernel(
    Q, K, V, Out, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, WINDOW, STRIPES,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    heads, seq_len, q_blocks, kv_blocks, area, width, text_offset, visual, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_WINDOWS: tl.constexpr,
    SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // heads).to(tl.int64)
    head = batch_head % heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < seq_len
    q_base = Q + batch * stride_qb + head.to(tl.int64) * stride_qh
    q_mask = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + batch * stride_kb + head.to(tl.int64) * stride_kh
    v_base = V + batch * stride_vb + head.to(tl.int64) * stride_vh
    frame_q, row_q, column_q, text_q = _coordinates(offs_m, text_offset, visual, area, width)

    row = head * q_blocks + (start_m * BLOCK_M) // SPARSE_Q  # this tile's row of the block table
    window_base = WINDOW + head * NUM_WINDOWS * 3
    stripes_base = STRIPES + head * seq_len
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # full tiles, without a mask
    full_count = tl.load(FULL_NUM + row)
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, q, frame_q, row_q, column_q, text_q,
        k_base, v_base, stride_kn, stride_vn, FULL_IDX + row * kv_blocks, full_count,
        window_base, stripes_base, seq_len, text_offset, visual, area, width, offs_d, qk_scale,
        HEAD_DIM, NUM_WINDOWS, SPARSE_KV, BLOCK_N, False, DOT_PRECISION, UPCAST,
    )  # fmt: skip
    # partial tiles, with the element mask
    partial_count = tl.load(KV_NUM + row)
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, q, frame_q, row_q, column_q, text_q,
        k_base, v_base, stride_kn, stride_vn, KV_IDX + row * kv_blocks, partial_count,
        window_base, stripes_base, seq_len, text_offset, visual, area, width, offs_d, qk_scale,
        HEAD_DIM, NUM_WINDOWS, SPARSE_KV, BLOCK_N, True, DOT_PRECISION, UPCAST,
    )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows that see no key: acc is 0
    o_base = Out + batch * stride_ob + head.to(tl.int64) * stride_oh
    o_mask = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty), mask=o_mask)


def _fitting_configs(configs, named_args, **kwargs):
    """The configs whose tiles divide the block table's and fit the head dim (at least one: the table's tiles
    capped at 64)."""
    sparse_q, sparse_kv = kwargs["SPARSE_Q"], kwargs["SPARSE_KV"]
    fitting = [
        c
        for c in configs
        if sparse_q % c.kwargs["BLOCK_M"] == 0
        and sparse_kv % c.kwargs["BLOCK_N"] == 0
        and (kwargs["BLOCK_D"] <= 64 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 128)
    ]
    return fitting or [triton.Config({"BLOCK_M": min(sparse_q, 64), "BLOCK_N": min(sparse_kv, 64)}, num_warps=4)]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Compiled for sm_90 without a GPU (triton.compile to a GPUTarget,
# then cuobjdump --dump-resource-usage), head_dim 128 bf16: none spills registers but (128, 64, 8, 3), whose
# partial-tile loop spills 88 bytes (the flash-attention default, kept for dense-ish layers); (128, 64, 4, 3)
# spilled 1.1 KB and (128, 128, 8, 2) 0.5 KB at head_dim 128, so the first is left out and the second is
# for head_dim <= 64 only.
_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
    for m, n, warps, stages in [
        (128, 64, 8, 3),
        (128, 32, 8, 3),
        (128, 128, 8, 2),
        (64, 64, 8, 3),
        (64, 64, 4, 3),
        (64, 32, 4, 3),
        (32, 32, 4, 2),
    ]
]
_autotuned_kernel = triton.autotune(
    _CONFIGS,
    key=["seq_len", "HEAD_DIM", "SPARSE_Q", "SPARSE_KV"],
    prune_configs_by={"early_config_prune": _fitting_configs},
)(_sparse_attention_kernel)

#: whether the kernel runs in the Triton interpreter (``TRITON_INTERPRET=1`` when this module was imported)
INTERPRETED = not isinstance(_sparse_attention_kernel, triton.runtime.JITFunction)


def _launch(query, key, value, table, window, stripes, grid, scale, block_m, block_n):
    heads, seq_len, head_dim = query.shape[1], query.shape[2], query.shape[3]
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    text_offset = grid.text if grid.text and grid.text_first else 0
    arguments = (
        query, key, value, out, *table[:4], window, stripes,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3],
        heads, seq_len, table[0].shape[1], table[1].shape[2], grid.height * grid.width, grid.width,
        text_offset, grid.visual, scale * math.log2(math.e),
    )  # fmt: skip
    constants = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        NUM_WINDOWS=window.shape[1],
        SPARSE_Q=table[4],
        SPARSE_KV=table[5],
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRETED and query.dtype == torch.bfloat16,
    )
    if block_m or INTERPRETED:  # a fixed config: the interpreter cannot benchmark
        block_m, block_n = block_m or table[4], block_n or table[5]
        tiles = (triton.cdiv(seq_len, block_m), query.shape[0] * heads)
        _sparse_attention_kernel[tiles](*arguments, **constants, BLOCK_M=block_m, BLOCK_N=block_n)
    else:
        _autotuned_kernel[lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), query.shape[0] * heads)](
            *arguments, **constants
        )
    return out


@torch.library.custom_op("accel::sparse_attention", mutates_args=())
def sparse_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor,
    full_kv_indices: torch.Tensor,
    window: torch.Tensor,
    stripes: torch.Tensor,
    frames: int,
    height: int,
    width: int,
    text: int,
    text_first: bool,
    scale: float,
    q_block: int,
    kv_block: int,
    block_m: int,
    block_n: int,
) -> torch.Tensor:
    """The launch, unchecked: call it through :class:`TritonSparseAttention`, which checks its inputs.

    Args:
        query, key, value: ``(batch, heads, length, head_dim)`` float16/bfloat16/float32, last stride 1.
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices: the :class:`BlockTable` fields,
            ``(heads, q_blocks)`` and ``(heads, q_blocks, kv_blocks)`` int32.
        window: ``(heads, windows, 3)`` int32; stripes: ``(heads, length)`` int8 (see :class:`TritonSparseAttention`).
        frames, height, width, text, text_first: the :class:`TokenGrid`.
        scale: softmax scale. q_block, kv_block: the table's tile. block_m, block_n: the kernel's tile, 0: autotuned.

    Returns:
        ``(batch, heads, length, head_dim)`` contiguous, in the input dtype.
    """
    table = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_block, kv_block)
    grid = TokenGrid(frames, height, width, text, text_first)
    return _launch(query, key, value, table, window, stripes, grid, scale, block_m, block_n)


@sparse_attention_op.register_fake
def _(query, key, value, *args):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def _check_tile(block: int | None, table_block: int, name: str) -> None:
    if block is not None and (block < 16 or block & (block - 1) or table_block % block):
        raise ValueError(f"{name} must be a power of two >= 16 dividing the table's tile {table_block}, got {block}")


@dataclass(frozen=True)
class TritonSparseAttention:
    """One launch's inputs, prepared once per layer and token grid; calling it runs the kernel.

    Attributes:
        grid: the tokens of the calls it serves.
        table: the :class:`~accel.sparse.blocks.BlockTable` of the heads' patterns.
        window: ``(heads, windows, 3)`` int32 half-widths ``(frames, rows, columns)`` (huge: unbounded; ``-1``:
            an unused row).
        stripes: ``(heads, length)`` int8: 1 for the keys every query of the head sees (text keys, keys in a sink
            frame, every key of a dense head): the key-side half of the mask, read as one contiguous vector per
            tile instead of recomputed.
    """

    grid: TokenGrid
    table: BlockTable
    window: torch.Tensor
    stripes: torch.Tensor

    @classmethod
    def build(
        cls,
        patterns: Sequence[HeadPattern],
        grid: TokenGrid,
        device: torch.device | str = "cuda",
        q_block: int = 128,
        kv_block: int = 128,
    ) -> TritonSparseAttention:
        """The launch for ``patterns`` (one per head) on ``grid``, with ``(q_block, kv_block)`` table tiles
        (powers of two >= 16)."""
        tables = HeadTables.build(patterns, grid, device)
        table = build_block_table(patterns, grid, q_block, kv_block, device)
        # stripes: what a visual query sees through a pattern without its windows (allowed() is the definition)
        no_windows = HeadTables(torch.full_like(tables.window[:, :1], -1), tables.sinks, tables.dense)
        heads = torch.arange(len(patterns), device=device)[:, None]
        visual_query = torch.tensor(grid.text if grid.text_first else 0, device=device)
        keys = torch.arange(grid.length, device=device)[None, :]
        stripes = allowed(no_windows, grid, heads, visual_query, keys)  # (heads, length)
        window = tables.window.to(torch.int32).contiguous()
        return cls(grid, table, window, stripes.to(torch.int8).contiguous())

    def check(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Raise ``ValueError``/``TypeError`` unless the inputs fit this launch (see :meth:`__call__`)."""
        shape = (query.shape[0], self.table.heads, self.grid.length, query.shape[-1]) if query.ndim == 4 else None
        if any(t.ndim != 4 or tuple(t.shape) != shape for t in (query, key, value)):
            raise ValueError(
                f"query, key, value must each be (batch, {self.table.heads} heads, {self.grid.length} tokens, "
                f"head_dim), got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if not 1 <= query.shape[-1] <= MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be 1..{MAX_HEAD_DIM}, got {query.shape[-1]}")
        if query.dtype not in DTYPES or not query.dtype == key.dtype == value.dtype:
            raise TypeError(
                f"query, key, value must share one dtype of {DTYPES}, got {query.dtype}, {key.dtype}, {value.dtype}"
            )
        devices = {t.device for t in (query, key, value, self.table.kv_indices, self.window)}
        if len(devices) != 1:
            raise ValueError(f"query, key, value and the launch's tables must share one device, got {devices}")
        if not INTERPRETED and query.device.type == "cpu":
            raise ValueError(
                "the compiled Triton kernel needs GPU tensors, got CPU ones; on a CPU use the 'flex' backend (or "
                "the Triton interpreter: TRITON_INTERPRET=1 before this module is imported)"
            )

    def density(self) -> float:
        """The fraction of tiles the launch visits (full or partial)."""
        return self.table.density()

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float | None = None,
        block_m: int | None = None,
        block_n: int | None = None,
    ) -> torch.Tensor:
        """Block-sparse attention of every head over the keys its pattern allows.

        Args:
            query, key, value: ``(batch, heads, length, head_dim)``, float16, bfloat16 or float32, one dtype and
                device (a GPU; CPU under the interpreter), ``length == grid.length``, ``head_dim <= 256``.
            scale: softmax scale; default ``1 / sqrt(head_dim)``.
            block_m, block_n: a fixed kernel tile (powers of two >= 16 dividing the table's tile) instead of
                autotuning; ``block_n`` alone needs ``block_m``.

        Returns:
            ``(batch, heads, length, head_dim)`` contiguous, in the input dtype; accumulated in float32. A query
            that sees no key gets zeros.
        """
        self.check(query, key, value)
        _check_tile(block_m, self.table.q_block, "block_m")
        _check_tile(block_n, self.table.kv_block, "block_n")
        if block_n is not None and block_m is None:
            raise ValueError("block_n needs block_m (a fixed tile)")
        query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
        table, grid = self.table, self.grid
        return torch.ops.accel.sparse_attention(
            query, key, value, table.kv_num_blocks, table.kv_indices, table.full_kv_num_blocks,
            table.full_kv_indices, self.window, self.stripes, grid.frames, grid.height, grid.width, grid.text,
            grid.text_first, scale, table.q_block, table.kv_block, block_m or 0, block_n or 0,
        )  # fmt: skip
