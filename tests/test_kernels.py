"""ISOPO's Triton kernels (algorithms/isopo/kernels.py) against float64 torch: on a GPU compiled, on a CPU in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET there), and inside the engine against the
torch path."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from isopo_fixtures import tiny_qwen3
from test_isopo import assert_rel_close, efficient_step, response_tokens, step_batches

from algorithms.isopo import Isopo, IsopoConfig, kernels

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cuda"] if torch.cuda.is_available() else []) + (["cpu"] if INTERPRETING else [])
# NumPy has no bf16, so the interpreter's bf16 is not to be trusted; the GPU runs it.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
SHAPES = [(1, 7), (5, 3000), (8, 70_001), (16, 513), (33, 1000), (64, 300)]


def test_triton_is_installed_wherever_the_suite_runs():
    """The test extra installs it (and CUDA builds of torch bring it): the kernel tests below must not
    quietly find nothing to run."""
    assert kernels.available() and DEVICES


def _formable_interpreted(a3: torch.Tensor, d3: torch.Tensor) -> bool:
    """``kernels.formable`` for the interpreter's CPU tensors: the layout a tensor descriptor needs."""
    return kernels._descriptor_ready(a3) and kernels._descriptor_ready(d3)


def _tolerance(dtype: torch.dtype) -> float:
    # The weighted sum is rounded to G's dtype once; the Gram matrix is float32 throughout.
    return {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "n"), SHAPES)
def test_weighted_sum_and_gram_match_float64(device, dtype, b, n):
    gen = torch.Generator().manual_seed(b * 1000 + n)
    g = torch.randn(b, n, generator=gen).to(device, dtype)
    w = torch.randn(b, generator=gen).to(device)
    exact_sum = w.double() @ g.double()
    got = kernels.weighted_sum(w, g)
    assert got.dtype == dtype and got.shape == (n,)
    assert float((got.double() - exact_sum).norm() / exact_sum.norm()) < _tolerance(dtype)
    exact_gram = g.double() @ g.double().t()
    gram = kernels.gram(g)
    assert gram.dtype == torch.float32 and gram.shape == (b, b)
    assert float((gram.double() - exact_gram).norm() / exact_gram.norm()) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "n"), SHAPES)
def test_outer_product_gram_and_row_norms_match_float64(device, dtype, b, n, monkeypatch):
    """The candidates for the two reads of G that are not at memory speed: the Gram matrix by per-column
    outer products (``GRAM_IMPL = "outer"``; past ``OUTER_MAX_ROWS`` rows the tensor-core kernel runs) at
    small and odd tile and run lengths, and the row norms."""
    gen = torch.Generator().manual_seed(b * 1000 + n + 1)
    g = torch.randn(b, n, generator=gen).to(device, dtype)
    exact_gram = g.double() @ g.double().t()
    monkeypatch.setattr(kernels, "GRAM_IMPL", "outer")
    if b <= kernels.OUTER_MAX_ROWS:
        monkeypatch.setattr(kernels, "_gram_kernel", None)  # the tensor-core kernel must not be reached
    for block, waves in ((128, 4), (32, 64)):  # (32, 64): short tiles, more programs
        monkeypatch.setattr(kernels, "OUTER_BLOCK", block)
        monkeypatch.setattr(kernels, "GRAM_WAVES", waves)
        parts = kernels.gram_parts(g)
        assert parts.dtype == torch.float32 and parts.shape[1:] == (b, b)
        assert float((parts.sum(0).double() - exact_gram).norm() / exact_gram.norm()) < 1e-6
    exact_norms = g.double().norm(dim=1)
    norms = kernels.row_norms(g)
    assert norms.dtype == torch.float32 and norms.shape == (b,)
    assert float((norms.double() - exact_norms).abs().max() / exact_norms.max()) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "n"), [(1, 64), (5, 3000), (8, 12_288), (16, 1536), (33, 1000), (64, 320)])
