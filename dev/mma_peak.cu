// Tensor-pipe ceiling of mma.sync on the device at hand: every warp issues independent
// MMAs on register operands only (no memory traffic), 8 accumulator chains per warp so the
// pipe, not the dependency latency, is the limit. Read by dev/mma_peak.py; the ceiling
// tells how far the GEMM kernels are from what mma.sync allows (on Hopper, cuBLAS uses
// wgmma, which mma.sync code cannot reach).
#include <stdint.h>

extern "C" __global__ void peak_s8(int* out, int iters) {
    int c[8][4] = {};
    unsigned a = threadIdx.x * 0x01010101u, b = (threadIdx.x + 7) * 0x01010101u;
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
            asm volatile(
                "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                "{%0,%1,%2,%3};\n"
                : "+r"(c[j][0]), "+r"(c[j][1]), "+r"(c[j][2]), "+r"(c[j][3])
                : "r"(a), "r"(b), "r"(a ^ j), "r"(b), "r"(a), "r"(b ^ j));
    }
    int s = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) s += c[j][0] + c[j][1] + c[j][2] + c[j][3];
    if (s == 0x12345678) out[0] = s;
}

extern "C" __global__ void peak_bf16(float* out, int iters) {
    float c[8][4] = {};
    unsigned a = 0x3f803f80u ^ threadIdx.x, b = 0x3f803f80u;
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
            asm volatile(
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                "{%0,%1,%2,%3};\n"
                : "+f"(c[j][0]), "+f"(c[j][1]), "+f"(c[j][2]), "+f"(c[j][3])
                : "r"(a), "r"(b), "r"(a), "r"(b), "r"(b), "r"(a));
    }
    float s = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) s += c[j][0] + c[j][1] + c[j][2] + c[j][3];
    if (s == 1234.5f) out[0] = s;
}
