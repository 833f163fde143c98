//! The problem description shared by the CPU reference and the CUDA kernels: head shapes,
//! the sequences of a batch (fixed-length or variable-length packed), the mask, and the
//! optional fused QK-Norm + RoPE prologue. Everything is validated here, on the host, before
//! any launch (DESIGN.md section 6).
//!
//! Token layout: q is `(total_q, Hq, D)` and k/v are `(total_k, Hkv, D)` row-major, where a
//! fixed-length batch has `total_q = B * Lq` (so `(B, Lq, Hq, D)` is the same memory) and a
//! variable-length batch packs its sequences back to back, sequence `b` owning tokens
//! `cu_seqlens[b] .. cu_seqlens[b + 1]` (FlashAttention's varlen convention).
//!
//! Query/key alignment: query `i` of a sequence with `lq` queries and `lk` keys sits at
//! position `i + lk - lq` (bottom-right alignment, as FlashAttention >= 2.1), so a chunk of
//! new queries attends causally to the whole cache before it. Causal-type masks need
//! `lq <= lk` for every sequence.

use crate::error::{AttnError, Result};

/// Head dims the kernels are built for (DESIGN.md section 4: 64 and 128 at least).
pub const SUPPORTED_HEAD_DIMS: [usize; 2] = [64, 128];

/// How the CTAs of the CUDA attention kernels take their tiles (query blocks of the forward
/// and of the deterministic dQ pass, key blocks of the backward's main kernel): `for_tiles`
/// in `kernels-cuda/kernels/flash_attn.cuh` and the `flash_bwd_kv[_dq]_pair` kernels. Set on
/// `cuda::ProblemGpu`; the forward output and the deterministic backward are bitwise the same
/// under every schedule (the atomic dQ's summation order is not fixed under any).
///
/// Under a causal mask tile costs fall linearly (from `n` key blocks down to 1); with one tile
/// per CTA the heavy CTAs of the last heads and sequences start when the GPU is nearly done,
/// and most SMs idle through that tail. Pairs `(j, n - 1 - j)` give every CTA the same cost
/// and keep it on one head (K/V, Q/dO and dQ reuse in L2 unchanged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TileSchedule {
    /// Paired for causal and prefix-LM masks without a sliding window (whose tiles cost the
    /// same) when the halved grid still gives every SM two CTAs; for the backward's main
    /// kernel only where the tail is long as well (its heaviest CTA above a quarter of a CTA
    /// slot's average load): elsewhere the pair gains or loses 1-2% there (H100: 0.99-1.02x
    /// the time at L = 8K, 0.86x at the 500M training shape, 8 x 2048 with GQA 16/4).
    /// Single otherwise.
    #[default]
    Auto,
    /// One tile per CTA, the costly end of the mask first in launch order.
    Single,
    /// Tiles `j` and `n - 1 - j` of a sequence per CTA; half the CTAs.
    Paired,
}

impl TileSchedule {
    /// Whether a launch over `tiles` tiles (of the longest sequence) for `ctas` (heads x
    /// sequences) CTA rows on a GPU of `sms` SMs runs pairs under `mask`. `tail_slots`: for
    /// the backward's main kernel, the CTAs an SM holds; `Auto` then also asks that the
    /// heaviest CTA (`tiles` units) carry more than a quarter of a slot's average load
    /// (`ctas * tiles * (tiles + 1) / 2` units over `sms * tail_slots` slots).
    pub fn pairs(
        self,
        mask: &Mask,
        tiles: usize,
        ctas: usize,
        sms: usize,
        tail_slots: Option<usize>,
    ) -> bool {
        match self {
            TileSchedule::Single => false,
            TileSchedule::Paired => true,
            TileSchedule::Auto => {
                matches!(mask.mode, MaskMode::Causal | MaskMode::PrefixLm)
                    && mask.window.is_none()
                    && tiles.div_ceil(2) * ctas >= 2 * sms
                    && tail_slots.is_none_or(|per_sm| 8 * sms * per_sm > ctas * (tiles + 1))
            }
        }
    }
}

/// Base visibility rule of a mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskMode {
    /// Key `j` visible to query position `i` iff `j <= i`.
    Causal,
    /// Every key visible (encoders, the embedding mode of Tritter).
    Bidirectional,
    /// Prefix-LM: `j < prefix_len[b] || j <= i` (bidirectional over the prefix, causal after).
    PrefixLm,
}

