//! # kv-int4
//!
//! An INT4 KV cache for long-context decoding: per token and head, groups of 32 along D,
//! asymmetric 4-bit codes with an f16 scale and f16 minimum per group (0.625 bytes per
//! value), paged so many sequences share one pool, with a sliding window that keeps S sink
//! tokens, and a split-KV decode attention kernel that reads INT4 directly.
//!
//! Status: the crate is part of the workspace build and CI; the cache and kernels arrive
//! with the kv-int4 issue. Nothing is exported yet, so nothing can be called by mistake.
