//! Training of the reference model: AdamW with parameter groups, warmup + cosine
//! schedule, gradient clipping and accumulation, optional gradient checkpointing,
//! validation loss/perplexity, JSONL metrics and atomic, exactly resumable checkpoints. Steps
//! run on the CPU (candle autograd) or, after `Trainer::use_gpu` (feature `cuda`), on the GPU training
//! engine (`GpuTrainModel`, feature `cuda`, DESIGN.md section 5) with the same data, schedule
//! and checkpoints; [`ParamLayout`] and [`TrainPlan`] describe that engine's buffers.
//!
//! Exact resume: everything a step depends on is saved (weights, AdamW moments and update
//! count, step, data cursor, options) and every operation is deterministic on the CPU, so a
//! run interrupted after `N` steps and resumed produces the same losses, bit for bit, as an
//! uninterrupted one (`tests/train.rs`). Dropout is the exception: candle's CPU dropout
//! cannot be seeded, so a config with `dropout > 0` resumes statistically, not exactly.

mod checkpoint;
pub mod dist;
#[cfg(feature = "cuda")]
mod gpu;
mod layout;
#[cfg(feature = "cuda")]
mod nccl;
mod optim;

pub use checkpoint::{
    latest_checkpoint, model_checkpoint_dir, TrainerState, LATEST_FILE, OPTIMIZER_FILE,
    TRAINER_STATE_FILE,
};
#[cfg(feature = "cuda")]
pub use gpu::{
    bench_train, dense_bf16_peak_tflops, GpuStepMetrics, GpuTrainModel, MicroBatch, TrainBench,
};
pub use layout::{
    check_trainable, init_params, layer_act_bytes, logits_chunk_rows, LinearPath, ParamLayout,
    ParamSlot, TrainPlan,
};
#[cfg(feature = "cuda")]
pub use nccl::{nccl_version, unique_id, DataParallel, NcclComm, NcclElem};
pub use optim::{clip_global_norm, decays, global_norm, AdamW, AdamWConfig, LrSchedule};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::config::{AttentionMode, TritterConfig};
use crate::data::{Batch, DataLoader, PackedDataset};
use crate::model::MaskSpec;
use crate::paradigm::loss::{objective_loss, ObjectiveLoss};
use crate::paradigm::Objective;
use crate::{Result, TritterError, TritterModel};

/// Hyper-parameters of a training run (saved with every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Optimizer steps of the whole run (the schedule's length).
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip (0: off).
    pub grad_clip: f64,
    /// Validate every this many steps (0: only before and after).
    pub eval_every: u64,
    /// Validation batches per evaluation (0: the whole validation set).
    pub eval_batches: usize,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Seed of the model init and the data order.
    pub seed: u64,
    /// Mask attention across packed documents.
    pub document_mask: bool,
    /// The loss: cross-entropy only by default, or mixed with an embedding-prediction loss
    /// ([`crate::paradigm::loss`]). Absent in checkpoints written before it existed, which
    /// load with the default.
    #[serde(default)]
    pub objective: Objective,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 1200,
            batch_size: 16,
            seq_len: 128,
            grad_accum: 1,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 50,
            adamw: AdamWConfig::default(),
            grad_clip: 1.0,
            eval_every: 300,
            eval_batches: 16,
            checkpoint_every: 0,
            seed: 0,
            document_mask: true,
            objective: Objective::default(),
        }
    }
}