/// Which keys each query sees.
///
/// Key `j` is visible to query position `i` (aligned as in the module docs) of sequence `b`
/// iff all of:
/// * mode ([`MaskMode`]);
/// * window `W` (if any): `|i - j| < W` (for causal keys `i - W < j`); the first `sinks` keys
///   of the sequence are exempt (StreamingLLM attention sinks);
/// * documents (if any): `doc_ids[i] == doc_ids[j]` (packed documents never see each other;
///   sinks do not cross documents either).
///
/// This is the rule of `tritter::model::MaskSpec`, so the GPU engine matches the reference
/// model. For sinks counted per document, pack the documents as a variable-length batch
/// instead (each document its own sequence). Every query sees itself, so no softmax row is
/// empty. Key tiles that the mask empties for a whole query tile are skipped by the kernels,
/// so a sliding window costs `O(L * W)`, not `O(L^2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mask {
    /// Base rule.
    pub mode: MaskMode,
    /// Sliding window `W >= 1`, or `None` for full attention.
    pub window: Option<usize>,
    /// Sink keys exempt from the window (needs a window).
    pub sinks: usize,
}

impl Mask {
    /// Plain causal attention.
    pub const CAUSAL: Mask = Mask {
        mode: MaskMode::Causal,
        window: None,
        sinks: 0,
    };
    /// Full bidirectional attention.
    pub const BIDIRECTIONAL: Mask = Mask {
        mode: MaskMode::Bidirectional,
        window: None,
        sinks: 0,
    };

    /// Causal sliding window of `window` keys plus `sinks` sink keys.
    pub fn sliding(window: usize, sinks: usize) -> Mask {
        Mask {
            mode: MaskMode::Causal,
            window: Some(window),
            sinks,
        }
    }

    /// True when the rule needs `lq <= lk` (every mode but bidirectional without a window).
    fn needs_alignment(&self) -> bool {
        self.mode != MaskMode::Bidirectional || self.window.is_some()
    }
}

/// Head counts and dim, plus the softmax scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heads {
    /// Query heads `Hq`.
    pub q: usize,
    /// Key/value heads `Hkv`, `Hq % Hkv == 0` (GQA; 1 is MQA).
    pub kv: usize,
    /// Head dim `D`, one of [`SUPPORTED_HEAD_DIMS`].
    pub dim: usize,
    /// Softmax scale, usually `1 / sqrt(D)`.
    pub softmax_scale: f32,
}

impl Heads {
    /// `Hq` query heads and `Hkv` KV heads of dim `D`, scale `1 / sqrt(D)`.
    pub fn new(q: usize, kv: usize, dim: usize) -> Heads {
        Heads {
            q,
            kv,
            dim,
            softmax_scale: 1.0 / (dim as f32).sqrt(),
        }
    }

    /// Checks the head counts, the dim and the scale.
    pub fn validate(&self) -> Result<()> {
        if self.q == 0 || self.kv == 0 || self.q % self.kv != 0 {
            return Err(AttnError::Heads(format!(
                "Hq = {} query heads and Hkv = {} KV heads, but expected Hkv >= 1 and Hq a \
                 non-zero multiple of Hkv (GQA)",
                self.q, self.kv
            )));
        }
        if !SUPPORTED_HEAD_DIMS.contains(&self.dim) {
            return Err(AttnError::Heads(format!(
                "head dim D = {} is not supported; expected one of {SUPPORTED_HEAD_DIMS:?}",
                self.dim
            )));
        }
        if !(self.softmax_scale.is_finite() && self.softmax_scale > 0.0) {
            return Err(AttnError::Heads(format!(
                "softmax_scale is {} but expected a finite value > 0",
                self.softmax_scale
            )));
        }
        Ok(())
    }
}

/// The sequences of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seqs {
    /// `batch` sequences of `lq` queries and `lk` keys each: q `(B, Lq, Hq, D)`,
    /// k/v `(B, Lk, Hkv, D)`, logsumexp `(B, Hq, Lq)`.
    Fixed {
        /// Sequences `B`.
        batch: usize,
        /// Queries per sequence `Lq`.
        lq: usize,
        /// Keys per sequence `Lk`.
        lk: usize,
    },
    /// Packed sequences: q `(total_q, Hq, D)`, k/v `(total_k, Hkv, D)`, logsumexp
    /// `(Hq, total_q)`; `cu_q`/`cu_k` are the `B + 1` non-decreasing token offsets starting
    /// at 0 (i32, as FlashAttention's `cu_seqlens`).
    Varlen {
        /// Query offsets `(B + 1,)`.
        cu_q: Vec<i32>,
        /// Key offsets `(B + 1,)`.
        cu_k: Vec<i32>,
    },
}

