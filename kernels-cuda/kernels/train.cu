// The small kernels of the Tritter GPU training engine (crates/tritter/src/train/gpu.rs, llm.c
// style): everything of a training step that is not a ternary GEMM (ternary-gemm), attention
// (flash-attn-sm120) or a dense product (cuBLAS). Activations are f32 rows `(T, C)` (T tokens
// of the micro-batch), the gradients of dense products bf16 (cuBLAS and the transposed
// ternary GEMM take bf16), parameters, gradients and AdamW moments f32.
//
// All row kernels: one CTA of 256 threads per row (grid = rows), columns strided by 256,
// sums reduced with warp shuffles and shared memory. They are memory bound (each reads its
// row once or twice and writes it once); a training step spends >90% of its time in the
// GEMMs and attention, so these favour clarity over fusion for now.
//
// ---- train_embed / train_embed_bwd: x[r] = table[ids[r]] (zeros for <pad> = 0, as the
//   reference's keep mask); dtable[ids[r]] += dx[r] with f32 atomics (pad rows skipped).
// ---- train_norm_fwd: out[r] = res[r] + a[r] / rd * w (res may be null: a plain RMSNorm),
//   rd = sqrt(sum(a^2) * f32(1/C) + eps) saved per row for the backward pass (the formula of
//   tritter::model::rms_norm_row; IEEE division, no fast math).
// ---- train_norm_bwd[_bf16]: da = w dy / rd - a * sum(w dy a) / (C rd^3); dw += dy a / rd over
//   the CTA's `rows_per_cta` rows in registers (C <= 256 * 16), then one f32 atomicAdd per
//   column. da in f32 (the residual stream's gradient) or bf16 (a branch gradient, which only
//   feeds the dense products).
// ---- train_a8_deq_{f32,bf16}: the BitNet A8 fake quantization as bf16,
//   q / s with q = clamp(round(x s), -128, 127), s = 127 / max(max|x|, 1e-5): the activation
//   operand of a BitLinear weight gradient dW = dY^T deq(A8(x)) (straight-through estimator)
//   and, on the cuBLAS forward path, of the forward product. A row holding NaN/Inf becomes
//   all NaN (never quantized to finite codes), so the loss and gradients report it.
// ---- train_split_qkv / train_merge_qkv: the fused q/k/v projection's f32 output rows
//   [q | k | v] -> raw bf16 q (T, Hq D), k, v (T, Hkv D); and the bf16 gradients back to rows.
// ---- train_glu_a8: the MLP's middle in one pass over the gate/up GEMM output [g | u]
//   (T, 2I) f32: h = relu(g)^2 * u, then the A8 of h straight into ternary-gemm's GEMV layout
//   (codes in MMA k order, row sum, scale s = 127 / max(max|h|, 1e-5), non-finite flag: the
//   down GEMM's input), and the two copies the backward pass needs, saved as bf16: [g | u]
//   and deq(A8(h)) = q / s (the down projection's weight-gradient operand). Two passes over
//   the row (max|h|, then codes), the second from L1/L2.
// ---- train_glu_deq: the same middle for the cuBLAS forward, whose gate/up product is
//   written straight as bf16 [g | u] (T, 2I) (the backward's saved copy): h = relu(g)^2 * u in
//   f32, and deq(A8(h)) as bf16, the down product's operand (NaN rows as above).
// ---- train_glu_bwd: dg = 2 relu(g) u dh, du = relu(g)^2 dh from the saved bf16 [g | u] and
//   f32 dh, as bf16 (the operand of the gate/up weight gradient and transposed GEMM).
// ---- train_ce: fused softmax cross-entropy of one bf16 logits chunk (rows, V), in place
//   (llm.c's fused classifier): the row's loss mask[r] * scale * (logsumexp - logit[target])
//   summed into an f64, and dlogits = mask[r] * scale * (softmax - onehot) written as bf16
//   over the logits (scale = 1 / targets of the step); max, sum and exponentials in f32.
//   One CTA of 512 threads per row. A row of V <= 512 * 16 * 8 = 65536 logits (V % 8 == 0)
//   is held in registers (16 16-byte loads per thread), so HBM sees one read and one write
//   per logit: against f32 logits read twice and a separate bf16 gradient, 40% of the
//   traffic (4 bytes per logit instead of 10); with the gradient in place the chunk takes 2
//   bytes per logit instead of 6 (3x the rows per chunk, so the LM-head gradient,
//   accumulated in f32 once per chunk, is read and written 3x less often).
//   Wider or odd rows take two passes over global memory.
// ---- train_sq_sum / train_clip_scale / train_adamw: global gradient norm (f64 sum of
//   squares), the clip factor min(1, max_norm / (norm + 1e-6)) kept on the device (no host
//   synchronisation inside a step), and AdamW with decoupled weight decay in the reference's
//   operation order (crates/tritter/src/train/optim.rs).

