//! The f32 CPU reference of attention forward and backward and of the fused QK-Norm + RoPE
//! prologue: the oracle the CUDA kernels are tested against (the way llama.cpp checks every
//! backend against `*_ref`). Clarity over speed: scores, softmax and every accumulation run
//! in f64, one (sequence, head) task per rayon job; inputs and outputs are f32.
//!
//! Semantics (the crate README repeats them):
//! * layout: q `(total_q, Hq, D)`, k/v `(total_k, Hkv, D)` row-major, out like q; a fixed
//!   batch is the same memory as `(B, Lq, Hq, D)` / `(B, Lk, Hkv, D)`;
//! * GQA: query head `h` reads KV head `h / (Hq / Hkv)`;
//! * scores `s_ij = (q_i · k_j) * softmax_scale`, kept where [`Problem::visible`] holds
//!   (bottom-right alignment), `P = softmax(s)` per row, `out_i = sum_j P_ij v_j`;
//! * logsumexp `lse_i = ln(sum_j exp(s_ij))` (natural log, over visible keys), at
//!   [`Seqs::lse_index`](crate::Seqs::lse_index): `(B, Hq, Lq)` or `(Hq, total_q)`;
//! * backward (FlashAttention-2): `dP = dO V^T`, `D_i = rowsum(dO ∘ O)`,
//!   `dS = P ∘ (dP - D_i)`, `dq = scale dS K`, `dk = scale dS^T Q`, `dv = P^T dO`, with dk/dv
//!   summed over the query heads of a KV head's group;
//! * prologue ([`Prologue`]): q and k are raw and go through [`qk_norm_rope_ref`] first;
//!   gradients are then with respect to the raw q and k and the two norm weights.

use rayon::prelude::*;

use crate::error::{AttnError, Result};
use crate::params::{NormRope, Positions, Problem};

/// The fused QK-Norm + RoPE prologue of one call: q and k are raw and are normalized and
/// rotated ([`qk_norm_rope_ref`]) before the scores.
#[derive(Debug, Clone, Copy)]
pub struct Prologue<'a> {
    /// RMSNorm weight of q `(D,)`.
    pub q_norm: &'a [f32],
    /// RMSNorm weight of k `(D,)`.
    pub k_norm: &'a [f32],
    /// Epsilon and RoPE theta.
    pub norm_rope: NormRope,
    /// RoPE positions; `None` entries default to [`Problem::default_q_position`] for queries
    /// and the index within the sequence for keys.
    pub positions: &'a Positions,
}

/// Output of the forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct FwdOut {
    /// Attention output like q: `(total_q, Hq, D)`, i.e. `(B, Lq, Hq, D)` for a fixed batch.
    pub out: Vec<f32>,
    /// Natural-log logsumexp of the scaled, masked scores: `(B, Hq, Lq)` for a fixed batch,
    /// `(Hq, total_q)` for a varlen one (index with [`crate::Seqs::lse_index`]).
    pub lse: Vec<f32>,
}

/// Gradients of the backward pass, with respect to the inputs as given (raw q and k when a
/// prologue is used).
#[derive(Debug, Clone, PartialEq)]
pub struct Grads {
    /// `dL/dq` like q `(total_q, Hq, D)`.
    pub dq: Vec<f32>,
    /// `dL/dk` like k `(total_k, Hkv, D)` (summed over each KV head's query group).
    pub dk: Vec<f32>,
    /// `dL/dv` like v `(total_k, Hkv, D)`.
    pub dv: Vec<f32>,
    /// `dL/dq_norm` `(D,)` when a prologue was given.
    pub dq_norm: Option<Vec<f32>>,
    /// `dL/dk_norm` `(D,)` when a prologue was given.
    pub dk_norm: Option<Vec<f32>>,
}

/// Rejects the first non-finite value of argument `what` (DESIGN.md section 6: no NaN passes
/// the API boundary unchecked).
pub(crate) fn check_finite(what: &'static str, x: &[f32]) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(AttnError::NonFinite {
            what,
            index,
            value: x[index],
        }),
        None => Ok(()),
    }
}

