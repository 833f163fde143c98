//! FlashAttention-2 backward on the GPU (kernels-cuda/kernels/flash_bwd.cu): dq, dk, dv from
//! q, k, v, the forward's output and logsumexp and `dout`, with the forward's masks, varlen
//! batches and GQA, and optionally the backward of the fused QK-Norm + RoPE prologue (raw dq,
//! dk and the two norm weights' gradients).
//!
//! Two modes ([`BwdMode`]): `Atomic` (FlashAttention's default: one pass over key blocks,
//! dq added with f32 atomics) and `Deterministic` (no atomics: a second kernel parallel over
//! query blocks recomputes the probabilities and owns dq; bitwise reproducible run to run).
//! Buffers are allocated once ([`GradsGpu`], [`BwdWorkspace`], [`NormGradsGpu`]) and reused,
//! so a training step allocates nothing.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, SyncOnDrop};
use tritter_kernels_cuda::{images, Gpu, KernelError};

use super::{
    base_params, check_prologue, check_slice, AttnDtype, FlashParams, NormRopeGpu, ProblemGpu,
};
use crate::error::{AttnError, Result};
use crate::params::Problem;

/// Query rows per block of the backward's main kernel (`kBM` in flash_bwd.cu).
pub const BWD_BLOCK_M: usize = 64;
/// Keys per CTA of the main kernel and per block of the deterministic dq kernel (`kBN`).
pub const BWD_BLOCK_N: usize = 64;
/// Query rows per CTA of the deterministic dq kernel (`kDqBM`).
pub const BWD_DQ_BLOCK_M: usize = 64;
const KV_THREADS: u32 = 256;
const DQ_THREADS: u32 = 128;
/// Warps per block of the row kernels (`kNormWarps` for the norm backward).
const ROW_WARPS: usize = 8;
/// Upper bound on the blocks of the norm backward (each leaves one partial weight gradient).
const NORM_MAX_BLOCKS: usize = 1024;

/// Shared memory of the main backward kernel at head dim `d` in `mode`: Q, dO, K, V tiles, P
/// and dS, doc ids (82,176 bytes at D = 128, 49,408 at D = 64). The deterministic mode's D =
/// 128 kernel (no dq) keeps a second Q tile, so the next query block's Q loads while this one
/// is computed (98,560 bytes, under sm_120's 99 KB per block; `kKvWide` in flash_bwd.cu).
pub fn bwd_kv_smem_bytes(d: usize, mode: BwdMode) -> usize {
    let q_tiles = if d == 128 && mode == BwdMode::Deterministic {
        2
    } else {
        1
    };
    ((1 + q_tiles) * BWD_BLOCK_M + 2 * BWD_BLOCK_N) * d * 2
        + 2 * BWD_BLOCK_M * BWD_BLOCK_N * 2
        + BWD_BLOCK_N * 4
}

/// Shared memory of the deterministic dq kernel at head dim `d`: Q, dO, double-buffered K
/// and V, doc ids (98,816 bytes at D = 128, under sm_120's 99 KB per block).
pub fn bwd_dq_smem_bytes(d: usize) -> usize {
    (2 * BWD_DQ_BLOCK_M + 4 * BWD_BLOCK_N) * d * 2 + 2 * BWD_BLOCK_N * 4
}

/// How the backward accumulates dq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BwdMode {
    /// One pass over key blocks; dq is summed with f32 atomics into the workspace, then
    /// converted. Fastest; the summation order (hence the last bits of dq) varies run to run.
    #[default]
    Atomic,
    /// No atomics: a second kernel, parallel over query blocks, recomputes P and dP and
    /// accumulates dq in registers. Bitwise reproducible run to run; about 1.4x the work.
    Deterministic,
}

/// The gradients of q, k, v on the device: dq like q `(total_q, Hq, D)`, dk and dv like k/v
/// `(total_k, Hkv, D)`, in `T`. Allocated once per problem size and overwritten by every
/// backward call (never accumulated into).
#[derive(Debug)]
pub struct GradsGpu<T: AttnDtype> {
    /// `dL/dq` `(total_q, Hq, D)` (of the raw q when a prologue is used).
    pub dq: CudaSlice<T>,
    /// `dL/dk` `(total_k, Hkv, D)`, summed over each KV head's query group.
    pub dk: CudaSlice<T>,
    /// `dL/dv` `(total_k, Hkv, D)`, summed over each KV head's query group.
    pub dv: CudaSlice<T>,
}

