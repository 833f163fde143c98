//! The inference checkpoint: what the engines run, exported from a trained checkpoint.
//!
//! A directory of four files, each written atomically (temporary name, fsync, rename), the
//! manifest last:
//!
//! | file | content |
//! |---|---|
//! | `config.json` | the [`TritterConfig`] (the same file as a training checkpoint's) |
//! | `ternary.safetensors` | every BitLinear weight in ternary-gemm's format (`tritter-ternary/1`): `{name}.packed` U32 `(n_out, ceil(k_in / 16))` canonical 2-bit codes (DESIGN.md section 4), `{name}.scales` F32 `(1,)` per tensor, `k_in` and granularity in the metadata |
//! | `dense.safetensors` | norms, embedding, untied LM head and latent projection in bf16 (`format` = `tritter-inference-dense/1`) |
//! | `manifest.json` | [`Manifest`]: format tag and version, architecture, source checkpoint and step, every file's byte size and FNV-1a 64 checksum, every tensor's name, file, dtype, shape and bytes |
//!
//! Tensor names follow the training checkpoint (`layers.{i}.attn.q_proj.weight`, ...; see
//! [`expected_tensors`]), so a ternary tensor `layers.0.attn.q_proj.weight` is stored as
//! `layers.0.attn.q_proj.weight.packed` and `.scales`.
//!
//! Export quantizes every BitLinear exactly as the candle forward pass does
//! ([`BitLinear::to_ternary`](crate::model::BitLinear::to_ternary): per-tensor absmean with
//! candle's f32 mean), so the packed codes times `gamma` equal the weights the reference
//! multiplies with, bit for bit. Everything else is rounded to bf16 (nearest even).
//!
//! Loading checks, in order: the manifest (parse, format, version), each file's size and
//! checksum (a torn directory, with a new file beside an old manifest, is reported), the
//! config, the manifest's tensor list against the one the config implies, and every tensor
//! of the files (presence, dtype, shape, ternary codes and padding, nothing extra). Every
//! failure is a typed [`TritterError`] naming the actual and the expected value.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use ternary_gemm::{
    ternary_from_safetensors, ternary_to_safetensors, TernaryMatrix, TernaryMlp, TERNARY_FORMAT_TAG,
};

use crate::checkpoint::{read_json, sync_dir, write_atomic, CONFIG_FILE};
use crate::config::TritterConfig;
use crate::model::{fnv1a, TritterModel, FNV_OFFSET};
use crate::train::{model_checkpoint_dir, TrainerState, TRAINER_STATE_FILE};
use crate::{Result, TritterError};

/// The manifest of an inference checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The ternary weights of an inference checkpoint directory.
pub const TERNARY_FILE: &str = "ternary.safetensors";
/// The bf16 tensors of an inference checkpoint directory.
pub const DENSE_FILE: &str = "dense.safetensors";
/// `format` of [`Manifest`].
pub const INFERENCE_FORMAT: &str = "tritter-inference";
/// `version` of [`Manifest`] this build writes and reads.
pub const INFERENCE_FORMAT_VERSION: u32 = 1;
/// `format` metadata of `dense.safetensors`.
pub const DENSE_FORMAT_TAG: &str = "tritter-inference-dense/1";

/// Where the RMSNorms of a decoder layer sit. Tritter uses [`Chameleon`](Self::Chameleon);
/// [`PreNormSubNorm`](Self::PreNormSubNorm) is Hugging Face BitNet b1.58's layout
/// (`model_type: "bitnet"`), so an importer of those checkpoints plugs into the same engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormPlacement {
    /// Norms on the branch outputs: `h = x + norm_a(attn(x))`, `out = h + norm_f(mlp(h))`
    /// (tensors `attn_norm`, `mlp_norm`, both `(H,)`).
    Chameleon,
    /// Pre-norm with sub-layer norms inside the branches:
    /// `h = x + o_proj(attn_sub_norm(attn(input_layernorm(x))))`,
    /// `out = h + down_proj(ffn_sub_norm(relu(gate(y))² * up(y)))` with
    /// `y = post_attention_layernorm(h)` (tensors `input_layernorm` `(H,)`,
    /// `post_attention_layernorm` `(H,)`, `attn.attn_sub_norm` `(H,)`, `mlp.ffn_sub_norm`
    /// `(I,)`).
    PreNormSubNorm,
}

impl NormPlacement {
    /// The layer's norm tensors (name under `layers.{i}.`, without `.weight`) and their
    /// lengths, in the order of [`LayerNorms::rows`].
    fn tensors(self, cfg: &TritterConfig) -> Vec<(&'static str, usize)> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        match self {
            NormPlacement::Chameleon => vec![("attn_norm", h), ("mlp_norm", h)],
            NormPlacement::PreNormSubNorm => vec![
                ("input_layernorm", h),
                ("post_attention_layernorm", h),
                ("attn.attn_sub_norm", h),
                ("mlp.ffn_sub_norm", i),
            ],
        }
    }
}

/// The layer structure the weights describe: norm placement, whether q/k get QK-Norm, and
/// whether `<pad>` (id 0) embeds to zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    /// Where the layer norms sit.
    pub norm_placement: NormPlacement,
    /// RMSNorm over D on every query and key head (learned `q_norm`, `k_norm` `(D,)`),
    /// before RoPE.
    pub qk_norm: bool,
    /// Token id [`PAD_TOKEN_ID`](crate::config::PAD_TOKEN_ID) (0) embeds to a zero row
    /// whatever the table holds, as Tritter's reference embedding does. Off for imported
    /// models, whose id 0 is an ordinary token (`!` in the Llama 3 vocabulary of BitNet
    /// b1.58 2B4T) looked up like any other. Manifests written before this field existed
    /// are Tritter exports, hence the default `true`.
    #[serde(default = "default_true")]
    pub zero_pad_embedding: bool,
}

