// INT4 paged KV cache (crate kv-int4, DESIGN.md section 4): quantization straight into
// pages, and split-KV ("flash-decoding") decode attention that reads the INT4 pages and
// dequantizes in registers, plus the same attention over an f16 cache (the baseline).
//
// ---- Page layout (one layer's page; the pool is [layer][page][page_bytes]) ----------------
//   INT4: K codes [Hkv][P][D/2] u8 (value 2i in the low nibble of byte i), K params
//         [Hkv][P][D/32] half2 (scale, min), then V codes, V params.
//   F16:  K [Hkv][P][D] f16, then V [Hkv][P][D] f16.
//   P (page_size) is a power of two in 8..256. Block tables are (B, bt_stride) i32, -1 for
//   evicted pages. Format of a group of 32 values (x_hat = code * scale + min):
//   min_h = f16(min x), scale_h = f16((max x - min x) / 15), code = clamp(round((x - min_h)
//   / scale_h), 0, 15) with IEEE f32 ops (no --use_fast_math), round half away from zero:
//   bit-exact with kv_int4::quantize_group. Bound: |x - x_hat| <= scale_h/2 + |min - min_h|
//   + 2^-20 (1 + max|x|).
//
// ---- kv_write_{int4,f16}: one thread per group of 32 values of one token and head, of K
//   and of V (two independent loads in flight per thread) -----------------------------------
//   Grid (ceil(n * Hkv * D/32 / 256), layers), 256 threads. Reads 2 x 64 B of f16 (16-byte
//   loads when aligned), writes 2 x (16 B of codes + 4 B of params) (INT4) or 2 x 64 B (F16)
//   into the token's page slot. Memory bound: 84 B moved per group for INT4.
//   kv_write_slots_{int4,f16}: the same store for a batch of appends of one layer (an
//   engine step: one token of each of B sequences, or several prompts), each token's pool
//   slot given by a table (page * page_size + slot, -1: not stored). A group holding NaN or
//   Inf is stored as zeros and counted in a device counter (no host synchronization between
//   layers; the engine reads the counter once per step), so no page ever holds a non-finite
//   value. kv_write_slots_warp_{int4,f16}: the same for batches of <= 64 tokens (decode
//   steps), a warp per (token, head, K|V) and a lane per value (latency: the per-thread
//   form leaves n * Hkv * D / 32 threads each quantizing 64 values in a chain). The group
//   format and page addressing live in kv_int4_store.cuh, shared with the engine's fused
//   QK-Norm + RoPE + append (engine.cu).
//
// ---- kv_decode_{int4,f16}_d{64,128}_g{1,2,4,8} (SIMT): one CTA per (split, kv head, sequence) -
//   The f16 baseline, and the previous INT4 kernel (TRITTER_KV_INT4_SIMT=1 selects it).
//   Grid (num_splits, Hkv, B), 128 threads (4 warps). The CTA computes all G = Hq / Hkv query
//   heads of its KV head, so K/V are read once per group. Visible tokens are the sinks
//   [0, min(S, len)) and the window [max(sinks_end, len - W), len); they are walked in tiles of
//   32 tokens (tile-aligned positions, the two ranges' tiles enumerated without duplicates;
//   tokens outside the rule are masked), and each split takes `tiles_per_split` consecutive
//   tiles. Pipeline: each tile's K and V bytes (INT4 D=128: 5 KB; F16: 16 KB) are copied into
//   shared memory with 16-byte cp.async (zero-fill for masked tokens, which are never read
//   from HBM), 4 stages (INT4) / 2 stages (F16) in flight.
//   Compute mapping: a lane owns 8 consecutive dims of a token (one u32 of 8 INT4 codes, or
//   one 16-byte f16 vector); D/8 lanes cover a token. Codes become floats with one shift and
//   one LOP3: f = as_float(0x3F800000 | code << 16) = 1 + code/128, so k = a*f + b with
//   a = 128*scale, b = min - 128*scale, and q.k = a*(q.f) + b*sum(q) per group: the scale,
//   min and sum(q) are applied once per lane and token, never per value. Dot products are
//   reduced across the D/8 lanes with a reduce-scatter (N values in log2(D/8) shuffle levels).
//   Online softmax per tile in base 2 (q pre-scaled by softmax_scale * log2 e); P.V likewise
//   in f32 with the group's a, b folded into the probability. Never writes f16 K/V back.
//   Output: per (sequence, query head, split) the unnormalized o (D floats), max m and sum l
//   in f32 workspace; kv_decode_reduce merges the splits and writes (B, Hq, D) f16 (256
//   threads per (sequence, query head): split weights in shared memory, D-wide thread groups
//   summing interleaved splits).
//   Expected bound: HBM bandwidth for F16; for INT4 with G = 4 the FP32/INT issue rate is
//   close to the HBM rate (about 12 instructions per byte), see the crate README.
//   Launch: every decode kernel (and kv_decode_reduce) is launched with programmatic
//   dependent launch; griddepcontrol.wait is its first statement (q and the newest K/V are
//   the previous kernel's output), then it releases the next kernel at once.
//
// ---- kv_decode_int4tc_d{64,128}_g{1,2,4,8}: INT4 on tensor cores (the default for INT4) ----
//   Same grid, tile enumeration, visibility rule and (o, m, l) partials as above, but no
//   kv_decode_reduce: the last CTA of each (sequence, KV head) to finish merges that head's
//   splits (merge_last_split: partials fenced, a ticket per CTA from a counter the last one
//   resets; sums in split order, so as deterministic as the separate kernel), which saves a
//   launch and overlaps the merges with the CTAs still running. 128 threads, launch bounds
//   of 4 CTAs per SM (122-128 registers on sm_90, no spills; sm_120's 100 KB of shared
//   memory per SM holds 2 such CTAs). A pipeline
//   stage is 64 tokens = 2 enumerated tiles (K codes, K params, V codes, V params: 10 KB for
//   D=128), 3 stages of 16-byte cp.async; code rows are padded to D/2 + 16 bytes in shared
//   memory so each 8-row ldmatrix phase hits 8 distinct 16-byte bank groups. Fast copy (a
//   stage whose 2 tiles are fully visible, pages of >= 32 tokens: all but the window/sink
//   edges and the last partial tile): warp w copies tile w / 2, K (even w) or V (odd w), as
//   one contiguous run of codes and one of params from one page: one block-table entry
//   (loaded a stage ahead) and one base address per warp and stage, then 16-byte cp.async at
//   fixed per-lane offsets. Otherwise the per-token copy: D/32 consecutive threads take one token's code row (coalesced), each
//   thread resolves its tokens' visibility and page once per stage and issues the K and V
//   chunks of the same slot from one address (D=128: 2 tokens x (K, V) + 1 param chunk per
//   thread and stage); everything stage-invariant is hoisted (the per-chunk index
//   arithmetic was ~40% of the kernel's instructions). Warp w owns
//   tokens 16w..16w+15 of a stage and keeps its own online softmax; the 4 warps merge at the
//   end (log-sum-exp factors; each warp's partials in a shared-memory slot of its own, summed
//   in warp order, so the result is bit-reproducible). mma.sync m16n8k16 f16 x f16 -> f32;
//   fragment coordinates of lane l: g = l / 4, t = l % 4. The pages are unchanged.
//   Codes -> f16: codes_to_half(w) gives (c0,c4), (c1,c5), (c2,c6), (c3,c7) of a word's 8
//   nibbles: (w & 0x000F000F) | 0x64006400 is the half2 1024 + c (HSUB2 1024), the 0x00F0
//   nibble gives 1024 + 16c (HFMA2 by 1/16, -64), and w >> 8 gives the other two; exact.
//   Then dequant4: one HFMA2 code * scale + min per pair with the pair's tokens' f16
//   (scale, min) (PRMT-gathered), i.e. K and V rounded to f16 once, the values an f16 cache
//   of the same dequantized keys would hold (relative error <= 2^-11; the INT4 step itself
//   is scale / 2, ~2^-5 of the group's range). No value rounds to inf: the quantizer
//   (quantize_group32, as the CPU's quantize_group) steps a group's scale down where 15 *
//   scale + min would round past 65504 (e.g. max 65504, min 0: f16(65504 / 15) = 4368 and
//   15 * 4368 rounds to inf, so 4364 is stored).
//   Scores S^T = K q^T (tokens in the MMA rows), per 32-dim group j (two k-steps):
//   ldmatrix.x4 (non-trans) of the 8x16-byte code matrices (tokens th*8..+7, group j) gives
//   lane (g, t) word t of group j of token th*8 + g, i.e. dims 32j + 8t + i; k-step s uses,
//   for tokens g (a0, a2) and 8 + g (a1, a3), the dequantized pairs (c_{2s}, c_{2s+4}) and
//   (c_{2s+1}, c_{2s+5}) (each token's scale and min broadcast to both halves), and B = q^T
//   with the same dim permutation: b0 = (q[32j+8t+2s], q[32j+8t+2s+4]), b1 = (q[32j+8t+2s+1],
//   q[32j+8t+2s+5]) of head g (zero for g >= G). The groups accumulate in f32, even and odd
//   groups in two chains (latency). C: lane (g, t) gets tokens g, 8 + g x heads 2t, 2t+1,
//   times log2e * softmax_scale. The G <= 8 heads fill the 8 columns of m16n8k16, so a warp
//   needs 8 score MMAs per 16 tokens (with the heads in the 16 rows: 16, 3/4 of them zero
//   rows at G = 4; measured 2-6% slower, see the crate README).
//   Softmax: max per head over the 8 lanes of a t (3 xor shuffles of 2 values), p =
//   exp2(s - m) in f32; a head's rescale factor is in the lane that owns its O columns.
//   Output: O^T (dims x heads) += V^T (dims x 16 tokens) * P^T (16 tokens x heads) per group
//   j. ldmatrix.x4.trans of the V code matrices gives lane (g, t) the 16-bit words (4 codes,
//   dims 32j + 4g..+3) of tokens 2t (low) and 2t+1 (high), so codes_to_half yields A
//   registers pairing two tokens per dim with no nibble gathers, dequantized with the two
//   tokens' (scale, min): m-tile (j, p) has row g = dim 32j + 4g + 2p, row g+8 = that dim
//   + 1. B = P^T in f16 (as FlashAttention rounds P): the score layout (token g, heads 2t,
//   2t+1) is the transpose of the B layout (head g, tokens 2t, 2t+1), so b0 / b1 are one
//   movmatrix.trans each of the packed f16 p of tokens 0..7 / 8..15. Masked tokens are
//   zero-filled (codes and params 0, so value 0) and get p = 0. Heads >= G compute finite
//   garbage in unused columns, never written.
//   Work per warp and 16 tokens (D=128): 2+2 ldmatrix, 8 + 16 MMAs, about 200 INT/FP16
//   instructions for the code conversion and dequantization, ~40 FP32 for the softmax.
//   The earlier form (raw codes in the MMAs, scale and min applied to the f32 products, P
//   times the V scale split into f16 hi + lo for two MMAs) needed ~500 instructions and 167
//   registers (3 CTAs per SM); dequantizing in registers made the kernel 12% faster at B = 1
//   and 16% at B = 8, 128K (H100, dev/kv_profile.py) with the same error against the f32
//   reference (3.9e-4 of max |o|, dominated by the f16 output).
//   Tuning variants kv_decode_int4tc_s{S}_m{M}_d*_g* (S stages, M CTAs per SM in the launch
//   bounds; TRITTER_KV_TC_VARIANT, see the crate README) are the same code; stages above
//   40 KB use dynamic shared memory.

