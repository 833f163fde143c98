//! The embedding-prediction paradigm (DESIGN.md section 5): the model works in continuous
//! embedding space and token logits are the training scaffold.
//!
//! * [`latent`]: `<bot>`/`<eot>` latent-span markers and continuous thought (the final hidden
//!   state becomes the next input embedding, without sampling), as in Coconut;
//! * [`loss`]: embedding-prediction losses (MSE, cosine; stop-gradient on the target)
//!   combinable with cross-entropy, and the token-to-embedding transition by step;
//! * [`curriculum`]: Coconut's curriculum, stage `s` replaces the first `s` reasoning steps
//!   of each [`ReasoningExample`] with latent thoughts;
//! * [`rounder`]: maps predicted embeddings back to tokens (exact cosine KNN over the
//!   embedding table on CPU and GPU, a VQ rounder, confidence and fallback to logits);
//! * [`task`]: synthetic multi-step reasoning tasks the crate generates (arithmetic chains,
//!   graph reachability) to measure whether latent reasoning helps.

pub mod curriculum;
pub mod experiment;
pub mod latent;
pub mod loss;
pub mod rounder;
#[cfg(feature = "cuda")]
pub mod rounder_cuda;
pub mod task;

pub use curriculum::{
    Curriculum, LatentBatch, LatentSequence, ReasoningStepMetrics, ReasoningTrainer,
};
pub use latent::LatentMarkers;
pub use loss::{embedding_loss_sum, EmbeddingLossKind, EmbeddingObjective, LossWeights, Objective};
pub use rounder::{EmbeddingRounder, KnnResult, VqConfig, VqRounder};
pub use task::TaskKind;

/// One multi-step reasoning example in Coconut's data shape: the token ids of the question,
/// of each reasoning step (chain-of-thought), and of the answer. The curriculum turns it into
/// a training sequence `question [<bot> latents <eot>] remaining-steps answer <eos>`; the
/// task generators produce it; evaluation checks the generated answer against `answer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReasoningExample {
    /// Question tokens (never a loss target).
    pub question: Vec<u32>,
    /// Reasoning steps, in order; each is one step's tokens (a latent curriculum replaces
    /// the first `s` of them with continuous thoughts).
    pub steps: Vec<Vec<u32>>,
    /// Answer tokens (without `<eos>`).
    pub answer: Vec<u32>,
}