fn default_true() -> bool {
    true
}

impl Architecture {
    /// Tritter: Chameleon norms, QK-Norm, `<pad>` embeds to zero.
    pub const TRITTER: Architecture = Architecture {
        norm_placement: NormPlacement::Chameleon,
        qk_norm: true,
        zero_pad_embedding: true,
    };
    /// Hugging Face BitNet b1.58: pre-norm with sub-norms, no QK-Norm, every id looked up
    /// in the table (see [`crate::engine::hf`]).
    pub const HF_BITNET: Architecture = Architecture {
        norm_placement: NormPlacement::PreNormSubNorm,
        qk_norm: false,
        zero_pad_embedding: false,
    };
}

/// The BitLinear weights of a layer (names under `layers.{i}.`, without `.weight`), in the
/// order of [`LayerWeights::ternary`].
const TERNARY_PARTS: [&str; 7] = [
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];
/// The QK-Norm weights, in the order of [`QkNorm::rows`].
const QK_NORM_PARTS: [&str; 2] = ["attn.q_norm", "attn.k_norm"];
const EMBED: &str = "embed_tokens.weight";
const FINAL_NORM: &str = "norm.weight";
const LM_HEAD: &str = "lm_head.weight";
const LATENT_PROJ: &str = "latent_proj.weight";

fn layer_tensor(i: usize, part: &str) -> String {
    format!("layers.{i}.{part}.weight")
}

/// How a tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorKind {
    /// A ternary matrix `(n_out, k_in)` in `ternary.safetensors`: U32 packed codes plus F32
    /// scales.
    Ternary,
    /// bf16 values in `dense.safetensors`.
    Bf16,
}

impl TensorKind {
    /// The file of the checkpoint directory that holds tensors of this kind.
    pub fn file(self) -> &'static str {
        match self {
            TensorKind::Ternary => TERNARY_FILE,
            TensorKind::Bf16 => DENSE_FILE,
        }
    }
}

/// One tensor a checkpoint must hold: name, storage and logical shape (`(n_out, k_in)` for
/// a ternary matrix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The checkpoint name, e.g. `layers.0.attn.q_proj.weight`.
    pub name: String,
    /// Ternary or bf16.
    pub kind: TensorKind,
    /// Logical shape.
    pub shape: Vec<usize>,
}

/// Every tensor of an inference checkpoint of `config` with `arch`, in file order: the
/// embedding `(V, H)`; per layer q `(H, H)`, k and v `(Hkv*D, H)`, o `(H, H)`, gate and up
/// `(I, H)`, down `(H, I)` (ternary), then the norms of the placement and, with QK-Norm,
/// `q_norm`/`k_norm` `(D,)`; the final norm `(H,)`; `lm_head` `(V, H)` when untied;
/// `latent_proj` `(H, H)` with `latent_projection`.
pub fn expected_tensors(config: &TritterConfig, arch: &Architecture) -> Vec<TensorSpec> {
    let (h, v, d, kv, i) = (
        config.hidden_size,
        config.vocab_size,
        config.head_dim(),
        config.kv_dim(),
        config.intermediate_size,
    );
    let bf16 = |name: String, shape: Vec<usize>| TensorSpec {
        name,
        kind: TensorKind::Bf16,
        shape,
    };
    let mut out = vec![bf16(EMBED.into(), vec![v, h])];
    let ternary_shapes = [[h, h], [kv, h], [kv, h], [h, h], [i, h], [i, h], [h, i]];
    for l in 0..config.num_layers {
        for (part, shape) in TERNARY_PARTS.iter().zip(ternary_shapes) {
            out.push(TensorSpec {
                name: layer_tensor(l, part),
                kind: TensorKind::Ternary,
                shape: shape.to_vec(),
            });
        }
        for (part, len) in arch.norm_placement.tensors(config) {
            out.push(bf16(layer_tensor(l, part), vec![len]));
        }
        if arch.qk_norm {
            for part in QK_NORM_PARTS {
                out.push(bf16(layer_tensor(l, part), vec![d]));
            }
        }
    }
    out.push(bf16(FINAL_NORM.into(), vec![h]));
    if !config.tie_embeddings {
        out.push(bf16(LM_HEAD.into(), vec![v, h]));
    }
    if config.latent_projection {
        out.push(bf16(LATENT_PROJ.into(), vec![h, h]));
    }
    out
}

/// The norm weights of one layer, by placement (bf16, as stored).
#[derive(Debug, Clone, PartialEq)]
pub enum LayerNorms {
    /// [`NormPlacement::Chameleon`].
    Chameleon {
        /// norm_a over the attention output `(H,)`.
        attn_norm: Vec<bf16>,
        /// norm_f over the MLP output `(H,)`.
        mlp_norm: Vec<bf16>,
    },
    /// [`NormPlacement::PreNormSubNorm`].
    PreNormSubNorm {
        /// Before attention `(H,)`.
        input_layernorm: Vec<bf16>,
        /// Before the MLP `(H,)`.
        post_attention_layernorm: Vec<bf16>,
        /// Over the attention heads' output, before o_proj `(H,)`.
        attn_sub_norm: Vec<bf16>,
        /// Over the GLU output, before down_proj `(I,)`.
        ffn_sub_norm: Vec<bf16>,
    },
}