/// Checks the arguments of the QK-Norm + RoPE functions: shape, lengths, positions, eps and
/// theta, and finiteness of `x` and `weight`.
fn check_norm_rope_args(
    x: &[f32],
    (tokens, heads, dim): (usize, usize, usize),
    weight: &[f32],
    nr: &NormRope,
    positions: &[i32],
) -> Result<()> {
    nr.validate()?;
    if dim < 2 || dim % 2 != 0 {
        return Err(AttnError::Heads(format!(
            "head dim D = {dim} but rotate-half RoPE pairs dims i and i + D/2; expected an even \
             D >= 2"
        )));
    }
    if heads == 0 {
        return Err(AttnError::Heads(
            "heads = 0 but expected >= 1 head per token".into(),
        ));
    }
    let detail = || format!("(tokens={tokens}, heads={heads}, D={dim})");
    let expected = tokens
        .checked_mul(heads)
        .and_then(|n| n.checked_mul(dim))
        .ok_or_else(|| {
            AttnError::Layout(format!(
                "x of shape {} has more elements than usize holds",
                detail()
            ))
        })?;
    for (what, actual, expected) in [
        ("x", x.len(), expected),
        ("weight", weight.len(), dim),
        ("positions", positions.len(), tokens),
    ] {
        if actual != expected {
            return Err(AttnError::Shape {
                what,
                actual,
                expected,
                detail: detail(),
            });
        }
    }
    if let Some(t) = positions.iter().position(|&p| p < 0) {
        return Err(AttnError::Layout(format!(
            "positions[{t}] is {} but expected a position >= 0",
            positions[t]
        )));
    }
    check_finite("x", x)?;
    check_finite("weight", weight)
}

/// RoPE frequencies of one head dim: `inv_freq[i] = theta^(-2i/D)` in f64, as
/// `tritter::model::Rope`.
struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    fn new(dim: usize, theta: f32) -> Rope {
        let theta = f64::from(theta);
        Rope {
            inv_freq: (0..dim / 2)
                .map(|i| theta.powf(-2.0 * i as f64 / dim as f64))
                .collect(),
        }
    }

    /// `(cos, sin)` of `pos * inv_freq[i]`: angle in f64, rounded once to f32 (as the
    /// reference model's tables), returned as f64 for the arithmetic that follows.
    fn cos_sin(&self, pos: i32) -> Vec<(f64, f64)> {
        self.inv_freq
            .iter()
            .map(|&f| {
                let a = f64::from(pos) * f;
                (f64::from(a.cos() as f32), f64::from(a.sin() as f32))
            })
            .collect()
    }
}

/// `1 / sqrt(mean(x^2) + eps)` of one row, in f64.
fn inv_rms(x: &[f32], eps: f32) -> f64 {
    let ms = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / x.len() as f64;
    1.0 / (ms + f64::from(eps)).sqrt()
}

/// The prologue on validated input (see [`qk_norm_rope_ref`]).
fn norm_rope_fwd(
    x: &[f32],
    (heads, dim): (usize, usize),
    weight: &[f32],
    nr: &NormRope,
    positions: &[i32],
) -> Vec<f32> {
    let rope = Rope::new(dim, nr.rope_theta);
    let half = dim / 2;
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(heads * dim)
        .zip(x.par_chunks(heads * dim))
        .zip(positions.par_iter())
        .for_each(|((yt, xt), &pos)| {
            let cs = rope.cos_sin(pos);
            for (yr, xr) in yt.chunks_mut(dim).zip(xt.chunks(dim)) {
                let r = inv_rms(xr, nr.eps);
                let xh: Vec<f64> = xr
                    .iter()
                    .zip(weight)
                    .map(|(&v, &w)| f64::from(v) * r * f64::from(w))
                    .collect();
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (a, b) = (xh[i], xh[i + half]);
                    yr[i] = (a * c - b * s) as f32;
                    yr[i + half] = (b * c + a * s) as f32;
                }
            }
        });
    y
}

