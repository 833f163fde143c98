//! GPU per-token absmax int8 quantization; kernel `kernels-cuda/kernels/act_quant.cu`.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};
use tritter_kernels_cuda::{images, Gpu, KernelArgs, KernelError};

use crate::act_quant::check_shape;
use crate::gemv_padded_cols;
use crate::{Element, QuantizedActivations, Result, TernaryError};

/// Threads per CTA of `act_quant_*` (one CTA per row); must match `kThreads` in the kernel.
const THREADS: u32 = 256;

/// An activation type with a GPU quantization kernel.
pub trait DeviceActivation: Element + DeviceRepr {
    /// `extern "C"` name of the kernel instance for this type (row-major codes).
    const ACT_QUANT_KERNEL: &'static str;
    /// `extern "C"` name of the instance writing the GEMV layout.
    const ACT_QUANT_MMA_KERNEL: &'static str;
}

impl DeviceActivation for f32 {
    const ACT_QUANT_KERNEL: &'static str = "act_quant_f32";
    const ACT_QUANT_MMA_KERNEL: &'static str = "act_quant_mma_f32";
}
impl DeviceActivation for bf16 {
    const ACT_QUANT_KERNEL: &'static str = "act_quant_bf16";
    const ACT_QUANT_MMA_KERNEL: &'static str = "act_quant_mma_bf16";
}
impl DeviceActivation for f16 {
    const ACT_QUANT_KERNEL: &'static str = "act_quant_f16";
    const ACT_QUANT_MMA_KERNEL: &'static str = "act_quant_mma_f16";
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
        read_nonfinite(gpu, &self.nonfinite_rows, self.rows)
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

/// Activations ready for the GPU GEMV: int8 codes in the GEMV's MMA k order
/// (`codes_mma` `(rows, gemv_padded_cols(cols))`, see [`gemv_code_position`](crate::gemv_code_position)),
/// their row sums `(rows,)` i32, the scales `(rows,)` f32 and a non-finite row counter.
///
/// Why a separate layout: the GEMV then reads its activation operand with one aligned 32-bit
/// load per MMA k-step, with no shared-memory staging or shuffle in every CTA; producing it
/// costs the quantization kernel nothing extra (one write of the codes either way).
/// Allocate once per batch size and refill per step (no allocation on the hot path).
#[derive(Debug)]
pub struct GemvActivations {
    rows: usize,
    cols: usize,
    /// `(rows, gemv_padded_cols(cols))` codes in MMA k order, zero padded.
    pub codes_mma: CudaSlice<i8>,
    /// `(rows,)` sum of each row's codes.
    pub sums: CudaSlice<i32>,
    /// `(rows,)` scales `s = 127 / max|x_row|`.
    pub scales: CudaSlice<f32>,
    /// `(rows,)` flags: 1 where the last fill's row held NaN/Inf, else 0. Written by every
    /// fill, so no reset (no memset) sits between a decode step's kernels.
    pub nonfinite_rows: CudaSlice<u32>,
}

impl GemvActivations {
    /// Zeroed buffers for `rows` activation rows of `cols` features.
    pub fn new(gpu: &Gpu, rows: usize, cols: usize) -> Result<Self> {
        check_shape("activations", rows.saturating_mul(cols), rows, cols)?;
        if gemv_padded_cols(cols) > i32::MAX as usize {
            return Err(TernaryError::BadDimension {
                what: "cols",
                actual: cols,
                expected: "at most 2^31 - 128 (rows are padded to a multiple of 128)",
            });
        }
        let s = gpu.stream();
        let alloc = |what: &str| KernelError::driver(format!("allocating {what}"));
        Ok(GemvActivations {
            rows,
            cols,
            codes_mma: s
                .alloc_zeros(rows * gemv_padded_cols(cols))
                .map_err(alloc("GEMV activation codes"))?,
            sums: s
                .alloc_zeros(rows.max(1))
                .map_err(alloc("activation row sums"))?,
            scales: s
                .alloc_zeros(rows.max(1))
                .map_err(alloc("activation scales"))?,
            nonfinite_rows: s
                .alloc_zeros(rows.max(1))
                .map_err(alloc("the non-finite row flags"))?,
        })
    }

