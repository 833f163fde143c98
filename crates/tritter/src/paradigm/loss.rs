//! Embedding-prediction losses and the training objective that mixes them with
//! cross-entropy.
//!
//! The predicted next embedding at position `t` is [`TritterModel::latent_embedding`] of the
//! final hidden state `(B, L, H)` (the normalized hidden state, or its `latent_proj`
//! projection); the target is the embedding-table row of token `t + 1`, **detached**: the
//! loss moves the model towards the embeddings, never the embeddings towards the model
//! (without the stop-gradient the table could shrink to make the loss vanish). Positions
//! are masked exactly like the cross-entropy targets (`loss_mask`).
//!
//! [`Objective`] weights the two terms and moves from cross-entropy only to the target mix
//! over a linear transition by optimizer step, so a run can start as a language model and
//! turn into an embedding predictor.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::train::nll_sum_of_logits;
use crate::{Result, TritterError, TritterModel};

/// Added under the square roots of the cosine loss's norms so a zero vector (the `<pad>`
/// row, or an untrained hidden state) gives a finite loss and gradient.
pub const COSINE_EPS: f64 = 1e-8;

/// How a predicted embedding is compared with its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingLossKind {
    /// Mean squared error over the `H` components: `mean_k (p_k - t_k)²` per position
    /// (scale-sensitive: it also matches the norm of the target).
    Mse,
    /// Cosine distance `1 - p·t / (sqrt(|p|² + ε) sqrt(|t|² + ε))` per position, ε =
    /// [`COSINE_EPS`] (direction only, as with an embedding rounder's cosine KNN).
    Cosine,
}

impl EmbeddingLossKind {
    /// Lower-case name (`"mse"`, `"cosine"`), as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            EmbeddingLossKind::Mse => "mse",
            EmbeddingLossKind::Cosine => "cosine",
        }
    }
}

/// The embedding-prediction term of an [`Objective`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingObjective {
    /// The distance.
    pub kind: EmbeddingLossKind,
    /// Its weight in the target mix (>= 0, finite).
    pub weight: f64,
}

/// The training objective: `ce_weight * CE + embedding.weight * embedding loss`, both the
/// mean over the step's target positions, reached by a linear transition from CE only.
///
/// Weights at step `s` (0-based, the step being taken): with progress
/// `a = clamp((s - transition_start) / transition_steps, 0, 1)` (a step function at
/// `transition_start` when `transition_steps == 0`), the CE weight is `1 + a (ce_weight - 1)`
/// and the embedding weight `a * embedding.weight`. The default (CE weight 1, no embedding
/// term) is the plain language-model objective, identical to training without it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Objective {
    /// Weight of the cross-entropy in the target mix (>= 0, finite).
    pub ce_weight: f64,
    /// The embedding-prediction term, if any.
    pub embedding: Option<EmbeddingObjective>,
    /// First step of the transition from CE only to the target mix.
    pub transition_start: u64,
    /// Steps of the linear transition (0: switch at `transition_start`).
    pub transition_steps: u64,
}

impl Default for Objective {
    fn default() -> Self {
        Objective {
            ce_weight: 1.0,
            embedding: None,
            transition_start: 0,
            transition_steps: 0,
        }
    }
}

/// The loss weights of one step ([`Objective::weights_at`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    /// Cross-entropy weight.
    pub ce: f64,
    /// Embedding-loss weight (0 without an embedding term).
    pub embedding: f64,
}

impl Objective {
    /// Checks the weights: finite, >= 0, and not both 0 in the target mix. Errors are
    /// `InvalidTrainOption` naming the CLI flag (`--ce-weight`, `--embedding-weight`), the
    /// value and the rule.
    pub fn validate(&self) -> Result<()> {
        let check = |flag: &'static str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(TritterError::option(
                    flag,
                    v,
                    "expected a finite value >= 0",
                ))
            }
        };
        check("--ce-weight", self.ce_weight)?;
        let emb = self.embedding.map_or(0.0, |e| e.weight);
        if let Some(e) = &self.embedding {
            check("--embedding-weight", e.weight)?;
        }
        if self.ce_weight == 0.0 && emb == 0.0 {
            return Err(TritterError::option(
                "--ce-weight / --embedding-weight",
                format!("{} / {emb}", self.ce_weight),
                "expected at least one weight > 0 (a zero objective trains nothing)",
            ));
        }
        Ok(())
    }

    /// Whether this is the plain cross-entropy objective at every step.
    pub fn is_ce_only(&self) -> bool {
        self.embedding.is_none() && self.ce_weight == 1.0
    }

    /// Transition progress in `[0, 1]` at (0-based) step `step`.
    pub fn progress(&self, step: u64) -> f64 {
        if step < self.transition_start {
            0.0
        } else if self.transition_steps == 0 {
            1.0
        } else {
            ((step - self.transition_start) as f64 / self.transition_steps as f64).min(1.0)
        }
    }

    /// The loss weights of (0-based) step `step`.
    pub fn weights_at(&self, step: u64) -> LossWeights {
        let a = self.progress(step);
        LossWeights {
            ce: 1.0 + a * (self.ce_weight - 1.0),
            embedding: a * self.embedding.map_or(0.0, |e| e.weight),
        }
    }
}

