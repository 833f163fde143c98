// Probe for a persistent decode kernel (issue 11): how fast can one resident grid stream a
// 7B layer's packed weights when the layer's ~9 dependent phases are separated by grid
// barriers instead of kernel boundaries? No arithmetic: every phase only reads its slice of
// the layer (16-byte non-caching loads, XOR-folded so nothing is optimized away), which is
// the floor any real phase kernel would add its compute to.
//
//   w        [layers * layer_vecs] uint4   the weights of every layer (rotated past L2)
//   off      [phases + 1] int64            phase p reads uint4 [off[p], off[p+1]) of a layer
//   bar      [1] u32                       barrier counter, monotonic across launches: the
//                                          launch passes `bar_base` = its value at entry
//                                          (wrapping u32 arithmetic)
//   prefetch 0/1                           before arriving at a barrier, each thread issues the
//                                          loads of its first kU vectors of the next phase (as
//                                          the GEMV does before griddepcontrol.wait)
//
// Grid barrier: __syncthreads, then thread 0 adds 1 with release semantics (grid_arrive),
// the next phase's prefetch, then thread 0 spins on an acquire load until every CTA of this
// and all earlier barriers has arrived (grid_wait). The grid must be co-resident:
// dev/persistent_probe.py launches it cooperatively and first asserts that the occupancy
// allows the grid (cupy would otherwise shrink it with a warning). Bound: HBM (bytes) plus
// barrier latency.
//
// Build here, run there (cupy): see dev/persistent_probe.py.

#include <cstdint>

#include "common.cuh"

namespace {

using tritter::ldg_stream;

constexpr int kU = 4;  // vectors in flight per thread and loop iteration

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// The grid barrier in two halves, so the next phase's prefetch can sit between them: a
// prefetch issued before the release would have to complete first (the release orders thread
// 0's earlier loads), putting an HBM round trip on every barrier's critical path.
__device__ __forceinline__ void grid_arrive(unsigned* bar) {
    __syncthreads();  // every thread of the CTA is done with the phase
    if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(bar) : "memory");
}
__device__ __forceinline__ void grid_wait(const unsigned* bar, unsigned target) {
    if (threadIdx.x == 0) {
        while (static_cast<int>(ld_acquire(bar) - target) < 0) {
        }
    }
    __syncthreads();
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256)
    persistent_probe(const uint4* __restrict__ w, const long long* __restrict__ off, int phases, int layers,
                     long long layer_vecs, unsigned* bar, unsigned bar_base, int barriers, int prefetch,
                     unsigned* __restrict__ sink) {
    const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    unsigned acc = 0, target = bar_base;
    uint4 pre[kU];
    bool have_pre = false;
    for (int l = 0; l < layers; ++l) {
        const uint4* base = w + l * layer_vecs;
        for (int p = 0; p < phases; ++p) {
            const long long e = off[p + 1];
            long long i = off[p] + tid;
            if (have_pre) {  // the first kU vectors of this phase, requested before the barrier
#pragma unroll
                for (int u = 0; u < kU; ++u)
                    if (i + u * stride < e) acc ^= pre[u].x ^ pre[u].w;
                i += kU * stride;
                have_pre = false;
            }
            for (; i + (kU - 1) * stride < e; i += kU * stride) {
                uint4 v[kU];
#pragma unroll
                for (int u = 0; u < kU; ++u) v[u] = ldg_stream(base + i + u * stride);
#pragma unroll
                for (int u = 0; u < kU; ++u) acc ^= v[u].x ^ v[u].w;
            }
            for (; i < e; i += stride) {
                const uint4 v = ldg_stream(base + i);
                acc ^= v.x ^ v.w;
            }
            const bool last = l + 1 == layers && p + 1 == phases;
            const bool sync = barriers && !last;
            if (sync) grid_arrive(bar);
            if (prefetch && !last) {  // read-only weights: no ordering against the barrier needed
                const int np = p + 1 == phases ? 0 : p + 1;
                const uint4* nbase = p + 1 == phases ? base + layer_vecs : base;
                const long long nb = off[np] + tid, ne = off[np + 1];
#pragma unroll
                for (int u = 0; u < kU; ++u)
                    pre[u] = nb + u * stride < ne ? ldg_stream(nbase + nb + u * stride) : make_uint4(0, 0, 0, 0);
                have_pre = true;
            }
            if (sync) {
                target += gridDim.x;
                grid_wait(bar, target);
            }
        }
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;  // keeps the loads alive; practically never true
}
