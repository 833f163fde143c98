// W2A8 ternary GEMV for decode (M = 1..8 activation rows), DESIGN.md section 4.
//
//   W      [n_out, wpr]  u32, canonical 2-bit codes (code = w + 1; weight k of a row at bits
//                        2*(k%16) of word k/16; rows padded with code 1), wpr = ceil(K/16)
//   gamma  [1] or [n_out] f32 weight scales
//   xq     [M, K] int8 activation codes, xs [M] f32 activation scales (s = 127 / absmax)
//   y      [M, n_out] f32   y[m, n] = acc[m, n] * (gamma_n / s_m),
//                           acc[m, n] = sum_k (code[n, k] - 1) * xq[m, k]   (exact, int32)
//   ws     [8, n_out] int32 split-K accumulators, zero between calls (the last CTA resets them)
//   tiles  [ceil(n_out/32)] u32 split-K arrival counters, zero between calls
//
// Algorithm. The integer dot product runs on the tensor cores: mma.sync.m16n8k32.s8.s8.s32
// with A = 16 weight rows x 32 k (codes 0..2 as s8) and B = 32 k x 8 activation rows (M <= 8;
// columns >= M are zero registers). dot(w, x) = dot(code, x) - sum(x), so the codes feed the
// MMA directly and one subtraction per output removes the offset.
// Decode is 2 instructions per A register: the MMA's k order inside each 16-weight word is
// permuted so that a thread's register is (word >> 2*t) & 0x03030303 (t = lane % 4), i.e. the
// codes of weights {t, t+4, t+8, t+12} of the word. The activations are stored in shared
// memory with the same permutation (xp[16c + 4t + e] = x[16c + 4e + t], a 4x4 byte transpose
// per 16 bytes done with PRMT), so each B register is one 32-bit shared load. The weight
// stream is read exactly as stored: no repacking.
//
// Tiling. A CTA owns 32 output rows (two 16-row MMA tiles per warp, sharing each B fragment)
// and one K range (blockIdx.y of ksplit). Its 8 warps split that range into 128-weight quads
// (4 MMA k-steps, 8 words per row); each warp keeps its 2 x 16 x 8 int32 tile in registers and
// prefetches the next quad's 32 words (16-byte loads when K % 64 == 0). The first quad is
// requested before the activation prologue, so HBM latency overlaps it. The 8 warp tiles are
// summed through shared memory. Shared memory holds only this CTA's x range (M x range bytes,
// rows padded by 16 bytes so the 8 activation rows hit distinct banks); the host picks ksplit
// so that stays <= 32 KB and the grid has >= 2 CTAs per SM.
// Split-K (ksplit > 1) is serial and deterministic: each CTA adds its int32 tile into ws with
// atomics (integer addition: order does not matter), and the last CTA of a row tile, found
// with an arrival counter, applies the epilogue and zeroes ws and the counter for the next
// call. One launch per call.
//
// Bound: memory (weight bytes). Per 128 packed bytes a warp issues 1 MMA, 8 SHF/LOP and 1 LDS
// per thread: far below the issue rate needed to stream ~15 B/clk/SM on an H100 or RTX 5080.

#include "common.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTiles = 2;              // 16-row MMA tiles per warp
constexpr int kRows = 16 * kTiles;     // output rows per CTA
constexpr int kMaxM = 8;               // activation rows (MMA N)
constexpr int kQuadWords = 8;          // 128 weights = 4 MMA k-steps = 8 words per row
constexpr int kRowPad = 16;            // bytes of padding per activation row in shared memory

__device__ __forceinline__ void mma_s8(int (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                       unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The 8 words of quad q of one row; zeros past the row's end (code 0 against zero-padded
// activations adds nothing) and for rows past n_out.
template <bool kVec>
__device__ __forceinline__ void load_quad(const uint32_t* __restrict__ row, int q, int wpr, bool valid,
                                          uint32_t* w) {
    const int base = q * kQuadWords;
    if (kVec) {
        // wpr % 4 == 0 and 16-byte aligned rows: two 16-byte loads, each all in or all out.
        const uint4* r4 = reinterpret_cast<const uint4*>(row + base);
        uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0);
        if (valid && base < wpr) lo = __ldg(r4);
        if (valid && base + 4 < wpr) hi = __ldg(r4 + 1);
        w[0] = lo.x; w[1] = lo.y; w[2] = lo.z; w[3] = lo.w;
        w[4] = hi.x; w[5] = hi.y; w[6] = hi.z; w[7] = hi.w;
    } else {
#pragma unroll
        for (int i = 0; i < kQuadWords; ++i) w[i] = (valid && base + i < wpr) ? __ldg(row + base + i) : 0u;
    }
}

// 4x4 byte transpose of 16 activation codes: out word t = bytes t of w0..w3.
__device__ __forceinline__ uint4 permute16(uint4 v) {
    uint4 o;
    unsigned* op = reinterpret_cast<unsigned*>(&o);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        const unsigned sel = ((4 + t) << 4) | t;
        const unsigned p01 = __byte_perm(v.x, v.y, sel);
        const unsigned p23 = __byte_perm(v.z, v.w, sel);
        op[t] = __byte_perm(p01, p23, 0x5410);
    }
    return o;
}

