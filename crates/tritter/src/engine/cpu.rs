//! [`CpuEngine`]: the Tritter forward pass on packed ternary weights with ternary-gemm's CPU
//! kernels, a KV cache and plain-Rust attention; the same model as the candle reference
//! ([`crate::TritterModel`]), checked against it in `tests/engine.rs`.
//!
//! Per round (one or more sequences, each appending `n_b` tokens; rows stacked into
//! `(N, H)` with `N = Σ n_b`):
//! * embedding rows (bf16 -> f32; `<pad>` embeds to zero as in the reference, unless the
//!   architecture looks every id up: [`Architecture::zero_pad_embedding`](super::Architecture));
//! * per layer, every BitLinear as the reference computes it: per-token absmax int8
//!   quantization of its input ([`absmax_quantize_rows`], the same rounding as the candle
//!   fake quantization) and the exact integer product with the ternary codes, scaled by
//!   `gamma / s` ([`ternary_matmul_a8`]); the Chameleon MLP runs as the fused
//!   [`ternary_gemm::TernaryMlp`];
//! * QK-Norm over each head, RoPE at each row's position (the reference's own tables and
//!   rotation, [`Rope::cos_sin`], [`Rope::rotate_half_in_place`]), then attention per
//!   `(row, query head)` in parallel (rayon): scores against the keys stored before the round
//!   and the round's own keys, masked by the reference's rule ([`MaskSpec::visible`]: causal,
//!   window, sinks), softmax in f32, GQA by `kv_head = head / (Hq / Hkv)`;
//! * the final norm and the LM head (bf16 table, f32 accumulation) only for the rows whose
//!   logits are wanted.
//!
//! Every row's result is independent of the other rows of the round (per-row quantization,
//! exact integer products, per-sequence attention with keys in ascending position order),
//! so a sequence gets bit-identical logits alone or in any batch; and since attention sees
//! every key as the cache stores it (the round's own keys rounded the same way), a prompt
//! gives bit-identical logits in one round or token by token, in every cache format.

use std::borrow::Cow;

use half::bf16;
use rayon::prelude::*;
use ternary_gemm::{absmax_quantize_rows, ternary_matmul_a8, TernaryMatrix};

use super::checkpoint::{InferenceCheckpoint, LayerNorms, LayerWeights};
use super::kv::{Append, KeyRun, KvCache, KvCacheOptions, SequenceId};
use crate::config::{AttentionMode, TritterConfig, PAD_TOKEN_ID};
use crate::model::{check_token_ids, rms_norm_row, MaskSpec, Rope};
use crate::paradigm::rounder::dot;
use crate::{Result, TritterError};

/// The norms of one layer in f32, converted once from the checkpoint's bf16.
#[derive(Debug, Clone)]
enum NormsF32 {
    Chameleon {
        attn: Vec<f32>,
        mlp: Vec<f32>,
    },
    PreNormSubNorm {
        input: Vec<f32>,
        post_attention: Vec<f32>,
        attn_sub: Vec<f32>,
        ffn_sub: Vec<f32>,
    },
}

#[derive(Debug, Clone)]
struct LayerF32 {
    norms: NormsF32,
    /// `(q_norm, k_norm)`, each `(D,)`.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
}

/// Which logits a [`StepInput`] wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last token's `(V,)` (decoding).
    Last,
    /// Every token's, `(n, V)` row-major (scoring, tests).
    All,
}

/// Tokens to append to one sequence in [`CpuEngine::step`].
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    /// The sequence (from [`KvCache::add_sequence`]).
    pub seq: SequenceId,
    /// Token ids to append, at least one; positions continue from the sequence's length.
    pub tokens: &'a [u32],
    /// Which logits to return.
    pub logits: LogitsFor,
}

impl<'a> StepInput<'a> {
    /// One input per sequence: `seqs[i]` appends `tokens[i]`, every one asking for `logits`
    /// (a batch of prompts, or one decode token per sequence).
    pub fn batch<T: AsRef<[u32]> + 'a>(
        seqs: &[SequenceId],
        tokens: &'a [T],
        logits: LogitsFor,
    ) -> Vec<StepInput<'a>> {
        seqs.iter()
            .zip(tokens)
            .map(|(&seq, t)| StepInput {
                seq,
                tokens: t.as_ref(),
                logits,
            })
            .collect()
    }
}

