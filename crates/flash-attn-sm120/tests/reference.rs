//! The CPU reference against a brute-force f64 attention written here from the rule in
//! DESIGN.md section 4 (every mask mode, window, sinks, documents, prefix-LM, varlen, GQA,
//! Lq < Lk alignment, with and without the QK-Norm + RoPE prologue); probabilities, lse and
//! output consistency; gradients against f64 central differences; prologue invariants; and
//! every bad input rejected with an error naming the actual and expected values.

use flash_attn_sm120::{
    attention_bwd_ref, attention_fwd_ref, attention_probs_ref, qk_norm_rope_bwd_ref,
    qk_norm_rope_ref, AttnError, Heads, Mask, MaskInputs, MaskMode, NormRope, Positions, Problem,
    Prologue, Seqs,
};
use proptest::prelude::*;
use tritter_kernels_cuda::testing::random_f32;

/// The prologue constants of the tests (Tritter's defaults).
const NR: NormRope = NormRope {
    eps: 1e-6,
    rope_theta: 10_000.0,
};
/// Tolerance of f32 reference outputs against the f64 naive attention.
const FWD_TOL: f64 = 5e-5;

// ---------------------------------------------------------------------------------------
// Brute-force f64 attention, written from DESIGN.md section 4 (not from `Problem::visible`).
// ---------------------------------------------------------------------------------------

/// Key `j` visible to query row `i` of sequence `b`: aligned position `pos = i + lk - lq`;
/// causal `j <= pos`; prefix-LM `j < prefix || j <= pos`; window `|pos - j| < W` unless
/// `j < sinks`; documents `doc[pos] == doc[j]`.
fn naive_visible(p: &Problem, b: usize, i: usize, j: usize) -> bool {
    let (_, lq, k0, lk) = p.seqs.seq(b);
    let pos = i as i64 + lk as i64 - lq as i64;
    let j = j as i64;
    let mode = match p.mask.mode {
        MaskMode::Causal => j <= pos,
        MaskMode::Bidirectional => true,
        MaskMode::PrefixLm => j < i64::from(p.inputs.prefix_lens.as_ref().unwrap()[b]) || j <= pos,
    };
    let window = match p.mask.window {
        None => true,
        Some(w) => (pos - j).abs() < w as i64 || j < p.mask.sinks as i64,
    };
    let doc = match &p.inputs.doc_ids {
        None => true,
        Some(d) => d[k0 + pos as usize] == d[k0 + j as usize],
    };
    mode && window && doc
}

/// f64 prologue inputs of the naive attention.
struct NaivePrologue<'a> {
    q_norm: &'a [f64],
    k_norm: &'a [f64],
    q_pos: &'a [i32],
    k_pos: &'a [i32],
}

/// RMSNorm then rotate-half RoPE of `x` `(tokens, heads, D)` entirely in f64.
fn naive_norm_rope(x: &[f64], heads: usize, d: usize, w: &[f64], pos: &[i32]) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    let half = d / 2;
    for (t, &p) in pos.iter().enumerate() {
        for h in 0..heads {
            let at = (t * heads + h) * d;
            let xr = &x[at..at + d];
            let ms = xr.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + f64::from(NR.eps)).sqrt();
            let xh: Vec<f64> = xr.iter().zip(w).map(|(v, w)| v * r * w).collect();
            for i in 0..half {
                let a = f64::from(p) * f64::from(NR.rope_theta).powf(-2.0 * i as f64 / d as f64);
                let (c, s) = (a.cos(), a.sin());
                y[at + i] = xh[i] * c - xh[i + half] * s;
                y[at + i + half] = xh[i + half] * c + xh[i] * s;
            }
        }
    }
    y
}

/// Output `(total_q, Hq, D)` and lse (the problem's layout) of attention in f64.
fn naive_fwd(
    p: &Problem,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    pro: Option<&NaivePrologue<'_>>,
) -> (Vec<f64>, Vec<f64>) {
    let (hq, hkv, d) = (p.heads.q, p.heads.kv, p.heads.dim);
    let (q, k) = match pro {
        Some(pr) => (
            naive_norm_rope(q, hq, d, pr.q_norm, pr.q_pos),
            naive_norm_rope(k, hkv, d, pr.k_norm, pr.k_pos),
        ),
        None => (q.to_vec(), k.to_vec()),
    };
    let mut out = vec![0.0; p.q_len()];
    let mut lse = vec![0.0; p.lse_len()];
    for b in 0..p.seqs.batch() {
        let (q0, lq, k0, lk) = p.seqs.seq(b);
        for h in 0..hq {
            let g = h / (hq / hkv);
            for i in 0..lq {
                let qi = &q[((q0 + i) * hq + h) * d..][..d];
                let s: Vec<Option<f64>> = (0..lk)
                    .map(|j| {
                        naive_visible(p, b, i, j).then(|| {
                            let kj = &k[((k0 + j) * hkv + g) * d..][..d];
                            qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                                * f64::from(p.heads.softmax_scale)
                        })
                    })
                    .collect();
                let m = s.iter().flatten().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let z: f64 = s.iter().flatten().map(|x| (x - m).exp()).sum();
                let o = &mut out[((q0 + i) * hq + h) * d..][..d];
                for (j, sj) in s.iter().enumerate() {
                    if let Some(sj) = sj {
                        let pj = (sj - m).exp() / z;
                        for c in 0..d {
                            o[c] += pj * v[((k0 + j) * hkv + g) * d + c];
                        }
                    }
                }
                lse[p.seqs.lse_index(hq, b, i, q0 + i, h)] = m + z.ln();
            }
        }
    }
    (out, lse)
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

/// Largest `|a - b| / (1 + |b|)` and where.
fn max_rel_err(a: &[f32], b: &[f64]) -> (f64, usize) {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (&a, &b))| ((f64::from(a) - b).abs() / (1.0 + b.abs()), i))
        .fold((0.0, 0), |m, x| if x.0 > m.0 { x } else { m })
}

fn assert_close(what: &str, a: &[f32], b: &[f64], tol: f64) {
    let (e, i) = max_rel_err(a, b);
    assert!(
        e <= tol,
        "{what}: error {e:.3e} > {tol:.1e} at {i}: {} vs {}",
        a[i],
        b[i]
    );
}

// ---------------------------------------------------------------------------------------
// Random problems.
// ---------------------------------------------------------------------------------------

/// SplitMix64 for the structure of a random problem (prefix lengths, document ids).
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What a random problem is built from.
#[derive(Debug, Clone)]
struct Spec {
    mode: MaskMode,
    window: Option<usize>,
    sinks: usize,
    varlen: bool,
    /// (queries, extra keys) per sequence.
    lens: Vec<(usize, usize)>,
    hkv: usize,
    group: usize,
    dim: usize,
    docs: bool,
    seed: u64,
}

