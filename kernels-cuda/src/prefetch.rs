//! [`Gpu::prefetch_l2`]: moves a read-only buffer into the L2 cache ahead of the kernel
//! that reads it (`kernels/l2_prefetch.cu`).
//!
//! Launched on a second stream while the main stream runs latency-bound kernels, it keeps
//! HBM busy during stretches that would otherwise leave it idle: a batch-1 decode step
//! prefetches the next GEMV's packed weights while QK-Norm, attention and the residual
//! norms run, and the GEMV then reads them from L2. A prefetch writes nothing, so it never
//! changes a result; it only helps while the buffer fits in L2 beside everything else in
//! use (H100: 50 MB, RTX 5080: 64 MB).

use cudarc::driver::{CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use crate::{images, Gpu, KernelError};

/// Threads per CTA of `prefetch_l2`.
const THREADS: u32 = 64;
/// Bytes per request (`kChunk` in l2_prefetch.cu).
const CHUNK: usize = 4096;

/// How [`Gpu::prefetch_l2`] issues its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefetchMode {
    /// One `cp.async.bulk.prefetch.L2` per 4 KB (sm_90+; older devices use `Lines`).
    #[default]
    Bulk = 0,
    /// One `prefetch.global.L2::evict_last` per 128-byte line.
    Lines = 1,
}

impl Gpu {
    /// Asks L2 to fetch every byte of `buf` (a `CudaSlice` or view), asynchronously on
    /// `stream`; returns once the launch is queued.
    ///
    /// The kernel only issues requests: it ends before the data arrives, and nothing orders
    /// the arrival with later work. Order `stream` after whatever writes `buf` (weights are
    /// written once, at upload). Empty buffers and tails under 16 bytes are skipped.
    pub fn prefetch_l2<T>(
        &self,
        stream: &CudaStream,
        buf: &impl DevicePtr<T>,
        mode: PrefetchMode,
    ) -> Result<(), KernelError> {
        let bytes = buf.num_bytes();
        if bytes < 16 {
            return Ok(());
        }
        let func = self.function(&images::L2_PREFETCH, "prefetch_l2")?;
        // One 4 KB request per thread, spread over up to 4 CTAs per SM's bulk-copy unit.
        let per_cta = THREADS as usize * CHUNK;
        let ctas = bytes
            .div_ceil(per_cta)
            .min(4 * self.info().sm_count.max(1) as usize) as u32;
        let (ptr, _guard) = buf.device_ptr(stream);
        let (len, mode) = (bytes as u64, mode as i32);
        let mut launch = stream.launch_builder(&func);
        launch.arg(&ptr).arg(&len).arg(&mode);
        let cfg = LaunchConfig {
            grid_dim: (ctas, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `prefetch_l2(const char*, unsigned long long, int)`; the kernel
        // issues prefetches only inside [ptr, ptr + len) (whole 16-byte units), reads no data
        // into registers and writes nothing.
        unsafe { launch.launch(cfg) }.map_err(KernelError::driver("launching prefetch_l2"))?;
        Ok(())
    }
}
