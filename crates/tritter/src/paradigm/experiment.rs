//! Measuring the paradigm (`tritter eval --mode token|embedding|latent`): does reading the
//! model in embedding space, or letting it think in continuous thoughts, help?
//!
//! Three ways to read the model's next token ([`EvalMode`]):
//! * `token`: the argmax of the logits (the training scaffold);
//! * `embedding`: the predicted next embedding ([`TritterModel::latent_embedding`] of the
//!   final hidden state, the quantity the embedding loss trains) rounded to the nearest token
//!   by the [`EmbeddingRounder`], falling back to the logits below a confidence threshold;
//! * `latent` (reasoning tasks only): every reasoning step is replaced by
//!   `thoughts_per_step` continuous thoughts between `<bot>` and `<eot>` (the last stage of
//!   the [`Curriculum`]); the answer is read with the logits.
//!
//! Two measurements ([`EvalReport`]):
//! * next-token accuracy, teacher-forced: the fraction of loss targets (corpus: every real
//!   token; task: the steps still spelled out, the answer and `<eos>`) the mode predicts
//!   exactly;
//! * task accuracy: greedy generation from the question (token and embedding modes generate
//!   the chain of thought, then the answer; latent mode thinks, then answers), the answer is
//!   the text after the last line break before `<eos>` ([`answer_of`]), compared with
//!   [`TaskKind::check`].
//!
//! Latent mode has no meaning on free text (there are no reasoning spans to replace), so
//! [`evaluate_corpus`] refuses it.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};

use super::curriculum::{Curriculum, LatentBatch};
use super::latent::LatentMarkers;
use super::rounder::{EmbeddingRounder, RoundPath};
use super::task::TaskKind;
use super::ReasoningExample;
use crate::data::PackedDataset;
use crate::generate::generate_with;
use crate::tokenizer::vocab::{SpecialToken, BYTE_OFFSET};
use crate::train::for_each_eval_batch;
use crate::{MaskSpec, Result, TritterError, TritterModel};

/// Seed of the held-out task examples `tritter eval --task` and the check after `tritter
/// train --task` use: distinct from the training seeds people pick (0 by default), so the
/// evaluated examples are generated independently of the training set.
pub const HELD_OUT_SEED: u64 = 1_000_003;

/// How the next token is read from the model (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvalMode {
    /// Argmax of the logits.
    Token,
    /// The predicted embedding rounded to the nearest token (fallback: logits).
    Embedding,
    /// Continuous thoughts in place of the reasoning steps, answer from the logits.
    Latent,
}

impl EvalMode {
    /// Every mode, in report order.
    pub const ALL: [EvalMode; 3] = [EvalMode::Token, EvalMode::Embedding, EvalMode::Latent];
}

impl FromStr for EvalMode {
    type Err = TritterError;

    /// `"token"`, `"embedding"` or `"latent"` (any case).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "token" => Ok(EvalMode::Token),
            "embedding" => Ok(EvalMode::Embedding),
            "latent" => Ok(EvalMode::Latent),
            _ => Err(TritterError::argument(
                "mode",
                format!("{s:?}"),
                "one of token, embedding, latent",
            )),
        }
    }
}

impl fmt::Display for EvalMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EvalMode::Token => "token",
            EvalMode::Embedding => "embedding",
            EvalMode::Latent => "latent",
        })
    }
}

/// Settings of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalOptions {
    /// How the next token is read.
    pub mode: EvalMode,
    /// Latent mode: continuous thoughts per replaced reasoning step (the curriculum's `c`).
    pub thoughts_per_step: usize,
    /// Embedding mode: rounder confidence below which the logits decide (0: never fall back).
    pub rounder_threshold: f32,
    /// Task accuracy: new tokens generated per example at most.
    pub max_new_tokens: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            mode: EvalMode::Token,
            thoughts_per_step: 1,
            rounder_threshold: 0.0,
            max_new_tokens: 96,
        }
    }
}

impl EvalOptions {
    /// Checks the options; messages name the option, its value and the rule.
    pub fn validate(&self) -> Result<()> {
        if self.thoughts_per_step == 0 {
            return Err(TritterError::option(
                "thoughts_per_step",
                0,
                "expected >= 1",
            ));
        }
        if !self.rounder_threshold.is_finite() {
            return Err(TritterError::option(
                "rounder_threshold",
                self.rounder_threshold,
                "expected a finite confidence, normally in [0, 1]",
            ));
        }
        if self.max_new_tokens == 0 {
            return Err(TritterError::option("max_new_tokens", 0, "expected >= 1"));
        }
        Ok(())
    }
}

