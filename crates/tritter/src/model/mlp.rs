//! The squared-ReLU GLU MLP.

use candle_core::Tensor;

use super::bitlinear::BitLinear;
use super::init::ParamBuilder;
use crate::config::TritterConfig;
use crate::Result;

/// `down(relu(gate(x))² * up(x))` with BitLinear `gate_proj`, `up_proj` `(I, H)` and
/// `down_proj` `(H, I)`. Squared ReLU gives sparse, non-negative gates that suit ternary
/// weights and int8 activations (the CPU/GPU kernel is `ternary_gemm::TernaryMlp`).
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: BitLinear,
    /// Up projection.
    pub up_proj: BitLinear,
    /// Down projection.
    pub down_proj: BitLinear,
}

impl Mlp {
    /// Creates `gate_proj.weight`, `up_proj.weight`, `down_proj.weight` under `pb`.
    pub fn new(pb: &ParamBuilder, cfg: &TritterConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (std, q) = (cfg.initializer_range, cfg.quantize_bitlinear);
        Ok(Mlp {
            gate_proj: BitLinear::new(&pb.pp("gate_proj"), h, i, std, q)?,
            up_proj: BitLinear::new(&pb.pp("up_proj"), h, i, std, q)?,
            down_proj: BitLinear::new(&pb.pp("down_proj"), i, h, std, q)?,
        })
    }

    /// `x` `(..., H)` -> `(..., H)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.relu()?.sqr()?; // (..., I)
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&(gate * up)?)
    }
}
