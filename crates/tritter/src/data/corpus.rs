//! The built-in corpus: this workspace's Rust and CUDA sources (`*.rs`, `*.cu`, `*.cuh`),
//! compiled into the binary by `build.rs`, so `tritter train` has data on a fresh machine.
//!
//! About 10% of the files (those whose path hashes to 0 mod 10, stable as files come and
//! go) are held out for validation. Every file becomes one `<code>` [`Document`].

use super::Document;
use crate::tokenizer::Modality;

include!(concat!(env!("OUT_DIR"), "/corpus_index.rs"));

static CORPUS_BLOB: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/corpus.bin"));

/// One file of the built-in corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorpusFile {
    /// Path relative to the workspace root, `/`-separated.
    pub path: &'static str,
    /// The file's bytes.
    pub bytes: &'static [u8],
    /// Whether the file belongs to the held-out validation part.
    pub validation: bool,
}

/// Every file of the corpus in its deterministic (sorted path) order.
pub fn files() -> impl Iterator<Item = CorpusFile> {
    CORPUS_INDEX
        .iter()
        .map(|&(path, offset, len, validation)| CorpusFile {
            path,
            bytes: &CORPUS_BLOB[offset..offset + len],
            validation,
        })
}

/// Total size of the corpus in bytes.
pub fn total_bytes() -> usize {
    CORPUS_BLOB.len()
}

/// The corpus as `(train, validation)` `<code>` documents.
pub fn builtin_documents() -> (Vec<Document>, Vec<Document>) {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for f in files() {
        let doc = Document {
            modality: Modality::Code,
            bytes: f.bytes.to_vec(),
            source: format!("builtin:{}", f.path),
        };
        if f.validation {
            val.push(doc);
        } else {
            train.push(doc);
        }
    }
    (train, val)
}
