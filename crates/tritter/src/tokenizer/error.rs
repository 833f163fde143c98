//! The error type of the tokenizer: one variant per way an input can be wrong, each message
//! naming the actual value, the expected one and, where obvious, the fix (DESIGN.md section 6).

use std::path::PathBuf;

use super::vocab::Modality;

/// Every failure of the multimodal tokenizer. Bad user input (ids outside the vocab, images
/// of the wrong size or format, corrupt WAV or codebook files) always lands here, never in a
/// panic. The crate's main error type wraps it with `#[from]`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// The vocab cannot hold the 8 special tokens and the 256 byte tokens.
    #[error("vocab_size {vocab_size} is below the minimum {min} (8 special tokens + 256 bytes)")]
    VocabTooSmall {
        /// Requested vocab size.
        vocab_size: usize,
        /// Smallest vocab size the layout accepts.
        min: usize,
    },
    /// Token ids are `u32`; a larger vocab cannot be addressed.
    #[error("vocab_size {vocab_size} exceeds the largest u32-addressable vocab {max}")]
    VocabTooLarge {
        /// Requested vocab size.
        vocab_size: usize,
        /// Largest vocab size the layout accepts.
        max: usize,
    },
    /// Explicit media range sizes that do not fit after the specials and bytes.
    #[error(
        "vocab_size {vocab_size} cannot hold {image_codes} image codes + {audio_codes} audio codes \
         after the 264 special and byte ids: at most {available} ids are left"
    )]
    LayoutOverflow {
        /// Requested vocab size.
        vocab_size: usize,
        /// Requested image range length.
        image_codes: usize,
        /// Requested audio range length.
        audio_codes: usize,
        /// Ids left after specials and bytes.
        available: usize,
    },
    /// A modality needs more ids than the layout reserves for it.
    #[error(
        "{modality} needs {needed} ids but the layout for vocab_size {vocab_size} reserves {available}; \
         use a larger vocab or a smaller {modality} vocabulary"
    )]
    ModalityUnavailable {
        /// The modality that does not fit.
        modality: Modality,
        /// Ids the modality needs.
        needed: usize,
        /// Ids the layout reserves for it.
        available: usize,
        /// Vocab size of the layout.
        vocab_size: usize,
    },
    /// The facade was asked to encode a modality it was not given a model for.
    #[error("no {modality} model is configured: {fix}")]
    ModalityNotConfigured {
        /// The modality asked for.
        modality: Modality,
        /// What to call to configure it.
        fix: &'static str,
    },
    /// A token id at or beyond the vocab size.
    #[error("token id {id} at position {position} >= vocab_size {vocab_size}")]
    TokenOutOfVocab {
        /// The offending id.
        id: u32,
        /// Its position in the id sequence.
        position: usize,
        /// Vocab size of the layout.
        vocab_size: u32,
    },
    /// A valid id in a place where the grammar of the sequence does not allow it.
    #[error("token id {id} ({kind}) at position {position} is not allowed here: {expected}")]
    UnexpectedToken {
        /// The offending id.
        id: u32,
        /// What the id is in the layout (e.g. "image code 5").
        kind: String,
        /// Its position in the id sequence.
        position: usize,
        /// What the decoder expected at that position.
        expected: &'static str,
    },
    /// A sequence ended inside an image (header or patch codes).
    #[error(
        "image at position {position} is truncated: expected {expected} more ids, got {actual}"
    )]
    TruncatedImage {
        /// Position of the `<image>` token.
        position: usize,
        /// Ids the header announces.
        expected: usize,
        /// Ids present.
        actual: usize,
    },
    /// A BPE id that the loaded BPE vocabulary does not define (or none is loaded).
    #[error("token id {id} is in the BPE range {start}..{end} but {reason}")]
    UnknownBpeId {
        /// The offending id.
        id: u32,
        /// Start of the BPE range.
        start: u32,
        /// End of the BPE range.
        end: u32,
        /// Why it cannot be decoded.
        reason: &'static str,
    },
    /// An image or audio code beyond the codebook in use.
    #[error("{modality} code {code} (token id {id}) >= codebook size {codebook_size}")]
    CodeOutOfCodebook {
        /// Modality of the code.
        modality: Modality,
        /// Offending code (id minus range start).
        code: u32,
        /// Offending token id.
        id: u32,
        /// Codes the codebook has.
        codebook_size: usize,
    },
    /// Error raised by the HF `tokenizers` crate (training, encoding, JSON parsing).
    #[error("BPE tokenizer error: {0}")]
    Bpe(#[source] tokenizers::Error),
    /// A tokenizer.json that does not follow the layout (see the `bpe` module docs).
    #[error("tokenizer.json does not fit the Tritter layout: {0}")]
    BpeFormat(String),
    /// Image dimensions that are not multiples of the patch size, or zero.
    #[error(
        "image is {width}x{height} but the patch size {patch} needs non-zero multiples of {patch}"
    )]
    ImageSize {
        /// Image width in pixels.
        width: u32,
        /// Image height in pixels.
        height: u32,
        /// Patch side in pixels.
        patch: u32,
    },
    /// An image whose patch grid cannot be written in the 16-bit header.
    #[error("image is {width}x{height}: its {cols}x{rows} patch grid exceeds the header limit of {max} patches per side")]
    ImageTooLarge {
        /// Image width in pixels.
        width: u32,
        /// Image height in pixels.
        height: u32,
        /// Patch columns.
        cols: u32,
        /// Patch rows.
        rows: u32,
        /// Largest grid side.
        max: u32,
    },
    /// Undecodable or unsupported image bytes (only PNG and JPEG are built in).
    #[error("could not decode the image (PNG and JPEG are supported): {0}")]
    ImageDecode(#[source] image::ImageError),
    /// Patch size that cannot form patches.
    #[error("patch size {patch} is invalid: expected 1..={max}")]
    InvalidPatchSize {
        /// Requested patch side.
        patch: u32,
        /// Largest supported patch side.
        max: u32,
    },
    /// A k-means configuration that cannot be trained.
    #[error("k-means cannot run: {0}")]
    KMeans(String),
    /// A codebook file or centroid table that is malformed.
    #[error("invalid image codebook: {0}")]
    Codebook(String),
    /// safetensors (de)serialization failure of a codebook.
    #[error("codebook safetensors error: {0}")]
    Safetensors(#[source] safetensors::SafeTensorError),
    /// Reading or writing a file.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted ("read", "write", "rename").
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Undecodable WAV bytes or a WAV encoding failure.
    #[error("WAV error: {0}")]
    Wav(#[source] hound::Error),
    /// A WAV file or sample slice at a rate other than the tokenizer's.
    #[error("audio is sampled at {actual} Hz but the audio tokenizer expects {expected} Hz; resample it first (e.g. `sox in.wav -r {expected} out.wav`)")]
    SampleRate {
        /// Rate of the input.
        actual: u32,
        /// Rate of the tokenizer.
        expected: u32,
    },
    /// A sample rate of zero.
    #[error("sample rate must be positive, got {0} Hz")]
    InvalidSampleRate(u32),
    /// A sample outside [-1, 1] or not finite.
    #[error("audio sample {value} at index {index} is outside [-1, 1] (or not finite)")]
    SampleOutOfRange {
        /// Index of the sample.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// Two signals compared by a metric (PSNR, SNR) have different shapes.
    #[error("cannot compare signals: {0}")]
    MetricShape(String),
}

/// Result alias of the tokenizer module.
pub type Result<T> = std::result::Result<T, TokenizerError>;
