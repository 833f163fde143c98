//! Sampling ([`SamplingOptions`], [`sample_token_in_context`]) and the reference decoding
//! loop: every new token re-runs the candle model over the last `max_position_embeddings`
//! input embeddings. The CPU inference engine ([`crate::engine`]) samples with the same
//! function from its KV cache; this loop stays as the oracle and for continuous thought.
//!
//! With `latent_steps > 0` the prompt is followed by `<bot>`, that many continuous thoughts
//! (the last final hidden state, through the optional latent projection, appended as the
//! next input embedding without sampling, as in Coconut) and `<eot>`, then tokens are
//! sampled as usual.

use std::collections::BinaryHeap;

use candle_core::{DType, Tensor};

use crate::model::{MaskSpec, SeededRng};
use crate::paradigm::LatentMarkers;
use crate::tokenizer::vocab::NUM_SPECIAL_TOKENS;
use crate::tokenizer::SpecialToken;
use crate::{Result, TritterError, TritterModel};

/// Sampling settings, shared by the reference loop ([`generate`]) and the CPU engine
/// ([`crate::engine::generate_batch`]).
///
/// The stop lists are borrowed (`'a`) so that the options stay `Copy`, which callers rely
/// on (`SamplingOptions { temperature: 0.0, ..opts }` keeps `opts` usable).
///
/// Order of operations per token: repetition penalty on the logits, candidate filter
/// (`vocab_limit`, `text_only`), candidates in order (logit descending, ties by the lower
/// id), greedy pick at temperature 0, else top-k, softmax at `temperature`, top-p, one
/// uniform draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions<'a> {
    /// New tokens to generate at most.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Seed of the sampler.
    pub seed: u64,
    /// Stop after generating `<eos>`.
    pub stop_at_eos: bool,
    /// Never sample ids `>= vocab_limit` (e.g. 264 for a byte-level tokenizer, whose BPE
    /// and media ids would not decode); `None`: the whole vocabulary.
    pub vocab_limit: Option<u32>,
    /// Never sample the special and modality ids other than `<eos>` (`<pad>`, `<bos>`,
    /// `<image>`, `<audio>`, ...): a text continuation cannot render them, and a sampled
    /// `<image>` would make the following bytes read as an image header. The latent markers
    /// `<bot>`/`<eot>` (the top two ids of a vocab >= 266) are excluded too.
    pub text_only: bool,
    /// Continuous-thought steps between the prompt and the sampled tokens (`<bot>`, the
    /// thoughts, `<eot>`); 0 samples straight after the prompt. Needs a vocab >= 266.
    /// Only the reference loop ([`generate`]) runs them.
    pub latent_steps: usize,
    /// Nucleus sampling (Holtzman et al. 2020): after top-k, keep the smallest prefix of the
    /// candidates (most likely first, ties by the lower id) whose softmax probabilities sum
    /// to at least `top_p`, in `(0, 1]`; 1 keeps all (off). A tiny `top_p` keeps only the
    /// most likely token, i.e. greedy.
    pub top_p: f64,
    /// CTRL repetition penalty `θ > 0` (Keskar et al. 2019): the logit of every id in the
    /// context (prompt and generated tokens) is divided by `θ` when positive and multiplied
    /// by `θ` otherwise, before anything else; 1 is off, `θ > 1` discourages repeats.
    pub repetition_penalty: f32,
    /// Token ids that end generation when generated (like `<eos>` with `stop_at_eos`); the
    /// stop token is the last returned token.
    pub stop_tokens: &'a [u32],
    /// Token sequences that end generation when the generated tokens (not the prompt) end
    /// with one of them; the sequence is included in the returned tokens.
    pub stop_sequences: &'a [Vec<u32>],
}

impl Default for SamplingOptions<'_> {
    fn default() -> Self {
        SamplingOptions {
            max_new_tokens: 200,
            temperature: 0.8,
            top_k: 40,
            seed: 0,
            stop_at_eos: true,
            vocab_limit: None,
            text_only: false,
            latent_steps: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            stop_tokens: &[],
            stop_sequences: &[],
        }
    }
}

