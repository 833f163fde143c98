//! Multimodal tokenizer: text, code, images and audio in one id space (DESIGN.md section 5).
//!
//! # Id layout
//!
//! [`VocabLayout`] splits a vocab into disjoint ranges. For the presets' 65536 vocab:
//!
//! | ids             | count | meaning                                                  |
//! |-----------------|-------|----------------------------------------------------------|
//! | `0`             | 1     | `<pad>`                                                  |
//! | `1`             | 1     | `<bos>`                                                  |
//! | `2`             | 1     | `<eos>`                                                  |
//! | `3`             | 1     | `<unk>`                                                  |
//! | `4`             | 1     | `<text>`: a text segment follows                         |
//! | `5`             | 1     | `<code>`: a source-code segment follows                  |
//! | `6`             | 1     | `<image>`: 4 header bytes + patch codes follow           |
//! | `7`             | 1     | `<audio>`: mu-law codes follow                           |
//! | `8..264`        | 256   | raw bytes, byte `b` at `8 + b`                           |
//! | `264..49150`    | 48886 | BPE merges shared by text and code (optional)            |
//! | `49150..57342`  | 8192  | image codebook codes, code `c` at `49150 + c`            |
//! | `57342..65534`  | 8192  | audio codes, mu-law code `c` at `57342 + c` (256 used)   |
//! | `65534`         | 1     | `<bot>`: a latent span (continuous thoughts) follows     |
//! | `65535`         | 1     | `<eot>`: the latent span ends                            |
//!
//! Other sizes ([`VocabLayout::new`]): the last two ids are always `<bot>`, `<eot>` when
//! `vocab_size >= 266` (none below); image and audio get `min(8192, vocab_size / 8)` ids
//! each, or none when that is below 256 (the modality is disabled and asking for it is a
//! typed error); BPE takes the rest. `vocab_size >= 264` always. E.g. 32000 gives BPE
//! `264..23998`, image `23998..27998`, audio `27998..31998`; 1024 gives BPE `264..1022` only.
//! [`VocabLayout::with_media_codes`] sets the media range sizes explicitly. The encoders
//! never emit `<bot>`/`<eot>`; the embedding-prediction paradigm ([`crate::paradigm`])
//! writes them.
//!
//! # Sequences
//!
//! - text: `<text>` then byte ids, or BPE ids with byte fallback ([`bpe`]); exact round trip
//!   for any byte string, UTF-8 or not. Code: the same after `<code>`.
//! - image: `<image>`, patch rows and columns as two big-endian byte tokens each
//!   (`8 + (rows >> 8)`, `8 + (rows & 255)`, same for cols), then `rows * cols` image codes
//!   in raster order ([`image`]).
//! - audio: `<audio>` then one audio code per sample at the codec's sample rate ([`audio`]).
//!
//! `<bos>`/`<eos>` framing and `<pad>` are left to the data pipeline; [`MultimodalTokenizer::decode`]
//! reports them as [`Segment::Special`], and `<bot>`/`<eot>` as [`Segment::Latent`]. Byte or
//! BPE ids without a prefix decode as text.

pub mod audio;
pub mod bpe;
pub mod bytes;
pub mod error;
pub mod image;
mod io;
pub(crate) mod kmeans;
pub mod vocab;

pub use self::audio::{mu_law_decode, mu_law_encode, snr_db, MuLawCodec};
pub use self::bpe::{BpeTrainingConfig, BpeVocab};
pub use self::error::{Result, TokenizerError};
pub use self::image::{psnr, ImageCodebook, KMeansConfig, PatchCodes};
pub use self::vocab::{LatentToken, Modality, SpecialToken, TokenKind, VocabLayout};

use ::image::RgbImage;

/// Number of byte tokens after `<image>` that carry the patch grid (rows, cols as u16 BE).
pub const IMAGE_HEADER_TOKENS: usize = 4;

/// One decoded piece of a token sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    /// `<pad>`, `<bos>`, `<eos>` or `<unk>` (the four non-modality specials).
    Special(SpecialToken),
    /// A latent-span marker `<bot>` or `<eot>` (the continuous thoughts between them have
    /// no token ids).
    Latent(LatentToken),
    /// Bytes of a `<text>` segment (or of prefix-less byte/BPE ids).
    Text(Vec<u8>),
    /// Bytes of a `<code>` segment.
    Code(Vec<u8>),
    /// Pixels of an `<image>` segment, `(cols * p) x (rows * p)`.
    Image(RgbImage),
    /// Samples in [-1, 1] of an `<audio>` segment.
    Audio {
        /// Mono samples.
        samples: Vec<f32>,
        /// Their rate in Hz.
        sample_rate: u32,
    },
}