#include <cuda_bf16.h>

#include "a8_mma.cuh"
#include "common.cuh"

#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int kMaxCols = 16;  // columns per thread held in registers by train_norm_bwd
constexpr unsigned kFull = 0xffffffffu;

// Sum / max over the CTA with the shared scratch of tritter::block_sum / block_max.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float red[32];
    return tritter::block_sum(v, red);
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float red[32];
    return tritter::block_max(v, red);
}

__device__ __forceinline__ double block_sum_f64(double v) {
    __shared__ double part[kThreads / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    __syncthreads();
    if (l == 0) part[w] = v;
    __syncthreads();
    double t = l < kThreads / 32 ? part[l] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(kFull, t, o);
    return t;
}

using tritter::rms_denominator;

__device__ __forceinline__ float load_f(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }
using tritter::to_out;

// deq(A8(v)) of one row of `cols` values v(c) into y (bf16): the row's max|v| (a NaN or Inf
// anywhere makes the whole row NaN), then q / s with q = clamp(round(v s), -128, 127).
template <typename ValueOf>
__device__ __forceinline__ void a8_deq_values(ValueOf value_of, __nv_bfloat16* __restrict__ y, int cols) {
    float amax = 0.0f;
    bool bad = false;
    for (int c = threadIdx.x; c < cols; c += kThreads) {
        const float a = fabsf(value_of(c));
        amax = fmaxf(amax, a);
        bad |= !(a <= 3.402823466e38f);
    }
    amax = block_max(amax);
    bad = __syncthreads_or(bad);
    const float s = tritter::a8_scale(amax);
    for (int c = threadIdx.x; c < cols; c += kThreads) {
        const float q = tritter::a8_round(value_of(c), s);
        y[c] = __float2bfloat16_rn(bad ? __int_as_float(0x7fc00000) : __fdiv_rn(q, s));
    }
}

template <typename T>
__device__ __forceinline__ void a8_deq_row(const T* __restrict__ x, __nv_bfloat16* __restrict__ y, int cols) {
    const long long base = (long long)blockIdx.x * cols;
    a8_deq_values([&](int c) { return load_f(x, base + c); }, y + base, cols);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
    train_embed(const unsigned* __restrict__ ids, const float* __restrict__ table, float* __restrict__ x, int h) {
    const unsigned id = ids[blockIdx.x];
    const long long r = (long long)blockIdx.x * h;
    for (int c = threadIdx.x; c < h; c += kThreads) x[r + c] = id == 0 ? 0.0f : table[(long long)id * h + c];
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_embed_bwd(const unsigned* __restrict__ ids, const float* __restrict__ dx, float* __restrict__ dtable, int h) {
    const unsigned id = ids[blockIdx.x];
    if (id == 0) return;
    const long long r = (long long)blockIdx.x * h;
    for (int c = threadIdx.x; c < h; c += kThreads) atomicAdd(dtable + (long long)id * h + c, dx[r + c]);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_norm_fwd(const float* __restrict__ res, const float* __restrict__ a, const float* __restrict__ w,
                   float* __restrict__ out, float* __restrict__ rd_out, int cols, float eps) {
    const long long base = (long long)blockIdx.x * cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += kThreads) s += a[base + c] * a[base + c];
    const float rd = rms_denominator(block_sum(s), cols, eps);
    for (int c = threadIdx.x; c < cols; c += kThreads) {
        const float y = __fmul_rn(__fdiv_rn(a[base + c], rd), w[c]);
        out[base + c] = res ? __fadd_rn(res[base + c], y) : y;
    }
    if (threadIdx.x == 0) rd_out[blockIdx.x] = rd;
}

template <typename OutT>
__device__ __forceinline__ void norm_bwd_rows(const float* __restrict__ a, const float* __restrict__ w,
                                              const float* __restrict__ rd, const float* __restrict__ dy,
                                              OutT* __restrict__ da, float* __restrict__ dw, int rows, int cols,
                                              int rows_per_cta) {
    float acc[kMaxCols];
#pragma unroll
    for (int j = 0; j < kMaxCols; ++j) acc[j] = 0.0f;
    const int r0 = blockIdx.x * rows_per_cta;
    const int r1 = min(rows, r0 + rows_per_cta);
    const float inv_c = 1.0f / (float)cols;
    for (int r = r0; r < r1; ++r) {
        const long long base = (long long)r * cols;
        const float d = rd[r];
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxCols; ++j) {
            const int c = threadIdx.x + kThreads * j;
            if (c < cols) s += w[c] * dy[base + c] * a[base + c];
        }
        s = block_sum(s);
        const float k = s * inv_c / (d * d * d);
#pragma unroll
        for (int j = 0; j < kMaxCols; ++j) {
            const int c = threadIdx.x + kThreads * j;
            if (c < cols) {
                const float av = a[base + c], g = dy[base + c];
                da[base + c] = to_out<OutT>(w[c] * g / d - av * k);
                acc[j] += g * av / d;
            }
        }
    }
#pragma unroll
    for (int j = 0; j < kMaxCols; ++j) {
        const int c = threadIdx.x + kThreads * j;
        if (c < cols && r0 < r1) atomicAdd(dw + c, acc[j]);
    }
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_norm_bwd(const float* __restrict__ a, const float* __restrict__ w, const float* __restrict__ rd,
                   const float* __restrict__ dy, float* __restrict__ da, float* __restrict__ dw, int rows, int cols,
                   int rows_per_cta) {
    norm_bwd_rows(a, w, rd, dy, da, dw, rows, cols, rows_per_cta);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_norm_bwd_bf16(const float* __restrict__ a, const float* __restrict__ w, const float* __restrict__ rd,
                        const float* __restrict__ dy, __nv_bfloat16* __restrict__ da, float* __restrict__ dw,
                        int rows, int cols, int rows_per_cta) {
    norm_bwd_rows(a, w, rd, dy, da, dw, rows, cols, rows_per_cta);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_a8_deq_f32(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, int cols) {
    a8_deq_row(x, y, cols);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_a8_deq_bf16(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ y, int cols) {
    a8_deq_row(x, y, cols);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_to_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, long long n) {
    for (long long i = (long long)blockIdx.x * kThreads + threadIdx.x; i < n; i += (long long)gridDim.x * kThreads)
        y[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_add(float* __restrict__ y, const float* __restrict__ x, long long n) {
    for (long long i = (long long)blockIdx.x * kThreads + threadIdx.x; i < n; i += (long long)gridDim.x * kThreads)
        y[i] += x[i];
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_split_qkv(const float* __restrict__ y, __nv_bfloat16* __restrict__ q, __nv_bfloat16* __restrict__ k,
                    __nv_bfloat16* __restrict__ v, int nq, int nkv) {
    const long long r = blockIdx.x, w = nq + 2 * nkv;
    for (int c = threadIdx.x; c < w; c += kThreads) {
        const __nv_bfloat16 b = __float2bfloat16_rn(y[r * w + c]);
        if (c < nq)
            q[r * nq + c] = b;
        else if (c < nq + nkv)
            k[r * nkv + c - nq] = b;
        else
            v[r * nkv + c - nq - nkv] = b;
    }
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_merge_qkv(const __nv_bfloat16* __restrict__ dq, const __nv_bfloat16* __restrict__ dk,
                    const __nv_bfloat16* __restrict__ dv, __nv_bfloat16* __restrict__ out, int nq, int nkv) {
    const long long r = blockIdx.x, w = nq + 2 * nkv;
    for (int c = threadIdx.x; c < w; c += kThreads) {
        out[r * w + c] = c < nq ? dq[r * nq + c] : c < nq + nkv ? dk[r * nkv + c - nq] : dv[r * nkv + c - nq - nkv];
    }
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_glu_a8(const float* __restrict__ gu, __nv_bfloat16* __restrict__ gu_save, __nv_bfloat16* __restrict__ deq,
                 int8_t* __restrict__ codes_mma, int* __restrict__ sums, float* __restrict__ scales,
                 unsigned* __restrict__ nonfinite_flags, int inter, int cols_pad) {
    const long long r = blockIdx.x;
    const float* row = gu + r * 2 * inter;
    float amax = 0.0f;
    unsigned bad = 0;
    for (int c = threadIdx.x; c < inter; c += kThreads) {
        const float g = row[c], u = row[inter + c];
        gu_save[r * 2 * inter + c] = __float2bfloat16_rn(g);
        gu_save[r * 2 * inter + inter + c] = __float2bfloat16_rn(u);
        const float rg = fmaxf(g, 0.0f);
        const float a = fabsf(rg * rg * u);
        amax = fmaxf(amax, a);
        bad |= !(a <= 3.402823466e38f);
    }
    amax = block_max(amax);
    __shared__ unsigned any_bad;
    if (threadIdx.x == 0) any_bad = 0;
    __syncthreads();
    if (bad) atomicOr(&any_bad, 1u);
    __syncthreads();
    bad = any_bad;
    if (threadIdx.x == 0) {
        nonfinite_flags[r] = bad ? 1u : 0u;
        scales[r] = bad ? __int_as_float(0x7fc00000) : tritter::a8_scale(amax);
    }
    const float s = tritter::a8_scale(amax);
    __nv_bfloat16* dq = deq + r * inter;
    tritter::store_mma_row<kThreads>(codes_mma, sums, (int)r, inter, cols_pad, [&](int k) {
        const float rg = fmaxf(row[k], 0.0f);
        const float h = rg * rg * row[inter + k];
        const float q = bad ? 0.0f : tritter::a8_round(h, s);
        dq[k] = __float2bfloat16_rn(bad ? __int_as_float(0x7fc00000) : __fdiv_rn(q, s));
        return (int)q;
    });
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_glu_deq(const __nv_bfloat16* __restrict__ gu, __nv_bfloat16* __restrict__ deq, int inter) {
    const long long r = blockIdx.x;
    const __nv_bfloat16* row = gu + r * 2 * inter;
    a8_deq_values(
        [&](int c) {
            const float rg = fmaxf(__bfloat162float(row[c]), 0.0f);
            return rg * rg * __bfloat162float(row[inter + c]);
        },
        deq + r * inter, inter);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_glu_bwd(const __nv_bfloat16* __restrict__ gu, const float* __restrict__ dh, __nv_bfloat16* __restrict__ dgu,
                  int inter) {
    const long long r = blockIdx.x;
    for (int c = threadIdx.x; c < inter; c += kThreads) {
        const float g = fmaxf(__bfloat162float(gu[r * 2 * inter + c]), 0.0f);
        const float u = __bfloat162float(gu[r * 2 * inter + inter + c]);
        const float d = dh[r * inter + c];
        dgu[r * 2 * inter + c] = __float2bfloat16_rn(2.0f * g * u * d);
        dgu[r * 2 * inter + inter + c] = __float2bfloat16_rn(g * g * d);
    }
}

constexpr int kCeThreads = 512;
constexpr int kCeChunks = 16;  // 16-byte chunks (8 logits) per thread held in registers

// exp(x - mx) for the sum and the gradient; a -inf logit gives 0, a NaN stays NaN.
__device__ __forceinline__ float ce_exp(float x, float mx) { return expf(x - mx); }

extern "C" __global__ void __launch_bounds__(kCeThreads)
    train_ce(__nv_bfloat16* logits, const unsigned* __restrict__ targets, const float* __restrict__ mask,
             double* __restrict__ loss, int vocab, float scale) {
    __nv_bfloat16* row = logits + (long long)blockIdx.x * vocab;
    const float m = mask[blockIdx.x];
    const unsigned t = targets[blockIdx.x];
    // The target's logit is read before the block reductions below: every write of the
    // gradient over the row comes after their barriers.
    const float x_t = __bfloat162float(row[t]);
    const float gt = m * scale;
    float mx, se;
    if (vocab % 8 == 0 && vocab <= kCeThreads * kCeChunks * 8) {
        // The row in registers: one HBM read and one write per logit. fmaxf skips a NaN, the
        // sum of exponentials then carries it into the loss.
        const int chunks = vocab / 8;
        uint4* row8 = reinterpret_cast<uint4*>(row);
        uint4 v[kCeChunks];
        float mt = -3.402823466e38f;
#pragma unroll
        for (int j = 0; j < kCeChunks; ++j) {
            const int c = threadIdx.x + j * kCeThreads;
            v[j] = c < chunks ? row8[c] : make_uint4(0u, 0u, 0u, 0u);
            if (c < chunks) {
                const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v[j]);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const float2 f = __bfloat1622float2(h[q]);
                    mt = fmaxf(mt, fmaxf(f.x, f.y));
                }
            }
        }
        mx = block_max(mt);
        float st = 0.0f;
#pragma unroll
        for (int j = 0; j < kCeChunks; ++j) {
            if (threadIdx.x + j * kCeThreads < chunks) {
                const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v[j]);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const float2 f = __bfloat1622float2(h[q]);
                    st += ce_exp(f.x, mx) + ce_exp(f.y, mx);
                }
            }
        }
        se = block_sum(st);
        const float k = gt / se;
#pragma unroll
        for (int j = 0; j < kCeChunks; ++j) {
            const int c = threadIdx.x + j * kCeThreads;
            if (c < chunks) {
                const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v[j]);
                uint4 out;
                __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const float2 f = __bfloat1622float2(h[q]);
                    const unsigned i0 = (unsigned)(c * 8 + 2 * q);
                    float p0 = ce_exp(f.x, mx) * k, p1 = ce_exp(f.y, mx) * k;
                    if (i0 == t) p0 -= gt;
                    if (i0 + 1 == t) p1 -= gt;
                    o[q] = __floats2bfloat162_rn(p0, p1);
                }
                row8[c] = out;
            }
        }
    } else {
        // Wider or odd rows: max and sum in one online pass over global memory, then the
        // gradient (each thread rewrites only the logits it reads).
        float mt = -3.402823466e38f, st = 0.0f;
        for (int c = threadIdx.x; c < vocab; c += kCeThreads) {
            const float x = __bfloat162float(row[c]);
            if (x > mt) {
                st = fmaf(st, expf(mt - x), 1.0f);
                mt = x;
            } else {
                st += expf(x - mt);
            }
        }
        mx = block_max(mt);
        se = block_sum(st * expf(mt - mx));
        const float k = gt / se;
        for (int c = threadIdx.x; c < vocab; c += kCeThreads) {
            const float p = ce_exp(__bfloat162float(row[c]), mx) * k;
            row[c] = __float2bfloat16_rn((unsigned)c == t ? p - gt : p);
        }
    }
    if (threadIdx.x == 0 && m != 0.0f) {
        const double lse = (double)mx + log((double)se);
        atomicAdd(loss, (double)m * (double)scale * (lse - (double)x_t));
    }
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_sq_sum(const float* __restrict__ g, long long n, double* __restrict__ acc) {
    double s = 0.0;
    for (long long i = (long long)blockIdx.x * kThreads + threadIdx.x; i < n; i += (long long)gridDim.x * kThreads)
        s += (double)g[i] * (double)g[i];
    s = block_sum_f64(s);
    if (threadIdx.x == 0) atomicAdd(acc, s);
}

// out[0] = clip factor applied to the gradients, out[1] = the norm before clipping.
extern "C" __global__ void train_clip_scale(const double* __restrict__ sq, float max_norm, float* __restrict__ out) {
    const double norm = sqrt(*sq);
    out[0] = (max_norm > 0.0f && norm > (double)max_norm) ? (float)((double)max_norm / (norm + 1e-6)) : 1.0f;
    out[1] = (float)norm;
}

extern "C" __global__ void __launch_bounds__(kThreads)
    train_adamw(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                long long n, float lr, float b1, float b2, float eps, float decay, float bc1, float bc2,
                const float* __restrict__ clip) {
    if (!isfinite(clip[1])) return;  // non-finite gradients: keep the last good parameters
    const float cs = clip[0];
    const float ob1 = 1.0f - b1, ob2 = 1.0f - b2;
    for (long long i = (long long)blockIdx.x * kThreads + threadIdx.x; i < n; i += (long long)gridDim.x * kThreads) {
        const float gi = cs == 1.0f ? g[i] : g[i] * cs;
        const float mi = m[i] * b1 + gi * ob1;
        const float vi = v[i] * b2 + (gi * gi) * ob2;
        m[i] = mi;
        v[i] = vi;
        const float upd = (mi / bc1) / (sqrtf(vi / bc2) + eps);
        p[i] = p[i] * decay - upd * lr;
    }
}
