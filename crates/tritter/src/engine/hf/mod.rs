//! Import of Hugging Face BitNet b1.58 checkpoints (transformers' `model_type: "bitnet"`,
//! e.g. microsoft/bitnet-b1.58-2B-4T-bf16) from a local directory into an
//! [`InferenceCheckpoint`] the [`CpuEngine`](super::CpuEngine) runs.
//!
//! What is read: `config.json` ([`HfBitnetConfig`]), the weights (`model.safetensors`, or
//! `model.safetensors.index.json` and its shards; BF16, F16 or F32), `tokenizer.json` when
//! present ([`HfTokenizer`]) and `generation_config.json`'s extra stop ids when present.
//!
//! How transformers' BitNet maps onto the engine ([`Architecture::HF_BITNET`]):
//!
//! | transformers (`modeling_bitnet.py` + `integrations/bitnet.py`) | engine |
//! |---|---|
//! | `model.embed_tokens.weight` `(V, H)`, plain lookup (id 0 included) | `embed_tokens` bf16, `zero_pad_embedding: false` |
//! | `input_layernorm` → `self_attn` (`q/k/v_proj`, RoPE rotate-half with `rope_theta`, GQA, softmax, `attn_sub_norm`, `o_proj`) → residual | `NormPlacement::PreNormSubNorm`, no QK-Norm |
//! | `post_attention_layernorm` → `mlp`: `down_proj(ffn_sub_norm(relu(gate_proj(x))² * up_proj(x)))` → residual (`hidden_act: relu2`) | the same, `mlp_sub_norm` |
//! | `model.norm`, `lm_head` (tied to the embedding with `tie_word_embeddings`), unquantized | `final_norm`, bf16 head |
//! | each `q/k/v/o/gate/up/down_proj` an online `AutoBitLinear`: `WeightQuant` (per tensor, `s = 1/max(mean|W|, 1e-5)`, `round(W s).clamp(-1, 1) / s`) and `ActQuant` (per token, `s = 127/max(max|x|, 1e-5)`, `round(x s).clamp(-128, 127) / s`), both in f32 | [`hf_absmean_quantize`] at import; `absmax_quantize_rows` + integer `ternary_matmul_a8` per forward |
//! | RMSNorm `w * x / sqrt(mean(x²) + rms_norm_eps)` in f32 | `rms_norm_row` with `norm_eps = rms_norm_eps` |
//!
//! Differences from transformers' f32 forward on the same bf16 checkpoint, all at the
//! level of f32 rounding: activation codes round half away from zero (torch: half to even;
//! an exact `.5` after scaling is rare), RoPE angles are computed in f64 (torch: f32), sums
//! run in another order, and the weight scale is summed in f64. A difference of one int8
//! activation code or one ternary code is the largest effect such rounding can have.
//! With `quantization_config` absent transformers runs the linears unquantized; the import
//! quantizes regardless ([`HfQuantization::Absent`]). Norms and embeddings are stored in
//! bf16: exact for the bf16 releases, rounded for F16/F32 checkpoints.
//!
//! Refused with a typed error (never a panic): another `model_type`; RoPE scaling; biases;
//! a `head_dim` other than `H / Hq`; activations other than relu2; the offline packed
//! release and other quantization configs; missing, unexpected, duplicated, misshapen,
//! non-finite or non-float tensors ([`TritterError::HfTensor`] with a
//! [`HfTensorProblem`]).
//!
//! ```no_run
//! use tritter::engine::hf::HfBitnet;
//! use tritter::engine::CpuEngine;
//!
//! let model = HfBitnet::open("models/bitnet-b1.58-2B-4T-bf16")?;
//! let ids = model.tokenizer.as_ref().expect("tokenizer.json").encode("Hello", true)?;
//! let engine = CpuEngine::new(model.checkpoint)?;
//! let logits = engine.forward_full(&ids)?; // (L, V)
//! # Ok::<(), tritter::TritterError>(())
//! ```

mod compare;
mod config;
mod tokenizer;
mod weights;

use std::path::Path;

use serde_json::{Map, Value};

pub use compare::{argmax, compare_logits, LogitsComparison, ReferenceLogits};
pub use config::{HfBitnetConfig, HfQuantization, HF_CONFIG_FILE, HF_GENERATION_CONFIG_FILE};
pub use tokenizer::{HfTokenizer, HF_TOKENIZER_FILE};
pub use weights::{
    hf_absmean_quantize, hf_tensor_name, HfTensorProblem, HF_WEIGHTS_FILE, HF_WEIGHTS_INDEX_FILE,
    HF_WEIGHT_SCALE_FLOOR,
};

use super::checkpoint::{assemble, expected_tensors, Architecture, InferenceCheckpoint};
use super::{Manifest, SourceInfo, MANIFEST_FILE};
use crate::checkpoint::write_atomic;
use crate::{Result, TritterError};

/// The Hugging Face `config.json` kept beside an exported inference checkpoint (whose
/// `config.json` is the engine's [`TritterConfig`](crate::TritterConfig)).
pub const HF_EXPORT_CONFIG_FILE: &str = "hf_config.json";

