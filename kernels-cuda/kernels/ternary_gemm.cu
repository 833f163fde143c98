// W2A8 ternary GEMM for prefill and training (M > 32 activation rows), DESIGN.md section 4.
//
//   W      tiled 2-bit codes (as ternary_gemv.cu: 16-row x 128-weight blocks of 512 B, block
//          (T, q) at word 128 (T * quads + q), lane L's A operand words at 4 L)
//   gamma  [1] or [n_out] f32
//   xq     [M, Kp] int8 codes in the GEMV/GEMM operand order (act_quant_mma_*), Kp % 128 == 0
//   xsum   [M] int32 row sums of the codes, xs [M] f32 activation scales
//   y      [M, n_out] f32   y[m, n] = (sum_k code[n,k] * xq[m,k] - xsum[m]) * (gamma_n / s_m)
//
// Algorithm: mma.sync.m16n8k32.s8 with A = weight codes, decoded in registers exactly as in
// the GEMV ((word >> 2j) & 0x03030303 in k-step j, so the 2-bit tile is all that crosses
// shared memory for the weights; the tiled layout makes a stage's weights whole 512-byte
// blocks, copied with 16-byte cp.async and read back with one conflict-free 16-byte shared
// load per lane and m-tile), and B = activation codes. dot(w, x) = dot(code, x) - sum(x).
// Thanks to the operand order, the 16 bytes at offset 32 j (+16) of a token row are B
// register 0 (1) of k-step j for lanes t = 0..3, so one ldmatrix.x4 over 8-token x 16-byte
// matrices yields both B registers of two n-tiles.
//
// Tiling (`Large`): CTA tile 128 weight rows x 128 tokens, 4 warps (2 x 2), warp tile
// 64 rows x 64 tokens = 4 x 8 MMAs per k-step, 128 per 128-weight quad: each decoded A
// fragment feeds 8 MMAs, each B register 4. K advances one quad per pipeline stage; 3
// stages of cp.async (16-byte chunks): weights 128 rows x 32 B, activations 128 tokens x
// 128 B, 22 KB per stage, 66 KB in all (under sm_120's 99 KB per block; three CTAs per
// H100 SM). Activation rows are padded to 144 B so the 8 rows an ldmatrix reads hit
// distinct banks; weight blocks need no padding (a warp reads 512 contiguous bytes). ~250 registers
// per thread, no spills. `Small` (64 x 64, 4 warps of 32 x 32) serves grids the large tile
// would leave idle.
//
// Per warp and k-step: 32 MMAs, 4 ldmatrix.x4, 4 decoded A fragments (one LDS.128 per
// m-tile and quad, a shift and an AND per register). Tuning (dev/ternary_gemm_tune.sh, H100,
// TOP/s at M = 4096, 4096 x 4096 / 16384 x 4096 / 4096 x 16384): v1 = 64 x 64 CTA, 4 warps
// of 32 x 32, 32-bit B loads: 470 at 4096^3; 128 x 128 with 8 warps of 64 x 32: 460-515;
// 256 x 128 with 8 warps of 64 x 64: 560-640; this tile: 612 / 628 / 745 (cuBLAS bf16 in
// the same run: 755 / 763 / 798 TFLOP/s). Larger K runs closer to the mainloop's rate:
// pipeline fill and the f32 epilogue (M x N x 4 bytes) weigh on K = 4096.
//
// Split-K for small grids (decode batches of 9..32 tokens: o / down projections of 4096
// rows are 64 small tiles for 132 SMs): grid.z splits of `qps` quads each; every split
// atomically adds its int32 partial sums into a zeroed (M, n_out) workspace and the last
// split of a tile (a per-tile arrival counter) reads the totals back with atomicExch (leaving
// the workspace and counter zeroed) and runs the usual epilogue, so results stay bit-exact.
// One launch, no memset. qps = quads and acc = counters = null without a split.
//
// Bound: compute (int8 tensor cores) for large M.

#include "common.cuh"
#include "ternary_mma.cuh"

