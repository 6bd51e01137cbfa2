"""Triton kernels for the passes over the per-sequence gradients G that cuBLAS runs far from memory speed.

G is B rows of N = out·in columns (B ≈ 8, N in the millions). Its Gram matrix G Gᵀ (the NTK; its diagonal
holds N_i²) is a matmul with a huge inner dimension and an 8 × 8 output, for which cuBLAS picks a split-K
kernel; the weighted sum wᵀG is a matrix–vector product. On an H100 at Qwen3-0.6B shapes both ran 3–6×
slower than reading G once takes (BENCHMARKS.md, session 8). Here each is one read of G: every program
loads a (B, BLOCK) tile at a time, the Gram kernel multiplies it with its own transpose into a float32
B × B partial per program (summed afterwards: deterministic, no atomics), the weighted-sum kernel reduces
it over B in float32.

Used for CUDA tensors (``usable``) when ``IsopoConfig.triton_kernels`` is set (off by default: on an H100 the
step was slower with them, their Python launches costing the host more than they save the GPU; BENCHMARKS.md)
and Triton is installed (it comes with CUDA builds of torch). With TRITON_INTERPRET=1 in the environment
before Triton is first imported (the test suite sets it where there is no GPU), the same kernels run on CPU
tensors in Triton's interpreter: the check of their indexing and masking without a GPU. bf16 is the interpreter's weak spot (NumPy has no bf16): there the tests use float32 and
float16, and a GPU host's device tests cover bf16.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch without Triton: every caller keeps its torch path
    triton = None


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn

MAX_ROWS = 64
"""More sequences than this per micro-batch take the torch path: the Gram tile (rows × rows) grows as B²."""
BLOCK = 256
"""Columns of G per tile."""
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    return triton is not None


def usable(g: torch.Tensor) -> bool:
    """Whether ``g`` (B, N) goes through these kernels: a contiguous CUDA tensor of a float type, B ≤ 64,
    and fewer than 2³¹ elements (the kernels index in int32)."""
    return (triton is not None and g.is_cuda and g.dtype in _DTYPES and g.dim() == 2
            and g.shape[0] <= MAX_ROWS and g.numel() < 2**31 and g.is_contiguous())


def _rows_padded(b: int) -> int:
    # tl.dot needs tiles of at least 16 rows; padding rows load as zeros.
    return max(16, triton.next_power_of_2(b))


@_jit
def _weighted_sum_kernel(g_ptr, w_ptr, out_ptr, B, N, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + rows, mask=rows < B, other=0.0).to(tl.float32)
    mask = (rows[:, None] < B) & (cols[None, :] < N)
    tile = tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(tile.to(tl.float32) * w[:, None], axis=0)
    tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=cols < N)


@_jit
def _gram_kernel(g_ptr, part_ptr, B, N, ROWS: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr,
                 IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, ROWS), dtype=tl.float32)
    for step in range(STEPS):
        cols = (pid * STEPS + step) * BLOCK + tl.arange(0, BLOCK)
        mask = (rows[:, None] < B) & (cols[None, :] < N)
        tile = tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
        if IEEE:  # float32 G: full float32 products, not TF32
            acc += tl.dot(tile, tl.trans(tile), input_precision="ieee")
        else:
            acc += tl.dot(tile, tl.trans(tile))
    tl.store(part_ptr + pid * ROWS * ROWS + rows[:, None] * ROWS + rows[None, :], acc)


@functools.cache
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _steps(n: int, device: torch.device) -> int:
    """Tiles per Gram program: enough programs to fill the device ~4 times over, each a power-of-two run of
    tiles (one compiled variant per value, a handful in all)."""
    tiles = triton.cdiv(n, BLOCK)
    return min(64, triton.next_power_of_2(max(1, tiles // (4 * _processors(device)))))


def weighted_sum(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i g_i for g (B, N) and w (B,), accumulated in float32, in g's dtype: (N,)."""
    b, n = g.shape
    out = torch.empty(n, dtype=g.dtype, device=g.device)
    _weighted_sum_kernel[(triton.cdiv(n, BLOCK),)](g, w.contiguous(), out, b, n, ROWS=_rows_padded(b), BLOCK=BLOCK)
    return out


def gram(g: torch.Tensor) -> torch.Tensor:
    """g gᵀ for g (B, N), in float32: (B, B)."""
    b, n = g.shape
    rows, steps = _rows_padded(b), _steps(n, g.device)
    programs = triton.cdiv(n, BLOCK * steps)
    parts = torch.empty(programs, rows, rows, dtype=torch.float32, device=g.device)
    _gram_kernel[(programs,)](g, parts, b, n, ROWS=rows, BLOCK=BLOCK, STEPS=steps, IEEE=g.dtype == torch.float32)
    return parts.sum(0)[:b, :b]