/// The model on the CPU: packed ternary weights, f32 activations, a [`KvCache`] per set of
/// sequences. Cheap to share across threads (`&self` everywhere; the cache is passed in).
#[derive(Debug, Clone)]
pub struct CpuEngine {
    ckpt: InferenceCheckpoint,
    layers: Vec<LayerF32>,
    final_norm: Vec<f32>,
    rope: Rope,
    mask: MaskSpec,
}

fn f32s(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

impl CpuEngine {
    /// An engine for a validated checkpoint. The config must decode causally
    /// (`attention_mode: causal`; the window and sinks come from the config).
    pub fn new(ckpt: InferenceCheckpoint) -> Result<Self> {
        ckpt.validate()?;
        let cfg = &ckpt.config;
        if cfg.attention_mode != AttentionMode::Causal {
            return Err(TritterError::config(
                "attention_mode",
                format!("{:?}", cfg.attention_mode),
                "expected causal: the engine decodes autoregressively from a KV cache",
            ));
        }
        let layers = ckpt
            .layers
            .iter()
            .map(|l| LayerF32 {
                norms: match &l.norms {
                    LayerNorms::Chameleon {
                        attn_norm,
                        mlp_norm,
                    } => NormsF32::Chameleon {
                        attn: f32s(attn_norm),
                        mlp: f32s(mlp_norm),
                    },
                    LayerNorms::PreNormSubNorm {
                        input_layernorm,
                        post_attention_layernorm,
                        attn_sub_norm,
                        ffn_sub_norm,
                    } => NormsF32::PreNormSubNorm {
                        input: f32s(input_layernorm),
                        post_attention: f32s(post_attention_layernorm),
                        attn_sub: f32s(attn_sub_norm),
                        ffn_sub: f32s(ffn_sub_norm),
                    },
                },
                qk_norm: l
                    .qk_norm
                    .as_ref()
                    .map(|q| (f32s(&q.q_norm), f32s(&q.k_norm))),
            })
            .collect();
        Ok(CpuEngine {
            final_norm: f32s(&ckpt.final_norm),
            rope: Rope::new(cfg.head_dim(), cfg.rope_theta),
            mask: MaskSpec::from_config(cfg),
            layers,
            ckpt,
        })
    }

    /// The model config.
    pub fn config(&self) -> &TritterConfig {
        &self.ckpt.config
    }

    /// The weights.
    pub fn checkpoint(&self) -> &InferenceCheckpoint {
        &self.ckpt
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self, options: &KvCacheOptions) -> Result<KvCache> {
        KvCache::new(self.config(), options)
    }

    /// Logits `(L, V)` row-major of a whole sequence `tokens` `(L,)` at positions `0..L`,
    /// in a fresh f32 cache: the engine's counterpart of [`crate::TritterModel::forward`].
    pub fn forward_full(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut options = KvCacheOptions::for_config(self.config());
        options.format = super::KvCacheFormat::F32;
        options.max_prefill_chunk = tokens.len().max(1);
        let mut cache = self.new_cache(&options)?;
        let seq = cache.add_sequence();
        let mut out = self.step(
            &mut cache,
            &[StepInput {
                seq,
                tokens,
                logits: LogitsFor::All,
            }],
        )?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Appends each input's tokens to its sequence and returns its logits (`(V,)` or
    /// `(n, V)`, see [`LogitsFor`]), in input order.
    ///
    /// Inputs are processed together in rounds: each round takes from every unfinished
    /// input its next chunk (at most the cache's `max_prefill_chunk`, and what the paged
    /// store can hold without evicting keys the chunk still reads). Everything is validated
    /// before the cache changes (ids below `vocab_size`, distinct live sequences, at least
    /// one token, positions below `max_position_embeddings`); an error after that (a
    /// non-finite activation, an exhausted page pool) leaves the step's sequences partly
    /// appended, so free them.
    pub fn step(&self, cache: &mut KvCache, inputs: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>> {
        check_step_inputs(self.config(), inputs, |s| cache.len(s))?;
        run_rounds(
            inputs,
            cache,
            |cache, seq, left| cache.max_chunk(seq, left),
            |cache, chunks| {
                let items: Vec<(SequenceId, &[u32], RowsWanted)> =
                    chunks.iter().map(|c| (c.seq, c.tokens, c.rows)).collect();
                self.forward_round(cache, &items)
            },
            |acc, l| acc.extend(l),
        )
    }

    /// One round: appends each item's tokens to its sequence and returns the logits of the
    /// wanted rows, per item.
    fn forward_round(
        &self,
        cache: &mut KvCache,
        items: &[(SequenceId, &[u32], RowsWanted)],
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = self.config();
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let appends = items
            .iter()
            .map(|(seq, t, _)| cache.begin(*seq, t.len()))
            .collect::<Result<Vec<_>>>()?;
        let n: usize = items.iter().map(|(_, t, _)| t.len()).sum();
        // Row r: (item, position); RoPE rows (N, D).
        let mut rows = Vec::with_capacity(n);
        for (b, a) in appends.iter().enumerate() {
            rows.extend((a.start..a.start + a.len).map(|p| (b, p)));
        }
        let (mut cos, mut sin) = (Vec::with_capacity(n * d), Vec::with_capacity(n * d));
        for &(_, p) in &rows {
            for (c, s) in self.rope.cos_sin(p as u32) {
                cos.push(c);
                sin.push(s);
            }
        }
        let ctx = RoundContext {
            rows: &rows,
            appends: &appends,
            cos: &cos,
            sin: &sin,
        };

        let mut x = Vec::with_capacity(n * h); // (N, H)
        let embed = &self.ckpt.embed_tokens;
        let zero_pad = self.ckpt.architecture.zero_pad_embedding;
        for (_, t, _) in items {
            for &id in t.iter() {
                if zero_pad && id == PAD_TOKEN_ID {
                    x.extend(std::iter::repeat_n(0.0f32, h));
                } else {
                    let i = id as usize;
                    x.extend(embed[i * h..(i + 1) * h].iter().map(|v| v.to_f32()));
                }
            }
        }
        let eps = cfg.norm_eps;
        for (l, (w, lf)) in self.ckpt.layers.iter().zip(&self.layers).enumerate() {
            match &lf.norms {
                NormsF32::Chameleon { attn, mlp } => {
                    let a = self.attention(cache, &ctx, l, w, lf, &x, None)?;
                    add_normed(&mut x, &a, attn, eps);
                    let m = w.mlp.forward(&x, n)?;
                    add_normed(&mut x, &m, mlp, eps);
                }
                NormsF32::PreNormSubNorm {
                    input,
                    post_attention,
                    attn_sub,
                    ffn_sub,
                } => {
                    let xn = normed(&x, input, eps);
                    let a = self.attention(cache, &ctx, l, w, lf, &xn, Some(attn_sub))?;
                    x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
                    let xn = normed(&x, post_attention, eps);
                    let m = mlp_sub_norm(w, &xn, n, ffn_sub, eps)?;
                    x.iter_mut().zip(&m).for_each(|(x, m)| *x += m);
                }
            }
        }

        // Final norm of the wanted rows, then one pass over the LM head for all of them.
        let wanted_rows = wanted_rows(items.iter().map(|(_, t, w)| (t.len(), *w)));
        let mut hidden = vec![0f32; wanted_rows.len() * h]; // (R, H)
        for (hn, &r) in hidden.chunks_exact_mut(h).zip(&wanted_rows) {
            rms_norm_row(&x[r * h..(r + 1) * h], &self.final_norm, eps, hn);
        }
        let logits = self.lm_head(&hidden, wanted_rows.len()); // (R, V)
        Ok(split_logits(
            items.iter().map(|(_, t, w)| (t.len(), *w)),
            &logits,
            cfg.vocab_size,
        ))
    }

    /// Logits `(R, V)` of final hidden states `(R, H)`: `h · Eᵀ` (tied) or `h · Wᵀ`. Each
    /// vocabulary row is read and widened to f32 once for all `R` rows (the head is the
    /// largest tensor a decode step streams), and each logit is one [`dot`], the same for
    /// any `R`.
    fn lm_head(&self, hidden: &[f32], rows: usize) -> Vec<f32> {
        let head = self
            .ckpt
            .lm_head
            .as_ref()
            .unwrap_or(&self.ckpt.embed_tokens);
        let (h, v) = (self.config().hidden_size, self.config().vocab_size);
        if rows == 0 {
            return Vec::new();
        }
        let mut by_vocab = vec![0f32; v * rows]; // (V, R)
        by_vocab
            .par_chunks_mut(LM_HEAD_ROWS_PER_TASK * rows)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut e = vec![0f32; h];
                for (i, out) in chunk.chunks_exact_mut(rows).enumerate() {
                    let row = &head[(c * LM_HEAD_ROWS_PER_TASK + i) * h..][..h];
                    widen_bf16(row, &mut e);
                    for (o, hr) in out.iter_mut().zip(hidden.chunks_exact(h)) {
                        *o = dot(hr, &e);
                    }
                }
            });
        let mut logits = vec![0f32; rows * v];
        for (vi, col) in by_vocab.chunks_exact(rows).enumerate() {
            for (r, &x) in col.iter().enumerate() {
                logits[r * v + vi] = x;
            }
        }
        logits
    }

    /// The attention block of layer `l` over `x` `(N, H)` (the layer input, already normed
    /// for pre-norm placements): q/k/v projections, QK-Norm, RoPE, attention against the
    /// cache plus the round's keys, the round's K/V stored, optional sub-norm, o_proj.
    /// Returns `(N, H)`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        cache: &mut KvCache,
        ctx: &RoundContext<'_>,
        l: usize,
        w: &LayerWeights,
        lf: &LayerF32,
        x: &[f32],
        sub_norm: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let cfg = self.config();
        let (h, d, hq, hkv) = (
            cfg.hidden_size,
            cfg.head_dim(),
            cfg.num_heads,
            cfg.num_kv_heads,
        );
        let n = ctx.rows.len();
        let xq = absmax_quantize_rows(x, n, h)?;
        let mut q = ternary_matmul_a8(&w.q_proj, &xq)?; // (N, Hq*D)
        let mut k = ternary_matmul_a8(&w.k_proj, &xq)?; // (N, Hkv*D)
        let v = ternary_matmul_a8(&w.v_proj, &xq)?; // (N, Hkv*D)
        let eps = cfg.norm_eps;
        if let Some((q_norm, k_norm)) = &lf.qk_norm {
            let mut tmp = vec![0f32; d];
            for (t, norm) in [(&mut q, q_norm), (&mut k, k_norm)] {
                for head in t.chunks_exact_mut(d) {
                    rms_norm_row(head, norm, eps, &mut tmp);
                    head.copy_from_slice(&tmp);
                }
            }
        }
        // RoPE on every head of q and k at its row's position.
        for (t, heads) in [(&mut q, hq), (&mut k, hkv)] {
            for (i, head) in t.chunks_exact_mut(d).enumerate() {
                let r = i / heads;
                Rope::rotate_half_in_place(
                    head,
                    &ctx.cos[r * d..(r + 1) * d],
                    &ctx.sin[r * d..(r + 1) * d],
                );
            }
        }

        // Keys of each item: the cache's runs, then the round's own rows as stored.
        let kvd = hkv * d;
        let (k_stored, v_stored) = (cache.as_stored(&k)?, cache.as_stored(&v)?);
        let k_att = k_stored.as_deref().unwrap_or(&k);
        let v_att = v_stored.as_deref().unwrap_or(&v);
        let mut keys: Vec<Vec<KeyRun<'_>>> = Vec::with_capacity(ctx.appends.len());
        let mut r0 = 0;
        for a in ctx.appends {
            let mut runs = cache.old_runs(a.seq, l, a.start)?;
            runs.push(KeyRun {
                start: a.start,
                len: a.len,
                k: Cow::Borrowed(&k_att[r0 * kvd..(r0 + a.len) * kvd]),
                v: Cow::Borrowed(&v_att[r0 * kvd..(r0 + a.len) * kvd]),
            });
            keys.push(runs);
            r0 += a.len;
        }
        let group = hq / hkv;
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let mut o = vec![0f32; n * hq * d]; // (N, Hq*D)
        o.par_chunks_mut(d).enumerate().for_each(|(idx, out)| {
            let (r, head) = (idx / hq, idx % hq);
            let (item, i) = ctx.rows[r];
            let g = head / group;
            let qv = &q[(r * hq + head) * d..][..d];
            attend(
                qv,
                &keys[item],
                g,
                kvd,
                d,
                scale,
                |j| self.mask.visible(0, i, j),
                out,
            );
        });
        drop(keys);
        let mut r0 = 0;
        for a in ctx.appends {
            cache.write(
                a,
                l,
                &k[r0 * kvd..(r0 + a.len) * kvd],
                &v[r0 * kvd..(r0 + a.len) * kvd],
            )?;
            r0 += a.len;
        }
        let o = match sub_norm {
            Some(norm) => normed(&o, norm, eps),
            None => o,
        };
        let oq = absmax_quantize_rows(&o, n, hq * d)?;
        Ok(ternary_matmul_a8(&w.o_proj, &oq)?)
    }
}