#include "common.cuh"
#include "kv_int4_store.cuh"
#include "warp_mma.cuh"

namespace {

constexpr int kTile = 32;            // tokens per pipeline stage
constexpr int kThreads = 128;        // 4 warps per CTA
constexpr int kWarps = kThreads / 32;
constexpr int kWriteThreads = 256;
constexpr unsigned kFull = 0xffffffffu;

// Sum of element i of the kWarps per-warp slots of a merge buffer (slot w at s + w * stride),
// in warp order: the fixed order that makes the decode merges bit-reproducible.
__device__ __forceinline__ float sum_warp_slots(const float* s, int stride, int i) {
    float sum = s[i];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) sum += s[w * stride + i];
    return sum;
}

// ------------------------------------------------------------------------------------------
// Non-finite check (run before anything is written, so a bad input never reaches a page).
// ------------------------------------------------------------------------------------------
// Two f16 values of a word are NaN or Inf iff their exponent bits are all ones.
__device__ __forceinline__ unsigned nonfinite_halves(unsigned w) {
    return ((w & 0x7c00u) == 0x7c00u) + ((w & 0x7c000000u) == 0x7c000000u);
}

// Memory-bound: 16-byte streaming loads (8 values) when x is 16-byte aligned, the tail (and a
// misaligned x) one value at a time.
__device__ __forceinline__ void count_nonfinite(const __half* __restrict__ x, long long n, unsigned* __restrict__ count) {
    unsigned bad = 0;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    const long long n8 = (reinterpret_cast<uintptr_t>(x) & 15) == 0 ? n / 8 : 0;
    const uint4* x8 = reinterpret_cast<const uint4*>(x);
    for (long long i = tid; i < n8; i += stride) {
        const uint4 r = __ldcs(x8 + i);
        bad += nonfinite_halves(r.x) + nonfinite_halves(r.y) + nonfinite_halves(r.z) + nonfinite_halves(r.w);
    }
    const unsigned short* xs = reinterpret_cast<const unsigned short*>(x);
    for (long long i = 8 * n8 + tid; i < n; i += stride) bad += (xs[i] & 0x7c00u) == 0x7c00u;
    bad = __reduce_add_sync(kFull, bad);
    if ((threadIdx.x & 31) == 0 && bad) atomicAdd(count, bad);
}

// ------------------------------------------------------------------------------------------
// Writes: one thread per (K, V) pair of groups of 32 values.
// ------------------------------------------------------------------------------------------
using tritter::kv::quantize_group32;

// Quantizes (INT4) or copies (F16) one group of 32 values `src` of head h into slot `slot`
// of the page at `base` (K half for kv = 0, V half for kv = 1). With `nonfinite` (the slot
// writer), a group holding NaN or Inf is stored as zeros and counted instead, so no page ever
// holds a non-finite value.
template <bool kInt4>
__device__ __forceinline__ void store_group(const __half* __restrict__ src, uint8_t* __restrict__ base, int kv, int h,
                                            int slot, int g, int heads_kv, int head_dim, int page_size,
                                            unsigned* __restrict__ nonfinite) {
    float x[32];
    if ((reinterpret_cast<uintptr_t>(src) & 15) == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(src) + i);  // read once: evict first
            const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 f = __half22float2(h2[j]);
                x[8 * i + 2 * j] = f.x;
                x[8 * i + 2 * j + 1] = f.y;
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < 32; ++i) x[i] = __half2float(src[i]);
    }

    if (nonfinite != nullptr) {
        bool bad = false;
#pragma unroll
        for (int i = 0; i < 32; ++i) bad |= !(fabsf(x[i]) <= 3.402823466e38f);
        if (bad) {
            atomicAdd(nonfinite, 1u);
#pragma unroll
            for (int i = 0; i < 32; ++i) x[i] = 0.0f;
        }
    }
    const tritter::kv::GroupDst dst = tritter::kv::group_dst<kInt4>(base, kv, h, slot, g, heads_kv, head_dim, page_size);
    if constexpr (kInt4) {
        uint32_t words[4];
        __half scale_h, min_h;
        quantize_group32(x, words, scale_h, min_h);
        *reinterpret_cast<uint4*>(dst.values) = make_uint4(words[0], words[1], words[2], words[3]);
        *dst.params = __halves2half2(scale_h, min_h);
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            __half2 h2[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) h2[j] = __floats2half2_rn(x[8 * i + 2 * j], x[8 * i + 2 * j + 1]);
            reinterpret_cast<uint4*>(dst.values)[i] = *reinterpret_cast<const uint4*>(h2);
        }
    }
}

// This thread's pair of groups of a write of n tokens: token t, head h, group g of 32
// values, of K and of V (one thread quantizes both: two independent 64-byte loads in
// flight before the first quantization, which took the bench's append from 79% to 85% of
// the copy rate on the H100); false past the last group. 32-bit index math (the launches
// check 2 * n * heads_kv * head_dim / 32 <= INT_MAX): 64-bit division and modulo per
// thread cost more than the quantization.
__device__ __forceinline__ bool group_coords(int n, int heads_kv, int head_dim, int& t, int& h, int& g) {
    const unsigned groups_per_row = head_dim / 32;
    const unsigned per_kv = (unsigned)n * heads_kv * groups_per_row;
    const unsigned r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= per_kv) return false;
    const unsigned tok_head = r / groups_per_row;  // token * heads_kv + head
    g = (int)(r - tok_head * groups_per_row);
    t = (int)(tok_head / heads_kv);
    h = (int)(tok_head - t * heads_kv);
    return true;
}

// One thread per (K, V) pair of groups of one append (a sequence's consecutive positions
// start..start+n, pages resolved through the ticket's logical page range).
template <bool kInt4>
__device__ __forceinline__ void write_groups(const __half* __restrict__ k, const __half* __restrict__ v,
                                             uint8_t* __restrict__ pool, const int* __restrict__ pages,
                                             int first_page, int start, int n, int heads_kv, int head_dim,
                                             int page_size, int num_pages, long long page_bytes, int layer0) {
    int t, h, g;
    if (!group_coords(n, heads_kv, head_dim, t, h, g)) return;
    const int pos = start + t;
    const int page = pages[pos / page_size - first_page];
    if (page < 0 || page >= num_pages) return;  // token already outside the window: not stored
    const int layer = blockIdx.y;
    const long long off = (((long long)layer * n + t) * heads_kv + h) * head_dim + g * 32;
    uint8_t* base = pool + ((long long)(layer0 + layer) * num_pages + page) * page_bytes;
    store_group<kInt4>(k + off, base, 0, h, pos % page_size, g, heads_kv, head_dim, page_size, nullptr);
    store_group<kInt4>(v + off, base, 1, h, pos % page_size, g, heads_kv, head_dim, page_size, nullptr);
}

// One thread per (K, V) pair of groups of a batch of appends of one layer (the engine's
// decode step: one token of each of B sequences, or several prompts): token t goes to pool
// slot slots[t] = page * page_size + slot, or nowhere when slots[t] < 0.
template <bool kInt4>
__device__ __forceinline__ void write_slot_groups(const __half* __restrict__ k, const __half* __restrict__ v,
                                                  uint8_t* __restrict__ pool, const int* __restrict__ slots, int n,
                                                  int heads_kv, int head_dim, int page_shift, int num_pages,
                                                  long long page_bytes, int layer, unsigned* __restrict__ nonfinite) {
    int t, h, g;
    if (!group_coords(n, heads_kv, head_dim, t, h, g)) return;
    const int s = slots[t];
    const int page = s >> page_shift;
    if (s < 0 || page >= num_pages) return;
    const long long off = ((long long)t * heads_kv + h) * head_dim + g * 32;
    uint8_t* base = pool + ((long long)layer * num_pages + page) * page_bytes;
    const int slot = s & ((1 << page_shift) - 1);
    store_group<kInt4>(k + off, base, 0, h, slot, g, heads_kv, head_dim, 1 << page_shift, nonfinite);
    store_group<kInt4>(v + off, base, 1, h, slot, g, heads_kv, head_dim, 1 << page_shift, nonfinite);
}

// ------------------------------------------------------------------------------------------
// Decode attention.
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const int src_size = valid ? 16 : 0;  // 0: zero-fill, nothing read from global memory
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_size) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Reduce-scatter of N per-lane values over the L lanes (xor offsets O = L/2 .. 1) of a lane
// group. Afterwards, with N >= L, lane li holds the sums of values li*(N/L) + i, i < N/L;
// with N < L it holds the sum of value li / (L/N) in v[0].
template <int N, int O>
struct ReduceScatter {
    static __device__ __forceinline__ void run(float* v, int li) {
        if constexpr (O == 0) {
            return;
        } else if constexpr (N >= 2) {
            const bool upper = (li & O) != 0;
#pragma unroll
            for (int i = 0; i < N / 2; ++i) {
                const float send = upper ? v[i] : v[i + N / 2];
                const float keep = upper ? v[i + N / 2] : v[i];
                v[i] = keep + __shfl_xor_sync(kFull, send, O);
            }
            ReduceScatter<N / 2, O / 2>::run(v, li);
        } else {
            v[0] += __shfl_xor_sync(kFull, v[0], O);
            ReduceScatter<1, O / 2>::run(v, li);
        }
    }
};

