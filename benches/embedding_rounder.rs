//! Embedding rounder: exact cosine top-k (k = 64) of N predicted embeddings over the
//! embedding table, V = 65536, H in {2048, 4096} (the 1B and 7B widths), N in {1, 8, 64}.
//! GPU (feature `cuda`): `GpuEmbeddingRounder::knn_device` (both passes, CUDA events), GB/s
//! on the bf16 table bytes it streams, % of the device-to-device copy rate, against cuBLAS
//! bf16 GEMM of the scores alone (queries x table^T over the same device table, no top-k
//! selection, so the peer does less work) measured in the same run, and the speed-up over
//! the CPU KNN of the same shape from this run. CPU (always): `EmbeddingRounder::knn`
//! (rayon, f32 table), GB/s on the f32 table bytes.
//!
//! Run: `cargo bench --bench embedding_rounder` (add `--features cuda` for the GPU groups).

use std::sync::Mutex;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tritter::paradigm::rounder::EmbeddingRounder;
use tritter_suite::random_f32;

const V: usize = 65536;
const HS: &[usize] = &[2048, 4096];
const NS: &[usize] = &[1, 8, 64];
const K: usize = 64;

/// CPU medians `(H, N, ms)` of this run, quoted again next to the GPU figures.
static CPU_MS: Mutex<Vec<(usize, usize, f64)>> = Mutex::new(Vec::new());

/// The benchmark table `(V, H)`: deterministic values, normalized once by the rounder.
fn rounder(h: usize) -> EmbeddingRounder {
    EmbeddingRounder::from_table(&random_f32(V * h, 1), V, h).unwrap()
}

