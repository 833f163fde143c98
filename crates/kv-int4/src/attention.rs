//! CPU reference of decode attention over the cache: dequantize the visible tokens, then
//! plain attention accumulated in f64. The CUDA kernels are checked against it.

use crate::blocks::{is_visible, SeqId};
use crate::cache::{check_len, CpuKvCache};
use crate::{KvError, Result};

/// Query-head grouping of a decode call: `heads_q` query heads over the cache's `heads_kv`
/// KV heads; query head `i` reads KV head `i / (heads_q / heads_kv)`.
pub fn gqa_group(heads_q: usize, heads_kv: usize) -> Result<usize> {
    if heads_q == 0 || heads_q % heads_kv != 0 {
        return Err(KvError::ShapeMismatch {
            what: "query heads (must be a positive multiple of heads_kv)",
            actual: heads_q,
            expected: heads_kv * (heads_q / heads_kv).max(1),
        });
    }
    Ok(heads_q / heads_kv)
}

/// Decode attention of one query token per sequence, CPU reference.
///
/// * `q` `(B, heads_q, head_dim)` f32, `B = seqs.len()`; the query of sequence `b` sits at
///   position `len_b - 1` (its own K/V were appended before the call);
/// * keys visible under the cache's window rule ([`is_visible`]);
/// * returns `(B, heads_q, head_dim)` f32: `softmax(q · kᵀ * softmax_scale) · v`, with K and
///   V dequantized from the pages exactly as stored, accumulated in f64.
pub fn decode_attention_ref(
    cache: &CpuKvCache,
    layer: usize,
    seqs: &[SeqId],
    q: &[f32],
    heads_q: usize,
    softmax_scale: f32,
) -> Result<Vec<f32>> {
    let cfg = cache.config();
    let (hkv, d) = (cfg.heads_kv, cfg.head_dim);
    let group = gqa_group(heads_q, hkv)?;
    let b = seqs.len();
    check_len("q", q.len(), b * heads_q * d, || {
        format!("(B={b}, heads_q={heads_q}, head_dim={d})")
    })?;
    for &s in seqs {
        cache.blocks().check_readable(s, layer)?;
    }
    let mut out = vec![0f32; b * heads_q * d];
    for (bi, &s) in seqs.iter().enumerate() {
        let len = cache.len(s)?;
        let p = len - 1;
        let tokens: Vec<(Vec<f32>, Vec<f32>)> = (0..len)
            .filter(|&j| is_visible(cfg, j, p))
            .map(|j| {
                cache
                    .read_token(s, layer, j)?
                    .ok_or(KvError::Unsupported(format!(
                        "visible token {j} of sequence {} has no page",
                        s.raw()
                    )))
            })
            .collect::<Result<_>>()?;
        for hq in 0..heads_q {
            let h = hq / group;
            let qv = &q[(bi * heads_q + hq) * d..][..d];
            let scores: Vec<f64> = tokens
                .iter()
                .map(|(k, _)| {
                    let k = &k[h * d..][..d];
                    qv.iter()
                        .zip(k)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum::<f64>()
                        * f64::from(softmax_scale)
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let l: f64 = w.iter().sum();
            let o = &mut out[(bi * heads_q + hq) * d..][..d];
            for (dd, od) in o.iter_mut().enumerate() {
                let acc: f64 = tokens
                    .iter()
                    .zip(&w)
                    .map(|((_, v), &wt)| wt * f64::from(v[h * d + dd]))
                    .sum();
                *od = (acc / l) as f32;
            }
        }
    }
    Ok(out)
}

/// Plain attention of one query over explicit keys and values, f64 accumulation: `q` `(D,)`,
/// `k`, `v` `(n, D)`; returns `(D,)`. The unquantized oracle of the accuracy reports.
pub fn attention_dense(q: &[f32], k: &[f32], v: &[f32], softmax_scale: f32) -> Vec<f32> {
    let d = q.len();
    let n = k.len() / d.max(1);
    let scores: Vec<f64> = (0..n)
        .map(|j| {
            q.iter()
                .zip(&k[j * d..][..d])
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum::<f64>()
                * f64::from(softmax_scale)
        })
        .collect();
    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let l: f64 = w.iter().sum();
    (0..d)
        .map(|dd| ((0..n).map(|j| w[j] * f64::from(v[j * d + dd])).sum::<f64>() / l) as f32)
        .collect()
}
