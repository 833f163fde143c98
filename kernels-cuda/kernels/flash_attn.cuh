// Shared pieces of the FlashAttention kernels (flash_fwd.cu, flash_bwd.cu, qk_norm_rope.cu):
// the parameter block, the mask rule, the tile ranges a mask leaves, the swizzled shared
// memory layout, and the QK-Norm + RoPE row transform.
//
// Semantics (crates/flash-attn-sm120/src/params.rs is the contract):
// * q (total_q, Hq, D), k/v (total_k, Hkv, D), o like q; logsumexp (B, Hq, Lq) for fixed
//   batches, (Hq, total_q) for varlen (cu_q != nullptr).
// * query row i of a sequence with lq queries and lk keys sits at position i + lk - lq.
// * key j visible to aligned position i iff j < lk and mode (causal j <= i; prefix-LM
//   j <= i || j < prefix; bidirectional) and window (|i - j| < W || j < sinks) and
//   documents (doc[i] == doc[j]).
#pragma once
#include <climits>

#include "common.cuh"
#include "warp_mma.cuh"

namespace tritter {
namespace flash {

enum MaskMode : int { kCausal = 0, kBidirectional = 1, kPrefixLm = 2 };

// Passed by value; mirrors `FlashParams` in crates/flash-attn-sm120/src/cuda.rs field by field.
struct Params {
    const void* q;           // (total_q, Hq, D) T
    const void* k;           // (total_k, Hkv, D) T
    const void* v;           // (total_k, Hkv, D) T
    void* o;                 // (total_q, Hq, D) T
    float* lse;              // (B, Hq, Lq) or (Hq, total_q), natural log
    const int* cu_q;         // (B + 1) or nullptr (fixed lengths lq, lk)
    const int* cu_k;         // (B + 1) or nullptr
    const int* prefix_lens;  // (B) for kPrefixLm, else nullptr
    const int* doc_ids;      // (total_k) non-decreasing per sequence, or nullptr
    const void* q_norm;      // (D) T, prologue only
    const void* k_norm;      // (D) T, prologue only
    const float2* rope;      // (max_pos, D/2) (cos, sin), prologue only
    const int* pos_q;        // (total_q) or nullptr: aligned position
    const int* pos_k;        // (total_k) or nullptr: index within the sequence
    // backward only
    const void* dout;        // like o
    void* dq;                // like q (T), or f32 accumulator (total_q, Hq, D) when dq_accum
    void* dk;                // like k
    void* dv;                // like v
    float* dq_accum;         // (total_q, Hq, D) f32
    float* delta;            // like lse: rowsum(dO * O)
    int batch, hq, hkv, lq, lk;
    int total_q;
    int mode, window, sinks;
    int max_pos;
    float scale;       // softmax scale
    float scale_log2;  // scale * log2(e)
    float eps;         // QK-Norm epsilon
    int pair_tiles;    // 1: each CTA runs a pair of tiles (for_tiles), grid.x halved
};

// The tiles (query blocks of the forward and of the deterministic dQ pass; the backward's
// main kernel pairs its key blocks the same way in its own _pair builds, flash_bwd.cu) that
// the CTA at blockIdx.x of a (tiles, heads, batch) grid runs, each through `body(tile)`;
// `tiles` is its sequence's count, `heavy_high` says whether the costly tiles of a causal
// mask are the high ones (query blocks: tile i sees ~i + 1 key blocks) or the low ones.
// * Unpaired: one tile, the heavy end first in launch order.
// * Paired (p.pair_tiles; the host sets it for causal and prefix-LM masks without a window
//   when the halved grid still fills the GPU twice): tiles j and tiles - 1 - j, so every CTA
//   costs ~tiles + 1 blocks. With one tile per CTA the costs run from tiles down to 1 and the
//   CTAs of the last heads and sequences, heavy ones among them, start when the GPU is
//   nearly done: a tail in which most SMs idle (causal L = 2K, 8 x 16 heads: the makespan
//   of the forward ~1.25x its average load). Pairs keep each CTA on one head, so the K/V
//   (or Q/dO) reuse in L2 across the CTAs of a head is unchanged.
template <typename Body>
__device__ __forceinline__ void for_tiles(const Params& p, int tiles, bool heavy_high, Body&& body) {
    const int j = static_cast<int>(blockIdx.x);
    int first, second = -1;
    if (p.pair_tiles) {
        const int hi = tiles - 1 - j;
        if (hi < j) return;
        first = heavy_high ? hi : j;
        if (hi > j) second = heavy_high ? j : hi;
    } else {
        first = heavy_high ? static_cast<int>(gridDim.x) - 1 - j : j;
    }
    // One call site, so the (large, inlined) body is emitted once.
#pragma unroll 1
    for (int i = 0; i < (second >= 0 ? 2 : 1); ++i) {
        if (i > 0) __syncthreads();  // the first tile's epilogue is done with shared memory
        body(i == 0 ? first : second);
    }
}

// Row-major tile of `kD` 16-bit elements per row in shared memory with 16-byte chunks
// XOR-swizzled by the row's low 3 bits: ldmatrix and cp.async of 8 consecutive rows at the
// same logical chunk then touch 8 distinct bank groups (conflict-free).
template <int kD>
__device__ __forceinline__ int swz(int row, int col) {
    return row * kD + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// 2^x on the SFU (ex2.approx, 2 ulp): the softmax exponent.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// One sequence's extent and the per-sequence mask inputs.
struct Seq {
    int q0, lq, k0, lk;  // first query token, queries, first key token, keys
    int shift;           // lk - lq: aligned position = row + shift
    int prefix;          // prefix length (kPrefixLm) else 0
};

__device__ __forceinline__ Seq load_seq(const Params& p, int b) {
    Seq s;
    if (p.cu_q != nullptr) {
        s.q0 = p.cu_q[b];
        s.lq = p.cu_q[b + 1] - s.q0;
        s.k0 = p.cu_k[b];
        s.lk = p.cu_k[b + 1] - s.k0;
    } else {
        s.q0 = b * p.lq;
        s.lq = p.lq;
        s.k0 = b * p.lk;
        s.lk = p.lk;
    }
    s.shift = s.lk - s.lq;
    s.prefix = (p.mode == kPrefixLm && p.prefix_lens != nullptr) ? p.prefix_lens[b] : 0;
    return s;
}

// Mask rule without documents, for aligned query position i and key j (both in-sequence).
__device__ __forceinline__ bool visible_nodoc(const Params& p, const Seq& s, int i, int j) {
    if (j >= s.lk) return false;
    bool ok = p.mode == kBidirectional || j <= i || (p.mode == kPrefixLm && j < s.prefix);
    if (p.window > 0) ok = ok && (abs(i - j) < p.window || j < p.sinks);
    return ok;
}

// The same rule reduced to bounds once per query row i, so that the per-element test is four
// compares and no branches (mask_tile: the forward at D = 128, the backward at D = 64): key j
// is visible iff
//   j < lk  and  the mode allows it (causal: j <= i; prefix-LM: j <= i or j < prefix)
//   and, with a window W, |i - j| < W or j < sinks.
struct RowVis {
    int hi;        // keys j >= hi are masked: min(lk, mode bound)
    int wlo, whi;  // window: visible only for wlo <= j < whi ...
    int sinks;     // ... or j < sinks (0 without a window)
    __device__ __forceinline__ bool operator()(int j) const { return j < hi && ((j >= wlo && j < whi) || j < sinks); }
};

__device__ __forceinline__ RowVis row_vis(const Params& p, const Seq& s, int i) {
    RowVis r{s.lk, INT_MIN, INT_MAX, 0};
    if (p.mode == kCausal) r.hi = min(r.hi, i + 1);
    if (p.mode == kPrefixLm) r.hi = min(r.hi, max(i + 1, s.prefix));
    if (p.window > 0) {
        r.wlo = i - p.window + 1;
        r.whi = i + p.window;
        r.sinks = p.sinks;
    }
    return r;
}

// Sets the masked scores of one m16 row tile to -inf (the kernels' partially visible tiles):
// the thread's rows are tile rows r0 and r0 + 8 (accumulator halves; aligned positions
// r0 + s.shift, ...), its keys n0 + j_lo + nt * 8 + 2 * t4 + e (nt < kNT, e < 2), `sDoc` the
// key tile's doc ids, `q_doc` its two rows' doc ids (read only when p.doc_ids is set).
// kRowBounds picks RowVis over visible_nodoc: the same rule; which form lets ptxas allocate
// a kernel's registers better depends on the kernel and head dim (measured per kernel).
template <bool kRowBounds, int kNT>
__device__ __forceinline__ void mask_tile(float (&sc)[kNT][4], const Params& p, const Seq& s, int r0, int n0, int j_lo,
                                          int t4, const int* sDoc, const int (&q_doc)[2]) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int i = r0 + 8 * hf + s.shift;
        const RowVis vis_row = row_vis(p, s, i);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int jl = j_lo + nt * 8 + 2 * t4 + e;
                bool vis = kRowBounds ? vis_row(n0 + jl) : visible_nodoc(p, s, i, n0 + jl);
                if (p.doc_ids != nullptr) vis = vis && sDoc[jl] == q_doc[hf];
                if (!vis) sc[nt][2 * hf + e] = -INFINITY;
            }
    }
}

