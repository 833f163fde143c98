//! Optional byte-level BPE vocabulary for text and code, trained and stored with the HF
//! `tokenizers` crate, with its ids laid out in the Tritter vocab.
//!
//! The tokenizer.json this module writes is a standard HF byte-level BPE (GPT-2 style:
//! `ByteLevel` pre-tokenizer without prefix space, no normalizer, `ByteLevel` decoder) whose
//! ids already *are* Tritter ids, so HF `tokenizers` in Python or Rust loads it and produces
//! the same ids for UTF-8 text:
//!
//! - ids `0..8`: the special tokens `<pad>`..`<audio>` (also registered as special added tokens);
//! - ids `8..264`: the 256 single-byte tokens, byte `b` at `8 + b` (the byte-level alphabet
//!   character of `b`), i.e. exactly the byte-level ids of [`super::bytes`];
//! - ids `264..`: merged tokens in merge order, all inside [`VocabLayout::bpe_range`].
//!
//! Exact round trip for any byte string: the input is split into maximal valid-UTF-8 runs,
//! which go through the BPE, and invalid bytes, which fall back to their byte ids. Special
//! token text inside the input (a literal `"<bos>"`) is encoded as plain text, never as the
//! special id (`set_encode_special_tokens(true)`), and every id decodes through a byte table,
//! never through lossy UTF-8.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use tokenizers::models::bpe::{BpeTrainerBuilder, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer, TokenizerBuilder, TokenizerImpl,
};

use super::error::{Result, TokenizerError};
use super::io::write_atomic;
use super::vocab::{
    Modality, SpecialToken, VocabLayout, BYTE_OFFSET, MIN_VOCAB_SIZE, NUM_BYTE_TOKENS,
};

/// Settings of [`BpeVocab::train`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpeTrainingConfig {
    /// Number of merged tokens to learn (ids `264..264 + num_merges`); at most the layout's
    /// BPE range length. Training stops earlier when no pair reaches `min_frequency`.
    pub num_merges: usize,
    /// A pair must occur at least this often in the corpus to be merged.
    pub min_frequency: u64,
}

impl BpeTrainingConfig {
    /// A config that fills the whole BPE range of `layout` (the usual choice).
    pub fn fill(layout: &VocabLayout) -> Self {
        Self {
            num_merges: layout.bpe_range().len(),
            min_frequency: 2,
        }
    }
}

/// A byte-level BPE vocabulary whose ids live in the Tritter layout (see the module docs).
#[derive(Clone)]
pub struct BpeVocab {
    tokenizer: Tokenizer,
    /// Bytes of BPE id `264 + i` at index `i`; `None` for ids the vocabulary leaves unused.
    pieces: Vec<Option<Box<[u8]>>>,
    bpe_end: u32,
}

impl std::fmt::Debug for BpeVocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpeVocab")
            .field("num_merged_tokens", &self.num_merged_tokens())
            .field("bpe_end", &self.bpe_end)
            .finish()
    }
}

/// GPT-2 byte-level alphabet: the printable character standing for each byte.
pub(crate) fn byte_chars() -> &'static [char; 256] {
    static CHARS: OnceLock<[char; 256]> = OnceLock::new();
    CHARS.get_or_init(|| {
        let printable = |b: u32| {
            (u32::from(b'!')..=u32::from(b'~')).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b)
        };
        let mut chars = ['\0'; 256];
        let mut next = 256u32;
        for (b, c) in (0u32..).zip(chars.iter_mut()) {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            // All codes are below 0x200, valid scalar values.
            *c = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
        }
        chars
    })
}

fn char_bytes() -> &'static HashMap<char, u8> {
    static MAP: OnceLock<HashMap<char, u8>> = OnceLock::new();
    MAP.get_or_init(|| {
        (0u8..=255)
            .map(|b| (byte_chars()[usize::from(b)], b))
            .collect()
    })
}

/// Bytes a byte-level token string stands for, `None` if it has a non-alphabet character.
fn token_bytes(token: &str) -> Option<Vec<u8>> {
    token
        .chars()
        .map(|c| char_bytes().get(&c).copied())
        .collect()
}

fn bpe_err(e: tokenizers::Error) -> TokenizerError {
    TokenizerError::Bpe(e)
}

