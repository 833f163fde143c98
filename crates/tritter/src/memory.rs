//! Memory estimator: what a config needs in bytes for weights (packed ternary or bf16), the
//! KV cache (fp16 or INT4, full or windowed) at a given context, and activations, printed
//! as the table the CLI shows (DESIGN.md section 5, the RTX 5080 16 GB budget).
//!
//! Units: GB are 10^9 bytes (as in DESIGN.md's worked example), GiB 2^30.

use std::fmt;

use crate::config::{ParamBreakdown, TritterConfig, KV_INT4_GROUP};
use crate::{Result, TritterError};

/// Prefill chunk of the inference estimate: prompts are prefilled this many tokens at a time
/// (FlashAttention never materializes scores, so the working set is linear in the chunk).
/// 16384 tokens gives the 2-3 GB activation budget of DESIGN.md section 5 at 7B.
pub const DEFAULT_PREFILL_CHUNK: usize = 16_384;

/// Bytes of one packed INT4 group: 32 codes at 4 bits, an f16 scale and an f16 minimum.
pub const KV_INT4_GROUP_BYTES: u64 = (KV_INT4_GROUP as u64) / 2 + 2 + 2;

const BF16: u64 = 2;
const F16: u64 = 2;
const F32: u64 = 4;

/// Byte budget of one config at one context length and batch size.
///
/// Build with [`MemoryEstimate::new`]; `Display` prints the table.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryEstimate {
    /// The config estimated.
    pub config: TritterConfig,
    /// Tokens per sequence held in context.
    pub context: usize,
    /// Sequences decoded together.
    pub batch: usize,
    /// Tokens per sequence prefilled at once (bounds the activation working set).
    pub prefill_chunk: usize,
    /// Parameter counts by storage class.
    pub params: ParamBreakdown,
    /// BitLinear weights packed at 2 bits (16 per `u32` word, rows padded to 16) plus one
    /// f32 absmean scale per matrix.
    pub ternary_linear_bytes: u64,
    /// Embedding table, untied LM head and norms in bf16 (BitNet keeps them in high
    /// precision).
    pub high_precision_bytes: u64,
    /// Every parameter in bf16: the unquantized baseline.
    pub all_bf16_bytes: u64,
    /// KV tokens per sequence a windowed cache keeps: `min(context, window + sinks)`;
    /// `None` without a sliding window.
    pub windowed_tokens: Option<usize>,
    /// Bytes of K and V per token, summed over layers, in fp16.
    pub kv_fp16_bytes_per_token: u64,
    /// Bytes of K and V per token, summed over layers, in INT4 (0.625 B/value).
    pub kv_int4_bytes_per_token: u64,
    /// Peak activation working set of prefilling one chunk per sequence (one layer live at
    /// a time in inference), plus the f32 logits of the last position of each sequence.
    pub activation_bytes: u64,
}

/// Storage of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvFormat {
    /// Two bytes per value.
    Fp16,
    /// Groups of 32 values: 16 bytes of codes + f16 scale + f16 minimum (0.625 B/value).
    Int4,
}

impl MemoryEstimate {
    /// Estimates `config` at `context` tokens per sequence for `batch` sequences, prefilled
    /// in chunks of [`DEFAULT_PREFILL_CHUNK`].
    ///
    /// Errors: an invalid config, `context` or `batch` of 0, or `context` beyond
    /// `max_position_embeddings`.
    pub fn new(config: &TritterConfig, context: usize, batch: usize) -> Result<Self> {
        Self::with_prefill_chunk(config, context, batch, DEFAULT_PREFILL_CHUNK)
    }

    /// As [`new`](Self::new) with an explicit prefill chunk (tokens per sequence per step).
    pub fn with_prefill_chunk(
        config: &TritterConfig,
        context: usize,
        batch: usize,
        prefill_chunk: usize,
    ) -> Result<Self> {
        config.validate()?;
        if context > config.max_position_embeddings {
            return Err(TritterError::SequenceTooLong {
                len: context,
                max: config.max_position_embeddings,
            });
        }
        for (field, v) in [
            ("context", context),
            ("batch", batch),
            ("prefill_chunk", prefill_chunk),
        ] {
            if v == 0 {
                return Err(TritterError::config(field, v, "expected >= 1"));
            }
        }
        let params = config.param_breakdown();
        let (h, i, d) = (
            config.hidden_size as u64,
            config.intermediate_size as u64,
            config.head_dim() as u64,
        );
        let (kv_dim, layers) = (config.kv_dim() as u64, config.num_layers as u64);
        let words = |k_in: u64| k_in.div_ceil(16) * 4;
        // Packed rows: q, o (H x H), k, v (kv_dim x H), gate, up (I x H), down (H x I).
        let per_layer_packed =
            2 * h * words(h) + 2 * kv_dim * words(h) + 2 * i * words(h) + h * words(i);
        let ternary_linear_bytes = layers * per_layer_packed + params.linear_matrices * F32;
        let groups = d.div_ceil(KV_INT4_GROUP as u64);
        let kv_heads = config.num_kv_heads as u64;
        let kv_fp16_bytes_per_token = layers * 2 * kv_heads * d * F16;
        let kv_int4_bytes_per_token = layers * 2 * kv_heads * groups * KV_INT4_GROUP_BYTES;
        let windowed_tokens = config
            .sliding_window
            .map(|w| context.min(w + config.attention_sinks));

        // One layer's live tensors per token during prefill (bf16 unless noted): residual
        // x and h, q/k/v, attention output, branch output before its norm, gate/up/product of
        // the MLP, the int8 codes (+ f32 scale) of the widest BitLinear input, and the f32
        // logsumexp per query head that FlashAttention keeps.
        let per_token = BF16 * (2 * h + h + 2 * kv_dim + h + h + 3 * i)
            + i
            + F32
            + F32 * config.num_heads as u64;
        let tokens = (batch * prefill_chunk.min(context)) as u64;
        let activation_bytes = tokens * per_token + batch as u64 * config.vocab_size as u64 * F32;

        Ok(MemoryEstimate {
            config: config.clone(),
            context,
            batch,
            prefill_chunk,
            params,
            ternary_linear_bytes,
            high_precision_bytes: params.high_precision() * BF16,
            all_bf16_bytes: params.total() * BF16,
            windowed_tokens,
            kv_fp16_bytes_per_token,
            kv_int4_bytes_per_token,
            activation_bytes,
        })
    }