def test_descriptor_gram_matches_float64(device, dtype, b, n, monkeypatch):
    """The Gram candidate whose tiles are single tensor-descriptor copies (``GRAM_IMPL = "tma"``): zeros past B
    rows and past the last column from the copy itself, at short and long tiles and runs, and narrower
    tiles past 16 rows; a G whose columns are not whole rows of ``TMA_BLOCK`` takes the tensor-core kernel."""
    gen = torch.Generator().manual_seed(b * 1000 + n + 2)
    g = torch.randn(b, n, generator=gen).to(device, dtype)
    exact_gram = g.double() @ g.double().t()
    monkeypatch.setattr(kernels, "GRAM_IMPL", "tma")
    plain = kernels._gram_kernel
    monkeypatch.setattr(kernels, "_gram_kernel", None)  # the tensor-core kernel must not be reached
    for block, sub, waves in ((8, 4, 4), (16, 1, 64), (min(256, n & -n), 2, 64)):  # n & -n: its largest power-of-two factor
        monkeypatch.setattr(kernels, "TMA_BLOCK", block)
        monkeypatch.setattr(kernels, "TMA_SUB", sub)
        monkeypatch.setattr(kernels, "GRAM_WAVES", waves)
        if n % block:
            continue
        parts = kernels.gram_parts(g)
        assert parts.dtype == torch.float32 and parts.shape[1:] == (b, b)
        assert float((parts.sum(0).double() - exact_gram).norm() / exact_gram.norm()) < 1e-6
    monkeypatch.setattr(kernels, "_gram_kernel", plain)
    monkeypatch.setattr(kernels, "_gram_tma_kernel", None)
    odd = g[:, : n - 1].contiguous()
    assert not kernels._gram_tma_ready(odd)
    exact_odd = odd.double() @ odd.double().t()
    assert float((kernels.gram(odd).double() - exact_odd).norm() / exact_odd.norm()) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "t", "d_in", "d_out"), [(1, 16, 8, 16), (8, 50, 40, 72), (5, 37, 64, 24), (33, 9, 16, 8)])
def test_formation_with_gram_matches_float64(device, dtype, b, t, d_in, d_out, monkeypatch):
    """The candidate that forms G and its Gram matrix in one kernel (``form_and_gram_parts``): G as the batched
    matmul forms it, at shapes that are not multiples of the tiles and from a strided view of δ, and partials
    summing to the Gram matrix of G as stored, each tile's share taken by whichever of its programs arrives
    last — the same numbers on every call."""
    monkeypatch.setattr(kernels, "FORM_BLOCK_M", 16)
    monkeypatch.setattr(kernels, "FORM_BLOCK_N", 32)
    monkeypatch.setattr(kernels, "FORM_BLOCK_K", 16)
    gen = torch.Generator().manual_seed(b * 1000 + t)
    a3 = torch.randn(b, t, d_in, generator=gen).to(device, dtype)
    d3 = torch.randn(b, t, d_out + 16, generator=gen).to(device, dtype)[:, :, 8:d_out + 8]  # a block of δ's columns
    exact = torch.bmm(d3.double().transpose(1, 2), a3.double())
    for gram_rows in (2, 16):
        monkeypatch.setattr(kernels, "FORM_GRAM_ROWS", gram_rows)
        g, parts = kernels.form_and_gram_parts(a3, d3)
        assert g.dtype == dtype and g.shape == (b, d_out, d_in)
        assert float((g.double() - exact).norm() / exact.norm()) < _tolerance(dtype)
        flat = g.double().reshape(b, -1)
        tiles = -(-d_out // 16) * -(-d_in // 32)
        assert parts.dtype == torch.float32 and parts.shape == (tiles, b, b)
        assert float((parts.sum(0).double() - flat @ flat.t()).norm() / (flat @ flat.t()).norm()) < 1e-6
        again = kernels.form_and_gram_parts(a3, d3)[1]
        assert torch.equal(again, parts)
    assert kernels.formable(a3, d3) == (device == "cuda")
    if device == "cuda":
        assert not kernels.formable(a3.transpose(1, 2).contiguous().transpose(1, 2), d3)
        assert not kernels.formable(a3, d3[:, :, 1:])  # a start off a 16-byte boundary


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "d_out", "d_in", "k"), [(1, 16, 8, 1), (8, 72, 296, 37), (5, 296, 104, 250),
                                                       (3, 136, 64, 256), (33, 40, 24, 9)])