/// `correct` out of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accuracy {
    /// Exact hits.
    pub correct: usize,
    /// Cases.
    pub total: usize,
}

impl Accuracy {
    /// `correct / total`, `None` without cases.
    pub fn rate(&self) -> Option<f64> {
        (self.total > 0).then(|| self.correct as f64 / self.total as f64)
    }
}

impl fmt::Display for Accuracy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rate() {
            Some(r) => write!(f, "{:.1}% ({}/{})", 100.0 * r, self.correct, self.total),
            None => f.write_str("n/a"),
        }
    }
}

/// What an evaluation measured (module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalReport {
    /// The mode.
    pub mode: EvalMode,
    /// Teacher-forced next-token accuracy.
    pub next_token: Accuracy,
    /// Task accuracy (reasoning tasks only).
    pub task: Option<Accuracy>,
    /// Embedding mode: predictions (teacher-forced and generated) that fell back to the
    /// logits, and all rounded predictions.
    pub fallbacks: Accuracy,
}

/// Reads next tokens from final hidden states in one mode.
struct Reader<'a> {
    model: &'a TritterModel,
    rounder: Option<EmbeddingRounder>,
    threshold: f32,
    fallbacks: Accuracy,
}

impl<'a> Reader<'a> {
    fn new(model: &'a TritterModel, options: &EvalOptions) -> Result<Self> {
        options.validate()?;
        let rounder = match options.mode {
            EvalMode::Embedding => Some(EmbeddingRounder::from_model(model)?),
            EvalMode::Token | EvalMode::Latent => None,
        };
        Ok(Reader {
            model,
            rounder,
            threshold: options.rounder_threshold,
            fallbacks: Accuracy::default(),
        })
    }

    /// The token for the predicted embedding `embedding` `(H,)` and logits `(V,)`.
    fn pick(&mut self, embedding: &[f32], logits: &[f32]) -> Result<u32> {
        match &self.rounder {
            None => Ok(argmax(logits)),
            Some(r) => {
                let d = r.round_or_fallback(embedding, logits, self.threshold)?;
                self.fallbacks.total += 1;
                self.fallbacks.correct += usize::from(d.path == RoundPath::Logits);
                Ok(d.id)
            }
        }
    }

    /// Scores the next-token predictions of final hidden states `(B, L, H)` against
    /// `targets` `(B, L)` u32 where `loss_mask` `(B, L)` is 1 (only those positions are read,
    /// so padding neither costs a rounding nor counts as a fallback).
    fn score(
        &mut self,
        hidden: &Tensor,
        targets: &Tensor,
        loss_mask: &Tensor,
        acc: &mut Accuracy,
    ) -> Result<()> {
        let logits = self
            .model
            .logits(hidden)?
            .to_dtype(DType::F32)?
            .to_vec3::<f32>()?;
        let embeds = match self.rounder {
            Some(_) => Some(
                self.model
                    .latent_embedding(hidden)?
                    .to_dtype(DType::F32)?
                    .to_vec3::<f32>()?,
            ),
            None => None,
        };
        let targets = targets.to_vec2::<u32>()?;
        let mask = loss_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (b, rows) in logits.iter().enumerate() {
            for (i, row) in rows.iter().enumerate() {
                if mask[b][i] > 0.0 {
                    let e = embeds.as_ref().map_or(&[][..], |e| &e[b][i][..]);
                    let predicted = self.pick(e, row)?;
                    acc.total += 1;
                    acc.correct += usize::from(predicted == targets[b][i]);
                }
            }
        }
        Ok(())
    }
}

