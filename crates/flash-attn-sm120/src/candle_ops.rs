//! candle integration (feature `candle`): attention as a `candle_core::CustomOp3`, so a candle
//! model calls `q.apply_op3(&k, &v, FlashAttn::new(problem))` the way candle-flash-attn plugs
//! in, and candle's autograd flows through it.
//!
//! CPU forward and backward run the crate's reference ([`attention_fwd_ref`],
//! [`attention_bwd_ref`]) in f32 on widened inputs; the result comes back in q's dtype. With
//! feature `candle-cuda` (a candle built with CUDA) the op also has `cuda_fwd`, and its
//! backward on a CUDA device runs `flash_attn_bwd_cuda`: both launch the crate's kernels on
//! the candle device's stream, bf16 or f16 only (`src/candle_cuda.rs`). Our own builds leave
//! that feature off: candle's CUDA build links libcuda at build time (DESIGN.md section 2).
//!
//! The fused QK-Norm + RoPE prologue is not part of this op: apply the norms and RoPE as
//! candle ops before it, or use the plain API ([`attention_bwd_ref`] with a
//! [`Prologue`](crate::Prologue)) for the prologue's weight gradients.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use crate::params::{Problem, Seqs};
use crate::reference::{attention_bwd_ref, attention_fwd_ref};

/// Attention over the sequences, heads and mask of a [`Problem`] as a candle op with a
/// backward pass.
///
/// Inputs: q `(B, Lq, Hq, D)` and k, v `(B, Lk, Hkv, D)` for a fixed batch, or q
/// `(total_q, Hq, D)` and k, v `(total_k, Hkv, D)` for a varlen one; contiguous, all f32,
/// all bf16 or all f16 (bf16 or f16 on CUDA). Output like q, in q's dtype. The logsumexp is
/// not returned (the backward recomputes it); call [`attention_fwd_ref`] for it.
///
/// Built with [`FlashAttn::new`] (non-exhaustive: with `candle-cuda` it also holds the
/// problem's device arrays per stream, shared by its clones).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FlashAttn {
    /// The attention problem the tensors must match.
    pub problem: Problem,
    /// The problem's index arrays on each CUDA stream the op has run on.
    #[cfg(feature = "candle-cuda")]
    pub(crate) cache: std::sync::Arc<tritter_kernels_cuda::PerStream<crate::cuda::ProblemGpu>>,
}

impl FlashAttn {
    /// The op for `problem`.
    pub fn new(problem: Problem) -> Self {
        FlashAttn {
            problem,
            #[cfg(feature = "candle-cuda")]
            cache: Default::default(),
        }
    }

    /// Expected dims of q and of k/v: `(B, Lq, Hq, D)` / `(B, Lk, Hkv, D)` for a fixed batch,
    /// `(total_q, Hq, D)` / `(total_k, Hkv, D)` for a varlen one.
    pub fn expected_dims(&self) -> (Vec<usize>, Vec<usize>) {
        let h = &self.problem.heads;
        match &self.problem.seqs {
            Seqs::Fixed { batch, lq, lk } => (
                vec![*batch, *lq, h.q, h.dim],
                vec![*batch, *lk, h.kv, h.dim],
            ),
            seqs @ Seqs::Varlen { .. } => (
                vec![seqs.total_q(), h.q, h.dim],
                vec![seqs.total_k(), h.kv, h.dim],
            ),
        }
    }

    /// Checks one argument's dims against the problem, naming both.
    fn check_dims(
        &self,
        what: &str,
        dims: &[usize],
        expected: &[usize],
    ) -> candle_core::Result<()> {
        if dims == expected {
            return Ok(());
        }
        let layout = match self.problem.seqs {
            Seqs::Fixed { .. } => "fixed batch: q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D)",
            Seqs::Varlen { .. } => "varlen: q (total_q, Hq, D), k/v (total_k, Hkv, D)",
        };
        Err(candle_core::Error::msg(format!(
            "{}: {what} has shape {dims:?} but the problem expects {expected:?} ({layout})",
            self.name()
        )))
    }

