// W2A8 ternary GEMV for decode and small batches (M = 1..8, and 9..32 with the _m32
// variants), DESIGN.md section 4.
//
//   W      [n_out, wpr]  u32, canonical 2-bit codes (code = w + 1; weight k of a row at bits
//                        2*(k%16) of word k/16; rows padded with code 1), wpr = ceil(K/16)
//   gamma  [1] or [n_out] f32 weight scales
//   xq     [M, Kp] int8 activation codes in MMA k order (Kp = ceil(K/128)*128, zero padded;
//          written by act_quant_mma_* / a8_to_mma), xsum [M] int32 row sums of the codes,
//          xs [M] f32 activation scales (s = 127 / absmax)
//   y      [M, n_out] f32   y[m, n] = acc[m, n] * (gamma_n / s_m),
//                           acc[m, n] = sum_k (code[n, k] - 1) * xq[m, k]   (exact, int32)
//   ws     [32, n_out] int32 split-K accumulators, zero between calls (the last CTA resets them)
//   tiles  [ceil(n_out/32)] u32 split-K arrival counters, zero between calls
//
// Algorithm. The integer dot product runs on the tensor cores: mma.sync.m16n8k32.s8.s8.s32
// with A = 16 weight rows x 32 k (codes 0..2 as s8) and B = 32 k x 8 activation rows
// (columns >= M are zero registers; the _m32 variants issue 4 MMAs per decoded A fragment). dot(w, x) = dot(code, x) - sum(x), so the codes feed the
// MMA directly and one subtraction per output removes the offset.
// Decode is at most 2 instructions per A register: the MMA's k order inside each 128-weight
// quad (8 words per row) is permuted so that in k-step j lane (g, t) feeds the MMA
// (word[t] >> 2j) & 0x03030303 and (word[t+4] >> 2j) & 0x03030303, i.e. the codes of weights
// {16t + j, 16t + 4 + j, 16t + 8 + j, 16t + 12 + j}: the shift is an immediate and two
// 32-bit shared loads per row cover all four k-steps. The activations arrive in the same
// order from the quantization kernel (xq[128b + 32j + 4t + e] = x[128b + 16t + 4e + j]), so
// each B register is one 32-bit load from L1/L2 and no CTA spends shared memory or a
// prologue on them. The weight stream is read exactly as stored: no repacking.
//
// Tiling and pipeline. A CTA owns 32 output rows (two 16-row MMA tiles per warp, sharing each
// B fragment) and one K range of up to 4096 weights (blockIdx.y of ksplit). The CTA's whole
// weight tile (32 rows x range, <= 33 KB) is requested at once with 16-byte cp.async in 4
// commit groups along k, so every byte a CTA needs is in flight after its first
// instructions and HBM latency is paid about once per CTA; the warps
// then consume the groups in order as they land. Every weight byte is fetched once
// (coalesced, no per-lane redundancy); the four lanes of an MMA row group read it from shared
// memory by broadcast. Weight rows in shared memory are padded by 4 words so the 8 row groups
// of a warp hit distinct banks.
// The 8 warps split each group's k-steps; their 32 x 8 int32 tiles are summed through shared
// memory (reusing the weight buffer).
// Split-K (ksplit > 1) is serial and deterministic: each CTA adds its int32 sum(code * x)
// tile into ws with
// atomics (integer addition: order does not matter), and the last CTA of a row tile, found
// with an arrival counter, subtracts the row sums, applies the epilogue and zeroes ws and
// the counter for the next call. One launch per call.
//
// Bound: memory (weight bytes). Per 128 packed bytes (one MMA) a warp issues about 12
// instructions (1 MMA, <= 8 SHF/LOP, 1 LDS for A, 1 L1 load for B), within the issue rate
// needed to stream ~15 B/clk/SM on an H100 or RTX 5080; the copies are issued once per CTA.

#include "common.cuh"
#include "ternary_mma.cuh"