impl Spec {
    fn build(&self) -> Problem {
        let mut rng = Mix(self.seed);
        let align = self.mode != MaskMode::Bidirectional || self.window.is_some() || self.docs;
        let lk_of = |lq: usize, e: usize| if align { lq + e } else { e + 1 };
        let seqs = if self.varlen {
            let (mut cu_q, mut cu_k) = (vec![0i32], vec![0i32]);
            for &(lq, e) in &self.lens {
                cu_q.push(cu_q.last().unwrap() + lq as i32);
                cu_k.push(cu_k.last().unwrap() + lk_of(lq, e) as i32);
            }
            Seqs::Varlen { cu_q, cu_k }
        } else {
            let (lq, e) = self.lens[0];
            let lq = lq.max(1);
            Seqs::Fixed {
                batch: self.lens.len(),
                lq,
                lk: lk_of(lq, e),
            }
        };
        let batch = seqs.batch();
        let prefix_lens = (self.mode == MaskMode::PrefixLm).then(|| {
            (0..batch)
                .map(|b| rng.below(seqs.seq(b).3 + 1) as i32)
                .collect()
        });
        let doc_ids = self.docs.then(|| {
            let mut ids = vec![0i32; seqs.total_k()];
            for b in 0..batch {
                let (_, _, k0, lk) = seqs.seq(b);
                let mut id = rng.below(3) as i32;
                for slot in &mut ids[k0..k0 + lk] {
                    if rng.below(3) == 0 {
                        id += 1;
                    }
                    *slot = id;
                }
            }
            ids
        });
        Problem {
            heads: Heads::new(self.hkv * self.group, self.hkv, self.dim),
            seqs,
            mask: Mask {
                mode: self.mode,
                window: self.window,
                sinks: if self.window.is_some() { self.sinks } else { 0 },
            },
            inputs: MaskInputs {
                prefix_lens,
                doc_ids,
            },
        }
    }
}

fn arb_spec(max_len: usize) -> impl Strategy<Value = Spec> {
    (
        prop_oneof![
            Just(MaskMode::Causal),
            Just(MaskMode::Bidirectional),
            Just(MaskMode::PrefixLm)
        ],
        prop::option::of(1..7usize),
        0..3usize,
        any::<bool>(),
        prop::collection::vec((0..max_len, 0..max_len), 1..=3),
        (1..=2usize, 1..=3usize, prop::bool::weighted(0.2)),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(mode, window, sinks, varlen, lens, (hkv, group, wide), docs, seed)| Spec {
                mode,
                window,
                sinks,
                varlen,
                lens,
                hkv,
                group,
                dim: if wide { 128 } else { 64 },
                docs,
                seed,
            },
        )
}

/// Random q, k, v of a problem.
fn qkv(p: &Problem, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        random_f32(p.q_len(), seed),
        random_f32(p.kv_len(), seed ^ 0x1111),
        random_f32(p.kv_len(), seed ^ 0x2222),
    )
}

/// Norm weights near 1 (the trained range), `(D,)`.
fn norm_weight(d: usize, seed: u64) -> Vec<f32> {
    random_f32(d, seed).iter().map(|v| 1.0 + 0.2 * v).collect()
}

/// Explicit positions (packed-document style restarts) or the defaults.
fn positions(p: &Problem, explicit: bool, seed: u64) -> Positions {
    if !explicit {
        return Positions::default();
    }
    let mut rng = Mix(seed);
    let q = (0..p.seqs.total_q())
        .map(|_| rng.below(500) as i32)
        .collect();
    let k = (0..p.seqs.total_k())
        .map(|_| rng.below(500) as i32)
        .collect();
    Positions {
        q: Some(q),
        k: Some(k),
    }
}

/// The positions the reference uses by default: aligned query positions, key indices.
fn default_positions(p: &Problem) -> (Vec<i32>, Vec<i32>) {
    let (mut qp, mut kp) = (vec![0; p.seqs.total_q()], vec![0; p.seqs.total_k()]);
    for b in 0..p.seqs.batch() {
        let (q0, lq, k0, lk) = p.seqs.seq(b);
        for i in 0..lq {
            qp[q0 + i] = if lq <= lk { i + lk - lq } else { i } as i32;
        }
        for j in 0..lk {
            kp[k0 + j] = j as i32;
        }
    }
    (qp, kp)
}

