"""Launch parameters of ISOPO's Triton kernels (``algorithms/isopo/kernels.py``), timed on this GPU.

The kernels' block sizes and warp counts are module constants, chosen once from this table rather than
autotuned at run time (an autotuner's choice follows timing noise, and the Gram kernel's summation order
follows its block size). For every linear shape of a preset model it times, from CUDA-graph replays (the
GPU alone, as ``layer-costs`` does), the torch operation each kernel stands in for and the kernel at each
candidate setting; the step column sums a row over the model's decoder layers.

    python -m bench.kernel_configs [--model qwen3-0.6b] [--batch 8] [--repeats 30]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from algorithms.isopo import kernels
from algorithms.isopo.statistics import gram_matrix, gram_out_dtype_supported, overlap_numerators

from .layer_costs import linear_shapes, replay_us
from .overhead import OverheadError, check_model_and_device

SUM_SETTINGS = [(1024, 4), (2048, 8)]
"""(block, warps) of the weighted-sum kernel: the default and the other of session 14's two fastest on an H200
(1.97–2.03 ms a step; four others, 2.02–4.97 ms, are no longer timed)."""
GRAM_SETTINGS = [(256, 4, 3, 4), (256, 4, 4, 4), (512, 4, 3, 4), (1024, 4, 2, 64), (1024, 8, 2, 64)]
"""(block, warps, stages, waves) of the tensor-core Gram kernel: the default, a deeper pipeline, longer tiles,
and one 1024-column tile per program (64 waves: the weighted sum's pattern, which reads G at ~3.5 TB/s, with
a partial per program to sum). On an H200 (session 14) 8 warps of 256-column tiles ran it 1.6× slower, 8 or
16 waves of them slower too, and no setting read G faster than the default (BENCHMARKS.md)."""
OUTER_SETTINGS = [(block, warps, 4) for block in (64, 128, 256) for warps in (4, 8)] + [(128, 4, 64), (256, 8, 64)]
"""(columns per tile, warps, waves) of the outer-product Gram kernel (``GRAM_IMPL = "outer"``); 64 waves: one
tile per program."""
TMA_SETTINGS = [(4, 4, 2, 4), (4, 8, 3, 4), (1, 4, 3, 4), (4, 4, 2, 64), (4, 8, 2, 64)]
"""(rows of 256 columns per tile, warps, stages, waves) of the descriptor Gram kernel (``GRAM_IMPL = "tma"``):
tiles of 1024, 512 and 256 columns, each loaded by one copy; for sm_90a none spills (``python -m
bench.kernel_compile --candidates``; 2 rows with 4 or 8 warps, or 4 rows, 4 warps and 3 stages, spilled)."""
FORM_SETTINGS = [(128, 128, 64, 8, 3, 2), (128, 128, 64, 8, 3, 8), (128, 256, 64, 8, 3, 2), (64, 128, 64, 4, 4, 2)]
"""(rows, columns, step along T, warps, stages, rows of a tile its Gram share reads at a time) of the
formation-with-Gram kernel (``form_and_gram_parts``; the last program of each tile reads the B tiles back in
rows / that many steps),
against "form+gram bmm+gram" (torch's batched matmul, then the Gram kernel), timed last: for sm_90a TMA,
``wgmma`` and 90–169 registers a thread, none spilled."""
SEQ_LEN = 1024
"""T of the formation rows' inputs (the benchmark's sequence length)."""
NORMS_SETTINGS = [(block, warps) for block in (1024, 2048) for warps in (4, 8)]
"""(columns per tile, warps) of the row-norm kernel, against torch's ``vector_norm`` ("norms torch")."""
OVERLAP_SETTINGS = [(64, 64, 8, 3), (32, 64, 8, 3), (32, 64, 8, 4), (64, 64, 8, 4), (64, 32, 8, 3), (64, 64, 16, 3)]
"""(rows per step, columns, warps, stages) of the fused norms-and-overlap kernel (``OVERLAP_IMPL = "fused"``),
against torch's norm and overlap matmuls at K = ``SAMPLES`` ("norms+overlap torch"). For sm_90a each takes at
most 128 registers a thread, none spilled (``python -m bench.kernel_compile --candidates``); with 4 warps, or
128 columns, it took ~250."""
SAMPLES = 250
WARPS = (1, 4)
"""Warps of the one-program kernels (the solve, the interacting rule): 1 is the default since session 14."""


