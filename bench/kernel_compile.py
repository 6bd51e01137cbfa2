"""ISOPO's Triton kernels compiled for a GPU architecture on a machine without one: Triton's own compiler to
PTX, then ptxas (both ship with Triton) to the device code, which reports each kernel's registers per
thread, spilled bytes and shared memory.

A kernel that does not build for the GPU, or one that spills its registers to local memory, shows here
before a lent GPU's time is spent on it. Each kernel is compiled at its launch settings in ``kernels.py``
(bf16 G, B = 8, as in the benchmark on a GPU), and the candidates of ``bench.kernel_configs`` with
``--candidates``, specialised as Triton specialises them at run time at Qwen3-0.6B's shapes (``Launch``):
without that, every read of G compiled to scalar 2-byte loads and the registers counted were up to twice
as many.

    python -m bench.kernel_compile [--arch 90] [--candidates]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from algorithms.isopo import kernels

from .kernel_configs import (
    FORM_SETTINGS,
    GRAM_SETTINGS,
    NORMS_SETTINGS,
    OUTER_SETTINGS,
    OVERLAP_SETTINGS,
    SUM_SETTINGS,
    TMA_SETTINGS,
)

ROWS = 8
"""B of the launches compiled (the benchmark's micro-batch)."""
SAMPLES = 256
"""The fused kernel's sample tile at K = 250."""


@dataclass
class Launch:
    """One kernel at one setting: its argument types (Triton's signature strings), compile-time constants,
    launch options, and the integer arguments that are multiples of 16 at Qwen3-0.6B's shapes. At run time
    Triton compiles a kernel for what it sees: pointers on 16-byte boundaries and integers divisible by 16
    (the row lengths, out·in) are marked so, which lets it vectorise loads; these launches are marked alike."""

    name: str
    kernel: object
    signature: dict[str, str]
    constants: dict[str, object]
    options: dict[str, int] = field(default_factory=dict)
    multiples_of_16: tuple[str, ...] = ()

    def attributes(self) -> dict[tuple[int, ...], list]:
        names = list(self.kernel.arg_names)
        marked = [name for name, kind in self.signature.items()
                  if kind.startswith("*") or name in self.multiples_of_16]
        return {(names.index(name),): [["tt.divisibility", 16]] for name in marked}


def _steps(waves: int) -> int:
    """Tiles per program of a reduction over G, a compile-time constant: one at 64 waves (a tile per program,
    as ``kernels._steps`` picks it there for every Qwen3-0.6B layer), else four (a loop; its run length at the
    model's shapes, 4 to 64, changes the code little)."""
    return 1 if waves >= 64 else 4


def _sig(pointers: dict[str, str], scalars: dict[str, str], constants: dict[str, object]) -> dict[str, str]:
    return pointers | scalars | {name: "constexpr" for name in constants}


def launches(candidates: bool = False) -> list[Launch]:
    """Every kernel at its default launch settings; with ``candidates`` also at ``bench.kernel_configs``'s."""
    k = kernels
    g_in = {"g_ptr": "*bf16", "part_ptr": "*fp32"}
    b_n = {"B": "i32", "N": "i32"}

    def weighted_sum(block, warps):
        c = {"ROWS": ROWS, "BLOCK": block}
        return Launch(f"weighted_sum block={block} warps={warps}", k._weighted_sum_kernel,
                      _sig({"g_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*bf16"}, b_n, c), c, {"num_warps": warps},
                      ("N",))

    def gram(block, warps, stages, waves=k.GRAM_WAVES):
        c = {"ROWS": max(16, ROWS), "BLOCK": block, "STEPS": _steps(waves), "IEEE": False}
        return Launch(f"gram block={block} warps={warps} stages={stages} waves={waves}", k._gram_kernel, _sig(g_in, b_n, c), c,
                      {"num_warps": warps, "num_stages": stages}, ("N",))

    def outer(block, warps, waves=k.GRAM_WAVES):
        c = {"ROWS": ROWS, "BLOCK": block, "STEPS": _steps(waves)}
        return Launch(f"gram outer block={block} warps={warps} waves={waves}", k._gram_outer_kernel, _sig(g_in, b_n, c), c,
                      {"num_warps": warps}, ("N",))

    def tma(sub, warps, stages, waves=k.GRAM_WAVES):
        rows = max(16, ROWS)
        c = {"ROWS": rows, "SUB": sub, "BLOCK": k.TMA_BLOCK, "STEPS": _steps(waves), "IEEE": False}
        pointers = {"g_desc": f"tensordesc<bf16[{rows}, {sub}, {k.TMA_BLOCK}]>", "part_ptr": "*fp32"}
        return Launch(f"gram tma sub={sub} warps={warps} stages={stages} waves={waves}", k._gram_tma_kernel,
                      _sig(pointers, {"B": "i32"}, c), c, {"num_warps": warps, "num_stages": stages})

    def form(rows, cols, step, warps, stages, gram_rows):
        c = {"ROWS": max(16, ROWS), "BLOCK_M": rows, "BLOCK_N": cols, "BLOCK_K": step, "GRAM_ROWS": gram_rows,
             "IEEE": False}
        pointers = {"d_desc": f"tensordesc<bf16[1, {step}, {rows}]>", "a_desc": f"tensordesc<bf16[1, {step}, {cols}]>",
                    "g_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32"}
        scalars = {"B": "i32", "T": "i32", "D_OUT": "i32", "D_IN": "i32"}
        return Launch(f"form+gram fused rows={rows} cols={cols} step={step} warps={warps} stages={stages} "
                      f"gram_rows={gram_rows}",
                      k._form_gram_kernel, _sig(pointers, scalars, c), c, {"num_warps": warps, "num_stages": stages},
                      ("T", "D_OUT", "D_IN"))

    def norms(block, warps):
        c = {"ROWS": ROWS, "BLOCK": block, "STEPS": 4}
        return Launch(f"norms kernel block={block} warps={warps}", k._row_squares_kernel, _sig(g_in, b_n, c), c,
                      {"num_warps": warps}, ("N",))

    def overlap(rows, cols, warps, stages):
        c = {"SAMPLES": SAMPLES, "ROWS_PER": 8 * rows, "BLOCK_M": rows, "BLOCK_N": cols, "NORM": True,
             "IEEE": False}
        pointers = {"g_desc": f"tensordesc<bf16[1, {rows}, {cols}]>", "dk_desc": f"tensordesc<bf16[{SAMPLES}, {rows}]>",
                    "ak_ptr": "*bf16", "num_ptr": "*fp32", "sq_ptr": "*fp32"}
        scalars = {"K": "i32", "D_IN": "i32", "AK_STRIDE": "i32"}
        return Launch(f"norms+overlap fused rows={rows} cols={cols} warps={warps} stages={stages}",
                      k._norm_overlap_kernel, _sig(pointers, scalars, c), c, {"num_warps": warps, "num_stages": stages},
                      ("D_IN", "AK_STRIDE"))

    solve_c = {"ROWS": ROWS}
    ni_c = {"HAS_N": True, "HAS_O": True, "ROWS": ROWS, "KBLOCK": 256}
    int_c = {"HAS_EMA": True, "AT_CURSOR": True, "ROWS": ROWS}
    out = [
        weighted_sum(k.SUM_BLOCK, k.SUM_WARPS),
        gram(k.BLOCK, k.GRAM_WARPS, k.GRAM_STAGES),
        outer(k.OUTER_BLOCK, k.OUTER_WARPS),
        tma(k.TMA_SUB, k.TMA_WARPS, k.TMA_STAGES),
        form(k.FORM_BLOCK_M, k.FORM_BLOCK_N, k.FORM_BLOCK_K, k.FORM_WARPS, k.FORM_STAGES, k.FORM_GRAM_ROWS),
        norms(k.NORMS_BLOCK, k.NORMS_WARPS),
        overlap(k.OVERLAP_BLOCK_M, k.OVERLAP_BLOCK_N, k.OVERLAP_WARPS, k.OVERLAP_STAGES),
        Launch("damped_solve", k._damped_solve_kernel,
               _sig({"k_ptr": "*fp32", "adv_ptr": "*fp32", "lam_ptr": "*fp32", "out_ptr": "*fp32"}, {"B": "i32"},
                    solve_c), solve_c, {"num_warps": k.SOLVE_WARPS}),
        Launch("row_norm_product", k._row_norm_product_kernel,
               _sig({"a_ptr": "*bf16", "d_ptr": "*bf16", "out_ptr": "*fp32"}, {"D_IN": "i32", "D_OUT": "i32"},
                    {"BLOCK": k.BLOCK}), {"BLOCK": k.BLOCK}, multiples_of_16=("D_IN", "D_OUT")),
        Launch("non_interacting_weights", k._non_interacting_kernel,
               _sig({"norm_ptr": "*fp32", "num_ptr": "*fp32", "prod_ptr": "*fp32", "adv_ptr": "*fp32",
                     "out_ptr": "*fp32"},
                    {"B": "i32", "K": "i32", "NUM_STRIDE_B": "i32", "NUM_STRIDE_K": "i32", "EXP_N": "fp32",
                     "EXP_O": "fp32"}, ni_c), ni_c, {"num_warps": k.WEIGHTS_WARPS}),
        Launch("interacting_weights", k._interacting_kernel,
               _sig({"k_ptr": "*fp32", "adv_ptr": "*fp32", "ema_ptr": "*fp32", "out_ptr": "*fp32",
                     "trace_ptr": "*fp32", "cursor_ptr": "*i64"}, {"B": "i32", "c_lambda": "fp32"}, int_c),
               int_c, {"num_warps": k.WEIGHTS_WARPS}),
    ]
    if candidates:
        out += [weighted_sum(*s) for s in SUM_SETTINGS] + [gram(*s) for s in GRAM_SETTINGS]
        out += [outer(*s) for s in OUTER_SETTINGS] + [tma(*s) for s in TMA_SETTINGS]
        out += [form(*s) for s in FORM_SETTINGS] + [norms(*s) for s in NORMS_SETTINGS]
        out += [overlap(*s) for s in OVERLAP_SETTINGS]
    return list({launch.name: launch for launch in out}.values())  # a candidate that is the default: once


@dataclass
class Report:
    name: str
    registers: int
    spill_bytes: int
    shared_bytes: int


def compile_report(launch: Launch, arch: int = 90) -> Report:
    """Compile one launch for sm_{arch}a and read ptxas's account of it (``-v``, with the register
    allocation flag Triton passes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    source = ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=launch.constants,
                       attrs=launch.attributes())
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch.options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}a", ptx,
                              "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    registers = re.search(r"Used (\d+) registers", log.stderr)
    spills = re.search(r"(\d+) bytes spill stores", log.stderr)
    if registers is None or spills is None:
        raise RuntimeError(f"ptxas did not report registers and spills for {launch.name}:\n{log.stderr}")
    return Report(launch.name, int(registers.group(1)), int(spills.group(1)), int(compiled.metadata.shared))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_compile", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (default: 90, H100/H200)")
    parser.add_argument("--candidates", action="store_true", help="also every candidate setting of kernel_configs")
    args = parser.parse_args(argv)
    if not kernels.available():
        print("error: Triton is not installed: there are no kernels to compile", file=sys.stderr)
        return 2
    if args.arch < 80:
        print(f"error: --arch must be 80 or more (tensor descriptors, bf16); got {args.arch}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set, under which Triton interprets its kernels instead of compiling "
              "them: unset it", file=sys.stderr)
        return 2
    todo = launches(args.candidates)
    width = max(len(launch.name) for launch in todo)
    print(f"{'kernel (sm_' + str(args.arch) + 'a)':<{width}}  registers  spill_bytes  shared_bytes", flush=True)
    failed = 0
    for launch in todo:
        try:
            r = compile_report(launch, args.arch)
        except Exception as e:  # noqa: BLE001 - report the kernel that does not build, go on with the rest
            failed += 1
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            print(f"{launch.name:<{width}}  does not compile: {type(e).__name__}: {first}", flush=True)
            continue
        print(f"{r.name:<{width}}  {r.registers:>9}  {r.spill_bytes:>11}  {r.shared_bytes:>12}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
