//! The id layout: which token ids belong to which modality (DESIGN.md section 5).
//!
//! Ids `0..8` are the special tokens, `8..264` the 256 raw bytes, and (when the vocab has at
//! least [`MIN_LATENT_VOCAB_SIZE`] ids) the last two ids are the latent-span markers `<bot>`
//! and `<eot>` of the embedding-prediction paradigm. What is left is split into a BPE range
//! (text and code share it), an image-codebook range and an audio-code range, in that order,
//! all disjoint. [`VocabLayout::new`] derives the split from the vocab size;
//! [`VocabLayout::with_media_codes`] takes explicit media range sizes.

use std::fmt;
use std::ops::Range;

use super::error::{Result, TokenizerError};

/// Number of special tokens (`<pad>` .. `<audio>`), ids `0..8`.
pub const NUM_SPECIAL_TOKENS: u32 = 8;
/// First byte id: byte `b` is token `BYTE_OFFSET + b`.
pub const BYTE_OFFSET: u32 = NUM_SPECIAL_TOKENS;
/// Number of byte tokens.
pub const NUM_BYTE_TOKENS: u32 = 256;
/// Smallest vocab the layout accepts: specials + bytes.
pub const MIN_VOCAB_SIZE: usize = (NUM_SPECIAL_TOKENS + NUM_BYTE_TOKENS) as usize;
/// Largest media range (image or audio) of the derived layout; the 65536 vocab gets exactly this.
pub const MAX_MEDIA_CODES: u32 = 8192;
/// A derived layout gives a media modality a range only if it has at least this many ids
/// (the 256 codes of 8-bit mu-law audio); smaller vocabs disable images and audio.
pub const MIN_MEDIA_CODES: u32 = 256;
/// Latent-span markers `<bot>`, `<eot>` reserved at the top of the vocab.
pub const NUM_LATENT_MARKERS: u32 = 2;
/// Smallest vocab that reserves the latent markers (specials + bytes + `<bot>` + `<eot>`).
/// Vocabs of 264 or 265 ids stay valid for token-only use and simply have no markers, so
/// [`MIN_VOCAB_SIZE`] keeps its meaning; the embedding-prediction paradigm requires this size.
pub const MIN_LATENT_VOCAB_SIZE: usize = MIN_VOCAB_SIZE + NUM_LATENT_MARKERS as usize;

/// The eight reserved tokens at ids `0..8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecialToken {
    /// `<pad>` (id 0): padding, ignored by the loss.
    Pad,
    /// `<bos>` (id 1): beginning of a sequence.
    Bos,
    /// `<eos>` (id 2): end of a sequence.
    Eos,
    /// `<unk>` (id 3): unknown token (never produced by this tokenizer, which covers all bytes).
    Unk,
    /// `<text>` (id 4): a text segment follows.
    Text,
    /// `<code>` (id 5): a source-code segment follows.
    Code,
    /// `<image>` (id 6): an image header and patch codes follow.
    Image,
    /// `<audio>` (id 7): mu-law audio codes follow.
    Audio,
}

impl SpecialToken {
    /// All special tokens in id order.
    pub const ALL: [SpecialToken; NUM_SPECIAL_TOKENS as usize] = [
        SpecialToken::Pad,
        SpecialToken::Bos,
        SpecialToken::Eos,
        SpecialToken::Unk,
        SpecialToken::Text,
        SpecialToken::Code,
        SpecialToken::Image,
        SpecialToken::Audio,
    ];

    /// The token id (0..8).
    pub fn id(self) -> u32 {
        self as u32
    }

    /// The token's text form, as written in tokenizer.json (`"<bos>"`).
    pub fn as_str(self) -> &'static str {
        match self {
            SpecialToken::Pad => "<pad>",
            SpecialToken::Bos => "<bos>",
            SpecialToken::Eos => "<eos>",
            SpecialToken::Unk => "<unk>",
            SpecialToken::Text => "<text>",
            SpecialToken::Code => "<code>",
            SpecialToken::Image => "<image>",
            SpecialToken::Audio => "<audio>",
        }
    }

    /// The special token with this id, `None` for ids >= 8.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(id).ok()?).copied()
    }
}

impl fmt::Display for SpecialToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The four input modalities; each has a prefix token that opens its segment. Also the
/// `modalities` field of `TritterConfig` (serialized in snake case: `"text"`, `"code"`, ...).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    /// Natural-language text (bytes or BPE tokens).
    Text,
    /// Source code (bytes or BPE tokens, same vocabulary as text).
    Code,
    /// Images as patch codes of a k-means codebook.
    Image,
    /// Audio as 8-bit mu-law codes.
    Audio,
}

impl Modality {
    /// Every modality, in id-range order.
    pub const ALL: [Modality; 4] = [
        Modality::Text,
        Modality::Code,
        Modality::Image,
        Modality::Audio,
    ];

