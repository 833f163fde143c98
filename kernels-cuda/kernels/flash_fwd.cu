// FlashAttention-2 forward on mma.sync (sm_90 and sm_120), with GQA, fixed and variable
// length batches, the masks of DESIGN.md section 4, and an optional fused QK-Norm + RoPE
// prologue.
//
// Algorithm (Dao, FlashAttention-2): one CTA per (query block of kBM = 128 rows, query head,
// sequence), or per pair of query blocks (j, n - 1 - j) under causal masks on large grids
// (for_tiles in flash_attn.cuh: equal work per CTA, no tail of heavy blocks). The CTA keeps its Q tile in shared memory and walks the key/value blocks of
// kBN keys (FwdCfg: 128 at D = 128, 64 at D = 64) that the mask leaves (flash_attn.cuh:
// key_range), from the last block down, keeping the running row max m, row sum l and the output accumulator O in registers
// (online softmax in base 2: p = exp2(s * scale * log2 e - m)). At the end O / l is written
// and logsumexp = m ln 2 + ln l.
//
// Tiles and warps (FwdCfg): D = 128: 8 warps, warp w owns query rows [16 w, 16 w + 16) (one
// m16 tile), key blocks of 128: S is 16 n8 tiles (64 f32 registers), O 16 tiles (64). D = 64:
// 4 warps of 32 rows (two m16 tiles), key blocks of 64: S 2 x 8 tiles (64), O 2 x 8 (64).
// P is re-packed from the S accumulators into A fragments without a trip through shared
// memory. K (row-major [key][d]) feeds the B operand through plain ldmatrix, V through
// ldmatrix.trans.
//
// Shared memory (16-bit T, 16-byte chunks XOR-swizzled by row): Q kBM x D, K kBN x D, V kBN x D,
// plus kBN doc ids and D floats of prologue weight = 99,328 B at D = 128 (sm_120 allows
// 101,376 per block: 1 CTA per SM there and on the H100, by registers), 33,280 B at D = 64.
// Pipeline (FA2): the V load of block n overlaps Q K^T of block n, the K
// load of block n - 1 overlaps softmax and P V of block n (cp.async, one buffer each).
//
// Masks: blocks outside key_range are never loaded; blocks that tile_all_visible proves fully
// visible skip the per-element mask; the rest apply the rule element-wise (documents through
// the tile's doc ids in shared memory). Rows past the sequence are zero-filled and never written.
//
// Prologue (kNormRope): Q is normalized and rotated in shared memory once per CTA, as it is
// loaded (norm_rope_tile: 8 threads per row at D = 128, each holding 8 whole rotate-half
// pairs). K is read by L / kBM query blocks and Hq / Hkv heads: normalizing it on every load
// redid the work that often and made the forward 1.6x slower (H100, L = 8K), so K goes
// through the norm_rope_pos pre-kernel (flash_bwd.cu) once per call into a workspace, and this
// kernel, launched with programmatic dependent launch, overlaps its Q prologue with it
// (pdl_wait before the first K load). RoPE (cos, sin) come from a table built on the host in
// f64; the norm weight sits in shared memory.
//
// Bound: compute (tensor cores) for L >= 1K; per block each warp issues 2 * 8 * D/16 MMAs for
// S and as many for P V against ~40 instructions of softmax per row pair.
#include "flash_attn.cuh"

