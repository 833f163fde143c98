//! GPU W2A8 products for decode: `y = (Wq · q) * gamma / s` with int8 activations already on
//! the device; kernel `kernels-cuda/kernels/ternary_gemv.cu` (mma.sync m16n8k32 s8).

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, CudaViewMut, LaunchConfig, PushKernelArg};
use tritter_kernels_cuda::{images, Gpu, KernelArgs, KernelError};

use super::GemvActivations;
use crate::{
    gemv_padded_cols, repack_tiles, Result, ScaleGranularity, TernaryError, TernaryMatrix,
    TILE_ROWS, TILE_ROW_WORDS,
};

/// Activation rows one GEMV launch of the fused MLP's gate/up pass handles (larger M runs in
/// chunks of this): up to 8 rows use one MMA n-tile per decoded weight fragment, 9..32 rows
/// four. Plain products of more than 8 rows run the GEMM ([`GEMM_MIN_M`]). Also the rows of
/// the split-K workspace ([`GemvWorkspace`]).
pub const GEMV_MAX_M: usize = 32;
/// Activation rows from which [`ternary_matmul_a8_cuda`] runs the tiled GEMM instead of the
/// GEMV. Above one MMA n-tile (8 rows) every GEMV lane loads 32-bit activation operands
/// from L1 per weight block and n-tile, which bounded the (removed) plain `_m32` GEMV by load issue
/// (H100, M = 32: 4096 x 4096 in 24 us, 0.6x cuBLAS bf16; the GEMM: 14.5 us), while the GEMM stages activations in
/// shared memory and reads them with ldmatrix.
pub const GEMM_MIN_M: usize = 9;
/// Rows of one MMA n-tile.
const N_TILE: usize = 8;
const WARPS: usize = 8;
const THREADS: u32 = 32 * WARPS as u32;
/// Weight blocks (128 weights of 16 rows) a warp of `gemv_w2a8` streams per batch (its kU).
const GEMV_BATCH: usize = 4;

/// A ternary matrix resident on the GPU: the codes in the tiled device layout
/// ([`repack_tiles`](crate::repack_tiles): 16-row x 128-weight blocks of 512 bytes, one
/// 16-byte MMA operand per lane, [`tiled_len`](crate::tiled_len) words) and `scales` `(1,)`
/// or `(n_out,)` f32. Every kernel of this crate (GEMV, GEMM, transposed GEMM, fused MLP)
/// reads that one copy.
///
/// Read-only to users: the decode kernels read the weights before they wait for the
/// previous kernel on the stream (programmatic dependent launch). The one in-place update is
/// [`absmean_quantize_cuda`](super::absmean_quantize_cuda) (a training step's
/// re-quantization), whose docs state the ordering it needs.
#[derive(Debug)]
pub struct TernaryMatrixGpu {
    n_out: usize,
    k_in: usize,
    per_row: bool,
    tiles: CudaSlice<u32>,
    scales: CudaSlice<f32>,
}

impl TernaryMatrixGpu {
    /// Repacks a validated host matrix into the tiled layout and copies it to the device
    /// (asynchronous on `gpu.stream()`).
    pub fn upload(gpu: &Gpu, w: &TernaryMatrix) -> Result<Self> {
        let s = gpu.stream();
        let tiles = repack_tiles(w.packed(), w.n_out(), w.k_in())?;
        Ok(TernaryMatrixGpu {
            n_out: w.n_out(),
            k_in: w.k_in(),
            per_row: w.scales().granularity() == ScaleGranularity::PerRow,
            tiles: s
                .clone_htod(&tiles)
                .map_err(KernelError::driver("uploading packed weights"))?,
            scales: s
                .clone_htod(w.scales().as_slice())
                .map_err(KernelError::driver("uploading weight scales"))?,
        })
    }

