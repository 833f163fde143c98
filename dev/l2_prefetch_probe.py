"""Measures what an L2 prefetch of a GEMV's weights during a weight-free phase buys (the
decode step's attention, norms and A8 kernels read almost no weights while HBM idles).
Per shape, CUDA-graph replays (dev/gemv_profile.py's graph_time, weights rotated past L2):
the GEMV cold and L2-hot, then `idle_prefetch` (dev/l2_prefetch.cu) for IDLE_US followed by
the GEMV, without and with each prefetch mode; "gemv after" = pair - idle alone. Then the
MLP-like pair GLU pass -> down projection with the down weights prefetched by a short kernel
launched just before the GLU pass. Build and run on the GPU machine:
    nvcc -cubin -arch=sm_90 -O3 -std=c++17 -Ikernels-cuda/kernels -o /tmp/gemv.cubin kernels-cuda/kernels/ternary_gemv.cu
    nvcc -cubin -arch=sm_90 -O3 -o /tmp/l2.cubin dev/l2_prefetch.cu
    python3 dev/l2_prefetch_probe.py /tmp/gemv.cubin /tmp/l2.cubin"""
import os
import sys

import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemv_profile import SMS, graph_time, make_gemv  # noqa: E402

gemv_mod = cp.RawModule(path=sys.argv[1])
idle_k = cp.RawModule(path=sys.argv[2]).get_function("idle_prefetch")
idle_us = [float(v) for v in os.environ.get("IDLE_US", "5,10").split(",")]
MODES = {1: "bulk", 2: "line", 3: "line evict_last"}


def idle(buf, mode, us, ctas=SMS):
    idle_k((ctas,), (128,), (buf, np.uint64(buf.nbytes), np.uint64(int(us * 1000)), np.int32(mode)))


gemvs = {}
for n, k in [(27648, 4096), (4096, 13824), (6144, 4096), (4096, 4096)]:
    run, check, nbytes, Wt, (name, ctas, ksplit) = make_gemv(gemv_mod, n, k)
    gemvs[(n, k)] = (run, Wt)
    copies = len(Wt)
    cold = graph_time(run, copies)
    hot = graph_time(lambda i: run(0), 1)
    print(f"{name} {n}x{k} ({nbytes / 1e6:.1f} MB, {'exact' if check() else 'MISMATCH'}): cold {cold:.2f} us "
          f"({nbytes / cold / 1e3:.0f} GB/s), L2-hot {hot:.2f} us ({nbytes / hot / 1e3:.0f} GB/s)")
    for us in idle_us:
        t_idle = graph_time(lambda i: idle(Wt[i], 0, us), copies)
        line = f"    idle {us:g} us (alone {t_idle:.2f}):"
        for mode in [0, 1, 2, 3]:
            t = graph_time(lambda i: (idle(Wt[i], mode, us), run(i)), copies)
            line += f" {MODES.get(mode, 'none')} {t - t_idle:.2f}"
        print(line)

# The MLP's GLU pass then its down projection; the down weights prefetched (bulk, mode 1) by a
# zero-idle kernel of SMS CTAs launched before the GLU pass, so HBM fetches them beside it.
glu, wg = gemvs[(27648, 4096)]
down, wd = gemvs[(4096, 13824)]
c = min(len(wg), len(wd))
base = graph_time(lambda i: (glu(i), down(i)), c)
for mode in [1, 2]:
    pf = graph_time(lambda i: (idle(wd[i], mode, 0), glu(i), down(i)), c)
    print(f"GLU pass + down: {base:.2f} us; down prefetched ({MODES[mode]}) beside the GLU pass: {pf:.2f} us")
