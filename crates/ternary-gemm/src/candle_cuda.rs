//! CUDA forwards of the candle ops (feature `candle-cuda`): for users whose candle is built
//! with CUDA. The kernels run on the candle device's own stream through the `Gpu` that
//! `tritter-kernels-cuda` keeps per stream (`Gpu::for_stream`, shared with the other crates'
//! candle ops), so they order with candle's work without events; weights are uploaded once
//! per stream and kept by the op (`PerStream`).
//!
//! Our own builds never enable this feature: candle's `cuda` feature links libcuda at build
//! time and compiles candle's kernels (DESIGN.md section 2). It shares cudarc 0.19 with
//! candle 0.11, so buffers pass between them as they are.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape};
use half::{bf16, f16};
use tritter_kernels_cuda::{Gpu, KernelError, PerStream};

use crate::cuda::{
    ternary_matmul_a8_cuda, ternary_matmul_t_cuda, ternary_mlp_cuda, GemvActivations,
    GemvWorkspace, MlpWorkspace, TernaryMatrixGpu, TernaryMlpGpu,
};

/// Device copies of an op's weights, one per candle stream the op has run on, each beside
/// the stream's process-wide `Gpu` (`Gpu::for_stream`, shared with the other crates' candle
/// ops, so modules load once per device).
pub(crate) type DeviceCache<T> = PerStream<T>;

/// The `Gpu` on `dev`'s stream and `cache`'s weights there, uploading them on first use.
fn cached<T>(
    cache: &DeviceCache<T>,
    dev: &CudaDevice,
    upload: impl FnOnce(&Gpu) -> crate::Result<T>,
) -> candle_core::Result<(Arc<Gpu>, Arc<T>)> {
    cache
        .get_or_try_insert(&dev.cuda_stream(), upload)
        .map_err(candle_core::Error::wrap)
}

/// The contiguous input `(rows, last)` with `last == expected` (named `what`), as
/// `(rows, start, end)` element offsets.
fn rows_of(
    layout: &Layout,
    op: &str,
    (expected, what): (usize, &str),
) -> candle_core::Result<(usize, usize, usize)> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::msg(format!(
            "{op}: input must be contiguous (call .contiguous() first)"
        ))
    })?;
    match layout.dims().last() {
        Some(&last) if last == expected => Ok(((end - start) / expected.max(1), start, end)),
        last => Err(candle_core::Error::msg(format!(
            "{op}: input last dim is {last:?} but the weight expects {what} = {expected}"
        ))),
    }
}

/// Fails unless the input is f32, bf16 or f16.
fn check_dtype(storage: &CudaStorage, op: &str) -> candle_core::Result<()> {
    match storage.dtype() {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        other => Err(candle_core::Error::msg(format!(
            "{op}: dtype {other:?} is not supported; expected f32, bf16 or f16"
        ))),
    }
}

/// Calls `$f(view)` with the storage's elements `$range` as a typed `CudaView` (f32, bf16
/// or f16; `check_dtype` first).
macro_rules! with_typed_view {
    ($storage:expr, $range:expr, |$v:ident| $body:expr) => {
        match $storage.dtype() {
            DType::F32 => {
                let $v = $storage.as_cuda_slice::<f32>()?.slice($range);
                $body
            }
            DType::BF16 => {
                let $v = $storage.as_cuda_slice::<bf16>()?.slice($range);
                $body
            }
            _ => {
                let $v = $storage.as_cuda_slice::<f16>()?.slice($range);
                $body
            }
        }
    };
}

/// A zeroed f32 device buffer of `n` elements on `gpu`'s stream (an op's output).
fn alloc_f32(gpu: &Gpu, n: usize) -> candle_core::Result<cudarc::driver::CudaSlice<f32>> {
    gpu.stream()
        .alloc_zeros::<f32>(n)
        .map_err(|e| candle_core::Error::wrap(KernelError::driver("allocating an op output")(e)))
}

/// `(rows, out_last)` f32 device result as storage in `dtype`, with the input's leading dims.
fn output(
    y: cudarc::driver::CudaSlice<f32>,
    dev: &CudaDevice,
    layout: &Layout,
    out_last: usize,
    dtype: DType,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let mut dims = layout.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out_last;
    }
    let shape = Shape::from(dims);
    let out = CudaStorage::wrap_cuda_slice(y, dev.clone());
    let out = if dtype == DType::F32 {
        out
    } else {
        out.to_dtype(&Layout::contiguous(&shape), dtype)?
    };
    Ok((out, shape))
}

