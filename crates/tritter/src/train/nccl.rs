//! NCCL, opened at run time (feature `cuda`): the collectives of data-parallel training.
//!
//! Why not cudarc's `nccl` module: it opens the library under the CUDA-style names
//! (`libnccl.so`, `libnccl.so.13`, ...) but NCCL ships as `libnccl.so.2` (the
//! `nvidia-nccl-cu12`/`nvidia-nccl-cu13` wheels, the NGC containers, the distro packages), and
//! it panics where we return errors (a missing library, an abort that fails on drop). The
//! handful of entry points used here are bound by hand, with the same `libloading` that
//! probes libcuda.
//!
//! Where libnccl comes from: `TRITTER_NCCL_LIB` (a path), else `libnccl.so.2` / `libnccl.so`
//! on the loader path. On a machine with PyTorch, `pip install nvidia-nccl-cu13` (or the copy
//! torch brought) puts it in `site-packages/nvidia/nccl/lib/`; point `TRITTER_NCCL_LIB` there
//! or add that directory to `LD_LIBRARY_PATH`.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use tritter_kernels_cuda::{Gpu, KernelError};

use super::dist::{Group, UNIQUE_ID_BYTES};
use crate::{Result, TritterError};

type NcclResult = c_int;
type RawComm = *mut c_void;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; UNIQUE_ID_BYTES],
}

// ncclDataType_t / ncclRedOp_t values (nccl.h, stable since NCCL 2.0).
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_SUM: c_int = 0;
const NCCL_IN_PROGRESS: NcclResult = 7;

type Collective = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    RawComm,
    CUstream,
) -> NcclResult;

struct Api {
    _lib: libloading::Library,
    path: String,
    version: c_int,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> NcclResult,
    all_reduce: Collective,
    reduce_scatter: Collective,
    all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        RawComm,
        CUstream,
    ) -> NcclResult,
    broadcast: Collective,
    abort: unsafe extern "C" fn(RawComm) -> NcclResult,
    destroy: unsafe extern "C" fn(RawComm) -> NcclResult,
    async_error: unsafe extern "C" fn(RawComm, *mut NcclResult) -> NcclResult,
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

fn open() -> std::result::Result<Api, String> {
    let mut names: Vec<String> = Vec::new();
    if let Some(p) = std::env::var("TRITTER_NCCL_LIB")
        .ok()
        .filter(|p| !p.is_empty())
    {
        names.push(p);
    }
    names.extend(["libnccl.so.2".to_string(), "libnccl.so".to_string()]);
    let mut tried = Vec::new();
    for name in &names {
        // SAFETY: loading libnccl runs only its own initialisers; the handle lives in the
        // process-wide `Api` as long as the function pointers taken from it.
        let lib = match unsafe { libloading::Library::new(name) } {
            Ok(l) => l,
            Err(e) => {
                tried.push(format!("{name} ({e})"));
                continue;
            }
        };
        macro_rules! sym {
            ($n:literal) => {
                // SAFETY: the symbol is declared with its nccl.h signature (the field type).
                *unsafe { lib.get($n) }
                    .map_err(|e| format!("{name} lacks {}: {e}", String::from_utf8_lossy($n)))?
            };
        }
        let get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult = sym!(b"ncclGetVersion");
        let mut version = 0;
        // SAFETY: ncclGetVersion writes one int.
        unsafe { get_version(&mut version) };
        let api = Api {
            path: name.clone(),
            version,
            get_unique_id: sym!(b"ncclGetUniqueId"),
            init_rank: sym!(b"ncclCommInitRank"),
            all_reduce: sym!(b"ncclAllReduce"),
            reduce_scatter: sym!(b"ncclReduceScatter"),
            all_gather: sym!(b"ncclAllGather"),
            broadcast: sym!(b"ncclBroadcast"),
            abort: sym!(b"ncclCommAbort"),
            destroy: sym!(b"ncclCommDestroy"),
            async_error: sym!(b"ncclCommGetAsyncError"),
            error_string: sym!(b"ncclGetErrorString"),
            _lib: lib,
        };
        return Ok(api);
    }
    Err(format!(
        "libnccl could not be opened (tried {}); install it (e.g. pip install nvidia-nccl-cu13) \
         and set TRITTER_NCCL_LIB to .../nvidia/nccl/lib/libnccl.so.2 or add its directory to \
         LD_LIBRARY_PATH",
        tried.join(", ")
    ))
}