impl TrainOptions {
    /// Checks every option; messages name the flag, its value and the rule.
    pub fn validate(&self, config: &TritterConfig) -> Result<()> {
        let positive = [
            ("steps", self.steps as usize),
            ("batch_size", self.batch_size),
            ("seq_len", self.seq_len),
            ("grad_accum", self.grad_accum),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(TritterError::option(name, v, "expected >= 1"));
            }
        }
        if self.seq_len > config.max_position_embeddings {
            return Err(TritterError::option(
                "seq_len",
                self.seq_len,
                format!(
                    "expected <= max_position_embeddings {}",
                    config.max_position_embeddings
                ),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(TritterError::option(
                "lr",
                self.lr,
                "expected a finite value > 0",
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(TritterError::option(
                "min_lr_ratio",
                self.min_lr_ratio,
                "expected 0 <= min_lr_ratio <= 1",
            ));
        }
        let a = &self.adamw;
        if !(0.0..1.0).contains(&a.beta1) || !(0.0..1.0).contains(&a.beta2) {
            return Err(TritterError::option(
                "adamw betas",
                format!("({}, {})", a.beta1, a.beta2),
                "expected 0 <= beta < 1",
            ));
        }
        let ok = |v: f64, min_exclusive: bool| {
            v.is_finite() && (v > 0.0 || (!min_exclusive && v == 0.0))
        };
        if !ok(a.eps, true) || !ok(a.weight_decay, false) || !ok(self.grad_clip, false) {
            return Err(TritterError::option(
                "eps / weight_decay / grad_clip",
                format!("{} / {} / {}", a.eps, a.weight_decay, self.grad_clip),
                "expected eps > 0, weight_decay >= 0, grad_clip >= 0",
            ));
        }
        if self.warmup_steps >= self.steps {
            return Err(TritterError::option(
                "warmup",
                self.warmup_steps,
                format!("expected fewer warmup steps than steps ({})", self.steps),
            ));
        }
        self.objective.validate()?;
        // Next-token training needs a causal mask: with bidirectional or embedding attention
        // position i sees its own target i + 1 and the loss collapses to copying it.
        if config.attention_mode != AttentionMode::Causal {
            return Err(TritterError::option(
                "attention_mode",
                format!("{:?}", config.attention_mode),
                "expected causal for next-token training (the other modes see their targets)",
            ));
        }
        // The recompute pass of gradient checkpointing would draw new (unseeded) dropout
        // masks, so its backward would run through a different network than the forward.
        if config.gradient_checkpointing && config.dropout > 0.0 {
            return Err(TritterError::option(
                "gradient_checkpointing",
                format!("on with dropout {}", config.dropout),
                "expected dropout 0 with gradient checkpointing (candle's CPU dropout cannot be replayed)",
            ));
        }
        Ok(())
    }

    /// The learning-rate schedule of these options.
    pub fn schedule(&self) -> LrSchedule {
        LrSchedule {
            peak: self.lr,
            warmup: self.warmup_steps,
            total: self.steps,
            min_ratio: self.min_lr_ratio,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The step's 1-based number (equals the number of updates applied).
    pub step: u64,
    /// The optimized objective per target token over the step's micro-batches: the mean
    /// cross-entropy (nats) with the default objective, else the weighted mix.
    pub loss: f64,
    /// Mean cross-entropy per target token (nats).
    #[serde(default)]
    pub ce_loss: f64,
    /// Mean embedding-prediction loss per target position, when the objective has one
    /// (reported even while its weight is still 0 before the transition).
    #[serde(default)]
    pub embedding_loss: Option<f64>,
    /// Cross-entropy weight of the step.
    #[serde(default)]
    pub ce_weight: f64,
    /// Embedding-loss weight of the step.
    #[serde(default)]
    pub embedding_weight: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Target tokens in the step.
    pub tokens: usize,
    /// Wall time of the step in seconds.
    pub seconds: f64,
}

/// Validation result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Mean cross-entropy per target token (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Target tokens evaluated.
    pub tokens: usize,
}

/// The trainer: a model, its optimizer, the training loader and the validation set.
#[derive(Debug)]
pub struct Trainer {
    model: TritterModel,
    optimizer: AdamW,
    loader: DataLoader,
    validation: Option<PackedDataset>,
    options: TrainOptions,
    step: u64,
    tokens_seen: u64,
    /// The GPU engine when training runs there ([`Trainer::use_gpu`]); `model` and
    /// `optimizer` then hold the state of the last sync (checkpoint or evaluation).
    #[cfg(feature = "cuda")]
    gpu: Option<GpuTrainModel>,
    /// This process's rank in a data-parallel group (0 alone).
    rank: usize,
    /// Ranks in the group (1 alone); the loader serves `world` x `batch_size` sequences.
    world: usize,
}

/// The candle device named `name`: `cpu` (`cuda` is refused: GPU training uses the GPU
/// engine through `Trainer::use_gpu` (feature `cuda`), with the host model on the CPU).
pub fn device_from_name(name: &str) -> Result<Device> {
    match name.to_ascii_lowercase().as_str() {
        "cpu" => Ok(Device::Cpu),
        other if other.starts_with("cuda") || other == "gpu" => {
            Err(TritterError::DeviceUnavailable {
                device: name.to_string(),
                detail:
                    "candle's CUDA device is not used (DESIGN.md section 2): GPU training runs on \
                     the GPU engine (`tritter train --device cuda`, Trainer::use_gpu) with the \
                     model on the CPU as its host copy"
                        .into(),
            })
        }
        _ => Err(TritterError::option("device", name, "expected cpu or cuda")),
    }
}

impl Trainer {
    /// A fresh run: model initialized from `options.seed`, data order from the same seed.
    pub fn new(
        config: &TritterConfig,
        options: TrainOptions,
        train: PackedDataset,
        validation: Option<PackedDataset>,
        device: &Device,
    ) -> Result<Self> {
        options.validate(config)?;
        Self::check_data(config, &options, &train, validation.as_ref())?;
        let model = TritterModel::new(config, DType::F32, device, options.seed)?;
        let optimizer = AdamW::new(named_vars(&model), options.adamw)?;
        let loader = DataLoader::new(train, options.batch_size, options.seed)?;
        Ok(Trainer {
            model,
            optimizer,
            loader,
            validation,
            options,
            step: 0,
            tokens_seen: 0,
            #[cfg(feature = "cuda")]
            gpu: None,
            rank: 0,
            world: 1,
        })
    }

    /// Resumes from checkpoint directory `dir` (a `step-*` directory written by
    /// [`save_checkpoint`](Self::save_checkpoint)): weights, moments, step, data cursor and
    /// options come from the checkpoint; `train`/`validation` must be the data it was
    /// trained on (checked through the cursor's fingerprint). `steps` may extend the run.
    pub fn resume(
        dir: &Path,
        config: &TritterConfig,
        train: PackedDataset,
        validation: Option<PackedDataset>,
        steps: Option<u64>,
        device: &Device,
    ) -> Result<Self> {
        let state = TrainerState::load(dir)?;
        let mut options = state.options.clone();
        if let Some(s) = steps {
            options.steps = s;
        }
        options.validate(config)?;
        Self::check_data(config, &options, &train, validation.as_ref())?;
        let model = TritterModel::new(config, DType::F32, device, options.seed)?;
        model.load_weights(dir)?;
        let mut optimizer = AdamW::new(named_vars(&model), options.adamw)?;
        optimizer.load(&dir.join(OPTIMIZER_FILE))?;
        if optimizer.num_updates() != state.step {
            return Err(TritterError::CheckpointMismatch {
                path: dir.to_path_buf(),
                detail: format!(
                    "the optimizer has {} updates but the trainer state says step {}",
                    optimizer.num_updates(),
                    state.step
                ),
            });
        }
        let loader = DataLoader::with_cursor(train, options.batch_size, state.cursor).map_err(
            |e| match e {
                TritterError::CheckpointMismatch { detail, .. } => {
                    TritterError::CheckpointMismatch {
                        path: dir.join(TRAINER_STATE_FILE),
                        detail,
                    }
                }
                other => other,
            },
        )?;
        Ok(Trainer {
            model,
            optimizer,
            loader,
            validation,
            options,
            step: state.step,
            tokens_seen: state.tokens_seen,
            #[cfg(feature = "cuda")]
            gpu: None,
            rank: 0,
            world: 1,
        })
    }

    fn check_data(
        config: &TritterConfig,
        options: &TrainOptions,
        train: &PackedDataset,
        validation: Option<&PackedDataset>,
    ) -> Result<()> {
        for (name, d) in std::iter::once(("training data", train))
            .chain(validation.map(|v| ("validation data", v)))
        {
            if d.seq_len() != options.seq_len {
                return Err(TritterError::option(
                    "seq_len",
                    options.seq_len,
                    format!("expected the {name}'s packed length {}", d.seq_len()),
                ));
            }
            if let Some(max) = (0..d.len())
                .filter_map(|i| d.sequence(i))
                .flat_map(|(t, _)| t.iter().copied())
                .max()
            {
                if max as usize >= config.vocab_size {
                    return Err(TritterError::TokenOutOfRange {
                        id: max,
                        batch: 0,
                        position: 0,
                        vocab_size: config.vocab_size,
                    });
                }
            }
        }
        Ok(())
    }

    /// Moves training onto the GPU engine ([`GpuTrainModel`]): the current weights, AdamW
    /// moments and update count go to the device, and every following step runs there on
    /// the same data, schedule and clipping. Checkpoints and evaluations copy the state back
    /// first, so a checkpoint written on the GPU resumes on the CPU and the other way round.
    /// Refused (typed errors): an embedding-prediction objective, configs the engine cannot
    /// train ([`check_trainable`]), a micro-batch that does not fit the device.
    #[cfg(feature = "cuda")]
    pub fn use_gpu(&mut self, gpu: &std::sync::Arc<tritter_kernels_cuda::Gpu>) -> Result<()> {
        self.start_gpu(gpu, None)
    }

    /// [`use_gpu`](Self::use_gpu), joining `dp` before the moments are loaded (ZeRO-1 keeps
    /// only its shard) and before the activations are allocated (they get what sharding
    /// freed).
    #[cfg(feature = "cuda")]
    fn start_gpu(
        &mut self,
        gpu: &std::sync::Arc<tritter_kernels_cuda::Gpu>,
        dp: Option<DataParallel>,
    ) -> Result<()> {
        if !self.options.objective.is_ce_only() {
            return Err(TritterError::option(
                "objective",
                "an embedding-prediction term or a CE weight other than 1",
                "the plain cross-entropy objective on the GPU engine (train it with --device cpu)",
            ));
        }
        check_trainable(self.model.config())?;
        let mut g = GpuTrainModel::from_model(gpu, &self.model, self.options.adamw)?;
        if let Some(dp) = dp {
            g.enable_data_parallel(dp)?;
        }
        g.load_optimizer(&self.optimizer)?;
        g.prepare(
            self.options.batch_size,
            self.options.seq_len,
            self.model.config().gradient_checkpointing,
        )?;
        self.gpu = Some(g);
        Ok(())
    }

    /// Moves training onto the GPU engine as rank `dp.rank()` of a data-parallel group
    /// ([`DataParallel`], issue 13): [`use_gpu`](Self::use_gpu), then the engine joins the
    /// group and the loader serves the global batch (`world x batch_size` sequences) of
    /// which this rank trains rows `rank * batch_size..`. The loss of every rank is divided
    /// by the global batch's target count, so `N` ranks follow the run of one GPU with an
    /// `N` times larger batch. Only rank 0 evaluates and writes checkpoints and metrics.
    /// Every rank must have been built with the same config, options and data (the
    /// rendezvous compared [`fingerprint`](Self::fingerprint)s).
    #[cfg(feature = "cuda")]
    pub fn use_gpu_data_parallel(
        &mut self,
        gpu: &std::sync::Arc<tritter_kernels_cuda::Gpu>,
        dp: DataParallel,
    ) -> Result<()> {
        let (rank, world) = (dp.rank(), dp.world_size());
        self.start_gpu(gpu, Some(dp))?;
        self.loader
            .set_batch_size(self.options.batch_size * world)?;
        self.rank = rank;
        self.world = world;
        Ok(())
    }

    /// Ends this rank's part in a data-parallel group normally (the others do not take its
    /// exit for a failure); a no-op alone. The trainer then serves this rank's batch size
    /// again; a ZeRO-1 engine refuses further steps (it holds one shard of the moments).
    pub fn finish_data_parallel(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(g) = self.gpu.as_mut().filter(|g| g.data_parallel().is_some()) {
            g.finish_data_parallel()?;
            self.loader.set_batch_size(self.options.batch_size)?;
            (self.rank, self.world) = (0, 1);
        }
        Ok(())
    }

    /// In a data-parallel group, rank 0 lets the others go on after work only it does
    /// (`release = true`, after it), the others wait for that (`release = false`).
    fn rank0_barrier(&self, release: bool) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(dp) = self.gpu.as_ref().and_then(GpuTrainModel::data_parallel) {
            return if release {
                dp.group.release_others()
            } else {
                dp.group.wait_for_rank0()
            };
        }
        let _ = release;
        Ok(())
    }

    /// This process's rank in its data-parallel group (0 when alone).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the data-parallel group (1 when alone).
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// What must agree across the ranks of a data-parallel group: config, options, data
    /// (fingerprint and cursor) and step, hashed (FNV-1a of their JSON).
    pub fn fingerprint(&self) -> u64 {
        let json = serde_json::json!({
            "config": self.model.config(),
            "options": self.options,
            "cursor": self.loader.cursor(),
            "validation": self.validation.as_ref().map(PackedDataset::fingerprint),
            "step": self.step,
        });
        dist::fingerprint(json.to_string().as_bytes())
    }

    /// Whether steps run on the GPU engine.
    pub fn on_gpu(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.gpu.is_some()
        }
        #[cfg(not(feature = "cuda"))]
        {
            false
        }
    }

    /// Copies the GPU engine's weights into `model` (no-op on the CPU).
    fn sync_host_params(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            g.store_params_into(&self.model)?;
        }
        Ok(())
    }

    /// Copies the GPU engine's state into `model` and `optimizer` (no-op on the CPU); under
    /// ZeRO-1 a collective that every rank calls.
    fn sync_host(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            g.store_into(&self.model, &mut self.optimizer)?;
        }
        Ok(())
    }