template <int D, int G, bool kInt4>
struct DecodeCfg {
    static constexpr int kLanes = D / 8;                   // lanes per token (8 dims each)
    static constexpr int kTokPerStep = 32 / kLanes;        // tokens a warp covers at once
    static constexpr int kTokPerGroup = kTile / (kWarps * kTokPerStep);  // per lane group per tile
    static constexpr int kRoundTok = (16 / G) < 1 ? 1 : ((16 / G) < kTokPerGroup ? (16 / G) : kTokPerGroup);
    static constexpr int kRounds = kTokPerGroup / kRoundTok;
    static constexpr int kValBytes = kInt4 ? D / 2 : 2 * D;  // per token and head
    static constexpr int kParBytes = kInt4 ? D / 32 * 4 : 0;
    static constexpr int kStages = kInt4 ? 4 : 2;
    // Offsets inside one stage: K values, K params, V values, V params.
    static constexpr int kKv = 0;
    static constexpr int kKp = kTile * kValBytes;
    static constexpr int kVv = kKp + kTile * kParBytes;
    static constexpr int kVp = kVv + kTile * kValBytes;
    static constexpr int kStageBytes = kVp + kTile * kParBytes;
    static constexpr int kValChunks = kTile * kValBytes / 16;
    static constexpr int kParChunks = kTile * kParBytes / 16;
    static constexpr int kChunks = 2 * (kValChunks + kParChunks);
    static_assert(kTokPerGroup * kWarps * kTokPerStep == kTile, "tile must split evenly");
    static_assert(kRounds * kRoundTok == kTokPerGroup, "rounds must split evenly");
    static_assert(kStageBytes % 16 == 0, "stages are 16-byte aligned");
};

struct SeqView {
    int len, sinks_end, window_start, n_sink_tiles, window_tile0, n_tiles;
};

__device__ __forceinline__ SeqView seq_view(int len, int sinks, int window) {
    SeqView s;
    s.len = len;
    s.sinks_end = min(sinks, len);
    s.window_start = max(s.sinks_end, len - window);  // window = INT_MAX without a window
    s.n_sink_tiles = (s.sinks_end + kTile - 1) / kTile;
    s.window_tile0 = max(s.window_start / kTile, s.n_sink_tiles);
    const int end_tiles = (len + kTile - 1) / kTile;
    s.n_tiles = s.n_sink_tiles + max(0, end_tiles - s.window_tile0);
    return s;
}

__device__ __forceinline__ bool token_visible(const SeqView& s, int pos) {
    return pos < s.sinks_end || (pos >= s.window_start && pos < s.len);
}

// Value of nibble j (0..7) of `w` as 1 + code / 128.
template <int J>
__device__ __forceinline__ float nibble_f(uint32_t w) {
    const uint32_t bits = (J <= 4) ? (w << (16 - 4 * J)) : (w >> (4 * J - 16));
    return __uint_as_float(0x3F800000u | (bits & 0x000F0000u));
}

template <bool kInt4>
__device__ __forceinline__ void load_row8(const uint8_t* stage_vals, int tt, int li, int val_bytes, float (&f)[8]) {
    if constexpr (kInt4) {
        const uint32_t w = *reinterpret_cast<const uint32_t*>(stage_vals + tt * val_bytes + li * 4);
        f[0] = nibble_f<0>(w);
        f[1] = nibble_f<1>(w);
        f[2] = nibble_f<2>(w);
        f[3] = nibble_f<3>(w);
        f[4] = nibble_f<4>(w);
        f[5] = nibble_f<5>(w);
        f[6] = nibble_f<6>(w);
        f[7] = nibble_f<7>(w);
    } else {
        const uint4 raw = *reinterpret_cast<const uint4*>(stage_vals + tt * val_bytes + li * 16);
        const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 x = __half22float2(h2[j]);
            f[2 * j] = x.x;
            f[2 * j + 1] = x.y;
        }
    }
}

// (a, b) with value = a * f + b for the lane's group of token tt (INT4), zero when masked.
__device__ __forceinline__ float2 group_ab(const uint8_t* stage_pars, int tt, int li, int par_bytes, bool valid) {
    const __half2 sm = *reinterpret_cast<const __half2*>(stage_pars + tt * par_bytes + (li / 4) * 4);
    const float s = __low2float(sm), m = __high2float(sm);
    const float a = 128.0f * s;
    return valid ? make_float2(a, m - a) : make_float2(0.0f, 0.0f);
}

template <int D, int G, bool kInt4>
__device__ __forceinline__ void decode_split(const __half* __restrict__ q, const uint8_t* __restrict__ pool,
                                             const int* __restrict__ block_tables, const int* __restrict__ seq_lens,
                                             int bt_stride, int heads_kv, int page_shift, int num_pages,
                                             long long page_bytes, int sinks, int window, int tiles_per_split,
                                             int num_splits, float scale_log2, float* __restrict__ o_part,
                                             float2* __restrict__ ml_part) {
    using C = DecodeCfg<D, G, kInt4>;
    constexpr int L = C::kLanes;
    __shared__ __align__(16) uint8_t stages[C::kStages][C::kStageBytes];
    __shared__ float s_p[kTile][G + 1];
    __shared__ float s_m[G], s_l[G], s_corr[G];
    static_assert(C::kStages * C::kStageBytes >= kWarps * G * D * 4, "the merge buffer reuses the stages");

    const int split = blockIdx.x, hkv = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int lg = lane / L, li = lane % L;
    const int heads_q = heads_kv * G;
    const int page_size = 1 << page_shift;

    const SeqView sv = seq_view(seq_lens[b], sinks, window);
    const int t_begin = split * tiles_per_split;
    const int t_end = min(sv.n_tiles, t_begin + tiles_per_split);

    if (tid < G) {
        s_m[tid] = -INFINITY;
        s_l[tid] = 0.0f;
    }
    __syncthreads();  // s_m, s_l are read/updated by other threads below

    // Query slice of this lane, pre-scaled into the exp2 domain; per-head sums for the
    // INT4 min term.
    float qr[G][8];
    float qsum[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const __half* qh = q + ((long long)b * heads_q + hkv * G + g) * D + li * 8;
        qsum[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            qr[g][j] = __half2float(qh[j]) * scale_log2;
            qsum[g] += qr[g][j];
        }
    }

    const int* bt = block_tables + (long long)b * bt_stride;
    const long long val_region = (long long)heads_kv * page_size * C::kValBytes;
    const long long par_region = (long long)heads_kv * page_size * C::kParBytes;

    // Issues the cp.async copies of enumerated tile `it` into stage `st`.
    auto issue = [&](int it, int st) {
        const int tile = it < sv.n_sink_tiles ? it : sv.window_tile0 + (it - sv.n_sink_tiles);
        const int pos0 = tile * kTile;
        uint8_t* dst = stages[st];
#pragma unroll
        for (int k = 0; k < (C::kChunks + kThreads - 1) / kThreads; ++k) {
            const int c = tid + k * kThreads;
            if (c >= C::kChunks) break;
            int kv, rel, tok, toks, byte_in_tok, smem_off, bytes_per_tok;
            bool par;
            if (c < C::kValChunks + C::kParChunks) {
                kv = 0;
                rel = c;
            } else {
                kv = 1;
                rel = c - (C::kValChunks + C::kParChunks);
            }
            par = rel >= C::kValChunks;
            if (par) rel -= C::kValChunks;
            bytes_per_tok = par ? C::kParBytes : C::kValBytes;
            tok = (rel * 16) / bytes_per_tok;
            byte_in_tok = (rel * 16) % bytes_per_tok;
            toks = bytes_per_tok >= 16 ? 1 : 16 / bytes_per_tok;
            smem_off = (kv ? (par ? C::kVp : C::kVv) : (par ? C::kKp : C::kKv)) + rel * 16;
            bool valid = false;
            for (int u = 0; u < toks; ++u) valid |= token_visible(sv, pos0 + tok + u);
            const uint8_t* src = pool;
            if (valid) {
                const int pos = pos0 + tok;
                const int page = __ldg(bt + (pos >> page_shift));
                if (page >= 0 && page < num_pages) {
                    const int slot = pos & (page_size - 1);
                    src = pool + (long long)page * page_bytes + kv * (val_region + par_region) + (par ? val_region : 0) +
                          ((long long)hkv * page_size + slot) * bytes_per_tok + byte_in_tok;
                } else {
                    valid = false;  // cannot happen for a consistent block table; never read it
                }
            }
            cp_async16(dst + smem_off, src, valid);
        }
    };

#pragma unroll
    for (int s = 0; s < C::kStages - 1; ++s) {
        if (t_begin + s < t_end) issue(t_begin + s, s);
        cp_async_commit();
    }

    float o[G][8];
    float oc[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        oc[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) o[g][j] = 0.0f;
    }

    for (int it = t_begin; it < t_end; ++it) {
        const int k_iter = it - t_begin;
        cp_async_wait<C::kStages - 2>();
        __syncthreads();
        {
            const int nx = it + C::kStages - 1;
            if (nx < t_end) issue(nx, (k_iter + C::kStages - 1) % C::kStages);
            cp_async_commit();
        }
        const uint8_t* st = stages[k_iter % C::kStages];
        const int tile = it < sv.n_sink_tiles ? it : sv.window_tile0 + (it - sv.n_sink_tiles);
        const int pos0 = tile * kTile;

        // ---- scores: s_p[t][g] = q_g . k_t (log2 domain), -inf where masked ----
#pragma unroll
        for (int r = 0; r < C::kRounds; ++r) {
            constexpr int N = C::kRoundTok * G;
            float part[N];
#pragma unroll
            for (int j = 0; j < C::kRoundTok; ++j) {
                const int tt = warp * (kTile / kWarps) + (r * C::kRoundTok + j) * C::kTokPerStep + lg;
                float f[8];
                load_row8<kInt4>(st + C::kKv, tt, li, C::kValBytes, f);
                float2 ab = make_float2(1.0f, 0.0f);
                if constexpr (kInt4) ab = group_ab(st + C::kKp, tt, li, C::kParBytes, true);
#pragma unroll
                for (int g = 0; g < G; ++g) {
                    float acc = 0.0f;
#pragma unroll
                    for (int d = 0; d < 8; ++d) acc = fmaf(qr[g][d], f[d], acc);
                    part[j * G + g] = kInt4 ? fmaf(ab.x, acc, ab.y * qsum[g]) : acc;
                }
            }
            ReduceScatter<N, L / 2>::run(part, li);
            constexpr int kPerLane = N >= L ? N / L : 1;
            constexpr int kShare = N >= L ? 1 : L / N;  // lanes holding the same sum
#pragma unroll
            for (int i = 0; i < kPerLane; ++i) {
                const int idx = li / kShare * kPerLane + i;
                const bool writer = li % kShare == 0;
                const int j = idx / G, g = idx % G;
                const int tt = warp * (kTile / kWarps) + (r * C::kRoundTok + j) * C::kTokPerStep + lg;
                if (writer) s_p[tt][g] = token_visible(sv, pos0 + tt) ? part[i] : -INFINITY;
            }
        }
        __syncthreads();

        // ---- online softmax over the tile, one warp per head ----
        for (int g = warp; g < G; g += kWarps) {
            const float sc = s_p[lane][g];
            const float m_old = s_m[g];
            const float m_new = fmaxf(m_old, tritter::warp_max(sc));
            float p = 0.0f, corr = 1.0f;
            if (m_new != -INFINITY) {
                p = exp2f(sc - m_new);
                corr = exp2f(m_old - m_new);
            }
            float sum = p;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
            s_p[lane][g] = p;
            __syncwarp();
            if (lane == 0) {
                s_m[g] = m_new;
                s_l[g] = s_l[g] * corr + sum;
                s_corr[g] = corr;
            }
        }
        __syncthreads();

        // ---- o = o * corr + sum_t p_t v_t ----
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const float corr = s_corr[g];
            oc[g] *= corr;
#pragma unroll
            for (int d = 0; d < 8; ++d) o[g][d] *= corr;
        }
#pragma unroll
        for (int j = 0; j < C::kTokPerGroup; ++j) {
            const int tt = warp * (kTile / kWarps) + j * C::kTokPerStep + lg;
            float f[8];
            load_row8<kInt4>(st + C::kVv, tt, li, C::kValBytes, f);
            float2 ab = make_float2(1.0f, 0.0f);
            if constexpr (kInt4) ab = group_ab(st + C::kVp, tt, li, C::kParBytes, token_visible(sv, pos0 + tt));
#pragma unroll
            for (int g = 0; g < G; ++g) {
                const float p = s_p[tt][g];
                const float c1 = p * ab.x;
                if constexpr (kInt4) oc[g] = fmaf(p, ab.y, oc[g]);
#pragma unroll
                for (int d = 0; d < 8; ++d) o[g][d] = fmaf(c1, f[d], o[g][d]);
            }
        }
    }
    cp_async_wait<0>();

    // ---- combine the lane groups' partial o, write this split's (o, m, l) ----
    // In a fixed order, so a decode step is bit-reproducible (a CUDA graph replay equals the
    // eager launch): the lane groups of a warp by an xor butterfly (both partners add the
    // same two values), then the warps' sums in warp order through the free stage memory.
    __syncthreads();  // every warp is done reading the stages
    float* s_w = reinterpret_cast<float*>(&stages[0][0]);  // [kWarps][G][D]
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int d = 0; d < 8; ++d) {
            float v = o[g][d] + oc[g];
#pragma unroll
            for (int off = L; off < 32; off <<= 1) v += __shfl_xor_sync(kFull, v, off);
            if (lg == 0) s_w[(warp * G + g) * D + li * 8 + d] = v;
        }
    }
    __syncthreads();
    for (int i = tid; i < G * D; i += kThreads) {
        const int g = i / D, d = i % D;
        const long long row = ((long long)b * heads_q + hkv * G + g) * num_splits + split;
        o_part[row * D + d] = sum_warp_slots(s_w, G * D, i);
        if (d == 0) ml_part[row] = make_float2(s_m[g], s_l[g]);
    }
}


