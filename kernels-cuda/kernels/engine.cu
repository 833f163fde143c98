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
//   Grid N, 256 threads; rows of up to 4096 values stay in registers (one load of a, x and
//   w, one store of x, the codes permuted through shared memory). Latency bound at decode
//   sizes: the rewrite that keeps the row in registers took the 7B batch-1 decode step from
//   2.38 to 2.29-2.33 ms on the H100.
// ---- engine_rmsnorm_{f32,bf16}: out[i] = rmsnorm(x[rows[i]]) * w (pre-norm, final norm) ------
//   Grid N, 256 threads, the row in registers (H <= 256 * 16), sum of squares reduced with
//   warp shuffles then across warps in shared memory; the formula of the CPU engine
//   (tritter::model::rms_norm_row): ms = sum(v^2) * f32(1 / H), r = sqrt(ms + eps),
//   o = v / r * w with IEEE division (no fast math: only the summation order differs from
//   the CPU's sequential sum). Memory bound, latency dominated at decode sizes.
//
// ---- engine_qkv_store_{int4,f16}: QK-Norm + RoPE + f16 conversion of the fused q/k/v -----
//   projection output, and the append of K and V to kv-int4's paged cache, in one launch.
//   in (N, (Hq + 2 Hkv) * D) f32 rows [q heads | k heads | v heads] -> q (N, Hq, D),
//   k (N, Hkv, D), v (N, Hkv, D) f16, q and k normalized (RMSNorm over D with q_norm / k_norm,
//   when given) and rotated (rotate-half RoPE at pos[r]), v converted; then each K and V head
//   (its f16 values, staged in shared memory) is stored into token r's pool slot slots[r]
//   by its warp, a lane per value (kv_int4_store.cuh: the bytes of kv-int4's kv_write_slots,
//   NaN/Inf groups stored as zeros and counted). One warp per head,
//   4 heads per 128-thread CTA, grid (N, ceil((Hq + 2 Hkv) / 4)). Lane l holds the pairs
//   (j, j + D/2) for j = l, l + 32, ...; the angle pos * inv_freq[j] is computed in double
//   precision (as the CPU reference does, then rounded to f32 once), so long contexts keep
//   their precision; each RoPE product is rounded before the sum, as in the reference.
//
// ---- engine_top_candidates: the k <= 64 best admitted ids of rows of (R, V) f32 logits, ----
//   best first in the sampler's order (tritter::generate::top_candidates: logit descending,
//   ties by the lower id; admitted = below the row's limit and, with text_only, <eos> or an
//   id >= first_text other than the latent markers bot / eot). A decode step then sends the
//   host k (id, logit) pairs per sequence instead of V logits (256 KB at V = 65536).
//   The order as a 64-bit key K = (order-preserving f32 bits << 32) | (0xffffffff - id),
//   distinct per id, so the top k are the k largest keys. Fast path, two passes over the row:
//   (1) each thread keeps the largest key of its slice (16-byte loads, two in flight), and
//   counts non-finite logits of the whole row (the host reports them as an error); the k-th
//   largest of those 512 maxima (a bitonic sort in shared memory) is a threshold T <= the
//   k-th largest key, since k distinct ids reach it; (2) the keys >= T (k plus a few on
//   real rows; at most 4k - 3 on a row of ties, where thread t's maximum is id 4t) are
//   collected into shared memory, and a rank sort
//   keeps the k largest in order. When more than kTopCap keys pass T (a row built against
//   the slicing), a radix select over K's bytes from the top (256-bin histograms per warp,
//   the bin chosen by a warp suffix scan, stopping as soon as the chosen bin holds exactly
//   the ids still needed) finds the exact k-th key instead. One CTA of 512 threads per row;
//   row r of params (int4: source row, k, limit, text_only). Bound: instruction issue of one
//   SM over the row, two passes of ~10 instructions per logit, read from L2 where the LM
//   head just wrote it. (v1, the radix select alone with one scalar load in flight per
//   thread, took 122 us per 65536-logit row on the H100: latency bound.)

#include "a8_mma.cuh"
#include "common.cuh"
#include "kv_int4_store.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kMaxVecs = 4;  // 16-byte vectors of 4 f32 per thread: rows up to 4096 in registers

using tritter::rms_denominator;
using tritter::warp_sum;

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

