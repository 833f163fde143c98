//! Simple sampling from the reference model (until the inference engine with its INT4 KV
//! cache lands): every new token re-runs the forward pass over the last
//! `max_position_embeddings` input embeddings, then samples with temperature and top-k.
//!
//! With `latent_steps > 0` the prompt is followed by `<bot>`, that many continuous thoughts
//! (the last final hidden state, through the optional latent projection, appended as the
//! next input embedding without sampling, as in Coconut) and `<eot>`, then tokens are
//! sampled as usual.

use candle_core::{DType, Tensor};

use crate::model::{MaskSpec, SeededRng};
use crate::paradigm::LatentMarkers;
use crate::tokenizer::vocab::NUM_SPECIAL_TOKENS;
use crate::tokenizer::SpecialToken;
use crate::{Result, TritterError, TritterModel};

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions {
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
    pub latent_steps: usize,
}

impl Default for SamplingOptions {
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
        }
    }
}

/// Picks a token from `logits` (one row, `V` values): greedy at temperature 0, else a draw
/// from `softmax(logits / temperature)` restricted to the `top_k` largest (ties broken by
/// the lower id), among ids below `vocab_limit` (and, with `text_only`, text ids and `<eos>`).
pub fn sample_token(logits: &[f32], options: &SamplingOptions, rng: &mut SeededRng) -> Result<u32> {
    if logits.is_empty() {
        return Err(TritterError::ShapeMismatch {
            what: "logits".into(),
            actual: vec![0],
            expected: "(V,) with V >= 1".into(),
        });
    }
    if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
        return Err(TritterError::ShapeMismatch {
            what: format!("logits ({} at index {i})", logits[i]),
            actual: vec![logits.len()],
            expected: "finite values".into(),
        });
    }
    let n = options
        .vocab_limit
        .map_or(logits.len(), |l| (l as usize).clamp(1, logits.len()));
    let eos = SpecialToken::Eos.id() as usize;
    let markers = LatentMarkers::new(logits.len()).ok();
    let is_marker = |i: usize| markers.is_some_and(|m| m.is_marker(i as u32));
    let mut order: Vec<usize> = (0..n)
        .filter(|&i| {
            !options.text_only || i == eos || (i >= NUM_SPECIAL_TOKENS as usize && !is_marker(i))
        })
        .collect();
    if order.is_empty() {
        return Err(TritterError::ShapeMismatch {
            what: "sampling candidates".into(),
            actual: vec![0],
            expected: format!("at least one id below vocab_limit {n} that is text or <eos>"),
        });
    }
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if options.temperature.is_nan() || options.temperature <= 0.0 {
        return Ok(order[0] as u32);
    }
    let k = if options.top_k == 0 {
        order.len()
    } else {
        options.top_k.min(order.len())
    };
    let kept = &order[..k];
    let max = f64::from(logits[kept[0]]);
    let weights: Vec<f64> = kept
        .iter()
        .map(|&i| ((f64::from(logits[i]) - max) / options.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut r = rng.uniform() * total;
    for (&i, w) in kept.iter().zip(&weights) {
        if r < *w {
            return Ok(i as u32);
        }
        r -= w;
    }
    Ok(kept[k - 1] as u32)
}

/// Continues `prompt` (token ids, at least one) by up to `options.max_new_tokens` sampled
/// tokens; returns only the new tokens (ending with `<eos>` if it was sampled and
/// `stop_at_eos` is set). With `latent_steps > 0` the context is `prompt <bot>`, the
/// thoughts and `<eot>` before the first sampled token; the markers are not returned.
pub fn generate(
    model: &TritterModel,
    prompt: &[u32],
    options: &SamplingOptions,
) -> Result<Vec<u32>> {
    let mut rng = SeededRng::new(options.seed);
    generate_with(
        model,
        prompt,
        options.latent_steps,
        options.max_new_tokens,
        options.stop_at_eos,
        |_, logits| sample_token(logits, options, &mut rng),
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
        if stop_at_eos && next == SpecialToken::Eos.id() {
            break;
        }
        context = Tensor::cat(&[&context, &tokens(&[next])?], 1)?;
    }
    Ok(out)
}
