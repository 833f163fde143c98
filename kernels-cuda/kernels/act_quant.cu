// Per-token absmax int8 activation quantization (BitNet b1.58 "A8"), DESIGN.md section 4.
//
//   x      [M, K]  f32 | bf16 | f16, row-major, row stride K
//   codes  [M, K]  int8    q = clamp(round(x * s), -128, 127)   (round half away from zero)
//   scales [M]     f32     s = 127 / max(max_k |x[m, k]|, 1e-5)
//   nonfinite_rows [1] u32 incremented once per row holding NaN or +-Inf; that row's scale is
//                          written as NaN so it can never be used silently.
//
// Algorithm: one CTA of 256 threads per row (token). The row is read with 16-byte vector
// loads; rows of up to 256 x 4 vectors (K <= 8192 for bf16/f16, 4096 for f32) stay in
// registers, all four loads of a thread in flight before the first use, so each element is
// read from HBM once. max|x| is reduced with warp shuffles, then across the 8 warps through
// shared memory. Codes are x * s rounded with roundf (identical to Rust's f32::round, so
// the CPU reference is bit-exact), VEC int8 codes stored per thread at once. Longer rows
// re-read the row for the second pass (L1/L2 resident); the scalar path handles K not a
// multiple of the vector width and unaligned pointers.
// Division and multiply are IEEE (no --use_fast_math), so codes and scales match the CPU
// reference exactly.
//
// act_quant_mma_* (below) write the same codes in the ternary GEMV's operand order.
//
// Bound: memory. Traffic = M*K*(sizeof(T) + 1) + 4*M bytes from/to HBM; the second read
// hits cache. Grid = M CTAs, so decode-size M (1..8) is latency bound (a few microseconds
// per launch: the "incl. A8 quant" figures of the GEMV bench); fusing it into the previous
// kernel's epilogue is left to the engine.

#include "a8_mma.cuh"
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kRegVecs = 4;  // 16-byte vectors per thread kept in registers

template <typename T> struct Vec16;
template <> struct Vec16<float> { static constexpr int N = 4; };
template <> struct Vec16<__nv_bfloat16> { static constexpr int N = 8; };
template <> struct Vec16<__half> { static constexpr int N = 8; };

// Folds |v| into the running row maximum; `bad` is set for NaN or +-Inf, since
// !(a <= FLT_MAX) catches both (fmaxf alone would silently drop a NaN).
__device__ __forceinline__ void absorb_absmax(float v, float& amax, unsigned& bad) {
    const float a = fabsf(v);
    amax = fmaxf(amax, a);
    bad |= !(a <= 3.402823466e38f);
}

template <typename T>
__device__ __forceinline__ void row_absmax(const T* __restrict__ xr, int cols, bool vec_ok, float& amax, unsigned& bad) {
    constexpr int VEC = Vec16<T>::N;
    if (vec_ok) {
        const uint4* xv = reinterpret_cast<const uint4*>(xr);
        for (int i = threadIdx.x; i < cols / VEC; i += kThreads) {
            uint4 raw = xv[i];
            const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                absorb_absmax(tritter::to_float(e[j]), amax, bad);
            }
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += kThreads) {
            absorb_absmax(tritter::to_float(xr[i]), amax, bad);
        }
    }
}

// A row holding NaN/Inf: its scale becomes NaN (never usable silently) and the counter the
// host checks is incremented.
__device__ __forceinline__ void flag_nonfinite_row(float* __restrict__ scales, unsigned* __restrict__ nonfinite_rows,
                                                   int row) {
    if (threadIdx.x == 0) {
        scales[row] = __int_as_float(0x7fc00000);
        atomicAdd(nonfinite_rows, 1u);
    }
}