def candidates(b: int, d_in: int, d_out: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
               seq_len: int = SEQ_LEN) -> dict[str, Callable[[], object]]:
    """One closure per (operation, setting) over random per-sequence gradients of this shape (bf16, as under
    the benchmark's autocast; the tests run them in Triton's interpreter on CPU tensors), and for the
    formation rows over random inputs and output gradients of seq_len tokens a sequence."""
    gen = torch.Generator(device="cpu").manual_seed(d_in * 7919 + d_out)
    flat = torch.randn(b, d_in * d_out, generator=gen).to(device, dtype)
    w = torch.randn(b, generator=gen).to(device)
    ntk = gram_matrix(flat, torch.float32, gram_out_dtype_supported(flat))
    lam = ntk.diagonal().mean()
    g = flat.view(b, d_out, d_in)
    a_k = torch.randn(SAMPLES, d_in, generator=gen).to(device, dtype)
    d_k = torch.randn(SAMPLES, d_out, generator=gen).to(device, dtype)
    a3 = torch.randn(b, seq_len, d_in, generator=gen).to(device, dtype)
    d3 = torch.randn(b, seq_len, d_out, generator=gen).to(device, dtype)

    def under(fn, **values):  # fn, each call run with these kernel settings
        return kernels.settings(**values)(fn)

    out: dict[str, Callable[[], object]] = {
        "weighted_sum torch": lambda: w.to(flat.dtype) @ flat,
        "norms torch": lambda: torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32),
        "ntk torch": lambda: gram_matrix(flat, torch.float32, gram_out_dtype_supported(flat)),
        "norms+overlap torch": lambda: (torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32),
                                        overlap_numerators(g, a_k, d_k)),
    }
    for block, warps in SUM_SETTINGS:
        out[f"weighted_sum block={block} warps={warps}"] = under(lambda: kernels.weighted_sum(w, flat),
                                                                 SUM_BLOCK=block, SUM_WARPS=warps)
    for block, warps, stages, waves in GRAM_SETTINGS:
        out[f"gram block={block} warps={warps} stages={stages} waves={waves}"] = under(
            lambda: kernels.gram(flat), BLOCK=block, GRAM_WARPS=warps, GRAM_STAGES=stages, GRAM_WAVES=waves)
    for block, warps, waves in OUTER_SETTINGS:
        out[f"gram outer block={block} warps={warps} waves={waves}"] = under(
            lambda: kernels.gram(flat), GRAM_IMPL="outer", OUTER_BLOCK=block, OUTER_WARPS=warps, GRAM_WAVES=waves)
    for sub, warps, stages, waves in TMA_SETTINGS:
        out[f"gram tma sub={sub} warps={warps} stages={stages} waves={waves}"] = under(
            lambda: kernels.gram(flat), GRAM_IMPL="tma", TMA_SUB=sub, TMA_WARPS=warps, TMA_STAGES=stages,
            GRAM_WAVES=waves)
    for block, warps in NORMS_SETTINGS:
        out[f"norms kernel block={block} warps={warps}"] = under(lambda: kernels.row_norms(flat),
                                                                 NORMS_BLOCK=block, NORMS_WARPS=warps)
    for rows, cols, warps, stages in OVERLAP_SETTINGS:
        out[f"norms+overlap fused rows={rows} cols={cols} warps={warps} stages={stages}"] = under(
            lambda: kernels.norms_and_overlap(g, a_k, d_k, True), OVERLAP_BLOCK_M=rows, OVERLAP_BLOCK_N=cols,
            OVERLAP_WARPS=warps, OVERLAP_STAGES=stages)
    for warps in WARPS:
        out[f"damped_solve warps={warps}"] = under(lambda: kernels.damped_solve(ntk, w, lam), SOLVE_WARPS=warps)
    for warps in WARPS:
        out[f"interacting_weights warps={warps}"] = under(lambda: kernels.interacting_weights(flat, w, None, 1.0),
                                                          WEIGHTS_WARPS=warps)
    out["form bmm"] = lambda: torch.bmm(d3.transpose(1, 2), a3)  # G alone: what the fused kernel's matmul is up against
    out["form+gram bmm+gram"] = lambda: _formed_then_gram(a3, d3)
    for bm, bn, bk, warps, stages, gram_rows in FORM_SETTINGS:
        out[f"form+gram fused rows={bm} cols={bn} step={bk} warps={warps} stages={stages} gram_rows={gram_rows}"] = \
            under(lambda: _parts_summed(*kernels.form_and_gram_parts(a3, d3)), FORM_BLOCK_M=bm, FORM_BLOCK_N=bn,
                  FORM_BLOCK_K=bk, FORM_WARPS=warps, FORM_STAGES=stages, FORM_GRAM_ROWS=gram_rows)
    return out


