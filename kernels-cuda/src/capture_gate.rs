//! A process-wide gate between CUDA graph captures and cuBLAS handle creation / teardown.
//!
//! While a stream capture is open, another thread's context-synchronizing call (destroying a
//! cuBLAS handle is the one we measured: 387 of 400 relaxed captures invalidated, H100) makes
//! the driver invalidate the capture. The engines recover from the error code, but the
//! overlap itself is a known source of crashes inside the driver / cuBLAS (llama.cpp's
//! `ggml_cuda_lock`, PR #14288, serializes the same two things for the same reason). So the
//! decode-graph captures of `tritter`'s inference engine hold [`capture_section`] from
//! `begin_capture` to the end of the capture, and every cuBLAS handle of the engines is a
//! `GatedBlas`, created and destroyed under [`teardown_section`]; the inference engine also
//! drops its decode graphs under it. Captures on several threads still run concurrently
//! (shared side); a teardown waits for the captures in flight (milliseconds), and new captures
//! wait behind a queued teardown (std's `RwLock` does not starve writers on Linux).
//!
//! Not covered: graphs an engine replaces between its own steps, page-locked buffers it
//! allocates or frees, and single-threaded bench captures. Code outside these crates that
//! creates or destroys cuBLAS handles (or otherwise synchronizes the context) on one thread
//! while an engine decodes on another can take [`teardown_section`] around it, or use
//! `GatedBlas`; without it, a capture it invalidates is recovered by running that step
//! eagerly.
//!
//! The gate is not re-entrant: a thread inside either section that asks for a section again
//! (creating or dropping an engine or a `GatedBlas`, or stepping an engine, while holding
//! one) would wait for itself, so that panics instead, naming the mistake.

use std::cell::Cell;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static GATE: RwLock<()> = RwLock::new(());

thread_local! {
    /// Whether this thread holds a section (the gate is not re-entrant).
    static HELD: Cell<bool> = const { Cell::new(false) };
}

fn enter(which: &str) {
    HELD.with(|h| {
        assert!(
            !h.replace(true),
            "capture_gate::{which} requested by a thread that already holds a section of the \
             gate (it would wait for itself): create, drop or step engines and cuBLAS handles \
             outside capture_section / teardown_section"
        )
    });
}

/// The shared side, held by a stream capture from its begin to its end.
#[derive(Debug)]
pub struct CaptureSection(#[allow(dead_code)] RwLockReadGuard<'static, ()>);

/// The exclusive side, held while creating or destroying cuBLAS handles and graphs.
#[derive(Debug)]
pub struct TeardownSection(#[allow(dead_code)] RwLockWriteGuard<'static, ()>);

impl Drop for CaptureSection {
    fn drop(&mut self) {
        HELD.with(|h| h.set(false));
    }
}

impl Drop for TeardownSection {
    fn drop(&mut self) {
        HELD.with(|h| h.set(false));
    }
}

/// Held by a stream capture from its begin to its end (shared: captures on several threads
/// proceed together). A poisoned gate is taken anyway: it guards no data. Panics if this
/// thread already holds a section.
pub fn capture_section() -> CaptureSection {
    enter("capture_section");
    CaptureSection(GATE.read().unwrap_or_else(|p| p.into_inner()))
}

/// Held while creating or destroying cuBLAS handles and graphs (exclusive: waits for every
/// open capture to end). Panics if this thread already holds a section.
pub fn teardown_section() -> TeardownSection {
    enter("teardown_section");
    TeardownSection(GATE.write().unwrap_or_else(|p| p.into_inner()))
}

#[cfg(feature = "cuda")]
pub use blas::GatedBlas;

#[cfg(feature = "cuda")]
mod blas {
    use std::mem::ManuallyDrop;
    use std::sync::Arc;

    use cudarc::cublas::result::CublasError;
    use cudarc::cublas::CudaBlas;
    use cudarc::driver::CudaStream;

    /// A cuBLAS handle (dereferences to cudarc's [`CudaBlas`]) created and destroyed under
    /// [`teardown_section`](super::teardown_section), so no capture of this process is open
    /// while either happens (module docs).
    pub struct GatedBlas(ManuallyDrop<CudaBlas>);

    impl GatedBlas {
        /// A handle bound to `stream`, made under the gate's exclusive side.
        pub fn new(stream: Arc<CudaStream>) -> Result<Self, CublasError> {
            let _gate = super::teardown_section();
            CudaBlas::new(stream).map(|b| Self(ManuallyDrop::new(b)))
        }
    }

    impl std::ops::Deref for GatedBlas {
        type Target = CudaBlas;
        fn deref(&self) -> &CudaBlas {
            &self.0
        }
    }

    impl Drop for GatedBlas {
        fn drop(&mut self) {
            let _gate = super::teardown_section();
            // SAFETY: dropped once, here; `self.0` is never used afterwards.
            unsafe { ManuallyDrop::drop(&mut self.0) };
        }
    }

    impl std::fmt::Debug for GatedBlas {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("GatedBlas").finish_non_exhaustive()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A section can be taken again once the previous one is dropped, and asking for one
    /// while holding one panics (instead of waiting for itself).
    #[test]
    fn sections_are_not_reentrant() {
        drop(capture_section());
        drop(teardown_section());
        let held = capture_section();
        let again = std::panic::catch_unwind(teardown_section);
        assert!(again.is_err(), "a nested section must panic");
        drop(held);
        let _ = capture_section();
    }
}