// The general path of engine_add_rmsnorm_a8 (rows longer than 4096 or not a multiple of 4):
// rmsnorm_row's update, then the A8 pass re-reads the row from memory.
__device__ __forceinline__ void add_rmsnorm_a8_slow(int row, float* __restrict__ xr, const float* __restrict__ ar,
                                                    const float* __restrict__ w, int h, float eps,
                                                    int8_t* __restrict__ codes, int* __restrict__ sums,
                                                    float* __restrict__ scales, unsigned* __restrict__ nonfinite,
                                                    int kp) {
    rmsnorm_row<float, true>(ar, w, h, eps, xr);
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
    bad = __syncthreads_or(bad) != 0;
    const float s = tritter::a8_scale(amax);
    if (threadIdx.x == 0) {
        scales[row] = bad ? __int_as_float(0x7fc00000) : s;
        nonfinite[row] = bad;
    }
    tritter::store_mma_row<kThreads>(codes, sums, row, h, kp, [&](int k) {
        return bad ? 0 : static_cast<int>(tritter::a8_round(xr[k], s));
    });
}

// One CTA per row. Rows of up to 4096 values (a multiple of 4) stay in registers from the
// first load to the last store: a, x and w are requested together (12 independent 16-byte
// loads per thread), the updated row is written once and quantized from registers, and the
// codes are permuted into the MMA k order through 4 KB of shared memory. At decode sizes
// (one row) the kernel is a chain of dependent latencies (one round trip to L2, three
// reductions, one store), so every re-read of the row from memory is a round trip saved.
extern "C" __global__ void __launch_bounds__(kThreads)
    engine_add_rmsnorm_a8(float* __restrict__ x, const float* __restrict__ a, const float* __restrict__ w, int h,
                          float eps, int8_t* __restrict__ codes, int* __restrict__ sums, float* __restrict__ scales,
                          unsigned* __restrict__ nonfinite, int kp) {
    constexpr int kRowMax = 4 * kThreads * kMaxVecs;
    tritter::pdl_wait();  // launched early after the o / down GEMV when the engine asks (PDL)
    tritter::pdl_launch_dependents();  // the next GEMV may issue its weight loads now
    const long long r = blockIdx.x;
    float* xr = x + r * h;
    if (!row_fits(h)) {
        add_rmsnorm_a8_slow((int)r, xr, a + r * h, w, h, eps, codes, sums, scales, nonfinite, kp);
        return;
    }
    RowRegs ra, rx, rw;
    const float sumsq = load_row(a + r * h, h, ra);
    load_row(xr, h, rx);
    load_row(w, h, rw);
    __shared__ float red[32];
    const float rd = rms_denominator(tritter::block_sum(sumsq, red), h, eps);
    float amax = 0.0f;
    unsigned bad = 0u;
#pragma unroll
    for (int j = 0; j < kMaxVecs; ++j) {
        const int i = 4 * (threadIdx.x + kThreads * j);
        if (i < h) {
            float* v = rx.v + 4 * j;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                // The residual update of rmsnorm_row, operation for operation.
                v[e] = __fadd_rn(v[e], __fmul_rn(__fdiv_rn(ra.v[4 * j + e], rd), rw.v[4 * j + e]));
                const float m = fabsf(v[e]);
                amax = fmaxf(amax, m);
                bad |= !(m <= 3.402823466e38f);  // NaN or Inf (fmaxf alone would drop a NaN)
            }
            *reinterpret_cast<float4*>(xr + i) = make_float4(v[0], v[1], v[2], v[3]);
        }
    }
    amax = tritter::block_max(amax, red);
    bad = __syncthreads_or(bad) != 0;
    const float s = tritter::a8_scale(amax);
    // Codes in natural k order (zeros past h, and for a non-finite row), then read back as
    // words of the MMA k order (a8_mma.cuh's store_mma_row).
    __shared__ uint32_t q_nat[kRowMax / 4];
#pragma unroll
    for (int j = 0; j < kMaxVecs; ++j) {
        const int i = 4 * (threadIdx.x + kThreads * j);
        unsigned word = 0u;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int q = 0;
            if (i + e < h && !bad) {
                q = (int)tritter::a8_round(rx.v[4 * j + e], s);
            }
            word |= ((unsigned)q & 0xffu) << (8 * e);
        }
        q_nat[threadIdx.x + kThreads * j] = word;
    }
    if (threadIdx.x == 0) {
        scales[r] = bad ? __int_as_float(0x7fc00000) : s;
        nonfinite[r] = bad;
    }
    __syncthreads();
    const int8_t* qb = reinterpret_cast<const int8_t*>(q_nat);
    tritter::store_mma_row<kThreads>(codes, sums, (int)r, h, kp, [&](int k) { return static_cast<int>(qb[k]); });
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