namespace tritter {
namespace flash {

// Tiles per head dim (measured on the H100, dev/flash_tune.sh): D = 128 takes 8 warps of 16
// rows and 128-key blocks (~10% faster than 4 warps x 32 rows x 64 keys, which spills ~320
// bytes on sm_90; this one has no spill since the mask row bounds, mask_tile), D = 64 takes 4 warps of
// 32 rows and 64-key blocks (20 bytes of spill on sm_90 since the for_tiles loop, none on
// sm_120; 8 warps were 25% slower there). FLASH_FWD_BN /
// FLASH_FWD_WARPS / FLASH_FWD_MIN_BLOCKS override them for tuning builds only; the Rust side
// (cuda.rs: fwd_tile) assumes the defaults.
#ifndef FLASH_FWD_MIN_BLOCKS
#define FLASH_FWD_MIN_BLOCKS 1
#endif
#ifndef FLASH_FWD_KS_UNROLL
#define FLASH_FWD_KS_UNROLL 16  // k-steps of Q K^T unrolled (16 >= D / 16: fully)
#endif
constexpr int kBM = 128;
constexpr int kKsUnroll = FLASH_FWD_KS_UNROLL;

template <int kD>
struct FwdCfg {
#ifdef FLASH_FWD_BN
    static constexpr int kBN = FLASH_FWD_BN;
#else
    static constexpr int kBN = kD == 128 ? 128 : 64;
#endif
#ifdef FLASH_FWD_WARPS
    static constexpr int kWarps = FLASH_FWD_WARPS;
#else
    static constexpr int kWarps = kD == 128 ? 8 : 4;
#endif
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kMT = kBM / (16 * kWarps);  // m16 tiles per warp
    static constexpr int kWarpRows = 16 * kMT;
};

template <int kD>
constexpr int fwd_smem_bytes() {
    return (kBM + 2 * FwdCfg<kD>::kBN) * kD * 2 + FwdCfg<kD>::kBN * 4 + kD * 4;
}

// cp.async of rows [0, rows) of a (tokens, heads, D) tensor into a swizzled tile of `kRows`
// rows; rows >= valid are zero-filled. `src` points at (token 0 of the tile, head h, d 0).
template <int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile(void* tile, const void* src, size_t row_stride_bytes, int valid) {
    constexpr int kChunks = kD / 8;  // 16-byte chunks per row
    const char* s = static_cast<const char*>(src);
    char* t = static_cast<char*>(tile);
#pragma unroll
    for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
        const int c = threadIdx.x + i * kThreads;
        const int row = c / kChunks, chunk = c % kChunks;
        const bool ok = row < valid;
        const char* g = s + (ok ? row * row_stride_bytes + chunk * 16 : 0);
        cp_async_zfill<16>(t + swz<kD>(row, chunk * 8) * 2, g, ok ? 16 : 0);
    }
}

template <typename T, int kD, bool kNormRope>
__device__ __forceinline__ void flash_fwd(const Params& p, const int m_block) {
    constexpr int kBN = FwdCfg<kD>::kBN;
    constexpr int kThreads = FwdCfg<kD>::kThreads;
    constexpr int kMT = FwdCfg<kD>::kMT;
    constexpr int kWarpRows = FwdCfg<kD>::kWarpRows;
    constexpr int kNT = kBN / 8;   // n8 tiles of S per warp row block
    constexpr int kDT = kD / 8;    // n8 tiles of O
    extern __shared__ __align__(128) unsigned char smem[];
    T* sQ = reinterpret_cast<T*>(smem);
    T* sK = sQ + kBM * kD;
    T* sV = sK + kBN * kD;
    int* sDoc = reinterpret_cast<int*>(sV + kBN * kD);
    float* sWq = reinterpret_cast<float*>(sDoc + kBN);  // prologue: q_norm weight (kD)

    const int b = blockIdx.z, h = blockIdx.y;
    const Seq s = load_seq(p, b);
    const int m_blocks = (s.lq + kBM - 1) / kBM;
    if (m_block >= m_blocks) return;
    const int m0 = m_block * kBM;
    const int rows = min(kBM, s.lq - m0);
    const int hk = h / (p.hq / p.hkv);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;

    const size_t q_stride = static_cast<size_t>(p.hq) * kD * sizeof(T);
    const size_t kv_stride = static_cast<size_t>(p.hkv) * kD * sizeof(T);
    const T* q_base = static_cast<const T*>(p.q) + (static_cast<size_t>(s.q0 + m0) * p.hq + h) * kD;
    const T* k_base = static_cast<const T*>(p.k) + (static_cast<size_t>(s.k0) * p.hkv + hk) * kD;
    const T* v_base = static_cast<const T*>(p.v) + (static_cast<size_t>(s.k0) * p.hkv + hk) * kD;

    // Aligned positions of the block's valid rows and the keys they can see.
    const int a0 = m0 + s.shift, a1 = m0 + rows - 1 + s.shift;
    const KeyRange kr = key_range(p, s, a0, a1);
    const int main_lo = kr.lo / kBN, main_hi = (kr.hi + kBN - 1) / kBN;
    const int sink_lo = kr.sink_lo / kBN;
    const int sink_hi = min((kr.sink_hi + kBN - 1) / kBN, main_lo);
    const int n_main = max(main_hi - main_lo, 0);
    const int n_sink = max(sink_hi - sink_lo, 0);
    const int n_total = n_main + n_sink;
    // block index of step it: main blocks from the top down, then sink blocks
    auto block_of = [&](int it) { return it < n_main ? main_hi - 1 - it : sink_hi - 1 - (it - n_main); };

    load_tile<kBM, kD, kThreads>(sQ, q_base, q_stride, rows);
    if constexpr (kNormRope) {
        // Q is raw: normalize and rotate it in shared memory. K comes normalized from the
        // norm_rope_pos pre-kernel, launched just before this one with programmatic dependent
        // launch: everything up to pdl_wait overlaps with it, nothing after reads K early.
        cp_async_commit();
        for (int i = tid; i < kD; i += kThreads) sWq[i] = to_float(static_cast<const T*>(p.q_norm)[i]);
        cp_async_wait<0>();
        __syncthreads();
        norm_rope_tile<T, kD, kBM, kThreads>(sQ, sWq, p.rope, p.eps, [&](int r) {
            if (r >= rows) return 0;
            return p.pos_q != nullptr ? p.pos_q[s.q0 + m0 + r] : max(m0 + r + s.shift, m0 + r);
        });
        pdl_wait();
    }
    if (n_total > 0) {
        const int n0 = block_of(0) * kBN;
        load_tile<kBN, kD, kThreads>(sK, k_base + static_cast<size_t>(n0) * p.hkv * kD, kv_stride, s.lk - n0);
    }
    cp_async_commit();

    // Query rows of this thread: (mt, half) -> row m0 + warp * kWarpRows + mt * 16 + g + 8 * half.
    int q_doc[kMT][2];
    if (p.doc_ids != nullptr) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int a = m0 + warp * kWarpRows + mt * 16 + g + 8 * hf + s.shift;
                q_doc[mt][hf] = p.doc_ids[s.k0 + min(max(a, 0), s.lk - 1)];
            }
    }

    float o[kMT][kDT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][dt][e] = 0.f;
    float row_m[kMT][2], row_l[kMT][2];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            row_m[mt][hf] = -INFINITY;
            row_l[mt][hf] = 0.f;
        }

    for (int it = 0; it < n_total; ++it) {
        const int n0 = block_of(it) * kBN;
        cp_async_wait<0>();
        __syncthreads();  // K of this block landed; every warp is done with the previous V
        load_tile<kBN, kD, kThreads>(sV, v_base + static_cast<size_t>(n0) * p.hkv * kD, kv_stride, s.lk - n0);
        cp_async_commit();
        if (p.doc_ids != nullptr && tid < kBN) sDoc[tid] = p.doc_ids[s.k0 + min(n0 + tid, s.lk - 1)];
        if (p.doc_ids != nullptr) __syncthreads();

        // S = Q K^T
        float sc[kMT][kNT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) sc[mt][nt][e] = 0.f;
#pragma unroll kKsUnroll
        for (int ks = 0; ks < kD / 16; ++ks) {
            unsigned a[kMT][4];
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt)
                ldmatrix_x4(a[mt], sQ + swz<kD>(warp * kWarpRows + mt * 16 + (lane & 15), ks * 16 + (lane >> 4) * 8));
#pragma unroll
            for (int np = 0; np < kNT / 2; ++np) {
                unsigned bk[4];
                ldmatrix_x4(bk, sK + swz<kD>(np * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) {
                    mma_16816<T>(sc[mt][2 * np], a[mt], bk[0], bk[1]);
                    mma_16816<T>(sc[mt][2 * np + 1], a[mt], bk[2], bk[3]);
                }
            }
        }

        // Mask the block where it is not fully visible: row bounds at D = 128 (left the kernel
        // without spills on sm_90: causal L = 8K 1.08x, L = 2K 1.15x faster on the H200), the
        // per-element rule at D = 64 (0.96x with bounds).
        if (!tile_all_visible(p, s, a0, a1, n0, n0 + kBN)) {
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt)
                mask_tile<kD == 128>(sc[mt], p, s, m0 + warp * kWarpRows + mt * 16 + g, n0, 0, t4, sDoc, q_doc[mt]);
        }

        cp_async_wait<0>();
        __syncthreads();  // V landed; every warp is done with K
        if (it + 1 < n_total) {
            const int nn = block_of(it + 1) * kBN;
            load_tile<kBN, kD, kThreads>(sK, k_base + static_cast<size_t>(nn) * p.hkv * kD, kv_stride, s.lk - nn);
        }
        cp_async_commit();

        // Online softmax (base 2), rescaling O.
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                float mx = -INFINITY;
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(sc[mt][nt][2 * hf], sc[mt][nt][2 * hf + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(row_m[mt][hf], mx * p.scale_log2);
                const float m_use = m_new == -INFINITY ? 0.f : m_new;
                const float alpha = fast_exp2(row_m[mt][hf] - m_use);
                row_m[mt][hf] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float pv = fast_exp2(fmaf(sc[mt][nt][2 * hf + e], p.scale_log2, -m_use));
                        sc[mt][nt][2 * hf + e] = pv;
                        sum += pv;
                    }
                row_l[mt][hf] = row_l[mt][hf] * alpha + sum;
#pragma unroll
                for (int dt = 0; dt < kDT; ++dt) {
                    o[mt][dt][2 * hf] *= alpha;
                    o[mt][dt][2 * hf + 1] *= alpha;
                }
            }

        // O += P V
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
            unsigned pa[kMT][4];
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
                pa[mt][0] = pack2<T>(sc[mt][2 * kk][0], sc[mt][2 * kk][1]);
                pa[mt][1] = pack2<T>(sc[mt][2 * kk][2], sc[mt][2 * kk][3]);
                pa[mt][2] = pack2<T>(sc[mt][2 * kk + 1][0], sc[mt][2 * kk + 1][1]);
                pa[mt][3] = pack2<T>(sc[mt][2 * kk + 1][2], sc[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < kDT / 2; ++dp) {
                unsigned bv[4];
                ldmatrix_x4_trans(bv, sV + swz<kD>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dp * 16 + (lane >> 4) * 8));
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) {
                    mma_16816<T>(o[mt][2 * dp], pa[mt], bv[0], bv[1]);
                    mma_16816<T>(o[mt][2 * dp + 1], pa[mt], bv[2], bv[3]);
                }
            }
        }
    }
    cp_async_wait<0>();

    // Epilogue: O / l through shared memory (the Q tile) for 16-byte stores; logsumexp.
    __syncthreads();  // every warp is done reading Q
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float l = row_l[mt][hf];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int r = warp * kWarpRows + mt * 16 + g + 8 * hf;
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt) {
                *reinterpret_cast<unsigned*>(sQ + swz<kD>(r, dt * 8 + 2 * t4)) =
                    pack2<T>(o[mt][dt][2 * hf] * inv, o[mt][dt][2 * hf + 1] * inv);
            }
            if (t4 == 0 && r < rows) {
                const float lse = l > 0.f ? row_m[mt][hf] * 0.6931471805599453f + logf(l) : -INFINITY;
                const int i = m0 + r;
                const size_t idx = p.cu_q != nullptr
                                       ? static_cast<size_t>(h) * p.total_q + s.q0 + i
                                       : (static_cast<size_t>(b) * p.hq + h) * s.lq + i;
                p.lse[idx] = lse;
            }
        }
    __syncthreads();
    T* o_base = static_cast<T*>(p.o) + (static_cast<size_t>(s.q0 + m0) * p.hq + h) * kD;
    constexpr int kChunks = kD / 8;
