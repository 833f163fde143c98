//! Device absmean quantization into a resident [`TernaryMatrixGpu`]: the per-step
//! re-quantization of a training engine's f32 shadow weights (kernel
//! `kernels-cuda/kernels/ternary_quant.cu`). The codes equal
//! [`absmean_quantize`](crate::absmean_quantize)'s for the same gamma (same formula and
//! rounding; gamma's f64 sum differs from the CPU's only in summation order).

use std::ops::Range;

use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use half::bf16;
use tritter_kernels_cuda::{images, Gpu, KernelError};

use super::TernaryMatrixGpu;
use crate::{tiled_len, words_per_row, Result, TernaryError, TILE_ROW_WORDS, ZERO_WORD};

const THREADS: u32 = 256;

/// `blocks` CTAs of [`THREADS`] threads, no dynamic shared memory: every launch here.
fn blocks_cfg(blocks: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl TernaryMatrixGpu {
    /// An all-zero `(n_out, k_in)` matrix (every code 1, scales 0) to be filled by
    /// [`absmean_quantize_cuda`]: one scale `(1,)`, or one per row `(n_out,)` with `per_row`
    /// (a stack of several layers, each quantized with its own gamma into its row range).
    pub fn zeros(gpu: &Gpu, n_out: usize, k_in: usize, per_row: bool) -> Result<Self> {
        if n_out == 0 || k_in == 0 || n_out > i32::MAX as usize || k_in > i32::MAX as usize {
            return Err(TernaryError::BadDimension {
                what: "n_out x k_in of a device matrix",
                actual: n_out.min(k_in),
                expected: "1 ..= 2^31 - 1 on both sides",
            });
        }
        let s = gpu.stream();
        let tiles = s
            .clone_htod(&vec![ZERO_WORD; tiled_len(n_out, k_in)])
            .map_err(KernelError::driver("allocating device weights"))?;
        let scales = s
            .alloc_zeros::<f32>(if per_row { n_out } else { 1 })
            .map_err(KernelError::driver("allocating device weight scales"))?;
        Ok(Self::from_parts(n_out, k_in, per_row, tiles, scales))
    }
}

/// Scratch of [`absmean_quantize_cuda`]: the f64 sum of |w| (one per call, zeroed by it).
#[derive(Debug)]
pub struct AbsmeanWorkspace {
    sum: CudaSlice<f64>,
}

impl AbsmeanWorkspace {
    /// One f64 accumulator on the device.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        Ok(AbsmeanWorkspace {
            sum: gpu
                .stream()
                .alloc_zeros(1)
                .map_err(KernelError::driver("allocating the absmean sum"))?,
        })
    }
}

/// BitNet absmean quantization of the f32 block `w` `(rows.len(), k_in)` into rows `rows` of
/// `out`, with one gamma `mean(|w|)` over the block: `Wq = clamp(round(w / (gamma + 1e-5)),
/// -1, 1)`. A per-tensor `out` takes the whole matrix (`rows == 0..n_out`); a per-row `out`
/// any row range, its scales `rows` all set to the block's gamma (several BitLinear layers
/// stacked into one matrix, each with its own per-tensor gamma, multiplied by one GEMM).
///
/// Asynchronous on `gpu.stream()`, two launches, no host synchronisation: a training step
/// re-quantizes every weight this way. A non-finite weight makes gamma NaN (never an error
/// here: the caller's loss check reports it). The GEMV reads weights before it waits on the
/// previous kernel (programmatic dependent launch), and a GEMV releases its successor before
/// its own wait, so between this call and a GEMV of `out` order a kernel that waits before it
/// releases (the activation quantization always is) or a plain launch; another GEMV alone is
/// not enough.
pub fn absmean_quantize_cuda(
    gpu: &Gpu,
    w: &CudaView<'_, f32>,
    rows: Range<usize>,
    out: &mut TernaryMatrixGpu,
    ws: &mut AbsmeanWorkspace,
) -> Result<()> {
    quantize(gpu, w, rows, out, ws, None)
}

/// [`absmean_quantize_cuda`] that also writes the dequantized block `Wq * gamma` as bf16
/// into `deq` `(rows.len(), k_in)` row-major, in the same launch: for a backward pass that
/// forms `dX = dY · (Wq gamma)` with a dense bf16 GEMM (cuBLAS) instead of
/// [`ternary_matmul_t_cuda`](super::ternary_matmul_t_cuda), at 2 bytes per weight.
pub fn absmean_quantize_dequant_cuda(
    gpu: &Gpu,
    w: &CudaView<'_, f32>,
    rows: Range<usize>,
    out: &mut TernaryMatrixGpu,
    ws: &mut AbsmeanWorkspace,
    deq: &mut CudaViewMut<'_, bf16>,
) -> Result<()> {
    crate::act_quant::check_shape("deq", deq.len(), rows.len(), out.k_in())?;
    quantize(gpu, w, rows, out, ws, Some(deq))
}

