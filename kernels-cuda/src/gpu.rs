//! The cudarc runtime layer: one [`Gpu`] per device ordinal holding the context, a stream,
//! and a cache of loaded modules and functions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::{KernelError, KernelImage};

/// Library names libcuda goes by; cudarc opens the same ones.
const DRIVER_LIBS: &[&str] = if cfg!(windows) {
    &["nvcuda.dll"]
} else {
    &["libcuda.so.1", "libcuda.so"]
};

/// True when the CUDA driver library can be opened on this machine.
///
/// cudarc panics on first use when libcuda is absent; probing first turns that into
/// [`KernelError::NoDriver`] (and lets GPU tests skip cleanly on CPU-only machines).
pub fn driver_available() -> bool {
    probe_driver().is_ok()
}

fn probe_driver() -> Result<(), KernelError> {
    let mut last = String::new();
    for name in DRIVER_LIBS {
        // SAFETY: loading libcuda runs only its own initialisers, which have no
        // preconditions; the handle is dropped right away (cudarc keeps its own).
        match unsafe { libloading::Library::new(*name) } {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(KernelError::NoDriver {
        tried: DRIVER_LIBS.join(", "),
        reason: last,
    })
}

/// Static facts about a device, read once from the driver (for launch choices and for
/// benchmark reports, which print the device beside every figure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor): (9, 0) for H100, (12, 0) for RTX 5080.
    pub compute_capability: (u32, u32),
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Largest dynamic shared memory a block may opt into, bytes.
    pub max_shared_per_block_optin: u32,
    /// L2 cache size, bytes.
    pub l2_bytes: u32,
    /// Device memory, bytes.
    pub total_mem: usize,
}

/// Loaded modules of one context, by image name.
type ModuleCache = Mutex<HashMap<&'static str, Arc<CudaModule>>>;
/// Kernel handles of one context, by (image name, function name).
type FunctionCache = Mutex<HashMap<(&'static str, &'static str), CudaFunction>>;

/// A CUDA device ready to run this workspace's kernels: context, one owned stream and the
/// module/function cache. Create it once (`Gpu::shared(0)`) and pass `&Gpu` to the ops.
///
/// All ops launch on [`Gpu::stream`], in order. cudarc's automatic cross-stream event
/// tracking is off for this context (it costs an event record per kernel argument), so work
/// you put on other streams of [`Gpu::context`] must be ordered with events by hand.
///
/// Threads may share one `Gpu` (its ops then interleave on one stream), except around a CUDA
/// graph capture: every launch on a capturing stream joins the graph, whichever thread
/// issues it. Code that captures while other threads may use the same handle runs on its
/// own stream from [`Gpu::fork`] (the tritter decode engine does; the single-threaded
/// benches capture on the shared one).
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    modules: Arc<ModuleCache>,
    functions: Arc<FunctionCache>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .field("info", &self.info)
            .finish()
    }
}

