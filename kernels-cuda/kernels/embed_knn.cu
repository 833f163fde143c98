// Exact cosine-similarity top-k of predicted embeddings over the embedding table: the GPU
// path of tritter's EmbeddingRounder (crates/tritter/src/paradigm/rounder_cuda.rs, DESIGN.md
// section 5 "an embedding rounder (KNN over the embedding table) maps back to tokens").
//
// ---- Layout ---------------------------------------------------------------------------------
//   table    [rows][ld]  bf16, each row scaled to unit norm on the host (f32, then rounded to
//            bf16), zero-padded from H to ld = round_up(H, 8) so every 8-value group is one
//            aligned 16-byte load. Row r is candidate r; id_map[r] is its token id (ascending
//            in r, so "lower row" == "lower id" for ties).
//   queries  [N][H]      f32, any norm (not normalized in place).
//   cand     [N][num_chunks][kp] (score f32, row u32): pass 1's per-chunk top-kp, sorted.
//   out      ids [N][k] u32, sims [N][k] f32: cosine similarity, descending, ties by lower id.
//   k <= 64; kp = the power of two >= k.
//
// ---- Algorithm: two passes ---------------------------------------------------------------
//   Ranking uses the raw dot q . t_hat (t_hat a unit row): dividing by |q| is a positive
//   per-query factor, so it cannot change the order; pass 2 applies 1 / max(|q|, 1e-12) to the
//   k survivors only (the CPU rounder's F.normalize convention: a zero query scores 0).
//
//   Pass 1, embed_knn_topk_q{1,2,4,8}: grid (ceil(N / QT), num_chunks), 256 threads. Block
//   (x, y) scores queries [x*QT, x*QT + QT) against table rows [y*R, min((y+1)*R, rows)),
//   R = rows_per_chunk (a multiple of 32). The query tile is the fast grid index, so the
//   blocks sharing a chunk run together and the chunk comes from HBM once, then from L2.
//   Rows are walked in tiles of 32: warp w owns rows 4w..4w+3 of the tile. For each window of
//   2048/QT dims the block stages the QT query slices (f32, 8 KB) in shared memory; lane l
//   reads 8 consecutive bf16 of each of its 4 rows per step (16-byte loads, 4 in flight) and
//   accumulates 4 x QT partial dots in registers. After the last window each (row, query)
//   dot is reduced across the warp (xor shuffles) and offered to the query's candidate buffer.
//   Candidate buffer (per query, 256 slots in shared memory, FAISS "block select" style): the
//   first kp slots hold the best kp so far (sorted), the rest are appended with an atomic
//   counter. An offer is taken only if score >= kth, the current kp-th best (-inf until kp
//   exist); the kth only rises, so every final member passes ('>=' keeps exact ties, which
//   the sort then orders by row). Before a tile, if any buffer has fewer than 32 free slots,
//   the block flushes: empty slots become sentinels (-inf, 0xFFFFFFFF), each query's 256
//   slots are bitonic-sorted (best first: higher score, then lower row), kp are kept and kth
//   is re-read. Capacity: after a flush a buffer holds <= kp <= 64 <= 256 - 32, a tile adds
//   at most 32, so no offer is ever dropped. The final flush writes the best kp (sentinels
//   when the chunk has fewer than kp rows) to cand. NaN dots (non-finite queries; the host
//   API rejects them) become -inf so the order stays total.
//
//   Pass 2, embed_knn_merge: grid (N), 256 threads. Streams the query's num_chunks * kp
//   candidates in rounds of 2048 (8 independent loads per thread) through the same filtered
//   buffer (4096 slots, flush when fewer than 2048 are free), then writes the best k: ids
//   through id_map, similarities times 1 / max(|q|, 1e-12). At least k real candidates exist
//   (every chunk contributes min(kp, its rows) >= 1 and the chunks cover rows >= k), and real
//   rows beat sentinels on ties (row < 0xFFFFFFFF), so no sentinel reaches the output; a
//   defensive check writes 0xFFFFFFFF instead of reading id_map out of bounds.
//
// ---- Expected bound ------------------------------------------------------------------------
//   Small N: HBM bandwidth on the table (rows * ld * 2 bytes, e.g. 256 MiB for 65536 x 2048):
//   each block keeps 8 warps x 4 rows x 512 B = 16 KB of loads in flight per dims step, and
//   the grid is ~2 blocks per SM. The candidate traffic is N * num_chunks * kp * 8 bytes
//   (~135 KB for N = 1, k = 64), the merge is ~a few microseconds. Large N: FP32 FMA issue
//   (N * rows * H multiply-adds on SIMT cores, no tensor cores in this version) and L2
//   (each query tile re-reads the chunk from L2). Precision: bf16 rows are within 2^-8
//   (relative) of the f32 unit rows, so |sim_gpu - sim_f32| <= 2^-8 + f32 accumulation error
//   by Cauchy-Schwarz; against the same bf16 table the only difference is summation order.
//   IEEE arithmetic (no --use_fast_math).

