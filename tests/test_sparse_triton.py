"""The Triton block-sparse attention kernel: its block table against a brute-force tiling of the mask, and the
kernel against the float32 reference within ``2 * err(reference in low precision) + eps``.

The kernel checks run in the Triton interpreter on the CPU. The interpreter is chosen when ``triton.jit``
decorates the kernel, i.e. when :mod:`accel.sparse.triton_attention` is imported with ``TRITON_INTERPRET=1``, so
they run in one spawned worker process started with that flag: whatever this process imported before (a compiled
kernel module on a GPU machine included) cannot change them, and the flag never leaks into this process. The
``gpu`` tests run the compiled kernel in this process at a realistic size.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from accel.sparse.blocks import build_block_table
from accel.sparse.kernels import LayerAttention, auto_backend
from accel.sparse.patterns import HeadPattern, TokenGrid, dense_mask
from accel.sparse.reference import reference_attention

WINDOWS = [
    HeadPattern(windows=((0, None, None),)),  # per-frame block diagonal
    HeadPattern(windows=((None, 1, 1), (0, None, None)), sink_frames=(0,)),  # union of two windows and a sink
    HeadPattern(),  # text only
    HeadPattern(windows=((1, 2, None),), sink_frames=(-1,)),
]
MIXED = [HeadPattern.dense(), WINDOWS[1], HeadPattern.skip(), WINDOWS[3], WINDOWS[2]]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ----------------------------------------------------------------------------------------------- block table


def _brute_force_tiles(patterns, grid, q_block, kv_block):
    """``(partial, full)`` by looking at every tile of the dense mask (see accel.sparse.blocks for padding)."""
    mask = dense_mask(patterns, grid)
    length = grid.length
    q_blocks, kv_blocks = -(-length // q_block), -(-length // kv_block)
    partial = torch.zeros(len(patterns), q_blocks, kv_blocks, dtype=torch.bool)
    full = torch.zeros_like(partial)
    for head in range(len(patterns)):
        for i in range(q_blocks):
            for j in range(kv_blocks):
                tile = mask[head, i * q_block : (i + 1) * q_block, j * kv_block : (j + 1) * kv_block]
                inside = (j + 1) * kv_block <= length
                full[head, i, j] = bool(tile.all()) and inside
                partial[head, i, j] = bool(tile.any()) and not full[head, i, j]
    return partial, full


@pytest.mark.parametrize("rows", [False, True])
def test_flex_block_mask_from_tiles_matches_create_block_mask(rows):
    from torch.nn.attention.flex_attention import create_block_mask

    from accel.sparse.blocks import block_classes, flex_block_mask
    from accel.sparse.kernels import flex_attention
    from accel.sparse.patterns import HeadTables, allowed

    grid, patterns, block = TokenGrid(3, 4, 6, text=7), WINDOWS, 16  # 79 tokens: a padded last block
    keep = torch.rand(len(patterns), 5, generator=torch.Generator().manual_seed(0)) < 0.5
    tables = HeadTables.build(patterns, grid)

    def mask_mod(batch, head, query, key):
        return allowed(tables, grid, head, query, key) & (keep[head, query // block] if rows else True)

    tiles = None
    if rows:  # the tiles of those query blocks only
        tiles = tuple(t & keep[..., None] for t in block_classes(patterns, grid, block, block))
    ours = flex_block_mask(patterns, grid, block, tiles=tiles)
    theirs = create_block_mask(mask_mod, None, len(patterns), grid.length, grid.length, device="cpu", BLOCK_SIZE=block)
    # the same tiles, and the same classes but in the padded last query block (whose rows past the end count as
    # allowed here, so a tile of it can be full: see accel.sparse.blocks)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, name)[..., :-1], getattr(theirs, name)[..., :-1]), name
    q, k, v = torch.randn(3, 1, len(patterns), grid.length, 32).unbind(0)
    expected = reference_attention(q, k, v, patterns, grid) * (
        keep.repeat_interleave(block, 1)[:, : grid.length, None] if rows else 1
    )
    torch.testing.assert_close(flex_attention(q, k, v, ours), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "grid, q_block, kv_block",
    [
        (TokenGrid(3, 6, 8, text=13, text_first=False), 32, 32),  # 157 tokens: padded last tiles
        (TokenGrid(4, 5, 7, text=9, text_first=True), 16, 64),
        (TokenGrid(2, 8, 8), 32, 16),  # no text, length a multiple of both tiles
    ],
)
def test_block_table_equals_a_brute_force_tiling(grid, q_block, kv_block, monkeypatch):
    partial, full = _brute_force_tiles(MIXED, grid, q_block, kv_block)
    table = build_block_table(MIXED, grid, q_block, kv_block)
    assert table.kv_indices.dtype == table.kv_num_blocks.dtype == torch.int32
    assert table.kv_indices.shape == (len(MIXED), partial.shape[1], partial.shape[2])
    got_partial, got_full = table.dense_blocks()
    assert torch.equal(got_partial, partial) and torch.equal(got_full, full)
    assert full[0].any() and partial[1].any() and not (partial[2].any() or full[2].any())  # dense, sparse, skip
    for count, indices in ((table.kv_num_blocks, table.kv_indices), (table.full_kv_num_blocks, table.full_kv_indices)):
        for head, block in zip(*torch.nonzero(count, as_tuple=True)):
            listed = indices[head, block, : count[head, block]]
            assert (listed[1:] > listed[:-1]).all()  # ascending, no repeats
    monkeypatch.setattr("accel.sparse.blocks._CHUNK_ELEMENTS", 1)  # one query tile per chunk
    chunked = build_block_table(MIXED, grid, q_block, kv_block)
    assert torch.equal(chunked.kv_indices, table.kv_indices) and torch.equal(chunked.kv_num_blocks, table.kv_num_blocks)
    assert table.density() == pytest.approx((partial | full).double().mean().item())


def test_block_table_agrees_with_flex_attention_block_mask():
    from accel.sparse.kernels import block_mask_for

    grid = TokenGrid(3, 4, 8, text=32)  # 128 tokens, 32-token tiles: no padding for FlexAttention to treat
    patterns = [p for p in MIXED if p.kind == "sparse"]
    flex = block_mask_for(patterns, grid, "cpu", 32)
    partial, full = build_block_table(patterns, grid, 32, 32).dense_blocks()
    flex_partial = torch.zeros_like(partial)
    flex_full = torch.zeros_like(full)
    for dense, count, indices in (
        (flex_partial, flex.kv_num_blocks, flex.kv_indices),
        (flex_full, flex.full_kv_num_blocks, flex.full_kv_indices),
    ):
        for head in range(len(patterns)):
            for block in range(partial.shape[1]):
                dense[head, block, indices[0, head, block, : count[0, head, block]].long()] = True
    assert torch.equal(partial, flex_partial) and torch.equal(full, flex_full)


def test_block_table_refuses_tiles_a_kernel_cannot_use():
    for size in (8, 48, 0):
        with pytest.raises(ValueError, match="power of two >= 16"):
            build_block_table(WINDOWS, TokenGrid(2, 4, 4), size, 32)


# ------------------------------------------------------------------------------------- the interpreted kernel


def _worker_setup():
    torch.set_num_threads(1)


def _interpreted(patterns, grid, tensors, q_block, kv_block, scale=None, block_m=None, block_n=None):
    """In the worker: the kernel's output for ``tensors = (query, key, value)``."""
    from accel.sparse.triton_attention import INTERPRETED, TritonSparseAttention

    assert INTERPRETED
    launch = TritonSparseAttention.build(patterns, grid, "cpu", q_block, kv_block)
    return launch(*tensors, scale=scale, block_m=block_m, block_n=block_n)


