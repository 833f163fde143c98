"""Times the INT4 page writer (kv_write_int4) and the experimental variants of
dev/kv_write_variants.cu from a cubin, without the Rust bundle: 32768 tokens, Hkv = 8, D = 128,
page size 32 (the `kv_quantize` bench shape); checks every variant's pool bit for bit against
kv_write_int4 and prints GB/s read + written next to a 1 GiB device-to-device copy.
    nvcc -cubin -arch=sm_90 -O3 -std=c++17 -Ikernels-cuda/kernels -o kvw.cubin dev/kv_write_variants.cu
    python3 dev/kv_write_profile.py kvw.cubin [kernel ...]
"""
import sys

import cupy as cp
import numpy as np

from cuda_timing import timed

N, HKV, D, P = 32768, 8, 128, 32


def main():
    mod = cp.RawModule(path=sys.argv[1])
    names = sys.argv[2:] or ["kv_write_int4", "kvw_rowmajor_tok", "kvw_quad_h", "kvw_quad_t", "kvw_quad_h4", "kvw_quad_t4"]
    src = cp.zeros(1 << 30, dtype=cp.uint8)
    dst = cp.zeros(1 << 30, dtype=cp.uint8)
    copy_us = timed(lambda: dst.__setitem__(slice(None), src), reps=5)
    copy = 2 * (1 << 30) / copy_us / 1e3
    del src, dst
    print(f"d2d copy 1 GiB: {copy:.0f} GB/s (read + written)")
    e = N * HKV * D
    k = (cp.random.standard_normal(e) * 2).astype(cp.float16)
    v = (cp.random.standard_normal(e) * 2).astype(cp.float16)
    num_pages = N // P
    tok_bytes = 2 * (D // 2 + D // 32 * 4)
    page_bytes = HKV * P * tok_bytes
    pages = cp.arange(num_pages, dtype=cp.int32)
    nbytes = 2 * e * 2 + N * HKV * tok_bytes
    ref = None
    for name in names:
        fn = mod.get_function(name)
        pool = cp.zeros(num_pages * page_bytes, dtype=cp.uint8)
        # kv_write_int4: one thread per (K, V) pair of groups; the variants one per group
        threads = 2 * N * HKV * (D // 32) // (2 if name == "kv_write_int4" else 1)
        args = (k, v, pool, pages, np.int32(0), np.int32(0), np.int32(N), np.int32(HKV), np.int32(D), np.int32(P),
                np.int32(num_pages), np.int64(page_bytes), np.int32(0))

        def run():
            fn((threads // 256, 1), (256,), args)

        run()
        cp.cuda.Device().synchronize()
        if ref is None:
            ref = pool.copy()
            same = "reference"
        else:
            same = "bit-exact" if bool((pool == ref).all()) else "MISMATCH"
        us = timed(run)
        gbs = nbytes / us / 1e3
        print(f"RESULT {name}: {us:.1f} us, {gbs:.0f} GB/s = {100 * gbs / copy:.1f}% of copy, {same}")


if __name__ == "__main__":
    main()