// ------------------------------------------------------------------------------------------
// INT4 decode on tensor cores (kv_decode_int4tc_*): see the top comment.
// ------------------------------------------------------------------------------------------
namespace tc {

constexpr int kStageTok = 2 * kTile;  // 64 tokens per stage: 16 per warp
// Default variant (kv_decode_int4tc_d*_g*): 3 stages, launch bounds of 4 CTAs per SM. The
// tuning variants kv_decode_int4tc_s{S}_m{M}_d*_g* differ only in these two numbers.
constexpr int kDefStages = 3;
constexpr int kDefMinBlocks = 4;      // CTAs per SM the registers are sized for (launch bounds)

template <int D>
struct Cfg {
    static constexpr int kNg = D / 32;        // quantization groups per token and head
    static constexpr int kRow = D / 2 + 16;   // padded smem row of codes: ldmatrix conflict-free
    static constexpr int kPar = kNg * 4;      // (scale, min) half2 per group
    static constexpr int kKc = 0;
    static constexpr int kKp = kKc + kStageTok * kRow;
    static constexpr int kVc = kKp + kStageTok * kPar;
    static constexpr int kVp = kVc + kStageTok * kRow;
    static constexpr int kStageBytes = kVp + kStageTok * kPar;
    static_assert(kStageBytes % 16 == 0 && kKp % 16 == 0 && kVc % 16 == 0 && kVp % 16 == 0, "16-byte aligned");
    static_assert(kNg % 2 == 0, "ldmatrix.x4 takes two groups");
};

// Stages above 40 KB live in dynamic shared memory (the launch passes S * kStageBytes and
// raises the function's dynamic limit); smaller ones stay static, like the default variant.
// Mirrored by `tc_stage_bytes` / `TcVariant::dynamic_smem` in crates/kv-int4/src/cuda.
template <int D, int S>
struct StageMem {
    static constexpr int kBytes = S * Cfg<D>::kStageBytes;
    static constexpr bool kDynamic = kBytes > 40960;
};

// (a & B) | C in one LOP3: with both masks as immediates the compiler emits an AND and an
// OR (SASS LOP3 takes one immediate); in PTX lop3 ptxas keeps one mask in a register,
// loaded once outside the loop.
template <uint32_t B, uint32_t C>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "n"(B), "n"(C));
    return d;
}

// The 8 codes of `w` (nibble i = code i) as f16 pairs: e[0] = (c0, c4), e[1] = (c1, c5),
// e[2] = (c2, c6), e[3] = (c3, c7), low half first. 0x6400 | c is the f16 1024 + c and
// 0x6400 | c << 4 is 1024 + 16 c, so one LOP3 and one exact HSUB2 / HFMA2 per pair.
__device__ __forceinline__ void codes_to_half(uint32_t w, uint32_t (&e)[4]) {
    const uint32_t hi = w >> 8;
    const uint32_t r0 = and_or<0x000F000Fu, 0x64006400u>(w);
    const uint32_t r1 = and_or<0x00F000F0u, 0x64006400u>(w);
    const uint32_t r2 = and_or<0x000F000Fu, 0x64006400u>(hi);
    const uint32_t r3 = and_or<0x00F000F0u, 0x64006400u>(hi);
    const uint32_t k1024 = 0x64006400u, k16th = 0x2C002C00u, km64 = 0xD400D400u;
    const __half2 c1024 = *reinterpret_cast<const __half2*>(&k1024);
    const __half2 c16th = *reinterpret_cast<const __half2*>(&k16th);
    const __half2 cm64 = *reinterpret_cast<const __half2*>(&km64);
    __half2 h0 = __hsub2(*reinterpret_cast<const __half2*>(&r0), c1024);
    __half2 h1 = __hfma2(*reinterpret_cast<const __half2*>(&r1), c16th, cm64);
    __half2 h2 = __hsub2(*reinterpret_cast<const __half2*>(&r2), c1024);
    __half2 h3 = __hfma2(*reinterpret_cast<const __half2*>(&r3), c16th, cm64);
    e[0] = *reinterpret_cast<uint32_t*>(&h0);
    e[1] = *reinterpret_cast<uint32_t*>(&h1);
    e[2] = *reinterpret_cast<uint32_t*>(&h2);
    e[3] = *reinterpret_cast<uint32_t*>(&h3);
}

// The (scale, min) half2 words of one token's kNg groups (16 or 8 bytes of shared memory),
// kept packed (converted at use) to save registers.
template <int kNg>
__device__ __forceinline__ void load_params(const uint8_t* p, uint32_t (&w)[kNg]) {
    if constexpr (kNg == 4) {
        const uint4 v = *reinterpret_cast<const uint4*>(p);
        w[0] = v.x;
        w[1] = v.y;
        w[2] = v.z;
        w[3] = v.w;
    } else {
        static_assert(kNg == 2, "D is 64 or 128");
        const uint2 v = *reinterpret_cast<const uint2*>(p);
        w[0] = v.x;
        w[1] = v.y;
    }
}
// e[i] = e[i] * s2 + m2 (half2, one rounding): codes 0..15 (exact in f16) to the
// dequantized values, rounded to f16 as an f16 cache would hold them.
__device__ __forceinline__ void dequant4(uint32_t (&e)[4], uint32_t s2, uint32_t m2) {
    const __half2 s = *reinterpret_cast<const __half2*>(&s2), m = *reinterpret_cast<const __half2*>(&m2);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const __half2 x = __hfma2(*reinterpret_cast<const __half2*>(&e[i]), s, m);
        e[i] = *reinterpret_cast<const uint32_t*>(&x);
    }
}

__device__ __forceinline__ void mma_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
    const unsigned a[4] = {a0, a1, a2, a3};
    tritter::mma_16816<__half>(c, a, b0, b1);
}

