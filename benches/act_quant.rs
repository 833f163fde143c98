//! Per-token absmax int8 activation quantization: CPU (rayon) and CUDA, reported in GB/s of
//! activation bytes read plus code bytes written. The GPU figure is printed beside a
//! device-to-device copy that moves the same number of bytes in the same run (the memory
//! ceiling this memory-bound kernel is judged against).
//!
//! Run: `cargo bench --bench act_quant` (CPU) or with `--features cuda` (adds the GPU).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use ternary_gemm::{absmax_quantize_rows, Element};
use tritter_suite::random_f32;

/// (M, K): decode (M = 1), a decode batch, prefill chunks at the 3B/7B hidden sizes.
const CPU_SHAPES: &[(usize, usize)] = &[(1, 4096), (64, 4096), (512, 2560)];

fn bytes_moved<T>(m: usize, k: usize) -> u64 {
    (m * k * (std::mem::size_of::<T>() + 1) + 4 * m) as u64
}

fn cpu<T: Element>(c: &mut Criterion, convert: fn(f32) -> T) {
    let mut group = c.benchmark_group(format!("act_quant_cpu_{}", T::NAME));
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    for &(m, k) in CPU_SHAPES {
        let x: Vec<T> = random_f32(m * k, 7).into_iter().map(convert).collect();
        group.throughput(Throughput::Bytes(bytes_moved::<T>(m, k)));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{m}x{k}")),
            &x,
            |b, x| b.iter(|| absmax_quantize_rows(x, m, k).unwrap()),
        );
    }
    group.finish();
}

fn cpu_benches(c: &mut Criterion) {
    println!("{}", tritter_suite::build_info::header("CPU"));
    cpu::<f32>(c, |v| v);
    cpu::<bf16>(c, bf16::from_f32);
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use cudarc::driver::CudaSlice;
    use ternary_gemm::cuda::{absmax_quantize_rows_into, DeviceActivation};
    use tritter_kernels_cuda::testing::gpu_for_test;
    use tritter_suite::gpu_bench::{print_vs_peer, rotation_sets, time_batch, time_launches};

    /// Decode, decode batch, and prefill / training shapes (7B hidden 4096, 3B hidden 2560).
    const GPU_SHAPES: &[(usize, usize)] = &[
        (1, 4096),
        (64, 4096),
        (4096, 4096),
        (16384, 4096),
        (8192, 2560),
    ];

    struct Set<T> {
        x: CudaSlice<T>,
        codes: CudaSlice<i8>,
        scales: CudaSlice<f32>,
        flag: CudaSlice<u32>,
    }

    fn shape<T: DeviceActivation>(
        c: &mut Criterion,
        gpu: &tritter_kernels_cuda::Gpu,
        m: usize,
        k: usize,
        convert: fn(f32) -> T,
    ) {
        let stream = gpu.stream();
        let bytes = bytes_moved::<T>(m, k);
        let nsets = rotation_sets(gpu, bytes as usize);
        let mut sets: Vec<Set<T>> = (0..nsets)
            .map(|s| {
                let host: Vec<T> = random_f32(m * k, 11 + s as u64)
                    .into_iter()
                    .map(convert)
                    .collect();
                Set {
                    x: stream.clone_htod(&host).unwrap(),
                    codes: stream.alloc_zeros(m * k).unwrap(),
                    scales: stream.alloc_zeros(m).unwrap(),
                    flag: stream.alloc_zeros(1).unwrap(),
                }
            })
            .collect();
        let mut run = |i: usize| {
            let s = &mut sets[i % nsets];
            absmax_quantize_rows_into(
                gpu,
                &s.x.as_view(),
                m,
                k,
                &mut s.codes.as_view_mut(),
                &mut s.scales.as_view_mut(),
                &mut s.flag.as_view_mut(),
            )
        };

        // Peer: a device-to-device copy moving the same bytes (half read, half written).
        let copy_len = (bytes as usize / 2).max(1);
        let peer_src: Vec<CudaSlice<u8>> = (0..nsets)
            .map(|_| stream.alloc_zeros(copy_len).unwrap())
            .collect();
        let mut peer_dst: Vec<CudaSlice<u8>> = (0..nsets)
            .map(|_| stream.alloc_zeros(copy_len).unwrap())
            .collect();
        let mut copy =
            |i: usize| stream.memcpy_dtod(&peer_src[i % nsets], &mut peer_dst[i % nsets]);

        let ours = time_launches(gpu, 15, 50, &mut run).unwrap();
        let peer = time_launches(gpu, 15, 50, &mut copy).unwrap();
        print_vs_peer(
            &format!("act_quant_{} {m}x{k} ({:.3} ms)", T::NAME, ours.median_ms),
            "GB/s",
            ours.gb_per_s(bytes as f64),
            "d2d copy of the same bytes",
            peer.gb_per_s(bytes as f64),
        );

        let mut group = c.benchmark_group(format!("act_quant_gpu_{}", T::NAME));
        group
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20);
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(BenchmarkId::new("ours", format!("{m}x{k}")), |b| {
            b.iter_custom(|iters| time_batch(gpu, iters as usize, &mut run).unwrap())
        });
        group.bench_function(BenchmarkId::new("d2d_copy", format!("{m}x{k}")), |b| {
            b.iter_custom(|iters| time_batch(gpu, iters as usize, &mut copy).unwrap())
        });
        group.finish();
    }

    pub fn benches(c: &mut Criterion) {
        let Some(gpu) = gpu_for_test("act_quant GPU bench") else {
            return;
        };
        println!("{}", tritter_suite::gpu_bench::device_header(&gpu));
        for &(m, k) in GPU_SHAPES {
            shape::<bf16>(c, &gpu, m, k, bf16::from_f32);
            shape::<f32>(c, &gpu, m, k, |v| v);
        }
    }
}

#[cfg(feature = "cuda")]
criterion_group!(benches, cpu_benches, gpu::benches);
#[cfg(not(feature = "cuda"))]
criterion_group!(benches, cpu_benches);
criterion_main!(benches);
