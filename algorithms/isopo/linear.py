"""The ISOPO backward of one nn.Linear: statistics, weights and the weighted weight gradient, all inside
the layer's own backward — one backward pass for the whole model, no loop over sequences.

Σ_i w_i G_i = Σ_t w_{s(t)} δ_t a_tᵀ, so once the weights are known the weight gradient is the ordinary
matmul with δ scaled per token (or a weighted sum of G when G was formed anyway). The input gradient δW is
left as it is: the advantage-free δ keeps flowing to the layers below.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .statistics import choose_strategy, gram_out_dtype_supported, layer_stats, output_chunk
from .weights import interacting_weights, non_interacting_weights

if TYPE_CHECKING:
    from .batch import MicroBatch, TokenLayout
    from .config import IsopoConfig
    from .engine import LinearLayer


class IsopoLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer: LinearLayer, mb: MicroBatch, layout: TokenLayout):
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Cast once here and keep the low-precision copies, as autocast's own linear would.
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = _as(x, dtype), _as(weight, dtype)
            bias = _as(bias, dtype) if bias is not None else None
            with torch.autocast(device_type, enabled=False):
                out = F.linear(x, weight, bias)
        else:
            out = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.mb, ctx.layout, ctx.has_bias = layer, mb, layout, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_autocast_enabled(grad_out.device.type):  # a backward called inside an autocast region
            with torch.autocast(grad_out.device.type, enabled=False):
                return _linear_backward(ctx, grad_out)
        return _linear_backward(ctx, grad_out)


def _linear_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    layout = ctx.layout
    grad_out = _as(grad_out, weight.dtype)
    grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
    grad_w = isopo_weight_grad(x, grad_out, ctx.layer, ctx.mb, layout) if ctx.needs_input_grad[1] else None
    grad_b = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        d_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_b = _as(layout.token_adv, d_flat.dtype) @ d_flat  # biases take the REINFORCE gradient
    return grad_x, grad_w, grad_b, None, None, None


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; a no-op ``.to`` still costs the host a few µs of argument parsing, paid per layer."""
    return t if t.dtype == dtype else t.to(dtype)