/// The tokenizer of the Tritter model: bytes always, BPE, images and audio when configured.
///
/// ```
/// use tritter::tokenizer::{MultimodalTokenizer, Segment, VocabLayout};
/// let tok = MultimodalTokenizer::new(VocabLayout::new(65536)?);
/// let ids = tok.encode_text("héllo \u{1F600}")?;
/// assert_eq!(ids[0], 4); // <text>
/// assert_eq!(tok.decode(&ids)?, vec![Segment::Text("héllo \u{1F600}".as_bytes().to_vec())]);
/// # Ok::<(), tritter::tokenizer::TokenizerError>(())
/// ```
#[derive(Debug, Clone)]
pub struct MultimodalTokenizer {
    layout: VocabLayout,
    bpe: Option<BpeVocab>,
    image: Option<ImageCodebook>,
    audio: Option<MuLawCodec>,
}

impl MultimodalTokenizer {
    /// A byte-level tokenizer for `layout`; add BPE, images and audio with the `with_*` methods.
    pub fn new(layout: VocabLayout) -> Self {
        Self {
            layout,
            bpe: None,
            image: None,
            audio: None,
        }
    }

    /// Uses `bpe` for text and code. Errors when it was validated for another BPE range.
    pub fn with_bpe(mut self, bpe: BpeVocab) -> Result<Self> {
        let end = self.layout.bpe_range().end;
        if bpe.bpe_end() != end {
            return Err(TokenizerError::BpeFormat(format!(
                "the BPE vocabulary was validated for a BPE range ending at {} but this layout's ends at {end}",
                bpe.bpe_end()
            )));
        }
        self.bpe = Some(bpe);
        Ok(self)
    }

    /// Uses `codebook` for images. Errors when its codes do not fit the image range.
    pub fn with_image_codebook(mut self, codebook: ImageCodebook) -> Result<Self> {
        self.layout.require(Modality::Image, codebook.num_codes())?;
        self.image = Some(codebook);
        Ok(self)
    }

    /// Uses `codec` for audio. Errors when the audio range has fewer than 256 ids.
    pub fn with_audio(mut self, codec: MuLawCodec) -> Result<Self> {
        self.layout.require(Modality::Audio, audio::MU_LAW_CODES)?;
        self.audio = Some(codec);
        Ok(self)
    }

    /// The id layout.
    pub fn layout(&self) -> &VocabLayout {
        &self.layout
    }

    /// Number of token ids (rows of the embedding table).
    pub fn vocab_size(&self) -> usize {
        self.layout.vocab_size()
    }

    /// The BPE vocabulary, if configured.
    pub fn bpe(&self) -> Option<&BpeVocab> {
        self.bpe.as_ref()
    }

    /// The image codebook, if configured.
    pub fn image_codebook(&self) -> Option<&ImageCodebook> {
        self.image.as_ref()
    }

    /// The audio codec, if configured.
    pub fn audio_codec(&self) -> Option<&MuLawCodec> {
        self.audio.as_ref()
    }

    fn encode_bytes_as(&self, bytes: &[u8], modality: Modality) -> Result<Vec<u32>> {
        match &self.bpe {
            None => Ok(bytes::encode_bytes(bytes, Some(modality))),
            Some(bpe) => {
                let mut ids = Vec::with_capacity(bytes.len() / 3 + 2);
                ids.push(modality.prefix_token().id());
                bpe.encode_into(bytes, &mut ids)?;
                Ok(ids)
            }
        }
    }

    /// `<text>` then the bytes of `text` (BPE ids when configured); any bytes, UTF-8 or not.
    pub fn encode_text(&self, text: impl AsRef<[u8]>) -> Result<Vec<u32>> {
        self.encode_bytes_as(text.as_ref(), Modality::Text)
    }

    /// `<code>` then the bytes of `code` (BPE ids when configured).
    pub fn encode_code(&self, code: impl AsRef<[u8]>) -> Result<Vec<u32>> {
        self.encode_bytes_as(code.as_ref(), Modality::Code)
    }

