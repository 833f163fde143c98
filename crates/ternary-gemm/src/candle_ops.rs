//! candle integration (feature `candle`): the ternary ops as `candle_core::CustomOp1`, so a
//! candle model calls `x.apply_op1(TernaryLinear::new(w))` the way candle-flash-attn plugs in.
//!
//! CPU forward always; with feature `candle-cuda` (a candle built with CUDA) also
//! `cuda_fwd`, running the crate's kernels on the candle device's stream
//! (`src/candle_cuda.rs`). Our own builds leave that feature off: candle's CUDA build links
//! libcuda at build time (DESIGN.md section 2).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use crate::{
    absmax_quantize_rows, ternary_matmul_a8, ternary_matmul_t, Element, TernaryMatrix, TernaryMlp,
};

/// Contiguous input as f32 (widening bf16/f16 exactly), with its dims.
fn input_f32(storage: &CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<Vec<f32>> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::msg(format!(
            "{op}: input must be contiguous (call .contiguous() first)"
        ))
    })?;
    fn widen<T: Element>(s: &[T]) -> Vec<f32> {
        s.iter().map(|v| v.to_f32()).collect()
    }
    Ok(match storage {
        CpuStorage::F32(v) => v[start..end].to_vec(),
        CpuStorage::BF16(v) => widen(&v[start..end]),
        CpuStorage::F16(v) => widen(&v[start..end]),
        other => {
            return Err(candle_core::Error::msg(format!(
                "{op}: dtype {:?} is not supported; expected f32, bf16 or f16",
                other.dtype()
            )))
        }
    })
}

/// Output storage in the input's dtype.
fn output(values: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(values.into_iter().map(f16::from_f32).collect()),
        _ => CpuStorage::F32(values),
    }
}

/// Applies a row-wise op to a `(..., in_last)` input: checks the last dim (named `what`
/// in the error), widens to f32, runs `f(rows_f32, rows)` and returns `(..., out_last)` in
/// the input's dtype. Empty inputs give empty outputs without calling `f`.
fn map_rows(
    storage: &CpuStorage,
    layout: &Layout,
    op: &str,
    (in_last, what): (usize, &'static str),
    out_last: usize,
    f: impl FnOnce(&[f32], usize) -> crate::Result<Vec<f32>>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let mut dims = layout.dims().to_vec();
    match dims.last() {
        Some(&last) if last == in_last => {}
        last => {
            return Err(candle_core::Error::msg(format!(
                "{op}: input last dim is {last:?} but the weight expects {what} = {in_last}"
            )))
        }
    }
    let rows = layout.shape().elem_count() / in_last.max(1);
    let x = input_f32(storage, layout, op)?;
    let y = if rows == 0 {
        Vec::new()
    } else {
        f(&x, rows).map_err(candle_core::Error::wrap)?
    };
    *dims.last_mut().expect("checked above") = out_last;
    Ok((output(y, storage.dtype()), Shape::from(dims)))
}

/// BitLinear inference: per-token A8 quantization of `x` `(..., k_in)` then the W2A8
/// product, giving `(..., n_out)` in `x`'s dtype. The backward pass is the
/// straight-through estimator for the activations: `dx = dy · (Wq * gamma)`.
#[derive(Debug, Clone)]
pub struct TernaryLinear {
    weight: Arc<TernaryMatrix>,
    #[cfg(feature = "candle-cuda")]
    cache: Arc<crate::candle_cuda::DeviceCache<crate::cuda::TernaryMatrixGpu>>,
}

impl TernaryLinear {
    /// Wraps a ternary weight `(n_out, k_in)`.
    pub fn new(weight: Arc<TernaryMatrix>) -> Self {
        TernaryLinear {
            weight,
            #[cfg(feature = "candle-cuda")]
            cache: Default::default(),
        }
    }
}

impl CustomOp1 for TernaryLinear {
    fn name(&self) -> &'static str {
        "ternary-linear-a8"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.weight;
        map_rows(
            storage,
            layout,
            self.name(),
            (w.k_in(), "k_in"),
            w.n_out(),
            |x, m| ternary_matmul_a8(w, &absmax_quantize_rows(x, m, w.k_in())?),
        )
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(
            TernaryLinearBackward {
                weight: self.weight.clone(),
                #[cfg(feature = "candle-cuda")]
                cache: self.cache.clone(),
            },
        )?))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::candle_cuda::linear_fwd(&self.weight, &self.cache, storage, layout, self.name())
    }
}

/// `dx = dy · (Wq * gamma)` for `dy` `(..., n_out)`, giving `(..., k_in)`: the backward of
/// [`TernaryLinear`] with respect to its input.
#[derive(Debug, Clone)]
pub struct TernaryLinearBackward {
    weight: Arc<TernaryMatrix>,
    #[cfg(feature = "candle-cuda")]
    cache: Arc<crate::candle_cuda::DeviceCache<crate::cuda::TernaryMatrixGpu>>,
}

impl TernaryLinearBackward {
    /// Wraps a ternary weight `(n_out, k_in)`.
    pub fn new(weight: Arc<TernaryMatrix>) -> Self {
        TernaryLinearBackward {
            weight,
            #[cfg(feature = "candle-cuda")]
            cache: Default::default(),
        }
    }
}

impl CustomOp1 for TernaryLinearBackward {
    fn name(&self) -> &'static str {
        "ternary-linear-backward"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.weight;
        map_rows(
            storage,
            layout,
            self.name(),
            (w.n_out(), "n_out"),
            w.k_in(),
            |dy, m| ternary_matmul_t(w, dy, m),
        )
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::candle_cuda::linear_bwd(&self.weight, &self.cache, storage, layout, self.name())
    }
}

/// The squared-ReLU GLU MLP `down(relu(gate(x))^2 * up(x))` on ternary weights with A8
/// activations; `x` `(..., hidden)` -> `(..., hidden)`. Forward only.
#[derive(Debug, Clone)]
pub struct TernaryMlpOp {
    mlp: Arc<TernaryMlp>,
    #[cfg(feature = "candle-cuda")]
    cache: Arc<crate::candle_cuda::DeviceCache<crate::cuda::TernaryMlpGpu>>,
}

impl TernaryMlpOp {
    /// Wraps an MLP block.
    pub fn new(mlp: Arc<TernaryMlp>) -> Self {
        TernaryMlpOp {
            mlp,
            #[cfg(feature = "candle-cuda")]
            cache: Default::default(),
        }
    }
}

impl CustomOp1 for TernaryMlpOp {
    fn name(&self) -> &'static str {
        "ternary-mlp-sqrelu-glu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let hidden = self.mlp.hidden();
        map_rows(
            storage,
            layout,
            self.name(),
            (hidden, "hidden"),
            hidden,
            |x, m| self.mlp.forward(x, m),
        )
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::candle_cuda::mlp_fwd(&self.mlp, &self.cache, storage, layout, self.name())
    }
}
