//! CUDA forward and backward of the candle op (feature `candle-cuda`): for users whose candle
//! is built with CUDA. The kernels run on the candle device's own stream through the `Gpu`
//! that `tritter-kernels-cuda` keeps per stream (`Gpu::for_stream`, shared with the other
//! crates' candle ops), so they order with candle's work without events. The problem's index
//! arrays (cu_seqlens, prefix lengths, document ids) are uploaded once per op and stream
//! ([`ProblemGpu`] in a `PerStream` cache held by the op, rebuilt if `FlashAttn::problem` is
//! changed); outputs are allocated on the candle device.
//!
//! The backward re-runs the forward kernel for the logsumexp (the op returns only the output,
//! so the forward's logsumexp is not kept), then runs [`flash_attn_bwd_cuda`] in
//! [`BwdMode::Atomic`]: about one forward more work than FlashAttention's backward.
//!
//! Our own builds never enable this feature: candle's `cuda` feature links libcuda at build
//! time and compiles candle's kernels (DESIGN.md section 2). It shares cudarc 0.19 with
//! candle 0.11, so buffers pass between them as they are.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use tritter_kernels_cuda::{Gpu, KernelError};

use crate::candle_ops::FlashAttn;
use crate::cuda::{
    flash_attn_bwd_cuda, flash_attn_fwd_cuda, AttnDtype, BwdMode, BwdWorkspace, GradsGpu,
    ProblemGpu,
};
use crate::error::AttnError;
use crate::params::Positions;

/// The dtype error of the CUDA path (f32 and every non-float type).
fn dtype_error(what: &'static str, dtype: DType) -> candle_core::Error {
    candle_core::Error::wrap(AttnError::Dtype {
        what,
        actual: format!("{dtype:?}"),
        expected: "bf16 or f16",
        detail: "the CUDA kernels take 16-bit floats; cast with .to_dtype(DType::BF16), or run \
                 on the CPU, whose reference path also takes f32",
    })
}

/// The `Gpu` on `dev`'s stream and the op's problem uploaded there (uploaded on first use,
/// and again if the op's problem changed since).
fn problem_on(
    op: &FlashAttn,
    dev: &CudaDevice,
) -> candle_core::Result<(Arc<Gpu>, Arc<ProblemGpu>)> {
    op.cache
        .get_or_try_insert_if(
            &dev.cuda_stream(),
            |pb| pb.problem() == &op.problem,
            |gpu| ProblemGpu::new(gpu, op.problem.clone(), Positions::default()),
        )
        .map_err(candle_core::Error::wrap)
}

/// The elements of a contiguous input as one device slice of exactly its length (what the
/// kernels check): the storage itself when the tensor spans all of it, otherwise a copy of
/// its range on `gpu`'s stream (a tensor narrowed along its first dim, say).
fn exact<'a, T: AttnDtype + CudaDType>(
    gpu: &Gpu,
    what: &'static str,
    storage: &'a CudaStorage,
    layout: &Layout,
) -> candle_core::Result<Cow<'a, CudaSlice<T>>> {
    let slice = storage.as_cuda_slice::<T>()?;
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::wrap(AttnError::Layout(format!(
            "{what} has shape {:?} with strides {:?} but the CUDA kernels read it contiguous; \
             call .contiguous() first",
            layout.dims(),
            layout.stride()
        )))
    })?;
    if start == 0 && end == slice.len() {
        return Ok(Cow::Borrowed(slice));
    }
    gpu.stream()
        .clone_dtod(&slice.slice(start..end))
        .map(Cow::Owned)
        .map_err(|e| {
            candle_core::Error::wrap(AttnError::from(KernelError::driver(format!(
                "copying {what}'s elements {start}..{end} out of its storage of {}",
                slice.len()
            ))(e)))
        })
}

/// [`FlashAttn`] forward on CUDA: q, k, v (dims and equal dtypes checked by the caller) in
/// bf16 or f16; returns the output like q. The logsumexp is computed and dropped.
pub(crate) fn attn_fwd(
    op: &FlashAttn,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    match q.0.dtype() {
        DType::BF16 => fwd_typed::<bf16>(op, q, k, v),
        DType::F16 => fwd_typed::<f16>(op, q, k, v),
        other => Err(dtype_error("q", other)),
    }
}