impl<T: AttnDtype> GradsGpu<T> {
    /// Zeroed gradients sized for `problem`.
    pub fn new(gpu: &Gpu, problem: &Problem) -> Result<Self> {
        let alloc = |n: usize| {
            gpu.stream()
                .alloc_zeros::<T>(n)
                .map_err(|e| AttnError::from(KernelError::driver("allocating gradients")(e)))
        };
        Ok(GradsGpu {
            dq: alloc(problem.q_len())?,
            dk: alloc(problem.kv_len())?,
            dv: alloc(problem.kv_len())?,
        })
    }
}

/// Gradients of the QK-Norm weights `(D,)` f32, written (not accumulated) by a backward
/// with a prologue. The sums over tokens and heads run in a fixed order in both modes.
#[derive(Debug)]
pub struct NormGradsGpu {
    /// `dL/dq_norm` `(D,)`.
    pub dq_norm: CudaSlice<f32>,
    /// `dL/dk_norm` `(D,)`.
    pub dk_norm: CudaSlice<f32>,
}

impl NormGradsGpu {
    /// Zeroed `(D,)` buffers.
    pub fn new(gpu: &Gpu, head_dim: usize) -> Result<Self> {
        let alloc = |n: usize| {
            gpu.stream()
                .alloc_zeros::<f32>(n)
                .map_err(|e| AttnError::from(KernelError::driver("allocating norm gradients")(e)))
        };
        Ok(NormGradsGpu {
            dq_norm: alloc(head_dim)?,
            dk_norm: alloc(head_dim)?,
        })
    }
}

/// Scratch of the backward, allocated once from a problem and reusable for any problem that
/// fits it (checked per call):
/// * `dq_accum` `(total_q, Hq, D)` f32: atomic dq sums, and d(q_hat) with a prologue;
/// * `delta` like the logsumexp: `rowsum(dO * O)`;
/// * with a prologue: `q_hat` `(total_q, Hq, D)` and `k_hat` `(total_k, Hkv, D)` in `T`
///   (normalized, rotated q and k), `dk_accum` `(total_k, Hkv, D)` f32 (d(k_hat)), and the
///   per-block partial sums of the norm weight gradients `(blocks, D)` f32.
pub struct BwdWorkspace<T: AttnDtype> {
    dq_accum: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    prologue: Option<PrologueWorkspace<T>>,
}

struct PrologueWorkspace<T: AttnDtype> {
    q_hat: CudaSlice<T>,
    k_hat: CudaSlice<T>,
    dk_accum: CudaSlice<f32>,
    partial: CudaSlice<f32>,
}

impl<T: AttnDtype> std::fmt::Debug for BwdWorkspace<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BwdWorkspace")
            .field("dq_accum", &self.dq_accum.len())
            .field("delta", &self.delta.len())
            .field("prologue", &self.prologue.is_some())
            .field("bytes", &self.bytes())
            .finish()
    }
}

/// Blocks of the norm backward for `rows` rows (one warp per row, strided).
fn norm_blocks(rows: usize) -> usize {
    rows.div_ceil(ROW_WARPS).clamp(1, NORM_MAX_BLOCKS)
}

/// Elements of the partial weight-gradient buffer `problem` needs.
fn partial_len(problem: &Problem) -> usize {
    let rows_q = problem.seqs.total_q() * problem.heads.q;
    let rows_k = problem.seqs.total_k() * problem.heads.kv;
    norm_blocks(rows_q.max(rows_k)) * problem.heads.dim
}

