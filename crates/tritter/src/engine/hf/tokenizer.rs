//! [`HfTokenizer`]: a checkpoint's own `tokenizer.json`, loaded with the HF `tokenizers`
//! crate, so prompts get the ids the model was trained on (for BitNet b1.58 2B4T the Llama 3
//! tokenizer, whose post-processor prepends `<|begin_of_text|>`).

use std::path::Path;

use tokenizers::Tokenizer;

use crate::tokenizer::TokenizerError;
use crate::{Result, TritterError};

/// The tokenizer file of a Hugging Face checkpoint directory.
pub const HF_TOKENIZER_FILE: &str = "tokenizer.json";

/// A `tokenizer.json` and the tokenizer it describes.
#[derive(Clone)]
pub struct HfTokenizer {
    tokenizer: Tokenizer,
    json: String,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("json_bytes", &self.json.len())
            .finish()
    }
}

impl HfTokenizer {
    /// Parses a `tokenizer.json` (`path` names it in errors).
    pub fn from_json(json: String, path: impl AsRef<Path>) -> Result<Self> {
        let tokenizer: Tokenizer =
            json.parse()
                .map_err(|e: tokenizers::Error| TritterError::CorruptCheckpoint {
                    path: path.as_ref().to_path_buf(),
                    detail: format!("tokenizer.json does not load with the tokenizers crate: {e}"),
                })?;
        Ok(HfTokenizer { tokenizer, json })
    }

    /// Reads a `tokenizer.json` file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path).map_err(|e| TritterError::io(path, e))?;
        Self::from_json(json, path)
    }

    /// `dir/tokenizer.json` when the directory has one.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = dir.as_ref().join(HF_TOKENIZER_FILE);
        path.is_file().then(|| Self::load(&path)).transpose()
    }

    /// Ids of `text`; with `add_special_tokens` the tokenizer's post-processor runs (for
    /// Llama 3 style tokenizers: `<|begin_of_text|>` first), as `tokenizer(text)` does in
    /// Python.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| TritterError::Tokenizer(TokenizerError::Bpe(e)))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens kept unless `skip_special_tokens`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| TritterError::Tokenizer(TokenizerError::Bpe(e)))
    }

    /// Ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The id of a token string (`"<|eot_id|>"`), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The `tokenizer.json` text (what an export copies).
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}