// The split-KV merge done by the CTA that finishes last among the `num_splits` CTAs of one
// (sequence, KV head) (the threadFenceReduction pattern of the CUDA samples): every CTA
// writes its partials, fences, and takes a ticket from `counter`; the last one reads all
// splits of its G query heads from L2 and writes `out` (the ticket counter is reset for the
// next launch). Saves the second kernel (its launch gap and a pass over a cold grid) and
// overlaps the merges with the CTAs still running. Sums run in split order, so the result
// does not depend on which CTA merges: as deterministic as the separate reduce.
template <int D, int G, int kSmemFloats>
__device__ __forceinline__ void merge_last_split(const float* __restrict__ o_part, const float2* __restrict__ ml_part,
                                                 __half* __restrict__ out, unsigned* __restrict__ counter,
                                                 float* smem_f, long long row0, long long out0, int num_splits) {
    __shared__ bool s_last;
    __shared__ float s_m[G], s_l[G];
    __threadfence();  // this CTA's partials are visible device-wide before its ticket
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned ticket = atomicAdd(counter, 1u);
        s_last = ticket == static_cast<unsigned>(num_splits) - 1u;
        if (s_last) *counter = 0u;  // every CTA of this launch has taken its ticket
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // per head: M = max m over splits with l > 0, L = sum l 2^(m - M) (warp per head, fixed order)
    for (int h = warp; h < G; h += kWarps) {
        const float2* ml = ml_part + row0 + (long long)h * num_splits;
        float m = -INFINITY;
        for (int s = lane; s < num_splits; s += 32) {
            const float2 x = __ldcg(ml + s);
            if (x.y > 0.0f) m = fmaxf(m, x.x);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, o));
        float l = 0.0f;
        for (int s = lane; s < num_splits; s += 32) {
            const float2 x = __ldcg(ml + s);
            if (x.y > 0.0f) l = fmaf(x.y, exp2f(x.x - m), l);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(kFull, l, o);
        if (lane == 0) {
            s_m[h] = m;
            s_l[h] = l;
        }
    }
    // o: thread (column c, group r) sums float4 column c (4 dims of one head) over the splits
    // r, r + kGroups, ... with kUnroll independent 16-byte L2 loads in flight (a serial chain
    // per output measured +7 us at B = 1, 128K: the merge is the launch's tail), then the
    // groups are added in group order.
    constexpr int kCols = G * D / 4;
    constexpr int kColsPerThread = kCols > kThreads ? kCols / kThreads : 1;
    constexpr int kGroups = kCols >= kThreads ? 1 : kThreads / kCols;
    constexpr int kChunk = kSmemFloats / G - (kGroups > 1 ? kThreads * 4 / G : 0);  // splits per weight chunk
    constexpr int kUnroll = 16 / kColsPerThread;
    static_assert(kCols % kThreads == 0 || kThreads % kCols == 0, "merge mapping");
    static_assert(kChunk >= 32, "merge weights chunk");
    const int grp = tid / (kCols * kColsPerThread >= kThreads ? kThreads : kCols);
    float4 acc[kColsPerThread];
#pragma unroll
    for (int r = 0; r < kColsPerThread; ++r) acc[r] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int c0 = 0; c0 < num_splits; c0 += kChunk) {
        const int n = min(kChunk, num_splits - c0);
        __syncthreads();  // s_m / s_l written; the previous chunk's weights consumed
        for (int i = tid; i < G * n; i += kThreads) {
            const int h = i / n, s = i % n;
            const float2 x = __ldcg(ml_part + row0 + (long long)h * num_splits + c0 + s);
            smem_f[h * kChunk + s] = x.y > 0.0f ? exp2f(x.x - s_m[h]) : 0.0f;
        }
        __syncthreads();
        if (grp < kGroups) {
#pragma unroll
            for (int r = 0; r < kColsPerThread; ++r) {
                const int col = (tid % (kCols < kThreads ? kCols : kThreads)) + r * kThreads;
                const int h = col / (D / 4);
                const float4* op = reinterpret_cast<const float4*>(o_part + (row0 + (long long)h * num_splits + c0) * D) +
                                   col % (D / 4);
                const float* w = smem_f + h * kChunk;
                float4 a = acc[r];
                // batches of kUnroll predicated loads, all issued before the first use (a
                // runtime-count loop left its remainder, all of it at 8 splits, as a chain)
                for (int s0 = grp; s0 < n; s0 += kGroups * kUnroll) {
                    float4 x[kUnroll];
#pragma unroll
                    for (int u = 0; u < kUnroll; ++u) {
                        const int s = s0 + u * kGroups;
                        x[u] = s < n ? __ldcg(op + (long long)s * (D / 4)) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                    }
#pragma unroll
                    for (int u = 0; u < kUnroll; ++u) {
                        const int s = s0 + u * kGroups;
                        const float ws = s < n ? w[s] : 0.0f;  // past n: stale shared memory
                        a.x = fmaf(x[u].x, ws, a.x);
                        a.y = fmaf(x[u].y, ws, a.y);
                        a.z = fmaf(x[u].z, ws, a.z);
                        a.w = fmaf(x[u].w, ws, a.w);
                    }
                }
                acc[r] = a;
            }
        }
    }
    float4* part = reinterpret_cast<float4*>(smem_f + G * kChunk);  // [kGroups][kCols] when kGroups > 1
    if constexpr (kGroups > 1) {
        __syncthreads();
        if (grp < kGroups) part[grp * kCols + tid % kCols] = acc[0];
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < kColsPerThread; ++r) {
        const int col = tid + r * kThreads;
        if (col < kCols) {
            float4 a = acc[r];
            if constexpr (kGroups > 1) {
                a = part[col];
#pragma unroll
                for (int q = 1; q < kGroups; ++q) {
                    const float4 x = part[q * kCols + col];
                    a.x += x.x;
                    a.y += x.y;
                    a.z += x.z;
                    a.w += x.w;
                }
            }
            const int h = col / (D / 4), d = 4 * (col % (D / 4));
            const float l = s_l[h];
            __half2* o2 = reinterpret_cast<__half2*>(out + out0 + (long long)h * D + d);
            o2[0] = __floats2half2_rn(l > 0.0f ? a.x / l : 0.0f, l > 0.0f ? a.y / l : 0.0f);
            o2[1] = __floats2half2_rn(l > 0.0f ? a.z / l : 0.0f, l > 0.0f ? a.w / l : 0.0f);
        }
    }
}

// The transpose of an 8x8 matrix of 16-bit values held one 32-bit pair per lane (lane (g, t)
// holds row g, columns 2t, 2t+1; returns the same coordinates of the transpose).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t a) {
    uint32_t d;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
    return d;
}

