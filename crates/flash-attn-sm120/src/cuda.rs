//! CUDA paths (feature `cuda`): FlashAttention forward (kernels-cuda/kernels/flash_fwd.cu),
//! backward ([`flash_attn_bwd_cuda`], kernels-cuda/kernels/flash_bwd.cu) and the standalone
//! QK-Norm + RoPE kernel, on cudarc buffers, launched on
//! [`Gpu::stream`](tritter_kernels_cuda::Gpu::stream).
//!
//! A problem is uploaded once ([`ProblemGpu`]: cu_seqlens, prefix lengths, document ids and
//! positions, validated on the host), then any number of launches reuse it, so a training
//! step or an inference engine pays no per-call host-to-device copies.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use half::{bf16, f16};
use tritter_kernels_cuda::{images, Gpu, KernelError};

use crate::error::{AttnError, Result};
pub use crate::params::TileSchedule;
use crate::params::{MaskMode, NormRope, Positions, Problem, Seqs};

mod bwd;
pub use bwd::{
    bwd_dq_smem_bytes, bwd_kv_smem_bytes, flash_attn_bwd_cuda, BwdMode, BwdWorkspace, GradsGpu,
    NormGradsGpu, PrologueBwd, BWD_BLOCK_M, BWD_BLOCK_N, BWD_DQ_BLOCK_M,
};

/// Query rows per CTA of the forward kernel (`kBM` in flash_fwd.cu).
pub const FWD_BLOCK_M: usize = 128;

/// Keys per block and threads per CTA of the forward kernel at head dim `d` (`FwdCfg` in
/// flash_fwd.cu: 128 keys and 8 warps at D = 128, 64 keys and 4 warps at D = 64).
pub fn fwd_tile(d: usize) -> (usize, u32) {
    if d == 128 {
        (128, 256)
    } else {
        (64, 128)
    }
}

/// The 16-bit float types the kernels take.
pub trait AttnDtype: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static {
    /// Kernel name infix (`bf16` or `f16`).
    const NAME: &'static str;
    /// Widens to f32 (exact).
    fn to_f32(self) -> f32;
    /// Rounds to nearest even.
    fn from_f32(v: f32) -> Self;
}

impl AttnDtype for bf16 {
    const NAME: &'static str = "bf16";
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl AttnDtype for f16 {
    const NAME: &'static str = "f16";
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// The parameter block of the kernels, field by field `tritter::flash::Params` in
/// kernels-cuda/kernels/flash_attn.cuh (device addresses as u64, 0 = null).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct FlashParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    cu_q: u64,
    cu_k: u64,
    prefix_lens: u64,
    doc_ids: u64,
    q_norm: u64,
    k_norm: u64,
    rope: u64,
    pos_q: u64,
    pos_k: u64,
    dout: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    dq_accum: u64,
    delta: u64,
    batch: i32,
    hq: i32,
    hkv: i32,
    lq: i32,
    lk: i32,
    total_q: i32,
    mode: i32,
    window: i32,
    sinks: i32,
    max_pos: i32,
    scale: f32,
    scale_log2: f32,
    eps: f32,
    pair_tiles: i32,
}

// SAFETY: a #[repr(C)] struct of integers and floats whose layout matches the kernels'
// `Params` (8-byte pointers first, then 4-byte fields, 216 bytes), passed by value.
unsafe impl DeviceRepr for FlashParams {}

/// RoPE `(cos, sin)` table `(max_positions, D/2)` f32 on the device, computed on the host in
/// f64 like the reference model's tables (`angle = pos * theta^(-2i/D)`), so the fused kernel
/// rotates with one table read per element instead of an accurate `sincos` (whose large-angle
/// range reduction would cost more than the attention math per key block).
///
/// Memory: `max_positions * D * 4` bytes (32 MiB for 128K positions at D = 64, 64 MiB at
/// D = 128), shared by every layer.
pub struct RopeTable {
    table: CudaSlice<f32>,
    head_dim: usize,
    theta: f32,
    max_positions: usize,
}

impl std::fmt::Debug for RopeTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RopeTable")
            .field("head_dim", &self.head_dim)
            .field("theta", &self.theta)
            .field("max_positions", &self.max_positions)
            .finish()
    }
}