def _interpreted_layer(patterns, grid, tensors, block_size):
    """In the worker: a whole layer (dense, sparse and skip heads) through the "triton" backend."""
    return LayerAttention(patterns, grid, backend="triton", block_size=block_size)(*tensors)


def _interpreted_compile(patterns, grid, tensors, block_size):
    """In the worker: the layer compiled with fullgraph (the custom op's fake traced), its compiled-frame count,
    and its eager output."""
    from torch._dynamo.testing import CompileCounterWithBackend

    layer = LayerAttention(patterns, grid, backend="triton", block_size=block_size)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda q, k, v: layer(q, k, v) * 2, backend=counter, fullgraph=True)
    return compiled(*tensors), counter.frame_count, layer(*tensors) * 2


def _opcheck(patterns, grid, tensors, q_block, kv_block):
    """In the worker: ``torch.library.opcheck`` of the custom op (schema, fake tensor, dispatch)."""
    from accel.sparse.triton_attention import TritonSparseAttention

    launch = TritonSparseAttention.build(patterns, grid, "cpu", q_block, kv_block)
    table = launch.table
    arguments = (
        *tensors, table.kv_num_blocks, table.kv_indices, table.full_kv_num_blocks, table.full_kv_indices,
        launch.window, launch.stripes, grid.frames, grid.height, grid.width, grid.text, grid.text_first, 0.25,
        q_block, kv_block, 0, 0,
    )  # fmt: skip
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    return torch.library.opcheck(torch.ops.accel.sparse_attention.default, arguments, test_utils=checks)