template <bool kVec>
__device__ void gemv_w2a8_impl(const uint32_t* __restrict__ W, const float* __restrict__ gamma, int gamma_per_row,
                               const int8_t* __restrict__ xq, const float* __restrict__ xs,
                               float* __restrict__ y, int* __restrict__ ws, unsigned* __restrict__ tiles, int M,
                               int n_out, int K, int quads_per_split) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ int sumx[kMaxM];
    __shared__ bool last_cta;

    const int wpr = (K + 15) / 16;
    const int total_quads = (wpr + kQuadWords - 1) / kQuadWords;
    const int q_begin = blockIdx.y * quads_per_split;
    const int q_end = min(total_quads, q_begin + quads_per_split);
    const int nq = q_end - q_begin;
    const int span = nq * 128;             // weights (k) covered by this CTA
    const int k0 = q_begin * 128;
    const int stride = span + kRowPad;     // bytes per activation row in smem
    int8_t* xp = reinterpret_cast<int8_t*>(smem);
    int* red = reinterpret_cast<int*>(smem + ((M * stride + 15) & ~15));  // [kWarps][kRows*8]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;

    // This warp's quads: a contiguous share of the CTA's range.
    const int per_warp = (nq + kWarps - 1) / kWarps;
    const int wq0 = q_begin + min(nq, warp * per_warp);
    const int wq1 = q_begin + min(nq, (warp + 1) * per_warp);

    // Rows g, g+8 of each 16-row tile.
    const uint32_t* wrow[2 * kTiles];
    bool wvalid[2 * kTiles];
#pragma unroll
    for (int r = 0; r < 2 * kTiles; ++r) {
        const int n = blockIdx.x * kRows + 8 * r + g;
        wvalid[r] = n < n_out;
        wrow[r] = W + static_cast<size_t>(wvalid[r] ? n : 0) * wpr;
    }

    // Request the first quad of weights before the activation prologue.
    uint32_t cur[2 * kTiles][kQuadWords], nxt[2 * kTiles][kQuadWords];
    if (wq0 < wq1) {
#pragma unroll
        for (int r = 0; r < 2 * kTiles; ++r) load_quad<kVec>(wrow[r], wq0, wpr, wvalid[r], cur[r]);
    }

    // Activation prologue: this CTA's x range -> shared memory, permuted per 16 codes, with
    // sum(x) per row for the code offset. 16-byte chunks; byte loads only at the ragged end
    // or when rows are not 16-byte aligned.
    if (tid < kMaxM) sumx[tid] = 0;
    __syncthreads();
    const bool x_vec = (K % 16 == 0) && ((reinterpret_cast<uintptr_t>(xq) & 15) == 0);
    const int chunks = span / 16;
    for (int m = 0; m < M; ++m) {
        int local = 0;
        const int8_t* xr = xq + static_cast<size_t>(m) * K;
        for (int c = tid; c < chunks; c += kThreads) {
            const int k = k0 + 16 * c;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (x_vec && k + 16 <= K) {
                v = __ldg(reinterpret_cast<const uint4*>(xr + k));
            } else {
                unsigned char* vb = reinterpret_cast<unsigned char*>(&v);
#pragma unroll
                for (int i = 0; i < 16; ++i) vb[i] = (k + i < K) ? static_cast<unsigned char>(xr[k + i]) : 0;
            }
            local = __dp4a(static_cast<int>(v.x), 0x01010101, local);
            local = __dp4a(static_cast<int>(v.y), 0x01010101, local);
            local = __dp4a(static_cast<int>(v.z), 0x01010101, local);
            local = __dp4a(static_cast<int>(v.w), 0x01010101, local);
            *reinterpret_cast<uint4*>(xp + m * stride + 16 * c) = permute16(v);
        }
        local = __reduce_add_sync(0xffffffffu, local);
        if (lane == 0 && local != 0) atomicAdd(&sumx[m], local);
    }
    __syncthreads();

    const bool has_b = g < M;
    const int8_t* xg = xp + (has_b ? g : 0) * stride + 4 * t;
    const int shift = 2 * t;
    int c[kTiles][4] = {};
    for (int q = wq0; q < wq1; ++q) {
        if (q + 1 < wq1) {
#pragma unroll
            for (int r = 0; r < 2 * kTiles; ++r) load_quad<kVec>(wrow[r], q + 1, wpr, wvalid[r], nxt[r]);
        }
        const int8_t* xs_q = xg + (q - q_begin) * 128;
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            unsigned b0 = 0, b1 = 0;
            if (has_b) {
                b0 = *reinterpret_cast<const unsigned*>(xs_q + 32 * s);
                b1 = *reinterpret_cast<const unsigned*>(xs_q + 32 * s + 16);
            }
#pragma unroll
            for (int tile = 0; tile < kTiles; ++tile) {
                const uint32_t* ra = cur[2 * tile];
                const uint32_t* rb = cur[2 * tile + 1];
                mma_s8(c[tile], (ra[2 * s] >> shift) & 0x03030303u, (rb[2 * s] >> shift) & 0x03030303u,
                       (ra[2 * s + 1] >> shift) & 0x03030303u, (rb[2 * s + 1] >> shift) & 0x03030303u, b0, b1);
            }
        }
