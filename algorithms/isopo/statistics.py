"""Per-sequence statistics of one linear layer from its inputs a and output gradients δ.

Two ways to the same numbers, picked per layer by FLOP count:
- instantiate: the per-sequence gradients G_i = Σ_t δ_t a_tᵀ as one batched matmul (the cost of the
  ordinary weight-gradient matmul); N_i, the overlap numerators and the NTK read off G.
- gram: never forms G; uses inner products of a and δ within sequences (cost ∝ T² per sequence), which
  wins for short sequences or narrow layers.
Both work on a padded (B, T, ·) layout whose padding rows of `a` or `δ` are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels


@dataclass
class LayerStats:
    """What the weighting rules need from one layer and micro-batch."""

    norm: torch.Tensor | None
    """(B,) N_i = ‖G_i‖_F (non-interacting only; the NTK's diagonal holds N_i² otherwise)."""
    overlap_num: torch.Tensor | None
    """(B, K) δ_kᵀ G_i a_k for the sampled positions k (non-interacting only; in the activations' dtype
    when G was formed in one block, accumulated in float32 by the matmul that made it)."""
    ntk: torch.Tensor | None
    """(B, B) K_ij = ⟨G_i, G_j⟩_F (interacting only)."""


def choose_strategy(strategy: str, b: int, t: int, d_in: int, d_out: int, k: int, interacting: bool) -> str:
    """``strategy`` unless "auto"; then the route of fewer FLOPs. A G formed in blocks (the LM head) is
    priced as one formed whole: counting the second weight-gradient matmul its update needs sends
    Qwen3-0.6B's non-interacting LM head to the Gram route (2.08 against 2.87 TFLOP), and that step ran
    slower on an H200, 1.159× of REINFORCE against 1.102× (BENCHMARKS.md, session 14): cuBLAS ran its T × T
    product at the response view's T = 513 at 53 TFLOP/s (12 ms), the same product at T = 1024 at ~800."""
    if strategy != "auto":
        return strategy
    n = b * t
    weight_grad = 2.0 * n * d_in * d_out
    if interacting:
        inst = weight_grad + 2.0 * b * b * d_in * d_out
        gram = weight_grad + 2.0 * n * n * (d_in + d_out)
    else:
        inst = weight_grad + 2.0 * b * k * d_in * d_out + 2.0 * b * d_in * d_out
        gram = weight_grad + 2.0 * b * t * t * (d_in + d_out) + 2.0 * n * k * (d_in + d_out)
    return "instantiate" if inst <= gram else "gram"


def layer_stats(
    a: torch.Tensor,
    d: torch.Tensor,
    a_k: torch.Tensor | None,
    d_k: torch.Tensor | None,
    *,
    interacting: bool,
    strategy: str,
    chunk: int | None,
    stat_dtype: torch.dtype,
    fp32_gram: bool = False,
    need_norm: bool = True,
    use_kernels: bool = False,
) -> LayerStats:
    """a: (B, T, in), d: (B, T, out); a_k: (K, in), d_k: (K, out) the sampled tokens (non-interacting).
    chunk: output rows of G formed at once (None: all of them); fp32_gram: this device has a matmul from
    bf16/fp16 straight to float32 (see ``gram_out_dtype_supported``); need_norm: False leaves N_i out
    (non-interacting weights that do not read it); use_kernels: the NTK of G or of its blocks by the Triton
    Gram kernel where usable (``IsopoConfig.triton_kernels``), or with G's blocks by the formation kernel where
    ``kernels.FORM_IMPL`` chooses it, and the norms and overlap numerators by the fused kernel where
    ``kernels.OVERLAP_IMPL`` chooses it."""
    if strategy == "instantiate":
        return _instantiated(a, d, a_k, d_k, interacting, chunk, stat_dtype, fp32_gram, need_norm, use_kernels)
    return _gram(a, d, a_k, d_k, interacting, stat_dtype, need_norm, fp32_gram)


def output_chunk(chunk_bytes: int, itemsize: int, b: int, d_in: int, d_out: int) -> int | None:
    """Output rows of G per block under chunk_bytes, or None when the whole G fits. A multiple of 8 rows where
    there are that many: each block's columns of δ then start on a 16-byte boundary (as the fused kernel's
    tensor descriptors need)."""
    chunk = max(1, min(d_out, chunk_bytes // itemsize // max(1, b * d_in)))
    if chunk >= d_out:
        return None
    return chunk - chunk % 8 if chunk >= 8 else chunk


def _instantiated(a, d, a_k, d_k, interacting, chunk, stat_dtype, fp32_gram, need_norm, use_kernels) -> LayerStats:
    d_out = d.shape[-1]
    if chunk is None:
        return grad_stats(torch.bmm(d.transpose(1, 2), a), a_k, d_k, stat_dtype, fp32_gram, need_norm, use_kernels)
    n_sq = overlap_num = ntk = None
    form = interacting and use_kernels and kernels.formation_chosen(a.dtype)
    for lo in range(0, d_out, chunk):
        hi = min(d_out, lo + chunk)
        if form and kernels.formable(a, d[:, :, lo:hi]):
            # This block of G and its share of the NTK from one kernel (the block itself is not needed after).
            part = kernels.form_and_gram_parts(a, d[:, :, lo:hi])[1].sum(0)
            ntk = part if ntk is None else ntk + part
            continue
        g = torch.bmm(d[:, :, lo:hi].transpose(1, 2), a)  # (B, chunk, in): these output rows of every G_i
        if interacting:
            part = ntk_matrix(g.reshape(g.shape[0], -1), stat_dtype, fp32_gram, use_kernels)
            ntk = part if ntk is None else ntk + part
            continue
        part_norm, part_o = block_stats(g, a_k, d_k[:, lo:hi], stat_dtype, need_norm, use_kernels)
        # The blocks' squared norms and overlap numerators add up, in stat_dtype.
        part_o = part_o.to(stat_dtype)
        if need_norm:
            n_sq = part_norm.square() if n_sq is None else n_sq + part_norm.square()
        overlap_num = part_o if overlap_num is None else overlap_num + part_o
    norm = None if n_sq is None else n_sq.sqrt()
    return LayerStats(norm=norm, overlap_num=overlap_num, ntk=ntk)


def grad_stats(g: torch.Tensor, a_k: torch.Tensor | None, d_k: torch.Tensor | None, stat_dtype: torch.dtype,
               fp32_gram: bool = False, need_norm: bool = True, use_kernels: bool = False) -> LayerStats:
    """The statistics from the per-sequence gradients g (B, out, in) formed in one piece; a_k is None for
    the interacting variant. use_kernels: the NTK by the Triton Gram kernel where ``kernels.usable``
    (``IsopoConfig.triton_kernels``); the norms and overlap numerators as ``block_stats`` chooses them."""
    if a_k is None:  # N_i² is the NTK's diagonal: one pass over G fewer
        return LayerStats(norm=None, overlap_num=None, ntk=ntk_matrix(g.view(g.shape[0], -1), stat_dtype, fp32_gram,
                                                                use_kernels))
    norm, overlap_num = block_stats(g, a_k, d_k, stat_dtype, need_norm, use_kernels)
    return LayerStats(norm=norm, overlap_num=overlap_num, ntk=None)


def ntk_matrix(flat: torch.Tensor, stat_dtype: torch.dtype, fp32_gram: bool = False,
               use_kernels: bool = False) -> torch.Tensor:
    """flat flatᵀ for G or a block of its rows, (B, ·): by the Gram kernel where it is usable, else a matmul
    (cuBLAS runs this 8 × 8 output with its huge inner dimension far from memory speed; BENCHMARKS.md)."""
    if use_kernels and stat_dtype == torch.float32 and kernels.usable(flat):
        return kernels.gram(flat)
    return gram_matrix(flat, stat_dtype, fp32_gram)


def block_stats(g, a_k, d_k, stat_dtype, need_norm, use_kernels=False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(‖G_i‖ over these rows or None, δ_kᵀ G_i a_k over these rows) of g (B, rows, in), all of G or a block
    of its rows; d_k (K, rows). The norm is a whole pass over G: skipped when the weights do not read it.
    use_kernels: where the Triton kernels are chosen (``kernels.OVERLAP_IMPL``, ``kernels.NORMS_IMPL``) and
    usable, both from one read of G by the fused kernel, or the norms by the row-norm kernel."""
    kernel_dtype = use_kernels and stat_dtype == torch.float32
    if kernel_dtype and kernels.overlap_fusable(g, a_k, d_k):
        return kernels.norms_and_overlap(g, a_k, d_k, need_norm)
    norm = None
    if need_norm:
        flat = g.reshape(g.shape[0], -1)
        if kernel_dtype and kernels.NORMS_IMPL == "kernel" and kernels.usable(flat):
            norm = kernels.row_norms(flat)
        else:
            norm = torch.linalg.vector_norm(flat, dim=1, dtype=stat_dtype)
    return norm, overlap_numerators(g, a_k, d_k)


def overlap_numerators(g: torch.Tensor, a_k: torch.Tensor, d_k: torch.Tensor) -> torch.Tensor:
    """(B, K) δ_kᵀ G_i a_k from the per-sequence gradients g (B, out, in) and the sample rows a_k (K, in),
    d_k (K, out), in g's dtype."""
    # δ_kᵀ G_i first: (K, out) @ (B, out, in) runs at matmul speed, while G_i a_k then a reduction over
    # `out` of a (B, out, K) product ran at half of it (measured on CPU, every layer shape of `small`).
    dg = torch.bmm(d_k.expand(g.shape[0], -1, -1), g)  # (B, K, in)
    if dg.dtype in (torch.float32, torch.float64):
        # Then the dot with a_k for every (i, k): a product and a sum, 4× faster on a CPU core than the
        # matmul below (25 → 6 ms a step over `small`'s layers, B=8, T=1024, K=250).
        return (dg * a_k).sum(-1)
    # In bf16/fp16: one matmul batched over k, on a strided view of dg (no copy), accumulating in float32.
    return torch.bmm(dg.transpose(0, 1), a_k.unsqueeze(2)).squeeze(2).t()


_MM_OUT_DTYPE: dict[tuple[torch.device, torch.dtype], bool] = {}


def gram_out_dtype_supported(x: torch.Tensor) -> bool:
    """Whether a bf16/fp16 CUDA tensor can go straight into a matmul with float32 output (``torch.mm``'s and
    ``torch.bmm``'s ``out_dtype``, CUDA only), probed once per device and dtype."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    key = (x.device, x.dtype)
    if key not in _MM_OUT_DTYPE:
        try:
            probe = x.new_ones(1, 1)
            torch.mm(probe, probe, out_dtype=torch.float32)
            torch.bmm(probe[None], probe[None], out_dtype=torch.float32)
            _MM_OUT_DTYPE[key] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


def gram_matrix(flat: torch.Tensor, stat_dtype: torch.dtype, fp32_out: bool = False) -> torch.Tensor:
    """flat @ flat.T in stat_dtype. With fp32_out a bf16/fp16 G goes straight into a float32-output matmul
    instead of first being copied to float32 (three times G's bytes of memory traffic)."""
    direct = fp32_out and flat.dtype != stat_dtype
    flat = flat if direct else flat.to(stat_dtype)
    return _mm(flat, flat.t(), stat_dtype, direct)


def _gram(a, d, a_k, d_k, interacting, stat_dtype, need_norm=True, fp32_out=False) -> LayerStats:
    """fp32_out: bf16/fp16 a and δ go straight into matmuls with float32 output (CUDA), instead of being
    copied to float32 first — for the LM head, a float32 copy of δ the size of its logits."""
    direct = fp32_out and a.dtype != stat_dtype
    if not direct:
        a, d = a.to(stat_dtype), d.to(stat_dtype)
        a_k = None if a_k is None else a_k.to(stat_dtype)
        d_k = None if d_k is None else d_k.to(stat_dtype)
    b, t, _ = a.shape
    if interacting:
        a_flat = a.reshape(b * t, -1)
        d_flat = d.reshape(b * t, -1)
        pair = _mm(a_flat, a_flat.t(), stat_dtype, direct) * _mm(d_flat, d_flat.t(), stat_dtype, direct)  # (BT, BT)
        ntk = pair.reshape(b, t, b, t).sum(dim=(1, 3))
        return LayerStats(norm=None, overlap_num=None, ntk=ntk)
    norm = None
    if need_norm:
        norm = (_mm(a, a.transpose(1, 2), stat_dtype, direct)
                * _mm(d, d.transpose(1, 2), stat_dtype, direct)).sum(dim=(1, 2)).sqrt()
    # δ_kᵀ G_i a_k = Σ_{t∈i} (δ_k·δ_t)(a_t·a_k)
    a_dot = _mm(a.reshape(b * t, -1), a_k.t(), stat_dtype, direct).view(b, t, -1)
    d_dot = _mm(d.reshape(b * t, -1), d_k.t(), stat_dtype, direct).view(b, t, -1)
    return LayerStats(norm=norm, overlap_num=(a_dot * d_dot).sum(1), ntk=None)


def _mm(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, direct: bool) -> torch.Tensor:
    """x @ y (2-D, or batched 3-D) in dtype: direct, low-precision operands into a matmul with a dtype
    output (CUDA only); else operands already in dtype."""
    if not direct:
        return x @ y
    return (torch.bmm if x.dim() == 3 else torch.mm)(x, y, out_dtype=dtype)