    /// The special token that opens a segment of this modality.
    pub fn prefix_token(self) -> SpecialToken {
        match self {
            Modality::Text => SpecialToken::Text,
            Modality::Code => SpecialToken::Code,
            Modality::Image => SpecialToken::Image,
            Modality::Audio => SpecialToken::Audio,
        }
    }

    /// Lower-case name, as in the model config's `modalities` list (`"image"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Text => "text",
            Modality::Code => "code",
            Modality::Image => "image",
            Modality::Audio => "audio",
        }
    }
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The two latent-span markers of the embedding-prediction paradigm (Coconut): `<bot>` opens
/// a span of continuous thoughts (hidden states fed back as input embeddings, no token ids),
/// `<eot>` closes it. Their ids depend on the vocab size: `<bot> = V - 2`, `<eot> = V - 1`
/// ([`VocabLayout::latent_id`]). The tokenizer never emits them; decode reports them as
/// [`TokenKind::Latent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LatentToken {
    /// `<bot>` (id `V - 2`): begin of thought, a latent span follows.
    Bot,
    /// `<eot>` (id `V - 1`): end of thought, tokens follow.
    Eot,
}

impl LatentToken {
    /// The marker's text form (`"<bot>"`, `"<eot>"`).
    pub fn as_str(self) -> &'static str {
        match self {
            LatentToken::Bot => "<bot>",
            LatentToken::Eot => "<eot>",
        }
    }
}

