"""The ISOPO backward of one nn.Linear: statistics, weights and the weighted weight gradient, all inside
the layer's own backward — one backward pass for the whole model, no loop over sequences.

Σ_i w_i G_i = Σ_t w_{s(t)} δ_t a_tᵀ, so once the weights are known the weight gradient is the ordinary
matmul with δ scaled per token (or a weighted sum of G when G was formed anyway). The input gradient δW is
left as it is: the advantage-free δ keeps flowing to the layers below.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import kernels
from .autograd import direct_apply
from .graphs import Visit
from .statistics import (
    block_stats,
    choose_strategy,
    grad_stats,
    gram_out_dtype_supported,
    layer_stats,
    ntk_matrix,
    output_chunk,
)
from .weights import interacting_weights, needs_norm, non_interacting_weights, unregularised

if TYPE_CHECKING:
    from .batch import MicroBatch, TokenLayout
    from .config import IsopoConfig
    from .engine import LinearLayer
    from .graphs import TailGraph, TailGraphs


class IsopoLinearFunction(torch.autograd.Function):
    """F.linear whose weight gradient is ISOPO's. ``state`` is (layer, micro-batch, token layout, device type,
    autocast dtype or None): one context attribute, set by the layer's forward (``engine.py``), which also
    decides the autocast cast outside this function — everything here is paid per layer on the host."""

    @staticmethod
    def forward(ctx, x, weight, bias, state):
        cast = state[4]
        if cast is not None:
            # Cast once here and keep the low-precision copies, as autocast's own linear would. Autocast, still
            # on, then finds the operands in its dtype and casts nothing (no context manager to leave it: its
            # Python enter and exit cost more host time than the rest of this function).
            x, weight = _as(x, cast), _as(weight, cast)
            bias = _as(bias, cast) if bias is not None else None
        out = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.state = state
        return out

    @staticmethod
    def backward(ctx, grad_out):
        device_type = ctx.state[3]
        if torch.is_autocast_enabled(device_type):  # a backward called inside an autocast region
            with torch.autocast(device_type, enabled=False):
                return _linear_backward(ctx, grad_out)
        return _linear_backward(ctx, grad_out)


apply_isopo_linear = direct_apply(IsopoLinearFunction)


def _linear_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    layer, mb, layout = ctx.state[:3]
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    grad_out = _as(grad_out, weight.dtype)
    grad_x = grad_out @ weight if needs_x else None
    grad_w = isopo_weight_grad(x, grad_out, layer, mb, layout) if needs_w else None
    grad_b = None
    if needs_b:
        d_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_b = _as(layout.token_adv, d_flat.dtype) @ d_flat  # biases take the REINFORCE gradient
    return grad_x, grad_w, grad_b, None


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; a no-op ``.to`` still costs the host a few µs of argument parsing, paid per layer."""
    return t if t.dtype == dtype else t.to(dtype)


def isopo_weight_grad(
    x: torch.Tensor, d: torch.Tensor, layer: LinearLayer, mb: MicroBatch, layout: TokenLayout
) -> torch.Tensor:
    """The host's part: pick the strategy and chunking (once per shape: ``LayerPlan``), hand plain tensors to
    ``layer_update`` or the layer's graphed tail, then fold the statistics recorded into the layer's EMAs."""
    cfg = layer.cfg
    b, t = mb.num_seqs, layout.seq_len_max
    positions = None if cfg.variant == "interacting" else layout.samples[layer.index]
    key = (b, t, 0 if positions is None else positions.shape[0], x.dtype, x.device)
    plan = layer.plans.get(key)
    if plan is None:  # decided once per shape: the host's time per layer is what a GPU backward waits on
        plan = layer.plans[key] = LayerPlan(layer, x, d, b, t, positions)
    graphs = layer.graphs
    # Only layers on the main layout: a view's sample (the positions inside it) changes size from one
    # micro-batch to the next, and every new size would be a new capture.
    if plan.graphable and layout is mb.main and not graphs.failed and (x.is_cuda or not graphs.capture):
        grad_w = _graph_step(plan, graphs, layer, x, d, positions, mb.advantages, layout)
        if grad_w is not None:
            return grad_w
    grad_w, recorded = _eager_or_compiled(cfg, _update_args(x, d, positions, mb.advantages, layout, layer),
                                          plan.kwargs)
    for name, value in recorded.items():
        layer.ema.record(name, value)
    return grad_w