@pytest.fixture(scope="module")
def interpreter():
    """A spawned worker process whose kernel module runs in the Triton interpreter."""
    pytest.importorskip("triton")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the worker, started at the first submit below
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_setup)
    try:
        pool.submit(_worker_setup).result()
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    yield pool
    pool.shutdown()


def _inputs(heads, grid, head_dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, grid.length, head_dim, generator=generator) for _ in range(3)]


def _assert_within_bound(out, tensors, patterns, grid, dtype, scale=None):
    ref = reference_attention(*tensors, patterns, grid, scale)
    low = [t.to(dtype) for t in tensors]
    ref_low_err = (reference_attention(*low, patterns, grid, scale).float() - ref).abs().max()
    assert out.dtype == dtype and out.shape == ref.shape
    error = (out.float() - ref).abs().max()
    assert error <= 2 * ref_low_err + 1e-5, f"{dtype}: error {error:.3g}, reference in {dtype}: {ref_low_err:.3g}"


@pytest.mark.parametrize(
    "dtype, grid, head_dim, tiles, kernel_tile",
    [
        # text last, padded last tiles, the kernel's tile equal to the table's
        (torch.float32, TokenGrid(3, 6, 8, text=13, text_first=False), 16, (32, 32), (None, None)),
        # text first, rectangular table tiles walked in smaller kernel tiles, a non-default scale
        (torch.float16, TokenGrid(4, 5, 7, text=9, text_first=True), 32, (32, 64), (16, 32)),
        # no text (the text-only head sees nothing: zeros), head_dim padded 20 -> 32
        (torch.bfloat16, TokenGrid(3, 8, 8), 20, (32, 32), (32, 16)),
    ],
)
def test_interpreted_kernel_meets_the_reference_bound(interpreter, dtype, grid, head_dim, tiles, kernel_tile):
    tensors = _inputs(len(WINDOWS), grid, head_dim)
    scale = 0.3 if dtype == torch.float16 else None
    low = [t.to(dtype) for t in tensors]
    out = interpreter.submit(_interpreted, WINDOWS, grid, low, *tiles, scale, *kernel_tile).result()
    _assert_within_bound(out, tensors, WINDOWS, grid, dtype, scale)
    if not grid.text:
        assert out[:, 2].abs().max() == 0  # a text-only head without text sees no key


def test_interpreted_layer_with_dense_skip_and_sparse_heads(interpreter):
    grid = TokenGrid(2, 6, 8, text=7, text_first=False)
    tensors = _inputs(len(MIXED), grid, 16, seed=1)
    low = [t.half() for t in tensors]
    out = interpreter.submit(_interpreted_layer, MIXED, grid, low, 32).result()
    _assert_within_bound(out, tensors, MIXED, grid, torch.float16)
    assert out[:, 2].abs().max() == 0  # the skip head


def test_interpreted_kernel_composes_with_torch_compile(interpreter):
    grid = TokenGrid(2, 4, 8, text=5)
    tensors = _inputs(len(MIXED), grid, 16, seed=2)
    compiled, frames, eager = interpreter.submit(_interpreted_compile, MIXED, grid, tensors, 16).result()
    assert frames == 1
    assert torch.equal(compiled, eager)
    _assert_within_bound(compiled / 2, tensors, MIXED, grid, torch.float32)


def test_custom_op_passes_opcheck(interpreter):
    grid = TokenGrid(2, 4, 4, text=3)
    tensors = _inputs(len(WINDOWS), grid, 16, seed=3)
    results = interpreter.submit(_opcheck, WINDOWS, grid, tensors, 16, 16).result()
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda q, k, v: (q, k[:, :, :-1], v), ValueError, "must each be"),
        (lambda q, k, v: (q[:, :2], k[:, :2], v[:, :2]), ValueError, "4 heads"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "one dtype"),
        (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "one dtype"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), ValueError, "head_dim"),
        (lambda q, k, v: (q, k, v[..., :8]), ValueError, "must each be"),
    ],
)
def test_launcher_refuses_bad_inputs(interpreter, change, error, match):
    grid = TokenGrid(2, 4, 4)
    tensors = change(*_inputs(len(WINDOWS), grid, 16))
    with pytest.raises(error, match=match):
        interpreter.submit(_interpreted, WINDOWS, grid, tensors, 16, 16).result()


@pytest.mark.parametrize("kernel_tile", [(24, None), (32, 16), (None, 16)])
def test_launcher_refuses_bad_kernel_tiles(interpreter, kernel_tile):
    grid = TokenGrid(2, 4, 4)
    with pytest.raises(ValueError, match="block_"):
        interpreter.submit(_interpreted, WINDOWS, grid, _inputs(4, grid, 16), 16, 16, None, *kernel_tile).result()