impl LayerNorms {
    /// The placement these norms belong to.
    pub fn placement(&self) -> NormPlacement {
        match self {
            LayerNorms::Chameleon { .. } => NormPlacement::Chameleon,
            LayerNorms::PreNormSubNorm { .. } => NormPlacement::PreNormSubNorm,
        }
    }

    /// The weights in the order of the placement's tensor list.
    pub fn rows(&self) -> Vec<&[bf16]> {
        match self {
            LayerNorms::Chameleon {
                attn_norm,
                mlp_norm,
            } => vec![attn_norm, mlp_norm],
            LayerNorms::PreNormSubNorm {
                input_layernorm,
                post_attention_layernorm,
                attn_sub_norm,
                ffn_sub_norm,
            } => vec![
                input_layernorm,
                post_attention_layernorm,
                attn_sub_norm,
                ffn_sub_norm,
            ],
        }
    }

    /// The inverse of [`rows`](Self::rows) (`rows` in the placement's order).
    fn from_rows(placement: NormPlacement, rows: Vec<Vec<bf16>>) -> Self {
        let mut it = rows.into_iter();
        let mut next = || it.next().unwrap_or_default();
        match placement {
            NormPlacement::Chameleon => LayerNorms::Chameleon {
                attn_norm: next(),
                mlp_norm: next(),
            },
            NormPlacement::PreNormSubNorm => LayerNorms::PreNormSubNorm {
                input_layernorm: next(),
                post_attention_layernorm: next(),
                attn_sub_norm: next(),
                ffn_sub_norm: next(),
            },
        }
    }
}

/// QK-Norm weights of one layer, each `(D,)` bf16.
#[derive(Debug, Clone, PartialEq)]
pub struct QkNorm {
    /// Over each query head.
    pub q_norm: Vec<bf16>,
    /// Over each key head.
    pub k_norm: Vec<bf16>,
}

/// The weights of one decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// `(Hq*D, H)` ternary.
    pub q_proj: TernaryMatrix,
    /// `(Hkv*D, H)` ternary.
    pub k_proj: TernaryMatrix,
    /// `(Hkv*D, H)` ternary.
    pub v_proj: TernaryMatrix,
    /// `(H, Hq*D)` ternary.
    pub o_proj: TernaryMatrix,
    /// gate/up `(I, H)`, down `(H, I)` ternary, shape-checked together.
    pub mlp: TernaryMlp,
    /// The layer's norms.
    pub norms: LayerNorms,
    /// QK-Norm weights, when the architecture has QK-Norm.
    pub qk_norm: Option<QkNorm>,
}

impl LayerWeights {
    /// The seven BitLinear weights in the order q, k, v, o, gate, up, down.
    pub fn ternary(&self) -> [&TernaryMatrix; 7] {
        let (gate, up, down) = self.mlp.parts();
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            gate,
            up,
            down,
        ]
    }
}

/// Where an inference checkpoint came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    /// The training checkpoint directory it was exported from, if any.
    pub checkpoint: Option<String>,
    /// The optimizer step of that checkpoint, if it was a training checkpoint.
    pub step: Option<u64>,
}

/// A model ready for inference: ternary BitLinear weights (packed codes + scales), bf16
/// norms and embeddings, the config and the layer [`Architecture`].
///
/// Build one with [`from_model`](Self::from_model) (export),
/// [`from_trained_checkpoint`](Self::from_trained_checkpoint) or [`load`](Self::load);
/// [`crate::engine::CpuEngine::new`] runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceCheckpoint {
    /// The model's hyper-parameters.
    pub config: TritterConfig,
    /// Norm placement and QK-Norm.
    pub architecture: Architecture,
    /// Token embedding `(V, H)` (also the LM head when tied).
    pub embed_tokens: Vec<bf16>,
    /// The decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm `(H,)`.
    pub final_norm: Vec<bf16>,
    /// Untied LM head `(V, H)`.
    pub lm_head: Option<Vec<bf16>>,
    /// Latent projection `(H, H)` (carried for completeness; the engine decodes tokens).
    pub latent_proj: Option<Vec<bf16>>,
    /// The training checkpoint and step it was exported from.
    pub source: SourceInfo,
}

