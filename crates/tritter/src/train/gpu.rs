//! The GPU training engine (feature `cuda`; DESIGN.md section 5, in the manner of llm.c): the
//! reference model's forward and backward pass and AdamW written on our kernels and cuBLAS,
//! with every buffer allocated up front.
//!
//! State ([`ParamLayout`](super::ParamLayout)): f32 shadow weights, gradients and AdamW
//! moments in four flat buffers; per layer the BitLinear weights re-quantized after every
//! update by the device absmean kernel into ternary-gemm's tiled layout (q/k/v stacked into one
//! matrix with one gamma per projection, gate/up likewise); bf16 copies of the embedding / LM
//! head (cuBLAS) and of the QK-Norm weights (flash-attn's prologue).
//!
//! One micro-batch (`T = B L` tokens), per layer:
//! * forward: A8 of the layer input into the GEMM layout, fused q/k/v ternary GEMM (f32),
//!   split to raw bf16 q/k/v, FlashAttention with QK-Norm + RoPE fused (bf16 output and
//!   logsumexp saved), A8 + o_proj GEMM, `h = x + norm_a(a)`, A8 + gate/up GEMM, squared-ReLU
//!   GLU, A8 + down GEMM, `out = h + norm_f(d)`;
//!   On [`LinearPath::Cublas`] (the Hopper default) every BitLinear product is instead a
//!   cuBLAS bf16 GEMM of `deq(A8(x))` (the A8 fake quantization as bf16, the operand the
//!   weight gradient uses too) with a bf16 copy of `Wq gamma` refreshed at each
//!   re-quantization; q/k/v and gate/up come out as bf16 straight into the saved copies.
//! * backward (straight-through estimator, as the reference's BitLinear): for each BitLinear
//!   `dW += dYᵀ · deq(A8(x))` through cuBLAS (bf16 in, f32 accumulated into the gradient
//!   buffer) and `dX = dY · (Wq gamma)` through the transposed ternary GEMM (cuBLAS on the
//!   bf16 copies on the cuBLAS paths); the attention
//!   backward returns the gradients of raw q/k and of the QK-Norm weights; RMSNorm, GLU and
//!   embedding backward are small kernels (`kernels-cuda/kernels/train.cu`).
//! * head: final norm, then chunks of [`logits_chunk_rows`](super::logits_chunk_rows) rows:
//!   bf16 logits through cuBLAS (f32 accumulation), fused softmax cross-entropy (f32 math)
//!   writing bf16 `dlogits` over them in place (llm.c's fused classifier), `dhidden` and the
//!   head's weight gradient through cuBLAS — never a `(T, V)` tensor.
//!
//! With recomputation only the layer inputs are kept; each layer's forward is re-run just
//! before its backward (one layer's activations in memory).
//!
//! No host synchronisation inside a step: the loss sum, the gradient norm and the clip factor
//! stay on the device until [`GpuTrainModel::read_metrics`]. A non-finite gradient norm makes
//! the AdamW kernel leave every parameter as it was (the caller sees the norm and stops).
//!
//! Precision against the f32 reference: attention inputs and outputs are bf16 (the reference
//! computes them in f32) and dense gradient products run on bf16 tensor cores; the A8
//! quantizers then move some int8 codes by one step. The GPU conformance test states the
//! resulting tolerances.

use std::sync::Arc;

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    CudaEvent, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use flash_attn_sm120::cuda::{
    flash_attn_bwd_cuda, flash_attn_fwd_cuda, BwdMode, BwdWorkspace, GradsGpu, NormGradsGpu,
    NormRopeGpu, ProblemGpu, PrologueBwd, PrologueFwd, RopeTable,
};
use flash_attn_sm120::{Heads, Mask, MaskInputs, MaskMode, Positions, Problem, Seqs};
use half::bf16;
use ternary_gemm::cuda::{
    absmean_dequant_cuda, absmean_quantize_cuda, absmean_quantize_dequant_cuda,
    ternary_matmul_a8_cuda, ternary_matmul_t_cuda, AbsmeanWorkspace, GemvActivations,
    GemvWorkspace, TernaryMatrixGpu,
};
use tritter_kernels_cuda::capture_gate::GatedBlas;
use tritter_kernels_cuda::{images, Gpu, KernelError};

use super::layout::{check_trainable, logits_chunk_rows, LinearPath, ParamLayout, TrainPlan};
use super::AdamWConfig;
use crate::config::{AttentionMode, TritterConfig};
use crate::model::MaskSpec;
use crate::{Result, TritterError, TritterModel};

#[path = "gpu_dp.rs"]
mod dp;
use dp::{Bucket, DpState};

const THREADS: u32 = 256;
/// Threads of `train_ce` (its `kCeThreads`): a 65536-logit row fits their registers.
const CE_THREADS: u32 = 512;
/// Rows per CTA of `train_norm_bwd` (its weight-gradient partial sums stay in registers).
const NORM_BWD_ROWS: usize = 32;
/// Columns `train_norm_bwd` holds per row (256 threads x 16).
const MAX_NORM_COLS: usize = 256 * 16;

fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &Gpu,
    n: usize,
    what: &str,
) -> Result<CudaSlice<T>> {
    gpu.stream()
        .alloc_zeros::<T>(n.max(1))
        .map_err(|e| KernelError::driver(format!("allocating {what}"))(e).into())
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    rows_cfg_of(rows, THREADS)
}

/// One CTA of `threads` per row.
fn rows_cfg_of(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn flat_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize * 4).clamp(1, 4096) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Free device memory in bytes.
fn free_bytes(gpu: &Gpu) -> Result<u64> {
    let (free, _) = gpu
        .context()
        .mem_get_info()
        .map_err(KernelError::driver("reading free device memory"))?;
    Ok(free as u64)
}

/// The refusal of a plan whose `what` needs `needed` bytes when `free` are free.
fn does_not_fit(gpu: &Gpu, what: &str, needed: u64, free: u64, plan: &TrainPlan) -> TritterError {
    TritterError::DeviceUnavailable {
        device: gpu.info().name.clone(),
        detail: format!(
            "{what} needs {:.3} GB but {:.3} GB are free\n{plan}",
            needed as f64 / 1e9,
            free as f64 / 1e9
        ),
    }
}

/// Refuses, before any allocation or host initialization, a model whose training state
/// (shadow weights, gradients, AdamW moments, packed and bf16 copies) exceeds the device's
/// free memory, printing the plan.
fn check_fits(gpu: &Gpu, cfg: &TritterConfig) -> Result<()> {
    let path = LinearPath::for_compute_capability(gpu.info().compute_capability);
    let plan = TrainPlan::new(cfg, 1, 1, true)?.with_linear_path(cfg, path);
    let (state, free) = (plan.state_bytes(), free_bytes(gpu)?);
    if state > free {
        return Err(does_not_fit(
            gpu,
            "the model's training state (shadow weights, gradients, AdamW moments: 16 bytes \
             per parameter)",
            state,
            free,
            &plan,
        ));
    }
    Ok(())
}

/// Element offsets of one layer's parameters in the flat buffers.
#[derive(Debug, Clone, Copy)]
struct LayerOffsets {
    /// q_proj; k_proj and v_proj follow (one stacked matrix).
    qkv: usize,
    o: usize,
    /// gate_proj; up_proj follows.
    gu: usize,
    down: usize,
    attn_norm: usize,
    mlp_norm: usize,
    q_norm: usize,
    k_norm: usize,
}

/// One layer's device weights derived from the shadow weights.
struct LayerDev {
    off: LayerOffsets,
    /// `(Hq D + 2 Hkv D, H)`, one gamma per projection (per-row scales).
    qkv: TernaryMatrixGpu,
    o: TernaryMatrixGpu,
    /// `(2 I, H)`, gate rows then up rows, one gamma each.
    gu: TernaryMatrixGpu,
    down: TernaryMatrixGpu,
    q_norm: CudaSlice<bf16>,
    k_norm: CudaSlice<bf16>,
    /// With [`LinearPath::keeps_copies`]: `Wq * gamma` of qkv, o, gu, down as bf16, row-major.
    deq: Option<[CudaSlice<bf16>; 4]>,
}

impl LayerDev {
    /// Matrix `m` (0 qkv, 1 o, 2 gate/up, 3 down) and its bf16 dequantized copy, if kept.
    fn matrix(&mut self, m: usize) -> (&mut TernaryMatrixGpu, Option<&mut CudaSlice<bf16>>) {
        let deq = self.deq.as_mut().map(|d| &mut d[m]);
        let w = match m {
            0 => &mut self.qkv,
            1 => &mut self.o,
            2 => &mut self.gu,
            _ => &mut self.down,
        };
        (w, deq)
    }
}

/// One layer's saved activations (`T` tokens).
struct LayerActs {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    /// Attention output `(T, Hq D)`.
    o: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
    /// o_proj output and its RMSNorm denominators.
    a: CudaSlice<f32>,
    ra: CudaSlice<f32>,
    /// Residual after attention.
    h: CudaSlice<f32>,
    /// gate/up output `(T, 2I)`, bf16.
    gu: CudaSlice<bf16>,
    /// `deq(A8(relu(g)^2 u))` `(T, I)`: the down projection's input as the forward saw it.
    mq: CudaSlice<bf16>,
    /// down output and its RMSNorm denominators.
    d: CudaSlice<f32>,
    rf: CudaSlice<f32>,
}

/// Scratch of the ternary-GEMM forward: A8 codes in the GEMM layout and f32 outputs.
struct TernaryFwd {
    /// A8 of hidden-width (and attention-output) rows.
    acts_h: GemvActivations,
    /// A8 of the MLP hidden `(T, I)`.
    acts_i: GemvActivations,
    gemv_ws: GemvWorkspace,
    /// Fused q/k/v GEMM output `(T, Hq D + 2 Hkv D)` f32.
    y_qkv: CudaSlice<f32>,
    /// gate/up GEMM output `(T, 2I)` f32.
    gu_out: CudaSlice<f32>,
}

/// Buffers of one micro-batch shape.
struct Acts {
    batch: usize,
    seq_len: usize,
    recompute: bool,
    slots: Vec<LayerActs>,
    /// Layer inputs `resid[l]` `(T, H)`, `resid[L]` the last layer's output.
    resid: Vec<CudaSlice<f32>>,
    final_out: CudaSlice<f32>,
    final_rd: CudaSlice<f32>,
    hidden_bf16: CudaSlice<bf16>,
    ids: CudaSlice<u32>,
    targets: CudaSlice<u32>,
    loss_mask: CudaSlice<f32>,
    // scratch
    /// The ternary forward's buffers ([`LinearPath::ternary_forward`]).
    tern: Option<TernaryFwd>,
    deq: CudaSlice<bf16>,
    dyb: CudaSlice<bf16>,
    dgu: CudaSlice<bf16>,
    dqkv: CudaSlice<bf16>,
    g: CudaSlice<f32>,
    g2: CudaSlice<f32>,
    tmp: CudaSlice<f32>,
    k_hat: CudaSlice<bf16>,
    dout: CudaSlice<bf16>,
    attn_grads: GradsGpu<bf16>,
    norm_grads: NormGradsGpu,
    bwd_ws: BwdWorkspace<bf16>,
    /// `(chunk, V)` bf16 logits, overwritten in place by their gradient (`train_ce`).
    logits: CudaSlice<bf16>,
    chunk: usize,
    rope: RopeTable,
}