fn api(rank: usize) -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(open)
        .as_ref()
        .map_err(|e| TritterError::Distributed {
            rank,
            detail: e.clone(),
        })
}

/// The NCCL library in use: its path and version (e.g. 22703 for 2.27.3), or why none opens.
pub fn nccl_version() -> Result<(String, i32)> {
    let a = api(0)?;
    Ok((a.path.clone(), a.version))
}

fn check(rank: usize, what: &str, r: NcclResult) -> Result<()> {
    if r == 0 {
        return Ok(());
    }
    let msg = api(rank)
        .ok()
        .map(|a| {
            // SAFETY: ncclGetErrorString returns a static NUL-terminated string.
            let p = unsafe { (a.error_string)(r) };
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: non-null, NUL-terminated, static.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        })
        .unwrap_or_default();
    Err(TritterError::Distributed {
        rank,
        detail: format!("NCCL {what} returned {r} ({msg})"),
    })
}

/// A fresh NCCL unique id (rank 0 makes it; the rendezvous hands it to the others).
pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
    let a = api(0)?;
    let mut id = UniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    // SAFETY: ncclGetUniqueId writes one ncclUniqueId.
    check(0, "ncclGetUniqueId", unsafe { (a.get_unique_id)(&mut id) })?;
    Ok(id.internal.map(|c| c as u8))
}

/// `ncclCommInitRank` on the calling thread, whose CUDA context must be current.
fn init_bound(rank: usize, world_size: usize, id: &[u8; UNIQUE_ID_BYTES]) -> Result<NcclComm> {
    let a = api(rank)?;
    let uid = UniqueId {
        internal: id.map(|b| b as c_char),
    };
    let mut comm: RawComm = std::ptr::null_mut();
    let (w, r) = (
        c_int::try_from(world_size).unwrap_or(c_int::MAX),
        c_int::try_from(rank).unwrap_or(c_int::MAX),
    );
    // SAFETY: ncclCommInitRank writes one communicator handle; the context of the
    // device is current on this thread.
    check(rank, "ncclCommInitRank", unsafe {
        (a.init_rank)(&mut comm, w, uid, r)
    })?;
    Ok(NcclComm {
        comm,
        rank,
        world_size,
        aborted: AtomicBool::new(false),
    })
}

/// Element types the collectives move.
///
/// # Safety
/// `TYPE` must be the `ncclDataType_t` whose element size is `size_of::<Self>()`: NCCL
/// reads and writes `count x` that size, so a wrong value writes out of bounds.
pub unsafe trait NcclElem: cudarc::driver::DeviceRepr {
    /// The `ncclDataType_t` value.
    const TYPE: c_int;
}
// SAFETY: ncclFloat32 is 4 bytes.
unsafe impl NcclElem for f32 {
    const TYPE: c_int = NCCL_FLOAT32;
}
// SAFETY: ncclFloat64 is 8 bytes.
unsafe impl NcclElem for f64 {
    const TYPE: c_int = NCCL_FLOAT64;
}

/// One rank's NCCL communicator. Collectives are queued on the stream given to each call
/// (stream-ordered like kernels); [`wait`](Self::wait) is the one blocking point, and it
/// aborts the communicator instead of hanging when a peer dies or stalls.
pub struct NcclComm {
    comm: RawComm,
    rank: usize,
    world_size: usize,
    aborted: AtomicBool,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; `NcclComm`
// is not `Sync`, so its calls never overlap.
unsafe impl Send for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish_non_exhaustive()
    }
}

