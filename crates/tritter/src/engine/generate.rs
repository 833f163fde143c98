//! Generation on an [`Engine`] (the [`CpuEngine`](super::CpuEngine) or the GPU engine): many prompts at once with continuous batching, a
//! streaming callback, and the sampling of [`crate::generate`].
//!
//! Scheduling ([`generate_batch`]): requests wait in order; up to
//! `KvCacheOptions::max_sequences` of them run at once. Every step feeds each running
//! sequence either its next prompt chunk (at most `max_prefill_chunk` tokens) or its last
//! sampled token, in one [`Engine::step`]; a sequence whose prompt is consumed samples a
//! token from its logits, reports it to the callback and either continues or finishes
//! (stop token or sequence, `max_new_tokens`, the end of the position range, or the
//! callback's `Break`). Finished sequences leave the batch and free their cache at once,
//! and waiting requests join in the same step.
//!
//! Determinism: each request samples with its own generator seeded by its
//! `options.seed`, and the engine's logits of a row do not depend on the other rows of a
//! step, so a request gets the same tokens alone or in any batch.

use std::ops::ControlFlow;

use super::cpu::{LogitsFor, StepInput};
use super::kv::{KvCacheOptions, SequenceId};
use super::traits::{Engine, EngineCache, StepOutput};
use crate::generate::{
    sample_from_candidates, sample_token_in_context, SamplingOptions, StopReason, TopSpec,
};
use crate::model::{check_token_ids, SeededRng};
use crate::{Result, TritterError};

/// One prompt to continue and how.
#[derive(Debug, Clone, Copy)]
pub struct GenerationRequest<'a> {
    /// Token ids of the prompt (at least one, all below `vocab_size`, at most
    /// `max_position_embeddings`).
    pub prompt: &'a [u32],
    /// Sampling, stop conditions and seed of this request (`latent_steps` must be 0).
    pub options: SamplingOptions<'a>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `<eos>`, a stop token or a stop sequence (the last returned tokens).
    Stop(StopReason),
    /// `max_new_tokens` tokens were generated.
    MaxTokens,
    /// The sequence reached `max_position_embeddings` positions.
    ContextFull,
    /// The streaming callback returned `ControlFlow::Break` after the last token.
    Cancelled,
}

/// The result of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The generated tokens (the prompt excluded).
    pub tokens: Vec<u32>,
    /// Why generation ended.
    pub finish: FinishReason,
}

/// A token as it is generated, for the streaming callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEvent {
    /// Index of the request in the slice given to [`generate_batch`].
    pub request: usize,
    /// The token id.
    pub token: u32,
    /// Its index among the request's generated tokens.
    pub index: usize,
}

/// A running request.
struct Active {
    request: usize,
    seq: SequenceId,
    /// Tokens to feed next (the rest of the prompt, or the last sampled token).
    pending: Vec<u32>,
    /// Prompt and generated tokens (the repetition penalty's context).
    context: Vec<u32>,
    generated: Vec<u32>,
    rng: SeededRng,
}

