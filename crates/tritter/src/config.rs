//! [`TritterConfig`]: the model's hyper-parameters (serde JSON, `config.json` of a
//! checkpoint), the presets of DESIGN.md section 5 and their validation.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Result, TritterError};

/// Token ids below this are reserved: 8 special/modality tokens (0 `<pad>`, 1 `<bos>`,
/// 2 `<eos>`, 3 `<unk>`, 4 `<text>`, 5 `<code>`, 6 `<image>`, 7 `<audio>`) and the 256 byte
/// tokens at 8..264 (DESIGN.md section 5). Every vocabulary must hold them.
pub const MIN_VOCAB_SIZE: usize = 264;

/// Id of the padding token; its embedding row is zero and gets no gradient.
pub const PAD_TOKEN_ID: u32 = 0;

/// Values per INT4 KV-cache group along the head dimension (DESIGN.md section 4, `kv-int4`).
pub const KV_INT4_GROUP: usize = 32;

/// The preset names [`TritterConfig::preset`] accepts.
pub const PRESET_NAMES: [&str; 6] = ["test", "100m", "500m", "1b", "3b", "7b"];

/// Which keys a query may attend to (before windows, sinks and document masks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionMode {
    /// Autoregressive: query `i` sees keys `j <= i`. Language-model training and decoding.
    Causal,
    /// Every query sees every key (encoder use).
    Bidirectional,
    /// Prefix-LM: keys of the prefix (`j < prefix_len`) are visible to every query; the rest
    /// is causal. The prefix length is given per sequence (`MaskSpec`).
    PrefixLm,
    /// Embedding extraction (the embedding-prediction paradigm's encoder view): the
    /// sequence is read bidirectionally and the hidden states are the output.
    Embedding,
}

/// A kind of content the tokenizer maps into the shared vocabulary (the tokenizer's type,
/// so a config's modalities and the tokenizer's segments are one enum).
pub use crate::tokenizer::Modality;

fn default_true() -> bool {
    true
}

/// Hyper-parameters of a Tritter model (DESIGN.md section 5).
///
/// Serialized as the `config.json` of a checkpoint; unknown fields are rejected, so a typo
/// fails loudly instead of being ignored. Build one from [`TritterConfig::preset`], edit the
/// public fields, and call [`TritterConfig::validate`] (every constructor in this crate
/// validates again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TritterConfig {
    /// Model width `H`: the residual stream is `(B, L, H)`.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads `Hq`; `head_dim = hidden_size / num_heads`.
    pub num_heads: usize,
    /// Key/value heads `Hkv` (grouped-query attention); divides `num_heads`. Fewer KV heads
    /// shrink the KV cache, which dominates memory at 128K context.
    pub num_kv_heads: usize,
    /// Width `I` of the squared-ReLU GLU MLP (gate and up are `(I, H)`, down is `(H, I)`).
    pub intermediate_size: usize,
    /// Largest position id + 1 (RoPE has no table, this is the supported context).
    pub max_position_embeddings: usize,
    /// Vocabulary size `V`, at least [`MIN_VOCAB_SIZE`]; the latent markers `<bot>`/`<eot>`
    /// of the embedding-prediction paradigm take the top two ids and need `V >= 266`
    /// (checked where they are used, so small token-only vocabs stay valid).
    pub vocab_size: usize,
    /// RoPE base: frequency `i` of a head is `rope_theta^(-2i / head_dim)`.
    pub rope_theta: f64,
    /// Epsilon of every RMSNorm.
    pub norm_eps: f64,
    /// Default attention mode (a `MaskSpec` may choose another per call).
    pub attention_mode: AttentionMode,
    /// Sliding window `W`: key `j` is visible to query `i` only if `i - W < j`. `None` attends
    /// over the whole context.
    pub sliding_window: Option<usize>,
    /// Attention sinks `S`: the first `S` keys are exempt from the sliding window
    /// (StreamingLLM). Needs a window.
    pub attention_sinks: usize,
    /// Keep the inference KV cache in INT4 (groups of 32 along the head dim, f16 scale and
    /// minimum); needs `head_dim % 32 == 0`.
    pub int4_kv_cache: bool,
    /// Recompute layer activations in the backward pass (GPU trainer); the candle
    /// reference keeps the whole graph and ignores it.
    pub gradient_checkpointing: bool,
    /// Modalities the vocabulary covers: a non-empty set of text/code/image/audio.
    pub modalities: Vec<Modality>,
    /// Dropout probability on the residual branches during training, in `[0, 1)`.
    pub dropout: f32,
    /// Standard deviation of the normal init of embeddings and linear weights.
    pub initializer_range: f64,
    /// Share the embedding table with the LM head (`logits = h · Eᵀ`).
    pub tie_embeddings: bool,
    /// BitLinear quantization (ternary weights, A8 activations, straight-through
    /// gradients). `false` gives the full-precision baseline with the same parameters.
    #[serde(default = "default_true")]
    pub quantize_bitlinear: bool,
    /// A learned full-precision projection `latent_proj.weight` `(H, H)` (identity at init)
    /// between the final hidden state and the next input embedding of a continuous thought,
    /// and of the predicted embedding of the embedding-prediction loss ([`crate::paradigm`]).
    /// Off (the default, and in configs written before it existed): the normalized hidden
    /// state is fed back as is, as in Coconut.
    #[serde(default)]
    pub latent_projection: bool,
}