impl RopeTable {
    /// The host table `(max_positions, D/2, 2)`: `(cos, sin)` of `pos * theta^(-2i/D)`.
    pub fn host_table(head_dim: usize, theta: f32, max_positions: usize) -> Vec<f32> {
        let half = head_dim / 2;
        let inv: Vec<f64> = (0..half)
            .map(|i| f64::from(theta).powf(-2.0 * i as f64 / head_dim as f64))
            .collect();
        let mut t = Vec::with_capacity(max_positions * head_dim);
        for pos in 0..max_positions {
            for &f in &inv {
                let a = pos as f64 * f;
                t.push(a.cos() as f32);
                t.push(a.sin() as f32);
            }
        }
        t
    }

    /// Builds and uploads the table for positions `0..max_positions`.
    pub fn new(gpu: &Gpu, head_dim: usize, theta: f32, max_positions: usize) -> Result<Self> {
        NormRope {
            eps: 1.0,
            rope_theta: theta,
        }
        .validate()?;
        if !crate::SUPPORTED_HEAD_DIMS.contains(&head_dim) {
            return Err(AttnError::Heads(format!(
                "RoPE table head dim is {head_dim}; expected one of {:?}",
                crate::SUPPORTED_HEAD_DIMS
            )));
        }
        if max_positions == 0 || max_positions > i32::MAX as usize {
            return Err(AttnError::Layout(format!(
                "RoPE table max_positions is {max_positions} but expected 1 ..= {}",
                i32::MAX
            )));
        }
        let host = Self::host_table(head_dim, theta, max_positions);
        let table = gpu
            .stream()
            .clone_htod(&host)
            .map_err(|e| KernelError::driver("uploading the RoPE table")(e))?;
        Ok(RopeTable {
            table,
            head_dim,
            theta,
            max_positions,
        })
    }

    /// Head dim `D` of the table.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// RoPE base.
    pub fn theta(&self) -> f32 {
        self.theta
    }

    /// Positions covered: `0..max_positions`.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }
}

/// The fused QK-Norm + RoPE prologue's device inputs: weights `(D,)`, eps and the table.
#[derive(Debug, Clone, Copy)]
pub struct NormRopeGpu<'a, T: AttnDtype> {
    /// QK-Norm weight of q `(D,)`.
    pub q_norm: &'a CudaSlice<T>,
    /// QK-Norm weight of k `(D,)`.
    pub k_norm: &'a CudaSlice<T>,
    /// RMSNorm epsilon (theta comes from the table).
    pub eps: f32,
    /// `(cos, sin)` table covering every position of the problem.
    pub rope: &'a RopeTable,
}

/// A validated [`Problem`] with its index arrays on the device, reusable across launches.
#[derive(Debug)]
pub struct ProblemGpu {
    problem: Problem,
    cu_q: Option<CudaSlice<i32>>,
    cu_k: Option<CudaSlice<i32>>,
    prefix_lens: Option<CudaSlice<i32>>,
    doc_ids: Option<CudaSlice<i32>>,
    pos_q: Option<CudaSlice<i32>>,
    pos_k: Option<CudaSlice<i32>>,
    /// Largest RoPE position any token uses (+1 = table rows needed).
    max_position: usize,
    max_lq: usize,
    schedule: TileSchedule,
}

fn upload(gpu: &Gpu, what: &str, v: Option<&Vec<i32>>) -> Result<Option<CudaSlice<i32>>> {
    v.map(|v| {
        gpu.stream()
            .clone_htod(v)
            .map_err(|e| KernelError::driver(format!("uploading {what}"))(e).into())
    })
    .transpose()
}

impl ProblemGpu {
    /// Validates `problem` and `positions` and uploads their arrays.
    pub fn new(gpu: &Gpu, problem: Problem, positions: Positions) -> Result<Self> {
        problem.validate()?;
        problem.check_positions(&positions)?;
        let (cu_q, cu_k) = match &problem.seqs {
            Seqs::Varlen { cu_q, cu_k } => (
                upload(gpu, "cu_seqlens_q", Some(cu_q))?,
                upload(gpu, "cu_seqlens_k", Some(cu_k))?,
            ),
            Seqs::Fixed { .. } => (None, None),
        };
        let (max_lq, max_lk) = problem.seqs.max_lens();
        let default_max = max_lq.max(max_lk).saturating_sub(1);
        let max_of = |p: &Option<Vec<i32>>| {
            p.as_ref()
                .map(|p| p.iter().copied().max().unwrap_or(0).max(0) as usize)
        };
        let max_position = max_of(&positions.q)
            .unwrap_or(default_max)
            .max(max_of(&positions.k).unwrap_or(default_max));
        Ok(ProblemGpu {
            prefix_lens: upload(gpu, "prefix_lens", problem.inputs.prefix_lens.as_ref())?,
            doc_ids: upload(gpu, "doc_ids", problem.inputs.doc_ids.as_ref())?,
            pos_q: upload(gpu, "positions.q", positions.q.as_ref())?,
            pos_k: upload(gpu, "positions.k", positions.k.as_ref())?,
            cu_q,
            cu_k,
            problem,
            max_position,
            max_lq,
            schedule: TileSchedule::Auto,
        })
    }

