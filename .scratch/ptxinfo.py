import sys, subprocess, os, re, itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from algorithms.isopo import kernels
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas-blackwell")

def info(fn, sig, const, warps, stages, arch=90):
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    open("/tmp/_k.ptx", "w").write(k.asm["ptx"])
    out = subprocess.run([PTXAS, f"-arch=sm_{arch}a", "-v", "/tmp/_k.ptx", "-o", "/tmp/_k.cubin"], capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out).group(1)
    spill = re.search(r"(\d+) bytes spill stores", out).group(1)
    return dict(regs=int(regs), spill=int(spill), smem=k.metadata.shared, wgmma=k.asm["ptx"].count("wgmma.mma_async"))

if __name__ == "__main__":
    sig = {"g_ptr": "*bf16", "dk_ptr": "*bf16", "ak_ptr": "*bf16", "num_ptr": "*fp32", "sq_ptr": "*fp32",
           "K": "i32", "D_OUT": "i32", "D_IN": "i32", "DK_STRIDE": "i32", "AK_STRIDE": "i32",
           "SAMPLES": "constexpr", "ROWS_PER": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "NORM": "constexpr", "IEEE": "constexpr"}
    for bm, bn, warps, stages, norm in itertools.product((32, 64), (32, 64, 128), (4, 8), (3,), (True, False)):
        const = {"SAMPLES": 256, "ROWS_PER": 512, "BLOCK_M": bm, "BLOCK_N": bn, "NORM": norm, "IEEE": False}
        try:
            print(bm, bn, warps, stages, norm, info(kernels._norm_overlap_kernel, sig, const, warps, stages), flush=True)
        except Exception as e:
            print(bm, bn, warps, stages, norm, "FAIL", type(e).__name__, str(e)[:200], flush=True)
