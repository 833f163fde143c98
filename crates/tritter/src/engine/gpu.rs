//! [`GpuEngine`]: the Tritter forward pass on the kernel crates (feature `cuda`), the same
//! model as the [`CpuEngine`](super::CpuEngine) with every weight resident on the device and
//! no host round trip inside a step.
//!
//! Per step (rows of all sequences stacked into `(N, H)`, prompts first, then the decode
//! tokens):
//! * `engine_embed` (bf16 table -> f32 rows) and the A8 quantization of x for layer 0
//!   (ternary-gemm's `act_quant`);
//! * per layer: **one** ternary
//!   GEMV/GEMM for q, k and v (the three matrices concatenated at upload, per-row scales:
//!   one pass over x and one launch instead of three), `engine_qkv_store` (QK-Norm, RoPE at each
//!   row's position, f16, and the step's K/V quantized straight into the paged cache in the
//!   same launch, for every sequence of the step: kv-int4's `write_layer_slots_with`), attention (flash-attn-sm120
//!   varlen over the prompts of new sequences; kv-int4's split-KV decode kernel over the
//!   INT4 or f16 pages for single tokens), A8 + the o-projection GEMV,
//!   `engine_add_rmsnorm_a8` (Chameleon's normed residual, and the A8 of the new residual
//!   stream for the next projection in the same launch), the fused squared-ReLU GLU MLP on
//!   those codes (ternary-gemm's `ternary_mlp_a8_cuda`), `engine_add_rmsnorm_a8`;
//! * the final norm of the rows whose logits are wanted (bf16) and the LM head through cuBLAS
//!   (bf16 x bf16 -> f32), copied to the host with the step's non-finite counter: the one
//!   synchronization of a step. Through [`GpuEngine::step_top`] (what generation uses) a
//!   row whose sampler needs only its best `k <= 64` ids gets them selected on the device
//!   (`engine_top_candidates`, the host's order and filters) and only those pairs cross to
//!   the host instead of `V` logits.
//!
//! Decode steps (every sequence of the step appends one token) are replayed from a CUDA graph:
//! their inputs (ids, positions, pool slots, block tables, lengths) live in device buffers
//! refilled in place, so the second step of a shape is captured and later steps launch the
//! whole forward pass (some 450 kernels for 32 layers) with one call. A graph is keyed by the
//! cache, the decode kernels' split plan and block-table stride and the decode workspace; a
//! step with another key runs eagerly and is captured when its key repeats. The cache's
//! bookkeeping is done on the host as for an eager step ([`kv_int4`]'s
//! `record_graph_writes`).
//!
//! Prompts of sequences that already hold tokens (a second prompt chunk) run token by token
//! through the decode path, so set `KvCacheOptions::max_prefill_chunk` to the longest
//! prompt. A prompt attends to its own K/V as the cache stores them (f16, or the INT4 round
//! trip), as later tokens read them and as the CPU engine computes. The logits equal the CPU
//! engine's within the f16 rounding of q/k/v and the attention output and the f32 summation
//! order, not bit for bit (`tests/gpu_engine.rs` states the tolerances). Every kernel of a
//! decode step sums in a fixed order, so a step is bit-reproducible and a graph replay equals
//! the eager launches.
//!
//! Pre-norm checkpoints with sub-norms (Hugging Face BitNet) are refused for now: their
//! MLP needs the sub-norm between the GLU and the down projection, which the fused MLP kernel
//! does not have; they run on the CPU engine.

use std::collections::{BTreeMap, HashMap};
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas_result, sys as blas_sys};
use cudarc::driver::result::{self as driver_result, DriverError};
use cudarc::driver::sys::{
    CUevent_flags, CUgraphInstantiate_flags, CUresult, CUstreamCaptureMode, CUstreamCaptureStatus,
};
use cudarc::driver::{
    CudaEvent, CudaGraph, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use flash_attn_sm120::cuda::{flash_attn_fwd_cuda, ProblemGpu};
use flash_attn_sm120::{Heads, Mask, MaskInputs, Positions, Problem, Seqs};
use half::{bf16, f16};
use kv_int4::cuda::{
    decode_attention_cuda, round_trip_int4_cuda, split_plan, DecodeBatch, DecodeWorkspace,
    GpuKvCache, SlotBatch,
};
use kv_int4::KvFormat;
use ternary_gemm::cuda::{
    ternary_matmul_a8_cuda, ternary_mlp_a8_cuda, GemvActivations, GemvWorkspace, MlpWorkspace,
    TernaryMatrixGpu, TernaryMlpGpu,
};
use ternary_gemm::{TernaryMatrix, TernaryScales};
use tritter_kernels_cuda::capture_gate::{self, GatedBlas};
use tritter_kernels_cuda::{images, Gpu, KernelArgs, KernelError};

use super::checkpoint::{InferenceCheckpoint, LayerNorms};
use super::cpu::{check_step_inputs, run_rounds, wanted_rows, Chunk, RowsWanted, StepInput};
use super::kv::{paged_config, KvCacheFormat, KvCacheOptions, SequenceId};
use super::traits::{check_top_inputs, Engine, EngineCache, StepOutput};
use crate::config::{AttentionMode, TritterConfig};
use crate::generate::{no_candidates, Candidates, TopSpec};
use crate::tokenizer::vocab::NUM_SPECIAL_TOKENS;
use crate::tokenizer::SpecialToken;
use crate::{Result, TritterError};

/// Threads of the row kernels (`kThreads` in engine.cu).
const ROW_THREADS: u32 = 256;
/// Heads per CTA of `engine_qkv_store_*` (one warp each).
const QKV_HEADS_PER_CTA: usize = 4;
/// cuBLAS workspace of the LM head (its recommended size on Hopper).
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;
/// Step sizes whose buffers are kept (decode batch sizes recur; prompt sizes mostly not).
const KEPT_ROW_BUFFERS: usize = 8;

fn alloc_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> TritterError + '_ {
    move |e| KernelError::driver(format!("allocating {what}"))(e).into()
}

fn upload<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, what: &str, v: &[T]) -> Result<CudaSlice<T>> {
    gpu.stream()
        .clone_htod(v)
        .map_err(|e| KernelError::driver(format!("uploading {what}"))(e).into())
}

fn f32s(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// One decoder layer on the device.
struct GpuLayer {
    /// q, k and v stacked: `((Hq + 2 Hkv) * D, H)`, per-row scales.
    qkv: TernaryMatrixGpu,
    o: TernaryMatrixGpu,
    mlp: TernaryMlpGpu,
    attn_norm: CudaSlice<f32>,
    mlp_norm: CudaSlice<f32>,
    /// `(q_norm, k_norm)`, each `(D,)`.
    qk_norm: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
}

/// The buffers of a step of `n` rows.
struct Rows {
    x: CudaSlice<f32>,
    a: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    q: CudaSlice<f16>,
    k: CudaSlice<f16>,
    v: CudaSlice<f16>,
    att: CudaSlice<f16>,
    lse: CudaSlice<f32>,
    x_acts: GemvActivations,
    o_acts: GemvActivations,
    mlp: MlpWorkspace,
}

/// The buffers of steps of one size: the working rows and, for decode steps, the inputs a
/// captured graph reads and the graph itself.
struct RowSet {
    work: Rows,
    decode: Option<DecodeState>,
}

/// What identifies a captured decode graph: the cache it writes, the decode kernels' split
/// plan and block-table stride (launch arguments), and the decode workspace it was captured
/// with (replaced when it grows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GraphKey {
    cache: u64,
    splits: usize,
    tps: usize,
    stride: usize,
    workspace: u64,
    /// Captured with the small kernels launched with PDL ([`StepInputs::pdl`]).
    pdl: bool,
}

/// Device inputs of decode steps of one size, refilled in place every step.
struct DecodeBufs {
    ids: CudaSlice<u32>,
    pos: CudaSlice<i32>,
    /// `0..n`: every row's logits.
    wanted: CudaSlice<i32>,
    hidden: CudaSlice<bf16>,
    logits: CudaSlice<f32>,
    /// `(n, V)` page-locked host copy of `logits` (a pageable copy of batch 32's 8 MB took
    /// milliseconds).
    host: PinnedHostSlice<f32>,
}

/// Waits for `stream` through the driver directly. cudarc's `synchronize` first returns any
/// error another thread recorded on the shared context (its `check_err`), without waiting:
/// after an asynchronous copy into page-locked memory that would let the host read, or
/// free, memory the copy is still writing.
fn wait_for(stream: &cudarc::driver::CudaStream) -> std::result::Result<(), DriverError> {
    // SAFETY: plain driver calls on a live stream of a live context (the caller holds both).
    unsafe {
        driver_result::ctx::set_current(stream.context().cu_ctx())?;
        driver_result::stream::synchronize(stream.cu_stream())
    }
}

impl Drop for DecodeBufs {
    /// A step that failed between its copy into `host` and the wait for it (or was unwound
    /// there) leaves the copy in flight: wait for it before the page-locked memory is freed.
    /// (With event tracking off, `PinnedHostSlice`'s own drop does not wait.)
    fn drop(&mut self) {
        let _ = wait_for(self.logits.stream());
    }
}

