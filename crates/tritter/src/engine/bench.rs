//! The measurement behind `tritter bench`: prefill and decode throughput of any [`Engine`]
//! (CPU or GPU) at a batch size, on random or loaded weights.
//!
//! One run: a warm-up (a short prompt and two decode steps, then freed: module loading,
//! cuBLAS setup, first allocations), then `batch` new sequences each prefilled with
//! `prompt_len` random tokens in one step (prefill tokens/s = `batch * prompt_len` / that
//! step's time), one untimed decode step (the step buffers of `batch` rows are allocated
//! there), then `decode_steps` timed steps of one greedy token per sequence (decode
//! tokens/s = `batch` / mean step time). Every step returns each sequence's greedy token to
//! the host through [`Engine::step_top`] (the device selection on the GPU), as
//! [`generate_batch`](super::generate_batch) does at temperature 0, so each step is complete
//! when timed. Wall-clock time, as a user of the engine sees it.

use std::time::Instant;

use super::cpu::{LogitsFor, StepInput};
use super::kv::KvCacheOptions;
use super::traits::{Engine, EngineCache, StepOutput};
use crate::generate::{top_candidates, TopSpec};
use crate::model::SeededRng;
use crate::{Result, TritterError};

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    /// Sequences.
    pub batch: usize,
    /// Prompt tokens per sequence.
    pub prompt_len: usize,
    /// Seconds of the prefill step.
    pub prefill_s: f64,
    /// `batch * prompt_len / prefill_s`.
    pub prefill_tokens_per_s: f64,
    /// Timed decode steps.
    pub decode_steps: usize,
    /// Mean seconds per decode step.
    pub decode_step_s: f64,
    /// `batch / decode_step_s`.
    pub decode_tokens_per_s: f64,
    /// Largest value `memory` reported after the warm-up, the prefill and the decode steps
    /// (device bytes in use for a GPU engine), if it reports any.
    pub peak_memory_bytes: Option<u64>,
}

/// The greedy pick of every input of a step (`inputs.len()` of them), through
/// [`Engine::step_top`].
fn greedy_step<E: Engine>(
    engine: &E,
    cache: &mut E::Cache,
    inputs: &[StepInput<'_>],
) -> Result<Vec<u32>> {
    let greedy = TopSpec {
        k: 1,
        vocab_limit: None,
        text_only: false,
    };
    let tops = vec![Some(greedy); inputs.len()];
    engine
        .step_top(cache, inputs, &tops)?
        .into_iter()
        .map(|o| match o {
            StepOutput::Top(c) => Ok(c.ids[0]),
            StepOutput::Logits(l) => top_candidates(&l, &greedy).map(|c| c.ids[0]),
        })
        .collect()
}

/// Runs the benchmark (module docs) with a cache made from `options` (size its pool for
/// `batch` sequences of `prompt_len + decode_steps + 1` tokens). `memory` is called at the
/// measuring points (e.g. device memory in use). Random prompt ids skip the special tokens.
pub fn bench_engine<E: Engine>(
    engine: &E,
    options: &KvCacheOptions,
    batch: usize,
    prompt_len: usize,
    decode_steps: usize,
    seed: u64,
    mut memory: impl FnMut() -> Option<u64>,
) -> Result<BenchResult> {
    let cfg = engine.config();
    for (what, v) in [
        ("batch", batch),
        ("prompt_len", prompt_len),
        ("decode_steps", decode_steps),
    ] {
        if v == 0 {
            return Err(TritterError::argument(what, 0, "at least 1"));
        }
    }
    if prompt_len + decode_steps + 1 > cfg.max_position_embeddings {
        return Err(TritterError::SequenceTooLong {
            len: prompt_len + decode_steps + 1,
            max: cfg.max_position_embeddings,
        });
    }
    let specials = u64::from(crate::tokenizer::vocab::BYTE_OFFSET);
    let vocab = cfg.vocab_size as u64;
    let mut rng = SeededRng::new(seed);
    let mut prompt = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| (specials + rng.below(vocab - specials)) as u32)
            .collect()
    };
    let mut peak: Option<u64> = None;
    let mut sample = |peak: &mut Option<u64>| {
        if let Some(m) = memory() {
            *peak = Some(peak.map_or(m, |p| p.max(m)));
        }
    };

    let mut cache = engine.new_cache(options)?;
    // Warm-up.
    let warm = cache.add_sequence();
    let mut tokens = prompt(prompt_len.min(16));
    for _ in 0..3 {
        let next = greedy_step(
            engine,
            &mut cache,
            &[StepInput {
                seq: warm,
                tokens: &tokens,
                logits: LogitsFor::Last,
            }],
        )?;
        tokens = next;
    }
    cache.free(warm)?;
    sample(&mut peak);

    let seqs: Vec<_> = (0..batch).map(|_| cache.add_sequence()).collect();
    let prompts: Vec<Vec<u32>> = (0..batch).map(|_| prompt(prompt_len)).collect();
    let inputs = StepInput::batch(&seqs, &prompts, LogitsFor::Last);
    let t = Instant::now();
    let mut picks = greedy_step(engine, &mut cache, &inputs)?;
    let prefill_s = t.elapsed().as_secs_f64();
    sample(&mut peak);

    let mut decode_s = 0.0;
    for i in 0..=decode_steps {
        let next: Vec<[u32; 1]> = picks.iter().map(|&t| [t]).collect();
        let inputs = StepInput::batch(&seqs, &next, LogitsFor::Last);
        let t = Instant::now();
        picks = greedy_step(engine, &mut cache, &inputs)?;
        if i > 0 {
            decode_s += t.elapsed().as_secs_f64();
        }
    }
    sample(&mut peak);
    for s in seqs {
        cache.free(s)?;
    }
    let step_s = decode_s / decode_steps as f64;
    Ok(BenchResult {
        batch,
        prompt_len,
        prefill_s,
        prefill_tokens_per_s: (batch * prompt_len) as f64 / prefill_s,
        decode_steps,
        decode_step_s: step_s,
        decode_tokens_per_s: batch as f64 / step_s,
        peak_memory_bytes: peak,
    })
}