namespace {

using tritter::cp_async_commit;
using tritter::cp_async_wait;
using tritter::cp_async_zfill;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTiles = 2;              // 16-row MMA tiles per warp
constexpr int kRows = 16 * kTiles;     // output rows per CTA
constexpr int kN = 8;                  // activation rows per MMA (MMA N)
constexpr int kQuadWords = 8;          // 128 weights = 4 MMA k-steps = 8 words per row
constexpr int kStages = 4;             // cp.async commit groups per CTA range
constexpr int kRowPadW = 4;            // words of padding per weight row in shared memory

__device__ __forceinline__ void wait_stage(int pending) {
    // wait_group needs an immediate: dispatch on the (small, uniform) number still pending.
    if (pending >= 3) cp_async_wait<3>();
    else if (pending == 2) cp_async_wait<2>();
    else if (pending == 1) cp_async_wait<1>();
    else cp_async_wait<0>();
}

// kVec: rows are 16-byte aligned (wpr % 4 == 0): 16-byte copies; else 4-byte copies.
// kNT: MMA n-tiles of 8 activation rows (1: M <= 8, 4: M <= 32); every decoded A fragment
// feeds kNT MMAs, so a batch of up to 32 rows streams the weights once.
// The fused MLP's gate/up epilogue. The gate/up matrix interleaves 16-row tiles, so a CTA's
// 32 rows are gate rows i0..i0+15 (tile 0) and the up rows of the same i (tile 1), i0 =
// 16 blockIdx.x. v[o] holds the CTA's finished outputs (the GEMV epilogue's values) for
// (row, m) = ((tid + 256 o) / kMT, (tid + 256 o) % kMT). Writes h[m, i] = relu(g)^2 * u with
// the CPU reference's f32 operations (no contraction) and folds max|h| of each row into
// amax_bits, first in shared memory, then one global atomicMax per (CTA, row).
template <int kNT>
__device__ __forceinline__ void glu_epilogue(const float (&v)[kNT], float* __restrict__ h,
                                             unsigned* __restrict__ amax_bits, int M, int inter) {
    constexpr int kMT = kN * kNT;
    __shared__ float vals[kRows * kMT];
    __shared__ unsigned row_max[kMT];
    const int tid = threadIdx.x;
#pragma unroll
    for (int o = 0; o < kNT; ++o) vals[tid + kThreads * o] = v[o];
    if (tid < kMT) row_max[tid] = 0u;
    __syncthreads();
    const int i0 = blockIdx.x * (kRows / 2);
    for (int idx = tid; idx < (kRows / 2) * kMT; idx += kThreads) {
        const int er = idx / kMT, em = idx % kMT, i = i0 + er;
        if (em < M && i < inter) {
            const float g = vals[er * kMT + em], u = vals[(er + kRows / 2) * kMT + em];
            const float r = fmaxf(g, 0.0f);
            const float hv = __fmul_rn(__fmul_rn(r, r), u);
            h[static_cast<size_t>(em) * inter + i] = hv;
            atomicMax(&row_max[em], __float_as_uint(fabsf(hv)));
        }
    }
    __syncthreads();
    if (tid < M && tid < kMT) atomicMax(&amax_bits[tid], row_max[tid]);
}

// kGlu: the fused MLP's gate/up pass (see glu_epilogue); y is then h [M, inter].
template <bool kVec, int kNT, bool kGlu = false>
__device__ void gemv_w2a8_impl(const uint32_t* __restrict__ W, const float* __restrict__ gamma, int gamma_per_row,
                               const int8_t* __restrict__ xq, const int* __restrict__ xsum, const float* __restrict__ xs,
                               float* __restrict__ y, int* __restrict__ ws, unsigned* __restrict__ tiles, int M,
                               int n_out, int K, int quads_per_split, unsigned* __restrict__ amax_bits = nullptr,
                               int inter = 0, int* __restrict__ glu_sums = nullptr) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ bool last_cta;

    const int wpr = (K + 15) / 16;
    const int total_quads = (wpr + kQuadWords - 1) / kQuadWords;
    const int q_begin = blockIdx.y * quads_per_split;
    const int nq = min(total_quads, q_begin + quads_per_split) - q_begin;
    const int words = nq * kQuadWords;          // words per row in this CTA's range
    const int w_stride = words + kRowPadW;      // smem words per weight row
    const int kp = total_quads * 128;           // padded activation row length (codes_mma)
    const int word0 = q_begin * kQuadWords;

