// L2 prefetch of a read-only buffer (Gpu::prefetch_l2 in kernels-cuda/src/prefetch.rs).
//
// Why: a batch-1 decode step is a chain of small kernels, and between its GEMVs (which
// stream weights from HBM) sit latency-bound kernels (QK-Norm + RoPE + KV write, decode
// attention, the residual norms) during which HBM is idle. Launched on a second stream at
// the start of such a stretch, this kernel moves the next GEMV's weights into L2 (H100:
// 50 MB; RTX 5080: 64 MB), so the GEMV reads them at L2 latency and bandwidth and HBM works
// while the chain waits on small kernels.
//
// Algorithm. The buffer [p, p + bytes) is cut into kChunk-byte chunks, one per thread
// (grid-stride). mode 0: one cp.async.bulk.prefetch.L2 per chunk (sm_90+: the SM's bulk-copy
// unit issues the requests, the thread moves on); mode 1: one prefetch.global.L2::evict_last
// per 128-byte line of the chunk (the load/store unit issues them). Neither returns data nor
// waits for it: the kernel ends once the requests are issued. Nothing is written, so a
// prefetch never changes a result; a tail shorter than 16 bytes is left out (bulk requests
// are whole 16-byte units).
//
// Launch: 64 threads per CTA, ceil(bytes / (64 kChunk)) CTAs capped by the host, so the
// requests spread over many SMs' bulk-copy units. Bound: HBM bandwidth (asynchronously).

#include <stdint.h>

namespace {
constexpr unsigned long long kChunk = 4096;
}

extern "C" __global__ void __launch_bounds__(64)
    prefetch_l2(const char* __restrict__ p, unsigned long long bytes, int mode) {
    const unsigned long long chunks = (bytes + kChunk - 1) / kChunk;
    const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
    for (unsigned long long i = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
         i += stride) {
        const unsigned long long off = i * kChunk;
        const unsigned long long left = bytes - off;
        const unsigned size = static_cast<unsigned>((left < kChunk ? left : kChunk) & ~15ull);
        if (size == 0) continue;
        const char* a = p + off;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        if (mode == 0) {
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(a), "r"(size) : "memory");
            continue;
        }
#endif
        for (unsigned line = 0; line < size; line += 128)
            asm volatile("prefetch.global.L2::evict_last [%0];\n" ::"l"(a + line) : "memory");
    }
}