/// One tensor of a checkpoint, borrowed.
#[derive(Debug, Clone, Copy)]
enum TensorData<'a> {
    Ternary(&'a TernaryMatrix),
    Bf16(&'a [bf16]),
}

impl InferenceCheckpoint {
    /// A Tritter checkpoint of `config` with seeded random weights, built directly in the
    /// packed format (no f32 model in between, so a 7B checkpoint takes ~1.7 GB of host
    /// memory and seconds, not 28 GB): codes -1, 0, +1 with probabilities 1/4, 1/2, 1/4
    /// (BitNet b1.58 weights are about half zeros), per-tensor `gamma = 1 / sqrt(k_in / 2)`
    /// (unit-variance outputs for unit-variance inputs), N(0, 0.02) bf16 embeddings, norms
    /// of 1. For benchmarks (`tritter bench`) and memory checks, where only the shapes matter.
    pub fn random(config: &TritterConfig, seed: u64) -> Result<Self> {
        use rayon::prelude::*;
        config.validate()?;
        let cfg = config;
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let ternary = |n_out: usize, k_in: usize, seed: u64| -> Result<TernaryMatrix> {
            let wpr = k_in.div_ceil(16);
            let used = k_in - (wpr - 1) * 16; // codes in a row's last word
            let mut packed = vec![0u32; n_out * wpr];
            packed.par_chunks_mut(wpr).enumerate().for_each(|(r, row)| {
                let mut rng = crate::model::SeededRng::new(
                    seed ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                for (i, w) in row.iter_mut().enumerate() {
                    let x = rng.next_u64() as u32;
                    // A pair 11 (code 3, invalid) becomes 01 (zero).
                    let both = x & (x >> 1) & 0x5555_5555;
                    let mut word = x & !(both << 1);
                    if i + 1 == wpr && used < 16 {
                        let keep = (1u32 << (2 * used)) - 1;
                        word = (word & keep) | (0x5555_5555 & !keep);
                    }
                    *w = word;
                }
            });
            let gamma = (2.0 / k_in as f64).sqrt() as f32;
            Ok(TernaryMatrix::from_packed(
                n_out,
                k_in,
                packed,
                ternary_gemm::TernaryScales::PerTensor(gamma),
            )?)
        };
        let ones = |n: usize| vec![bf16::ONE; n];
        let normal = |n: usize, seed: u64| -> Vec<bf16> {
            crate::model::SeededRng::new(seed)
                .normal_vec(n, 0.02)
                .into_iter()
                .map(bf16::from_f32)
                .collect()
        };
        let (qd, kvd, inter) = (
            cfg.num_heads * d,
            cfg.num_kv_heads * d,
            cfg.intermediate_size,
        );
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let s = seed.wrapping_add(1000 * (l as u64 + 1));
            layers.push(LayerWeights {
                q_proj: ternary(qd, h, s + 1)?,
                k_proj: ternary(kvd, h, s + 2)?,
                v_proj: ternary(kvd, h, s + 3)?,
                o_proj: ternary(h, qd, s + 4)?,
                mlp: TernaryMlp::new(
                    ternary(inter, h, s + 5)?,
                    ternary(inter, h, s + 6)?,
                    ternary(h, inter, s + 7)?,
                )?,
                norms: LayerNorms::Chameleon {
                    attn_norm: ones(h),
                    mlp_norm: ones(h),
                },
                qk_norm: Some(QkNorm {
                    q_norm: ones(d),
                    k_norm: ones(d),
                }),
            });
        }
        let ckpt = InferenceCheckpoint {
            config: cfg.clone(),
            architecture: Architecture::TRITTER,
            embed_tokens: normal(cfg.vocab_size * h, seed),
            layers,
            final_norm: ones(h),
            lm_head: (!cfg.tie_embeddings).then(|| normal(cfg.vocab_size * h, seed + 1)),
            latent_proj: cfg.latent_projection.then(|| normal(h * h, seed + 2)),
            source: SourceInfo::default(),
        };
        ckpt.validate()?;
        Ok(ckpt)
    }

    /// Exports `model`: every BitLinear quantized exactly as its forward pass quantizes it,
    /// everything else rounded to bf16. Fails for a model without quantization
    /// (`quantize_bitlinear: false`), which has no ternary weights to export.
    pub fn from_model(model: &TritterModel, source: SourceInfo) -> Result<Self> {
        let config = model.config().clone();
        if !config.quantize_bitlinear {
            return Err(TritterError::config(
                "quantize_bitlinear",
                false,
                "expected true: the inference engine runs ternary weights, and a full-precision baseline has none to export",
            ));
        }
        let layers = model
            .layers()
            .iter()
            .map(|layer| {
                let t = |lin: &crate::model::BitLinear| -> Result<TernaryMatrix> {
                    Ok(std::sync::Arc::unwrap_or_clone(lin.to_ternary()?))
                };
                let (a, m) = (&layer.attn, &layer.mlp);
                Ok(LayerWeights {
                    q_proj: t(&a.q_proj)?,
                    k_proj: t(&a.k_proj)?,
                    v_proj: t(&a.v_proj)?,
                    o_proj: t(&a.o_proj)?,
                    mlp: TernaryMlp::new(t(&m.gate_proj)?, t(&m.up_proj)?, t(&m.down_proj)?)?,
                    norms: LayerNorms::Chameleon {
                        attn_norm: to_bf16(layer.attn_norm.weight())?,
                        mlp_norm: to_bf16(layer.mlp_norm.weight())?,
                    },
                    qk_norm: Some(QkNorm {
                        q_norm: to_bf16(a.q_norm.weight())?,
                        k_norm: to_bf16(a.k_norm.weight())?,
                    }),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(InferenceCheckpoint {
            architecture: Architecture::TRITTER,
            embed_tokens: to_bf16(model.embedding().weight())?,
            layers,
            final_norm: to_bf16(model.final_norm().weight())?,
            lm_head: model.lm_head().map(to_bf16).transpose()?,
            latent_proj: model.latent_projection().map(to_bf16).transpose()?,
            source,
            config,
        })
    }

    /// Loads a training or model checkpoint (a run directory, a `step-*` directory or a
    /// directory with `model.safetensors` + `config.json`) and exports it in memory.
    pub fn from_trained_checkpoint(path: impl AsRef<Path>) -> Result<Self> {
        let dir = model_checkpoint_dir(path.as_ref())?;
        let model = TritterModel::load(&dir, &Device::Cpu)?;
        let step = dir
            .join(TRAINER_STATE_FILE)
            .is_file()
            .then(|| TrainerState::load(&dir))
            .transpose()?
            .map(|s| s.step);
        Self::from_model(
            &model,
            SourceInfo {
                checkpoint: Some(dir.display().to_string()),
                step,
            },
        )
    }

    /// An inference checkpoint directory (one with `manifest.json`) is loaded; anything
    /// else is taken for a training checkpoint and exported in memory.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.join(MANIFEST_FILE).is_file() {
            Self::load(path)
        } else {
            Self::from_trained_checkpoint(path)
        }
    }

    /// Every tensor by name, in the order of [`expected_tensors`].
    fn tensors(&self) -> Vec<(String, TensorData<'_>)> {
        let mut out = vec![(EMBED.to_string(), TensorData::Bf16(&self.embed_tokens))];
        for (l, layer) in self.layers.iter().enumerate() {
            for (part, m) in TERNARY_PARTS.iter().zip(layer.ternary()) {
                out.push((layer_tensor(l, part), TensorData::Ternary(m)));
            }
            let norms = layer.norms.placement().tensors(&self.config);
            for ((part, _), w) in norms.iter().zip(layer.norms.rows()) {
                out.push((layer_tensor(l, part), TensorData::Bf16(w)));
            }
            if let Some(qk) = &layer.qk_norm {
                for (part, w) in QK_NORM_PARTS.iter().zip([&qk.q_norm, &qk.k_norm]) {
                    out.push((layer_tensor(l, part), TensorData::Bf16(w)));
                }
            }
        }
        out.push((FINAL_NORM.into(), TensorData::Bf16(&self.final_norm)));
        if let Some(w) = &self.lm_head {
            out.push((LM_HEAD.into(), TensorData::Bf16(w)));
        }
        if let Some(w) = &self.latent_proj {
            out.push((LATENT_PROJ.into(), TensorData::Bf16(w)));
        }
        out
    }

    /// Checks the config and that every tensor is present with the shape the config and the
    /// architecture imply (the invariant [`save`](Self::save) and the engine rely on).
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        let what = "inference checkpoint";
        if self.layers.len() != self.config.num_layers {
            return Err(TritterError::ShapeMismatch {
                what: format!("{what} layers"),
                actual: vec![self.layers.len()],
                expected: format!("num_layers = {}", self.config.num_layers),
            });
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let placement = layer.norms.placement();
            if placement != self.architecture.norm_placement {
                return Err(TritterError::argument(
                    "layer norm placement",
                    format!("{placement:?} in layer {l}"),
                    format!(
                        "{:?} (the architecture's)",
                        self.architecture.norm_placement
                    ),
                ));
            }
            if layer.qk_norm.is_some() != self.architecture.qk_norm {
                return Err(TritterError::argument(
                    "layer QK-Norm",
                    format!("present = {} in layer {l}", layer.qk_norm.is_some()),
                    format!(
                        "present = {} (the architecture's)",
                        self.architecture.qk_norm
                    ),
                ));
            }
        }
        let expected = expected_tensors(&self.config, &self.architecture);
        let actual = self.tensors();
        let names: BTreeSet<&str> = actual.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(missing) = expected.iter().find(|s| !names.contains(s.name.as_str())) {
            return Err(TritterError::ShapeMismatch {
                what: format!("{what} tensor {}", missing.name),
                actual: vec![],
                expected: format!("{:?} {:?} (absent)", missing.kind, missing.shape),
            });
        }
        if actual.len() != expected.len() {
            let known: BTreeSet<&str> = expected.iter().map(|s| s.name.as_str()).collect();
            let extra = names.iter().find(|n| !known.contains(*n)).unwrap_or(&"?");
            return Err(TritterError::argument(
                "inference checkpoint tensors",
                format!("{} tensors, {extra} among them", actual.len()),
                format!("the {} tensors of the config (no {extra})", expected.len()),
            ));
        }
        for (spec, (name, data)) in expected.iter().zip(&actual) {
            let (kind, shape) = match data {
                TensorData::Ternary(m) => (TensorKind::Ternary, vec![m.n_out(), m.k_in()]),
                TensorData::Bf16(v) => (TensorKind::Bf16, vec![v.len()]),
            };
            let numel: usize = spec.shape.iter().product();
            let fits = kind == spec.kind
                && match kind {
                    TensorKind::Ternary => shape == spec.shape,
                    TensorKind::Bf16 => shape[0] == numel,
                };
            if !fits {
                return Err(TritterError::ShapeMismatch {
                    what: format!("{what} tensor {name} ({kind:?})"),
                    actual: shape,
                    expected: format!("{:?} {:?}", spec.kind, spec.shape),
                });
            }
        }
        Ok(())
    }

    /// Writes the checkpoint into `dir` (created if missing): `config.json`,
    /// `ternary.safetensors`, `dense.safetensors`, then `manifest.json`, each atomically.
    /// Returns the manifest written.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<Manifest> {
        let dir = dir.as_ref();
        self.validate()?;
        std::fs::create_dir_all(dir).map_err(|e| TritterError::io(dir, e))?;
        let tensors = self.tensors();
        let shapes: BTreeMap<String, Vec<usize>> =
            expected_tensors(&self.config, &self.architecture)
                .into_iter()
                .map(|s| (s.name, s.shape))
                .collect();
        let ternary: Vec<(&str, &TernaryMatrix)> = tensors
            .iter()
            .filter_map(|(n, d)| match d {
                TensorData::Ternary(m) => Some((n.as_str(), *m)),
                TensorData::Bf16(_) => None,
            })
            .collect();
        let ternary_bytes = ternary_to_safetensors(&ternary)?;
        let dense: Vec<(&str, Vec<u8>)> = tensors
            .iter()
            .filter_map(|(n, d)| match d {
                TensorData::Bf16(v) => Some((
                    n.as_str(),
                    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
                )),
                TensorData::Ternary(_) => None,
            })
            .collect();
        let views = dense
            .iter()
            .map(|(n, bytes)| {
                TensorView::new(Dtype::BF16, shapes[*n].clone(), bytes).map(|v| (*n, v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| corrupt(dir.join(DENSE_FILE), e))?;
        let metadata =
            std::collections::HashMap::from([("format".into(), DENSE_FORMAT_TAG.to_string())]);
        let dense_bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| corrupt(dir.join(DENSE_FILE), e))?;
        let config_bytes = self.config.to_json().into_bytes();

        let manifest = Manifest {
            format: INFERENCE_FORMAT.into(),
            version: INFERENCE_FORMAT_VERSION,
            architecture: self.architecture,
            source: self.source.clone(),
            files: [
                (CONFIG_FILE, &config_bytes),
                (TERNARY_FILE, &ternary_bytes),
                (DENSE_FILE, &dense_bytes),
            ]
            .into_iter()
            .map(|(name, bytes)| FileEntry {
                name: name.into(),
                bytes: bytes.len() as u64,
                fnv1a64: file_checksum(bytes),
            })
            .collect(),
            tensors: tensors
                .iter()
                .map(|(name, data)| {
                    let (kind, bytes) = match data {
                        TensorData::Ternary(m) => (
                            TensorKind::Ternary,
                            m.packed_bytes() + 4 * m.scales().as_slice().len(),
                        ),
                        TensorData::Bf16(v) => (TensorKind::Bf16, 2 * v.len()),
                    };
                    TensorEntry {
                        name: name.clone(),
                        file: kind.file().into(),
                        dtype: kind,
                        shape: shapes[name].clone(),
                        bytes: bytes as u64,
                    }
                })
                .collect(),
        };
        write_atomic(&dir.join(CONFIG_FILE), &config_bytes)?;
        write_atomic(&dir.join(TERNARY_FILE), &ternary_bytes)?;
        write_atomic(&dir.join(DENSE_FILE), &dense_bytes)?;
        manifest.save(dir)?;
        sync_dir(dir)?;
        Ok(manifest)
    }

    /// Loads and verifies an inference checkpoint directory (see the module docs for every
    /// check). Never panics on a damaged or mismatched directory.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let manifest = Manifest::load(dir)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let mismatch = |path: &Path, detail: String| TritterError::CheckpointMismatch {
            path: path.to_path_buf(),
            detail,
        };
        let files = [CONFIG_FILE, TERNARY_FILE, DENSE_FILE];
        if let Some(extra) = manifest
            .files
            .iter()
            .find(|f| !files.contains(&f.name.as_str()))
        {
            return Err(mismatch(
                &manifest_path,
                format!("lists file {:?}; expected only {files:?}", extra.name),
            ));
        }
        let mut bytes = BTreeMap::new();
        for name in files {
            let entry = manifest
                .files
                .iter()
                .find(|f| f.name == name)
                .ok_or_else(|| {
                    mismatch(
                        &manifest_path,
                        format!("lists no file {name:?}; expected {files:?}"),
                    )
                })?;
            let path = dir.join(name);
            let data = std::fs::read(&path).map_err(|e| TritterError::io(&path, e))?;
            if data.len() as u64 != entry.bytes {
                return Err(TritterError::CorruptCheckpoint {
                    path,
                    detail: format!(
                        "is {} bytes but the manifest records {}",
                        data.len(),
                        entry.bytes
                    ),
                });
            }
            let sum = file_checksum(&data);
            if sum != entry.fnv1a64 {
                return Err(TritterError::CorruptCheckpoint {
                    path,
                    detail: format!(
                        "FNV-1a 64 checksum is {sum} but the manifest records {} (a damaged file or a torn export)",
                        entry.fnv1a64
                    ),
                });
            }
            bytes.insert(name, data);
        }
        let config_path = dir.join(CONFIG_FILE);
        let config = TritterConfig::from_json(&String::from_utf8_lossy(&bytes[CONFIG_FILE]))
            .map_err(|e| match e {
                TritterError::ConfigJson { source, .. } => TritterError::ConfigJson {
                    path: config_path.clone(),
                    source,
                },
                other => other,
            })?;
        let arch = manifest.architecture;
        let expected = expected_tensors(&config, &arch);
        manifest.check_tensors(&expected, &manifest_path)?;

        let ternary_path = dir.join(TERNARY_FILE);
        let ternary = read_ternary(&bytes[TERNARY_FILE], &expected, &ternary_path)?;
        let dense_path = dir.join(DENSE_FILE);
        let dense = read_dense(&bytes[DENSE_FILE], &expected, &dense_path)?;
        let ckpt = assemble(config, arch, manifest.source, ternary, dense)?;
        ckpt.validate()?;
        Ok(ckpt)
    }
}

/// Builds a checkpoint from tensors by name (each present with the right shape; checked by
/// the caller; the result is not validated, so call [`InferenceCheckpoint::validate`]).
pub(crate) fn assemble(
    config: TritterConfig,
    architecture: Architecture,
    source: SourceInfo,
    mut ternary: BTreeMap<String, TernaryMatrix>,
    mut dense: BTreeMap<String, Vec<bf16>>,
) -> Result<InferenceCheckpoint> {
    let mut take = |name: &str| dense.remove(name).unwrap_or_default();
    let mut layers = Vec::with_capacity(config.num_layers);
    for l in 0..config.num_layers {
        let mut t: Vec<TernaryMatrix> = Vec::with_capacity(TERNARY_PARTS.len());
        for part in TERNARY_PARTS {
            let name = layer_tensor(l, part);
            t.push(ternary.remove(&name).ok_or_else(|| {
                TritterError::argument("ternary tensor", name, "present (checked before)")
            })?);
        }
        let mut t = t.into_iter();
        let mut next = || t.next().expect("seven ternary parts");
        let (q_proj, k_proj, v_proj, o_proj) = (next(), next(), next(), next());
        let mlp = TernaryMlp::new(next(), next(), next())?;
        let placement = architecture.norm_placement;
        let rows = placement
            .tensors(&config)
            .iter()
            .map(|(part, _)| take(&layer_tensor(l, part)))
            .collect();
        let qk_norm = architecture.qk_norm.then(|| QkNorm {
            q_norm: take(&layer_tensor(l, QK_NORM_PARTS[0])),
            k_norm: take(&layer_tensor(l, QK_NORM_PARTS[1])),
        });
        layers.push(LayerWeights {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            mlp,
            norms: LayerNorms::from_rows(placement, rows),
            qk_norm,
        });
    }
    let lm_head = (!config.tie_embeddings).then(|| take(LM_HEAD));
    let latent_proj = config.latent_projection.then(|| take(LATENT_PROJ));
    Ok(InferenceCheckpoint {
        embed_tokens: take(EMBED),
        final_norm: take(FINAL_NORM),
        lm_head,
        latent_proj,
        layers,
        architecture,
        source,
        config,
    })
}

/// The ternary matrices of `expected` from `ternary.safetensors` bytes, checking the format,
/// presence, dims and that the file holds nothing else.
fn read_ternary(
    bytes: &[u8],
    expected: &[TensorSpec],
    path: &Path,
) -> Result<BTreeMap<String, TernaryMatrix>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(path.to_path_buf(), e))?;
    let stored: BTreeSet<String> = st.names().into_iter().map(str::to_string).collect();
    let mut wanted = BTreeSet::new();
    let mut out = BTreeMap::new();
    for spec in expected.iter().filter(|s| s.kind == TensorKind::Ternary) {
        for suffix in ["packed", "scales"] {
            let stored_name = format!("{}.{suffix}", spec.name);
            if !stored.contains(&stored_name) {
                return Err(TritterError::CheckpointMismatch {
                    path: path.to_path_buf(),
                    detail: format!(
                        "tensor {stored_name} is missing (expected the ternary matrix {} of shape {:?})",
                        spec.name, spec.shape
                    ),
                });
            }
            wanted.insert(stored_name);
        }
        let m = ternary_from_safetensors(bytes, &spec.name).map_err(|e| {
            TritterError::CheckpointMismatch {
                path: path.to_path_buf(),
                detail: format!("tensor {}: {e}", spec.name),
            }
        })?;
        let dims = vec![m.n_out(), m.k_in()];
        if dims != spec.shape {
            return Err(TritterError::CheckpointMismatch {
                path: path.to_path_buf(),
                detail: format!(
                    "tensor {} has shape {dims:?} but the config expects {:?}",
                    spec.name, spec.shape
                ),
            });
        }
        out.insert(spec.name.clone(), m);
    }
    if let Some(extra) = stored.difference(&wanted).next() {
        return Err(TritterError::CheckpointMismatch {
            path: path.to_path_buf(),
            detail: format!("tensor {extra} is not part of a model with this config"),
        });
    }
    // ternary_from_safetensors checked the format tag of every matrix; an empty list did not.
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| corrupt(path.to_path_buf(), e))?;
    let tag = header.metadata().as_ref().and_then(|m| m.get("format"));
    if tag.map(String::as_str) != Some(TERNARY_FORMAT_TAG) {
        return Err(TritterError::CheckpointMismatch {
            path: path.to_path_buf(),
            detail: format!("format is {tag:?} but expected {TERNARY_FORMAT_TAG:?}"),
        });
    }
    Ok(out)
}

