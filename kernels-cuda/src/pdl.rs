//! Programmatic dependent launch (PDL, sm_90+): a kernel launched with
//! [`Gpu::launch_pdl`] may start while the previous kernel on the stream is finishing. Its
//! CTAs run the part before `griddepcontrol.wait` (`tritter::pdl_wait()` in
//! `kernels/common.cuh`) early: the decode kernels issue their weight loads there, which
//! depend on nothing a previous kernel writes, and so hide the launch and ramp-up latency
//! that dominates small decode GEMVs. Everything after the wait sees the previous kernel's
//! writes, exactly as with a plain launch; a kernel without the wait, or a previous operation
//! that is not a kernel (a memset, a copy), simply serializes as usual. CUDA graphs capture
//! the programmatic edges.
//!
//! cudarc's launch builder has no launch attributes, so this goes through `cuLaunchKernelEx`
//! directly, with the arguments collected in [`KernelArgs`].
//!
//! `TRITTER_PDL=0` in the environment turns the attribute off for the whole process (see
//! [`pdl_enabled`]; [`set_pdl_enabled`] overrides it): every launch is then plain, to rule
//! PDL out when chasing a bug or to measure what it gains. Results do not change, only the
//! overlap.

use std::ffi::c_void;

use cudarc::driver::sys::{
    self, CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue, CUlaunchConfig,
};
use cudarc::driver::{CudaFunction, DevicePtr, DevicePtrMut, LaunchConfig, SyncOnDrop};

use crate::{Gpu, KernelError};

/// Most arguments a [`KernelArgs`] holds.
pub const MAX_KERNEL_ARGS: usize = 24;

/// Kernel arguments by value, in order: device pointers and scalars, each in an 8-byte slot
/// (a 4-byte scalar occupies the low half, which is where the driver reads it on the
/// little-endian hosts CUDA supports). Buffer arguments keep cudarc's read/write guards until
/// the launch has been queued, so a context with event tracking on (candle's) sees the launch
/// order its buffers against other streams; with tracking off (`Gpu::new`) they cost nothing.
pub struct KernelArgs<'a> {
    slots: [u64; MAX_KERNEL_ARGS],
    guards: [Option<SyncOnDrop<'a>>; MAX_KERNEL_ARGS],
    len: usize,
}

impl std::fmt::Debug for KernelArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelArgs")
            .field("slots", &&self.slots[..self.len])
            .finish()
    }
}

impl Default for KernelArgs<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> KernelArgs<'a> {
    /// No arguments yet.
    pub fn new() -> Self {
        KernelArgs {
            slots: [0; MAX_KERNEL_ARGS],
            guards: std::array::from_fn(|_| None),
            len: 0,
        }
    }

    fn push(&mut self, v: u64, guard: Option<SyncOnDrop<'a>>) -> &mut Self {
        assert!(
            self.len < MAX_KERNEL_ARGS,
            "a kernel takes at most {MAX_KERNEL_ARGS} arguments here"
        );
        self.slots[self.len] = v;
        self.guards[self.len] = guard;
        self.len += 1;
        self
    }

    /// The device address of a buffer the kernel only reads (a `CudaSlice` or `CudaView`).
    pub fn ptr<T>(&mut self, gpu: &'a Gpu, buf: &'a impl DevicePtr<T>) -> &mut Self {
        let (p, guard) = buf.device_ptr(gpu.stream());
        self.push(p, Some(guard))
    }

    /// The device address of a buffer the kernel writes (a `CudaSlice` or `CudaViewMut`).
    pub fn ptr_mut<T>(&mut self, gpu: &'a Gpu, buf: &'a mut impl DevicePtrMut<T>) -> &mut Self {
        let (p, guard) = buf.device_ptr_mut(gpu.stream());
        self.push(p, Some(guard))
    }

    /// An `int` argument.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.push(u64::from(v as u32), None)
    }

    /// A `float` argument.
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.push(u64::from(v.to_bits()), None)
    }

    /// A `long long` argument.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.push(v as u64, None)
    }

    /// A raw device address (e.g. 0 for an optional pointer the kernel checks), without
    /// cudarc's read/write guards: the caller keeps the buffer alive and ordered.
    pub fn addr(&mut self, v: u64) -> &mut Self {
        self.push(v, None)
    }
}

/// [`PDL`] before its first use.
const PDL_UNSET: u8 = 0;
const PDL_ON: u8 = 1;
const PDL_OFF: u8 = 2;
/// The process-wide PDL switch: [`PDL_UNSET`] until the environment is read or
/// [`set_pdl_enabled`] is called.
static PDL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(PDL_UNSET);