namespace {

constexpr int kQkvHeadsPerCta = 4;  // one warp per head

// QK-Norm + RoPE of one token's q/k/v projection row, and the append of its K and V to the
// paged cache (kv_int4_store.cuh's format: INT4 for kInt4, else f16) in the same launch.
template <bool kInt4>
__device__ __forceinline__ void qkv_store(const float* __restrict__ qkv, const int* __restrict__ pos,
                                          const float* __restrict__ q_norm, const float* __restrict__ k_norm,
                                          const double* __restrict__ inv_freq, int heads_q, int heads_kv,
                                          int head_dim, float eps, __half* __restrict__ q, __half* __restrict__ k,
                                          __half* __restrict__ v, uint8_t* __restrict__ pool,
                                          const int* __restrict__ slots, int page_shift, int num_pages,
                                          long long page_bytes, int layer, unsigned* __restrict__ nonfinite) {
    constexpr int kMaxD = 256;
    __shared__ __half staged[kQkvHeadsPerCta][kMaxD];  // this warp's K or V head as stored
    tritter::pdl_wait();  // launched early after the q/k/v GEMV when the engine asks (PDL)
    tritter::pdl_launch_dependents();  // decode attention may become resident (it waits first)
    const int r = blockIdx.x;
    const int warp = threadIdx.x / 32;
    const int head = blockIdx.y * kQkvHeadsPerCta + warp;
    const int lane = threadIdx.x % 32;
    const int heads = heads_q + 2 * heads_kv;
    if (head >= heads) return;
    const int half_d = head_dim / 2;
    const float* src = qkv + ((long long)r * heads + head) * head_dim;
    __half* st = staged[warp];
    if (head >= heads_q + heads_kv) {
        __half* dst = v + ((long long)r * heads_kv + (head - heads_q - heads_kv)) * head_dim;
        for (int i = lane; i < head_dim; i += 32) st[i] = dst[i] = __float2half_rn(src[i]);
    } else {
        const bool is_q = head < heads_q;
        const float* norm = is_q ? q_norm : k_norm;
        __half* dst = is_q ? q + ((long long)r * heads_q + head) * head_dim
                           : k + ((long long)r * heads_kv + (head - heads_q)) * head_dim;
        constexpr int kMaxPairs = kMaxD / 64;
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
            st[j] = dst[j] = __float2half_rn(y1);
            st[j + half_d] = dst[j + half_d] = __float2half_rn(y2);
        }
        if (is_q) return;
    }
    // The append: the stored head is read back lane per value, one group of 32 at a time.
    __syncwarp();
    const int kv = head >= heads_q + heads_kv;
    tritter::kv::store_head_warp<kInt4>(st, pool, slots[r], layer, kv, head - heads_q - kv * heads_kv, heads_kv,
                                        head_dim, page_shift, num_pages, page_bytes, nonfinite);
}

}  // namespace

#define ENGINE_QKV_STORE(NAME, INT4)                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * kQkvHeadsPerCta) NAME(                                     \
        const float* __restrict__ qkv, const int* __restrict__ pos, const float* __restrict__ q_norm,            \
        const float* __restrict__ k_norm, const double* __restrict__ inv_freq, int heads_q, int heads_kv,        \
        int head_dim, float eps, __half* __restrict__ q, __half* __restrict__ k, __half* __restrict__ v,         \
        uint8_t* __restrict__ pool, const int* __restrict__ slots, int page_shift, int num_pages,                \
        long long page_bytes, int layer, unsigned* __restrict__ nonfinite) {                                    \
        qkv_store<INT4>(qkv, pos, q_norm, k_norm, inv_freq, heads_q, heads_kv, head_dim, eps, q, k, v, pool,     \
                        slots, page_shift, num_pages, page_bytes, layer, nonfinite);                            \
    }
ENGINE_QKV_STORE(engine_qkv_store_int4, true)
ENGINE_QKV_STORE(engine_qkv_store_f16, false)

