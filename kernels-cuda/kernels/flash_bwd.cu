// FlashAttention-2 backward on mma.sync m16n8k16 (sm_90 and sm_120), bf16/f16, D = 64 and 128,
// with the forward's semantics (flash_attn.cuh: masks, varlen, GQA, bottom-right alignment),
// plus the backward of the QK-Norm + RoPE prologue.
//
// Math (Dao, FlashAttention-2, Algorithm 2), per query row i and key j of a (query head, KV head):
//   P_ij = exp(s_ij * scale - lse_i)      recomputed from the forward's logsumexp (base 2 here)
//   dV_j += sum_i P_ij dO_i               dP_ij = dO_i . V_j
//   delta_i = rowsum(dO_i * O_i)          dS_ij = P_ij (dP_ij - delta_i)
//   dK_j += scale * sum_i dS_ij Q_i       dQ_i += scale * sum_j dS_ij K_j
//
// Kernels (one launch each, all on the caller's stream):
// * flash_bwd_pre_*: delta (f32, the logsumexp's layout) from O and dO, one warp per (token,
//   head) row; zeroes the f32 dQ accumulator when the atomic mode needs it.
// * flash_bwd_kv[_dq]_*: the main kernel. One CTA per (key block of kBN = 64 keys, KV head,
//   sequence), 8 warps; the flash_bwd_kv[_dq]_pair_* builds run a pair of key blocks (j,
//   n - 1 - j) per CTA (flash_bwd_kv_cta), so that under a causal mask every CTA visits the
//   same number of query blocks. It loads K and V once, then walks the query heads of its GQA
//   group and, for each, the query blocks of kBM = 64 rows that can see the key block (query_rows: the
//   inverse of the forward's key_range, so fully masked tiles are never visited and a sliding
//   window costs O(L W)), keeping dK and dV of its 64 keys in registers: GQA needs no expanded
//   K/V, no dK/dV atomics and no reduction pass. Per query block:
//     S = Q K^T and dP = dO V^T     warp (wm, wn) owns rows 16 wm.., keys 32 wn.. (4 n8 tiles)
//     P, dS -> shared memory (T)    masked through tile_all_visible / mask_tile
//     dV += P^T dO, dK += dS^T Q    warp owns keys 16 wm.., d columns D/2 wn.. (32 x 32 tiles in
//                                   the D = 128 kernel without dQ, kKvWide); the transposed
//                                   A operands come from ldmatrix.trans of the row-major P, dS
//     dQ = dS K (the _dq variant)   warp owns rows 16 wm.., d columns D/2 wn..; added with
//                                   f32x2 atomics into dq_accum (total_q, Hq, D), pre-scaled.
//   The next block's Q and dO are fetched (cp.async) while dQ is computed and added (kKvWide:
//   the next block's dO, and the Q of the block after it into a second Q tile).
// * flash_bwd_dq_*: the deterministic mode's dQ, parallel over query blocks like the forward:
//   one CTA per (64 query rows or a pair of such blocks, query head, sequence), 4 warps of 16
//   rows, walking the forward's key blocks (key_range) with K/V double-buffered, recomputing
//   P and dP and accumulating dQ = dS K in registers (dS re-packed from the accumulators into
//   A fragments, as the forward's P). No atomics anywhere, fixed summation order: bitwise reproducible.
// * flash_bwd_dq_convert_*: dq_accum (f32) -> dq (T) after the atomic mode.
// * norm_rope_pos_* / norm_rope_bwd_* / norm_grad_reduce: the prologue. Forward of QK-Norm +
//   RoPE into q_hat/k_hat (the same row transform and positions as the fused forward), then its
//   backward, one warp per row: recomputes x_hat from raw x, rotates dy back (R^T), and returns
//   dx = r (g w - n mean(g w n)) with n = x r, plus per-block partial sums of the weight
//   gradient g * n (fixed rows per block, fixed order) that norm_grad_reduce sums in block
//   order: deterministic in both modes.
//
// Layout: q/o/dout/dq (total_q, Hq, D), k/v/dk/dv (total_k, Hkv, D) in T; lse/delta (B, Hq, Lq)
// or (Hq, total_q) f32; dq_accum (total_q, Hq, D) f32. Shared tiles are row-major, 16-byte
// chunks XOR-swizzled by row (swz), so cp.async, ldmatrix and ldmatrix.trans are conflict-free.
//
// Shared memory and registers (nvcc 13.0 --resource-usage, sm_90 / sm_120; README has the table):
// * main kernel: Q, dO, K, V (64 x D each), P, dS (64 x 64 each), doc ids = 82,176 B at
//   D = 128, 49,408 B at D = 64; the D = 128 kernel without dQ has a second Q tile (98,560 B,
//   kKvWide). D = 128: 225-230 / 244-246 registers, no spills, 1 CTA of
//   8 warps per SM (dK + dV alone hold 64 f32 registers per thread; a 128-register cap for
//   2 CTAs spills ~96 B). D = 64: __launch_bounds__(256, 2), 128 registers, no spills, 2 CTAs.
// * dq kernel: Q, dO (64 x D), K, V double-buffered (2 x 2 x 64 x D), doc ids = 98,816 B at
//   D = 128 (under sm_120's 101,376 B per block), 49,664 B at D = 64. D = 128: 255 registers,
//   8 B of spill on sm_90 (none on sm_120); D = 64: 236 / 253, no spills.
// * preprocess, convert, norm kernels: <= 40 registers, <= 4 KB static shared memory.
//
// Bound: tensor cores for L >= 1K. Per (64 x 64) tile the main kernel issues 5 GEMMs of
// 64 x 64 x D (S, dP, dV, dK, dQ) against ~10 instructions per score element; the atomic dQ
// adds 64 x D f32 atomics per tile (L2 resident), FA2's known cost of the single-pass scheme.
// The deterministic mode recomputes S and dP once more (7 GEMMs per tile instead of 5).
#include "flash_attn.cuh"