    fn codebook(&self) -> Result<&ImageCodebook> {
        self.image
            .as_ref()
            .ok_or(TokenizerError::ModalityNotConfigured {
                modality: Modality::Image,
                fix: "call with_image_codebook",
            })
    }

    fn codec(&self) -> Result<&MuLawCodec> {
        self.audio
            .as_ref()
            .ok_or(TokenizerError::ModalityNotConfigured {
                modality: Modality::Audio,
                fix: "call with_audio",
            })
    }

    /// `<image>`, the 4 grid header bytes and `rows * cols` patch codes of `image`, whose
    /// sides must be non-zero multiples of the codebook's patch size.
    pub fn encode_image(&self, image: &RgbImage) -> Result<Vec<u32>> {
        let codes = self.codebook()?.encode(image)?;
        let start = self.layout.image_range().start;
        let mut ids = Vec::with_capacity(1 + IMAGE_HEADER_TOKENS + codes.codes.len());
        ids.push(SpecialToken::Image.id());
        // Grid sides are checked to fit u16 by the codebook.
        for side in [codes.rows as u16, codes.cols as u16] {
            ids.extend(side.to_be_bytes().map(|b| self.layout.byte_id(b)));
        }
        ids.extend(codes.codes.iter().map(|&c| start + c));
        Ok(ids)
    }

    /// Like [`Self::encode_image`] for PNG or JPEG file bytes.
    pub fn encode_image_bytes(&self, bytes: &[u8]) -> Result<Vec<u32>> {
        self.codebook()?;
        self.encode_image(&image::load_image(bytes)?)
    }

    /// `<audio>` then one code per mono sample; samples in [-1, 1] at the codec's rate.
    pub fn encode_audio(&self, samples: &[f32], sample_rate: u32) -> Result<Vec<u32>> {
        let codes = self.codec()?.encode(samples, sample_rate)?;
        let start = self.layout.audio_range().start;
        let mut ids = Vec::with_capacity(1 + codes.len());
        ids.push(SpecialToken::Audio.id());
        ids.extend(codes.iter().map(|&c| start + u32::from(c)));
        Ok(ids)
    }

    /// Like [`Self::encode_audio`] for WAV file bytes (channels mixed down to mono).
    pub fn encode_wav(&self, wav: &[u8]) -> Result<Vec<u32>> {
        let codec = self.codec()?;
        let samples = codec.read_wav(wav)?;
        self.encode_audio(&samples, codec.sample_rate())
    }

    /// Splits `ids` into segments and decodes each (module docs give the grammar).
    /// Errors on ids >= vocab_size, media codes outside their segment, truncated images,
    /// codes beyond the configured codebook, BPE ids without a BPE vocabulary, and media
    /// segments of modalities that are not configured.
    pub fn decode(&self, ids: &[u32]) -> Result<Vec<Segment>> {
        let layout = &self.layout;
        let mut segments = Vec::new();
        let mut pos = 0;
        while pos < ids.len() {
            let kind = layout.classify(ids[pos], pos)?;
            match kind {
                TokenKind::Special(s @ (SpecialToken::Text | SpecialToken::Code)) => {
                    let (bytes, next) = self.decode_text_run(ids, pos + 1)?;
                    segments.push(if s == SpecialToken::Text {
                        Segment::Text(bytes)
                    } else {
                        Segment::Code(bytes)
                    });
                    pos = next;
                }
                TokenKind::Byte(_) | TokenKind::Bpe(_) => {
                    let (bytes, next) = self.decode_text_run(ids, pos)?;
                    segments.push(Segment::Text(bytes));
                    pos = next;
                }
                TokenKind::Special(SpecialToken::Image) => {
                    let (image, next) = self.decode_image(ids, pos)?;
                    segments.push(Segment::Image(image));
                    pos = next;
                }
                TokenKind::Special(SpecialToken::Audio) => {
                    let codec = self.codec()?;
                    let mut samples = Vec::new();
                    pos += 1;
                    while pos < ids.len() {
                        let TokenKind::AudioCode(code) = layout.classify(ids[pos], pos)? else {
                            break;
                        };
                        let code =
                            u8::try_from(code).map_err(|_| TokenizerError::CodeOutOfCodebook {
                                modality: Modality::Audio,
                                code,
                                id: ids[pos],
                                codebook_size: audio::MU_LAW_CODES,
                            })?;
                        samples.push(mu_law_decode(code));
                        pos += 1;
                    }
                    segments.push(Segment::Audio {
                        samples,
                        sample_rate: codec.sample_rate(),
                    });
                }
                TokenKind::Special(s) => {
                    segments.push(Segment::Special(s));
                    pos += 1;
                }
                TokenKind::Latent(m) => {
                    segments.push(Segment::Latent(m));
                    pos += 1;
                }
                TokenKind::ImageCode(_) | TokenKind::AudioCode(_) => {
                    return Err(TokenizerError::UnexpectedToken {
                        id: ids[pos],
                        kind: kind.to_string(),
                        position: pos,
                        expected: "media codes only inside an <image> or <audio> segment",
                    });
                }
            }
        }
        Ok(segments)
    }

