//! CUDA-event timing for criterion benches.
//!
//! Device work is asynchronous, so host clocks around a launch measure the launch, not the
//! kernel. These helpers record events on the stream around a batch of launches and read
//! the elapsed device time. Inputs are rotated among several buffer sets so that repeated
//! launches stream from HBM rather than from the 50 MB L2 of an H100.

use std::time::Duration;

use cudarc::driver::sys::CUevent_flags;
use tritter_kernels_cuda::{Gpu, KernelError};

/// Per-launch device time statistics over the timed samples, milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Median per-launch time.
    pub median_ms: f64,
    /// Fastest sample's per-launch time.
    pub min_ms: f64,
}

impl Timing {
    /// Achieved bandwidth for `bytes` moved per launch, GB/s (1e9 bytes).
    pub fn gb_per_s(&self, bytes: f64) -> f64 {
        bytes / (self.median_ms * 1e-3) / 1e9
    }

    /// Achieved rate for `ops` operations per launch, TOP/s (1e12).
    pub fn tops(&self, ops: f64) -> f64 {
        ops / (self.median_ms * 1e-3) / 1e12
    }
}

/// How many input sets to rotate among so their total is at least twice the L2 size
/// (at most 64 sets): each launch then reads its inputs from device memory.
pub fn rotation_sets(gpu: &Gpu, bytes_per_set: usize) -> usize {
    let l2 = gpu.info().l2_bytes as usize;
    (2 * l2).div_ceil(bytes_per_set.max(1)).clamp(1, 64)
}

/// Device time of `n` launches in a row, measured with two events on `gpu.stream()`.
/// `launch(i)` gets the running launch index (use `i % sets` to rotate inputs).
pub fn time_batch<E: std::fmt::Debug>(
    gpu: &Gpu,
    n: usize,
    mut launch: impl FnMut(usize) -> Result<(), E>,
) -> Result<Duration, KernelError> {
    let stream = gpu.stream();
    let start = stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(KernelError::driver("recording the start event"))?;
    for i in 0..n {
        launch(i).unwrap_or_else(|e| panic!("launch {i} failed during timing: {e:?}"));
    }
    let end = stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(KernelError::driver("recording the end event"))?;
    end.synchronize()
        .map_err(KernelError::driver("waiting for the end event"))?;
    let ms = start
        .elapsed_ms(&end)
        .map_err(KernelError::driver("reading event time"))?;
    Ok(Duration::from_secs_f64(f64::from(ms) * 1e-3))
}

/// Warm-up (module load, clocks), then `samples` batches of `batch` launches; per-launch stats.
pub fn time_launches<E: std::fmt::Debug>(
    gpu: &Gpu,
    samples: usize,
    batch: usize,
    mut launch: impl FnMut(usize) -> Result<(), E>,
) -> Result<Timing, KernelError> {
    time_batch(gpu, batch.max(10), &mut launch)?;
    let mut per_launch: Vec<f64> = (0..samples.max(1))
        .map(|_| time_batch(gpu, batch, &mut launch).map(|d| d.as_secs_f64() * 1e3 / batch as f64))
        .collect::<Result<_, _>>()?;
    per_launch.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: per_launch[per_launch.len() / 2],
        min_ms: per_launch[0],
    })
}

/// Device-to-device copy bandwidth of 1 GiB, GB/s counting bytes read + written: the
/// practical HBM ceiling every GPU bench prints its "% of copy" against.
pub fn copy_bandwidth(gpu: &Gpu) -> f64 {
    let bytes = 1usize << 30;
    let stream = gpu.stream();
    let src = stream
        .alloc_zeros::<u8>(bytes)
        .expect("1 GiB for the copy test");
    let mut dst = stream
        .alloc_zeros::<u8>(bytes)
        .expect("1 GiB for the copy test");
    time_launches(gpu, 5, 5, |_| stream.memcpy_dtod(&src, &mut dst))
        .expect("timing the device-to-device copy")
        .gb_per_s(2.0 * bytes as f64)
}

/// Like [`time_launches`], but the `batch` launches are captured once into a CUDA graph
/// and the graph is replayed: device time without the host's per-launch cost, which is how a
/// decode step runs in an engine. `launch(i)` is called `batch` times during capture only.
pub fn time_graph<E: std::fmt::Debug>(
    gpu: &Gpu,
    samples: usize,
    batch: usize,
    mut launch: impl FnMut(usize) -> Result<(), E>,
) -> Result<Timing, String> {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let stream = gpu.stream();
    launch(0).map_err(|e| format!("warm-up launch: {e:?}"))?; // module load outside capture
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| format!("begin capture: {e}"))?;
    let mut captured = Ok(());
    for i in 0..batch {
        if let Err(e) = launch(i) {
            captured = Err(format!("launch {i} during capture: {e:?}"));
            break;
        }
    }
    // Always end the capture, so the stream is usable afterwards whatever happened.
    let graph = stream.end_capture(CUgraphInstantiate_flags(0));
    captured?;
    let graph = graph
        .map_err(|e| format!("instantiate graph: {e}"))?
        .ok_or("capture recorded no work")?;
    let per_graph =
        time_launches(gpu, samples, 3, |_| graph.launch()).map_err(|e| e.to_string())?;
    Ok(Timing {
        median_ms: per_graph.median_ms / batch as f64,
        min_ms: per_graph.min_ms / batch as f64,
    })
}

/// The report header naming this GPU (name, compute capability, SM count) and the build.
pub fn device_header(gpu: &Gpu) -> String {
    let info = gpu.info();
    crate::build_info::header(&format!(
        "{} (sm_{}{}, {} SMs)",
        info.name, info.compute_capability.0, info.compute_capability.1, info.sm_count
    ))
}

/// Prints one comparison line: our figure, the peer's from the same run, and the ratio.
pub fn print_vs_peer(label: &str, unit: &str, ours: f64, peer_name: &str, peer: f64) {
    println!(
        "RESULT {label}: {ours:.1} {unit} | {peer_name}: {peer:.1} {unit} | ratio {:.2}x",
        ours / peer
    );
}