namespace tritter {
namespace flash {
namespace bwd {

constexpr int kBM = 64;          // query rows per block (main kernel)
constexpr int kBN = 64;          // keys per CTA (main kernel), per block (dq kernel)
constexpr int kThreads = 256;    // main kernel: 8 warps
constexpr int kDqBM = 64;        // dq kernel: query rows per CTA
constexpr int kDqThreads = 128;  // dq kernel: 4 warps of 16 rows
constexpr float kLog2e = 1.4426950408889634f;

// The D = 128 main kernel without dQ (the deterministic mode's) differs from the others in
// two ways, each measured (H100, flash_attn bench, deterministic causal L = 8K 8.24 -> 7.92
// ms, bidirectional 16.12 -> 15.53 ms): (1) two Q tiles, so the Q of query block it + 2 is
// fetched into the tile block it leaves right after its dV/dK products (with block it + 1's
// dO), and that load has a whole block to land instead of none; (2) 32 x 32 warp tiles in the
// dV/dK product (FlashAttention-2's 64 x 64 layout), which cuts its shared-memory fragment
// reads from 160 to 128 KB per tile. In the atomic dQ kernel the same two changes made the
// causal L = 8K backward slower (7.81 -> 8.15 ms; the Q tiles alone 8.73), and at D = 64 the
// 16 x 32 tiles already read the least and two CTAs per SM must fit sm_120's ~100 KB.
template <int kD, bool kDq>
constexpr bool kKvWide = kD == 128 && !kDq;
template <int kD, bool kDq>
constexpr int kv_smem_bytes() {
    return ((kKvWide<kD, kDq> ? 3 : 2) * kBM + 2 * kBN) * kD * 2 + 2 * kBM * kBN * 2 + kBN * 4;
}
template <int kD>
constexpr int dq_smem_bytes() {
    return (2 * kDqBM + 4 * kBN) * kD * 2 + 2 * kBN * 4;
}
static_assert(kv_smem_bytes<128, true>() == 82176, "main kernel shared memory (README)");
static_assert(kv_smem_bytes<128, false>() == 98560, "main kernel shared memory (README)");
static_assert(kv_smem_bytes<128, false>() <= 101376, "sm_120 allows 99 KB per block");
static_assert(dq_smem_bytes<128>() == 98816, "dq kernel shared memory (README)");
static_assert(dq_smem_bytes<128>() <= 101376, "sm_120 allows 99 KB per block");

// cp.async of rows [0, rows) of a (tokens, heads, D) tensor into a swizzled tile of `kRows`
// rows, `kNT` threads; rows >= valid are zero-filled. `src` points at the tile's first row.
template <int kRows, int kD, int kNT>
__device__ __forceinline__ void load_rows(void* tile, const void* src, size_t row_stride_bytes, int valid) {
    constexpr int kChunks = kD / 8;
    static_assert((kRows * kChunks) % kNT == 0, "tile chunks divide among the threads");
    const char* s = static_cast<const char*>(src);
    char* t = static_cast<char*>(tile);
#pragma unroll
    for (int i = 0; i < kRows * kChunks / kNT; ++i) {
        const int c = static_cast<int>(threadIdx.x) + i * kNT;
        const int row = c / kChunks, chunk = c % kChunks;
        const bool ok = row < valid;
        const char* g = s + (ok ? row * row_stride_bytes + chunk * 16 : 0);
        cp_async_zfill<16>(t + swz<kD>(row, chunk * 8) * 2, g, ok ? 16 : 0);
    }
}

// Index of query row i (within sequence b) in lse/delta.
__device__ __forceinline__ size_t lse_index(const Params& p, const Seq& s, int b, int h, int i) {
    return p.cu_q != nullptr ? static_cast<size_t>(h) * p.total_q + s.q0 + i
                             : (static_cast<size_t>(b) * p.hq + h) * s.lq + i;
}

// log2-domain logsumexp of a row for P = exp2(s * scale_log2 - lse2): rows past the sequence
// (and rows that saw no key, lse = -inf) get +inf, so their P is exactly 0.
__device__ __forceinline__ float lse_log2(const Params& p, size_t idx, bool valid) {
    if (!valid) return INFINITY;
    const float l = p.lse[idx];
    return l == -INFINITY ? INFINITY : l * kLog2e;
}

// Query rows [lo, hi) of sequence s that may see a key of [n0, n1) (n0 < n1 <= lk): the inverse
// of key_range. A superset of the rows with a visible pair (the per-element mask removes the
// rest), exact at block granularity for causal, prefix-LM, window and sink keys.
struct RowRange {
    int lo, hi;
};

__device__ __forceinline__ RowRange query_rows(const Params& p, const Seq& s, int n0, int n1) {
    int a_lo = s.shift, a_hi = s.shift + s.lq;  // aligned positions
    if (p.mode == kCausal || (p.mode == kPrefixLm && n0 >= s.prefix)) a_lo = max(a_lo, n0);
    if (p.window > 0 && n0 >= p.sinks) {  // no sink key in the block: the window binds
        a_lo = max(a_lo, n0 - p.window + 1);
        a_hi = min(a_hi, n1 - 1 + p.window);
    }
    if (p.doc_ids != nullptr) {  // documents need lq <= lk: aligned positions index doc ids
        const int* doc = p.doc_ids + s.k0;
        a_lo = max(a_lo, doc_lower_bound(doc, s.lk, doc[n0]));
        a_hi = min(a_hi, doc_lower_bound(doc, s.lk, doc[n1 - 1] + 1));
    }
    RowRange r{max(a_lo - s.shift, 0), min(a_hi - s.shift, s.lq)};
    if (r.hi < r.lo) r.hi = r.lo;
    return r;
}

// ---------------------------------------------------------------------------------------------
// Preprocess: delta = rowsum(dO * O) in f32, one warp per (token, head) row; zeroes dq_accum.
template <typename T, int kD>
__device__ __forceinline__ void preprocess(const Params& p, int zero_dq) {
    constexpr int kE = kD / 32;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= p.total_q * p.hq) return;
    const T* o = static_cast<const T*>(p.o) + static_cast<size_t>(row) * kD + lane * kE;
    const T* d = static_cast<const T*>(p.dout) + static_cast<size_t>(row) * kD + lane * kE;
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < kE; ++e) sum += to_float(o[e]) * to_float(d[e]);
#pragma unroll
    for (int x = 16; x > 0; x >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, x);
    if (lane == 0) {
        const int t = row / p.hq, h = row % p.hq;
        size_t idx;
        if (p.cu_q != nullptr) {
            idx = static_cast<size_t>(h) * p.total_q + t;
        } else {
            const int b = t / p.lq, i = t % p.lq;
            idx = (static_cast<size_t>(b) * p.hq + h) * p.lq + i;
        }
        p.delta[idx] = sum;
    }
    if (zero_dq) {
        float* acc = p.dq_accum + static_cast<size_t>(row) * kD + lane * kE;
#pragma unroll
        for (int e = 0; e < kE; ++e) acc[e] = 0.f;
    }
}

// ---------------------------------------------------------------------------------------------
// Main kernel: dK, dV of one key block (and, with kDq, atomic dQ contributions).
template <typename T, int kD, bool kDq>
__device__ __forceinline__ void flash_bwd_kv(const Params& p, float* dk_f32, const int n_block) {
    // Warp tiles of the dV/dK product (keys x d columns, 8 warps): 16 x D/2, or 32 x 32 where
    // kKvWide (above); the dQ product (only with kDq, so never wide) keeps 16 x D/2.
    constexpr int kWR = kKvWide<kD, kDq> ? 32 : 16;  // keys per warp
    constexpr int kDH = kBN * kD / (8 * kWR);         // d columns per warp
    constexpr int kMT2 = kWR / 16;                    // m16 tiles per warp
    constexpr int kDT = kDH / 8;                      // n8 tiles per warp
    static_assert(kDH * kWR * 8 == kBN * kD, "8 warps cover the 64 x D tile");
    constexpr int kQB = kKvWide<kD, kDq> ? 2 : 1;     // Q tiles
    extern __shared__ __align__(128) unsigned char smem[];
    T* sQ0 = reinterpret_cast<T*>(smem);  // kQB buffers
    T* sdO = sQ0 + kQB * kBM * kD;
    T* sK = sdO + kBM * kD;
    T* sV = sK + kBN * kD;
    T* sP = sV + kBN * kD;    // (kBM, kBN)
    T* sdS = sP + kBM * kBN;  // (kBM, kBN)
    int* sDoc = reinterpret_cast<int*>(sdS + kBM * kBN);

    const int b = blockIdx.z, hk = blockIdx.y;
    const Seq s = load_seq(p, b);
    const int n0 = n_block * kBN;
    if (n0 >= s.lk) return;
    const int keys = min(kBN, s.lk - n0);
    const int group = p.hq / p.hkv;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int wm = warp & 3, wn = warp >> 2;                                    // S, dP
    static_assert(kWR == 16 || kWR == 32, "warp tile rows");
    const int wr = kWR == 16 ? wm : warp & 1, wc = kWR == 16 ? wn : warp >> 1;  // dV, dK

    const size_t q_stride = static_cast<size_t>(p.hq) * kD * sizeof(T);
    const size_t kv_stride = static_cast<size_t>(p.hkv) * kD * sizeof(T);
    const size_t kv_off = (static_cast<size_t>(s.k0 + n0) * p.hkv + hk) * kD;

    const RowRange rr = query_rows(p, s, n0, n0 + keys);
    const int m_lo = rr.lo / kBM;
    const int n_m = rr.hi > rr.lo ? (rr.hi + kBM - 1) / kBM - m_lo : 0;
    const int n_it = n_m * group;
    // Q (into tile it % kQB) and / or dO of iteration it.
    auto load_qdo = [&](int it, bool q, bool dout) {
        const int h = hk * group + it / n_m;
        const int m0 = (m_lo + it % n_m) * kBM;
        const size_t off = (static_cast<size_t>(s.q0 + m0) * p.hq + h) * kD;
        const int valid = s.lq - m0;
        if (q) load_rows<kBM, kD, kThreads>(sQ0 + (it % kQB) * kBM * kD, static_cast<const T*>(p.q) + off, q_stride, valid);
        if (dout) load_rows<kBM, kD, kThreads>(sdO, static_cast<const T*>(p.dout) + off, q_stride, valid);
    };

    load_rows<kBN, kD, kThreads>(sK, static_cast<const T*>(p.k) + kv_off, kv_stride, keys);
    load_rows<kBN, kD, kThreads>(sV, static_cast<const T*>(p.v) + kv_off, kv_stride, keys);
    if (n_it > 0) load_qdo(0, true, true);
    cp_async_commit();
    if constexpr (kQB == 2) {  // the Q of iteration 1 in a group of its own (waited for a block later)
        if (n_it > 1) load_qdo(1, true, false);
        cp_async_commit();
    }
    if (p.doc_ids != nullptr && tid < kBN) sDoc[tid] = p.doc_ids[s.k0 + min(n0 + tid, s.lk - 1)];

    float dk[kMT2][kDT][4], dv[kMT2][kDT][4];
#pragma unroll
    for (int mt = 0; mt < kMT2; ++mt)
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                dk[mt][dt][e] = 0.f;
                dv[mt][dt][e] = 0.f;
            }

