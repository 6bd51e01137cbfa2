"""Triton kernels for the passes over the per-sequence gradients G that cuBLAS runs far from memory speed,
and for the interacting variant's B × B solve (``damped_solve``, one program instead of cuSOLVER's calls;
``interacting_weights``: the Gram kernel, then one program from its partials to the weights).

G is B rows of N = out·in columns (B ≈ 8, N in the millions). Its Gram matrix G Gᵀ (the NTK; its diagonal
holds N_i²) is a matmul with a huge inner dimension and an 8 × 8 output, for which cuBLAS picks a split-K
kernel; the weighted sum wᵀG is a matrix–vector product. On an H100 at Qwen3-0.6B shapes both ran 3–6×
slower than reading G once takes (BENCHMARKS.md, session 8). Here each is one read of G: every program
loads a (B, BLOCK) tile at a time, the Gram kernel multiplies it with its own transpose into a float32
B × B partial per program (summed afterwards: deterministic, no atomics), the weighted-sum kernel reduces
it over B in float32.

Used for CUDA tensors (``usable``) when ``IsopoConfig.triton_kernels`` is set (the default: on an H200 they
cut the layers' GPU time by a third to a half; BENCHMARKS.md, session 11) and Triton is installed (it comes
with CUDA builds of torch). With TRITON_INTERPRET=1 in the environment before Triton is first imported (the
test suite sets it where there is no GPU), the same kernels run on CPU tensors in Triton's interpreter: the
check of their indexing and masking without a GPU. bf16 is the interpreter's weak spot (NumPy has no bf16):
there the tests use float32 and float16, and a GPU host's device tests cover bf16.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch without Triton: every caller keeps its torch path
    triton = None
try:  # host-side tensor descriptors (Triton 3.3 on): the fused norms-and-overlap kernel's loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


MAX_ROWS = 64
"""More sequences than this per micro-batch take the torch path: the Gram tile (rows × rows) grows as B²."""
BLOCK = 256
"""Columns of G per tile of the Gram kernel."""
GRAM_WARPS = 4
GRAM_STAGES = 3
"""The Gram kernel's warps and software-pipeline depth (Triton's defaults): it reads G at ~1.4 TB/s on an
H200, a third of memory speed; ``python -m bench.kernel_configs`` times the alternatives."""
GRAM_WAVES = 4
"""Gram programs per multiprocessor (about): more keep more of G's reads in flight, and leave more partials
to sum."""
GRAM_IMPL = "dot"
"""How the Gram kernel multiplies: "dot", each (rows, BLOCK) tile by its transpose on the tensor cores (rows
padded to 16); "outer", the rows' outer product per column on the CUDA cores, summed over columns once at
the end (``_gram_outer_kernel``: the weighted sum's read pattern, which reads G near memory speed, and
ROWS² float32 products a column, for B ≤ ``OUTER_MAX_ROWS``); "tma", "dot"'s products with each tile loaded
by one tensor-descriptor copy (``_gram_tma_kernel``: TMA on a Hopper GPU, no address or mask per element,
zeros past B filled by the copy engine), where G's columns are whole rows of ``TMA_BLOCK``.
``python -m bench.kernel_configs`` times all three."""
OUTER_MAX_ROWS = 16
OUTER_BLOCK = 128
OUTER_WARPS = 4
"""The outer-product Gram kernel's columns per tile (for B ≤ 8; narrower past it) and warps: its accumulator
holds ROWS² × columns float32 values per program, 64 a thread at B = 8 with 128 columns and 4 warps."""
TMA_BLOCK = 256
TMA_SUB = 4
TMA_WARPS = 4
TMA_STAGES = 2
"""The descriptor Gram kernel's tiles: G (B, N) viewed as (B, N / TMA_BLOCK, TMA_BLOCK) (a copy's box is at most
256 elements a side), TMA_SUB of its rows a tile (fewer past 16 sequences, to keep a tile's bytes); its
warps and pipeline depth. For sm_90a these take 32 registers a thread, none spilled, 32 KiB of shared
memory a stage (``python -m bench.kernel_compile``)."""
FORM_IMPL = "bmm"
"""How the interacting variant's graphed and eager layer tails get G and its Gram matrix on the kernel path:
"bmm", torch's batched matmul, then the Gram kernel's pass over G; "fused" (``form_and_gram_parts``), one
kernel that forms G and takes each tile's share of the Gram matrix from L2 right after writing it. Read when a
layer's plan is made (per shape) and by each eager call. ``python -m bench.kernel_configs`` times both."""
FORM_BLOCK_M = 128
FORM_BLOCK_N = 128
FORM_BLOCK_K = 64
FORM_GRAM_ROWS = 2
FORM_WARPS = 8
FORM_STAGES = 3
"""The formation-with-Gram kernel's tiles of G (rows, columns), its step along T, the rows of a tile its Gram
share reads at a time, warps and pipeline depth (``form_and_gram_parts``; for sm_90a 90 registers, none
spilled, 96 KiB of shared memory: ``python -m bench.kernel_compile``)."""
NORMS_IMPL = "torch"
"""Where the non-interacting norms ‖G_i‖ of the kernel path come from: "torch" (``vector_norm``, ~2.6 TB/s on
an H200) or "kernel" (``row_norms``). ``python -m bench.kernel_configs`` times both."""
NORMS_BLOCK = 1024
NORMS_WARPS = 4
"""The row-norm kernel's columns per tile and warps (``row_norms``: the sums of squares in the weighted
sum's read pattern)."""
OVERLAP_IMPL = "torch"
"""Where the non-interacting overlap numerators δ_kᵀ G_i a_k, and the norms ‖G_i‖ with them, come from on the
kernel path: "torch", a batched matmul of the sample's δ_k against each G_i, a batched dot with a_k, and the
norms in a pass of their own (on an H200, 5.2 and 2.7 ms a step over Qwen3-0.6B's decoder layers, the matmul at
about half of its FLOPs' speed); "fused" (``norms_and_overlap``), one kernel that reads each tile of G once,
multiplies it by the δ_k on the tensor cores, dots the product with a_k and sums the tile's squares.
``python -m bench.kernel_configs`` times both."""
OVERLAP_MAX_SAMPLES = 256
"""More samples than this take the torch path: the fused kernel holds a samples × columns float32 product."""
OVERLAP_BLOCK_N = 64
OVERLAP_BLOCK_M = 64
OVERLAP_WARPS = 8
OVERLAP_STAGES = 3
"""The fused kernel's columns of G per program, rows per step of its loop, warps and pipeline depth."""
OVERLAP_WAVES = 2
"""Fused-kernel programs per multiprocessor (about): a layer with few column blocks splits its rows among
more programs, each with at least four steps of its loop."""
SUM_BLOCK = 1024
"""Columns of G per program of the weighted-sum kernel: a pure read of G, which wants long rows per program
(256, with the rows padded to 16, ran at a tenth of memory speed on an H200; BENCHMARKS.md, session 11).
``python -m bench.kernel_configs`` times the alternatives on a GPU."""
SUM_WARPS = 4
SOLVE_WARPS = 1
"""Warps of the B × B solve's one program (``damped_solve``): on the 8-row tile of B = 8 an H200 ran it in
5.0 µs with 1 warp, 6.1 with 2 and 6.2 with 4 (graph replays, ``python -m bench.kernel_configs``, session 14)."""
WEIGHTS_WARPS = 1
"""Warps of the one program from the statistics to the weights (``interacting_weights``: tr K, λ and the
solve; ``non_interacting_weights``): 1 to 4 ran alike on an H200 (BENCHMARKS.md, session 11)."""
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@contextlib.contextmanager
def settings(**values) -> Iterator[None]:
    """This module's launch constants (``GRAM_IMPL``, ``SUM_BLOCK``, ...) set to ``values`` for the block, then
    restored: how ``bench.kernel_configs`` times the candidates and ``bench overhead`` runs a mode with
    another kernel. A CUDA graph captured inside keeps the kernels it captured."""
    unknown = [name for name in values if not (name.isupper() and not name.startswith("_") and name in globals())]
    if unknown:
        raise ValueError(f"unknown kernel setting(s): {', '.join(unknown)}")
    old = {name: globals()[name] for name in values}
    globals().update(values)
    try:
        yield
    finally:
        globals().update(old)


def available() -> bool:
    return triton is not None


def usable(g: torch.Tensor) -> bool:
    """Whether ``g`` (B, N) goes through these kernels: a contiguous CUDA tensor of a float type, B ≤ 64,
    and fewer than 2³¹ elements (the kernels index in int32)."""
    return (triton is not None and g.is_cuda and g.dtype in _DTYPES and g.dim() == 2
            and g.shape[0] <= MAX_ROWS and g.numel() < 2**31 and g.is_contiguous())


def _rows(b: int) -> int:
    # tl.arange takes a power of two; 2 at least, to stay clear of one-element blocks.
    return max(2, triton.next_power_of_2(b))


def _rows_padded(b: int) -> int:
    # tl.dot needs tiles of at least 16 rows; padding rows load as zeros.
    return max(16, triton.next_power_of_2(b))


@_jit
def _load_tile(g_ptr, rows, cols, B, N):
    # Rows `rows` × columns `cols` of g (B, N), zeros outside it.
    mask = (rows[:, None] < B) & (cols[None, :] < N)
    return tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)