def test_fused_norms_and_overlap_match_float64(device, dtype, b, d_out, d_in, k, monkeypatch):
    """The candidate for the non-interacting statistics (``OVERLAP_IMPL = "fused"``): δ_kᵀ G_i a_k for every
    sample and ‖G_i‖ from one read of G, with d_k a view of some of a wider δ_k's columns (an LM-head block),
    at shapes that are not multiples of the tiles and up to ``OVERLAP_MAX_SAMPLES``; the rows split among
    programs (small tiles, many waves) or not; without the norm where the weights do not read it."""
    gen = torch.Generator().manual_seed(b * 1000 + d_out + k)
    g = torch.randn(b, d_out, d_in, generator=gen).to(device, dtype)
    a_k = torch.randn(k, d_in, generator=gen)[:, :d_in].to(device, dtype)
    d_k = torch.randn(k, d_out + 16, generator=gen).to(device, dtype)[:, 8:d_out + 8]
    exact = torch.einsum("km,bmn,kn->bk", d_k.double(), g.double(), a_k.double())
    exact_norms = g.double().reshape(b, -1).norm(dim=1)
    tol = 1e-6 if dtype == torch.float32 else 1e-3  # float32 accumulation of products of rounded operands
    for block_m, block_n, waves in ((64, 64, 2), (16, 16, 64)):
        monkeypatch.setattr(kernels, "OVERLAP_BLOCK_M", block_m)
        monkeypatch.setattr(kernels, "OVERLAP_BLOCK_N", block_n)
        monkeypatch.setattr(kernels, "OVERLAP_WAVES", waves)
        for need_norm in (True, False):
            norm, num = kernels.norms_and_overlap(g, a_k, d_k, need_norm)
            assert num.dtype == torch.float32 and num.shape == (b, k)
            assert float((num.cpu().double() - exact.cpu()).norm() / exact.norm()) < tol
            if need_norm:
                assert norm.dtype == torch.float32 and norm.shape == (b,)
                assert float(((norm.double() - exact_norms) / exact_norms).abs().max()) < 1e-6
            else:
                assert norm is None


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("device", DEVICES)
def test_the_fused_statistics_of_a_sequence_read_only_its_own_rows(device):
    """A tile reaching past G_i's last row reads zeros, not G_(i+1)'s first rows: a NaN in one sequence's
    gradient (a diverging step) leaves the others' norms and overlap numerators exact, as on the torch path."""
    gen = torch.Generator().manual_seed(7)
    b, d_out, d_in, k = 3, 40, 16, 5  # 40 rows: one 64-row step, 24 rows past G_i's end
    g = torch.randn(b, d_out, d_in, generator=gen)
    g[1, 0] = float("nan")
    a_k, d_k = torch.randn(k, d_in, generator=gen), torch.randn(k, d_out, generator=gen)
    norm, num = kernels.norms_and_overlap(g.to(device), a_k.to(device), d_k.to(device), True)
    exact = torch.einsum("km,bmn,kn->bk", d_k.double(), g.double(), a_k.double())
    for i in (0, 2):
        assert float((num[i].cpu().double() - exact[i]).norm() / exact[i].norm()) < 1e-6
        assert abs(float(norm[i]) / float(g[i].double().norm()) - 1) < 1e-6
    assert torch.isnan(num[1]).all() and torch.isnan(norm[1])


def test_the_fused_statistics_are_used_only_where_chosen_usable_and_aligned(monkeypatch):
    """Only where chosen; on CUDA (or, here, as the tests admit CPU tensors to the interpreter) only for a G
    and a d_k whose rows are whole 16-byte units from a 16-byte boundary, as tensor descriptors need; else
    the torch path runs."""
    g, a_k, d_k = torch.zeros(8, 16, 8), torch.zeros(5, 8), torch.zeros(5, 24)[:, 8:]
    assert not kernels.overlap_fusable(g, a_k, d_k)  # the default: the torch path
    monkeypatch.setattr(kernels, "OVERLAP_IMPL", "fused")
    assert not kernels.overlap_fusable(g, a_k, d_k)  # CPU tensors
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setattr(kernels, "usable", lambda g: g.dtype in (torch.float32, torch.float16) and g.shape[0] <= 64)
    g, a_k, d_k = g.to(device), a_k.to(device), torch.zeros(5, 24, device=device)[:, 8:]
    assert kernels.overlap_fusable(g, a_k, d_k)
    assert not kernels.overlap_fusable(g, torch.zeros(kernels.OVERLAP_MAX_SAMPLES + 1, 8, device=device), d_k)
    assert not kernels.overlap_fusable(g.transpose(1, 2), a_k, d_k)  # not contiguous
    assert not kernels.overlap_fusable(torch.zeros(8, 16, 6, device=device), a_k[:, :6], d_k)  # 24-byte rows
    assert not kernels.overlap_fusable(g, a_k, torch.zeros(5, 24, device=device)[:, 2:18])  # base off by 8 bytes
    assert not kernels.overlap_fusable(g, a_k, d_k.half())  # δ_k not in G's dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b", [1, 5, 8, 16, 33])
