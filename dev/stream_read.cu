// The streaming ceiling for dev/gemv_profile.py: reads a buffer once with the GEMV's load
// (16-byte ld.global.nc.L1::no_allocate per lane, grid-stride), folds it and writes one word
// per CTA only when a sentinel appears (never, for ternary codes), so nothing is elided.
#include <stdint.h>

extern "C" __global__ void __launch_bounds__(256) stream_read(const uint4* __restrict__ p,
                                                             unsigned* __restrict__ out, size_t n16) {
    unsigned acc = 0;
    for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n16;
         i += static_cast<size_t>(gridDim.x) * blockDim.x) {
        uint4 v;
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p + i));
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0xFFFFFFFFu) out[blockIdx.x] = acc;
}
