//! The crate's error type (DESIGN.md section 6): every message states the actual value, the
//! expected one and, where obvious, the fix.

use std::path::PathBuf;

/// Result type of this crate.
pub type Result<T, E = TritterError> = std::result::Result<T, E>;

/// Everything that can go wrong in `tritter`: bad configs, bad model input, bad checkpoints,
/// and errors of the libraries underneath (candle, ternary-gemm, safetensors, I/O).
///
/// Bad user input always comes back as one of these, never as a panic.
#[derive(Debug, thiserror::Error)]
pub enum TritterError {
    /// A config field breaks a rule; `expected` says what would be valid.
    #[error("invalid config: {field} is {actual} but {expected}")]
    InvalidConfig {
        /// The offending field (or relation, e.g. `hidden_size % num_heads`).
        field: &'static str,
        /// Its value.
        actual: String,
        /// The rule, phrased as the fix.
        expected: String,
    },

    /// `TritterConfig::preset` got a name it does not know.
    #[error("unknown preset {name:?}; expected one of {expected}")]
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The known names, comma separated.
        expected: &'static str,
    },

    /// A token id does not index the embedding table.
    #[error("token id {id} (batch {batch}, position {position}) >= vocab_size {vocab_size}")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Sequence index in the batch.
        batch: usize,
        /// Position in the sequence.
        position: usize,
        /// The config's vocabulary size.
        vocab_size: usize,
    },

    /// A sequence is longer than the model's position range.
    #[error("sequence length {len} > max_position_embeddings {max}; split the input or raise max_position_embeddings")]
    SequenceTooLong {
        /// Tokens in the sequence.
        len: usize,
        /// The config's maximum.
        max: usize,
    },

    /// A position id is outside `0..max_position_embeddings`.
    #[error(
        "position id {position} (batch {batch}, index {index}) >= max_position_embeddings {max}"
    )]
    PositionOutOfRange {
        /// The position id.
        position: u32,
        /// Sequence index in the batch.
        batch: usize,
        /// Index along the sequence.
        index: usize,
        /// The config's maximum.
        max: usize,
    },

    /// A tensor has the wrong shape.
    #[error("{what} has shape {actual:?} but expected {expected}")]
    ShapeMismatch {
        /// Which tensor.
        what: String,
        /// Its dims.
        actual: Vec<usize>,
        /// The expected dims, in words where they depend on the input.
        expected: String,
    },

    /// A tensor has the wrong dtype.
    #[error("{what} has dtype {actual:?} but expected {expected}")]
    DTypeMismatch {
        /// Which tensor.
        what: String,
        /// Its dtype.
        actual: candle_core::DType,
        /// The accepted dtypes.
        expected: String,
    },

    /// A floating-point input holds NaN or infinity.
    #[error(
        "{what} has the non-finite value {value} at flat index {index}; expected finite values"
    )]
    NonFinite {
        /// Which tensor.
        what: String,
        /// Row-major index of the first offending element.
        index: usize,
        /// The value, as text (NaN, inf or -inf).
        value: String,
    },

    /// A latent slot of `forward_latent` (or a latent sequence) is misplaced: at position 0,
    /// not preceded by `<bot>` or another slot, or a latent-mask value other than 0/1.
    #[error("invalid latent span at batch {batch}, position {position}: {detail}")]
    InvalidLatentSpan {
        /// Sequence index in the batch.
        batch: usize,
        /// Position of the offending slot.
        position: usize,
        /// What was found and what was expected.
        detail: String,
    },

    /// A `MaskSpec` does not fit the batch it is applied to.
    #[error("invalid mask: {0}")]
    InvalidMask(String),

    /// A checkpoint does not match what it is loaded into, or is internally inconsistent.
    #[error("checkpoint {path}: {detail}")]
    CheckpointMismatch {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What differs (actual and expected).
        detail: String,
    },

    /// A checkpoint's bytes are damaged (bad header, checksum, truncated data).
    #[error("checkpoint {path} is corrupt: {detail}")]
    CorruptCheckpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },

    /// A file could not be read or written.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },

    /// `config.json` could not be parsed or written.
    #[error("config JSON {path}: {source}")]
    ConfigJson {
        /// The file (empty when parsing a string).
        path: PathBuf,
        /// The serde error.
        source: serde_json::Error,
    },

    /// An error from candle (tensor ops, autograd).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An error from the ternary kernels.
    #[error(transparent)]
    Ternary(#[from] ternary_gemm::TernaryError),

    /// An error of the paged KV cache (pool exhausted, a value outside the f16 range).
    #[error(transparent)]
    KvCache(#[from] kv_int4::KvError),

    /// An error of the multimodal tokenizer.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),

    /// A data path is missing, unreadable or of an unsupported kind.
    #[error("data {path}: {detail}")]
    Data {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong and what was expected.
        detail: String,
    },

    /// A JSONL line is not valid JSON or lacks the text field (with `--malformed fail`).
    #[error("{path}:{line}: {detail}; fix the line or skip malformed lines (--malformed skip)")]
    MalformedRecord {
        /// The file.
        path: PathBuf,
        /// 1-based line (JSONL) or row (parquet) number.
        line: usize,
        /// What was found and what was expected.
        detail: String,
    },

    /// A dataset produced no usable tokens (or too few for one training sequence).
    #[error("empty dataset {what}: {detail}")]
    EmptyDataset {
        /// Which data (a path, "built-in corpus", "validation split").
        what: String,
        /// What was found and what is needed.
        detail: String,
    },

    /// A training option is out of range.
    #[error("invalid training option: {field} is {actual} but {expected}")]
    InvalidTrainOption {
        /// The option (CLI flag name).
        field: &'static str,
        /// Its value.
        actual: String,
        /// The rule, phrased as the fix.
        expected: String,
    },

    /// The requested device cannot run this step (yet).
    #[error("device {device} is not available: {detail}")]
    DeviceUnavailable {
        /// The device asked for.
        device: String,
        /// Why, and what to use instead.
        detail: String,
    },

    /// Training diverged (a loss or gradient norm is not finite).
    #[error("training diverged at step {step}: {what} is {value}; lower --lr or raise --warmup")]
    Diverged {
        /// The optimizer step.
        step: u64,
        /// Which quantity.
        what: &'static str,
        /// Its value.
        value: f64,
    },

    /// GPU training diverged: the step's gradients hold NaN/Inf. The update was skipped on the
    /// device (the parameters are the last finite ones) and no checkpoint was written.
    #[error(
        "training diverged at step {step}: the gradient of {tensor} is the first non-finite \
         tensor (it holds {value}); the parameters keep the last finite update and the last \
         checkpoint is untouched; lower --lr or raise --warmup"
    )]
    NonFiniteGradient {
        /// The optimizer step.
        step: u64,
        /// The first parameter (in layout order) whose gradient is not finite.
        tensor: String,
        /// Its first non-finite value (NaN, inf or -inf).
        value: String,
    },

    /// Data-parallel training failed across processes: a bad rendezvous environment, a rank
    /// that never arrived, died or timed out, ranks with different configs, or an NCCL error.
    /// `rank` is the process that reports it.
    #[error("data-parallel training, rank {rank}: {detail}")]
    Distributed {
        /// The reporting rank (0 before the rank is known).
        rank: usize,
        /// What happened, with the actual and expected values and the fix.
        detail: String,
    },

    /// An argument of a call is out of range (a `k`, a cluster count, a threshold, a task
    /// difficulty); `expected` says what would be valid.
    #[error("invalid argument: {what} is {actual} but {expected}")]
    InvalidArgument {
        /// The argument (or relation between arguments).
        what: &'static str,
        /// Its value.
        actual: String,
        /// The rule, phrased as the fix.
        expected: String,
    },

    /// A key of a Hugging Face `config.json` is missing, has the wrong type, or describes
    /// something the engine does not run (another `model_type`, RoPE scaling, biases, ...).
    #[error("Hugging Face config {path}: {key} is {actual} but expected {expected}")]
    HfConfig {
        /// The `config.json` (or `generation_config.json`, index) read.
        path: PathBuf,
        /// The key, dotted for nested ones (`quantization_config.quantization_mode`).
        key: String,
        /// Its value as found (`missing` when absent).
        actual: String,
        /// What would be accepted, phrased as the fix.
        expected: String,
    },

    /// A tensor of a Hugging Face checkpoint cannot be imported: missing, not part of the
    /// model, of an unsupported dtype or the wrong shape, or holding NaN/Inf.
    #[error("Hugging Face weights {path}: tensor {tensor}: {problem}: found {actual}, expected {expected}")]
    HfTensor {
        /// The safetensors file (or, for a missing tensor, the checkpoint directory).
        path: PathBuf,
        /// The tensor's name in the checkpoint (`model.layers.0.self_attn.q_proj.weight`).
        tensor: String,
        /// What is wrong.
        problem: crate::engine::hf::HfTensorProblem,
        /// What was found.
        actual: String,
        /// What the config implies.
        expected: String,
    },

    /// An error of the CUDA runtime layer (driver, module loading, a launch).
    #[error(transparent)]
    Kernel(#[from] tritter_kernels_cuda::KernelError),

    /// An error from the attention kernels (shapes, masks, launches).
    #[error(transparent)]
    Attention(#[from] flash_attn_sm120::AttnError),

    /// A cuBLAS call failed (the GPU engine's LM head).
    #[error("cuBLAS error while {context}: {detail}")]
    Cublas {
        /// What was being done.
        context: String,
        /// cuBLAS's status.
        detail: String,
    },
}

impl TritterError {
    /// An `InvalidConfig` error with formatted actual/expected values.
    pub(crate) fn config(
        field: &'static str,
        actual: impl ToString,
        expected: impl ToString,
    ) -> Self {
        TritterError::InvalidConfig {
            field,
            actual: actual.to_string(),
            expected: expected.to_string(),
        }
    }

    /// An `InvalidTrainOption` error with formatted actual/expected values.
    pub(crate) fn option(
        field: &'static str,
        actual: impl ToString,
        expected: impl ToString,
    ) -> Self {
        TritterError::InvalidTrainOption {
            field,
            actual: actual.to_string(),
            expected: expected.to_string(),
        }
    }

    /// An `InvalidArgument` error with formatted actual/expected values.
    pub(crate) fn argument(
        what: &'static str,
        actual: impl ToString,
        expected: impl ToString,
    ) -> Self {
        TritterError::InvalidArgument {
            what,
            actual: actual.to_string(),
            expected: expected.to_string(),
        }
    }

    /// A `Data` error for `path`.
    pub(crate) fn data(path: impl Into<PathBuf>, detail: impl ToString) -> Self {
        TritterError::Data {
            path: path.into(),
            detail: detail.to_string(),
        }
    }

    /// An `Io` error for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TritterError::Io {
            path: path.into(),
            source,
        }
    }
}
