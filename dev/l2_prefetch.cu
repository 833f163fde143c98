// Probe kernels for dev/l2_prefetch_probe.py: does warming L2 with the next GEMV's weights,
// while the SMs do weight-free work (attention, norms), shorten the GEMV that follows?
//
// `idle_prefetch` stands in for a weight-free phase: every CTA spins (nanosleep) until
// `idle_ns` of %globaltimer have passed since it started. Before spinning it asks for its
// share of `bytes` at `p` to be brought into L2:
//   mode 0: nothing (the baseline), mode 1: cp.async.bulk.prefetch.L2 (sm_90+, one thread
//   per CTA, 16 KB requests), mode 2: prefetch.global.L2 per 128-byte line (all threads),
//   mode 3: prefetch.global.L2::evict_last per line.
#include <stdint.h>

__device__ __forceinline__ uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

extern "C" __global__ void __launch_bounds__(128) idle_prefetch(const char* __restrict__ p, unsigned long long bytes,
                                                               unsigned long long idle_ns, int mode) {
    const uint64_t t0 = global_ns();
    const unsigned long long share = (bytes / gridDim.x + 127) & ~127ull;
    const unsigned long long lo = share * blockIdx.x;
    const unsigned long long hi = lo + share < bytes ? lo + share : bytes;
    if (mode == 1 && threadIdx.x == 0) {
        for (unsigned long long o = lo; o < hi; o += 16384) {
            const unsigned n = static_cast<unsigned>(hi - o < 16384 ? hi - o : 16384) & ~15u;
            if (n) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + o), "r"(n) : "memory");
        }
    } else if (mode == 2) {
        for (unsigned long long o = lo + 128ull * threadIdx.x; o < hi; o += 128ull * blockDim.x)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(p + o));
    } else if (mode == 3) {
        for (unsigned long long o = lo + 128ull * threadIdx.x; o < hi; o += 128ull * blockDim.x)
            asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p + o));
    }
    while (global_ns() - t0 < idle_ns) __nanosleep(500);
}