fn resolved(p: &Problem, pos: &Positions) -> (Vec<i32>, Vec<i32>) {
    let (dq, dk) = default_positions(p);
    (pos.q.clone().unwrap_or(dq), pos.k.clone().unwrap_or(dk))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// The forward (output and lse) equals the brute-force f64 attention for random masks,
    /// windows, sinks, documents, prefixes, varlen batches, GQA groups and Lq != Lk, with and
    /// without the prologue (default or explicit positions).
    #[test]
    fn fwd_matches_naive(spec in arb_spec(10), prologue in any::<bool>(), explicit in any::<bool>()) {
        let p = spec.build();
        prop_assert!(p.validate().is_ok(), "{:?}: {:?}", spec, p.validate());
        let (q, k, v) = qkv(&p, spec.seed);
        let d = p.heads.dim;
        let (qn, kn) = (norm_weight(d, 7), norm_weight(d, 8));
        let pos = positions(&p, explicit, spec.seed);
        let (qp, kp) = resolved(&p, &pos);
        let pro = prologue.then_some(Prologue { q_norm: &qn, k_norm: &kn, norm_rope: NR, positions: &pos });
        let got = attention_fwd_ref(&p, &q, &k, &v, pro).unwrap();
        let (qn64, kn64) = (f64s(&qn), f64s(&kn));
        let npro = NaivePrologue { q_norm: &qn64, k_norm: &kn64, q_pos: &qp, k_pos: &kp };
        let (out, lse) = naive_fwd(&p, &f64s(&q), &f64s(&k), &f64s(&v), prologue.then_some(&npro));
        let (e, i) = max_rel_err(&got.out, &out);
        prop_assert!(e <= FWD_TOL, "out error {e:.3e} at {i}: {:?}", p);
        // lse is only defined for query tokens that exist; fixed and varlen fill every slot.
        let (e, i) = max_rel_err(&got.lse, &lse);
        prop_assert!(e <= FWD_TOL, "lse error {e:.3e} at {i}: {:?}", p);
    }

    /// Every probability row sums to 1, keys hidden by the mask get exactly 0 and visible
    /// keys a positive weight; the output is P·V and lse = ln(sum(exp(s))) of the same rows.
    #[test]
    fn probs_rows_and_lse_are_consistent(spec in arb_spec(12)) {
        let p = spec.build();
        let (q, k, v) = qkv(&p, spec.seed);
        let probs = attention_probs_ref(&p, &q, &k, None).unwrap();
        let fwd = attention_fwd_ref(&p, &q, &k, &v, None).unwrap();
        let (hq, hkv, d) = (p.heads.q, p.heads.kv, p.heads.dim);
        let scale = f64::from(p.heads.softmax_scale);
        let mut at = 0;
        for b in 0..p.seqs.batch() {
            let (q0, lq, k0, lk) = p.seqs.seq(b);
            for h in 0..hq {
                let g = h / (hq / hkv);
                for i in 0..lq {
                    let row = &probs[at..at + lk];
                    at += lk;
                    let sum: f64 = row.iter().map(|&x| f64::from(x)).sum();
                    prop_assert!((sum - 1.0).abs() < 1e-5, "row sum {sum}");
                    let mut z = 0.0f64;
                    for j in 0..lk {
                        if naive_visible(&p, b, i, j) {
                            prop_assert!(row[j] > 0.0, "visible key {j} of row {i} has weight 0");
                            let s: f64 = (0..d).map(|c| f64::from(q[((q0 + i) * hq + h) * d + c]) * f64::from(k[((k0 + j) * hkv + g) * d + c])).sum();
                            z += (s * scale).exp();
                        } else {
                            prop_assert_eq!(row[j], 0.0, "hidden key {} of row {} has weight", j, i);
                        }
                    }
                    let lse = fwd.lse[p.seqs.lse_index(hq, b, i, q0 + i, h)];
                    prop_assert!((f64::from(lse) - z.ln()).abs() < 1e-5 * (1.0 + z.ln().abs()), "lse {lse} vs {}", z.ln());
                    for c in 0..d {
                        let pv: f64 = (0..lk).map(|j| f64::from(row[j]) * f64::from(v[((k0 + j) * hkv + g) * d + c])).sum();
                        let o = f64::from(fwd.out[((q0 + i) * hq + h) * d + c]);
                        prop_assert!((o - pv).abs() < 1e-5, "out {o} vs P·V {pv}");
                    }
                }
            }
        }
        prop_assert_eq!(at, probs.len());
    }

    /// GQA equals multi-head attention on k/v repeated over each group, and its dk/dv are the
    /// group sums of the repeated problem's gradients.
    #[test]
    fn gqa_equals_repeated_kv(spec in arb_spec(8)) {
        let p = spec.build();
        let (q, k, v) = qkv(&p, spec.seed);
        let (hq, hkv, d) = (p.heads.q, p.heads.kv, p.heads.dim);
        let group = hq / hkv;
        let mut mha = p.clone();
        mha.heads.kv = hq;
        let repeat = |x: &[f32]| -> Vec<f32> {
            x.chunks(hkv * d).flat_map(|t| (0..hq).flat_map(move |h| t[(h / group) * d..][..d].iter().copied())).collect()
        };
        let (kr, vr) = (repeat(&k), repeat(&v));
        let a = attention_fwd_ref(&p, &q, &k, &v, None).unwrap();
        let b = attention_fwd_ref(&mha, &q, &kr, &vr, None).unwrap();
        prop_assert_eq!(&a, &b);
        let dout = random_f32(p.q_len(), spec.seed ^ 5);
        let ga = attention_bwd_ref(&p, &q, &k, &v, None, &a.out, Some(&a.lse), &dout).unwrap();
        let gb = attention_bwd_ref(&mha, &q, &kr, &vr, None, &b.out, Some(&b.lse), &dout).unwrap();
        prop_assert_eq!(&ga.dq, &gb.dq);
        let fold = |x: &[f32]| -> Vec<f64> {
            x.chunks(hq * d).flat_map(|t| (0..hkv * d).map(move |e| {
                let (g, c) = (e / d, e % d);
                (0..group).map(|r| f64::from(t[(g * group + r) * d + c])).sum::<f64>()
            })).collect()
        };
        let (e, _) = max_rel_err(&ga.dk, &fold(&gb.dk));
        prop_assert!(e < 1e-5, "dk error {e:.3e}");
        let (e, _) = max_rel_err(&ga.dv, &fold(&gb.dv));
        prop_assert!(e < 1e-5, "dv error {e:.3e}");
    }

    /// RoPE is a rotation of each (i, i + D/2) pair: pair norms equal those of the
    /// position-0 output (plain RMSNorm), and position 0 is x / rms(x) * weight.
    #[test]
    fn rope_preserves_pair_norms(tokens in 1..5usize, heads in 1..3usize, wide in any::<bool>(), seed in any::<u64>()) {
        let d = if wide { 128 } else { 64 };
        let x = random_f32(tokens * heads * d, seed);
        let w = norm_weight(d, seed ^ 1);
        let mut rng = Mix(seed);
        let pos: Vec<i32> = (0..tokens).map(|_| rng.below(100_000) as i32).collect();
        let y = qk_norm_rope_ref(&x, tokens, heads, d, &w, &NR, &pos).unwrap();
        let y0 = qk_norm_rope_ref(&x, tokens, heads, d, &w, &NR, &vec![0; tokens]).unwrap();
        for (row, xr) in x.chunks(d).enumerate() {
            let ms = xr.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + f64::from(NR.eps)).sqrt();
            for i in 0..d {
                let want = f64::from(xr[i]) * r * f64::from(w[i]);
                prop_assert!((f64::from(y0[row * d + i]) - want).abs() < 1e-6 * (1.0 + want.abs()));
            }
            for i in 0..d / 2 {
                let n = |v: &[f32]| f64::from(v[row * d + i]).hypot(f64::from(v[row * d + i + d / 2]));
                prop_assert!((n(&y) - n(&y0)).abs() < 1e-5 * (1.0 + n(&y0)), "pair {i} of row {row}");
            }
        }
    }
}

/// Shifting every query and key position by the same offset leaves the attention output
/// unchanged: RoPE scores depend only on relative positions.
#[test]
fn rope_scores_depend_on_relative_positions() {
    let p = Problem::fixed(Heads::new(2, 1, 64), 1, 5, 9, Mask::CAUSAL);
    let (q, k, v) = qkv(&p, 3);
    let (qn, kn) = (norm_weight(64, 1), norm_weight(64, 2));
    let (qp, kp) = default_positions(&p);
    let shifted = Positions {
        q: Some(qp.iter().map(|x| x + 1000).collect()),
        k: Some(kp.iter().map(|x| x + 1000).collect()),
    };
    let base = Positions::default();
    let run = |pos: &Positions| {
        attention_fwd_ref(
            &p,
            &q,
            &k,
            &v,
            Some(Prologue {
                q_norm: &qn,
                k_norm: &kn,
                norm_rope: NR,
                positions: pos,
            }),
        )
        .unwrap()
    };
    let (a, b) = (run(&base), run(&shifted));
    assert_close("out", &a.out, &f64s(&b.out), 1e-4);
    assert_close("lse", &a.lse, &f64s(&b.lse), 1e-4);
}

