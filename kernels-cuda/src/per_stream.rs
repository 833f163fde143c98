//! One [`Gpu`] per foreign stream (e.g. a candle `CudaDevice`'s), shared by every crate of the
//! workspace, and [`PerStream`], the per-stream cache of an op's device data built on it.
//!
//! Why a process-wide registry: each `Gpu` loads the kernel images it uses once, so the
//! candle ops of `ternary-gemm`, `flash-attn-sm120`, ... running on one candle device must
//! find the same `Gpu`, or every op (and every crate) would load its modules again.
//!
//! Streams are identified by `(CUcontext, CUstream)`, not by the stream handle alone: candle's
//! `CudaDevice::new` launches on the per-thread default stream, whose handle is the constant
//! `0x2` in every context, so the handle alone would mix up two devices. The registry keeps
//! each stream alive, so a key is never reused by another stream.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::CudaStream;

use crate::{Gpu, KernelError};

/// A stream's identity: its context and stream handles as addresses.
type StreamKey = (usize, usize);
/// A stream and the `Gpu` launching on it.
type StreamGpu = (StreamKey, Arc<Gpu>);
/// A stream, its `Gpu` and the data built there.
type Entry<T> = (StreamKey, Arc<Gpu>, Arc<T>);

fn key_of(stream: &CudaStream) -> StreamKey {
    (
        stream.context().cu_ctx() as usize,
        stream.cu_stream() as usize,
    )
}

impl Gpu {
    /// The process-wide handle that launches on `stream` ([`Gpu::from_stream`]), created on
    /// first use; every later call for the same context and stream returns it, so the kernel
    /// modules are loaded once per stream whichever crate asks.
    pub fn for_stream(stream: &Arc<CudaStream>) -> Result<Arc<Gpu>, KernelError> {
        static GPUS: OnceLock<Mutex<Vec<StreamGpu>>> = OnceLock::new();
        let key = key_of(stream);
        let mut gpus = GPUS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((_, gpu)) = gpus.iter().find(|(k, _)| *k == key) {
            return Ok(gpu.clone());
        }
        let gpu = Gpu::from_stream(stream.clone())?;
        gpus.push((key, gpu.clone()));
        Ok(gpu)
    }
}

/// An op's device data (uploaded weights, index arrays), built once per stream the op runs
/// on, next to that stream's shared [`Gpu`] ([`Gpu::for_stream`]).
///
/// Clone the op, not the data: ops hold an `Arc<PerStream<T>>`, so clones share the uploads.
/// Entries live as long as the cache (a handful of streams per process).
pub struct PerStream<T> {
    entries: Mutex<Vec<Entry<T>>>,
}

impl<T> Default for PerStream<T> {
    fn default() -> Self {
        PerStream {
            entries: Mutex::new(Vec::new()),
        }
    }
}

impl<T> std::fmt::Debug for PerStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.lock().map_or(0, |e| e.len());
        f.debug_struct("PerStream").field("streams", &n).finish()
    }
}

impl<T> PerStream<T> {
    /// The `Gpu` on `stream` and the data there, built by `build` on first use.
    pub fn get_or_try_insert<E: From<KernelError>>(
        &self,
        stream: &Arc<CudaStream>,
        build: impl FnOnce(&Gpu) -> Result<T, E>,
    ) -> Result<(Arc<Gpu>, Arc<T>), E> {
        self.get_or_try_insert_if(stream, |_| true, build)
    }

    /// Like [`PerStream::get_or_try_insert`], but an entry for which `is_current` is false
    /// (built from inputs that have changed since) is rebuilt and replaced.
    pub fn get_or_try_insert_if<E: From<KernelError>>(
        &self,
        stream: &Arc<CudaStream>,
        is_current: impl FnOnce(&T) -> bool,
        build: impl FnOnce(&Gpu) -> Result<T, E>,
    ) -> Result<(Arc<Gpu>, Arc<T>), E> {
        let key = key_of(stream);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let slot = entries.iter().position(|(k, _, _)| *k == key);
        if let Some(i) = slot {
            let (_, gpu, data) = &entries[i];
            if is_current(data) {
                return Ok((gpu.clone(), data.clone()));
            }
        }
        let gpu = Gpu::for_stream(stream)?;
        let data = Arc::new(build(&gpu)?);
        let entry = (key, gpu.clone(), data.clone());
        match slot {
            Some(i) => entries[i] = entry,
            None => entries.push(entry),
        }
        Ok((gpu, data))
    }
}