/// Backward of the prologue on validated input, `dy` in f64: `(dx, dweight)`.
fn norm_rope_bwd(
    x: &[f32],
    (heads, dim): (usize, usize),
    weight: &[f32],
    nr: &NormRope,
    positions: &[i32],
    dy: &[f64],
) -> (Vec<f32>, Vec<f32>) {
    let rope = Rope::new(dim, nr.rope_theta);
    let half = dim / 2;
    let mut dx = vec![0.0f32; x.len()];
    // Per-token partial weight gradients, summed afterwards (tokens are independent).
    let dweight = dx
        .par_chunks_mut(heads * dim)
        .zip(x.par_chunks(heads * dim))
        .zip(dy.par_chunks(heads * dim))
        .zip(positions.par_iter())
        .map(|(((dxt, xt), dyt), &pos)| {
            let cs = rope.cos_sin(pos);
            let mut dw = vec![0.0f64; dim];
            for ((dxr, xr), dyr) in dxt.chunks_mut(dim).zip(xt.chunks(dim)).zip(dyt.chunks(dim)) {
                // dx_hat = R^T dy (the transpose rotation).
                let mut dxh = vec![0.0f64; dim];
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (a, b) = (dyr[i], dyr[i + half]);
                    dxh[i] = a * c + b * s;
                    dxh[i + half] = b * c - a * s;
                }
                // x_hat = x * r * w with r = (mean(x^2) + eps)^(-1/2):
                // dw += dx_hat * x * r; with g = dx_hat * w,
                // dx = r * g - x * r^3 * sum(g * x) / D.
                let r = inv_rms(xr, nr.eps);
                let mut gx = 0.0f64;
                for d in 0..dim {
                    let xv = f64::from(xr[d]);
                    dw[d] += dxh[d] * xv * r;
                    gx += dxh[d] * f64::from(weight[d]) * xv;
                }
                let coef = r * r * r * gx / dim as f64;
                for d in 0..dim {
                    let g = dxh[d] * f64::from(weight[d]);
                    dxr[d] = (r * g - f64::from(xr[d]) * coef) as f32;
                }
            }
            dw
        })
        .reduce(
            || vec![0.0f64; dim],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        );
    (dx, dweight.into_iter().map(|v| v as f32).collect())
}

/// QK-Norm then rotate-half RoPE of `x` `(tokens, heads, D)`, each token at its own
/// position (`positions` `(tokens,)`, >= 0), giving `(tokens, heads, D)`.
///
/// `x_hat = x / sqrt(mean(x^2) + eps) * weight` over D (weight `(D,)`), then for `i < D/2`
/// with `a = pos * theta^(-2i/D)` (computed in f64, used as f32, as the reference model):
/// `y[i] = x_hat[i] cos a - x_hat[i + D/2] sin a`,
/// `y[i + D/2] = x_hat[i + D/2] cos a + x_hat[i] sin a`. This is the prologue the kernels
/// fuse into the load of q and k ([`NormRope`]); any even D is accepted here.
pub fn qk_norm_rope_ref(
    x: &[f32],
    tokens: usize,
    heads: usize,
    dim: usize,
    weight: &[f32],
    nr: &NormRope,
    positions: &[i32],
) -> Result<Vec<f32>> {
    check_norm_rope_args(x, (tokens, heads, dim), weight, nr, positions)?;
    Ok(norm_rope_fwd(x, (heads, dim), weight, nr, positions))
}

/// Backward of [`qk_norm_rope_ref`]: given `dy = dL/dy` `(tokens, heads, D)`, returns
/// `(dL/dx` `(tokens, heads, D)`, `dL/dweight` `(D,))`, the weight gradient summed over
/// tokens and heads. Arguments as the forward's, plus `dy`.
#[allow(clippy::too_many_arguments)] // the forward's argument list plus the gradient
pub fn qk_norm_rope_bwd_ref(
    x: &[f32],
    tokens: usize,
    heads: usize,
    dim: usize,
    weight: &[f32],
    nr: &NormRope,
    positions: &[i32],
    dy: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    check_norm_rope_args(x, (tokens, heads, dim), weight, nr, positions)?;
    if dy.len() != x.len() {
        return Err(AttnError::Shape {
            what: "dy",
            actual: dy.len(),
            expected: x.len(),
            detail: format!("like x (tokens={tokens}, heads={heads}, D={dim})"),
        });
    }
    check_finite("dy", dy)?;
    let dy: Vec<f64> = dy.iter().map(|&v| f64::from(v)).collect();
    Ok(norm_rope_bwd(x, (heads, dim), weight, nr, positions, &dy))
}