def _kernel_module():
    triton_attention = pytest.importorskip("accel.sparse.triton_attention")
    if triton_attention.INTERPRETED:
        pytest.skip("this process imported the kernel under the interpreter")
    return triton_attention


def test_compiled_kernel_refuses_cpu_tensors():
    triton_attention = _kernel_module()
    grid = TokenGrid(2, 4, 4)
    launch = triton_attention.TritonSparseAttention.build(WINDOWS, grid, "cpu", 16, 16)
    with pytest.raises(ValueError, match="needs GPU tensors"):
        launch(*_inputs(len(WINDOWS), grid, 16))


def test_a_missing_triton_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    monkeypatch.delitem(sys.modules, "accel.sparse.triton_attention", raising=False)
    with pytest.raises(ImportError, match=r"diffusers-accel\[triton\]"):
        LayerAttention(WINDOWS, TokenGrid(2, 4, 4), backend="triton")


def test_auto_backend_is_triton_only_on_cuda():
    assert auto_backend("cpu") == "runs"
    assert LayerAttention(WINDOWS, TokenGrid(2, 4, 4), "cpu").backend == "runs"


def test_on_cuda_without_triton_every_compiled_backend_is_refused_naming_the_extra(monkeypatch):
    from accel.sparse import kernels

    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name, *a: object() if name != "triton" else None)
    for backend in ("auto", "triton", "runs", "flex"):
        with pytest.raises(ImportError, match=r"diffusers-accel\[triton\]"):
            kernels.check_backend(backend, "cuda")
    with pytest.raises(ImportError, match="backend='sdpa'"):
        auto_backend(torch.device("cuda", 0))
    for backend in ("sdpa", "reference"):
        kernels.check_backend(backend, "cuda")  # need no triton
    assert auto_backend("cpu") == "runs"
    kernels.check_backend("auto", "cpu")
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name, *a: object())
    assert auto_backend("cuda") == "triton"


def test_the_triton_backend_is_checked_when_the_config_is_applied(monkeypatch):
    import types

    from tiny_models import TINY_MODELS

    import accel
    from accel.sparse import SparseAttentionConfig, sparse_layers, uniform_plan

    model = TINY_MODELS["wan"].build()
    config = SparseAttentionConfig(plan=uniform_plan(model, WINDOWS[0]), backend="triton")
    processors = [m.processor for _, m in sparse_layers(model)]
    monkeypatch.setitem(sys.modules, "triton", None)  # not installed: the extra is named, nothing changes
    monkeypatch.delitem(sys.modules, "accel.sparse.triton_attention", raising=False)
    with pytest.raises(ImportError, match=r"diffusers-accel\[triton\]"):
        accel.apply(model, config)
    compiled = types.ModuleType("accel.sparse.triton_attention")
    compiled.INTERPRETED = False  # installed, compiled for a GPU: a CPU model is refused
    monkeypatch.setitem(sys.modules, "accel.sparse.triton_attention", compiled)
    with pytest.raises(ValueError, match="'triton' sparse-attention backend needs a CUDA model, but it is on cpu"):
        accel.apply(model, config)
    assert [m.processor for _, m in sparse_layers(model)] == processors


# ---------------------------------------------------------------------------------------- the compiled kernel

# 12 heads of a realistic layer: 8192 visual tokens (8 frames of 32 x 32) plus 226 text tokens first
GPU_GRID = TokenGrid(8, 32, 32, text=226, text_first=True)
GPU_PATTERNS = [
    HeadPattern(windows=((0, None, None),)),
    HeadPattern(windows=((None, 2, 2),)),
    HeadPattern(windows=((None, 2, 2), (0, None, None)), sink_frames=(0,)),
    HeadPattern(windows=((1, 8, 8),), sink_frames=(0, -1)),
    HeadPattern(windows=((2, None, None),)),
    HeadPattern(),
] * 2


def _assert_heads_within_bound(out, tensors, patterns, grid, dtype):
    """The reference bound, one head at a time (the reference's scores are length^2)."""
    for head, pattern in enumerate(patterns):
        per_head = [t[:, head : head + 1] for t in tensors]
        _assert_within_bound(out[:, head : head + 1], per_head, [pattern], grid, dtype)


