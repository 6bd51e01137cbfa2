"""The time of each piece of one ISOPO linear layer's backward, at every linear shape of a preset model.

``python -m bench overhead`` times whole steps; this splits an ISOPO layer's extra work into its pieces, so
that each pass over the per-sequence gradients G can be set against what G's bytes allow and against the
ordinary weight-gradient matmul it stands beside. Each piece is the suite's own code (``statistics.py``,
``weights.py``, ``linear.py``) run on random operands of one layer's shape — B sequences of T tokens, the
step's dtype (bf16 on CUDA, as under the benchmark's autocast; float32 on a CPU) — and ``layer_*`` is a
whole layer's ISOPO weight gradient, every piece together, as an eager layer runs it.

Times are medians of ``repeats`` runs after ``warmup``: CUDA events on a GPU (the GPU's time; a gap while it
waits for the host counts only where the piece is that short), ``perf_counter`` on a CPU. The step column
sums each piece over the model's decoder layers (the LM head, chunked in the real step, is left out).
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
from algorithms.isopo.statistics import _block_stats, gram_matrix, gram_out_dtype_supported
from algorithms.isopo.weights import interacting_weights

from .models import preset_config
from .overhead import MODELS, OverheadError

PIECES = ("weight_grad", "per_seq_grads", "norms", "overlap", "ntk", "weighted_sum", "interacting_solve",
          "layer_ni", "layer_int")
"""weight_grad is REINFORCE's (the ordinary matmul); the rest are ISOPO's torch path, layer_ni / layer_int
whole layers as configured by default (the Triton kernels where usable)."""
KERNEL_PIECES = ("gram_kernel", "weighted_sum_kernel", "layer_ni_torch", "layer_int_torch")
"""Where ISOPO's Triton kernels are usable (CUDA): the kernels' versions of ntk / norms and weighted_sum, and
the whole layers without them (``IsopoConfig.triton_kernels=False``), side by side."""
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
    if opts.model not in MODELS:
        raise OverheadError(f"unknown model preset {opts.model!r}; valid presets: {', '.join(MODELS)}")
    if opts.device not in ("cpu", "cuda"):
        raise OverheadError(f"unknown device {opts.device!r}; valid devices: cpu, cuda")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise OverheadError("--device cuda was requested but CUDA is not available; use --device cpu")
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
        by_kernel = {
            "gram_kernel": lambda: kernels.gram(flat),
            "weighted_sum_kernel": lambda: kernels.weighted_sum(adv, flat),
            "layer_ni_torch": layer(ni_cfg.replace(triton_kernels=False), positions),
            "layer_int_torch": layer(int_cfg.replace(triton_kernels=False), None),
        }
    return by_kernel | {
        "weight_grad": lambda: d.t() @ x,
        "per_seq_grads": lambda: torch.bmm(d3.transpose(1, 2), x3, out=g),
        "norms": lambda: torch.linalg.vector_norm(flat, dim=1, dtype=stat),
        "overlap": lambda: _block_stats(g, a_k.unsqueeze(2), d_k, stat, need_norm=False),
        "ntk": lambda: gram_matrix(flat, stat, fp32_gram),
        "weighted_sum": lambda: w_g @ flat,
        "interacting_solve": lambda: interacting_weights(ntk, adv, int_cfg, {}, {}),
        "layer_ni": layer(ni_cfg, positions),
        "layer_int": layer(int_cfg, None),
    }


def time_us(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> float:
    """Median microseconds of one call."""
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


def measure(opts: Options) -> dict:
    """{"shapes": [{"in", "out", "count", "g_bytes"}], "us": {piece: [per shape]}, "step_ms": {piece: total}}."""
    dtype = torch.bfloat16 if opts.device == "cuda" else torch.float32
    shapes = linear_shapes(opts.model)
    rows = [{"in": i, "out": o, "count": n, "g_bytes": opts.batch * i * o * dtype.itemsize}
            for (i, o), n in shapes.items()]
    us: dict[str, list[float]] = {}
    for row in rows:
        pieces = layer_pieces(row["in"], row["out"], opts, dtype)
        names = [*PIECES, *(p for p in KERNEL_PIECES if p in pieces)]
        for name in names:
            us.setdefault(name, []).append(time_us(pieces[name], opts.device, opts.repeats, opts.warmup))
        del pieces
        if opts.device == "cuda":
            torch.cuda.empty_cache()
    step_ms = {p: sum(u * r["count"] for u, r in zip(us[p], rows, strict=True)) / 1e3 for p in us}
    return {"dtype": str(dtype).removeprefix("torch."), "shapes": rows, "us": us, "step_ms": step_ms}


def format_table(result: dict) -> str:
    shapes = result["shapes"]
    heads = [f"{r['in']}>{r['out']} ×{r['count']}" for r in shapes]
    width = max(14, *(len(h) for h in heads))
    lines = [f"{'piece (µs)':18s}" + "".join(f"{h:>{width + 2}s}" for h in heads) + f"{'step ms':>10s}"]
    for piece in result["us"]:
        lines.append(f"{piece:18s}" + "".join(f"{u:>{width + 2}.1f}" for u in result["us"][piece])
                     + f"{result['step_ms'][piece]:>10.2f}")
    g_total = sum(r["g_bytes"] * r["count"] for r in shapes)
    size = f"{g_total / GB:.2f} GB" if g_total >= GB / 10 else f"{g_total / 2**20:.1f} MiB"
    lines.append(f"G: {size} per step in {result['dtype']} (every decoder linear layer's per-sequence gradients); "
                 "one pass over it at memory speed takes that size over the device's bandwidth")
    return "\n".join(lines)


def run(opts: Options) -> int:
    validate(opts)
    from .overhead import device_name

    print(f"layer costs: {device_name(opts.device)}, {opts.model}, B={opts.batch}, T={opts.seq_len}, "
          f"K={opts.num_samples}, median of {opts.repeats}", flush=True)
    print(format_table(measure(opts)))
    return 0
