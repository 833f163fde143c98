"""Times (and, under ncu, profiles) the INT4 tensor-core decode kernel of kv_int4.cu on a
synthetic paged cache, without the Rust bundle: B sequences of L tokens, Hq = 32, Hkv = 8,
D = 128, page size 32, contiguous pages, the launch plan of crates/kv-int4 `plan()`.
    nvcc -cubin -arch=sm_90 -O3 -std=c++17 -Ikernels-cuda/kernels -o kv.cubin kernels-cuda/kernels/kv_int4.cu
    python3 dev/kv_profile.py kv.cubin [kernel-name-prefix] [B,L ...] [--check] [--once] [--unfused]
"""
import os
import sys

import cupy as cp
import numpy as np

import cuda_timing

HQ, HKV, D, P = 32, 8, 128, 32
TILE, MIN_TPS = 32, 4
CTAS = int(os.environ.get("KV_CTAS", "4"))  # CTAs per SM the split plan assumes (INT4_CTAS_PER_SM)
INT_MAX = 2**31 - 1


def plan(sm, b, tiles):
    pairs = b * HKV
    max_splits = max(1, -(-tiles // MIN_TPS))
    slots = sm * CTAS
    want = min(max(1, slots // pairs), max_splits)
    best = None
    for s in range(want, min(4 * want, max_splits) + 1):
        tps = -(-tiles // s)
        tps += tps % 2
        splits = -(-tiles // tps)
        cost = -(-(pairs * splits) // slots) * tps
        if best is None or cost < best[0]:
            best = (cost, splits, tps)
    return best[1], best[2]


def check(pool, bt, q, out, b, l, num_pages, page_bytes):
    """Dequantizes the pages in cupy (f32) and compares the decode output with softmax attention."""
    pg = pool.reshape(num_pages, page_bytes)
    cb, pb = HKV * P * D // 2, HKV * P * D // 32 * 4

    def region(off):
        codes = pg[:, off:off + cb].reshape(num_pages, HKV, P, D // 2)
        par = pg[:, off + cb:off + cb + pb].view(cp.float16).reshape(num_pages, HKV, P, D // 32, 2).astype(cp.float32)
        x = cp.stack([codes & 15, codes >> 4], axis=-1).reshape(num_pages, HKV, P, D // 32, 32).astype(cp.float32)
        return (x * par[..., :1] + par[..., 1:]).reshape(num_pages, HKV, P, D)

    k, v = region(0), region(cb + pb)
    worst = 0.0
    for bi in range(b):
        pages = bt[bi]
        kk = k[pages].transpose(1, 0, 2, 3).reshape(HKV, -1, D)[:, :l]  # (Hkv, L, D)
        vv = v[pages].transpose(1, 0, 2, 3).reshape(HKV, -1, D)[:, :l]
        qq = q.reshape(b, HQ, D)[bi].astype(cp.float32).reshape(HKV, HQ // HKV, D)
        s = cp.einsum("hgd,hld->hgl", qq, kk) * D ** -0.5
        p = cp.exp(s - s.max(-1, keepdims=True))
        o = cp.einsum("hgl,hld->hgd", p / p.sum(-1, keepdims=True), vv).reshape(HQ, D)
        got = out.reshape(b, HQ, D)[bi].astype(cp.float32)
        worst = max(worst, float(cp.abs(got - o).max() / cp.abs(o).max()))
    print(f"CHECK B={b} L={l}: max |err| / max |ref| = {worst:.2e} ({'ok' if worst < 2e-3 else 'FAIL'})")


def main():
    cubin = sys.argv[1]
    prefix = sys.argv[2] if len(sys.argv) > 2 and not sys.argv[2].startswith("--") else "kv_decode_int4tc"
    shapes = [tuple(map(int, a.split(","))) for a in sys.argv[3:] if not a.startswith("--")] or [(1, 131072), (32, 131072)]
    mod = cp.RawModule(path=cubin)
    g = HQ // HKV
    fn = mod.get_function(f"{prefix}_d{D}_g{g}")
    # tuning variants kv_decode_int4tc_s{S}_m{M}: stages above 40 KB are dynamic shared memory
    stages = int(prefix.split("_s")[1].split("_")[0]) if "_s" in prefix else 3
    stage_bytes = 2 * 64 * (D // 2 + 16) + 2 * 64 * (D // 32 * 4)
    smem = stages * stage_bytes if stages * stage_bytes > 40960 else 0
    if smem:
        fn.max_dynamic_shared_size_bytes = smem
    red = mod.get_function("kv_decode_reduce")
    sm = cp.cuda.Device().attributes["MultiProcessorCount"]
    for b, l in shapes:
        pages_per_seq = -(-l // P)
        num_pages = b * pages_per_seq
        tok_bytes = 2 * (D // 2 + D // 32 * 4)
        page_bytes = HKV * P * tok_bytes
        # every byte < 0x3C: every f16 (scale, min) is finite and < 1
        pool = cp.random.randint(0, 0x3C, num_pages * page_bytes, dtype=cp.uint8)
        bt = cp.arange(num_pages, dtype=cp.int32).reshape(b, pages_per_seq)
        lens = cp.full(b, l, dtype=cp.int32)
        q = (cp.random.standard_normal(b * HQ * D) * 0.5).astype(cp.float16)
        tiles = -(-l // TILE)
        splits, tps = plan(sm, b, tiles)
        if os.environ.get("KV_SPLITS"):  # forced split count (tuning), as TRITTER_KV_SPLITS
            n = min(max(1, int(os.environ["KV_SPLITS"])), -(-tiles // 2))
            tps = -(-tiles // n)
            tps += tps % 2
            splits = -(-tiles // tps)
        o_part = cp.zeros(b * HQ * splits * D, dtype=cp.float32)
        ml_part = cp.zeros(b * HQ * splits * 2, dtype=cp.float32)
        out = cp.zeros(b * HQ * D, dtype=cp.float16)
        scale_log2 = np.float32(D ** -0.5 * 1.4426950408889634)
        args = (q, pool, bt, lens, np.int32(pages_per_seq), np.int32(HKV), np.int32(5), np.int32(num_pages),
                np.int64(page_bytes), np.int32(0), np.int32(INT_MAX), np.int32(tps), np.int32(splits), scale_log2,
                o_part, ml_part)

        # the tensor-core kernels merge their splits (last CTA per (sequence, KV head)) and
        # take (out, tickets); --unfused: a cubin from before that (kv_decode_reduce merges)
        fused = "--unfused" not in sys.argv
        counters = cp.zeros(b * HKV, dtype=cp.uint32)
        if fused:
            args = args + (out, counters)

        def main_kernel():
            fn((splits, HKV, b), (128,), args, shared_mem=smem)

        def reduce_kernel():
            red((b * HQ,), (256,), (o_part, ml_part, out, np.int32(splits), np.int32(D)))

        def step():
            main_kernel()
            if not fused:
                reduce_kernel()

        for _ in range(3):
            step()
        cp.cuda.Device().synchronize()
        if "--check" in sys.argv and b * l <= 300_000:
            check(pool, bt, q, out, b, l, num_pages, page_bytes)
        if "--once" in sys.argv:
            continue
        def timed(f):  # one run of 20 calls, already warm (the three steps above)
            return cuda_timing.timed(f, samples=1, warmup=False)

        us = timed(step)
        if fused:
            print(f"  split kernel (merge included) alone {timed(main_kernel):.1f} us")
        else:
            print(f"  split kernel alone {timed(main_kernel):.1f} us, reduce alone {timed(reduce_kernel):.1f} us")
        gbs = num_pages * page_bytes / us / 1e3
        print(f"RESULT {prefix} B={b} L={l} splits={splits} tps={tps}: {us:.1f} us, {gbs:.0f} GB/s, "
              f"finite={bool(cp.isfinite(out).all())}")
        del pool, o_part, ml_part


if __name__ == "__main__":
    main()