impl fmt::Display for LatentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a token id means under a [`VocabLayout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// One of the eight special tokens.
    Special(SpecialToken),
    /// A raw byte.
    Byte(u8),
    /// A BPE token; the payload is the id itself (BPE ids are stored unshifted in tokenizer.json).
    Bpe(u32),
    /// An image patch code: the index into the image codebook.
    ImageCode(u32),
    /// An audio code: the mu-law code (or frame-codebook index).
    AudioCode(u32),
    /// A latent-span marker (`<bot>`, `<eot>`), the top two ids of the vocab.
    Latent(LatentToken),
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenKind::Special(s) => write!(f, "special {s}"),
            TokenKind::Byte(b) => write!(f, "byte 0x{b:02x}"),
            TokenKind::Bpe(id) => write!(f, "BPE token {id}"),
            TokenKind::ImageCode(c) => write!(f, "image code {c}"),
            TokenKind::AudioCode(c) => write!(f, "audio code {c}"),
            TokenKind::Latent(m) => write!(f, "latent marker {m}"),
        }
    }
}

/// Disjoint id ranges of every modality for one vocab size.
///
/// | ids                          | meaning                     | 65536 vocab     |
/// |------------------------------|-----------------------------|-----------------|
/// | `0..8`                       | special tokens              | `0..8`          |
/// | `8..264`                     | bytes `0x00..=0xff`         | `8..264`        |
/// | `264..bpe_end`               | BPE merges (text and code)  | `264..49150`    |
/// | `bpe_end..bpe_end+image`     | image codebook codes        | `49150..57342`  |
/// | `..vocab_size-2`             | audio codes                 | `57342..65534`  |
/// | `vocab_size-2`, `vocab_size-1` | `<bot>`, `<eot>`          | `65534`, `65535`|
///
/// The derived layout ([`VocabLayout::new`]) gives image and audio `min(8192, vocab/8)` ids
/// each, or none when that is below 256; everything else after the bytes is BPE. The two
/// latent markers are reserved whenever `vocab_size >= 266` ([`MIN_LATENT_VOCAB_SIZE`]); the
/// media ranges keep their sizes and move down by two, the BPE range gives up the two ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabLayout {
    vocab_size: u32,
    bpe: Range<u32>,
    image: Range<u32>,
    audio: Range<u32>,
    latent: Range<u32>,
}

impl VocabLayout {
    /// Derives the layout of a vocab: image and audio each get `min(8192, vocab_size / 8)`
    /// ids (0 when that is below 256, disabling the modality), BPE gets the rest.
    /// Errors when `vocab_size < 264` or does not fit `u32`.
    pub fn new(vocab_size: usize) -> Result<Self> {
        let v = Self::check_size(vocab_size)?;
        let media = (v / 8).min(MAX_MEDIA_CODES);
        let media = if media >= MIN_MEDIA_CODES { media } else { 0 };
        // media > 0 only for v >= 2048, and 2 * media + 2 <= v / 4 + 2 leaves the bytes intact.
        Self::with_media_codes(vocab_size, media as usize, media as usize)
    }

    /// A layout with explicit image and audio range lengths (0 disables a modality); the BPE
    /// range takes what is left after specials, bytes and the latent markers (reserved when
    /// `vocab_size >= 266`). Errors when they do not fit.
    pub fn with_media_codes(
        vocab_size: usize,
        image_codes: usize,
        audio_codes: usize,
    ) -> Result<Self> {
        let v = Self::check_size(vocab_size)?;
        let latent = if vocab_size >= MIN_LATENT_VOCAB_SIZE {
            NUM_LATENT_MARKERS
        } else {
            0
        };
        let available = vocab_size - MIN_VOCAB_SIZE - latent as usize;
        let overflow = || TokenizerError::LayoutOverflow {
            vocab_size,
            image_codes,
            audio_codes,
            available,
        };
        let media = image_codes.checked_add(audio_codes).ok_or_else(overflow)?;
        if media > available {
            return Err(overflow());
        }
        // Both fit in u32 because their sum is at most vocab_size <= u32::MAX.
        let (image_codes, audio_codes) = (image_codes as u32, audio_codes as u32);
        let latent_start = v - latent;
        let bpe_end = latent_start - image_codes - audio_codes;
        let image_end = bpe_end + image_codes;
        Ok(Self {
            vocab_size: v,
            bpe: MIN_VOCAB_SIZE as u32..bpe_end,
            image: bpe_end..image_end,
            audio: image_end..latent_start,
            latent: latent_start..v,
        })
    }

    fn check_size(vocab_size: usize) -> Result<u32> {
        if vocab_size < MIN_VOCAB_SIZE {
            return Err(TokenizerError::VocabTooSmall {
                vocab_size,
                min: MIN_VOCAB_SIZE,
            });
        }
        u32::try_from(vocab_size).map_err(|_| TokenizerError::VocabTooLarge {
            vocab_size,
            max: u32::MAX as usize,
        })
    }

    /// Total number of token ids (the embedding table's row count).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size as usize
    }

    /// Ids of the special tokens, `0..8`.
    pub fn special_range(&self) -> Range<u32> {
        0..NUM_SPECIAL_TOKENS
    }

    /// Ids of the raw bytes, `8..264`.
    pub fn byte_range(&self) -> Range<u32> {
        BYTE_OFFSET..BYTE_OFFSET + NUM_BYTE_TOKENS
    }

    /// Ids of BPE merges (shared by text and code), starting at 264.
    pub fn bpe_range(&self) -> Range<u32> {
        self.bpe.clone()
    }

    /// Ids of image codebook codes (empty when images are disabled).
    pub fn image_range(&self) -> Range<u32> {
        self.image.clone()
    }

    /// Ids of audio codes (empty when audio is disabled).
    pub fn audio_range(&self) -> Range<u32> {
        self.audio.clone()
    }

    /// Ids of the latent markers `<bot>`, `<eot>`: `V-2..V`, empty when `V < 266`.
    pub fn latent_range(&self) -> Range<u32> {
        self.latent.clone()
    }

    /// The id of latent marker `marker` (`<bot> = V - 2`, `<eot> = V - 1`); `None` when the
    /// vocab is too small to reserve the markers (`V < 266`).
    pub fn latent_id(&self, marker: LatentToken) -> Option<u32> {
        if self.latent.is_empty() {
            return None;
        }
        Some(match marker {
            LatentToken::Bot => self.latent.start,
            LatentToken::Eot => self.latent.start + 1,
        })
    }

    /// The id range of a modality's own codes: BPE for text and code, the media ranges else.
    pub fn modality_range(&self, modality: Modality) -> Range<u32> {
        match modality {
            Modality::Text | Modality::Code => self.bpe_range(),
            Modality::Image => self.image_range(),
            Modality::Audio => self.audio_range(),
        }
    }

    /// Checks that `modality` has at least `needed` ids, with a typed error otherwise.
    pub fn require(&self, modality: Modality, needed: usize) -> Result<()> {
        let available = self.modality_range(modality).len();
        if needed > available {
            return Err(TokenizerError::ModalityUnavailable {
                modality,
                needed,
                available,
                vocab_size: self.vocab_size as usize,
            });
        }
        Ok(())
    }

    /// The token id of byte `b` (`8 + b`).
    pub fn byte_id(&self, b: u8) -> u32 {
        BYTE_OFFSET + u32::from(b)
    }

    /// What `id` means; `position` only feeds the error message of ids >= vocab_size.
    pub fn classify(&self, id: u32, position: usize) -> Result<TokenKind> {
        if let Some(s) = SpecialToken::from_id(id) {
            Ok(TokenKind::Special(s))
        } else if self.byte_range().contains(&id) {
            // In range, so the difference fits a byte.
            Ok(TokenKind::Byte((id - BYTE_OFFSET) as u8))
        } else if self.bpe.contains(&id) {
            Ok(TokenKind::Bpe(id))
        } else if self.image.contains(&id) {
            Ok(TokenKind::ImageCode(id - self.image.start))
        } else if self.audio.contains(&id) {
            Ok(TokenKind::AudioCode(id - self.audio.start))
        } else if self.latent.contains(&id) {
            Ok(TokenKind::Latent(if id == self.latent.start {
                LatentToken::Bot
            } else {
                LatentToken::Eot
            }))
        } else {
            Err(TokenizerError::TokenOutOfVocab {
                id,
                position,
                vocab_size: self.vocab_size,
            })
        }
    }
}
