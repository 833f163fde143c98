//! # ternary-gemm
//!
//! BitNet b1.58 arithmetic for Rust: ternary weights packed at 2 bits and int8 ("A8")
//! activations, with a CPU reference for every operation and CUDA kernels (feature `cuda`)
//! that are checked against it. Formats follow the workspace contract (DESIGN.md section 4).
//!
//! Available now:
//! * [`TernaryMatrix`] in the canonical 2-bit layout, [`absmean_quantize`], pack/unpack,
//!   safetensors I/O ([`save_ternary_safetensors`]);
//! * [`absmax_quantize_rows`]: per-token absmax int8 activation quantization,
//!   `s = 127 / max|x|`, `q = clamp(round(x * s), -128, 127)`;
//! * products `y = x · (Wq γ)ᵀ`: references ([`ternary_matmul_a8_ref`],
//!   [`ternary_matmul_f32_ref`]) and the AVX2/rayon CPU kernel ([`ternary_matmul_a8`]);
//!   the STE backward [`ternary_matmul_t`]; the squared-ReLU GLU [`TernaryMlp`];
//! * feature `cuda`: `cuda::ternary_matmul_a8_cuda` (mma.sync W2A8 GEMV, M <= 32 per
//!   launch) and GPU activation quantization, bit-exact with the CPU references;
//! * feature `candle`: `candle_ops::{TernaryLinear, TernaryMlpOp}` custom ops.

mod act_quant;
#[cfg(feature = "candle-cuda")]
mod candle_cuda;
#[cfg(feature = "candle")]
pub mod candle_ops;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod element;
mod error;
mod gemm_ref;
mod io;
mod mlp;
mod ternary;
mod tiles;

pub use act_quant::{
    absmax_quantize_row_ref, absmax_quantize_rows, dequantize_rows, gemv_code_position,
    gemv_order_codes, gemv_padded_cols, QuantizedActivations, ACT_QUANT_EPS, ACT_QUANT_QMAX,
    GEMV_K_BLOCK,
};
pub use cpu::{ternary_matmul_a8, ternary_matmul_a8_acc, ternary_matmul_t, CpuKernel};
pub use element::Element;
pub use error::TernaryError;
pub use gemm_ref::{
    a8_epilogue, ternary_matmul_a8_acc_ref, ternary_matmul_a8_ref, ternary_matmul_f32_ref,
    ternary_matmul_t_ref,
};
pub use io::{
    load_ternary_safetensors, save_ternary_safetensors, ternary_from_safetensors,
    ternary_to_safetensors, TERNARY_FORMAT_TAG,
};
pub use mlp::TernaryMlp;
pub use ternary::{
    absmean_quantize, pack_ternary_rows, unpack_ternary_rows, words_per_row, ScaleGranularity,
    TernaryMatrix, TernaryScales, ABSMEAN_EPS, CODES_PER_WORD, ZERO_CODE, ZERO_WORD,
};
pub use tiles::{
    repack_tiles, tiled_len, tiled_word_index, unrepack_tiles, TILE_BLOCK_WORDS, TILE_ROWS,
    TILE_ROW_WORDS,
};

/// Result type of this crate.
pub type Result<T, E = TernaryError> = std::result::Result<T, E>;

/// Compiles and runs the README's examples as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
