//! # tritter-suite
//!
//! The workspace's root package (never published): cross-crate benches in `benches/`,
//! integration and GPU conformance tests in `tests/`, and the helpers they share —
//! [`build_info`] for the header every benchmark report prints, and (feature `cuda`)
//! `gpu_bench`, CUDA-event timing with warm-up, medians and L2-defeating buffer rotation.

#[cfg(feature = "cuda")]
pub mod gpu_bench;

/// Build facts recorded by `build.rs`: printed beside every benchmark figure so a number can
/// be traced to the code and toolchain that produced it.
pub mod build_info {
    /// Git revision of the tree the benches were built from (`-dirty` with local changes).
    pub const GIT_REV: &str = env!("TRITTER_BUILD_GIT_REV");
    /// CUDA architectures of the embedded kernels, e.g. "sm_90,sm_120".
    pub const CUDA_ARCHS: &str = env!("TRITTER_BUILD_CUDA_ARCHS");
    /// nvcc release that built the kernels.
    pub const NVCC: &str = env!("TRITTER_BUILD_NVCC");

    /// One line naming the build and the device, for the top of a bench report.
    pub fn header(device: &str) -> String {
        format!("# tritter bench | device: {device} | git {GIT_REV} | {NVCC} | archs {CUDA_ARCHS}")
    }
}

/// Median wall time of `f` over `reps` runs after `warmup` untimed runs: the host-side timer
/// of the CPU benches' RESULT lines (GPU benches use CUDA events, `gpu_bench`).
pub fn median_wall(warmup: usize, reps: usize, mut f: impl FnMut()) -> std::time::Duration {
    for _ in 0..warmup {
        f();
    }
    let mut t: Vec<std::time::Duration> = (0..reps.max(1))
        .map(|_| {
            let s = std::time::Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[t.len() / 2]
}

/// Deterministic test data; see [`tritter_kernels_cuda::testing::random_f32`].
pub use tritter_kernels_cuda::testing::random_f32;
