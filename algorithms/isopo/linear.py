"""The ISOPO backward of one nn.Linear: statistics, weights and the weighted weight gradient, all inside
the layer's own backward — one backward pass for the whole model, no loop over sequences.

Σ_i w_i G_i = Σ_t w_{s(t)} δ_t a_tᵀ, so once the weights are known the weight gradient is the ordinary
matmul with δ scaled per token (or a weighted sum of G when G was formed anyway). The input gradient δW is
left as it is: the advantage-free δ keeps flowing to the layers below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .statistics import choose_strategy, layer_stats
from .weights import interacting_weights, non_interacting_weights

if TYPE_CHECKING:
    from .batch import MicroBatch, TokenLayout
    from .engine import LinearLayer


class IsopoLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer: LinearLayer, mb: MicroBatch, layout: TokenLayout):
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Cast once here and keep the low-precision copies, as autocast's own linear would.
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            out = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.mb, ctx.layout, ctx.has_bias = layer, mb, layout, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        layer, mb, layout = ctx.layer, ctx.mb, ctx.layout
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_out = grad_out.to(weight.dtype)
            grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
            grad_w = isopo_weight_grad(x, grad_out, layer, mb, layout) if ctx.needs_input_grad[1] else None
            grad_b = None
            if ctx.has_bias and ctx.needs_input_grad[2]:
                d_flat = grad_out.reshape(-1, grad_out.shape[-1])
                grad_b = layout.token_adv.to(d_flat.dtype) @ d_flat  # biases take the REINFORCE gradient
        return grad_x, grad_w, grad_b, None, None, None


def isopo_weight_grad(
    x: torch.Tensor, d: torch.Tensor, layer: LinearLayer, mb: MicroBatch, layout: TokenLayout
) -> torch.Tensor:
    cfg = layer.cfg
    d_in, d_out = x.shape[-1], d.shape[-1]
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_flat = x.reshape(-1, d_in)
    d_flat = d.reshape(-1, d_out)
    b, t = mb.num_seqs, layout.seq_len_max

    # Zero the padding in whichever operand is narrower: every statistic is a sum of δ_t a_tᵀ products.
    if layout.has_padding:
        mask = layout.token_mask.to(x.dtype).unsqueeze(1)
        if d_in <= d_out:
            x_flat = x_flat * mask
        else:
            d_flat = d_flat * mask
    interacting = cfg.variant == "interacting"
    if layout.pad_index is None:
        a3, d3 = x_flat.view(b, t, d_in), d_flat.view(b, t, d_out)
    else:
        # One zero row appended, which pad_index reads at padding.
        a3 = torch.cat([x_flat, x_flat.new_zeros(1, d_in)])[layout.pad_index]
        d3 = torch.cat([d_flat, d_flat.new_zeros(1, d_out)])[layout.pad_index]

    a_k = d_k = None
    if not interacting:
        positions = layout.samples[layer.index]
        a_k, d_k = x_flat.index_select(0, positions), d_flat.index_select(0, positions)
    k = 0 if interacting else a_k.shape[0]
    strategy = choose_strategy(cfg.strategy, b, t, d_in, d_out, k, interacting)
    chunk_elems = max(1, cfg.chunk_bytes // x.element_size())
    stats = layer_stats(
        a3, d3, a_k, d_k, interacting=interacting, strategy=strategy, chunk_elems=chunk_elems,
        stat_dtype=stat_dtype,
    )

    if interacting:
        w = interacting_weights(stats.ntk, mb.advantages, cfg, layer.ema)
    else:
        den = torch.linalg.vector_norm(
            torch.linalg.vector_norm(d_k, dim=1, dtype=stat_dtype) * torch.linalg.vector_norm(a_k, dim=1, dtype=stat_dtype)
        )
        w = non_interacting_weights(stats.n_sq, stats.overlap_num, den, mb.advantages, cfg, layer.ema)
    layer.last_weights = w.detach()

    if stats.per_seq_grad is not None:
        g = stats.per_seq_grad
        return (w.to(g.dtype) @ g.reshape(b, -1)).view(d_out, d_in)
    token_w = w.to(d.dtype)[layout.token_seq]
    if layout.has_padding:
        token_w = token_w * layout.token_mask.to(d.dtype)
    return (d_flat * token_w.unsqueeze(1)).t() @ x_flat