    /// The model (on the GPU engine: as of the last checkpoint or evaluation).
    pub fn model(&self) -> &TritterModel {
        &self.model
    }

    /// The options.
    pub fn options(&self) -> &TrainOptions {
        &self.options
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Target tokens trained on so far.
    pub fn tokens_seen(&self) -> u64 {
        self.tokens_seen
    }

    /// The training loader (its cursor is what a checkpoint saves).
    pub fn loader(&self) -> &DataLoader {
        &self.loader
    }

    fn mask(&self, batch: &Batch) -> MaskSpec {
        let mask = MaskSpec::from_config(self.model.config());
        if self.options.document_mask {
            mask.with_doc_ids(batch.doc_ids.clone())
        } else {
            mask
        }
    }

    /// The `grad_accum` micro-batches of the next optimizer step on `device`, and their total
    /// target count (the loss denominator of the step). In a data-parallel group the loader
    /// serves the global batch; this rank gets its rows, the count is the global one.
    fn step_batches(&mut self, device: &Device) -> Result<(Vec<Batch>, usize)> {
        let (b, rank) = (self.options.batch_size, self.rank);
        let mut batches = Vec::with_capacity(self.options.grad_accum);
        let mut total = 0;
        for _ in 0..self.options.grad_accum {
            // The global batch (all of it alone); this rank's rows, the global count.
            let idx = self.loader.next_indices();
            let data = self.loader.dataset();
            for &i in &idx {
                total += data.num_targets_of(i).ok_or_else(|| {
                    TritterError::option(
                        "sequence index",
                        i,
                        format!("expected < {} sequences", data.len()),
                    )
                })?;
            }
            batches.push(data.batch(&idx[rank * b..(rank + 1) * b], device)?);
        }
        Ok((batches, total))
    }

    /// One optimizer step: `grad_accum` micro-batches, loss normalized by the step's total
    /// target count, clipping, AdamW update with the scheduled learning rate.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() {
            return self.train_step_gpu();
        }
        let start = Instant::now();
        let device = self.model.device().clone();
        let (batches, total) = self.step_batches(&device)?;
        let objective = self.options.objective;
        let mut grads = StepGrads::new(&self.optimizer);
        for batch in &batches {
            let mask = self.mask(batch);
            let micro = if self.model.config().gradient_checkpointing {
                checkpointed_grads(
                    &self.model,
                    &self.optimizer,
                    batch,
                    &mask,
                    total,
                    &objective,
                    self.step,
                )?
            } else {
                full_grads(
                    &self.model,
                    &self.optimizer,
                    batch,
                    &mask,
                    total,
                    &objective,
                    self.step,
                )?
            };
            grads.add(micro)?;
        }
        let metrics = grads.apply(&mut self.optimizer, &self.options, self.step, total, start)?;
        self.step = metrics.step;
        self.tokens_seen += total as u64;
        Ok(metrics)
    }

    /// [`train_step`](Self::train_step) on the GPU engine: the same batches, loss
    /// normalization, schedule and clipping; one host synchronisation per step (the loss
    /// and gradient-norm read-back).
    #[cfg(feature = "cuda")]
    fn train_step_gpu(&mut self) -> Result<StepMetrics> {
        let start = Instant::now();
        let (batches, total) = self.step_batches(&Device::Cpu)?;
        let masks: Vec<MaskSpec> = batches.iter().map(|b| self.mask(b)).collect();
        let gpu = self.gpu.as_mut().expect("checked by train_step");
        gpu.zero_grads()?;
        let micro = batches.len();
        for (i, (batch, mask)) in batches.iter().zip(&masks).enumerate() {
            let inputs = batch.inputs.flatten_all()?.to_vec1::<u32>()?;
            let targets = batch.targets.flatten_all()?.to_vec1::<u32>()?;
            let loss_mask = batch.loss_mask.flatten_all()?.to_vec1::<f32>()?;
            let mb = MicroBatch {
                inputs: &inputs,
                targets: &targets,
                loss_mask: &loss_mask,
                mask,
                denominator: total.max(1),
            };
            if i + 1 == micro {
                gpu.forward_backward_final(&mb)?;
            } else {
                gpu.forward_backward(&mb)?;
            }
        }
        let lr = self.options.schedule().lr(self.step);
        gpu.optimizer_step(lr, self.options.grad_clip)?;
        let m = gpu.read_metrics()?;
        self.step += 1;
        self.tokens_seen += total as u64;
        Ok(StepMetrics {
            step: self.step,
            loss: m.loss,
            ce_loss: m.loss,
            embedding_loss: None,
            ce_weight: 1.0,
            embedding_weight: 0.0,
            lr,
            grad_norm: m.grad_norm,
            tokens: total,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Mean validation loss over the first `eval_batches` batches of the validation set
    /// in order (all of it when `eval_batches == 0`); `None` without a validation set. On the
    /// GPU engine the weights are first copied to the host model, which evaluates on the
    /// CPU. In a data-parallel group only rank 0 evaluates (the others get `None`).
    pub fn evaluate(&mut self) -> Result<Option<EvalMetrics>> {
        if self.validation.is_none() && self.world == 1 {
            return Ok(None);
        }
        // In a group every rank passes the barrier, validation set or not (the fingerprint
        // makes the sets agree; a disagreement must not unpair the barriers).
        if self.rank != 0 {
            // Waits (without the device timeout) while rank 0 evaluates on the CPU.
            self.rank0_barrier(false)?;
            return Ok(None);
        }
        if self.validation.is_some() {
            self.sync_host_params()?;
        }
        let out = match &self.validation {
            None => None,
            Some(val) => evaluate(
                &self.model,
                val,
                self.options.batch_size,
                self.options.eval_batches,
                self.options.document_mask,
            )?,
        };
        self.rank0_barrier(true)?;
        Ok(out)
    }

    /// Saves a checkpoint `step-{step:08}` under `checkpoints_dir` atomically (written to a
    /// temporary directory, fsynced, renamed) and points `latest` at it. Returns its path.
    /// On failure the previous checkpoints and `latest` are untouched. On the GPU engine the
    /// device state is copied to the host first (weights, moments, update count). In a
    /// data-parallel group every rank calls it (ZeRO-1 gathers the moments) and only rank 0
    /// writes; the others get the path rank 0 writes.
    pub fn save_checkpoint(&mut self, checkpoints_dir: &Path) -> Result<PathBuf> {
        if self.rank != 0 {
            // Only the ZeRO-1 moment gathering needs this rank.
            #[cfg(feature = "cuda")]
            if self
                .gpu
                .as_ref()
                .and_then(GpuTrainModel::data_parallel)
                .is_some_and(DataParallel::zero1)
            {
                self.sync_host()?;
            }
            self.rank0_barrier(false)?;
            return Ok(checkpoints_dir.join(checkpoint::step_dir_name(self.step)));
        }
        self.sync_host()?;
        let state = TrainerState {
            step: self.step,
            tokens_seen: self.tokens_seen,
            cursor: self.loader.cursor(),
            options: self.options.clone(),
        };
        let path = checkpoint::save(checkpoints_dir, &self.model, &self.optimizer, &state)?;
        self.rank0_barrier(true)?;
        Ok(path)
    }

    /// Runs steps until `until` (at most `options.steps`), validating every `eval_every`
    /// steps, checkpointing every `checkpoint_every` steps and at the end into
    /// `run_dir/checkpoints`, appending metrics to `run_dir/metrics.jsonl` and reporting
    /// through `progress`.
    pub fn run(
        &mut self,
        until: u64,
        run_dir: Option<&Path>,
        progress: &mut dyn Progress,
    ) -> Result<RunSummary> {
        let until = until.min(self.options.steps);
        let mut metrics = match run_dir.filter(|_| self.rank == 0) {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| TritterError::io(dir, e))?;
                let path = dir.join("metrics.jsonl");
                Some((
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .map_err(|e| TritterError::io(&path, e))?,
                    path,
                ))
            }
            None => None,
        };
        let mut log = |value: serde_json::Value| -> Result<()> {
            if let Some((f, path)) = metrics.as_mut() {
                writeln!(f, "{value}").map_err(|e| TritterError::io(&*path, e))?;
            }
            Ok(())
        };
        let start = Instant::now();
        let first_step = self.step;
        let val_before = self.evaluate()?;
        if let Some(v) = val_before {
            log(
                serde_json::json!({"step": self.step, "val_loss": v.loss, "val_ppl": v.perplexity}),
            )?;
            progress.on_eval(self.step, &v);
        }
        let mut last = val_before;
        let mut losses = Vec::new();
        let mut last_checkpoint = None;
        while self.step < until {
            let m = self.train_step()?;
            losses.push(m.loss);
            let mut line = serde_json::json!({
                "step": m.step, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm,
                "tokens": m.tokens, "tokens_per_s": m.tokens as f64 / m.seconds.max(1e-9),
            });
            if let Some(e) = m.embedding_loss {
                line["ce_loss"] = m.ce_loss.into();
                line["embedding_loss"] = e.into();
                line["ce_weight"] = m.ce_weight.into();
                line["embedding_weight"] = m.embedding_weight.into();
            }
            log(line)?;
            progress.on_step(&m, until);
            let at_end = self.step == until;
            if self.options.eval_every > 0 && self.step % self.options.eval_every == 0 && !at_end {
                if let Some(v) = self.evaluate()? {
                    log(
                        serde_json::json!({"step": self.step, "val_loss": v.loss, "val_ppl": v.perplexity}),
                    )?;
                    progress.on_eval(self.step, &v);
                    last = Some(v);
                }
            }
            if let Some(dir) = run_dir {
                let every = self.options.checkpoint_every;
                if at_end || (every > 0 && self.step % every == 0) {
                    last_checkpoint = Some(self.save_checkpoint(&dir.join("checkpoints"))?);
                }
            }
        }
        if self.step > first_step {
            if let Some(v) = self.evaluate()? {
                log(
                    serde_json::json!({"step": self.step, "val_loss": v.loss, "val_ppl": v.perplexity}),
                )?;
                progress.on_eval(self.step, &v);
                last = Some(v);
            }
        }
        Ok(RunSummary {
            steps: self.step - first_step,
            losses,
            val_before,
            val_after: last,
            seconds: start.elapsed().as_secs_f64(),
            last_checkpoint,
        })
    }
}