/// Validates a problem, its q/k/v and the prologue, in the order of DESIGN.md section 6:
/// description, lengths, then values.
fn check_inputs(
    problem: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    prologue: Option<&Prologue<'_>>,
) -> Result<()> {
    problem.validate()?;
    problem.check_lens(q.len(), k.len(), v.len())?;
    let dim = problem.heads.dim;
    if let Some(p) = prologue {
        p.norm_rope.validate()?;
        for (what, w) in [("q_norm", p.q_norm), ("k_norm", p.k_norm)] {
            if w.len() != dim {
                return Err(AttnError::Shape {
                    what,
                    actual: w.len(),
                    expected: dim,
                    detail: format!("one RMSNorm weight per channel, D = {dim}"),
                });
            }
        }
        problem.check_positions(p.positions)?;
    }
    check_finite("q", q)?;
    check_finite("k", k)?;
    check_finite("v", v)?;
    if let Some(p) = prologue {
        check_finite("q_norm", p.q_norm)?;
        check_finite("k_norm", p.k_norm)?;
    }
    Ok(())
}

/// q and k as the scores see them: through the prologue when one is given (with the
/// resolved positions), else as given.
struct Prepared<'a> {
    q: std::borrow::Cow<'a, [f32]>,
    k: std::borrow::Cow<'a, [f32]>,
    positions: Option<(Vec<i32>, Vec<i32>)>,
}

fn prepare<'a>(
    problem: &Problem,
    q: &'a [f32],
    k: &'a [f32],
    prologue: Option<&Prologue<'_>>,
) -> Prepared<'a> {
    use std::borrow::Cow;
    let Some(p) = prologue else {
        return Prepared {
            q: Cow::Borrowed(q),
            k: Cow::Borrowed(k),
            positions: None,
        };
    };
    let h = &problem.heads;
    let (qp, kp) = problem.resolve_positions(p.positions);
    let qh = norm_rope_fwd(q, (h.q, h.dim), p.q_norm, &p.norm_rope, &qp);
    let kh = norm_rope_fwd(k, (h.kv, h.dim), p.k_norm, &p.norm_rope, &kp);
    Prepared {
        q: Cow::Owned(qh),
        k: Cow::Owned(kh),
        positions: Some((qp, kp)),
    }
}

/// Scaled scores of query row `i` of sequence `b`, head `h` against the sequence's keys,
/// `-inf` where the mask hides a key.
fn scores_row(problem: &Problem, q: &[f32], k: &[f32], b: usize, h: usize, i: usize) -> Vec<f64> {
    let heads = &problem.heads;
    let (d, group) = (heads.dim, heads.q / heads.kv);
    let (q0, _, k0, lk) = problem.seqs.seq(b);
    let qrow = &q[((q0 + i) * heads.q + h) * d..][..d];
    let hk = h / group;
    let scale = f64::from(heads.softmax_scale);
    (0..lk)
        .map(|j| {
            if !problem.visible(b, i, j) {
                return f64::NEG_INFINITY;
            }
            let krow = &k[((k0 + j) * heads.kv + hk) * d..][..d];
            let dot: f64 = qrow
                .iter()
                .zip(krow)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            dot * scale
        })
        .collect()
}

/// Natural-log logsumexp of a score row (max-shifted); `-inf` for a row with no visible key
/// (which a validated problem never has: every query sees itself).
fn logsumexp(s: &[f64]) -> f64 {
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + s.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
}

/// Probabilities `exp(s - lse)`, exactly 0 for hidden keys.
fn probs(s: &[f64], lse: f64) -> Vec<f64> {
    s.iter()
        .map(|&x| {
            if x == f64::NEG_INFINITY {
                0.0
            } else {
                (x - lse).exp()
            }
        })
        .collect()
}

/// Every `(sequence, head)` pair of a problem, `head` ranging over `heads`.
fn tasks(problem: &Problem, heads: usize) -> Vec<(usize, usize)> {
    (0..problem.seqs.batch())
        .flat_map(|b| (0..heads).map(move |h| (b, h)))
        .collect()
}