/// Why a generation stopped before `max_new_tokens` (see [`SamplingOptions::stop_reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `<eos>` was generated and `stop_at_eos` is set.
    Eos,
    /// This id of `stop_tokens` was generated.
    StopToken(u32),
    /// The generated tokens end with `stop_sequences[i]`.
    StopSequence(usize),
}

impl SamplingOptions<'_> {
    /// Checks the ranges of `top_p` (`(0, 1]`) and `repetition_penalty` (finite, `> 0`), and
    /// that no stop sequence is empty.
    pub fn validate(&self) -> Result<()> {
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(TritterError::argument(
                "top_p",
                self.top_p,
                "expected a probability in (0, 1] (1 turns nucleus sampling off)",
            ));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(TritterError::argument(
                "repetition_penalty",
                self.repetition_penalty,
                "expected a finite value > 0 (1 turns the penalty off)",
            ));
        }
        if let Some(i) = self.stop_sequences.iter().position(Vec::is_empty) {
            return Err(TritterError::argument(
                "stop_sequences",
                format!("an empty sequence at index {i}"),
                "expected sequences of at least one token",
            ));
        }
        Ok(())
    }

    /// Whether the tokens generated so far end generation, and why: the last token is
    /// `<eos>` (with `stop_at_eos`) or a stop token, or they end with a stop sequence.
    pub fn stop_reason(&self, generated: &[u32]) -> Option<StopReason> {
        let &last = generated.last()?;
        if self.stop_at_eos && last == SpecialToken::Eos.id() {
            return Some(StopReason::Eos);
        }
        if self.stop_tokens.contains(&last) {
            return Some(StopReason::StopToken(last));
        }
        self.stop_sequences
            .iter()
            .position(|s| !s.is_empty() && generated.ends_with(s))
            .map(StopReason::StopSequence)
    }
}

/// Picks a token from `logits` (one row, `V` values): greedy at temperature 0, else a draw
/// from `softmax(logits / temperature)` restricted to the `top_k` largest (ties broken by
/// the lower id) and the `top_p` nucleus, among ids below `vocab_limit` (and, with
/// `text_only`, text ids and `<eos>`). No context, so the repetition penalty has nothing to
/// penalize: [`sample_token_in_context`] applies it.
pub fn sample_token(
    logits: &[f32],
    options: &SamplingOptions<'_>,
    rng: &mut SeededRng,
) -> Result<u32> {
    sample_token_in_context(logits, &[], options, rng)
}

/// [`sample_token`] after the repetition penalty over the ids of `context` (the prompt and
/// the tokens generated so far; ids outside the vocabulary are ignored). Draws one uniform
/// from `rng` unless the pick is greedy, so a seed gives the same tokens as before these
/// options existed when they are left at their defaults.
///
/// Cost: O(V) for greedy and top-k sampling (a selection of the `k` best, then a sort of
/// those `k`), O(V log V) only with `top_k = 0` at a positive temperature, where every id is
/// a candidate. (A full sort per token took 3.5 ms at V = 65536, more than a 7B decode step
/// on the GPU.)
pub fn sample_token_in_context(
    logits: &[f32],
    context: &[u32],
    options: &SamplingOptions<'_>,
    rng: &mut SeededRng,
) -> Result<u32> {
    options.validate()?;
    // top_candidates refuses non-finite logits (the penalty keeps NaN and the infinities
    // where they are, so the error names the same index and value).
    let penalized;
    let logits = if options.repetition_penalty != 1.0 && !context.is_empty() {
        penalized = repetition_penalized(logits, context, options.repetition_penalty);
        &penalized[..]
    } else {
        logits
    };
    let candidates = top_candidates(logits, &options.top_spec(logits.len()))?;
    sample_from_candidates(&candidates, options, rng)
}

/// The candidates a sampler draws from, best first: `ids[i]` with logit `logits[i]`, in
/// the sampler's order (logit descending, ties by the lower id). [`top_candidates`] makes
/// them on the host; the GPU engine makes them on the device
/// ([`Engine::step_top`](crate::engine::Engine::step_top)), so that a decode step sends
/// `k` pairs per sequence to the host instead of `V` logits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Candidates {
    /// Token ids, best first (`(k,)`).
    pub ids: Vec<u32>,
    /// Their logits (`(k,)`), non-increasing.
    pub logits: Vec<f32>,
}