    for (int it = 0; it < n_it; ++it) {
        const int h = hk * group + it / n_m;
        const int m0 = (m_lo + it % n_m) * kBM;
        const int rows = min(kBM, s.lq - m0);
        const int a0 = m0 + s.shift, a1 = m0 + rows - 1 + s.shift;
        const T* sQ = sQ0 + (it % kQB) * kBM * kD;

        // Row statistics of this thread's two S rows (wm * 16 + g + 8 hf).
        float lse2[2], dlt[2];
        int q_doc[2] = {0, 0};
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = wm * 16 + g + 8 * hf;
            const bool ok = r < rows;
            const size_t idx = lse_index(p, s, b, h, m0 + min(r, rows - 1));
            lse2[hf] = lse_log2(p, idx, ok);
            dlt[hf] = ok ? p.delta[idx] : 0.f;
            if (p.doc_ids != nullptr) q_doc[hf] = p.doc_ids[s.k0 + min(max(m0 + r + s.shift, 0), s.lk - 1)];
        }

        cp_async_wait<kQB - 1>();  // with two Q tiles the newest group (the Q of it + 1) may fly
        __syncthreads();  // Q, dO (and at it = 0 K, V, doc ids) landed

        // S = Q K^T, dP = dO V^T: 16 rows x 32 keys per warp.
        float sc[4][4], dp[4][4];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                sc[nt][e] = 0.f;
                dp[nt][e] = 0.f;
            }
