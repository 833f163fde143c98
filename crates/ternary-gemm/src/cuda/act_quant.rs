//! GPU per-token absmax int8 quantization; kernel `kernels-cuda/kernels/act_quant.cu`.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};
use tritter_kernels_cuda::{images, Gpu, KernelError};

use crate::act_quant::check_shape;
use crate::{Element, QuantizedActivations, Result, TernaryError};

/// Threads per CTA of `act_quant_*` (one CTA per row); must match `kThreads` in the kernel.
const THREADS: u32 = 256;

/// An activation type with a GPU quantization kernel.
pub trait DeviceActivation: Element + DeviceRepr {
    /// `extern "C"` name of the kernel instance for this type.
    const ACT_QUANT_KERNEL: &'static str;
}

impl DeviceActivation for f32 {
    const ACT_QUANT_KERNEL: &'static str = "act_quant_f32";
}
impl DeviceActivation for bf16 {
    const ACT_QUANT_KERNEL: &'static str = "act_quant_bf16";
}
impl DeviceActivation for f16 {
    const ACT_QUANT_KERNEL: &'static str = "act_quant_f16";
}

/// Device-resident int8 activations: `codes` `(rows, cols)` i8, `scales` `(rows,)` f32, and
/// the count of rows that held NaN/Inf (their scales are NaN).
#[derive(Debug)]
pub struct QuantizedActivationsGpu {
    /// Rows (tokens), M.
    pub rows: usize,
    /// Columns (features), K.
    pub cols: usize,
    /// `(rows, cols)` codes.
    pub codes: CudaSlice<i8>,
    /// `(rows,)` scales.
    pub scales: CudaSlice<f32>,
    /// `(1,)` number of rows that held a non-finite value.
    pub nonfinite_rows: CudaSlice<u32>,
}

impl QuantizedActivationsGpu {
    /// Synchronizes the stream and fails if any input row held NaN or Inf.
    ///
    /// Kept separate from the launch so a pipeline can check once per step instead of
    /// stalling the stream after every quantization.
    pub fn check_finite(&self, gpu: &Gpu) -> Result<()> {
        let bad = gpu
            .stream()
            .clone_dtoh(&self.nonfinite_rows)
            .map_err(KernelError::driver("reading the non-finite row count"))?;
        match bad[0] {
            0 => Ok(()),
            rows => Err(TernaryError::NonFiniteRows {
                what: "x",
                rows,
                total: self.rows,
            }),
        }
    }

    /// Copies to the host after [`check_finite`](Self::check_finite).
    pub fn to_host(&self, gpu: &Gpu) -> Result<QuantizedActivations> {
        self.check_finite(gpu)?;
        let stream = gpu.stream();
        Ok(QuantizedActivations {
            rows: self.rows,
            cols: self.cols,
            codes: stream
                .clone_dtoh(&self.codes)
                .map_err(KernelError::driver("copying codes to host"))?,
            scales: stream
                .clone_dtoh(&self.scales)
                .map_err(KernelError::driver("copying scales to host"))?,
        })
    }
}

/// Quantizes `x` `(rows, cols)` into newly allocated device buffers; asynchronous on
/// `gpu.stream()`. Call [`QuantizedActivationsGpu::check_finite`] before trusting scales.
pub fn absmax_quantize_rows_cuda<T: DeviceActivation>(
    gpu: &Gpu,
    x: &CudaView<'_, T>,
    rows: usize,
    cols: usize,
) -> Result<QuantizedActivationsGpu> {
    check_shape("x", x.len(), rows, cols)?;
    let stream = gpu.stream();
    let alloc = |what: &str| KernelError::driver(format!("allocating {what}"));
    // SAFETY: every element of codes and scales is written by the kernel before any read
    // (one CTA per row writes all `cols` codes and the row's scale, on every path).
    let mut codes = unsafe { stream.alloc::<i8>(rows * cols) }.map_err(alloc("codes"))?;
    let mut scales = unsafe { stream.alloc::<f32>(rows) }.map_err(alloc("scales"))?;
    let mut nonfinite_rows = stream
        .alloc_zeros::<u32>(1)
        .map_err(alloc("the non-finite counter"))?;
    absmax_quantize_rows_into(
        gpu,
        x,
        rows,
        cols,
        &mut codes.as_view_mut(),
        &mut scales.as_view_mut(),
        &mut nonfinite_rows.as_view_mut(),
    )?;
    Ok(QuantizedActivationsGpu {
        rows,
        cols,
        codes,
        scales,
        nonfinite_rows,
    })
}

/// Quantizes `x` `(rows, cols)` into caller-owned buffers (no allocation: the form a
/// preallocated engine uses). `codes` `(rows, cols)`, `scales` `(rows,)`; `nonfinite_rows`
/// `(1,)` is incremented, never reset, so one counter can cover a whole forward pass.
///
/// Any pointer alignment works; 16-byte aligned `x` with `cols` a multiple of 16 / sizeof(T)
/// takes the vectorized path.
pub fn absmax_quantize_rows_into<T: DeviceActivation>(
    gpu: &Gpu,
    x: &CudaView<'_, T>,
    rows: usize,
    cols: usize,
    codes: &mut CudaViewMut<'_, i8>,
    scales: &mut CudaViewMut<'_, f32>,
    nonfinite_rows: &mut CudaViewMut<'_, u32>,
) -> Result<()> {
    check_shape("x", x.len(), rows, cols)?;
    check_shape("codes", codes.len(), rows, cols)?;
    check_shape("scales", scales.len(), rows, 1)?;
    check_shape("nonfinite_rows", nonfinite_rows.len(), 1, 1)?;
    if rows == 0 {
        return Ok(());
    }
    let func = gpu.function(&images::ACT_QUANT, T::ACT_QUANT_KERNEL)?;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_i, cols_i) = (rows as i32, cols as i32); // check_shape bounds both to i32
    let mut launch = gpu.stream().launch_builder(&func);
    launch
        .arg(x)
        .arg(codes)
        .arg(scales)
        .arg(nonfinite_rows)
        .arg(&rows_i)
        .arg(&cols_i);
    // SAFETY: the argument list matches `act_quant_*(const T*, int8_t*, float*, unsigned*,
    // int, int)`; buffer lengths were checked against rows * cols above, and the kernel
    // touches no element beyond them.
    unsafe { launch.launch(cfg) }.map_err(KernelError::driver(format!(
        "launching {}",
        T::ACT_QUANT_KERNEL
    )))?;
    Ok(())
}