impl Gpu {
    /// Opens device `ordinal` with its own handle (primary context, default stream).
    pub fn new(ordinal: usize) -> Result<Arc<Self>, KernelError> {
        probe_driver()?;
        let count =
            CudaContext::device_count().map_err(KernelError::driver("counting CUDA devices"))?;
        let count = usize::try_from(count).unwrap_or(0);
        if ordinal >= count {
            return Err(KernelError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(KernelError::driver(format!(
            "creating a context on device {ordinal}"
        )))?;
        let info = read_info(&ctx)?;
        // An owned stream, not the legacy default one: it can be captured into CUDA graphs
        // (decode steps) and does not serialize against other libraries' streams.
        let stream = ctx
            .new_stream()
            .map_err(KernelError::driver("creating a stream"))?;
        // SAFETY: every op of this workspace runs on the stream of the `Gpu` it is given, and
        // a buffer stays with the handle (stream) that made it: the users of several handles
        // of one context (forks, `from_stream`) keep each buffer on one of them or order the
        // streams themselves (the engine refuses a cache of another engine), so slices are
        // never used across streams without ordering; cudarc's per-launch event records (one
        // per argument, enabled because a second stream now exists) would only add CPU cost
        // on the decode hot path. Users who add streams on `context()` synchronize them
        // explicitly (documented on `Gpu`).
        unsafe { ctx.disable_event_tracking() };
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            info,
            modules: Default::default(),
            functions: Default::default(),
        }))
    }

    /// A handle on the same context whose ops launch on a new stream of their own; it shares
    /// this handle's loaded modules (nothing is loaded twice). Work on the two streams is not
    /// ordered, in either direction (cudarc's event tracking is off, see [`Gpu`]): a buffer
    /// written, read or freed through one handle and used through the other needs the first
    /// stream synchronized in between; simplest is to keep each buffer on one handle.
    ///
    /// Why: a CUDA graph capture takes in every launch on the capturing stream, from any
    /// thread, so an engine that captures decode steps on a stream other threads also use
    /// would record their kernels and host copies into its graph (and replay them later,
    /// into buffers they may have freed). One stream per capturing user avoids that.
    pub fn fork(&self) -> Result<Arc<Self>, KernelError> {
        let stream = self
            .ctx
            .new_stream()
            .map_err(KernelError::driver("creating a stream"))?;
        Ok(Arc::new(Gpu {
            ctx: self.ctx.clone(),
            stream,
            info: self.info.clone(),
            modules: self.modules.clone(),
            functions: self.functions.clone(),
        }))
    }

    /// A handle that launches on an existing stream (and its context), e.g. the stream of a
    /// candle `CudaDevice`, so this workspace's kernels order with another library's work
    /// without events. The context's event-tracking setting is left as the owner set it.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Arc<Self>, KernelError> {
        probe_driver()?;
        let ctx = stream.context().clone();
        let info = read_info(&ctx)?;
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            info,
            modules: Default::default(),
            functions: Default::default(),
        }))
    }

    /// The process-wide handle for device `ordinal`, created on first use. Tests and benches
    /// share it so modules are loaded once per process.
    pub fn shared(ordinal: usize) -> Result<Arc<Self>, KernelError> {
        static SHARED: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let mut map = SHARED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(gpu) = map.get(&ordinal) {
            return Ok(gpu.clone());
        }
        let gpu = Gpu::new(ordinal)?;
        map.insert(ordinal, gpu.clone());
        Ok(gpu)
    }

    /// The cudarc context (for allocations on other streams, cuBLAS handles, events).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op of this workspace launches on unless given another.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device facts read at creation.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Loads `image` into this context once and returns the module.
    pub fn module(&self, image: &KernelImage) -> Result<Arc<CudaModule>, KernelError> {
        if !image.is_built() {
            return Err(KernelError::NotBuilt(image.name));
        }
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(image.name) {
            return Ok(m.clone());
        }
        let module = self
            .ctx
            .load_module(Ptx::from_binary(image.fatbin.to_vec()))
            .map_err(KernelError::driver(format!(
                "loading module `{}` (built for {}) on {} (sm_{}{})",
                image.name,
                crate::images::CUDA_ARCHS,
                self.info.name,
                self.info.compute_capability.0,
                self.info.compute_capability.1
            )))?;
        modules.insert(image.name, module.clone());
        Ok(module)
    }

    /// The kernel `function` (an `extern "C"` name) of `image`, cached after the first call.
    ///
    /// The lookup hashes two static strings under a mutex (no allocation), cheap enough for
    /// every launch.
    pub fn function(
        &self,
        image: &KernelImage,
        function: &'static str,
    ) -> Result<CudaFunction, KernelError> {
        let key = (image.name, function);
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(f.clone());
        }
        let f = self
            .module(image)?
            .load_function(function)
            .map_err(KernelError::driver(format!(
                "looking up `{function}` in module `{}`",
                image.name
            )))?;
        self.functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, f.clone());
        Ok(f)
    }
}

/// Device facts of `ctx`'s device.
fn read_info(ctx: &Arc<CudaContext>) -> Result<DeviceInfo, KernelError> {
    let attr = |a: Attr| -> Result<u32, KernelError> {
        ctx.attribute(a)
            .map(|v| v.max(0) as u32)
            .map_err(KernelError::driver(format!(
                "reading device attribute {a:?}"
            )))
    };
    let info = DeviceInfo {
        name: ctx
            .name()
            .map_err(KernelError::driver("reading the device name"))?,
        compute_capability: (
            attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ),
        sm_count: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        max_shared_per_block_optin: attr(
            Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )?,
        l2_bytes: attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
        total_mem: ctx
            .total_mem()
            .map_err(KernelError::driver("reading device memory size"))?,
    };
    Ok(info)
}