/// Generates a continuation of every request with continuous batching (module docs);
/// `on_token` sees every token as it is sampled and may end its request with
/// `ControlFlow::Break(())`. Returns one [`Generation`] per request, in request order.
///
/// All requests are validated before anything runs (options, prompt ids and lengths;
/// `latent_steps > 0` is refused: continuous thoughts run on the reference loop,
/// [`crate::generate::generate`]).
pub fn generate_batch<E: Engine>(
    engine: &E,
    requests: &[GenerationRequest<'_>],
    cache_options: &KvCacheOptions,
    mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<Vec<Generation>> {
    let cfg = engine.config();
    for (i, r) in requests.iter().enumerate() {
        r.options.validate()?;
        if r.options.latent_steps > 0 {
            return Err(TritterError::argument(
                "latent_steps",
                r.options.latent_steps,
                "0 on the inference engine (continuous thoughts run on the reference loop: tritter generate --reference)",
            ));
        }
        if r.prompt.is_empty() {
            return Err(TritterError::ShapeMismatch {
                what: format!("prompt of request {i}"),
                actual: vec![0],
                expected: "at least one token (e.g. <code> or <text>)".into(),
            });
        }
        check_token_ids(r.prompt, i, cfg.vocab_size)?;
        if r.prompt.len() > cfg.max_position_embeddings {
            return Err(TritterError::SequenceTooLong {
                len: r.prompt.len(),
                max: cfg.max_position_embeddings,
            });
        }
    }
    let mut cache = engine.new_cache(cache_options)?;
    let max_batch = cache_options.max_sequences.max(1);
    let chunk = cache_options.max_prefill_chunk.max(1);
    let mut results: Vec<Option<Generation>> = vec![None; requests.len()];
    let mut active: Vec<Active> = Vec::new();
    let mut next = 0;
    loop {
        while active.len() < max_batch && next < requests.len() {
            let r = &requests[next];
            if r.options.max_new_tokens == 0 {
                results[next] = Some(Generation {
                    tokens: Vec::new(),
                    finish: FinishReason::MaxTokens,
                });
            } else {
                active.push(Active {
                    request: next,
                    seq: cache.add_sequence(),
                    pending: r.prompt.to_vec(),
                    context: r.prompt.to_vec(),
                    generated: Vec::new(),
                    rng: SeededRng::new(r.options.seed),
                });
            }
            next += 1;
        }
        if active.is_empty() {
            break;
        }
        let fed: Vec<usize> = active.iter().map(|a| a.pending.len().min(chunk)).collect();
        // What each sampler needs from the step: its top candidates (the GPU engine
        // selects them on the device), or the whole row when the repetition penalty changes
        // the logits first; a prompt that continues needs nothing, so the cheapest: one id.
        let tops: Vec<Option<TopSpec>> = active
            .iter()
            .zip(&fed)
            .map(|(a, &n)| {
                let options = &requests[a.request].options;
                if n < a.pending.len() {
                    Some(TopSpec {
                        k: 1,
                        vocab_limit: None,
                        text_only: false,
                    })
                } else if options.repetition_penalty == 1.0 {
                    Some(options.top_spec(cfg.vocab_size))
                } else {
                    None
                }
            })
            .collect();
        let outputs = {
            let inputs: Vec<StepInput<'_>> = active
                .iter()
                .zip(&fed)
                .map(|(a, &n)| StepInput {
                    seq: a.seq,
                    tokens: &a.pending[..n],
                    logits: LogitsFor::Last,
                })
                .collect();
            engine.step_top(&mut cache, &inputs, &tops)?
        };
        let mut finished = Vec::new();
        for (i, ((a, output), n)) in active.iter_mut().zip(outputs).zip(fed).enumerate() {
            a.pending.drain(..n);
            if !a.pending.is_empty() {
                continue; // the prompt continues next step
            }
            let options = &requests[a.request].options;
            let token = match output {
                StepOutput::Top(c) => sample_from_candidates(&c, options, &mut a.rng)?,
                StepOutput::Logits(l) => {
                    sample_token_in_context(&l, &a.context, options, &mut a.rng)?
                }
            };
            a.generated.push(token);
            a.context.push(token);
            let flow = on_token(&TokenEvent {
                request: a.request,
                token,
                index: a.generated.len() - 1,
            });
            let finish = if let Some(reason) = options.stop_reason(&a.generated) {
                Some(FinishReason::Stop(reason))
            } else if flow.is_break() {
                Some(FinishReason::Cancelled)
            } else if a.generated.len() >= options.max_new_tokens {
                Some(FinishReason::MaxTokens)
            } else if cache.len(a.seq)? >= cfg.max_position_embeddings {
                Some(FinishReason::ContextFull)
            } else {
                a.pending.push(token);
                None
            };
            if let Some(f) = finish {
                finished.push((i, f));
            }
        }
        for (i, finish) in finished.into_iter().rev() {
            let a = active.remove(i);
            cache.free(a.seq)?;
            results[a.request] = Some(Generation {
                tokens: a.generated,
                finish,
            });
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every request finishes"))
        .collect())
}

/// One prompt: [`generate_batch`] with a single request, `on_token` called with each token
/// id as it is generated (`ControlFlow::Break(())` stops).
pub fn generate_stream<E: Engine>(
    engine: &E,
    prompt: &[u32],
    options: &SamplingOptions<'_>,
    cache_options: &KvCacheOptions,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Generation> {
    let request = GenerationRequest {
        prompt,
        options: *options,
    };
    let mut out = generate_batch(engine, &[request], cache_options, |e| on_token(e.token))?;
    Ok(out.pop().expect("one request, one generation"))
}
