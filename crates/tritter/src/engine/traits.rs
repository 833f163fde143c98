//! What generation needs from an engine, so [`generate_batch`](super::generate_batch) and
//! `tritter bench` run the same code on the [`CpuEngine`](super::CpuEngine) and the
//! GPU engine.

use super::cpu::StepInput;
use super::kv::{KvCacheOptions, SequenceId};
use crate::config::TritterConfig;
use crate::Result;

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