#pragma unroll
        for (int ks = 0; ks < kD / 16; ++ks) {
            unsigned aq[4], ao[4];
            const int ar = wm * 16 + (lane & 15), ac = ks * 16 + (lane >> 4) * 8;
            ldmatrix_x4(aq, sQ + swz<kD>(ar, ac));
            ldmatrix_x4(ao, sdO + swz<kD>(ar, ac));
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                unsigned bk[4], bv[4];
                const int kr = wn * 32 + np * 16 + (lane & 7) + ((lane >> 4) << 3);
                const int kc = ks * 16 + ((lane >> 3) & 1) * 8;
                ldmatrix_x4(bk, sK + swz<kD>(kr, kc));
                ldmatrix_x4(bv, sV + swz<kD>(kr, kc));
                mma_16816<T>(sc[2 * np], aq, bk[0], bk[1]);
                mma_16816<T>(sc[2 * np + 1], aq, bk[2], bk[3]);
                mma_16816<T>(dp[2 * np], ao, bv[0], bv[1]);
                mma_16816<T>(dp[2 * np + 1], ao, bv[2], bv[3]);
            }
        }

        // Row bounds at D = 64 (causal L = 8K 0.97x the time, H200), the per-element rule at
        // D = 128 (1.06x with bounds).
        if (!tile_all_visible(p, s, a0, a1, n0, n0 + kBN))
            mask_tile<kD == 64>(sc, p, s, m0 + wm * 16 + g, n0, wn * 32, t4, sDoc, q_doc);

        // P = exp2(S scale log2e - lse log2e), dS = P (dP - delta); both to shared memory as T.
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                float pv[2], ds[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    pv[e] = fast_exp2(fmaf(sc[nt][2 * hf + e], p.scale_log2, -lse2[hf]));
                    ds[e] = pv[e] * (dp[nt][2 * hf + e] - dlt[hf]);
                }
                const int r = wm * 16 + g + 8 * hf, c = wn * 32 + nt * 8 + 2 * t4;
                *reinterpret_cast<unsigned*>(sP + swz<kBN>(r, c)) = pack2<T>(pv[0], pv[1]);
                *reinterpret_cast<unsigned*>(sdS + swz<kBN>(r, c)) = pack2<T>(ds[0], ds[1]);
            }
        __syncthreads();  // P, dS complete

        // dV += P^T dO, dK += dS^T Q: keys kWR wr.., d columns kDH wc.. per warp.