impl<T: AttnDtype> BwdWorkspace<T> {
    /// Scratch for `problem` (validated first); `with_prologue` adds the buffers of the
    /// QK-Norm + RoPE backward.
    pub fn new(gpu: &Gpu, problem: &Problem, with_prologue: bool) -> Result<Self> {
        problem.validate()?;
        let stream = gpu.stream();
        let err = |e| AttnError::from(KernelError::driver("allocating the backward workspace")(e));
        // max(1): a zero-token problem still gets valid (unused) allocations
        let f32s = |n: usize| stream.alloc_zeros::<f32>(n.max(1)).map_err(err);
        let ts = |n: usize| stream.alloc_zeros::<T>(n.max(1)).map_err(err);
        let prologue = if with_prologue {
            Some(PrologueWorkspace {
                q_hat: ts(problem.q_len())?,
                k_hat: ts(problem.kv_len())?,
                dk_accum: f32s(problem.kv_len())?,
                partial: f32s(partial_len(problem))?,
            })
        } else {
            None
        };
        Ok(BwdWorkspace {
            dq_accum: f32s(problem.q_len())?,
            delta: f32s(problem.lse_len())?,
            prologue,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        let t = std::mem::size_of::<T>();
        4 * (self.dq_accum.len() + self.delta.len())
            + self.prologue.as_ref().map_or(0, |p| {
                t * (p.q_hat.len() + p.k_hat.len()) + 4 * (p.dk_accum.len() + p.partial.len())
            })
    }

    /// Checks that the workspace covers `problem` (and the prologue's buffers when asked).
    fn check(&self, problem: &Problem, with_prologue: bool) -> Result<()> {
        let at_least = |what: &'static str, actual: usize, expected: usize| {
            if actual >= expected {
                Ok(())
            } else {
                Err(AttnError::Shape {
                    what,
                    actual,
                    expected,
                    detail: "at least; build the workspace with BwdWorkspace::new for this \
                             problem"
                        .into(),
                })
            }
        };
        at_least("workspace dq_accum", self.dq_accum.len(), problem.q_len())?;
        at_least("workspace delta", self.delta.len(), problem.lse_len())?;
        if with_prologue {
            let Some(p) = &self.prologue else {
                return Err(AttnError::Layout(
                    "the backward has a QK-Norm + RoPE prologue but the workspace was built \
                     without its buffers; use BwdWorkspace::new(.., with_prologue = true)"
                        .into(),
                ));
            };
            at_least("workspace q_hat", p.q_hat.len(), problem.q_len())?;
            at_least("workspace k_hat", p.k_hat.len(), problem.kv_len())?;
            at_least("workspace dk_accum", p.dk_accum.len(), problem.kv_len())?;
            at_least(
                "workspace norm partials",
                p.partial.len(),
                partial_len(problem),
            )?;
        }
        Ok(())
    }
}

/// One kernel argument, pushed by reference from a vector that outlives the launch builder.
enum Arg<'a> {
    Params(&'a FlashParams),
    Ptr(u64),
    I32(i32),
    I64(i64),
}

/// Launches `name` from the flash_bwd image; an empty grid launches nothing.
fn launch(
    gpu: &Gpu,
    name: &'static str,
    grid: (usize, usize, usize),
    block: u32,
    smem: usize,
    args: &[Arg<'_>],
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let func = gpu.function(&images::FLASH_BWD, name)?;
    if smem > 48 * 1024 {
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| KernelError::driver(format!("raising {name}'s shared memory limit"))(e))?;
    }
    let cfg = LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut b = gpu.stream().launch_builder(&func);
    for a in args {
        match a {
            Arg::Params(p) => b.arg(*p),
            Arg::Ptr(p) => b.arg(p),
            Arg::I32(v) => b.arg(v),
            Arg::I64(v) => b.arg(v),
        };
    }
    // SAFETY: every caller passes the argument list of `name` in flash_bwd.cu, with device
    // pointers whose buffers were checked against the problem and are kept alive (with their
    // stream guards) by the caller until this returns.
    unsafe { b.launch(cfg) }.map_err(|e| KernelError::driver(format!("launching {name}"))(e))?;
    Ok(())
}

/// Static kernel name `{base}_{bf16|f16}_d{64|128}` (Gpu::function caches by `&'static str`).
pub(super) fn bwd_name<T: AttnDtype>(base: &str, d: usize) -> &'static str {
    const NAMES: [&str; 32] = [
        "flash_bwd_pre_bf16_d64",
        "flash_bwd_pre_bf16_d128",
        "flash_bwd_pre_f16_d64",
        "flash_bwd_pre_f16_d128",
        "flash_bwd_kv_dq_bf16_d64",
        "flash_bwd_kv_dq_bf16_d128",
        "flash_bwd_kv_dq_f16_d64",
        "flash_bwd_kv_dq_f16_d128",
        "flash_bwd_kv_bf16_d64",
        "flash_bwd_kv_bf16_d128",
        "flash_bwd_kv_f16_d64",
        "flash_bwd_kv_f16_d128",
        "flash_bwd_kv_dq_pair_bf16_d64",
        "flash_bwd_kv_dq_pair_bf16_d128",
        "flash_bwd_kv_dq_pair_f16_d64",
        "flash_bwd_kv_dq_pair_f16_d128",
        "flash_bwd_kv_pair_bf16_d64",
        "flash_bwd_kv_pair_bf16_d128",
        "flash_bwd_kv_pair_f16_d64",
        "flash_bwd_kv_pair_f16_d128",
        "flash_bwd_dq_bf16_d64",
        "flash_bwd_dq_bf16_d128",
        "flash_bwd_dq_f16_d64",
        "flash_bwd_dq_f16_d128",
        "norm_rope_pos_bf16_d64",
        "norm_rope_pos_bf16_d128",
        "norm_rope_pos_f16_d64",
        "norm_rope_pos_f16_d128",
        "norm_rope_bwd_bf16_d64",
        "norm_rope_bwd_bf16_d128",
        "norm_rope_bwd_f16_d64",
        "norm_rope_bwd_f16_d128",
    ];
    super::static_name::<T>(&NAMES, base, d, "flash_bwd_missing")
}