#pragma unroll
    for (int i = 0; i < kBM * kChunks / kThreads; ++i) {
        const int c = tid + i * kThreads;
        const int row = c / kChunks, chunk = c % kChunks;
        if (row < rows) {
            *reinterpret_cast<uint4*>(o_base + static_cast<size_t>(row) * p.hq * kD + chunk * 8) =
                *reinterpret_cast<const uint4*>(sQ + swz<kD>(row, chunk * 8));
        }
    }
}

// The query blocks of this CTA (for_tiles: the heaviest, under a causal mask the last, first).
template <typename T, int kD, bool kNormRope>
__device__ __forceinline__ void flash_fwd_cta(const Params& p) {
    const int m_blocks = (load_seq(p, blockIdx.z).lq + kBM - 1) / kBM;
    for_tiles(p, m_blocks, true, [&](int m) { flash_fwd<T, kD, kNormRope>(p, m); });
}

// Standalone QK-Norm + RoPE: x (rows = tokens * heads, D) -> y, one warp per row; token of row r
// is r / heads, its position pos[token] (or the token index when pos is null). Used to store
// normalized, rotated keys in a KV cache and as the unfused baseline of the benches.
template <typename T, int kD>
__device__ __forceinline__ void qk_norm_rope(const T* x, T* y, const T* w, const float2* rope, const int* pos,
                                             int rows, int heads, float eps) {
    constexpr int kE = kD / 32;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    float wl[kE], v[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e) {
        wl[e] = to_float(w[lane * kE + e]);
        v[e] = to_float(x[static_cast<size_t>(row) * kD + lane * kE + e]);
    }
    const int token = row / heads;
    const int position = pos != nullptr ? pos[token] : token;
    norm_rope_row<kD>(v, wl, rope + static_cast<size_t>(position) * (kD / 2), eps, lane);
#pragma unroll
    for (int e = 0; e < kE; ++e) from_float(v[e], y + static_cast<size_t>(row) * kD + lane * kE + e);
}

