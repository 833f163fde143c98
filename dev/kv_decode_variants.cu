// Experimental variants of the INT4 tensor-core decode kernel, timed by dev/kv_profile.py
// (`python3 dev/kv_profile.py kvd.cubin kvx_m3`), same signature as kv_decode_int4tc_*.
//   kvx_m3: the default kernel with launch bounds of 3 CTAs per SM (the default is 4).
#include "kv_int4.cu"

#define KVX(NAME, M, D, G)                                                                                        \
    extern "C" __global__ void __launch_bounds__(kThreads, M) NAME##_d##D##_g##G(                                 \
        const __half* __restrict__ q, const uint8_t* __restrict__ pool, const int* __restrict__ block_tables,       \
        const int* __restrict__ seq_lens, int bt_stride, int heads_kv, int page_shift, int num_pages,               \
        long long page_bytes, int sinks, int window, int tiles_per_split, int num_splits, float scale_log2,         \
        float* __restrict__ o_part, float2* __restrict__ ml_part, __half* __restrict__ out,                         \
        unsigned* __restrict__ tickets) {                                                                           \
        tc::decode_split_tc<D, G, tc::kDefStages>(q, pool, block_tables, seq_lens, bt_stride, heads_kv,             \
                                                  page_shift, num_pages, page_bytes, sinks, window,                 \
                                                  tiles_per_split, num_splits, scale_log2, o_part, ml_part, out,    \
                                                  tickets);                                                         \
    }
KVX(kvx_m3, 3, 128, 4)
