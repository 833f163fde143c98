// W2A8 ternary GEMV for decode and small batches (M = 1..8; products of M >= 9, the fused
// MLP's included, run the tiled GEMM, with `glu_rows` below for the MLP's relu^2 * up step),
// DESIGN.md section 4.
//
//   W      tiled 2-bit codes (crates/ternary-gemm `repack_tiles`): blocks of 16 rows x 128
//          weights (512 B), block (T, q) at uint4 offset 32 (T * quads + q); lane L = 4g + t
//          holds {word t of row g, word t of row g+8, word t+4 of row g, word t+4 of row
//          g+8} of the block (canonical words: code = w + 1, weight k at bits 2 (k % 16));
//          rows padded to 16 and words to 8 per row with zero weights;
//          quads = ceil(ceil(K / 16) / 8)
//   gamma  [1] or [n_out] f32 weight scales
//   xq     [M, Kp] int8 activation codes in MMA k order (Kp = quads * 128, zero padded;
//          written by act_quant_mma_* / a8_to_mma), xsum [M] int32 row sums of the codes,
//          xs [M] f32 activation scales (s = 127 / absmax)
//   y      [M, n_out] f32   y[m, n] = acc[m, n] * (gamma_n / s_m),
//                           acc[m, n] = sum_k (code[n, k] - 1) * xq[m, k]   (exact, int32)
//   ws     [32, n_out] int32 split-K accumulators, zero between calls (the last CTA resets them)
//   tiles  [ceil(n_out / 16)] u32 split-K arrival counters, zero between calls
//
// Algorithm. The integer dot product runs on the tensor cores: mma.sync.m16n8k32.s8.s8.s32
// with A = 16 weight rows x 32 k (codes 0..2 as s8) and B = 32 k x 8 activation rows
// (columns >= M are zero registers; the _m32 variant issues 4 MMAs per decoded A fragment).
// dot(w, x) = dot(code, x) - sum(x), so the codes feed the MMA directly and one subtraction
// per output removes the offset. In k-step j of a block, lane (g, t) feeds the MMA
// (word >> 2j) & 0x03030303 of each of its 4 words (a0..a3): the codes of weights
// {16t + j, 16t + 4 + j, 16t + 8 + j, 16t + 12 + j} (+64 for a2, a3) of rows g and g+8.
// The activations arrive in the same order from the quantization kernel (xq[128b + 32j +
// 4t + e] = x[128b + 16t + 4e + j]), so each B register is one 32-bit load from L1/L2.
//
// Register streaming. A warp's 16-byte load of one block is 512 contiguous bytes landing
// straight in its A registers: no shared-memory staging and no barrier in the main loop. A
// CTA of 8 warps owns kRT row tiles (16 kRT rows) and a K range; warp w takes blocks w,
// w + 8, ... of the range and requests kU x kRT of them (kU x kRT x 512 B) before it
// decodes the first, so HBM latency is paid once per batch and an SM keeps ~64 KB in
// flight. The warps' int32 tiles are summed through shared memory at the end.
// Split-K (only when the row tiles alone would not fill the GPU) is serial and
// deterministic: each CTA adds its int32 tile into ws with atomics (integer addition: order
// does not matter), and the last CTA of a row tile, found with an arrival counter,
// subtracts the row sums, applies the epilogue and zeroes ws and the counter. One launch.
//
// Bound: memory (weight bytes). Per 512-byte block a warp issues ~30 instructions (1
// LDG.128, 4 MMAs, ~15 SHF/LOP for the decode, 8 L1 loads for B shared by the kRT tiles),
// under the issue rate needed to stream ~12 B/clk/SM. H100 (dev/gemv_rs.py: cupy, no PDL,
// CUDA-graph replays, M = 1): 134 MB at 2.75 TB/s (92% of a read-only kernel streaming the
// same bytes; 1.41x the shared-memory-staged kernel this replaced), 16.8 MB in 10.3 us
// (read-only: 7.1-7.7 us; at this size launch and first-byte latency dominate, which PDL
// overlaps with the previous kernel).

#include "common.cuh"
#include "ternary_mma.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kN = 8;                  // activation rows per MMA (MMA N)
constexpr int kQuadWords = 8;          // 128 weights = 4 MMA k-steps = 8 words per row