#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;
constexpr int kTileRows = kWarps * kRowsPerWarp;  // 32
constexpr int kWinFloats = 2048;                  // staged query floats per block (8 KB)
constexpr int kBuf = 256;                         // pass-1 candidate slots per query
constexpr int kBuf2 = 4096;                       // pass-2 candidate slots
constexpr int kPer = 8;                           // pass-2 loads per thread and round
constexpr int kRound = kThreads * kPer;           // 2048
constexpr unsigned kNoRow = 0xFFFFFFFFu;
constexpr float kNormEps = 1e-12f;

static_assert(kBuf - kTileRows >= 64, "a flushed pass-1 buffer must leave room for a tile");
static_assert(kBuf2 - kRound >= 64, "a flushed pass-2 buffer must leave room for a round");

// a is ranked before b: higher score, or equal score and lower row.
__device__ __forceinline__ bool before(float sa, unsigned ia, float sb, unsigned ib) {
    return sa > sb || (sa == sb && ia < ib);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum over the block; every thread gets the result. `scratch`: 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

// Sorts each of the total / seg segments of length seg (a power of two) best first, with a
// bitonic network; every thread of the block calls it; ends with a barrier.
__device__ void bitonic_sort_segments(float* s, unsigned* id, int total, int seg) {
    for (int size = 2; size <= seg; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int e = threadIdx.x; e < total; e += blockDim.x) {
                const int p = e ^ stride;  // stays inside e's segment: stride < seg
                if (p > e) {
                    // Sub-sequences of `size` alternate direction; at size == seg all go
                    // best first.
                    const bool up = ((e & (seg - 1)) & size) == 0;
                    const float se = s[e], sp = s[p];
                    const unsigned ie = id[e], ip = id[p];
                    const bool swap = up ? before(sp, ip, se, ie) : before(se, ie, sp, ip);
                    if (swap) {
                        s[e] = sp;
                        s[p] = se;
                        id[e] = ip;
                        id[p] = ie;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// Flushes Q candidate buffers of BUF slots: sentinels into the unused slots, sort, keep kp,
// refresh kth. Every thread calls it after a barrier; ends with a barrier.
template <int Q, int BUF>
__device__ void flush(float* s, unsigned* id, int* fill, float* kth, int kp) {
    for (int e = threadIdx.x; e < Q * BUF; e += blockDim.x) {
        const int q = e / BUF;
        if (e - q * BUF >= fill[q]) {
            s[e] = -INFINITY;
            id[e] = kNoRow;
        }
    }
    __syncthreads();
    bitonic_sort_segments(s, id, Q * BUF, BUF);
    if (threadIdx.x < Q) {
        const int q = threadIdx.x;
        const int f = min(fill[q], kp);
        fill[q] = f;
        kth[q] = f == kp ? s[q * BUF + kp - 1] : -INFINITY;
    }
    __syncthreads();
}

__device__ __forceinline__ void bf16x8_to_float(const uint4& raw, float* f) {
    const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);              // low half = lower address
        f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
}

template <int QT>
__device__ void knn_topk(const __nv_bfloat16* __restrict__ table, const float* __restrict__ queries,
                         int n, int h, int ld, long long rows, int rows_per_chunk, int kp,
                         float* __restrict__ cand_s, unsigned* __restrict__ cand_i) {
    constexpr int kWin = kWinFloats / QT;  // dims per staged query window (multiple of 256)
    __shared__ __align__(16) float qs[QT * kWin];
    __shared__ float buf_s[QT * kBuf];
    __shared__ unsigned buf_i[QT * kBuf];
    __shared__ int fill[QT];
    __shared__ float kth[QT];

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int q0 = blockIdx.x * QT;
    const int chunk = blockIdx.y;
    const int num_chunks = gridDim.y;
    const long long row_begin = (long long)chunk * rows_per_chunk;
    const long long row_end = min(row_begin + rows_per_chunk, rows);

    if (tid < QT) {
        fill[tid] = 0;
        kth[tid] = -INFINITY;
    }

    for (long long t0 = row_begin; t0 < row_end; t0 += kTileRows) {
        __syncthreads();  // the previous tile's offers (fill, buffers) are complete
        const int need = tid < QT && fill[tid] > kBuf - kTileRows;
        if (__syncthreads_or(need)) flush<QT, kBuf>(buf_s, buf_i, fill, kth, kp);

        const long long r_base = t0 + warp * kRowsPerWarp;
        float acc[kRowsPerWarp][QT];
#pragma unroll
        for (int j = 0; j < kRowsPerWarp; ++j) {
#pragma unroll
            for (int q = 0; q < QT; ++q) acc[j][q] = 0.0f;
        }

        for (int w0 = 0; w0 < ld; w0 += kWin) {
            const int wlen = min(kWin, ld - w0);  // a multiple of 8 (ld and kWin are)
            __syncthreads();                      // the previous window is consumed
            for (int e = tid; e < QT * kWin; e += kThreads) {
                const int q = e / kWin;
                const int d = e - q * kWin;
                const int qi = q0 + q;
                const int hd = w0 + d;
                qs[e] = (qi < n && hd < h) ? queries[(long long)qi * h + hd] : 0.0f;
            }
            __syncthreads();
#pragma unroll 2
            for (int d = lane * 8; d < wlen; d += 256) {
                float f[kRowsPerWarp][8];
#pragma unroll
                for (int j = 0; j < kRowsPerWarp; ++j) {
                    const long long r = r_base + j;
                    uint4 raw = make_uint4(0u, 0u, 0u, 0u);
                    if (r < row_end) {
                        raw = __ldg(reinterpret_cast<const uint4*>(table + r * ld + w0 + d));
                    }
                    bf16x8_to_float(raw, f[j]);
                }
#pragma unroll
                for (int q = 0; q < QT; ++q) {
                    const float4 a = *reinterpret_cast<const float4*>(&qs[q * kWin + d]);
                    const float4 b = *reinterpret_cast<const float4*>(&qs[q * kWin + d + 4]);
#pragma unroll
                    for (int j = 0; j < kRowsPerWarp; ++j) {
                        float s = acc[j][q];
                        s = fmaf(f[j][0], a.x, s);
                        s = fmaf(f[j][1], a.y, s);
                        s = fmaf(f[j][2], a.z, s);
                        s = fmaf(f[j][3], a.w, s);
                        s = fmaf(f[j][4], b.x, s);
                        s = fmaf(f[j][5], b.y, s);
                        s = fmaf(f[j][6], b.z, s);
                        s = fmaf(f[j][7], b.w, s);
                        acc[j][q] = s;
                    }
                }
            }
        }

        // Warp totals; lane j * QT + q (< 32) offers (row j, query q).
        float mine = 0.0f;
#pragma unroll
        for (int j = 0; j < kRowsPerWarp; ++j) {
#pragma unroll
            for (int q = 0; q < QT; ++q) {
                const float s = warp_sum(acc[j][q]);
                if (lane == j * QT + q) mine = s;
            }
        }
        if (lane < kRowsPerWarp * QT) {
            const int j = lane / QT;
            const int q = lane - j * QT;
            const long long r = r_base + j;
            if (r < row_end && q0 + q < n) {
                if (!(mine == mine)) mine = -INFINITY;  // NaN: rank last, keep the order total
                if (mine >= kth[q]) {
                    const int pos = atomicAdd(&fill[q], 1);  // < kBuf, see the header
                    buf_s[q * kBuf + pos] = mine;
                    buf_i[q * kBuf + pos] = (unsigned)r;
                }
            }
        }
    }

    __syncthreads();
    flush<QT, kBuf>(buf_s, buf_i, fill, kth, kp);
    for (int e = tid; e < QT * kp; e += kThreads) {
        const int q = e / kp;
        const int j = e - q * kp;
        const int qi = q0 + q;
        if (qi < n) {
            const long long o = ((long long)qi * num_chunks + chunk) * kp + j;
            cand_s[o] = buf_s[q * kBuf + j];
            cand_i[o] = buf_i[q * kBuf + j];
        }
    }
}

}  // namespace

#define EMBED_KNN_TOPK(QT)                                                                          \
    extern "C" __global__ void __launch_bounds__(kThreads) embed_knn_topk_q##QT(                    \
        const __nv_bfloat16* __restrict__ table, const float* __restrict__ queries, int n, int h,  \
        int ld, long long rows, int rows_per_chunk, int kp, float* __restrict__ cand_s,            \
        unsigned* __restrict__ cand_i) {                                                          \
        knn_topk<QT>(table, queries, n, h, ld, rows, rows_per_chunk, kp, cand_s, cand_i);           \
    }

EMBED_KNN_TOPK(1)
EMBED_KNN_TOPK(2)
EMBED_KNN_TOPK(4)
EMBED_KNN_TOPK(8)

// Pass 2: one block per query merges its num_chunks sorted lists of kp candidates.
extern "C" __global__ void __launch_bounds__(kThreads)
    embed_knn_merge(const float* __restrict__ cand_s, const unsigned* __restrict__ cand_i,
                    int num_chunks, int kp, const float* __restrict__ queries, int h, int k,
                    const unsigned* __restrict__ id_map, long long rows,
                    unsigned* __restrict__ out_ids, float* __restrict__ out_sims) {
    __shared__ float buf_s[kBuf2];
    __shared__ unsigned buf_i[kBuf2];
    __shared__ int fill[1];
    __shared__ float kth[1];
    __shared__ float scratch[32];

    const int tid = threadIdx.x;
    const long long qi = blockIdx.x;

    float ss = 0.0f;
    for (int d = tid; d < h; d += kThreads) {
        const float x = queries[qi * h + d];
        ss = fmaf(x, x, ss);
    }
    ss = block_sum(ss, scratch);  // starts and ends with barriers
    const float inv_norm = 1.0f / fmaxf(sqrtf(ss), kNormEps);

    if (tid == 0) {
        fill[0] = 0;
        kth[0] = -INFINITY;
    }
    const long long total = (long long)num_chunks * kp;
    const float* cs = cand_s + qi * total;
    const unsigned* ci = cand_i + qi * total;
    for (long long base = 0; base < total; base += kRound) {
        __syncthreads();  // the previous round's offers are complete
        if (__syncthreads_or(tid == 0 && fill[0] > kBuf2 - kRound)) {
            flush<1, kBuf2>(buf_s, buf_i, fill, kth, kp);
        }
        float s[kPer];
        unsigned id[kPer];
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
            const long long e = base + (long long)j * kThreads + tid;
            s[j] = e < total ? cs[e] : -INFINITY;
            id[j] = e < total ? ci[e] : kNoRow;
        }
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
            const long long e = base + (long long)j * kThreads + tid;
            if (e < total && s[j] >= kth[0]) {
                const int pos = atomicAdd(&fill[0], 1);  // < kBuf2, see the header
                buf_s[pos] = s[j];
                buf_i[pos] = id[j];
            }
        }
    }
    __syncthreads();
    flush<1, kBuf2>(buf_s, buf_i, fill, kth, kp);
    if (tid < k) {
        const unsigned r = buf_i[tid];
        out_ids[qi * k + tid] = (long long)r < rows ? id_map[r] : kNoRow;
        out_sims[qi * k + tid] = buf_s[tid] * inv_norm;
    }
}
