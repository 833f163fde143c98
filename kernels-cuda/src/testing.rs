//! The GPU-test gate shared by every crate's GPU conformance tests.
//!
//! A GPU test starts with `let Some(gpu) = gpu_for_test("name") else { return };`.
//! * A GPU is usable: the test runs on it.
//! * No GPU (no driver, no device, or a build without feature `cuda`): the test prints
//!   `SKIPPED <name>: <reason>` and returns, so CPU-only CI stays green.
//! * `TRITTER_REQUIRE_GPU=1` and no GPU: the test panics naming the requirement, so a GPU
//!   run can never pass vacuously.

use std::io::Write as _;
use std::sync::Arc;

use crate::{Gpu, KernelError};

/// Declares a GPU conformance test: `gpu_test!(/// doc \n name => module);` makes test `name`
/// that takes the GPU through [`gpu_for_test`] (skipping without one) and calls
/// `module::run(&gpu)`. The caller defines `module` under `#[cfg(feature = "cuda")]`; without
/// the feature the macro supplies a `run` that cannot be reached (no `Gpu` value exists then),
/// so test files compile unchanged in CPU-only builds.
#[macro_export]
macro_rules! gpu_test {
    ($(#[$doc:meta])* $name:ident => $module:ident) => {
        $(#[$doc])*
        #[test]
        fn $name() {
            let Some(gpu) = $crate::testing::gpu_for_test(stringify!($name)) else {
                return;
            };
            $module::run(&gpu);
        }

        #[cfg(not(feature = "cuda"))]
        mod $module {
            pub fn run(gpu: &$crate::Gpu) {
                match *gpu {}
            }
        }
    };
}

/// The environment variable that turns a skipped GPU test into a failure.
pub const REQUIRE_GPU_ENV: &str = "TRITTER_REQUIRE_GPU";

/// True when `TRITTER_REQUIRE_GPU` is set to `1` or `true` (any case).
pub fn gpu_required() -> bool {
    std::env::var(REQUIRE_GPU_ENV)
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false)
}

/// The GPU for test `test`, or `None` after printing why it is skipped.
///
/// # Panics
/// When no GPU is usable and `TRITTER_REQUIRE_GPU=1`: that is the test failure.
#[inline(never)] // scripts/gpu-bundle.sh finds GPU test binaries by this symbol
pub fn gpu_for_test(test: &str) -> Option<Arc<Gpu>> {
    match open_gpu() {
        Ok(gpu) => Some(gpu),
        Err(reason) => {
            if gpu_required() {
                panic!("{test}: {REQUIRE_GPU_ENV}=1 requires a GPU, but none is usable: {reason}");
            }
            // Straight to the stderr handle: the test harness captures `eprintln!` of passing
            // tests, and a skip must stay visible in the run's output.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: no GPU ({reason}); set {REQUIRE_GPU_ENV}=1 to make this a failure"
            );
            None
        }
    }
}

#[cfg(feature = "cuda")]
fn open_gpu() -> Result<Arc<Gpu>, KernelError> {
    Gpu::shared(0)
}

#[cfg(not(feature = "cuda"))]
fn open_gpu() -> Result<Arc<Gpu>, KernelError> {
    Err(KernelError::CudaFeatureOff)
}

/// Deterministic pseudo-random values uniform in [-2, 2) (SplitMix64), shared by tests and
/// benches so they need no RNG crate and every run sees the same inputs. Never all zeros:
/// zeros hide unwritten outputs and can run faster than real data.
pub fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // top 24 bits -> [0, 1) exactly representable in f32
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}