def test_damped_solve_matches_float64_and_falls_back_to_the_advantages(device, b):
    """λ (K + λI)⁻¹ A against torch's float64 solve; A where λ = 0 or the factorisation fails, as the torch
    path (weights.interacting_weights) does."""
    gen = torch.Generator().manual_seed(b)
    g = torch.randn(b, 40, generator=gen, dtype=torch.float64)
    ntk = (g @ g.t()).float().to(device)
    adv = torch.randn(b, generator=gen).to(device)
    for lam in (ntk.diagonal().mean(), 0.01 * ntk.diagonal().mean()):
        exact = lam.double() * torch.linalg.solve(ntk.double() + lam.double() * torch.eye(b, dtype=torch.float64,
                                                                                           device=device), adv.double())
        got = kernels.damped_solve(ntk, adv, lam)
        assert got.dtype == torch.float32 and got.shape == (b,)
        assert float((got.double() - exact).norm() / exact.norm()) < 1e-6
    assert torch.equal(kernels.damped_solve(torch.zeros_like(ntk), adv, torch.zeros((), device=device)), adv)
    not_spd = -torch.eye(b, device=device)
    assert torch.equal(kernels.damped_solve(not_spd, adv, torch.tensor(0.5, device=device)), adv)
    if b > 1:  # indefinite from the second pivot on: the first is positive, the elimination fails later
        late = torch.eye(b, device=device)
        late[0, 1] = late[1, 0] = 2.0
        assert torch.equal(kernels.damped_solve(late, adv, torch.tensor(0.5, device=device)), adv)
    # Rank 3 with a small damping: an ill-conditioned system, which the elimination in float64 still solves.
    low = torch.randn(b, 3, generator=gen, dtype=torch.float64)
    ntk = (low @ low.t()).float().to(device)
    lam = 1e-4 * ntk.diagonal().mean()
    exact = lam.double() * torch.linalg.solve(ntk.double() + lam.double() * torch.eye(b, dtype=torch.float64,
                                                                                       device=device), adv.double())
    got = kernels.damped_solve(ntk, adv, lam)
    assert float((got.double() - exact).norm() / exact.norm()) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b", [1, 5, 8, 16, 33])
