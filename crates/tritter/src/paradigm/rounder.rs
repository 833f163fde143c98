//! The embedding rounder: maps predicted embeddings `(N, H)` back to token ids through the
//! embedding table `(V, H)` (DESIGN.md section 5, "an embedding rounder (KNN over the
//! embedding table) maps back to tokens").
//!
//! * [`EmbeddingRounder`]: exact top-k by cosine similarity on the CPU (f32, rayon), with an
//!   optional candidate set (e.g. without `<pad>`), a confidence score in `[0, 1]` and
//!   [`EmbeddingRounder::round_or_fallback`], which falls back to the argmax of the token
//!   logits when the rounding is not confident.
//! * [`VqRounder`]: an IVF-style coarse quantizer (k-means codebook over the normalized
//!   table, inverted lists) that searches only the `n_probe` nearest lists; with
//!   `n_probe == n_clusters` it returns exactly what the exact rounder returns.
//! * `paradigm::rounder_cuda` (feature `cuda`): the same exact top-k on the GPU.
//!
//! # Conventions
//!
//! * Cosine similarity of `q` and table row `t` is `dot(q / max(|q|, eps), t / max(|t|,
//!   eps))` with `eps` = [`NORM_EPS`] (as PyTorch's `F.normalize`): a zero row (the `<pad>`
//!   row starts at zero) or a zero query has similarity 0 to everything instead of NaN.
//! * Top-k lists are sorted by similarity, descending; equal similarities (duplicated rows)
//!   are ordered by the lower id first. The result is exact and does not depend on the
//!   number of threads.
//! * The table is normalized once at construction (f32, `V * H * 4` bytes kept).

use std::cmp::Ordering;
use std::ops::Range;

use candle_core::DType;
use rayon::prelude::*;

use crate::tokenizer::kmeans::kmeans;
use crate::{Result, TritterError, TritterModel};

/// Norm floor of the normalization `x / max(|x|, NORM_EPS)`, the `eps` of PyTorch's
/// `F.normalize`: zero vectors stay zero instead of becoming NaN.
pub const NORM_EPS: f64 = 1e-12;

/// Default number of top similarities the confidence softmax runs over.
pub const DEFAULT_CONFIDENCE_K: usize = 8;

/// Default softmax temperature of the confidence score. Cosine similarities live in
/// `[-1, 1]`; at 0.05 a gap of 0.1 between the best and the second match is a factor
/// `e^2 = 7.4` in weight, so a best match clearly ahead of the rest gets a share near 1.
pub const DEFAULT_TEMPERATURE: f32 = 0.05;

/// Table rows scored per rayon task when one query is searched in parallel.
const PAR_CHUNK: usize = 4096;

/// One match of a query: a token id and its cosine similarity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbor {
    /// Token id (row of the embedding table).
    pub id: u32,
    /// Cosine similarity to the query, in `[-1, 1]` up to f32 rounding.
    pub similarity: f32,
}

/// The order of every top-k list: higher similarity first, lower id first on ties. The
/// similarities are finite and never `-0.0` (see [`scored`]), so `total_cmp` agrees with
/// `==` and this is a total order.
fn best_first(a: &Neighbor, b: &Neighbor) -> Ordering {
    b.similarity.total_cmp(&a.similarity).then(a.id.cmp(&b.id))
}

/// Keeps the best `k` of `v`, sorted by [`best_first`].
fn select_top(v: &mut Vec<Neighbor>, k: usize) {
    if v.len() > k {
        if k == 0 {
            v.clear();
            return;
        }
        v.select_nth_unstable_by(k - 1, best_first);
        v.truncate(k);
    }
    v.sort_unstable_by(best_first);
}

/// The top-k of `N` queries: ids and similarities `(N, k)`, row-major, each row sorted by
/// similarity (descending, lower id first on ties). Flat so that it matches the GPU output
/// and costs two allocations for any `N`.
#[derive(Debug, Clone, PartialEq)]
pub struct KnnResult {
    n: usize,
    k: usize,
    ids: Vec<u32>,
    similarities: Vec<f32>,
}

