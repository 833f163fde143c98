// The small kernels of the Tritter GPU inference engine (crates/tritter/src/engine/gpu.rs):
// everything of a forward step that is not a ternary GEMV/GEMM (ternary-gemm), attention
// (flash-attn-sm120, kv-int4) or the LM head (cuBLAS). All activations between them are f32
// rows `(N, H)` (N = tokens of the step), as the CPU engine computes them.
//
// ---- engine_embed: x[r, :] = f32(table[ids[r], :]), or zeros for <pad> when zero_pad ------
//   Grid N, 256 threads; 16-byte bf16 loads when H % 8 == 0. Memory bound (2H B read, 4H B
//   written per row).
//
// ---- engine_add_rmsnorm_a8: x[r] += rmsnorm(a[r]) * w (Chameleon's normed residual branch), ---
//   then the BitNet A8 of the new row straight into ternary-gemm's GEMV layout (codes in MMA
//   k order, row sum, scale s = 127 / max(max|x|, 1e-5), non-finite flag): the input of the
//   next projection (the MLP's, or the next layer's q/k/v) in the launch that updates x, with
//   act_quant's formula and rounding (bit-exact with ternary_gemm::absmax_quantize_rows).
// ---- engine_rmsnorm_{f32,bf16}: out[i] = rmsnorm(x[rows[i]]) * w (pre-norm, final norm) ------
//   Grid N, 256 threads, the row in registers (H <= 256 * 16), sum of squares reduced with
//   warp shuffles then across warps in shared memory; the formula of the CPU engine
//   (tritter::model::rms_norm_row): ms = sum(v^2) * f32(1 / H), r = sqrt(ms + eps),
//   o = v / r * w with IEEE division (no fast math: only the summation order differs from
//   the CPU's sequential sum). Memory bound, latency dominated at decode sizes.
//
// ---- engine_qkv: QK-Norm + RoPE + f16 conversion of the fused q/k/v projection output ------
//   in (N, (Hq + 2 Hkv) * D) f32 rows [q heads | k heads | v heads] -> q (N, Hq, D),
//   k (N, Hkv, D), v (N, Hkv, D) f16, q and k normalized (RMSNorm over D with q_norm / k_norm,
//   when given) and rotated (rotate-half RoPE at pos[r]), v converted. One warp per head,
//   4 heads per 128-thread CTA, grid (N, ceil((Hq + 2 Hkv) / 4)). Lane l holds the pairs
//   (j, j + D/2) for j = l, l + 32, ...; the angle pos * inv_freq[j] is computed in double
//   precision (as the CPU reference does, then rounded to f32 once), so long contexts keep
//   their precision; each RoPE product is rounded before the sum, as in the reference.

#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kMaxVecs = 4;  // 16-byte vectors of 4 f32 per thread: rows up to 4096 in registers
constexpr unsigned kFull = 0xffffffffu;

using tritter::rms_denominator;
using tritter::warp_sum;

// Integer sum over the CTA; every thread gets the result.
__device__ __forceinline__ int block_sum_int(int v) {
    __shared__ int part[kThreads / 32];
    v = __reduce_add_sync(kFull, v);
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    __syncthreads();
    if (l == 0) part[w] = v;
    __syncthreads();
    return __reduce_add_sync(kFull, l < kThreads / 32 ? part[l] : 0);
}


// Loads row xr (h floats) into v (thread i holds elements 4 * (i + 256 j) .. +3 when
// vectorized, else i + 256 j); returns the partial sum of squares. Rows longer than
// 4 * 256 * kMaxVecs take the slow path (re-read in the second pass).
struct RowRegs {
    float v[4 * kMaxVecs];
};

__device__ __forceinline__ bool row_fits(int h) { return h % 4 == 0 && h <= 4 * kThreads * kMaxVecs; }

__device__ __forceinline__ float load_row(const float* __restrict__ xr, int h, RowRegs& r) {
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < kMaxVecs; ++j) {
        const int i = 4 * (threadIdx.x + kThreads * j);
        float4 f = make_float4(0.f, 0.f, 0.f, 0.f);
        if (i < h) f = *reinterpret_cast<const float4*>(xr + i);
        r.v[4 * j] = f.x;
        r.v[4 * j + 1] = f.y;
        r.v[4 * j + 2] = f.z;
        r.v[4 * j + 3] = f.w;
        s += f.x * f.x + f.y * f.y + f.z * f.z + f.w * f.w;
    }
    return s;
}

