//! Attention masks (DESIGN.md section 4): causal, bidirectional, prefix-LM, embedding, with
//! sliding window, attention sinks and document masking.

use candle_core::{Device, Tensor};

use crate::config::{AttentionMode, TritterConfig};
use crate::{Result, TritterError};

/// Which keys each query may see, for one batch.
///
/// Key `j` is visible to query `i` of sequence `b` iff all of:
/// * mode: causal `j <= i`; bidirectional / embedding: always; prefix-LM:
///   `j < prefix_lens[b] || j <= i`;
/// * window `W` (if any): `|i - j| < W`, i.e. `i - W < j` for causal keys; the first
///   `sinks` keys of the sequence are exempt (StreamingLLM sinks);
/// * documents (if any): `doc_ids[b][i] == doc_ids[b][j]` (packed documents never attend to
///   each other; sinks do not cross documents either).
///
/// Every query sees itself, so no softmax row is empty.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskSpec {
    /// Base visibility rule.
    pub mode: AttentionMode,
    /// Sliding window `W >= 1`, or full attention.
    pub sliding_window: Option<usize>,
    /// Sink keys exempt from the window.
    pub sinks: usize,
    /// Prefix length per sequence (required for `PrefixLm`, `(B,)`).
    pub prefix_lens: Option<Vec<usize>>,
    /// Document id per position, `(B, L)`.
    pub doc_ids: Option<Vec<Vec<u32>>>,
}

impl MaskSpec {
    /// A mask with `mode` and nothing else.
    pub fn new(mode: AttentionMode) -> Self {
        MaskSpec {
            mode,
            sliding_window: None,
            sinks: 0,
            prefix_lens: None,
            doc_ids: None,
        }
    }

    /// Plain causal attention.
    pub fn causal() -> Self {
        Self::new(AttentionMode::Causal)
    }

    /// The config's mode, window and sinks.
    pub fn from_config(config: &TritterConfig) -> Self {
        MaskSpec {
            sliding_window: config.sliding_window,
            sinks: config.attention_sinks,
            ..Self::new(config.attention_mode)
        }
    }

    /// With a sliding window of `w` tokens and `sinks` sink keys.
    pub fn with_window(mut self, w: usize, sinks: usize) -> Self {
        self.sliding_window = Some(w);
        self.sinks = sinks;
        self
    }

    /// With prefix lengths `(B,)` (prefix-LM).
    pub fn with_prefix_lens(mut self, lens: Vec<usize>) -> Self {
        self.prefix_lens = Some(lens);
        self
    }

    /// With document ids `(B, L)`.
    pub fn with_doc_ids(mut self, ids: Vec<Vec<u32>>) -> Self {
        self.doc_ids = Some(ids);
        self
    }

    /// Checks the spec against a batch of `batch` sequences of `len` tokens.
    pub fn validate(&self, batch: usize, len: usize) -> Result<()> {
        if self.sliding_window == Some(0) {
            return Err(TritterError::InvalidMask(
                "sliding_window is 0 but expected >= 1 (a query must see itself)".into(),
            ));
        }
        if self.sinks > 0 && self.sliding_window.is_none() {
            return Err(TritterError::InvalidMask(format!(
                "sinks is {} but there is no sliding window; sinks only exempt keys from a window",
                self.sinks
            )));
        }
        match (&self.prefix_lens, self.mode) {
            (None, AttentionMode::PrefixLm) => {
                return Err(TritterError::InvalidMask(
                    "mode prefix_lm needs prefix_lens, one per sequence".into(),
                ))
            }
            (Some(p), _) => {
                if self.mode != AttentionMode::PrefixLm {
                    return Err(TritterError::InvalidMask(format!(
                        "prefix_lens given but mode is {:?}; expected mode prefix_lm",
                        self.mode
                    )));
                }
                if p.len() != batch {
                    return Err(TritterError::InvalidMask(format!(
                        "prefix_lens has {} entries but the batch has {batch} sequences",
                        p.len()
                    )));
                }
                if let Some((b, &l)) = p.iter().enumerate().find(|(_, &l)| l > len) {
                    return Err(TritterError::InvalidMask(format!(
                        "prefix_lens[{b}] is {l} but expected <= sequence length {len}"
                    )));
                }
            }
            (None, _) => {}
        }
        if let Some(d) = &self.doc_ids {
            if d.len() != batch {
                return Err(TritterError::InvalidMask(format!(
                    "doc_ids has {} rows but the batch has {batch} sequences",
                    d.len()
                )));
            }
            if let Some((b, row)) = d.iter().enumerate().find(|(_, r)| r.len() != len) {
                return Err(TritterError::InvalidMask(format!(
                    "doc_ids[{b}] has {} entries but expected sequence length {len}",
                    row.len()
                )));
            }
        }
        Ok(())
    }

    /// Whether query `i` of sequence `b` may see key `j` (the rule in the type docs).
    /// Meant for a spec that passed [`validate`](Self::validate) for this batch; indices
    /// outside its prefix lengths or document ids see nothing (never a panic).
    pub fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        let mode_ok = match self.mode {
            AttentionMode::Causal => j <= i,
            AttentionMode::Bidirectional | AttentionMode::Embedding => true,
            AttentionMode::PrefixLm => {
                j <= i
                    || self
                        .prefix_lens
                        .as_ref()
                        .and_then(|p| p.get(b))
                        .is_some_and(|&p| j < p)
            }
        };
        let window_ok = match self.sliding_window {
            Some(w) => i.abs_diff(j) < w || j < self.sinks,
            None => true,
        };
        let doc_ok = self.doc_ids.as_ref().is_none_or(|d| {
            let row = d.get(b);
            match (row.and_then(|r| r.get(i)), row.and_then(|r| r.get(j))) {
                (Some(a), Some(c)) => a == c,
                _ => false,
            }
        });
        mode_ok && window_ok && doc_ok
    }

    /// The additive mask `(B, 1, L, L)` f32: 0 where visible, `-inf` elsewhere.
    pub fn to_bias(&self, batch: usize, len: usize, device: &Device) -> Result<Tensor> {
        self.validate(batch, len)?;
        let mut bias = Vec::with_capacity(batch * len * len);
        for b in 0..batch {
            for i in 0..len {
                for j in 0..len {
                    bias.push(if self.visible(b, i, j) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    });
                }
            }
        }
        Ok(Tensor::from_vec(bias, (batch, 1, len, len), device)?)
    }
}