    /// Activation rows, M.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Features per row, K.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Quantizes `x` `(rows, cols)` (per-token absmax, same codes and scales as
    /// [`absmax_quantize_rows`](crate::absmax_quantize_rows)) straight into the GEMV layout;
    /// asynchronous; writes every row's non-finite flag. Launched with programmatic dependent
    /// launch: the kernel waits for the previous kernel on the stream before reading `x`, and
    /// lets the GEMV that consumes the codes start its weight loads right away.
    pub fn quantize_from<T: DeviceActivation>(
        &mut self,
        gpu: &Gpu,
        x: &CudaView<'_, T>,
    ) -> Result<()> {
        check_shape("x", x.len(), self.rows, self.cols)?;
        if self.rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, kp_i) = self.fill_args();
        let func = gpu.function(&images::ACT_QUANT, T::ACT_QUANT_MMA_KERNEL)?;
        let mut args = KernelArgs::new();
        args.ptr(gpu, x)
            .ptr_mut(gpu, &mut self.codes_mma)
            .ptr_mut(gpu, &mut self.sums)
            .ptr_mut(gpu, &mut self.scales)
            .ptr_mut(gpu, &mut self.nonfinite_rows)
            .i32(rows_i)
            .i32(cols_i)
            .i32(kp_i);
        // SAFETY: matches `act_quant_mma_*(const T*, int8_t*, int*, float*, unsigned*, int,
        // int, int)`; x holds rows * cols elements (checked), codes_mma rows * kp, sums and
        // scales rows (allocated by `new` for this shape); one CTA per row, bounds-checked.
        // PDL: the kernel's first statement is its griddepcontrol.wait (x is usually the
        // previous kernel's output), so it may be resident before that kernel ends; it then
        // releases the GEMV that consumes it at once (whose weight loads precede its own wait).
        unsafe { gpu.launch_pdl(&func, T::ACT_QUANT_MMA_KERNEL, row_launch(self.rows), args) }?;
        Ok(())
    }

    /// Fills the GEMV layout from int8 codes `(rows, cols)` and scales `(rows,)` that are
    /// already on the device (permutation and row sums only).
    pub fn load_codes(
        &mut self,
        gpu: &Gpu,
        codes: &CudaView<'_, i8>,
        scales: &CudaView<'_, f32>,
    ) -> Result<()> {
        check_shape("codes", codes.len(), self.rows, self.cols)?;
        check_shape("scales", scales.len(), self.rows, 1)?;
        if self.rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i, kp_i) = self.fill_args();
        let stream = gpu.stream();
        stream
            .memcpy_dtod(scales, &mut self.scales.slice_mut(..self.rows))
            .map_err(KernelError::driver("copying activation scales"))?;
        let func = gpu.function(&images::ACT_QUANT, "a8_to_mma")?;
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(codes)
            .arg(&mut self.codes_mma)
            .arg(&mut self.sums)
            .arg(&mut self.nonfinite_rows)
            .arg(&rows_i)
            .arg(&cols_i)
            .arg(&kp_i);
        // SAFETY: matches `a8_to_mma(const int8_t*, int8_t*, int*, unsigned*, int, int, int)`;
        // lengths checked above and at allocation (rows flags); one CTA per row, bounds-checked.
        unsafe { launch.launch(row_launch(self.rows)) }
            .map_err(KernelError::driver("launching a8_to_mma"))?;
        Ok(())
    }

    /// (rows, cols, padded cols) as the kernels' `int` arguments (all bounded by
    /// `check_shape` in `new`).
    fn fill_args(&self) -> (i32, i32, i32) {
        (
            self.rows as i32,
            self.cols as i32,
            gemv_padded_cols(self.cols) as i32,
        )
    }

    /// Synchronizes and fails if the last fill saw NaN or Inf (those rows' scales are NaN).
    pub fn check_finite(&self, gpu: &Gpu) -> Result<()> {
        self.check_finite_as(gpu, "x")
    }

    /// [`check_finite`](Self::check_finite) naming the activation `what` in the error.
    pub(crate) fn check_finite_as(&self, gpu: &Gpu, what: &'static str) -> Result<()> {
        let flags = gpu
            .stream()
            .clone_dtoh(&self.nonfinite_rows.slice(..self.rows.max(1)))
            .map_err(KernelError::driver("reading the non-finite row flags"))?;
        let bad = flags.iter().take(self.rows).filter(|&&f| f != 0).count();
        if bad == 0 {
            Ok(())
        } else {
            Err(TernaryError::NonFiniteRows {
                what,
                rows: bad as u32,
                total: self.rows,
            })
        }
    }
}

/// Synchronizes, reads a non-finite row counter and turns a non-zero count into an error.
fn read_nonfinite(gpu: &Gpu, counter: &CudaSlice<u32>, total: usize) -> Result<()> {
    let bad = gpu
        .stream()
        .clone_dtoh(counter)
        .map_err(KernelError::driver("reading the non-finite row count"))?;
    match bad[0] {
        0 => Ok(()),
        rows => Err(TernaryError::NonFiniteRows {
            what: "x",
            rows,
            total,
        }),
    }
}

fn row_launch(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}