/// The checks every engine's `step` makes before its cache changes: at least one token per
/// input, ids below `vocab_size`, positions below `max_position_embeddings` (`len` gives a
/// sequence's current length, failing for an unknown one), each sequence at most once.
pub(crate) fn check_step_inputs(
    cfg: &TritterConfig,
    inputs: &[StepInput<'_>],
    len: impl Fn(SequenceId) -> Result<usize>,
) -> Result<()> {
    for (b, input) in inputs.iter().enumerate() {
        if input.tokens.is_empty() {
            return Err(TritterError::ShapeMismatch {
                what: format!("tokens of step input {b}"),
                actual: vec![0],
                expected: "at least one token".into(),
            });
        }
        check_token_ids(input.tokens, b, cfg.vocab_size)?;
        let len = len(input.seq)? + input.tokens.len();
        if len > cfg.max_position_embeddings {
            return Err(TritterError::SequenceTooLong {
                len,
                max: cfg.max_position_embeddings,
            });
        }
        if inputs[..b].iter().any(|o| o.seq == input.seq) {
            return Err(TritterError::argument(
                "step inputs",
                format!("sequence {} twice", input.seq.raw()),
                "each sequence at most once per step",
            ));
        }
    }
    Ok(())
}

/// The tokens a round appends to one sequence.
pub(crate) struct Chunk<'a> {
    /// Index of the step input they come from.
    pub input: usize,
    pub seq: SequenceId,
    pub tokens: &'a [u32],
    pub rows: RowsWanted,
}

