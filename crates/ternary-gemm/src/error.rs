use thiserror::Error;

/// Errors of `ternary-gemm`. Every message names the actual and the expected value.
#[derive(Debug, Error)]
pub enum TernaryError {
    /// A buffer's length does not match the shape it was given with.
    #[error("{what} has {actual} elements but the shape ({rows} x {cols}) needs {expected}")]
    LengthMismatch {
        /// Which buffer, e.g. "x" or "codes".
        what: &'static str,
        /// Rows of the stated shape.
        rows: usize,
        /// Columns of the stated shape.
        cols: usize,
        /// Elements present.
        actual: usize,
        /// Elements the shape needs.
        expected: usize,
    },
    /// A dimension is zero or too large for the kernels' 32-bit indexing.
    #[error("{what} = {actual} is out of range; expected {expected}")]
    BadDimension {
        /// Which dimension.
        what: &'static str,
        /// Value given.
        actual: usize,
        /// Allowed range, in words.
        expected: &'static str,
    },
    /// An input holds NaN or an infinity where a finite value is required.
    #[error("{what} holds a non-finite value ({value}) at row {row}, column {col}; inputs must be finite")]
    NonFinite {
        /// Which input.
        what: &'static str,
        /// Row of the first offending value.
        row: usize,
        /// Column of the first offending value.
        col: usize,
        /// The value, as text.
        value: String,
    },
    /// The GPU found non-finite input rows (their scales were poisoned with NaN).
    #[error(
        "{what}: {rows} of {total} rows hold NaN or Inf; their scales are NaN and must not be used"
    )]
    NonFiniteRows {
        /// Which input.
        what: &'static str,
        /// Rows with non-finite values.
        rows: u32,
        /// Rows in the batch.
        total: usize,
    },
    /// A packed word holds code 3, which is not a ternary value.
    #[error("packed code 3 (invalid) at row {row}, column {col}; codes must be 0, 1 or 2 (w + 1)")]
    InvalidCode {
        /// Output row.
        row: usize,
        /// Input column.
        col: usize,
    },
    /// The padding codes after `k_in` in a row's last word are not code 1 (zero weight).
    #[error("row {row} padding codes are {actual:#x} but must be zero-weight codes {expected:#x}")]
    BadPadding {
        /// Output row.
        row: usize,
        /// Padding bits found (shifted down).
        actual: u32,
        /// Padding bits required.
        expected: u32,
    },
    /// A value to pack is not in {-1, 0, 1}.
    #[error("value {value} at row {row}, column {col} is not ternary; expected -1, 0 or 1")]
    NotTernary {
        /// Output row.
        row: usize,
        /// Input column.
        col: usize,
        /// The value.
        value: i8,
    },
    /// Two operands disagree on a shared dimension.
    #[error("{what}: {actual} but the weight expects {expected}")]
    ShapeMismatch {
        /// What disagrees, e.g. "x columns (k_in)".
        what: &'static str,
        /// Value given.
        actual: usize,
        /// Value required.
        expected: usize,
    },
    /// A safetensors file could not be read or written, or lacks what a ternary matrix needs.
    #[error("safetensors: {0}")]
    Format(String),
    /// An I/O error while saving or loading.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// File involved.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The device lacks a resource a kernel needs (e.g. opt-in shared memory per block).
    #[error("{what} needs {needed} but the device offers {available}; sm_90 and sm_120 suffice")]
    DeviceLimit {
        /// The resource, e.g. "gemm_w2a8 shared memory per block (bytes)".
        what: &'static str,
        /// What the kernel needs.
        needed: usize,
        /// What the device offers.
        available: usize,
    },
    /// The requested kernel or feature is not available here.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// A CUDA runtime error (driver, module load, launch).
    #[error(transparent)]
    Cuda(#[from] tritter_kernels_cuda::KernelError),
}
