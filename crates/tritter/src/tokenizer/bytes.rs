//! Byte-level text and code: every byte string (UTF-8 or not) maps to one id per byte,
//! `8 + b`, optionally after a `<text>` or `<code>` prefix. The round trip is exact.

use super::error::{Result, TokenizerError};
use super::vocab::{Modality, TokenKind, VocabLayout, BYTE_OFFSET};

/// Encodes `bytes` as byte tokens (`8 + b` each), after the prefix token of `prefix` if given.
/// Output length: `bytes.len() + prefix.is_some() as usize`.
pub fn encode_bytes(bytes: &[u8], prefix: Option<Modality>) -> Vec<u32> {
    let mut ids = Vec::with_capacity(bytes.len() + usize::from(prefix.is_some()));
    if let Some(m) = prefix {
        ids.push(m.prefix_token().id());
    }
    ids.extend(bytes.iter().map(|&b| BYTE_OFFSET + u32::from(b)));
    ids
}

/// Decodes byte tokens back to bytes. Every id must be a byte id (`8..264`); prefix tokens
/// are not accepted here (the [`MultimodalTokenizer`](super::MultimodalTokenizer) splits
/// segments). Errors name the first offending id and its position.
pub fn decode_bytes(ids: &[u32], layout: &VocabLayout) -> Result<Vec<u8>> {
    ids.iter()
        .enumerate()
        .map(|(position, &id)| match layout.classify(id, position)? {
            TokenKind::Byte(b) => Ok(b),
            kind => Err(TokenizerError::UnexpectedToken {
                id,
                kind: kind.to_string(),
                position,
                expected: "a byte token (ids 8..264)",
            }),
        })
        .collect()
}