/// With Lq < Lk the queries are the last Lq positions (bottom-right alignment): the rows
/// equal the last Lq rows of the Lq = Lk problem, for every mode with a window and sinks.
#[test]
fn lq_below_lk_is_the_suffix_of_the_full_problem() {
    let (lq, lk) = (4, 11);
    for mask in [
        Mask::CAUSAL,
        Mask::sliding(3, 2),
        Mask {
            mode: MaskMode::Bidirectional,
            window: Some(4),
            sinks: 1,
        },
    ] {
        let full = Problem::fixed(Heads::new(4, 2, 64), 2, lk, lk, mask);
        let (qf, k, v) = qkv(&full, 11);
        let part = Problem::fixed(Heads::new(4, 2, 64), 2, lq, lk, mask);
        let row = 4 * 64; // Hq * D
        let q: Vec<f32> = qf
            .chunks(lk * row)
            .flat_map(|s| s[(lk - lq) * row..].iter().copied())
            .collect();
        let a = attention_fwd_ref(&part, &q, &k, &v, None).unwrap();
        let b = attention_fwd_ref(&full, &qf, &k, &v, None).unwrap();
        let want: Vec<f32> = b
            .out
            .chunks(lk * row)
            .flat_map(|s| s[(lk - lq) * row..].iter().copied())
            .collect();
        assert_eq!(a.out, want, "{mask:?}");
        // lse (B, Hq, L): the last lq entries of each (b, h) row.
        let want: Vec<f32> = b
            .lse
            .chunks(lk)
            .flat_map(|s| s[lk - lq..].iter().copied())
            .collect();
        assert_eq!(a.lse, want, "{mask:?}");
    }
}

/// A varlen batch equals each of its sequences run alone as a fixed batch of one, with lse
/// moved from `(Hq, total_q)` to `(1, Hq, Lq)`; empty query sequences are allowed.
#[test]
fn varlen_equals_each_sequence_alone() {
    let lens = [(3, 7), (0, 4), (5, 5), (1, 9)];
    let mut cu_q = vec![0];
    let mut cu_k = vec![0];
    for (lq, lk) in lens {
        cu_q.push(cu_q.last().unwrap() + lq);
        cu_k.push(cu_k.last().unwrap() + lk);
    }
    let heads = Heads::new(4, 2, 64);
    let p = Problem {
        heads,
        seqs: Seqs::Varlen { cu_q, cu_k },
        mask: Mask::sliding(4, 1),
        inputs: MaskInputs::default(),
    };
    let (q, k, v) = qkv(&p, 21);
    let all = attention_fwd_ref(&p, &q, &k, &v, None).unwrap();
    let dout = random_f32(p.q_len(), 22);
    let g = attention_bwd_ref(&p, &q, &k, &v, None, &all.out, None, &dout).unwrap();
    let (qr, kr) = (4 * 64, 2 * 64);
    for (b, &(lq, lk)) in lens.iter().enumerate() {
        if lq == 0 {
            continue;
        }
        let (q0, _, k0, _) = p.seqs.seq(b);
        let one = Problem::fixed(heads, 1, lq as usize, lk as usize, p.mask);
        let qs = &q[q0 * qr..][..lq as usize * qr];
        let (ks, vs) = (
            &k[k0 * kr..][..lk as usize * kr],
            &v[k0 * kr..][..lk as usize * kr],
        );
        let r = attention_fwd_ref(&one, qs, ks, vs, None).unwrap();
        assert_eq!(&all.out[q0 * qr..][..r.out.len()], &r.out[..], "out of {b}");
        for h in 0..4 {
            for i in 0..lq as usize {
                assert_eq!(
                    all.lse[p.seqs.lse_index(4, b, i, q0 + i, h)],
                    r.lse[h * lq as usize + i]
                );
            }
        }
        let gs = attention_bwd_ref(
            &one,
            qs,
            ks,
            vs,
            None,
            &r.out,
            None,
            &dout[q0 * qr..][..r.out.len()],
        )
        .unwrap();
        assert_eq!(&g.dq[q0 * qr..][..gs.dq.len()], &gs.dq[..], "dq of {b}");
        assert_eq!(&g.dk[k0 * kr..][..gs.dk.len()], &gs.dk[..], "dk of {b}");
        assert_eq!(&g.dv[k0 * kr..][..gs.dv.len()], &gs.dv[..], "dv of {b}");
    }
    // The keys of the query-less sequence get no gradient.
    let (_, _, k0, lk) = p.seqs.seq(1);
    assert!(g.dk[k0 * kr..(k0 + lk) * kr].iter().all(|&x| x == 0.0));
}

/// The visibility of small masks is the table DESIGN.md section 4 describes (rows are
/// queries, columns keys, `#` visible), through the probabilities of the reference.
#[test]
fn mask_patterns_match_design_tables() {
    let cases: [(&str, Problem, &[&str]); 5] = [
        (
            "causal, Lq = 3 < Lk = 5 (bottom-right)",
            Problem::fixed(Heads::new(1, 1, 64), 1, 3, 5, Mask::CAUSAL),
            &["###..", "####.", "#####"],
        ),
        (
            "sliding window 2 with 1 sink",
            Problem::fixed(Heads::new(1, 1, 64), 1, 5, 5, Mask::sliding(2, 1)),
            &["#....", "##...", "###..", "#.##.", "#..##"],
        ),
        (
            "prefix-LM with prefix 3",
            Problem {
                inputs: MaskInputs {
                    prefix_lens: Some(vec![3]),
                    doc_ids: None,
                },
                ..Problem::fixed(
                    Heads::new(1, 1, 64),
                    1,
                    5,
                    5,
                    Mask {
                        mode: MaskMode::PrefixLm,
                        window: None,
                        sinks: 0,
                    },
                )
            },
            &["###..", "###..", "###..", "####.", "#####"],
        ),
        (
            "causal documents [0, 0, 1, 1, 1]",
            Problem {
                inputs: MaskInputs {
                    prefix_lens: None,
                    doc_ids: Some(vec![0, 0, 1, 1, 1]),
                },
                ..Problem::fixed(Heads::new(1, 1, 64), 1, 5, 5, Mask::CAUSAL)
            },
            &["#....", "##...", "..#..", "..##.", "..###"],
        ),
        (
            "bidirectional window 2",
            Problem::fixed(
                Heads::new(1, 1, 64),
                1,
                4,
                4,
                Mask {
                    mode: MaskMode::Bidirectional,
                    window: Some(2),
                    sinks: 0,
                },
            ),
            &["##..", "###.", ".###", "..##"],
        ),
    ];
    for (name, p, table) in cases {
        let (q, k, _) = qkv(&p, 1);
        let probs = attention_probs_ref(&p, &q, &k, None).unwrap();
        let (_, _, _, lk) = p.seqs.seq(0);
        let got: Vec<String> = probs
            .chunks(lk)
            .map(|r| r.iter().map(|&x| if x > 0.0 { '#' } else { '.' }).collect())
            .collect();
        assert_eq!(got, table, "{name}");
    }
}

// ---------------------------------------------------------------------------------------
// Gradients against f64 central differences of the naive attention.
// ---------------------------------------------------------------------------------------

/// `sum(c ∘ naive_out)` of f64 inputs.
struct Loss<'a> {
    p: &'a Problem,
    c: Vec<f64>,
    pos: (Vec<i32>, Vec<i32>),
    prologue: bool,
}

