//! # kv-int4
//!
//! An INT4 KV cache for long-context decoding (DESIGN.md section 4):
//!
//! * format ([`quant`]): per token and KV head, groups of 32 along the head dim, asymmetric
//!   4-bit codes with an f16 scale and f16 minimum per group (0.625 bytes per value), codes
//!   computed with the f16-rounded parameters so that
//!   `|x - x_hat| <= scale_h / 2 + |min - min_h| + 2^-20 (1 + max|x|)` holds
//!   ([`group_error_bound`]);
//! * a paged cache ([`PagedKvCache`], [`BlockManager`]): one pool of pages shared by many
//!   sequences, per-sequence block tables, a sliding window that returns pages to the pool
//!   and keeps S sink tokens, fork (shared full pages, copied tail page) and free; every
//!   error leaves the cache exactly as it was;
//! * decode attention: the CPU reference [`decode_attention_ref`] and (feature `cuda`) a
//!   split-KV flash-decoding kernel that reads the INT4 pages directly, with the same kernel
//!   over an f16 cache as the baseline ([`KvFormat::F16`]);
//! * [`memory`]: bytes per token per layer and totals for a model shape.
//!
//! ```
//! use kv_int4::{CacheConfig, CpuKvCache, decode_attention_ref};
//! let cfg = CacheConfig::new(1, 2, 64, 16).with_page_size(8).with_window(32, 4);
//! let mut cache = CpuKvCache::new(cfg)?;
//! let seq = cache.add_sequence();
//! let n = 10;
//! let kv: Vec<f32> = (0..n * 2 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
//! cache.append(seq, 0, n, &kv, &kv)?;                  // (layers, n, heads_kv, D)
//! let q = vec![0.1f32; 4 * 64];                        // (B=1, heads_q=4, D)
//! let out = decode_attention_ref(&cache, 0, &[seq], &q, 4, 0.125)?;
//! assert_eq!(out.len(), 4 * 64);
//! # Ok::<(), kv_int4::KvError>(())
//! ```

mod attention;
mod blocks;
mod cache;
mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
pub mod memory;
pub mod quant;

pub use attention::{attention_dense, decode_attention_ref, gqa_group};
pub use blocks::{is_visible, visible_ranges, AppendTicket, BlockManager, SeqId};
pub use cache::{BookkeepingSnapshot, CpuKvCache, CpuPages, KvInput, PageStore, PagedKvCache};
pub use config::{CacheConfig, KvFormat, PageLayout, Window, DEFAULT_PAGE_SIZE, PAGE_SIZES};
pub use error::KvError;
pub use memory::{bytes_per_token_per_layer, memory_report, KvShape, MemoryRow};
pub use quant::{
    dequantize_int4, group_error_bound, quantize_group, quantize_int4, Int4Group, GROUP,
};

/// Result type of this crate.
pub type Result<T, E = KvError> = std::result::Result<T, E>;

/// Compiles and runs the README's examples as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
