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
    /// A CUDA runtime error (driver, module load, launch).
    #[error(transparent)]
    Cuda(#[from] tritter_kernels_cuda::KernelError),
}