/// The bf16 tensors of `expected` from `dense.safetensors` bytes, checking the format tag,
/// presence, dtype, shape and that the file holds nothing else.
fn read_dense(
    bytes: &[u8],
    expected: &[TensorSpec],
    path: &Path,
) -> Result<BTreeMap<String, Vec<bf16>>> {
    let mismatch = |detail: String| TritterError::CheckpointMismatch {
        path: path.to_path_buf(),
        detail,
    };
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| corrupt(path.to_path_buf(), e))?;
    let tag = header.metadata().as_ref().and_then(|m| m.get("format"));
    if tag.map(String::as_str) != Some(DENSE_FORMAT_TAG) {
        return Err(mismatch(format!(
            "format is {tag:?} but expected {DENSE_FORMAT_TAG:?}"
        )));
    }
    let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(path.to_path_buf(), e))?;
    let mut out = BTreeMap::new();
    for spec in expected.iter().filter(|s| s.kind == TensorKind::Bf16) {
        let view = st.tensor(&spec.name).map_err(|_| {
            mismatch(format!(
                "tensor {} is missing (expected bf16 of shape {:?})",
                spec.name, spec.shape
            ))
        })?;
        if view.dtype() != Dtype::BF16 {
            return Err(mismatch(format!(
                "tensor {} has dtype {:?} but expected BF16",
                spec.name,
                view.dtype()
            )));
        }
        if view.shape() != spec.shape.as_slice() {
            return Err(mismatch(format!(
                "tensor {} has shape {:?} but the config expects {:?}",
                spec.name,
                view.shape(),
                spec.shape
            )));
        }
        let values = view
            .data()
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
            .collect();
        out.insert(spec.name.clone(), values);
    }
    if let Some(extra) = st.names().into_iter().find(|n| !out.contains_key(*n)) {
        return Err(mismatch(format!(
            "tensor {extra} is not part of a model with this config"
        )));
    }
    Ok(out)
}

