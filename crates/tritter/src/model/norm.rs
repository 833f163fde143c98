//! RMSNorm with a learned per-channel weight.

use candle_core::{DType, Tensor, D};

use super::init::ParamBuilder;
use crate::Result;

/// `y = x / sqrt(mean(x², last dim) + eps) * weight`, computed in f32 and returned in `x`'s
/// dtype. Used for the Chameleon branch norms (over H) and QK-Norm (over D). Written with
/// plain tensor ops so candle's autograd differentiates it.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Creates parameter `weight` `(dim,)`, initialized to ones.
    pub fn new(pb: &ParamBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: pb.constant("weight", &[dim], 1.0)?,
            eps,
        })
    }

    /// Wraps an existing `(dim,)` weight.
    pub fn from_weight(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    /// The learned scale `(dim,)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `x` `(..., dim)` -> `(..., dim)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?; // (..., 1)
        let y = xf.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        let y = y.broadcast_mul(&self.weight.to_dtype(DType::F32)?)?;
        Ok(y.to_dtype(dtype)?)
    }
}

/// [`RmsNorm::forward`] on one row of plain f32 values (the CPU engine's path):
/// `out = x / sqrt(mean(x²) + eps) * weight`, `x`, `weight`, `out` all `(dim,)`. Same
/// operations in the same precision as the tensor version; only the order of the sum of
/// squares may differ.
pub fn rms_norm_row(x: &[f32], weight: &[f32], eps: f64, out: &mut [f32]) {
    // candle's mean is `sum * f32(1 / n)`, and `+ eps` an affine op in f32.
    let ms = x.iter().map(|v| v * v).sum::<f32>() * (1.0 / x.len().max(1) as f64) as f32;
    let r = (ms + eps as f32).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v / r * w;
    }
}