// ---- engine_top_candidates (header comment at the top of the file) -------------------------
namespace {

constexpr int kTopMax = 64;
constexpr int kTopThreads = 512;
constexpr int kTopWarps = kTopThreads / 32;
constexpr int kTopCap = 2 * kTopThreads;     // keys the fast path collects at most
constexpr int kTopStride = 4 + 2 * kTopMax;  // count, non-finite, first bad + bits, ids, logits

struct TopFilter {
    int limit;
    bool text_only;
    int eos, first_text, bot, eot;
    __device__ __forceinline__ bool admits(int i) const {
        return i < limit && (!text_only || i == eos || (i >= first_text && i != bot && i != eot));
    }
};

// The sampler's order as one integer: larger key = earlier candidate; never 0 for a logit.
__device__ __forceinline__ unsigned long long top_key(float x, int i) {
    const unsigned u = __float_as_uint(x);
    const unsigned o = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (static_cast<unsigned long long>(o) << 32) | (0xffffffffu - static_cast<unsigned>(i));
}

// f(i, row[i]) for i < end, each thread its share: 16-byte loads, two in flight, when the row
// is 16-byte aligned (the tail and unaligned rows element by element).
template <class F>
__device__ __forceinline__ void top_row_each(const float* __restrict__ row, int end, F&& f) {
    int scalar_from = 0;
    if ((reinterpret_cast<size_t>(row) & 15) == 0) {
        const float4* __restrict__ r4 = reinterpret_cast<const float4*>(row);
        const int n4 = end / 4;
        int q = threadIdx.x;
        for (; q + kTopThreads < n4; q += 2 * kTopThreads) {
            const float4 a = r4[q], b = r4[q + kTopThreads];
            const int i = 4 * q, j = 4 * (q + kTopThreads);
            f(i, a.x), f(i + 1, a.y), f(i + 2, a.z), f(i + 3, a.w);
            f(j, b.x), f(j + 1, b.y), f(j + 2, b.z), f(j + 3, b.w);
        }
        if (q < n4) {
            const float4 a = r4[q];
            const int i = 4 * q;
            f(i, a.x), f(i + 1, a.y), f(i + 2, a.z), f(i + 3, a.w);
        }
        scalar_from = 4 * n4;
    }
    for (int i = scalar_from + threadIdx.x; i < end; i += kTopThreads) f(i, row[i]);
}

// The exact `need`-th largest admitted key of the row (need >= 1 admitted ids exist): a radix
// select over the key's bytes from the top. Every thread of the CTA calls it.
__device__ unsigned long long top_radix_kth(const float* __restrict__ row, const TopFilter& f,
                                            int need_total, unsigned (*hist)[256]) {
    __shared__ unsigned long long s_prefix;
    __shared__ int s_bits, s_need, s_done;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    if (tid == 0) {
        s_prefix = 0;
        s_bits = 0;
        s_need = need_total;
        s_done = 0;
    }
    for (int pass = 0; pass < 8; ++pass) {
        for (int b = tid; b < kTopWarps * 256; b += kTopThreads) (&hist[0][0])[b] = 0;
        __syncthreads();
        const int bits = s_bits;
        const unsigned long long prefix = s_prefix;
        const int shift = 56 - 8 * pass;
        for (int i = tid; i < f.limit; i += kTopThreads) {
            const unsigned long long key = top_key(row[i], i);
            const bool counted = f.admits(i) && (bits == 0 || (key >> (64 - bits)) == prefix);
            const int b = counted ? static_cast<int>((key >> shift) & 255) : -1;
            // Lanes of one bin add once (the first pass puts most of a row in a few bins).
            const unsigned same = __match_any_sync(__activemask(), b);
            if (counted && lane == __ffs(same) - 1) atomicAdd(&hist[warp][b], __popc(same));
        }
        __syncthreads();
        if (warp == 0) {
            // Lane l owns bins 8l .. 8l + 7; suffix sums over lanes find the bin where the
            // count of larger keys reaches the ids still needed.
            unsigned bin[8], mine = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                unsigned c = 0;
                for (int w = 0; w < kTopWarps; ++w) c += hist[w][8 * lane + j];
                bin[j] = c;
                mine += c;
            }
            unsigned above = mine;  // inclusive suffix sum: bins of lanes >= this one
#pragma unroll
            for (int o = 1; o < 32; o *= 2) {
                const unsigned t = __shfl_down_sync(0xffffffffu, above, o);
                if (lane + o < 32) above += t;
            }
            const unsigned need = static_cast<unsigned>(s_need);
            const unsigned larger = above - mine;  // keys in the bins of higher lanes
            __syncwarp();  // every lane has read s_need before one of them rewrites it
            if (larger < need && above >= need) {
                unsigned acc = larger;
                int d = 7;
                while (acc + bin[d] < need) acc += bin[d--];
                const int left = static_cast<int>(need - acc);
                s_need = left;
                s_prefix = (prefix << 8) | static_cast<unsigned>(8 * lane + d);
                s_bits = bits + 8;
                s_done = bin[d] == static_cast<unsigned>(left);
            }
        }
        __syncthreads();
        if (s_done) break;
    }
    // The keys >= the result are the need_total largest: the chosen bin is taken whole.
    return s_prefix << (64 - s_bits);
}

}  // namespace