/// Parameter counts of a config, split by how the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamBreakdown {
    /// BitLinear weights (q/k/v/o, gate/up/down of every layer): ternary when packed.
    pub linear: u64,
    /// Number of BitLinear matrices (each carries one f32 absmean scale when packed).
    pub linear_matrices: u64,
    /// Token embedding table `(V, H)`.
    pub embedding: u64,
    /// Untied LM head `(V, H)` (0 when tied); kept in high precision, as BitNet does.
    pub lm_head: u64,
    /// RMSNorm weights: per layer `norm_a`, `norm_f` (H each), `q_norm`, `k_norm` (D
    /// each), and the final norm (H).
    pub norms: u64,
    /// Latent projection `(H, H)` (0 unless `latent_projection`); high precision.
    pub latent_projection: u64,
}

impl ParamBreakdown {
    /// All parameters.
    pub fn total(&self) -> u64 {
        self.linear + self.embedding + self.lm_head + self.norms + self.latent_projection
    }

    /// Parameters kept in high precision (everything but the BitLinear weights).
    pub fn high_precision(&self) -> u64 {
        self.embedding + self.lm_head + self.norms + self.latent_projection
    }
}

impl TritterConfig {
    /// A preset by name: `test` (64 wide, 2 layers, 2 heads), `100m`, `500m`, `1b`, `3b`,
    /// `7b` (DESIGN.md section 5), case-insensitive.
    ///
    /// KV heads are chosen for the RTX 5080 budget (16 GB: ternary weights + INT4 KV cache
    /// at 128K + activations): 7B uses 8 KV heads of D = 128, so its full-context INT4 cache is
    /// 5.4 GB (16 KV heads would need 10.7 GB). The 1B-7B presets default to a 4096-token
    /// sliding window with 4 sinks for long-context inference; the estimator reports both the
    /// windowed and the full cache.
    pub fn preset(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        // (hidden, layers, heads, kv heads, intermediate)
        let (hidden, layers, heads, kv, inter) = match lower.as_str() {
            "test" => return Ok(Self::test_preset()),
            "100m" => (768, 12, 12, 4, 1536),
            "500m" => (1024, 24, 16, 4, 4608),
            "1b" => (2048, 24, 16, 4, 5120),
            "3b" => (2560, 26, 20, 5, 11008),
            "7b" => (4096, 32, 32, 8, 13824),
            _ => {
                return Err(TritterError::UnknownPreset {
                    name: name.to_string(),
                    expected: "test, 100m, 500m, 1b, 3b, 7b",
                })
            }
        };
        let big = hidden >= 2048;
        Ok(TritterConfig {
            hidden_size: hidden,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            intermediate_size: inter,
            max_position_embeddings: 131_072,
            vocab_size: 65_536,
            rope_theta: 500_000.0,
            norm_eps: 1e-5,
            attention_mode: AttentionMode::Causal,
            sliding_window: big.then_some(4096),
            attention_sinks: if big { 4 } else { 0 },
            int4_kv_cache: big,
            gradient_checkpointing: big,
            modalities: Modality::ALL.to_vec(),
            dropout: 0.0,
            initializer_range: 0.02,
            tie_embeddings: true,
            quantize_bitlinear: true,
            latent_projection: false,
        })
    }

    /// The `test` preset: small enough for finite-difference gradient checks in a debug
    /// build, yet with GQA (2 query heads over 1 KV head) and INT4-compatible head_dim 32.
    fn test_preset() -> Self {
        TritterConfig {
            hidden_size: 64,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            intermediate_size: 128,
            max_position_embeddings: 256,
            vocab_size: 512,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            attention_mode: AttentionMode::Causal,
            sliding_window: None,
            attention_sinks: 0,
            int4_kv_cache: false,
            gradient_checkpointing: false,
            modalities: Modality::ALL.to_vec(),
            dropout: 0.0,
            initializer_range: 0.02,
            tie_embeddings: true,
            quantize_bitlinear: true,
            latent_projection: false,
        }
    }

