// Shared primitives of the ternary W2A8 kernels (ternary_gemv.cu, ternary_gemm.cu): the int8
// tensor-core MMA, the 2-bit weight decode in the kernels' k order (ldmatrix and cp.async come from
// warp_mma.cuh).
#pragma once
#include <stdint.h>

#include "warp_mma.cuh"

namespace tritter {

// D += A (16 x 32 s8, row) * B (32 x 8 s8, col), int32 accumulate.
__device__ __forceinline__ void mma_s8(int (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                       unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A register of k-step j (0..3) from a canonical weight word: the codes of weights
// {j, 4 + j, 8 + j, 12 + j} of the word, one per byte (values 0..2).
__device__ __forceinline__ unsigned ternary_a_reg(uint32_t word, int j) { return (word >> (2 * j)) & 0x03030303u; }

// The quad's 4 k-steps for kTiles MMA row tiles against kNT tiles of 8 activation rows (lo /
// hi: words t and t + 4 of rows g, g + 8 of each tile, i.e. a lane's tiled-layout uint4):
// B registers bq[nt][0..7] hold the quad's activation codes of row 8 nt + g at byte offsets
// 16 i + 4 t. Each decoded A fragment feeds kNT MMAs.
template <int kTiles, int kNT>
__device__ __forceinline__ void ternary_quad_mma(int (&c)[kTiles][kNT][4], const uint32_t (&lo)[2 * kTiles],
                                                 const uint32_t (&hi)[2 * kTiles], const unsigned (&bq)[kNT][8]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int tile = 0; tile < kTiles; ++tile) {
            const unsigned a0 = ternary_a_reg(lo[2 * tile], j), a1 = ternary_a_reg(lo[2 * tile + 1], j);
            const unsigned a2 = ternary_a_reg(hi[2 * tile], j), a3 = ternary_a_reg(hi[2 * tile + 1], j);
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) mma_s8(c[tile][nt], a0, a1, a2, a3, bq[nt][2 * j], bq[nt][2 * j + 1]);
        }
    }
}

}  // namespace tritter
