//! GPU transposed product for the straight-through-estimator backward pass:
//! `dx = dy · (Wq * gamma)`; kernel `kernels-cuda/kernels/ternary_gemm_t.cu` (bf16
//! mma.sync m16n8k16 with the 2-bit weights decoded once per CTA into shared memory).

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;
use tritter_kernels_cuda::{images, Gpu, KernelError};

use super::TernaryMatrixGpu;
use crate::{Result, TernaryError};

/// Tokens x output columns per CTA of `gemm_t_bf16`.
const TILE: (usize, usize) = (128, 128);
/// Threads per CTA (4 warps).
const THREADS: u32 = 128;
/// Dynamic shared memory: 3 stages of dY (128 x 144 B) and packed W (64 x 8 words), the
/// two decoded bf16 tiles (64 x 272 B) and the 16-entry decode table (`kSmemBytes`).
const SMEM: usize = 3 * (128 * 144 + 4 * 64 * 8) + 2 * 64 * 272 + 16 * 8;

/// `dx = dy · (Wq * gamma)`: `dy` `(m, n_out)` bf16, `dx` `(m, k_in)` f32, on
/// [`Gpu::stream`].
///
/// The input gradient of a BitLinear layer under the straight-through estimator (the
/// forward used `Wq * gamma`), read from 2-bit weights, so the backward pass streams 8x
/// fewer weight bytes than a bf16 copy of W would. Accumulation is f32 on bf16 tensor
/// cores. Per-tensor gamma is applied exactly to the f32 result; per-row gamma is folded
/// into the decoded weights as `bf16(gamma_n)`, a relative rounding of at most 2^-9 per row
/// (compare with [`ternary_matmul_t_ref`](crate::ternary_matmul_t_ref) on bf16-rounded
/// scales for a tight check). Any shape; `n_out % 8 == 0` with a 16-byte aligned `dy` takes
/// the cp.async path. Non-finite values in `dy` propagate to `dx` (they are not checked here:
/// the caller's loss and gradient-norm checks see them).
pub fn ternary_matmul_t_cuda(
    gpu: &Gpu,
    w: &TernaryMatrixGpu,
    dy: &CudaView<'_, bf16>,
    m: usize,
    dx: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (n_out, k) = (w.n_out(), w.k_in());
    if m > i32::MAX as usize || m.div_ceil(TILE.0) > 65535 {
        return Err(TernaryError::BadDimension {
            what: "M (gradient rows)",
            actual: m,
            expected: "0 ..= 65535 * 128",
        });
    }
    crate::act_quant::check_shape("dy", dy.len(), m, n_out)?;
    crate::act_quant::check_shape("dx", dx.len(), m, k)?;
    if m == 0 || k == 0 {
        return Ok(());
    }
    let optin = gpu.info().max_shared_per_block_optin as usize;
    if optin < SMEM {
        return Err(TernaryError::DeviceLimit {
            what: "gemm_t_bf16 shared memory per block (bytes)",
            needed: SMEM,
            available: optin,
        });
    }
    let stream = gpu.stream();
    let aligned = {
        let (ptr, _sync) = dy.device_ptr(stream);
        n_out % 8 == 0 && ptr % 16 == 0
    };
    let name = if aligned {
        "gemm_t_bf16"
    } else {
        "gemm_t_bf16_unaligned"
    };
    let func = gpu.function(&images::TERNARY_GEMM_T, name)?;
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        SMEM as i32,
    )
    .map_err(|e| KernelError::driver(format!("raising {name}'s shared memory limit"))(e))?;
    let cfg = LaunchConfig {
        grid_dim: (k.div_ceil(TILE.1) as u32, m.div_ceil(TILE.0) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: SMEM as u32,
    };
    let per_row = i32::from(w.per_row());
    let (m_i, n_i, k_i) = (m as i32, n_out as i32, k as i32);
    // Paired float2 stores need 8-byte aligned dx rows: even K and an 8-byte aligned start.
    let dx_vec = {
        let (ptr, _sync) = dx.device_ptr(stream);
        i32::from(k % 2 == 0 && ptr % 8 == 0)
    };
    let mut launch = stream.launch_builder(&func);
    launch
        .arg(w.tiles())
        .arg(w.scales())
        .arg(&per_row)
        .arg(dy)
        .arg(dx)
        .arg(&m_i)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&dx_vec);
    // SAFETY: matches `gemm_t_bf16[_unaligned](const u32* (tiled), const float*, int, const bf16*,
    // float*, int, int, int, int)`; float2 stores only with dx_vec (checked alignment); W holds tiled_len(n_out, k) words and 1 or n_out scales
    // (TernaryMatrixGpu), dy m x n_out and dx m x k elements (checked above); the kernel
    // bounds-checks every row, column and reduction index; the cp.async instance runs only
    // on 16-byte aligned dy rows; shared memory matches `kSmemBytes`.
    unsafe { launch.launch(cfg) }
        .map_err(|e| KernelError::driver(format!("launching {name}"))(e))?;
    Ok(())
}