namespace {

constexpr int kXPad = 16;  // bytes of padding per token row in shared memory

using tritter::cp_async_commit;
using tritter::cp_async_zfill;
using tritter::ldmatrix_x4;
using tritter::mma_s8;
using tritter::ternary_a_reg;

// One tile configuration: kBN weight rows x kBM tokens per CTA, kWN x kWM warps, kStages
// pipeline stages of kQPS quads (128 weights of K each).
template <int BN, int BM, int WN, int WM, int STAGES, int QPS>
struct GemmTile {
    static constexpr int kBN = BN, kBM = BM, kWN = WN, kWM = WM, kStages = STAGES, kQPS = QPS;
    static constexpr int kThreads = 32 * kWN * kWM;
    static constexpr int kMT = kBN / kWN / 16;  // 16-row MMA tiles per warp
    static constexpr int kNT = kBM / kWM / 8;   // 8-token MMA tiles per warp
    static constexpr int kXStride = 128 * kQPS + kXPad;  // bytes per token row in smem
    static constexpr int kWStageWords = kBN * 8 * kQPS;  // kBN / 16 x kQPS blocks of 128 words
    static constexpr int kXStageBytes = kBM * kXStride;
    static constexpr int kSmemBytes = kStages * (4 * kWStageWords + kXStageBytes);
    static_assert(kNT % 2 == 0, "ldmatrix.x4 loads n-tiles in pairs");
    static_assert(kMT >= 1 && kBN % (16 * kWN) == 0 && kBM % (8 * kWM) == 0, "tile shape");
};

template <class T>
__device__ __forceinline__ void gemm_w2a8_body(const uint32_t* __restrict__ W, const float* __restrict__ gamma,
                                               int gamma_per_row, const int8_t* __restrict__ xq,
                                               const int* __restrict__ xsum, const float* __restrict__ xs,
                                               float* __restrict__ y, int M, int n_out, int K, int qps,
                                               int* __restrict__ acc, unsigned* __restrict__ counters) {
    constexpr int kStages = T::kStages, kQPS = T::kQPS, kMT = T::kMT, kNT = T::kNT;
    constexpr int kBN = T::kBN, kBM = T::kBM, kThreads = T::kThreads;
    constexpr int kXStride = T::kXStride;
    extern __shared__ __align__(16) unsigned char smem[];
    uint32_t* wsm = reinterpret_cast<uint32_t*>(smem);  // [stage][kBN / 16][kQPS][128 words]
    int8_t* xsm = reinterpret_cast<int8_t*>(smem + 4 * kStages * T::kWStageWords);  // [stage][kBM][kXStride]

    const int wpr = (K + 15) / 16;
    const int quads = (wpr + 7) / 8;
    const int kp = quads * 128;
    const int n_tiles = (n_out + 15) / 16;
    // Split-K (gridDim.z > 1): this CTA's quads [q0, q1).
    const int q0 = blockIdx.z * qps, q1 = min(quads, q0 + qps);
    const int steps = (max(q1 - q0, 0) + kQPS - 1) / kQPS;
    const int n0 = blockIdx.x * kBN, m0 = blockIdx.y * kBM;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wn = (warp % T::kWN) * (16 * kMT), wm = (warp / T::kWN) * (8 * kNT);  // warp tile origin

    // One stage = kQPS quads: weights kBN / 16 x kQPS blocks of 32 16-byte chunks,
    // activations kBM tokens x 8 kQPS chunks, spread over the CTA's threads. Blocks past the
    // matrix (n_out, K) and tokens past M are zero-filled: their products are discarded or
    // meet zero activations.
    auto issue = [&](int step, int stage) {
        constexpr int kWChunks = (kBN / 16) * kQPS * 32, kXChunks = kBM * 8 * kQPS;
#pragma unroll
        for (int i = 0; i < (kWChunks + kThreads - 1) / kThreads; ++i) {
            const int idx = tid + kThreads * i;
            if (kWChunks % kThreads != 0 && idx >= kWChunks) break;
            const int blk = idx / 32, l = idx % 32;  // block (tile blk / kQPS, quad blk % kQPS)
            const int tile = n0 / 16 + blk / kQPS, q = q0 + kQPS * step + blk % kQPS;
            const bool ok = tile < n_tiles && q < q1;
            cp_async_zfill<16>(wsm + stage * T::kWStageWords + 128 * blk + 4 * l,
                               ok ? W + (static_cast<size_t>(tile) * quads + q) * 128 + 4 * l : W, ok ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < (kXChunks + kThreads - 1) / kThreads; ++i) {
            const int idx = tid + kThreads * i;
            if (kXChunks % kThreads != 0 && idx >= kXChunks) break;
            const int r = idx / (8 * kQPS), c = idx % (8 * kQPS);
            const int m = m0 + r;
            const int col = 128 * (q0 + kQPS * step) + 16 * c;
            const bool ok = m < M && col < min(kp, 128 * q1);
            cp_async_zfill<16>(xsm + stage * T::kXStageBytes + r * kXStride + 16 * c,
                               ok ? xq + static_cast<size_t>(m) * kp + col : xq, ok ? 16 : 0);
        }
        cp_async_commit();
    };

    // ldmatrix row of this lane: matrix l / 8 = (n-tile pair member l / 16, register (l / 8) % 2).
    const int ld_row = wm + 8 * (lane >> 4) + (lane & 7);
    const int ld_col = 16 * ((lane >> 3) & 1);

    int c[kMT][kNT][4] = {};
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < steps) issue(s, s);
        else cp_async_commit();
    }
    for (int step = 0; step < steps; ++step) {
        tritter::cp_async_wait<kStages - 2>();
        __syncthreads();  // stage `step` visible to all; every warp is done with step - 1
        {
            const int pre = step + kStages - 1;  // refills the stage computed in step - 1
            if (pre < steps) issue(pre, pre % kStages);
            else cp_async_commit();
        }
        const int stage = step % kStages;
#pragma unroll
        for (int qq = 0; qq < kQPS; ++qq) {
            const uint32_t* ws = wsm + stage * T::kWStageWords + 128 * qq;
            const int8_t* xsb = xsm + stage * T::kXStageBytes + 128 * qq;
            uint32_t lo[kMT][2], hi[kMT][2];  // [m-tile][row g / g+8]
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
                const uint4 v = *reinterpret_cast<const uint4*>(ws + 128 * (((wn >> 4) + mt) * kQPS) + 4 * lane);
                lo[mt][0] = v.x;
                lo[mt][1] = v.y;
                hi[mt][0] = v.z;
                hi[mt][1] = v.w;
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                unsigned b[kNT][2];
#pragma unroll
                for (int p = 0; p < kNT / 2; ++p) {
                    unsigned r[4];
                    ldmatrix_x4(r, xsb + (ld_row + 16 * p) * kXStride + 32 * j + ld_col);
                    b[2 * p][0] = r[0];
                    b[2 * p][1] = r[1];
                    b[2 * p + 1][0] = r[2];
                    b[2 * p + 1][1] = r[3];
                }
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) {
                    const unsigned a0 = ternary_a_reg(lo[mt][0], j), a1 = ternary_a_reg(lo[mt][1], j);
                    const unsigned a2 = ternary_a_reg(hi[mt][0], j), a3 = ternary_a_reg(hi[mt][1], j);
#pragma unroll
                    for (int nt = 0; nt < kNT; ++nt) mma_s8(c[mt][nt], a0, a1, a2, a3, b[nt][0], b[nt][1]);
                }
            }
        }
    }
    tritter::cp_async_wait<0>();

    if (gridDim.z > 1) {
        // Split-K: every split adds its integer partial sums into acc (M, n_out) (exact, so
        // the order of arrival does not matter); the last split of the tile to arrive takes
        // the totals, leaves acc and its counter zeroed for the next launch, and runs the
        // epilogue.
        __shared__ unsigned s_last;
        // f(slot of acc, accumulator) for every output this thread holds.
        auto each_output = [&](auto&& f) {
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int n = n0 + wn + 16 * mt + 8 * h + g;
#pragma unroll
                    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int m = m0 + wm + 8 * nt + 2 * t + e;
                            if (n < n_out && m < M) f(acc + static_cast<size_t>(m) * n_out + n, c[mt][nt][2 * h + e]);
                        }
                }
        };
        each_output([](int* slot, int& v) { atomicAdd(slot, v); });
        __threadfence();
        __syncthreads();
        const unsigned tile_id = blockIdx.y * gridDim.x + blockIdx.x;
        if (tid == 0) s_last = atomicAdd(counters + tile_id, 1u) == gridDim.z - 1;
        __syncthreads();
        if (!s_last) return;
        __threadfence();
        each_output([](int* slot, int& v) { v = atomicExch(slot, 0); });
        if (tid == 0) counters[tile_id] = 0;
    }

    // Epilogue: c[mt][nt] = (rows wn + 16 mt + g (+8), tokens wm + 8 nt + 2t (+1)); the
    // same f32 operations as the CPU reference (a8_epilogue), so results are bit-exact.
    float scale[kNT][2];
    int sum[kNT][2];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int m = m0 + wm + 8 * nt + 2 * t + e;
            sum[nt][e] = m < M ? xsum[m] : 0;
            scale[nt][e] = m < M ? xs[m] : 1.0f;
        }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int n = n0 + wn + 16 * mt + 8 * h + g;
            if (n >= n_out) continue;
            const float gm = gamma[gamma_per_row ? n : 0];
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int m = m0 + wm + 8 * nt + 2 * t + e;
                    if (m < M)
                        y[static_cast<size_t>(m) * n_out + n] =
                            static_cast<float>(c[mt][nt][2 * h + e] - sum[nt][e]) * __fdiv_rn(gm, scale[nt][e]);
                }
        }
}