impl KnnResult {
    /// Assembles a result from `(N, k)` ids and similarities (lengths checked).
    pub fn from_parts(n: usize, k: usize, ids: Vec<u32>, similarities: Vec<f32>) -> Result<Self> {
        let len = n.saturating_mul(k);
        if ids.len() != len || similarities.len() != len {
            return Err(TritterError::ShapeMismatch {
                what: "top-k ids / similarities".into(),
                actual: vec![ids.len(), similarities.len()],
                expected: format!("{len} values each (N = {n} x k = {k})"),
            });
        }
        Ok(KnnResult {
            n,
            k,
            ids,
            similarities,
        })
    }

    /// Number of queries `N`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Matches per query `k`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// All ids, `(N, k)` row-major.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// All similarities, `(N, k)` row-major.
    pub fn similarities(&self) -> &[f32] {
        &self.similarities
    }

    /// Ids and similarities of query `i` (`None` when `i >= N`).
    pub fn row(&self, i: usize) -> Option<(&[u32], &[f32])> {
        (i < self.n).then(|| {
            let r = i * self.k..(i + 1) * self.k;
            (&self.ids[r.clone()], &self.similarities[r])
        })
    }

    /// The matches of query `i` as [`Neighbor`]s (empty when `i >= N`).
    pub fn neighbors(&self, i: usize) -> Vec<Neighbor> {
        self.row(i)
            .map(|(ids, sims)| {
                ids.iter()
                    .zip(sims)
                    .map(|(&id, &similarity)| Neighbor { id, similarity })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The rounding of one embedding: the nearest token, its similarity and the confidence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rounded {
    /// The nearest candidate token.
    pub id: u32,
    /// Its cosine similarity to the embedding.
    pub similarity: f32,
    /// [`confidence_from_similarities`] over the top `confidence_k` matches, in `[0, 1]`.
    pub confidence: f32,
}

/// Which path [`EmbeddingRounder::round_or_fallback`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoundPath {
    /// The nearest table row (the rounding was confident enough).
    Knn,
    /// The argmax of the token logits (the rounding was below the threshold).
    Logits,
}

/// The decision of [`EmbeddingRounder::round_or_fallback`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundDecision {
    /// The chosen token.
    pub id: u32,
    /// Where it came from.
    pub path: RoundPath,
    /// The KNN rounding, whichever path was taken (its confidence decided the path).
    pub knn: Rounded,
}

/// The confidence of a rounding from its top similarities (sorted descending, as a
/// [`KnnResult`] row): `max(s_1, 0) * softmax(s / temperature)_1`, in `[0, 1]`.
///
/// Why this score: rounding is trustworthy when the embedding is both *close* to a token
/// (the cosine `s_1` of the best match near 1; negative counts as 0) and *unambiguous* (the
/// best match takes most of the softmax weight among the top-k, i.e. the runner-up is
/// clearly farther). Either factor alone fails: the softmax share is near 1 for an
/// embedding far from every token whose best match merely leads, and the cosine is near 1
/// for an embedding halfway between two nearly identical rows. A zero embedding (all
/// similarities 0) scores 0. With one similarity the score is `max(s_1, 0)`. Empty input
/// or a non-positive temperature gives 0.
pub fn confidence_from_similarities(similarities: &[f32], temperature: f32) -> f32 {
    let Some(&best) = similarities.first() else {
        return 0.0;
    };
    if temperature.is_nan() || temperature <= 0.0 || temperature.is_infinite() {
        return 0.0;
    }
    let t = f64::from(temperature);
    let top = f64::from(best);
    let denom: f64 = similarities
        .iter()
        .map(|&s| ((f64::from(s) - top) / t).exp())
        .sum();
    let share = if denom.is_finite() && denom >= 1.0 {
        1.0 / denom
    } else {
        0.0
    };
    (top.clamp(0.0, 1.0) * share).clamp(0.0, 1.0) as f32
}

/// `x / max(|x|, NORM_EPS)` (norm accumulated in f64).
fn normalized(x: &[f32]) -> Vec<f32> {
    let norm = x
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    let inv = 1.0 / norm.max(NORM_EPS);
    x.iter().map(|&v| (f64::from(v) * inv) as f32).collect()
}

/// Dot product with 8 independent accumulators (vectorizes; fixed order, so the same pair
/// of slices always gives the same bits). Shared with the CPU inference engine.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((a, &xi), &yi) in acc.iter_mut().zip(x).zip(y) {
            *a += xi * yi;
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// A [`Neighbor`] with `-0.0` turned into `+0.0` (`x + 0.0`), so that the sort order by
/// `total_cmp` treats equal similarities as equal (then the lower id wins), as the GPU does.
fn scored(id: u32, similarity: f32) -> Neighbor {
    Neighbor {
        id,
        similarity: similarity + 0.0,
    }
}

fn check_finite(what: &str, x: &[f32]) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(TritterError::NonFinite {
            what: what.to_string(),
            index,
            value: x[index].to_string(),
        }),
    }
}

