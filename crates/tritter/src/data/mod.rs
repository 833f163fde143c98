//! Training data: documents from directories, JSONL, parquet or the built-in corpus,
//! tokenized, packed into fixed-length sequences with per-position document ids, shuffled
//! with a seed, and served through a resumable [`DataCursor`].
//!
//! Pipeline:
//! 1. [`load_documents`] (or [`corpus::builtin_documents`]): [`Document`]s of raw bytes
//!    tagged `<code>` or `<text>`.
//! 2. [`split_documents`]: a seeded train/validation split by documents.
//! 3. [`PackedDataset::from_documents`]: each document becomes
//!    `<code>|<text>, tokens..., <eos>`; documents are concatenated into one stream and cut
//!    into sequences of `seq_len + 1` tokens with stride `seq_len` (the last token of one
//!    sequence is the first of the next), so every token is a training target exactly once.
//!    Each position carries the index of its document; ids change exactly after an `<eos>`.
//! 4. [`DataLoader`]: batches of packed sequences in a per-epoch seeded permutation; its
//!    [`DataCursor`] (epoch, position, seed, dataset fingerprint) is saved in checkpoints, so
//!    a resumed run sees exactly the remaining sequences.

pub mod corpus;
mod loader;
mod pack;
mod sources;

pub use loader::{Batch, DataCursor, DataLoader};
pub use pack::{PackedDataset, PAD_DOC};
pub use sources::{load_documents, LoadReport, MalformedPolicy, SourceOptions};

use crate::model::SeededRng;
use crate::tokenizer::{Modality, MultimodalTokenizer};
use crate::{Result, TritterError};

/// One training document: raw bytes (UTF-8 or not) and the modality whose prefix token
/// opens it (`<code>` or `<text>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// `Modality::Code` or `Modality::Text`.
    pub modality: Modality,
    /// The content.
    pub bytes: Vec<u8>,
    /// Where it came from (path, `path:line`, `path#row`), for messages.
    pub source: String,
}

impl Document {
    /// Token ids of this document: the prefix token, the content (bytes or BPE ids), `<eos>`.
    pub fn tokenize(&self, tokenizer: &MultimodalTokenizer) -> Result<Vec<u32>> {
        let mut ids = match self.modality {
            Modality::Code => tokenizer.encode_code(&self.bytes)?,
            _ => tokenizer.encode_text(&self.bytes)?,
        };
        ids.push(crate::tokenizer::SpecialToken::Eos.id());
        Ok(ids)
    }
}

/// Splits `docs` into (train, validation) with a seeded shuffle: documents go to
/// validation until they hold at least `val_fraction` of all bytes (at least one document).
/// A single document is split by bytes instead, at `1 - val_fraction` of its length.
/// `val_fraction == 0` returns no validation documents. Order inside each part is the
/// original order (shuffling happens per epoch in the loader).
pub fn split_documents(
    docs: Vec<Document>,
    val_fraction: f64,
    seed: u64,
) -> Result<(Vec<Document>, Vec<Document>)> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(TritterError::option(
            "val_fraction",
            val_fraction,
            "expected 0 <= val_fraction < 1",
        ));
    }
    if val_fraction == 0.0 || docs.is_empty() {
        return Ok((docs, Vec::new()));
    }
    if docs.len() == 1 {
        let doc = docs.into_iter().next().expect("one document");
        let cut = ((doc.bytes.len() as f64) * (1.0 - val_fraction)).round() as usize;
        let cut = cut.clamp(1.min(doc.bytes.len()), doc.bytes.len());
        let val = Document {
            modality: doc.modality,
            bytes: doc.bytes[cut..].to_vec(),
            source: format!("{} (validation tail)", doc.source),
        };
        let train = Document {
            bytes: doc.bytes[..cut].to_vec(),
            ..doc
        };
        return Ok((vec![train], vec![val]));
    }
    let total: usize = docs.iter().map(|d| d.bytes.len()).sum();
    let target = (total as f64 * val_fraction).ceil() as usize;
    let mut order: Vec<usize> = (0..docs.len()).collect();
    shuffle(&mut order, &mut SeededRng::new(seed));
    let mut is_val = vec![false; docs.len()];
    let mut val_bytes = 0usize;
    // Leave at least one training document.
    for &i in order.iter().take(docs.len() - 1) {
        if val_bytes >= target && val_bytes > 0 {
            break;
        }
        is_val[i] = true;
        val_bytes += docs[i].bytes.len();
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (doc, v) in docs.into_iter().zip(is_val) {
        if v {
            val.push(doc);
        } else {
            train.push(doc);
        }
    }
    Ok((train, val))
}

/// Fisher-Yates shuffle driven by `rng` (deterministic for a given generator state).
pub(crate) fn shuffle<T>(items: &mut [T], rng: &mut SeededRng) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}
