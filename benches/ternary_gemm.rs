//! Ternary W2A8 products. CPU: the AVX2/rayon kernel against an f32 GEMV/GEMM of the same
//! shape by the `gemm` crate (what candle uses), both measured in this run; GB/s counts the
//! weight bytes each side streams (2-bit packed vs f32).
//!
//! Run: `cargo bench --bench ternary_gemm` (add `--features cuda` for the GPU groups).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ternary_gemm::{absmax_quantize_rows, absmean_quantize, ternary_matmul_a8_acc, CpuKernel, ScaleGranularity};
use tritter_suite::random_f32;

/// (n_out, k_in): 3B and 7B hidden projections, and the 7B MLP up/down pair.
const CPU_SHAPES: &[(usize, usize)] = &[(2560, 2560), (4096, 4096), (16384, 4096), (4096, 16384)];
/// Activation rows: decode (1) and a small decode batch.
const CPU_MS: &[usize] = &[1, 16];

fn f32_gemm(y: &mut [f32], x: &[f32], w: &[f32], m: usize, n: usize, k: usize) {
    // SAFETY: y is (m, n), x is (m, k), w is (n, k) row-major (read as its transpose), all
    // lengths match, and the strides below describe exactly those layouts.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

/// Median wall time of `f` over `reps` runs after 3 warm-ups.
fn median(reps: usize, mut f: impl FnMut()) -> Duration {
    for _ in 0..3 {
        f();
    }
    let mut t: Vec<Duration> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[reps / 2]
}

fn cpu(c: &mut Criterion) {
    println!("{}", tritter_suite::build_info::header(&format!("CPU ({} threads)", rayon::current_num_threads())));
    println!("CPU kernel: {}", if CpuKernel::avx2_available() { "AVX2" } else { "scalar" });
    for &(n, k) in CPU_SHAPES {
        let wf = random_f32(n * k, 3);
        let w = absmean_quantize(&wf, n, k, ScaleGranularity::PerTensor).unwrap();
        for &m in CPU_MS {
            let x = random_f32(m * k, 5);
            let xq = absmax_quantize_rows(&x, m, k).unwrap();
            let mut y = vec![0f32; m * n];
            let ours = median(15, || {
                std::hint::black_box(ternary_matmul_a8_acc(&w, &xq.codes, m, CpuKernel::Auto).unwrap());
            });
            let peer = median(15, || f32_gemm(&mut y, &x, &wf, m, n, k));
            println!(
                "RESULT ternary_a8_cpu M={m} {n}x{k}: {:.3} ms ({:.1} GB/s packed) | gemm f32: {:.3} ms ({:.1} GB/s) | speed-up {:.2}x",
                ours.as_secs_f64() * 1e3,
                w.packed_bytes() as f64 / ours.as_secs_f64() / 1e9,
                peer.as_secs_f64() * 1e3,
                (4 * n * k) as f64 / peer.as_secs_f64() / 1e9,
                peer.as_secs_f64() / ours.as_secs_f64()
            );

            let mut group = c.benchmark_group(format!("ternary_cpu_M{m}"));
            group.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1)).sample_size(10);
            group.throughput(Throughput::Bytes(w.packed_bytes() as u64));
            group.bench_function(BenchmarkId::new("w2a8", format!("{n}x{k}")), |b| {
                b.iter(|| ternary_matmul_a8_acc(&w, &xq.codes, m, CpuKernel::Auto).unwrap())
            });
            group.throughput(Throughput::Bytes((4 * n * k) as u64));
            group.bench_function(BenchmarkId::new("gemm_f32", format!("{n}x{k}")), |b| {
                b.iter(|| f32_gemm(&mut y, &x, &wf, m, n, k))
            });
            group.finish();
        }
    }
}

criterion_group!(benches, cpu);
criterion_main!(benches);