using tritter::to_out;

// out = rmsnorm(x) * w (add = false) or x_out += rmsnorm(x) * w (add = true).
template <typename OutT, bool kAdd>
__device__ __forceinline__ void rmsnorm_row(const float* __restrict__ xr, const float* __restrict__ w, int h, float eps,
                                            OutT* __restrict__ out) {
    __shared__ float red[32];
    if (row_fits(h)) {
        RowRegs r;
        const float rd = rms_denominator(tritter::block_sum(load_row(xr, h, r), red), h, eps);
#pragma unroll
        for (int j = 0; j < kMaxVecs; ++j) {
            const int i = 4 * (threadIdx.x + kThreads * j);
            if (i >= h) break;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float y = __fmul_rn(__fdiv_rn(r.v[4 * j + e], rd), w[i + e]);
                if constexpr (kAdd) {
                    out[i + e] = to_out<OutT>(__fadd_rn((float)out[i + e], y));
                } else {
                    out[i + e] = to_out<OutT>(y);
                }
            }
        }
        return;
    }
    float s = 0.0f;
    for (int i = threadIdx.x; i < h; i += kThreads) s += xr[i] * xr[i];
    const float rd = rms_denominator(tritter::block_sum(s, red), h, eps);
    for (int i = threadIdx.x; i < h; i += kThreads) {
        const float y = __fmul_rn(__fdiv_rn(xr[i], rd), w[i]);
        if constexpr (kAdd) {
            out[i] = to_out<OutT>(__fadd_rn((float)out[i], y));
        } else {
            out[i] = to_out<OutT>(y);
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
    engine_embed(const unsigned* __restrict__ ids, const __nv_bfloat16* __restrict__ table, int hidden, int zero_pad,
                 float* __restrict__ x) {
    const int r = blockIdx.x;
    const unsigned id = ids[r];
    float* xr = x + (long long)r * hidden;
    if (zero_pad && id == 0) {
        for (int i = threadIdx.x; i < hidden; i += kThreads) xr[i] = 0.0f;
        return;
    }
    const __nv_bfloat16* er = table + (long long)id * hidden;
    if (hidden % 8 == 0) {
        for (int i = threadIdx.x; i < hidden / 8; i += kThreads) {
            const uint4 raw = __ldg(reinterpret_cast<const uint4*>(er) + i);
            const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&raw);
            float4 lo, hi;
            float2 f0 = __bfloat1622float2(b[0]), f1 = __bfloat1622float2(b[1]);
            float2 f2 = __bfloat1622float2(b[2]), f3 = __bfloat1622float2(b[3]);
            lo = make_float4(f0.x, f0.y, f1.x, f1.y);
            hi = make_float4(f2.x, f2.y, f3.x, f3.y);
            reinterpret_cast<float4*>(xr)[2 * i] = lo;
            reinterpret_cast<float4*>(xr)[2 * i + 1] = hi;
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += kThreads) xr[i] = __bfloat162float(er[i]);
    }
}

extern "C" __global__ void __launch_bounds__(kThreads)
    engine_add_rmsnorm_a8(float* __restrict__ x, const float* __restrict__ a, const float* __restrict__ w, int h,
                          float eps, int8_t* __restrict__ codes, int* __restrict__ sums, float* __restrict__ scales,
                          unsigned* __restrict__ nonfinite, int kp) {
    const long long r = blockIdx.x;
    float* xr = x + r * h;
    rmsnorm_row<float, true>(a + r * h, w, h, eps, xr);
    __syncthreads();  // the updated row is visible to the whole CTA
    float amax = 0.0f;
    unsigned bad = 0u;
    for (int i = threadIdx.x; i < h; i += kThreads) {
        const float v = fabsf(xr[i]);
        amax = fmaxf(amax, v);
        bad |= !(v <= 3.402823466e38f);  // NaN or Inf (fmaxf alone would drop a NaN)
    }
    __shared__ float red[32];
    amax = tritter::block_max(amax, red);
    bad = block_sum_int((int)bad) != 0;
    const float s = __fdiv_rn(127.0f, fmaxf(amax, 1e-5f));
    int local = 0;
    for (int wd = threadIdx.x; wd < kp / 4; wd += kThreads) {
        // Word wd of the MMA k order holds k = kb, kb + 4, kb + 8, kb + 12 (act_quant.cu).
        const int blk = wd >> 5, j = (wd >> 3) & 3, t = wd & 7;
        const int kb = 128 * blk + 16 * t + j;
        unsigned word = 0u;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int k = kb + 4 * e;
            int q = 0;
            if (k < h && !bad) {
                float f = roundf(__fmul_rn(xr[k], s));
                q = (int)fminf(fmaxf(f, -128.0f), 127.0f);
            }
            word |= ((unsigned)q & 0xffu) << (8 * e);
        }
        local = __dp4a((int)word, 0x01010101, local);
        reinterpret_cast<unsigned*>(codes + r * kp)[wd] = word;
    }
    const int total = block_sum_int(local);
    if (threadIdx.x == 0) {
        sums[r] = total;
        scales[r] = bad ? __int_as_float(0x7fc00000) : s;
        nonfinite[r] = bad;
    }
}