/// Runs a step's `inputs` in rounds (both engines): each round takes from every unfinished
/// input its next chunk of `chunk(cache, seq, tokens left)` tokens and `round` appends them
/// and returns their outputs (wanted logits; it may reorder the chunks; the outputs follow
/// its order), which `merge` adds to the input's output so far. Returns each input's
/// output, in input order.
pub(crate) fn run_rounds<'a, C, O: Default>(
    inputs: &[StepInput<'a>],
    cache: &mut C,
    chunk: impl Fn(&C, SequenceId, usize) -> Result<usize>,
    mut round: impl FnMut(&mut C, &mut [Chunk<'a>]) -> Result<Vec<O>>,
    merge: impl Fn(&mut O, O),
) -> Result<Vec<O>> {
    let mut done = vec![0usize; inputs.len()];
    let mut out: Vec<O> = std::iter::repeat_with(O::default)
        .take(inputs.len())
        .collect();
    loop {
        let mut chunks = Vec::new();
        for (b, input) in inputs.iter().enumerate() {
            let left = input.tokens.len() - done[b];
            if left > 0 {
                let n = chunk(cache, input.seq, left)?;
                chunks.push(Chunk {
                    input: b,
                    seq: input.seq,
                    tokens: &input.tokens[done[b]..done[b] + n],
                    rows: RowsWanted::of_chunk(input.logits, n == left),
                });
                done[b] += n;
            }
        }
        if chunks.is_empty() {
            return Ok(out);
        }
        let outputs = round(cache, &mut chunks)?;
        for (c, o) in chunks.iter().zip(outputs) {
            merge(&mut out[c.input], o);
        }
    }
}

/// Rows of a round whose logits are computed (shared by the CPU and GPU engines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowsWanted {
    None,
    Last,
    All,
}

impl RowsWanted {
    /// The rows of a chunk of an input that asks for `logits`: all of them, or the last one
    /// when the chunk ends the input (`last_chunk`), else none.
    pub(crate) fn of_chunk(logits: LogitsFor, last_chunk: bool) -> Self {
        match logits {
            LogitsFor::All => RowsWanted::All,
            LogitsFor::Last if last_chunk => RowsWanted::Last,
            LogitsFor::Last => RowsWanted::None,
        }
    }

    /// The wanted rows among a chunk's `n`, as offsets `0..n`.
    pub(crate) fn range(self, n: usize) -> std::ops::Range<usize> {
        match self {
            RowsWanted::None => 0..0,
            RowsWanted::Last => n - 1..n,
            RowsWanted::All => 0..n,
        }
    }
}

/// Round row indices of the wanted rows of chunks `(tokens, wanted)` stacked in order.
pub(crate) fn wanted_rows(chunks: impl Iterator<Item = (usize, RowsWanted)>) -> Vec<usize> {
    let mut rows = Vec::new();
    let mut r0 = 0;
    for (n, w) in chunks {
        rows.extend(w.range(n).map(|r| r0 + r));
        r0 += n;
    }
    rows
}

/// `logits` `(R, V)` of the wanted rows split back per chunk: `(k, V)` each, `k` its wanted
/// rows.
pub(crate) fn split_logits(
    chunks: impl Iterator<Item = (usize, RowsWanted)>,
    logits: &[f32],
    v: usize,
) -> Vec<Vec<f32>> {
    let mut at = 0;
    chunks
        .map(|(n, w)| {
            let k = w.range(n).len();
            let out = logits[at * v..(at + k) * v].to_vec();
            at += k;
            out
        })
        .collect()
}

/// What every layer of a round shares: `(item, position)` per row, the appends, and the
/// RoPE rows `(N, D)`.
struct RoundContext<'a> {
    rows: &'a [(usize, usize)],
    appends: &'a [Append],
    cos: &'a [f32],
    sin: &'a [f32],
}