def _formed_then_gram(a3: torch.Tensor, d3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's way to G and its Gram matrix: torch's batched matmul, then the Gram kernel."""
    g = torch.bmm(d3.transpose(1, 2), a3)
    return g, kernels.gram(g.view(g.shape[0], -1))


def _parts_summed(g: torch.Tensor, parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return g, parts.sum(0)


def measure(model: str, batch: int, repeats: int,
            on_row: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """{candidate: {"us": [per shape], "step_ms": summed over the decoder layers}}, shapes as ``linear_shapes``.
    on_row(name, row) as each candidate's row is done: what a run stopped by its time limit has timed stays
    printed."""
    shapes = linear_shapes(model)
    per_shape = {shape: candidates(batch, *shape) for shape in shapes}
    table: dict[str, dict] = {}
    for name in next(iter(per_shape.values())):
        row = table[name] = {"us": [], "step_ms": 0.0}
        for shape, count in shapes.items():
            try:
                us = replay_us(per_shape[shape][name], repeats, warmup=3)
            except Exception as e:  # noqa: BLE001 - a setting that does not compile here: report it, go on
                print(f"warning: {name} at {shape[0]}>{shape[1]} failed: {type(e).__name__}", flush=True)
                us = float("nan")
            row["us"].append(us)
            row["step_ms"] += us * count / 1e3
        if on_row is not None:
            on_row(name, row)
    return table


def _width(names) -> int:
    return max(len("candidate"), *(len(name) for name in names))


def header(shapes: dict[tuple[int, int], int], device_name: str, width: int) -> list[str]:
    heads = [f"{i}>{o} ×{n}" for (i, o), n in shapes.items()]
    return [f"kernel settings: {device_name}; µs per call from graph replays, step ms over the decoder layers",
            f"{'candidate':<{width}}" + "".join(f"{h:>16}" for h in heads) + f"{'step ms':>10}"]


def row_line(name: str, row: dict, width: int) -> str:
    return f"{name:<{width}}" + "".join(f"{us:>16.1f}" for us in row["us"]) + f"{row['step_ms']:>10.2f}"


def report(table: dict[str, dict], shapes: dict[tuple[int, int], int], device_name: str) -> str:
    width = _width(table)
    return "\n".join(header(shapes, device_name, width) + [row_line(name, row, width) for name, row in table.items()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_configs", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    try:
        check_model_and_device(args.model, "cuda")
        if not kernels.available():
            raise OverheadError("Triton is not installed: there are no kernels to time")
        if not 1 <= args.batch <= kernels.MAX_ROWS:
            raise OverheadError(f"--batch must be in 1..{kernels.MAX_ROWS}; got {args.batch}")
        if args.repeats < 1:
            raise OverheadError(f"--repeats must be a positive integer; got {args.repeats}")
    except OverheadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shapes = linear_shapes(args.model)
    width = _width(candidates(1, 16, 16))  # the names alone: every shape has the same candidates
    print("\n".join(header(shapes, torch.cuda.get_device_name(), width)), flush=True)
    measure(args.model, args.batch, args.repeats, on_row=lambda name, row: print(row_line(name, row, width), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