/// Attention forward: `out = softmax(mask(q k^T * scale)) v` per (sequence, head) and the
/// logsumexp of each row (module docs for the layouts and the rule).
///
/// q `(total_q, Hq, D)` (`(B, Lq, Hq, D)` for a fixed batch), k/v `(total_k, Hkv, D)`; with a
/// [`Prologue`], q and k are raw and go through [`qk_norm_rope_ref`] first. Checks the
/// problem, every length and that every input is finite before computing.
pub fn attention_fwd_ref(
    problem: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    prologue: Option<Prologue<'_>>,
) -> Result<FwdOut> {
    check_inputs(problem, q, k, v, prologue.as_ref())?;
    let prep = prepare(problem, q, k, prologue.as_ref());
    let (q, k) = (&prep.q[..], &prep.k[..]);
    let heads = &problem.heads;
    let (hq, hkv, d) = (heads.q, heads.kv, heads.dim);
    let group = hq / hkv;
    // One task per (sequence, query head): its output rows (lq, D) and lse (lq,).
    let parts: Vec<(usize, usize, Vec<f64>, Vec<f64>)> = tasks(problem, hq)
        .into_par_iter()
        .map(|(b, h)| {
            let (_, lq, k0, _) = problem.seqs.seq(b);
            let mut out = vec![0.0f64; lq * d];
            let mut lse = vec![0.0f64; lq];
            for i in 0..lq {
                let s = scores_row(problem, q, k, b, h, i);
                lse[i] = logsumexp(&s);
                for (j, p) in probs(&s, lse[i]).into_iter().enumerate() {
                    if p == 0.0 {
                        continue;
                    }
                    let vrow = &v[((k0 + j) * hkv + h / group) * d..][..d];
                    for (o, &x) in out[i * d..][..d].iter_mut().zip(vrow) {
                        *o += p * f64::from(x);
                    }
                }
            }
            (b, h, out, lse)
        })
        .collect();
    let mut res = FwdOut {
        out: vec![0.0; problem.q_len()],
        lse: vec![0.0; problem.lse_len()],
    };
    for (b, h, out, lse) in parts {
        let (q0, lq, _, _) = problem.seqs.seq(b);
        for i in 0..lq {
            let t = q0 + i;
            for (o, &x) in res.out[(t * hq + h) * d..][..d]
                .iter_mut()
                .zip(&out[i * d..][..d])
            {
                *o = x as f32;
            }
            res.lse[problem.seqs.lse_index(hq, b, i, t, h)] = lse[i] as f32;
        }
    }
    Ok(res)
}

/// The attention probabilities `P = softmax(mask(q k^T * scale))` of every sequence, for
/// tests and debugging: sequence by sequence, a block `(Hq, lq_b, lk_b)` each, so a fixed
/// batch gives `(B, Hq, Lq, Lk)`. Hidden keys get exactly 0. Inputs and checks as
/// [`attention_fwd_ref`] (without v).
pub fn attention_probs_ref(
    problem: &Problem,
    q: &[f32],
    k: &[f32],
    prologue: Option<Prologue<'_>>,
) -> Result<Vec<f32>> {
    // v is not read; validate against a stand-in of the right length (k's).
    check_inputs(problem, q, k, k, prologue.as_ref())?;
    let prep = prepare(problem, q, k, prologue.as_ref());
    let (q, k) = (&prep.q[..], &prep.k[..]);
    let parts: Vec<Vec<f32>> = tasks(problem, problem.heads.q)
        .into_par_iter()
        .map(|(b, h)| {
            let (_, lq, _, _) = problem.seqs.seq(b);
            (0..lq)
                .flat_map(|i| {
                    let s = scores_row(problem, q, k, b, h, i);
                    probs(&s, logsumexp(&s)).into_iter().map(|p| p as f32)
                })
                .collect()
        })
        .collect();
    Ok(parts.concat())
}

