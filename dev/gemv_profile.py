"""Drives the W2A8 GEMV (kernels-cuda/kernels/ternary_gemv.cu) with cupy on the GPU machine,
without Rust: random codes in the tiled layout (numpy port of `repack_tiles`), the kernel and launch
geometry of `launch_gemv` / `plan()` in crates/ternary-gemm/src/cuda/gemv.rs, M = 1. Prints per-launch time
(median of CUDA-graph replays, 64 launches per graph, weights rotated past L2) next to a
read-only kernel streaming the same bytes (dev/stream_read.cu), and checks the result
against a numpy reference. Plain launches (no PDL), so small shapes read slower than in the
criterion bench. Build and run:
    nvcc -cubin -arch=sm_90 -O3 -std=c++17 -Ikernels-cuda/kernels -o target/gemvrs/gemv.cubin kernels-cuda/kernels/ternary_gemv.cu
    nvcc -cubin -arch=sm_90 -O3 -o target/gemvrs/read.cubin dev/stream_read.cu
    python3 dev/gemv_profile.py target/gemvrs/gemv.cubin target/gemvrs/read.cubin [N K ...]
Under ncu: `ncu --set full -k regex:gemv -c 1 python3 dev/gemv_profile.py ... 16384 4096`."""
import os
import sys

import cupy as cp
import numpy as np

SMS = cp.cuda.Device().attributes["MultiProcessorCount"]
rng = np.random.default_rng(0)

def repack(w, n, wpr):  # canonical (n, wpr) u32 -> tiled blocks (ternary_gemm::repack_tiles)
    quads, nt = (wpr + 7) // 8, (n + 15) // 16
    full = np.full((nt * 16, quads * 8), 0x55555555, dtype=np.uint32)
    full[:n, :wpr] = w
    return np.ascontiguousarray(full.reshape(nt, 2, 8, quads, 2, 4).transpose(0, 3, 2, 5, 4, 1)).reshape(-1)


def graph_time(launch, copies, reps=64, samples=15):
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        for i in range(reps):
            launch(i % copies)
        g = s.end_capture()
        g.launch(s)
        ts = []
        for _ in range(samples):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(s)
            g.launch(s)
            b.record(s)
            b.synchronize()
            ts.append(cp.cuda.get_elapsed_time(a, b) * 1e3 / reps)
    return float(np.median(ts))


def make_gemv(gemv_mod, n, k, copies=None):
    """Random tiled weights (`copies` of them, enough to rotate past L2 by default), GEMV-ready
    activations and the launch of `launch_gemv`'s M = 1 kernel; returns (run(i), check(), nbytes, Wt)."""
    wpr = (k + 15) // 16
    quads = (wpr + 7) // 8
    nbytes = 4 * n * wpr
    copies = copies or max(1, -(-200_000_000 // nbytes))
    codes = rng.integers(0, 3, size=(n, wpr * 16), dtype=np.uint32)
    codes[:, k:] = 1
    w = (codes.reshape(n, wpr, 16) << (2 * np.arange(16, dtype=np.uint32))).sum(axis=2, dtype=np.uint64).astype(np.uint32)
    Wt = [cp.asarray(repack(w, n, wpr)) for _ in range(copies)]
    x = rng.integers(-127, 128, size=quads * 128, dtype=np.int8)
    x[k:] = 0
    # MMA k order (gemv_code_position): x_mma[128b + 32j + 4t + e] = x[128b + 16t + 4e + j], t < 8
    b_, j_, t_, e_ = np.meshgrid(np.arange(quads), np.arange(4), np.arange(8), np.arange(4), indexing="ij")
    xm = np.zeros_like(x)
    xm[(128 * b_ + 32 * j_ + 4 * t_ + e_).ravel()] = x[(128 * b_ + 16 * t_ + 4 * e_ + j_).ravel()]
    xq, xsum = cp.asarray(xm), cp.asarray(np.array([x.astype(np.int64).sum()], dtype=np.int32))
    gamma, xs = cp.ones(1, dtype=cp.float32), cp.ones(1, dtype=cp.float32)
    y = cp.zeros(n, dtype=cp.float32)
    ws, tiles = cp.zeros(32 * n, dtype=cp.int32), cp.zeros(n, dtype=cp.uint32)
    wide = -(-n // 64) >= SMS  # launch_gemv's choice for M = 1
    name, rows = ("gemv_w2a8_r4", 64) if wide else ("gemv_w2a8", 16)
    if "GEMV_VARIANT" in os.environ:  # tuning: e.g. GEMV_VARIANT=gemv_w2a8_r2:32 GEMV_KSPLIT=2
        name, rows = os.environ["GEMV_VARIANT"].split(":")
        rows = int(rows)
    gemv = gemv_mod.get_function(name)
    ctas = -(-n // rows)
    ksplit = 1 if ctas >= SMS else min(-(-2 * SMS // ctas), quads)
    ksplit = int(os.environ.get("GEMV_KSPLIT", ksplit))
    qps = -(-quads // ksplit)
    ksplit = -(-quads // qps)
    if name == "gemv_w2a8" and qps > 8 * 4 and ctas * ksplit <= 2 * SMS and "GEMV_VARIANT" not in os.environ:
        name = "gemv_w2a8_kl"  # launch_gemv's long-K choice
        gemv = gemv_mod.get_function(name)

    def run(i, gemv=gemv):
        gemv((ctas, ksplit), (256,), (Wt[i], gamma, np.int32(0), xq, xsum, xs, y, ws, tiles, np.int32(1),
                                      np.int32(n), np.int32(k), np.int32(qps)))

    def check():
        run(0)
        ref = (codes.astype(np.int64)[:, :k] - 1) @ x[:k].astype(np.int64)
        return np.array_equal(y.get(), ref.astype(np.float32))

    return run, check, nbytes, Wt, (name, ctas, ksplit)


if __name__ == "__main__":
    gemv_mod = cp.RawModule(path=sys.argv[1])
    read = cp.RawModule(path=sys.argv[2]).get_function("stream_read")
    dims = [int(v) for v in sys.argv[3:]]
    shapes = list(zip(dims[::2], dims[1::2])) or [(2560, 2560), (4096, 4096), (16384, 4096), (4096, 16384),
                                                   (32768, 16384)]
    for n, k in shapes:
        run, check, nbytes, Wt, (name, ctas, ksplit) = make_gemv(gemv_mod, n, k)
        ok = check()
        copies = len(Wt)
        t = graph_time(run, copies)
        out = cp.zeros(8 * SMS, dtype=cp.uint32)
        t_read = graph_time(lambda i: read((8 * SMS,), (256,), (Wt[i], out, np.uint64(Wt[i].size // 4))), copies)
        print(f"{name} M=1 {n}x{k} ({nbytes / 1e6:.1f} MB) grid {ctas}x{ksplit}: {t:.2f} us "
              f"{nbytes / t / 1e3:.0f} GB/s | read-only {t_read:.2f} us {nbytes / t_read / 1e3:.0f} GB/s | "
              f"{'exact' if ok else 'MISMATCH'}")