template <int D, int G, int kStages>
__device__ __forceinline__ void decode_split_tc(const __half* __restrict__ q, const uint8_t* __restrict__ pool,
                                                const int* __restrict__ block_tables,
                                                const int* __restrict__ seq_lens, int bt_stride, int heads_kv,
                                                int page_shift, int num_pages, long long page_bytes, int sinks,
                                                int window, int tiles_per_split, int num_splits, float scale_log2,
                                                float* __restrict__ o_part, float2* __restrict__ ml_part,
                                                __half* __restrict__ out, unsigned* __restrict__ tickets) {
    using C = Cfg<D>;
    constexpr int NG = C::kNg;
    static_assert(kStages * C::kStageBytes >= kWarps * G * D * 4, "the merge buffer reuses the stages");
    static_assert(kStages >= 2, "a pipeline needs two stages");
    uint8_t* smem;
    if constexpr (StageMem<D, kStages>::kDynamic) {
        extern __shared__ __align__(16) uint8_t tc_dyn_stages[];
        smem = tc_dyn_stages;
    } else {
        __shared__ __align__(16) uint8_t tc_stages[StageMem<D, kStages>::kBytes];
        smem = tc_stages;
    }
    auto stage = [&](int i) { return smem + i * C::kStageBytes; };
    __shared__ float s_wm[kWarps][8];
    __shared__ float s_wl[kWarps][8];

    const int split = blockIdx.x, hkv = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;  // MMA fragment coordinates
    const int heads_q = heads_kv * G;
    const int page_size = 1 << page_shift;

    const SeqView sv = seq_view(seq_lens[b], sinks, window);
    const int t_begin = split * tiles_per_split;
    const int t_end = min(sv.n_tiles, t_begin + tiles_per_split);
    const int n_st = t_end > t_begin ? (t_end - t_begin + 1) / 2 : 0;

    // Query A fragments (rows = heads, k = dims), raw f16 (the softmax scale is applied to
    // the f32 scores): group j, k-step s: a0 = (q[32j+8t+2s], q[32j+8t+2s+4]), a2 =
    // (q[32j+8t+2s+1], q[32j+8t+2s+5]) of head g; rows g+8 (a1, a3) are zero.
    uint32_t qa[NG][2][2];
    {
        const bool own = g < G;
        const __half* qh = q + ((long long)b * heads_q + hkv * G + (own ? g : 0)) * D;
#pragma unroll
        for (int j = 0; j < NG; ++j) {
            __half x[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) x[i] = own ? qh[32 * j + 8 * t + i] : __float2half(0.0f);
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                const __half2 lo = __halves2half2(x[2 * s], x[2 * s + 4]);
                const __half2 hi = __halves2half2(x[2 * s + 1], x[2 * s + 5]);
                qa[j][s][0] = *reinterpret_cast<const uint32_t*>(&lo);
                qa[j][s][1] = *reinterpret_cast<const uint32_t*>(&hi);
            }
        }
    }

    const int* bt = block_tables + (long long)b * bt_stride;
    const long long val_region = (long long)heads_kv * page_size * (D / 2);
    const long long par_region = (long long)heads_kv * page_size * C::kPar;

    auto tile_of = [&](int it) { return it < sv.n_sink_tiles ? it : sv.window_tile0 + (it - sv.n_sink_tiles); };

    // cp.async of stage k (enumerated tiles t_begin + 2k, +1) into buffer st. The chunk ->
    // (token, byte) mapping is fixed per thread, so a thread resolves each of its tokens'
    // visibility and page once and issues all of that token's chunks from one address
    // (everything stage-invariant is hoisted out of the loop). Codes: NG threads per token
    // row (consecutive lanes, consecutive 16 bytes: coalesced), K and V from the same slot;
    // D = 128: 2 tokens x (K, V) = 4 chunks per thread, D = 64: 1 x 2. Params: one 16-byte
    // chunk (1 token at D = 128, 2 at D = 64) for the first 2 * kParTok threads.
    constexpr int kTokPass = kThreads / NG;                // tokens per pass of the code copy
    constexpr int kParTok = 16 / C::kPar;                  // tokens per 16-byte param chunk
    constexpr int kParChunksKv = kStageTok / kParTok;      // param chunks of K (or V) per stage
    static_assert(kStageTok % kTokPass == 0 && kThreads >= 2 * kParChunksKv, "copy mapping");
    const long long kv_off = val_region + par_region;      // V region - K region in a page
    const int code_sub = tid % NG, code_tok = tid / NG;
    const long long code_head = (long long)hkv * page_size * (D / 2) + 16 * code_sub;
    const int code_smem = code_tok * C::kRow + 16 * code_sub;
    const bool par_thread = tid < 2 * kParChunksKv;
    const int par_kv = tid / kParChunksKv, par_tok = (tid % kParChunksKv) * kParTok;
    const long long par_head = par_kv * kv_off + val_region + (long long)hkv * page_size * C::kPar;
    const int par_smem = (par_kv ? C::kVp : C::kKp) + (tid % kParChunksKv) * 16;
    // The source of a token's bytes (`bytes_per_tok` per token of this head's region at
    // `head_off` in a page): false when the token is invisible (its chunks are zero-filled,
    // nothing is read) or its page is not resident. Branch-free: the visibility test uses
    // bitwise ops and the block-table load is predicated.
    auto token_src = [&](int pos, bool vis, int bytes_per_tok, long long head_off, const uint8_t*& src) {
        const int page = vis ? __ldg(bt + (pos >> page_shift)) : -1;
        const bool ok = static_cast<unsigned>(page) < static_cast<unsigned>(num_pages);
        src = ok ? pool + (long long)page * page_bytes + head_off + (pos & (page_size - 1)) * bytes_per_tok : pool;
        return ok;
    };
    auto visible = [&](int pos) { return (pos < sv.sinks_end) | ((pos >= sv.window_start) & (pos < sv.len)); };
    auto issue = [&](int k, int st) {
        const int it0 = t_begin + 2 * k;
        uint8_t* dst = stage(st);
#pragma unroll
        for (int u = 0; u < kStageTok / kTokPass; ++u) {
            const int tok = u * kTokPass + code_tok;
            const int it = it0 + tok / kTile;
            if (it < t_end) {
                const int pos = tile_of(it) * kTile + tok % kTile;
                const uint8_t* src;
                const bool ok = token_src(pos, visible(pos), D / 2, code_head, src);
                cp_async16(dst + C::kKc + u * kTokPass * C::kRow + code_smem, src, ok);
                cp_async16(dst + C::kVc + u * kTokPass * C::kRow + code_smem, src + (ok ? kv_off : 0), ok);
            }
        }
        if (par_thread) {
            const int it = it0 + par_tok / kTile;
            if (it < t_end) {
                const int pos = tile_of(it) * kTile + par_tok % kTile;
                bool vis = visible(pos);
                if constexpr (kParTok == 2) vis |= visible(pos + 1);  // same page: pos is even
                const uint8_t* src;
                const bool ok = token_src(pos, vis, C::kPar, par_head, src);
                cp_async16(dst + par_smem, src, ok);
            }
        }
    };

    // Fast copy of a stage whose tiles are fully visible and each inside one page (pages of
    // >= kTile tokens, the common case: everything but the window / sink edges and the last
    // partial tile): warp w copies tile w / 2 of the stage, K (even w) or V (odd w), as one
    // contiguous run of codes (kTile * D / 2 bytes) and one of params (kTile * kPar) from one
    // page: one block-table entry and one base address per warp and stage, then 16-byte
    // cp.async at fixed per-lane offsets (the per-token path above resolves visibility, page
    // and address per token: ~190 of the ~690 instructions a warp issued per stage). The
    // block-table entry is loaded a stage ahead (`fast_page`), so its latency hides behind a
    // stage of compute instead of stalling the issue.
    constexpr int kChunkTok = D / 32;                    // 16-byte code chunks per token
    constexpr int kCodeChunksLane = kTile * kChunkTok / 32;
    constexpr int kParChunksTile = kTile * C::kPar / 16;  // 32 (D = 128) or 16 (D = 64)
    static_assert(kCodeChunksLane * 32 == kTile * kChunkTok && kParChunksTile <= 32, "fast copy mapping");
    // In-page byte offsets fit 31 bits (fast_page requires page_bytes < 2^31): 32-bit
    // arithmetic and one IMAD.WIDE per stage keep the path short under the 128-register cap.
    const int f_tile = warp >> 1;
    const uint32_t f_kv = (warp & 1) ? static_cast<uint32_t>(kv_off) : 0u;
    const uint32_t f_code = f_kv + static_cast<uint32_t>(hkv * page_size * (D / 2) + 16 * lane);
    const uint32_t f_par = f_kv + static_cast<uint32_t>(val_region + hkv * page_size * C::kPar + 16 * lane);
    const bool f_pages_ok = page_size >= kTile && page_bytes <= 0x7fffffffll;
    const int f_code_smem = ((warp & 1) ? C::kVc : C::kKc) + (f_tile * kTile + lane / kChunkTok) * C::kRow +
                            16 * (lane % kChunkTok);
    const int f_par_smem = ((warp & 1) ? C::kVp : C::kKp) + f_tile * kTile * C::kPar + 16 * lane;
    auto tile_full = [&](int it) {
        const int p0 = tile_of(it) * kTile;
        return (p0 + kTile <= sv.sinks_end) | ((p0 >= sv.window_start) & (p0 + kTile <= sv.len));
    };
    // Stage k's copy mode, warp-uniform and the same on every warp: kSlowPath, or the block-table
    // entry of this warp's tile (any int: an id outside the pool zero-fills the tile).
    constexpr int kSlowPath = -0x7fffffff - 1;
    auto fast_page = [&](int k) {
        const int it0 = t_begin + 2 * k;
        const bool fast = f_pages_ok && tile_full(it0) && (it0 + 1 >= t_end || tile_full(it0 + 1));
        const int it = it0 + f_tile;
        if (!fast) return kSlowPath;
        return it < t_end ? __ldg(bt + ((tile_of(it) * kTile) >> page_shift)) : -1;
    };
    auto issue_fast = [&](int k, int st, int page) {
        const int it = t_begin + 2 * k + f_tile;
        if (it >= t_end) return;  // the last stage of an odd tile count: warps 2, 3 idle
        const int p0 = tile_of(it) * kTile;
        const bool ok = static_cast<unsigned>(page) < static_cast<unsigned>(num_pages);
        const uint8_t* pg = pool + static_cast<unsigned long long>(ok ? page : 0) * static_cast<uint32_t>(page_bytes);
        const uint32_t tok = static_cast<uint32_t>(p0 & (page_size - 1));
        const uint8_t* code_src = pg + (f_code + tok * (D / 2));
        const uint8_t* par_src = pg + (f_par + tok * C::kPar);
        uint8_t* dst = stage(st);
#pragma unroll
        for (int i = 0; i < kCodeChunksLane; ++i)
            cp_async16(dst + f_code_smem + i * (32 / kChunkTok) * C::kRow, code_src + 512 * i, ok);
        if (lane < kParChunksTile) cp_async16(dst + f_par_smem, par_src, ok);
    };
    auto issue_stage = [&](int k, int st, int page) {
        if (page == kSlowPath)
            issue(k, st);
        else
            issue_fast(k, st, page);
    };

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < n_st) issue_stage(s, s, fast_page(s));
        cp_async_commit();
    }
    int next_page = kStages - 1 < n_st ? fast_page(kStages - 1) : kSlowPath;

    // Per-warp online-softmax state: lane (g, t) holds heads 2t, 2t+1's running max m_tr
    // (the same on the 8 lanes of a t), partial sums l_tr over its tokens, and O^T fragments
    // o[j][p] (rows = dims 32j + 4g + 2p (+1 for c2, c3), cols = heads 2t, 2t+1).
    float m_tr[2] = {-INFINITY, -INFINITY}, l_tr[2] = {0.0f, 0.0f};
    float o[NG][2][4];
