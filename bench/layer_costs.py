"""The time of each piece of one ISOPO linear layer's backward, at every linear shape of a preset model.

``python -m bench overhead`` times whole steps; this splits an ISOPO layer's extra work into its pieces, so
that each pass over the per-sequence gradients G can be set against what G's bytes allow and against the
ordinary weight-gradient matmul it stands beside. Each piece is the suite's own code (``statistics.py``,
``weights.py``, ``linear.py``) run on random operands of one layer's shape — B sequences of T tokens, the
step's dtype (bf16 on CUDA, as under the benchmark's autocast; float32 on a CPU) — and ``layer_*`` is a
whole layer's ISOPO weight gradient, every piece together, as an eager layer runs it.

Two timings, each the median of ``repeats`` after ``warmup``. ``eager``: one call as the host issues it,
between CUDA events on a GPU (``perf_counter`` on a CPU) — on a GPU a piece shorter than its own launch is
timed as the host's launch latency, which is what an eager layer pays. ``graph`` (CUDA only): the piece
captured ``GRAPH_CALLS`` times into one CUDA graph and replayed, per call — the GPU's own time, no host in
it, which is what the layer costs once its launches are out of the way (graphs, a fused kernel). The step
column sums each piece over the model's decoder layers (the LM head, chunked in the real step, is left out).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from algorithms.isopo import IsopoConfig, kernels
from algorithms.isopo.linear import layer_update
from algorithms.isopo.statistics import gram_matrix, gram_out_dtype_supported, overlap_numerators
from algorithms.isopo.weights import interacting_weights

from .models import preset_config
from .overhead import OverheadError, check_model_and_device

PIECES = ("weight_grad", "per_seq_grads", "norms", "overlap", "ntk", "weighted_sum", "interacting_solve",
          "layer_ni", "layer_int")
"""weight_grad is REINFORCE's (the ordinary matmul); the rest are ISOPO's torch path, layer_ni / layer_int
whole layers as configured by default (the Triton kernels where usable)."""
KERNEL_PIECES = ("gram_kernel", "weighted_sum_kernel", "damped_solve_kernel", "interacting_kernel",
                 "non_interacting_kernel", "norms_overlap_fused", "layer_ni_triton", "layer_ni_fused",
                 "layer_int_triton", "layer_int_formgram")
"""Where ISOPO's Triton kernels are usable (CUDA): the kernels' versions of ntk, weighted_sum and the B × B
solve, the interacting rule from G (the Gram kernel, the partials' sum, then tr K, λ and the solve in one
program: ntk and interacting_solve together), the paper setting's weights from the norms and the overlap
numerators (the rest of the rule), the norms and overlap numerators from one read of G (the fused kernel,
``kernels.OVERLAP_IMPL = "fused"``), and the whole layers with them (``IsopoConfig.triton_kernels=True``;
layer_ni_fused with the fused kernel; layer_int_formgram with G and its NTK from one kernel,
``kernels.FORM_IMPL = "fused"``), side by side."""
GRAPH_CALLS = 10
"""Calls of a piece captured into one graph for the ``graph`` timing."""
GB = 1e9


@dataclass
class Options:
    device: str = "cpu"
    model: str = "small"
    batch: int = 8
    seq_len: int = 1024
    num_samples: int = 250
    repeats: int = 30
    warmup: int = 5


def validate(opts: Options) -> None:
    check_model_and_device(opts.model, opts.device)
    for name in ("batch", "seq_len", "num_samples", "repeats"):
        if getattr(opts, name) < 1:
            raise OverheadError(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(opts, name)}")
    if opts.warmup < 0:
        raise OverheadError(f"--warmup must be >= 0; got {opts.warmup}")
    if opts.num_samples > opts.batch * opts.seq_len:
        raise OverheadError(f"--num-samples {opts.num_samples} exceeds the B·T = {opts.batch * opts.seq_len} tokens")


def linear_shapes(model: str) -> dict[tuple[int, int], int]:
    """(in, out) → how many of the preset's decoder linear layers have that shape, read off the model itself
    (built on the meta device: no weights)."""
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        net = Qwen3ForCausalLM(preset_config(model, vocab_size=256 if model == "tiny" else None))
    return dict(Counter((m.in_features, m.out_features) for m in net.model.layers.modules()
                        if isinstance(m, torch.nn.Linear)))


def layer_pieces(d_in: int, d_out: int, opts: Options, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """One closure per piece over random operands of this shape, as the layer's backward would see them."""
    gen = torch.Generator(device="cpu").manual_seed(d_in * 7919 + d_out)
    b, t, k, dev = opts.batch, opts.seq_len, opts.num_samples, opts.device

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dev, dtype)

    x, d = randn(b * t, d_in), randn(b * t, d_out)
    x3, d3 = x.view(b, t, d_in), d.view(b, t, d_out)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.bmm(d3.transpose(1, 2), x3)
    flat = g.view(b, -1)
    positions = torch.randperm(b * t, generator=gen)[:k].to(dev)
    a_k, d_k = x.index_select(0, positions), d.index_select(0, positions)
    adv = torch.randn(b, generator=gen).to(dev, stat)
    w_g = adv.to(dtype)
    fp32_gram = gram_out_dtype_supported(x)
    ntk = gram_matrix(flat, stat, fp32_gram)
    token_seq = torch.arange(b, device=dev).repeat_interleave(t)
    ni_cfg = IsopoConfig(setting="paper", num_samples=k)
    int_cfg = IsopoConfig(variant="interacting", setting=None, c_lambda=1.0)

    def layer(cfg, pos):
        return lambda: layer_update(x, d, pos, adv, {}, None, None, token_seq, cfg=cfg, b=b, t=t,
                                    strategy="instantiate", chunk=None, fp32_gram=fp32_gram)

    by_kernel = {}
    if kernels.usable(flat):
        overlap_num = overlap_numerators(g, a_k, d_k)
        norm = torch.linalg.vector_norm(flat, dim=1, dtype=stat)
        by_kernel = {
            "gram_kernel": lambda: kernels.gram(flat),
            "weighted_sum_kernel": lambda: kernels.weighted_sum(adv, flat),
            "damped_solve_kernel": lambda: kernels.damped_solve(ntk, adv, ntk.diagonal().mean()),
            "interacting_kernel": lambda: kernels.interacting_weights(flat, adv, None, 1.0),
            "non_interacting_kernel": lambda: kernels.non_interacting_weights(norm, overlap_num, a_k, d_k, adv,
                                                                              ni_cfg.p - ni_cfg.r, ni_cfg.q + ni_cfg.r),
            "norms_overlap_fused": lambda: kernels.norms_and_overlap(g, a_k, d_k, True),
            "layer_ni_triton": layer(ni_cfg.replace(triton_kernels=True), positions),
            "layer_ni_fused": kernels.settings(OVERLAP_IMPL="fused")(layer(ni_cfg.replace(triton_kernels=True),
                                                                                 positions)),
            "layer_int_triton": layer(int_cfg.replace(triton_kernels=True), None),
            "layer_int_formgram": kernels.settings(FORM_IMPL="fused")(layer(int_cfg.replace(triton_kernels=True),
                                                                              None)),
        }
    return by_kernel | {
        "weight_grad": lambda: d.t() @ x,
        "per_seq_grads": lambda: torch.bmm(d3.transpose(1, 2), x3, out=g),
        "norms": lambda: torch.linalg.vector_norm(flat, dim=1, dtype=stat),
        "overlap": lambda: overlap_numerators(g, a_k, d_k),
        "ntk": lambda: gram_matrix(flat, stat, fp32_gram),
        "weighted_sum": lambda: w_g @ flat,
        "interacting_solve": lambda: interacting_weights(ntk, adv, int_cfg, {}, {}),
        "layer_ni": layer(ni_cfg, positions),
        "layer_int": layer(int_cfg, None),
    }