impl DecodeBufs {
    fn alloc(g: &Gpu, n: usize, cfg: &TritterConfig) -> std::result::Result<Self, KernelError> {
        let s = g.stream();
        let e = |what: &'static str| KernelError::driver(format!("allocating {what}"));
        let wanted: Vec<i32> = (0..n as i32).collect();
        Ok(DecodeBufs {
            ids: s.alloc_zeros(n).map_err(e("decode token ids"))?,
            pos: s.alloc_zeros(n).map_err(e("decode positions"))?,
            wanted: s.clone_htod(&wanted).map_err(e("decode rows"))?,
            hidden: s
                .alloc_zeros(n * cfg.hidden_size)
                .map_err(e("decode hidden states"))?,
            logits: s
                .alloc_zeros(n * cfg.vocab_size)
                .map_err(e("decode logits"))?,
            // SAFETY: page-locked host memory, uninitialized: every step copies all n rows of
            // logits into it before reading it (forward_round).
            host: unsafe { g.context().alloc_pinned_with_flags(n * cfg.vocab_size, 0) }
                .map_err(e("pinned host logits"))?,
        })
    }
}

/// The decode state of one batch size (see [`GpuEngine`]'s graph notes in the module docs).
#[derive(Default)]
struct DecodeState {
    bufs: Option<DecodeBufs>,
    slots: Option<SlotBatch>,
    batch: Option<DecodeBatch>,
    /// The key of the last eager step: a step with the same key is captured.
    seen: Option<GraphKey>,
    graph: Option<(GraphKey, CudaGraph)>,
}

/// Buffers shared by every step.
struct Shared {
    rows: HashMap<usize, RowSet>,
    gemv: GemvWorkspace,
    decode: DecodeWs,
}

/// The split-KV decode workspace and what it holds.
struct DecodeWs {
    ws: DecodeWorkspace,
    /// `(query rows, splits)` it holds.
    cap: (usize, usize),
    /// Bumped whenever it is reallocated (graphs captured with the old one are stale).
    generation: u64,
}

impl DecodeWs {
    /// Grows the workspace to `rows` query rows of `splits` splits if it is smaller.
    fn reserve(&mut self, g: &Gpu, rows: usize, d: usize, splits: usize) -> Result<()> {
        if self.cap.0 < rows || self.cap.1 < splits {
            let cap = (self.cap.0.max(rows), self.cap.1.max(splits));
            self.ws = DecodeWorkspace::new(g, cap.0, d, cap.1)?;
            self.cap = cap;
            self.generation += 1;
        }
        Ok(())
    }
}

/// Per-step device inputs of [`GpuEngine::launch_step`].
struct StepInputs<'a> {
    n: usize,
    n_prompt: usize,
    ids: &'a CudaSlice<u32>,
    pos: &'a CudaSlice<i32>,
    slots: &'a SlotBatch,
    decode: Option<&'a DecodeBatch>,
    problem: Option<&'a ProblemGpu>,
    wanted: &'a CudaSlice<i32>,
    r: usize,
    /// Launch the small kernels with PDL ([`GpuEngine::set_small_kernel_pdl`]); read once
    /// per step, so a captured graph matches its [`GraphKey`].
    pdl: bool,
}

/// The model on a GPU (module docs). `&self` everywhere: the step buffers sit behind a mutex,
/// so one engine serves one step at a time.
///
/// Threads: the engine is neither `Send` nor `Sync` (its CUDA graphs hold driver handles),
/// so its steps run on the thread that made it; several engines may run on as many
/// threads. It launches on a stream of its own ([`GpuEngine::new`]), so other users of the
/// same [`Gpu`] never end up inside its decode graphs, and a cache steps only with the
/// engine that made it. Caches are `Send`; one dropped on another thread frees its pool
/// under the engine's capture lock, so the free never lands inside a decode graph being
/// captured. Engines of one process create and destroy their cuBLAS handles and drop their
/// decode graphs outside each other's captures (`tritter_kernels_cuda::capture_gate`). A
/// capture is still invalidated when other code makes a context-wide synchronizing call
/// meanwhile (destroying a cuBLAS handle outside the gate, or synchronizing the context, a
/// call that itself fails with `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED` while the capture is
/// open): the step then runs from eager launches, with the same results, and counts in
/// [`GpuEngine::failed_captures`]. So does a step whose launch was refused during the
/// capture (a launch that must not be captured); a genuine error recurs in the eager run and
/// is returned from there.
pub struct GpuEngine {
    gpu: Arc<Gpu>,
    cfg: TritterConfig,
    zero_pad: bool,
    layers: Vec<GpuLayer>,
    /// `(V, H)` bf16.
    embed: CudaSlice<bf16>,
    /// Untied head `(V, H)` bf16.
    lm_head: Option<CudaSlice<bf16>>,
    final_norm: CudaSlice<f32>,
    /// RoPE `inv_freq` `(D/2,)` in f64 (the reference's values).
    inv_freq: CudaSlice<f64>,
    /// Made and destroyed under the capture gate's teardown side; dropped after the decode
    /// graphs that hold its GEMM ([`GpuEngine`]'s drop clears them first).
    blas: GatedBlas,
    /// cuBLAS's workspace (set on the handle).
    _blas_ws: CudaSlice<u8>,
    shared: Mutex<Shared>,
    /// Held from the start to the end of a decode-graph capture; caches hold it too and
    /// free their pools under it ([`GpuCache`]'s drop).
    capture_lock: Arc<Mutex<()>>,
    weight_bytes: usize,
    /// Replay decode steps from CUDA graphs (default on).
    graphs: std::sync::atomic::AtomicBool,
    /// Time per phase (ms, launches) while profiling ([`GpuEngine::set_profiling`]).
    profile: Mutex<BTreeMap<&'static str, (f64, u64)>>,
    profiling: std::sync::atomic::AtomicBool,
    /// [`GpuEngine::set_small_kernel_pdl`].
    pdl_small: std::sync::atomic::AtomicBool,
    /// [`GpuEngine::failed_captures`].
    failed_captures: std::sync::atomic::AtomicU64,
    /// [`GpuEngine::fail_next_capture`].
    fail_next_capture: std::sync::atomic::AtomicBool,
    /// Neither `Send` nor `Sync` on purpose, whatever the fields become: only the thread
    /// that made the engine steps it, so its captures race no other step or cache creation
    /// (the thread notes above).
    _one_thread: std::marker::PhantomData<*const ()>,
}

impl Drop for GpuEngine {
    /// Waits for the engine's stream and drops the decode graphs and their buffers under the
    /// capture gate's exclusive side, so no capture of another engine of this process is open
    /// meanwhile (`tritter_kernels_cuda::capture_gate`); then the fields drop: the cuBLAS
    /// handle whose GEMM those graphs held (under the gate again, [`GatedBlas`]), its
    /// workspace and the other buffers (stream-ordered frees).
    fn drop(&mut self) {
        let _gate = capture_gate::teardown_section();
        let _ = wait_for(self.gpu.stream());
        let shared = self.shared.get_mut().unwrap_or_else(|p| p.into_inner());
        shared.rows.clear();
    }
}

impl std::fmt::Debug for GpuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuEngine")
            .field("layers", &self.layers.len())
            .field("weight_bytes", &self.weight_bytes)
            .finish()
    }
}

/// Ends the capture open on `stream`: the graph, `Ok(None)` for an empty one, or the error.
/// cudarc's `end_capture` can fail before it reaches `cuStreamEndCapture` (an error another
/// thread recorded on the context); the capture is then ended here, so the stream never
/// stays in capture mode and later launches run.
fn end_capture(
    stream: &Arc<cudarc::driver::CudaStream>,
) -> std::result::Result<Option<CudaGraph>, DriverError> {
    let ended = stream.end_capture(CUgraphInstantiate_flags(0));
    if ended.is_err() {
        // SAFETY: our own stream, its context current on this thread (the step just launched
        // on it); a graph returned here was never instantiated and is destroyed at once.
        unsafe {
            if let Ok(status) = driver_result::stream::is_capturing(stream.cu_stream()) {
                if status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
                    if let Ok(g) = driver_result::stream::end_capture(stream.cu_stream()) {
                        if !g.is_null() {
                            let _ = driver_result::graph::destroy(g);
                        }
                    }
                }
            }
        }
    }
    ended
}

/// A capture open on a stream; ends it if dropped before [`OpenCapture::end`] (a panic
/// between the begin and the end of a capture), so the stream never stays capturing.
struct OpenCapture<'a>(Option<&'a Arc<cudarc::driver::CudaStream>>);

impl OpenCapture<'_> {
    /// [`end_capture`] of the stream.
    fn end(mut self) -> std::result::Result<Option<CudaGraph>, DriverError> {
        end_capture(self.0.take().expect("ended once"))
    }
}

impl Drop for OpenCapture<'_> {
    fn drop(&mut self) {
        if let Some(stream) = self.0.take() {
            let _ = end_capture(stream);
        }
    }
}

