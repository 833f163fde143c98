"""Launches gemv_w2a8_vec (kernels-cuda/kernels/ternary_gemv.cu, built to .gpu/tune/gemv.cubin
by `nvcc -cubin`) on random codes with cupy, for `ncu` or timing on the GPU machine:
    ncu --set full -k regex:gemv python3 .gpu/tune/gemv_profile.py N K [reps]
Geometry as TernaryMatrixGpu's plan(): 32-row CTAs, K split so a CTA holds <= 4096 weights."""
import sys

import cupy as cp
import numpy as np

n, k = int(sys.argv[1]), int(sys.argv[2])
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 1
mod = cp.RawModule(path=sys.argv[4] if len(sys.argv) > 4 else ".gpu/tune/gemv.cubin")
f = mod.get_function("gemv_w2a8_vec")
wpr = (k + 15) // 16
quads = (wpr + 7) // 8
kp = quads * 128
sms = cp.cuda.Device().attributes["MultiProcessorCount"]
row_tiles = (n + 31) // 32
ksplit = max(min(-(-2 * sms // row_tiles), quads), -(-quads // 32))
qps = -(-quads // ksplit)
ksplit = -(-quads // qps)
smem = max(4 * 32 * (8 * qps + 4), 4 * 8 * 32 * 32)
rng = np.random.default_rng(0)
W = cp.asarray(rng.integers(0, 2**32, size=(n, wpr), dtype=np.uint64).astype(np.uint32) & np.uint32(0x55555555))
gamma = cp.ones(1, dtype=cp.float32)
xq = cp.asarray(rng.integers(-128, 128, size=(1, kp), dtype=np.int8))
xsum = cp.zeros(1, dtype=cp.int32)
xs = cp.ones(1, dtype=cp.float32)
y = cp.zeros(n, dtype=cp.float32)
ws = cp.zeros(32 * n, dtype=cp.int32)
tiles = cp.zeros(row_tiles, dtype=cp.uint32)
args = (W, gamma, np.int32(0), xq, xsum, xs, y, ws, tiles, np.int32(1), np.int32(n), np.int32(k), np.int32(qps))
for _ in range(reps + 1):
    f((row_tiles, ksplit), (256,), args, shared_mem=smem)
start, end = cp.cuda.Event(), cp.cuda.Event()
start.record()
for _ in range(reps):
    f((row_tiles, ksplit), (256,), args, shared_mem=smem)
end.record()
end.synchronize()
ms = cp.cuda.get_elapsed_time(start, end) / max(reps, 1)
print(f"gemv_w2a8_vec {n}x{k} M=1 grid {row_tiles}x{ksplit} smem {smem}: {ms * 1e3:.2f} us, {4 * n * wpr / ms / 1e6:.0f} GB/s")