/// Which candidates a sampler needs: the `k` best ids (sampler order) among those that
/// pass the filter of [`SamplingOptions`] (`vocab_limit`, `text_only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopSpec {
    /// How many, `>= 1` (fewer come back when fewer ids pass the filter).
    pub k: usize,
    /// Only ids below this (clamped to `1..=V`; `None`: the whole vocabulary).
    pub vocab_limit: Option<u32>,
    /// Only text ids and `<eos>`: not the other special ids, not the latent markers.
    pub text_only: bool,
}

impl TopSpec {
    /// The number of ids, `1..=v`, below the vocab limit of a vocabulary of `v` ids.
    pub fn limit(&self, v: usize) -> usize {
        self.vocab_limit
            .map_or(v, |l| (l as usize).clamp(1, v.max(1)))
    }

    /// Whether id `i` of a vocabulary of `v` ids passes the filter (the GPU engine's
    /// top-candidates kernel implements the same predicate).
    pub fn admits(&self, i: usize, v: usize) -> bool {
        self.filter(v)(i)
    }

    /// [`admits`](Self::admits) for a vocabulary of `v` ids, with the markers looked up once.
    fn filter(&self, v: usize) -> impl Fn(usize) -> bool {
        let n = self.limit(v);
        let text_only = self.text_only;
        let markers = LatentMarkers::new(v).ok();
        let eos = SpecialToken::Eos.id() as usize;
        move |i| {
            i < n
                && (!text_only
                    || i == eos
                    || (i >= NUM_SPECIAL_TOKENS as usize
                        && !markers.is_some_and(|m| m.is_marker(i as u32))))
        }
    }
}

impl SamplingOptions<'_> {
    /// The candidates sampling needs from a row of `v` logits: the best one when greedy,
    /// the `top_k` best, or every admitted id (`k = v`) with `top_k = 0`.
    pub fn top_spec(&self, v: usize) -> TopSpec {
        let k = if self.temperature.is_nan() || self.temperature <= 0.0 {
            1
        } else if self.top_k == 0 {
            v.max(1)
        } else {
            self.top_k
        };
        TopSpec {
            k,
            vocab_limit: self.vocab_limit,
            text_only: self.text_only,
        }
    }
}

/// The `spec.k` best ids of `logits` (one row, `(V,)`) that pass `spec`'s filter, best
/// first (logit descending, ties by the lower id). Errors on an empty row, a non-finite
/// logit anywhere in the row, or a filter that admits no id. O(V + k log k).
pub fn top_candidates(logits: &[f32], spec: &TopSpec) -> Result<Candidates> {
    let v = logits.len();
    if v == 0 {
        return Err(TritterError::ShapeMismatch {
            what: "logits".into(),
            actual: vec![0],
            expected: "(V,) with V >= 1".into(),
        });
    }
    if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
        return Err(TritterError::ShapeMismatch {
            what: format!("logits ({} at index {i})", logits[i]),
            actual: vec![v],
            expected: "finite values".into(),
        });
    }
    let n = spec.limit(v);
    let admits = spec.filter(v);
    // Sampler order: `a` before `b` is Less.
    let before = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let k = spec.k.max(1);
    let mut order: Vec<usize> = if k == 1 {
        (0..n)
            .filter(|&i| admits(i))
            .min_by(before)
            .into_iter()
            .collect()
    } else if k <= n / 16 {
        // Few wanted: one pass keeping the k best in a heap whose top is the worst of them,
        // so most ids cost one comparison.
        let mut heap: BinaryHeap<Ranked<'_>> = BinaryHeap::with_capacity(k + 1);
        for i in (0..n).filter(|&i| admits(i)) {
            let r = Ranked { logits, i };
            if heap.len() < k {
                heap.push(r);
            } else if let Some(mut worst) = heap.peek_mut() {
                if r < *worst {
                    *worst = r;
                }
            }
        }
        heap.into_iter().map(|r| r.i).collect()
    } else {
        (0..n).filter(|&i| admits(i)).collect()
    };
    if order.is_empty() {
        return Err(no_candidates(n));
    }
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, before);
        order.truncate(k);
    }
    order.sort_unstable_by(before);
    Ok(Candidates {
        ids: order.iter().map(|&i| i as u32).collect(),
        logits: order.iter().map(|&i| logits[i]).collect(),
    })
}

