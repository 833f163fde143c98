use thiserror::Error;

/// Errors of the CUDA runtime layer. Messages name the actual and the expected value.
#[derive(Debug, Error)]
pub enum KernelError {
    /// The CUDA driver library could not be opened (no NVIDIA driver on this machine).
    #[error("no CUDA driver: could not load {tried} ({reason}); a GPU run needs the NVIDIA driver installed")]
    NoDriver {
        /// Library names that were tried.
        tried: String,
        /// The loader's message.
        reason: String,
    },
    /// The driver loaded but the requested device does not exist.
    #[error("CUDA device ordinal {ordinal} requested but {count} device(s) are present")]
    NoDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices the driver reports.
        count: usize,
    },
    /// The crate was built without feature `cuda`, so no kernel image exists.
    #[error("kernel image `{0}` is empty: this build has feature `cuda` off; rebuild with `--features cuda` (after scripts/setup-cuda.sh)")]
    NotBuilt(&'static str),
    /// GPU work was asked of a binary built without feature `cuda`.
    #[error("this binary was built without feature `cuda`, so it has no GPU code; rebuild with `--features cuda` (after scripts/setup-cuda.sh)")]
    CudaFeatureOff,
    /// A CUDA driver call failed.
    #[cfg(feature = "cuda")]
    #[error("CUDA driver error while {context}: {source}")]
    Driver {
        /// What was being done, e.g. "loading module act_quant".
        context: String,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
}

#[cfg(feature = "cuda")]
impl KernelError {
    /// Wraps a driver error with what was being done.
    pub fn driver(context: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
        let context = context.into();
        move |source| KernelError::Driver { context, source }
    }
}