// The fused MLP's gate/up epilogue. The gate/up matrix interleaves 16-row tiles, so a CTA's
// kRT tiles are kRT / 2 (gate, up) pairs: tile 2p holds gate rows i0 + 16p .. + 15 and tile
// 2p + 1 the up rows of the same i, i0 = 8 kRT blockIdx.x. v[o] holds the CTA's finished
// outputs (the GEMV epilogue's values) for (row, m) = ((tid + 256 o) / kMT, (tid + 256 o) %
// kMT). Writes h[m, i] = relu(g)^2 * u with the CPU reference's f32 operations (no
// contraction) and folds max|h| of each row into amax_bits, first in shared memory, then one
// global atomicMax per (CTA, row).
template <int kRT, int kNT, int kOut>
__device__ __forceinline__ void glu_epilogue(const float (&v)[kOut], float* __restrict__ h,
                                             unsigned* __restrict__ amax_bits, int M, int inter) {
    constexpr int kMT = kN * kNT;
    constexpr int kRows = 16 * kRT;
    static_assert(kRT % 2 == 0 && kRows * kMT == kThreads * kOut, "whole (gate, up) pairs, every output owned");
    __shared__ float vals[kRows * kMT];
    __shared__ unsigned row_max[kMT];
    const int tid = threadIdx.x;
#pragma unroll
    for (int o = 0; o < kOut; ++o) vals[tid + kThreads * o] = v[o];
    if (tid < kMT) row_max[tid] = 0u;
    __syncthreads();
    const int i0 = blockIdx.x * (kRows / 2);
    for (int idx = tid; idx < (kRows / 2) * kMT; idx += kThreads) {
        const int er = idx / kMT, em = idx % kMT, i = i0 + er;
        const int gr = 32 * (er / 16) + er % 16;  // gate row in the CTA; the up row is gr + 16
        if (em < M && i < inter) {
            const float g = vals[gr * kMT + em], u = vals[(gr + 16) * kMT + em];
            const float r = fmaxf(g, 0.0f);
            const float hv = __fmul_rn(__fmul_rn(r, r), u);
            h[static_cast<size_t>(em) * inter + i] = hv;
            atomicMax(&row_max[em], __float_as_uint(fabsf(hv)));
        }
    }
    __syncthreads();
    if (tid < M && tid < kMT) atomicMax(&amax_bits[tid], row_max[tid]);
}

// kRT: 16-row tiles per CTA (1, 2 or 4; even for the GLU pass, whose CTAs pair gate and up tiles).
// kU: blocks in flight per warp and row tile. kNT: MMA n-tiles of 8 activation rows (1: M
// <= 8, 4: M <= 32); every decoded A fragment feeds kNT MMAs, so a batch of up to 32 rows
// streams the weights once. kGlu: the fused MLP's gate/up pass (glu_epilogue); y is then h
// [M, inter]. kPreB: a batch's activation (B) registers are requested with its weights, a
// batch ahead, instead of when it is decoded. Their first touch is an L2 round trip that
// otherwise stalls every batch after its weights arrived; it pays when a warp streams >= 2
// batches (H100, 4096 x 16384 at M = 1: 9.9 -> 9.0 us) and costs kU x kNT x 16 registers
// (gemv_w2a8: 80 -> 128, 3 -> 2 CTAs per SM, so 6144 x 4096, one batch per warp, 5.3 -> 6.9 us).
template <int kRT, int kU, int kNT, bool kGlu, bool kPreB>
__device__ void gemv_w2a8_impl(const uint4* __restrict__ W, const float* __restrict__ gamma, int gamma_per_row,
                               const int8_t* __restrict__ xq, const int* __restrict__ xsum,
                               const float* __restrict__ xs, float* __restrict__ y, int* __restrict__ ws,
                               unsigned* __restrict__ tiles, int M, int n_out, int K, int quads_per_split,
                               unsigned* __restrict__ amax_bits = nullptr, int inter = 0,
                               int* __restrict__ glu_sums = nullptr) {
    constexpr int kMT = kN * kNT;               // activation rows per launch
    constexpr int kRows = 16 * kRT;             // output rows per CTA
    constexpr int kOutTotal = kRows * kMT;      // outputs per CTA
    constexpr int kOut = (kOutTotal + kThreads - 1) / kThreads;  // per thread
    __shared__ int red[kWarps][kOutTotal];
    __shared__ bool last_cta;

    const int wpr = (K + 15) / 16;
    const int quads = (wpr + kQuadWords - 1) / kQuadWords;
    const int n_tiles = (n_out + 15) / 16;
    const int kp = quads * 128;  // padded activation row length (codes_mma)
    const int q_begin = blockIdx.y * quads_per_split;
    const int q_end = min(quads, q_begin + quads_per_split);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int T0 = blockIdx.x * kRT;
    const int row0 = 16 * T0;

    // Epilogue scales are read after the PDL wait (below, once); B rows of this lane.
    const int8_t* xg[kNT];
    bool has_b[kNT];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
        has_b[nt] = kN * nt + g < M;
        xg[nt] = xq + static_cast<size_t>(has_b[nt] ? kN * nt + g : 0) * kp + 4 * t;
    }

    int c[kRT][kNT][4] = {};
    // A batch is kU blocks (k) x kRT row tiles of one warp; batches of a warp are kStride
    // blocks apart. Double-buffered in registers: batch i + 1 is requested before batch i is
    // decoded, so a warp always has a batch in flight while it computes.
    constexpr int kStride = kWarps * kU;
    auto load = [&](uint4(&wv)[kU][kRT], int q0) {
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const int q = q0 + kWarps * u;
#pragma unroll
            for (int r = 0; r < kRT; ++r) {
                const int tile = T0 + r;
                wv[u][r] = (q < q_end && tile < n_tiles)
                               ? tritter::ldg_stream(W + (static_cast<size_t>(tile) * quads + q) * 32 + lane)
                               : make_uint4(0u, 0u, 0u, 0u);
            }
        }
    };
    // B registers of block q for this lane (rows >= M and blocks past the range: zeros).
    auto load_b1 = [&](unsigned(&bq)[kNT][8], int q) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
            const int8_t* xb = xg[nt] + 128 * q;
