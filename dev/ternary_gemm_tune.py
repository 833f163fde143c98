"""Times the tile variants built by dev/ternary_gemm_tune.sh on the GPU machine (cupy +
torch, both present there; never a project dependency).

For each shape (n_out, K, M): random canonical 2-bit weights and int8 activation codes,
the shipped `gemm_w2a8` as the reference output, every variant checked bit for bit against
it, then CUDA-event timing (warm-up, median of 20) next to cuBLAS bf16 (torch.matmul) of
the same shape, all on the legacy default stream that cupy and torch share. Prints one table; the dev notes in the crate README record the outcome.
"""
import glob
import os
import sys

import cupy as cp
import numpy as np
import torch

SHAPES = [(4096, 4096, 4096), (16384, 4096, 4096), (4096, 16384, 4096), (4096, 4096, 512), (4096, 4096, 128)]


def smem_bytes(bn, bm, st, qps):
    return st * (4 * bn * (8 * qps + 4) + bm * (128 * qps + 16))


def time_ms(fn, reps=7, batch=10):
    """Median over `reps` of the mean time of `batch` back-to-back launches (so the Python
    launch latency is hidden behind the previous kernel), after a warm-up batch."""
    for _ in range(batch):
        fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / batch)
    return float(np.median(times))


def main(folder):
    rng = np.random.default_rng(1)
    cubins = sorted(glob.glob(os.path.join(folder, "gemm_*.cubin")))
    mods = {os.path.basename(c)[5:-6]: cp.RawModule(path=c) for c in cubins}
    ref_mod = next(iter(mods.values()))
    rows = []
    for n, k, m in SHAPES:
        wpr = (k + 15) // 16
        quads = (wpr + 7) // 8
        kp = quads * 128
        codes = rng.integers(0, 3, size=(n, wpr, 16), dtype=np.uint32)
        words = np.zeros((n, wpr), dtype=np.uint32)
        for i in range(16):
            words |= codes[:, :, i] << np.uint32(2 * i)
        W = cp.asarray(words)
        gamma = cp.asarray(np.array([0.01], dtype=np.float32))
        xq_h = rng.integers(-128, 128, size=(m, kp), dtype=np.int8)
        xq = cp.asarray(xq_h)
        xsum = cp.asarray(xq_h.astype(np.int32).sum(axis=1).astype(np.int32))
        xs = cp.asarray(rng.uniform(1.0, 100.0, size=m).astype(np.float32))
        # No split-K (grid.z = 1): qps = every quad, no workspace.
        args = lambda y: (W, gamma, np.int32(0), xq, xsum, xs, y, np.int32(m), np.int32(n), np.int32(k),
                          np.int32(kp // 128), np.uint64(0), np.uint64(0))

        ref = ref_mod.get_function("gemm_w2a8")
        ref.max_dynamic_shared_size_bytes = smem_bytes(128, 128, 3, 1)
        y_ref = cp.full((m, n), cp.nan, dtype=cp.float32)
        launch_ref = lambda: ref(((n + 127) // 128, (m + 127) // 128), (128,), args(y_ref), shared_mem=smem_bytes(128, 128, 3, 1))
        launch_ref()
        cp.cuda.runtime.deviceSynchronize()

        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        t_blas = time_ms(lambda: torch.matmul(a, b))
        ops = 2.0 * m * n * k
        rows.append((f"{n}x{k} M={m}", "cuBLAS bf16", t_blas, ops / t_blas / 1e9, "", ""))
        for name, mod in mods.items():
            bn, bm, wn, wm, st, qps, minb = map(int, name.split("_"))
            f = mod.get_function("gemm_w2a8_tune")
            smem = smem_bytes(bn, bm, st, qps)
            f.max_dynamic_shared_size_bytes = smem
            y = cp.full((m, n), cp.nan, dtype=cp.float32)
            launch = lambda: f(((n + bn - 1) // bn, (m + bm - 1) // bm), (32 * wn * wm,), args(y), shared_mem=smem)
            launch()
            cp.cuda.runtime.deviceSynchronize()
            exact = bool((y.view(cp.uint32) == y_ref.view(cp.uint32)).all())
            t = time_ms(launch)
            rows.append((f"{n}x{k} M={m}", name, t, ops / t / 1e9, f"{t_blas / t:.2f}x", "exact" if exact else "MISMATCH"))
    print(torch.cuda.get_device_name(), "| variant = BN_BM_WN_WM_STAGES_QPS_MINB")
    for r in rows:
        print(f"{r[0]:<22} {r[1]:<22} {r[2] * 1e3:9.1f} us {r[3]:8.1f} TOP/s {r[4]:>7} {r[5]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