impl Loss<'_> {
    /// Inputs: [q, k, v, q_norm, k_norm].
    fn eval(&self, x: &[Vec<f64>; 5]) -> f64 {
        let pro = NaivePrologue {
            q_norm: &x[3],
            k_norm: &x[4],
            q_pos: &self.pos.0,
            k_pos: &self.pos.1,
        };
        let (out, _) = naive_fwd(self.p, &x[0], &x[1], &x[2], self.prologue.then_some(&pro));
        out.iter().zip(&self.c).map(|(o, c)| o * c).sum()
    }
}

/// Checks analytic gradient `g` of input `which` against central differences at up to
/// `samples` evenly spread indices; `g` must also be far from zero (a real check).
fn check_grad(loss: &Loss<'_>, x: &mut [Vec<f64>; 5], which: usize, g: &[f32], name: &str) {
    const H: f64 = 1e-4;
    let gmax = g.iter().fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
    assert!(gmax > 1e-3, "{name}: gradient is ~0 (max {gmax:.3e})");
    let n = x[which].len();
    let samples = 48.min(n);
    for s in 0..samples {
        let i = s * n / samples + (s * 7) % (n / samples).max(1);
        let orig = x[which][i];
        x[which][i] = orig + H;
        let up = loss.eval(x);
        x[which][i] = orig - H;
        let down = loss.eval(x);
        x[which][i] = orig;
        let fd = (up - down) / (2.0 * H);
        let err = (fd - f64::from(g[i])).abs();
        assert!(
            err <= 2e-4 * gmax + 1e-6,
            "{name}[{i}]: analytic {} vs finite difference {fd} (max |g| {gmax:.3e})",
            g[i]
        );
    }
}

/// Small problems covering every mask feature, for the gradient checks.
fn grad_cases() -> Vec<(&'static str, Problem)> {
    let prefix = Problem {
        seqs: Seqs::Varlen {
            cu_q: vec![0, 3, 7],
            cu_k: vec![0, 5, 9],
        },
        mask: Mask {
            mode: MaskMode::PrefixLm,
            window: None,
            sinks: 0,
        },
        inputs: MaskInputs {
            prefix_lens: Some(vec![2, 3]),
            doc_ids: Some(vec![0, 0, 0, 1, 1, 4, 4, 5, 5]),
        },
        heads: Heads::new(2, 1, 64),
    };
    vec![
        (
            "causal GQA 4/2, Lq 3 < Lk 5",
            Problem::fixed(Heads::new(4, 2, 64), 2, 3, 5, Mask::CAUSAL),
        ),
        ("varlen prefix-LM with documents", prefix),
        (
            "sliding window 2 + 1 sink, D = 128",
            Problem::fixed(Heads::new(2, 2, 128), 1, 6, 6, Mask::sliding(2, 1)),
        ),
        (
            "bidirectional Lq 5 > Lk 3",
            Problem::fixed(Heads::new(2, 1, 64), 1, 5, 3, Mask::BIDIRECTIONAL),
        ),
    ]
}

/// dq, dk, dv of the reference equal f64 central differences of the naive attention for
/// every mask feature, with or without the lse passed in.
#[test]
fn gradients_match_finite_differences() {
    for (name, p) in grad_cases() {
        let (q, k, v) = qkv(&p, 31);
        let c = random_f32(p.q_len(), 32);
        let fwd = attention_fwd_ref(&p, &q, &k, &v, None).unwrap();
        let g = attention_bwd_ref(&p, &q, &k, &v, None, &fwd.out, Some(&fwd.lse), &c).unwrap();
        let g2 = attention_bwd_ref(&p, &q, &k, &v, None, &fwd.out, None, &c).unwrap();
        for (a, b) in [(&g.dq, &g2.dq), (&g.dk, &g2.dk), (&g.dv, &g2.dv)] {
            assert_close(name, a, &f64s(b), 1e-5);
        }
        assert!(g.dq_norm.is_none() && g.dk_norm.is_none());
        let loss = Loss {
            p: &p,
            c: f64s(&c),
            pos: (vec![], vec![]),
            prologue: false,
        };
        let mut x = [f64s(&q), f64s(&k), f64s(&v), vec![], vec![]];
        check_grad(&loss, &mut x, 0, &g.dq, &format!("{name}: dq"));
        check_grad(&loss, &mut x, 1, &g.dk, &format!("{name}: dk"));
        check_grad(&loss, &mut x, 2, &g.dv, &format!("{name}: dv"));
    }
}

/// With the prologue, the gradients with respect to the raw q and k, v, and both norm
/// weights equal f64 central differences (default and explicit positions).
#[test]
fn prologue_gradients_match_finite_differences() {
    for (explicit, (name, p)) in [false, true].into_iter().zip(grad_cases()) {
        let (q, k, v) = qkv(&p, 41);
        let d = p.heads.dim;
        let (qn, kn) = (norm_weight(d, 42), norm_weight(d, 43));
        let pos = positions(&p, explicit, 44);
        let pro = Prologue {
            q_norm: &qn,
            k_norm: &kn,
            norm_rope: NR,
            positions: &pos,
        };
        let c = random_f32(p.q_len(), 45);
        let fwd = attention_fwd_ref(&p, &q, &k, &v, Some(pro)).unwrap();
        let g = attention_bwd_ref(&p, &q, &k, &v, Some(pro), &fwd.out, Some(&fwd.lse), &c).unwrap();
        let loss = Loss {
            p: &p,
            c: f64s(&c),
            pos: resolved(&p, &pos),
            prologue: true,
        };
        let mut x = [f64s(&q), f64s(&k), f64s(&v), f64s(&qn), f64s(&kn)];
        check_grad(&loss, &mut x, 0, &g.dq, &format!("{name}: raw dq"));
        check_grad(&loss, &mut x, 1, &g.dk, &format!("{name}: raw dk"));
        check_grad(&loss, &mut x, 2, &g.dv, &format!("{name}: dv"));
        let dqn = g.dq_norm.as_ref().expect("dq_norm with a prologue");
        let dkn = g.dk_norm.as_ref().expect("dk_norm with a prologue");
        check_grad(&loss, &mut x, 3, dqn, &format!("{name}: dq_norm"));
        check_grad(&loss, &mut x, 4, dkn, &format!("{name}: dk_norm"));
    }
}