    constexpr int kMT = kN * kNT;               // activation rows per launch
    // Layout: weights 32 x w_stride words, reused as kWarps x 32 x kMT int after compute.
    // The host computes the same size.
    uint32_t* wsm = reinterpret_cast<uint32_t*>(smem);
    int* red = reinterpret_cast<int*>(smem);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * kRows;

    // 1. The whole weight tile, in kStages commit groups along k. Thread (row tid/8, lane
    // tid%8) copies 16-byte chunks tid%8, tid%8 + 8, ... of its row: coalesced, pointers
    // computed once.
    const int stage_quads = (nq + kStages - 1) / kStages;
    {
        const int r = tid / 8, c8 = tid % 8;
        const int n = row0 + r;
        const bool row_ok = n < n_out;
        const uint32_t* src = W + static_cast<size_t>(row_ok ? n : 0) * wpr + word0;
        uint32_t* dst = wsm + r * w_stride;
        for (int st = 0; st < kStages; ++st) {
            const int sw0 = min(nq, st * stage_quads) * kQuadWords;
            const int sw1 = min(nq, (st + 1) * stage_quads) * kQuadWords;
            if (kVec) {
                for (int c = sw0 + 4 * c8; c < sw1; c += 32) {
                    const bool ok = row_ok && word0 + c < wpr;  // wpr % 4 == 0: chunks all in or out
                    cp_async_zfill<16>(dst + c, ok ? src + c : W, ok ? 16 : 0);
                }
            } else {
                for (int c = sw0 + c8; c < sw1; c += 8) {
                    const bool ok = row_ok && word0 + c < wpr;
                    cp_async_zfill<4>(dst + c, ok ? src + c : W, ok ? 4 : 0);
                }
            }
            cp_async_commit();
        }
    }
    // PDL: the weight copies above read only constant data, so they may overlap the end of
    // the previous kernel (Gpu::launch_pdl); the next kernel's CTAs may start theirs now.
    // Activations, scales, y and the split-K workspace are touched only after the wait.
    tritter::pdl_launch_dependents();
    tritter::pdl_wait();
    if (kGlu && blockIdx.x == 0 && blockIdx.y == 0) {
        // The fused MLP's A8 pass over h adds into these; this call's pass runs after us.
        for (int i = tid; i < M; i += kThreads) glu_sums[i] = 0;
    }

    // Epilogue operands early, so their latency hides under the main loop. Thread tid
    // owns outputs (row, m) = ((tid + 256 o) / kMT, (tid + 256 o) % kMT), o < kNT.
    float out_scale[kNT];
#pragma unroll
    for (int o = 0; o < kNT; ++o) {
        const int idx = tid + kThreads * o, em = idx % kMT, en = row0 + idx / kMT;
        out_scale[o] = (em < M && en < n_out) ? __fdiv_rn(gamma[gamma_per_row ? en : 0], xs[em]) : 0.0f;
    }

    // 2. Consume the stages as they land; warps split each stage's quads. In k-step j of a
    // quad, lane (g, t) feeds the MMA (word t >> 2j) & 0x03030303 and (word t+4 >> 2j) of
    // rows g and g+8: the shift is an immediate and one pair of shared loads per row covers
    // all 4 k-steps of the quad.
    // B operands come straight from the GEMV-ready activations (already in MMA k order,
    // L1/L2 resident: M x K bytes shared by every CTA).
    bool has_b[kNT];
    const int8_t* xg[kNT];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
        has_b[nt] = kN * nt + g < M;
        xg[nt] = xq + static_cast<size_t>(has_b[nt] ? kN * nt + g : 0) * kp + 4 * t;
    }
    int c[kTiles][kNT][4] = {};
    for (int st = 0; st < kStages; ++st) {
        wait_stage(kStages - 1 - st);
        __syncthreads();
        const int qa = min(nq, st * stage_quads);
        const int qb = min(nq, (st + 1) * stage_quads);
        for (int q = qa + warp; q < qb; q += kWarps) {
            uint32_t lo[2 * kTiles], hi[2 * kTiles];
            tritter::ternary_quad_words(lo, hi, wsm + 8 * q, w_stride, g, t);
            unsigned bq[kNT][8];
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
                const int8_t* xb = xg[nt] + 128 * (q_begin + q);
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    bq[nt][j] = has_b[nt] ? __ldg(reinterpret_cast<const unsigned*>(xb + 16 * j)) : 0u;
            }
            tritter::ternary_quad_mma(c, lo, hi, bq);
        }
    }
    __syncthreads();  // all warps done with wsm: reuse it for the reduction

    // C fragment of (tile, nt): c0,c1 -> (row 16 tile + g, m 8 nt + 2t, +1); c2,c3 -> row + 8.
    int* mine = red + warp * (kRows * kMT);
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile) {
        const int r0 = 16 * tile + g;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
            const int m0 = kN * nt + 2 * t;
            mine[r0 * kMT + m0] = c[tile][nt][0];
            mine[r0 * kMT + m0 + 1] = c[tile][nt][1];
            mine[(r0 + 8) * kMT + m0] = c[tile][nt][2];
            mine[(r0 + 8) * kMT + m0 + 1] = c[tile][nt][3];
        }
    }
    __syncthreads();

    // acc = sum(code * x) over this CTA's range; dot(w, x) subtracts the row sum once.
    int acc[kNT];
