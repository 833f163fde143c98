//! What generation needs from an engine, so [`generate_batch`](super::generate_batch) and
//! `tritter bench` run the same code on the [`CpuEngine`](super::CpuEngine) and the
//! GPU engine.

use super::cpu::{LogitsFor, StepInput};
use super::kv::{KvCacheOptions, SequenceId};
use crate::config::TritterConfig;
use crate::generate::{top_candidates, Candidates, TopSpec};
use crate::{Result, TritterError};

/// The sequences of an engine's KV cache.
pub trait EngineCache {
    /// Starts an empty sequence.
    fn add_sequence(&mut self) -> SequenceId;
    /// Tokens stored for `seq` (its next position).
    fn len(&self, seq: SequenceId) -> Result<usize>;
    /// Frees `seq` and its pages.
    fn free(&mut self, seq: SequenceId) -> Result<()>;
}

/// A model that appends tokens to cached sequences and returns their logits.
pub trait Engine {
    /// Its KV cache.
    type Cache: EngineCache;
    /// The model config.
    fn config(&self) -> &TritterConfig;
    /// An empty cache.
    fn new_cache(&self, options: &KvCacheOptions) -> Result<Self::Cache>;
    /// Appends each input's tokens to its sequence and returns its logits (`(V,)` for
    /// [`LogitsFor::Last`](super::LogitsFor::Last), `(n, V)` for `All`), in input order.
    /// Inputs are validated before the cache changes.
    fn step(&self, cache: &mut Self::Cache, inputs: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>>;

    /// [`step`](Self::step) for inputs that all want [`LogitsFor::Last`], returning for input
    /// `i` its sampling candidates when `tops[i]` is given (the `k` best ids under the
    /// spec's filter, [`top_candidates`]) and its logits otherwise. An engine may answer a
    /// spec with the logits instead (the GPU engine does for `k > 64`), so callers handle
    /// both. An input whose prompt does not end in this step gets empty logits, as from
    /// `step`.
    ///
    /// Why: a sampler needs only the top few logits of a row; the GPU engine selects them on
    /// the device and copies `k` pairs per sequence to the host instead of `V` logits (8 MB
    /// per step at batch 32, V = 65536). This default runs `step` and selects on the host.
    fn step_top(
        &self,
        cache: &mut Self::Cache,
        inputs: &[StepInput<'_>],
        tops: &[Option<TopSpec>],
    ) -> Result<Vec<StepOutput>> {
        check_top_inputs(inputs, tops)?;
        let logits = self.step(cache, inputs)?;
        logits
            .into_iter()
            .zip(tops)
            .map(|(l, t)| match t {
                Some(spec) if !l.is_empty() => top_candidates(&l, spec).map(StepOutput::Top),
                _ => Ok(StepOutput::Logits(l)),
            })
            .collect()
    }
}

/// What [`Engine::step_top`] returns for one input.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutput {
    /// The row's logits `(V,)` (empty when the input's prompt continues next step).
    Logits(Vec<f32>),
    /// The row's best candidates, best first.
    Top(Candidates),
}

impl Default for StepOutput {
    fn default() -> Self {
        StepOutput::Logits(Vec::new())
    }
}

/// `step_top`'s preconditions: one spec slot per input, and a spec only on an input that
/// wants its last row (`LogitsFor::Last`) with `k >= 1`.
pub(crate) fn check_top_inputs(inputs: &[StepInput<'_>], tops: &[Option<TopSpec>]) -> Result<()> {
    if tops.len() != inputs.len() {
        return Err(TritterError::ShapeMismatch {
            what: "top-candidate specs of a step".into(),
            actual: vec![tops.len()],
            expected: format!("one per input ({})", inputs.len()),
        });
    }
    for (i, (inp, t)) in inputs.iter().zip(tops).enumerate() {
        if inp.logits != LogitsFor::Last {
            return Err(TritterError::argument(
                "logits",
                format!("{:?} for input {i}", inp.logits),
                "LogitsFor::Last for every input of step_top",
            ));
        }
        if let Some(spec) = t {
            if spec.k == 0 {
                return Err(TritterError::argument(
                    "k",
                    format!("0 for input {i}"),
                    "at least one candidate",
                ));
            }
        }
    }
    Ok(())
}

impl EngineCache for super::KvCache {
    fn add_sequence(&mut self) -> SequenceId {
        super::KvCache::add_sequence(self)
    }
    fn len(&self, seq: SequenceId) -> Result<usize> {
        super::KvCache::len(self, seq)
    }
    fn free(&mut self, seq: SequenceId) -> Result<()> {
        super::KvCache::free(self, seq)
    }
}

impl Engine for super::CpuEngine {
    type Cache = super::KvCache;
    fn config(&self) -> &TritterConfig {
        super::CpuEngine::config(self)
    }
    fn new_cache(&self, options: &KvCacheOptions) -> Result<super::KvCache> {
        super::CpuEngine::new_cache(self, options)
    }
    fn step(&self, cache: &mut super::KvCache, inputs: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>> {
        super::CpuEngine::step(self, cache, inputs)
    }
}