impl BpeVocab {
    /// Trains a byte-level BPE on `texts` and lays its ids out in `layout` (module docs).
    /// Deterministic for a given corpus and config. Errors when `config.num_merges` exceeds
    /// the layout's BPE range.
    pub fn train<I, S>(texts: I, layout: &VocabLayout, config: &BpeTrainingConfig) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        layout.require(Modality::Text, config.num_merges)?;
        let byte_level = ByteLevel::new(false, true, true);
        let mut trainer_tk: TokenizerImpl<
            BPE,
            NormalizerWrapper,
            ByteLevel,
            PostProcessorWrapper,
            ByteLevel,
        > = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(byte_level))
            .with_post_processor(None)
            .with_decoder(Some(byte_level))
            .build()
            .map_err(bpe_err)?;
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(NUM_BYTE_TOKENS as usize + config.num_merges)
            .min_frequency(config.min_frequency)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        trainer_tk.train(&mut trainer, texts).map_err(bpe_err)?;
        let trained = trainer_tk.get_model();

        // Re-number: specials 0..8, byte characters at 8 + b, merged tokens from 264 on in
        // the order the trainer created them (HF ids grow with creation order).
        let mut hf_vocab: Vec<(String, u32)> = trained.get_vocab().into_iter().collect();
        hf_vocab.sort_by_key(|&(_, id)| id);
        let mut vocab: Vocab = SpecialToken::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), s.id()))
            .collect();
        vocab.extend(
            (0u32..)
                .zip(byte_chars())
                .map(|(b, c)| (c.to_string(), BYTE_OFFSET + b)),
        );
        let mut next = MIN_VOCAB_SIZE as u32;
        for (token, _) in hf_vocab {
            let mut chars = token.chars();
            if let (Some(c), None) = (chars.next(), chars.next()) {
                if char_bytes().contains_key(&c) {
                    continue; // single bytes already placed at 8 + b
                }
            }
            vocab.insert(token, next);
            next += 1;
        }
        let model_json = serde_json::to_value(trained)
            .map_err(|e| TokenizerError::BpeFormat(format!("cannot serialize trained BPE: {e}")))?;
        let merges: Vec<(String, String)> = serde_json::from_value(model_json["merges"].clone())
            .map_err(|e| TokenizerError::BpeFormat(format!("trained BPE merges: {e}")))?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(bpe_err)?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(byte_level));
        tokenizer.with_decoder(Some(byte_level));
        tokenizer
            .add_special_tokens(
                SpecialToken::ALL
                    .iter()
                    .map(|s| AddedToken::from(s.as_str(), true)),
            )
            .map_err(bpe_err)?;
        Self::from_tokenizer(tokenizer, layout)
    }

    /// Wraps a loaded HF tokenizer after checking that it follows the layout (module docs):
    /// byte-level BPE, no normalizer, no truncation or padding, specials at 0..8, bytes at
    /// 8..264, every other id inside the BPE range, no other added tokens.
    pub fn from_tokenizer(mut tokenizer: Tokenizer, layout: &VocabLayout) -> Result<Self> {
        let fmt_err = |m: String| TokenizerError::BpeFormat(m);
        let ModelWrapper::BPE(bpe) = tokenizer.get_model() else {
            return Err(fmt_err("the model is not BPE".into()));
        };
        if bpe.get_continuing_subword_prefix().is_some() {
            return Err(fmt_err(
                "continuing_subword_prefix must be null for a byte-level BPE".into(),
            ));
        }
        if bpe.end_of_word_suffix.is_some() || bpe.dropout.is_some() {
            return Err(fmt_err(
                "end_of_word_suffix and dropout must be null (exact, deterministic encoding)"
                    .into(),
            ));
        }
        if tokenizer.get_normalizer().is_some() {
            return Err(fmt_err(
                "a normalizer is set; it would break the exact byte round trip".into(),
            ));
        }
        match tokenizer.get_pre_tokenizer() {
            Some(PreTokenizerWrapper::ByteLevel(bl)) if !bl.add_prefix_space => {}
            Some(PreTokenizerWrapper::ByteLevel(_)) => {
                return Err(fmt_err(
                    "the ByteLevel pre-tokenizer has add_prefix_space = true; expected false"
                        .into(),
                ))
            }
            _ => return Err(fmt_err("the pre-tokenizer must be ByteLevel".into())),
        }
        if !matches!(
            tokenizer.get_decoder(),
            None | Some(DecoderWrapper::ByteLevel(_))
        ) {
            return Err(fmt_err("the decoder must be ByteLevel or absent".into()));
        }
        if tokenizer.get_truncation().is_some() || tokenizer.get_padding().is_some() {
            return Err(fmt_err(
                "truncation and padding must be off (no silent truncation)".into(),
            ));
        }
        for (id, added) in tokenizer.get_added_tokens_decoder() {
            match SpecialToken::from_id(id) {
                Some(s) if s.as_str() == added.content => {}
                _ => {
                    return Err(fmt_err(format!(
                        "added token {:?} has id {id}; only the specials <pad>..<audio> at ids 0..8 are allowed",
                        added.content
                    )))
                }
            }
        }

        let bpe_range = layout.bpe_range();
        let mut pieces: Vec<Option<Box<[u8]>>> = vec![None; bpe_range.len()];
        let mut low_ids = 0usize;
        for (token, id) in bpe.get_vocab() {
            if let Some(s) = SpecialToken::from_id(id) {
                if token != s.as_str() {
                    return Err(fmt_err(format!(
                        "id {id} is {token:?} but the layout reserves it for {s}"
                    )));
                }
                low_ids += 1;
            } else if layout.byte_range().contains(&id) {
                let want = byte_chars()[(id - BYTE_OFFSET) as usize];
                if token.chars().ne(std::iter::once(want)) {
                    return Err(fmt_err(format!(
                        "id {id} is {token:?} but the layout reserves it for byte 0x{:02x} ({want:?})",
                        id - BYTE_OFFSET
                    )));
                }
                low_ids += 1;
            } else if bpe_range.contains(&id) {
                let bytes = token_bytes(&token).ok_or_else(|| {
                    fmt_err(format!(
                        "token {token:?} (id {id}) has characters outside the byte-level alphabet"
                    ))
                })?;
                pieces[(id - bpe_range.start) as usize] = Some(bytes.into_boxed_slice());
            } else {
                return Err(fmt_err(format!(
                    "token {token:?} has id {id} outside the BPE range {}..{} of vocab_size {}",
                    bpe_range.start,
                    bpe_range.end,
                    layout.vocab_size()
                )));
            }
        }
        if low_ids != MIN_VOCAB_SIZE {
            return Err(fmt_err(format!(
                "the vocab defines {low_ids} of the {MIN_VOCAB_SIZE} special and byte ids 0..{MIN_VOCAB_SIZE}; all are required"
            )));
        }
        // Literal "<bos>" in user text is text, not the special id.
        tokenizer.set_encode_special_tokens(true);
        Ok(Self {
            tokenizer,
            pieces,
            bpe_end: bpe_range.end,
        })
    }

    /// Parses a tokenizer.json string and validates it against `layout`.
    pub fn from_json(json: &str, layout: &VocabLayout) -> Result<Self> {
        let tokenizer: Tokenizer = json.parse().map_err(bpe_err)?;
        Self::from_tokenizer(tokenizer, layout)
    }

    /// Loads a tokenizer.json file and validates it against `layout`.
    pub fn load(path: impl AsRef<Path>, layout: &VocabLayout) -> Result<Self> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&json, layout)
    }

    /// The standard HF tokenizer.json text of this vocabulary.
    pub fn to_json(&self, pretty: bool) -> Result<String> {
        self.tokenizer.to_string(pretty).map_err(bpe_err)
    }

    /// Writes tokenizer.json atomically (temporary file + rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        write_atomic(path.as_ref(), self.to_json(true)?.as_bytes())
    }

    /// Number of merged tokens (ids in the BPE range that this vocabulary defines).
    pub fn num_merged_tokens(&self) -> usize {
        self.pieces.iter().filter(|p| p.is_some()).count()
    }

    /// The underlying HF tokenizer (ids are Tritter ids).
    pub fn hf_tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The bytes of BPE id `id`, `None` when `id` is outside the BPE range or unused.
    pub fn piece(&self, id: u32) -> Option<&[u8]> {
        let index = id.checked_sub(MIN_VOCAB_SIZE as u32)?;
        self.pieces.get(index as usize)?.as_deref()
    }

    /// Appends the ids of `bytes` to `out`: valid UTF-8 runs through the BPE, invalid
    /// bytes as byte ids. Concatenating the pieces of the output gives `bytes` back.
    pub fn encode_into(&self, bytes: &[u8], out: &mut Vec<u32>) -> Result<()> {
        for chunk in bytes.utf8_chunks() {
            let text = chunk.valid();
            if !text.is_empty() {
                let encoding = self.tokenizer.encode_fast(text, false).map_err(bpe_err)?;
                out.extend_from_slice(encoding.get_ids());
            }
            out.extend(chunk.invalid().iter().map(|&b| BYTE_OFFSET + u32::from(b)));
        }
        Ok(())
    }

    /// End of the BPE range this vocabulary was validated against.
    pub fn bpe_end(&self) -> u32 {
        self.bpe_end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our byte-to-character table is the GPT-2 alphabet HF's `ByteLevel` uses, one char per byte.
    #[test]
    fn byte_chars_match_hf_byte_level_alphabet() {
        let ours: std::collections::HashSet<char> = byte_chars().iter().copied().collect();
        let hf: std::collections::HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(ours.len(), NUM_BYTE_TOKENS as usize);
        assert_eq!(ours, hf);
        assert_eq!(byte_chars()[usize::from(b'a')], 'a');
        assert_eq!(byte_chars()[usize::from(b' ')], '\u{120}'); // 'Ġ'
    }
}
