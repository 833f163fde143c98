//! A process-wide gate between CUDA graph captures and context-synchronizing teardown.
//!
//! While a stream capture is open, another thread's context-synchronizing call (destroying a
//! cuBLAS handle is the one we measured: 387 of 400 relaxed captures invalidated, H100) makes
//! the driver invalidate the capture. The engines recover from the error code, but the
//! overlap itself is a known source of crashes inside the driver / cuBLAS (llama.cpp's
//! `ggml_cuda_lock`, PR #14288, serializes the same two things for the same reason). So every
//! capture in this workspace holds [`capture_section`] from `begin_capture` to the end of the
//! capture, and the engines hold [`teardown_section`] while they destroy their cuBLAS handle
//! and graphs. Captures on different threads still run concurrently (shared side); a
//! teardown waits for the captures in flight (milliseconds) and new captures wait behind a
//! queued teardown (std's `RwLock` does not starve writers on Linux).
//!
//! Code outside these crates that destroys cuBLAS handles (or otherwise synchronizes the
//! context) on one thread while an engine decodes on another can take [`teardown_section`]
//! around it; without it, a capture it invalidates is recovered by running that step eagerly.
//! Never take [`teardown_section`] on a thread that holds a [`capture_section`] (it would wait
//! for itself).

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static GATE: RwLock<()> = RwLock::new(());

/// Held by a stream capture from its begin to its end (shared: captures on several threads
/// proceed together). A poisoned gate is taken anyway: it guards no data.
pub fn capture_section() -> RwLockReadGuard<'static, ()> {
    GATE.read().unwrap_or_else(|p| p.into_inner())
}

/// Held while destroying cuBLAS handles, graphs and other context-synchronizing teardown
/// (exclusive: waits for every open capture to end).
pub fn teardown_section() -> RwLockWriteGuard<'static, ()> {
    GATE.write().unwrap_or_else(|p| p.into_inner())
}
