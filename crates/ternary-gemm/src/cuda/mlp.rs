//! GPU squared-ReLU GLU MLP for decode and small batches:
//! `y = down(A8(relu(gate(A8 x))^2 * up(A8 x)))`, bit-exact with
//! [`TernaryMlp::forward_ref`](crate::TernaryMlp::forward_ref).
//!
//! Four launches per call, each reading its operands once:
//! 1. `act_quant_mma_*`: `x` -> int8 codes in the GEMV's operand order (shared by gate and up);
//! 2. `gemv_w2a8_glu_*`: one pass over the gate/up matrix, interleaved in 16-row tiles so a
//!    CTA holds gate rows i..i+15 and the up rows of the same i; its epilogue writes
//!    `h = relu(g)^2 * u` (f32) and folds max|h| of each token into a per-token slot;
//! 3. `act_quant_mma_absmax_f32`: `h` -> codes with the known max (many CTAs per token;
//!    its last CTA resets the maxima for the next call);
//! 4. the down projection (GEMV, or the GEMM for M > 32).
//!
//! Launches 2-4 use programmatic dependent launch (`Gpu::launch_pdl`): the GEMVs request
//! their weight tiles before waiting for the previous kernel, so the latency of the small
//! quantization kernels hides behind weight streaming, and no memset breaks the chain.
//!
//! Why not one kernel: the int8 scale of `h` needs max|h| over every intermediate feature,
//! a grid-wide reduction, so `h` must be complete before any down-projection input exists.
//! The split keeps every weight byte read once and adds one small f32 round trip of `h`
//! (M x inter x 8 bytes, L2 resident at decode sizes).

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use tritter_kernels_cuda::{images, Gpu, KernelArgs, KernelError};

use super::gemv::{check_gemv, launch_gemm, launch_gemv, GluOut};
use super::{
    ternary_matmul_a8_cuda, DeviceActivation, GemvActivations, GemvWorkspace, TernaryMatrixGpu,
    GEMM_MIN_M,
};
use crate::{Result, TernaryError, TernaryMatrix, TernaryMlp, TernaryScales, ZERO_WORD};

/// Rows of one gate (or up) tile in the interleaved gate/up matrix.
const GLU_TILE: usize = 16;
/// Activation rows per gate/up GEMM of the prefill path (M >= [`GEMM_MIN_M`]): bounds the
/// f32 gate/up scratch to `MLP_GEMM_ROWS x 2 inter` (7B: 28 MB) while each GEMM still fills
/// the GPU.
pub const MLP_GEMM_ROWS: usize = 256;

/// A [`TernaryMlp`] on the GPU: gate and up interleaved in 16-row tiles as one
/// `(2 * ceil(inter / 16) * 16, hidden)` matrix with per-row scales (gate rows carry gate's
/// gamma, up rows up's), and down `(hidden, inter)`.
#[derive(Debug)]
pub struct TernaryMlpGpu {
    hidden: usize,
    inter: usize,
    gate_up: TernaryMatrixGpu,
    down: TernaryMatrixGpu,
}

impl TernaryMlpGpu {
    /// Interleaves gate and up on the host (zero rows pad `inter` to a multiple of 16) and
    /// uploads the three projections (asynchronous on `gpu.stream()`).
    pub fn upload(gpu: &Gpu, mlp: &TernaryMlp) -> Result<Self> {
        let (gate, up, down) = mlp.parts();
        let (hidden, inter) = (mlp.hidden(), mlp.intermediate());
        let wpr = gate.words_per_row();
        let tiles = inter.div_ceil(GLU_TILE);
        let rows = 2 * GLU_TILE * tiles;
        let mut packed = vec![ZERO_WORD; rows * wpr];
        let mut scales = vec![1.0f32; rows];
        for i in 0..inter {
            let (tile, r) = (i / GLU_TILE, i % GLU_TILE);
            for (half, m) in [(0, gate), (1, up)] {
                let row = 2 * GLU_TILE * tile + GLU_TILE * half + r;
                let src = m.packed_row(i).ok_or(TernaryError::Unsupported(
                    "gate/up row missing while interleaving",
                ))?;
                packed[row * wpr..(row + 1) * wpr].copy_from_slice(src);
                scales[row] = m.scales().row(i);
            }
        }
        let gate_up =
            TernaryMatrix::from_packed(rows, hidden, packed, TernaryScales::PerRow(scales))?;
        Ok(TernaryMlpGpu {
            hidden,
            inter,
            gate_up: TernaryMatrixGpu::upload(gpu, &gate_up)?,
            down: TernaryMatrixGpu::upload(gpu, down)?,
        })
    }

