"""Drives dev/persistent_probe.cu with cupy on the GPU machine (no Rust): the floor of a
persistent 7B decode step. Per layer, the phases of one decode step read their share of the
layer's 2-bit weights (q/k/v, QK-Norm + RoPE + KV write, attention over 512 INT4 tokens, A8,
o, residual norm, gate/up, A8 of h, down), 32 layers, every layer its own slab (1.7 GB, so
nothing stays in L2). Printed per layer, median of CUDA-event timed steps:

  stream       every byte of the step in one phase, no barrier (the HBM ceiling)
  launches     one launch per phase (a CUDA graph of 9 x 32 launches, no PDL): the shape of
               today's engine without its compute
  barriers     one cooperative launch per step, a grid barrier after every phase
  +prefetch    the same, each thread requesting its first vectors of the next phase before
               it arrives at the barrier
  empty        barriers only (zero-byte phases): the barrier's own latency

Build here, run there (the cubin travels in .gpu, which the device run carries):
    nvcc -cubin -arch=sm_90 -O3 -Ikernels-cuda/kernels -o .gpu/probe/persistent_probe.cubin dev/persistent_probe.cu
    cp dev/persistent_probe.py dev/cuda_timing.py .gpu/probe/
    python3 .gpu/probe/persistent_probe.py .gpu/probe/persistent_probe.cubin   # on the device
"""
import os
import sys

import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_timing import timed  # noqa: E402

LAYERS = 32
MB = 1 << 20
# Bytes each phase reads per layer at the 7B preset (2-bit weights; hidden 4096, 32 query
# and 8 KV heads of 128, intermediate 13824; 512 cached INT4 tokens at 0.625 B per value).
PHASES = [
    ("q/k/v", 6144 * 4096 // 4),
    ("qk-norm+rope+kv", 0),
    ("attention", 2 * 512 * 8 * 128 * 5 // 8),
    ("a8", 0),
    ("o", 4096 * 4096 // 4),
    ("norm+a8", 0),
    ("gate/up", 2 * 13824 * 4096 // 4),
    ("a8 h", 0),
    ("down", 4096 * 13824 // 4),
]

mod = cp.RawModule(path=sys.argv[1])
probe = mod.get_function("persistent_probe")
sms = cp.cuda.Device().attributes["MultiProcessorCount"]
vecs = [b // 16 for _, b in PHASES]
offs = np.concatenate([[0], np.cumsum(vecs)]).astype(np.int64)
layer_vecs = int(offs[-1])
w = cp.zeros((LAYERS * layer_vecs, 4), dtype=cp.uint32)
bar = cp.zeros(1, dtype=cp.uint32)
sink = cp.zeros(1, dtype=cp.uint32)
step_bytes = LAYERS * layer_vecs * 16
print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, {sms} SMs; "
      f"{layer_vecs * 16 / MB:.1f} MiB per layer, {LAYERS} layers")


def report(name, us, streams=True):
    rate = f"  {step_bytes / us / 1e6:5.2f} TB/s" if streams else ""
    print(f"{name:<28} {us / LAYERS:7.2f} us per layer  {us / 1e3:6.3f} ms per step{rate}")


bar_base = [0]  # the counter's value between launches (monotonic, wrapping u32)


def coop(grid, off, barriers, prefetch, phases):
    # cupy shrinks a cooperative grid that cannot be co-resident (with a warning): refuse.
    per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(probe.kernel.ptr, 256, 0)
    assert per_sm * sms >= grid, f"{grid} CTAs cannot be co-resident ({per_sm} per SM)"
    off_d = cp.asarray(off)
    arrivals = (LAYERS * phases - 1) * grid if barriers else 0

    def run():
        # RawKernel fixes the flag at construction; its Function takes it per launch.
        probe.kernel((grid,), (256,), (w, off_d, np.int32(phases), np.int32(LAYERS), np.int64(layer_vecs), bar,
                                       np.uint32(bar_base[0]), np.int32(barriers), np.int32(prefetch), sink),
                     enable_cooperative_groups=True)
        bar_base[0] = (bar_base[0] + arrivals) % (1 << 32)
    return timed(run, reps=5, samples=7)


for ctas in (1, 2):
    grid = ctas * sms
    print(f"--- grid {grid} CTAs of 256 threads ({ctas} per SM)")
    one = np.array([0, layer_vecs], dtype=np.int64)
    report("stream", coop(grid, one, 0, 0, 1))
    # One launch per phase, captured in a graph (launch overhead as in the engine's graphs).
    phase_offs = [cp.asarray(np.array([offs[p], offs[p + 1]], dtype=np.int64)) for p in range(len(PHASES))]
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        for layer in range(LAYERS):
            wl = w[layer * layer_vecs:]
            for p in range(len(PHASES)):
                probe((grid,), (256,), (wl, phase_offs[p], np.int32(1), np.int32(1), np.int64(layer_vecs), bar,
                                        np.uint32(0), np.int32(0), np.int32(0), sink))
        g = s.end_capture()
    with s:
        report("launches (graph, 9 x 32)", timed(lambda: g.launch(s), reps=5, samples=7))
    report("barriers", coop(grid, offs, 1, 0, len(PHASES)))
    report("barriers +prefetch", coop(grid, offs, 1, 1, len(PHASES)))
    report("empty (barriers only)", coop(grid, np.zeros(len(PHASES) + 1, dtype=np.int64), 1, 0, len(PHASES)),
           streams=False)