def test_interacting_weights_from_g_match_float64(device, b):
    """Gram partials, their sum, tr K / B, λ = c_λ · (EMA or tr K / B) and the solve: against float64 torch, with
    and without an EMA and at c_λ ≠ 1; A where λ = 0 (every G_i zero)."""
    gen = torch.Generator().manual_seed(100 + b)
    g = torch.randn(b, 5000, generator=gen)
    adv = torch.randn(b, generator=gen)
    ntk = g.double() @ g.double().t()
    trace = ntk.diagonal().mean()
    for ema, c_lambda in ((None, 1.0), (torch.tensor(0.3 * float(trace)), 1.0), (None, 0.05),
                          (torch.tensor(2.0 * float(trace)), 0.5)):
        lam = c_lambda * (trace if ema is None else ema.double())
        exact = lam * torch.linalg.solve(ntk + lam * torch.eye(b, dtype=torch.float64), adv.double())
        got, got_trace = kernels.interacting_weights(g.to(device), adv.to(device),
                                                     None if ema is None else ema.to(device), c_lambda)
        assert got.dtype == torch.float32 and got.shape == (b,) and got_trace.shape == ()
        assert abs(float(got_trace) - float(trace)) <= 1e-6 * float(trace)
        assert float((got.cpu().double() - exact).norm() / exact.norm()) < 1e-5
    zero, _ = kernels.interacting_weights(torch.zeros(b, 300, device=device), adv.to(device), None, 1.0)
    assert torch.equal(zero.cpu(), adv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_ema", [False, True])
def test_interacting_weights_at_a_graphs_cursor(device, has_ema):
    """A graph's visit: the program reads the EMA from its slot array at the cursor, writes tr K / B into the
    trace slots there (and nowhere else) and advances the cursor — the weights as from a 0-d EMA."""
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(8, 3000, generator=gen).to(device)
    adv = torch.randn(8, generator=gen).to(device)
    ema_slots = torch.rand(16, generator=gen).to(device) * float((g * g).sum(1).mean()) if has_ema else None
    expected, trace = kernels.interacting_weights(g, adv, ema_slots[5] if has_ema else None, 0.5)
    cursor = torch.tensor([5], device=device)
    trace_slots = torch.zeros(16, device=device)
    w, returned = kernels.interacting_weights(g, adv, ema_slots, 0.5, slots=(cursor, trace_slots))
    assert returned is trace_slots and torch.equal(w, expected)
    assert int(cursor) == 6
    assert float(trace_slots[5]) == float(trace) and int((trace_slots != 0).sum()) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b", [1, 8, 33])
@pytest.mark.parametrize(("exp_norm", "exp_overlap"), [(2.0, -3.0), (0.0, -1.0), (2.0, 0.0), (0.0, 0.0), (-1.0, 2.0)])
def test_non_interacting_weights_match_float64(device, b, exp_norm, exp_overlap):
    """A N^exp_norm O^exp_overlap against float64 torch, the paper's (2, −3), `overlap`'s (0, −1) and
    others; a sequence whose gradient and overlap numerators vanish gets 0, not NaN or inf."""
    gen = torch.Generator().manual_seed(b)
    k, d_in, d_out = 37, 300, 70
    g = torch.randn(b, d_out * d_in, generator=gen)
    num = torch.randn(b, k, generator=gen)
    g[0], num[0] = 0.0, 0.0
    a_k, d_k, adv = torch.randn(k, d_in, generator=gen), torch.randn(k, d_out, generator=gen), torch.randn(b, generator=gen)
    den = (d_k.double().norm(dim=1) * a_k.double().norm(dim=1)).norm()
    exact = adv.double() * g.double().norm(dim=1) ** exp_norm * (num.double().norm(dim=1) / den) ** exp_overlap
    exact = torch.nan_to_num(exact, nan=0.0, posinf=0.0, neginf=0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # the interpreter's NumPy on log2(0) and 0·inf
        norm = g.norm(dim=1).to(device) if exp_norm != 0 else None
        got = kernels.non_interacting_weights(norm, num.to(device), a_k.to(device), d_k.to(device),
                                              adv.to(device), exp_norm, exp_overlap)
    assert got.dtype == torch.float32 and got.shape == (b,)
    assert float((got.cpu().double() - exact).norm() / exact.norm().clamp_min(1e-30)) < 1e-5
    assert torch.isfinite(got).all()


def test_the_default_config_takes_the_kernels_on_cuda_and_the_torch_path_on_cpu(monkeypatch):
    """``triton_kernels`` is on by default; a CPU step with the default configuration still never reaches a
    kernel (CPU tensors are not ``usable``), so the CPU arithmetic is unchanged by that default."""
    assert IsopoConfig().triton_kernels and IsopoConfig().kernels_enabled
    assert not IsopoConfig(compile=True).kernels_enabled

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was called for CPU tensors")

    for name in ("weighted_sum", "gram_parts", "interacting_weights", "non_interacting_weights", "damped_solve"):
        monkeypatch.setattr(kernels, name, refuse)
    model = tiny_qwen3(dtype=torch.float32)
    for variant in ("non_interacting", "interacting"):
        cfg = IsopoConfig(variant=variant, setting="paper" if variant == "non_interacting" else None, num_samples=9,
                          strategy="instantiate")
        grads = efficient_step(model, Isopo(model, cfg), step_batches(0), response_tokens(step_batches(0)))
        assert all(torch.isfinite(g).all() for g in grads.values())


def test_usable_only_for_contiguous_cuda_float_tensors_of_at_most_64_rows():
    assert not kernels.usable(torch.zeros(8, 10))  # CPU tensors take the torch path, even when interpreting
    if torch.cuda.is_available():
        assert kernels.usable(torch.zeros(8, 10, device="cuda", dtype=torch.bfloat16))
        assert not kernels.usable(torch.zeros(65, 10, device="cuda"))
        assert not kernels.usable(torch.zeros(8, 10, device="cuda", dtype=torch.float64))
        assert not kernels.usable(torch.zeros(10, 8, device="cuda").t())
        assert not kernels.usable(torch.empty(8, 2**28, device="cuda", dtype=torch.bfloat16))  # int32 indexing


# The interpreter's NumPy warns where a layer's statistic is 0 (log2(0), then 0·inf): the weights handle it.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2", "ignore:invalid value encountered in multiply")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("variant", "reads"), [("non_interacting", "default"), ("non_interacting", "candidates"),
                                              ("non_interacting", "fused"), ("interacting", "default"),
                                              ("interacting", "candidates"), ("interacting", "tma"),
                                              ("interacting", "formgram")])