/// Host metrics of the steps since the last read ([`GpuTrainModel::read_metrics`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuStepMetrics {
    /// Sum over micro-batches of `sum(mask * nll) / denominator` since the last read.
    pub loss: f64,
    /// Global gradient norm of the last optimizer step, before clipping.
    pub grad_norm: f64,
}

/// One micro-batch for [`GpuTrainModel::forward_backward`]: `(B, L)` row-major token ids,
/// targets and loss mask (the reference trainer's `Batch`), the attention mask, and the
/// loss denominator (real targets of the whole optimizer step, as the reference divides).
#[derive(Debug, Clone, Copy)]
pub struct MicroBatch<'a> {
    /// Input ids `(B * L)`.
    pub inputs: &'a [u32],
    /// Target ids `(B * L)`.
    pub targets: &'a [u32],
    /// 1 where the target counts, else 0 `(B * L)`.
    pub loss_mask: &'a [f32],
    /// Visibility (mode, window, sinks, prefix lengths, document ids) as the reference takes it.
    pub mask: &'a MaskSpec,
    /// Divisor of the summed NLL (the step's target count).
    pub denominator: usize,
}

/// The GPU training engine (DESIGN.md section 5, llm.c style): f32 shadow weights,
/// gradients and AdamW moments in flat device buffers laid out by [`ParamLayout`], BitLinear
/// products on ternary-gemm or cuBLAS ([`LinearPath`]), FlashAttention with fused QK-Norm +
/// RoPE, a chunked fused cross-entropy; one host synchronisation per step (the metrics
/// read-back). Data-parallel over NCCL after
/// [`enable_data_parallel`](Self::enable_data_parallel).
pub struct GpuTrainModel {
    gpu: Arc<Gpu>,
    cfg: TritterConfig,
    layout: ParamLayout,
    adam: AdamWConfig,
    /// Made and destroyed outside every decode-graph capture of the process.
    blas: GatedBlas,
    params: CudaSlice<f32>,
    grads: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    layers: Vec<LayerDev>,
    /// bf16 copy of the LM head (the embedding when tied) `(V, H)`.
    head_bf16: CudaSlice<bf16>,
    head_off: usize,
    embed_off: usize,
    final_norm_off: usize,
    absmean_ws: AbsmeanWorkspace,
    norm_sq: CudaSlice<f64>,
    /// `[clip factor, grad norm]` of the last step.
    clip: CudaSlice<f32>,
    loss: CudaSlice<f64>,
    updates: u64,
    acts: Option<Acts>,
    /// Phase marks of a profiled step (`set_profiling`): each event ends the named phase.
    marks: Option<Vec<(&'static str, CudaEvent)>>,
    /// Which kernels run the BitLinear products (`set_linear_path`).
    linear: LinearPath,
    /// Data-parallel state ([`enable_data_parallel`](Self::enable_data_parallel)).
    dp: Option<DpState>,
    /// The elements of the flat buffers that `m` and `v` hold: all (`0..n`), or under
    /// ZeRO-1 this rank's shard (`m[i]` is element `opt_range.start + i`).
    opt_range: std::ops::Range<usize>,
}

/// Records the end of phase `name` when profiling.
fn mark(
    marks: &mut Option<Vec<(&'static str, CudaEvent)>>,
    gpu: &Gpu,
    name: &'static str,
) -> Result<()> {
    if let Some(m) = marks {
        let e = gpu
            .stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(KernelError::driver("recording a profile event"))?;
        m.push((name, e));
    }
    Ok(())
}

impl Drop for GpuTrainModel {
    fn drop(&mut self) {
        self.abort_group();
    }
}

impl std::fmt::Debug for GpuTrainModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuTrainModel")
            .field("config", &self.cfg)
            .field("params", &self.layout.len())
            .field("updates", &self.updates)
            .finish_non_exhaustive()
    }
}

impl GpuTrainModel {
    /// Uploads the reference model's weights (any dtype; kept as f32 shadow weights) with
    /// zeroed gradients and AdamW moments. Refuses configs the engine cannot train
    /// ([`check_trainable`]).
    pub fn from_model(gpu: &Arc<Gpu>, model: &TritterModel, adam: AdamWConfig) -> Result<Self> {
        let cfg = model.config().clone();
        check_trainable(&cfg)?;
        check_fits(gpu, &cfg)?;
        let layout = ParamLayout::new(&cfg)?;
        let mut host = vec![0f32; layout.len()];
        {
            let vars = model.varmap().data().lock().map_err(|_| {
                TritterError::config("model parameters", "a poisoned lock", "a usable VarMap")
            })?;
            for s in layout.slots() {
                let var = vars.get(&s.name).ok_or_else(|| {
                    TritterError::config("parameter", &s.name, "present in the model's VarMap")
                })?;
                let vals = var
                    .as_tensor()
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                if vals.len() != s.len() {
                    return Err(TritterError::ShapeMismatch {
                        what: s.name.clone(),
                        actual: var.dims().to_vec(),
                        expected: format!("{:?}", s.dims),
                    });
                }
                host[s.range()].copy_from_slice(&vals);
            }
        }
        Self::from_flat(gpu, cfg, layout, &host, adam)
    }

    /// A freshly initialized model: the weights `TritterModel::new(config, F32, cpu, seed)`
    /// would have ([`init_params`](super::init_params)), without building it on the host.
    pub fn new(
        gpu: &Arc<Gpu>,
        config: &TritterConfig,
        seed: u64,
        adam: AdamWConfig,
    ) -> Result<Self> {
        check_trainable(config)?;
        check_fits(gpu, config)?;
        let layout = ParamLayout::new(config)?;
        let host = super::init_params(config, &layout, seed);
        Self::from_flat(gpu, config.clone(), layout, &host, adam)
    }