// The large tile (see the header) and a 64 x 64 tile for grids that the large one would
// leave mostly idle (M or n_out of a few hundred). Keep in step with GEMM_CONFIGS in
// crates/ternary-gemm/src/cuda/gemv.rs.
using Large = GemmTile<128, 128, 2, 2, 3, 1>;
using Small = GemmTile<64, 64, 2, 2, 4, 1>;

}  // namespace

#define TRITTER_GEMM_ARGS                                                                                      \
    const uint32_t *__restrict__ W, const float *__restrict__ gamma, int gamma_per_row,                      \
        const int8_t *__restrict__ xq, const int *__restrict__ xsum, const float *__restrict__ xs,           \
        float *__restrict__ y, int M, int n_out, int K, int qps, int *__restrict__ acc,                       \
        unsigned *__restrict__ counters
#define TRITTER_GEMM_PASS W, gamma, gamma_per_row, xq, xsum, xs, y, M, n_out, K, qps, acc, counters

extern "C" __global__ void __launch_bounds__(Large::kThreads) gemm_w2a8(TRITTER_GEMM_ARGS) {
    gemm_w2a8_body<Large>(TRITTER_GEMM_PASS);
}
extern "C" __global__ void __launch_bounds__(Small::kThreads) gemm_w2a8_small(TRITTER_GEMM_ARGS) {
    gemm_w2a8_body<Small>(TRITTER_GEMM_PASS);
}

// Tuning entry (dev/ternary_gemm_tune.sh): any configuration from -D flags.
#ifdef TRITTER_GEMM_TUNE
using Tune = GemmTile<TUNE_BN, TUNE_BM, TUNE_WN, TUNE_WM, TUNE_STAGES, TUNE_QPS>;
extern "C" __global__ void __launch_bounds__(Tune::kThreads, TUNE_MINB) gemm_w2a8_tune(TRITTER_GEMM_ARGS) {
    gemm_w2a8_body<Tune>(TRITTER_GEMM_PASS);
}
#endif