#pragma unroll
    for (int o = 0; o < kNT; ++o) {
        acc[o] = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) acc[o] += red[w * (kRows * kMT) + tid + kThreads * o];
    }

    if (gridDim.y == 1) {
        float v[kNT];
#pragma unroll
        for (int o = 0; o < kNT; ++o) {
            const int idx = tid + kThreads * o, em = idx % kMT, en = row0 + idx / kMT;
            v[o] = 0.0f;
            if (em < M && en < n_out) {
                v[o] = static_cast<float>(acc[o] - xsum[em]) * out_scale[o];
                if (!kGlu) y[static_cast<size_t>(em) * n_out + en] = v[o];
            }
        }
        if (kGlu) glu_epilogue<kNT>(v, y, amax_bits, M, inter);
        return;
    }
    // Serial split-K: accumulate, then the last CTA of this row tile finishes.
#pragma unroll
    for (int o = 0; o < kNT; ++o) {
        const int idx = tid + kThreads * o, em = idx % kMT, en = row0 + idx / kMT;
        if (em < M && en < n_out) atomicAdd(&ws[static_cast<size_t>(em) * n_out + en], acc[o]);
    }
    // Release: the barrier orders the CTA's atomics before thread 0's fence (cumulative),
    // which orders them before the arrival; one fence per CTA instead of one per thread
    // (H100: 4-5% on split-K shapes).
    __syncthreads();
    if (tid == 0) {
        __threadfence();
        last_cta = atomicAdd(&tiles[blockIdx.x], 1u) == gridDim.y - 1;
        if (last_cta) __threadfence();  // acquire: the other CTAs' sums before our reads
    }
    __syncthreads();
    if (!last_cta) return;
    float v[kNT];
#pragma unroll
    for (int o = 0; o < kNT; ++o) {
        const int idx = tid + kThreads * o, em = idx % kMT, en = row0 + idx / kMT;
        v[o] = 0.0f;
        if (em < M && en < n_out) {
            // read the final sum and reset the slot for the next call
            const int total = atomicExch(&ws[static_cast<size_t>(em) * n_out + en], 0);
            v[o] = static_cast<float>(total - xsum[em]) * out_scale[o];
            if (!kGlu) y[static_cast<size_t>(em) * n_out + en] = v[o];
        }
    }
    if (tid == 0) tiles[blockIdx.x] = 0;
    if (kGlu) glu_epilogue<kNT>(v, y, amax_bits, M, inter);
}