/// [`TernaryLinear`](crate::candle_ops::TernaryLinear) on CUDA: A8 quantization into the
/// GEMV layout, then the W2A8 GEMV/GEMM; NaN/Inf input rows give NaN output rows.
pub(crate) fn linear_fwd(
    w: &crate::TernaryMatrix,
    cache: &DeviceCache<TernaryMatrixGpu>,
    storage: &CudaStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (rows, start, end) = rows_of(layout, op, (w.k_in(), "k_in"))?;
    check_dtype(storage, op)?;
    let dev = storage.device();
    let (gpu, wg) = cached(cache, dev, |gpu| TernaryMatrixGpu::upload(gpu, w))?;
    let mut acts = GemvActivations::new(&gpu, rows, w.k_in()).map_err(candle_core::Error::wrap)?;
    with_typed_view!(storage, start..end, |x| acts
        .quantize_from(&gpu, &x)
        .map_err(candle_core::Error::wrap)?);
    let mut ws = GemvWorkspace::new(&gpu, w.n_out()).map_err(candle_core::Error::wrap)?;
    let mut y = alloc_f32(&gpu, rows * w.n_out())?;
    if rows > 0 {
        ternary_matmul_a8_cuda(&gpu, &wg, &acts, &mut y.as_view_mut(), &mut ws)
            .map_err(candle_core::Error::wrap)?;
    }
    output(y, dev, layout, w.n_out(), storage.dtype())
}

/// [`TernaryLinearBackward`](crate::candle_ops::TernaryLinearBackward) on CUDA:
/// `dx = dy · (Wq * gamma)` with dy rounded to bf16 (the kernel's operand type) and f32
/// accumulation.
pub(crate) fn linear_bwd(
    w: &crate::TernaryMatrix,
    cache: &DeviceCache<TernaryMatrixGpu>,
    storage: &CudaStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (rows, start, end) = rows_of(layout, op, (w.n_out(), "n_out"))?;
    let dev = storage.device();
    let (gpu, wg) = cached(cache, dev, |gpu| TernaryMatrixGpu::upload(gpu, w))?;
    let dy_bf16 = if storage.dtype() == DType::BF16 {
        None
    } else {
        Some(storage.to_dtype(layout, DType::BF16)?)
    };
    let (dy_store, s, e) = match &dy_bf16 {
        Some(c) => (c, 0, end - start),
        None => (storage, start, end),
    };
    let dy = dy_store.as_cuda_slice::<bf16>()?.slice(s..e);
    let mut dx = alloc_f32(&gpu, rows * w.k_in())?;
    ternary_matmul_t_cuda(&gpu, &wg, &dy, rows, &mut dx.as_view_mut())
        .map_err(candle_core::Error::wrap)?;
    output(dx, dev, layout, w.k_in(), storage.dtype())
}

/// [`TernaryMlpOp`](crate::candle_ops::TernaryMlpOp) on CUDA: the fused squared-ReLU GLU
/// MLP (`ternary_mlp_cuda`), bit-exact with the CPU forward for f32 inputs.
pub(crate) fn mlp_fwd(
    mlp: &crate::TernaryMlp,
    cache: &DeviceCache<TernaryMlpGpu>,
    storage: &CudaStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let hidden = mlp.hidden();
    let (rows, start, end) = rows_of(layout, op, (hidden, "hidden"))?;
    check_dtype(storage, op)?;
    let dev = storage.device();
    let (gpu, mg) = cached(cache, dev, |gpu| TernaryMlpGpu::upload(gpu, mlp))?;
    let mut ws = MlpWorkspace::new(&gpu, &mg, rows).map_err(candle_core::Error::wrap)?;
    let mut y = alloc_f32(&gpu, rows * hidden)?;
    with_typed_view!(storage, start..end, |x| ternary_mlp_cuda(
        &gpu,
        &mg,
        &x,
        &mut y.as_view_mut(),
        &mut ws
    )
    .map_err(candle_core::Error::wrap)?);
    output(y, dev, layout, hidden, storage.dtype())
}
