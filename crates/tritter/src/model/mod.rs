//! The reference Tritter model on candle (CPU, f32 or bf16): the readable definition, the
//! autograd oracle for the GPU engine, and the CPU training path (DESIGN.md section 5).
//!
//! Parameter names (the checkpoint's tensor names, DESIGN.md section 4):
//!
//! | name | shape | |
//! |---|---|---|
//! | `embed_tokens.weight` | `(V, H)` | unified embedding, row 0 = `<pad>` |
//! | `layers.{i}.attn.q_proj.weight` | `(H, H)` | BitLinear |
//! | `layers.{i}.attn.k_proj.weight` | `(Hkv*D, H)` | BitLinear |
//! | `layers.{i}.attn.v_proj.weight` | `(Hkv*D, H)` | BitLinear |
//! | `layers.{i}.attn.o_proj.weight` | `(H, H)` | BitLinear |
//! | `layers.{i}.attn.q_norm.weight` | `(D,)` | QK-Norm |
//! | `layers.{i}.attn.k_norm.weight` | `(D,)` | QK-Norm |
//! | `layers.{i}.attn_norm.weight` | `(H,)` | Chameleon norm_a |
//! | `layers.{i}.mlp.gate_proj.weight` | `(I, H)` | BitLinear |
//! | `layers.{i}.mlp.up_proj.weight` | `(I, H)` | BitLinear |
//! | `layers.{i}.mlp.down_proj.weight` | `(H, I)` | BitLinear |
//! | `layers.{i}.mlp_norm.weight` | `(H,)` | Chameleon norm_f |
//! | `norm.weight` | `(H,)` | final norm |
//! | `lm_head.weight` | `(V, H)` | only when `tie_embeddings` is false |
//! | `latent_proj.weight` | `(H, H)` | only when `latent_projection` is set; identity at init |

mod attention;
mod bitlinear;
mod embedding;
mod init;
mod layer;
mod mask;
mod mlp;
mod norm;
mod rope;

pub use attention::Attention;
pub use bitlinear::BitLinear;
pub use embedding::UnifiedEmbedding;
pub use init::{ParamBuilder, SeededRng};
pub use layer::DecoderLayer;
pub use mask::MaskSpec;
pub use mlp::Mlp;
pub use norm::{rms_norm_row, RmsNorm};
pub use rope::{Rope, RopeTables};

pub(crate) use init::{fnv1a, InitMode, FNV_OFFSET};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::config::TritterConfig;
use crate::{Result, TritterError};

/// The Tritter decoder: unified embedding, `num_layers` [`DecoderLayer`]s, final RMSNorm,
/// LM head (tied to the embedding or a separate full-precision `(V, H)` matrix).
///
/// All parameters live in one `candle_nn::VarMap` ([`varmap`](Self::varmap)), so a
/// `candle_nn::AdamW` over `varmap().all_vars()` trains the model.
pub struct TritterModel {
    config: TritterConfig,
    varmap: VarMap,
    dtype: DType,
    device: Device,
    embed: UnifiedEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Tensor>,
    latent_proj: Option<Tensor>,
    rope: Rope,
    training: bool,
}

impl std::fmt::Debug for TritterModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TritterModel")
            .field("config", &self.config)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .field("training", &self.training)
            .finish_non_exhaustive()
    }
}

impl TritterModel {
    /// A model for `config` with parameters in `dtype` (f32 or bf16) on `device`, drawn
    /// from a seeded normal init (the same `seed` gives the same weights).
    pub fn new(config: &TritterConfig, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        Self::build(config, dtype, device, InitMode::Seeded(seed))
    }