#pragma unroll
    for (int j = 0; j < NG; ++j) {
#pragma unroll
        for (int p = 0; p < 2; ++p)
#pragma unroll
            for (int i = 0; i < 4; ++i) o[j][p][i] = 0.0f;
    }

    const int wt0 = warp * 16;  // this warp's first token in a stage
    // ldmatrix row address of this lane: matrix mi = lane / 8 -> token half th = mi & 1,
    // group 2c + mi / 2; row lane % 8.
    const int ld_row = (wt0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * C::kRow + 16 * (lane >> 4);

    for (int k = 0; k < n_st; ++k) {
        cp_async_wait<kStages - 2>();
        __syncthreads();
        if (k + kStages - 1 < n_st) issue_stage(k + kStages - 1, (k + kStages - 1) % kStages, next_page);
        cp_async_commit();
        if (k + kStages < n_st) next_page = fast_page(k + kStages);

        const int it = t_begin + 2 * k + (warp >> 1);
        if (it >= t_end) continue;  // warp-uniform; no barrier below
        const uint8_t* st = stage(k % kStages);
        const int pos_w = tile_of(it) * kTile + (warp & 1) * 16;

        // ---- scores S = q K^T on tensor cores: A = q (heads x 16 dims), B = K dequantized
        // to f16 in registers (16 dims x 8 tokens: word t of group j of token th*8 + g from
        // ldmatrix, code * scale + min in one HFMA2 per pair); two f32 chains per token half
        // (even / odd groups) for latency ----
        uint32_t kw[NG / 2][4];
#pragma unroll
        for (int c = 0; c < NG / 2; ++c) tritter::ldmatrix_x4(kw[c], st + C::kKc + ld_row + 32 * c);
        uint32_t kq[2][NG];  // (scale, min) of this lane's K tokens th*8 + g
#pragma unroll
        for (int th = 0; th < 2; ++th) load_params<NG>(st + C::kKp + (wt0 + th * 8 + g) * C::kPar, kq[th]);
        uint32_t b0, b1;  // P^T fragments (16 tokens x 8 heads, f16) for the O MMAs
        // ---- scores S^T = K q^T: A = K dequantized (16 tokens x 16 dims: rows g, g+8 are
        // tokens g, 8+g, the same ldmatrix words and dim permutation as below), B = q^T
        // (16 dims x 8 heads): 8 MMAs per 16 tokens instead of 16 (the heads fill 8
        // instead of 16 MMA rows). C: lane (g, t) holds tokens g, 8+g x heads 2t, 2t+1.
        float acc[2][4];
#pragma unroll
        for (int c = 0; c < 2; ++c)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[c][i] = 0.0f;
#pragma unroll
        for (int j = 0; j < NG; ++j) {
            uint32_t e[2][4];
#pragma unroll
            for (int th = 0; th < 2; ++th) {
                codes_to_half(kw[j / 2][th + 2 * (j & 1)], e[th]);
                dequant4(e[th], __byte_perm(kq[th][j], 0u, 0x1010), __byte_perm(kq[th][j], 0u, 0x3232));
            }
            mma_f16(acc[j & 1], e[0][0], e[1][0], e[0][1], e[1][1], qa[j][0][0], qa[j][0][1]);
            mma_f16(acc[j & 1], e[0][2], e[1][2], e[0][3], e[1][3], qa[j][1][0], qa[j][1][1]);
        }
        float sc[2][2];  // [token half][head 2t + e]
        const bool vis0 = token_visible(sv, pos_w + g), vis1 = token_visible(sv, pos_w + 8 + g);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            sc[0][e] = vis0 ? (acc[0][e] + acc[1][e]) * scale_log2 : -INFINITY;
            sc[1][e] = vis1 ? (acc[0][2 + e] + acc[1][2 + e]) * scale_log2 : -INFINITY;
        }
        float mx[2] = {fmaxf(sc[0][0], sc[1][0]), fmaxf(sc[0][1], sc[1][1])};
#pragma unroll
        for (int sh = 4; sh < 32; sh <<= 1)
#pragma unroll
            for (int e = 0; e < 2; ++e) mx[e] = fmaxf(mx[e], __shfl_xor_sync(kFull, mx[e], sh));
        float p[2][2], corr[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const float m_new = fmaxf(m_tr[e], mx[e]);
            corr[e] = m_new == -INFINITY ? 1.0f : exp2f(m_tr[e] - m_new);
            p[0][e] = m_new == -INFINITY ? 0.0f : exp2f(sc[0][e] - m_new);
            p[1][e] = m_new == -INFINITY ? 0.0f : exp2f(sc[1][e] - m_new);
            m_tr[e] = m_new;
            l_tr[e] = fmaf(l_tr[e], corr[e], p[0][e] + p[1][e]);
        }
        if (__any_sync(kFull, (corr[0] != 1.0f) | (corr[1] != 1.0f))) {
#pragma unroll
            for (int j = 0; j < NG; ++j)
#pragma unroll
                for (int pp = 0; pp < 2; ++pp) {
                    o[j][pp][0] *= corr[0];
                    o[j][pp][1] *= corr[1];
                    o[j][pp][2] *= corr[0];
                    o[j][pp][3] *= corr[1];
                }
        }
        // P^T: the 8x8 f16 matrices (tokens x heads) of each token half, transposed
        b0 = movmatrix_trans(tritter::pack2<__half>(p[0][0], p[0][1]));
        b1 = movmatrix_trans(tritter::pack2<__half>(p[1][0], p[1][1]));

        // ---- O^T += V^T (dims x tokens: ldmatrix.trans codes, dequantized to f16 with the
        // (scale, min) of the two tokens of each register pair) * P^T (p in f16, as
        // FlashAttention rounds P) ----
        uint32_t vw[NG / 2][4];
#pragma unroll
        for (int c = 0; c < NG / 2; ++c) tritter::ldmatrix_x4_trans(vw[c], st + C::kVc + ld_row + 32 * c);
        uint32_t vp[4][NG];  // V (scale, min) of tokens (i >> 1) * 8 + 2t + (i & 1)
#pragma unroll
        for (int i = 0; i < 4; ++i) load_params<NG>(st + C::kVp + (wt0 + (i >> 1) * 8 + 2 * t + (i & 1)) * C::kPar, vp[i]);
#pragma unroll
        for (int j = 0; j < NG; ++j) {
            uint32_t f0[4], f1[4];  // tokens (2t, 2t+1) and (8+2t, 9+2t), dims 32j + 4g + i
            codes_to_half(vw[j / 2][2 * (j & 1)], f0);
            codes_to_half(vw[j / 2][2 * (j & 1) + 1], f1);
            dequant4(f0, __byte_perm(vp[0][j], vp[1][j], 0x5410), __byte_perm(vp[0][j], vp[1][j], 0x7632));
            dequant4(f1, __byte_perm(vp[2][j], vp[3][j], 0x5410), __byte_perm(vp[2][j], vp[3][j], 0x7632));
#pragma unroll
            for (int pp = 0; pp < 2; ++pp) mma_f16(o[j][pp], f0[2 * pp], f0[2 * pp + 1], f1[2 * pp], f1[2 * pp + 1], b0, b1);
        }
    }
    cp_async_wait<0>();

    // ---- merge the 4 warps (flash-decoding inside the CTA), write (o, m, l) ----
#pragma unroll
    for (int sh = 4; sh < 32; sh <<= 1)
#pragma unroll
        for (int e = 0; e < 2; ++e) l_tr[e] += __shfl_xor_sync(kFull, l_tr[e], sh);
    // Each warp writes its rescaled partials to a slot of its own and the slots are summed
    // in warp order (no atomics), so a decode step is bit-reproducible: a CUDA graph replay
    // equals the eager launch.
    __syncthreads();  // every warp is done with the stages
    float* s_w = reinterpret_cast<float*>(smem);  // [kWarps][G][D]
    if (g == 0) {
        s_wm[warp][2 * t] = m_tr[0];
        s_wm[warp][2 * t + 1] = m_tr[1];
    }
    __syncthreads();
    auto cta_max = [&](int h) {
        float mm = s_wm[0][h];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) mm = fmaxf(mm, s_wm[w][h]);
        return mm;
    };
    auto factor = [&](int h) {
        const float mw = s_wm[warp][h];
        return mw == -INFINITY ? 0.0f : exp2f(mw - cta_max(h));
    };
#pragma unroll
    for (int e = 0; e < 2; ++e)
        if (g == 0 && 2 * t + e < G) s_wl[warp][2 * t + e] = factor(2 * t + e) * l_tr[e];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int h = 2 * t + hh;
        if (h < G) {
            const float f = factor(h);
#pragma unroll
            for (int j = 0; j < NG; ++j)
#pragma unroll
                for (int pp = 0; pp < 2; ++pp) {
                    const int d = 32 * j + 4 * g + 2 * pp;
                    s_w[(warp * G + h) * D + d] = f * o[j][pp][hh];
                    s_w[(warp * G + h) * D + d + 1] = f * o[j][pp][2 + hh];
                }
        }
    }
    __syncthreads();
    for (int i = tid; i < G * D; i += kThreads) {
        const int h = i / D, d = i % D;
        const long long row = ((long long)b * heads_q + hkv * G + h) * num_splits + split;
        o_part[row * D + d] = sum_warp_slots(s_w, G * D, i);
        if (d == 0) ml_part[row] = make_float2(cta_max(h), sum_warp_slots(&s_wl[0][0], 8, h));
    }
    const long long head0 = (long long)b * heads_q + hkv * G;
    __syncthreads();  // s_w is read above; the merge reuses the stage memory
    merge_last_split<D, G, kStages * C::kStageBytes / 4>(o_part, ml_part, out, tickets + (long long)b * heads_kv + hkv,
                                                         reinterpret_cast<float*>(smem), head0 * num_splits, head0 * D,
                                                         num_splits);
}

}  // namespace tc

}  // namespace

extern "C" __global__ void __launch_bounds__(256) kv_count_nonfinite_f16(const __half* __restrict__ x, long long n,
                                                                          unsigned* __restrict__ count) {
    count_nonfinite(x, n, count);
}

#define KV_WRITE(NAME, INT4)                                                                                       \
    extern "C" __global__ void __launch_bounds__(kWriteThreads)                                                    \
        NAME(const __half* __restrict__ k, const __half* __restrict__ v, uint8_t* __restrict__ pool,               \
             const int* __restrict__ pages, int first_page, int start, int n, int heads_kv, int head_dim,          \
             int page_size, int num_pages, long long page_bytes, int layer0) {                                     \
        write_groups<INT4>(k, v, pool, pages, first_page, start, n, heads_kv, head_dim, page_size, num_pages,     \
                           page_bytes, layer0);                                                                     \
    }
KV_WRITE(kv_write_int4, true)
KV_WRITE(kv_write_f16, false)

#define KV_WRITE_SLOTS(NAME, INT4)                                                                                 \
    extern "C" __global__ void __launch_bounds__(kWriteThreads)                                                    \
        NAME(const __half* __restrict__ k, const __half* __restrict__ v, uint8_t* __restrict__ pool,               \
             const int* __restrict__ slots, int n, int heads_kv, int head_dim, int page_shift, int num_pages,      \
             long long page_bytes, int layer, unsigned* __restrict__ nonfinite) {                                  \
        write_slot_groups<INT4>(k, v, pool, slots, n, heads_kv, head_dim, page_shift, num_pages, page_bytes,       \
                                layer, nonfinite);                                                                  \
    }
KV_WRITE_SLOTS(kv_write_slots_int4, true)
KV_WRITE_SLOTS(kv_write_slots_f16, false)