/// An imported Hugging Face BitNet model: the engine's weights, the source config, the
/// tokenizer and the stop ids generation should use.
#[derive(Debug, Clone)]
pub struct HfBitnet {
    /// Packed ternary linears, bf16 norms and embeddings ([`Architecture::HF_BITNET`]).
    pub checkpoint: InferenceCheckpoint,
    /// The checked `config.json`.
    pub config: HfBitnetConfig,
    /// `tokenizer.json`, when the directory has one.
    pub tokenizer: Option<HfTokenizer>,
    /// `eos_token_id` of `config.json`, then those `generation_config.json` adds.
    pub stop_token_ids: Vec<u32>,
    /// `generation_config.json` as read (copied by [`save`](Self::save)).
    pub generation_config: Option<Map<String, Value>>,
}

/// Imports the checkpoint in `dir` (see the module docs): [`HfBitnet::import`]'s weights.
pub fn import_hf_bitnet(dir: impl AsRef<Path>) -> Result<InferenceCheckpoint> {
    Ok(HfBitnet::import(dir)?.checkpoint)
}

impl HfBitnet {
    /// Reads `config.json`, the safetensors weights (quantizing every linear as
    /// transformers' online `AutoBitLinear` does), `tokenizer.json` and
    /// `generation_config.json` of a Hugging Face checkpoint directory.
    pub fn import(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = HfBitnetConfig::load(dir)?;
        let cfg = config.to_tritter_config()?;
        let arch = Architecture::HF_BITNET;
        let expected = expected_tensors(&cfg, &arch);
        let tensors = weights::read_weights(dir, &expected, config.tie_word_embeddings)?;
        let source = SourceInfo {
            checkpoint: Some(dir.display().to_string()),
            step: None,
        };
        let checkpoint = assemble(cfg, arch, source, tensors.ternary, tensors.dense)?;
        checkpoint.validate()?;
        Self::finish(checkpoint, config, dir)
    }

    /// The tokenizer and stop ids of `dir`, checked against the model.
    fn finish(checkpoint: InferenceCheckpoint, config: HfBitnetConfig, dir: &Path) -> Result<Self> {
        let tokenizer = HfTokenizer::load_dir(dir)?;
        if let Some(t) = &tokenizer {
            if t.vocab_size() > config.vocab_size {
                return Err(TritterError::HfConfig {
                    path: dir.join(HF_TOKENIZER_FILE),
                    key: "vocabulary".into(),
                    actual: format!("{} ids", t.vocab_size()),
                    expected: format!(
                        "at most vocab_size = {} (the embedding's rows)",
                        config.vocab_size
                    ),
                });
            }
        }
        let (stop_token_ids, generation_config) = config::stop_tokens(&config, dir)?;
        if let Some(&id) = stop_token_ids
            .iter()
            .find(|&&id| id as usize >= config.vocab_size)
        {
            return Err(TritterError::HfConfig {
                path: dir.join(HF_CONFIG_FILE),
                key: "eos_token_id".into(),
                actual: id.to_string(),
                expected: format!("an id below vocab_size {}", config.vocab_size),
            });
        }
        Ok(HfBitnet {
            checkpoint,
            config,
            tokenizer,
            stop_token_ids,
            generation_config,
        })
    }

    /// Opens either a Hugging Face checkpoint directory ([`import`](Self::import)) or one
    /// written by [`save`](Self::save) (`manifest.json` + `hf_config.json`, loaded and
    /// verified without re-quantizing).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.join(MANIFEST_FILE).is_file() {
            return Self::import(dir);
        }
        let checkpoint = InferenceCheckpoint::load(dir)?;
        let hf_config = dir.join(HF_EXPORT_CONFIG_FILE);
        if checkpoint.architecture != Architecture::HF_BITNET || !hf_config.is_file() {
            return Err(TritterError::CheckpointMismatch {
                path: dir.to_path_buf(),
                detail: format!(
                    "is an inference checkpoint of architecture {:?}{}; expected one exported from a Hugging Face BitNet checkpoint (tritter export --hf), or run it with --checkpoint",
                    checkpoint.architecture,
                    if hf_config.is_file() { "" } else { " without hf_config.json" }
                ),
            });
        }
        let config = HfBitnetConfig::load_file(&hf_config)?;
        let expected = config.to_tritter_config()?;
        if expected != checkpoint.config {
            return Err(TritterError::CheckpointMismatch {
                path: dir.to_path_buf(),
                detail: "config.json does not match hf_config.json (a torn or edited export); export again".into(),
            });
        }
        Self::finish(checkpoint, config, dir)
    }

    /// Writes the inference checkpoint into `dir` ([`InferenceCheckpoint::save`]) plus
    /// `hf_config.json`, and `tokenizer.json` and `generation_config.json` when present, so
    /// [`open`](Self::open) restores everything. Returns the checkpoint's manifest.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<Manifest> {
        let dir = dir.as_ref();
        let manifest = self.checkpoint.save(dir)?;
        write_atomic(
            &dir.join(HF_EXPORT_CONFIG_FILE),
            self.config.to_json().as_bytes(),
        )?;
        if let Some(t) = &self.tokenizer {
            write_atomic(&dir.join(HF_TOKENIZER_FILE), t.json().as_bytes())?;
        }
        if let Some(g) = &self.generation_config {
            let json = serde_json::to_string_pretty(g).expect("a JSON object serializes");
            write_atomic(&dir.join(HF_GENERATION_CONFIG_FILE), json.as_bytes())?;
        }
        Ok(manifest)
    }
}