class LayerPlan:
    """A layer's decisions for one (B, T, K, dtype, device), made on its first backward at that shape: the
    statistics strategy and chunking (``layer_update``'s keyword arguments), whether its tail can be a
    graph's, and the graph it last used (kept, so that the next backward skips the lookup)."""

    __slots__ = ("kwargs", "graphable", "copy", "graph_shape", "form_tiles", "tail_fn", "tail", "tail_keys")

    def __init__(self, layer: LinearLayer, x: torch.Tensor, d: torch.Tensor, b: int, t: int,
                 positions: torch.Tensor | None):
        cfg = layer.cfg
        d_in, d_out = x.shape[-1], d.shape[-1]
        k = 0 if positions is None else positions.shape[0]
        chunk = output_chunk(cfg.chunk_bytes, x.element_size(), b, d_in, d_out)
        strategy = choose_strategy(cfg.strategy, b, t, d_in, d_out, k, positions is None)
        fp32_gram = gram_out_dtype_supported(x)
        self.kwargs = dict(cfg=cfg, b=b, t=t, strategy=strategy, chunk=chunk, fp32_gram=fp32_gram)
        self.graphable = layer.graphs is not None and strategy == "instantiate" and chunk is None
        # Under autocast G is bf16 and the weight float32: autograd casts the returned gradient into a new
        # tensor as the backward returns, so the graph's static output needs no copy of its own.
        self.copy = _static_gradient_needs_copy(x, layer.module._parameters["weight"])
        self.graph_shape = (b, d_in, d_out, k, x.dtype, x.device)
        # The graph's G and NTK partials from kernels.form_and_gram_parts (``kernels.FORM_IMPL``), decided here.
        self.form_tiles = (kernels.form_tiles(d_in, d_out)
                           if self.graphable and _forms_with_gram(cfg, positions is None, x.dtype) else 0)
        self.tail_fn = functools.partial(tail_update, cfg=cfg, fp32_gram=fp32_gram)
        self.tail: TailGraph | None = None
        self.tail_keys = -1
        """How many EMA keys the layer had when ``tail`` was looked up (the graph changes with them, and a
        configuration's keys only ever go from none to all)."""


def _static_gradient_needs_copy(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype == weight.dtype


def _update_args(x, d, positions, adv, layout, layer) -> tuple:
    """``layer_update``'s positional arguments."""
    return (x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1]), positions, adv, layer.ema.value,
            layout.token_mask if layout.has_padding else None, layout.pad_index, layout.token_seq)


def _graph_step(plan: LayerPlan, graphs: TailGraphs, layer: LinearLayer, x, d, positions, adv, layout):
    """``layer_update`` for an unchunked `instantiate` layer, its tail (``tail_update``: statistics, weights,
    weighted sum) replayed from ``graphs``: G and the sample rows written straight into the graph's static
    inputs, the EMAs read and the statistics recorded through the graph's slots (``graphs.TailGraph``), the
    gradient copied where autograd would keep the static buffer itself. None where a capture fails or the
    graph has no slot left this step: the caller takes the eager path."""
    ema = layer.ema.value
    tail = plan.tail
    if tail is None or plan.tail_keys != len(ema) or not graphs.touch(tail):
        tail = plan.tail = graphs.get(*plan.graph_shape, adv, ema, _stat_dtype(x.dtype), plan.form_tiles)
        plan.tail_keys = len(ema)
    if not tail.has_slot():
        return None  # this step has visited the graph more times than it has slots: the eager path
    b, d_in, d_out = plan.graph_shape[:3]
    try:
        x_flat, d_flat, a3, d3 = padded_operands(x.reshape(-1, d_in), d.reshape(-1, d_out),
                                                 layout.token_mask if layout.has_padding else None,
                                                 layout.pad_index, b, layout.seq_len_max)
        if plan.form_tiles:
            _form_into(tail.inputs, a3, d3)
        else:
            torch.bmm(d3.transpose(1, 2), a3, out=tail.g)
        if positions is not None:
            torch.index_select(x_flat, 0, positions, out=tail.a_k)
            torch.index_select(d_flat, 0, positions, out=tail.d_k)
        tail.load(adv, layer.ema)
        _, grad_flat, _ = tail.run(plan.tail_fn, graphs.capture)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any capture failure: the eager path computes the same
        graphs.give_up(e)
        return None
    # A new view each call: autograd may keep the returned tensor itself as .grad (hence the copy).
    grad_w = grad_flat.view(d_out, d_in)
    if plan.copy:
        grad_w = grad_w.clone()
    return grad_w  # the statistics it recorded stay in the graph's slots until the step's end