fn cpu(c: &mut Criterion) {
    println!(
        "{}",
        tritter_suite::build_info::header(&format!(
            "CPU ({} rayon threads)",
            rayon::current_num_threads()
        ))
    );
    for &h in HS {
        let r = rounder(h);
        let bytes = (V * h * 4) as f64;
        for &n in NS {
            let q = random_f32(n * h, 2);
            let t = tritter_suite::median_wall(1, 3, || {
                std::hint::black_box(r.knn(&q, n, K).unwrap());
            });
            let ms = t.as_secs_f64() * 1e3;
            println!(
                "RESULT embed_knn_cpu V={V} H={h} N={n} k={K}: {ms:.2} ms, {:.1} GB/s on the f32 table",
                bytes / t.as_secs_f64() / 1e9
            );
            CPU_MS.lock().unwrap().push((h, n, ms));
        }
        if h == HS[0] {
            let q = random_f32(h, 2);
            let mut group = c.benchmark_group("embed_knn_cpu");
            group
                .warm_up_time(Duration::from_millis(200))
                .measurement_time(Duration::from_secs(2))
                .sample_size(10)
                .throughput(Throughput::Bytes(bytes as u64));
            group.bench_function(BenchmarkId::new("knn_k64_N1", format!("{V}x{h}")), |b| {
                b.iter(|| r.knn(&q, 1, K).unwrap())
            });
            group.finish();
        }
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use cudarc::cublas::sys::cublasOperation_t;
    use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
    use half::bf16;
    use tritter::paradigm::rounder_cuda::{GpuEmbeddingRounder, KnnWorkspace};
    use tritter_kernels_cuda::testing::gpu_for_test;
    use tritter_kernels_cuda::Gpu;
    use tritter_suite::gpu_bench::{copy_bandwidth, print_vs_peer, time_batch, time_launches};

    /// cuBLAS bf16 scores `S = Q · Tᵀ` for row-major T (rows, ld), Q (n, ld), S (n, rows): in
    /// column-major terms Sᵀ (rows x n) = T (ld x rows col-major, transposed) · Qᵀ (ld x n).
    fn cublas_config(rows: usize, ld: usize, n: usize) -> GemmConfig<bf16> {
        GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: rows as i32,
            n: n as i32,
            k: ld as i32,
            alpha: bf16::ONE,
            lda: ld as i32,
            ldb: ld as i32,
            beta: bf16::ZERO,
            ldc: rows as i32,
        }
    }

    /// The table (256 or 512 MiB in bf16) is far larger than L2, so every launch streams it
    /// from HBM without rotating buffers; queries and outputs are a few KB.
    fn shape(
        c: &mut Criterion,
        gpu: &Gpu,
        blas: &CudaBlas,
        hbm: f64,
        dev: &GpuEmbeddingRounder,
        n: usize,
    ) {
        let stream = gpu.stream();
        let h = dev.hidden_size();
        let ld = dev.row_stride();
        let host_q = random_f32(n * h, 2);
        let q = stream.clone_htod(&host_q).unwrap();
        let mut ids = stream.alloc_zeros::<u32>(n * K).unwrap();
        let mut sims = stream.alloc_zeros::<f32>(n * K).unwrap();
        let mut ws = KnnWorkspace::new(dev, n, K).unwrap();
        let mut ours = |_: usize| {
            dev.knn_device(
                &q.as_view(),
                n,
                K,
                &mut ids.as_view_mut(),
                &mut sims.as_view_mut(),
                &mut ws,
            )
        };
        let t_ours = time_launches(gpu, 20, 20, &mut ours).unwrap();

        let qb: Vec<bf16> = host_q.iter().map(|&v| bf16::from_f32(v)).collect();
        let qb = stream.clone_htod(&qb).unwrap(); // ld == h for these widths
        let mut scores = stream.alloc_zeros::<bf16>(n * dev.rows()).unwrap();
        let cfg = cublas_config(dev.rows(), ld, n);
        let mut peer = |_: usize| {
            // SAFETY: the table is (rows, ld) bf16, qb is (n, ld) (ld == h here), scores is
            // (n, rows); cfg describes exactly them.
            unsafe { blas.gemm(cfg, dev.table(), &qb, &mut scores) }
        };
        let t_peer = time_launches(gpu, 20, 20, &mut peer).unwrap();

        let bytes = dev.table_bytes() as f64;
        let gbs = t_ours.gb_per_s(bytes);
        let label = format!("embed_knn V={V} H={h} N={n} k={K} (GB/s on the bf16 table)");
        print_vs_peer(
            &label,
            "GB/s",
            gbs,
            "cuBLAS bf16 scores GEMM, no top-k",
            t_peer.gb_per_s(bytes),
        );
        let cpu_ms = CPU_MS
            .lock()
            .unwrap()
            .iter()
            .find(|&&(ch, cn, _)| ch == h && cn == n)
            .map(|&(_, _, ms)| ms);
        let plan = dev.plan(n, K);
        println!(
            "RESULT embed_knn_detail V={V} H={h} N={n} k={K}: {:.2} us (min {:.2}), {gbs:.0} GB/s = {:.0}% of d2d copy {hbm:.0} GB/s | cuBLAS scores {:.2} us | {} | plan {} queries/block, {} chunks of {} rows",
            t_ours.median_ms * 1e3,
            t_ours.min_ms * 1e3,
            100.0 * gbs / hbm,
            t_peer.median_ms * 1e3,
            cpu_ms.map_or("CPU KNN not measured".to_owned(), |ms| format!(
                "CPU KNN {ms:.2} ms, speed-up {:.0}x",
                ms / t_ours.median_ms
            )),
            plan.queries_per_block,
            plan.num_chunks,
            plan.rows_per_chunk,
        );

        let mut group = c.benchmark_group(format!("embed_knn_gpu_N{n}"));
        group
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(600))
            .sample_size(10)
            .throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(BenchmarkId::new("knn_k64", format!("{V}x{h}")), |b| {
            b.iter_custom(|it| time_batch(gpu, it as usize, &mut ours).unwrap())
        });
        group.bench_function(
            BenchmarkId::new("cublas_scores_bf16", format!("{V}x{h}")),
            |b| b.iter_custom(|it| time_batch(gpu, it as usize, &mut peer).unwrap()),
        );
        group.finish();
    }

    pub fn benches(c: &mut Criterion) {
        let Some(gpu) = gpu_for_test("embedding_rounder GPU bench") else {
            return;
        };
        println!("{}", tritter_suite::gpu_bench::device_header(&gpu));
        let blas = CudaBlas::new(gpu.stream().clone())
            .expect("cuBLAS (libcublas) must load for the peer baseline");
        let hbm = copy_bandwidth(&gpu);
        for &h in HS {
            let dev = GpuEmbeddingRounder::new(&gpu, &rounder(h)).unwrap();
            for &n in NS {
                shape(c, &gpu, &blas, hbm, &dev, n);
            }
        }
    }
}

#[cfg(feature = "cuda")]
criterion_group!(benches, cpu, gpu::benches);
#[cfg(not(feature = "cuda"))]
criterion_group!(benches, cpu);
criterion_main!(benches);