/// `sum over positions with mask = 1 of d(predicted, target)` as a scalar f32 tensor on the
/// autograd graph of `predicted` only: `target` is detached (stop-gradient). `predicted` and
/// `target` are `(B, L, H)` (any float dtype, computed in f32), `mask` is `(B, L)` f32 with
/// 0/1 values (the cross-entropy `loss_mask`). Masked-out positions contribute exactly 0.
pub fn embedding_loss_sum(
    kind: EmbeddingLossKind,
    predicted: &Tensor,
    target: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let (b, l, h) = predicted.dims3()?;
    if target.dims() != [b, l, h] {
        return Err(TritterError::ShapeMismatch {
            what: "embedding target".into(),
            actual: target.dims().to_vec(),
            expected: format!("({b}, {l}, {h}) like the prediction"),
        });
    }
    if mask.dims() != [b, l] {
        return Err(TritterError::ShapeMismatch {
            what: "embedding loss mask".into(),
            actual: mask.dims().to_vec(),
            expected: format!("({b}, {l})"),
        });
    }
    let p = predicted.to_dtype(DType::F32)?;
    let t = target.detach().to_dtype(DType::F32)?;
    let per_position = match kind {
        EmbeddingLossKind::Mse => (&p - &t)?.sqr()?.mean(D::Minus1)?,
        EmbeddingLossKind::Cosine => {
            let dot = (&p * &t)?.sum(D::Minus1)?;
            let np = (p.sqr()?.sum(D::Minus1)? + COSINE_EPS)?.sqrt()?;
            let nt = (t.sqr()?.sum(D::Minus1)? + COSINE_EPS)?.sqrt()?;
            (1.0 - (dot / (np * nt)?)?)?
        }
    }; // (B, L)
    Ok((per_position * mask.to_dtype(DType::F32)?)?.sum_all()?)
}

/// One micro-batch's loss under an [`Objective`], each term divided by the step's target
/// count (`denominator`).
#[derive(Debug)]
pub(crate) struct ObjectiveLoss {
    /// `w_ce * CE + w_emb * embedding`, scalar f32 on the graph (what is backpropagated).
    pub total: Tensor,
    /// Its value.
    pub value: f64,
    /// The cross-entropy term (unweighted).
    pub ce: f64,
    /// The embedding term (unweighted) when the objective has one.
    pub embedding: Option<f64>,
}

/// The objective of `hidden` `(B, L, H)` (final hidden states of `model`) against `targets`
/// `(B, L)` u32 under `loss_mask` `(B, L)` f32 at step `step`, divided by `denominator`.
/// With the plain CE objective this is exactly the trainer's masked NLL / denominator.
pub(crate) fn objective_loss(
    model: &TritterModel,
    hidden: &Tensor,
    targets: &Tensor,
    loss_mask: &Tensor,
    objective: &Objective,
    step: u64,
    denominator: usize,
) -> Result<ObjectiveLoss> {
    let denominator = denominator.max(1) as f64;
    let ce = (nll_sum_of_logits(&model.logits(hidden)?, targets, loss_mask)? / denominator)?;
    let ce_value = f64::from(ce.to_scalar::<f32>()?);
    let Some(emb) = objective.embedding else {
        let total = if objective.ce_weight == 1.0 {
            ce
        } else {
            (ce * objective.ce_weight)?
        };
        let value = f64::from(total.to_scalar::<f32>()?);
        return Ok(ObjectiveLoss {
            total,
            value,
            ce: ce_value,
            embedding: None,
        });
    };
    let weights = objective.weights_at(step);
    let (b, l) = targets.dims2()?;
    let target = model
        .embedding()
        .weight()
        .index_select(&targets.flatten_all()?, 0)?
        .reshape((b, l, model.config().hidden_size))?;
    let predicted = model.latent_embedding(hidden)?;
    let e = (embedding_loss_sum(emb.kind, &predicted, &target, loss_mask)? / denominator)?;
    let e_value = f64::from(e.to_scalar::<f32>()?);
    let total = ((ce * weights.ce)? + (e * weights.embedding)?)?;
    let value = f64::from(total.to_scalar::<f32>()?);
    Ok(ObjectiveLoss {
        total,
        value,
        ce: ce_value,
        embedding: Some(e_value),
    })
}