#pragma unroll
            for (int j = 0; j < 8; ++j)
                bq[nt][j] = has_b[nt] && q < q_end ? __ldg(reinterpret_cast<const unsigned*>(xb + 16 * j)) : 0u;
        }
    };
    auto load_b = [&](unsigned(&bq)[kU][kNT][8], int q0) {
#pragma unroll
        for (int u = 0; u < kU; ++u) load_b1(bq[u], q0 + kWarps * u);
    };
    // `pre`: the batch's B registers when kPreB; otherwise unused and loaded here per block.
    auto compute = [&](const uint4(&wv)[kU][kRT], const unsigned(&pre)[kU][kNT][8], int q0) {
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const int q = q0 + kWarps * u;
            if (q >= q_end) break;
            unsigned bq[kNT][8];
            if constexpr (kPreB) {
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                    for (int j = 0; j < 8; ++j) bq[nt][j] = pre[u][nt][j];
            } else {
                load_b1(bq, q);
            }
#pragma unroll
            for (int r = 0; r < kRT; ++r) {
                const uint32_t lo[2] = {wv[u][r].x, wv[u][r].y};
                const uint32_t hi[2] = {wv[u][r].z, wv[u][r].w};
                tritter::ternary_quad_mma<1, kNT>(reinterpret_cast<int(&)[1][kNT][4]>(c[r]), lo, hi, bq);
            }
        }
    };
    uint4 wa[kU][kRT], wb[kU][kRT];
    unsigned ba[kU][kNT][8], bb[kU][kNT][8];
    int q0 = q_begin + warp;
    // The first batch is requested before the PDL wait: the weights are constant, so the
    // loads may overlap the previous kernel's tail (Gpu::launch_pdl). Activations, scales,
    // y and the split-K workspace are touched only after it.
    load(wa, q0);
    tritter::pdl_launch_dependents();
    tritter::pdl_wait();
    if constexpr (kPreB) load_b(ba, q0);
    while (q0 < q_end) {
        load(wb, q0 + kStride);
        if constexpr (kPreB) load_b(bb, q0 + kStride);
        compute(wa, ba, q0);
        q0 += kStride;
        if (q0 >= q_end) break;
        load(wa, q0 + kStride);
        if constexpr (kPreB) load_b(ba, q0 + kStride);
        compute(wb, bb, q0);
        q0 += kStride;
    }
    if (kGlu && blockIdx.x == 0 && blockIdx.y == 0) {
        // The fused MLP's A8 pass over h adds into these; this call's pass runs after us.
        for (int i = tid; i < M; i += kThreads) glu_sums[i] = 0;
    }

    // C fragment of (tile r, nt): c0,c1 -> (row 16 r + g, m 8 nt + 2t, +1); c2,c3 -> row + 8.
    int* mine = red[warp];
