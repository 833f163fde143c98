//! # ternary-gemm
//!
//! BitNet b1.58 arithmetic for Rust: ternary weights packed at 2 bits and int8 ("A8")
//! activations, with a CPU reference for every operation and CUDA kernels (feature `cuda`)
//! that are checked against it. Formats follow the workspace contract (DESIGN.md section 4).
//!
//! Available now:
//! * [`absmax_quantize_rows`] / [`absmax_quantize_row_ref`]: per-token absmax int8
//!   activation quantization, `s = 127 / max|x|`, `q = clamp(round(x * s), -128, 127)`;
//!   [`dequantize_rows`] is its inverse up to rounding.
//! * `cuda::absmax_quantize_rows_cuda` (feature `cuda`): the same on the GPU, bit-exact.

mod act_quant;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;

pub use act_quant::{
    absmax_quantize_row_ref, absmax_quantize_rows, dequantize_rows, Activation,
    QuantizedActivations, ACT_QUANT_EPS, ACT_QUANT_QMAX,
};
pub use error::TernaryError;

/// Result type of this crate.
pub type Result<T, E = TernaryError> = std::result::Result<T, E>;

/// Compiles and runs the README's examples as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
