//! One decoder layer with Chameleon norm placement.

use candle_core::Tensor;

use super::attention::Attention;
use super::init::ParamBuilder;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::rope::RopeTables;
use crate::config::TritterConfig;
use crate::Result;

/// `h = x + norm_a(attn(x))`, `out = h + norm_f(mlp(h))` (Chameleon: the norms sit on the
/// branch outputs, which bounds what each branch adds to the residual stream and, with
/// QK-Norm, keeps training stable). Parameters: `attn.*`, `attn_norm.weight` (norm_a),
/// `mlp.*`, `mlp_norm.weight` (norm_f).
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// Attention block.
    pub attn: Attention,
    /// norm_a, over H.
    pub attn_norm: RmsNorm,
    /// MLP block.
    pub mlp: Mlp,
    /// norm_f, over H.
    pub mlp_norm: RmsNorm,
    dropout: f32,
}

impl DecoderLayer {
    /// Creates the layer's parameters under `pb`.
    pub fn new(pb: &ParamBuilder, cfg: &TritterConfig) -> Result<Self> {
        Ok(DecoderLayer {
            attn: Attention::new(&pb.pp("attn"), cfg)?,
            attn_norm: RmsNorm::new(&pb.pp("attn_norm"), cfg.hidden_size, cfg.norm_eps)?,
            mlp: Mlp::new(&pb.pp("mlp"), cfg)?,
            mlp_norm: RmsNorm::new(&pb.pp("mlp_norm"), cfg.hidden_size, cfg.norm_eps)?,
            dropout: cfg.dropout,
        })
    }

    /// `x` `(B, L, H)` -> `(B, L, H)`; dropout on both branches when `train` is set.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        bias: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let a = self.attn_norm.forward(&self.attn.forward(x, rope, bias)?)?;
        let h = (x + self.branch_dropout(a, train)?)?;
        let m = self.mlp_norm.forward(&self.mlp.forward(&h)?)?;
        Ok((&h + self.branch_dropout(m, train)?)?)
    }

    fn branch_dropout(&self, x: Tensor, train: bool) -> Result<Tensor> {
        if train && self.dropout > 0.0 {
            Ok(candle_nn::ops::dropout(&x, self.dropout)?)
        } else {
            Ok(x)
        }
    }
}