    /// The codes in the tiled device layout ([`tiled_len`](crate::tiled_len) words;
    /// [`unrepack_tiles`](crate::unrepack_tiles) gives back the canonical words).
    pub fn tiles(&self) -> &CudaSlice<u32> {
        &self.tiles
    }

    /// Weight scales (gamma), `(1,)` or `(n_out,)`.
    pub fn scales(&self) -> &CudaSlice<f32> {
        &self.scales
    }

    /// Whether the scales are per output row (`(n_out,)`) rather than one per tensor.
    pub fn per_row(&self) -> bool {
        self.per_row
    }

    /// Output features.
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// Input features.
    pub fn k_in(&self) -> usize {
        self.k_in
    }

    /// Assembles a matrix from device buffers already in the tiled layout (used by
    /// [`zeros`](Self::zeros)).
    pub(super) fn from_parts(
        n_out: usize,
        k_in: usize,
        per_row: bool,
        tiles: CudaSlice<u32>,
        scales: CudaSlice<f32>,
    ) -> Self {
        TernaryMatrixGpu {
            n_out,
            k_in,
            per_row,
            tiles,
            scales,
        }
    }

    /// The tiles and scales for an in-place re-quantization (`absmean_quantize_cuda`).
    pub(super) fn parts_mut(&mut self) -> (&mut CudaSlice<u32>, &mut CudaSlice<f32>) {
        (&mut self.tiles, &mut self.scales)
    }
}

/// Split-K scratch of the GEMV and of the tiled GEMM's small-grid split: `(32, n_out)` int32
/// accumulators and `ceil(n_out / 16)` arrival counters (one per 16-row GEMV tile, or per
/// GEMM CTA tile), zero between calls (the last CTA of each tile resets what it used).
///
/// Allocate one per stream, sized for the largest `n_out` it will serve (llm.c style: no
/// allocation per call). Two launches sharing a workspace must be ordered on one stream.
#[derive(Debug)]
pub struct GemvWorkspace {
    max_n_out: usize,
    acc: CudaSlice<i32>,
    tiles: CudaSlice<u32>,
}

impl GemvWorkspace {
    /// Zeroed scratch for matrices with up to `max_n_out` output rows.
    pub fn new(gpu: &Gpu, max_n_out: usize) -> Result<Self> {
        let s = gpu.stream();
        Ok(GemvWorkspace {
            max_n_out,
            acc: s
                .alloc_zeros(GEMV_MAX_M * max_n_out.max(1))
                .map_err(KernelError::driver("allocating the GEMV workspace"))?,
            tiles: s
                .alloc_zeros(max_n_out.div_ceil(TILE_ROWS).max(1))
                .map_err(KernelError::driver("allocating the GEMV tile counters"))?,
        })
    }
}

/// Launch geometry `(quads per split, ksplit)` for CTAs of `rows_per_cta` output rows:
/// no split while the row tiles fill every SM (H100: splitting K of a 4096 x 16384 GEMV
/// 4 ways costs 20%: the atomics and the last CTA's epilogue outweigh the shorter CTAs);
/// below that, K is split so the grid has about two CTAs per SM. Tuning only:
/// `TRITTER_GEMV_MIN_KSPLIT=n` (read once per process) splits K at least `n` ways, to
/// measure the trade-off inside a whole decode step (values that do not parse are ignored,
/// the rest clamped to 1..=32).
fn plan(gpu: &Gpu, n_out: usize, k_in: usize, rows_per_cta: usize) -> (usize, usize) {
    static MIN_KSPLIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let min_ksplit = *MIN_KSPLIT.get_or_init(|| {
        std::env::var("TRITTER_GEMV_MIN_KSPLIT")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(1)
            .clamp(1, 32)
    });
    let quads = k_in.div_ceil(16).div_ceil(TILE_ROW_WORDS).max(1);
    let ctas = n_out.div_ceil(rows_per_cta).max(1);
    let sms = gpu.info().sm_count as usize;
    let ksplit = if ctas >= sms {
        1
    } else {
        (2 * sms).div_ceil(ctas).min(quads)
    };
    let ksplit = ksplit.max(min_ksplit).min(quads);
    let qps = quads.div_ceil(ksplit);
    (qps, quads.div_ceil(qps))
}

