"""The matmuls of the LM head's two statistics routes, timed alone on a CUDA device (CUDA events, median).

Why the LM head forms G rather than taking the Gram route (BENCHMARKS.md, session 14): counted in FLOPs
the Gram route is cheaper, but its T × T product over the vocabulary runs far below the device's matmul
speed at the response view's T = 513, and the float32-output matmuls that both routes use are timed
against bf16 output and against float32 copies. The "aligned out" variants write the same products into a
view of a buffer whose rows are padded to 8 elements: whether an odd T or K (an unaligned leading dimension
of the output) is what sends cuBLAS to its slow kernel.

    python -m bench.matmul_probe [--vocab 151936] [--hidden 1024] [--batch 8] [--samples 125] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch


def time_us(fn: Callable[[], object], repeats: int) -> float:
    """Median µs of ``fn`` on the current CUDA stream, after two untimed calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def padded_out(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cuda") -> torch.Tensor:
    """An output of ``shape`` whose rows start 16-byte aligned: a view of a buffer whose last dimension is rounded
    up to a multiple of 8, for a matmul's ``out=`` (cuBLAS's Hopper kernels need an aligned leading dimension)."""
    *lead, last = shape
    return torch.empty(*lead, -(-last // 8) * 8, device=device, dtype=dtype)[..., :last]


def cases(vocab: int, hidden: int, batch: int, samples: int, seq_lens: tuple[int, ...]):
    """(label, {variant: closure}) per product, built lazily so that one T's tensors are freed before the next."""
    f32 = torch.float32
    for n in (hidden * hidden, 3 * hidden * hidden):
        x = torch.randn(batch, n, device="cuda", dtype=torch.bfloat16)
        yield f"NTK of G flattened ({batch}, {n})", {
            "out_dtype": lambda x=x: torch.mm(x, x.t(), out_dtype=f32),
            "bf16": lambda x=x: (x @ x.t()).float(),
            "float32 copy": lambda x=x: x.float() @ x.float().t()}
        del x
    for t in seq_lens:
        d = torch.randn(batch, t, vocab, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(batch, t, hidden, device="cuda", dtype=torch.bfloat16)
        d_k = torch.randn(samples, vocab, device="cuda", dtype=torch.bfloat16)
        flat = d.view(-1, vocab)
        tt_out, tk_out = padded_out(batch, t, t), padded_out(batch * t, samples)
        yield f"δ δᵀ over V, ({batch}, {t}, {vocab})", {
            "out_dtype": lambda d=d: torch.bmm(d, d.transpose(1, 2), out_dtype=f32),
            "bf16": lambda d=d: torch.bmm(d, d.transpose(1, 2)).float(),
            "out_dtype, aligned out": lambda d=d, o=tt_out: torch.bmm(d, d.transpose(1, 2), out_dtype=f32, out=o)}
        yield f"δ δ_kᵀ, ({batch * t}, {vocab}) × ({vocab}, {samples})", {
            "out_dtype": lambda flat=flat, d_k=d_k: torch.mm(flat, d_k.t(), out_dtype=f32),
            "bf16": lambda flat=flat, d_k=d_k: (flat @ d_k.t()).float(),
            "out_dtype, aligned out": lambda flat=flat, d_k=d_k, o=tk_out: torch.mm(flat, d_k.t(), out_dtype=f32, out=o)}
        yield f"a aᵀ, ({batch}, {t}, {hidden})", {
            "out_dtype": lambda a=a: torch.bmm(a, a.transpose(1, 2), out_dtype=f32),
            "bf16": lambda a=a: torch.bmm(a, a.transpose(1, 2)).float()}
        yield f"a block of G, ({batch}, 16384 of V, {hidden}) at T = {t}", {
            "bf16": lambda d=d, a=a: torch.bmm(d[:, :, :16384].transpose(1, 2), a)}
        del d, a, d_k, flat, tt_out, tk_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.matmul_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=125)
    parser.add_argument("--seq-lens", default="513,1024", help="comma-separated T of the LM head's view")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        seq_lens = tuple(int(t) for t in args.seq_lens.split(","))
    except ValueError:
        print(f"error: --seq-lens must be comma-separated integers; got {args.seq_lens!r}", file=sys.stderr)
        return 2
    sizes = (args.vocab, args.hidden, args.batch, args.samples, args.repeats, *seq_lens)
    if min(sizes) < 1:
        print("error: --vocab, --hidden, --batch, --samples, --repeats and --seq-lens must be positive", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: CUDA is not available: the probe times CUDA matmuls", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; µs, median of {args.repeats}", flush=True)
    for label, variants in cases(args.vocab, args.hidden, args.batch, args.samples, seq_lens):
        cells = []
        for name, fn in variants.items():
            try:
                cells.append(f"{name} {time_us(fn, args.repeats):9.1f}")
            except (RuntimeError, TypeError) as e:  # an overload this build lacks: say so, time the rest
                cells.append(f"{name} failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
        print(f"{label}: {' | '.join(cells)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