/// What [`Trainer::run`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Steps run in this call.
    pub steps: u64,
    /// Training loss of each of them.
    pub losses: Vec<f64>,
    /// Validation before the first step of this call.
    pub val_before: Option<EvalMetrics>,
    /// Validation after the last step.
    pub val_after: Option<EvalMetrics>,
    /// Wall time in seconds.
    pub seconds: f64,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
}

/// Receives progress events of [`Trainer::run`] (the CLI draws an indicatif bar).
pub trait Progress {
    /// After each optimizer step; `until` is the last step of this run.
    fn on_step(&mut self, metrics: &StepMetrics, until: u64);
    /// After each validation.
    fn on_eval(&mut self, step: u64, metrics: &EvalMetrics);
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn on_step(&mut self, _: &StepMetrics, _: u64) {}
    fn on_eval(&mut self, _: u64, _: &EvalMetrics) {}
}

/// Mean cross-entropy of `model` over the sequences of `data` in order, in batches of
/// `batch_size`, at most `max_batches` batches (0: all); `None` when there is no target.
/// `document_mask` keeps packed documents apart, as in training.
pub fn evaluate(
    model: &TritterModel,
    data: &PackedDataset,
    batch_size: usize,
    max_batches: usize,
    document_mask: bool,
) -> Result<Option<EvalMetrics>> {
    let (mut nll, mut tokens) = (0.0f64, 0usize);
    for_each_eval_batch(
        model,
        data,
        batch_size,
        max_batches,
        document_mask,
        |batch, mask| {
            let sum = masked_nll_sum(model, batch, mask)?;
            nll += f64::from(sum.to_scalar::<f32>()?);
            tokens += batch.num_targets;
            Ok(())
        },
    )?;
    if tokens == 0 {
        return Ok(None);
    }
    let loss = nll / tokens as f64;
    Ok(Some(EvalMetrics {
        loss,
        perplexity: loss.exp(),
        tokens,
    }))
}