// First key index whose document id is >= `doc` (doc ids non-decreasing in the sequence).
__device__ __forceinline__ int doc_lower_bound(const int* doc, int n, int value) {
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (doc[mid] < value) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Keys that aligned query positions [a0, a1] (inclusive) can see lie in [lo, hi) or, for
// sink keys exempt from the window, in [sink_lo, sink_hi) (empty unless a window cuts lo
// above the sinks); every other key is masked for all of them.
struct KeyRange {
    int lo, hi, sink_lo, sink_hi;
};

__device__ __forceinline__ KeyRange key_range(const Params& p, const Seq& s, int a0, int a1) {
    KeyRange r{0, s.lk, 0, 0};
    int doc_lo = 0;
    if (p.mode == kCausal) r.hi = min(r.hi, a1 + 1);
    if (p.mode == kPrefixLm) r.hi = min(r.hi, max(a1 + 1, s.prefix));
    if (p.doc_ids != nullptr) {
        const int* doc = p.doc_ids + s.k0;
        const int d0 = doc[min(max(a0, 0), s.lk - 1)];
        const int d1 = doc[min(max(a1, 0), s.lk - 1)];
        doc_lo = doc_lower_bound(doc, s.lk, d0);
        r.lo = max(r.lo, doc_lo);
        r.hi = min(r.hi, doc_lower_bound(doc, s.lk, d1 + 1));
    }
    if (p.window > 0) {
        r.lo = max(r.lo, a0 - p.window + 1);
        r.hi = min(r.hi, a1 + p.window);
        r.sink_lo = doc_lo;
        r.sink_hi = min(p.sinks, r.lo);
    }
    if (r.hi < r.lo) r.hi = r.lo;
    if (r.sink_hi < r.sink_lo) r.sink_hi = r.sink_lo;
    return r;
}

// True when every (query, key) pair of aligned positions [a0, a1] x keys [n0, n1) is visible
// (then the tile needs no per-element mask).
__device__ __forceinline__ bool tile_all_visible(const Params& p, const Seq& s, int a0, int a1, int n0, int n1) {
    if (n1 > s.lk || a0 < 0) return false;
    if (p.mode == kCausal && n1 - 1 > a0) return false;
    if (p.mode == kPrefixLm && !(n1 <= s.prefix || n1 - 1 <= a0)) return false;
    if (p.window > 0 && !(n1 <= p.sinks || (a1 - n0 < p.window && n1 - 1 - a0 < p.window))) return false;
    if (p.doc_ids != nullptr) {
        const int* doc = p.doc_ids + s.k0;
        const int d = doc[n0];
        if (doc[n1 - 1] != d || doc[a0] != d || doc[min(a1, s.lk - 1)] != d) return false;
    }
    return true;
}

// QK-Norm + RoPE of one row held by a warp: lane owns elements [lane * E, lane * E + E),
// E = D / 32, so the rotate-half partner of every element sits in lane ^ 16.
//   x_hat = x / sqrt(mean(x^2) + eps) * w;  y[c] = x_hat[c] cos - x_hat[c + D/2] sin (c < D/2),
//   y[c] = x_hat[c] cos + x_hat[c - D/2] sin (c >= D/2), angle = pos * theta^(-2 (c mod D/2) / D)
// `w` are the lane's E weights, `cs` the (cos, sin) row of the position (D/2 entries).
template <int kD>
__device__ __forceinline__ void norm_rope_row(float (&x)[kD / 32], const float (&w)[kD / 32], const float2* cs,
                                              float eps, int lane) {
    constexpr int E = kD / 32;
    float ss = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) ss += x[e] * x[e];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float r = rsqrtf(ss / kD + eps);
    const bool first = lane < 16;
    const int f0 = (lane & 15) * E;  // frequency index of element 0
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const float xh = x[e] * r * w[e];
        const float other = __shfl_xor_sync(0xffffffffu, xh, 16);
        const float2 c = cs[f0 + e];
        x[e] = first ? xh * c.x - other * c.y : xh * c.x + other * c.y;
    }
}