    /// Model width.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Intermediate width.
    pub fn intermediate(&self) -> usize {
        self.inter
    }

    /// Packed weight bytes read per call (gate, up and down, including tile padding).
    pub fn weight_bytes(&self) -> usize {
        4 * (self.gate_up.n_out() * self.hidden.div_ceil(16)
            + self.down.n_out() * self.inter.div_ceil(16))
    }
}

/// Preallocated buffers of [`ternary_mlp_cuda`] for a fixed number of tokens `m` (the
/// decode batch): the quantized input, `h` `(m, inter)` f32 and its quantized form, the
/// per-token max slots and the split-K workspace. No allocation per call.
///
/// The kernels leave the max slots, counters and split-K accumulators zeroed for the next
/// call; a call that fails part-way (a launch error) can leave them dirty, so make a new
/// workspace after any error from [`ternary_mlp_cuda`].
#[derive(Debug)]
pub struct MlpWorkspace {
    m: usize,
    x_acts: GemvActivations,
    h: CudaSlice<f32>,
    h_acts: GemvActivations,
    amax_bits: CudaSlice<u32>,
    arrivals: CudaSlice<u32>,
    gemv: GemvWorkspace,
    /// `(min(m, MLP_GEMM_ROWS), 2 inter)` gate/up GEMM output (M >= GEMM_MIN_M only).
    gu: Option<CudaSlice<f32>>,
}

impl MlpWorkspace {
    /// Buffers for `m` tokens through `mlp`.
    pub fn new(gpu: &Gpu, mlp: &TernaryMlpGpu, m: usize) -> Result<Self> {
        let s = gpu.stream();
        let alloc = || KernelError::driver("allocating the MLP workspace");
        Ok(MlpWorkspace {
            m,
            x_acts: GemvActivations::new(gpu, m, mlp.hidden)?,
            h: s.alloc_zeros(m * mlp.inter).map_err(alloc())?,
            h_acts: GemvActivations::new(gpu, m, mlp.inter)?,
            amax_bits: s.alloc_zeros(m.max(1)).map_err(alloc())?,
            arrivals: s.alloc_zeros(1).map_err(alloc())?,
            gemv: GemvWorkspace::new(gpu, mlp.gate_up.n_out().max(mlp.hidden))?,
            gu: if m >= GEMM_MIN_M {
                Some(
                    s.alloc_zeros(m.min(MLP_GEMM_ROWS) * mlp.gate_up.n_out())
                        .map_err(alloc())?,
                )
            } else {
                None
            },
        })
    }

    /// Tokens per call.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Synchronizes and fails with [`TernaryError::NonFiniteRows`] if the last call's input
    /// or hidden vector held NaN/Inf (those rows' outputs are NaN, never silently finite).
    pub fn check_finite(&self, gpu: &Gpu) -> Result<()> {
        self.x_acts.check_finite(gpu)?;
        self.h_acts
            .check_finite_as(gpu, "h (the MLP hidden vector)")
    }
}

