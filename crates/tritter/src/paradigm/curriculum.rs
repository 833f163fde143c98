//! Coconut's curriculum (Hao et al. 2024): training starts on full chain-of-thought
//! sequences and, stage by stage, replaces the first reasoning steps with continuous
//! thoughts, so the model learns to reason in its hidden states.
//!
//! Stage `s` of a [`ReasoningExample`] with `n` steps, `c` thoughts per step and
//! `k = min(s, n)` (Coconut: a stage past the last step makes every step latent):
//!
//! ```text
//! stage 0:  question steps[0..n] answer <eos>
//! stage s:  question <bot> [k * c latent slots] <eot> steps[k..n] answer <eos>
//! ```
//!
//! The loss covers the remaining steps, the answer and `<eos>`; never the question, the
//! markers or the latent slots (their inputs are hidden states, their ids are `<pad>`
//! placeholders). [`ReasoningTrainer`] trains a model on examples with this schedule, using
//! [`TritterModel::forward_latent`], the [`Objective`] of its [`TrainOptions`] and the
//! trainer's AdamW, clipping and learning-rate schedule.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::latent::LatentMarkers;
use super::loss::objective_loss;
use super::{Objective, ReasoningExample};
use crate::config::{TritterConfig, PAD_TOKEN_ID};
use crate::model::{MaskSpec, SeededRng};
use crate::tokenizer::SpecialToken;
use crate::train::{grads_of, named_vars, AdamW, MicroGrads, StepGrads, StepMetrics, TrainOptions};
use crate::{Result, TritterError, TritterModel};

/// The stage schedule: stage `s` replaces the first `s` reasoning steps with
/// `s * thoughts_per_step` continuous thoughts; the stage grows by one every
/// `steps_per_stage` optimizer steps up to `max_stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Curriculum {
    /// Continuous thoughts per replaced step (Coconut's `c`), >= 1.
    pub thoughts_per_step: usize,
    /// Optimizer steps per stage, >= 1.
    pub steps_per_stage: u64,
    /// The last stage (stays in force once reached).
    pub max_stage: usize,
}

/// One training sequence of the curriculum: `ids` with per-position flags. All three
/// vectors have the same length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatentSequence {
    /// Token ids; `<pad>` at latent slots (ignored: their input is a hidden state).
    pub ids: Vec<u32>,
    /// `true` at latent slots.
    pub latent_mask: Vec<bool>,
    /// `true` where the token is a loss target (predicted from the position before it).
    pub loss_mask: Vec<bool>,
}

impl Curriculum {
    /// Checks `thoughts_per_step >= 1` and `steps_per_stage >= 1`.
    pub fn validate(&self) -> Result<()> {
        if self.thoughts_per_step == 0 {
            return Err(TritterError::option(
                "thoughts_per_step",
                0,
                "expected >= 1 continuous thought per replaced step",
            ));
        }
        if self.steps_per_stage == 0 {
            return Err(TritterError::option(
                "steps_per_stage",
                0,
                "expected >= 1 optimizer step per stage",
            ));
        }
        Ok(())
    }

    /// The stage of (0-based) optimizer step `step`: `min(step / steps_per_stage, max_stage)`.
    pub fn stage_at(&self, step: u64) -> usize {
        let s = step / self.steps_per_stage.max(1);
        usize::try_from(s).map_or(self.max_stage, |s| s.min(self.max_stage))
    }

    /// Latent slots of `example` at `stage`: `min(stage, steps) * thoughts_per_step`.
    pub fn latent_slots(&self, example: &ReasoningExample, stage: usize) -> usize {
        stage.min(example.steps.len()) * self.thoughts_per_step
    }

    /// The sequence of `example` at `stage` (module docs give the layout). Errors when the
    /// question is empty (the first prediction needs a position before it) or when the
    /// example already holds `<bot>`/`<eot>` (task tokens must come from the tokenizer, which
    /// never emits them).
    pub fn build(
        &self,
        example: &ReasoningExample,
        stage: usize,
        markers: LatentMarkers,
    ) -> Result<LatentSequence> {
        if example.question.is_empty() {
            return Err(TritterError::ShapeMismatch {
                what: "reasoning example question".into(),
                actual: vec![0],
                expected: "at least 1 token".into(),
            });
        }
        let k = stage.min(example.steps.len());
        let slots = k * self.thoughts_per_step;
        let mut seq = LatentSequence {
            ids: Vec::new(),
            latent_mask: Vec::new(),
            loss_mask: Vec::new(),
        };
        let push = |seq: &mut LatentSequence, id: u32, latent: bool, loss: bool| {
            seq.ids.push(id);
            seq.latent_mask.push(latent);
            seq.loss_mask.push(loss);
        };
        let tokens = example
            .question
            .iter()
            .chain(example.steps.iter().flatten())
            .chain(&example.answer);
        if let Some(&id) = tokens.clone().find(|&&id| markers.is_marker(id)) {
            return Err(TritterError::InvalidLatentSpan {
                batch: 0,
                position: tokens.take_while(|&&t| t != id).count(),
                detail: format!(
                    "the example holds token id {id}, a latent marker (<bot> {}, <eot> {}); \
                     expected question/steps/answer tokens without markers",
                    markers.bot, markers.eot
                ),
            });
        }
        for &id in &example.question {
            push(&mut seq, id, false, false);
        }
        if k > 0 {
            push(&mut seq, markers.bot, false, false);
            for _ in 0..slots {
                push(&mut seq, PAD_TOKEN_ID, true, false);
            }
            push(&mut seq, markers.eot, false, false);
        }
        for &id in example.steps[k..].iter().flatten().chain(&example.answer) {
            push(&mut seq, id, false, true);
        }
        push(&mut seq, SpecialToken::Eos.id(), false, true);
        Ok(seq)
    }
}