@_jit
def _store_partial(part_ptr, pid, acc, rows, B):
    # Program pid's (B, B) partial of g gᵀ from its (ROWS, ROWS) tile acc, the padding rows and columns left out.
    inside = (rows[:, None] < B) & (rows[None, :] < B)
    tl.store(part_ptr + pid * B * B + rows[:, None] * B + rows[None, :], acc, mask=inside)


@_jit
def _weighted_sum_kernel(g_ptr, w_ptr, out_ptr, B, N, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + rows, mask=rows < B, other=0.0).to(tl.float32)
    tile = _load_tile(g_ptr, rows, cols, B, N)
    total = tl.sum(tile.to(tl.float32) * w[:, None], axis=0)
    tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=cols < N)


@_jit
def _gram_kernel(g_ptr, part_ptr, B, N, ROWS: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr,
                 IEEE: tl.constexpr):
    # Program p: its run of STEPS tiles' share of g gᵀ, stored as the (B, B) partial p (the padding rows'
    # and columns' zeros left out: the sum reads a quarter of the bytes at B = 8).
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, ROWS), dtype=tl.float32)
    for step in range(STEPS):
        tile = _load_tile(g_ptr, rows, (pid * STEPS + step) * BLOCK + tl.arange(0, BLOCK), B, N)
        if IEEE:  # float32 G: full float32 products, not TF32
            acc += tl.dot(tile, tl.trans(tile), input_precision="ieee")
        else:
            acc += tl.dot(tile, tl.trans(tile))
    _store_partial(part_ptr, pid, acc, rows, B)