/// The error of a filter that admits no id below the limit `n`.
pub(crate) fn no_candidates(n: usize) -> TritterError {
    TritterError::ShapeMismatch {
        what: "sampling candidates".into(),
        actual: vec![0],
        expected: format!("at least one id below vocab_limit {n} that is text or <eos>"),
    }
}

/// An id of a row of logits, ordered as the sampler walks them (`Less` comes first: the
/// larger logit, ties by the lower id), so a max-heap of them has the worst on top.
struct Ranked<'a> {
    logits: &'a [f32],
    i: usize,
}

impl Ord for Ranked<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.logits[other.i]
            .total_cmp(&self.logits[self.i])
            .then(self.i.cmp(&other.i))
    }
}

impl PartialOrd for Ranked<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.i == other.i
    }
}

impl Eq for Ranked<'_> {}

/// Picks a token from `candidates` (from [`top_candidates`] with
/// [`options.top_spec`](SamplingOptions::top_spec), or any longer prefix of the same
/// order) as [`sample_token_in_context`] does: the first when greedy, else one uniform draw
/// from the softmax at `temperature` of the `top_k` first, cut to the `top_p` nucleus. The
/// repetition penalty is not applied here (it changes the logits before the selection).
pub fn sample_from_candidates(
    candidates: &Candidates,
    options: &SamplingOptions<'_>,
    rng: &mut SeededRng,
) -> Result<u32> {
    options.validate()?;
    let Candidates { ids, logits } = candidates;
    if ids.is_empty() || ids.len() != logits.len() {
        return Err(TritterError::ShapeMismatch {
            what: "sampling candidates (ids, logits)".into(),
            actual: vec![ids.len(), logits.len()],
            expected: "as many logits as ids, at least one".into(),
        });
    }
    if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
        return Err(TritterError::ShapeMismatch {
            what: format!("candidate logits ({} at index {i})", logits[i]),
            actual: vec![logits.len()],
            expected: "finite values".into(),
        });
    }
    if options.temperature.is_nan() || options.temperature <= 0.0 {
        return Ok(ids[0]);
    }
    let k = if options.top_k == 0 {
        ids.len()
    } else {
        options.top_k.min(ids.len())
    };
    let max = f64::from(logits[0]);
    let mut weights: Vec<f64> = logits[..k]
        .iter()
        .map(|&l| ((f64::from(l) - max) / options.temperature).exp())
        .collect();
    if options.top_p < 1.0 {
        let total: f64 = weights.iter().sum();
        let mut cumulative = 0.0;
        let keep = weights
            .iter()
            .position(|w| {
                cumulative += w;
                cumulative >= options.top_p * total
            })
            .map_or(weights.len(), |i| i + 1);
        weights.truncate(keep);
    }
    let kept = &ids[..weights.len()];
    let total: f64 = weights.iter().sum();
    let mut r = rng.uniform() * total;
    for (&i, w) in kept.iter().zip(&weights) {
        if r < *w {
            return Ok(i);
        }
        r -= w;
    }
    Ok(kept[kept.len() - 1])
}

/// `logits` with the CTRL penalty `theta` applied once to every distinct id of `context`.
fn repetition_penalized(logits: &[f32], context: &[u32], theta: f32) -> Vec<f32> {
    let mut out = logits.to_vec();
    let mut seen = vec![false; logits.len()];
    for &id in context {
        let i = id as usize;
        if i < out.len() && !seen[i] {
            seen[i] = true;
            out[i] = if out[i] > 0.0 {
                out[i] / theta
            } else {
                out[i] * theta
            };
        }
    }
    out
}