/// Exact cosine-similarity top-k over an embedding table `(V, H)`, on the CPU.
///
/// Build it once per table ([`from_model`](Self::from_model) or
/// [`from_table`](Self::from_table)); it keeps the row-normalized table, so each query costs
/// one pass of `V * H` multiply-adds. Rayon parallelizes over queries when there are many,
/// over chunks of the table otherwise.
///
/// ```
/// use tritter::paradigm::rounder::EmbeddingRounder;
/// // V = 3 tokens, H = 2.
/// let table = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0];
/// let rounder = EmbeddingRounder::from_table(&table, 3, 2)?;
/// let top = rounder.knn(&[0.9, 0.1], 1, 2)?; // (N, H) = (1, 2), k = 2
/// assert_eq!(top.row(0).unwrap().0, &[0, 1]);
/// assert_eq!(rounder.round(&[0.0, 2.0])?.id, 1);
/// # Ok::<(), tritter::TritterError>(())
/// ```
#[derive(Debug, Clone)]
pub struct EmbeddingRounder {
    vocab: usize,
    hidden: usize,
    /// `(V, H)` rows scaled to unit norm (zero rows stay zero).
    normalized: Vec<f32>,
    /// Ids a query may round to, ascending and unique.
    candidates: Vec<u32>,
    confidence_k: usize,
    temperature: f32,
}

impl EmbeddingRounder {
    /// A rounder over the row-major table `(vocab, hidden)` f32. Errors on an empty table, a
    /// length that is not `vocab * hidden`, more than `u32::MAX` rows, or NaN/Inf values.
    pub fn from_table(table: &[f32], vocab: usize, hidden: usize) -> Result<Self> {
        if vocab == 0 || hidden == 0 || vocab > u32::MAX as usize {
            return Err(TritterError::ShapeMismatch {
                what: "embedding table".into(),
                actual: vec![vocab, hidden],
                expected: format!("(V, H) with 1 <= V <= {} and H >= 1", u32::MAX),
            });
        }
        let len = vocab.checked_mul(hidden);
        if len != Some(table.len()) {
            return Err(TritterError::ShapeMismatch {
                what: "embedding table".into(),
                actual: vec![table.len()],
                expected: format!("V * H = {vocab} * {hidden} values"),
            });
        }
        check_finite("embedding table", table)?;
        let normalized: Vec<f32> = table
            .par_chunks_exact(hidden)
            .flat_map_iter(normalized)
            .collect();
        Ok(EmbeddingRounder {
            vocab,
            hidden,
            normalized,
            candidates: (0..vocab as u32).collect(),
            confidence_k: DEFAULT_CONFIDENCE_K,
            temperature: DEFAULT_TEMPERATURE,
        })
    }

    /// A rounder over `model.embedding().weight()` `(V, H)` (any float dtype; copied to the
    /// host as f32). With tied embeddings this is also the LM head.
    pub fn from_model(model: &TritterModel) -> Result<Self> {
        let w = model.embedding().weight();
        let (vocab, hidden) = w.dims2()?;
        let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Self::from_table(&values, vocab, hidden)
    }