def _compiled_module():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return _kernel_module()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel_tile", [(None, None), (64, 64)])  # autotuned, fixed
def test_compiled_kernel_meets_the_reference_bound_at_full_size(kernel_tile):
    triton_attention = _compiled_module()
    generator = torch.Generator("cuda").manual_seed(0)
    shape = (1, len(GPU_PATTERNS), GPU_GRID.length, 128)
    tensors = [torch.randn(shape, device="cuda", generator=generator) for _ in range(3)]
    launch = triton_attention.TritonSparseAttention.build(GPU_PATTERNS, GPU_GRID, "cuda")
    out = launch(*(t.bfloat16() for t in tensors), block_m=kernel_tile[0], block_n=kernel_tile[1])
    _assert_heads_within_bound(out, tensors, GPU_PATTERNS, GPU_GRID, torch.bfloat16)


@pytest.mark.gpu
def test_auto_backend_on_cuda_runs_the_kernel_compiled_and_eager():
    _compiled_module()
    layer = LayerAttention([HeadPattern.dense(), HeadPattern.skip(), *GPU_PATTERNS[:4]], GPU_GRID, "cuda")
    assert layer.backend == "triton" and 0 < layer.block_density() < 1
    generator = torch.Generator("cuda").manual_seed(1)
    tensors = [torch.randn(1, 6, GPU_GRID.length, 64, device="cuda", generator=generator) for _ in range(3)]
    low = [t.half() for t in tensors]
    eager = layer(*low)
    compiled = torch.compile(layer.__call__, fullgraph=True)(*low)
    sparse = layer.sparse_heads
    assert torch.equal(compiled[:, sparse], eager[:, sparse])  # the custom op runs as is inside the graph
    assert (compiled.float() - eager.float()).abs().max() <= 2e-3  # dense heads: SDPA, maybe another kernel
    _assert_heads_within_bound(eager, tensors, layer.patterns, GPU_GRID, torch.float16)


# --------------------------------------------------------------------------- compiled for a GPU, without one


@pytest.mark.parametrize("table_tiles", [(32, 32), (64, 128), (128, 128)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_autotune_configs_fit_the_table(table_tiles, head_dim):
    triton_attention = _kernel_module()
    sizes = dict(SPARSE_Q=table_tiles[0], SPARSE_KV=table_tiles[1], BLOCK_D=head_dim)
    configs = triton_attention._fitting_configs(triton_attention._CONFIGS, {}, **sizes)
    assert configs
    for config in configs:
        assert table_tiles[0] % config.kwargs["BLOCK_M"] == 0 and table_tiles[1] % config.kwargs["BLOCK_N"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype, head_dim", [("bf16", 128), ("fp16", 80), ("fp32", 32)])
def test_every_autotune_config_compiles_for_hopper(dtype, head_dim):
    """Each config the autotuner may pick, compiled to a cubin for sm_90 on this machine (no GPU needed)."""
    triton_attention = _kernel_module()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    kernel = triton_attention._sparse_attention_kernel
    pointers = dict.fromkeys(("Q", "K", "V", "Out"), f"*{dtype}")
    pointers.update(dict.fromkeys(("KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX", "WINDOW"), "*i32"), STRIPES="*i8")
    sizes = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()), SPARSE_Q=128, SPARSE_KV=128)
    for config in triton_attention._fitting_configs(triton_attention._CONFIGS, {}, **sizes):
        constants = dict(
            sizes, **config.kwargs, NUM_WINDOWS=2, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False
        )
        signature = {
            name: pointers.get(name) or ("constexpr" if name in constants else "fp32" if name == "qk_scale" else "i32")
            for name in kernel.arg_names
        }
        source = ASTSource(kernel, signature, {(kernel.arg_names.index(n),): v for n, v in constants.items()})
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        compiled = compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.asm["cubin"] and compiled.metadata.shared <= 228 * 1024, config


@pytest.mark.gpu
def test_runs_backend_on_cuda_meets_the_reference_bound_compiled_and_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    grid = TokenGrid(8, 32, 32)  # frames of 1,024 tokens: whole tiles of 128, so frame windows run unmasked
    layer = LayerAttention(GPU_PATTERNS, grid, "cuda", backend="runs")
    assert layer.launch.calls and 0 < layer.block_density() < 1
    generator = torch.Generator("cuda").manual_seed(2)
    tensors = [torch.randn(1, len(GPU_PATTERNS), grid.length, 64, device="cuda", generator=generator) for _ in range(3)]
    low = [t.bfloat16() for t in tensors]
    eager = layer(*low)
    compiled = torch.compile(layer.__call__, fullgraph=True)(*low)
    assert (compiled.float() - eager.float()).abs().max() <= 2e-2  # SDPA may pick another kernel compiled
    _assert_heads_within_bound(eager, tensors, layer.patterns, grid, torch.bfloat16)