def isopo_weight_grad(
    x: torch.Tensor, d: torch.Tensor, layer: LinearLayer, mb: MicroBatch, layout: TokenLayout
) -> torch.Tensor:
    """The host's part: pick the strategy and chunking, hand plain tensors to ``layer_update``, then fold
    the statistics it recorded into the layer's EMAs."""
    cfg = layer.cfg
    d_in, d_out = x.shape[-1], d.shape[-1]
    b, t = mb.num_seqs, layout.seq_len_max
    positions = None if cfg.variant == "interacting" else layout.samples[layer.index]
    k = 0 if positions is None else positions.shape[0]
    key = (b, t, k, x.dtype, x.device)
    kwargs = layer.plans.get(key)
    if kwargs is None:  # decided once per shape: the host's time per layer is what a GPU backward waits on
        strategy = choose_strategy(cfg.strategy, b, t, d_in, d_out, k, positions is None)
        chunk = output_chunk(cfg.chunk_bytes, x.element_size(), b, d_in, d_out)
        kwargs = layer.plans[key] = dict(cfg=cfg, b=b, t=t, strategy=strategy, chunk=chunk,
                                         fp32_gram=gram_out_dtype_supported(x))
    update = layer_update
    if cfg.compile and kwargs["chunk"] is None and not _compile_failed:
        update = _compiled_update()
    args = (x.reshape(-1, d_in), d.reshape(-1, d_out), positions, mb.advantages, layer.ema.value,
            layout.token_mask if layout.has_padding else None, layout.pad_index, layout.token_seq)
    try:
        grad_w, w, recorded = update(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager function computes the same
        if update is layer_update:
            raise
        _give_up_compiling(e)
        grad_w, w, recorded = layer_update(*args, **kwargs)
    for name, value in recorded.items():
        layer.ema.record(name, value)
    layer.last_weights = w.detach()
    return grad_w


def layer_update(
    x_flat: torch.Tensor,
    d_flat: torch.Tensor,
    positions: torch.Tensor | None,
    adv: torch.Tensor,
    ema: Mapping[str, torch.Tensor],
    token_mask: torch.Tensor | None,
    pad_index: torch.Tensor | None,
    token_seq: torch.Tensor,
    *,
    cfg: IsopoConfig,
    b: int,
    t: int,
    strategy: str,
    chunk: int | None,
    fp32_gram: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One layer's ISOPO weight gradient from its inputs a (x_flat) and output gradients δ (d_flat), a pure
    function of tensors: (gradient, per-sequence weights, statistics recorded for the EMAs).

    positions: the overlap sample (None: interacting); token_mask: 1.0 at valid positions, None when there
    is no padding; pad_index: (B, T) gather table of a padded layout, None when row r is sequence r."""
    d_in, d_out = x_flat.shape[1], d_flat.shape[1]
    stat_dtype = torch.float64 if x_flat.dtype == torch.float64 else torch.float32

    # Zero the padding in whichever operand is narrower: every statistic is a sum of δ_t a_tᵀ products.
    if token_mask is not None:
        mask = _as(token_mask, x_flat.dtype).unsqueeze(1)
        if d_in <= d_out:
            x_flat = x_flat * mask
        else:
            d_flat = d_flat * mask
    if pad_index is None:
        a3, d3 = x_flat.view(b, t, d_in), d_flat.view(b, t, d_out)
    else:
        # One zero row appended, which pad_index reads at padding.
        a3 = torch.cat([x_flat, x_flat.new_zeros(1, d_in)])[pad_index]
        d3 = torch.cat([d_flat, d_flat.new_zeros(1, d_out)])[pad_index]

    interacting = positions is None
    a_k = d_k = None
    if not interacting:
        a_k, d_k = x_flat.index_select(0, positions), d_flat.index_select(0, positions)
    stats = layer_stats(a3, d3, a_k, d_k, interacting=interacting, strategy=strategy, chunk=chunk,
                        stat_dtype=stat_dtype, fp32_gram=fp32_gram)

    recorded: dict[str, torch.Tensor] = {}
    if interacting:
        w = interacting_weights(stats.ntk, adv, cfg, ema, recorded)
    else:
        den = torch.linalg.vector_norm(
            torch.linalg.vector_norm(d_k, dim=1, dtype=stat_dtype) * torch.linalg.vector_norm(a_k, dim=1, dtype=stat_dtype)
        )
        w = non_interacting_weights(stats.norm, stats.overlap_num, den, adv, cfg, ema, recorded)

    if stats.per_seq_grad is not None:
        g = stats.per_seq_grad
        return (_as(w, g.dtype) @ g.reshape(b, -1)).view(d_out, d_in), w, recorded
    token_w = _as(w, d_flat.dtype)[token_seq]
    if token_mask is not None:
        token_w = token_w * _as(token_mask, d_flat.dtype)
    return (d_flat * token_w.unsqueeze(1)).t() @ x_flat, w, recorded


# -- compiled ---------------------------------------------------------------------------------------------
# On a GPU a layer's ISOPO work is ~20 small kernels, and the host launching them (not the device running
# them) sets the pace of the backward (BENCHMARKS.md); torch.compile fuses them into fewer. One compiled function serves
# every layer: shapes become dynamic after the first recompile.
_compiled = None
_compile_failed = False


def _compiled_update():
    global _compiled
    if _compiled is None:
        import torch._dynamo

        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        # One graph per variant, setting and EMA state (empty before the first optimizer step).
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
        _compiled = torch.compile(layer_update, fullgraph=True)
    return _compiled


def _give_up_compiling(error: Exception) -> None:
    global _compile_failed
    _compile_failed = True
    warnings.warn(f"ISOPO: torch.compile failed ({type(error).__name__}: {error}); running the layers eagerly",
                  RuntimeWarning, stacklevel=3)