/// A tensor as bf16 values (round to nearest even), row-major.
fn to_bf16(t: &Tensor) -> Result<Vec<bf16>> {
    Ok(t.detach()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(bf16::from_f32)
        .collect())
}

fn corrupt(path: PathBuf, e: impl std::fmt::Display) -> TritterError {
    TritterError::CorruptCheckpoint {
        path,
        detail: e.to_string(),
    }
}

/// The FNV-1a 64 checksum of a file's bytes, as the manifest records it (16 hex digits).
pub fn file_checksum(bytes: &[u8]) -> String {
    format!("{:016x}", fnv1a(bytes, FNV_OFFSET))
}

/// `manifest.json` of an inference checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`INFERENCE_FORMAT`].
    pub format: String,
    /// [`INFERENCE_FORMAT_VERSION`].
    pub version: u32,
    /// Norm placement and QK-Norm of the layers.
    pub architecture: Architecture,
    /// The training checkpoint and step exported.
    pub source: SourceInfo,
    /// `config.json`, `ternary.safetensors`, `dense.safetensors`: sizes and checksums.
    pub files: Vec<FileEntry>,
    /// Every tensor, in [`expected_tensors`] order.
    pub tensors: Vec<TensorEntry>,
}

/// One file of an inference checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// File name inside the directory.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// [`file_checksum`] of its bytes.
    pub fnv1a64: String,
}