/// `y = (Wq · q) * gamma / s` for GEMV-ready int8 activations `x` (M = `x.rows()`,
/// K = `w.k_in()`), `y` `(M, n_out)` f32. Integer accumulation is exact and the epilogue is
/// [`a8_epilogue`](crate::a8_epilogue), so results equal the CPU reference bit for bit.
/// Any M >= 1: up to [`GEMM_MIN_M`]` - 1` rows in one GEMV launch, more in one launch of
/// the tiled GEMM.
/// `ws` must have been made for at least `w.n_out()` rows.
pub fn ternary_matmul_a8_cuda(
    gpu: &Gpu,
    w: &TernaryMatrixGpu,
    x: &GemvActivations,
    y: &mut CudaViewMut<'_, f32>,
    ws: &mut GemvWorkspace,
) -> Result<()> {
    check_gemv(w, x, ws)?;
    if x.rows() == 0 {
        return Ok(());
    }
    crate::act_quant::check_shape("y", y.len(), x.rows(), w.n_out)?;
    if x.rows() >= GEMM_MIN_M {
        return launch_gemm(gpu, w, x, 0..x.rows(), y, Some(ws));
    }
    launch_gemv(gpu, w, x, y, ws, None)
}

/// Shapes shared by the GEMV entry points: `x` has `w.k_in()` columns and `ws` covers
/// `w.n_out()` rows.
pub(super) fn check_gemv(
    w: &TernaryMatrixGpu,
    x: &GemvActivations,
    ws: &GemvWorkspace,
) -> Result<()> {
    if x.cols() != w.k_in {
        return Err(TernaryError::ShapeMismatch {
            what: "activation columns (k_in)",
            actual: x.cols(),
            expected: w.k_in,
        });
    }
    if ws.max_n_out < w.n_out {
        return Err(TernaryError::ShapeMismatch {
            what: "GemvWorkspace max_n_out",
            actual: ws.max_n_out,
            expected: w.n_out,
        });
    }
    Ok(())
}

/// The fused MLP's gate/up epilogue (`gemv_w2a8_glu_*`): instead of `y`, the launch writes
/// `h` `(M, inter)` = relu(gate)^2 * up from a gate/up matrix interleaved in 16-row tiles,
/// and folds max|h| per row into `amax_bits` `(M,)` (zeroed by the caller).
pub(super) struct GluOut<'a> {
    pub amax_bits: &'a mut CudaSlice<u32>,
    pub inter: usize,
    /// Row sums of `h`'s GEMV-ready codes: zeroed by the launch.
    pub sums: &'a mut CudaSlice<i32>,
}