// The materialized baseline's softmax (benches only): S (rows, n) bf16 scores, row r being
// query (r % lq) of its head, softmax of scale * S with an optional causal mask (keys past the
// query's aligned position get 0), written in place as P. One CTA of 256 threads per row.
__device__ __forceinline__ void softmax_rows(__nv_bfloat16* s, int n, int lq, float scale, int causal) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    __nv_bfloat16* x = s + row * n;
    const int limit = causal ? static_cast<int>(row % lq) + n - lq + 1 : n;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < limit; j += blockDim.x) m = fmaxf(m, to_float(x[j]) * scale);
    m = block_max(m, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < limit; j += blockDim.x) sum += __expf(to_float(x[j]) * scale - m);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = sum;
    __syncthreads();
    sum = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) sum += scratch[w];
    const float inv = 1.f / sum;
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        x[j] = __float2bfloat16_rn(j < limit ? __expf(to_float(x[j]) * scale - m) * inv : 0.f);
}

}  // namespace flash
}  // namespace tritter

extern "C" __global__ void __launch_bounds__(256) attn_softmax_rows_bf16(__nv_bfloat16* s, int n, int lq, float scale,
                                                                         int causal) {
    tritter::flash::softmax_rows(s, n, lq, scale, causal);
}

#define QK_NORM_ROPE(name, T, D)                                                                        \
    extern "C" __global__ void name(const T* x, T* y, const T* w, const float2* rope, const int* pos, int rows, \
                                    int heads, float eps) {                                           \
        tritter::flash::qk_norm_rope<T, D>(x, y, w, rope, pos, rows, heads, eps);                     \
    }