    /// Restricts rounding (KNN and the logits fallback) to `ids` (any order, duplicates
    /// ignored). Errors on an empty set or an id `>= V`.
    pub fn with_candidates(mut self, ids: &[u32]) -> Result<Self> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(TritterError::argument(
                "candidate id",
                bad,
                format!("below the vocab size {}", self.vocab),
            ));
        }
        let mut c = ids.to_vec();
        c.sort_unstable();
        c.dedup();
        if c.is_empty() {
            return Err(TritterError::argument(
                "candidate set",
                "empty",
                "at least one id",
            ));
        }
        self.candidates = c;
        Ok(self)
    }

    /// Restricts rounding to the ids of `range` (e.g. the byte tokens `8..264`).
    pub fn with_candidate_range(self, range: Range<u32>) -> Result<Self> {
        if range.start >= range.end || range.end as usize > self.vocab {
            return Err(TritterError::argument(
                "candidate range",
                format!("{range:?}"),
                format!("a non-empty range within 0..{}", self.vocab),
            ));
        }
        let ids: Vec<u32> = range.collect();
        self.with_candidates(&ids)
    }

    /// Removes `ids` from the current candidates (e.g. `&[0]` for `<pad>`, or every special
    /// token). Errors on an id `>= V` or when nothing would remain.
    pub fn without_ids(self, ids: &[u32]) -> Result<Self> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(TritterError::argument(
                "excluded id",
                bad,
                format!("below the vocab size {}", self.vocab),
            ));
        }
        let mut drop = ids.to_vec();
        drop.sort_unstable();
        let keep: Vec<u32> = self
            .candidates
            .iter()
            .copied()
            .filter(|id| drop.binary_search(id).is_err())
            .collect();
        if keep.is_empty() {
            return Err(TritterError::argument(
                "candidate set",
                "empty after the exclusion",
                "at least one id left",
            ));
        }
        self.with_candidates(&keep)
    }

    /// Sets the confidence score's top-k (`k >= 1`, capped at the candidate count when
    /// used) and softmax temperature (finite, `> 0`).
    pub fn with_confidence(mut self, k: usize, temperature: f32) -> Result<Self> {
        if k == 0 {
            return Err(TritterError::argument("confidence k", k, "at least 1"));
        }
        if temperature.is_nan() || temperature <= 0.0 || temperature.is_infinite() {
            return Err(TritterError::argument(
                "confidence temperature",
                temperature,
                "finite and > 0",
            ));
        }
        self.confidence_k = k;
        self.temperature = temperature;
        Ok(self)
    }

    /// Vocabulary size `V` (rows of the table).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Embedding width `H`.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// The ids a query may round to, ascending.
    pub fn candidates(&self) -> &[u32] {
        &self.candidates
    }

    /// The row-normalized table `(V, H)` f32 (what the GPU rounder uploads as bf16).
    pub fn normalized_table(&self) -> &[f32] {
        &self.normalized
    }

    /// The confidence score's `(k, temperature)`.
    pub fn confidence_params(&self) -> (usize, f32) {
        (self.confidence_k, self.temperature)
    }

    fn row(&self, id: u32) -> &[f32] {
        let i = id as usize * self.hidden;
        &self.normalized[i..i + self.hidden]
    }

    /// Checks `queries` `(n, H)`: length and finiteness.
    pub(crate) fn check_queries(&self, what: &str, queries: &[f32], n: usize) -> Result<()> {
        if n.checked_mul(self.hidden) != Some(queries.len()) {
            return Err(TritterError::ShapeMismatch {
                what: what.to_string(),
                actual: vec![queries.len()],
                expected: format!("N * H = {n} * {} values", self.hidden),
            });
        }
        check_finite(what, queries)
    }

    /// Checks `1 <= k <= available`.
    pub(crate) fn check_k(k: usize, available: usize) -> Result<()> {
        if k == 0 || k > available {
            return Err(TritterError::argument(
                "k",
                k,
                format!("in 1..={available} (the number of candidate ids)"),
            ));
        }
        Ok(())
    }

    /// Top-k of one normalized query over `ids`, parallel over chunks of `ids` if asked.
    fn top_k_of(&self, q: &[f32], ids: &[u32], k: usize, parallel: bool) -> Vec<Neighbor> {
        let scan = |ids: &[u32]| {
            let mut v: Vec<Neighbor> = ids
                .iter()
                .map(|&id| scored(id, dot(q, self.row(id))))
                .collect();
            select_top(&mut v, k);
            v
        };
        if parallel && ids.len() > PAR_CHUNK {
            let mut all: Vec<Neighbor> = ids
                .par_chunks(PAR_CHUNK)
                .map(scan)
                .collect::<Vec<_>>()
                .concat();
            select_top(&mut all, k);
            all
        } else {
            scan(ids)
        }
    }

    /// Exact top-`k` by cosine similarity for `n` queries `(n, H)` row-major.
    ///
    /// Errors on a length other than `n * H`, NaN/Inf, `k == 0` or `k` above the number of
    /// candidates. `n == 0` gives an empty result.
    pub fn knn(&self, queries: &[f32], n: usize, k: usize) -> Result<KnnResult> {
        self.check_queries("queries", queries, n)?;
        Self::check_k(k, self.candidates.len())?;
        let per_query = |q: &[f32], parallel: bool| {
            let qn = normalized(q);
            self.top_k_of(&qn, &self.candidates, k, parallel)
        };
        let rows: Vec<Vec<Neighbor>> = if n >= rayon::current_num_threads() {
            queries
                .par_chunks_exact(self.hidden)
                .map(|q| per_query(q, false))
                .collect()
        } else {
            queries
                .chunks_exact(self.hidden)
                .map(|q| per_query(q, true))
                .collect()
        };
        Ok(flatten(n, k, rows))
    }

    /// The top-`k` of one embedding `(H,)` as [`Neighbor`]s.
    pub fn nearest(&self, embedding: &[f32], k: usize) -> Result<Vec<Neighbor>> {
        Ok(self.knn(embedding, 1, k)?.neighbors(0))
    }

    /// Rounds one embedding `(H,)` to its nearest candidate, with the confidence over the
    /// top `min(confidence_k, candidates)` matches.
    pub fn round(&self, embedding: &[f32]) -> Result<Rounded> {
        let k = self.confidence_k.min(self.candidates.len());
        let top = self.knn(embedding, 1, k)?;
        Ok(rounded_from(&top, 0, self.temperature))
    }

    /// [`round`](Self::round) for `n` embeddings `(n, H)`.
    pub fn round_batch(&self, embeddings: &[f32], n: usize) -> Result<Vec<Rounded>> {
        let k = self.confidence_k.min(self.candidates.len());
        let top = self.knn(embeddings, n, k)?;
        Ok((0..n)
            .map(|i| rounded_from(&top, i, self.temperature))
            .collect())
    }

    /// The KNN token of `embedding` `(H,)` when its confidence is `>= threshold`, else the
    /// argmax of `logits` `(V,)` over the candidates (lower id on ties); says which path was
    /// taken. A threshold above 1 always falls back, one at or below 0 never does.
    ///
    /// Errors on wrong lengths, NaN/Inf in either input, or a non-finite threshold.
    pub fn round_or_fallback(
        &self,
        embedding: &[f32],
        logits: &[f32],
        threshold: f32,
    ) -> Result<RoundDecision> {
        if !threshold.is_finite() {
            return Err(TritterError::argument(
                "threshold",
                threshold,
                "a finite confidence threshold, normally in [0, 1]",
            ));
        }
        if logits.len() != self.vocab {
            return Err(TritterError::ShapeMismatch {
                what: "logits".into(),
                actual: vec![logits.len()],
                expected: format!("(V,) = ({},)", self.vocab),
            });
        }
        check_finite("logits", logits)?;
        let knn = self.round(embedding)?;
        if knn.confidence >= threshold {
            return Ok(RoundDecision {
                id: knn.id,
                path: RoundPath::Knn,
                knn,
            });
        }
        // Strict `>` keeps the first (lowest) id among equal logits.
        let mut best = self.candidates[0];
        for &id in &self.candidates[1..] {
            if logits[id as usize] > logits[best as usize] {
                best = id;
            }
        }
        Ok(RoundDecision {
            id: best,
            path: RoundPath::Logits,
            knn,
        })
    }
}

