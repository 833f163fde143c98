// BitNet b1.58 absmean quantization on the device, straight into ternary-gemm's tiled layout
// (crates/ternary-gemm/src/tiles.rs): the per-step re-quantization of a training engine's f32
// shadow weights, so the forward GEMMs read 2-bit weights without a host round trip.
//
// ---- absmean_abs_sum: sum |w| of a (rows, k_in) f32 block into one f64 (zeroed by the caller) -
//   Grid-stride, 256 threads, each thread sums in f64 (as the CPU reference
//   ternary_gemm::absmean_quantize does), block reduction in shared memory, one f64 atomicAdd
//   per CTA. The order differs from the CPU's row-by-row sum only in f64 rounding (relative
//   1e-16), far below the f32 rounding of gamma. Memory bound: 4 B read per weight.
//
// ---- absmean_pack_tiles: codes of the block into rows [row0, row0 + rows) of the tiles ------
//   One thread per canonical word (row n, word q of 16 weights): gamma = f32(sum / count),
//   code = clamp(round(w / (gamma + 1e-5)), -1, 1) + 1 with IEEE division and round half away
//   from zero (the CPU formula, so codes are bit-identical for equal gamma), 16 codes packed
//   into one u32 and stored at its tiled position (tiled_word_index of tiles.rs). Weights past
//   k_in in the last word are code 1 (zero); padding words outside the matrix keep the
//   ZERO_WORD the buffer was made with. The scale goes to scales[0] (per-tensor matrix) or to
//   scales[row0 .. row0 + rows) (a per-row matrix stacking several BitLinear layers, each with
//   its own absmean gamma: the training engine's fused q/k/v and gate/up matrices). A
//   non-finite sum gives a NaN gamma, which every product then carries (the caller's loss
//   check reports it). Memory bound: 4 B read and 0.25 B written per weight. With `deq`
//   non-null the dequantized weights Wq * gamma are also written there as bf16, row-major
//   (rows, k_in): the operand of a cuBLAS input-gradient product (2 B more per weight).
//
// ---- absmean_dequant_bf16: only the dequantized block, Wq * gamma as bf16, row-major ----------
//   For an engine whose products all run on the bf16 copy (no packed codes needed): the same
//   gamma, division and rounding as absmean_pack_tiles (so the same bf16 values), written by a
//   streaming grid-stride loop, 8 weights per thread and step (two 16-byte loads, one 16-byte
//   store) when the block's length is a multiple of 8 and both pointers are 16-byte aligned,
//   else one weight at a time. Memory bound: 4 B read and 2 B written per weight.

#include <cuda_bf16.h>

#include <cstdint>

namespace {
constexpr int kThreads = 256;
}

extern "C" __global__ void __launch_bounds__(kThreads)
    absmean_abs_sum(const float* __restrict__ w, long long n, double* __restrict__ sum) {
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * kThreads + threadIdx.x; i < n; i += (long long)gridDim.x * kThreads)
        acc += (double)fabsf(w[i]);
    __shared__ double part[kThreads];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(sum, part[0]);
}

namespace {
// Wq * gamma of one weight, rounded to bf16 once (absmean_pack_tiles' formula).
__device__ __forceinline__ __nv_bfloat16 deq_weight(float w, float gamma, float denom) {
    const float q = fminf(fmaxf(roundf(__fdiv_rn(w, denom)), -1.0f), 1.0f);
    return __float2bfloat16_rn(q * gamma);
}
}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
    absmean_dequant_bf16(const float* __restrict__ w, long long n, const double* __restrict__ sum,
                         __nv_bfloat16* __restrict__ deq, int vectorized) {
    const float gamma = (float)(*sum / (double)n);
    const float denom = gamma + 1e-5f;
    const long long stride = (long long)gridDim.x * kThreads;
    const long long first = (long long)blockIdx.x * kThreads + threadIdx.x;
    if (vectorized) {
        for (long long i = first; i < n / 8; i += stride) {
            const float4 a = reinterpret_cast<const float4*>(w)[2 * i];
            const float4 b = reinterpret_cast<const float4*>(w)[2 * i + 1];
            const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            uint4 out;
            unsigned* o = reinterpret_cast<unsigned*>(&out);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const __nv_bfloat16 lo = deq_weight(v[2 * e], gamma, denom);
                const __nv_bfloat16 hi = deq_weight(v[2 * e + 1], gamma, denom);
                o[e] = (unsigned)__bfloat16_as_ushort(lo) | ((unsigned)__bfloat16_as_ushort(hi) << 16);
            }
            reinterpret_cast<uint4*>(deq)[i] = out;
        }
    } else {
        for (long long i = first; i < n; i += stride) deq[i] = deq_weight(w[i], gamma, denom);
    }
}

extern "C" __global__ void __launch_bounds__(kThreads)
    absmean_pack_tiles(const float* __restrict__ w, int rows, int k_in, const double* __restrict__ sum,
                       unsigned* __restrict__ tiles, float* __restrict__ scales, int row0, int quads,
                       int per_row_scales, __nv_bfloat16* __restrict__ deq) {
    const int wpr = (k_in + 15) / 16;
    const long long idx = (long long)blockIdx.x * kThreads + threadIdx.x;
    if (idx >= (long long)rows * wpr) return;
    const int n = (int)(idx / wpr), word = (int)(idx % wpr);
    const float gamma = (float)(*sum / ((double)rows * (double)k_in));
    const float denom = gamma + 1e-5f;
    const float* row = w + (long long)n * k_in;
    unsigned packed = 0;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const int k = word * 16 + j;
        unsigned code = 1u;
        if (k < k_in) {
            const float q = fminf(fmaxf(roundf(__fdiv_rn(row[k], denom)), -1.0f), 1.0f);
            code = (unsigned)((int)q + 1);
            if (deq) deq[(long long)n * k_in + k] = deq_weight(row[k], gamma, denom);
        }
        packed |= code << (2 * j);
    }
    const int r_all = row0 + n;
    const int tile = r_all / 16, r = r_all % 16;
    const int half = r / 8, g = r % 8;
    const int q = word / 8, wq = word % 8;
    const int hi = wq / 4, t = wq % 4;
    const long long pos = (((long long)tile * quads + q) * 32 + 4 * g + t) * 4 + 2 * hi + half;
    tiles[pos] = packed;
    if (per_row_scales) {
        if (word == 0) scales[r_all] = gamma;
    } else if (idx == 0) {
        scales[0] = gamma;
    }
}