/// The absmean fake quantization of the f32 block `w` alone: `Wq * gamma` as bf16 into
/// `deq` (the same length, row-major like `w`), gamma = mean(|w|) over the whole block, with
/// no packed codes. For an engine whose products all run on the dense bf16 copy (the Tritter
/// training engine's cuBLAS path): the same values [`absmean_quantize_dequant_cuda`] writes,
/// from a streaming kernel (16-byte loads and stores) instead of the tile packer. Two
/// launches, asynchronous on `gpu.stream()`; a non-finite weight makes every value NaN.
pub fn absmean_dequant_cuda(
    gpu: &Gpu,
    w: &CudaView<'_, f32>,
    ws: &mut AbsmeanWorkspace,
    deq: &mut CudaViewMut<'_, bf16>,
) -> Result<()> {
    let n = w.len();
    if n == 0 || deq.len() != n {
        return Err(TernaryError::ShapeMismatch {
            what: "dequantized copy length (the weight block's, at least 1)",
            actual: deq.len(),
            expected: n.max(1),
        });
    }
    abs_sum(gpu, w, ws)?;
    let stream = gpu.stream();
    let f = gpu.function(&images::TERNARY_QUANT, "absmean_dequant_bf16")?;
    let (wp, _gw) = w.device_ptr(stream);
    let (dp, _gd) = deq.device_ptr_mut(stream);
    let vectorized = i32::from(n % 8 == 0 && wp % 16 == 0 && dp % 16 == 0);
    let per_thread = if vectorized == 1 { 8 } else { 1 };
    let blocks = n.div_ceil(THREADS as usize * per_thread).clamp(1, 65535) as u32;
    let count = n as i64;
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&wp)
        .arg(&count)
        .arg(&ws.sum)
        .arg(&dp)
        .arg(&vectorized);
    // SAFETY: matches `absmean_dequant_bf16(const float*, long long, const double*, bf16*,
    // int)`; w and deq hold n values (checked), sum one f64 (written by abs_sum above, same
    // stream); the vectorized loop runs only when n % 8 == 0 and both pointers are 16-byte
    // aligned (checked here), and both loops are bounded by n.
    unsafe { launch.launch(blocks_cfg(blocks)) }
        .map_err(KernelError::driver("launching absmean_dequant_bf16"))?;
    Ok(())
}

/// Zeroes `ws.sum` and adds sum |w| of the block into it (f64).
fn abs_sum(gpu: &Gpu, w: &CudaView<'_, f32>, ws: &mut AbsmeanWorkspace) -> Result<()> {
    let stream = gpu.stream();
    stream
        .memset_zeros(&mut ws.sum)
        .map_err(KernelError::driver("zeroing the absmean sum"))?;
    let count = w.len() as i64;
    let sum_fn = gpu.function(&images::TERNARY_QUANT, "absmean_abs_sum")?;
    let blocks = w.len().div_ceil(THREADS as usize * 8).clamp(1, 1024) as u32;
    let mut launch = stream.launch_builder(&sum_fn);
    launch.arg(w).arg(&count).arg(&mut ws.sum);
    // SAFETY: matches `absmean_abs_sum(const float*, long long, double*)`; w holds `count`
    // values, sum one f64; grid-stride loop bounded by `count`.
    unsafe { launch.launch(blocks_cfg(blocks)) }
        .map_err(KernelError::driver("launching absmean_abs_sum"))?;
    Ok(())
}

fn quantize(
    gpu: &Gpu,
    w: &CudaView<'_, f32>,
    rows: Range<usize>,
    out: &mut TernaryMatrixGpu,
    ws: &mut AbsmeanWorkspace,
    deq: Option<&mut CudaViewMut<'_, bf16>>,
) -> Result<()> {
    let (n_out, k_in) = (out.n_out(), out.k_in());
    if rows.start >= rows.end || rows.end > n_out {
        return Err(TernaryError::BadDimension {
            what: "row range end (a non-empty range inside the matrix)",
            actual: rows.end,
            expected: "rows.start < rows.end <= n_out",
        });
    }
    if !out.per_row() && rows != (0..n_out) {
        return Err(TernaryError::ShapeMismatch {
            what: "rows of a per-tensor matrix (quantize it whole)",
            actual: rows.len(),
            expected: n_out,
        });
    }
    let n = rows.len();
    crate::act_quant::check_shape("w", w.len(), n, k_in)?;
    abs_sum(gpu, w, ws)?;
    let stream = gpu.stream();
    let wpr = words_per_row(k_in);
    let quads = wpr.div_ceil(TILE_ROW_WORDS) as i32;
    let words = n * wpr;
    let (rows_i, k_i, row0, per_row) = (
        n as i32,
        k_in as i32,
        rows.start as i32,
        i32::from(out.per_row()),
    );
    let pack_fn = gpu.function(&images::TERNARY_QUANT, "absmean_pack_tiles")?;
    let deq_ptr: u64 = deq.map_or(0, |d| d.device_ptr_mut(stream).0);
    let (tiles, scales) = out.parts_mut();
    let mut launch = stream.launch_builder(&pack_fn);
    launch
        .arg(w)
        .arg(&rows_i)
        .arg(&k_i)
        .arg(&ws.sum)
        .arg(tiles)
        .arg(scales)
        .arg(&row0)
        .arg(&quads)
        .arg(&per_row)
        .arg(&deq_ptr);
    // SAFETY: matches `absmean_pack_tiles(const float*, int, int, const double*, unsigned*,
    // float*, int, int, int, bf16*)`; deq is null or holds (n, k_in) bf16 (checked by the
    // caller); w is (n, k_in) (checked); tiles were made by `zeros`/`upload`
    // for (n_out, k_in) and every written index is a tiled position of rows row0..row0 + n
    // < n_out; scales hold n_out (per-row) or 1 values; threads past n * wpr return.
    unsafe { launch.launch(blocks_cfg(words.div_ceil(THREADS as usize) as u32)) }
        .map_err(KernelError::driver("launching absmean_pack_tiles"))?;
    Ok(())
}