fn rounded_from(top: &KnnResult, i: usize, temperature: f32) -> Rounded {
    let (ids, sims) = top.row(i).unwrap_or((&[], &[]));
    Rounded {
        id: ids.first().copied().unwrap_or(0),
        similarity: sims.first().copied().unwrap_or(0.0),
        confidence: confidence_from_similarities(sims, temperature),
    }
}

fn flatten(n: usize, k: usize, rows: Vec<Vec<Neighbor>>) -> KnnResult {
    let mut ids = Vec::with_capacity(n * k);
    let mut similarities = Vec::with_capacity(n * k);
    for r in rows {
        for nb in r {
            ids.push(nb.id);
            similarities.push(nb.similarity);
        }
    }
    KnnResult {
        n,
        k,
        ids,
        similarities,
    }
}

/// Settings of the [`VqRounder`]'s coarse quantizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VqConfig {
    /// Number of k-means clusters (inverted lists), `1 ..= candidates`. A common choice is
    /// about `sqrt(V)` (256 for V = 65536).
    pub n_clusters: usize,
    /// Maximum Lloyd iterations (stops early when assignments settle), `>= 1`.
    pub iterations: usize,
    /// Seed of the k-means++ initialization (same seed, same codebook).
    pub seed: u64,
}

impl VqConfig {
    /// `n_clusters` lists, 20 iterations, seed 0.
    pub fn new(n_clusters: usize) -> Self {
        VqConfig {
            n_clusters,
            iterations: 20,
            seed: 0,
        }
    }
}

