import itertools, sys
import triton, triton.language as tl
sys.path.insert(0, ".scratch")
from ptxinfo import info

@triton.jit
def bp_kernel(g_ptr, dk_ptr, ak_ptr, num_ptr, sq_ptr, K, D_OUT, D_IN, DK_STRIDE, AK_STRIDE,
              SAMPLES: tl.constexpr, ROWS_PER: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, NORM: tl.constexpr, IEEE: tl.constexpr):
    i = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.program_id(2)
    samples = tl.arange(0, SAMPLES)
    sample_in = samples < K
    cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < D_IN
    d_blk = tl.make_block_ptr(dk_ptr, shape=(K, D_OUT), strides=(DK_STRIDE, 1), offsets=(0, s * ROWS_PER),
                              block_shape=(SAMPLES, BLOCK_M), order=(1, 0))
    g_blk = tl.make_block_ptr(g_ptr + i * D_OUT * D_IN, shape=(D_OUT, D_IN), strides=(D_IN, 1),
                              offsets=(s * ROWS_PER, c * BLOCK_N), block_shape=(BLOCK_M, BLOCK_N), order=(1, 0))
    acc = tl.zeros((SAMPLES, BLOCK_N), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, ROWS_PER, BLOCK_M):
        d = tl.load(d_blk, boundary_check=(0, 1), padding_option="zero")
        tile = tl.load(g_blk, boundary_check=(0, 1), padding_option="zero")
        acc += tl.dot(d, tile)
        if NORM:
            wide = tile.to(tl.float32)
            sq += wide * wide
        d_blk = tl.advance(d_blk, (0, BLOCK_M))
        g_blk = tl.advance(g_blk, (BLOCK_M, 0))
    a = tl.load(ak_ptr + samples[:, None] * AK_STRIDE + cols[None, :], mask=sample_in[:, None] & col_in[None, :],
                other=0.0)
    program = (i * tl.num_programs(1) + c) * tl.num_programs(2) + s
    tl.store(num_ptr + program * SAMPLES + samples, tl.sum(acc * a.to(tl.float32), axis=1))
    if NORM:
        tl.store(sq_ptr + program, tl.sum(tl.sum(sq, axis=1), axis=0))

sig = {"g_ptr": "*bf16", "dk_ptr": "*bf16", "ak_ptr": "*bf16", "num_ptr": "*fp32", "sq_ptr": "*fp32",
       "K": "i32", "D_OUT": "i32", "D_IN": "i32", "DK_STRIDE": "i32", "AK_STRIDE": "i32",
       "SAMPLES": "constexpr", "ROWS_PER": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "NORM": "constexpr", "IEEE": "constexpr"}
def sweep():
    for bm, bn, warps, stages, norm in itertools.product((32, 64), (64, 128), (4, 8), (3,), (True,)):
        const = {"SAMPLES": 256, "ROWS_PER": 512, "BLOCK_M": bm, "BLOCK_N": bn, "NORM": norm, "IEEE": False}
        try:
            print(bm, bn, warps, stages, norm, info(bp_kernel, sig, const, warps, stages), flush=True)
        except Exception as e:
            print(bm, bn, warps, stages, norm, "FAIL", type(e).__name__, str(e)[:300], flush=True)

if __name__ == "__main__":
    if len(sys.argv) > 1:
        const = {"SAMPLES": 256, "ROWS_PER": 512, "BLOCK_M": 64, "BLOCK_N": 64, "NORM": True, "IEEE": False}
        try:
            info(bp_kernel, sig, const, 8, 3)
        except Exception as e:
            print(str(e)[-1200:])
    else:
        sweep()
