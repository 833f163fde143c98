// Experimental variants of kv_write_int4 (timed by dev/kv_write_profile.py), same signature,
// one group per thread (kv_write_int4 takes the K and V groups of a slot per thread and is
// launched with half the threads: the profile script knows it). H100 results, crates/kv-int4
// README; none beat the production kernel.
//   kvw_rowmajor_tok: current per-thread work (one group per thread), groups ordered
//       (kv, head, token, group): a warp writes 8 consecutive slots of one head.
//   kvw_quad_{h,t}: a quad of lanes per (token, head) row; lane c loads 16-byte chunk c of
//       every group (each load instruction reads 64 contiguous bytes per quad), min/max by
//       quad shuffles; rows ordered head-fastest (h) or token-fastest within a head (t).
#include "kv_int4.cu"

namespace {

__device__ __forceinline__ bool coords_tok(int n, int heads_kv, int head_dim, int& kv, int& t, int& h, int& g) {
    const unsigned gpr = head_dim / 32;
    const unsigned per_kv = (unsigned)n * heads_kv * gpr;
    const unsigned gid = blockIdx.x * blockDim.x + threadIdx.x;
    if (gid >= 2 * per_kv) return false;
    kv = gid >= per_kv;
    const unsigned r = gid - kv * per_kv;
    const unsigned ht = r / gpr;  // head * n + token
    g = (int)(r - ht * gpr);
    h = (int)(ht / n);
    t = (int)(ht - h * n);
    return true;
}

template <bool kTokFast, bool kTransposeStore>
__device__ __forceinline__ void write_quad(const __half* __restrict__ k, const __half* __restrict__ v,
                                           uint8_t* __restrict__ pool, const int* __restrict__ pages, int first_page,
                                           int start, int n, int heads_kv, int page_size, int num_pages,
                                           long long page_bytes, int layer0) {
    constexpr int D = 128, NG = D / 32;
    const unsigned rows = 2u * n * heads_kv;
    const unsigned gid = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned row = gid >> 2;
    const int c = threadIdx.x & 3;
    const bool live = row < rows;
    const unsigned per_kv = (unsigned)n * heads_kv;
    const int kv = live && row >= per_kv;
    const unsigned r = live ? row - kv * per_kv : 0;
    int t, h;
    if (kTokFast) {
        h = r / n;
        t = r - h * n;
    } else {
        t = r / heads_kv;
        h = r - t * heads_kv;
    }
    const int pos = start + t;
    const int page = live ? pages[pos / page_size - first_page] : -1;
    const bool ok = live && page >= 0 && page < num_pages;
    const int layer = blockIdx.y;
    const __half* src = (kv ? v : k) + (((long long)layer * n + t) * heads_kv + h) * D + 8 * c;
    float x[NG][8];
#pragma unroll
    for (int i = 0; i < NG; ++i) {
        uint4 raw = make_uint4(0, 0, 0, 0);
        if (ok) raw = __ldcs(reinterpret_cast<const uint4*>(src + 32 * i));
        const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 f = __half22float2(h2[j]);
            x[i][2 * j] = f.x;
            x[i][2 * j + 1] = f.y;
        }
    }
    uint32_t word[NG];
    uint32_t par[NG];
#pragma unroll
    for (int i = 0; i < NG; ++i) {
        float lo = x[i][0], hi = x[i][0];
#pragma unroll
        for (int j = 1; j < 8; ++j) {
            lo = fminf(lo, x[i][j]);
            hi = fmaxf(hi, x[i][j]);
        }
        lo = fminf(lo, __shfl_xor_sync(kFull, lo, 1));
        hi = fmaxf(hi, __shfl_xor_sync(kFull, hi, 1));
        lo = fminf(lo, __shfl_xor_sync(kFull, lo, 2));
        hi = fmaxf(hi, __shfl_xor_sync(kFull, hi, 2));
        const __half min_h = __float2half_rn(__fadd_rn(lo, 0.0f));
        const __half scale_h = __float2half_rn(__fadd_rn(__fdiv_rn(__fsub_rn(hi, lo), 15.0f), 0.0f));
        const float m = __half2float(min_h), s = __half2float(scale_h);
        uint32_t w = 0;
        if (s > 0.0f) {
            const float inv = __frcp_rn(s);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float d = __fsub_rn(x[i][j], m);
                const float y0 = __fmul_rn(d, inv);
                const float y = __fmaf_rn(__fmaf_rn(-y0, s, d), inv, y0);
                float q = roundf(y);
                q = fminf(fmaxf(q, 0.0f), 15.0f);
                w |= static_cast<uint32_t>(q) << (4 * j);
            }
        }
        word[i] = w;
        const __half2 sm = __halves2half2(scale_h, min_h);
        par[i] = *reinterpret_cast<const uint32_t*>(&sm);
    }
    const long long val_bytes = (long long)heads_kv * page_size * (D / 2);
    const long long par_bytes = (long long)heads_kv * page_size * NG * 4;
    uint8_t* region = pool + ((long long)(layer0 + layer) * num_pages + (ok ? page : 0)) * page_bytes + kv * (val_bytes + par_bytes);
    const long long prow = (long long)h * page_size + pos % page_size;
    auto sel = [&](const uint32_t (&a)[NG], int i) { return i == 0 ? a[0] : i == 1 ? a[1] : i == 2 ? a[2] : a[3]; };
    if (kTransposeStore) {
        // lane c holds word c of every group; lane c stores group c's 4 words (a 4x4
        // transpose over the quad: at step s lane c receives from lane (c + s) & 3 its
        // word[c]), so every lane issues one 16-byte store.
        uint32_t out[NG] = {0, 0, 0, 0};
#pragma unroll
        for (int s = 0; s < NG; ++s) {
            const int srcl = (c + s) & 3;
            const uint32_t got = __shfl_sync(kFull, sel(word, (c - s) & 3), (threadIdx.x & ~3) | srcl);
#pragma unroll
            for (int w = 0; w < NG; ++w) out[w] = srcl == w ? got : out[w];
        }
        if (!ok) return;
        *reinterpret_cast<uint4*>(region + prow * (D / 2) + c * 16) = make_uint4(out[0], out[1], out[2], out[3]);
    } else {
        if (!ok) return;
#pragma unroll
        for (int i = 0; i < NG; ++i) *reinterpret_cast<uint32_t*>(region + prow * (D / 2) + i * 16 + 4 * c) = word[i];
    }
    *reinterpret_cast<uint32_t*>(region + val_bytes + (prow * NG + c) * 4) = sel(par, c);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kWriteThreads)
    kvw_rowmajor_tok(const __half* __restrict__ k, const __half* __restrict__ v, uint8_t* __restrict__ pool,
                     const int* __restrict__ pages, int first_page, int start, int n, int heads_kv, int head_dim,
                     int page_size, int num_pages, long long page_bytes, int layer0) {
    int kv, t, h, g;
    if (!coords_tok(n, heads_kv, head_dim, kv, t, h, g)) return;
    const int pos = start + t;
    const int page = pages[pos / page_size - first_page];
    if (page < 0 || page >= num_pages) return;
    const int layer = blockIdx.y;
    const __half* src = (kv ? v : k) + (((long long)layer * n + t) * heads_kv + h) * head_dim + g * 32;
    uint8_t* base = pool + ((long long)(layer0 + layer) * num_pages + page) * page_bytes;
    store_group<true>(src, base, kv, h, pos % page_size, g, heads_kv, head_dim, page_size, nullptr);
}

#define KVW_QUAD(NAME, TOKFAST, TR)                                                                                    \
    extern "C" __global__ void __launch_bounds__(kWriteThreads)                                                    \
        NAME(const __half* __restrict__ k, const __half* __restrict__ v, uint8_t* __restrict__ pool,               \
             const int* __restrict__ pages, int first_page, int start, int n, int heads_kv, int head_dim,          \
             int page_size, int num_pages, long long page_bytes, int layer0) {                                     \
        write_quad<TOKFAST, TR>(k, v, pool, pages, first_page, start, n, heads_kv, page_size, num_pages, page_bytes,  \
                            layer0);                                                                                \
    }
KVW_QUAD(kvw_quad_h, false, true)
KVW_QUAD(kvw_quad_t, true, true)
KVW_QUAD(kvw_quad_h4, false, false)
KVW_QUAD(kvw_quad_t4, true, false)