/// Vocabulary rows of the LM head per rayon task.
const LM_HEAD_ROWS_PER_TASK: usize = 256;

/// `x[r] += rms_norm(a[r]) * weight` for every row (Chameleon's normed residual branch).
fn add_normed(x: &mut [f32], a: &[f32], weight: &[f32], eps: f64) {
    let w = weight.len();
    let mut tmp = vec![0f32; w];
    for (xr, ar) in x.chunks_exact_mut(w).zip(a.chunks_exact(w)) {
        rms_norm_row(ar, weight, eps, &mut tmp);
        xr.iter_mut().zip(&tmp).for_each(|(x, t)| *x += t);
    }
}

/// RMSNorm of every row of `x` (rows of `weight.len()` values).
fn normed(x: &[f32], weight: &[f32], eps: f64) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (o, xr) in out
        .chunks_exact_mut(weight.len())
        .zip(x.chunks_exact(weight.len()))
    {
        rms_norm_row(xr, weight, eps, o);
    }
    out
}

/// The squared-ReLU GLU with a sub-norm before `down_proj` (HF BitNet):
/// `down(ffn_sub_norm(relu(gate(x))² * up(x)))`, `x` `(n, H)` -> `(n, H)`.
fn mlp_sub_norm(
    w: &LayerWeights,
    x: &[f32],
    n: usize,
    sub_norm: &[f32],
    eps: f64,
) -> Result<Vec<f32>> {
    let (gate, up, down): (&TernaryMatrix, &TernaryMatrix, &TernaryMatrix) = w.mlp.parts();
    let xq = absmax_quantize_rows(x, n, gate.k_in())?;
    let g = ternary_matmul_a8(gate, &xq)?; // (n, I)
    let u = ternary_matmul_a8(up, &xq)?;
    let hidden: Vec<f32> = g
        .iter()
        .zip(&u)
        .map(|(&g, &u)| {
            let r = g.max(0.0);
            r * r * u
        })
        .collect();
    let hidden = normed(&hidden, sub_norm, eps);
    let hq = absmax_quantize_rows(&hidden, n, gate.n_out())?;
    Ok(ternary_matmul_a8(down, &hq)?)
}

