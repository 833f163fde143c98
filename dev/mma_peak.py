"""Runs dev/mma_peak.cu (built by dev/ternary_gemm_tune.sh) on the GPU machine: the
mma.sync tensor-pipe ceiling in TOP/s for s8 m16n8k32 and bf16 m16n8k16, for several
warps per SM. Uses cupy (present there; never a project dependency)."""
import os
import sys

import cupy as cp

folder = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
mod = cp.RawModule(path=os.path.join(folder, "mma_peak.cubin"))
sms = cp.cuda.Device().attributes["MultiProcessorCount"]
out = cp.zeros(1, dtype=cp.float32)
iters = 4096
for name, ops_per_mma in (("peak_s8", 2 * 16 * 8 * 32), ("peak_bf16", 2 * 16 * 8 * 16)):
    f = mod.get_function(name)
    for warps in (4, 8, 16):
        grid, block = (sms * 2,), (32 * warps // 2,)
        args = (out, cp.int32(iters))
        f(grid, block, args)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(5):
            f(grid, block, args)
        end.record()
        end.synchronize()
        ms = cp.cuda.get_elapsed_time(start, end) / 5
        mmas = grid[0] * block[0] // 32 * iters * 8
        print(f"{name:<10} {warps:>2} warps/SM: {mmas * ops_per_mma / ms / 1e9:8.1f} TOP/s")