/// `qk_norm_rope_bwd_ref` equals f64 central differences of the prologue alone, for dx and
/// the weight gradient.
#[test]
fn qk_norm_rope_bwd_matches_finite_differences() {
    let (tokens, heads, d) = (3, 2, 64);
    let x = random_f32(tokens * heads * d, 51);
    let w = norm_weight(d, 52);
    let pos = [0, 17, 4000];
    let dy = random_f32(x.len(), 53);
    let (dx, dw) = qk_norm_rope_bwd_ref(&x, tokens, heads, d, &w, &NR, &pos, &dy).unwrap();
    let loss = |x: &[f64], w: &[f64]| -> f64 {
        naive_norm_rope(x, heads, d, w, &pos)
            .iter()
            .zip(&dy)
            .map(|(y, &c)| y * f64::from(c))
            .sum()
    };
    let (mut x64, mut w64) = (f64s(&x), f64s(&w));
    let h = 1e-4;
    for (i, &g) in dx.iter().enumerate() {
        let o = x64[i];
        x64[i] = o + h;
        let up = loss(&x64, &w64);
        x64[i] = o - h;
        let down = loss(&x64, &w64);
        x64[i] = o;
        let fd = (up - down) / (2.0 * h);
        assert!((fd - f64::from(g)).abs() < 1e-4, "dx[{i}]: {g} vs {fd}");
    }
    for (i, &g) in dw.iter().enumerate() {
        let o = w64[i];
        w64[i] = o + h;
        let up = loss(&x64, &w64);
        w64[i] = o - h;
        let down = loss(&x64, &w64);
        w64[i] = o;
        let fd = (up - down) / (2.0 * h);
        assert!(
            (fd - f64::from(g)).abs() < 1e-4,
            "dweight[{i}]: {g} vs {fd}"
        );
    }
}

/// The backward reads the given lse (as the kernels do): shifting it scales every
/// probability, so the gradients change.
#[test]
fn bwd_uses_the_given_lse() {
    let p = Problem::fixed(Heads::new(2, 1, 64), 1, 4, 4, Mask::CAUSAL);
    let (q, k, v) = qkv(&p, 61);
    let fwd = attention_fwd_ref(&p, &q, &k, &v, None).unwrap();
    let dout = random_f32(p.q_len(), 62);
    let a = attention_bwd_ref(&p, &q, &k, &v, None, &fwd.out, Some(&fwd.lse), &dout).unwrap();
    let shifted: Vec<f32> = fwd.lse.iter().map(|x| x + 1.0).collect();
    let b = attention_bwd_ref(&p, &q, &k, &v, None, &fwd.out, Some(&shifted), &dout).unwrap();
    assert_ne!(a.dv, b.dv);
    // exp(-1) scales P, hence dv, exactly up to rounding.
    let want: Vec<f64> =
        a.dv.iter()
            .map(|&x| f64::from(x) * (-1.0f64).exp())
            .collect();
    assert_close("dv", &b.dv, &want, 1e-6);
}

/// Larger shapes (L in the hundreds, D = 128, GQA, window + sinks + documents) still match
/// the naive attention, the sizes the kernels' conformance tests use.
#[test]
fn fwd_matches_naive_at_hundreds_of_tokens() {
    let (lq, lk) = (150, 300);
    let mut p = Problem::fixed(Heads::new(4, 2, 128), 1, lq, lk, Mask::sliding(64, 4));
    p.inputs.doc_ids = Some((0..lk as i32).map(|t| t / 100).collect());
    let (q, k, v) = qkv(&p, 71);
    let got = attention_fwd_ref(&p, &q, &k, &v, None).unwrap();
    let (out, lse) = naive_fwd(&p, &f64s(&q), &f64s(&k), &f64s(&v), None);
    assert_close("out", &got.out, &out, FWD_TOL);
    assert_close("lse", &got.lse, &lse, FWD_TOL);
}

// ---------------------------------------------------------------------------------------
// Errors: every bad input is rejected before computing, naming actual and expected values.
// ---------------------------------------------------------------------------------------

/// The forward's error for `p` with inputs of the right lengths (or `q_len`/`kv_len` given).
fn fwd_err(p: &Problem) -> AttnError {
    let q = vec![0.5; p.q_len()];
    let kv = vec![0.5; p.kv_len()];
    attention_fwd_ref(p, &q, &kv, &kv, None).expect_err("bad problem accepted")
}

/// Asserts that `msg` names every one of `parts`.
fn names(msg: &str, parts: &[&str]) {
    for part in parts {
        assert!(msg.contains(part), "message {msg:?} does not name {part:?}");
    }
}

fn causal(b: usize, lq: usize, lk: usize) -> Problem {
    Problem::fixed(Heads::new(4, 2, 64), b, lq, lk, Mask::CAUSAL)
}

fn varlen(cu_q: Vec<i32>, cu_k: Vec<i32>) -> Problem {
    Problem {
        heads: Heads::new(2, 1, 64),
        seqs: Seqs::Varlen { cu_q, cu_k },
        mask: Mask::CAUSAL,
        inputs: MaskInputs::default(),
    }
}

/// q, k, v, out, dout and lse of the wrong length are Shape errors naming both lengths and
/// the shapes they come from.
#[test]
fn wrong_lengths_are_shape_errors() {
    let p = causal(2, 3, 5);
    let (q, k, v) = qkv(&p, 1);
    let e = attention_fwd_ref(&p, &q[1..], &k, &v, None).unwrap_err();
    assert!(matches!(
        e,
        AttnError::Shape {
            what: "q",
            actual: 1535,
            expected: 1536,
            ..
        }
    ));
    names(
        &e.to_string(),
        &["1535", "1536", "total_q=6", "Hq=4", "D=64"],
    );
    let e = attention_fwd_ref(&p, &q, &k, &v[..10], None).unwrap_err();
    assert!(matches!(
        e,
        AttnError::Shape {
            what: "v",
            actual: 10,
            expected: 1280,
            ..
        }
    ));
    names(&e.to_string(), &["10", "1280", "total_k=10", "Hkv=2"]);
    let fwd = attention_fwd_ref(&p, &q, &k, &v, None).unwrap();
    let e = attention_bwd_ref(&p, &q, &k, &v, None, &fwd.out[1..], None, &fwd.out).unwrap_err();
    assert!(matches!(e, AttnError::Shape { what: "out", .. }), "{e}");
    let e = attention_bwd_ref(&p, &q, &k, &v, None, &fwd.out, None, &fwd.out[2..]).unwrap_err();
    assert!(matches!(e, AttnError::Shape { what: "dout", .. }), "{e}");
    let e = attention_bwd_ref(
        &p,
        &q,
        &k,
        &v,
        None,
        &fwd.out,
        Some(&fwd.lse[1..]),
        &fwd.out,
    )
    .unwrap_err();
    assert!(matches!(
        e,
        AttnError::Shape {
            what: "lse",
            actual: 23,
            expected: 24,
            ..
        }
    ));
    names(&e.to_string(), &["23", "24"]);
}

/// Hq not a multiple of Hkv, Hkv = 0 and unsupported head dims are Heads errors naming them.
#[test]
fn bad_heads_are_errors() {
    let e = fwd_err(&Problem::fixed(Heads::new(3, 2, 64), 1, 2, 2, Mask::CAUSAL));
    assert!(matches!(e, AttnError::Heads(_)));
    names(&e.to_string(), &["Hq = 3", "Hkv = 2", "multiple"]);
    let e = fwd_err(&Problem::fixed(Heads::new(2, 0, 64), 1, 2, 2, Mask::CAUSAL));
    assert!(matches!(e, AttnError::Heads(_)));
    names(&e.to_string(), &["Hkv = 0"]);
    let e = fwd_err(&Problem::fixed(Heads::new(2, 1, 96), 1, 2, 2, Mask::CAUSAL));
    assert!(matches!(e, AttnError::Heads(_)));
    names(&e.to_string(), &["96", "[64, 128]"]);
    let mut h = Heads::new(2, 1, 64);
    h.softmax_scale = f32::NAN;
    let e = fwd_err(&Problem::fixed(h, 1, 2, 2, Mask::CAUSAL));
    names(&e.to_string(), &["NaN", "> 0"]);
}