// The slot writer for decode-size batches: one warp per (token, KV head, K or V), a lane per
// value, the head's groups in turn (kv_int4_store.cuh's store_group_warp: the same bytes).
// With one token per sequence the thread-per-group kernel has n * Hkv * D / 32 threads, each
// quantizing 64 values in a serial chain; here 32 times as many threads share the work.
#define KV_WRITE_SLOTS_WARP(NAME, INT4)                                                                             \
    extern "C" __global__ void __launch_bounds__(kWriteThreads) NAME(                                               \
        const __half* __restrict__ k, const __half* __restrict__ v, uint8_t* __restrict__ pool,                     \
        const int* __restrict__ slots, int n, int heads_kv, int head_dim, int page_shift, int num_pages,            \
        long long page_bytes, int layer, unsigned* __restrict__ nonfinite) {                                        \
        const int w = (int)((blockIdx.x * blockDim.x + threadIdx.x) / 32);                                          \
        if (w >= 2 * n * heads_kv) return;                                                                           \
        const int kv = w % 2, t = w / 2 / heads_kv, h = w / 2 % heads_kv;                                           \
        const __half* src = (kv ? v : k) + ((long long)t * heads_kv + h) * head_dim;                                \
        tritter::kv::store_head_warp<INT4>(src, pool, slots[t], layer, kv, h, heads_kv, head_dim, page_shift,        \
                                           num_pages, page_bytes, nonfinite);                                       \
    }
KV_WRITE_SLOTS_WARP(kv_write_slots_warp_int4, true)
KV_WRITE_SLOTS_WARP(kv_write_slots_warp_f16, false)

// x (groups of 32 f16 values) replaced by its INT4 round trip, dequantized as the CPU does
// (code * scale + min in one fused multiply-add, then f16): what a prompt's attention reads
// when its keys and values are to be seen as the INT4 cache stores them. One thread per group.
extern "C" __global__ void __launch_bounds__(kWriteThreads) kv_round_trip_int4(__half* __restrict__ x, int groups) {
    const int gid = blockIdx.x * blockDim.x + threadIdx.x;
    if (gid >= groups) return;
    __half* p = x + (long long)gid * 32;
    float v[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) v[i] = __half2float(p[i]);
    uint32_t words[4];
    __half scale_h, min_h;
    quantize_group32(v, words, scale_h, min_h);
    const float s = __half2float(scale_h), m = __half2float(min_h);
#pragma unroll
    for (int i = 0; i < 32; ++i) {
        const float code = (float)((words[i / 8] >> (4 * (i % 8))) & 15u);
        p[i] = __float2half_rn(__fmaf_rn(code, s, m));
    }
}

#define KV_DECODE(FMT, INT4, D, G)                                                                                   \
    extern "C" __global__ void __launch_bounds__(kThreads, 1) kv_decode_##FMT##_d##D##_g##G(                          \
        const __half* __restrict__ q, const uint8_t* __restrict__ pool, const int* __restrict__ block_tables,       \
        const int* __restrict__ seq_lens, int bt_stride, int heads_kv, int page_shift, int num_pages,               \
        long long page_bytes, int sinks, int window, int tiles_per_split, int num_splits, float scale_log2,         \
        float* __restrict__ o_part, float2* __restrict__ ml_part) {                                                 \
        tritter::pdl_wait(); /* q and the new token's K/V come from the previous kernel (PDL) */                   \
        tritter::pdl_launch_dependents();                                                                           \
        decode_split<D, G, INT4>(q, pool, block_tables, seq_lens, bt_stride, heads_kv, page_shift, num_pages,       \
                                 page_bytes, sinks, window, tiles_per_split, num_splits, scale_log2, o_part,        \
                                 ml_part);                                                                           \
    }
#define KV_DECODE_G(FMT, INT4, D) \
    KV_DECODE(FMT, INT4, D, 1)    \
    KV_DECODE(FMT, INT4, D, 2)    \
    KV_DECODE(FMT, INT4, D, 4)    \
    KV_DECODE(FMT, INT4, D, 8)
KV_DECODE_G(int4, true, 64)
KV_DECODE_G(int4, true, 128)
KV_DECODE_G(f16, false, 64)
KV_DECODE_G(f16, false, 128)

// The tensor-core kernels merge their splits themselves (merge_last_split): two more
// arguments, the f16 output and one ticket counter per (sequence, KV head).
#define KV_DECODE_TC_NAMED(NAME, S, M, D, G)                                                                        \
    extern "C" __global__ void __launch_bounds__(kThreads, M) NAME(                                                 \
        const __half* __restrict__ q, const uint8_t* __restrict__ pool, const int* __restrict__ block_tables,       \
        const int* __restrict__ seq_lens, int bt_stride, int heads_kv, int page_shift, int num_pages,               \
        long long page_bytes, int sinks, int window, int tiles_per_split, int num_splits, float scale_log2,         \
        float* __restrict__ o_part, float2* __restrict__ ml_part, __half* __restrict__ out,                         \
        unsigned* __restrict__ tickets) {                                                                           \
        tritter::pdl_wait(); /* q and the new token's K/V come from the previous kernel (PDL) */                   \
        tritter::pdl_launch_dependents();                                                                           \
        tc::decode_split_tc<D, G, S>(q, pool, block_tables, seq_lens, bt_stride, heads_kv, page_shift,        \
                                           num_pages, page_bytes, sinks, window, tiles_per_split, num_splits,       \
                                           scale_log2, o_part, ml_part, out, tickets);                               \
    }
// The default variant (what split_plan and the launch use unless tuned).
#define KV_DECODE_TC(D, G) \
    KV_DECODE_TC_NAMED(kv_decode_int4tc_d##D##_g##G, tc::kDefStages, tc::kDefMinBlocks, D, G)
// Tuning variants (TRITTER_KV_TC_VARIANT=s{S}m{M}, see the crate README): pipeline depth S,
// launch bounds of M CTAs per SM.
#define KV_DECODE_TC_V(S, M, D, G) KV_DECODE_TC_NAMED(kv_decode_int4tc_s##S##_m##M##_d##D##_g##G, S, M, D, G)
// The default is s3m4 (<= 128 registers, no spills); the m3 variants give deeper pipelines more
// registers; s8m2 trades occupancy for 7 stages (70 KB) in flight per CTA.
// Mirrored by TC_VARIANTS in crates/kv-int4/src/cuda.
#define KV_DECODE_TC_ALL(D, G)   \
    KV_DECODE_TC(D, G)           \
    KV_DECODE_TC_V(4, 3, D, G)   \
    KV_DECODE_TC_V(5, 3, D, G)   \
    KV_DECODE_TC_V(6, 3, D, G)   \
    KV_DECODE_TC_V(8, 2, D, G)
KV_DECODE_TC_ALL(64, 1)
KV_DECODE_TC_ALL(64, 2)
KV_DECODE_TC_ALL(64, 4)
KV_DECODE_TC_ALL(64, 8)
KV_DECODE_TC_ALL(128, 1)
KV_DECODE_TC_ALL(128, 2)
KV_DECODE_TC_ALL(128, 4)
KV_DECODE_TC_ALL(128, 8)

// Merges the splits of one (sequence, query head): o = sum_s o_s 2^(m_s - M) / sum_s l_s
// 2^(m_s - M) over the splits with l_s > 0. Grid B * Hq, kReduceThreads threads: the split
// weights are computed once into shared memory (kReduceChunk at a time), then
// kReduceThreads / head_dim thread groups each sum every groups-th split for all dims
// (coalesced rows of o_part, independent loads), and the groups are added at the end. One
// thread per dim walking all splits was a serial chain of ~num_splits dependent L2 round
// trips (tens of us at B = 1, 98 splits). Empty splits wrote o = 0, m = -inf, l = 0.
constexpr int kReduceThreads = 256;  // mirrored by REDUCE_THREADS in crates/kv-int4/src/cuda
constexpr int kReduceChunk = 1024;

__device__ __forceinline__ float block_reduce(float v, bool is_max, float* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float x = __shfl_xor_sync(kFull, v, o);
        v = is_max ? fmaxf(v, x) : v + x;
    }
    __syncthreads();  // scratch may still be read by a previous reduction
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < kReduceThreads / 32; ++w) v = is_max ? fmaxf(v, scratch[w]) : v + scratch[w];
    return v;
}

extern "C" __global__ void __launch_bounds__(kReduceThreads) kv_decode_reduce(const float* __restrict__ o_part,
                                                                              const float2* __restrict__ ml_part,
                                                                              __half* __restrict__ out, int num_splits,
                                                                              int head_dim) {
    __shared__ float w_s[kReduceChunk];
    __shared__ float acc_s[kReduceThreads];
    __shared__ float scratch[kReduceThreads / 32];
    tritter::pdl_wait();  // the partials come from the split kernel (PDL launch)
    tritter::pdl_launch_dependents();
    const int tid = threadIdx.x;
    const long long bh = blockIdx.x;
    const float2* ml = ml_part + bh * num_splits;
    const float* op = o_part + bh * num_splits * head_dim;
    float m = -INFINITY;
    for (int s = tid; s < num_splits; s += kReduceThreads) {
        const float2 x = ml[s];
        if (x.y > 0.0f) m = fmaxf(m, x.x);
    }
    m = block_reduce(m, true, scratch);
    const int groups = kReduceThreads / head_dim, grp = tid / head_dim, d = tid % head_dim;
    float acc = 0.0f, l = 0.0f;
    for (int c0 = 0; c0 < num_splits; c0 += kReduceChunk) {
        const int n = min(kReduceChunk, num_splits - c0);
        __syncthreads();  // the previous chunk's weights are consumed
        for (int s = tid; s < n; s += kReduceThreads) {
            const float2 x = ml[c0 + s];
            const float wt = x.y > 0.0f ? exp2f(x.x - m) : 0.0f;
            w_s[s] = wt;
            l = fmaf(x.y, wt, l);
        }
        __syncthreads();
        if (grp < groups) {
#pragma unroll 8
            for (int s = grp; s < n; s += groups) acc = fmaf(op[(long long)(c0 + s) * head_dim + d], w_s[s], acc);
        }
    }
    l = block_reduce(l, false, scratch);
    acc_s[tid] = acc;
    __syncthreads();
    if (tid < head_dim) {
        float sum = 0.0f;
        for (int g = 0; g < groups; ++g) sum += acc_s[g * head_dim + tid];
        out[bh * head_dim + tid] = __float2half_rn(l > 0.0f ? sum / l : 0.0f);
    }
}
