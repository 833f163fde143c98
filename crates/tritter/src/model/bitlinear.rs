//! BitLinear (BitNet b1.58): a linear layer whose forward pass uses absmean-ternary weights
//! and per-token int8 activations, trained through full-precision shadow weights with the
//! straight-through estimator (STE).

use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use ternary_gemm::{TernaryMatrix, TernaryScales, ABSMEAN_EPS, ACT_QUANT_EPS, ACT_QUANT_QMAX};

use super::init::ParamBuilder;
use crate::Result;

/// `y = x · Wᵀ` with `W` `(out, in)`, no bias. With quantization on:
///
/// * weights: `gamma = mean|W|`, `Wq = clamp(round(W / (gamma + 1e-5)), -1, 1)`, the forward
///   uses `W + (Wq * gamma - W).detach()`, whose value is `Wq * gamma` and whose gradient
///   flows unchanged to the shadow weight `W` (STE);
/// * activations: per token `s = 127 / max(max|x|, 1e-5)`,
///   `xq = clamp(round(x * s), -128, 127) / s`, also with STE.
///
/// The quantizers run in f32 whatever the model dtype, as the kernels do (DESIGN.md
/// section 4), so this is the oracle for `ternary_gemm::candle_ops::TernaryLinear` and the
/// GPU engine. With quantization off it is a plain linear layer (full-precision baseline).
#[derive(Debug, Clone)]
pub struct BitLinear {
    weight: Tensor,
    in_features: usize,
    out_features: usize,
    quantize: bool,
}

impl BitLinear {
    /// Creates parameter `weight` `(out, in)` ~ N(0, std²) under `pb`.
    pub fn new(
        pb: &ParamBuilder,
        in_features: usize,
        out_features: usize,
        std: f64,
        quantize: bool,
    ) -> Result<Self> {
        let weight = pb.normal("weight", &[out_features, in_features], std)?;
        Ok(BitLinear {
            weight,
            in_features,
            out_features,
            quantize,
        })
    }

    /// Wraps an existing `(out, in)` weight (a `Var`'s tensor to train it).
    pub fn from_weight(weight: Tensor, quantize: bool) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(BitLinear {
            weight,
            in_features,
            out_features,
            quantize,
        })
    }

    /// The shadow weight `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Whether the forward pass quantizes.
    pub fn is_quantized(&self) -> bool {
        self.quantize
    }

    /// The dequantized ternary weight `Wq * gamma` `(out, in)` in f32, detached.
    pub fn dequantized_weight(&self) -> Result<Tensor> {
        let w = self.weight.detach().to_dtype(DType::F32)?;
        Ok(absmean_dequantize(&w)?)
    }

    /// The weight as a packed [`TernaryMatrix`] (per-tensor scale), for the kernels and
    /// the inference engines: exactly the codes and the scale `gamma` that
    /// [`forward`](Self::forward) quantizes to (the same candle ops in f32), so
    /// `dequantize()` equals [`dequantized_weight`](Self::dequantized_weight) bit for bit.
    /// (`ternary_gemm::absmean_quantize` sums in f64 and can differ from candle's f32 mean
    /// in the last bit of `gamma`.)
    pub fn to_ternary(&self) -> Result<Arc<TernaryMatrix>> {
        let w = self.weight.detach().to_dtype(DType::F32)?;
        let (codes, gamma) = absmean_codes(&w)?;
        let values: Vec<i8> = codes
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|c| c as i8)
            .collect();
        Ok(Arc::new(TernaryMatrix::from_values(
            self.out_features,
            self.in_features,
            &values,
            TernaryScales::PerTensor(gamma.to_scalar::<f32>()?),
        )?))
    }

    /// `x` `(..., in)` -> `(..., out)` in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let last = dims.last().copied().unwrap_or(0);
        if last != self.in_features {
            return Err(crate::TritterError::ShapeMismatch {
                what: "BitLinear input".into(),
                actual: dims,
                expected: format!("(..., {})", self.in_features),
            });
        }
        let rows = x.elem_count() / self.in_features.max(1);
        let x2 = x.reshape((rows, self.in_features))?; // (N, in)
        let (xe, we) = if self.quantize {
            let dtype = x.dtype();
            let wf = self.weight.to_dtype(DType::F32)?;
            let wq = absmean_dequantize(&wf.detach())?;
            let w_ste = (&wf + (wq - &wf)?.detach())?.to_dtype(self.weight.dtype())?;
            let xf = x2.to_dtype(DType::F32)?;
            let xq = absmax_fake_quant(&xf.detach())?;
            let x_ste = (&xf + (xq - &xf)?.detach())?.to_dtype(dtype)?;
            (x_ste, w_ste)
        } else {
            (x2, self.weight.clone())
        };
        let y = xe.matmul(&we.t()?)?; // (N, out)
        let mut out_dims = dims;
        *out_dims.last_mut().expect("checked non-empty") = self.out_features;
        Ok(y.reshape(out_dims)?)
    }
}

/// `Wq * gamma` for an f32 weight (per-tensor absmean, DESIGN.md section 4).
fn absmean_dequantize(w: &Tensor) -> candle_core::Result<Tensor> {
    let (codes, gamma) = absmean_codes(w)?;
    codes.broadcast_mul(&gamma)
}

/// The absmean quantizer of an f32 weight `(out, in)`: codes
/// `Wq = clamp(round(W / (gamma + eps)), -1, 1)` `(out, in)` f32 and `gamma = mean|W|` `()`.
/// The one definition behind the forward pass and the packed export.
fn absmean_codes(w: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let gamma = w.abs()?.mean_all()?; // ()
    let denom = (&gamma + f64::from(ABSMEAN_EPS))?;
    let codes = w.broadcast_div(&denom)?.round()?.clamp(-1f32, 1f32)?;
    Ok((codes, gamma))
}

/// Per-row absmax int8 fake quantization of `x` `(N, K)` f32: `clamp(round(x*s)) / s`.
fn absmax_fake_quant(x: &Tensor) -> candle_core::Result<Tensor> {
    let amax = x
        .abs()?
        .max_keepdim(D::Minus1)?
        .clamp(ACT_QUANT_EPS, f32::MAX)?; // (N, 1)
    let s = Tensor::new(ACT_QUANT_QMAX, x.device())?.broadcast_div(&amax)?; // (N, 1)
    x.broadcast_mul(&s)?
        .round()?
        .clamp(-ACT_QUANT_QMAX - 1.0, ACT_QUANT_QMAX)?
        .broadcast_div(&s)
}
