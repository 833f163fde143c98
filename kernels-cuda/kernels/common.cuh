// Shared device helpers for every Tritter kernel: element conversions, warp and block
// reductions. Header-only; each .cu that includes it compiles it into its own module.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace tritter {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Programmatic dependent launch (sm_90+; Gpu::launch_pdl). pdl_wait: blocks until the
// previous kernel on the stream has completed and its writes are visible (a no-op when the
// kernel was launched without the PDL attribute). Nothing a previous kernel writes may be
// read, and nothing it reads may be written, before this call. pdl_launch_dependents: lets
// the next PDL kernel start its own pre-wait part once every CTA of this grid has called it
// (or exited).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// One 16-byte load that bypasses L1 (`ld.global.nc.L1::no_allocate`): for data read once per
// kernel, e.g. streamed weights, so it does not evict what the CTA reuses from L1.
__device__ __forceinline__ uint4 ldg_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// Sum over the 32 lanes of a warp (xor butterfly); every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Max over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

__device__ __forceinline__ unsigned warp_or(unsigned v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v |= __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Max over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets
// the result. `scratch` needs 32 floats of shared memory; one __syncthreads pair.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -INFINITY;  // signed inputs (logits) are fine too
    v = warp_max(v);
    __syncthreads();  // scratch may be reused by the caller right after
    return v;
}

// Sum over the whole block (as block_max): warp sums, then the warps' sums in warp order.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

// RMSNorm denominator sqrt(mean(v^2) + eps) from the row's sum of squares, with the mean
// formed as candle forms it (sum * f32(1 / n)), so the engines match the CPU reference.
__device__ __forceinline__ float rms_denominator(float sumsq, int n, float eps) {
    const float inv_n = (float)(1.0 / (double)n);
    return sqrtf(__fadd_rn(__fmul_rn(sumsq, inv_n), eps));
}

__device__ __forceinline__ unsigned block_or(unsigned v, unsigned* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    v = warp_or(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0u;
    v = warp_or(v);
    __syncthreads();
    return v;
}

// An f32 result stored as OutT (f32 as is, bf16 rounded to nearest even): kernels templated
// on their output type.
template <typename OutT>
__device__ __forceinline__ OutT to_out(float v);
template <>
__device__ __forceinline__ float to_out<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

}  // namespace tritter