/// `y = down(A8(relu(gate(A8 x))^2 * up(A8 x)))` for `x` `(m, hidden)` (f32, bf16 or f16),
/// `y` `(m, hidden)` f32, `m = ws.rows()`; equal to
/// [`TernaryMlp::forward_ref`](crate::TernaryMlp::forward_ref) bit for bit. Asynchronous
/// on [`Gpu::stream`]; [`MlpWorkspace::check_finite`] reports non-finite rows.
///
/// Decode sizes (m <= 8) run the interleaved gate/up GEMV with the relu²⊙ epilogue fused;
/// prefill sizes (m >= [`GEMM_MIN_M`]) run the tiled GEMM over chunks of
/// [`MLP_GEMM_ROWS`] rows and `glu_rows` (each weight is then read once per chunk rather
/// than once per 32 rows); both end with the A8 pass over h and the down projection.
pub fn ternary_mlp_cuda<T: DeviceActivation>(
    gpu: &Gpu,
    mlp: &TernaryMlpGpu,
    x: &CudaView<'_, T>,
    y: &mut CudaViewMut<'_, f32>,
    ws: &mut MlpWorkspace,
) -> Result<()> {
    let m = ws.m;
    check_workspace(mlp, ws)?;
    if m > 65535 {
        return Err(TernaryError::BadDimension {
            what: "MLP tokens per call",
            actual: m,
            expected: "at most 65535 (the A8 pass's grid y limit); split the batch",
        });
    }
    crate::act_quant::check_shape("x", x.len(), m, mlp.hidden)?;
    crate::act_quant::check_shape("y", y.len(), m, mlp.hidden)?;
    if m == 0 {
        return Ok(());
    }
    check_gemv(&mlp.gate_up, &ws.x_acts, &ws.gemv)?;
    ws.x_acts.quantize_from(gpu, x)?;
    mlp_from_codes(gpu, mlp, None, y, ws)
}

/// [`ternary_mlp_cuda`] for an input already quantized into the GEMV layout (`x.rows() =
/// ws.rows()`, `x.cols()` = hidden): an engine that produces the A8 codes of its residual
/// stream in the kernel that updates it (a fused norm + quantization) saves the MLP's own
/// quantization launch. Same result bit for bit as quantizing the same values here.
pub fn ternary_mlp_a8_cuda(
    gpu: &Gpu,
    mlp: &TernaryMlpGpu,
    x: &GemvActivations,
    y: &mut CudaViewMut<'_, f32>,
    ws: &mut MlpWorkspace,
) -> Result<()> {
    let m = ws.m;
    check_workspace(mlp, ws)?;
    if x.rows() != m {
        return Err(TernaryError::ShapeMismatch {
            what: "activation rows (the MlpWorkspace's m)",
            actual: x.rows(),
            expected: m,
        });
    }
    crate::act_quant::check_shape("y", y.len(), m, mlp.hidden)?;
    if m == 0 {
        return Ok(());
    }
    check_gemv(&mlp.gate_up, x, &ws.gemv)?;
    mlp_from_codes(gpu, mlp, Some(x), y, ws)
}

/// Fails unless `ws` was made for `mlp`'s (hidden, inter).
fn check_workspace(mlp: &TernaryMlpGpu, ws: &MlpWorkspace) -> Result<()> {
    if ws.x_acts.cols() != mlp.hidden || ws.h_acts.cols() != mlp.inter {
        return Err(TernaryError::ShapeMismatch {
            what: "MlpWorkspace (hidden, inter) made for another MLP: hidden",
            actual: ws.x_acts.cols(),
            expected: mlp.hidden,
        });
    }
    Ok(())
}