    /// Checks the problem, the dims of q, k, v (`layouts`) and that k and v have q's dtype
    /// (`dtypes`), before either device's forward.
    fn check_inputs(&self, layouts: [&Layout; 3], dtypes: [DType; 3]) -> candle_core::Result<()> {
        self.problem.validate().map_err(candle_core::Error::wrap)?;
        let (q_dims, kv_dims) = self.expected_dims();
        self.check_dims("q", layouts[0].dims(), &q_dims)?;
        self.check_dims("k", layouts[1].dims(), &kv_dims)?;
        self.check_dims("v", layouts[2].dims(), &kv_dims)?;
        let dtype = dtypes[0];
        for (what, d) in [("k", dtypes[1]), ("v", dtypes[2])] {
            if d != dtype {
                return Err(candle_core::Error::msg(format!(
                    "{}: {what} has dtype {d:?} but q has {dtype:?}; expected one dtype",
                    self.name()
                )));
            }
        }
        Ok(())
    }
}

/// Contiguous input as f32 (widening bf16/f16 exactly).
fn input_f32(
    storage: &CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<Vec<f32>> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::msg(format!(
            "{op}: {what} must be contiguous (call .contiguous() first)"
        ))
    })?;
    Ok(match storage {
        CpuStorage::F32(v) => v[start..end].to_vec(),
        CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        other => {
            return Err(candle_core::Error::msg(format!(
                "{op}: {what} has dtype {:?} but expected f32, bf16 or f16",
                other.dtype()
            )))
        }
    })
}

/// Output storage in `dtype` (f32, bf16 or f16).
fn output(values: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(values.into_iter().map(f16::from_f32).collect()),
        _ => CpuStorage::F32(values),
    }
}

/// A tensor's values as f32 on the host, whatever its device, dtype or layout.
fn host_f32(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.detach()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// `values` shaped and typed like `like`, on its device.
fn like(values: Vec<f32>, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(values, like.shape(), like.device())?.to_dtype(like.dtype())
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "flash-attn-sm120"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.check_inputs([l1, l2, l3], [s1.dtype(), s2.dtype(), s3.dtype()])?;
        let dtype = s1.dtype();
        let q = input_f32(s1, l1, self.name(), "q")?;
        let k = input_f32(s2, l2, self.name(), "k")?;
        let v = input_f32(s3, l3, self.name(), "v")?;
        let res =
            attention_fwd_ref(&self.problem, &q, &k, &v, None).map_err(candle_core::Error::wrap)?;
        Ok((output(res.out, dtype), l1.shape().clone()))
    }

    /// The CUDA forward (feature `candle-cuda`): bf16 or f16 q, k, v on the candle device's
    /// stream (see `src/candle_cuda.rs`).
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.check_inputs([l1, l2, l3], [s1.dtype(), s2.dtype(), s3.dtype()])?;
        crate::candle_cuda::attn_fwd(self, (s1, l1), (s2, l2), (s3, l3))
    }

    /// dq, dk, dv: on a CUDA device (feature `candle-cuda`) through `flash_attn_bwd_cuda`
    /// after a forward that recomputes the logsumexp; elsewhere through
    /// [`attention_bwd_ref`] on the host (the logsumexp is recomputed).
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "candle-cuda")]
        if let candle_core::Device::Cuda(dev) = q.device() {
            let [dq, dk, dv] = crate::candle_cuda::attn_bwd(self, dev, [q, k, v, res, grad_res])?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let g = attention_bwd_ref(
            &self.problem,
            &host_f32(q)?,
            &host_f32(k)?,
            &host_f32(v)?,
            None,
            &host_f32(res)?,
            None,
            &host_f32(grad_res)?,
        )
        .map_err(candle_core::Error::wrap)?;
        Ok((
            Some(like(g.dq, q)?),
            Some(like(g.dk, k)?),
            Some(like(g.dv, v)?),
        ))
    }
}