/// IVF-style approximate rounder: a k-means codebook `(C, H)` over the normalized candidate
/// rows (the crate's deterministic k-means, Euclidean on unit vectors, i.e. spherical
/// assignment), each candidate id stored in the inverted list of its nearest centroid.
///
/// A query (normalized) ranks the centroids by Euclidean distance (lower index on ties),
/// probes the `n_probe` nearest lists, and runs the exact top-k over the ids found there:
/// about `n_probe / C` of the exact cost plus `C * H` for the ranking. `n_probe` is a
/// minimum: more lists are probed, in rank order, until they hold at least `k` ids, so a
/// result always has `k` entries. With `n_probe == C` every candidate is scored with the
/// same arithmetic as [`EmbeddingRounder::knn`], so the result is identical.
#[derive(Debug, Clone)]
pub struct VqRounder {
    exact: EmbeddingRounder,
    /// `(C, H)` centroids.
    centroids: Vec<f32>,
    /// Per centroid, its candidate ids (ascending).
    lists: Vec<Vec<u32>>,
}

impl VqRounder {
    /// Clusters the candidates of `exact` with `config`. Errors when `n_clusters` is 0 or
    /// above the number of candidates, or `iterations` is 0. Cost: `O(iterations *
    /// candidates * C * H)`.
    pub fn new(exact: EmbeddingRounder, config: VqConfig) -> Result<Self> {
        let count = exact.candidates.len();
        if config.n_clusters == 0 || config.n_clusters > count {
            return Err(TritterError::argument(
                "n_clusters",
                config.n_clusters,
                format!("in 1..={count} (the number of candidate ids)"),
            ));
        }
        if config.iterations == 0 {
            return Err(TritterError::argument(
                "k-means iterations",
                0,
                "at least 1",
            ));
        }
        let h = exact.hidden;
        let data: Vec<f32> = exact
            .candidates
            .iter()
            .flat_map(|&id| exact.row(id).iter().copied())
            .collect();
        let centroids = kmeans(&data, h, config.n_clusters, config.iterations, config.seed);
        let assign: Vec<usize> = data
            .par_chunks_exact(h)
            .map(|row| nearest_centroid(&centroids, h, row))
            .collect();
        let mut lists = vec![Vec::new(); config.n_clusters];
        for (&id, &c) in exact.candidates.iter().zip(&assign) {
            lists[c].push(id);
        }
        Ok(VqRounder {
            exact,
            centroids,
            lists,
        })
    }

