// Shared by act_quant.cu and train.cu: writing one row of int8 codes in the ternary GEMV's
// MMA k order (the `GemvActivations` layout of ternary-gemm, see act_quant.cu).
#pragma once

#include <cstdint>

namespace tritter {

// BitNet A8 (DESIGN.md section 4), the operations every A8 kernel shares to stay bit-exact
// with the CPU reference: the scale s = 127 / max(|x|, eps) of a row whose absolute maximum
// is `amax`, and a value's code, rounded half away from zero and clamped to [-128, 127]
// (as a float, for kernels that also dequantize it, or as int8).
__device__ __forceinline__ float a8_scale(float amax) { return __fdiv_rn(127.0f, fmaxf(amax, 1e-5f)); }
__device__ __forceinline__ float a8_round(float v, float s) {
    return fminf(fmaxf(roundf(__fmul_rn(v, s)), -128.0f), 127.0f);
}
__device__ __forceinline__ int8_t a8_code(float v, float s) { return static_cast<int8_t>(a8_round(v, s)); }

// Writes row `row` of codes_mma / sums from codes produced by `code_of(k)` (k < cols).
template <int kThreads, typename CodeOf>
__device__ __forceinline__ void store_mma_row(int8_t* __restrict__ codes_mma, int* __restrict__ sums, int row,
                                              int cols, int cols_pad, CodeOf code_of) {
    __shared__ unsigned scratch_sum[32];
    unsigned* out = reinterpret_cast<unsigned*>(codes_mma + static_cast<size_t>(row) * cols_pad);
    int local = 0;
    for (int wd = threadIdx.x; wd < cols_pad / 4; wd += kThreads) {
        const int blk = wd >> 5, j = (wd >> 3) & 3, t = wd & 7;
        const int kb = 128 * blk + 16 * t + j;
        unsigned word = 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int k = kb + 4 * e;
            const int q = k < cols ? code_of(k) : 0;
            word |= (static_cast<unsigned>(q) & 0xffu) << (8 * e);
        }
        local = __dp4a(static_cast<int>(word), 0x01010101, local);
        out[wd] = word;
    }
    // block sum (two's complement: an unsigned OR-free add is exact for the int sum)
    local = __reduce_add_sync(0xffffffffu, local);
    if ((threadIdx.x & 31) == 0) scratch_sum[threadIdx.x >> 5] = static_cast<unsigned>(local);
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
        for (int w = 0; w < kThreads / 32; ++w) total += static_cast<int>(scratch_sum[w]);
        sums[row] = total;
    }
}


}  // namespace tritter