def test_the_engine_with_the_kernels_matches_the_torch_path(device, variant, reads, monkeypatch):
    """Two float32 steps (the EMAs change between them) through the engine's eager and graph paths, with the
    kernels and without: the same gradients. On a CPU the kernels are admitted for CPU tensors, interpreted.
    reads="candidates": the Gram matrix by outer products and the norms by the row-norm kernel; "tma": the Gram
    matrix from descriptor copies; "formgram": G and the Gram matrix's partials from one kernel (in the graph
    path through the static buffers); "fused": the norms and overlap numerators by the fused kernel."""
    if device == "cpu":
        monkeypatch.setattr(kernels, "usable", lambda g: g.dtype in (torch.float32, torch.float16) and g.shape[0] <= 64)
    if reads == "candidates":
        monkeypatch.setattr(kernels, "GRAM_IMPL", "outer")
        monkeypatch.setattr(kernels, "NORMS_IMPL", "kernel")
    if reads == "fused":
        monkeypatch.setattr(kernels, "OVERLAP_IMPL", "fused")
    tma_reads = []
    if reads == "tma":
        monkeypatch.setattr(kernels, "GRAM_IMPL", "tma")
        monkeypatch.setattr(kernels, "TMA_BLOCK", 16)
        ready = kernels._gram_tma_ready
        monkeypatch.setattr(kernels, "_gram_tma_ready", lambda g: tma_reads.append(ready(g)) or tma_reads[-1])
    if reads == "formgram":
        monkeypatch.setattr(kernels, "FORM_IMPL", "fused")
        for name, value in (("FORM_BLOCK_M", 32), ("FORM_BLOCK_N", 32), ("FORM_BLOCK_K", 32)):
            monkeypatch.setattr(kernels, name, value)  # two tiles for the MLP's layers
        if device == "cpu":
            monkeypatch.setattr(kernels, "formable", _formable_interpreted)
    cfg = IsopoConfig(variant=variant, setting="paper" if variant == "non_interacting" else None, num_samples=9,
                      strategy="instantiate", cuda_graphs=False, triton_kernels=True)
    calls = {"gram_parts": 0, "weighted_sum": 0, "interacting_weights": 0, "non_interacting_weights": 0,
             "row_norms": 0, "norms_and_overlap": 0, "form_and_gram_parts": 0}
    for name in calls:
        real = getattr(kernels, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    model = tiny_qwen3(dtype=torch.float32).to(device)
    plain = Isopo(model, cfg.replace(triton_kernels=False))
    fused = Isopo(model, cfg)
    graphed = Isopo(model, cfg.replace(cuda_graphs=True))
    graphed.graphs.capture = device == "cuda"
    for step in range(2):
        batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                   for b in step_batches(step)]
        n_tok = response_tokens(batches)
        before = dict(calls)
        expected = efficient_step(model, plain, batches, n_tok)
        assert calls == before  # triton_kernels=False: the torch path throughout
        for engine in (fused, graphed):
            got = efficient_step(model, engine, batches, n_tok)
            for name, ref in expected.items():
                err = float((got[name] - ref).norm() / ref.norm().clamp_min(1e-30))
                assert err < 1e-5, f"{name}: {err:.2e}"
    assert not graphed.graphs.failed  # else the graph path fell back to the eager one, untested
    assert calls["weighted_sum"] > 0
    # The norms: torch's or the row-norm kernel's. The NTK: the Gram kernel's, or with "formgram" the formation
    # kernel's partials, except at the LM head, 37 wide: its rows are not 16-byte aligned for a descriptor.
    assert (calls["gram_parts"] > 0) == (variant == "interacting")
    assert (calls["form_and_gram_parts"] > 0) == (reads == "formgram")
    assert (calls["row_norms"] > 0) == (variant == "non_interacting" and reads == "candidates")
    assert (calls["norms_and_overlap"] > 0) == (reads == "fused")
    assert any(tma_reads) == (reads == "tma")
    assert (calls["interacting_weights"] > 0) == (variant == "interacting")
    assert (calls["non_interacting_weights"] > 0) == (variant == "non_interacting")