/// Calls `f` on the evaluation batches of `data`: its sequences in order, `batch_size` per
/// batch, the first `max_batches` batches (0: all), each with the model's mask (documents
/// kept apart when `document_mask`, as in training). Shared by [`evaluate`] and the
/// paradigm's accuracy evaluation.
pub(crate) fn for_each_eval_batch(
    model: &TritterModel,
    data: &PackedDataset,
    batch_size: usize,
    max_batches: usize,
    document_mask: bool,
    mut f: impl FnMut(&Batch, &MaskSpec) -> Result<()>,
) -> Result<()> {
    if batch_size == 0 {
        return Err(TritterError::option("batch_size", 0, "expected >= 1"));
    }
    let limit = if max_batches == 0 {
        usize::MAX
    } else {
        max_batches
    };
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(batch_size).take(limit) {
        let batch = data.batch(chunk, model.device())?;
        let mut mask = MaskSpec::from_config(model.config());
        if document_mask {
            mask = mask.with_doc_ids(batch.doc_ids.clone());
        }
        f(&batch, &mask)?;
    }
    Ok(())
}

/// `(name, var)` of every model parameter.
pub(crate) fn named_vars(model: &TritterModel) -> Vec<(String, Var)> {
    let data = model
        .varmap()
        .data()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    data.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
}