/// The MLP after the A8 of its input: gate/up (GEMV with the relu²⊙ epilogue, or GEMM +
/// `glu_rows`), A8 of h, down projection. `x`: the input codes, or the workspace's own.
fn mlp_from_codes(
    gpu: &Gpu,
    mlp: &TernaryMlpGpu,
    x: Option<&GemvActivations>,
    y: &mut CudaViewMut<'_, f32>,
    ws: &mut MlpWorkspace,
) -> Result<()> {
    let MlpWorkspace {
        m,
        x_acts,
        h,
        h_acts,
        amax_bits,
        arrivals,
        gemv,
        gu,
    } = ws;
    let m = *m;
    let xa: &GemvActivations = x.unwrap_or(&*x_acts);
    if let Some(gu) = gu.as_mut() {
        // Prefill sizes: gate/up through the tiled GEMM in chunks of rows, then relu^2 * up
        // and the row maxima (glu_rows); the same values as the GEMV's fused epilogue.
        stream_zero_sums(gpu, &mut h_acts.sums, m)?;
        let cols = mlp.gate_up.n_out();
        let func = gpu.function(&images::TERNARY_GEMV, "glu_rows")?;
        for r0 in (0..m).step_by(MLP_GEMM_ROWS) {
            let rows = r0..(r0 + MLP_GEMM_ROWS).min(m);
            let n = rows.len();
            launch_gemm(
                gpu,
                &mlp.gate_up,
                xa,
                rows,
                &mut gu.slice_mut(..n * cols),
                None,
            )?;
            let cfg = LaunchConfig {
                grid_dim: (mlp.inter.div_ceil(256) as u32, n as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (cols_i, inter_i, r0_i) = (cols as i32, mlp.inter as i32, r0 as i32);
            let mut launch = gpu.stream().launch_builder(&func);
            launch
                .arg(&*gu)
                .arg(&cols_i)
                .arg(&mut *h)
                .arg(&mut *amax_bits)
                .arg(&inter_i)
                .arg(&r0_i);
            // SAFETY: matches `glu_rows(const float*, int, float*, unsigned*, int, int)`; gu
            // holds n rows of `cols` = 2 * 16 * ceil(inter / 16) values (the GEMM above), h
            // m x inter and amax_bits m slots (this workspace, r0 + n <= m); the grid covers
            // inter columns and n rows, bounds-checked.
            unsafe { launch.launch(cfg) }.map_err(KernelError::driver("launching glu_rows"))?;
        }
    } else {
        // The gate/up pass zeroes h's row sums; the A8 pass over h resets the row maxima and
        // writes every row's non-finite flag. No memset between the launches, so each PDL launch (Gpu::launch_pdl)
        // can prefetch its weights while the previous kernel finishes.
        launch_gemv(
            gpu,
            &mlp.gate_up,
            xa,
            &mut h.as_view_mut(),
            &mut *gemv,
            Some(GluOut {
                amax_bits: &mut *amax_bits,
                inter: mlp.inter,
                sums: &mut h_acts.sums,
            }),
        )?;
    }

    let kp = crate::gemv_padded_cols(mlp.inter);
    let func = gpu.function(&images::ACT_QUANT, "act_quant_mma_absmax_f32")?;
    let cfg = LaunchConfig {
        grid_dim: ((kp / 4).div_ceil(256) as u32, m as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut args = KernelArgs::new();
    args.ptr(gpu, &*h)
        .ptr_mut(gpu, &mut *amax_bits)
        .ptr_mut(gpu, &mut h_acts.codes_mma)
        .ptr_mut(gpu, &mut h_acts.sums)
        .ptr_mut(gpu, &mut h_acts.scales)
        .ptr_mut(gpu, &mut h_acts.nonfinite_rows)
        .ptr_mut(gpu, &mut *arrivals)
        .i32(m as i32)
        .i32(mlp.inter as i32)
        .i32(kp as i32);
    // SAFETY: matches `act_quant_mma_absmax_f32(const float*, unsigned*, i8*, int*, float*,
    // unsigned*, unsigned*, int, int, int)`; h holds m x inter floats, amax_bits m slots and
    // arrivals one (MlpWorkspace::new), h_acts m x kp codes, m sums and scales and one
    // counter; the grid is (kp / 4 / 256 rounded up) x m and the kernel bounds-checks the
    // word index; it waits (griddepcontrol.wait) before touching any of them.
    unsafe { gpu.launch_pdl(&func, "act_quant_mma_absmax_f32", cfg, args) }?;

    ternary_matmul_a8_cuda(gpu, &mlp.down, &*h_acts, y, &mut *gemv)
}

/// Zeroes the first `m` row sums of the hidden activations (the GEMV path's gate/up pass does
/// it in its kernel; the A8 pass over h adds into them).
fn stream_zero_sums(gpu: &Gpu, sums: &mut CudaSlice<i32>, m: usize) -> Result<()> {
    gpu.stream()
        .memset_zeros(&mut sums.slice_mut(..m))
        .map_err(KernelError::driver("zeroing the hidden row sums"))?;
    Ok(())
}