def _forms_with_gram(cfg: IsopoConfig, interacting: bool, dtype: torch.dtype) -> bool:
    """Whether an interacting layer's G and NTK partials come from one kernel (``kernels.FORM_IMPL``)."""
    return interacting and cfg.kernels_enabled and kernels.formation_chosen(dtype)


def _form_into(inputs, a3: torch.Tensor, d3: torch.Tensor) -> None:
    """A graph's static G and NTK partials (``graphs.StaticInputs``) from a3 and d3: by the formation kernel,
    or, where this call's operands do not suit it, by the batched matmul and the whole NTK as the first
    partial (the rest zero) — what the captured tail reads either way."""
    if kernels.formable(a3, d3):
        kernels.form_and_gram_parts(a3, d3, inputs.g, inputs.form_parts, inputs.form_arrivals)
        return
    torch.bmm(d3.transpose(1, 2), a3, out=inputs.g)
    flat = inputs.g.view(inputs.g.shape[0], -1)
    inputs.form_parts.zero_()
    inputs.form_parts[0] = ntk_matrix(flat, torch.float32, use_kernels=True)


def _eager_or_compiled(cfg: IsopoConfig, args, kwargs):
    """Eager, or through torch.compile (``IsopoConfig.compile``) with an eager fallback."""
    if not (cfg.compile and kwargs["chunk"] is None and not _compile_failed):
        grad_w, _, recorded = layer_update(*args, **kwargs)
        return grad_w, recorded
    try:
        grad_w, _, recorded = _compiled_update()(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager function computes the same
        _give_up_compiling(e)
        grad_w, _, recorded = layer_update(*args, **kwargs)
    return grad_w, recorded


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
    x_flat, d_flat, a3, d3 = padded_operands(x_flat, d_flat, token_mask, pad_index, b, t)
    a_k = d_k = None
    if positions is not None:
        a_k, d_k = x_flat.index_select(0, positions), d_flat.index_select(0, positions)
    if strategy == "instantiate" and chunk is None:
        parts = None
        if _forms_with_gram(cfg, positions is None, a3.dtype) and kernels.formable(a3, d3):
            g, parts = kernels.form_and_gram_parts(a3, d3)  # G, and its NTK's partials from the same kernel
        else:
            g = torch.bmm(d3.transpose(1, 2), a3)  # (B, out, in): the per-sequence gradients G_i
        w, grad_flat, recorded = tail_update(g, a_k, d_k, adv, ema, cfg=cfg, fp32_gram=fp32_gram, parts=parts)
        return grad_flat.view(d_out, d_in), w, recorded

    stat_dtype = _stat_dtype(x_flat.dtype)
    stats = layer_stats(a3, d3, a_k, d_k, interacting=positions is None, strategy=strategy, chunk=chunk,
                        stat_dtype=stat_dtype, fp32_gram=fp32_gram, need_norm=needs_norm(cfg),
                        use_kernels=cfg.kernels_enabled)
    recorded: dict[str, torch.Tensor] = {}
    w = _weights(stats, a_k, d_k, adv, cfg, ema, recorded, stat_dtype)
    token_w = _as(w, d_flat.dtype)[token_seq]
    if token_mask is not None:
        token_w = token_w * _as(token_mask, d_flat.dtype)
    # Σ_t w_t δ_t a_tᵀ with the narrower operand scaled: the LM head's δ is 150× wider than its input.
    if d_in < d_out:
        return d_flat.t() @ (x_flat * token_w.unsqueeze(1)), w, recorded
    return (d_flat * token_w.unsqueeze(1)).t() @ x_flat, w, recorded


def tail_update(
    g: torch.Tensor,
    a_k: torch.Tensor | None,
    d_k: torch.Tensor | None,
    adv: torch.Tensor,
    ema: Mapping[str, torch.Tensor],
    *,
    cfg: IsopoConfig,
    fp32_gram: bool,
    parts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Everything after the per-sequence gradients g (B, out, in), given the overlap sample (a_k, d_k; None:
    interacting): (w, Σ_i w_i G_i flat, recorded) — the statistics, the weights and the weighted sum, ~15
    small kernels on a GPU that ``graphs.py`` replays as one graph. parts: the NTK's partials, taken where G
    was formed (``kernels.form_and_gram_parts``), for the kernel path of the interacting rule."""
    stat_dtype = _stat_dtype(g.dtype)
    recorded: dict[str, torch.Tensor] = {}
    flat = g.view(g.shape[0], -1)
    # With the kernels, from G to the weights in a handful of kernels (interacting: the Gram kernel, the sum of
    # its partials, then tr K, λ and the solve in one program; for the named settings, with no regularisation:
    # the norms, the overlap's matmuls and two) instead of the torch path's ~20 tiny ones, each of which costs
    # the GPU a few µs even inside a graph (BENCHMARKS.md, sessions 9 and 11).
    fused = cfg.kernels_enabled and stat_dtype == torch.float32 and kernels.usable(flat)
    if fused and a_k is None and isinstance(ema, Visit):
        # From a graph: the program reads the EMA's slot, records tr K / B into its own and moves the cursor on.
        w, _ = kernels.interacting_weights(flat, adv, ema.ema_slots.get("trK"), cfg.c_lambda,
                                           slots=(ema.cursor, ema.record_slot("trK", stat_dtype)), parts=parts)
        ema.advanced = True
    elif fused and a_k is None:
        w, recorded["trK"] = kernels.interacting_weights(flat, adv, ema.get("trK"), cfg.c_lambda, parts=parts)
    elif fused and unregularised(cfg):
        norm, overlap_num = block_stats(g, a_k, d_k, stat_dtype, cfg.p != cfg.r, use_kernels=True)
        w = kernels.non_interacting_weights(norm, overlap_num, a_k, d_k, adv, cfg.p - cfg.r, cfg.q + cfg.r)
    else:
        stats = grad_stats(g, a_k, d_k, stat_dtype, fp32_gram, need_norm=needs_norm(cfg),
                           use_kernels=cfg.kernels_enabled)
        w = _weights(stats, a_k, d_k, adv, cfg, ema, recorded, stat_dtype)
    return w, weighted_sum(w, g, cfg), recorded


def weighted_sum(w: torch.Tensor, g: torch.Tensor, cfg: IsopoConfig) -> torch.Tensor:
    """Σ_i w_i G_i, flat: the Triton kernel (float32 accumulation of the float32 weights) where usable
    (``IsopoConfig.triton_kernels``), else a matrix-vector product with the weights in G's dtype."""
    flat = g.view(g.shape[0], -1)
    if cfg.kernels_enabled and kernels.usable(flat):
        return kernels.weighted_sum(w, flat)
    return _as(w, g.dtype) @ flat


def padded_operands(x_flat, d_flat, token_mask, pad_index, b, t):
    """(x_flat, d_flat, a3, d3): padding zeroed in the narrower operand (every statistic is a sum of δ_t a_tᵀ
    products), and both as (B, T, ·) sequences, a padded layout gathered through a zero row."""
    d_in, d_out = x_flat.shape[1], d_flat.shape[1]
    if token_mask is not None:
        mask = _as(token_mask, x_flat.dtype).unsqueeze(1)
        if d_in <= d_out:
            x_flat = x_flat * mask
        else:
            d_flat = d_flat * mask
    if pad_index is None:
        return x_flat, d_flat, x_flat.view(b, t, d_in), d_flat.view(b, t, d_out)
    a3 = torch.cat([x_flat, x_flat.new_zeros(1, d_in)])[pad_index]
    d3 = torch.cat([d_flat, d_flat.new_zeros(1, d_out)])[pad_index]
    return x_flat, d_flat, a3, d3


def _weights(stats, a_k, d_k, adv, cfg, ema, recorded, stat_dtype) -> torch.Tensor:
    if a_k is None:
        return interacting_weights(stats.ntk, adv, cfg, ema, recorded)
    den = torch.linalg.vector_norm(
        torch.linalg.vector_norm(d_k, dim=1, dtype=stat_dtype) * torch.linalg.vector_norm(a_k, dim=1, dtype=stat_dtype)
    )
    return non_interacting_weights(stats.norm, stats.overlap_num, den, adv, cfg, ema, recorded)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