def _assert_the_kernels_change_nothing(device, cfg, torch_path_called_none):
    """One step of the tiny model with ``cfg`` (kernels off), after which torch_path_called_none() must
    hold, then the same step with the kernels on: the same gradients."""
    model = tiny_qwen3(dtype=torch.float32).to(device)
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in step_batches(0)]
    n_tok = response_tokens(batches)
    expected = efficient_step(model, Isopo(model, cfg), batches, n_tok)
    assert torch_path_called_none()
    got = efficient_step(model, Isopo(model, cfg.replace(triton_kernels=True)), batches, n_tok)
    for name, ref in expected.items():
        err = float((got[name] - ref).norm() / ref.norm().clamp_min(1e-30))
        assert err < 1e-5, f"{name}: {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_an_interacting_layer_formed_in_blocks_takes_the_gram_kernel_per_block(device, monkeypatch):
    """A G too large to hold (the LM head) is formed a block of output rows at a time; with the kernels each
    block's share of the NTK comes from the Gram kernel (not cuBLAS's split-K matmul): the same gradients as
    the torch path, and the kernel ran once per block."""
    if device == "cpu":
        monkeypatch.setattr(kernels, "usable", lambda g: g.dtype in (torch.float32, torch.float16) and g.shape[0] <= 64)
    calls = []
    real = kernels.gram_parts
    monkeypatch.setattr(kernels, "gram_parts", lambda g: calls.append(g.shape) or real(g))
    cfg = IsopoConfig(variant="interacting", setting=None, c_lambda=0.5, strategy="instantiate", chunk_bytes=40_000,
                      cuda_graphs=False, triton_kernels=False)
    _assert_the_kernels_change_nothing(device, cfg, torch_path_called_none=lambda: not calls)
    # Blocks: fewer output rows than the layer has (40 kB of float32 G at a time).
    widths = {shape[1] for shape in calls}
    assert len(calls) > len(widths) and max(widths) <= 40_000 // 4 // 2


@pytest.mark.parametrize("device", DEVICES)
def test_an_interacting_layer_formed_in_blocks_takes_the_formation_kernel_per_block(device, monkeypatch):
    """With the formation kernel chosen (``FORM_IMPL = "fused"``), each block of output rows of a G too large
    to hold comes with its share of the NTK from that kernel, δ's columns of the block read in place (a
    strided view): the same gradients as the torch path."""
    if device == "cpu":
        monkeypatch.setattr(kernels, "usable", lambda g: g.dtype in (torch.float32, torch.float16) and g.shape[0] <= 64)
        monkeypatch.setattr(kernels, "formable", _formable_interpreted)
    monkeypatch.setattr(kernels, "FORM_IMPL", "fused")
    for name, value in (("FORM_BLOCK_M", 16), ("FORM_BLOCK_N", 32), ("FORM_BLOCK_K", 16)):
        monkeypatch.setattr(kernels, name, value)  # tiles to the blocks' size (the interpreter pays for padding)
    calls = []
    real = kernels.form_and_gram_parts
    monkeypatch.setattr(kernels, "form_and_gram_parts",
                        lambda a3, d3: calls.append((d3.shape, d3.is_contiguous())) or real(a3, d3))
    # 4 kB of float32 G at a time: blocks of 8 output rows at 32 inputs, of 5 at 48 (whose blocks after the
    # first start off a 16-byte boundary of δ, and take the batched matmul and the Gram kernel).
    cfg = IsopoConfig(variant="interacting", setting=None, c_lambda=0.5, strategy="instantiate", chunk_bytes=4096,
                      cuda_graphs=False, triton_kernels=False)
    _assert_the_kernels_change_nothing(device, cfg, torch_path_called_none=lambda: not calls)
    widths = {shape[2] for shape, _ in calls}
    assert {5, 8} <= widths and max(widths) == 8 and not any(contiguous for _, contiguous in calls)  # views


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2", "ignore:invalid value encountered in multiply")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("regularised", [False, True])
def test_a_non_interacting_layer_formed_in_blocks_takes_the_fused_kernel_per_block(device, regularised, monkeypatch):
    """With the fused kernel chosen, a non-interacting G formed a block of output rows at a time (the LM head)
    takes each block's norm and overlap numerators from it, for a named setting and for a regularised one
    (whose weights read the EMAs): the same gradients as the torch path."""
    if device == "cpu":
        monkeypatch.setattr(kernels, "usable", lambda g: g.dtype in (torch.float32, torch.float16) and g.shape[0] <= 64)
    monkeypatch.setattr(kernels, "OVERLAP_IMPL", "fused")
    blocks = []
    real = kernels.norms_and_overlap

    def counted(g, a_k, d_k, need_norm):
        if d_k.stride(0) != g.shape[1]:  # d_k a view of some of δ_k's columns: a block
            blocks.append(g.shape[1])
        return real(g, a_k, d_k, need_norm)

    monkeypatch.setattr(kernels, "norms_and_overlap", counted)
    extra = dict(setting=None, p=0.5, q=-1.0, r=-1.0, c_n=0.3, c_o=0.2) if regularised else dict(setting="paper")
    cfg = IsopoConfig(variant="non_interacting", num_samples=9, strategy="instantiate", chunk_bytes=12_000,
                      cuda_graphs=False, triton_kernels=False, **extra)
    _assert_the_kernels_change_nothing(device, cfg, torch_path_called_none=lambda: not blocks)
    # Blocks of 8 to 24 rows at B = 4 and 3 (12 kB of float32 G at a time; the LM head's 37-column δ_k has
    # rows of 148 bytes, which descriptors cannot take: it keeps the torch path).
    assert blocks and set(blocks) <= {8, 16, 24}


