//! KV-cache memory arithmetic: bytes per token per layer and totals for a model shape.
//!
//! INT4 stores 0.625 bytes per value (16 bytes of codes and 4 of f16 scale+minimum per
//! group of 32), f16 2 bytes. GB are 10^9 bytes, as in DESIGN.md's worked example.

use crate::config::KvFormat;
use crate::quant::GROUP;

/// Bytes of K and V for one token in one layer: `2 * heads_kv * head_dim * bytes/value`.
/// `head_dim` is rounded up to a whole group for INT4.
pub fn bytes_per_token_per_layer(format: KvFormat, heads_kv: usize, head_dim: usize) -> usize {
    let d = match format {
        KvFormat::Int4 => head_dim.div_ceil(GROUP) * GROUP,
        KvFormat::F16 => head_dim,
    };
    2 * heads_kv * d * format.eighth_bytes_per_value() / 8
}

/// A model's KV shape, for memory reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    /// Name shown in reports.
    pub name: &'static str,
    /// Transformer layers.
    pub layers: usize,
    /// KV heads per layer.
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl KvShape {
    /// Tritter 7B: 32 layers, 8 KV heads of D = 128 (DESIGN.md section 5).
    pub const TRITTER_7B: KvShape = KvShape {
        name: "Tritter 7B (32 layers, 8 KV heads, D=128)",
        layers: 32,
        heads_kv: 8,
        head_dim: 128,
    };
    /// Tritter 3B: 26 layers, 5 KV heads of D = 128 (hidden 2560 / 20 heads).
    pub const TRITTER_3B: KvShape = KvShape {
        name: "Tritter 3B (26 layers, 5 KV heads, D=128)",
        layers: 26,
        heads_kv: 5,
        head_dim: 128,
    };

    /// Bytes of K and V for `context` tokens of one sequence over all layers.
    pub fn total_bytes(&self, format: KvFormat, context: usize) -> u64 {
        (bytes_per_token_per_layer(format, self.heads_kv, self.head_dim) as u64)
            * self.layers as u64
            * context as u64
    }
}

/// One row of a memory report.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryRow {
    /// The model shape.
    pub shape: KvShape,
    /// Tokens per sequence.
    pub context: usize,
    /// Bytes per token per layer, INT4.
    pub int4_per_token_layer: usize,
    /// Bytes per token per layer, f16.
    pub f16_per_token_layer: usize,
    /// Total INT4 bytes for one sequence.
    pub int4_total: u64,
    /// Total f16 bytes for one sequence.
    pub f16_total: u64,
}

/// The memory report row of `shape` at `context` tokens (one sequence).
pub fn memory_report(shape: KvShape, context: usize) -> MemoryRow {
    MemoryRow {
        shape,
        context,
        int4_per_token_layer: bytes_per_token_per_layer(
            KvFormat::Int4,
            shape.heads_kv,
            shape.head_dim,
        ),
        f16_per_token_layer: bytes_per_token_per_layer(
            KvFormat::F16,
            shape.heads_kv,
            shape.head_dim,
        ),
        int4_total: shape.total_bytes(KvFormat::Int4, context),
        f16_total: shape.total_bytes(KvFormat::F16, context),
    }
}

impl std::fmt::Display for MemoryRow {
    /// `| shape | context | INT4 B/token/layer | f16 B/token/layer | INT4 GB | f16 GB |`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "| {} | {} | {} | {} | {:.2} | {:.2} |",
            self.shape.name,
            self.context,
            self.int4_per_token_layer,
            self.f16_per_token_layer,
            self.int4_total as f64 / 1e9,
            self.f16_total as f64 / 1e9
        )
    }
}