    /// Per-head width `D = hidden_size / num_heads` (call [`validate`](Self::validate) first
    /// for a config built by hand; this does not check divisibility).
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Width of the K (and of the V) projection, `num_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim()
    }

    /// Checks every rule; the error names the field, its value and what it must be.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(TritterError::config(field, v, "expected >= 1"));
            }
        }
        if self.hidden_size % self.num_heads != 0 {
            return Err(TritterError::config(
                "hidden_size % num_heads",
                format!(
                    "{} ({} % {})",
                    self.hidden_size % self.num_heads,
                    self.hidden_size,
                    self.num_heads
                ),
                "expected 0: hidden_size must be a multiple of num_heads",
            ));
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(TritterError::config(
                "num_heads % num_kv_heads",
                format!(
                    "{} ({} % {})",
                    self.num_heads % self.num_kv_heads,
                    self.num_heads,
                    self.num_kv_heads
                ),
                "expected 0: each KV head serves a whole group of query heads (GQA)",
            ));
        }
        let d = self.head_dim();
        if d % 2 != 0 {
            return Err(TritterError::config(
                "head_dim",
                d,
                "expected an even number: RoPE rotates pairs of dimensions",
            ));
        }
        if self.int4_kv_cache && d % KV_INT4_GROUP != 0 {
            return Err(TritterError::config(
                "head_dim",
                d,
                format!("expected a multiple of {KV_INT4_GROUP} with int4_kv_cache (INT4 groups of {KV_INT4_GROUP} along D), or int4_kv_cache = false"),
            ));
        }
        if self.vocab_size < MIN_VOCAB_SIZE {
            return Err(TritterError::config(
                "vocab_size",
                self.vocab_size,
                format!("expected >= {MIN_VOCAB_SIZE} (8 special tokens + 256 byte tokens)"),
            ));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(TritterError::config(
                "vocab_size",
                self.vocab_size,
                format!("expected <= {} (token ids are u32)", u32::MAX),
            ));
        }
        if self.max_position_embeddings > u32::MAX as usize {
            return Err(TritterError::config(
                "max_position_embeddings",
                self.max_position_embeddings,
                format!("expected <= {} (positions are u32)", u32::MAX),
            ));
        }
        for (field, v) in [
            ("rope_theta", self.rope_theta),
            ("norm_eps", self.norm_eps),
            ("initializer_range", self.initializer_range),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(TritterError::config(
                    field,
                    v,
                    "expected a finite value > 0",
                ));
            }
        }
        if self.rope_theta <= 1.0 {
            return Err(TritterError::config(
                "rope_theta",
                self.rope_theta,
                "expected > 1 (frequencies rope_theta^(-2i/D) must decrease)",
            ));
        }
        if let Some(w) = self.sliding_window {
            if w == 0 || w > self.max_position_embeddings {
                return Err(TritterError::config(
                    "sliding_window",
                    w,
                    format!(
                        "expected 1 ..= max_position_embeddings ({}), or null for full attention",
                        self.max_position_embeddings
                    ),
                ));
            }
            if self.attention_sinks >= w {
                return Err(TritterError::config(
                    "attention_sinks",
                    self.attention_sinks,
                    format!("expected < sliding_window ({w})"),
                ));
            }
        } else if self.attention_sinks != 0 {
            return Err(TritterError::config(
                "attention_sinks",
                self.attention_sinks,
                "expected 0 when sliding_window is null (sinks only exempt keys from the window)",
            ));
        }
        if self.modalities.is_empty() {
            return Err(TritterError::config(
                "modalities",
                "[]",
                "expected a non-empty subset of [text, code, image, audio]",
            ));
        }
        let mut seen = self.modalities.clone();
        seen.sort();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(TritterError::config(
                "modalities",
                format!("{:?}", self.modalities),
                format!("expected each modality at most once ({:?} repeats)", w[0]),
            ));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return Err(TritterError::config(
                "dropout",
                self.dropout,
                "expected a probability in [0, 1)",
            ));
        }
        Ok(())
    }

    /// Parameters by storage class, computed from the config alone (no model is built).
    ///
    /// Per layer: q `(H, H)`, k and v `(Hkv*D, H)`, o `(H, H)`, gate and up `(I, H)`, down
    /// `(H, I)` (no biases), `q_norm`/`k_norm` `(D,)`, `norm_a`/`norm_f` `(H,)`; plus the
    /// embedding `(V, H)`, the final norm `(H,)`, when untied the LM head `(V, H)`, and with
    /// `latent_projection` the latent projection `(H, H)`.
    pub fn param_breakdown(&self) -> ParamBreakdown {
        let (h, i, d, kv) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.head_dim() as u64,
            self.kv_dim() as u64,
        );
        let layers = self.num_layers as u64;
        let vocab = self.vocab_size as u64;
        let per_layer_linear = 2 * h * h + 2 * h * kv + 3 * h * i;
        ParamBreakdown {
            linear: layers * per_layer_linear,
            linear_matrices: layers * 7,
            embedding: vocab * h,
            lm_head: if self.tie_embeddings { 0 } else { vocab * h },
            norms: layers * (2 * h + 2 * d) + h,
            latent_projection: if self.latent_projection { h * h } else { 0 },
        }
    }

    /// Total parameter count, analytic (tested equal to the instantiated model's).
    pub fn param_count(&self) -> u64 {
        self.param_breakdown().total()
    }

    /// Parses and validates a JSON config.
    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: TritterConfig =
            serde_json::from_str(json).map_err(|source| TritterError::ConfigJson {
                path: Default::default(),
                source,
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Pretty JSON (the `config.json` of a checkpoint).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config always serializes")
    }

    /// Reads and validates a `config.json`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TritterError::io(path, e))?;
        let cfg: TritterConfig =
            serde_json::from_str(&text).map_err(|source| TritterError::ConfigJson {
                path: path.to_path_buf(),
                source,
            })?;
        cfg.validate()?;
        Ok(cfg)
    }
}