/// Continues `prompt` (token ids, at least one) by up to `options.max_new_tokens` sampled
/// tokens; returns only the new tokens (ending with `<eos>` if it was sampled and
/// `stop_at_eos` is set, or with a stop token or stop sequence of the options). With `latent_steps > 0` the context is `prompt <bot>`, the
/// thoughts and `<eot>` before the first sampled token; the markers are not returned.
pub fn generate(
    model: &TritterModel,
    prompt: &[u32],
    options: &SamplingOptions<'_>,
) -> Result<Vec<u32>> {
    options.validate()?;
    let mut rng = SeededRng::new(options.seed);
    let mut context = prompt.to_vec();
    generate_until(
        model,
        prompt,
        options.latent_steps,
        options.max_new_tokens,
        |generated| options.stop_reason(generated).is_some(),
        |_, logits| {
            let next = sample_token_in_context(logits, &context, options, &mut rng)?;
            context.push(next);
            Ok(next)
        },
    )
}

/// The decoding loop of [`generate`] with the choice of each token left to `pick`, which
/// gets the final hidden state `(1, 1, H)` of the last position and its logits `(V,)`
/// (greedy, sampling, or rounding the predicted embedding as the paradigm's evaluation
/// does). Returns the new tokens, up to `max_new_tokens`, ending at `<eos>` when
/// `stop_at_eos`.
pub(crate) fn generate_with(
    model: &TritterModel,
    prompt: &[u32],
    latent_steps: usize,
    max_new_tokens: usize,
    stop_at_eos: bool,
    pick: impl FnMut(&Tensor, &[f32]) -> Result<u32>,
) -> Result<Vec<u32>> {
    let eos = SpecialToken::Eos.id();
    generate_until(
        model,
        prompt,
        latent_steps,
        max_new_tokens,
        |generated| stop_at_eos && generated.last() == Some(&eos),
        pick,
    )
}

/// [`generate_with`] with the end of generation decided by `stop`, which sees the tokens
/// generated so far after each pick.
fn generate_until(
    model: &TritterModel,
    prompt: &[u32],
    latent_steps: usize,
    max_new_tokens: usize,
    stop: impl Fn(&[u32]) -> bool,
    mut pick: impl FnMut(&Tensor, &[f32]) -> Result<u32>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(TritterError::ShapeMismatch {
            what: "prompt".into(),
            actual: vec![0],
            expected: "at least one token (e.g. <code> or <text>)".into(),
        });
    }
    let max_len = model.config().max_position_embeddings;
    let mask = MaskSpec::from_config(model.config());
    // The context as input embeddings (1, n, H): token rows, and hidden states for thoughts.
    let tokens =
        |ids: &[u32]| model.embed(&Tensor::from_slice(ids, (1, ids.len()), model.device())?);
    // Final hidden state (1, 1, H) of the last position, over the last `max_len` positions.
    let last_hidden = |context: &Tensor| -> Result<Tensor> {
        let n = context.dim(1)?;
        let l = n.min(max_len);
        let window = context.narrow(1, n - l, l)?;
        let h = model.forward_hidden(&window, &model.default_positions(1, l)?, &mask)?;
        Ok(h.narrow(1, l - 1, 1)?)
    };
    let mut context = tokens(prompt)?;
    if latent_steps > 0 {
        let markers = LatentMarkers::from_config(model.config())?;
        context = Tensor::cat(&[&context, &tokens(&[markers.bot])?], 1)?;
        for _ in 0..latent_steps {
            let last = last_hidden(&context)?;
            context = Tensor::cat(&[&context, &model.latent_embedding(&last)?], 1)?;
        }
        context = Tensor::cat(&[&context, &tokens(&[markers.eot])?], 1)?;
    }
    let mut out = Vec::with_capacity(max_new_tokens);
    for _ in 0..max_new_tokens {
        let last = last_hidden(&context)?;
        let logits = model
            .logits(&last)? // (1, 1, V)
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let next = pick(&last, &logits)?;
        out.push(next);
        if stop(&out) {
            break;
        }
        context = Tensor::cat(&[&context, &tokens(&[next])?], 1)?;
    }
    Ok(out)
}