template <typename T>
__device__ __forceinline__ void load_row_elems(float* dst, const T* src, int n) {
    for (int e = 0; e < n; ++e) dst[e] = to_float(src[e]);
}

__device__ __forceinline__ void from_float(float v, __nv_bfloat16* dst) { *dst = __float2bfloat16_rn(v); }
__device__ __forceinline__ void from_float(float v, __half* dst) { *dst = __float2half_rn(v); }

template <typename T>
__device__ __forceinline__ float2 unpack2(unsigned v);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(unsigned v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(unsigned v) {
    return __half22float2(*reinterpret_cast<__half2*>(&v));
}

// QK-Norm + RoPE of the 8 rotate-half pairs one thread holds: `lo` = columns c0 .. c0 + 8 and
// `hi` = D/2 + c0 .. D/2 + c0 + 8 of a row (16-bit T, packed), `cs` the (cos, sin) table row of
// the position at frequency c0 (8 float2), `w(col)` the norm weight. kD / 16 consecutive lanes
// share a row: the row's sum of squares takes log2(kD / 16) shuffles, so every lane of the warp
// must call this (dead rows included). Math as norm_rope_row.
template <typename T, int kD, typename WFn>
__device__ __forceinline__ void norm_rope_pairs(uint4& lo, uint4& hi, const float2* cs, WFn w, int c0, float eps) {
    constexpr int kTPR = kD / 16;
    float4 t[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) t[i] = __ldg(reinterpret_cast<const float4*>(cs) + i);
    float xl[8], xh[8];
    const unsigned lw[4] = {lo.x, lo.y, lo.z, lo.w}, hw[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 a = unpack2<T>(lw[i]), b = unpack2<T>(hw[i]);
        xl[2 * i] = a.x;
        xl[2 * i + 1] = a.y;
        xh[2 * i] = b.x;
        xh[2 * i + 1] = b.y;
    }
    float ss = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) ss += xl[e] * xl[e] + xh[e] * xh[e];
#pragma unroll
    for (int o = 1; o < kTPR; o <<= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float rn = rsqrtf(ss / kD + eps);
    unsigned yl[4], yh[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float ol[2], oh[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int e = 2 * i + j;
            const float c = j == 0 ? t[i].x : t[i].z;
            const float sn = j == 0 ? t[i].y : t[i].w;
            const float a = xl[e] * rn * w(c0 + e);
            const float b = xh[e] * rn * w(kD / 2 + c0 + e);
            ol[j] = a * c - b * sn;
            oh[j] = b * c + a * sn;
        }
        yl[i] = pack2<T>(ol[0], ol[1]);
        yh[i] = pack2<T>(oh[0], oh[1]);
    }
    lo = make_uint4(yl[0], yl[1], yl[2], yl[3]);
    hi = make_uint4(yh[0], yh[1], yh[2], yh[3]);
}

// QK-Norm + RoPE in place on the kRows rows of a swizzled shared tile, by all kThreadsPerCta
// threads of the CTA through norm_rope_pairs (two 16-byte shared loads and stores and four
// 16-byte table loads per thread and row, independent across the unrolled rows so their
// latency overlaps). `w` is the norm weight (kD floats) in shared memory, `pos(r)` the RoPE
// position of row r.
template <typename T, int kD, int kRows, int kThreadsPerCta, typename PosFn>
__device__ __forceinline__ void norm_rope_tile(T* tile, const float* w, const float2* rope, float eps, PosFn pos) {
    constexpr int kTPR = kD / 16;
    constexpr int kRowsPerPass = kThreadsPerCta / kTPR;
    static_assert(kRows % kRowsPerPass == 0, "tile rows must be a multiple of the rows per pass");
    const int c0 = (threadIdx.x % kTPR) * 8;
#pragma unroll 2
    for (int r = threadIdx.x / kTPR; r < kRows; r += kRowsPerPass) {
        uint4* lo_p = reinterpret_cast<uint4*>(tile + swz<kD>(r, c0));
        uint4* hi_p = reinterpret_cast<uint4*>(tile + swz<kD>(r, kD / 2 + c0));
        uint4 lo = *lo_p, hi = *hi_p;
        norm_rope_pairs<T, kD>(lo, hi, rope + static_cast<size_t>(pos(r)) * (kD / 2) + c0,
                               [&](int col) { return w[col]; }, c0, eps);
        *lo_p = lo;
        *hi_p = hi;
    }
}

}  // namespace flash
}  // namespace tritter