    pub(crate) fn build(
        config: &TritterConfig,
        dtype: DType,
        device: &Device,
        mode: InitMode,
    ) -> Result<Self> {
        config.validate()?;
        check_model_dtype(dtype)?;
        let varmap = VarMap::new();
        let pb = ParamBuilder::with_mode(&varmap, dtype, device, mode);
        let std = config.initializer_range;
        let embed = UnifiedEmbedding::new(
            &pb.pp("embed_tokens"),
            config.vocab_size,
            config.hidden_size,
            std,
        )?;
        let layers = (0..config.num_layers)
            .map(|i| DecoderLayer::new(&pb.pp("layers").pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&pb.pp("norm"), config.hidden_size, config.norm_eps)?;
        let lm_head = if config.tie_embeddings {
            None
        } else {
            Some(pb.pp("lm_head").normal(
                "weight",
                &[config.vocab_size, config.hidden_size],
                std,
            )?)
        };
        let latent_proj = if config.latent_projection {
            Some(
                pb.pp("latent_proj")
                    .identity("weight", config.hidden_size)?,
            )
        } else {
            None
        };
        Ok(TritterModel {
            rope: Rope::new(config.head_dim(), config.rope_theta),
            config: config.clone(),
            varmap,
            dtype,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            latent_proj,
            training: false,
        })
    }

    /// The config.
    pub fn config(&self) -> &TritterConfig {
        &self.config
    }

    /// Every parameter, by its checkpoint name.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The embedding.
    pub fn embedding(&self) -> &UnifiedEmbedding {
        &self.embed
    }

    /// The decoder layers.
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// Parameters actually instantiated (equals `config().param_count()`).
    pub fn param_count(&self) -> u64 {
        self.varmap
            .all_vars()
            .iter()
            .map(|v| v.elem_count() as u64)
            .sum()
    }

    /// Training mode turns dropout on (no effect when `config.dropout == 0`).
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Positions `0..len` for every sequence, `(batch, len)` u32.
    pub fn default_positions(&self, batch: usize, len: usize) -> Result<Tensor> {
        let l = u32::try_from(len).map_err(|_| TritterError::SequenceTooLong {
            len,
            max: self.config.max_position_embeddings,
        })?;
        Ok(Tensor::arange(0u32, l, &self.device)?
            .unsqueeze(0)?
            .repeat((batch, 1))?)
    }

    /// Token embeddings `(B, L, H)` of `input_ids` `(B, L)` u32, after checking every id
    /// against the vocabulary.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let ids = u32_matrix(input_ids, "input_ids")?;
        let vocab = self.config.vocab_size;
        for (b, row) in ids.iter().enumerate() {
            check_token_ids(row, b, vocab)?;
        }
        self.embed.forward(input_ids)
    }