/// One query head against runs of keys: `out = softmax(q · kᵀ * scale) · v` over the keys
/// `visible` allows (the others score `-inf`, as the reference's additive mask), reading KV
/// head `g` of rows `(Hkv * D)` wide. Keys in run order (ascending positions), f32.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    runs: &[KeyRun<'_>],
    g: usize,
    kvd: usize,
    d: usize,
    scale: f32,
    visible: impl Fn(usize) -> bool,
    out: &mut [f32],
) {
    let total: usize = runs.iter().map(|r| r.len).sum();
    let mut scores = Vec::with_capacity(total);
    let mut max = f32::NEG_INFINITY;
    for run in runs {
        for t in 0..run.len {
            let s = if visible(run.start + t) {
                dot(q, &run.k[t * kvd + g * d..][..d]) * scale
            } else {
                f32::NEG_INFINITY
            };
            max = max.max(s);
            scores.push(s);
        }
    }
    let mut sum = 0f32;
    for s in &mut scores {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    let mut p = scores.iter();
    for run in runs {
        for t in 0..run.len {
            let p = p.next().copied().unwrap_or(0.0) / sum;
            if p != 0.0 {
                let vr = &run.v[t * kvd + g * d..][..d];
                out.iter_mut().zip(vr).for_each(|(o, &v)| *o += p * v);
            }
        }
    }
}

/// `out = b` widened to f32: a bf16 is the top half of an f32, so a shift is exact (and
/// vectorizes, unlike a conversion that special-cases NaN).
fn widen_bf16(b: &[bf16], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(b) {
        *o = f32::from_bits(u32::from(x.to_bits()) << 16);
    }
}