// Persistent variant (M <= 8, rows 16-byte aligned): a grid of about one wave of CTAs loops
// over (row tile, K split) work items. The next item's weight tile is copied into the other
// half of a double buffer while the current one is computed, so a CTA's copy issue, wait and
// epilogue overlap with streaming instead of adding up per item. Same math, operand order
// and split-K protocol as gemv_w2a8_impl.
__device__ void gemv_w2a8_persistent_impl(const uint32_t* __restrict__ W, const float* __restrict__ gamma,
                                          int gamma_per_row, const int8_t* __restrict__ xq,
                                          const int* __restrict__ xsum, const float* __restrict__ xs,
                                          float* __restrict__ y, int* __restrict__ ws, unsigned* __restrict__ tiles,
                                          int M, int n_out, int K, int quads_per_split, int ksplit) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ bool last_cta;
    const int wpr = (K + 15) / 16;
    const int total_quads = (wpr + kQuadWords - 1) / kQuadWords;
    const int kp = total_quads * 128;
    const int w_stride = quads_per_split * kQuadWords + kRowPadW;
    const int buf_words = kRows * w_stride;
    uint32_t* const buf0 = reinterpret_cast<uint32_t*>(smem);  // buffer b at buf0 + b * buf_words
    int* red = reinterpret_cast<int*>(smem + 2 * 4 * buf_words);  // [kWarps][32 * 8]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int row_tiles = (n_out + kRows - 1) / kRows;
    const int items = row_tiles * ksplit;

    auto issue = [&](int item, uint32_t* dst_base) {
        const int tile = item / ksplit, split = item % ksplit;
        const int q_begin = split * quads_per_split;
        const int nq = min(total_quads, q_begin + quads_per_split) - q_begin;
        const int word0 = q_begin * kQuadWords, words = nq * kQuadWords;
        const int r = tid / 8, c8 = tid % 8;
        const int n = tile * kRows + r;
        const bool row_ok = n < n_out;
        const uint32_t* src = W + static_cast<size_t>(row_ok ? n : 0) * wpr + word0;
        uint32_t* dst = dst_base + r * w_stride;
        for (int c = 4 * c8; c < words; c += 32) {
            const bool ok = row_ok && word0 + c < wpr;
            cp_async_zfill<16>(dst + c, ok ? src + c : W, ok ? 16 : 0);
        }
        cp_async_commit();
    };

    const bool has_b = g < M;
    int item = blockIdx.x;
    int cur = 0;
    if (item < items) issue(item, buf0);
    // PDL: as in gemv_w2a8_impl, only the first weight tile is requested before the wait.
    tritter::pdl_launch_dependents();
    tritter::pdl_wait();
    for (; item < items; item += gridDim.x, cur ^= 1) {
        const int next = item + gridDim.x;
        if (next < items) issue(next, buf0 + (cur ^ 1) * buf_words);
        else cp_async_commit();  // keep the group count uniform
        cp_async_wait<1>();      // the current item's copies have landed
        __syncthreads();

        const int tile = item / ksplit, split = item % ksplit;
        const int q_begin = split * quads_per_split;
        const int nq = min(total_quads, q_begin + quads_per_split) - q_begin;
        const int row0 = tile * kRows;
        const uint32_t* wsm = buf0 + cur * buf_words;
        const int8_t* xg = xq + static_cast<size_t>(has_b ? g : 0) * kp + 4 * t;
        int c[kTiles][1][4] = {};
        for (int q = warp; q < nq; q += kWarps) {
            uint32_t lo[2 * kTiles], hi[2 * kTiles];
            tritter::ternary_quad_words(lo, hi, wsm + 8 * q, w_stride, g, t);
            const int8_t* xb = xg + 128 * (q_begin + q);
            unsigned bq[1][8];
#pragma unroll
            for (int j = 0; j < 8; ++j) bq[0][j] = has_b ? __ldg(reinterpret_cast<const unsigned*>(xb + 16 * j)) : 0u;
            tritter::ternary_quad_mma(c, lo, hi, bq);
        }
        int* mine = red + warp * (kRows * kN);
#pragma unroll
        for (int tl = 0; tl < kTiles; ++tl) {
            const int r0 = 16 * tl + g;
            mine[r0 * kN + 2 * t] = c[tl][0][0];
            mine[r0 * kN + 2 * t + 1] = c[tl][0][1];
            mine[(r0 + 8) * kN + 2 * t] = c[tl][0][2];
            mine[(r0 + 8) * kN + 2 * t + 1] = c[tl][0][3];
        }
        __syncthreads();  // tiles written; all warps done reading buf[cur]
        const int er = tid / kN, em = tid % kN, en = row0 + er;
        const bool live = em < M && en < n_out;
        int acc = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) acc += red[w * (kRows * kN) + tid];
        if (ksplit == 1) {
            if (live)
                y[static_cast<size_t>(em) * n_out + en] =
                    static_cast<float>(acc - xsum[em]) * __fdiv_rn(gamma[gamma_per_row ? en : 0], xs[em]);
        } else {
            if (live) atomicAdd(&ws[static_cast<size_t>(em) * n_out + en], acc);
            __threadfence();
            __syncthreads();
            if (tid == 0) last_cta = atomicAdd(&tiles[tile], 1u) == ksplit - 1;
            __syncthreads();
            if (last_cta) {
                __threadfence();
                if (live) {
                    const int total = atomicExch(&ws[static_cast<size_t>(em) * n_out + en], 0);
                    y[static_cast<size_t>(em) * n_out + en] =
                        static_cast<float>(total - xsum[em]) * __fdiv_rn(gamma[gamma_per_row ? en : 0], xs[em]);
                }
                if (tid == 0) tiles[tile] = 0;
            }
        }
        __syncthreads();  // red is rewritten by the next item
    }
    cp_async_wait<0>();
}

}  // namespace