/// `sum over real targets of -log p(target)` (a scalar f32 tensor on the autograd graph)
/// of the logits `(B, L, V)` for `targets` `(B, L)` u32 where `loss_mask` `(B, L)` f32 is 1
/// (the one masked NLL of the crate: packed batches, latent batches, evaluation).
pub(crate) fn nll_sum_of_logits(
    logits: &Tensor,
    targets: &Tensor,
    loss_mask: &Tensor,
) -> Result<Tensor> {
    let (b, l, v) = logits.dims3()?;
    let logp = candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?.reshape((b * l, v))?,
        D::Minus1,
    )?;
    let picked = logp
        .gather(&targets.reshape((b * l, 1))?, 1)?
        .reshape(b * l)?; // (B*L,)
    let masked = (picked * loss_mask.reshape(b * l)?)?;
    Ok(masked.sum_all()?.neg()?)
}

/// The summed NLL of `batch` under `mask`, on the autograd graph (a scalar f32 tensor).
fn batch_nll_sum(model: &TritterModel, batch: &Batch, mask: &MaskSpec) -> Result<Tensor> {
    let (b, l) = batch.inputs.dims2()?;
    let pos = model.default_positions(b, l)?;
    let logits = model.forward(&batch.inputs, &pos, mask)?;
    nll_sum_of_logits(&logits, &batch.targets, &batch.loss_mask)
}