impl Seqs {
    /// Number of sequences `B`.
    pub fn batch(&self) -> usize {
        match self {
            Seqs::Fixed { batch, .. } => *batch,
            Seqs::Varlen { cu_q, .. } => cu_q.len().saturating_sub(1),
        }
    }

    /// Total query tokens.
    pub fn total_q(&self) -> usize {
        match self {
            Seqs::Fixed { batch, lq, .. } => batch * lq,
            Seqs::Varlen { cu_q, .. } => cu_q.last().map_or(0, |&v| v as usize),
        }
    }

    /// Total key tokens.
    pub fn total_k(&self) -> usize {
        match self {
            Seqs::Fixed { batch, lk, .. } => batch * lk,
            Seqs::Varlen { cu_k, .. } => cu_k.last().map_or(0, |&v| v as usize),
        }
    }

    /// `(first query token, lq, first key token, lk)` of sequence `b`.
    pub fn seq(&self, b: usize) -> (usize, usize, usize, usize) {
        match self {
            Seqs::Fixed { lq, lk, .. } => (b * lq, *lq, b * lk, *lk),
            Seqs::Varlen { cu_q, cu_k } => {
                let (q0, q1) = (cu_q[b] as usize, cu_q[b + 1] as usize);
                let (k0, k1) = (cu_k[b] as usize, cu_k[b + 1] as usize);
                (q0, q1 - q0, k0, k1 - k0)
            }
        }
    }

    /// Longest query and key sequence.
    pub fn max_lens(&self) -> (usize, usize) {
        (0..self.batch()).fold((0, 0), |(mq, mk), b| {
            let (_, lq, _, lk) = self.seq(b);
            (mq.max(lq), mk.max(lk))
        })
    }

    /// Index of the logsumexp entry of query token `t` (sequence `b`, row `i`), head `h`.
    pub fn lse_index(&self, heads_q: usize, b: usize, i: usize, t: usize, h: usize) -> usize {
        match self {
            Seqs::Fixed { lq, .. } => (b * heads_q + h) * lq + i,
            Seqs::Varlen { .. } => h * self.total_q() + t,
        }
    }