// rows: source row of each output row (nullptr: the identity).
#define ENGINE_RMSNORM(NAME, OUT)                                                                              \
    extern "C" __global__ void __launch_bounds__(kThreads)                                                     \
        NAME(const float* __restrict__ x, const int* __restrict__ rows, const float* __restrict__ w, int h,    \
             float eps, OUT* __restrict__ out) {                                                               \
        const long long i = blockIdx.x;                                                                        \
        const long long src = rows ? rows[i] : i;                                                              \
        rmsnorm_row<OUT, false>(x + src * h, w, h, eps, out + i * h);                                          \
    }
ENGINE_RMSNORM(engine_rmsnorm_f32, float)
ENGINE_RMSNORM(engine_rmsnorm_bf16, __nv_bfloat16)

extern "C" __global__ void __launch_bounds__(128)
    engine_qkv(const float* __restrict__ qkv, const int* __restrict__ pos, const float* __restrict__ q_norm,
               const float* __restrict__ k_norm, const double* __restrict__ inv_freq, int heads_q, int heads_kv,
               int head_dim, float eps, __half* __restrict__ q, __half* __restrict__ k, __half* __restrict__ v) {
    const int r = blockIdx.x;
    const int head = blockIdx.y * 4 + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int heads = heads_q + 2 * heads_kv;
    if (head >= heads) return;
    const int half_d = head_dim / 2;
    const float* src = qkv + ((long long)r * heads + head) * head_dim;
    if (head >= heads_q + heads_kv) {
        __half* dst = v + ((long long)r * heads_kv + (head - heads_q - heads_kv)) * head_dim;
        for (int i = lane; i < head_dim; i += 32) dst[i] = __float2half_rn(src[i]);
        return;
    }
    const bool is_q = head < heads_q;
    const float* norm = is_q ? q_norm : k_norm;
    __half* dst = is_q ? q + ((long long)r * heads_q + head) * head_dim
                       : k + ((long long)r * heads_kv + (head - heads_q)) * head_dim;
    constexpr int kMaxPairs = 4;  // D <= 256
    float x1[kMaxPairs], x2[kMaxPairs];
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < kMaxPairs; ++p) {
        const int j = lane + 32 * p;
        x1[p] = j < half_d ? src[j] : 0.0f;
        x2[p] = j < half_d ? src[j + half_d] : 0.0f;
        s += x1[p] * x1[p] + x2[p] * x2[p];
    }
    if (norm != nullptr) {
        const float rd = rms_denominator(warp_sum(s), head_dim, eps);
#pragma unroll
        for (int p = 0; p < kMaxPairs; ++p) {
            const int j = lane + 32 * p;
            if (j < half_d) {
                x1[p] = __fmul_rn(__fdiv_rn(x1[p], rd), norm[j]);
                x2[p] = __fmul_rn(__fdiv_rn(x2[p], rd), norm[j + half_d]);
            }
        }
    }
    const double ps = (double)pos[r];
#pragma unroll
    for (int p = 0; p < kMaxPairs; ++p) {
        const int j = lane + 32 * p;
        if (j >= half_d) break;
        double sd, cd;
        sincos(ps * inv_freq[j], &sd, &cd);
        const float c = (float)cd, sn = (float)sd;
        const float y1 = __fadd_rn(__fmul_rn(x1[p], c), __fmul_rn(-x2[p], sn));
        const float y2 = __fadd_rn(__fmul_rn(x2[p], c), __fmul_rn(x1[p], sn));
        dst[j] = __float2half_rn(y1);
        dst[j + half_d] = __float2half_rn(y2);
    }
}