/// Malformed cu_seqlens (not starting at 0, decreasing, too short, mismatched, a sequence
/// with queries but no keys, totals exceeding the buffers) are errors naming the offsets.
#[test]
fn bad_cu_seqlens_are_errors() {
    let e = fwd_err(&varlen(vec![1, 3], vec![0, 3]));
    assert!(matches!(e, AttnError::Layout(_)));
    names(&e.to_string(), &["cu_seqlens_q[0] is 1", "expected 0"]);
    let e = fwd_err(&varlen(vec![0, 4, 2], vec![0, 4, 6]));
    assert!(matches!(e, AttnError::Layout(_)));
    names(&e.to_string(), &["non-decreasing", "[2] = 2", "[1] = 4"]);
    let e = fwd_err(&varlen(vec![0], vec![0]));
    assert!(matches!(e, AttnError::Layout(_)));
    names(&e.to_string(), &["1 entries", "B + 1 >= 2"]);
    let e = fwd_err(&varlen(vec![0, 2], vec![0, 2, 4]));
    names(&e.to_string(), &["2 entries", "3"]);
    let e = fwd_err(&varlen(vec![0, 2, 3], vec![0, 2, 2]));
    names(&e.to_string(), &["sequence 1", "1 queries but 0 keys"]);
    // Offsets ending past the buffers: q sized for 3 tokens while cu_seqlens_q ends at 5.
    let p = varlen(vec![0, 5], vec![0, 5]);
    let (q, kv) = (vec![0.5; 3 * 2 * 64], vec![0.5; 5 * 64]);
    let e = attention_fwd_ref(&p, &q, &kv, &kv, None).unwrap_err();
    assert!(matches!(
        e,
        AttnError::Shape {
            what: "q",
            actual: 384,
            expected: 640,
            ..
        }
    ));
    names(&e.to_string(), &["384", "640", "total_q=5"]);
}

/// Window 0, sinks without a window, causal Lq > Lk and a zero-length fixed batch are
/// errors naming the values.
#[test]
fn bad_masks_are_errors() {
    let mut p = causal(1, 4, 4);
    p.mask.window = Some(0);
    let e = fwd_err(&p);
    assert!(matches!(e, AttnError::Mask(_)));
    names(&e.to_string(), &["window is 0", ">= 1"]);
    p.mask = Mask {
        mode: MaskMode::Causal,
        window: None,
        sinks: 2,
    };
    let e = fwd_err(&p);
    assert!(matches!(e, AttnError::Mask(_)));
    names(&e.to_string(), &["sinks is 2", "no sliding window"]);
    let e = fwd_err(&causal(1, 5, 3));
    assert!(matches!(e, AttnError::Layout(_)));
    names(&e.to_string(), &["Lq = 5", "Lk = 3", "Lq <= Lk"]);
    let e = fwd_err(&causal(1, 0, 3));
    names(&e.to_string(), &["Lq = 0", ">= 1"]);
}

/// Prefix lengths longer than the sequence, missing for prefix-LM, given with another mode
/// or of the wrong count are Mask errors naming the values.
#[test]
fn bad_prefix_lens_are_errors() {
    let mut p = causal(2, 3, 4);
    p.mask.mode = MaskMode::PrefixLm;
    let e = fwd_err(&p);
    assert!(matches!(e, AttnError::Mask(_)));
    names(&e.to_string(), &["PrefixLm", "prefix_lens", "B = 2"]);
    p.inputs.prefix_lens = Some(vec![1, 5]);
    let e = fwd_err(&p);
    assert!(matches!(e, AttnError::Mask(_)));
    names(&e.to_string(), &["prefix_lens[1] is 5", "Lk = 4"]);
    p.inputs.prefix_lens = Some(vec![1]);
    names(&fwd_err(&p).to_string(), &["1 entries", "B = 2"]);
    p.inputs.prefix_lens = Some(vec![1, 2]);
    p.mask.mode = MaskMode::Causal;
    let e = fwd_err(&p);
    assert!(matches!(e, AttnError::Mask(_)));
    names(
        &e.to_string(),
        &["prefix_lens given", "Causal", "expected PrefixLm"],
    );
}

/// Decreasing or wrongly sized document ids are errors naming the offending entries.
#[test]
fn bad_doc_ids_are_errors() {
    let mut p = causal(2, 3, 3);
    p.inputs.doc_ids = Some(vec![0, 0, 1, 2, 1, 3]);
    let e = fwd_err(&p);
    assert!(matches!(e, AttnError::Layout(_)));
    names(
        &e.to_string(),
        &["sequence 1", "doc_ids[4] = 1", "doc_ids[3] = 2"],
    );
    p.inputs.doc_ids = Some(vec![0; 5]);
    let e = fwd_err(&p);
    assert!(matches!(
        e,
        AttnError::Shape {
            what: "doc_ids",
            actual: 5,
            expected: 6,
            ..
        }
    ));
    // A new sequence may restart the ids: only order within a sequence matters.
    p.inputs.doc_ids = Some(vec![3, 3, 4, 0, 1, 1]);
    let (q, k, v) = qkv(&p, 1);
    attention_fwd_ref(&p, &q, &k, &v, None).unwrap();
}

/// Prologue inputs: negative or wrongly sized positions, norm weights of the wrong length,
/// eps 0 and theta <= 1 are errors naming the values.
#[test]
fn bad_prologue_inputs_are_errors() {
    let p = causal(1, 2, 3);
    let (q, k, v) = qkv(&p, 1);
    let (qn, kn) = (norm_weight(64, 1), norm_weight(64, 2));
    let run = |pos: &Positions, qn: &[f32], nr: NormRope| {
        attention_fwd_ref(
            &p,
            &q,
            &k,
            &v,
            Some(Prologue {
                q_norm: qn,
                k_norm: &kn,
                norm_rope: nr,
                positions: pos,
            }),
        )
        .unwrap_err()
    };
    let neg = Positions {
        q: None,
        k: Some(vec![0, -3, 2]),
    };
    let e = run(&neg, &qn, NR);
    assert!(matches!(e, AttnError::Layout(_)));
    names(&e.to_string(), &["positions.k[1] is -3", ">= 0"]);
    let short = Positions {
        q: Some(vec![0]),
        k: None,
    };
    let e = run(&short, &qn, NR);
    assert!(matches!(
        e,
        AttnError::Shape {
            what: "positions.q",
            actual: 1,
            expected: 2,
            ..
        }
    ));
    let e = run(&Positions::default(), &qn[..63], NR);
    assert!(matches!(
        e,
        AttnError::Shape {
            what: "q_norm",
            actual: 63,
            expected: 64,
            ..
        }
    ));
    names(&e.to_string(), &["63", "64"]);
    let e = run(&Positions::default(), &qn, NormRope { eps: 0.0, ..NR });
    assert!(
        matches!(
            e,
            AttnError::Param {
                what: "QK-Norm eps",
                ..
            }
        ),
        "{e:?}"
    );
    names(&e.to_string(), &["eps is 0", "> 0"]);
    let e = run(
        &Positions::default(),
        &qn,
        NormRope {
            rope_theta: 1.0,
            ..NR
        },
    );
    assert!(
        matches!(
            e,
            AttnError::Param {
                what: "rope_theta",
                ..
            }
        ),
        "{e:?}"
    );
    names(&e.to_string(), &["rope_theta is 1", "> 1"]);
}