/// The GEMV launches (chunks of [`GEMV_MAX_M`] rows) for `y` `(M, n_out)`, or for `h`
/// `(M, inter)` with `glu`. Shapes checked by the caller.
pub(super) fn launch_gemv(
    gpu: &Gpu,
    w: &TernaryMatrixGpu,
    x: &GemvActivations,
    y: &mut CudaViewMut<'_, f32>,
    ws: &mut GemvWorkspace,
    mut glu: Option<GluOut<'_>>,
) -> Result<()> {
    let (n_out, k, m) = (w.n_out, w.k_in, x.rows());
    let per_row = i32::from(w.per_row);
    let kp = gemv_padded_cols(k);
    let y_cols = glu.as_ref().map_or(n_out, |g| g.inter);
    for m0 in (0..m).step_by(GEMV_MAX_M) {
        let mc = GEMV_MAX_M.min(m - m0);
        // (kernel, output rows per CTA): see the variants in ternary_gemv.cu. 64-row CTAs
        // whenever they alone fill every SM; the GLU pass pairs gate and up tiles per CTA.
        let sms = gpu.info().sm_count as usize;
        let wide = n_out.div_ceil(4 * TILE_ROWS) >= sms;
        let (name, rows_per_cta) = match (glu.is_some(), mc, wide) {
            (false, 1..=N_TILE, true) => ("gemv_w2a8_r4", 4 * TILE_ROWS),
            (false, 1, false) => ("gemv_w2a8", TILE_ROWS),
            (false, 2..=N_TILE, false) => ("gemv_w2a8_r2", 2 * TILE_ROWS),
            (false, _, _) => {
                return Err(TernaryError::Unsupported(
                    "a plain GEMV of more than 8 rows (ternary_matmul_a8_cuda runs the GEMM)",
                ))
            }
            (true, 1..=N_TILE, true) => ("gemv_w2a8_glu_r4", 4 * TILE_ROWS),
            (true, 1..=N_TILE, false) => ("gemv_w2a8_glu", 2 * TILE_ROWS),
            (true, _, _) => {
                return Err(TernaryError::Unsupported(
                    "a GLU GEMV of more than 8 rows (ternary_mlp_cuda runs the GEMM)",
                ))
            }
        };
        let (qps, ksplit) = plan(gpu, n_out, k, rows_per_cta);
        // `_kl` (long K): gemv_w2a8 with its activation registers requested a batch ahead.
        // It pays once a warp streams >= 2 batches and costs a third of the CTAs an SM holds
        // (128 registers instead of 80), so only where the grid still fits in one wave of 2
        // CTAs per SM (H100, M = 1: 4096 x 16384 in 9.0 us instead of 9.9; one-batch shapes
        // such as 6144 x 4096 lose 30% with it).
        let name = if name == "gemv_w2a8"
            && qps > WARPS * GEMV_BATCH
            && n_out.div_ceil(rows_per_cta) * ksplit <= 2 * sms
        {
            "gemv_w2a8_kl"
        } else {
            name
        };
        let cfg = LaunchConfig {
            grid_dim: (n_out.div_ceil(rows_per_cta) as u32, ksplit as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = gpu.function(&images::TERNARY_GEMV, name)?;
        let xc = x.codes_mma.slice(m0 * kp..(m0 + mc) * kp);
        let sums = x.sums.slice(m0..m0 + mc);
        let sc = x.scales.slice(m0..m0 + mc);
        let mut yc = y.slice_mut(m0 * y_cols..(m0 + mc) * y_cols);
        let mut glu_c = glu.as_mut().map(|g| {
            (
                g.amax_bits.slice_mut(m0..m0 + mc),
                g.sums.slice_mut(m0..m0 + mc),
            )
        });
        let mut args = KernelArgs::new();
        args.ptr(gpu, &w.tiles)
            .ptr(gpu, &w.scales)
            .i32(per_row)
            .ptr(gpu, &xc)
            .ptr(gpu, &sums)
            .ptr(gpu, &sc)
            .ptr_mut(gpu, &mut yc)
            .ptr_mut(gpu, &mut ws.acc)
            .ptr_mut(gpu, &mut ws.tiles)
            .i32(mc as i32)
            .i32(n_out as i32)
            .i32(k as i32)
            .i32(qps as i32);
        if let Some((amax_c, sums_c)) = glu_c.as_mut() {
            args.ptr_mut(gpu, amax_c)
                .i32(y_cols as i32)
                .ptr_mut(gpu, sums_c);
        }
        // SAFETY: arguments match `gemv_w2a8[_r2|_r4](const uint4*, const float*, int, const i8*,
        // const int*, const float*, float*, int*, unsigned*, int, int, int, int)` (plus the
        // trailing `unsigned* amax_bits, int inter, int* sums` of gemv_w2a8_glu[_r4|_m32], whose
        // float* is h: mc rows of inter, and whose interleaved tiles put every h index
        // i < inter at gate row 32 (i / 16) + i % 16 < n_out, whole (gate, up) pairs per CTA; sums holds mc slots); the
        // weights hold tiled_len(n_out, k) words (16-byte aligned device allocation); x holds
        // mc rows of kp = ceil(k/128)*128 codes (GemvActivations layout) and mc sums/scales,
        // y holds mc x n_out (checked), ws 32 x n_out accumulators and ceil(n_out/16)
        // counters (>= the grid's x extent); the kernel bounds-checks tiles, n < n_out and
        // m < M; no dynamic shared memory. Before its griddepcontrol.wait the kernel only
        // reads W (PDL contract).
        // Error context built only on failure: this is the decode hot path.
        unsafe { gpu.launch_pdl(&func, name, cfg, args) }?;
    }
    Ok(())
}

/// A tile configuration of the GEMM kernel (`GemmTile` in `ternary_gemm.cu`).
struct GemmConfig {
    /// Kernel entry point.
    name: &'static str,
    /// Weight rows x tokens per CTA.
    tile: (usize, usize),
    /// Threads per CTA.
    threads: u32,
    /// Dynamic shared memory: stages x (tile.0 x 8-word weight rows (whole 512-byte blocks)
    /// + tile.1 x 144-byte activation rows).
    smem: usize,
}

/// Split-K of the GEMM `(quads per split, splits)` for a grid of `ctas` CTAs over `quads`
/// 128-weight quads of K on `sms` SMs: none when the grid fills the SMs, else about two
/// CTAs per SM (as the GEMV's split; more splits mean more int32 atomics, M x n_out per
/// split), each split keeping at least 8 quads (a pipeline of 4 stages amortized). H100,
/// 7B decode at batch 32: the o projection (4096 x 4096, 64 small tiles) splits 4 ways,
/// the down projection (4096 x 13824) 5 ways, q/k/v (6144 rows) 3 ways.
fn gemm_split(sms: usize, ctas: usize, quads: usize) -> (usize, usize) {
    if ctas >= sms || quads < 16 {
        return (quads.max(1), 1);
    }
    let ksplit = (2 * sms).div_ceil(ctas.max(1)).min(quads / 8).max(1);
    let qps = quads.div_ceil(ksplit);
    (qps, quads.div_ceil(qps))
}

/// 128 x 128 tiles, 3 stages (66 KB: above the 48 KB default, so the launch opts in).
const GEMM_LARGE: GemmConfig = GemmConfig {
    name: "gemm_w2a8",
    tile: (128, 128),
    threads: 128,
    smem: 3 * (4 * 128 * 8 + 128 * 144),
};
/// 64 x 64 tiles, 4 stages, for grids the large tile would leave mostly idle.
const GEMM_SMALL: GemmConfig = GemmConfig {
    name: "gemm_w2a8_small",
    tile: (64, 64),
    threads: 128,
    smem: 4 * (4 * 64 * 8 + 64 * 144),
};

/// M >= [`GEMM_MIN_M`]: one launch of the tiled GEMM (weights read once per
/// 128 tokens instead of once per 32). The large tile unless its grid would fill fewer than
/// two waves of one CTA per SM, where the small tile's 4x more CTAs finish sooner.
/// The tiled GEMM over activation rows `rows` of `x` into `y` `(rows.len(), n_out)`.
///
/// With a workspace (`split`, made for at least `w.n_out()` rows) and at most
/// [`GEMV_MAX_M`] rows, a grid of fewer CTAs than SMs is split along K ([`gemm_split`]):
/// decode batches of 9..32 tokens through 4096-row projections are 64 CTAs otherwise.
pub(super) fn launch_gemm(
    gpu: &Gpu,
    w: &TernaryMatrixGpu,
    x: &GemvActivations,
    rows: std::ops::Range<usize>,
    y: &mut CudaViewMut<'_, f32>,
    split: Option<&mut GemvWorkspace>,
) -> Result<()> {
    let (n_out, k, m) = (w.n_out, w.k_in, rows.len());
    let kp = gemv_padded_cols(k);
    let codes = x.codes_mma.slice(rows.start * kp..rows.end * kp);
    let sums = x.sums.slice(rows.clone());
    let x_scales = x.scales.slice(rows);
    if m.div_ceil(GEMM_SMALL.tile.1) > 65535 {
        return Err(TernaryError::BadDimension {
            what: "M (activation rows) of the GEMM",
            actual: m,
            expected: "at most 65535 * 64 (the grid's y limit); split the batch",
        });
    }
    let large_ctas = n_out.div_ceil(GEMM_LARGE.tile.0) * m.div_ceil(GEMM_LARGE.tile.1);
    let conf = if large_ctas < 2 * gpu.info().sm_count as usize {
        &GEMM_SMALL
    } else {
        &GEMM_LARGE
    };
    let optin = gpu.info().max_shared_per_block_optin as usize;
    if optin < conf.smem {
        return Err(TernaryError::DeviceLimit {
            what: "ternary GEMM shared memory per block (bytes)",
            needed: conf.smem,
            available: optin,
        });
    }
    let func = gpu.function(&images::TERNARY_GEMM, conf.name)?;
    // A per-function attribute, idempotent and cheap next to a GEMM launch.
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        conf.smem as i32,
    )
    .map_err(|e| KernelError::driver(format!("raising {}'s shared memory limit", conf.name))(e))?;
    let ctas = n_out.div_ceil(conf.tile.0) * m.div_ceil(conf.tile.1);
    let quads = kp / 128;
    let split = split.filter(|ws| m <= GEMV_MAX_M && ws.max_n_out >= n_out);
    let (qps, ksplit) = match split {
        Some(_) => gemm_split(gpu.info().sm_count as usize, ctas, quads),
        None => (quads, 1),
    };
    let cfg = LaunchConfig {
        grid_dim: (
            n_out.div_ceil(conf.tile.0) as u32,
            m.div_ceil(conf.tile.1) as u32,
            ksplit as u32,
        ),
        block_dim: (conf.threads, 1, 1),
        shared_mem_bytes: conf.smem as u32,
    };
    let per_row = i32::from(w.per_row);
    let (m_i, n_i, k_i, qps_i) = (m as i32, n_out as i32, k as i32, qps as i32);
    let null = 0u64;
    let mut launch = gpu.stream().launch_builder(&func);
    launch
        .arg(&w.tiles)
        .arg(&w.scales)
        .arg(&per_row)
        .arg(&codes)
        .arg(&sums)
        .arg(&x_scales)
        .arg(y)
        .arg(&m_i)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&qps_i);
    match split {
        Some(ws) if ksplit > 1 => {
            launch.arg(&mut ws.acc).arg(&mut ws.tiles);
        }
        _ => {
            launch.arg(&null).arg(&null);
        }
    }
    // SAFETY: matches `gemm_w2a8[_small](const u32*, const float*, int, const i8*, const int*,
    // const float*, float*, int, int, int, int, int*, unsigned*)`; the views hold m rows of
    // ceil(k/128)*128 codes with m sums and scales (rows of a GemvActivations), y holds
    // m x n_out (checked by the caller), the weights tiled_len(n_out, k) words; the kernel
    // bounds-checks n and m. With ksplit > 1 the workspace holds GEMV_MAX_M x max_n_out >=
    // m x n_out zeroed i32 and max_n_out.div_ceil(16) >= ctas zeroed counters (GemvWorkspace::new;
    // the last CTA of each tile re-zeroes what it used); the pointers are only read when
    // gridDim.z > 1.
    unsafe { launch.launch(cfg) }
        .map_err(|e| KernelError::driver(format!("launching {}", conf.name))(e))?;
    Ok(())
}