/// Attention backward (FlashAttention-2 math, module docs): gradients of a loss `L` with
/// respect to q, k, v (raw q and k and both norm weights when a [`Prologue`] is given),
/// given `out` (the forward output, like q), `dout = dL/dout` (like q) and optionally the
/// forward's logsumexp (`(B, Hq, Lq)` / `(Hq, total_q)`; recomputed when `None`). With an
/// `lse`, probabilities are `exp(s - lse)` as in the kernels, so a wrong `lse` shows.
///
/// Checks the problem, every length and that every input is finite before computing.
#[allow(clippy::too_many_arguments)] // FlashAttention's backward takes the same eight inputs
pub fn attention_bwd_ref(
    problem: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    prologue: Option<Prologue<'_>>,
    out: &[f32],
    lse: Option<&[f32]>,
    dout: &[f32],
) -> Result<Grads> {
    check_inputs(problem, q, k, v, prologue.as_ref())?;
    problem.check_len("out", out.len(), problem.q_len())?;
    problem.check_len("dout", dout.len(), problem.q_len())?;
    if let Some(lse) = lse {
        problem.check_len("lse", lse.len(), problem.lse_len())?;
    }
    check_finite("out", out)?;
    check_finite("dout", dout)?;
    if let Some(lse) = lse {
        check_finite("lse", lse)?;
    }
    let prep = prepare(problem, q, k, prologue.as_ref());
    let (qh, kh) = (&prep.q[..], &prep.k[..]);
    let heads = &problem.heads;
    let (hq, hkv, d) = (heads.q, heads.kv, heads.dim);
    let group = hq / hkv;
    let scale = f64::from(heads.softmax_scale);
    let row = |x: &[f32], t: usize, h: usize, nh: usize| -> Vec<f64> {
        x[(t * nh + h) * d..][..d]
            .iter()
            .map(|&v| f64::from(v))
            .collect()
    };
    // One task per (sequence, KV head): it owns dk/dv of its keys and dq of its query group.
    struct Part {
        b: usize,
        g: usize,
        dq: Vec<f64>, // (group, lq, D)
        dk: Vec<f64>, // (lk, D)
        dv: Vec<f64>, // (lk, D)
    }
    let parts: Vec<Part> = tasks(problem, hkv)
        .into_par_iter()
        .map(|(b, g)| {
            let (q0, lq, k0, lk) = problem.seqs.seq(b);
            let mut part = Part {
                b,
                g,
                dq: vec![0.0; group * lq * d],
                dk: vec![0.0; lk * d],
                dv: vec![0.0; lk * d],
            };
            let vrows: Vec<Vec<f64>> = (0..lk).map(|j| row(v, k0 + j, g, hkv)).collect();
            let krows: Vec<Vec<f64>> = (0..lk).map(|j| row(kh, k0 + j, g, hkv)).collect();
            for r in 0..group {
                let h = g * group + r;
                for i in 0..lq {
                    let t = q0 + i;
                    let s = scores_row(problem, qh, kh, b, h, i);
                    let l = match lse {
                        Some(lse) => f64::from(lse[problem.seqs.lse_index(hq, b, i, t, h)]),
                        None => logsumexp(&s),
                    };
                    let p = probs(&s, l);
                    let (o, d_o, qi) = (row(out, t, h, hq), row(dout, t, h, hq), row(qh, t, h, hq));
                    let di: f64 = d_o.iter().zip(&o).map(|(a, b)| a * b).sum();
                    let dq = &mut part.dq[(r * lq + i) * d..][..d];
                    for j in 0..lk {
                        if p[j] == 0.0 {
                            continue;
                        }
                        let dp: f64 = d_o.iter().zip(&vrows[j]).map(|(a, b)| a * b).sum();
                        let ds = p[j] * (dp - di);
                        for c in 0..d {
                            dq[c] += scale * ds * krows[j][c];
                            part.dk[j * d + c] += scale * ds * qi[c];
                            part.dv[j * d + c] += p[j] * d_o[c];
                        }
                    }
                }
            }
            part
        })
        .collect();
    let mut dq = vec![0.0f64; problem.q_len()];
    let mut dk = vec![0.0f64; problem.kv_len()];
    let mut dv = vec![0.0f64; problem.kv_len()];
    for part in parts {
        let (q0, lq, k0, lk) = problem.seqs.seq(part.b);
        for r in 0..group {
            let h = part.g * group + r;
            for i in 0..lq {
                dq[((q0 + i) * hq + h) * d..][..d]
                    .copy_from_slice(&part.dq[(r * lq + i) * d..][..d]);
            }
        }
        for j in 0..lk {
            let at = ((k0 + j) * hkv + part.g) * d;
            dk[at..at + d].copy_from_slice(&part.dk[j * d..][..d]);
            dv[at..at + d].copy_from_slice(&part.dv[j * d..][..d]);
        }
    }
    let to_f32 = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
    match (prologue, prep.positions) {
        (Some(p), Some((qp, kp))) => {
            let (dq, dq_norm) = norm_rope_bwd(q, (hq, d), p.q_norm, &p.norm_rope, &qp, &dq);
            let (dk, dk_norm) = norm_rope_bwd(k, (hkv, d), p.k_norm, &p.norm_rope, &kp, &dk);
            Ok(Grads {
                dq,
                dk,
                dv: to_f32(dv),
                dq_norm: Some(dq_norm),
                dk_norm: Some(dk_norm),
            })
        }
        _ => Ok(Grads {
            dq: to_f32(dq),
            dk: to_f32(dk),
            dv: to_f32(dv),
            dq_norm: None,
            dk_norm: None,
        }),
    }
}
