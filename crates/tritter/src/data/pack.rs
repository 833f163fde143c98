//! Packing documents into fixed-length training sequences with document ids.

use candle_core::{Device, Tensor};

use super::Document;
use crate::model::{fnv1a, FNV_OFFSET};
use crate::tokenizer::{MultimodalTokenizer, SpecialToken};
use crate::{Result, TritterError};

/// Document id of padding positions (after the last document of the last sequence).
pub const PAD_DOC: u32 = u32::MAX;

/// Token sequences of `seq_len + 1` tokens cut from the concatenation of all documents
/// (each `prefix, tokens..., <eos>`) with stride `seq_len`: inputs are the first `seq_len`
/// tokens of a sequence, targets the last `seq_len`, so consecutive sequences share one
/// token and every token after the first is a target exactly once. The last sequence is
/// padded with `<pad>` (id 0) and [`PAD_DOC`]; padded targets carry no loss.
///
/// `doc_ids` hold, per position, the index of the document the token belongs to (its
/// `<eos>` included), so the id changes exactly after each `<eos>`. The model's document
/// mask (`MaskSpec::with_doc_ids`) uses them to keep packed documents apart.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedDataset {
    seq_len: usize,
    tokens: Vec<u32>,
    doc_ids: Vec<u32>,
    num_documents: usize,
    num_tokens: usize,
    fingerprint: u64,
}

/// One batch of packed sequences, ready for the model.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Input ids `(B, L)` u32.
    pub inputs: Tensor,
    /// Target ids `(B, L)` u32 (inputs shifted by one).
    pub targets: Tensor,
    /// `(B, L)` f32: 1 where the target is a real token, 0 on padding.
    pub loss_mask: Tensor,
    /// Document id per input position, `(B, L)`, for `MaskSpec::with_doc_ids`.
    pub doc_ids: Vec<Vec<u32>>,
    /// Number of real targets (the sum of `loss_mask`).
    pub num_targets: usize,
}

impl PackedDataset {
    /// Tokenizes `docs` with `tokenizer` and packs them (see the type docs).
    pub fn from_documents(
        docs: &[Document],
        tokenizer: &MultimodalTokenizer,
        seq_len: usize,
    ) -> Result<Self> {
        let tokenized = docs
            .iter()
            .map(|d| d.tokenize(tokenizer))
            .collect::<Result<Vec<_>>>()?;
        Self::from_token_documents(&tokenized, seq_len)
    }

    /// Packs already tokenized documents (each should end with `<eos>`, as
    /// [`Document::tokenize`] makes them). Errors when `seq_len == 0` or the documents hold
    /// fewer than 2 tokens (nothing to predict).
    pub fn from_token_documents(docs: &[Vec<u32>], seq_len: usize) -> Result<Self> {
        if seq_len == 0 {
            return Err(TritterError::option("seq_len", 0, "expected >= 1"));
        }
        if docs.len() >= PAD_DOC as usize {
            return Err(TritterError::option(
                "documents",
                docs.len(),
                format!("expected < {PAD_DOC} documents per dataset"),
            ));
        }
        let num_tokens: usize = docs.iter().map(Vec::len).sum();
        if num_tokens < 2 {
            return Err(TritterError::EmptyDataset {
                what: "packed dataset".into(),
                detail: format!(
                    "{num_tokens} tokens in {} documents but at least 2 are needed for one target",
                    docs.len()
                ),
            });
        }
        let mut stream = Vec::with_capacity(num_tokens);
        let mut stream_docs = Vec::with_capacity(num_tokens);
        for (d, doc) in docs.iter().enumerate() {
            stream.extend_from_slice(doc);
            stream_docs.extend(std::iter::repeat_n(d as u32, doc.len()));
        }
        let n = (num_tokens - 1).div_ceil(seq_len);
        let row = seq_len + 1;
        let mut tokens = Vec::with_capacity(n * row);
        let mut doc_ids = Vec::with_capacity(n * row);
        for k in 0..n {
            let start = k * seq_len;
            let end = (start + row).min(num_tokens);
            tokens.extend_from_slice(&stream[start..end]);
            doc_ids.extend_from_slice(&stream_docs[start..end]);
            let pad = start + row - end;
            tokens.extend(std::iter::repeat_n(SpecialToken::Pad.id(), pad));
            doc_ids.extend(std::iter::repeat_n(PAD_DOC, pad));
        }
        let mut h = fnv1a(&(seq_len as u64).to_le_bytes(), FNV_OFFSET);
        for t in &tokens {
            h = fnv1a(&t.to_le_bytes(), h);
        }
        Ok(PackedDataset {
            seq_len,
            tokens,
            doc_ids,
            num_documents: docs.len(),
            num_tokens,
            fingerprint: h,
        })
    }

