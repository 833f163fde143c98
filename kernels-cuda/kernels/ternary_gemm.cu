// W2A8 ternary GEMM for prefill and training (M > 32 activation rows), DESIGN.md section 4.
//
//   W      [n_out, wpr] u32 canonical 2-bit codes (as ternary_gemv.cu), wpr % 4 == 0
//   gamma  [1] or [n_out] f32
//   xq     [M, Kp] int8 codes in the GEMV/GEMM operand order (act_quant_mma_*), Kp % 128 == 0
//   xsum   [M] int32 row sums of the codes, xs [M] f32 activation scales
//   y      [M, n_out] f32   y[m, n] = (sum_k code[n,k] * xq[m,k] - xsum[m]) * (gamma_n / s_m)
//
// Algorithm: mma.sync.m16n8k32.s8 with A = weight codes (decoded in registers exactly as in
// the GEMV: (word[t] >> 2j) & 0x03030303 in k-step j) and B = activation codes (one 32-bit
// shared load per register thanks to the operand order). dot(w, x) = dot(code, x) - sum(x).
//
// Tiling: CTA tile 64 weight rows x 64 tokens, 4 warps (2 x 2), warp tile 32 rows x 32 tokens
// = 2 x 4 MMAs per k-step, 32 per 128-weight quad. K advances one quad per pipeline stage;
// 3 stages of cp.async (16-byte chunks): weights 64 rows x 32 B, activations 64 tokens x
// 128 B. Shared rows are padded (weights 12 words, activations 144 B) so the 8 row groups of
// a warp hit distinct banks. Each decoded A fragment feeds 4 MMAs, each B register 2.
//
// Bound: compute (int8 tensor cores) for large M; this first version issues plain 32-bit
// shared loads for both operands (no ldmatrix yet).

#include "common.cuh"
#include "ternary_mma.cuh"

namespace {

constexpr int kBN = 64;            // weight rows per CTA
constexpr int kBM = 64;            // tokens per CTA
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kStages = 3;
constexpr int kWStride = 8 + 4;    // words per weight row in smem (8 data + 4 pad)
constexpr int kXStride = 128 + 16; // bytes per token row in smem (128 data + 16 pad)
constexpr int kWStageWords = kBN * kWStride;
constexpr int kXStageBytes = kBM * kXStride;

using tritter::cp_async_commit;
using tritter::cp_async_zfill;
using tritter::mma_s8;
using tritter::ternary_a_reg;

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
    gemm_w2a8(const uint32_t* __restrict__ W, const float* __restrict__ gamma, int gamma_per_row,
              const int8_t* __restrict__ xq, const int* __restrict__ xsum, const float* __restrict__ xs,
              float* __restrict__ y, int M, int n_out, int K) {
    extern __shared__ __align__(16) unsigned char smem[];
    uint32_t* wsm = reinterpret_cast<uint32_t*>(smem);                                  // [stage][64][12]
    int8_t* xsm = reinterpret_cast<int8_t*>(smem + 4 * kStages * kWStageWords);         // [stage][64][144]

    const int wpr = (K + 15) / 16;
    const int quads = (wpr + 7) / 8;
    const int kp = quads * 128;
    const int n0 = blockIdx.x * kBN, m0 = blockIdx.y * kBM;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wn = (warp & 1) * 32, wm = (warp >> 1) * 32;  // warp tile origin (rows, tokens)

    // Copy assignment: weights 64 rows x 2 chunks = 128 chunks (one per thread);
    // activations 64 tokens x 8 chunks = 512 chunks (four per thread).
    auto issue = [&](int q, int stage) {
        {
            const int r = tid >> 1, c = tid & 1;
            const int n = n0 + r;
            const int word = 8 * q + 4 * c;
            const bool ok = n < n_out && word < wpr;
            cp_async_zfill<16>(wsm + stage * kWStageWords + r * kWStride + 4 * c, ok ? W + static_cast<size_t>(n) * wpr + word : W, ok ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int idx = tid + kThreads * i;
            const int r = idx >> 3, c = idx & 7;
            const int m = m0 + r;
            const bool ok = m < M;
            cp_async_zfill<16>(xsm + stage * kXStageBytes + r * kXStride + 16 * c,
                 ok ? xq + static_cast<size_t>(m) * kp + 128 * q + 16 * c : xq, ok ? 16 : 0);
        }
        cp_async_commit();
    };

    int c[2][4][4] = {};
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < quads) issue(s, s);
        else cp_async_commit();
    }
    for (int q = 0; q < quads; ++q) {
        const int pre = q + kStages - 1;
        if (pre < quads) issue(pre, pre % kStages);
        else cp_async_commit();
        tritter::cp_async_wait<kStages - 1>();
        __syncthreads();

        const int stage = q % kStages;
        const uint32_t* ws = wsm + stage * kWStageWords;
        const int8_t* xsb = xsm + stage * kXStageBytes;
        uint32_t lo[2][2], hi[2][2];  // [m-tile][row g / g+8]
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t* wr = ws + (wn + 16 * mt + 8 * h + g) * kWStride + t;
                lo[mt][h] = wr[0];
                hi[mt][h] = wr[4];
            }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            unsigned b[4][2];
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int8_t* xr = xsb + (wm + 8 * nt + g) * kXStride + 32 * j + 4 * t;
                b[nt][0] = *reinterpret_cast<const unsigned*>(xr);
                b[nt][1] = *reinterpret_cast<const unsigned*>(xr + 16);
            }
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const unsigned a0 = ternary_a_reg(lo[mt][0], j), a1 = ternary_a_reg(lo[mt][1], j);
                const unsigned a2 = ternary_a_reg(hi[mt][0], j), a3 = ternary_a_reg(hi[mt][1], j);
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) mma_s8(c[mt][nt], a0, a1, a2, a3, b[nt][0], b[nt][1]);
            }
        }
        __syncthreads();  // the stage is refilled by the next iteration's issue
    }
    tritter::cp_async_wait<0>();

    // Epilogue: c[mt][nt] = (rows wn + 16 mt + g (+8), tokens wm + 8 nt + 2t (+1)).
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int n = n0 + wn + 16 * mt + 8 * h + g;
            if (n >= n_out) continue;
            const float gm = gamma[gamma_per_row ? n : 0];
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int m = m0 + wm + 8 * nt + 2 * t + e;
                    if (m < M)
                        y[static_cast<size_t>(m) * n_out + n] =
                            static_cast<float>(c[mt][nt][2 * h + e] - xsum[m]) * __fdiv_rn(gm, xs[m]);
                }
        }
}