    /// The exact rounder underneath (its table and candidates).
    pub fn exact(&self) -> &EmbeddingRounder {
        &self.exact
    }

    /// Number of clusters `C`.
    pub fn n_clusters(&self) -> usize {
        self.lists.len()
    }

    /// The codebook `(C, H)`.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// The inverted lists: per centroid, its candidate ids (ascending).
    pub fn lists(&self) -> &[Vec<u32>] {
        &self.lists
    }

    /// Approximate top-`k` of `n` queries `(n, H)`, probing at least `n_probe` lists
    /// (`1 ..= C`). Errors as [`EmbeddingRounder::knn`], and on an `n_probe` out of range.
    pub fn knn(&self, queries: &[f32], n: usize, k: usize, n_probe: usize) -> Result<KnnResult> {
        let ex = &self.exact;
        ex.check_queries("queries", queries, n)?;
        EmbeddingRounder::check_k(k, ex.candidates.len())?;
        if n_probe == 0 || n_probe > self.n_clusters() {
            return Err(TritterError::argument(
                "n_probe",
                n_probe,
                format!("in 1..={} (the number of clusters)", self.n_clusters()),
            ));
        }
        let h = ex.hidden;
        let rows: Vec<Vec<Neighbor>> = queries
            .par_chunks_exact(h)
            .map(|q| {
                let qn = normalized(q);
                let mut order: Vec<(f32, usize)> = self
                    .centroids
                    .chunks_exact(h)
                    .enumerate()
                    .map(|(c, cen)| (sq_dist(&qn, cen), c))
                    .collect();
                order.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let mut ids = Vec::new();
                for (probed, &(_, c)) in order.iter().enumerate() {
                    if probed >= n_probe && ids.len() >= k {
                        break;
                    }
                    ids.extend_from_slice(&self.lists[c]);
                }
                ex.top_k_of(&qn, &ids, k, false)
            })
            .collect();
        Ok(flatten(n, k, rows))
    }
}

fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Index of the centroid nearest to `row` (lowest index on ties).
fn nearest_centroid(centroids: &[f32], h: usize, row: &[f32]) -> usize {
    let mut best = (0, f32::INFINITY);
    for (i, c) in centroids.chunks_exact(h).enumerate() {
        let d = sq_dist(row, c);
        if d < best.1 {
            best = (i, d);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sorting puts higher similarity first and breaks ties by the lower id, with -0 == +0.
    #[test]
    fn order_is_similarity_then_id() {
        let mut v = vec![
            scored(5, 0.5),
            scored(2, 0.5),
            scored(9, 0.9),
            scored(1, -0.0),
            scored(0, 0.0),
        ];
        select_top(&mut v, 4);
        let ids: Vec<u32> = v.iter().map(|n| n.id).collect();
        assert_eq!(ids, [9, 2, 5, 0]);
    }

    /// The confidence is in [0, 1], 0 for a zero embedding, and falls as the runner-up nears.
    #[test]
    fn confidence_behaves() {
        assert_eq!(confidence_from_similarities(&[], 0.05), 0.0);
        assert_eq!(confidence_from_similarities(&[0.0, 0.0], 0.05), 0.0);
        let clear = confidence_from_similarities(&[1.0, 0.2, 0.1], 0.05);
        let close = confidence_from_similarities(&[1.0, 0.99, 0.1], 0.05);
        assert!(clear > 0.99 && clear <= 1.0, "{clear}");
        assert!(close < 0.6, "{close}");
        assert_eq!(confidence_from_similarities(&[-0.5], 0.05), 0.0);
    }
}