#pragma unroll
        for (int r = 0; r < 2 * kTiles; ++r)
#pragma unroll
            for (int i = 0; i < kQuadWords; ++i) cur[r][i] = nxt[r][i];
    }

    // C fragment of tile j: c0,c1 -> (row 16j + g, m 2t, 2t+1); c2,c3 -> (row 16j + g + 8).
    int* mine = red + warp * (kRows * kMaxM);
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile) {
        const int r0 = 16 * tile + g;
        mine[r0 * kMaxM + 2 * t] = c[tile][0];
        mine[r0 * kMaxM + 2 * t + 1] = c[tile][1];
        mine[(r0 + 8) * kMaxM + 2 * t] = c[tile][2];
        mine[(r0 + 8) * kMaxM + 2 * t + 1] = c[tile][3];
    }
    __syncthreads();

    // One thread per (row, m) of the CTA tile: 32 x 8 = 256 = kThreads.
    const int r = tid / kMaxM, m = tid % kMaxM;
    const int n = blockIdx.x * kRows + r;
    const bool live = m < M && n < n_out;
    int acc = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) acc += red[w * (kRows * kMaxM) + tid];
    acc -= sumx[m < M ? m : 0];

    if (gridDim.y == 1) {
        if (live) y[static_cast<size_t>(m) * n_out + n] = static_cast<float>(acc) * (gamma[gamma_per_row ? n : 0] / xs[m]);
        return;
    }
    // Serial split-K: accumulate, then the last CTA of this row tile finishes.
    if (live) atomicAdd(&ws[static_cast<size_t>(m) * n_out + n], acc);
    __threadfence();
    __syncthreads();
    if (tid == 0) last_cta = atomicAdd(&tiles[blockIdx.x], 1u) == gridDim.y - 1;
    __syncthreads();
    if (!last_cta) return;
    __threadfence();
    if (live) {
        int* slot = &ws[static_cast<size_t>(m) * n_out + n];
        const int total = atomicExch(slot, 0);  // read the final sum and reset for the next call
        y[static_cast<size_t>(m) * n_out + n] = static_cast<float>(total) * (gamma[gamma_per_row ? n : 0] / xs[m]);
    }
    if (tid == 0) tiles[blockIdx.x] = 0;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads) gemv_w2a8_vec(
    const uint32_t* __restrict__ W, const float* __restrict__ gamma, int gamma_per_row,
    const int8_t* __restrict__ xq, const float* __restrict__ xs, float* __restrict__ y, int* __restrict__ ws,
    unsigned* __restrict__ tiles, int M, int n_out, int K, int quads_per_split) {
    gemv_w2a8_impl<true>(W, gamma, gamma_per_row, xq, xs, y, ws, tiles, M, n_out, K, quads_per_split);
}

extern "C" __global__ void __launch_bounds__(kThreads) gemv_w2a8_word(
    const uint32_t* __restrict__ W, const float* __restrict__ gamma, int gamma_per_row,
    const int8_t* __restrict__ xq, const float* __restrict__ xs, float* __restrict__ y, int* __restrict__ ws,
    unsigned* __restrict__ tiles, int M, int n_out, int K, int quads_per_split) {
    gemv_w2a8_impl<false>(W, gamma, gamma_per_row, xq, xs, y, ws, tiles, M, n_out, K, quads_per_split);
}