impl NcclComm {
    /// Rank `rank` of `world_size` on `gpu`'s device, joining the group of `id`. Every rank
    /// must call it (it blocks until all have): run it right after the rendezvous, which
    /// has already made sure every rank is alive.
    pub fn init(
        gpu: &Gpu,
        rank: usize,
        world_size: usize,
        id: &[u8; UNIQUE_ID_BYTES],
    ) -> Result<Self> {
        gpu.context()
            .bind_to_thread()
            .map_err(KernelError::driver("binding the CUDA context for NCCL"))?;
        init_bound(rank, world_size, id)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the communicator.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Runs collective `what` in place on `buf[range]`: `call` gets the API and the range's
    /// device address. The range is checked first; cudarc's write guard on `buf` lives
    /// across the call, so a context with event tracking orders other streams after it.
    fn in_place<T: NcclElem>(
        &self,
        what: &str,
        buf: &mut CudaSlice<T>,
        range: std::ops::Range<usize>,
        stream: &CudaStream,
        call: impl FnOnce(&Api, *mut c_void) -> NcclResult,
    ) -> Result<()> {
        if self.aborted.load(Ordering::Acquire) {
            return Err(TritterError::Distributed {
                rank: self.rank,
                detail: format!("{what} on a communicator aborted after an earlier failure"),
            });
        }
        let a = api(self.rank)?;
        if range.start > range.end || range.end > buf.len() {
            return Err(TritterError::InvalidArgument {
                what: "collective range",
                actual: format!("{range:?}"),
                expected: format!("within the buffer's {} elements", buf.len()),
            });
        }
        let (p, guard) = buf.device_ptr_mut(stream);
        let base = (p as usize + range.start * std::mem::size_of::<T>()) as *mut c_void;
        let r = call(a, base);
        drop(guard);
        check(self.rank, what, r)
    }

    /// [`in_place`](Self::in_place) over `buf[..chunk * world]`; `call` also gets the address
    /// of this rank's chunk.
    fn chunked<T: NcclElem>(
        &self,
        what: &str,
        buf: &mut CudaSlice<T>,
        chunk: usize,
        stream: &CudaStream,
        call: impl FnOnce(&Api, *mut c_void, *mut c_void) -> NcclResult,
    ) -> Result<()> {
        let own = self.rank * chunk * std::mem::size_of::<T>();
        let range = 0..chunk * self.world_size;
        self.in_place(what, buf, range, stream, |a, all| {
            call(a, all, (all as usize + own) as *mut c_void)
        })
    }

    /// Sums `buf[range]` over all ranks, in place, queued on `stream`.
    pub fn all_reduce_sum<T: NcclElem>(
        &self,
        buf: &mut CudaSlice<T>,
        range: std::ops::Range<usize>,
        stream: &CudaStream,
    ) -> Result<()> {
        let (n, cs) = (range.len(), stream.cu_stream());
        self.in_place("ncclAllReduce", buf, range, stream, |a, p| {
            // SAFETY: in-place all-reduce of the checked range, on a stream of this
            // communicator's device.
            unsafe { (a.all_reduce)(p, p, n, T::TYPE, NCCL_SUM, self.comm, cs) }
        })
    }

    /// In-place reduce-scatter of `buf[..chunk * world]`: afterwards this rank's chunk
    /// `buf[rank * chunk..(rank + 1) * chunk]` holds the sum over ranks of that chunk.
    pub fn reduce_scatter_sum<T: NcclElem>(
        &self,
        buf: &mut CudaSlice<T>,
        chunk: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        let cs = stream.cu_stream();
        self.chunked("ncclReduceScatter", buf, chunk, stream, |a, all, mine| {
            // SAFETY: NCCL's in-place form (recvbuff = sendbuff + rank * recvcount) over the
            // checked chunk * world elements.
            unsafe { (a.reduce_scatter)(all, mine, chunk, T::TYPE, NCCL_SUM, self.comm, cs) }
        })
    }

    /// In-place all-gather of `buf[..chunk * world]`: every rank's chunk (at
    /// `rank * chunk`) is copied to all ranks.
    pub fn all_gather<T: NcclElem>(
        &self,
        buf: &mut CudaSlice<T>,
        chunk: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        let cs = stream.cu_stream();
        self.chunked("ncclAllGather", buf, chunk, stream, |a, all, mine| {
            // SAFETY: NCCL's in-place form (sendbuff = recvbuff + rank * sendcount) over the
            // checked chunk * world elements.
            unsafe { (a.all_gather)(mine, all, chunk, T::TYPE, self.comm, cs) }
        })
    }

    /// Copies rank 0's `buf[range]` to every rank, in place.
    pub fn broadcast_from_rank0<T: NcclElem>(
        &self,
        buf: &mut CudaSlice<T>,
        range: std::ops::Range<usize>,
        stream: &CudaStream,
    ) -> Result<()> {
        let (n, cs) = (range.len(), stream.cu_stream());
        self.in_place("ncclBroadcast", buf, range, stream, |a, p| {
            // SAFETY: in-place broadcast (root 0) of the checked range; the "op" slot of the
            // shared signature is ncclBroadcast's `root` argument.
            unsafe { (a.broadcast)(p, p, n, T::TYPE, 0, self.comm, cs) }
        })
    }

    /// The communicator's asynchronous error (a peer's network failure), if any.
    fn async_error(&self) -> Option<String> {
        let a = api(self.rank).ok()?;
        let mut r: NcclResult = 0;
        // SAFETY: writes one ncclResult_t.
        let q = unsafe { (a.async_error)(self.comm, &mut r) };
        if q != 0 {
            return Some(format!("ncclCommGetAsyncError returned {q}"));
        }
        (r != 0 && r != NCCL_IN_PROGRESS).then(|| format!("NCCL asynchronous error {r}"))
    }

    /// Ends a communicator whose collectives have all completed (after a [`wait`](Self::wait)):
    /// `ncclCommDestroy` flushes and frees it, so a peer still finishing its side of the
    /// last collective is not cut off (as `abort` would).
    pub fn finish(self) -> Result<()> {
        if self.aborted.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let a = api(self.rank)?;
        // SAFETY: a live communicator, destroyed once (the flag stops Drop's abort).
        check(self.rank, "ncclCommDestroy", unsafe {
            (a.destroy)(self.comm)
        })
    }

    /// Aborts the communicator: unblocks every queued collective (they will not complete).
    pub fn abort(&self) {
        if !self.aborted.swap(true, Ordering::AcqRel) {
            if let Ok(a) = api(self.rank) {
                // SAFETY: a live communicator, aborted once.
                unsafe { (a.abort)(self.comm) };
            }
        }
    }

    /// Blocks until everything queued on `stream` so far has finished, watching the peers:
    /// when one dies (`group` reports it), NCCL reports an error, or `group.timeout()`
    /// passes, the communicator is aborted and the error names what happened, so a failed
    /// rank never leaves the others hanging.
    pub fn wait(&self, stream: &CudaStream, group: &Group, what: &str) -> Result<()> {
        let ev = stream
            .record_event(None)
            .map_err(KernelError::driver("recording a wait event"))?;
        let start = Instant::now();
        let mut nap = Duration::from_micros(20);
        loop {
            if ev
                .try_is_complete()
                .map_err(KernelError::driver("querying a wait event"))?
            {
                return Ok(());
            }
            let failure = if let Err(e) = group.check() {
                Some(e.to_string())
            } else if let Some(e) = self.async_error() {
                Some(e)
            } else if start.elapsed() > group.timeout() {
                Some(format!(
                    "waited {:.0} s for the other ranks (TRITTER_DIST_TIMEOUT); one is stuck or gone",
                    group.timeout().as_secs_f64()
                ))
            } else {
                None
            };
            if let Some(why) = failure {
                // Close the links first: NCCL's abort may wait for the peers' proxies, and
                // they learn of this failure from the closed links.
                group.close();
                self.abort();
                return Err(TritterError::Distributed {
                    rank: self.rank,
                    detail: format!("{what}: {why}; the NCCL communicator was aborted"),
                });
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(2));
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.abort();
    }
}

/// One rank's place in a data-parallel training group: the liveness [`Group`] from the
/// rendezvous, the NCCL communicator, and whether AdamW state is sharded (ZeRO-1). Hand it
/// to `GpuTrainModel::enable_data_parallel` (or `Trainer::use_gpu_data_parallel`).
#[derive(Debug)]
pub struct DataParallel {
    pub(crate) group: Group,
    pub(crate) comm: NcclComm,
    pub(crate) zero1: bool,
}

impl DataParallel {
    /// Joins the group of `env` on `gpu` (the device of `env.local_rank`): rendezvous (rank
    /// 0 checks every rank's `fingerprint`, see [`rendezvous`](super::dist::rendezvous)),
    /// then the NCCL communicator. `zero1` shards the AdamW moments across ranks. Fails
    /// within `env.timeout` when a rank is missing, mismatched or libnccl does not open.
    pub fn connect(
        gpu: &Gpu,
        env: &super::dist::DistEnv,
        fingerprint: u64,
        zero1: bool,
    ) -> Result<Self> {
        // Every rank opens libnccl before the rendezvous: a rank without it fails there and
        // its closed link stops the others, instead of leaving them in ncclCommInitRank.
        api(env.rank)?;
        // Ranks that disagree on ZeRO-1 would run different collectives: part of the check.
        let fingerprint = fingerprint.rotate_left(1) ^ u64::from(zero1);
        let (group, id) = super::dist::rendezvous(env, fingerprint, unique_id)?;
        // ncclCommInitRank blocks until every rank calls it; all were alive a moment ago,
        // but one may die in between, so it runs on a helper thread and the wait is bounded.
        let (tx, rx) = std::sync::mpsc::channel();
        let (rank, world) = (env.rank, env.world_size);
        let ctx = gpu.context().clone();
        std::thread::Builder::new()
            .name("tritter-nccl-init".into())
            .spawn(move || {
                let r = (|| -> Result<NcclComm> {
                    ctx.bind_to_thread()
                        .map_err(KernelError::driver("binding the CUDA context for NCCL"))?;
                    init_bound(rank, world, &id)
                })();
                let _ = tx.send(r);
            })
            .map_err(|e| TritterError::Distributed {
                rank,
                detail: format!("starting the NCCL init thread: {e}"),
            })?;
        let start = Instant::now();
        let comm = loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(r) => break r?,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    group.check()?;
                    if start.elapsed() > group.timeout() {
                        return Err(TritterError::Distributed {
                            rank,
                            detail: format!(
                                "ncclCommInitRank did not finish within {:.0} s: a rank is stuck or gone",
                                group.timeout().as_secs_f64()
                            ),
                        });
                    }
                }
                Err(e) => {
                    return Err(TritterError::Distributed {
                        rank,
                        detail: format!("the NCCL init thread stopped: {e}"),
                    })
                }
            }
        };
        Ok(DataParallel { group, comm, zero1 })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Whether the AdamW moments are sharded (ZeRO-1).
    pub fn zero1(&self) -> bool {
        self.zero1
    }

    /// Ends this rank normally, once its last collective has completed: the communicator
    /// is destroyed (not aborted) and the peers' watch does not count the exit as a failure.
    pub fn finish(self) -> Result<()> {
        let DataParallel { group, comm, .. } = self;
        let r = comm.finish();
        group.finish();
        r
    }
}
