//! # tritter-kernels-cuda
//!
//! Every CUDA kernel of the Tritter kernel crates (`ternary-gemm`, `flash-attn-sm120`,
//! `kv-int4`, `tritter`), compiled by `build.rs` with nvcc into fatbins for sm_90 and
//! sm_120 (plus compute_120 PTX) and embedded as [`KernelImage`] constants in [`images`].
//!
//! With feature `cuda` off the images are empty and nothing CUDA is needed to build; with it
//! on, [`Gpu`] gives a context and stream through cudarc (libcuda is loaded at run time, so
//! the binaries build on machines without a GPU or a CUDA install), loads each image once
//! per context and caches the functions; `Gpu::for_stream` and `PerStream` share one `Gpu`
//! per foreign stream (a candle device's) between the crates' candle ops. [`testing`] holds the GPU-test gate that skips on
//! machines without a GPU and fails when `TRITTER_REQUIRE_GPU=1`.
//!
//! Why one crate for all `.cu` files: one nvcc invocation policy (arch list, flags, resource
//! report) and one place to find the pinned toolchain, while the Rust crates that launch
//! the kernels stay independently versioned (the way `candle-kernels` serves `candle-core`).

pub mod capture_gate;
mod error;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod pdl;
#[cfg(feature = "cuda")]
mod per_stream;
pub mod testing;

pub use error::KernelError;
#[cfg(feature = "cuda")]
pub use gpu::{driver_available, DeviceInfo, Gpu};
#[cfg(feature = "cuda")]
pub use pdl::{pdl_enabled, set_pdl_enabled, KernelArgs, MAX_KERNEL_ARGS};
#[cfg(feature = "cuda")]
pub use per_stream::PerStream;

/// Uninhabited stand-in for the GPU handle when feature `cuda` is off, so that GPU test
/// entry points compile (and report skipped or failed) in every build.
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub enum Gpu {}

/// A compiled kernel module: the fatbin that nvcc produced from `kernels/<name>.cu`.
///
/// `fatbin` is empty when the crate was built without feature `cuda`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelImage {
    /// File stem of the source, e.g. `"act_quant"`; also the module-cache key.
    pub name: &'static str,
    /// The fatbin bytes (SASS for each arch of [`images::CUDA_ARCHS`], PTX of the highest).
    pub fatbin: &'static [u8],
}

impl KernelImage {
    /// True when the image holds code, i.e. the crate was built with feature `cuda`.
    pub fn is_built(&self) -> bool {
        !self.fatbin.is_empty()
    }
}

/// The embedded kernel images, one constant per `kernels/*.cu` file, plus the build facts
/// ([`images::CUDA_ARCHS`], [`images::NVCC_VERSION`]) that benchmark reports print.
pub mod images {
    use super::KernelImage;
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
