//! CUDA paths (feature `cuda`): the same operations as the CPU side, on cudarc buffers,
//! launched on [`Gpu::stream`](tritter_kernels_cuda::Gpu::stream). Every kernel here is
//! checked bit-exact (integer results) against the CPU reference by the crate's GPU tests.

mod act_quant;
mod gemm_t;
mod gemv;
mod mlp;
mod quant;

pub use act_quant::{
    absmax_quantize_rows_cuda, absmax_quantize_rows_into, DeviceActivation, GemvActivations,
    QuantizedActivationsGpu,
};
pub use gemm_t::ternary_matmul_t_cuda;
pub use gemv::{ternary_matmul_a8_cuda, GemvWorkspace, TernaryMatrixGpu, GEMM_MIN_M, GEMV_MAX_M};
pub use mlp::{ternary_mlp_a8_cuda, ternary_mlp_cuda, MlpWorkspace, TernaryMlpGpu, MLP_GEMM_ROWS};
pub use quant::{
    absmean_dequant_cuda, absmean_quantize_cuda, absmean_quantize_dequant_cuda, AbsmeanWorkspace,
};