#pragma unroll
        for (int kk = 0; kk < kBM / 16; ++kk) {
            unsigned pa[kMT2][4], sa[kMT2][4];
#pragma unroll
            for (int mt = 0; mt < kMT2; ++mt) {
                const int qr = kk * 16 + ((lane >> 4) << 3) + (lane & 7);
                const int kc = wr * kWR + mt * 16 + ((lane >> 3) & 1) * 8;
                ldmatrix_x4_trans(pa[mt], sP + swz<kBN>(qr, kc));
                ldmatrix_x4_trans(sa[mt], sdS + swz<kBN>(qr, kc));
            }
#pragma unroll
            for (int dpi = 0; dpi < kDT / 2; ++dpi) {
                unsigned bo[4], bq[4];
                const int r = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                const int c = wc * kDH + dpi * 16 + (lane >> 4) * 8;
                ldmatrix_x4_trans(bo, sdO + swz<kD>(r, c));
                ldmatrix_x4_trans(bq, sQ + swz<kD>(r, c));
#pragma unroll
                for (int mt = 0; mt < kMT2; ++mt) {
                    mma_16816<T>(dv[mt][2 * dpi], pa[mt], bo[0], bo[1]);
                    mma_16816<T>(dv[mt][2 * dpi + 1], pa[mt], bo[2], bo[3]);
                    mma_16816<T>(dk[mt][2 * dpi], sa[mt], bq[0], bq[1]);
                    mma_16816<T>(dk[mt][2 * dpi + 1], sa[mt], bq[2], bq[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with Q and dO: fetch the next block's
        if (it + 1 < n_it) load_qdo(it + 1, kQB == 1, true);
        cp_async_commit();
        if constexpr (kQB == 2) {  // into the buffer this block's Q leaves
            if (it + 2 < n_it) load_qdo(it + 2, true, false);
            cp_async_commit();
        }

        if constexpr (kDq) {
            // dQ = dS K: rows 16 wm.., d columns kDH wn.. per warp; added to dq_accum (f32).
            static_assert(kWR == 16, "the dQ product keeps the 16 x D/2 warp tiles");
            float dq[kDT][4];
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;
#pragma unroll
            for (int ks = 0; ks < kBN / 16; ++ks) {
                unsigned a[4];
                ldmatrix_x4(a, sdS + swz<kBN>(wm * 16 + (lane & 15), ks * 16 + (lane >> 4) * 8));
#pragma unroll
                for (int dpi = 0; dpi < kDT / 2; ++dpi) {
                    unsigned bk[4];
                    ldmatrix_x4_trans(bk, sK + swz<kD>(ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                       wn * kDH + dpi * 16 + (lane >> 4) * 8));
                    mma_16816<T>(dq[2 * dpi], a, bk[0], bk[1]);
                    mma_16816<T>(dq[2 * dpi + 1], a, bk[2], bk[3]);
                }
            }
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = wm * 16 + g + 8 * hf;
                if (r < rows) {
                    float* dst = p.dq_accum + (static_cast<size_t>(s.q0 + m0 + r) * p.hq + h) * kD + wn * kDH + 2 * t4;
#pragma unroll
                    for (int dt = 0; dt < kDT; ++dt)
                        atomicAdd(reinterpret_cast<float2*>(dst + dt * 8),
                                  make_float2(dq[dt][2 * hf] * p.scale, dq[dt][2 * hf + 1] * p.scale));
                }
            }
        }
    }
    cp_async_wait<0>();

    // Epilogue: dK (scaled) and dV of the block's valid keys; keys no query sees get zeros.
#pragma unroll
    for (int mt = 0; mt < kMT2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = wr * kWR + mt * 16 + g + 8 * hf;
            if (r >= keys) continue;
            const size_t off = kv_off + static_cast<size_t>(r) * p.hkv * kD + wc * kDH + 2 * t4;
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt) {
                const float k0v = dk[mt][dt][2 * hf] * p.scale, k1v = dk[mt][dt][2 * hf + 1] * p.scale;
                if (dk_f32 != nullptr) {
                    *reinterpret_cast<float2*>(dk_f32 + off + dt * 8) = make_float2(k0v, k1v);
                } else {
                    *reinterpret_cast<unsigned*>(static_cast<T*>(p.dk) + off + dt * 8) = pack2<T>(k0v, k1v);
                }
                *reinterpret_cast<unsigned*>(static_cast<T*>(p.dv) + off + dt * 8) =
                    pack2<T>(dv[mt][dt][2 * hf], dv[mt][dt][2 * hf + 1]);
            }
        }
}

// The key blocks of this CTA: block blockIdx.x, or with kPair (the _pair kernels) blocks j =
// blockIdx.x and n - 1 - j of its sequence (for_tiles' pairs; under a causal mask the first
// blocks cost the most). Separate kernels, and two inlined bodies rather than for_tiles'
// loop: a loop around the body (its key block a loop variable) changed the register
// allocation of the D = 128 atomic-dQ kernel and cost ~10% on the H100, paired or not.
template <typename T, int kD, bool kDq, bool kPair>
__device__ __forceinline__ void flash_bwd_kv_cta(const Params& p, float* dk_f32) {
    if constexpr (kPair) {
        const int n_blocks = (load_seq(p, blockIdx.z).lk + kBN - 1) / kBN;
        const int j = static_cast<int>(blockIdx.x), hi = n_blocks - 1 - j;
        if (hi < j) return;
        flash_bwd_kv<T, kD, kDq>(p, dk_f32, j);
        if (hi > j) {
            __syncthreads();
            flash_bwd_kv<T, kD, kDq>(p, dk_f32, hi);
        }
    } else {
        flash_bwd_kv<T, kD, kDq>(p, dk_f32, static_cast<int>(blockIdx.x));
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic dQ: one CTA per (kDqBM query rows, query head, sequence), dQ in registers.
// Writes dq (T), or f32 into dq_accum when `out_f32` (the prologue's backward reads it).
template <typename T, int kD>
__device__ __forceinline__ void flash_bwd_dq(const Params& p, int out_f32, const int m_block) {
    constexpr int kNT = kBN / 8;  // n8 tiles of S per warp (all 64 keys)
    constexpr int kDT = kD / 8;   // n8 tiles of dQ
    extern __shared__ __align__(128) unsigned char smem[];
    T* sQ = reinterpret_cast<T*>(smem);
    T* sdO = sQ + kDqBM * kD;
    T* sK0 = sdO + kDqBM * kD;  // K[2], V[2]
    int* sDoc0 = reinterpret_cast<int*>(sK0 + 4 * kBN * kD);

    const int b = blockIdx.z, h = blockIdx.y;
    const Seq s = load_seq(p, b);
    const int m0 = m_block * kDqBM;
    if (m0 >= s.lq) return;
    const int rows = min(kDqBM, s.lq - m0);
    const int hk = h / (p.hq / p.hkv);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;

    const size_t q_stride = static_cast<size_t>(p.hq) * kD * sizeof(T);
    const size_t kv_stride = static_cast<size_t>(p.hkv) * kD * sizeof(T);
    const size_t q_off = (static_cast<size_t>(s.q0 + m0) * p.hq + h) * kD;
    const T* k_base = static_cast<const T*>(p.k) + (static_cast<size_t>(s.k0) * p.hkv + hk) * kD;
    const T* v_base = static_cast<const T*>(p.v) + (static_cast<size_t>(s.k0) * p.hkv + hk) * kD;

    // The forward's key blocks for these rows: main blocks top down, then sink blocks.
    const int a0 = m0 + s.shift, a1 = m0 + rows - 1 + s.shift;
    const KeyRange kr = key_range(p, s, a0, a1);
    const int main_lo = kr.lo / kBN, main_hi = (kr.hi + kBN - 1) / kBN;
    const int sink_lo = kr.sink_lo / kBN;
    const int sink_hi = min((kr.sink_hi + kBN - 1) / kBN, main_lo);
    const int n_main = max(main_hi - main_lo, 0);
    const int n_total = n_main + max(sink_hi - sink_lo, 0);
    auto block_of = [&](int it) { return it < n_main ? main_hi - 1 - it : sink_hi - 1 - (it - n_main); };
    auto load_kv = [&](int it) {
        const int n0 = block_of(it) * kBN;
        T* sK = sK0 + (it & 1) * 2 * kBN * kD;
        load_rows<kBN, kD, kDqThreads>(sK, k_base + static_cast<size_t>(n0) * p.hkv * kD, kv_stride, s.lk - n0);
        load_rows<kBN, kD, kDqThreads>(sK + kBN * kD, v_base + static_cast<size_t>(n0) * p.hkv * kD, kv_stride,
                                       s.lk - n0);
        if (p.doc_ids != nullptr && tid < kBN) sDoc0[(it & 1) * kBN + tid] = p.doc_ids[s.k0 + min(n0 + tid, s.lk - 1)];
    };

    load_rows<kDqBM, kD, kDqThreads>(sQ, static_cast<const T*>(p.q) + q_off, q_stride, rows);
    load_rows<kDqBM, kD, kDqThreads>(sdO, static_cast<const T*>(p.dout) + q_off, q_stride, rows);
    if (n_total > 0) load_kv(0);
    cp_async_commit();

    float lse2[2], dlt[2];
    int q_doc[2] = {0, 0};
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int r = warp * 16 + g + 8 * hf;
        const bool ok = r < rows;
        const size_t idx = lse_index(p, s, b, h, m0 + min(r, rows - 1));
        lse2[hf] = lse_log2(p, idx, ok);
        dlt[hf] = ok ? p.delta[idx] : 0.f;
        if (p.doc_ids != nullptr) q_doc[hf] = p.doc_ids[s.k0 + min(max(m0 + r + s.shift, 0), s.lk - 1)];
    }

    float dq[kDT][4];
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;

    for (int it = 0; it < n_total; ++it) {
        const int n0 = block_of(it) * kBN;
        const T* sK = sK0 + (it & 1) * 2 * kBN * kD;
        const T* sV = sK + kBN * kD;
        const int* sDoc = sDoc0 + (it & 1) * kBN;
        cp_async_wait<0>();
        __syncthreads();  // block it landed; every warp is done with block it - 1's buffer
        if (it + 1 < n_total) load_kv(it + 1);
        cp_async_commit();

        float sc[kNT][4], dp[kNT][4];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                sc[nt][e] = 0.f;
                dp[nt][e] = 0.f;
            }
#pragma unroll
        for (int ks = 0; ks < kD / 16; ++ks) {
            unsigned aq[4], ao[4];
            const int ar = warp * 16 + (lane & 15), ac = ks * 16 + (lane >> 4) * 8;
            ldmatrix_x4(aq, sQ + swz<kD>(ar, ac));
            ldmatrix_x4(ao, sdO + swz<kD>(ar, ac));
#pragma unroll
            for (int np = 0; np < kNT / 2; ++np) {
                unsigned bk[4], bv[4];
                const int kr2 = np * 16 + (lane & 7) + ((lane >> 4) << 3);
                const int kc = ks * 16 + ((lane >> 3) & 1) * 8;
                ldmatrix_x4(bk, sK + swz<kD>(kr2, kc));
                ldmatrix_x4(bv, sV + swz<kD>(kr2, kc));
                mma_16816<T>(sc[2 * np], aq, bk[0], bk[1]);
                mma_16816<T>(sc[2 * np + 1], aq, bk[2], bk[3]);
                mma_16816<T>(dp[2 * np], ao, bv[0], bv[1]);
                mma_16816<T>(dp[2 * np + 1], ao, bv[2], bv[3]);
            }
        }

        if (!tile_all_visible(p, s, a0, a1, n0, n0 + kBN))  // bounds at D = 64, as flash_bwd_kv
            mask_tile<kD == 64>(sc, p, s, m0 + warp * 16 + g, n0, 0, t4, sDoc, q_doc);

        // dS = P (dP - delta) in place of dP.
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pv = fast_exp2(fmaf(sc[nt][2 * hf + e], p.scale_log2, -lse2[hf]));
                    dp[nt][2 * hf + e] = pv * (dp[nt][2 * hf + e] - dlt[hf]);
                }

        // dQ += dS K (dS re-packed from the accumulators into A fragments).
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
            unsigned a[4];
            a[0] = pack2<T>(dp[2 * kk][0], dp[2 * kk][1]);
            a[1] = pack2<T>(dp[2 * kk][2], dp[2 * kk][3]);
            a[2] = pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
            a[3] = pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
            for (int dpi = 0; dpi < kDT / 2; ++dpi) {
                unsigned bk[4];
                ldmatrix_x4_trans(bk, sK + swz<kD>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dpi * 16 + (lane >> 4) * 8));
                mma_16816<T>(dq[2 * dpi], a, bk[0], bk[1]);
                mma_16816<T>(dq[2 * dpi + 1], a, bk[2], bk[3]);
            }
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int r = warp * 16 + g + 8 * hf;
        if (r >= rows) continue;
        const size_t off = q_off + static_cast<size_t>(r) * p.hq * kD + 2 * t4;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
            const float x0 = dq[dt][2 * hf] * p.scale, x1 = dq[dt][2 * hf + 1] * p.scale;
            if (out_f32) {
                *reinterpret_cast<float2*>(p.dq_accum + off + dt * 8) = make_float2(x0, x1);
            } else {
                *reinterpret_cast<unsigned*>(static_cast<T*>(p.dq) + off + dt * 8) = pack2<T>(x0, x1);
            }
        }
    }
}