    /// Logits `(B, L, V)` for `input_ids` `(B, L)` u32 at `positions` `(B, L)` u32 under
    /// `mask`: the language-model training scaffold of the embedding-prediction paradigm.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &MaskSpec,
    ) -> Result<Tensor> {
        let embeds = self.embed(input_ids)?;
        let hidden = self.forward_hidden(&embeds, positions, mask)?;
        self.logits(&hidden)
    }

    /// Final hidden states `(B, L, H)` (after the final norm) for input embeddings
    /// `(B, L, H)` in the model dtype: the embedding-prediction entry point (continuous
    /// thought feeds a hidden state back as the next input embedding). Rejects NaN/Inf.
    pub fn forward_embeddings(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        mask: &MaskSpec,
    ) -> Result<Tensor> {
        let dims = embeds.dims().to_vec();
        if dims.len() != 3 || dims[2] != self.config.hidden_size {
            return Err(TritterError::ShapeMismatch {
                what: "embeds".into(),
                actual: dims,
                expected: format!("(B, L, {})", self.config.hidden_size),
            });
        }
        if embeds.dtype() != self.dtype {
            return Err(TritterError::DTypeMismatch {
                what: "embeds".into(),
                actual: embeds.dtype(),
                expected: format!("the model dtype {:?}", self.dtype),
            });
        }
        let values = embeds
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(TritterError::NonFinite {
                what: "embeds".into(),
                index: i,
                value: values[i].to_string(),
            });
        }
        self.forward_hidden(embeds, positions, mask)
    }

    /// Logits `(B, L, V)` of hidden states `(B, L, H)`: `h · Eᵀ` (tied) or `h · Wᵀ`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(self.embed.weight());
        let (b, l, h) = hidden.dims3()?;
        let logits = hidden.reshape((b * l, h))?.matmul(&head.t()?)?;
        Ok(logits.reshape((b, l, self.config.vocab_size))?)
    }

    /// The embedding a final hidden state stands for, `(B, L, H)` -> `(B, L, H)`: the hidden
    /// state itself, or `h · Pᵀ` with `P = latent_proj.weight` when the config sets
    /// `latent_projection`. It is the next input embedding of a continuous thought and the
    /// predicted next-token embedding of the embedding-prediction loss ([`crate::paradigm`]).
    pub fn latent_embedding(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.latent_proj {
            None => Ok(hidden.clone()),
            Some(p) => {
                let (b, l, h) = hidden.dims3()?;
                Ok(hidden
                    .reshape((b * l, h))?
                    .matmul(&p.t()?)?
                    .reshape((b, l, h))?)
            }
        }
    }

    /// Final hidden states `(B, L, H)` of input embeddings `(B, L, H)` without the checks of
    /// [`forward_embeddings`](Self::forward_embeddings) (callers feed embeddings the model
    /// made itself).
    pub(crate) fn forward_hidden(
        &self,
        x: &Tensor,
        positions: &Tensor,
        mask: &MaskSpec,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (rope, bias) = self.layer_context(b, l, positions, mask)?;
        self.run_layers(x, &rope, &bias)
    }

    /// Every layer and the final norm over input embeddings `x` `(B, L, H)` with the
    /// [`layer_context`](Self::layer_context) of the batch: final hidden states `(B, L, H)`.
    pub(crate) fn run_layers(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        bias: &Tensor,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.layers {
            h = layer.forward(&h, rope, bias, self.training)?;
        }
        self.norm.forward(&h)
    }

    /// The untied LM head `(V, H)`, or `None` when the embedding is tied.
    pub fn lm_head(&self) -> Option<&Tensor> {
        self.lm_head.as_ref()
    }

    /// The latent projection `(H, H)` (`None` unless the config sets `latent_projection`).
    pub fn latent_projection(&self) -> Option<&Tensor> {
        self.latent_proj.as_ref()
    }

    /// The final RMSNorm (applied after the last layer, before the LM head).
    pub fn final_norm(&self) -> &RmsNorm {
        &self.norm
    }

    /// Whether training mode (dropout) is on.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// What every layer of a `(b, l)` batch needs, after the checks of
    /// [`forward`](Self::forward): RoPE tables for `positions` `(b, l)` u32 and the additive
    /// mask `(b, 1, l, l)` of `mask`. For callers that run the layers one at a time (the
    /// trainer's gradient checkpointing).
    pub fn layer_context(
        &self,
        b: usize,
        l: usize,
        positions: &Tensor,
        mask: &MaskSpec,
    ) -> Result<(RopeTables, Tensor)> {
        if l > self.config.max_position_embeddings {
            return Err(TritterError::SequenceTooLong {
                len: l,
                max: self.config.max_position_embeddings,
            });
        }
        if b == 0 || l == 0 {
            return Err(TritterError::ShapeMismatch {
                what: "input".into(),
                actual: vec![b, l],
                expected: "(B, L) with B >= 1 and L >= 1".into(),
            });
        }
        let pos = u32_matrix(positions, "positions")?;
        if pos.len() != b || pos[0].len() != l {
            return Err(TritterError::ShapeMismatch {
                what: "positions".into(),
                actual: positions.dims().to_vec(),
                expected: format!("({b}, {l}) like the input"),
            });
        }
        let max = self.config.max_position_embeddings;
        for (bi, row) in pos.iter().enumerate() {
            if let Some((i, &p)) = row.iter().enumerate().find(|(_, &p)| p as usize >= max) {
                return Err(TritterError::PositionOutOfRange {
                    position: p,
                    batch: bi,
                    index: i,
                    max,
                });
            }
        }
        let bias = mask.to_bias(b, l, &self.device)?;
        let rope = self.rope.tables(&pos, self.dtype, &self.device)?;
        Ok((rope, bias))
    }
}

/// The model dtypes the reference supports.
pub(crate) fn check_model_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 => Ok(()),
        other => Err(TritterError::DTypeMismatch {
            what: "model parameters".into(),
            actual: other,
            expected: "f32 or bf16".into(),
        }),
    }
}

/// A `(B, L)` u32 tensor as rows.
fn u32_matrix(t: &Tensor, what: &str) -> Result<Vec<Vec<u32>>> {
    if t.dtype() != DType::U32 {
        return Err(TritterError::DTypeMismatch {
            what: what.into(),
            actual: t.dtype(),
            expected: "u32 (convert with .to_dtype(DType::U32))".into(),
        });
    }
    if t.rank() != 2 {
        return Err(TritterError::ShapeMismatch {
            what: what.into(),
            actual: t.dims().to_vec(),
            expected: "(B, L)".into(),
        });
    }
    Ok(t.to_vec2::<u32>()?)
}

/// Fails with [`TritterError::TokenOutOfRange`] (naming the id, its row `batch`, its position
/// and the vocabulary size) on the first id of `row` that is `>= vocab_size`. Shared by the
/// reference model and the inference engine, so both reject the same inputs the same way.
pub(crate) fn check_token_ids(row: &[u32], batch: usize, vocab_size: usize) -> Result<()> {
    match row
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= vocab_size)
    {
        Some((position, &id)) => Err(TritterError::TokenOutOfRange {
            id,
            batch,
            position,
            vocab_size,
        }),
        None => Ok(()),
    }
}