/// The summed NLL of `batch` under `mask` (no gradient needed; the graph is dropped).
pub(crate) fn masked_nll_sum(
    model: &TritterModel,
    batch: &Batch,
    mask: &MaskSpec,
) -> Result<Tensor> {
    Ok(batch_nll_sum(model, batch, mask)?.detach())
}

/// One micro-batch's loss terms and parameter gradients (in optimizer order).
pub(crate) struct MicroGrads {
    /// The objective and its terms, divided by the step's target count.
    pub loss: ObjectiveLoss,
    /// Gradient of every optimizer parameter (`None`: not on the graph).
    pub grads: Vec<Option<Tensor>>,
}

/// The gradient of every parameter of `opt` in `store`.
pub(crate) fn grads_of(
    store: &candle_core::backprop::GradStore,
    opt: &AdamW,
) -> Vec<Option<Tensor>> {
    opt.params()
        .map(|(_, var, _)| store.get(var.as_tensor()).cloned())
        .collect()
}

/// Gradients and loss sums of one optimizer step, accumulated over its micro-batches, and
/// the update that ends the step (shared by [`Trainer`] and the latent
/// [`ReasoningTrainer`](crate::paradigm::ReasoningTrainer)).
pub(crate) struct StepGrads {
    grads: Vec<Option<Tensor>>,
    loss: f64,
    ce: f64,
    embedding: Option<f64>,
}

impl StepGrads {
    /// Empty sums for the parameters of `opt`.
    pub(crate) fn new(opt: &AdamW) -> Self {
        StepGrads {
            grads: vec![None; opt.params().count()],
            loss: 0.0,
            ce: 0.0,
            embedding: None,
        }
    }

    /// Adds one micro-batch.
    pub(crate) fn add(&mut self, micro: MicroGrads) -> Result<()> {
        self.loss += micro.loss.value;
        self.ce += micro.loss.ce;
        if let Some(e) = micro.loss.embedding {
            *self.embedding.get_or_insert(0.0) += e;
        }
        for (acc, g) in self.grads.iter_mut().zip(micro.grads) {
            *acc = match (acc.take(), g) {
                (Some(a), Some(g)) => Some((a + g)?),
                (a, g) => a.or(g),
            };
        }
        Ok(())
    }