// dq_accum (f32) -> dq (T), 4 elements per thread (n is a multiple of 64).
template <typename T>
__device__ __forceinline__ void dq_convert(const Params& p, long long n) {
    const long long i = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
    if (i >= n) return;
    const float4 v = *reinterpret_cast<const float4*>(p.dq_accum + i);
    uint2 out;
    out.x = pack2<T>(v.x, v.y);
    out.y = pack2<T>(v.z, v.w);
    *reinterpret_cast<uint2*>(static_cast<T*>(p.dq) + i) = out;
}


// The query blocks of this CTA (for_tiles: the heaviest, under a causal mask the last, first).
template <typename T, int kD>
__device__ __forceinline__ void flash_bwd_dq_cta(const Params& p, int out_f32) {
    const int m_blocks = (load_seq(p, blockIdx.z).lq + kDqBM - 1) / kDqBM;
    for_tiles(p, m_blocks, true, [&](int m) { flash_bwd_dq<T, kD>(p, out_f32, m); });
}

// ---------------------------------------------------------------------------------------------
// The prologue. Position of query token t (is_q) or key token t, as the fused forward uses:
// explicit positions, else the aligned position (queries; the row when lq > lk) or the index
// within the sequence (keys).
__device__ __forceinline__ int token_position(const Params& p, int t, bool is_q) {
    const int* pos = is_q ? p.pos_q : p.pos_k;
    if (pos != nullptr) return pos[t];
    int b;
    if (p.cu_q != nullptr) {
        const int* cu = is_q ? p.cu_q : p.cu_k;
        int lo = 0, hi = p.batch - 1;  // last b with cu[b] <= t (skips empty sequences)
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (cu[mid] <= t) lo = mid; else hi = mid - 1;
        }
        b = lo;
    } else {
        b = t / (is_q ? p.lq : p.lk);
    }
    const Seq s = load_seq(p, b);
    return is_q ? t - s.q0 + max(s.shift, 0) : t - s.k0;
}