/// A padded batch of [`LatentSequence`]s for next-token training: inputs are each
/// sequence without its last token, targets without its first, right-padded with `<pad>` to
/// the longest (`L = max len - 1`); padding is never latent and never a target.
#[derive(Debug, Clone)]
pub struct LatentBatch {
    /// Input ids `(B, L)` u32.
    pub inputs: Tensor,
    /// `(B, L)` u8: 1 at latent slots (the input of [`TritterModel::forward_latent`]).
    pub latent_mask: Tensor,
    /// Target ids `(B, L)` u32 (inputs shifted by one).
    pub targets: Tensor,
    /// `(B, L)` f32: 1 where the target is a loss target of its sequence.
    pub loss_mask: Tensor,
    /// Number of loss targets (the sum of `loss_mask`).
    pub num_targets: usize,
}

impl LatentBatch {
    /// Pads `sequences` into one batch on `device`. Errors on an empty batch, a sequence of
    /// fewer than 2 tokens or with flag vectors of another length.
    pub fn new(sequences: &[LatentSequence], device: &Device) -> Result<Self> {
        if sequences.is_empty() {
            return Err(TritterError::ShapeMismatch {
                what: "latent batch".into(),
                actual: vec![0],
                expected: "at least 1 sequence".into(),
            });
        }
        for (i, s) in sequences.iter().enumerate() {
            let n = s.ids.len();
            if n < 2 || s.latent_mask.len() != n || s.loss_mask.len() != n {
                return Err(TritterError::ShapeMismatch {
                    what: format!("latent sequence {i} (ids, latent_mask, loss_mask)"),
                    actual: vec![n, s.latent_mask.len(), s.loss_mask.len()],
                    expected: "three equal lengths >= 2".into(),
                });
            }
        }
        let b = sequences.len();
        let l = sequences.iter().map(|s| s.ids.len() - 1).max().unwrap_or(1);
        let pad = PAD_TOKEN_ID;
        let (mut inputs, mut latent, mut targets, mut loss) = (
            Vec::with_capacity(b * l),
            Vec::with_capacity(b * l),
            Vec::with_capacity(b * l),
            Vec::with_capacity(b * l),
        );
        for s in sequences {
            let n = s.ids.len() - 1;
            let fill = l - n;
            inputs.extend(
                s.ids[..n]
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, fill)),
            );
            latent.extend(
                s.latent_mask[..n]
                    .iter()
                    .map(|&f| u8::from(f))
                    .chain(std::iter::repeat_n(0, fill)),
            );
            targets.extend(
                s.ids[1..]
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, fill)),
            );
            loss.extend(
                s.loss_mask[1..]
                    .iter()
                    .map(|&f| if f { 1.0f32 } else { 0.0 })
                    .chain(std::iter::repeat_n(0.0, fill)),
            );
        }
        let num_targets = loss.iter().filter(|&&m| m > 0.0).count();
        Ok(LatentBatch {
            inputs: Tensor::from_vec(inputs, (b, l), device)?,
            latent_mask: Tensor::from_vec(latent, (b, l), device)?,
            targets: Tensor::from_vec(targets, (b, l), device)?,
            loss_mask: Tensor::from_vec(loss, (b, l), device)?,
            num_targets,
        })
    }
}

/// What one [`ReasoningTrainer`] step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReasoningStepMetrics {
    /// The curriculum stage the step trained on.
    pub stage: usize,
    /// Loss terms, learning rate, gradient norm, targets, time.
    pub metrics: StepMetrics,
}

/// Trains a model on [`ReasoningExample`]s with the [`Curriculum`]: each optimizer step
/// draws `grad_accum` micro-batches of `batch_size` examples (a seeded per-epoch shuffle),
/// builds them at the step's stage, runs [`TritterModel::forward_latent`], and minimizes
/// the [`Objective`] of the options over the loss targets with the trainer's AdamW,
/// clipping and warmup + cosine schedule. `seq_len` of the options is the longest allowed
/// input; `eval_*`, `checkpoint_every` and `document_mask` do not apply. The optimizer is
/// not reset between stages (Coconut optionally does).
#[derive(Debug)]
pub struct ReasoningTrainer {
    model: TritterModel,
    optimizer: AdamW,
    options: TrainOptions,
    curriculum: Curriculum,
    markers: LatentMarkers,
    examples: Vec<ReasoningExample>,
    order: Vec<usize>,
    position: usize,
    epoch: u64,
    step: u64,
}