    /// Ends step `done + 1`: checks the loss, clips the gradients to `options.grad_clip`,
    /// checks their norm and applies AdamW at the scheduled learning rate of step `done`.
    pub(crate) fn apply(
        mut self,
        opt: &mut AdamW,
        options: &TrainOptions,
        done: u64,
        tokens: usize,
        start: Instant,
    ) -> Result<StepMetrics> {
        let step = done + 1;
        if !self.loss.is_finite() {
            return Err(TritterError::Diverged {
                step,
                what: "loss",
                value: self.loss,
            });
        }
        let grad_norm = clip_global_norm(&mut self.grads, options.grad_clip)?;
        if !grad_norm.is_finite() {
            return Err(TritterError::Diverged {
                step,
                what: "gradient norm",
                value: grad_norm,
            });
        }
        let lr = options.schedule().lr(done);
        opt.step(&self.grads, lr)?;
        let weights = options.objective.weights_at(done);
        Ok(StepMetrics {
            step,
            loss: self.loss,
            ce_loss: self.ce,
            embedding_loss: self.embedding,
            ce_weight: weights.ce,
            embedding_weight: weights.embedding,
            lr,
            grad_norm,
            tokens,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// Loss (the objective at `step`, divided by `total`) and gradients of one micro-batch,
/// by plain backpropagation through the whole graph.
fn full_grads(
    model: &TritterModel,
    opt: &AdamW,
    batch: &Batch,
    mask: &MaskSpec,
    total: usize,
    objective: &Objective,
    step: u64,
) -> Result<MicroGrads> {
    let (b, l) = batch.inputs.dims2()?;
    let pos = model.default_positions(b, l)?;
    let hidden = model.forward_hidden(&model.embed(&batch.inputs)?, &pos, mask)?;
    let loss = objective_loss(
        model,
        &hidden,
        &batch.targets,
        &batch.loss_mask,
        objective,
        step,
        total,
    )?;
    let store = loss.total.backward()?;
    Ok(MicroGrads {
        grads: grads_of(&store, opt),
        loss,
    })
}

/// As [`full_grads`], with gradient checkpointing: the forward pass keeps only each
/// layer's input (no graph); the backward pass recomputes one layer at a time from its
/// input and backpropagates the incoming gradient through it (`sum(out * g_out)` as the
/// surrogate loss), so peak activation memory is one layer's graph plus `L + 1` hidden
/// states instead of every layer's graph. Same gradients up to float rounding.
fn checkpointed_grads(
    model: &TritterModel,
    opt: &AdamW,
    batch: &Batch,
    mask: &MaskSpec,
    total: usize,
    objective: &Objective,
    step: u64,
) -> Result<MicroGrads> {
    let (b, l) = batch.inputs.dims2()?;
    let pos = model.default_positions(b, l)?;
    let (rope, bias) = model.layer_context(b, l, &pos, mask)?;
    let train = model.is_training();
    // Forward without graph, keeping each layer's input.
    let embeds = model.embed(&batch.inputs)?; // on the graph of the embedding table
    let mut inputs = vec![embeds.detach()];
    for layer in model.layers() {
        let x = inputs.last().expect("non-empty");
        inputs.push(layer.forward(x, &rope, &bias, train)?.detach());
    }
    let mut acc: Vec<Option<Tensor>> = vec![None; opt.params().count()];
    let mut add = |store: &candle_core::backprop::GradStore| -> Result<()> {
        for (a, (_, var, _)) in acc.iter_mut().zip(opt.params()) {
            if let Some(g) = store.get(var.as_tensor()) {
                *a = Some(match a.take() {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    };
    // Head: final norm, logits, loss.
    let h = Var::from_tensor(inputs.last().expect("non-empty"))?;
    let hidden = model.final_norm().forward(h.as_tensor())?;
    let loss = objective_loss(
        model,
        &hidden,
        &batch.targets,
        &batch.loss_mask,
        objective,
        step,
        total,
    )?;
    let store = loss.total.backward()?;
    add(&store)?;
    let mut g_out = store
        .get(h.as_tensor())
        .cloned()
        .unwrap_or(h.as_tensor().zeros_like()?);
    // Layers, last to first: recompute, backpropagate g_out.
    for (layer, x) in model.layers().iter().zip(&inputs).rev() {
        let xv = Var::from_tensor(x)?;
        let out = layer.forward(xv.as_tensor(), &rope, &bias, train)?;
        let store = (out * g_out.detach())?.sum_all()?.backward()?;
        add(&store)?;
        g_out = store
            .get(xv.as_tensor())
            .cloned()
            .unwrap_or(xv.as_tensor().zeros_like()?);
    }
    // Embedding table.
    let store = (embeds * g_out.detach())?.sum_all()?.backward()?;
    add(&store)?;
    Ok(MicroGrads { loss, grads: acc })
}