    /// Checks the offsets (and that the totals fit the i32 offsets the kernels use).
    pub fn validate(&self) -> Result<()> {
        match self {
            Seqs::Fixed { batch, lq, lk } => {
                if *batch == 0 || *lq == 0 || *lk == 0 {
                    return Err(AttnError::Layout(format!(
                        "fixed batch B = {batch}, Lq = {lq}, Lk = {lk}, but expected all >= 1"
                    )));
                }
                // Checked: an absurd B * L must be an error, not an overflow panic.
                let total = batch.checked_mul(*lq.max(lk));
                if total.is_none_or(|t| t > i32::MAX as usize) {
                    return Err(AttnError::Layout(format!(
                        "B * L = {batch} * {} tokens but expected at most {} (i32 offsets)",
                        lq.max(lk),
                        i32::MAX
                    )));
                }
            }
            Seqs::Varlen { cu_q, cu_k } => {
                for (name, cu) in [("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)] {
                    if cu.len() < 2 {
                        return Err(AttnError::Layout(format!(
                            "{name} has {} entries but expected B + 1 >= 2",
                            cu.len()
                        )));
                    }
                    if cu[0] != 0 {
                        return Err(AttnError::Layout(format!(
                            "{name}[0] is {} but expected 0",
                            cu[0]
                        )));
                    }
                    if let Some(b) = (0..cu.len() - 1).find(|&b| cu[b + 1] < cu[b]) {
                        return Err(AttnError::Layout(format!(
                            "{name} must be non-decreasing but {name}[{}] = {} < {name}[{b}] = {}",
                            b + 1,
                            cu[b + 1],
                            cu[b]
                        )));
                    }
                }
                if cu_q.len() != cu_k.len() {
                    return Err(AttnError::Layout(format!(
                        "cu_seqlens_q has {} entries but cu_seqlens_k has {}; expected the same \
                         B + 1",
                        cu_q.len(),
                        cu_k.len()
                    )));
                }
                if let Some(b) = (0..self.batch()).find(|&b| {
                    let (_, lq, _, lk) = self.seq(b);
                    lq > 0 && lk == 0
                }) {
                    let (_, lq, _, _) = self.seq(b);
                    return Err(AttnError::Layout(format!(
                        "sequence {b} has {lq} queries but 0 keys; expected >= 1 key"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Per-sequence and per-token mask inputs that live beside the batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaskInputs {
    /// Prefix length per sequence `(B,)`, required by [`MaskMode::PrefixLm`], each `<= lk`.
    pub prefix_lens: Option<Vec<i32>>,
    /// Document id per key token `(total_k,)`, non-decreasing within each sequence (as a
    /// packer writes them, which lets the kernels skip tiles); query `i` of a sequence takes
    /// the id of the key at its aligned position.
    pub doc_ids: Option<Vec<i32>>,
}

/// The fused QK-Norm + RoPE prologue (DESIGN.md section 4): RMSNorm over D with learned
/// weights, then rotate-half RoPE, applied to q and k as they are loaded, so raw q and k
/// make one trip through memory.
///
/// `x_hat = x / sqrt(mean(x^2) + eps) * weight`; then with `inv_freq[i] = theta^(-2i/D)` and
/// angle `a = pos * inv_freq[i]` for `i < D/2`:
/// `y[i] = x_hat[i] cos a - x_hat[i + D/2] sin a`, `y[i + D/2] = x_hat[i + D/2] cos a + x_hat[i] sin a`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormRope {
    /// RMSNorm epsilon.
    pub eps: f32,
    /// RoPE base theta.
    pub rope_theta: f32,
}

impl NormRope {
    /// Checks eps and theta.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(AttnError::Param {
                what: "QK-Norm eps",
                actual: self.eps,
                expected: "a finite value > 0",
            });
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(AttnError::Param {
                what: "rope_theta",
                actual: self.rope_theta,
                expected: "a finite value > 1",
            });
        }
        Ok(())
    }
}

/// RoPE positions of every token; `None` means the position within the sequence (queries
/// bottom-right aligned, see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions {
    /// Position of each query token `(total_q,)`, >= 0.
    pub q: Option<Vec<i32>>,
    /// Position of each key token `(total_k,)`, >= 0.
    pub k: Option<Vec<i32>>,
}

/// One attention problem: heads, sequences, mask and its inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Head counts, dim and softmax scale.
    pub heads: Heads,
    /// The sequences.
    pub seqs: Seqs,
    /// The visibility rule.
    pub mask: Mask,
    /// Prefix lengths and document ids.
    pub inputs: MaskInputs,
}

impl Problem {
    /// The window and sink count as the kernels take them (i32; window 0 = none). A window at
    /// least as long as the longest key sequence already sees every pair of it (aligned query
    /// positions and keys both lie in `0..Lk`), and so do that many sinks, so both are clamped
    /// there: any `usize` the user passes (`usize::MAX` as "unbounded") reaches the kernels
    /// unchanged in meaning, and their position arithmetic (`i + window`) cannot overflow.
    /// Call after [`Problem::validate`] (which bounds every length by `i32::MAX`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launches' parameters
    pub(crate) fn kernel_window_sinks(&self) -> (i32, i32) {
        let Some(window) = self.mask.window else {
            return (0, 0);
        };
        let max_lk = (0..self.seqs.batch())
            .map(|b| self.seqs.seq(b).3)
            .max()
            .unwrap_or(1)
            .clamp(1, i32::MAX as usize);
        let clamp = |v: usize| v.min(max_lk) as i32;
        (clamp(window), clamp(self.mask.sinks))
    }

    /// A fixed-length problem with no prefix lengths or document ids.
    pub fn fixed(heads: Heads, batch: usize, lq: usize, lk: usize, mask: Mask) -> Problem {
        Problem {
            heads,
            seqs: Seqs::Fixed { batch, lq, lk },
            mask,
            inputs: MaskInputs::default(),
        }
    }

    /// Elements of q and of the output `(total_q, Hq, D)`.
    pub fn q_len(&self) -> usize {
        self.seqs.total_q() * self.heads.q * self.heads.dim
    }

    /// Elements of k and of v `(total_k, Hkv, D)`.
    pub fn kv_len(&self) -> usize {
        self.seqs.total_k() * self.heads.kv * self.heads.dim
    }

    /// Elements of the logsumexp `(B, Hq, Lq)` or `(Hq, total_q)`.
    pub fn lse_len(&self) -> usize {
        self.seqs.total_q() * self.heads.q
    }

    /// Whether key `j` is visible to query `i` of sequence `b` (the rule of [`Mask`]); `i` is
    /// the query's row within the sequence (alignment applied here). Meant for a validated
    /// problem.
    pub fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        let (_, lq, k0, lk) = self.seqs.seq(b);
        // Aligned position; validation guarantees lq <= lk wherever the rule below uses it.
        let i = (i + lk).saturating_sub(lq);
        let mode_ok = match self.mask.mode {
            MaskMode::Causal => j <= i,
            MaskMode::Bidirectional => true,
            MaskMode::PrefixLm => {
                j <= i
                    || self
                        .inputs
                        .prefix_lens
                        .as_ref()
                        .is_some_and(|p| (j as i64) < i64::from(p[b]))
            }
        };
        let window_ok = match self.mask.window {
            Some(w) => i.abs_diff(j) < w || j < self.mask.sinks,
            None => true,
        };
        let doc_ok = self
            .inputs
            .doc_ids
            .as_ref()
            .is_none_or(|d| d[k0 + i] == d[k0 + j]);
        mode_ok && window_ok && doc_ok
    }

    /// Checks everything but the tensors' lengths (see [`Problem::check_lens`]).
    pub fn validate(&self) -> Result<()> {
        self.heads.validate()?;
        self.seqs.validate()?;
        // Element counts must fit usize, or q_len()/kv_len() would overflow.
        for (what, tokens, heads) in [
            ("q", self.seqs.total_q(), self.heads.q),
            ("k/v", self.seqs.total_k(), self.heads.kv),
        ] {
            if tokens
                .checked_mul(heads)
                .and_then(|n| n.checked_mul(self.heads.dim))
                .is_none()
            {
                return Err(AttnError::Layout(format!(
                    "{what} has {tokens} tokens * {heads} heads * D = {} elements, more than \
                     usize holds",
                    self.heads.dim
                )));
            }
        }
        let batch = self.seqs.batch();
        if self.mask.window == Some(0) {
            return Err(AttnError::Mask(
                "sliding window is 0 but expected >= 1 (a query must see itself)".into(),
            ));
        }
        if self.mask.sinks > 0 && self.mask.window.is_none() {
            return Err(AttnError::Mask(format!(
                "sinks is {} but there is no sliding window; sinks only exempt keys from a \
                 window",
                self.mask.sinks
            )));
        }
        if self.mask.needs_alignment() || self.inputs.doc_ids.is_some() {
            if let Some(b) = (0..batch).find(|&b| {
                let (_, lq, _, lk) = self.seqs.seq(b);
                lq > lk
            }) {
                let (_, lq, _, lk) = self.seqs.seq(b);
                return Err(AttnError::Layout(format!(
                    "sequence {b} has Lq = {lq} queries but Lk = {lk} keys; a {:?} mask (or \
                     document ids) needs Lq <= Lk (queries are the last Lq positions)",
                    self.mask.mode
                )));
            }
        }
        match (&self.inputs.prefix_lens, self.mask.mode) {
            (None, MaskMode::PrefixLm) => {
                return Err(AttnError::Mask(format!(
                    "mask mode PrefixLm needs prefix_lens, one per sequence (B = {batch})"
                )))
            }
            (Some(p), mode) => {
                if mode != MaskMode::PrefixLm {
                    return Err(AttnError::Mask(format!(
                        "prefix_lens given but mask mode is {mode:?}; expected PrefixLm"
                    )));
                }
                if p.len() != batch {
                    return Err(AttnError::Mask(format!(
                        "prefix_lens has {} entries but the batch has B = {batch} sequences",
                        p.len()
                    )));
                }
                for (b, &len) in p.iter().enumerate() {
                    let (_, _, _, lk) = self.seqs.seq(b);
                    if len < 0 || len as usize > lk {
                        return Err(AttnError::Mask(format!(
                            "prefix_lens[{b}] is {len} but expected 0 ..= Lk = {lk} (the \
                             prefix cannot be longer than the sequence)"
                        )));
                    }
                }
            }
            (None, _) => {}
        }
        if let Some(d) = &self.inputs.doc_ids {
            let total_k = self.seqs.total_k();
            if d.len() != total_k {
                return Err(AttnError::Shape {
                    what: "doc_ids",
                    actual: d.len(),
                    expected: total_k,
                    detail: format!("one per key token, total_k = {total_k}"),
                });
            }
            for b in 0..batch {
                let (_, _, k0, lk) = self.seqs.seq(b);
                if let Some(t) = (k0 + 1..k0 + lk).find(|&t| d[t] < d[t - 1]) {
                    return Err(AttnError::Layout(format!(
                        "doc_ids of sequence {b} must be non-decreasing but doc_ids[{t}] = {} < \
                         doc_ids[{}] = {}",
                        d[t],
                        t - 1,
                        d[t - 1]
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks `len` elements of argument `what` against the expected count.
    pub fn check_len(&self, what: &'static str, len: usize, expected: usize) -> Result<()> {
        if len == expected {
            return Ok(());
        }
        let (tq, tk) = (self.seqs.total_q(), self.seqs.total_k());
        let (hq, hkv, d) = (self.heads.q, self.heads.kv, self.heads.dim);
        Err(AttnError::Shape {
            what,
            actual: len,
            expected,
            detail: format!(
                "q (total_q={tq}, Hq={hq}, D={d}), k/v (total_k={tk}, Hkv={hkv}, D={d})"
            ),
        })
    }

    /// Checks the lengths of q, k, v.
    pub fn check_lens(&self, q: usize, k: usize, v: usize) -> Result<()> {
        self.check_len("q", q, self.q_len())?;
        self.check_len("k", k, self.kv_len())?;
        self.check_len("v", v, self.kv_len())
    }

    /// Checks the positions (lengths, >= 0) of the fused RoPE.
    pub fn check_positions(&self, pos: &Positions) -> Result<()> {
        for (what, p, n) in [
            ("positions.q", &pos.q, self.seqs.total_q()),
            ("positions.k", &pos.k, self.seqs.total_k()),
        ] {
            if let Some(p) = p {
                self.check_len(what, p.len(), n)?;
                if let Some(t) = p.iter().position(|&x| x < 0) {
                    return Err(AttnError::Layout(format!(
                        "{what}[{t}] is {} but expected a position >= 0",
                        p[t]
                    )));
                }
            }
        }
        Ok(())
    }

    /// Default RoPE position of query row `i` of sequence `b`: its aligned position
    /// `i + lk - lq`, or `i` when a bidirectional sequence has more queries than keys.
    pub fn default_q_position(&self, b: usize, i: usize) -> i32 {
        let (_, lq, _, lk) = self.seqs.seq(b);
        (if lq <= lk { i + lk - lq } else { i }) as i32
    }

    /// The RoPE position of every query and key token `((total_q,), (total_k,))`: the given
    /// ones, or the defaults ([`Problem::default_q_position`] for queries, the index within
    /// the sequence for keys). Used by the reference, the tests and the GPU tables' coverage.
    pub fn resolve_positions(&self, pos: &Positions) -> (Vec<i32>, Vec<i32>) {
        let seqs = &self.seqs;
        let q = pos.q.clone().unwrap_or_else(|| {
            let mut p = vec![0; seqs.total_q()];
            for b in 0..seqs.batch() {
                let (q0, lq, _, _) = seqs.seq(b);
                for i in 0..lq {
                    p[q0 + i] = self.default_q_position(b, i);
                }
            }
            p
        });
        let k = pos.k.clone().unwrap_or_else(|| {
            let mut p = vec![0; seqs.total_k()];
            for b in 0..seqs.batch() {
                let (_, _, k0, lk) = seqs.seq(b);
                for j in 0..lk {
                    p[k0 + j] = j as i32;
                }
            }
            p
        });
        (q, k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SMs of the H100 the schedule table in the README was measured on.
    const H100_SMS: usize = 132;
    /// Tile sizes of the kernels (forward query blocks, backward key blocks).
    const FWD_ROWS: usize = 128;
    const BWD_KEYS: usize = 64;

    /// `Auto` picks what the README's schedule table says for its measured shapes: pairs in
    /// the forward of large causal grids, and in the backward's main kernel only at the
    /// long-tail 500M training shape (8 x 2048, GQA 16/4, D = 64: 2 CTAs per SM).
    #[test]
    fn auto_schedule_matches_the_measured_table() {
        let auto = |tiles, ctas, slots| {
            TileSchedule::Auto.pairs(&Mask::CAUSAL, tiles, ctas, H100_SMS, slots)
        };
        // (batch, q heads, kv heads, L, backward CTAs per SM), forward and backward picks
        let shapes = [
            ((8, 16, 4, 2048, 2), (true, true)),
            ((8, 16, 16, 2048, 1), (true, false)),
            ((2, 16, 16, 8192, 1), (true, false)),
            ((2, 32, 32, 8192, 2), (true, false)),
        ];
        for ((b, hq, hkv, l, per_sm), want) in shapes {
            let fwd = auto(l / FWD_ROWS, b * hq, None);
            let bwd = auto(l / BWD_KEYS, b * hkv, Some(per_sm));
            assert_eq!((fwd, bwd), want, "B={b} Hq={hq} Hkv={hkv} L={l}");
        }
    }

    /// Windows and sinks reach the kernels clamped to the longest key sequence (same mask,
    /// no i32 wrap), unchanged below it, and as zeros without a window.
    #[test]
    fn kernel_window_is_clamped_to_the_longest_sequence() {
        let heads = Heads::new(2, 2, 64);
        let (batch, lq, lk) = (2, 48, 96);
        let mut p = Problem::fixed(heads, batch, lq, lk, Mask::sliding(usize::MAX, usize::MAX));
        assert_eq!(p.kernel_window_sinks(), (lk as i32, lk as i32));
        p.mask = Mask::sliding(lk / 4, 2);
        assert_eq!(p.kernel_window_sinks(), (lk as i32 / 4, 2));
        p.mask = Mask::CAUSAL;
        assert_eq!(p.kernel_window_sinks(), (0, 0));
        // varlen: the longest key sequence bounds it
        let (short, long) = (lk / 2, lk);
        p.seqs = Seqs::Varlen {
            cu_q: vec![0, lq as i32, 2 * lq as i32],
            cu_k: vec![0, short as i32, (short + long) as i32],
        };
        p.mask = Mask {
            mode: MaskMode::Bidirectional,
            window: Some(1 << 40),
            sinks: 0,
        };
        assert_eq!(p.kernel_window_sinks(), (long as i32, 0));
        // the clamped window gives the reference the same mask as the unbounded one
        let (w, _) = p.kernel_window_sinks();
        let wide = p.clone();
        let mut clamped = p.clone();
        clamped.mask.window = Some(w as usize);
        for b in 0..2 {
            let (_, lq_b, _, lk_b) = p.seqs.seq(b);
            for i in 0..lq_b {
                for j in 0..lk_b {
                    assert_eq!(
                        wide.visible(b, i, j),
                        clamped.visible(b, i, j),
                        "b={b} i={i} j={j}"
                    );
                }
            }
        }
    }

    /// Masks whose tiles cost the same, and grids too small to fill the GPU twice after
    /// halving, are never paired by `Auto`; `Single` and `Paired` ignore the shape.
    #[test]
    fn auto_schedule_leaves_uniform_and_small_grids_alone() {
        let (tiles, ctas) = (8192 / FWD_ROWS, 2 * 16);
        for mask in [Mask::BIDIRECTIONAL, Mask::sliding(4096, 4)] {
            assert!(!TileSchedule::Auto.pairs(&mask, tiles, ctas, H100_SMS, None));
        }
        let prefix = Mask {
            mode: MaskMode::PrefixLm,
            ..Mask::CAUSAL
        };
        assert!(TileSchedule::Auto.pairs(&prefix, tiles, ctas, H100_SMS, None));
        // 4 query blocks x 4 heads: 8 paired CTAs for 132 SMs
        assert!(!TileSchedule::Auto.pairs(&Mask::CAUSAL, 4, 4, H100_SMS, None));
        assert!(TileSchedule::Paired.pairs(&Mask::BIDIRECTIONAL, 1, 1, H100_SMS, None));
        assert!(!TileSchedule::Single.pairs(&Mask::CAUSAL, tiles, ctas, H100_SMS, None));
    }
}