@_jit
def _gram_tma_kernel(g_desc, part_ptr, B, ROWS: tl.constexpr, SUB: tl.constexpr, BLOCK: tl.constexpr,
                     STEPS: tl.constexpr, IEEE: tl.constexpr):
    # As _gram_kernel, each tile (ROWS, SUB · BLOCK) one descriptor load of G viewed as (B, N / BLOCK, BLOCK).
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, ROWS), dtype=tl.float32)
    for step in range(STEPS):
        tile = g_desc.load([0, (pid * STEPS + step) * SUB, 0]).reshape(ROWS, SUB * BLOCK)
        if IEEE:
            acc += tl.dot(tile, tl.trans(tile), input_precision="ieee")
        else:
            acc += tl.dot(tile, tl.trans(tile))
    _store_partial(part_ptr, pid, acc, rows, B)


@_jit
def _form_gram_kernel(d_desc, a_desc, g_ptr, part_ptr, count_ptr, B, T, D_OUT, D_IN, ROWS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GRAM_ROWS: tl.constexpr,
                      IEEE: tl.constexpr):
    # Program (tile, i), tile-major so a tile's B programs run together: G_i's tile δ_iᵀ a_i over T (tensor
    # descriptors: zeros past T, D_OUT, D_IN), stored in G's dtype. The tile's last program to arrive (a counter
    # per tile, acquire-release at GPU scope) reads the B stored tiles back while they are in L2 (.cg: not
    # through L1) and stores their share of G Gᵀ as partial `tile`, then zeroes the tile's counter again (the
    # next launch on the same counters, in stream order, finds them zero).
    pid = tl.program_id(0)
    i = pid % B
    tile = pid // B
    tiles_n = tl.cdiv(D_IN, BLOCK_N)
    m0 = (tile // tiles_n) * BLOCK_M
    n0 = (tile % tiles_n) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, T, BLOCK_K):
        d = d_desc.load([i, t, m0]).reshape(BLOCK_K, BLOCK_M)
        a = a_desc.load([i, t, n0]).reshape(BLOCK_K, BLOCK_N)
        if IEEE:
            acc += tl.dot(tl.trans(d), a, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(d), a)
    m = m0 + tl.arange(0, BLOCK_M)
    n = n0 + tl.arange(0, BLOCK_N)
    tl.store(g_ptr + i * D_OUT * D_IN + m[:, None] * D_IN + n[None, :], acc.to(g_ptr.dtype.element_ty),
             mask=(m[:, None] < D_OUT) & (n[None, :] < D_IN))
    tl.debug_barrier()  # every thread's stores before the one release below
    arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == B - 1:
        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, GRAM_ROWS * BLOCK_N)
        gram = tl.zeros((ROWS, ROWS), dtype=tl.float32)
        for r in range(0, BLOCK_M, GRAM_ROWS):
            mm = m0 + r + cols // BLOCK_N
            nn = n0 + cols % BLOCK_N
            x = tl.load(g_ptr + rows[:, None] * D_OUT * D_IN + (mm * D_IN + nn)[None, :],
                        mask=(rows[:, None] < B) & ((mm < D_OUT) & (nn < D_IN))[None, :], other=0.0,
                        cache_modifier=".cg")
            if IEEE:
                gram += tl.dot(x, tl.trans(x), input_precision="ieee")
            else:
                gram += tl.dot(x, tl.trans(x))
        _store_partial(part_ptr, tile, gram, rows, B)
        tl.atomic_xchg(count_ptr + tile, 0)


@_jit
def _gram_outer_kernel(g_ptr, part_ptr, B, N, ROWS: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    # Program p: its run of STEPS tiles' share of g gᵀ as each column's outer product, accumulated per column
    # in float32 and summed over the columns once, at the end (no tensor-core tile, no padding rows).
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, ROWS, BLOCK), dtype=tl.float32)
    for step in range(STEPS):
        tile = _load_tile(g_ptr, rows, (pid * STEPS + step) * BLOCK + tl.arange(0, BLOCK), B, N).to(tl.float32)
        acc += tile[:, None, :] * tile[None, :, :]
    total = tl.sum(acc, axis=2)
    _store_partial(part_ptr, pid, total, rows, B)