fn fwd_typed<T: AttnDtype + CudaDType>(
    op: &FlashAttn,
    (sq, lq): (&CudaStorage, &Layout),
    (sk, lk): (&CudaStorage, &Layout),
    (sv, lv): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = sq.device();
    let (gpu, pb) = problem_on(op, dev)?;
    let q = exact::<T>(&gpu, "q", sq, lq)?;
    let k = exact::<T>(&gpu, "k", sk, lk)?;
    let v = exact::<T>(&gpu, "v", sv, lv)?;
    let p = pb.problem();
    let mut out = dev.alloc_zeros::<T>(p.q_len())?;
    if p.q_len() > 0 {
        let mut lse = dev.alloc_zeros::<f32>(p.lse_len())?;
        flash_attn_fwd_cuda(&gpu, &pb, &q, &k, &v, &mut out, &mut lse, None)
            .map_err(candle_core::Error::wrap)?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        lq.shape().clone(),
    ))
}

/// The gradients `(dq, dk, dv)` of [`FlashAttn`] on CUDA, like q, k, v, from the forward's
/// inputs, its output `out` and the output's gradient `dout` (any layout: made contiguous
/// here).
pub(crate) fn attn_bwd(
    op: &FlashAttn,
    dev: &CudaDevice,
    [q, k, v, out, dout]: [&Tensor; 5],
) -> candle_core::Result<[Tensor; 3]> {
    let dtype = q.dtype();
    for (what, t) in [
        ("k", k),
        ("v", v),
        ("out", out),
        ("the output's gradient", dout),
    ] {
        if t.dtype() != dtype {
            return Err(candle_core::Error::msg(format!(
                "{}: {what} has dtype {:?} but q has {dtype:?}; expected one dtype",
                op.name(),
                t.dtype()
            )));
        }
    }
    let c = |t: &Tensor| t.detach().contiguous();
    let args = [c(q)?, c(k)?, c(v)?, c(out)?, c(dout)?];
    match dtype {
        DType::BF16 => bwd_typed::<bf16>(op, dev, &args),
        DType::F16 => bwd_typed::<f16>(op, dev, &args),
        other => Err(dtype_error("q", other)),
    }
}

/// A tensor's CUDA storage (the backward's tensors all live on the op's device).
fn cuda_storage<'a>(what: &str, s: &'a Storage) -> candle_core::Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        other => Err(candle_core::Error::wrap(AttnError::Layout(format!(
            "{what} is on {:?} but the backward runs on the CUDA device of q",
            other.device().location()
        )))),
    }
}

fn bwd_typed<T: AttnDtype + CudaDType>(
    op: &FlashAttn,
    dev: &CudaDevice,
    args: &[Tensor; 5],
) -> candle_core::Result<[Tensor; 3]> {
    const NAMES: [&str; 5] = ["q", "k", "v", "out", "dout"];
    let (gpu, pb) = problem_on(op, dev)?;
    let p = pb.problem();
    let mut grads = GradsGpu::<T>::new(&gpu, p).map_err(candle_core::Error::wrap)?;
    if p.q_len() > 0 {
        let locked = args.each_ref().map(|t| t.storage_and_layout());
        let mut slices = Vec::with_capacity(5);
        for (what, (storage, layout)) in NAMES.into_iter().zip(&locked) {
            slices.push(exact::<T>(
                &gpu,
                what,
                cuda_storage(what, storage)?,
                layout,
            )?);
        }
        let [q, k, v, out, dout] = [0, 1, 2, 3, 4].map(|i| &*slices[i]);
        let wrap = candle_core::Error::wrap;
        // The logsumexp, by the forward kernel again (its output is scratch).
        let mut scratch = dev.alloc_zeros::<T>(p.q_len())?;
        let mut lse = dev.alloc_zeros::<f32>(p.lse_len())?;
        flash_attn_fwd_cuda(&gpu, &pb, q, k, v, &mut scratch, &mut lse, None).map_err(wrap)?;
        let mut ws = BwdWorkspace::<T>::new(&gpu, p, false).map_err(wrap)?;
        flash_attn_bwd_cuda(
            &gpu,
            &pb,
            q,
            k,
            v,
            out,
            &lse,
            dout,
            &mut grads,
            &mut ws,
            None,
            BwdMode::Atomic,
        )
        .map_err(wrap)?;
    }
    let tensor = |s: CudaSlice<T>, like: &Tensor| {
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
        Tensor::from_storage(storage, like.shape(), BackpropOp::none(), false)
    };
    let GradsGpu { dq, dk, dv } = grads;
    Ok([
        tensor(dq, &args[0]),
        tensor(dk, &args[1]),
        tensor(dv, &args[2]),
    ])
}