/// q, k and v of a layer as one matrix `((Hq + 2 Hkv) * D, H)` with per-row scales, so the
/// projection reads x once in one launch; each row's integer product and scale are those of
/// its own matrix, so the outputs are unchanged.
fn stack_rows(parts: &[&TernaryMatrix]) -> Result<TernaryMatrix> {
    let k_in = parts[0].k_in();
    let mut packed = Vec::new();
    let mut scales = Vec::new();
    for m in parts {
        packed.extend_from_slice(m.packed());
        scales.extend((0..m.n_out()).map(|r| m.scales().row(r)));
    }
    let n_out = scales.len();
    Ok(TernaryMatrix::from_packed(
        n_out,
        k_in,
        packed,
        TernaryScales::PerRow(scales),
    )?)
}

impl GpuEngine {
    /// Uploads a validated checkpoint to `gpu`. The config must decode causally, with a head
    /// dim and GQA group the kernels take (D in {64, 128}, Hq / Hkv in {1, 2, 4, 8}); Chameleon
    /// norm placement (Tritter checkpoints).
    ///
    /// The engine works on a stream of its own ([`Gpu::fork`] of `gpu`, returned by
    /// [`GpuEngine::gpu`]): it captures decode steps into CUDA graphs, and a capture would take
    /// in whatever other threads launched on a shared stream meanwhile.
    pub fn new(gpu: &Arc<Gpu>, ckpt: &InferenceCheckpoint) -> Result<Self> {
        ckpt.validate()?;
        let gpu = &gpu.fork()?;
        let cfg = ckpt.config.clone();
        if cfg.attention_mode != AttentionMode::Causal {
            return Err(TritterError::config(
                "attention_mode",
                format!("{:?}", cfg.attention_mode),
                "expected causal: the engine decodes autoregressively from a KV cache",
            ));
        }
        let (d, hq, hkv) = (cfg.head_dim(), cfg.num_heads, cfg.num_kv_heads);
        if !matches!(d, 64 | 128) || !matches!(hq / hkv, 1 | 2 | 4 | 8) {
            return Err(TritterError::config(
                "head_dim / GQA group",
                format!("D = {d}, Hq / Hkv = {}", hq / hkv),
                "D in {64, 128} and Hq / Hkv in {1, 2, 4, 8} for the GPU attention kernels (the CPU engine takes any)",
            ));
        }
        let g = gpu.as_ref();
        let mut weight_bytes = 0;
        let mut layers = Vec::with_capacity(ckpt.layers.len());
        for w in &ckpt.layers {
            let LayerNorms::Chameleon {
                attn_norm,
                mlp_norm,
            } = &w.norms
            else {
                return Err(TritterError::config(
                    "norm_placement",
                    "pre-norm with sub-norms (Hugging Face BitNet)",
                    "Chameleon on the GPU engine for now; run imported models on the CPU engine",
                ));
            };
            let qkv = stack_rows(&[&w.q_proj, &w.k_proj, &w.v_proj])?;
            weight_bytes += qkv.packed_bytes() + w.o_proj.packed_bytes();
            let (gate, up, down) = w.mlp.parts();
            weight_bytes += gate.packed_bytes() + up.packed_bytes() + down.packed_bytes();
            layers.push(GpuLayer {
                qkv: TernaryMatrixGpu::upload(g, &qkv)?,
                o: TernaryMatrixGpu::upload(g, &w.o_proj)?,
                mlp: TernaryMlpGpu::upload(g, &w.mlp)?,
                attn_norm: upload(g, "attn_norm", &f32s(attn_norm))?,
                mlp_norm: upload(g, "mlp_norm", &f32s(mlp_norm))?,
                qk_norm: match &w.qk_norm {
                    Some(q) => Some((
                        upload(g, "q_norm", &f32s(&q.q_norm))?,
                        upload(g, "k_norm", &f32s(&q.k_norm))?,
                    )),
                    None => None,
                },
            });
        }
        weight_bytes += 2 * ckpt.embed_tokens.len();
        weight_bytes += ckpt.lm_head.as_ref().map_or(0, |h| 2 * h.len());
        let inv_freq: Vec<f64> = (0..d / 2)
            .map(|i| cfg.rope_theta.powf(-2.0 * i as f64 / d as f64))
            .collect();
        let max_n_out = layers
            .first()
            .map_or(1, |l| l.qkv.n_out().max(cfg.hidden_size));
        // Made (and, on any error below, destroyed) outside every capture of the process.
        let blas = GatedBlas::new(gpu.stream().clone()).map_err(|e| TritterError::Cublas {
            context: "creating the handle".into(),
            detail: e.to_string(),
        })?;
        // A workspace of our own, so the LM head's GEMM can be captured into a decode graph
        // (cuBLAS would otherwise allocate one on first use inside the capture).
        let mut blas_ws = gpu
            .stream()
            .alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)
            .map_err(alloc_err("the cuBLAS workspace"))?;
        {
            let (ptr, _guard) = blas_ws.device_ptr_mut(gpu.stream());
            // SAFETY: the handle is ours; blas_ws holds BLAS_WORKSPACE_BYTES bytes and lives as
            // long as the engine (dropped after the handle: declared after `blas`).
            let status = unsafe {
                blas_sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut std::ffi::c_void,
                    BLAS_WORKSPACE_BYTES,
                )
            };
            if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(TritterError::Cublas {
                    context: "setting the workspace".into(),
                    detail: format!("{status:?}"),
                });
            }
        }
        Ok(GpuEngine {
            embed: upload(g, "the embedding table", &ckpt.embed_tokens)?,
            lm_head: match &ckpt.lm_head {
                Some(h) => Some(upload(g, "the LM head", h)?),
                None => None,
            },
            final_norm: upload(g, "the final norm", &f32s(&ckpt.final_norm))?,
            inv_freq: upload(g, "RoPE frequencies", &inv_freq)?,
            capture_lock: Arc::new(Mutex::new(())),
            shared: Mutex::new(Shared {
                rows: HashMap::new(),
                gemv: GemvWorkspace::new(g, max_n_out)?,
                decode: DecodeWs {
                    ws: DecodeWorkspace::new(g, hq, d, 1)?,
                    cap: (hq, 1),
                    generation: 0,
                },
            }),
            zero_pad: ckpt.architecture.zero_pad_embedding,
            gpu: gpu.clone(),
            blas,
            _blas_ws: blas_ws,
            layers,
            cfg,
            weight_bytes,
            graphs: std::sync::atomic::AtomicBool::new(true),
            profile: Mutex::new(BTreeMap::new()),
            profiling: std::sync::atomic::AtomicBool::new(false),
            pdl_small: std::sync::atomic::AtomicBool::new(
                std::env::var("TRITTER_PDL_SMALL").map_or(true, |v| v.trim() != "0"),
            ),
            failed_captures: std::sync::atomic::AtomicU64::new(0),
            fail_next_capture: std::sync::atomic::AtomicBool::new(false),
            _one_thread: std::marker::PhantomData,
        })
    }

    /// The model config.
    pub fn config(&self) -> &TritterConfig {
        &self.cfg
    }

    /// The device handle the engine launches on: its own stream (see [`GpuEngine::new`]);
    /// caches and buffers used with the engine belong on it. Launches, allocations or frees
    /// on it from another thread could land inside a decode graph the engine is capturing:
    /// use it from the engine's thread, or only for context-level queries (device info,
    /// free memory).
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Turns the CUDA-graph replay of decode steps on or off (on by default; off runs every
    /// kernel launch from the host, e.g. to compare or to profile single kernels). The
    /// results are the same bit for bit.
    pub fn set_decode_graphs(&self, on: bool) {
        self.graphs.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Launches `engine_qkv_store_*` and `engine_add_rmsnorm_a8` with programmatic dependent
    /// launch while on, so each is resident and waiting when the GEMV before it ends (both
    /// wait before their first read, then release the next kernel: decode attention, or the
    /// next GEMV's weight loads). On by default; `TRITTER_PDL_SMALL=0` sets the default off
    /// (any other value, or none, leaves it on). Off only makes the two launches plain: the
    /// kernels still release their successor after their wait, so the next PDL kernel can
    /// still start early; `TRITTER_PDL=0` turns every PDL launch of the process off. The
    /// results are the same bit for bit; the measured gain is in the crate README.
    pub fn set_small_kernel_pdl(&self, on: bool) {
        self.pdl_small
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether [`set_small_kernel_pdl`](Self::set_small_kernel_pdl) is on (what the next step
    /// reads).
    pub fn small_kernel_pdl(&self) -> bool {
        self.pdl_small.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Times every phase of each step with CUDA events while on (steps then run without
    /// graphs and synchronize once more): what [`take_profile`](Self::take_profile) reports
    /// and `tritter bench --profile` prints.
    pub fn set_profiling(&self, on: bool) {
        self.profiling
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn profiling(&self) -> bool {
        self.profiling.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The profile gathered since the last call, sorted by phase name: `(phase, total ms,
    /// times run)`; the entry `steps` counts the profiled steps (its time is 0).
    pub fn take_profile(&self) -> Vec<(String, f64, u64)> {
        let mut prof = self.profile.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *prof)
            .into_iter()
            .map(|(k, (ms, n))| (k.to_string(), ms, n))
            .collect()
    }

    /// Test hook: the next decode-graph capture is discarded as if it had been invalidated,
    /// so its step takes the recovery path of [`GpuEngine::failed_captures`].
    #[doc(hidden)]
    pub fn fail_next_capture(&self) {
        self.fail_next_capture
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// After a decode-graph capture that recorded nothing runnable (`cause`): counts it and
    /// puts back the cache's bookkeeping from `before`, so the caller can run the step
    /// eagerly. If the bookkeeping cannot be restored the step fails with `cause`.
    fn recover_capture(
        &self,
        cache: &mut GpuCache,
        before: kv_int4::BookkeepingSnapshot,
        cause: DriverError,
    ) -> Result<()> {
        self.failed_captures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        cache
            .kv
            .restore_bookkeeping(before)
            .map_err(|_| KernelError::driver("capturing the decode graph")(cause).into())
    }

    /// Decode-graph captures that failed and whose step ran from eager launches instead
    /// (see the thread notes on [`GpuEngine`]): a count that keeps growing means the graphs
    /// are not in use, e.g. because another thread keeps synchronizing the device.
    pub fn failed_captures(&self) -> u64 {
        self.failed_captures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes of weights on the device (packed ternary, bf16 tables).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// An empty paged cache (INT4 or f16; the f32 format is CPU-only) on this engine's device.
    pub fn new_cache(&self, options: &KvCacheOptions) -> Result<GpuCache> {
        if options.format == KvCacheFormat::F32 {
            return Err(TritterError::argument(
                "kv cache format",
                "f32",
                "int4 or f16 on the GPU engine (the f32 store is the CPU engine's)",
            ));
        }
        self.cfg.validate()?;
        let cfg = paged_config(&self.cfg, options)?.expect("paged format checked above");
        let kv = GpuKvCache::new(&self.gpu, cfg)?;
        let nonfinite = self
            .gpu
            .stream()
            .alloc_zeros(1)
            .map_err(alloc_err("the non-finite counter"))?;
        static NEXT_CACHE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(GpuCache {
            id: NEXT_CACHE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            kv: ManuallyDrop::new(kv),
            seqs: BTreeMap::new(),
            next_id: 0,
            nonfinite: ManuallyDrop::new(nonfinite),
            capture_lock: self.capture_lock.clone(),
        })
    }

    /// Appends each input's tokens to its sequence and returns its logits (see
    /// [`LogitsFor`](super::LogitsFor)), in input order. Inputs are validated before the cache changes; an
    /// error after that (a non-finite activation, an exhausted page pool) leaves the step's
    /// sequences partly appended, so free them.
    pub fn step(&self, cache: &mut GpuCache, inputs: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .run_step(cache, inputs, &[])?
            .into_iter()
            .map(|o| match o {
                StepOutput::Logits(l) => l,
                StepOutput::Top(_) => unreachable!("no candidates were asked for"),
            })
            .collect())
    }

    /// [`Engine::step_top`] on the device: the candidates of each input with a spec of
    /// `k <= DEVICE_TOP_MAX` are selected by `engine_top_candidates` right after the LM head
    /// and only those `k` pairs are copied to the host; other inputs get their logits.
    pub fn step_top(
        &self,
        cache: &mut GpuCache,
        inputs: &[StepInput<'_>],
        tops: &[Option<TopSpec>],
    ) -> Result<Vec<StepOutput>> {
        check_top_inputs(inputs, tops)?;
        self.run_step(cache, inputs, tops)
    }

    /// [`step`](Self::step) and [`step_top`](Self::step_top): validates the inputs, then
    /// runs them in rounds, each input's outputs merged (logits rows appended; candidates
    /// replace the empty logits of earlier chunks).
    fn run_step(
        &self,
        cache: &mut GpuCache,
        inputs: &[StepInput<'_>],
        tops: &[Option<TopSpec>],
    ) -> Result<Vec<StepOutput>> {
        // The cache's kernels run on its own handle's stream and the engine's on the
        // engine's; they are ordered only when both are the engine's fork.
        if !Arc::ptr_eq(cache.kv.gpu(), &self.gpu) {
            return Err(TritterError::argument(
                "cache",
                "a cache made by another engine",
                "a cache from this engine's new_cache (each engine runs on its own stream)",
            ));
        }
        check_step_inputs(&self.cfg, inputs, |s| cache.len(s))?;
        run_rounds(
            inputs,
            cache,
            // A new sequence's whole prompt in one round (flash attention); anything else
            // one token per round (decode attention over the cache).
            |cache, seq, left| Ok(if cache.len(seq)? == 0 { left } else { 1 }),
            |cache, chunks| {
                // Prompts (n > 1) first, then the single tokens.
                chunks.sort_by_key(|c| c.tokens.len() == 1);
                self.forward_round(cache, chunks, tops)
            },
            |acc, o| match (acc, o) {
                (StepOutput::Logits(a), StepOutput::Logits(b)) => a.extend(b),
                (acc, o) => *acc = o,
            },
        )
    }

    /// One round (see [`step`](Self::step)): appends each item's tokens and returns the
    /// wanted logits per item, or its candidates where `tops[item.input]` asks for them
    /// (`tops` empty: logits for all). Decode-only rounds (every item one token) run from a
    /// CUDA graph once their shape has repeated ([`DecodeState`]).
    fn forward_round(
        &self,
        cache: &mut GpuCache,
        items: &[Chunk<'_>],
        tops: &[Option<TopSpec>],
    ) -> Result<Vec<StepOutput>> {
        let cfg = &self.cfg;
        let (d, hq, hkv, v) = (
            cfg.head_dim(),
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.vocab_size,
        );
        let g = self.gpu.as_ref();
        let stream = g.stream();
        let n: usize = items.iter().map(|it| it.tokens.len()).sum();
        let prompts = items.iter().filter(|it| it.tokens.len() > 1).count();
        let n_prompt: usize = items[..prompts].iter().map(|it| it.tokens.len()).sum();

        // Host-side bookkeeping first: ids, positions, tickets.
        let mut ids = Vec::with_capacity(n);
        let mut pos = Vec::with_capacity(n);
        let mut tickets = Vec::with_capacity(items.len());
        for it in items {
            let kv_seq = cache.kv_seq(it.seq)?;
            let start = cache.kv.len(kv_seq)?;
            ids.extend_from_slice(it.tokens);
            pos.extend((start..start + it.tokens.len()).map(|p| p as i32));
            tickets.push(cache.kv.begin_append(kv_seq, start, it.tokens.len())?);
        }
        let wanted = wanted_rows(items.iter().map(|it| (it.tokens.len(), it.rows)));
        let r = wanted.len();
        // Per wanted row: the spec when the device selects its candidates, else None (its
        // logits go to the host).
        let plan: Vec<Option<TopSpec>> = items
            .iter()
            .flat_map(|it| {
                let spec = tops
                    .get(it.input)
                    .copied()
                    .flatten()
                    .filter(|s| it.rows == RowsWanted::Last && s.k <= DEVICE_TOP_MAX);
                std::iter::repeat_n(spec, it.rows.range(it.tokens.len()).len())
            })
            .collect();
        let host_rows: Vec<usize> = (0..r).filter(|&j| plan[j].is_none()).collect();
        let dev_rows: Vec<usize> = (0..r).filter(|&j| plan[j].is_some()).collect();
        let dev_specs: Vec<TopSpec> = plan.iter().flatten().copied().collect();

        let mut guard = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let shared = &mut *guard;
        if !shared.rows.contains_key(&n) {
            if shared.rows.len() >= KEPT_ROW_BUFFERS {
                shared.rows.clear();
            }
            let work = self.alloc_rows(n)?;
            shared.rows.insert(n, RowSet { work, decode: None });
        }
        let rows = shared.rows.get_mut(&n).expect("inserted above");
        // The host rows' logits, (host_rows, V), and the device rows' raw selections.
        let mut logits_h = vec![0f32; host_rows.len() * v];
        let dev_tops: Vec<RawTop>;

        if prompts == 0 {
            // Decode: persistent inputs, refilled in place, so a captured graph can replay.
            let st = rows.decode.get_or_insert_with(DecodeState::default);
            let seqs: Vec<_> = tickets.iter().map(|t| t.seq()).collect();
            let fresh_slots = match st.slots.as_mut() {
                Some(sb) => cache.kv.slot_batch_refill(&tickets, sb).is_err(),
                None => true,
            };
            if fresh_slots {
                st.slots = Some(cache.kv.slot_batch(&tickets)?);
                st.graph = None;
            }
            let fresh_batch = match st.batch.as_mut() {
                Some(b) => cache.kv.decode_batch_refill(&seqs, b).is_err(),
                None => true,
            };
            if fresh_batch {
                // Room for the block tables to grow (a wider table means a new graph).
                let need = cache.kv.decode_batch(&seqs)?.stride();
                st.batch = Some(
                    cache
                        .kv
                        .decode_batch_with_stride(&seqs, need.next_power_of_two().max(8))?,
                );
                st.graph = None;
            }
            let batch = st.batch.as_ref().expect("set above");
            let (splits, tps) = split_plan(
                cache.kv.config().format,
                g.info().sm_count as usize,
                n,
                hkv,
                batch.max_tiles(),
            );
            shared.decode.reserve(g, n * hq, d, splits)?;
            let key = GraphKey {
                cache: cache.id,
                splits,
                tps,
                stride: batch.stride(),
                workspace: shared.decode.generation,
                pdl: self.small_kernel_pdl(),
            };
            if st.bufs.is_none() {
                st.bufs = Some(DecodeBufs::alloc(g, n, cfg)?);
            }
            let bufs = st.bufs.as_mut().expect("set above");
            stream
                .memcpy_htod(&ids, &mut bufs.ids)
                .map_err(KernelError::driver("uploading token ids"))?;
            stream
                .memcpy_htod(&pos, &mut bufs.pos)
                .map_err(KernelError::driver("uploading positions"))?;
            let slots = st.slots.as_ref().expect("set above");
            if !self.graphs.load(std::sync::atomic::Ordering::Relaxed) || self.profiling() {
                st.graph = None;
            }
            match &st.graph {
                Some((k, graph)) if *k == key => {
                    graph
                        .launch()
                        .map_err(KernelError::driver("launching the decode graph"))?;
                    cache.kv.record_graph_writes(slots)?;
                }
                _ => {
                    let capture = st.seen == Some(key)
                        && self.graphs.load(std::sync::atomic::Ordering::Relaxed)
                        && !self.profiling();
                    let mut launch = |cache: &mut GpuCache| {
                        self.launch_step(
                            cache,
                            &mut shared.gemv,
                            &mut shared.decode.ws,
                            &mut rows.work,
                            // Every row's logits (one token per sequence; rows nobody wants
                            // are dropped on the host), so the graph does not depend on which.
                            StepInputs {
                                n,
                                n_prompt: 0,
                                ids: &bufs.ids,
                                pos: &bufs.pos,
                                slots,
                                decode: Some(batch),
                                problem: None,
                                wanted: &bufs.wanted,
                                r: n,
                                pdl: key.pdl,
                            },
                            &mut bufs.hidden,
                            &mut bufs.logits,
                        )
                    };
                    let mut graph = None;
                    if capture {
                        // A capture marks the cache's layers written while nothing runs.
                        let before = cache.kv.bookkeeping_snapshot();
                        // No engine or cuBLAS handle of this process is torn down while the
                        // capture is open (tritter_kernels_cuda::capture_gate).
                        let _gate = capture_gate::capture_section();
                        let _capture = self.capture_lock.lock().unwrap_or_else(|p| p.into_inner());
                        stream
                            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                            .map_err(KernelError::driver("starting the decode graph capture"))?;
                        // Dropped before `_capture`: a panic in the launches still ends the
                        // capture before the lock is released.
                        let open = OpenCapture(Some(stream));
                        let res = launch(cache);
                        // End the capture before anything else, even after a failed launch.
                        let ended = open.end();
                        let forced = self
                            .fail_next_capture
                            .swap(false, std::sync::atomic::Ordering::Relaxed);
                        match (res, ended) {
                            (Ok(()), Ok(Some(captured))) if !forced => graph = Some(captured),
                            // Invalidated, most likely by another thread's context-wide
                            // synchronizing call (GpuEngine's thread notes): nothing ran,
                            // so put the bookkeeping back and run the step
                            // eagerly below. The next step of this shape captures anew.
                            (_, Err(e))
                                if e.0 == CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED =>
                            {
                                self.recover_capture(cache, before, e)?
                            }
                            // Also an empty or discarded capture, and a launch refused inside
                            // the capture (say a kv-int4 decode workspace that would have to
                            // grow, which it refuses while capturing): the launches were only
                            // recorded, so the same recovery; a genuine error recurs in the
                            // eager run and is the step's.
                            (_, Ok(_)) => self.recover_capture(
                                cache,
                                before,
                                DriverError(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED),
                            )?,
                            // Anything else (instantiation out of memory, a failed end of
                            // the capture) is the step's error, as for an eager step.
                            (res, ended) => {
                                res?;
                                ended.map_err(KernelError::driver(
                                    "instantiating the decode graph",
                                ))?;
                            }
                        }
                    }
                    match graph {
                        Some(graph) => {
                            graph
                                .launch()
                                .map_err(KernelError::driver("launching the decode graph"))?;
                            st.graph = Some((key, graph));
                        }
                        None => {
                            launch(cache)?;
                            st.seen = Some(key);
                        }
                    }
                }
            }
            let src: Vec<usize> = dev_rows.iter().map(|&j| wanted[j]).collect();
            dev_tops = launch_top(g, &bufs.logits, v, &src, &dev_specs)?;
            if !host_rows.is_empty() {
                stream
                    .memcpy_dtoh(&bufs.logits, &mut bufs.host)
                    .map_err(KernelError::driver("copying logits to the host"))?;
                // The copy into page-locked memory is asynchronous, and this context does not
                // track events (Gpu::new), so the pinned slice does not wait by itself.
                wait_for(stream).map_err(KernelError::driver("waiting for the logits"))?;
                let all = bufs
                    .host
                    .as_slice()
                    .map_err(KernelError::driver("reading the pinned logits"))?;
                for (dst, &j) in logits_h.chunks_exact_mut(v).zip(&host_rows) {
                    let row = wanted[j];
                    dst.copy_from_slice(&all[row * v..(row + 1) * v]);
                }
            }
        } else {
            let slots = cache.kv.slot_batch(&tickets)?;
            let decode_seqs: Vec<_> = tickets[prompts..].iter().map(|t| t.seq()).collect();
            let decode_batch = if decode_seqs.is_empty() {
                None
            } else {
                Some(cache.kv.decode_batch(&decode_seqs)?)
            };
            let mut cu = vec![0i32];
            for it in &items[..prompts] {
                cu.push(cu.last().copied().unwrap_or(0) + it.tokens.len() as i32);
            }
            let mask = match cfg.sliding_window {
                Some(w) => Mask::sliding(w, cfg.attention_sinks),
                None => Mask::CAUSAL,
            };
            let problem = ProblemGpu::new(
                g,
                Problem {
                    heads: Heads::new(hq, hkv, d),
                    seqs: Seqs::Varlen {
                        cu_q: cu.clone(),
                        cu_k: cu,
                    },
                    mask,
                    inputs: MaskInputs::default(),
                },
                Positions::default(),
            )?;
            if let Some(b) = &decode_batch {
                let sms = g.info().sm_count as usize;
                let (splits, _) = split_plan(
                    cache.kv.config().format,
                    sms,
                    b.seqs().len(),
                    hkv,
                    b.max_tiles(),
                );
                shared.decode.reserve(g, n * hq, d, splits)?;
            }
            let ids_d = upload(g, "token ids", &ids)?;
            let pos_d = upload(g, "positions", &pos)?;
            let wanted_i: Vec<i32> = wanted.iter().map(|&x| x as i32).collect();
            let wanted_d = upload(
                g,
                "wanted rows",
                &if wanted_i.is_empty() {
                    vec![0]
                } else {
                    wanted_i
                },
            )?;
            let h = cfg.hidden_size;
            let mut hidden = stream
                .alloc_zeros::<bf16>(r.max(1) * h)
                .map_err(alloc_err("final hidden states"))?;
            let mut logits = stream
                .alloc_zeros::<f32>(r.max(1) * v)
                .map_err(alloc_err("logits"))?;
            self.launch_step(
                cache,
                &mut shared.gemv,
                &mut shared.decode.ws,
                &mut rows.work,
                StepInputs {
                    n,
                    n_prompt,
                    ids: &ids_d,
                    pos: &pos_d,
                    slots: &slots,
                    decode: decode_batch.as_ref(),
                    problem: Some(&problem),
                    wanted: &wanted_d,
                    r,
                    pdl: self.small_kernel_pdl(),
                },
                &mut hidden,
                &mut logits,
            )?;
            dev_tops = launch_top(g, &logits, v, &dev_rows, &dev_specs)?;
            if host_rows.len() == r {
                // Every wanted row to the host (`step`, scoring): straight into logits_h.
                if r > 0 {
                    stream
                        .memcpy_dtoh(&logits.slice(..r * v), &mut logits_h)
                        .map_err(KernelError::driver("copying logits to the host"))?;
                }
            } else if !host_rows.is_empty() {
                let mut all = vec![0f32; r * v];
                stream
                    .memcpy_dtoh(&logits.slice(..r * v), &mut all)
                    .map_err(KernelError::driver("copying logits to the host"))?;
                for (dst, &j) in logits_h.chunks_exact_mut(v).zip(&host_rows) {
                    dst.copy_from_slice(&all[j * v..(j + 1) * v]);
                }
            }
        }

        let bad = stream
            .clone_dtoh(&*cache.nonfinite)
            .map_err(KernelError::driver("reading the non-finite counter"))?;
        if bad[0] > 0 {
            stream
                .memset_zeros(&mut *cache.nonfinite)
                .map_err(KernelError::driver("clearing the non-finite counter"))?;
            return Err(TritterError::NonFinite {
                what: format!(
                    "keys/values of the step ({} groups of 32, stored as zeros in the cache)",
                    bad[0]
                ),
                index: 0,
                value: "NaN or Inf".into(),
            });
        }
        if let Some(i) = logits_h.iter().position(|x| !x.is_finite()) {
            return Err(TritterError::NonFinite {
                what: "logits (r, V) of the step".into(),
                index: host_rows[i / v] * v + i % v,
                value: logits_h[i].to_string(),
            });
        }
        let mut cands = Vec::with_capacity(dev_tops.len());
        for (t, &j) in dev_tops.into_iter().zip(&dev_rows) {
            cands.push(t.into_candidates(j, v)?);
        }
        // Back per item, in item order: its host rows' logits or its device candidates.
        let (mut cands, mut host) = (cands.into_iter(), logits_h.chunks_exact(v));
        let mut j = 0;
        Ok(items
            .iter()
            .map(|it| {
                let k = it.rows.range(it.tokens.len()).len();
                let out = if k == 1 && plan[j].is_some() {
                    StepOutput::Top(cands.next().expect("one selection per device row"))
                } else {
                    StepOutput::Logits(host.by_ref().take(k).flatten().copied().collect())
                };
                j += k;
                out
            })
            .collect())
    }

    /// Every kernel of a step, in stream order: embedding, the layers, the final norm of the
    /// wanted rows and the LM head into `hidden` `(r, H)` and `logits` `(r, V)`. No host
    /// synchronization and no allocation (so it can be captured into a graph).
    #[allow(clippy::too_many_arguments)]
    fn launch_step(
        &self,
        cache: &mut GpuCache,
        gemv: &mut GemvWorkspace,
        decode_ws: &mut DecodeWorkspace,
        rows: &mut Rows,
        inp: StepInputs<'_>,
        hidden: &mut CudaSlice<bf16>,
        logits: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (d, hq, hkv) = (cfg.head_dim(), cfg.num_heads, cfg.num_kv_heads);
        let g = self.gpu.as_ref();
        let stream = g.stream();
        let (n, n_prompt) = (inp.n, inp.n_prompt);
        let profile = self.profiling();
        let mut marks: Vec<(&'static str, CudaEvent)> = Vec::new();
        let mut mark = |phase: &'static str| -> Result<()> {
            if profile {
                let e = stream
                    .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(KernelError::driver("recording a profile event"))?;
                marks.push((phase, e));
            }
            Ok(())
        };
        mark("start")?;
        self.launch_embed(inp.ids, n, &mut rows.x)?;
        // Layer 0's A8 input; every later one comes from the fused residual norm + A8.
        rows.x_acts.quantize_from(g, &rows.x.as_view())?;
        mark("embedding")?;
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let (qd, kvd) = (hq * d, hkv * d);
        for (l, layer) in self.layers.iter().enumerate() {
            ternary_matmul_a8_cuda(
                g,
                &layer.qkv,
                &rows.x_acts,
                &mut rows.qkv.as_view_mut(),
                gemv,
            )?;
            mark("q/k/v projection")?;
            self.launch_qkv_store(layer, l, inp.pos, n, rows, cache, inp.slots, inp.pdl)?;
            mark("QK-Norm + RoPE + KV write")?;
            if let Some(pb) = inp.problem {
                if cache.kv.config().format == KvFormat::Int4 {
                    // The prompt attends to its own keys and values as the INT4 pages hold
                    // them (as the CPU engine does), so its logits do not depend on chunking.
                    round_trip_int4_cuda(g, &mut rows.k.slice_mut(..n_prompt * kvd))?;
                    round_trip_int4_cuda(g, &mut rows.v.slice_mut(..n_prompt * kvd))?;
                }
                if n_prompt == n {
                    flash_attn_fwd_cuda(
                        g,
                        pb,
                        &rows.q,
                        &rows.k,
                        &rows.v,
                        &mut rows.att,
                        &mut rows.lse,
                        None,
                    )?;
                } else {
                    // A mixed round: the prompt rows as exact-size tensors.
                    let copy = |src: &CudaSlice<f16>, w: usize| -> Result<CudaSlice<f16>> {
                        let mut dst = stream
                            .alloc_zeros(n_prompt * w)
                            .map_err(alloc_err("prompt attention rows"))?;
                        stream
                            .memcpy_dtod(&src.slice(..n_prompt * w), &mut dst)
                            .map_err(KernelError::driver("copying prompt attention rows"))?;
                        Ok(dst)
                    };
                    let (pq, pk, pv) =
                        (copy(&rows.q, qd)?, copy(&rows.k, kvd)?, copy(&rows.v, kvd)?);
                    let mut po = copy(&rows.att, qd)?;
                    let mut lse = stream
                        .alloc_zeros(hq * n_prompt)
                        .map_err(alloc_err("the attention logsumexp"))?;
                    flash_attn_fwd_cuda(g, pb, &pq, &pk, &pv, &mut po, &mut lse, None)?;
                    stream
                        .memcpy_dtod(&po, &mut rows.att.slice_mut(..n_prompt * qd))
                        .map_err(KernelError::driver("copying prompt attention output"))?;
                }
            }
            if let Some(batch) = inp.decode {
                decode_attention_cuda(
                    &cache.kv,
                    l,
                    batch,
                    &rows.q.slice(n_prompt * qd..),
                    hq,
                    scale,
                    &mut rows.att.slice_mut(n_prompt * qd..),
                    decode_ws,
                )?;
            }
            mark("attention")?;
            rows.o_acts.quantize_from(g, &rows.att.as_view())?;
            ternary_matmul_a8_cuda(g, &layer.o, &rows.o_acts, &mut rows.a.as_view_mut(), gemv)?;
            mark("A8 + o projection")?;
            self.launch_add_rmsnorm_a8(rows, &layer.attn_norm, n, inp.pdl)?;
            mark("residual norms + A8")?;
            ternary_mlp_a8_cuda(
                g,
                &layer.mlp,
                &rows.x_acts,
                &mut rows.a.as_view_mut(),
                &mut rows.mlp,
            )?;
            mark("MLP")?;
            self.launch_add_rmsnorm_a8(rows, &layer.mlp_norm, n, inp.pdl)?;
            mark("residual norms + A8")?;
        }
        if inp.r > 0 {
            self.launch_final_norm(&rows.x, inp.wanted, inp.r, hidden)?;
            self.lm_head(hidden, inp.r, logits)?;
        }
        mark("final norm + LM head")?;
        if profile {
            stream
                .synchronize()
                .map_err(KernelError::driver("synchronizing a profiled step"))?;
            let mut prof = self.profile.lock().unwrap_or_else(|p| p.into_inner());
            for w in marks.windows(2) {
                let ms = w[0]
                    .1
                    .elapsed_ms(&w[1].1)
                    .map_err(KernelError::driver("reading a profile event"))?;
                let e = prof.entry(w[1].0).or_insert((0.0, 0));
                e.0 += f64::from(ms);
                e.1 += 1;
            }
            prof.entry("steps").or_insert((0.0, 0)).1 += 1;
        }
        Ok(())
    }

    fn alloc_rows(&self, n: usize) -> Result<Rows> {
        let cfg = &self.cfg;
        let (h, d, hq, hkv) = (
            cfg.hidden_size,
            cfg.head_dim(),
            cfg.num_heads,
            cfg.num_kv_heads,
        );
        let g = self.gpu.as_ref();
        let s = g.stream();
        let first = self.layers.first().ok_or_else(|| {
            TritterError::config("num_layers", 0, "at least one layer on the GPU engine")
        })?;
        Ok(Rows {
            x: s.alloc_zeros(n * h).map_err(alloc_err("x"))?,
            a: s.alloc_zeros(n * h).map_err(alloc_err("branch outputs"))?,
            qkv: s
                .alloc_zeros(n * (hq + 2 * hkv) * d)
                .map_err(alloc_err("qkv"))?,
            q: s.alloc_zeros(n * hq * d).map_err(alloc_err("q"))?,
            k: s.alloc_zeros(n * hkv * d).map_err(alloc_err("k"))?,
            v: s.alloc_zeros(n * hkv * d).map_err(alloc_err("v"))?,
            att: s
                .alloc_zeros(n * hq * d)
                .map_err(alloc_err("attention output"))?,
            lse: s
                .alloc_zeros(hq * n)
                .map_err(alloc_err("the attention logsumexp"))?,
            x_acts: GemvActivations::new(g, n, h)?,
            o_acts: GemvActivations::new(g, n, hq * d)?,
            mlp: MlpWorkspace::new(g, &first.mlp, n)?,
        })
    }

    fn row_launch(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn launch_embed(&self, ids: &CudaSlice<u32>, n: usize, x: &mut CudaSlice<f32>) -> Result<()> {
        let g = self.gpu.as_ref();
        let func = g.function(&images::ENGINE, "engine_embed")?;
        let (h, zp) = (self.cfg.hidden_size as i32, i32::from(self.zero_pad));
        let mut launch = g.stream().launch_builder(&func);
        launch.arg(ids).arg(&self.embed).arg(&h).arg(&zp).arg(x);
        // SAFETY: `engine_embed(const unsigned*, const bf16*, int, int, float*)`; ids holds n
        // ids below vocab_size (check_step_inputs), the table (V, H), x (N, H) with N >= n
        // (the step's row buffers); one CTA per row.
        unsafe { launch.launch(Self::row_launch(n)) }
            .map_err(KernelError::driver("launching engine_embed"))?;
        Ok(())
    }

    /// QK-Norm + RoPE of the step's q/k/v rows (f16 q, k, v rows out) and the append of
    /// layer `l`'s K and V to the cache, in one launch (`engine_qkv_store_*`, through
    /// kv-int4's `write_layer_slots_with`).
    #[allow(clippy::too_many_arguments)]
    fn launch_qkv_store(
        &self,
        layer: &GpuLayer,
        l: usize,
        pos: &CudaSlice<i32>,
        n: usize,
        rows: &mut Rows,
        cache: &mut GpuCache,
        slots: &SlotBatch,
        pdl: bool,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (hq, hkv, d) = (
            cfg.num_heads as i32,
            cfg.num_kv_heads as i32,
            cfg.head_dim() as i32,
        );
        let eps = cfg.norm_eps as f32;
        let heads = cfg.num_heads + 2 * cfg.num_kv_heads;
        let inv_freq = &self.inv_freq;
        if slots.tokens() != n {
            return Err(kv_int4::KvError::ShapeMismatch {
                what: "tokens of the slot batch",
                actual: slots.tokens(),
                expected: n,
            }
            .into());
        }
        let GpuCache { kv, nonfinite, .. } = cache;
        kv.write_layer_slots_with(slots, l, nonfinite, |mut st| {
            // The kernel lays pages out with the engine's KV heads and head dim: a cache of
            // another shape (made by another engine) is refused, never written past a page.
            for (what, actual, expected) in [
                ("KV heads of the cache", st.heads_kv, cfg.num_kv_heads),
                ("head dim of the cache", st.head_dim, cfg.head_dim()),
            ] {
                if actual != expected {
                    return Err(kv_int4::KvError::ShapeMismatch {
                        what,
                        actual,
                        expected,
                    });
                }
            }
            let g = st.gpu.as_ref();
            let name = match st.format {
                KvFormat::Int4 => "engine_qkv_store_int4",
                KvFormat::F16 => "engine_qkv_store_f16",
            };
            let func = g.function(&images::ENGINE, name)?;
            let stream = g.stream();
            let (qn, kn) = match &layer.qk_norm {
                Some((q, k)) => (q.device_ptr(stream).0, k.device_ptr(stream).0),
                None => (0, 0),
            };
            let (shift, np, layer_i) = (st.page_shift as i32, st.num_pages as i32, st.layer as i32);
            let mut args = KernelArgs::new();
            args.ptr(g, &rows.qkv)
                .ptr(g, pos)
                .addr(qn)
                .addr(kn)
                .ptr(g, inv_freq)
                .i32(hq)
                .i32(hkv)
                .i32(d)
                .f32(eps)
                .ptr_mut(g, &mut rows.q)
                .ptr_mut(g, &mut rows.k)
                .ptr_mut(g, &mut rows.v)
                .ptr_mut(g, &mut st.pool)
                .ptr(g, st.slots)
                .i32(shift)
                .i32(np)
                .i64(st.page_bytes)
                .i32(layer_i)
                .ptr_mut(g, st.nonfinite);
            let lc = LaunchConfig {
                grid_dim: (n as u32, heads.div_ceil(QKV_HEADS_PER_CTA) as u32, 1),
                block_dim: (32 * QKV_HEADS_PER_CTA as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `engine_qkv_store_*(const float*, const int*, const float*, const
            // float*, const double*, int, int, int, float, half*, half*, half*, uint8_t*,
            // const int*, int, int, long long, int, unsigned*)`; qkv (n, (Hq + 2 Hkv) D), pos
            // (n,), norms (D,) or null (the layer owns them, so they outlive the launch),
            // inv_freq (D/2,), q (n, Hq, D), k and v (n, Hkv, D): the step's row buffers,
            // D <= 256; the pool (its heads and head dim checked above equal the engine's, so
            // every store stays inside its token's slot), the n slots (checked above) and the
            // counter from write_layer_slots_with, which checked the tickets and the layer.
            // With PDL the kernel reads and writes nothing before its griddepcontrol.wait.
            unsafe { g.launch_args(&func, name, lc, args, pdl) }?;
            Ok(())
        })?;
        Ok(())
    }

    /// `x += rmsnorm(a) * w` per row, then `x_acts = A8(x)` (GEMV layout), in one launch.
    fn launch_add_rmsnorm_a8(
        &self,
        rows: &mut Rows,
        w: &CudaSlice<f32>,
        n: usize,
        pdl: bool,
    ) -> Result<()> {
        let g = self.gpu.as_ref();
        let func = g.function(&images::ENGINE, "engine_add_rmsnorm_a8")?;
        let h = self.cfg.hidden_size;
        let (h_i, eps, kp) = (
            h as i32,
            self.cfg.norm_eps as f32,
            ternary_gemm::gemv_padded_cols(h) as i32,
        );
        let acts = &mut rows.x_acts;
        let mut args = KernelArgs::new();
        args.ptr_mut(g, &mut rows.x)
            .ptr(g, &rows.a)
            .ptr(g, w)
            .i32(h_i)
            .f32(eps)
            .ptr_mut(g, &mut acts.codes_mma)
            .ptr_mut(g, &mut acts.sums)
            .ptr_mut(g, &mut acts.scales)
            .ptr_mut(g, &mut acts.nonfinite_rows)
            .i32(kp);
        // SAFETY: `engine_add_rmsnorm_a8(float*, const float*, const float*, int, float,
        // int8_t*, int*, float*, unsigned*, int)`; x and a hold n rows of H (the step's
        // buffers), w H values, x_acts was made for n rows of H (codes n x kp, sums, scales
        // and flags n); one CTA per row. With PDL the kernel touches nothing before its
        // griddepcontrol.wait.
        unsafe {
            g.launch_args(
                &func,
                "engine_add_rmsnorm_a8",
                Self::row_launch(n),
                args,
                pdl,
            )
        }?;
        Ok(())
    }

    fn launch_final_norm(
        &self,
        x: &CudaSlice<f32>,
        rows: &CudaSlice<i32>,
        r: usize,
        out: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        let g = self.gpu.as_ref();
        let func = g.function(&images::ENGINE, "engine_rmsnorm_bf16")?;
        let (h, eps) = (self.cfg.hidden_size as i32, self.cfg.norm_eps as f32);
        let mut launch = g.stream().launch_builder(&func);
        launch
            .arg(x)
            .arg(rows)
            .arg(&self.final_norm)
            .arg(&h)
            .arg(&eps)
            .arg(out);
        // SAFETY: `engine_rmsnorm_bf16(const float*, const int*, const float*, int, float,
        // bf16*)`; rows holds r indices below the step's row count (built from its items), x
        // that many rows of H, out (r, H); one CTA per output row.
        unsafe { launch.launch(Self::row_launch(r)) }
            .map_err(KernelError::driver("launching engine_rmsnorm_bf16"))?;
        Ok(())
    }

    /// `logits (r, V) = hidden (r, H) · headᵀ`, bf16 inputs, f32 accumulation and output
    /// (cuBLAS; column-major: logitsᵀ = head · hiddenᵀ).
    fn lm_head(
        &self,
        hidden: &CudaSlice<bf16>,
        r: usize,
        logits: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (h, v) = (self.cfg.hidden_size as i32, self.cfg.vocab_size as i32);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let stream = self.gpu.stream();
        let (a, _ga) = head.device_ptr(stream);
        let (b, _gb) = hidden.device_ptr(stream);
        let (c, _gc) = logits.device_ptr_mut(stream);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: head is (V, H) bf16 (column-major H x V, lda = H), hidden (r, H) bf16
        // (column-major H x r, ldb = H), logits (r, V) f32 (column-major V x r, ldc = V):
        // every buffer is exactly that long, the handle is bound to this stream, and the
        // guards keep the buffers alive until the call is queued.
        unsafe {
            blas_result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                v,
                r as i32,
                h,
                (&alpha) as *const f32 as *const _,
                a as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                h,
                b as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                h,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                v,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| TritterError::Cublas {
            context: "computing the logits".into(),
            detail: e.to_string(),
        })
    }
}

/// The GPU engine's KV cache: `kv_int4`'s paged cache on the device (INT4 or f16 pages,
/// window and sinks from the config) and the step's non-finite counter.
pub struct GpuCache {
    /// Unique per cache (keys the decode graphs, which write into this cache's pool).
    id: u64,
    /// Freed in `drop`, under `capture_lock`.
    kv: ManuallyDrop<GpuKvCache>,
    seqs: BTreeMap<u64, kv_int4::SeqId>,
    next_id: u64,
    /// Freed in `drop`, under `capture_lock`.
    nonfinite: ManuallyDrop<CudaSlice<u32>>,
    /// The engine's capture lock.
    capture_lock: Arc<Mutex<()>>,
}

// Caches may move between threads (the engine may not): keep them `Send`.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<GpuCache>();
};

impl Drop for GpuCache {
    /// Frees the pool and counter on the engine's stream under its capture lock, with the
    /// engine's context current: a cache may move to another thread (the engine cannot), and
    /// a free on that stream during a capture would land inside the decode graph.
    fn drop(&mut self) {
        let _capture = self.capture_lock.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the context outlives this call (the pool's handle holds it); the frees below
        // (cuMemFreeAsync, unbound by cudarc) need it current on this thread, which may be
        // one the cache moved to. Each field is then dropped once, here, and `self` is never
        // used afterwards.
        unsafe {
            let _ = driver_result::ctx::set_current(self.kv.gpu().context().cu_ctx());
            ManuallyDrop::drop(&mut self.kv);
            ManuallyDrop::drop(&mut self.nonfinite);
        }
    }
}

impl std::fmt::Debug for GpuCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuCache")
            .field("sequences", &self.seqs.len())
            .finish()
    }
}

impl GpuCache {
    fn kv_seq(&self, seq: SequenceId) -> Result<kv_int4::SeqId> {
        self.seqs
            .get(&seq.raw())
            .copied()
            .ok_or(TritterError::KvCache(kv_int4::KvError::UnknownSequence(
                seq.raw(),
            )))
    }

    /// Device bytes of the page pool.
    pub fn pool_bytes(&self) -> usize {
        self.kv.pool().len()
    }

    /// Pages free in the pool.
    pub fn free_pages(&self) -> usize {
        self.kv.blocks().free_pages()
    }
}

impl EngineCache for GpuCache {
    fn add_sequence(&mut self) -> SequenceId {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, self.kv.add_sequence());
        SequenceId::from_raw(id)
    }
    fn len(&self, seq: SequenceId) -> Result<usize> {
        Ok(self.kv.len(self.kv_seq(seq)?)?)
    }
    fn free(&mut self, seq: SequenceId) -> Result<()> {
        let s = self.kv_seq(seq)?;
        self.kv.free(s)?;
        self.seqs.remove(&seq.raw());
        Ok(())
    }
}

impl Engine for GpuEngine {
    type Cache = GpuCache;
    fn config(&self) -> &TritterConfig {
        &self.cfg
    }
    fn new_cache(&self, options: &KvCacheOptions) -> Result<GpuCache> {
        GpuEngine::new_cache(self, options)
    }
    fn step(&self, cache: &mut GpuCache, inputs: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>> {
        GpuEngine::step(self, cache, inputs)
    }
    fn step_top(
        &self,
        cache: &mut GpuCache,
        inputs: &[StepInput<'_>],
        tops: &[Option<TopSpec>],
    ) -> Result<Vec<StepOutput>> {
        GpuEngine::step_top(self, cache, inputs, tops)
    }
}

/// Most candidates per row [`device_top_candidates`] selects; a sampler that needs more
/// (top-k above it, or `top_k = 0` at a positive temperature) gets the row's logits.
pub const DEVICE_TOP_MAX: usize = 64;

/// u32 words per row of `engine_top_candidates`' output: count, non-finite count, first
/// non-finite index and its bits, `DEVICE_TOP_MAX` ids, `DEVICE_TOP_MAX` logit bit patterns.
const TOP_STRIDE: usize = 4 + 2 * DEVICE_TOP_MAX;

/// The candidates of rows of device logits `(R, V)` (`logits` holds whole rows of `v`):
/// `specs[j]` applied to row `rows[j]`, selected on the device (`engine_top_candidates`, one
/// CTA per row) with the host's semantics ([`top_candidates`](crate::generate::top_candidates):
/// the same ids in the same order, ties by the lower id). Only `k` (id, logit) pairs per row
/// cross to the host. Errors: a row index, `v` or a `k` out of range (`1..=DEVICE_TOP_MAX`),
/// a non-finite logit in a selected row (`NonFinite`, row-major index into `logits`), a
/// filter that admits no id.
pub fn device_top_candidates(
    gpu: &Gpu,
    logits: &CudaSlice<f32>,
    v: usize,
    rows: &[usize],
    specs: &[TopSpec],
) -> Result<Vec<Candidates>> {
    let raw = launch_top(gpu, logits, v, rows, specs)?;
    raw.into_iter()
        .zip(rows)
        .map(|(t, &row)| t.into_candidates(row, v))
        .collect()
}

/// One row of `engine_top_candidates`' output, not yet checked.
struct RawTop {
    nonfinite: u32,
    first_bad: u32,
    bad_value: f32,
    ids: Vec<u32>,
    logits: Vec<f32>,
    limit: usize,
}

impl RawTop {
    /// The candidates, or the error of a row (`row` of `(R, V)` logits) with a non-finite
    /// logit or no admitted id.
    fn into_candidates(self, row: usize, v: usize) -> Result<Candidates> {
        if self.nonfinite > 0 {
            return Err(TritterError::NonFinite {
                what: format!("logits (r, V) of the step ({} non-finite)", self.nonfinite),
                index: row * v + self.first_bad as usize,
                value: self.bad_value.to_string(),
            });
        }
        if self.ids.is_empty() {
            return Err(no_candidates(self.limit));
        }
        Ok(Candidates {
            ids: self.ids,
            logits: self.logits,
        })
    }
}

/// Launches `engine_top_candidates` over `rows` of `logits` and copies the selections back
/// (one small synchronous copy; nothing when `rows` is empty).
fn launch_top(
    gpu: &Gpu,
    logits: &CudaSlice<f32>,
    v: usize,
    rows: &[usize],
    specs: &[TopSpec],
) -> Result<Vec<RawTop>> {
    if rows.len() != specs.len() {
        return Err(TritterError::ShapeMismatch {
            what: "top-candidate specs".into(),
            actual: vec![specs.len()],
            expected: format!("one per row ({})", rows.len()),
        });
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let have = logits.len().checked_div(v).unwrap_or(0);
    // Half of i32::MAX: the kernel's strided loops step past the row's end without overflow.
    if v == 0 || v > i32::MAX as usize / 2 {
        return Err(TritterError::argument(
            "v",
            v,
            "1..=i32::MAX / 2 logits per row",
        ));
    }
    if let Some(&row) = rows.iter().find(|&&r| r >= have) {
        return Err(TritterError::argument(
            "row",
            row,
            format!("below {have} (rows of {v} in {} logits)", logits.len()),
        ));
    }
    if let Some(s) = specs.iter().find(|s| s.k == 0 || s.k > DEVICE_TOP_MAX) {
        return Err(TritterError::argument(
            "k",
            s.k,
            format!("1..={DEVICE_TOP_MAX} candidates on the device"),
        ));
    }
    let markers = crate::paradigm::LatentMarkers::new(v).ok();
    let (bot, eot) = markers.map_or((-1, -1), |m| (m.bot as i32, m.eot as i32));
    let params: Vec<i32> = rows
        .iter()
        .zip(specs)
        .flat_map(|(&row, s)| {
            [
                row as i32,
                s.k as i32,
                s.limit(v) as i32,
                i32::from(s.text_only),
            ]
        })
        .collect();
    let params_d = upload(gpu, "top-candidate parameters", &params)?;
    let mut out = gpu
        .stream()
        .alloc_zeros::<u32>(rows.len() * TOP_STRIDE)
        .map_err(alloc_err("top candidates"))?;
    let func = gpu.function(&images::ENGINE, "engine_top_candidates")?;
    let (vi, eos, first_text) = (
        v as i32,
        SpecialToken::Eos.id() as i32,
        NUM_SPECIAL_TOKENS as i32,
    );
    let mut launch = gpu.stream().launch_builder(&func);
    launch
        .arg(logits)
        .arg(&vi)
        .arg(&params_d)
        .arg(&eos)
        .arg(&first_text)
        .arg(&bot)
        .arg(&eot)
        .arg(&mut out);
    // SAFETY: `engine_top_candidates(const float*, int, const int4*, int, int, int, int,
    // unsigned*)`; logits holds `have` rows of v and every source row is below `have`
    // (checked), params are rows.len() int4 (4 i32 each, 256-byte aligned allocation), out
    // rows.len() * TOP_STRIDE u32; one CTA of 512 threads per row.
    unsafe {
        launch.launch(LaunchConfig {
            grid_dim: (rows.len() as u32, 1, 1),
            block_dim: (TOP_THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(KernelError::driver("launching engine_top_candidates"))?;
    let host = gpu
        .stream()
        .clone_dtoh(&out)
        .map_err(KernelError::driver("copying top candidates to the host"))?;
    Ok(host
        .chunks_exact(TOP_STRIDE)
        .zip(specs)
        .map(|(w, s)| {
            let count = (w[0] as usize).min(DEVICE_TOP_MAX);
            RawTop {
                nonfinite: w[1],
                first_bad: w[2],
                bad_value: f32::from_bits(w[3]),
                ids: w[4..4 + count].to_vec(),
                logits: w[4 + DEVICE_TOP_MAX..4 + DEVICE_TOP_MAX + count]
                    .iter()
                    .map(|&b| f32::from_bits(b))
                    .collect(),
                limit: s.limit(v),
            }
        })
        .collect())
}

/// Threads per CTA of `engine_top_candidates` (`kTopThreads` in engine.cu).
const TOP_THREADS: u32 = 512;