/// The prologue half of a backward call: the forward's QK-Norm + RoPE inputs and the
/// buffers that receive the norm weights' gradients.
#[derive(Debug)]
pub struct PrologueBwd<'a, 'b, T: AttnDtype> {
    /// Weights, eps and RoPE table, as given to the forward.
    pub norm_rope: &'b NormRopeGpu<'a, T>,
    /// Receives `dL/dq_norm` and `dL/dk_norm` `(D,)`.
    pub grads: &'b mut NormGradsGpu,
}

/// Attention backward on the GPU: `grads` = (dq, dk, dv) of a loss whose gradient with
/// respect to the forward output is `dout`.
///
/// Inputs: q `(total_q, Hq, D)`, k/v `(total_k, Hkv, D)` (raw q and k when `prologue` is
/// given: the kernel re-applies QK-Norm + RoPE into the workspace), `out` and `dout` like q,
/// `lse` the forward's natural-log logsumexp (`(B, Hq, Lq)` or `(Hq, total_q)` for varlen).
/// `ws` is scratch ([`BwdWorkspace::new`] for this problem, `with_prologue` matching).
/// With a prologue, `grads.dq`/`grads.dk` are the gradients of the raw q and k and
/// `prologue.grads` receives the norm weights' gradients.
///
/// Every length, the workspace, the head shapes, the mask and (with a prologue) the RoPE
/// table's coverage are checked before the first launch. Asynchronous on `gpu.stream()`.
/// `mode` picks atomic (fast) or deterministic (bitwise reproducible) dq accumulation; dk,
/// dv and the norm weight gradients are deterministic in both.
#[allow(clippy::too_many_arguments)] // FlashAttention's backward takes the same inputs
pub fn flash_attn_bwd_cuda<T: AttnDtype>(
    gpu: &Gpu,
    pb: &ProblemGpu,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    out: &CudaSlice<T>,
    lse: &CudaSlice<f32>,
    dout: &CudaSlice<T>,
    grads: &mut GradsGpu<T>,
    ws: &mut BwdWorkspace<T>,
    prologue: Option<PrologueBwd<'_, '_, T>>,
    mode: BwdMode,
) -> Result<()> {
    let p = &pb.problem;
    p.check_lens(q.len(), k.len(), v.len())?;
    check_slice(p, "out", out, p.q_len())?;
    check_slice(p, "dout", dout, p.q_len())?;
    check_slice(p, "lse", lse, p.lse_len())?;
    check_slice(p, "dq", &grads.dq, p.q_len())?;
    check_slice(p, "dk", &grads.dk, p.kv_len())?;
    check_slice(p, "dv", &grads.dv, p.kv_len())?;
    ws.check(p, prologue.is_some())?;
    let d = p.heads.dim;
    if let Some(pr) = &prologue {
        check_prologue(p, pr.norm_rope, pb.max_position)?;
        check_slice(p, "dq_norm", &pr.grads.dq_norm, d)?;
        check_slice(p, "dk_norm", &pr.grads.dk_norm, d)?;
    }
    let (hq, hkv) = (p.heads.q, p.heads.kv);
    let (tq, tk) = (p.seqs.total_q(), p.seqs.total_k());
    let (rows_q, rows_k) = (tq * hq, tk * hkv);
    if rows_q.max(rows_k) > i32::MAX as usize {
        return Err(AttnError::Layout(format!(
            "tokens * heads = {} rows but the backward indexes rows with i32 (at most {})",
            rows_q.max(rows_k),
            i32::MAX
        )));
    }
    let optin = gpu.info().max_shared_per_block_optin as usize;
    let smem_kv = bwd_kv_smem_bytes(d, mode);
    let smem_dq = bwd_dq_smem_bytes(d);
    let needed = if mode == BwdMode::Deterministic {
        smem_kv.max(smem_dq)
    } else {
        smem_kv
    };
    if optin < needed {
        return Err(AttnError::Heads(format!(
            "the backward at D = {d} needs {needed} bytes of shared memory per block but this \
             GPU allows {optin}"
        )));
    }
    let (max_lq, max_lk) = p.seqs.max_lens();
    let batch = p.seqs.batch();

    let stream = gpu.stream();
    let (q_ptr, _gq) = q.device_ptr(stream);
    let (k_ptr, _gk) = k.device_ptr(stream);
    let (v_ptr, _gv) = v.device_ptr(stream);
    let (o_ptr, _go) = out.device_ptr(stream);
    let (lse_ptr, _gl) = lse.device_ptr(stream);
    let (do_ptr, _gdo) = dout.device_ptr(stream);
    let (dq_ptr, _gdq) = grads.dq.device_ptr_mut(stream);
    let (dk_ptr, _gdk) = grads.dk.device_ptr_mut(stream);
    let (dv_ptr, _gdv) = grads.dv.device_ptr_mut(stream);
    let (acc_ptr, _gacc) = ws.dq_accum.device_ptr_mut(stream);
    let (delta_ptr, _gdelta) = ws.delta.device_ptr_mut(stream);
    let mut params = base_params(gpu, pb);
    params.q = q_ptr;
    params.k = k_ptr;
    params.v = v_ptr;
    params.o = o_ptr;
    params.lse = lse_ptr;
    params.dout = do_ptr;
    params.dq = dq_ptr;
    params.dk = dk_ptr;
    params.dv = dv_ptr;
    params.dq_accum = acc_ptr;
    params.delta = delta_ptr;

    // Prologue, forward half: q_hat, k_hat into the workspace; the attention backward runs
    // on them. `pro` keeps the prologue's device pointers, `guards` their stream guards.
    let (norm_rope, mut norm_grads) = match prologue {
        Some(pr) => (Some(pr.norm_rope), Some(pr.grads)),
        None => (None, None),
    };
    let mut guards: Vec<SyncOnDrop<'_>> = Vec::new();
    let mut pro: Option<ProloguePtrs> = None;
    if let (Some(nr), Some(ng), Some(pw)) = (norm_rope, norm_grads.as_mut(), ws.prologue.as_mut()) {
        macro_rules! ptr {
            ($e:expr) => {{
                let (p, g) = $e;
                guards.push(g);
                p
            }};
        }
        let pp = ProloguePtrs {
            q_norm: ptr!(nr.q_norm.device_ptr(stream)),
            k_norm: ptr!(nr.k_norm.device_ptr(stream)),
            rope: ptr!(nr.rope.table.device_ptr(stream)),
            q_hat: ptr!(pw.q_hat.device_ptr_mut(stream)),
            k_hat: ptr!(pw.k_hat.device_ptr_mut(stream)),
            dk_accum: ptr!(pw.dk_accum.device_ptr_mut(stream)),
            partial: ptr!(pw.partial.device_ptr_mut(stream)),
            dq_norm: ptr!(ng.dq_norm.device_ptr_mut(stream)),
            dk_norm: ptr!(ng.dk_norm.device_ptr_mut(stream)),
        };
        params.q_norm = pp.q_norm;
        params.k_norm = pp.k_norm;
        params.rope = pp.rope;
        params.eps = nr.eps;
        params.max_pos = nr.rope.max_positions as i32;
        let name = bwd_name::<T>("norm_rope_pos", d);
        for (x, y, w, rows, heads, is_q) in [
            (q_ptr, pp.q_hat, pp.q_norm, rows_q, hq, 1),
            (k_ptr, pp.k_hat, pp.k_norm, rows_k, hkv, 0),
        ] {
            launch(
                gpu,
                name,
                (rows.div_ceil(super::norm_rows_per_block(d)), 1, 1),
                super::NORM_THREADS,
                0,
                &[
                    Arg::Params(&params),
                    Arg::Ptr(x),
                    Arg::Ptr(y),
                    Arg::Ptr(w),
                    Arg::I32(rows as i32),
                    Arg::I32(heads as i32),
                    Arg::I32(is_q),
                ],
            )?;
        }
        params.q = pp.q_hat;
        params.k = pp.k_hat;
        pro = Some(pp);
    }
    let dk_f32 = pro.as_ref().map_or(0, |x| x.dk_accum);

    // delta = rowsum(dO * O); zero dq_accum for the atomic mode.
    let atomic = mode == BwdMode::Atomic;
    launch(
        gpu,
        bwd_name::<T>("flash_bwd_pre", d),
        (rows_q.div_ceil(ROW_WARPS), 1, 1),
        (ROW_WARPS * 32) as u32,
        0,
        &[Arg::Params(&params), Arg::I32(atomic as i32)],
    )?;
    // dK, dV (and atomic dQ) per key block.
    let mut kv_params = params;
    let per_sm = if d == 64 { 2 } else { 1 }; // the kernels' __launch_bounds__
    let (kv_grid, kv_pair) = pb.tile_grid(gpu, max_lk.div_ceil(BWD_BLOCK_N), hkv, Some(per_sm));
    kv_params.pair_tiles = kv_pair;
    launch(
        gpu,
        bwd_name::<T>(
            match (atomic, kv_pair != 0) {
                (true, false) => "flash_bwd_kv_dq",
                (false, false) => "flash_bwd_kv",
                (true, true) => "flash_bwd_kv_dq_pair",
                (false, true) => "flash_bwd_kv_pair",
            },
            d,
        ),
        (kv_grid as usize, hkv, batch),
        KV_THREADS,
        smem_kv,
        &[Arg::Params(&kv_params), Arg::Ptr(dk_f32)],
    )?;
    if atomic {
        if pro.is_none() {
            let n = p.q_len();
            launch(
                gpu,
                if T::NAME == "bf16" {
                    "flash_bwd_dq_convert_bf16"
                } else {
                    "flash_bwd_dq_convert_f16"
                },
                ((n / 4).div_ceil(256), 1, 1),
                256,
                0,
                &[Arg::Params(&params), Arg::I64(n as i64)],
            )?;
        }
    } else {
        let mut dq_params = params;
        let (dq_grid, dq_pair) = pb.tile_grid(gpu, max_lq.div_ceil(BWD_DQ_BLOCK_M), hq, None);
        dq_params.pair_tiles = dq_pair;
        launch(
            gpu,
            bwd_name::<T>("flash_bwd_dq", d),
            (dq_grid as usize, hq, batch),
            DQ_THREADS,
            smem_dq,
            &[Arg::Params(&dq_params), Arg::I32(pro.is_some() as i32)],
        )?;
    }

    // Prologue, backward half: raw dq, dk from d(q_hat) (dq_accum) and d(k_hat) (dk_accum),
    // and the weight gradients through per-block partials and an ordered reduction.
    if let Some(pp) = &pro {
        let name = bwd_name::<T>("norm_rope_bwd", d);
        for (x, dy, dx, w, dw, rows, heads, is_q) in [
            (q_ptr, acc_ptr, dq_ptr, pp.q_norm, pp.dq_norm, rows_q, hq, 1),
            (
                k_ptr,
                pp.dk_accum,
                dk_ptr,
                pp.k_norm,
                pp.dk_norm,
                rows_k,
                hkv,
                0,
            ),
        ] {
            let blocks = norm_blocks(rows);
            launch(
                gpu,
                name,
                (if rows == 0 { 0 } else { blocks }, 1, 1),
                (ROW_WARPS * 32) as u32,
                0,
                &[
                    Arg::Params(&params),
                    Arg::Ptr(x),
                    Arg::Ptr(dy),
                    Arg::Ptr(dx),
                    Arg::Ptr(w),
                    Arg::Ptr(pp.partial),
                    Arg::I32(rows as i32),
                    Arg::I32(heads as i32),
                    Arg::I32(is_q),
                ],
            )?;
            // with no rows the partials are not written: reduce none of them (dw = 0)
            let used = if rows == 0 { 0 } else { blocks };
            launch(
                gpu,
                "norm_grad_reduce",
                (d.div_ceil(128), 1, 1),
                128,
                0,
                &[
                    Arg::Ptr(pp.partial),
                    Arg::Ptr(dw),
                    Arg::I32(used as i32),
                    Arg::I32(d as i32),
                ],
            )?;
        }
    }
    drop(guards);
    Ok(())
}

/// Device addresses of the prologue's buffers during one backward call.
struct ProloguePtrs {
    q_norm: u64,
    k_norm: u64,
    rope: u64,
    q_hat: u64,
    k_hat: u64,
    dk_accum: u64,
    partial: u64,
    dq_norm: u64,
    dk_norm: u64,
}