    /// Tokens per input sequence `L`.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of packed sequences.
    pub fn len(&self) -> usize {
        self.tokens.len() / (self.seq_len + 1)
    }

    /// Whether there is no sequence (never true for a constructed dataset).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Documents packed.
    pub fn num_documents(&self) -> usize {
        self.num_documents
    }

    /// Real tokens in the stream (padding excluded).
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// FNV-1a hash of `seq_len` and every packed token: identifies the dataset in a
    /// checkpoint's data cursor.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Sequence `i`: `seq_len + 1` tokens and their document ids, or `None` out of range.
    pub fn sequence(&self, i: usize) -> Option<(&[u32], &[u32])> {
        let row = self.seq_len + 1;
        let r = i.checked_mul(row)?..(i + 1).checked_mul(row)?;
        Some((self.tokens.get(r.clone())?, self.doc_ids.get(r)?))
    }

    /// Real targets of sequence `i` (what its row of a batch's loss mask counts), or `None`
    /// out of range. Data-parallel ranks sum it over the global batch for the loss
    /// denominator without building the other ranks' rows.
    pub fn num_targets_of(&self, i: usize) -> Option<usize> {
        let (_, d) = self.sequence(i)?;
        Some(d[1..].iter().filter(|&&doc| doc != PAD_DOC).count())
    }

    /// Entropy in nats of the unigram distribution of the targets (every real token after
    /// the first): the loss of the best model that ignores context, a bar a trained model
    /// must get under.
    pub fn unigram_entropy(&self) -> f64 {
        let mut counts = std::collections::HashMap::<u32, u64>::new();
        let mut total = 0u64;
        for i in 0..self.len() {
            let (t, d) = self.sequence(i).expect("in range");
            for (&tok, &doc) in t[1..].iter().zip(&d[1..]) {
                if doc != PAD_DOC {
                    *counts.entry(tok).or_default() += 1;
                    total += 1;
                }
            }
        }
        let total = total as f64;
        -counts
            .values()
            .map(|&c| {
                let p = c as f64 / total;
                p * p.ln()
            })
            .sum::<f64>()
    }

    /// The batch of sequences `indices` on `device`. Errors on an index out of range.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<Batch> {
        let l = self.seq_len;
        let b = indices.len();
        if b == 0 {
            return Err(TritterError::option("batch_size", 0, "expected >= 1"));
        }
        let mut inputs = Vec::with_capacity(b * l);
        let mut targets = Vec::with_capacity(b * l);
        let mut mask = Vec::with_capacity(b * l);
        let mut doc_ids = Vec::with_capacity(b);
        let mut num_targets = 0;
        for &i in indices {
            let (t, d) = self.sequence(i).ok_or_else(|| {
                TritterError::option(
                    "sequence index",
                    i,
                    format!("expected < {} sequences", self.len()),
                )
            })?;
            inputs.extend_from_slice(&t[..l]);
            targets.extend_from_slice(&t[1..]);
            for &doc in &d[1..] {
                let real = doc != PAD_DOC;
                num_targets += usize::from(real);
                mask.push(if real { 1f32 } else { 0.0 });
            }
            doc_ids.push(d[..l].to_vec());
        }
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (b, l), device)?,
            targets: Tensor::from_vec(targets, (b, l), device)?,
            loss_mask: Tensor::from_vec(mask, (b, l), device)?,
            doc_ids,
            num_targets,
        })
    }
}