QK_NORM_ROPE(qk_norm_rope_bf16_d64, __nv_bfloat16, 64)
QK_NORM_ROPE(qk_norm_rope_bf16_d128, __nv_bfloat16, 128)
QK_NORM_ROPE(qk_norm_rope_f16_d64, __half, 64)
QK_NORM_ROPE(qk_norm_rope_f16_d128, __half, 128)

#define FLASH_FWD(name, T, D, NR)                                                        \
    extern "C" __global__ void __launch_bounds__(tritter::flash::FwdCfg<D>::kThreads, FLASH_FWD_MIN_BLOCKS)           \
        name(const tritter::flash::Params p) {                                         \
        tritter::flash::flash_fwd_cta<T, D, NR>(p);                                     \
    }

FLASH_FWD(flash_fwd_bf16_d64, __nv_bfloat16, 64, false)
FLASH_FWD(flash_fwd_bf16_d128, __nv_bfloat16, 128, false)
FLASH_FWD(flash_fwd_f16_d64, __half, 64, false)
FLASH_FWD(flash_fwd_f16_d128, __half, 128, false)
FLASH_FWD(flash_fwd_nr_bf16_d64, __nv_bfloat16, 64, true)
FLASH_FWD(flash_fwd_nr_bf16_d128, __nv_bfloat16, 128, true)
FLASH_FWD(flash_fwd_nr_f16_d64, __half, 64, true)
FLASH_FWD(flash_fwd_nr_f16_d128, __half, 128, true)