// y = QK-Norm + RoPE of x (tokens, heads, D): q_hat / k_hat for the backward, and k_hat for
// the fused forward (flash_fwd.cu), which it lets start early (programmatic dependent launch).
// kD / 16 consecutive threads share a row, each owning 8 whole rotate-half pairs (columns
// c .. c + 8 and D/2 + c .. D/2 + c + 8, norm_rope_pairs): 16-byte loads and stores; 256 threads
// cover 256 * 16 / kD rows (norm_rows_per_block in cuda.rs).
template <typename T, int kD>
__device__ __forceinline__ void norm_rope_rows(const Params& p, const T* x, T* y, const T* w, int rows, int heads,
                                               int is_q) {
    constexpr int kTPR = kD / 16;
    pdl_launch_dependents();  // the fused forward may start its Q prologue now (flash_fwd.cu)
    const int row = blockIdx.x * (blockDim.x / kTPR) + threadIdx.x / kTPR;
    const int c0 = (threadIdx.x % kTPR) * 8;
    const bool live = row < rows;  // dead threads still join the shuffles
    const size_t base = static_cast<size_t>(live ? row : 0) * kD;
    uint4 lo = *reinterpret_cast<const uint4*>(x + base + c0);
    uint4 hi = *reinterpret_cast<const uint4*>(x + base + kD / 2 + c0);
    const int position = live ? token_position(p, row / heads, is_q != 0) : 0;
    norm_rope_pairs<T, kD>(lo, hi, p.rope + static_cast<size_t>(position) * (kD / 2) + c0,
                           [&](int col) { return to_float(w[col]); }, c0, p.eps);
    if (live) {
        *reinterpret_cast<uint4*>(y + base + c0) = lo;
        *reinterpret_cast<uint4*>(y + base + kD / 2 + c0) = hi;
    }
}

constexpr int kNormWarps = 8;