#define GEMV_ENTRY(NAME, VEC, NT)                                                                         \
    extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                          \
        const uint32_t* __restrict__ W, const float* __restrict__ gamma, int gamma_per_row,               \
        const int8_t* __restrict__ xq, const int* __restrict__ xsum, const float* __restrict__ xs,         \
        float* __restrict__ y, int* __restrict__ ws, unsigned* __restrict__ tiles, int M, int n_out, int K, \
        int quads_per_split) {                                                                            \
        gemv_w2a8_impl<VEC, NT>(W, gamma, gamma_per_row, xq, xsum, xs, y, ws, tiles, M, n_out, K,         \
                                quads_per_split);                                                         \
    }

// Gate/up pass of the fused MLP: y is h [M, inter]; the trailing arguments are the row
// maxima (zero on entry; act_quant_mma_absmax_f32 resets them), inter, and the row sums of
// h's GEMV-ready codes, which this kernel zeroes for the A8 pass.
#define GEMV_GLU_ENTRY(NAME, VEC, NT)                                                                     \
    extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                          \
        const uint32_t* __restrict__ W, const float* __restrict__ gamma, int gamma_per_row,               \
        const int8_t* __restrict__ xq, const int* __restrict__ xsum, const float* __restrict__ xs,         \
        float* __restrict__ h, int* __restrict__ ws, unsigned* __restrict__ tiles, int M, int n_out, int K, \
        int quads_per_split, unsigned* __restrict__ amax_bits, int inter, int* __restrict__ glu_sums) {   \
        gemv_w2a8_impl<VEC, NT, true>(W, gamma, gamma_per_row, xq, xsum, xs, h, ws, tiles, M, n_out, K,   \
                                      quads_per_split, amax_bits, inter, glu_sums);                       \
    }

GEMV_GLU_ENTRY(gemv_w2a8_glu_vec, true, 1)
GEMV_GLU_ENTRY(gemv_w2a8_glu_word, false, 1)
GEMV_GLU_ENTRY(gemv_w2a8_glu_vec_m32, true, 4)
GEMV_GLU_ENTRY(gemv_w2a8_glu_word_m32, false, 4)

GEMV_ENTRY(gemv_w2a8_vec, true, 1)
GEMV_ENTRY(gemv_w2a8_word, false, 1)
GEMV_ENTRY(gemv_w2a8_vec_m32, true, 4)
GEMV_ENTRY(gemv_w2a8_word_m32, false, 4)

extern "C" __global__ void __launch_bounds__(kThreads) gemv_w2a8_persistent(
    const uint32_t* __restrict__ W, const float* __restrict__ gamma, int gamma_per_row,
    const int8_t* __restrict__ xq, const int* __restrict__ xsum, const float* __restrict__ xs, float* __restrict__ y,
    int* __restrict__ ws, unsigned* __restrict__ tiles, int M, int n_out, int K, int quads_per_split, int ksplit) {
    gemv_w2a8_persistent_impl(W, gamma, gamma_per_row, xq, xsum, xs, y, ws, tiles, M, n_out, K, quads_per_split,
                              ksplit);
}