    /// Weights as served: packed ternary BitLinear + bf16 embeddings, head and norms.
    pub fn ternary_weight_bytes(&self) -> u64 {
        self.ternary_linear_bytes + self.high_precision_bytes
    }

    /// KV cache bytes for the whole batch; `windowed` keeps `window + sinks` tokens per
    /// sequence (falls back to the full context when the config has no window).
    pub fn kv_bytes(&self, format: KvFormat, windowed: bool) -> u64 {
        let tokens = if windowed {
            self.windowed_tokens.unwrap_or(self.context)
        } else {
            self.context
        };
        let per_token = match format {
            KvFormat::Fp16 => self.kv_fp16_bytes_per_token,
            KvFormat::Int4 => self.kv_int4_bytes_per_token,
        };
        per_token * (tokens * self.batch) as u64
    }

    /// The KV format the config asks for (`int4_kv_cache`).
    pub fn config_kv_format(&self) -> KvFormat {
        if self.config.int4_kv_cache {
            KvFormat::Int4
        } else {
            KvFormat::Fp16
        }
    }

    /// Inference total: ternary weights + the config's KV format over the full context (the
    /// worst case; a windowed cache only shrinks it) + activations.
    pub fn inference_total_bytes(&self) -> u64 {
        self.ternary_weight_bytes()
            + self.kv_bytes(self.config_kv_format(), false)
            + self.activation_bytes
    }
}

/// Stored activations of one training step, `batch` sequences of `seq_len` tokens, in bytes.
///
/// Per layer and token the backward pass keeps (bf16): the layer input, q/k/v after QK-Norm
/// and RoPE, the attention output, both branch outputs before their norms, `h`, the MLP's
/// gate, up and product (`2 * (6H + 2 * kv_dim + 3I)`), plus the f32 logsumexp per head.
/// With `gradient_checkpointing` only each layer's input is kept and one layer is
/// recomputed at a time. The f32 logits `(B, L, V)` are counted in full (an upper bound; a
/// fused, chunked cross-entropy needs less).
pub fn training_activation_bytes(config: &TritterConfig, batch: usize, seq_len: usize) -> u64 {
    let (h, i, kv_dim) = (
        config.hidden_size as u64,
        config.intermediate_size as u64,
        config.kv_dim() as u64,
    );
    let tokens = (batch * seq_len) as u64;
    let full_layer = tokens * (BF16 * (6 * h + 2 * kv_dim + 3 * i) + F32 * config.num_heads as u64);
    let layers = config.num_layers as u64;
    let stored = if config.gradient_checkpointing {
        layers * tokens * BF16 * h + full_layer
    } else {
        layers * full_layer
    };
    stored + tokens * config.vocab_size as u64 * F32
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

impl fmt::Display for MemoryEstimate {
    /// The table the CLI prints: one row per component, GB (10^9) and GiB.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "Tritter memory estimate: hidden {}, {} layers, {} heads ({} KV, D={}), intermediate {}, vocab {}, {:.2}B params",
            c.hidden_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim(),
            c.intermediate_size,
            c.vocab_size,
            self.params.total() as f64 / 1e9
        )?;
        writeln!(
            f,
            "context {} tokens, batch {}, prefill chunk {}",
            self.context, self.batch, self.prefill_chunk
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, bytes: u64| {
            writeln!(
                f,
                "{name:<46} {:>9.3} GB {:>9.3} GiB",
                gb(bytes),
                gib(bytes)
            )
        };
        row(
            f,
            "weights: BitLinear, packed ternary (2-bit)",
            self.ternary_linear_bytes,
        )?;
        row(
            f,
            "weights: embeddings, head, norms (bf16)",
            self.high_precision_bytes,
        )?;
        row(f, "weights: total, ternary", self.ternary_weight_bytes())?;
        row(
            f,
            "weights: total, all bf16 (baseline)",
            self.all_bf16_bytes,
        )?;
        row(
            f,
            &format!("KV cache fp16, {} tokens", self.context),
            self.kv_bytes(KvFormat::Fp16, false),
        )?;
        row(
            f,
            &format!("KV cache INT4, {} tokens", self.context),
            self.kv_bytes(KvFormat::Int4, false),
        )?;
        if let Some(t) = self.windowed_tokens {
            let label = format!(
                "window {} + {} sinks",
                c.sliding_window.unwrap_or(t),
                c.attention_sinks
            );
            row(
                f,
                &format!("KV cache fp16, {label}"),
                self.kv_bytes(KvFormat::Fp16, true),
            )?;
            row(
                f,
                &format!("KV cache INT4, {label}"),
                self.kv_bytes(KvFormat::Int4, true),
            )?;
        }
        row(
            f,
            "activations (prefill working set)",
            self.activation_bytes,
        )?;
        let kv = match self.config_kv_format() {
            KvFormat::Fp16 => "fp16",
            KvFormat::Int4 => "INT4",
        };
        row(
            f,
            &format!("total: ternary + {kv} KV (full) + activations"),
            self.inference_total_bytes(),
        )
    }
}