#pragma unroll
    for (int r = 0; r < kRT; ++r) {
        const int r0 = 16 * r + g;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
            const int m0 = kN * nt + 2 * t;
            mine[r0 * kMT + m0] = c[r][nt][0];
            mine[r0 * kMT + m0 + 1] = c[r][nt][1];
            mine[(r0 + 8) * kMT + m0] = c[r][nt][2];
            mine[(r0 + 8) * kMT + m0 + 1] = c[r][nt][3];
        }
    }
    __syncthreads();

    // Thread tid owns outputs (row, m) = ((tid + 256 o) / kMT, (tid + 256 o) % kMT); acc =
    // sum(code * x) over this CTA's range, out_scale = gamma_n / s_m.
    int acc[kOut];
    float out_scale[kOut];
    bool live[kOut];
#pragma unroll
    for (int o = 0; o < kOut; ++o) {
        const int idx = tid + kThreads * o, em = idx % kMT, en = row0 + idx / kMT;
        live[o] = idx < kOutTotal && em < M && en < n_out;
        acc[o] = 0;
        if (idx < kOutTotal) {
#pragma unroll
            for (int w = 0; w < kWarps; ++w) acc[o] += red[w][idx];
        }
        out_scale[o] = live[o] ? __fdiv_rn(gamma[gamma_per_row ? en : 0], xs[em]) : 0.0f;
    }

    if (gridDim.y == 1) {
        float v[kOut];
#pragma unroll
        for (int o = 0; o < kOut; ++o) {
            const int idx = tid + kThreads * o, em = idx % kMT, en = row0 + idx / kMT;
            v[o] = 0.0f;
            if (live[o]) {
                v[o] = static_cast<float>(acc[o] - xsum[em]) * out_scale[o];
                if (!kGlu) y[static_cast<size_t>(em) * n_out + en] = v[o];
            }
        }
        if constexpr (kGlu) glu_epilogue<kRT, kNT, kOut>(v, y, amax_bits, M, inter);
        return;
    }
    // Serial split-K: accumulate, then the last CTA of this row tile finishes.
#pragma unroll
    for (int o = 0; o < kOut; ++o) {
        const int idx = tid + kThreads * o, em = idx % kMT, en = row0 + idx / kMT;
        if (live[o]) atomicAdd(&ws[static_cast<size_t>(em) * n_out + en], acc[o]);
    }
    // Release: the barrier orders the CTA's atomics before thread 0's fence (cumulative),
    // which orders them before the arrival; one fence per CTA instead of one per thread.
    __syncthreads();
    if (tid == 0) {
        __threadfence();
        last_cta = atomicAdd(&tiles[blockIdx.x], 1u) == gridDim.y - 1;
        if (last_cta) __threadfence();  // acquire: the other CTAs' sums before our reads
    }
    __syncthreads();
    if (!last_cta) return;
    float v[kOut];
#pragma unroll
    for (int o = 0; o < kOut; ++o) {
        const int idx = tid + kThreads * o, em = idx % kMT, en = row0 + idx / kMT;
        v[o] = 0.0f;
        if (live[o]) {
            // read the final sum and reset the slot for the next call
            const int total = atomicExch(&ws[static_cast<size_t>(em) * n_out + en], 0);
            v[o] = static_cast<float>(total - xsum[em]) * out_scale[o];
            if (!kGlu) y[static_cast<size_t>(em) * n_out + en] = v[o];
        }
    }
    if (tid == 0) tiles[blockIdx.x] = 0;
    if constexpr (kGlu) glu_epilogue<kRT, kNT, kOut>(v, y, amax_bits, M, inter);
}

}  // namespace

#define GEMV_ENTRY(NAME, RT, U, NT, PB)                                                                        \
    extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                          \
        const uint4* __restrict__ W, const float* __restrict__ gamma, int gamma_per_row,                  \
        const int8_t* __restrict__ xq, const int* __restrict__ xsum, const float* __restrict__ xs,         \
        float* __restrict__ y, int* __restrict__ ws, unsigned* __restrict__ tiles, int M, int n_out, int K, \
        int quads_per_split) {                                                                            \
        gemv_w2a8_impl<RT, U, NT, false, PB>(W, gamma, gamma_per_row, xq, xsum, xs, y, ws, tiles, M, n_out, K, \
                                         quads_per_split);                                               \
    }