def time_us(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> float:
    """Median microseconds of one call as the host issues it."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def replay_us(fn: Callable[[], object], repeats: int, warmup: int, calls: int = GRAPH_CALLS) -> float:
    """Median microseconds of one call on the GPU alone: ``calls`` calls captured into one CUDA graph (after a
    warm-up on a side stream, where libraries set up their workspaces), its replays timed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a piece that cannot be captured raises: _timed reports it
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def _timed(name: str, kind: str, fn: Callable[[], object], opts: Options) -> float:
    """One piece's time; NaN, with a warning line, where the piece fails (a kernel that does not compile on
    this device, say), so that the other pieces are still measured."""
    try:
        if kind == "graph":
            return replay_us(fn, opts.repeats, opts.warmup)
        return time_us(fn, opts.device, opts.repeats, opts.warmup)
    except Exception as e:  # noqa: BLE001 - any failure of one piece: report it, measure the rest
        print(f"warning: {name} ({kind}) failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              flush=True)
        return float("nan")


def measure(opts: Options) -> dict:
    """{"dtype", "shapes": [{"in", "out", "count", "g_bytes"}], "timings": {"eager" (and on CUDA "graph"):
    {"us": {piece: [per shape]}, "step_ms": {piece: summed over the layers}}}}."""
    dtype = torch.bfloat16 if opts.device == "cuda" else torch.float32
    shapes = linear_shapes(opts.model)
    rows = [{"in": i, "out": o, "count": n, "g_bytes": opts.batch * i * o * dtype.itemsize}
            for (i, o), n in shapes.items()]
    kinds = ["eager", "graph"] if opts.device == "cuda" else ["eager"]
    us: dict[str, dict[str, list[float]]] = {kind: {} for kind in kinds}
    for row in rows:
        pieces = layer_pieces(row["in"], row["out"], opts, dtype)
        for name in [*PIECES, *(p for p in KERNEL_PIECES if p in pieces)]:
            for kind in kinds:
                us[kind].setdefault(name, []).append(_timed(name, kind, pieces[name], opts))
        del pieces
        if opts.device == "cuda":
            torch.cuda.empty_cache()
    timings = {kind: {"us": per, "step_ms": {p: sum(u * r["count"] for u, r in zip(v, rows, strict=True)) / 1e3
                                             for p, v in per.items()}}
               for kind, per in us.items()}
    return {"dtype": str(dtype).removeprefix("torch."), "shapes": rows, "timings": timings}


def format_table(result: dict) -> str:
    shapes = result["shapes"]
    heads = [f"{r['in']}>{r['out']} ×{r['count']}" for r in shapes]
    width = max(14, *(len(h) for h in heads))
    lines = []
    for kind, timing in result["timings"].items():
        what = "one call as the host issues it" if kind == "eager" else "the GPU alone, from CUDA-graph replays"
        lines.append(f"{kind}: {what}")
        lines.append(f"{'piece (µs)':20s}" + "".join(f"{h:>{width + 2}s}" for h in heads) + f"{'step ms':>10s}")
        for piece, values in timing["us"].items():
            lines.append(f"{piece:20s}" + "".join(f"{u:>{width + 2}.1f}" for u in values)
                         + f"{timing['step_ms'][piece]:>10.2f}")
    g_total = sum(r["g_bytes"] * r["count"] for r in shapes)
    size = f"{g_total / GB:.2f} GB" if g_total >= GB / 10 else f"{g_total / 2**20:.1f} MiB"
    lines.append(f"G: {size} per step in {result['dtype']} (every decoder linear layer's per-sequence gradients); "
                 "one pass over it at memory speed takes that size over the device's bandwidth")
    return "\n".join(lines)


def run(opts: Options) -> int:
    validate(opts)
    from .machine import device_name, set_malloc_policy

    heap = ""
    # On a CPU, the overhead command's default heap: without it each call's fresh G is mmap'd and
    # zero-filled anew, page faults that the pieces timed alone (into preallocated outputs) do not pay.
    if opts.device == "cpu" and set_malloc_policy("retain"):
        heap = ", heap retain"
    print(f"layer costs: {device_name(opts.device)}, {opts.model}, B={opts.batch}, T={opts.seq_len}, "
          f"K={opts.num_samples}, median of {opts.repeats}{heap}", flush=True)
    print(format_table(measure(opts)))
    return 0