# On a GPU also the non-interacting statistics by the fused kernel (on a CPU it would not run: no bf16 there).
BF16_TAILS = [("non_interacting", "torch"), ("interacting", "torch")] + (
    [("non_interacting", "fused"), ("interacting", "tma"), ("interacting", "formgram")] if torch.cuda.is_available()
    else [])
CANDIDATES = {"torch": {}, "fused": {"OVERLAP_IMPL": "fused"}, "tma": {"GRAM_IMPL": "tma"},
              "formgram": {"FORM_IMPL": "fused"}}
"""The candidate kernels as the bf16 graph test sets them: the fused norms and overlap, the descriptor Gram
kernel, G with its NTK partials from one kernel."""


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("variant", "candidate"), BF16_TAILS)
def test_the_fused_tails_in_graphs_under_bf16_autocast_match_the_torch_path(device, variant, candidate,
                                                                           monkeypatch):
    """The benchmark's CUDA path: bf16 autocast, the layer tails captured as graphs, from G to the weights in
    the Triton kernels (and on a GPU each candidate kernel), against the eager torch path (cuBLAS, cuSOLVER).
    The torch path rounds the weights to bf16 before its weighted sum, the kernel sums in float32: they agree
    to bf16's precision. On a CPU the kernels are not admitted for bf16 (the interpreter has none), so there
    the graph path's torch tail runs."""
    if device == "cpu":
        monkeypatch.setattr(kernels, "usable", lambda g: g.dtype in (torch.float32, torch.float16) and g.shape[0] <= 64)
    for name, value in CANDIDATES[candidate].items():
        monkeypatch.setattr(kernels, name, value)
    calls = {"interacting_weights": 0, "non_interacting_weights": 0, "norms_and_overlap": 0, "form_and_gram_parts": 0}
    for name in calls:
        real = getattr(kernels, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    cfg = IsopoConfig(variant=variant, setting="paper" if variant == "non_interacting" else None, num_samples=9,
                      strategy="instantiate", triton_kernels=True)
    model = tiny_qwen3(dtype=torch.float32).to(device)
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in step_batches(0)]
    n_tok = response_tokens(batches)
    bf16 = functools.partial(torch.autocast, device, dtype=torch.bfloat16)
    expected = efficient_step(model, Isopo(model, cfg.replace(triton_kernels=False, cuda_graphs=False)), batches,
                              n_tok, autocast=bf16)
    graphed = Isopo(model, cfg.replace(cuda_graphs=True))
    graphed.graphs.capture = device == "cuda"
    assert_rel_close(efficient_step(model, graphed, batches, n_tok, autocast=bf16), expected, tol=1e-2)
    assert not graphed.graphs.failed
    assert (calls["interacting_weights"] + calls["non_interacting_weights"] > 0) == (device == "cuda")
    assert (calls["norms_and_overlap"] > 0) == (device == "cuda" and candidate == "fused")
    assert (calls["form_and_gram_parts"] > 0) == (device == "cuda" and candidate == "formgram")