// Gate/up pass of the fused MLP: y is h [M, inter]; the trailing arguments are the row
// maxima (zero on entry; act_quant_mma_absmax_f32 resets them), inter, and the row sums of
// h's GEMV-ready codes, which this kernel zeroes for the A8 pass.
#define GEMV_GLU_ENTRY(NAME, RT, U, NT, PB)                                                                 \
    extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                          \
        const uint4* __restrict__ W, const float* __restrict__ gamma, int gamma_per_row,                  \
        const int8_t* __restrict__ xq, const int* __restrict__ xsum, const float* __restrict__ xs,         \
        float* __restrict__ h, int* __restrict__ ws, unsigned* __restrict__ tiles, int M, int n_out, int K, \
        int quads_per_split, unsigned* __restrict__ amax_bits, int inter, int* __restrict__ glu_sums) {   \
        gemv_w2a8_impl<RT, U, NT, true, PB>(W, gamma, gamma_per_row, xq, xsum, xs, h, ws, tiles, M, n_out, K, \
                                        quads_per_split, amax_bits, inter, glu_sums);                    \
    }

// Variants (the host picks one per shape, `launch_gemv` in crates/ternary-gemm/src/cuda/gemv.rs).
// Every warp streams 2 KB batches double-buffered; what differs is how many row tiles share a
// CTA. `_r4` (4 tiles, 64 rows): deep per-warp streams and each activation load shared by 4
// tiles; the choice whenever n_out / 64 CTAs fill the GPU (H100, M = 1..8: 16384 x 4096 in
// 7.4 us, 75% of a d2d copy's bandwidth; 32768 x 16384 at 94%). `gemv_w2a8` (1 tile, M = 1,
// where only lanes g = 0 load activations) and `_r2` (2 tiles, M = 2..8) keep 4x / 2x more
// CTAs for narrower matrices (4096 x 16384: 256 CTAs instead of a 5-way K split). `_kl` is
// `gemv_w2a8` with kPreB, for M = 1 where a warp streams >= 2 batches and 2 CTAs per SM still
// hold the grid (the 7B down projection: 9.66 -> 7.37 us in the PDL-chained bench graph).
// That rule assumes `_kl` fits 2 CTAs per SM: <= 128 registers (128 with nvcc 13.0 on sm_90
// and sm_120; see the build log's resource usage). `__launch_bounds__(kThreads, 2)` would
// pin it but changes the measured SASS, so it waits for a measurement.
GEMV_ENTRY(gemv_w2a8, 1, 4, 1, false)
GEMV_ENTRY(gemv_w2a8_kl, 1, 4, 1, true)
GEMV_ENTRY(gemv_w2a8_r2, 2, 2, 1, false)
GEMV_ENTRY(gemv_w2a8_r4, 4, 1, 1, false)

// The fused MLP's relu^2 * up step on the GEMM path (M >= 9, prefill): gu (m, gu_cols) f32 is
// the interleaved gate/up GEMM output of activation rows row0 .. row0 + m (16-row tiles: gate
// rows at 32 p + r, up rows at 32 p + 16 + r for i = 16 p + r). Writes h[row0 + r, i] =
// relu(g)^2 * u with glu_epilogue's f32 operations and folds max|h| of each row into
// amax_bits[row0 + r] (same bits as the GEMV path, so the A8 pass that follows is identical).
// Grid (ceil(inter / 256), m), 256 threads; memory bound (12 B per h value).
extern "C" __global__ void __launch_bounds__(256)
    glu_rows(const float* __restrict__ gu, int gu_cols, float* __restrict__ h, unsigned* __restrict__ amax_bits,
             int inter, int row0) {
    const int r = blockIdx.y, i = blockIdx.x * 256 + threadIdx.x;
    unsigned bits = 0u;
    if (i < inter) {
        const int gr = 32 * (i / 16) + i % 16;
        const float* row = gu + static_cast<size_t>(r) * gu_cols;
        const float g = row[gr], u = row[gr + 16];
        const float rr = fmaxf(g, 0.0f);
        const float hv = __fmul_rn(__fmul_rn(rr, rr), u);
        h[static_cast<size_t>(row0 + r) * inter + i] = hv;
        bits = __float_as_uint(fabsf(hv));
    }
    bits = __reduce_max_sync(0xffffffffu, bits);
    if ((threadIdx.x & 31) == 0 && bits != 0u) atomicMax(&amax_bits[row0 + r], bits);
}

GEMV_GLU_ENTRY(gemv_w2a8_glu, 2, 2, 1, false)
GEMV_GLU_ENTRY(gemv_w2a8_glu_r4, 4, 1, 1, false)