/// One tensor of an inference checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// Checkpoint name (ternary ones are stored as `{name}.packed` and `{name}.scales`).
    pub name: String,
    /// The file holding it.
    pub file: String,
    /// Ternary or bf16.
    pub dtype: TensorKind,
    /// Logical shape (`(n_out, k_in)` for ternary).
    pub shape: Vec<usize>,
    /// Bytes stored (packed words plus scales for ternary).
    pub bytes: u64,
}

impl Manifest {
    /// Reads `dir/manifest.json` and checks its format tag and version.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join(MANIFEST_FILE);
        let manifest: Manifest = read_json(&path, "manifest")?;
        if manifest.format != INFERENCE_FORMAT {
            return Err(TritterError::CheckpointMismatch {
                path,
                detail: format!(
                    "format is {:?} but expected {INFERENCE_FORMAT:?}",
                    manifest.format
                ),
            });
        }
        if manifest.version != INFERENCE_FORMAT_VERSION {
            return Err(TritterError::CheckpointMismatch {
                path,
                detail: format!(
                    "version is {} but this build reads version {INFERENCE_FORMAT_VERSION}",
                    manifest.version
                ),
            });
        }
        Ok(manifest)
    }

    /// Writes `dir/manifest.json` atomically (pretty JSON).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("a manifest serializes");
        write_atomic(&dir.as_ref().join(MANIFEST_FILE), json.as_bytes())
    }

    /// Checks that the tensor list equals `expected` (names, order-free; kind, file, shape).
    fn check_tensors(&self, expected: &[TensorSpec], path: &Path) -> Result<()> {
        let mismatch = |detail: String| TritterError::CheckpointMismatch {
            path: path.to_path_buf(),
            detail,
        };
        let listed: BTreeMap<&str, &TensorEntry> =
            self.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        for spec in expected {
            let entry = listed.get(spec.name.as_str()).ok_or_else(|| {
                mismatch(format!(
                    "lists no tensor {} (expected {:?} {:?} from config.json)",
                    spec.name, spec.kind, spec.shape
                ))
            })?;
            if entry.dtype != spec.kind
                || entry.shape != spec.shape
                || entry.file != spec.kind.file()
            {
                return Err(mismatch(format!(
                    "tensor {} is {:?} {:?} in {} but config.json implies {:?} {:?} in {}",
                    spec.name,
                    entry.dtype,
                    entry.shape,
                    entry.file,
                    spec.kind,
                    spec.shape,
                    spec.kind.file()
                )));
            }
        }
        if self.tensors.len() != expected.len() {
            let known: BTreeSet<&str> = expected.iter().map(|s| s.name.as_str()).collect();
            let extra = self
                .tensors
                .iter()
                .find(|t| !known.contains(t.name.as_str()))
                .map_or("a duplicate entry", |t| t.name.as_str());
            return Err(mismatch(format!(
                "lists {} tensors but config.json implies {} ({extra} is not one of them)",
                self.tensors.len(),
                expected.len()
            )));
        }
        Ok(())
    }
}