// Loads the row's nvec <= kThreads * kRegVecs 16-byte vectors (thread i: vectors i, i +
// kThreads, ...; all loads in flight at once) and folds their absmax / non-finite flag.
template <typename T>
__device__ __forceinline__ void load_row_regs(const uint4* __restrict__ xv, int nvec, uint4 (&held)[kRegVecs],
                                              float& amax, unsigned& bad) {
    constexpr int VEC = Vec16<T>::N;
#pragma unroll
    for (int it = 0; it < kRegVecs; ++it) {
        const int i = threadIdx.x + it * kThreads;
        if (i < nvec) held[it] = xv[i];
    }
#pragma unroll
    for (int it = 0; it < kRegVecs; ++it) {
        if (threadIdx.x + it * kThreads < nvec) {
            const T* e = reinterpret_cast<const T*>(&held[it]);
#pragma unroll
            for (int j = 0; j < VEC; ++j) absorb_absmax(tritter::to_float(e[j]), amax, bad);
        }
    }
}

template <typename T>
__device__ __forceinline__ void act_quant_row(const T* __restrict__ x, int8_t* __restrict__ codes,
                                              float* __restrict__ scales,
                                              unsigned* __restrict__ nonfinite_rows, int rows,
                                              int cols) {
    __shared__ float scratch_f[32];
    __shared__ unsigned scratch_u[32];
    constexpr int VEC = Vec16<T>::N;
    tritter::pdl_wait();  // x is the previous kernel's output
    tritter::pdl_launch_dependents();
    const int row = blockIdx.x;
    if (row >= rows) return;
    const T* xr = x + static_cast<size_t>(row) * cols;
    int8_t* qr = codes + static_cast<size_t>(row) * cols;

    // Vector path needs 16-byte aligned input rows and VEC-byte aligned output rows.
    const bool vec_ok = (cols % VEC == 0) && ((reinterpret_cast<uintptr_t>(x) & 15) == 0) &&
                        ((reinterpret_cast<uintptr_t>(codes) & (VEC - 1)) == 0);

    float amax = 0.0f;
    unsigned bad = 0;  // set when any |x| is NaN or Inf: !(a <= FLT_MAX) catches both
    const int nvec = cols / VEC;
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    // Rows up to kThreads * kRegVecs vectors (8192 bf16/f16, 4096 f32) are held in registers:
    // one HBM read per element, all loads of a thread in flight at once.
    const bool in_regs = vec_ok && nvec <= kThreads * kRegVecs;
    uint4 held[kRegVecs];

    if (in_regs) {
        load_row_regs<T>(xv, nvec, held, amax, bad);
    } else {
        row_absmax(xr, cols, vec_ok, amax, bad);
    }
    amax = tritter::block_max(amax, scratch_f);
    bad = tritter::block_or(bad, scratch_u);

    if (bad) {
        flag_nonfinite_row(scales, nonfinite_rows, row);
        for (int i = threadIdx.x; i < cols; i += kThreads) qr[i] = 0;
        return;
    }
    const float s = tritter::a8_scale(amax);
    if (threadIdx.x == 0) scales[row] = s;

    // Quantizes one 16-byte vector of inputs and stores its VEC codes with one store.
    auto store_vec = [&](const uint4& raw, int i) {
        const T* e = reinterpret_cast<const T*>(&raw);
        union {
            int8_t q[VEC];
            uint32_t w[VEC / 4];
        } out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.q[j] = tritter::a8_code(tritter::to_float(e[j]), s);
        if constexpr (VEC == 8) {
            reinterpret_cast<uint2*>(qr)[i] = make_uint2(out.w[0], out.w[1]);
        } else {
            reinterpret_cast<uint32_t*>(qr)[i] = out.w[0];
        }
    };
    if (in_regs) {
#pragma unroll
        for (int it = 0; it < kRegVecs; ++it) {
            const int i = threadIdx.x + it * kThreads;
            if (i < nvec) store_vec(held[it], i);
        }
    } else if (vec_ok) {
        // Second read of the row: L1/L2 resident right after pass 1.
        for (int i = threadIdx.x; i < nvec; i += kThreads) store_vec(xv[i], i);
    } else {
        for (int i = threadIdx.x; i < cols; i += kThreads) qr[i] = tritter::a8_code(tritter::to_float(xr[i]), s);
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// GEMV-ready variant: the same codes and scales, written in the ternary GEMV's MMA k order,
// plus the row sums the GEMV subtracts (dot(w, x) = dot(w + 1, x) - sum(x)).
//
//   codes_mma [M, Kp] int8, Kp = ceil(K / 128) * 128, zero padded; within each 128-code
//             block, word (j, t) (byte offset 32 j + 4 t, j < 4, t < 8) holds the codes of
//             k = 16 t + 4 e + j for e = 0..3 (see ternary_gemv.cu)
//   sums      [M] int32, sum of the row's codes
//   nonfinite_flags [M] u32: 1 where the row held NaN/Inf (its scale is then NaN and its
//             codes zero), else 0; written every fill, so never reset
//
// Rows of up to kThreads * kRegVecs 16-byte vectors (8192 bf16/f16, 4096 f32; aligned) are
// read once into registers, quantized from there into shared memory in natural k order and
// written as permuted words from shared memory: one global round trip per row (decode
// sizes are latency bound). Longer rows: pass 1 is the absmax reduction above (16-byte loads
// when aligned); pass 2 writes one permuted 32-bit word per thread and step (coalesced),
// gathering its 4 inputs from the L1-resident row.
template <typename T>
__device__ __forceinline__ void act_quant_mma_row_regs(const uint4* __restrict__ xv, int8_t* __restrict__ codes_mma,
                                                       int* __restrict__ sums, float* __restrict__ scales,
                                                       unsigned* __restrict__ nonfinite_flags, int row, int cols,
                                                       int cols_pad) {
    constexpr int VEC = Vec16<T>::N;
    __shared__ float scratch_f[32];
    __shared__ uint32_t q_nat[kThreads * kRegVecs * 2];  // codes in natural k order (<= 8192)
    const int nvec = cols / VEC;
    uint4 held[kRegVecs];
    float amax = 0.0f;
    unsigned bad = 0;
    load_row_regs<T>(xv, nvec, held, amax, bad);
    amax = tritter::block_max(amax, scratch_f);
    bad = __syncthreads_or(bad);
    const float s = tritter::a8_scale(amax);
    if (threadIdx.x == 0) {
        nonfinite_flags[row] = bad ? 1u : 0u;
        scales[row] = bad ? __int_as_float(0x7fc00000) : s;
    }
    // Vector slot i holds codes VEC * i .. + VEC - 1; slots past the row (the padding up to
    // cols_pad <= kThreads * kRegVecs * VEC) and every code of a non-finite row are zero.
#pragma unroll
    for (int it = 0; it < kRegVecs; ++it) {
        const int i = threadIdx.x + it * kThreads;
        union {
            int8_t q[VEC];
            uint32_t w[VEC / 4];
        } out;
        const T* e = reinterpret_cast<const T*>(&held[it]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.q[j] = (i < nvec && !bad) ? tritter::a8_code(tritter::to_float(e[j]), s) : 0;
#pragma unroll
        for (int w = 0; w < VEC / 4; ++w) q_nat[(VEC / 4) * i + w] = out.w[w];
    }
    __syncthreads();
    const int8_t* qb = reinterpret_cast<const int8_t*>(q_nat);
    tritter::store_mma_row<kThreads>(codes_mma, sums, row, cols, cols_pad, [&](int k) { return static_cast<int>(qb[k]); });
}

// `Src` is an activation type (quantize) or int8 codes (permute only).
template <typename T>
__device__ __forceinline__ void act_quant_mma_row(const T* __restrict__ x, int8_t* __restrict__ codes_mma,
                                                  int* __restrict__ sums, float* __restrict__ scales,
                                                  unsigned* __restrict__ nonfinite_flags, int rows, int cols,
                                                  int cols_pad) {
    __shared__ float scratch_f[32];
    __shared__ unsigned scratch_u[32];
    constexpr int VEC = Vec16<T>::N;
    tritter::pdl_wait();  // x is the previous kernel's output
    tritter::pdl_launch_dependents();
    const int row = blockIdx.x;
    if (row >= rows) return;
    const T* xr = x + static_cast<size_t>(row) * cols;
    const bool vec_ok = (cols % VEC == 0) && ((reinterpret_cast<uintptr_t>(x) & 15) == 0);
    const int nvec = cols / VEC;
    if (vec_ok && nvec <= kThreads * kRegVecs) {
        act_quant_mma_row_regs<T>(reinterpret_cast<const uint4*>(xr), codes_mma, sums, scales, nonfinite_flags,
                                  row, cols, cols_pad);
        return;
    }
    float amax = 0.0f;
    unsigned bad = 0;
    row_absmax(xr, cols, vec_ok, amax, bad);
    amax = tritter::block_max(amax, scratch_f);
    bad = tritter::block_or(bad, scratch_u);
    // Per-row flag (written for every row, so no reset is needed between fills).
    if (threadIdx.x == 0) nonfinite_flags[row] = bad ? 1u : 0u;
    if (bad) {
        if (threadIdx.x == 0) scales[row] = __int_as_float(0x7fc00000);
        tritter::store_mma_row<kThreads>(codes_mma, sums, row, cols, cols_pad, [](int) { return 0; });
        return;
    }
    const float s = tritter::a8_scale(amax);
    if (threadIdx.x == 0) scales[row] = s;
    tritter::store_mma_row<kThreads>(codes_mma, sums, row, cols, cols_pad,
                  [&](int k) { return static_cast<int>(tritter::a8_code(tritter::to_float(xr[k]), s)); });
}

#define ACT_QUANT_ENTRY(NAME, T)                                                              \
    extern "C" __global__ void __launch_bounds__(kThreads)                                    \
        NAME(const T* __restrict__ x, int8_t* __restrict__ codes, float* __restrict__ scales, \
             unsigned* __restrict__ nonfinite_rows, int rows, int cols) {                     \
        act_quant_row<T>(x, codes, scales, nonfinite_rows, rows, cols);                       \
    }

ACT_QUANT_ENTRY(act_quant_f32, float)
ACT_QUANT_ENTRY(act_quant_bf16, __nv_bfloat16)
ACT_QUANT_ENTRY(act_quant_f16, __half)

#define ACT_QUANT_MMA_ENTRY(NAME, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(kThreads)                                            \
        NAME(const T* __restrict__ x, int8_t* __restrict__ codes_mma, int* __restrict__ sums,         \
             float* __restrict__ scales, unsigned* __restrict__ nonfinite_flags, int rows, int cols,  \
             int cols_pad) {                                                                          \
        act_quant_mma_row<T>(x, codes_mma, sums, scales, nonfinite_flags, rows, cols, cols_pad);      \
    }

ACT_QUANT_MMA_ENTRY(act_quant_mma_f32, float)
ACT_QUANT_MMA_ENTRY(act_quant_mma_bf16, __nv_bfloat16)
ACT_QUANT_MMA_ENTRY(act_quant_mma_f16, __half)

// Already-quantized int8 codes [M, K] -> codes_mma [M, Kp] + sums [M] (permutation only);
// clears the rows' non-finite flags.
extern "C" __global__ void __launch_bounds__(kThreads)
    a8_to_mma(const int8_t* __restrict__ codes, int8_t* __restrict__ codes_mma, int* __restrict__ sums,
              unsigned* __restrict__ nonfinite_flags, int rows, int cols, int cols_pad) {
    tritter::pdl_wait();
    tritter::pdl_launch_dependents();
    const int row = blockIdx.x;
    if (row >= rows) return;
    if (threadIdx.x == 0) nonfinite_flags[row] = 0u;  // int8 codes are finite by construction
    const int8_t* cr = codes + static_cast<size_t>(row) * cols;
    tritter::store_mma_row<kThreads>(codes_mma, sums, row, cols, cols_pad, [&](int k) { return static_cast<int>(cr[k]); });
}

// ---------------------------------------------------------------------------------------
// GEMV-ready quantization of f32 rows whose absmax is already known: the fused MLP's hidden
// vector h, whose gate/up GEMV epilogue folds max|h| of each row into amax_bits (f32 bits;
// non-negative floats order like their bit patterns, so atomicMax on the bits is a float
// max). With the reduction done, a row no longer needs one CTA: blockIdx.x covers 256
// output words (1024 codes) of row blockIdx.y, so decode-size M still fills the GPU.
//
//   x [M, K] f32, amax_bits [M] u32, codes_mma [M, Kp] (as act_quant_mma_*),
//   sums [M] int32 (zeroed before the launch; CTAs add their part), scales [M] f32,
//   arrivals [1] u32 (zero between calls): the last CTA zeroes amax_bits and arrivals
//
// Same scale and rounding as act_quant_row (bit-exact with the CPU reference). A row whose
// max is NaN/Inf gets zero codes, a NaN scale and nonfinite_flags[row] = 1 (else 0).
extern "C" __global__ void __launch_bounds__(kThreads)
    act_quant_mma_absmax_f32(const float* __restrict__ x, unsigned* __restrict__ amax_bits,
                             int8_t* __restrict__ codes_mma, int* __restrict__ sums, float* __restrict__ scales,
                             unsigned* __restrict__ nonfinite_flags, unsigned* __restrict__ arrivals, int rows,
                             int cols, int cols_pad) {
    __shared__ int scratch_sum[kThreads / 32];
    tritter::pdl_wait();  // h, amax_bits and the zeroed sums come from the gate/up pass
    tritter::pdl_launch_dependents();
    const int row = blockIdx.y;  // the grid has exactly `rows` rows of CTAs
    const float amax = __uint_as_float(amax_bits[row]);
    const bool bad = !(amax <= 3.402823466e38f);
    const float s = tritter::a8_scale(amax);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        nonfinite_flags[row] = bad ? 1u : 0u;
        scales[row] = bad ? __int_as_float(0x7fc00000) : s;
    }
    const float* xr = x + static_cast<size_t>(row) * cols;
    const int wd = blockIdx.x * kThreads + threadIdx.x;
    int local = 0;
    if (wd < cols_pad / 4) {
        const int blk = wd >> 5, j = (wd >> 3) & 3, t = wd & 7;
        const int kb = 128 * blk + 16 * t + j;
        unsigned word = 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int k = kb + 4 * e;
            const int q = (k < cols && !bad) ? static_cast<int>(tritter::a8_code(xr[k], s)) : 0;
            word |= (static_cast<unsigned>(q) & 0xffu) << (8 * e);
        }
        local = __dp4a(static_cast<int>(word), 0x01010101, 0);
        reinterpret_cast<unsigned*>(codes_mma + static_cast<size_t>(row) * cols_pad)[wd] = word;
    }
    local = __reduce_add_sync(0xffffffffu, local);
    if ((threadIdx.x & 31) == 0) scratch_sum[threadIdx.x >> 5] = local;
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
#pragma unroll
        for (int w = 0; w < kThreads / 32; ++w) total += scratch_sum[w];
        atomicAdd(&sums[row], total);
        // The last CTA to finish (every CTA has read its row's max by now) resets the maxima
        // and the counter for the next call, so no memset sits between the MLP's kernels.
        __threadfence();
        const unsigned ctas = gridDim.x * gridDim.y;
        if (atomicAdd(arrivals, 1u) == ctas - 1) {
            for (int r = 0; r < rows; ++r) amax_bits[r] = 0u;
            *arrivals = 0u;
        }
    }
}