fn argmax(v: &[f32]) -> u32 {
    // Strict `>` keeps the lowest id among equal values.
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Next-token accuracy on packed text (token or embedding mode) over the first
/// `max_batches` batches of `batch_size` sequences (0: all), with document masking as in
/// training. Latent mode is refused: free text has no reasoning steps to think through.
pub fn evaluate_corpus(
    model: &TritterModel,
    data: &PackedDataset,
    options: &EvalOptions,
    batch_size: usize,
    max_batches: usize,
    document_mask: bool,
) -> Result<EvalReport> {
    if options.mode == EvalMode::Latent {
        return Err(TritterError::argument(
            "mode",
            "latent",
            "token or embedding on a corpus (latent mode needs a reasoning task: --task arith|reach)",
        ));
    }
    let mut reader = Reader::new(model, options)?;
    let mut next_token = Accuracy::default();
    for_each_eval_batch(
        model,
        data,
        batch_size,
        max_batches,
        document_mask,
        |batch, mask| {
            let (b, l) = batch.inputs.dims2()?;
            let embeds = model.embed(&batch.inputs)?;
            let hidden =
                model.forward_embeddings(&embeds, &model.default_positions(b, l)?, mask)?;
            reader.score(&hidden, &batch.targets, &batch.loss_mask, &mut next_token)
        },
    )?;
    Ok(EvalReport {
        mode: options.mode,
        next_token,
        task: None,
        fallbacks: reader.fallbacks,
    })
}

/// The answer part of a generated chain of thought: the tokens after the last line break
/// (byte `\n`) before the first `<eos>` (all of them without a line break). Steps of the
/// built-in tasks end with a line break, so for `b=12\nc=24\n24<eos>` this is `24`.
pub fn answer_of(generated: &[u32]) -> &[u32] {
    let newline = BYTE_OFFSET + u32::from(b'\n');
    let end = generated
        .iter()
        .position(|&id| id == SpecialToken::Eos.id())
        .unwrap_or(generated.len());
    let body = &generated[..end];
    match body.iter().rposition(|&id| id == newline) {
        Some(i) => &body[i + 1..],
        None => body,
    }
}

/// Next-token and task accuracy of `model` on reasoning `examples` of `kind` (module docs),
/// `batch_size` examples per teacher-forced batch.
pub fn evaluate_task(
    model: &TritterModel,
    kind: TaskKind,
    examples: &[ReasoningExample],
    options: &EvalOptions,
    batch_size: usize,
) -> Result<EvalReport> {
    if examples.is_empty() {
        return Err(TritterError::EmptyDataset {
            what: "evaluation examples".into(),
            detail: "0 examples; expected at least 1".into(),
        });
    }
    if batch_size == 0 {
        return Err(TritterError::option("batch_size", 0, "expected >= 1"));
    }
    let mut reader = Reader::new(model, options)?;
    let latent = options.mode == EvalMode::Latent;
    // Non-latent modes build stage-0 sequences, which hold no markers: a vocab without
    // them (< 266 ids) still evaluates, with ids no token can take.
    let markers = match LatentMarkers::from_config(model.config()) {
        Ok(m) => m,
        Err(e) if latent => return Err(e),
        Err(_) => LatentMarkers {
            bot: u32::MAX,
            eot: u32::MAX,
        },
    };
    let curriculum = Curriculum {
        thoughts_per_step: options.thoughts_per_step,
        steps_per_stage: 1,
        max_stage: usize::MAX,
    };
    // Stage 0 spells every step; the full stage thinks through all of them.
    let stage_of = |e: &ReasoningExample| if latent { e.steps.len() } else { 0 };
    let mask = MaskSpec::from_config(model.config());
    let mut next_token = Accuracy::default();
    for chunk in examples.chunks(batch_size) {
        let sequences = chunk
            .iter()
            .map(|e| curriculum.build(e, stage_of(e), markers))
            .collect::<Result<Vec<_>>>()?;
        let batch = LatentBatch::new(&sequences, model.device())?;
        let (b, l) = batch.inputs.dims2()?;
        let hidden = model.forward_latent(
            &batch.inputs,
            &batch.latent_mask,
            &model.default_positions(b, l)?,
            &mask,
        )?;
        reader.score(&hidden, &batch.targets, &batch.loss_mask, &mut next_token)?;
    }
    let mut task = Accuracy::default();
    for e in examples {
        let thoughts = if latent {
            e.steps.len() * options.thoughts_per_step
        } else {
            0
        };
        let generated = generate_with(
            model,
            &e.question,
            thoughts,
            options.max_new_tokens,
            true,
            |last, logits| {
                let embedding = match reader.rounder {
                    Some(_) => model
                        .latent_embedding(last)?
                        .flatten_all()?
                        .to_dtype(DType::F32)?
                        .to_vec1::<f32>()?,
                    None => Vec::new(),
                };
                reader.pick(&embedding, logits)
            },
        )?;
        task.total += 1;
        task.correct += usize::from(kind.check(e, answer_of(&generated)));
    }
    Ok(EvalReport {
        mode: options.mode,
        next_token,
        task: Some(task),
        fallbacks: reader.fallbacks,
    })
}