impl ReasoningTrainer {
    /// A fresh f32 model for `config` (initialized from `options.seed`) trained on
    /// `examples`. See [`with_model`](Self::with_model) for the checks.
    pub fn new(
        config: &TritterConfig,
        options: TrainOptions,
        curriculum: Curriculum,
        examples: Vec<ReasoningExample>,
        device: &Device,
    ) -> Result<Self> {
        let model = TritterModel::new(config, DType::F32, device, options.seed)?;
        Self::with_model(model, options, curriculum, examples)
    }

    /// Trains `model` (e.g. a language model trained by [`crate::train::Trainer`]) on
    /// `examples`. Errors on invalid options or curriculum, no examples, a vocab without
    /// latent markers (< 266 ids), and an example that does not build or whose inputs at
    /// some stage up to `max_stage` exceed `seq_len` tokens.
    pub fn with_model(
        model: TritterModel,
        options: TrainOptions,
        curriculum: Curriculum,
        examples: Vec<ReasoningExample>,
    ) -> Result<Self> {
        options.validate(model.config())?;
        curriculum.validate()?;
        if examples.is_empty() {
            return Err(TritterError::EmptyDataset {
                what: "reasoning examples".into(),
                detail: "0 examples; expected at least 1".into(),
            });
        }
        let markers = LatentMarkers::from_config(model.config())?;
        for (i, e) in examples.iter().enumerate() {
            for stage in 0..=curriculum.max_stage.min(e.steps.len()) {
                let len = curriculum.build(e, stage, markers)?.ids.len() - 1;
                if len > options.seq_len {
                    return Err(TritterError::option(
                        "seq_len",
                        options.seq_len,
                        format!(
                            "expected >= {len}, the input length of example {i} at stage {stage}"
                        ),
                    ));
                }
            }
        }
        let optimizer = AdamW::new(named_vars(&model), options.adamw)?;
        let mut trainer = ReasoningTrainer {
            model,
            optimizer,
            options,
            curriculum,
            markers,
            order: Vec::new(),
            examples,
            position: 0,
            epoch: 0,
            step: 0,
        };
        trainer.shuffle();
        Ok(trainer)
    }

    fn shuffle(&mut self) {
        self.order = (0..self.examples.len()).collect();
        let seed = self.options.seed ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        crate::data::shuffle(&mut self.order, &mut SeededRng::new(seed));
    }

    fn next_indices(&mut self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.options.batch_size);
        while out.len() < self.options.batch_size {
            if self.position >= self.order.len() {
                self.epoch += 1;
                self.position = 0;
                self.shuffle();
            }
            out.push(self.order[self.position]);
            self.position += 1;
        }
        out
    }

    /// The model.
    pub fn model(&self) -> &TritterModel {
        &self.model
    }

    /// The options.
    pub fn options(&self) -> &TrainOptions {
        &self.options
    }

    /// The curriculum.
    pub fn curriculum(&self) -> &Curriculum {
        &self.curriculum
    }

    /// The latent markers of the model's vocab.
    pub fn markers(&self) -> LatentMarkers {
        self.markers
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The stage the next step trains on.
    pub fn stage(&self) -> usize {
        self.curriculum.stage_at(self.step)
    }

    /// One optimizer step at the current stage; the loss is normalized by the step's total
    /// target count, as in [`crate::train::Trainer::train_step`].
    pub fn train_step(&mut self) -> Result<ReasoningStepMetrics> {
        let start = Instant::now();
        let stage = self.stage();
        let device = self.model.device().clone();
        let mut batches = Vec::with_capacity(self.options.grad_accum);
        for _ in 0..self.options.grad_accum {
            let sequences = self
                .next_indices()
                .into_iter()
                .map(|i| {
                    self.curriculum
                        .build(&self.examples[i], stage, self.markers)
                })
                .collect::<Result<Vec<_>>>()?;
            batches.push(LatentBatch::new(&sequences, &device)?);
        }
        let total: usize = batches.iter().map(|b| b.num_targets).sum();
        let mask = MaskSpec::from_config(self.model.config());
        let objective: Objective = self.options.objective;
        let mut grads = StepGrads::new(&self.optimizer);
        for batch in &batches {
            let (b, l) = batch.inputs.dims2()?;
            let pos = self.model.default_positions(b, l)?;
            let hidden =
                self.model
                    .forward_latent(&batch.inputs, &batch.latent_mask, &pos, &mask)?;
            let loss = objective_loss(
                &self.model,
                &hidden,
                &batch.targets,
                &batch.loss_mask,
                &objective,
                self.step,
                total,
            )?;
            let store = loss.total.backward()?;
            grads.add(MicroGrads {
                grads: grads_of(&store, &self.optimizer),
                loss,
            })?;
        }
        let metrics = grads.apply(&mut self.optimizer, &self.options, self.step, total, start)?;
        self.step = metrics.step;
        Ok(ReasoningStepMetrics { stage, metrics })
    }
}