// Backward of norm_rope_rows: dx (T) from raw x and dy = dL/dy (f32), one warp per row, rows
// strided by the grid; per-block partial weight gradients (gridDim.x, D) summed in fixed order.
template <typename T, int kD>
__device__ __forceinline__ void norm_rope_bwd_rows(const Params& p, const T* x, const float* dy, T* dx, const T* w,
                                                   float* partial, int rows, int heads, int is_q) {
    constexpr int kE = kD / 32;
    __shared__ float red[kNormWarps][kD];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool first = lane < 16;
    const int f0 = (lane & 15) * kE;
    float wl[kE], dw[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e) {
        wl[e] = to_float(w[lane * kE + e]);
        dw[e] = 0.f;
    }
    for (int row = blockIdx.x * kNormWarps + warp; row < rows; row += gridDim.x * kNormWarps) {
        const size_t base = static_cast<size_t>(row) * kD + lane * kE;
        float xv[kE], g[kE];
        float ss = 0.f;
#pragma unroll
        for (int e = 0; e < kE; ++e) {
            xv[e] = to_float(x[base + e]);
            g[e] = dy[base + e];
            ss += xv[e] * xv[e];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        const float r = rsqrtf(ss / kD + p.eps);
        const float2* cs = p.rope + static_cast<size_t>(token_position(p, row / heads, is_q != 0)) * (kD / 2);
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kE; ++e) {
            // g = R^T dy: g[c] = dy[c] cos + dy[c + D/2] sin, g[c + D/2] = dy[c + D/2] cos - dy[c] sin
            const float other = __shfl_xor_sync(0xffffffffu, g[e], 16);
            const float2 c = cs[f0 + e];
            const float ge = first ? g[e] * c.x + other * c.y : g[e] * c.x - other * c.y;
            const float n = xv[e] * r;
            dw[e] += ge * n;
            g[e] = ge * wl[e];  // dL/dn
            dot += g[e] * n;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        const float mean = dot / kD;
#pragma unroll
        for (int e = 0; e < kE; ++e) from_float(r * (g[e] - xv[e] * r * mean), dx + base + e);
    }
#pragma unroll
    for (int e = 0; e < kE; ++e) red[warp][lane * kE + e] = dw[e];
    __syncthreads();
    for (int c = threadIdx.x; c < kD; c += blockDim.x) {
        float sum = 0.f;
#pragma unroll
        for (int wi = 0; wi < kNormWarps; ++wi) sum += red[wi][c];
        partial[static_cast<size_t>(blockIdx.x) * kD + c] = sum;
    }
}

}  // namespace bwd
}  // namespace flash
}  // namespace tritter

using tritter::flash::Params;

#define FLASH_BWD_KV(NAME, T, D, MINB, DQ, PAIR)                                                                   \
    extern "C" __global__ void __launch_bounds__(tritter::flash::bwd::kThreads, MINB)                            \
        NAME(const Params p, float* dk_f32) {                                                                  \
        tritter::flash::bwd::flash_bwd_kv_cta<T, D, DQ, PAIR>(p, dk_f32);                                      \
    }

#define FLASH_BWD_D(T, TN, D, MINB)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) flash_bwd_pre_##TN##_d##D(const Params p, int zero_dq) { \
        tritter::flash::bwd::preprocess<T, D>(p, zero_dq);                                                     \
    }                                                                                                          \
    FLASH_BWD_KV(flash_bwd_kv_dq_##TN##_d##D, T, D, MINB, true, false)                                        \
    FLASH_BWD_KV(flash_bwd_kv_##TN##_d##D, T, D, MINB, false, false)                                          \
    FLASH_BWD_KV(flash_bwd_kv_dq_pair_##TN##_d##D, T, D, MINB, true, true)                                    \
    FLASH_BWD_KV(flash_bwd_kv_pair_##TN##_d##D, T, D, MINB, false, true)                                      \
    extern "C" __global__ void __launch_bounds__(tritter::flash::bwd::kDqThreads, 1)                          \
        flash_bwd_dq_##TN##_d##D(const Params p, int out_f32) {                                                \
        tritter::flash::bwd::flash_bwd_dq_cta<T, D>(p, out_f32);                                               \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) norm_rope_pos_##TN##_d##D(                              \
        const Params p, const T* x, T* y, const T* w, int rows, int heads, int is_q) {                        \
        tritter::flash::bwd::norm_rope_rows<T, D>(p, x, y, w, rows, heads, is_q);                              \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(tritter::flash::bwd::kNormWarps * 32)                        \
        norm_rope_bwd_##TN##_d##D(const Params p, const T* x, const float* dy, T* dx, const T* w,              \
                                  float* partial, int rows, int heads, int is_q) {                             \
        tritter::flash::bwd::norm_rope_bwd_rows<T, D>(p, x, dy, dx, w, partial, rows, heads, is_q);            \
    }

// MINB: 2 CTAs per SM at D = 64 (128 registers, no spills); 1 at D = 128 (see the top comment).
#define FLASH_BWD_T(T, TN)                                                                            \
    FLASH_BWD_D(T, TN, 64, 2)                                                                         \
    FLASH_BWD_D(T, TN, 128, 1)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) flash_bwd_dq_convert_##TN(const Params p,      \
                                                                               long long n) {        \
        tritter::flash::bwd::dq_convert<T>(p, n);                                                     \
    }

FLASH_BWD_T(__nv_bfloat16, bf16)
FLASH_BWD_T(__half, f16)

// Weight gradient of the prologue: dw[c] = sum over blocks b (in order) of partial[b][c].
extern "C" __global__ void __launch_bounds__(128) norm_grad_reduce(const float* partial, float* dw, int blocks,
                                                                  int d) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float sum = 0.f;
    for (int b = 0; b < blocks; ++b) sum += partial[static_cast<size_t>(b) * d + c];
    dw[c] = sum;
}
