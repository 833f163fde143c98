//! The crate's error type (DESIGN.md section 6): every message names the actual and the
//! expected value, and every check runs before any kernel launch.

/// Errors of `flash-attn-sm120`.
#[derive(Debug, thiserror::Error)]
pub enum AttnError {
    /// A tensor's length or shape does not match the problem description.
    #[error("{what} has {actual} elements but expected {expected} ({detail})")]
    Shape {
        /// Which argument.
        what: &'static str,
        /// Its length.
        actual: usize,
        /// The length the shapes imply.
        expected: usize,
        /// The shape the expectation comes from, e.g. `(total_q=12, Hq=4, D=64)`.
        detail: String,
    },
    /// Head counts or head dim are not supported.
    #[error("{0}")]
    Heads(String),
    /// `cu_seqlens`, prefix lengths, document ids or positions are malformed.
    #[error("{0}")]
    Layout(String),
    /// The mask description is inconsistent (window 0, sinks without window, prefix lengths
    /// with another mode, ...).
    #[error("{0}")]
    Mask(String),
    /// A numeric setting is out of range (QK-Norm eps, RoPE theta).
    #[error("{what} is {actual} but expected {expected}")]
    Param {
        /// Which setting.
        what: &'static str,
        /// Its value.
        actual: f32,
        /// The accepted range.
        expected: &'static str,
    },
    /// A tensor's element type is not one the path takes (e.g. f32 on the CUDA kernels).
    #[error("{what} has dtype {actual} but expected {expected} ({detail})")]
    Dtype {
        /// Which argument.
        what: &'static str,
        /// Its dtype, e.g. `F32`.
        actual: String,
        /// The dtypes the path takes, e.g. `bf16 or f16`.
        expected: &'static str,
        /// Which path refused it and what to do instead.
        detail: &'static str,
    },
    /// A non-finite value at the API boundary (never passed on silently).
    #[error("{what} holds a non-finite value at index {index} ({value})")]
    NonFinite {
        /// Which argument.
        what: &'static str,
        /// First offending index.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// A CUDA driver, module or launch failure.
    #[error(transparent)]
    Kernel(#[from] tritter_kernels_cuda::KernelError),
}

/// `Result` with [`AttnError`].
pub type Result<T, E = AttnError> = std::result::Result<T, E>;