    /// Bytes of the byte/BPE ids from `start` to the first other id; returns the end index.
    fn decode_text_run(&self, ids: &[u32], start: usize) -> Result<(Vec<u8>, usize)> {
        let mut bytes = Vec::new();
        let mut pos = start;
        while pos < ids.len() {
            match self.layout.classify(ids[pos], pos)? {
                TokenKind::Byte(b) => bytes.push(b),
                TokenKind::Bpe(id) => {
                    let range = self.layout.bpe_range();
                    let unknown = |reason| TokenizerError::UnknownBpeId {
                        id,
                        start: range.start,
                        end: range.end,
                        reason,
                    };
                    let bpe = self
                        .bpe
                        .as_ref()
                        .ok_or_else(|| unknown("no BPE vocabulary is configured (with_bpe)"))?;
                    let piece = bpe
                        .piece(id)
                        .ok_or_else(|| unknown("the BPE vocabulary does not define it"))?;
                    bytes.extend_from_slice(piece);
                }
                _ => break,
            }
            pos += 1;
        }
        Ok((bytes, pos))
    }

    /// Decodes the image whose `<image>` token is at `start`; returns the end index.
    fn decode_image(&self, ids: &[u32], start: usize) -> Result<(RgbImage, usize)> {
        let codebook = self.codebook()?;
        let header_end = start + 1 + IMAGE_HEADER_TOKENS;
        if ids.len() < header_end {
            return Err(TokenizerError::TruncatedImage {
                position: start,
                expected: IMAGE_HEADER_TOKENS,
                actual: ids.len() - start - 1,
            });
        }
        let mut header = [0u8; IMAGE_HEADER_TOKENS];
        for (i, h) in header.iter_mut().enumerate() {
            let pos = start + 1 + i;
            match self.layout.classify(ids[pos], pos)? {
                TokenKind::Byte(b) => *h = b,
                kind => {
                    return Err(TokenizerError::UnexpectedToken {
                        id: ids[pos],
                        kind: kind.to_string(),
                        position: pos,
                        expected:
                            "4 byte tokens (patch rows, cols as big-endian u16) after <image>",
                    })
                }
            }
        }
        let rows = u32::from(u16::from_be_bytes([header[0], header[1]]));
        let cols = u32::from(u16::from_be_bytes([header[2], header[3]]));
        let n = rows as usize * cols as usize;
        let end = header_end + n;
        if ids.len() < end {
            return Err(TokenizerError::TruncatedImage {
                position: start,
                expected: n,
                actual: ids.len() - header_end,
            });
        }
        let mut codes = Vec::with_capacity(n);
        for (pos, &id) in ids.iter().enumerate().take(end).skip(header_end) {
            match self.layout.classify(id, pos)? {
                TokenKind::ImageCode(c) if (c as usize) < codebook.num_codes() => codes.push(c),
                TokenKind::ImageCode(code) => {
                    return Err(TokenizerError::CodeOutOfCodebook {
                        modality: Modality::Image,
                        code,
                        id,
                        codebook_size: codebook.num_codes(),
                    })
                }
                kind => {
                    return Err(TokenizerError::UnexpectedToken {
                        id,
                        kind: kind.to_string(),
                        position: pos,
                        expected: "an image code (the header announces more patches)",
                    })
                }
            }
        }
        let image = codebook.decode(&PatchCodes { rows, cols, codes })?;
        Ok((image, end))
    }
}