    /// The host description.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }

    /// Sets how the kernels' CTAs take their tiles (default [`TileSchedule::Auto`]); results
    /// are the same either way (the deterministic mode bit for bit).
    pub fn set_tile_schedule(&mut self, schedule: TileSchedule) {
        self.schedule = schedule;
    }

    /// How the kernels' CTAs take their tiles.
    pub fn tile_schedule(&self) -> TileSchedule {
        self.schedule
    }

    /// Grid x and the `pair_tiles` flag of a launch over `tiles` tiles (of the longest
    /// sequence) and `heads` heads per sequence; `tail_slots` as in
    /// [`TileSchedule::pairs`].
    pub(crate) fn tile_grid(
        &self,
        gpu: &Gpu,
        tiles: usize,
        heads: usize,
        tail_slots: Option<usize>,
    ) -> (u32, i32) {
        let p = &self.problem;
        let sms = gpu.info().sm_count as usize;
        if self
            .schedule
            .pairs(&p.mask, tiles, heads * p.seqs.batch(), sms, tail_slots)
        {
            (tiles.div_ceil(2) as u32, 1)
        } else {
            (tiles as u32, 0)
        }
    }
}

fn opt_ptr(gpu: &Gpu, s: &Option<CudaSlice<i32>>) -> u64 {
    s.as_ref().map_or(0, |s| s.device_ptr(gpu.stream()).0)
}

/// Shared memory of the forward kernel at head dim `d`: Q, K, V tiles, the tile's doc ids
/// and the prologue's q norm weight (f32).
pub fn fwd_smem_bytes(d: usize) -> usize {
    let bn = fwd_tile(d).0;
    (FWD_BLOCK_M + 2 * bn) * d * 2 + bn * 4 + d * 4
}

/// Threads per block of the `norm_rope_pos` kernel (flash_bwd.cu).
const NORM_THREADS: u32 = 256;

/// Rows (token, head) per block of `norm_rope_pos`: D / 16 threads share a row.
fn norm_rows_per_block(d: usize) -> usize {
    NORM_THREADS as usize * 16 / d
}

/// The fused QK-Norm + RoPE prologue of a forward call: its inputs and the workspace that
/// receives the normalized, rotated keys `(total_k, Hkv, D)`.
///
/// Q is normalized as the attention kernel loads it. K is read by every query block and every
/// head of its GQA group, so normalizing it on each load repeats the work `L / 128 * Hq / Hkv`
/// times (measured 1.6x slower at L = 8K on an H100); instead a pre-kernel normalizes it once
/// into `k_hat`, and the attention kernel, launched with programmatic dependent launch,
/// overlaps its Q prologue with it.
#[derive(Debug)]
pub struct PrologueFwd<'a, 'b, T: AttnDtype> {
    /// Weights, eps and RoPE table.
    pub norm_rope: &'b NormRopeGpu<'a, T>,
    /// Workspace like k `(total_k, Hkv, D)`: the normalized, rotated keys.
    pub k_hat: &'b mut CudaSlice<T>,
}

fn check_slice<T>(
    p: &Problem,
    what: &'static str,
    s: &CudaSlice<T>,
    expected: usize,
) -> Result<()> {
    p.check_len(what, s.len(), expected)
}