/// Whether launches asking for programmatic dependent launch get it: true unless the
/// environment sets `TRITTER_PDL=0` (read at the first launch) or [`set_pdl_enabled`] said
/// otherwise. One relaxed atomic load per launch.
pub fn pdl_enabled() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match PDL.load(Relaxed) {
        PDL_ON => true,
        PDL_OFF => false,
        _ => {
            let on = std::env::var("TRITTER_PDL").map_or(true, |v| v.trim() != "0");
            // A concurrent set_pdl_enabled wins over the environment.
            let _ = PDL.compare_exchange(
                PDL_UNSET,
                if on { PDL_ON } else { PDL_OFF },
                Relaxed,
                Relaxed,
            );
            PDL.load(Relaxed) == PDL_ON
        }
    }
}

/// Turns programmatic dependent launch on or off for every later launch of the process,
/// over `TRITTER_PDL` (tests compare steps with PDL against steps without; results never
/// depend on it, only the overlap of neighbouring kernels does). A CUDA graph keeps the
/// launch attributes it was captured with.
pub fn set_pdl_enabled(on: bool) {
    PDL.store(
        if on { PDL_ON } else { PDL_OFF },
        std::sync::atomic::Ordering::Relaxed,
    );
}

impl Gpu {
    /// Launches `func` on [`Gpu::stream`] with programmatic dependent launch allowed (see the
    /// module docs).
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number, order and size (pointers as
    /// device addresses of buffers large enough for everything the kernel touches under
    /// `cfg`), and the kernel must not read data written by the previous kernel on the
    /// stream, nor write data that kernel reads, before its `griddepcontrol.wait`. The rule
    /// is transitive: a kernel that releases its successor before its own wait (the GEMV)
    /// lets that successor's pre-wait part overlap every earlier kernel back to the last one
    /// that waited before releasing (or was launched plainly), so such pre-wait parts may
    /// touch only data that none of those kernels writes (constant weights).
    ///
    /// `name` (the kernel's name) only enters the error message; nothing is allocated on
    /// success (this is the decode hot path).
    pub unsafe fn launch_pdl(
        &self,
        func: &CudaFunction,
        name: &str,
        cfg: LaunchConfig,
        args: KernelArgs<'_>,
    ) -> Result<(), KernelError> {
        self.launch_args(func, name, cfg, args, true)
    }

    /// [`Gpu::launch_pdl`] with programmatic dependent launch chosen per call: `pdl = false`
    /// is a plain launch, ordered after all earlier work on the stream.
    ///
    /// # Safety
    /// As [`Gpu::launch_pdl`] (with `pdl = false`, only the argument contract).
    pub unsafe fn launch_args(
        &self,
        func: &CudaFunction,
        name: &str,
        cfg: LaunchConfig,
        args: KernelArgs<'_>,
        pdl: bool,
    ) -> Result<(), KernelError> {
        let mut args = args;
        let mut params: [*mut c_void; MAX_KERNEL_ARGS] = [std::ptr::null_mut(); MAX_KERNEL_ARGS];
        for (p, slot) in params.iter_mut().zip(args.slots.iter_mut()).take(args.len) {
            *p = slot as *mut u64 as *mut c_void;
        }
        let len = args.len;
        // SAFETY: forwarded from this function's contract; params point at args' slots.
        self.launch_ex(func, name, cfg, &mut params[..len], pdl)
    }

    /// [`Gpu::launch_pdl`] with the kernel parameter array given directly: `params[i]` points
    /// at the value of parameter `i` (for kernels that take a struct by value, which
    /// [`KernelArgs`]' 8-byte slots cannot hold).
    ///
    /// # Safety
    /// As [`Gpu::launch_pdl`]; every pointer must point at a value of exactly the size and
    /// layout of the kernel's parameter and stay valid for the call.
    pub unsafe fn launch_pdl_raw(
        &self,
        func: &CudaFunction,
        name: &str,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<(), KernelError> {
        self.launch_ex(func, name, cfg, params, true)
    }

    /// `cuLaunchKernelEx` with the programmatic-serialization attribute when `pdl`.
    ///
    /// # Safety
    /// As [`Gpu::launch_pdl_raw`].
    unsafe fn launch_ex(
        &self,
        func: &CudaFunction,
        name: &str,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
        pdl: bool,
    ) -> Result<(), KernelError> {
        let pdl = pdl && pdl_enabled();
        // SAFETY: a plain C union of integers and structs of integers; all zeros is valid.
        let mut value: CUlaunchAttributeValue = std::mem::zeroed();
        value.programmaticStreamSerializationAllowed = 1;
        let mut attr = CUlaunchAttribute {
            id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream().cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(pdl),
        };
        self.context()
            .bind_to_thread()
            .map_err(|e| KernelError::driver("binding the context for a PDL launch")(e))?;
        // SAFETY: config, attribute and the params array live across the call; params point
        // at args' slots (the caller vouches for their match with the kernel, see above).
        sys::cuLaunchKernelEx(
            &config,
            func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
        .map_err(|e| {
            let how = if pdl {
                " (programmatic dependent launch)"
            } else {
                ""
            };
            KernelError::driver(format!("launching {name}{how}"))(e)
        })
    }
}
