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


@dataclass
class LayerStats:
    """What the weighting rules need from one layer and micro-batch."""

    n_sq: torch.Tensor | None
    """(B,) N_i² = ‖G_i‖_F² (non-interacting only; the NTK's diagonal holds it otherwise)."""
    overlap_num: torch.Tensor | None
    """(B, K) δ_kᵀ G_i a_k for the sampled positions k (non-interacting only)."""
    ntk: torch.Tensor | None
    """(B, B) K_ij = ⟨G_i, G_j⟩_F (interacting only)."""
    per_seq_grad: torch.Tensor | None
    """(B, out, in) G itself when it was formed in one piece, so the update can reuse it."""


def choose_strategy(strategy: str, b: int, t: int, d_in: int, d_out: int, k: int, interacting: bool) -> str:
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
    chunk_elems: int,
    stat_dtype: torch.dtype,
) -> LayerStats:
    """a: (B, T, in), d: (B, T, out); a_k: (K, in), d_k: (K, out) the sampled tokens (non-interacting)."""
    if strategy == "instantiate":
        return _instantiated(a, d, a_k, d_k, interacting, chunk_elems, stat_dtype)
    return _gram(a, d, a_k, d_k, interacting, stat_dtype)


def _instantiated(a, d, a_k, d_k, interacting, chunk_elems, stat_dtype) -> LayerStats:
    b, _, d_in = a.shape
    d_out = d.shape[-1]
    chunk = max(1, min(d_out, chunk_elems // max(1, b * d_in)))
    n_sq = overlap_num = ntk = g = None
    if not interacting:
        a_k = a_k.to(stat_dtype)
    # Each statistic starts as the first chunk's value: no zero-filled accumulators, one launch fewer each
    # (on a GPU the backward's cost is the host launching ~200 layers' small kernels, not their FLOPs).
    for lo in range(0, d_out, chunk):
        hi = min(d_out, lo + chunk)
        g = torch.bmm(d[:, :, lo:hi].transpose(1, 2), a)  # (B, chunk, in): the per-sequence gradients
        flat = g.reshape(b, -1)
        if interacting:
            part = gram_matrix(flat, stat_dtype)  # N_i² is its diagonal: one pass over G fewer
            ntk = part if ntk is None else ntk + part
        else:
            part_sq = torch.linalg.vector_norm(flat, dim=1, dtype=stat_dtype).square()
            # δ_kᵀ G_i a_k over this chunk of output rows. δ_kᵀ G_i first: (K, out) @ (B, out, in) runs at
            # matmul speed, while G_i a_k then a reduction over `out` of a (B, out, K) product ran at half
            # of it (measured on CPU, every layer shape of the `small` preset).
            dg = torch.matmul(d_k[:, lo:hi], g)  # (B, K, in)
            part_o = (dg.to(stat_dtype) * a_k).sum(2)
            n_sq = part_sq if n_sq is None else n_sq + part_sq
            overlap_num = part_o if overlap_num is None else overlap_num + part_o
    whole = chunk >= d_out
    return LayerStats(n_sq=n_sq, overlap_num=overlap_num, ntk=ntk, per_seq_grad=g if whole else None)


_MM_OUT_DTYPE: dict[tuple[str, torch.dtype], bool] = {}


def gram_matrix(flat: torch.Tensor, stat_dtype: torch.dtype) -> torch.Tensor:
    """flat @ flat.T in stat_dtype. A bf16/fp16 G on CUDA goes straight into a float32-output matmul where
    this torch has one, instead of first writing a float32 copy of G (three times G's bytes of traffic)."""
    if flat.dtype != stat_dtype and flat.is_cuda:
        key = (flat.device.type, flat.dtype)
        if key not in _MM_OUT_DTYPE:
            try:
                torch.mm(flat[:1, :1], flat[:1, :1].t(), out_dtype=stat_dtype)
                _MM_OUT_DTYPE[key] = True
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_OUT_DTYPE[key] = False
        if _MM_OUT_DTYPE[key]:
            return torch.mm(flat, flat.t(), out_dtype=stat_dtype)
    flat = flat.to(stat_dtype)
    return flat @ flat.t()


def _gram(a, d, a_k, d_k, interacting, stat_dtype) -> LayerStats:
    a = a.to(stat_dtype)
    d = d.to(stat_dtype)
    b, t, _ = a.shape
    if interacting:
        a_flat = a.reshape(b * t, -1)
        d_flat = d.reshape(b * t, -1)
        pair = (a_flat @ a_flat.t()) * (d_flat @ d_flat.t())  # (BT, BT) token-pair products
        ntk = pair.reshape(b, t, b, t).sum(dim=(1, 3))
        return LayerStats(n_sq=None, overlap_num=None, ntk=ntk, per_seq_grad=None)
    n_sq = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).sum(dim=(1, 2))
    # δ_kᵀ G_i a_k = Σ_{t∈i} (δ_k·δ_t)(a_t·a_k)
    overlap_num = ((a @ a_k.to(stat_dtype).t()) * (d @ d_k.to(stat_dtype).t())).sum(1)
    return LayerStats(n_sq=n_sq, overlap_num=overlap_num, ntk=None, per_seq_grad=None)
