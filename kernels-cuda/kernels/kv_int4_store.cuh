// The page format of kv-int4's paged cache (DESIGN.md section 4) as device code: how one
// group of 32 values of one token and KV head is quantized and where it lands in a page.
// Shared by kv_int4.cu (kv_write_*: one thread per group) and engine.cu (the engine's fused
// QK-Norm + RoPE + append: one warp per head, a lane per value), so both write the same
// bytes as the CPU's kv_int4::quantize_group.
//
// Page of `page_size` tokens for one layer: [K half | V half], each half
//   INT4: codes (heads_kv, page_size, D/2) bytes (8 codes per u32, low nibble first), then
//         params (heads_kv, page_size, D/32) x {f16 scale, f16 min}
//   F16:  values (heads_kv, page_size, D) f16
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace tritter {
namespace kv {

// f16 minimum and scale of a group from its f32 min and max, bit-exact with the CPU's
// quantize_group.
__device__ __forceinline__ void group_scale_min(float lo, float hi, __half& scale_h, __half& min_h) {
    // + 0 turns -0 into +0 (IEEE, not folded without fast math): bit-exact with the CPU.
    min_h = __float2half_rn(__fadd_rn(lo, 0.0f));
    scale_h = __float2half_rn(__fadd_rn(__fdiv_rn(__fsub_rn(hi, lo), 15.0f), 0.0f));
    // As the CPU: the top code must dequantize to a finite f16 (code * scale + min rounded
    // once, as the tensor-core decode kernel does), else the next smaller scale. 15 * s is
    // exact in f32; one rounding for the sum, as in Rust.
    while (__fadd_rn(__fmul_rn(15.0f, __half2float(scale_h)), __half2float(min_h)) >= 65520.0f)
        scale_h = __ushort_as_half(static_cast<unsigned short>(__half_as_ushort(scale_h) - 1));
}

// Code of x in a group of minimum m and scale s > 0 (inv = RN(1 / s)).
// (x - m) / s correctly rounded without a division (Markstein): y0 = RN(d * inv) is within
// 1 ulp of d / s, the residual r = d - s * y0 is exact in one FMA, and RN(y0 + r * inv) =
// RN(d / s) (no overflow: |d / s| <= ~15; an underflowing d rounds to code 0 either way).
// So the code equals quantize_group's IEEE division bit for bit, in 3 FP ops.
__device__ __forceinline__ uint32_t group_code(float x, float m, float s, float inv) {
    const float d = __fsub_rn(x, m);
    const float y0 = __fmul_rn(d, inv);
    const float y = __fmaf_rn(__fmaf_rn(-y0, s, d), inv, y0);
    return static_cast<uint32_t>(fminf(fmaxf(roundf(y), 0.0f), 15.0f));
}

// Asymmetric 4-bit quantization of one group of 32 values held by one thread: codes (8 per
// word, low nibble first), f16 scale and minimum.
__device__ __forceinline__ void quantize_group32(const float (&x)[32], uint32_t (&words)[4], __half& scale_h,
                                                 __half& min_h) {
    float lo = x[0], hi = x[0];
#pragma unroll
    for (int i = 1; i < 32; ++i) {
        lo = fminf(lo, x[i]);
        hi = fmaxf(hi, x[i]);
    }
    group_scale_min(lo, hi, scale_h, min_h);
    const float m = __half2float(min_h), s = __half2float(scale_h);
    words[0] = words[1] = words[2] = words[3] = 0u;
    if (s > 0.0f) {
        const float inv = __frcp_rn(s);
#pragma unroll
        for (int i = 0; i < 32; ++i) words[i / 8] |= group_code(x[i], m, s, inv) << (4 * (i % 8));
    }
}

// Where group g of head h, slot `slot` of the page at `base` lives (kv = 0: K, 1: V).
struct GroupDst {
    uint8_t* values;  // INT4: 16 bytes of codes; F16: 64 bytes of values
    __half2* params;  // INT4: {scale, min}; F16: unused
};
template <bool kInt4>
__device__ __forceinline__ GroupDst group_dst(uint8_t* base, int kv, int h, int slot, int g, int heads_kv,
                                              int head_dim, int page_size) {
    const long long row = (long long)h * page_size + slot;
    if constexpr (kInt4) {
        const int groups_per_row = head_dim / 32;
        const long long val_bytes = (long long)heads_kv * page_size * (head_dim / 2);
        const long long par_bytes = (long long)heads_kv * page_size * groups_per_row * 4;
        uint8_t* region = base + kv * (val_bytes + par_bytes);
        return {region + row * (head_dim / 2) + g * 16,
                reinterpret_cast<__half2*>(region + val_bytes + (row * groups_per_row + g) * 4)};
    } else {
        const long long val_bytes = (long long)heads_kv * page_size * head_dim * 2;
        return {base + kv * val_bytes + row * head_dim * 2 + g * 64, nullptr};
    }
}

// One group stored by a whole warp, lane l holding value l: the warp-cooperative form of
// kv_int4.cu's store_group (same bytes). With `nonfinite`, a group holding NaN or Inf is
// stored as zeros and counted instead (as store_group), so no page ever holds a non-finite
// value.
template <bool kInt4>
__device__ __forceinline__ void store_group_warp(float x, GroupDst dst, unsigned* __restrict__ nonfinite) {
    constexpr unsigned kAll = 0xffffffffu;
    const int lane = threadIdx.x & 31;
    if (nonfinite != nullptr && __any_sync(kAll, !(fabsf(x) <= 3.402823466e38f))) {
        if (lane == 0) atomicAdd(nonfinite, 1u);
        x = 0.0f;
    }
    if constexpr (kInt4) {
        float lo = x, hi = x;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            lo = fminf(lo, __shfl_xor_sync(kAll, lo, o));
            hi = fmaxf(hi, __shfl_xor_sync(kAll, hi, o));
        }
        __half scale_h, min_h;
        group_scale_min(lo, hi, scale_h, min_h);
        const float m = __half2float(min_h), s = __half2float(scale_h);
        uint32_t w = s > 0.0f ? group_code(x, m, s, __frcp_rn(s)) << (4 * (lane % 8)) : 0u;
        w |= __shfl_xor_sync(kAll, w, 1);
        w |= __shfl_xor_sync(kAll, w, 2);
        w |= __shfl_xor_sync(kAll, w, 4);
        if (lane % 8 == 0) reinterpret_cast<uint32_t*>(dst.values)[lane / 8] = w;
        if (lane == 0) *dst.params = __halves2half2(scale_h, min_h);
    } else {
        reinterpret_cast<__half*>(dst.values)[lane] = __float2half_rn(x);
    }
}

// Stores head h of K (kv = 0) or V (kv = 1) of one token, head_dim f16 values at `head`
// (global or shared memory), into pool slot s = page * page_size + slot of `layer` (s < 0 or
// a page past the pool: not stored), a group of 32 values at a time by the whole warp (every
// lane must call it with the same arguments).
template <bool kInt4>
__device__ __forceinline__ void store_head_warp(const __half* head, uint8_t* __restrict__ pool, int s, int layer,
                                                int kv, int h, int heads_kv, int head_dim, int page_shift,
                                                int num_pages, long long page_bytes, unsigned* __restrict__ nonfinite) {
    const int page = s >> page_shift;
    if (s < 0 || page >= num_pages) return;
    uint8_t* base = pool + ((long long)layer * num_pages + page) * page_bytes;
    const int lane = threadIdx.x & 31;
    for (int g = 0; g < head_dim / 32; ++g) {
        const GroupDst d = group_dst<kInt4>(base, kv, h, s & ((1 << page_shift) - 1), g, heads_kv, head_dim,
                                            1 << page_shift);
        store_group_warp<kInt4>(__half2float(head[32 * g + lane]), d, nonfinite);
    }
}

}  // namespace kv
}  // namespace tritter