// out: (R, kTopStride) u32 per row: [0] candidates found, [1] non-finite logits in the row,
// [2] index of the first non-finite one (0xffffffff if none), [3] its bits, [4, 4 + 64) ids
// best first, [68, 132) their logits' bits.
extern "C" __global__ void __launch_bounds__(kTopThreads) engine_top_candidates(
    const float* __restrict__ logits, int v, const int4* __restrict__ params, int eos,
    int first_text, int bot, int eot, unsigned* __restrict__ out) {
    __shared__ unsigned hist[kTopWarps][256];
    __shared__ unsigned long long maxima[kTopThreads];
    __shared__ unsigned long long cand[kTopCap];
    __shared__ unsigned s_admitted, s_nonfinite, s_first_bad, s_count;
    const int4 p = params[blockIdx.x];
    const float* __restrict__ row = logits + static_cast<size_t>(p.x) * v;
    const TopFilter f{p.z < v ? p.z : v, p.w != 0, eos, first_text, bot, eot};
    const int tid = threadIdx.x, lane = tid % 32;
    if (tid == 0) {
        s_admitted = 0;
        s_nonfinite = 0;
        s_first_bad = 0xffffffffu;
        s_count = 0;
    }
    __syncthreads();

    // (1) Per-thread largest key, admitted count, non-finite logits.
    unsigned long long best = 0;
    unsigned admitted = 0, bad = 0, first_bad = 0xffffffffu;
    top_row_each(row, v, [&](int i, float x) {
        if (!isfinite(x)) {
            ++bad;
            first_bad = min(first_bad, static_cast<unsigned>(i));
        }
        if (f.admits(i)) {
            ++admitted;
            const unsigned long long key = top_key(x, i);
            best = key > best ? key : best;
        }
    });
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
        admitted += __shfl_xor_sync(0xffffffffu, admitted, o);
        bad += __shfl_xor_sync(0xffffffffu, bad, o);
        first_bad = min(first_bad, __shfl_xor_sync(0xffffffffu, first_bad, o));
    }
    if (lane == 0) {
        atomicAdd(&s_admitted, admitted);
        atomicAdd(&s_nonfinite, bad);
        atomicMin(&s_first_bad, first_bad);
    }
    maxima[tid] = best;
    __syncthreads();
    // Bitonic sort of the maxima, descending.
    for (int size = 2; size <= kTopThreads; size *= 2) {
        for (int stride = size / 2; stride > 0; stride /= 2) {
            const int j = tid ^ stride;
            if (j > tid) {
                const unsigned long long a = maxima[tid], b = maxima[j];
                if ((a < b) == ((tid & size) == 0)) {
                    maxima[tid] = b;
                    maxima[j] = a;
                }
            }
            __syncthreads();
        }
    }
    const int k = min(p.y, static_cast<int>(s_admitted));
    unsigned* o = out + static_cast<size_t>(blockIdx.x) * kTopStride;
    if (tid == 0) {
        o[0] = static_cast<unsigned>(k);
        o[1] = s_nonfinite;
        o[2] = s_first_bad;
        o[3] = s_first_bad < static_cast<unsigned>(v) ? __float_as_uint(row[s_first_bad]) : 0u;
    }
    if (k <= 0) return;
    // T: the k-th largest maximum (1 = every admitted key when fewer threads hold one).
    unsigned long long t = maxima[k - 1] > 0 ? maxima[k - 1] : 1ull;

    // (2) Keys >= T into shared memory; too many: the exact k-th key by radix select.
    for (int attempt = 0; attempt < 2; ++attempt) {
        top_row_each(row, f.limit, [&](int i, float x) {
            if (!f.admits(i)) return;
            const unsigned long long key = top_key(x, i);
            if (key >= t) {
                const unsigned slot = atomicAdd(&s_count, 1u);
                if (slot < kTopCap) cand[slot] = key;
            }
        });
        __syncthreads();
        if (s_count <= kTopCap) break;
        __syncthreads();  // every thread has read s_count
        if (tid == 0) s_count = 0;
        t = top_radix_kth(row, f, k, hist);  // syncs before its first read of s_count's reset
    }
    const int n = static_cast<int>(min(s_count, static_cast<unsigned>(kTopCap)));
    // Rank sort: a key's rank is the number of larger keys; the k smallest ranks are kept.
    for (int c = tid; c < n; c += kTopThreads) {
        const unsigned long long key = cand[c];
        int rank = 0;
        for (int j = 0; j < n; ++j) rank += cand[j] > key;
        if (rank < k) {
            const unsigned id = 0xffffffffu - static_cast<unsigned>(key & 0xffffffffu);
            o[4 + rank] = id;
            o[4 + kTopMax + rank] = __float_as_uint(row[id]);
        }
    }
}