/// Attention forward on the GPU: `out = softmax(q k^T * scale + mask) v` `(total_q, Hq, D)`
/// and the natural-log `lse` (`(B, Hq, Lq)`, or `(Hq, total_q)` for varlen), with q
/// `(total_q, Hq, D)`, k/v `(total_k, Hkv, D)` in `T`. With `prologue`, q and k are raw:
/// QK-Norm + RoPE is applied to q as the kernel loads it and to k once, into
/// [`PrologueFwd::k_hat`] ([`PrologueFwd`] says why).
///
/// Every length, the head shapes, the mask and (with a prologue) the RoPE table's coverage are
/// checked before the launch. Asynchronous on `gpu.stream()`.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_fwd_cuda<T: AttnDtype>(
    gpu: &Gpu,
    pb: &ProblemGpu,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    out: &mut CudaSlice<T>,
    lse: &mut CudaSlice<f32>,
    prologue: Option<PrologueFwd<'_, '_, T>>,
) -> Result<()> {
    let p = &pb.problem;
    p.check_lens(q.len(), k.len(), v.len())?;
    check_slice(p, "out", out, p.q_len())?;
    check_slice(p, "lse", lse, p.lse_len())?;
    let d = p.heads.dim;
    if let Some(pro) = &prologue {
        check_prologue(p, pro.norm_rope, pb.max_position)?;
        check_slice(p, "k_hat", pro.k_hat, p.kv_len())?;
    }
    let smem = fwd_smem_bytes(d);
    let optin = gpu.info().max_shared_per_block_optin as usize;
    if optin < smem {
        return Err(AttnError::Heads(format!(
            "the forward kernel at D = {d} needs {smem} bytes of shared memory per block but \
             this GPU allows {optin}"
        )));
    }
    let name = kernel_name::<T>("flash_fwd", prologue.is_some(), d);
    let func = gpu.function(&images::FLASH_FWD, name)?;
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(|e| KernelError::driver(format!("raising {name}'s shared memory limit"))(e))?;

    let stream = gpu.stream();
    let (q_ptr, _gq) = q.device_ptr(stream);
    let (k_ptr, _gk) = k.device_ptr(stream);
    let (v_ptr, _gv) = v.device_ptr(stream);
    let (o_ptr, _go) = out.device_ptr_mut(stream);
    let (lse_ptr, _gl) = lse.device_ptr_mut(stream);
    let mut params = base_params(gpu, pb);
    params.q = q_ptr;
    params.k = k_ptr;
    params.v = v_ptr;
    params.o = o_ptr;
    params.lse = lse_ptr;
    let (grid_x, pair) = pb.tile_grid(gpu, pb.max_lq.div_ceil(FWD_BLOCK_M), p.heads.q, None);
    params.pair_tiles = pair;
    let cfg = LaunchConfig {
        grid_dim: (grid_x, p.heads.q as u32, p.seqs.batch() as u32),
        block_dim: (fwd_tile(d).1, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let Some(pro) = prologue else {
        let mut launch = stream.launch_builder(&func);
        launch.arg(&params);
        // SAFETY: `flash_fwd_*(Params)`; every buffer length was checked against the problem
        // above, the index arrays were validated and uploaded by ProblemGpu::new, and the
        // guards keep the buffers alive and ordered until the launch is queued.
        unsafe { launch.launch(cfg) }
            .map_err(|e| KernelError::driver(format!("launching {name}"))(e))?;
        return Ok(());
    };
    let nr = pro.norm_rope;
    let (qn, _gqn) = nr.q_norm.device_ptr(stream);
    let (rt, _grt) = nr.rope.table.device_ptr(stream);
    params.q_norm = qn;
    params.rope = rt;
    params.eps = nr.eps;
    params.max_pos = nr.rope.max_positions as i32;

    // 1. k_hat = norm_rope(k), once per call (triggers the dependent launch at its start).
    let norm_name = bwd::bwd_name::<T>("norm_rope_pos", d);
    let norm = gpu.function(&images::FLASH_BWD, norm_name)?;
    let rows = p.seqs.total_k() * p.heads.kv;
    let (rows_i, heads_i, is_q) = (rows as i32, p.heads.kv as i32, 0i32);
    let mut launch = stream.launch_builder(&norm);
    launch
        .arg(&params)
        .arg(k)
        .arg(&mut *pro.k_hat)
        .arg(nr.k_norm)
        .arg(&rows_i)
        .arg(&heads_i)
        .arg(&is_q);
    // SAFETY: `norm_rope_pos_*(Params, const T* x, T* y, const T* w, int rows, int heads,
    // int is_q)`: k and k_hat hold rows * D elements, k_norm D (checked above); positions come
    // from the validated problem and are covered by the table (check_prologue).
    unsafe {
        launch.launch(LaunchConfig {
            grid_dim: (rows.div_ceil(norm_rows_per_block(d)).max(1) as u32, 1, 1),
            block_dim: (NORM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(|e| KernelError::driver(format!("launching {norm_name}"))(e))?;

    // 2. attention over raw q (normalized on load) and k_hat, overlapping step 1 up to its
    // pdl_wait.
    let (kh, _gkh) = pro.k_hat.device_ptr(stream);
    params.k = kh;
    let mut slot = params;
    let mut args = [&mut slot as *mut FlashParams as *mut std::ffi::c_void];
    // SAFETY: the one parameter is the Params block by value (checked as above); the kernel
    // reads k_hat, the only buffer the previous kernel writes, after its pdl_wait.
    unsafe { gpu.launch_pdl_raw(&func, name, cfg, &mut args) }?;
    Ok(())
}

fn check_prologue<T: AttnDtype>(
    p: &Problem,
    nr: &NormRopeGpu<'_, T>,
    max_position: usize,
) -> Result<()> {
    let d = p.heads.dim;
    check_slice(p, "q_norm", nr.q_norm, d)?;
    check_slice(p, "k_norm", nr.k_norm, d)?;
    NormRope {
        eps: nr.eps,
        rope_theta: nr.rope.theta,
    }
    .validate()?;
    if nr.rope.head_dim != d {
        return Err(AttnError::Heads(format!(
            "the RoPE table is for D = {} but the problem has D = {d}",
            nr.rope.head_dim
        )));
    }
    if max_position >= nr.rope.max_positions {
        return Err(AttnError::Layout(format!(
            "a token has RoPE position {max_position} but the table covers 0..{}; build it \
             with max_positions > {max_position}",
            nr.rope.max_positions
        )));
    }
    Ok(())
}

fn base_params(gpu: &Gpu, pb: &ProblemGpu) -> FlashParams {
    let p = &pb.problem;
    let (lq, lk) = match p.seqs {
        Seqs::Fixed { lq, lk, .. } => (lq as i32, lk as i32),
        Seqs::Varlen { .. } => (0, 0),
    };
    let (window, sinks) = p.kernel_window_sinks();
    FlashParams {
        cu_q: opt_ptr(gpu, &pb.cu_q),
        cu_k: opt_ptr(gpu, &pb.cu_k),
        prefix_lens: opt_ptr(gpu, &pb.prefix_lens),
        doc_ids: opt_ptr(gpu, &pb.doc_ids),
        pos_q: opt_ptr(gpu, &pb.pos_q),
        pos_k: opt_ptr(gpu, &pb.pos_k),
        batch: p.seqs.batch() as i32,
        hq: p.heads.q as i32,
        hkv: p.heads.kv as i32,
        lq,
        lk,
        total_q: p.seqs.total_q() as i32,
        mode: match p.mask.mode {
            MaskMode::Causal => 0,
            MaskMode::Bidirectional => 1,
            MaskMode::PrefixLm => 2,
        },
        window,
        sinks,
        scale: p.heads.softmax_scale,
        scale_log2: p.heads.softmax_scale * std::f32::consts::LOG2_E,
        ..FlashParams::default()
    }
}

/// The entry of `names` spelled `{base}_{bf16|f16}_d{d}` (T's name), or `missing` (a name
/// the module lacks, so the lookup fails with the driver's error). `Gpu::function` caches by
/// `&'static str`; the match compares slices, so a launch allocates nothing.
fn static_name<T: AttnDtype>(
    names: &'static [&'static str],
    base: &str,
    d: usize,
    missing: &'static str,
) -> &'static str {
    names
        .iter()
        .find(|n| {
            n.strip_prefix(base)
                .and_then(|r| r.strip_prefix('_'))
                .and_then(|r| r.strip_prefix(T::NAME))
                .and_then(|r| r.strip_prefix("_d"))
                .is_some_and(|r| r.parse() == Ok(d))
        })
        .copied()
        .unwrap_or(missing)
}

fn kernel_name<T: AttnDtype>(base: &str, norm_rope: bool, d: usize) -> &'static str {
    const NAMES: [&str; 8] = [
        "flash_fwd_bf16_d64",
        "flash_fwd_bf16_d128",
        "flash_fwd_f16_d64",
        "flash_fwd_f16_d128",
        "flash_fwd_nr_bf16_d64",
        "flash_fwd_nr_bf16_d128",
        "flash_fwd_nr_f16_d64",
        "flash_fwd_nr_f16_d128",
    ];
    let base = if norm_rope { "flash_fwd_nr" } else { base };
    static_name::<T>(&NAMES, base, d, "flash_fwd_missing")
}

/// Standalone QK-Norm + RoPE: `x` `(tokens, heads, D)` -> `y`, RMSNorm with `weight` `(D,)`
/// then RoPE at `positions` `(tokens,)` (token index when `None`). One warp per row; used to
/// store normalized keys in a KV cache, and as the unfused baseline of the benches.
/// Host positions are checked against the table and uploaded (4 bytes per token).
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope_cuda<T: AttnDtype>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
    tokens: usize,
    heads: usize,
    weight: &CudaSlice<T>,
    eps: f32,
    rope: &RopeTable,
    positions: Option<&[i32]>,
) -> Result<()> {
    let d = rope.head_dim;
    let rows = tokens * heads;
    let shape = |what: &'static str, actual: usize, expected: usize| {
        if actual == expected {
            Ok(())
        } else {
            Err(AttnError::Shape {
                what,
                actual,
                expected,
                detail: format!("(tokens={tokens}, heads={heads}, D={d})"),
            })
        }
    };
    shape("x", x.len(), rows * d)?;
    shape("y", y.len(), rows * d)?;
    shape("weight", weight.len(), d)?;
    if let Some(p) = positions {
        shape("positions", p.len(), tokens)?;
    }
    NormRope {
        eps,
        rope_theta: rope.theta,
    }
    .validate()?;
    if let Some(t) = positions.and_then(|p| p.iter().position(|&x| x < 0)) {
        return Err(AttnError::Layout(format!(
            "positions[{t}] is {} but expected a position >= 0",
            positions.map_or(0, |p| p[t])
        )));
    }
    let top = positions.map_or(tokens.saturating_sub(1), |p| {
        p.iter().copied().max().unwrap_or(0).max(0) as usize
    });
    if top >= rope.max_positions {
        return Err(AttnError::Layout(format!(
            "positions reach {top} but the RoPE table covers 0..{}",
            rope.max_positions
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    if rows > i32::MAX as usize {
        return Err(AttnError::Layout(format!(
            "tokens * heads = {rows} rows but expected at most {}",
            i32::MAX
        )));
    }
    let name: &'static str = match (T::NAME, d) {
        ("bf16", 64) => "qk_norm_rope_bf16_d64",
        ("bf16", _) => "qk_norm_rope_bf16_d128",
        (_, 64) => "qk_norm_rope_f16_d64",
        _ => "qk_norm_rope_f16_d128",
    };
    let func = gpu.function(&images::FLASH_FWD, name)?;
    const WARPS: usize = 8;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(WARPS) as u32, 1, 1),
        block_dim: (WARPS as u32 * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_i, heads_i) = (rows as i32, heads as i32);
    let null: u64 = 0;
    let pos_dev = positions
        .map(|p| gpu.stream().clone_htod(p))
        .transpose()
        .map_err(|e| KernelError::driver("uploading positions")(e))?;
    let mut launch = gpu.stream().launch_builder(&func);
    launch.arg(x).arg(y).arg(weight).arg(&rope.table);
    match &pos_dev {
        Some(p) => launch.arg(p),
        None => launch.arg(&null),
    };
    launch.arg(&rows_i).arg(&heads_i).arg(&eps);
    // SAFETY: `qk_norm_rope_*(const T*, T*, const T*, const float2*, const int*, int, int,
    // float)`; x/y hold rows * D, weight D, positions `tokens` entries, all below the table's
    // rows (checked above).
    unsafe { launch.launch(cfg) }
        .map_err(|e| KernelError::driver(format!("launching {name}"))(e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel a launch asks for resolves to its exact static name (a wrong one would
    /// only fail on the GPU), for both types and head dims.
    #[test]
    fn kernel_names_resolve_exactly() {
        fn check<T: AttnDtype>() {
            for d in crate::SUPPORTED_HEAD_DIMS {
                for nr in [false, true] {
                    let want = format!("flash_fwd{}_{}_d{d}", if nr { "_nr" } else { "" }, T::NAME);
                    assert_eq!(kernel_name::<T>("flash_fwd", nr, d), want);
                }
                for base in [
                    "flash_bwd_pre",
                    "flash_bwd_kv",
                    "flash_bwd_kv_dq",
                    "flash_bwd_kv_pair",
                    "flash_bwd_kv_dq_pair",
                    "flash_bwd_dq",
                    "norm_rope_pos",
                    "norm_rope_bwd",
                ] {
                    let want = format!("{base}_{}_d{d}", T::NAME);
                    assert_eq!(bwd::bwd_name::<T>(base, d), want);
                }
            }
        }
        check::<bf16>();
        check::<f16>();
    }
}