/// The standalone prologue rejects odd or zero dims, wrong lengths, negative positions and
/// non-finite values, naming them.
#[test]
fn bad_qk_norm_rope_args_are_errors() {
    let x = random_f32(2 * 3 * 64, 1);
    let w = norm_weight(64, 2);
    let e = qk_norm_rope_ref(&x, 2, 3, 63, &w, &NR, &[0, 1]).unwrap_err();
    assert!(matches!(e, AttnError::Heads(_)));
    names(&e.to_string(), &["D = 63", "even"]);
    let e = qk_norm_rope_ref(&x, 2, 4, 64, &w, &NR, &[0, 1]).unwrap_err();
    assert!(matches!(
        e,
        AttnError::Shape {
            what: "x",
            actual: 384,
            expected: 512,
            ..
        }
    ));
    names(&e.to_string(), &["384", "512", "heads=4"]);
    let e = qk_norm_rope_ref(&x, 2, 3, 64, &w, &NR, &[0]).unwrap_err();
    assert!(matches!(
        e,
        AttnError::Shape {
            what: "positions",
            actual: 1,
            expected: 2,
            ..
        }
    ));
    let e = qk_norm_rope_ref(&x, 2, 3, 64, &w[1..], &NR, &[0, 1]).unwrap_err();
    assert!(matches!(
        e,
        AttnError::Shape {
            what: "weight",
            actual: 63,
            expected: 64,
            ..
        }
    ));
    let e = qk_norm_rope_ref(&x, 2, 3, 64, &w, &NR, &[0, -1]).unwrap_err();
    names(&e.to_string(), &["positions[1] is -1", ">= 0"]);
    let mut bad = x.clone();
    bad[5] = f32::INFINITY;
    let e = qk_norm_rope_ref(&bad, 2, 3, 64, &w, &NR, &[0, 1]).unwrap_err();
    assert!(matches!(
        e,
        AttnError::NonFinite {
            what: "x",
            index: 5,
            ..
        }
    ));
    let e = qk_norm_rope_bwd_ref(&x, 2, 3, 64, &w, &NR, &[0, 1], &x[1..]).unwrap_err();
    assert!(matches!(e, AttnError::Shape { what: "dy", .. }));
    let e = qk_norm_rope_bwd_ref(&x, 2, 3, 64, &w, &NR, &[0, 1], &bad).unwrap_err();
    assert!(matches!(
        e,
        AttnError::NonFinite {
            what: "dy",
            index: 5,
            ..
        }
    ));
}

/// A NaN or infinity in any input of any entry point is a NonFinite error naming the
/// argument, the first index and the value.
#[test]
fn non_finite_inputs_are_errors() {
    let p = causal(1, 3, 3);
    let (q, k, v) = qkv(&p, 1);
    let (qn, kn) = (norm_weight(64, 1), norm_weight(64, 2));
    let pos = Positions::default();
    let fwd = attention_fwd_ref(&p, &q, &k, &v, None).unwrap();
    let poison = |x: &[f32], i: usize, val: f32| {
        let mut x = x.to_vec();
        x[i] = val;
        x
    };
    let check = |e: AttnError, what: &str, index: usize| {
        match &e {
            AttnError::NonFinite {
                what: w, index: i, ..
            } => {
                assert_eq!((*w, *i), (what, index), "{e}")
            }
            other => panic!("expected NonFinite for {what}, got {other:?}"),
        }
        names(&e.to_string(), &[what, &index.to_string()]);
    };
    let nq = poison(&q, 7, f32::NAN);
    check(
        attention_fwd_ref(&p, &nq, &k, &v, None).unwrap_err(),
        "q",
        7,
    );
    check(attention_probs_ref(&p, &nq, &k, None).unwrap_err(), "q", 7);
    let nk = poison(&k, 3, f32::INFINITY);
    check(
        attention_fwd_ref(&p, &q, &nk, &v, None).unwrap_err(),
        "k",
        3,
    );
    let nv = poison(&v, 0, f32::NEG_INFINITY);
    check(
        attention_fwd_ref(&p, &q, &k, &nv, None).unwrap_err(),
        "v",
        0,
    );
    let nqn = poison(&qn, 9, f32::NAN);
    let pro = Prologue {
        q_norm: &nqn,
        k_norm: &kn,
        norm_rope: NR,
        positions: &pos,
    };
    check(
        attention_fwd_ref(&p, &q, &k, &v, Some(pro)).unwrap_err(),
        "q_norm",
        9,
    );
    let bwd = |out: &[f32], lse: &[f32], dout: &[f32]| {
        attention_bwd_ref(&p, &q, &k, &v, None, out, Some(lse), dout).unwrap_err()
    };
    check(
        bwd(&poison(&fwd.out, 2, f32::NAN), &fwd.lse, &fwd.out),
        "out",
        2,
    );
    check(
        bwd(&fwd.out, &poison(&fwd.lse, 1, f32::NAN), &fwd.out),
        "lse",
        1,
    );
    check(
        bwd(&fwd.out, &fwd.lse, &poison(&fwd.out, 4, f32::NAN)),
        "dout",
        4,
    );
}

/// Sizes whose token or element counts overflow are errors naming them, not panics.
#[test]
fn huge_sizes_are_errors_not_panics() {
    let e = fwd_err_unchecked(&causal(usize::MAX / 2, 3, 4));
    assert!(matches!(e, AttnError::Layout(_)));
    names(&e.to_string(), &["i32 offsets", &i32::MAX.to_string()]);
    let e = fwd_err_unchecked(&Problem::fixed(
        Heads::new(usize::MAX / 64, 1, 64),
        1,
        2,
        2,
        Mask::CAUSAL,
    ));
    assert!(matches!(e, AttnError::Layout(_)));
    names(&e.to_string(), &["usize", "D = 64"]);
}

/// The forward's error for `p` without allocating inputs of its (possibly absurd) size.
fn fwd_err_unchecked(p: &Problem) -> AttnError {
    attention_fwd_ref(p, &[], &[], &[], None).expect_err("bad problem accepted")
}