    fn from_flat(
        gpu: &Arc<Gpu>,
        cfg: TritterConfig,
        layout: ParamLayout,
        host: &[f32],
        adam: AdamWConfig,
    ) -> Result<Self> {
        let g = gpu.as_ref();
        let n = layout.len();
        let params = g
            .stream()
            .clone_htod(host)
            .map_err(KernelError::driver("uploading the shadow weights"))?;
        let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let qkv_rows = cfg.num_heads * d + 2 * cfg.kv_dim();
        let off = |name: String| layout.get(&name).map(|s| s.offset);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("layers.{l}");
            layers.push(LayerDev {
                off: LayerOffsets {
                    qkv: off(format!("{p}.attn.q_proj.weight"))?,
                    o: off(format!("{p}.attn.o_proj.weight"))?,
                    gu: off(format!("{p}.mlp.gate_proj.weight"))?,
                    down: off(format!("{p}.mlp.down_proj.weight"))?,
                    attn_norm: off(format!("{p}.attn_norm.weight"))?,
                    mlp_norm: off(format!("{p}.mlp_norm.weight"))?,
                    q_norm: off(format!("{p}.attn.q_norm.weight"))?,
                    k_norm: off(format!("{p}.attn.k_norm.weight"))?,
                },
                qkv: TernaryMatrixGpu::zeros(g, qkv_rows, h, true)?,
                o: TernaryMatrixGpu::zeros(g, h, cfg.num_heads * d, false)?,
                gu: TernaryMatrixGpu::zeros(g, 2 * i, h, true)?,
                down: TernaryMatrixGpu::zeros(g, h, i, false)?,
                q_norm: alloc(g, d, "QK-Norm weights")?,
                k_norm: alloc(g, d, "QK-Norm weights")?,
                deq: None,
            });
        }
        let head_name = if cfg.tie_embeddings {
            "embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let blas = GatedBlas::new(g.stream().clone()).map_err(|e| TritterError::Cublas {
            context: "creating the handle".into(),
            detail: e.to_string(),
        })?;
        let mut model = GpuTrainModel {
            head_bf16: alloc(g, cfg.vocab_size * h, "the bf16 LM head")?,
            head_off: layout.get(head_name)?.offset,
            embed_off: layout.get("embed_tokens.weight")?.offset,
            final_norm_off: layout.get("norm.weight")?.offset,
            grads: alloc(g, n, "gradients")?,
            m: alloc(g, n, "AdamW first moments")?,
            v: alloc(g, n, "AdamW second moments")?,
            absmean_ws: AbsmeanWorkspace::new(g)?,
            norm_sq: alloc(g, 1, "the gradient norm")?,
            clip: alloc(g, 2, "the clip factor")?,
            loss: alloc(g, 1, "the loss sum")?,
            params,
            layers,
            blas,
            gpu: gpu.clone(),
            cfg,
            layout,
            adam,
            updates: 0,
            acts: None,
            marks: None,
            linear: LinearPath::Ternary,
            dp: None,
            opt_range: 0..n,
        };
        let path = LinearPath::for_compute_capability(g.info().compute_capability);
        if path.keeps_copies() {
            model.set_linear_path(path)?; // allocates the copies and refreshes
        } else {
            model.refresh_derived()?;
        }
        Ok(model)
    }

    /// The model config.
    pub fn config(&self) -> &TritterConfig {
        &self.cfg
    }

    /// The flat parameter layout.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Which kernels run the BitLinear products.
    pub fn linear_path(&self) -> LinearPath {
        self.linear
    }

    /// AdamW updates applied.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Allocates the activation buffers for micro-batches of `batch` x `seq_len` (a no-op
    /// when they exist for that shape). Refuses, before allocating, a plan that exceeds the
    /// device's free memory, printing the plan; when dropping the bf16 weight copies of the
    /// cuBLAS paths makes it fit, switches to [`LinearPath::Ternary`] instead.
    pub fn prepare(&mut self, batch: usize, seq_len: usize, recompute: bool) -> Result<()> {
        if let Some(a) = &self.acts {
            if (a.batch, a.seq_len, a.recompute) == (batch, seq_len, recompute) {
                return Ok(());
            }
        }
        self.acts = None;
        let (world, zero1) = self
            .dp
            .as_ref()
            .map_or((1, false), |d| (d.dp.world_size(), d.dp.zero1));
        let base =
            TrainPlan::new(&self.cfg, batch, seq_len, recompute)?.with_data_parallel(world, zero1);
        let plan = base.clone().with_linear_path(&self.cfg, self.linear);
        let free = free_bytes(&self.gpu)?;
        // Already allocated: weights, optimizer state, packed and bf16 copies.
        let needed = plan.total_bytes() - plan.state_bytes();
        let copies = plan.state_bytes() - base.state_bytes();
        if needed > free && copies > 0 && needed <= free + copies {
            // The cuBLAS path's weight copies are what keeps this micro-batch out: the
            // slower path that fits beats the faster one that does not.
            self.set_linear_path(LinearPath::Ternary)?;
            // Freed stream-ordered memory goes back to the device at a synchronisation.
            self.gpu
                .stream()
                .synchronize()
                .map_err(KernelError::driver("releasing the bf16 weight copies"))?;
            return self.prepare(batch, seq_len, recompute);
        }
        if needed > free {
            return Err(does_not_fit(
                &self.gpu,
                "the activations",
                needed,
                free,
                &plan,
            ));
        }
        self.acts = Some(Acts::new(
            &self.gpu,
            &self.cfg,
            batch,
            seq_len,
            recompute,
            self.linear,
        )?);
        Ok(())
    }

    /// Picks which kernels run the BitLinear products ([`LinearPath`]; the default is
    /// [`LinearPath::for_compute_capability`] of the device); the cuBLAS paths allocate the
    /// bf16 weight copies (2 bytes per linear weight) and fill them now. Activation buffers
    /// made for another path's forward are dropped (`prepare` makes them again).
    pub fn set_linear_path(&mut self, path: LinearPath) -> Result<()> {
        let g = self.gpu.clone();
        let (h, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let (q, kv) = (self.cfg.num_heads * self.cfg.head_dim(), self.cfg.kv_dim());
        if path.ternary_forward() != self.linear.ternary_forward() {
            self.acts = None;
        }
        self.linear = path;
        for layer in &mut self.layers {
            if !path.keeps_copies() {
                layer.deq = None;
            } else if layer.deq.is_none() {
                layer.deq = Some([
                    alloc(&g, (q + 2 * kv) * h, "bf16 q/k/v weights")?,
                    alloc(&g, h * q, "bf16 o_proj weights")?,
                    alloc(&g, 2 * i * h, "bf16 gate/up weights")?,
                    alloc(&g, h * i, "bf16 down_proj weights")?,
                ]);
            }
        }
        self.refresh_derived()
    }

    /// Turns per-phase timing on (CUDA events between the phases of every following
    /// `forward_backward` / `optimizer_step`) or off; [`take_profile`](Self::take_profile)
    /// reads it. Off by default: events cost a little and profiling is for `bench-train`.
    pub fn set_profiling(&mut self, on: bool) -> Result<()> {
        self.marks = None;
        if on {
            self.marks = Some(Vec::new());
            mark(&mut self.marks, &self.gpu, "start")?;
        }
        Ok(())
    }

    /// Synchronizes and returns milliseconds per phase summed since profiling was turned on,
    /// largest first, with how often each phase ran; restarts the profile.
    pub fn take_profile(&mut self) -> Result<Vec<(&'static str, f64, usize)>> {
        let Some(marks) = self.marks.take() else {
            return Ok(Vec::new());
        };
        self.settle("a profiled step")?;
        self.gpu
            .stream()
            .synchronize()
            .map_err(KernelError::driver("synchronizing a profiled step"))?;
        let mut out: Vec<(&'static str, f64, usize)> = Vec::new();
        for w in marks.windows(2) {
            let ms = f64::from(
                w[0].1
                    .elapsed_ms(&w[1].1)
                    .map_err(KernelError::driver("reading a profile event"))?,
            );
            match out.iter_mut().find(|e| e.0 == w[1].0) {
                Some(e) => {
                    e.1 += ms;
                    e.2 += 1;
                }
                None => out.push((w[1].0, ms, 1)),
            }
        }
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        self.set_profiling(true)?;
        Ok(out)
    }

    /// Zeroes the gradient buffer and the loss sum (the start of an optimizer step).
    pub fn zero_grads(&mut self) -> Result<()> {
        let s = self.gpu.stream();
        s.memset_zeros(&mut self.grads)
            .map_err(KernelError::driver("zeroing gradients"))?;
        if let Some(d) = self.dp.as_mut() {
            d.reduced = false;
        }
        Ok(())
    }

    /// Forward and backward pass of one micro-batch: adds its gradients to the gradient
    /// buffer and `sum(mask * nll) / denominator` to the device loss sum. Asynchronous; the
    /// inputs are checked (lengths, ids, mask) before anything is queued. In a data-parallel
    /// group the gradients stay local (DDP's `no_sync`): use
    /// [`forward_backward_final`](Self::forward_backward_final) for a step's last micro-batch.
    pub fn forward_backward(&mut self, mb: &MicroBatch<'_>) -> Result<()> {
        self.forward_backward_impl(mb, false)
    }

    /// [`forward_backward`](Self::forward_backward) for the last micro-batch of an optimizer
    /// step: in a data-parallel group (DDP) each gradient bucket is summed over the ranks as
    /// soon as the backward pass has finished it, overlapping communication with the rest of
    /// the backward pass. On one GPU, and under ZeRO-1, the same as `forward_backward` (the
    /// optimizer step sums whatever was not summed here).
    pub fn forward_backward_final(&mut self, mb: &MicroBatch<'_>) -> Result<()> {
        self.forward_backward_impl(mb, true)
    }

    fn forward_backward_impl(&mut self, mb: &MicroBatch<'_>, last: bool) -> Result<()> {
        let (b, l) = {
            let a = self
                .acts
                .as_ref()
                .ok_or_else(|| TritterError::InvalidArgument {
                    what: "GPU training step",
                    actual: "no activation buffers".into(),
                    expected: "prepare(batch, seq_len, recompute) first".into(),
                })?;
            (a.batch, a.seq_len)
        };
        self.check_batch(mb, b, l)?;
        let problem = self.problem(mb.mask, b, l)?;
        let acts = self.acts.as_mut().expect("checked above");
        let s = self.gpu.stream();
        s.memcpy_htod(mb.inputs, &mut acts.ids)
            .map_err(KernelError::driver("uploading token ids"))?;
        s.memcpy_htod(mb.targets, &mut acts.targets)
            .map_err(KernelError::driver("uploading targets"))?;
        s.memcpy_htod(mb.loss_mask, &mut acts.loss_mask)
            .map_err(KernelError::driver("uploading the loss mask"))?;
        let t = b * l;
        mark(&mut self.marks, &self.gpu, "inputs upload")?;
        self.embed(t)?;
        mark(&mut self.marks, &self.gpu, "embedding")?;
        let layers = self.cfg.num_layers;
        let recompute = self.acts.as_ref().is_some_and(|a| a.recompute);
        for li in 0..layers {
            self.forward_layer(li, if recompute { 0 } else { li }, t, &problem)?;
        }
        self.head(t, mb.denominator)?;
        let overlap = last && self.overlaps_reduce();
        if overlap {
            self.bucket_ready(Bucket::Head)?;
        }
        for li in (0..layers).rev() {
            let slot = if recompute { 0 } else { li };
            if recompute {
                self.forward_layer(li, slot, t, &problem)?;
            }
            self.backward_layer(li, slot, t, &problem)?;
            if overlap {
                self.bucket_ready(Bucket::Layer(li))?;
            }
        }
        self.embed_bwd(t)?;
        if overlap {
            self.bucket_ready(Bucket::Tail)?;
        }
        mark(&mut self.marks, &self.gpu, "embedding backward")
    }

    /// Global-norm clipping (`max_norm <= 0`: none) and one AdamW update with learning rate
    /// `lr`, then re-quantization of every BitLinear weight and the bf16 copies. All on the
    /// device. The gradients stay until the next [`zero_grads`](Self::zero_grads) (the start
    /// of the next step), so a diverged step can name its first non-finite gradient.
    /// In a data-parallel group the gradients are first summed over the ranks (unless
    /// [`forward_backward_final`](Self::forward_backward_final) did); under ZeRO-1 each rank
    /// updates its shard and the weights are all-gathered.
    pub fn optimizer_step(&mut self, lr: f64, max_norm: f64) -> Result<()> {
        let g = self.gpu.clone();
        let s = g.stream();
        let n = self.layout.len();
        self.check_unsharded("an optimizer step")?;
        self.reduce_grads()?;
        let own = self.opt_range.clone();
        s.memset_zeros(&mut self.norm_sq)
            .map_err(KernelError::driver("zeroing the norm"))?;
        if !own.is_empty() {
            let n_i = own.len() as i64;
            let f = g.function(&images::TRAIN, "train_sq_sum")?;
            let gr = self.grads.slice(own.clone());
            let mut lb = s.launch_builder(&f);
            lb.arg(&gr).arg(&n_i).arg(&mut self.norm_sq);
            // SAFETY: `train_sq_sum(const float*, long long, double*)`; the view holds n_i
            // values.
            unsafe { lb.launch(flat_cfg(own.len())) }
                .map_err(KernelError::driver("launching train_sq_sum"))?;
        }
        self.zero1_norm_sum()?;
        let f = g.function(&images::TRAIN, "train_clip_scale")?;
        let mn = max_norm as f32;
        let mut lb = s.launch_builder(&f);
        lb.arg(&self.norm_sq).arg(&mn).arg(&mut self.clip);
        // SAFETY: `train_clip_scale(const double*, float, float*)`; clip holds 2 values.
        unsafe { lb.launch(LaunchConfig::for_num_elems(1)) }
            .map_err(KernelError::driver("launching train_clip_scale"))?;
        self.updates += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.adam;
        let t = self.updates as i32;
        let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        let f = g.function(&images::TRAIN, "train_adamw")?;
        let dl = self.layout.decay_len();
        for (range, decay) in [(0..dl, 1.0 - lr * weight_decay), (dl..n, 1.0)] {
            // This rank's part (all of it without ZeRO-1).
            let range = range.start.max(own.start)..range.end.min(own.end);
            if range.is_empty() {
                continue;
            }
            let local = range.start - own.start..range.end - own.start;
            let len = range.len();
            let len_i = len as i64;
            let (lr_f, b1, b2, e, dec, c1, c2) = (
                lr as f32,
                beta1 as f32,
                beta2 as f32,
                eps as f32,
                decay as f32,
                bc1 as f32,
                bc2 as f32,
            );
            let mut p = self.params.slice_mut(range.clone());
            let gr = self.grads.slice(range.clone());
            let mut m = self.m.slice_mut(local.clone());
            let mut v = self.v.slice_mut(local);
            let mut lb = s.launch_builder(&f);
            lb.arg(&mut p)
                .arg(&gr)
                .arg(&mut m)
                .arg(&mut v)
                .arg(&len_i)
                .arg(&lr_f)
                .arg(&b1)
                .arg(&b2)
                .arg(&e)
                .arg(&dec)
                .arg(&c1)
                .arg(&c2)
                .arg(&self.clip);
            // SAFETY: `train_adamw(float*, const float*, float*, float*, long long, float x7,
            // const float*)`; the four views hold `len` values, clip 2.
            unsafe { lb.launch(flat_cfg(len)) }
                .map_err(KernelError::driver("launching train_adamw"))?;
        }
        self.zero1_gather_params()?;
        mark(&mut self.marks, &self.gpu, "optimizer: norm + AdamW")?;
        self.refresh_derived()?;
        mark(&mut self.marks, &self.gpu, "optimizer: re-quantize")
    }

    /// Synchronizes and returns the loss summed since the last read (then zeroed) and the
    /// last step's gradient norm. Fails when either is not finite: with
    /// [`TritterError::NonFiniteGradient`] naming the first parameter whose gradient holds
    /// NaN/Inf (read before the next `zero_grads`), else [`TritterError::Diverged`]. The
    /// parameters then hold the last finite update: AdamW skips a step whose gradient norm
    /// is not finite.
    pub fn read_metrics(&mut self) -> Result<GpuStepMetrics> {
        self.reduce_loss()?;
        self.settle("the training step")?;
        let s = self.gpu.stream();
        let loss = s
            .clone_dtoh(&self.loss)
            .map_err(KernelError::driver("reading the loss"))?[0];
        let clip = s
            .clone_dtoh(&self.clip)
            .map_err(KernelError::driver("reading the gradient norm"))?;
        s.memset_zeros(&mut self.loss)
            .map_err(KernelError::driver("zeroing the loss"))?;
        let m = GpuStepMetrics {
            loss,
            grad_norm: f64::from(clip[1]),
        };
        for (what, v) in [("loss", m.loss), ("gradient norm", m.grad_norm)] {
            if !v.is_finite() {
                for (tensor, g) in self.download_grads()? {
                    if let Some(x) = g.iter().find(|x| !x.is_finite()) {
                        return Err(TritterError::NonFiniteGradient {
                            step: self.updates,
                            tensor,
                            value: x.to_string(),
                        });
                    }
                }
                return Err(TritterError::Diverged {
                    step: self.updates,
                    what,
                    value: v,
                });
            }
        }
        Ok(m)
    }

    /// Loads a host optimizer's state (moments by name and update count) into the device
    /// buffers: a run continues on the GPU from a CPU checkpoint.
    pub fn load_optimizer(&mut self, opt: &super::AdamW) -> Result<()> {
        let n = self.layout.len();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        for s in self.layout.slots() {
            let (mt, vt) = opt.moments(&s.name).ok_or_else(|| {
                TritterError::config("optimizer state", &s.name, "a moment for every parameter")
            })?;
            for (dst, t) in [(&mut m, mt), (&mut v, vt)] {
                let vals = t.flatten_all()?.to_vec1::<f32>()?;
                if vals.len() != s.len() {
                    return Err(TritterError::ShapeMismatch {
                        what: format!("optimizer moment of {}", s.name),
                        actual: t.dims().to_vec(),
                        expected: format!("{:?}", s.dims),
                    });
                }
                dst[s.range()].copy_from_slice(&vals);
            }
        }
        // Under ZeRO-1 only this rank's shard.
        let own = self.opt_range.clone();
        let st = self.gpu.stream();
        st.memcpy_htod(&m[own.clone()], &mut self.m.slice_mut(0..own.len()))
            .map_err(KernelError::driver("uploading AdamW moments"))?;
        st.memcpy_htod(&v[own.clone()], &mut self.v.slice_mut(0..own.len()))
            .map_err(KernelError::driver("uploading AdamW moments"))?;
        self.updates = opt.num_updates();
        Ok(())
    }

    /// Copies the device state into the host model and optimizer (synchronizes): shadow
    /// weights into the model's variables, moments and update count into `opt`. What a
    /// checkpoint needs. Under ZeRO-1 the moments are gathered from every rank: a
    /// collective, so every rank of the group calls it.
    pub fn store_into(&self, model: &TritterModel, opt: &mut super::AdamW) -> Result<()> {
        self.store_params_into(model)?;
        let m = self.by_name(self.full_moments(&self.m)?);
        let v = self.by_name(self.full_moments(&self.v)?);
        let dev = model.device().clone();
        let mut moments = Vec::with_capacity(m.len());
        for ((name, mv), (_, vv)) in m.into_iter().zip(v) {
            let dims = self.layout.get(&name)?.dims.clone();
            moments.push((
                name,
                candle_core::Tensor::from_vec(mv, dims.as_slice(), &dev)?,
                candle_core::Tensor::from_vec(vv, dims.as_slice(), &dev)?,
            ));
        }
        opt.set_state(moments, self.updates)
    }

    /// Copies the shadow weights into the host model's variables (synchronizes): what a CPU
    /// evaluation or a sample needs. Not a collective: every rank holds all weights.
    pub fn store_params_into(&self, model: &TritterModel) -> Result<()> {
        let params = self.download_params()?;
        let vars = model.varmap().data().lock().map_err(|_| {
            TritterError::config("model parameters", "a poisoned lock", "a usable VarMap")
        })?;
        for (name, p) in params {
            let var = vars.get(&name).ok_or_else(|| {
                TritterError::config("parameter", &name, "present in the model's VarMap")
            })?;
            let dims = var.dims().to_vec();
            let dev = var.device().clone();
            var.set(
                &candle_core::Tensor::from_vec(p, dims.as_slice(), &dev)?.to_dtype(var.dtype())?,
            )?;
        }
        Ok(())
    }

    /// Every parameter's shadow weights, by checkpoint name (synchronizes).
    pub fn download_params(&self) -> Result<Vec<(String, Vec<f32>)>> {
        self.download(&self.params, "parameters")
    }

    /// Every parameter's accumulated gradient, by checkpoint name (synchronizes).
    pub fn download_grads(&self) -> Result<Vec<(String, Vec<f32>)>> {
        self.download(&self.grads, "gradients")
    }

    fn download(&self, buf: &CudaSlice<f32>, what: &str) -> Result<Vec<(String, Vec<f32>)>> {
        self.settle(what)?;
        let all = self
            .gpu
            .stream()
            .clone_dtoh(buf)
            .map_err(|e| KernelError::driver(format!("reading {what}"))(e))?;
        Ok(self.by_name(all))
    }

    /// A flat host buffer cut into parameters, by checkpoint name.
    fn by_name(&self, all: Vec<f32>) -> Vec<(String, Vec<f32>)> {
        self.layout
            .slots()
            .iter()
            .map(|s| (s.name.clone(), all[s.range()].to_vec()))
            .collect()
    }

    fn check_batch(&self, mb: &MicroBatch<'_>, b: usize, l: usize) -> Result<()> {
        let t = b * l;
        for (what, len) in [
            ("inputs", mb.inputs.len()),
            ("targets", mb.targets.len()),
            ("loss_mask", mb.loss_mask.len()),
        ] {
            if len != t {
                return Err(TritterError::ShapeMismatch {
                    what: what.into(),
                    actual: vec![len],
                    expected: format!("({b} * {l}) values of the prepared batch shape"),
                });
            }
        }
        let v = self.cfg.vocab_size;
        for (row, chunk) in mb.inputs.chunks(l).enumerate() {
            crate::model::check_token_ids(chunk, row, v)?;
        }
        if let Some(i) = mb.targets.iter().position(|&id| id as usize >= v) {
            return Err(TritterError::InvalidArgument {
                what: "targets",
                actual: format!("id {} at flat index {i}", mb.targets[i]),
                expected: format!("ids below the vocabulary size {v}"),
            });
        }
        if let Some(i) = mb
            .loss_mask
            .iter()
            .position(|&m| !(m.is_finite() && (0.0..=1.0).contains(&m)))
        {
            return Err(TritterError::NonFinite {
                what: "loss_mask (values must be finite, in 0..=1)".into(),
                index: i,
                value: mb.loss_mask[i].to_string(),
            });
        }
        if mb.denominator == 0 {
            return Err(TritterError::InvalidArgument {
                what: "loss denominator",
                actual: "0".into(),
                expected: "the step's target count (>= 1)".into(),
            });
        }
        mb.mask.validate(b, l)
    }

    /// flash-attn's problem for the reference's mask on a fixed `(b, l)` batch.
    fn problem(&self, mask: &MaskSpec, b: usize, l: usize) -> Result<ProblemGpu> {
        let mode = match mask.mode {
            AttentionMode::Causal => MaskMode::Causal,
            AttentionMode::Bidirectional | AttentionMode::Embedding => MaskMode::Bidirectional,
            AttentionMode::PrefixLm => MaskMode::PrefixLm,
        };
        let inputs = MaskInputs {
            prefix_lens: mask
                .prefix_lens
                .as_ref()
                .map(|p| p.iter().map(|&x| x as i32).collect()),
            doc_ids: mask
                .doc_ids
                .as_ref()
                .map(|d| d.iter().flatten().map(|&x| x as i32).collect()),
        };
        let d = self.cfg.head_dim();
        let problem = Problem {
            heads: Heads::new(self.cfg.num_heads, self.cfg.num_kv_heads, d),
            seqs: Seqs::Fixed {
                batch: b,
                lq: l,
                lk: l,
            },
            mask: Mask {
                mode,
                window: mask.sliding_window,
                sinks: if mask.sliding_window.is_some() {
                    mask.sinks
                } else {
                    0
                },
            },
            inputs,
        };
        Ok(ProblemGpu::new(&self.gpu, problem, Positions::default())?)
    }

    /// Re-quantizes every BitLinear weight and refreshes the bf16 copies from the shadow
    /// weights (on [`LinearPath::Cublas`] only the bf16 `Wq gamma` copies: no product reads
    /// the packed codes there).
    fn refresh_derived(&mut self) -> Result<()> {
        let g = self.gpu.clone();
        let (h, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let (q, kv) = (self.cfg.num_heads * self.cfg.head_dim(), self.cfg.kv_dim());
        let d = self.cfg.head_dim();
        for layer in &mut self.layers {
            let o = layer.off;
            // (matrix, first parameter element, first row, rows, columns): one absmean
            // gamma per BitLinear layer, q/k/v and gate/up as row blocks of stacked matrices.
            let blocks: [(usize, usize, usize, usize, usize); 7] = [
                (0, o.qkv, 0, q, h),
                (0, o.qkv + q * h, q, kv, h),
                (0, o.qkv + (q + kv) * h, q + kv, kv, h),
                (1, o.o, 0, h, q),
                (2, o.gu, 0, i, h),
                (2, o.gu + i * h, i, i, h),
                (3, o.down, 0, h, i),
            ];
            for (m, start, row0, rows, k) in blocks {
                let w = self.params.slice(start..start + rows * k);
                let (mat, deq) = layer.matrix(m);
                match deq {
                    // No product reads the packed codes on the cuBLAS path.
                    Some(dq) if !self.linear.ternary_forward() => absmean_dequant_cuda(
                        &g,
                        &w,
                        &mut self.absmean_ws,
                        &mut dq.slice_mut(row0 * k..(row0 + rows) * k),
                    )?,
                    Some(dq) => absmean_quantize_dequant_cuda(
                        &g,
                        &w,
                        row0..row0 + rows,
                        mat,
                        &mut self.absmean_ws,
                        &mut dq.slice_mut(row0 * k..(row0 + rows) * k),
                    )?,
                    None => {
                        absmean_quantize_cuda(&g, &w, row0..row0 + rows, mat, &mut self.absmean_ws)?
                    }
                }
            }
            to_bf16(
                &g,
                &self.params.slice(o.q_norm..o.q_norm + d),
                &mut layer.q_norm.slice_mut(..),
                d,
            )?;
            to_bf16(
                &g,
                &self.params.slice(o.k_norm..o.k_norm + d),
                &mut layer.k_norm.slice_mut(..),
                d,
            )?;
        }
        let vh = self.cfg.vocab_size * h;
        to_bf16(
            &g,
            &self.params.slice(self.head_off..self.head_off + vh),
            &mut self.head_bf16.slice_mut(..),
            vh,
        )
    }

    fn embed(&mut self, t: usize) -> Result<()> {
        let g = self.gpu.clone();
        let h = self.cfg.hidden_size;
        let acts = self.acts.as_mut().expect("prepared");
        let table = self
            .params
            .slice(self.embed_off..self.embed_off + self.cfg.vocab_size * h);
        let f = g.function(&images::TRAIN, "train_embed")?;
        let h_i = h as i32;
        let mut lb = g.stream().launch_builder(&f);
        lb.arg(&acts.ids)
            .arg(&table)
            .arg(&mut acts.resid[0])
            .arg(&h_i);
        // SAFETY: `train_embed(const unsigned*, const float*, float*, int)`; ids hold t ids
        // < V (checked), table (V, H), resid[0] (t, H); one CTA per row.
        unsafe { lb.launch(rows_cfg(t)) }.map_err(KernelError::driver("launching train_embed"))?;
        Ok(())
    }

    fn embed_bwd(&mut self, t: usize) -> Result<()> {
        let g = self.gpu.clone();
        let h = self.cfg.hidden_size;
        let acts = self.acts.as_ref().expect("prepared");
        let mut table = self
            .grads
            .slice_mut(self.embed_off..self.embed_off + self.cfg.vocab_size * h);
        let f = g.function(&images::TRAIN, "train_embed_bwd")?;
        let h_i = h as i32;
        let mut lb = g.stream().launch_builder(&f);
        lb.arg(&acts.ids).arg(&acts.g).arg(&mut table).arg(&h_i);
        // SAFETY: `train_embed_bwd(const unsigned*, const float*, float*, int)`; as train_embed.
        unsafe { lb.launch(rows_cfg(t)) }
            .map_err(KernelError::driver("launching train_embed_bwd"))?;
        Ok(())
    }

    /// Layer `li`'s forward from `resid[li]` into `resid[li + 1]`, saving into `slot`. The
    /// BitLinear products run on the ternary GEMM or, on [`LinearPath::Cublas`], through
    /// cuBLAS on `deq(A8(x))` and the bf16 weight copies.
    fn forward_layer(&mut self, li: usize, slot: usize, t: usize, pb: &ProblemGpu) -> Result<()> {
        let g = self.gpu.clone();
        let cfg = &self.cfg;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (cfg.num_heads * cfg.head_dim(), cfg.kv_dim());
        let eps = cfg.norm_eps as f32;
        let layer = &self.layers[li];
        let blas = &self.blas;
        let acts = self.acts.as_mut().expect("prepared");
        let Acts {
            slots,
            resid,
            tern,
            deq,
            k_hat,
            rope,
            ..
        } = acts;
        let sa = &mut slots[slot];
        let (before, after) = resid.split_at_mut(li + 1);
        let x = &before[li];
        let out = &mut after[0];
        // The cuBLAS path's weight copies (the path keeps them; checked, not assumed).
        let copies = || {
            layer
                .deq
                .as_ref()
                .ok_or_else(|| TritterError::InvalidArgument {
                    what: "cuBLAS forward",
                    actual: "no bf16 weight copies".into(),
                    expected: "set_linear_path(LinearPath::Cublas) to make them".into(),
                })
        };
        match tern.as_mut() {
            Some(tf) => {
                tf.acts_h.quantize_from(&g, &x.slice(..))?;
                ternary_matmul_a8_cuda(
                    &g,
                    &layer.qkv,
                    &tf.acts_h,
                    &mut tf.y_qkv.slice_mut(..),
                    &mut tf.gemv_ws,
                )?;
                launch_split_qkv(&g, &tf.y_qkv, &mut sa.q, &mut sa.k, &mut sa.v, t, q, kv)?;
            }
            None => {
                let w = &copies()?[0];
                a8_deq(&g, &x.slice(..), deq, t, h, false)?;
                // q, k, v straight as bf16 from the row blocks of the stacked weight.
                for (dst, r0, n, what) in [
                    (&mut sa.q, 0, q, "the q projection"),
                    (&mut sa.k, q, kv, "the k projection"),
                    (&mut sa.v, q + kv, kv, "the v projection"),
                ] {
                    gemm(
                        blas,
                        &g,
                        Product::ABt,
                        &deq.slice(..t * h),
                        &w.slice(r0 * h..(r0 + n) * h),
                        &mut dst.slice_mut(..),
                        (t, n, h),
                        0.0,
                        what,
                    )?;
                }
            }
        }
        mark(&mut self.marks, &g, "fwd: A8 + q/k/v GEMM")?;
        let nr = NormRopeGpu {
            q_norm: &layer.q_norm,
            k_norm: &layer.k_norm,
            eps,
            rope,
        };
        flash_attn_fwd_cuda(
            &g,
            pb,
            &sa.q,
            &sa.k,
            &sa.v,
            &mut sa.o,
            &mut sa.lse,
            Some(PrologueFwd {
                norm_rope: &nr,
                k_hat,
            }),
        )?;
        mark(&mut self.marks, &g, "fwd: attention")?;
        match tern.as_mut() {
            Some(tf) => {
                tf.acts_h.quantize_from(&g, &sa.o.slice(..))?;
                ternary_matmul_a8_cuda(
                    &g,
                    &layer.o,
                    &tf.acts_h,
                    &mut sa.a.slice_mut(..),
                    &mut tf.gemv_ws,
                )?;
            }
            None => {
                a8_deq(&g, &sa.o.slice(..), deq, t, q, true)?;
                gemm(
                    blas,
                    &g,
                    Product::ABt,
                    &deq.slice(..t * q),
                    &copies()?[1].slice(..),
                    &mut sa.a.slice_mut(..),
                    (t, h, q),
                    0.0,
                    "the o projection",
                )?;
            }
        }
        mark(&mut self.marks, &g, "fwd: A8 + o GEMM")?;
        let o = layer.off;
        norm_fwd(
            &g,
            Some(x),
            &sa.a,
            &self.params.slice(o.attn_norm..o.attn_norm + h),
            &mut sa.h,
            &mut sa.ra,
            t,
            h,
            eps,
        )?;
        match tern.as_mut() {
            Some(tf) => {
                tf.acts_h.quantize_from(&g, &sa.h.slice(..))?;
                ternary_matmul_a8_cuda(
                    &g,
                    &layer.gu,
                    &tf.acts_h,
                    &mut tf.gu_out.slice_mut(..),
                    &mut tf.gemv_ws,
                )?;
                mark(&mut self.marks, &g, "fwd: norm_a + A8 + gate/up GEMM")?;
                launch_glu_a8(&g, &tf.gu_out, &mut sa.gu, &mut sa.mq, &mut tf.acts_i, t, i)?;
                ternary_matmul_a8_cuda(
                    &g,
                    &layer.down,
                    &tf.acts_i,
                    &mut sa.d.slice_mut(..),
                    &mut tf.gemv_ws,
                )?;
            }
            None => {
                let w = copies()?;
                a8_deq(&g, &sa.h.slice(..), deq, t, h, false)?;
                // [g | u] straight into the saved bf16 copy.
                gemm(
                    blas,
                    &g,
                    Product::ABt,
                    &deq.slice(..t * h),
                    &w[2].slice(..),
                    &mut sa.gu.slice_mut(..),
                    (t, 2 * i, h),
                    0.0,
                    "the gate/up projection",
                )?;
                mark(&mut self.marks, &g, "fwd: norm_a + A8 + gate/up GEMM")?;
                launch_glu_deq(&g, &sa.gu, &mut sa.mq, t, i)?;
                gemm(
                    blas,
                    &g,
                    Product::ABt,
                    &sa.mq.slice(..),
                    &w[3].slice(..),
                    &mut sa.d.slice_mut(..),
                    (t, h, i),
                    0.0,
                    "the down projection",
                )?;
            }
        }
        mark(&mut self.marks, &g, "fwd: GLU + A8 + down GEMM")?;
        norm_fwd(
            &g,
            Some(&sa.h),
            &sa.d,
            &self.params.slice(o.mlp_norm..o.mlp_norm + h),
            out,
            &mut sa.rf,
            t,
            h,
            eps,
        )?;
        mark(&mut self.marks, &g, "fwd: norm_f")?;
        Ok(())
    }

    /// Final norm, LM head and cross-entropy in row chunks; leaves `dL/d resid[L]` in `g`.
    fn head(&mut self, t: usize, denominator: usize) -> Result<()> {
        let g = self.gpu.clone();
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let eps = self.cfg.norm_eps as f32;
        let layers = self.cfg.num_layers;
        let acts = self.acts.as_mut().expect("prepared");
        let fw = self
            .params
            .slice(self.final_norm_off..self.final_norm_off + h);
        norm_fwd(
            &g,
            None,
            &acts.resid[layers],
            &fw,
            &mut acts.final_out,
            &mut acts.final_rd,
            t,
            h,
            eps,
        )?;
        to_bf16(
            &g,
            &acts.final_out.slice(..),
            &mut acts.hidden_bf16.slice_mut(..),
            t * h,
        )?;
        mark(&mut self.marks, &g, "head: final norm")?;
        let scale = 1.0f32 / denominator as f32;
        let f_ce = g.function(&images::TRAIN, "train_ce")?;
        let v_i = v as i32;
        let mut r0 = 0;
        while r0 < t {
            let r = acts.chunk.min(t - r0);
            let hid = acts.hidden_bf16.slice(r0 * h..(r0 + r) * h);
            // logits (r, V) = hidden (r, H) · headᵀ, bf16 (f32 accumulation)
            gemm(
                &self.blas,
                &g,
                Product::ABt,
                &hid,
                &self.head_bf16.slice(..),
                &mut acts.logits.slice_mut(..r * v),
                (r, v, h),
                0.0,
                "computing logits",
            )?;
            {
                let targets = acts.targets.slice(r0..r0 + r);
                let mask = acts.loss_mask.slice(r0..r0 + r);
                let mut lb = g.stream().launch_builder(&f_ce);
                let mut logits = acts.logits.slice_mut(..r * v);
                lb.arg(&mut logits)
                    .arg(&targets)
                    .arg(&mask)
                    .arg(&mut self.loss)
                    .arg(&v_i)
                    .arg(&scale);
                // SAFETY: `train_ce(bf16*, const unsigned*, const float*, double*, int, float)`;
                // logits hold r rows of V (the gradient replaces them), targets (< V, checked)
                // and mask r values, loss one; one CTA of CE_THREADS per row.
                unsafe { lb.launch(rows_cfg_of(r, CE_THREADS)) }
                    .map_err(KernelError::driver("launching train_ce"))?;
            }
            // dhidden (r, H) = dlogits (r, V) · head (V, H); the chunk now holds dlogits
            let dl = acts.logits.slice(..r * v);
            gemm(
                &self.blas,
                &g,
                Product::AB,
                &dl,
                &self.head_bf16.slice(..),
                &mut acts.g2.slice_mut(r0 * h..(r0 + r) * h),
                (r, h, v),
                0.0,
                "back-propagating the logits",
            )?;
            // dhead (V, H) += dlogitsᵀ (V, r) · hidden (r, H)
            gemm(
                &self.blas,
                &g,
                Product::AtB,
                &dl,
                &hid,
                &mut self.grads.slice_mut(self.head_off..self.head_off + v * h),
                (v, h, r),
                1.0,
                "computing the LM head gradient",
            )?;
            r0 += r;
        }
        mark(&mut self.marks, &g, "head: logits + CE + LM head grads")?;
        let mut dw = self
            .grads
            .slice_mut(self.final_norm_off..self.final_norm_off + h);
        norm_bwd(
            &g,
            &acts.resid[layers],
            &fw,
            &acts.final_rd,
            &acts.g2,
            &mut acts.g.slice_mut(..),
            &mut dw,
            t,
            h,
        )?;
        mark(&mut self.marks, &g, "head: final norm backward")?;
        Ok(())
    }

    /// Layer `li`'s backward: `g` holds `dL/d resid[li + 1]` on entry and `dL/d resid[li]` on
    /// exit; parameter gradients are added to `grads`.
    fn backward_layer(&mut self, li: usize, slot: usize, t: usize, pb: &ProblemGpu) -> Result<()> {
        let g = self.gpu.clone();
        let cfg = &self.cfg;
        let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (q, kv) = (cfg.num_heads * d, cfg.kv_dim());
        let qkv = q + 2 * kv;
        let eps = cfg.norm_eps as f32;
        let layer = &self.layers[li];
        let o = layer.off;
        let acts = self.acts.as_mut().expect("prepared");
        let Acts {
            slots,
            resid,
            deq,
            dyb,
            dgu,
            dqkv,
            g: gr,
            tmp,
            dout,
            attn_grads,
            norm_grads,
            bwd_ws,
            rope,
            ..
        } = acts;
        let sa = &slots[slot];
        let params = &self.params;
        let grads = &mut self.grads;
        let blas = &self.blas;
        // out = h + norm_f(d): dd = norm_bwd(g) (bf16: it only feeds products); dh = g (+ MLP
        // input gradient below).
        norm_bwd(
            &g,
            &sa.d,
            &params.slice(o.mlp_norm..o.mlp_norm + h),
            &sa.rf,
            gr,
            &mut dyb.slice_mut(..),
            &mut grads.slice_mut(o.mlp_norm..o.mlp_norm + h),
            t,
            h,
        )?;
        mark(&mut self.marks, &g, "bwd: norm_f")?;
        // down: dW += ddᵀ · deq(A8(glu)) (saved by the forward), dmh = dd · W.
        gemm(
            blas,
            &g,
            Product::AtB,
            &dyb.slice(..t * h),
            &sa.mq.slice(..),
            &mut grads.slice_mut(o.down..o.down + h * i),
            (h, i, t),
            1.0,
            "computing the down_proj gradient",
        )?;
        // dmh stays f32 (in tmp): rounding it to bf16 before the GLU backward saved 2.7 ms
        // of a 500M step but moved the 200-step loss curve test past its tolerance.
        input_grad(
            blas,
            &g,
            &layer.down,
            layer.deq.as_ref().map(|d| &d[3]),
            &dyb.slice(..t * h),
            t,
            DxDst::F32,
            tmp,
        )?;
        launch_glu_bwd(&g, &sa.gu, &tmp.slice(..t * i), dgu, t, i)?;
        mark(&mut self.marks, &g, "bwd: down dW + dX, GLU")?;
        // gate/up: dW += dguᵀ · deq(A8(h)), dh += dgu · W.
        a8_deq(&g, &sa.h.slice(..), deq, t, h, false)?;
        gemm(
            blas,
            &g,
            Product::AtB,
            &dgu.slice(..),
            &deq.slice(..t * h),
            &mut grads.slice_mut(o.gu..o.gu + 2 * i * h),
            (2 * i, h, t),
            1.0,
            "computing the gate/up_proj gradient",
        )?;
        input_grad(
            blas,
            &g,
            &layer.gu,
            layer.deq.as_ref().map(|d| &d[2]),
            &dgu.slice(..),
            t,
            DxDst::Add(gr),
            tmp,
        )?;
        mark(&mut self.marks, &g, "bwd: gate/up dW + dX")?;
        // h = x + norm_a(a): da = norm_bwd(dh); dx = dh (+ attention input gradient below).
        norm_bwd(
            &g,
            &sa.a,
            &params.slice(o.attn_norm..o.attn_norm + h),
            &sa.ra,
            gr,
            &mut dyb.slice_mut(..),
            &mut grads.slice_mut(o.attn_norm..o.attn_norm + h),
            t,
            h,
        )?;
        mark(&mut self.marks, &g, "bwd: norm_a")?;
        // o_proj: dW += daᵀ · deq(A8(o)), do = da · W.
        a8_deq(&g, &sa.o.slice(..), deq, t, q, true)?;
        gemm(
            blas,
            &g,
            Product::AtB,
            &dyb.slice(..t * h),
            &deq.slice(..t * q),
            &mut grads.slice_mut(o.o..o.o + h * q),
            (h, q, t),
            1.0,
            "computing the o_proj gradient",
        )?;
        input_grad(
            blas,
            &g,
            &layer.o,
            layer.deq.as_ref().map(|d| &d[1]),
            &dyb.slice(..t * h),
            t,
            DxDst::Bf16(&mut dout.slice_mut(..)),
            tmp,
        )?;
        mark(&mut self.marks, &g, "bwd: o dW + dX")?;
        // attention (QK-Norm + RoPE fused): raw dq, dk, dv and the norm weights' gradients.
        let nr = NormRopeGpu {
            q_norm: &layer.q_norm,
            k_norm: &layer.k_norm,
            eps,
            rope,
        };
        flash_attn_bwd_cuda(
            &g,
            pb,
            &sa.q,
            &sa.k,
            &sa.v,
            &sa.o,
            &sa.lse,
            dout,
            attn_grads,
            bwd_ws,
            Some(PrologueBwd {
                norm_rope: &nr,
                grads: norm_grads,
            }),
            BwdMode::Atomic,
        )?;
        add(
            &g,
            &mut grads.slice_mut(o.q_norm..o.q_norm + d),
            &norm_grads.dq_norm.slice(..),
            d,
        )?;
        add(
            &g,
            &mut grads.slice_mut(o.k_norm..o.k_norm + d),
            &norm_grads.dk_norm.slice(..),
            d,
        )?;
        launch_merge_qkv(&g, attn_grads, dqkv, t, q, kv)?;
        mark(&mut self.marks, &g, "bwd: attention")?;
        // q/k/v: dW += dqkvᵀ · deq(A8(x)), dx += dqkv · W.
        a8_deq(&g, &resid[li].slice(..), deq, t, h, false)?;
        gemm(
            blas,
            &g,
            Product::AtB,
            &dqkv.slice(..),
            &deq.slice(..t * h),
            &mut grads.slice_mut(o.qkv..o.qkv + qkv * h),
            (qkv, h, t),
            1.0,
            "computing the q/k/v_proj gradient",
        )?;
        input_grad(
            blas,
            &g,
            &layer.qkv,
            layer.deq.as_ref().map(|d| &d[0]),
            &dqkv.slice(..),
            t,
            DxDst::Add(gr),
            tmp,
        )?;
        mark(&mut self.marks, &g, "bwd: q/k/v dW + dX")?;
        Ok(())
    }
}

impl Acts {
    fn new(
        gpu: &Arc<Gpu>,
        cfg: &TritterConfig,
        batch: usize,
        seq_len: usize,
        recompute: bool,
        path: LinearPath,
    ) -> Result<Self> {
        let g = gpu.as_ref();
        let t = batch * seq_len;
        let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (q, kv) = (cfg.num_heads * d, cfg.kv_dim());
        let qkv = q + 2 * kv;
        if h > MAX_NORM_COLS {
            return Err(TritterError::config(
                "hidden_size",
                h,
                format!("at most {MAX_NORM_COLS} for the training engine's norm kernels"),
            ));
        }
        let slots = (0..if recompute { 1 } else { cfg.num_layers })
            .map(|_| {
                Ok(LayerActs {
                    q: alloc(g, t * q, "saved q")?,
                    k: alloc(g, t * kv, "saved k")?,
                    v: alloc(g, t * kv, "saved v")?,
                    o: alloc(g, t * q, "saved attention output")?,
                    lse: alloc(g, t * cfg.num_heads, "saved logsumexp")?,
                    a: alloc(g, t * h, "saved o_proj output")?,
                    ra: alloc(g, t, "saved norm denominators")?,
                    h: alloc(g, t * h, "saved residual")?,
                    gu: alloc(g, t * 2 * i, "saved gate/up output")?,
                    mq: alloc(g, t * i, "saved MLP hidden")?,
                    d: alloc(g, t * h, "saved down output")?,
                    rf: alloc(g, t, "saved norm denominators")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let resid = (0..=cfg.num_layers)
            .map(|_| alloc(g, t * h, "layer inputs"))
            .collect::<Result<Vec<_>>>()?;
        let problem = Problem::fixed(
            Heads::new(cfg.num_heads, cfg.num_kv_heads, d),
            batch,
            seq_len,
            seq_len,
            Mask::CAUSAL,
        );
        let chunk = logits_chunk_rows(t, cfg.vocab_size);
        let wide = h.max(i).max(q);
        Ok(Acts {
            batch,
            seq_len,
            recompute,
            slots,
            resid,
            final_out: alloc(g, t * h, "final hidden states")?,
            final_rd: alloc(g, t, "final norm denominators")?,
            hidden_bf16: alloc(g, t * h, "bf16 hidden states")?,
            ids: alloc(g, t, "token ids")?,
            targets: alloc(g, t, "targets")?,
            loss_mask: alloc(g, t, "loss mask")?,
            tern: if path.ternary_forward() {
                Some(TernaryFwd {
                    acts_h: GemvActivations::new(g, t, h)?,
                    acts_i: GemvActivations::new(g, t, i)?,
                    gemv_ws: GemvWorkspace::new(g, qkv.max(h).max(2 * i))?,
                    y_qkv: alloc(g, t * qkv, "q/k/v projections")?,
                    gu_out: alloc(g, t * 2 * i, "gate/up output")?,
                })
            } else {
                None
            },
            deq: alloc(g, t * wide, "dequantized activations")?,
            dyb: alloc(g, t * h, "bf16 output gradients")?,
            dgu: alloc(g, t * 2 * i, "gate/up gradients")?,
            dqkv: alloc(g, t * qkv, "q/k/v gradients")?,
            g: alloc(g, t * h, "residual gradient")?,
            g2: alloc(g, t * h, "branch gradient")?,
            tmp: alloc(g, t * wide, "input gradient")?,
            k_hat: alloc(g, t * kv, "normalized keys")?,
            dout: alloc(g, t * q, "attention output gradient")?,
            attn_grads: GradsGpu::new(g, &problem)?,
            norm_grads: NormGradsGpu::new(g, d)?,
            bwd_ws: BwdWorkspace::new(g, &problem, true)?,
            logits: alloc(g, chunk * cfg.vocab_size, "logits chunk")?,
            chunk,
            rope: RopeTable::new(g, d, cfg.rope_theta as f32, seq_len)?,
        })
    }
}

fn to_bf16(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, bf16>,
    n: usize,
) -> Result<()> {
    let f = gpu.function(&images::TRAIN, "train_to_bf16")?;
    let n_i = n as i64;
    let mut lb = gpu.stream().launch_builder(&f);
    lb.arg(x).arg(y).arg(&n_i);
    // SAFETY: `train_to_bf16(const float*, bf16*, long long)`; both views hold >= n values
    // (the callers slice them to n).
    unsafe { lb.launch(flat_cfg(n)) }.map_err(KernelError::driver("launching train_to_bf16"))?;
    Ok(())
}

fn add<Y: DevicePtrMut<f32>>(gpu: &Gpu, y: &mut Y, x: &CudaView<'_, f32>, n: usize) -> Result<()> {
    let f = gpu.function(&images::TRAIN, "train_add")?;
    let n_i = n as i64;
    let s = gpu.stream();
    let (yp, _gy) = y.device_ptr_mut(s);
    let (xp, _gx) = x.device_ptr(s);
    let mut lb = s.launch_builder(&f);
    lb.arg(&yp).arg(&xp).arg(&n_i);
    // SAFETY: `train_add(float*, const float*, long long)`; y and x hold >= n f32 values
    // (callers pass buffers of n or more) and do not overlap.
    unsafe { lb.launch(flat_cfg(n)) }.map_err(KernelError::driver("launching train_add"))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn norm_fwd(
    gpu: &Gpu,
    res: Option<&CudaSlice<f32>>,
    a: &CudaSlice<f32>,
    w: &CudaView<'_, f32>,
    out: &mut CudaSlice<f32>,
    rd: &mut CudaSlice<f32>,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<()> {
    let f = gpu.function(&images::TRAIN, "train_norm_fwd")?;
    let s = gpu.stream();
    let res_p: u64 = res.map_or(0, |r| r.device_ptr(s).0);
    let c = cols as i32;
    let mut lb = s.launch_builder(&f);
    lb.arg(&res_p)
        .arg(a)
        .arg(w)
        .arg(out)
        .arg(rd)
        .arg(&c)
        .arg(&eps);
    // SAFETY: `train_norm_fwd(const float*, const float*, const float*, float*, float*, int,
    // float)`; res (or null), a and out hold rows x cols, w cols, rd rows; one CTA per row.
    unsafe { lb.launch(rows_cfg(rows)) }
        .map_err(KernelError::driver("launching train_norm_fwd"))?;
    Ok(())
}

/// RMSNorm backward over `rows` rows: `da` (f32, or bf16 for a branch gradient that only
/// feeds products) and `dw +=` the weight gradient.
#[allow(clippy::too_many_arguments)]
fn norm_bwd<O: Elem>(
    gpu: &Gpu,
    a: &CudaSlice<f32>,
    w: &CudaView<'_, f32>,
    rd: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    da: &mut CudaViewMut<'_, O>,
    dw: &mut CudaViewMut<'_, f32>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let f = gpu.function(&images::TRAIN, O::NORM_BWD)?;
    let (r, c, rpc) = (rows as i32, cols as i32, NORM_BWD_ROWS as i32);
    let mut lb = gpu.stream().launch_builder(&f);
    lb.arg(a)
        .arg(w)
        .arg(rd)
        .arg(dy)
        .arg(da)
        .arg(dw)
        .arg(&r)
        .arg(&c)
        .arg(&rpc);
    // SAFETY: `train_norm_bwd[_bf16](const float*, const float*, const float*, const float*,
    // O*, float*, int, int, int)` (the entry of O); a, dy, da hold rows x cols (cols <= 4096,
    // checked at allocation), w and dw cols, rd rows.
    unsafe { lb.launch(rows_cfg(rows.div_ceil(NORM_BWD_ROWS))) }
        .map_err(KernelError::driver("launching train_norm_bwd"))?;
    Ok(())
}

/// `deq(A8(x))` of `rows` rows of `cols` into the first `rows * cols` values of `y` (bf16).
fn a8_deq<T: cudarc::driver::DeviceRepr>(
    gpu: &Gpu,
    x: &CudaView<'_, T>,
    y: &mut CudaSlice<bf16>,
    rows: usize,
    cols: usize,
    bf16_in: bool,
) -> Result<()> {
    let n = rows * cols;
    if x.len() != n || y.len() < n {
        return Err(TritterError::ShapeMismatch {
            what: "A8 fake quantization (input, output) lengths".into(),
            actual: vec![x.len(), y.len()],
            expected: format!("{n} input values and at least {n} outputs ({rows} x {cols})"),
        });
    }
    let mut y = y.slice_mut(..n);
    let name = if bf16_in {
        "train_a8_deq_bf16"
    } else {
        "train_a8_deq_f32"
    };
    let f = gpu.function(&images::TRAIN, name)?;
    let c = cols as i32;
    let mut lb = gpu.stream().launch_builder(&f);
    lb.arg(x).arg(&mut y).arg(&c);
    // SAFETY: `train_a8_deq_{f32,bf16}(const T*, bf16*, int)` with T matching `bf16_in` at
    // every call site; x and y hold rows x cols; one CTA per row.
    unsafe { lb.launch(rows_cfg(rows)) }
        .map_err(|e| KernelError::driver(format!("launching {name}"))(e))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn launch_split_qkv(
    gpu: &Gpu,
    y: &CudaSlice<f32>,
    q: &mut CudaSlice<bf16>,
    k: &mut CudaSlice<bf16>,
    v: &mut CudaSlice<bf16>,
    t: usize,
    nq: usize,
    nkv: usize,
) -> Result<()> {
    let f = gpu.function(&images::TRAIN, "train_split_qkv")?;
    let (a, b) = (nq as i32, nkv as i32);
    let mut lb = gpu.stream().launch_builder(&f);
    lb.arg(y).arg(q).arg(k).arg(v).arg(&a).arg(&b);
    // SAFETY: `train_split_qkv(const float*, bf16*, bf16*, bf16*, int, int)`; y holds
    // t x (nq + 2 nkv), q t x nq, k and v t x nkv; one CTA per row.
    unsafe { lb.launch(rows_cfg(t)) }.map_err(KernelError::driver("launching train_split_qkv"))?;
    Ok(())
}

fn launch_merge_qkv(
    gpu: &Gpu,
    gr: &GradsGpu<bf16>,
    out: &mut CudaSlice<bf16>,
    t: usize,
    nq: usize,
    nkv: usize,
) -> Result<()> {
    let f = gpu.function(&images::TRAIN, "train_merge_qkv")?;
    let (a, b) = (nq as i32, nkv as i32);
    let mut lb = gpu.stream().launch_builder(&f);
    lb.arg(&gr.dq)
        .arg(&gr.dk)
        .arg(&gr.dv)
        .arg(out)
        .arg(&a)
        .arg(&b);
    // SAFETY: `train_merge_qkv(const bf16*, const bf16*, const bf16*, bf16*, int, int)`;
    // dq holds t x nq, dk and dv t x nkv, out t x (nq + 2 nkv); one CTA per row.
    unsafe { lb.launch(rows_cfg(t)) }.map_err(KernelError::driver("launching train_merge_qkv"))?;
    Ok(())
}

fn launch_glu_a8(
    gpu: &Gpu,
    gu: &CudaSlice<f32>,
    gu_save: &mut CudaSlice<bf16>,
    deq: &mut CudaSlice<bf16>,
    acts: &mut GemvActivations,
    t: usize,
    i: usize,
) -> Result<()> {
    let f = gpu.function(&images::TRAIN, "train_glu_a8")?;
    let (i_i, kp) = (i as i32, ternary_gemm::gemv_padded_cols(i) as i32);
    let mut lb = gpu.stream().launch_builder(&f);
    lb.arg(gu)
        .arg(gu_save)
        .arg(deq)
        .arg(&mut acts.codes_mma)
        .arg(&mut acts.sums)
        .arg(&mut acts.scales)
        .arg(&mut acts.nonfinite_rows)
        .arg(&i_i)
        .arg(&kp);
    // SAFETY: `train_glu_a8(const float*, bf16*, bf16*, int8_t*, int*, float*, unsigned*, int,
    // int)`; gu and gu_save hold t x 2i, deq t x i; `acts` was made for t rows of i columns
    // (codes t x kp, sums, scales and flags t); one CTA per row.
    unsafe { lb.launch(rows_cfg(t)) }.map_err(KernelError::driver("launching train_glu_a8"))?;
    Ok(())
}

/// `mq = deq(A8(relu(g)^2 u))` `(t, i)` bf16 from the cuBLAS forward's bf16 `[g | u]`.
fn launch_glu_deq(
    gpu: &Gpu,
    gu: &CudaSlice<bf16>,
    mq: &mut CudaSlice<bf16>,
    t: usize,
    i: usize,
) -> Result<()> {
    let f = gpu.function(&images::TRAIN, "train_glu_deq")?;
    let i_i = i as i32;
    let mut lb = gpu.stream().launch_builder(&f);
    lb.arg(gu).arg(mq).arg(&i_i);
    // SAFETY: `train_glu_deq(const bf16*, bf16*, int)`; gu holds t x 2i, mq t x i (the
    // saved-activation slots); one CTA per row.
    unsafe { lb.launch(rows_cfg(t)) }.map_err(KernelError::driver("launching train_glu_deq"))?;
    Ok(())
}

/// `dgu` `(t, 2i)` bf16 from the saved `[g | u]` and the MLP hidden's gradient `dh`
/// `(t, i)` f32.
fn launch_glu_bwd(
    gpu: &Gpu,
    gu: &CudaSlice<bf16>,
    dh: &CudaView<'_, f32>,
    dgu: &mut CudaSlice<bf16>,
    t: usize,
    i: usize,
) -> Result<()> {
    let f = gpu.function(&images::TRAIN, "train_glu_bwd")?;
    let i_i = i as i32;
    let mut lb = gpu.stream().launch_builder(&f);
    lb.arg(gu).arg(dh).arg(dgu).arg(&i_i);
    // SAFETY: `train_glu_bwd(const bf16*, const float*, bf16*, int)`; gu and dgu hold
    // t x 2i, dh t x i (callers slice it so).
    unsafe { lb.launch(rows_cfg(t)) }.map_err(KernelError::driver("launching train_glu_bwd"))?;
    Ok(())
}

/// Element types the engine writes from cuBLAS products (f32 accumulation either way) and
/// passes between its backward kernels: the cuBLAS type and the kernel entry of each.
trait Elem: cudarc::driver::DeviceRepr {
    const CUDA_TYPE: blas_sys::cudaDataType;
    const NORM_BWD: &'static str;
}

impl Elem for f32 {
    const CUDA_TYPE: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_32F;
    const NORM_BWD: &'static str = "train_norm_bwd";
}

impl Elem for bf16 {
    const CUDA_TYPE: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_16BF;
    const NORM_BWD: &'static str = "train_norm_bwd_bf16";
}

/// Column-major `C (m, n) = op(A) op(B) * 1 + beta C` with bf16 A/B and C of `c_type` on the
/// stream of `blas` (cuBLAS `gemmEx`, f32 compute).
#[allow(clippy::too_many_arguments)]
fn gemm_cm(
    blas: &CudaBlas,
    ta: bool,
    tb: bool,
    (m, n, k): (usize, usize, usize),
    a: u64,
    lda: usize,
    b: u64,
    ldb: usize,
    (c, c_type): (u64, blas_sys::cudaDataType),
    ldc: usize,
    beta: f32,
    what: &str,
) -> Result<()> {
    use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let op = |t| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let alpha = 1.0f32;
    let dims = [m, n, k, lda, ldb, ldc];
    if dims.iter().any(|&x| x > i32::MAX as usize) {
        return Err(TritterError::Cublas {
            context: what.into(),
            detail: format!("dimensions {dims:?} exceed cuBLAS's i32 range"),
        });
    }
    // SAFETY: the callers pass device pointers of buffers holding the column-major operands
    // with these leading dimensions (row-major wrappers below, lengths sliced to fit); the
    // handle is bound to the stream every buffer was written on.
    unsafe {
        blas_result::gemm_ex(
            *blas.handle(),
            op(ta),
            op(tb),
            m as i32,
            n as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            a as *const _,
            blas_sys::cudaDataType::CUDA_R_16BF,
            lda as i32,
            b as *const _,
            blas_sys::cudaDataType::CUDA_R_16BF,
            ldb as i32,
            (&beta) as *const f32 as *const _,
            c as *mut _,
            c_type,
            ldc as i32,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| TritterError::Cublas {
        context: what.into(),
        detail: e.to_string(),
    })
}

/// Where [`input_grad`] puts `dx` `(t, k_in)`.
enum DxDst<'a, 'b> {
    /// Added to the residual stream's gradient (f32).
    Add(&'a mut CudaSlice<f32>),
    /// Written as bf16 (an operand of the next products).
    Bf16(&'a mut CudaViewMut<'b, bf16>),
    /// Written as f32 into the first `t k_in` values of the `tmp` scratch.
    F32,
}

/// `dx (t, k_in) = dy (t, n_out) · (Wq gamma)` into `dst`: through cuBLAS on the bf16 copy
/// `deq` `(n_out, k_in)` when the path keeps one, writing or accumulating in place (no pass
/// of its own); else through the transposed ternary GEMM into `tmp` (f32) and, for
/// [`DxDst::Add`] / [`DxDst::Bf16`], one elementwise pass.
#[allow(clippy::too_many_arguments)]
fn input_grad(
    blas: &CudaBlas,
    gpu: &Gpu,
    w: &TernaryMatrixGpu,
    deq: Option<&CudaSlice<bf16>>,
    dy: &CudaView<'_, bf16>,
    t: usize,
    dst: DxDst<'_, '_>,
    tmp: &mut CudaSlice<f32>,
) -> Result<()> {
    let k = w.k_in();
    let what = "computing an input gradient";
    let dims = (t, k, w.n_out());
    match (deq, dst) {
        (Some(d), DxDst::Add(acc)) => gemm(
            blas,
            gpu,
            Product::AB,
            dy,
            &d.slice(..),
            &mut acc.slice_mut(..t * k),
            dims,
            1.0,
            what,
        ),
        (Some(d), DxDst::Bf16(out)) => gemm(
            blas,
            gpu,
            Product::AB,
            dy,
            &d.slice(..),
            out,
            dims,
            0.0,
            what,
        ),
        (Some(d), DxDst::F32) => gemm(
            blas,
            gpu,
            Product::AB,
            dy,
            &d.slice(..),
            &mut tmp.slice_mut(..t * k),
            dims,
            0.0,
            what,
        ),
        (None, dst) => {
            ternary_matmul_t_cuda(gpu, w, dy, t, &mut tmp.slice_mut(..t * k))?;
            match dst {
                DxDst::Add(acc) => add(gpu, acc, &tmp.slice(..t * k), t * k),
                DxDst::Bf16(out) => to_bf16(gpu, &tmp.slice(..t * k), out, t * k),
                DxDst::F32 => Ok(()),
            }
        }
    }
}

/// The row-major products of the engine (bf16 operands, f32 result).
#[derive(Debug, Clone, Copy)]
enum Product {
    /// `C (M, N) = A (M, K) · B (N, K)ᵀ` (logits).
    ABt,
    /// `C (M, N) = A (M, K) · B (K, N)` (dhidden).
    AB,
    /// `C (M, N) = A (K, M)ᵀ · B (K, N)` (weight gradients `dYᵀ · X`).
    AtB,
}

/// Row-major `C = product(A, B) + beta C` with `(m, n, k)` as in [`Product`]: the column-major
/// cuBLAS call `Cᵀ = op(B) op(A)` (row-major buffers are their column-major transposes).
/// C is f32, or bf16 where the result only feeds bf16 consumers (the cuBLAS forward's q/k/v
/// and gate/up outputs).
#[allow(clippy::too_many_arguments)]
fn gemm<C: Elem>(
    blas: &CudaBlas,
    gpu: &Gpu,
    product: Product,
    a: &CudaView<'_, bf16>,
    b: &CudaView<'_, bf16>,
    c: &mut CudaViewMut<'_, C>,
    (m, n, k): (usize, usize, usize),
    beta: f32,
    what: &str,
) -> Result<()> {
    // (elements of A, of B, op on B, its leading dim, op on A, its leading dim)
    let (a_len, b_len, tb, ldb, ta, lda) = match product {
        Product::ABt => (m * k, n * k, true, k, false, k),
        Product::AB => (m * k, k * n, false, n, false, k),
        Product::AtB => (k * m, k * n, false, n, true, m),
    };
    check_gemm(what, [(a.len(), a_len), (b.len(), b_len), (c.len(), m * n)])?;
    let s = gpu.stream();
    let (ap, _ga) = a.device_ptr(s);
    let (bp, _gb) = b.device_ptr(s);
    let (cp, _gc) = c.device_ptr_mut(s);
    gemm_cm(
        blas,
        tb,
        ta,
        (n, m, k),
        bp,
        ldb,
        ap,
        lda,
        (cp, C::CUDA_TYPE),
        n,
        beta,
        what,
    )
}

/// Every operand of a product is exactly as long as its shape says.
fn check_gemm(what: &str, lens: [(usize, usize); 3]) -> Result<()> {
    for (i, (actual, expected)) in lens.into_iter().enumerate() {
        if actual != expected {
            return Err(TritterError::ShapeMismatch {
                what: format!("{what}: operand {}", ["A", "B", "C"][i]),
                actual: vec![actual],
                expected: format!("{expected} elements"),
            });
        }
    }
    Ok(())
}

/// What [`bench_train`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainBench {
    /// Parameters trained (the `N` of `6 N` FLOPs per token).
    pub params: usize,
    /// Training tokens per second (timed steps only, CUDA events).
    pub tokens_per_s: f64,
    /// Milliseconds per optimizer step.
    pub step_ms: f64,
    /// Model FLOPs utilization `6 N tokens/s / peak`, when the peak is known.
    pub mfu: Option<f64>,
    /// The dense bf16 peak used for the MFU (TFLOP/s).
    pub peak_tflops: Option<f64>,
    /// Device bytes the engine holds after the first step (every buffer is allocated up front,
    /// so this is the peak).
    pub device_bytes: u64,
    /// Mean loss of the timed steps (finite: a diverging run is an error).
    pub loss: f64,
    /// With profiling: milliseconds per step of each phase (two extra steps timed phase by
    /// phase with CUDA events), largest first.
    pub profile: Vec<(&'static str, f64)>,
    /// The BitLinear product path that ran.
    pub linear: LinearPath,
    /// GPUs of the data-parallel group (1 alone); `tokens_per_s` counts all of them.
    pub gpus: usize,
}

/// Dense bf16 tensor-core peak of known devices, TFLOP/s (H100/H200 SXM: 989).
pub fn dense_bf16_peak_tflops(device_name: &str) -> Option<f64> {
    let n = device_name.to_ascii_uppercase();
    if n.contains("H100") || n.contains("H200") {
        Some(989.0)
    } else {
        None
    }
}

/// Trains `config` from its seeded initialization on random token batches of
/// `batch` x `seq_len` for `warmup` + `steps` optimizer steps (one micro-batch each, AdamW,
/// clipping at 1) and reports the speed of the timed steps, with the loss read once at the
/// end (no host synchronisation between steps). With `profile`, two more steps are timed
/// phase by phase. With `dp`, this is one rank of a data-parallel group: every rank trains
/// its own random rows, the step includes the gradient all-reduce (overlapped with the
/// backward pass, or ZeRO-1's reduce-scatter + all-gather), and the figures count all ranks
/// (tokens/s of the group, MFU against `world x` the peak). Every rank must call it.
#[allow(clippy::too_many_arguments)]
pub fn bench_train(
    gpu: &Arc<Gpu>,
    config: &TritterConfig,
    batch: usize,
    seq_len: usize,
    recompute: bool,
    warmup: usize,
    steps: usize,
    peak_tflops: Option<f64>,
    profile: bool,
    linear: Option<LinearPath>,
    dp: Option<super::DataParallel>,
) -> Result<TrainBench> {
    if steps == 0 {
        return Err(TritterError::InvalidArgument {
            what: "timed steps",
            actual: "0".into(),
            expected: ">= 1".into(),
        });
    }
    let free0 = free_bytes(gpu)?;
    let mut model = GpuTrainModel::new(gpu, config, 0, AdamWConfig::default())?;
    if let Some(path) = linear {
        model.set_linear_path(path)?;
    }
    let (rank, world) = dp.as_ref().map_or((0, 1), |d| (d.rank(), d.world_size()));
    if let Some(dp) = dp {
        model.enable_data_parallel(dp)?;
    }
    model.prepare(batch, seq_len, recompute)?;
    let t = batch * seq_len;
    let mut rng = crate::model::SeededRng::new(7 + rank as u64);
    let v = config.vocab_size as u64;
    let batches: Vec<(Vec<u32>, Vec<u32>)> = (0..4)
        .map(|_| {
            let row: Vec<u32> = (0..t + 1).map(|_| 1 + rng.below(v - 1) as u32).collect();
            (row[..t].to_vec(), row[1..].to_vec())
        })
        .collect();
    let ones = vec![1f32; t];
    let mask = MaskSpec::from_config(config);
    let run = |model: &mut GpuTrainModel, n: usize| -> Result<()> {
        for i in 0..n {
            let (inputs, targets) = &batches[i % batches.len()];
            model.zero_grads()?;
            model.forward_backward_final(&MicroBatch {
                inputs,
                targets,
                loss_mask: &ones,
                mask: &mask,
                denominator: t * world,
            })?;
            model.optimizer_step(3e-4, 1.0)?;
            if world > 1 && i % 4 == 3 {
                // A rank that died must not leave this one queueing steps behind a stuck
                // collective: check the group every few steps (the queue stays ahead).
                model.settle("a benchmark step")?;
            }
        }
        Ok(())
    };
    run(&mut model, warmup.max(1))?;
    model.read_metrics()?;
    let free1 = free_bytes(gpu)?;
    let stream = gpu.stream();
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = stream
        .record_event(flags)
        .map_err(KernelError::driver("recording an event"))?;
    run(&mut model, steps)?;
    let end = stream
        .record_event(flags)
        .map_err(KernelError::driver("recording an event"))?;
    model.settle("the timed steps")?;
    end.synchronize()
        .map_err(KernelError::driver("waiting for the timed steps"))?;
    let ms = f64::from(
        start
            .elapsed_ms(&end)
            .map_err(KernelError::driver("reading the step time"))?,
    ) / steps as f64;
    let loss = model.read_metrics()?.loss / steps as f64;
    let mut phases = Vec::new();
    if profile {
        const PROFILED: usize = 2;
        model.set_profiling(true)?;
        run(&mut model, PROFILED)?;
        phases = model
            .take_profile()?
            .into_iter()
            .map(|(n, ms, _)| (n, ms / PROFILED as f64))
            .collect();
        model.set_profiling(false)?;
    }
    model.finish_data_parallel()?;
    let tokens_per_s = (t * world) as f64 / (ms / 1e3);
    let params = model.layout().len();
    let peak = peak_tflops.or_else(|| dense_bf16_peak_tflops(&gpu.info().name));
    Ok(TrainBench {
        params,
        tokens_per_s,
        step_ms: ms,
        mfu: peak.map(|p| 6.0 * params as f64 * tokens_per_s / (p * 1e12 * world as f64)),
        peak_tflops: peak,
        device_bytes: free0.saturating_sub(free1),
        loss,
        profile: phases,
        linear: model.linear_path(),
        gpus: world,
    })
}