@_jit
def _row_squares_kernel(g_ptr, part_ptr, B, N, ROWS: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    # Program p: each row's float32 sum of squares over its run of STEPS tiles, stored as the (B,) partial p.
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for step in range(STEPS):
        tile = _load_tile(g_ptr, rows, (pid * STEPS + step) * BLOCK + tl.arange(0, BLOCK), B, N).to(tl.float32)
        acc += tile * tile
    tl.store(part_ptr + pid * B + rows, tl.sum(acc, axis=1), mask=rows < B)


@_jit
def _norm_overlap_kernel(g_desc, dk_desc, ak_ptr, num_ptr, sq_ptr, K, D_IN, AK_STRIDE,
                         SAMPLES: tl.constexpr, ROWS_PER: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, NORM: tl.constexpr, IEEE: tl.constexpr):
    # Program (i, c, s): sequence i, columns c·BLOCK_N onwards, rows s·ROWS_PER onwards. Its partial of
    # δ_kᵀ G_i a_k over those rows and columns for every sample k: the samples' δ_k (SAMPLES, BLOCK_M) times
    # each (BLOCK_M, BLOCK_N) tile of G_i, accumulated in float32, then each row's dot with a_k over the
    # columns; with NORM, its partial of Σ G_i² from the same tiles. g_desc (G, (B, D_OUT, D_IN)) and dk_desc
    # (δ_k, (K, D_OUT)) are tensor descriptors, whose loads (TMA on a Hopper GPU) hold no pointer per element
    # (for sm_90a 128 registers a thread against 158 with pointer tiles) and read zeros past the shape: past
    # K, D_OUT and D_IN, within G_i's own rows.
    i = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.program_id(2)
    acc = tl.zeros((SAMPLES, BLOCK_N), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, ROWS_PER, BLOCK_M):
        row = s * ROWS_PER + step
        d = dk_desc.load([0, row])
        tile = g_desc.load([i, row, c * BLOCK_N]).reshape(BLOCK_M, BLOCK_N)
        if IEEE:  # float32 G: full float32 products, not TF32
            acc += tl.dot(d, tile, input_precision="ieee")
        else:
            acc += tl.dot(d, tile)
        if NORM:
            wide = tile.to(tl.float32)
            sq += wide * wide
    samples = tl.arange(0, SAMPLES)
    cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
    a = tl.load(ak_ptr + samples[:, None] * AK_STRIDE + cols[None, :],
                mask=(samples[:, None] < K) & (cols[None, :] < D_IN), other=0.0)
    program = (i * tl.num_programs(1) + c) * tl.num_programs(2) + s
    tl.store(num_ptr + program * SAMPLES + samples, tl.sum(acc * a.to(tl.float32), axis=1))
    if NORM:
        tl.store(sq_ptr + program, tl.sum(tl.sum(sq, axis=1), axis=0))


@_jit
def _damped_solve_rows(k, adv, lam, B, ROWS: tl.constexpr):
    # λ (K + λI)⁻¹ A for a (ROWS, ROWS) tile k whose rows and columns from B on are padding: K + λI in float64
    # (padding: the identity), solved by Gauss–Jordan elimination without pivoting, one chain of ROWS steps
    # (a Cholesky factor and its two triangular solves were three chains, each step a few block-wide
    # reductions: the program's time is that chain). For an SPD matrix the pivots are the Cholesky
    # factorisation's (before its square roots), all positive: A itself where λ ≤ 0 or a pivot is not.
    rows = tl.arange(0, ROWS)
    inside = (rows[:, None] < B) & (rows[None, :] < B)
    eye = rows[:, None] == rows[None, :]
    lam = lam.to(tl.float64)
    k = k.to(tl.float64)
    a = tl.where(inside, k + tl.where(eye, lam, 0.0), tl.where(eye, 1.0, 0.0))
    adv = adv.to(tl.float64)
    x = adv
    ok = lam > 0
    for j in range(ROWS):
        col = tl.sum(tl.where(rows[None, :] == j, a, 0.0), axis=1)  # column j
        row = tl.sum(tl.where(rows[:, None] == j, a, 0.0), axis=0)  # row j
        pivot = tl.sum(tl.where(rows == j, col, 0.0), axis=0)
        ok = ok & (pivot > 0)
        row = row / tl.where(pivot > 0, pivot, 1.0)
        xj = tl.sum(tl.where(rows == j, x, 0.0), axis=0) / tl.where(pivot > 0, pivot, 1.0)
        others = tl.where(rows == j, 0.0, col)  # every other row loses its column-j entry
        a = tl.where(rows[:, None] == j, row[None, :], a - others[:, None] * row[None, :])
        x = tl.where(rows == j, xj, x - others * xj)
    return tl.where(ok, lam * x, adv)


@_jit
def _damped_solve_kernel(k_ptr, adv_ptr, lam_ptr, out_ptr, B, ROWS: tl.constexpr):
    rows = tl.arange(0, ROWS)
    inside = (rows[:, None] < B) & (rows[None, :] < B)
    k = tl.load(k_ptr + rows[:, None] * B + rows[None, :], mask=inside, other=0.0)
    adv = tl.load(adv_ptr + rows, mask=rows < B, other=0.0)
    w = _damped_solve_rows(k, adv, tl.load(lam_ptr), B, ROWS)
    tl.store(out_ptr + rows, w.to(out_ptr.dtype.element_ty), mask=rows < B)


@_jit
def _row_norm_product_kernel(a_ptr, d_ptr, out_ptr, D_IN, D_OUT, BLOCK: tl.constexpr):
    # Program k: ‖δ_k‖ · ‖a_k‖ for row k of the overlap sample, float32 sums of squares.
    k = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    a_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    start = 0
    while start < D_IN:  # while loops: Triton's interpreter cannot take range() over a run-time bound
        x = tl.load(a_ptr + k * D_IN + start + cols, mask=start + cols < D_IN, other=0.0).to(tl.float32)
        a_sq += x * x
        start += BLOCK
    d_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    start = 0
    while start < D_OUT:
        x = tl.load(d_ptr + k * D_OUT + start + cols, mask=start + cols < D_OUT, other=0.0).to(tl.float32)
        d_sq += x * x
        start += BLOCK
    tl.store(out_ptr + k, tl.sqrt(tl.sum(d_sq, axis=0)) * tl.sqrt(tl.sum(a_sq, axis=0)))


@_jit
def _power(x, e):
    # x^e for x ≥ 0 as torch.pow gives it: 0 to a negative power is inf, to a positive one 0; NaN stays NaN.
    return tl.exp2(e * tl.log2(x))


@_jit
def _non_interacting_kernel(norm_ptr, num_ptr, prod_ptr, adv_ptr, out_ptr, B, K, NUM_STRIDE_B, NUM_STRIDE_K, EXP_N,
                            EXP_O, HAS_N: tl.constexpr, HAS_O: tl.constexpr, ROWS: tl.constexpr,
                            KBLOCK: tl.constexpr):
    # One program, the unregularised non-interacting rule w = A N^(p−r) O^(q+r) from the norms N (B,), the
    # overlap numerators (B, K; strided as given: in bf16 they come transposed) and the sample's ‖δ_k‖·‖a_k‖
    # (K,); 0 where the rule gives NaN or ±inf, as torch.nan_to_num does on the torch path.
    rows = tl.arange(0, ROWS)
    w = tl.load(adv_ptr + rows, mask=rows < B, other=0.0).to(tl.float32)
    if HAS_N:
        norm = tl.load(norm_ptr + rows, mask=rows < B, other=0.0).to(tl.float32)
        w = w * _power(norm, EXP_N)
    if HAS_O:
        cols = tl.arange(0, KBLOCK)
        num_sq = tl.zeros((ROWS,), dtype=tl.float32)
        den_sq = tl.zeros((KBLOCK,), dtype=tl.float32)
        start = 0
        while start < K:  # a while loop: Triton's interpreter cannot take range() over a run-time bound
            inside = start + cols < K
            num = tl.load(num_ptr + rows[:, None] * NUM_STRIDE_B + (start + cols[None, :]) * NUM_STRIDE_K,
                          mask=(rows[:, None] < B) & inside[None, :], other=0.0).to(tl.float32)
            num_sq += tl.sum(num * num, axis=1)
            prod = tl.load(prod_ptr + start + cols, mask=inside, other=0.0)
            den_sq += prod * prod
            start += KBLOCK
        overlap = tl.sqrt(num_sq) / tl.sqrt(tl.sum(den_sq, axis=0))
        w = w * _power(overlap, EXP_O)
    finite = tl.abs(w) <= 3.4028234663852886e38  # the largest float32: false for NaN and ±inf
    tl.store(out_ptr + rows, tl.where(finite, w, 0.0).to(out_ptr.dtype.element_ty), mask=rows < B)


@_jit
def _interacting_kernel(k_ptr, adv_ptr, ema_ptr, out_ptr, trace_ptr, cursor_ptr, B, c_lambda,
                        HAS_EMA: tl.constexpr, AT_CURSOR: tl.constexpr, ROWS: tl.constexpr):
    # One program, the whole interacting rule from the (B, B) NTK: tr K / B (stored: the
    # statistic the EMA records), λ = c_λ · (EMA or tr K / B), then the damped solve on a ROWS × ROWS tile.
    # AT_CURSOR: the EMA and the trace are a graph's slot arrays, read and written at the cursor, which this
    # program then advances (graphs.TailGraph).
    rows = tl.arange(0, ROWS)
    pos = 0
    if AT_CURSOR:
        pos = tl.load(cursor_ptr)
    inside = (rows[:, None] < B) & (rows[None, :] < B)
    k = tl.load(k_ptr + rows[:, None] * B + rows[None, :], mask=inside, other=0.0)
    eye = rows[:, None] == rows[None, :]
    mean_trace = tl.sum(tl.sum(tl.where(eye, k, 0.0), axis=1), axis=0) / B
    tl.store(trace_ptr + pos, mean_trace)
    if HAS_EMA:
        lam = tl.load(ema_ptr + pos).to(tl.float32) * c_lambda
    else:
        lam = mean_trace * c_lambda
    adv = tl.load(adv_ptr + rows, mask=rows < B, other=0.0)
    w = _damped_solve_rows(k, adv, lam, B, ROWS)
    tl.store(out_ptr + rows, w.to(out_ptr.dtype.element_ty), mask=rows < B)
    if AT_CURSOR:
        tl.store(cursor_ptr, pos + 1)


@functools.cache
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _steps(n: int, device: torch.device, block: int | None = None) -> int:
    """Tiles of ``block`` columns (default ``BLOCK``) per program of a reduction over G: enough programs to fill
    the device ``GRAM_WAVES`` times over, each a power-of-two run of tiles (one compiled variant per value, a
    handful in all)."""
    tiles = triton.cdiv(n, block or BLOCK)
    return min(64, triton.next_power_of_2(max(1, tiles // (GRAM_WAVES * _processors(device)))))


def weighted_sum(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i g_i for g (B, N) and w (B,), accumulated in float32, in g's dtype: (N,)."""
    b, n = g.shape
    out = torch.empty(n, dtype=g.dtype, device=g.device)
    _weighted_sum_kernel[(triton.cdiv(n, SUM_BLOCK),)](g, w.contiguous(), out, b, n, ROWS=_rows(b),
                                                       BLOCK=SUM_BLOCK, num_warps=SUM_WARPS)
    return out


def gram_parts(g: torch.Tensor) -> torch.Tensor:
    """The Gram kernel's per-program partials of g gᵀ for g (B, N), in float32: (P, B, B), summing to g gᵀ."""
    b, n = g.shape
    if GRAM_IMPL == "outer" and b <= OUTER_MAX_ROWS:
        rows = _rows(b)
        # The accumulator is rows² × block: past 8 rows the tile narrows to keep it at its size for 8.
        block = OUTER_BLOCK if rows <= 8 else max(16, OUTER_BLOCK * 64 // (rows * rows))
        steps = _steps(n, g.device, block)
        programs = triton.cdiv(n, block * steps)
        parts = torch.empty(programs, b, b, dtype=torch.float32, device=g.device)
        _gram_outer_kernel[(programs,)](g, parts, b, n, ROWS=rows, BLOCK=block, STEPS=steps, num_warps=OUTER_WARPS)
        return parts
    if GRAM_IMPL == "tma" and _gram_tma_ready(g):
        rows = _rows_padded(b)
        sub = max(1, TMA_SUB * 16 // rows)  # a tile's bytes as at 16 rows
        steps = _steps(n, g.device, sub * TMA_BLOCK)
        programs = triton.cdiv(n, sub * TMA_BLOCK * steps)
        parts = torch.empty(programs, b, b, dtype=torch.float32, device=g.device)
        desc = TensorDescriptor.from_tensor(g.view(b, n // TMA_BLOCK, TMA_BLOCK), [rows, sub, TMA_BLOCK])
        _gram_tma_kernel[(programs,)](desc, parts, b, ROWS=rows, SUB=sub, BLOCK=TMA_BLOCK, STEPS=steps,
                                      IEEE=g.dtype == torch.float32, num_warps=TMA_WARPS, num_stages=TMA_STAGES)
        return parts
    steps = _steps(n, g.device)
    programs = triton.cdiv(n, BLOCK * steps)
    parts = torch.empty(programs, b, b, dtype=torch.float32, device=g.device)
    _gram_kernel[(programs,)](g, parts, b, n, ROWS=_rows_padded(b), BLOCK=BLOCK, STEPS=steps,
                              IEEE=g.dtype == torch.float32, num_warps=GRAM_WARPS, num_stages=GRAM_STAGES)
    return parts


def _gram_tma_ready(g: torch.Tensor) -> bool:
    """Whether g (B, N) can be read through the descriptor Gram kernel: tensor descriptors available, N whole
    rows of ``TMA_BLOCK`` and the view's rows on 16-byte boundaries."""
    return (TensorDescriptor is not None and g.shape[1] % TMA_BLOCK == 0 and TMA_BLOCK * g.element_size() % 16 == 0
            and _descriptor_ready(g))


def formable(a3: torch.Tensor, d3: torch.Tensor) -> bool:
    """Whether ``form_and_gram_parts`` takes these sequences' inputs a3 (B, T, in) and output gradients d3
    (B, T, out): CUDA tensors of one float type, B ≤ 64, G under 2³¹ elements, laid out as tensor descriptors
    need (unit stride last, other strides and the start on 16-byte boundaries: a block of δ's columns whose
    first column is a multiple of 8 will do)."""
    return (TensorDescriptor is not None and a3.is_cuda and a3.dim() == d3.dim() == 3 and a3.dtype == d3.dtype
            and a3.dtype in _DTYPES and a3.shape[:2] == d3.shape[:2] and a3.shape[0] <= MAX_ROWS
            and a3.shape[0] * a3.shape[2] * d3.shape[2] < 2**31 and _descriptor_ready(a3) and _descriptor_ready(d3))


def formation_chosen(dtype: torch.dtype) -> bool:
    """Whether G of this dtype and its NTK come from ``form_and_gram_parts`` (``FORM_IMPL``), where the
    operands suit it (``formable``)."""
    return FORM_IMPL == "fused" and triton is not None and dtype in _DTYPES


def form_tiles(d_in: int, d_out: int) -> int:
    """The tiles of G (out × in) that ``form_and_gram_parts`` forms, one Gram partial each."""
    return triton.cdiv(d_out, FORM_BLOCK_M) * triton.cdiv(d_in, FORM_BLOCK_N)


def form_and_gram_parts(a3: torch.Tensor, d3: torch.Tensor, g: torch.Tensor | None = None,
                        parts: torch.Tensor | None = None,
                        arrivals: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, partials of G Gᵀ) in one kernel: G (B, out, in) = δ_iᵀ a_i per sequence in a3's dtype (what
    ``torch.bmm(d3.transpose(1, 2), a3)`` gives, accumulated in float32), and one float32 (B, B) partial per
    tile of G (``form_tiles``), summing to G Gᵀ of G as stored. The Gram kernel's separate read of G from
    memory becomes a read of each tile from L2 right after it is written. For ``formable`` inputs; g, parts
    and arrivals (int32 zeros, one per tile, zero again after the call) may be given, as a CUDA graph's
    static buffers are."""
    b, t, d_in = a3.shape
    d_out = d3.shape[2]
    tiles = form_tiles(d_in, d_out)
    g = torch.empty(b, d_out, d_in, dtype=a3.dtype, device=a3.device) if g is None else g
    parts = torch.empty(tiles, b, b, dtype=torch.float32, device=a3.device) if parts is None else parts
    if arrivals is None:
        arrivals = torch.zeros(tiles, dtype=torch.int32, device=a3.device)  # each tile's programs done so far
    if parts.shape != (tiles, b, b) or arrivals.shape != (tiles,) or g.shape != (b, d_out, d_in):
        raise ValueError(f"form_and_gram_parts: buffers of {tuple(parts.shape)} partials, {tuple(arrivals.shape)} "
                         f"counters, G {tuple(g.shape)}; this launch needs {tiles} tiles of G {(b, d_out, d_in)}")
    d_desc = TensorDescriptor.from_tensor(d3, [1, FORM_BLOCK_K, FORM_BLOCK_M])
    a_desc = TensorDescriptor.from_tensor(a3, [1, FORM_BLOCK_K, FORM_BLOCK_N])
    _form_gram_kernel[(tiles * b,)](d_desc, a_desc, g, parts, arrivals, b, t, d_out, d_in, ROWS=_rows_padded(b),
                                    BLOCK_M=FORM_BLOCK_M, BLOCK_N=FORM_BLOCK_N, BLOCK_K=FORM_BLOCK_K,
                                    GRAM_ROWS=FORM_GRAM_ROWS, IEEE=a3.dtype == torch.float32,
                                    num_warps=FORM_WARPS, num_stages=FORM_STAGES)
    return g, parts


def row_norms(g: torch.Tensor) -> torch.Tensor:
    """‖g_i‖ for g (B, N), from float32 sums of squares: (B,)."""
    b, n = g.shape
    steps = _steps(n, g.device, NORMS_BLOCK)
    programs = triton.cdiv(n, NORMS_BLOCK * steps)
    parts = torch.empty(programs, b, dtype=torch.float32, device=g.device)
    _row_squares_kernel[(programs,)](g, parts, b, n, ROWS=_rows(b), BLOCK=NORMS_BLOCK, STEPS=steps,
                                     num_warps=NORMS_WARPS)
    return parts.sum(0).sqrt()


def overlap_fusable(g: torch.Tensor, a_k: torch.Tensor, d_k: torch.Tensor) -> bool:
    """Whether the overlap numerators of g (B, out, in) and the sample rows a_k (K, in), d_k (K, out) go
    through the fused kernel (``OVERLAP_IMPL = "fused"``): a contiguous CUDA G of a float type, B ≤ 64, fewer
    than 2³¹ elements, 1 ≤ K ≤ ``OVERLAP_MAX_SAMPLES``, d_k in G's dtype, and G and d_k laid out as tensor
    descriptors need (rows of whole 16-byte units, 16-byte aligned)."""
    return (OVERLAP_IMPL == "fused" and TensorDescriptor is not None and g.dim() == 3 and g.is_contiguous()
            and usable(g.view(g.shape[0], -1)) and 0 < a_k.shape[0] <= OVERLAP_MAX_SAMPLES and d_k.dtype == g.dtype
            and _descriptor_ready(g) and _descriptor_ready(d_k))


def _descriptor_ready(t: torch.Tensor) -> bool:
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(stride * size % 16 == 0 for stride in t.stride()[:-1]))


def norms_and_overlap(g: torch.Tensor, a_k: torch.Tensor, d_k: torch.Tensor,
                      need_norm: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(‖G_i‖ or None, δ_kᵀ G_i a_k) for g (B, out, in), the sample rows a_k (K, in) and d_k (K, out; a view
    of some of a wider δ_k's columns will do), as ``overlap_fusable`` admits them: one read of G. Both
    float32: (B,) and (B, K)."""
    b, d_out, d_in = g.shape
    k = a_k.shape[0]
    a_k = a_k if a_k.stride(1) == 1 else a_k.contiguous()
    samples = _rows_padded(k)
    columns = triton.cdiv(d_in, OVERLAP_BLOCK_N)
    # Rows split among programs where the column blocks alone leave the device under-filled.
    want = triton.cdiv(OVERLAP_WAVES * _processors(g.device), b * columns)
    split = max(1, min(triton.next_power_of_2(want), d_out // (4 * OVERLAP_BLOCK_M)))
    rows_per = triton.cdiv(triton.cdiv(d_out, split), OVERLAP_BLOCK_M) * OVERLAP_BLOCK_M
    split = triton.cdiv(d_out, rows_per)
    num = torch.empty(b, columns * split, samples, dtype=torch.float32, device=g.device)
    sq = torch.empty(b, columns * split, dtype=torch.float32, device=g.device) if need_norm else num
    g_desc = TensorDescriptor.from_tensor(g, [1, OVERLAP_BLOCK_M, OVERLAP_BLOCK_N])
    dk_desc = TensorDescriptor.from_tensor(d_k, [samples, OVERLAP_BLOCK_M])
    _norm_overlap_kernel[(b, columns, split)](g_desc, dk_desc, a_k, num, sq, k, d_in, a_k.stride(0),
                                              SAMPLES=samples, ROWS_PER=rows_per, BLOCK_M=OVERLAP_BLOCK_M,
                                              BLOCK_N=OVERLAP_BLOCK_N, NORM=need_norm,
                                              IEEE=g.dtype == torch.float32, num_warps=OVERLAP_WARPS,
                                              num_stages=OVERLAP_STAGES)
    return (sq.sum(1).sqrt() if need_norm else None), num.sum(1)[:, :k]


def gram(g: torch.Tensor) -> torch.Tensor:
    """g gᵀ for g (B, N), in float32: (B, B)."""
    return gram_parts(g).sum(0)


def interacting_weights(g: torch.Tensor, adv: torch.Tensor, ema_trace: torch.Tensor | None, c_lambda: float,
                        slots: tuple[torch.Tensor, torch.Tensor] | None = None,
                        parts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The interacting rule from the per-sequence gradients g (B, N): the Gram kernel, torch's sum of its
    partials (one parallel reduction; one program summing them ran 40 µs a layer on an H200), and one program
    for the rest: (Ã = λ (K + λI)⁻¹ A in float32, tr K / B) with λ = c_λ · ema_trace, or c_λ · tr K / B where
    there is no EMA yet (``weights.interacting_weights``, the torch path, computes the same).

    slots: a CUDA graph visit's (cursor, trace slots) (``graphs.TailGraph``). Then ema_trace is the EMA's slot
    array (or None), the program reads it and writes tr K / B at cursor[0] and advances the cursor — in a
    graph, three one-element kernels fewer a layer — and the trace slots are what is returned. parts: G Gᵀ's
    partials already taken (``form_and_gram_parts``), instead of the Gram kernel's pass over g."""
    b = g.shape[0]
    ntk = (gram_parts(g) if parts is None else parts).sum(0)
    w = torch.empty(b, dtype=torch.float32, device=g.device)
    if slots is None:
        cursor, trace = w, torch.empty((), dtype=torch.float32, device=g.device)  # cursor: not read
    else:
        cursor, trace = slots
    has_ema = ema_trace is not None
    # The solve's tile is B rounded up to a power of two, not the Gram kernel's 16 rows at least: its
    # elimination is a chain of one step per row.
    _interacting_kernel[(1,)](ntk, adv.contiguous(), ema_trace if has_ema else trace, w, trace, cursor, b,
                              float(c_lambda), HAS_EMA=has_ema, AT_CURSOR=slots is not None,
                              ROWS=_rows(b), num_warps=WEIGHTS_WARPS)
    return w, trace


def damped_solve(k: torch.Tensor, adv: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """λ (K + λI)⁻¹ A for the B × B NTK k, by Gauss–Jordan elimination in float64 in one program (cuSOLVER's
    Cholesky factorisation alone took 33 µs of GPU time for an 8 × 8 matrix on an H100); A itself where λ ≤ 0
    or a pivot is not positive (K + λI not positive definite). In k's dtype: (B,)."""
    b = k.shape[0]
    out = torch.empty(b, dtype=k.dtype, device=k.device)
    _damped_solve_kernel[(1,)](k.contiguous(), adv.contiguous(), lam.reshape(1), out, b, ROWS=_rows(b),
                               num_warps=SOLVE_WARPS)
    return out


def non_interacting_weights(norm: torch.Tensor | None, overlap_num: torch.Tensor, a_k: torch.Tensor,
                            d_k: torch.Tensor, adv: torch.Tensor, exp_norm: float, exp_overlap: float) -> torch.Tensor:
    """The unregularised non-interacting rule w = A N^exp_norm O^exp_overlap (``weights.non_interacting_weights``
    with no regularisation: exp_norm = p − r, exp_overlap = q + r) in two kernels: ‖δ_k‖·‖a_k‖ for the sample
    rows a_k (K, in) and d_k (K, out), and one program for the rest. norm: (B,) N_i = ‖G_i‖ (None where
    exp_norm = 0; torch's vector norm reads G twice as fast as the Gram kernel on an H200);
    overlap_num: (B, K) δ_kᵀ G_i a_k, any strides. In float32: (B,)."""
    b, k = overlap_num.shape
    has_norm, has_overlap = exp_norm != 0, exp_overlap != 0
    w = torch.empty(b, dtype=torch.float32, device=overlap_num.device)
    rows = _rows(b)
    prod = w  # not read
    if has_overlap:
        prod = torch.empty(k, dtype=torch.float32, device=overlap_num.device)
        a_k, d_k = a_k.contiguous(), d_k.contiguous()
        _row_norm_product_kernel[(k,)](a_k, d_k, prod, a_k.shape[1], d_k.shape[1], BLOCK=BLOCK)
    # The numerators as they come (no copy: a kernel of its own in a graph), read through their strides.
    _non_interacting_kernel[(1,)](norm.contiguous() if has_norm else w, overlap_num, prod, adv.contiguous(), w, b, k,
                                  overlap_num.stride(0), overlap_num.stride(1), float(exp_norm), float(exp_overlap),
                                  HAS_N=has_norm, HAS_O=has_overlap, ROWS=rows, KBLOCK=max(16, min(256, 4096 // rows)),
                                  num_warps=WEIGHTS_WARPS)
    return w
