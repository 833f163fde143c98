//! Ternary W2A8 products. CPU: the AVX2/rayon kernel against an f32 GEMV/GEMM of the same
//! shape by the `gemm` crate (what candle uses), both measured in this run; GB/s counts the
//! weight bytes each side streams (2-bit packed vs f32).
//!
//! Run: `cargo bench --bench ternary_gemm` (add `--features cuda` for the GPU groups).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ternary_gemm::{
    absmax_quantize_rows, absmean_quantize, ternary_matmul_a8_acc, CpuKernel, ScaleGranularity,
};
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

fn cpu(c: &mut Criterion) {
    println!(
        "{}",
        tritter_suite::build_info::header(&format!(
            "CPU ({} threads)",
            rayon::current_num_threads()
        ))
    );
    println!(
        "CPU kernel: {}",
        if CpuKernel::avx2_available() {
            "AVX2"
        } else {
            "scalar"
        }
    );
    for &(n, k) in CPU_SHAPES {
        let wf = random_f32(n * k, 3);
        let w = absmean_quantize(&wf, n, k, ScaleGranularity::PerTensor).unwrap();
        for &m in CPU_MS {
            let x = random_f32(m * k, 5);
            let xq = absmax_quantize_rows(&x, m, k).unwrap();
            let mut y = vec![0f32; m * n];
            let ours = tritter_suite::median_wall(3, 15, || {
                std::hint::black_box(
                    ternary_matmul_a8_acc(&w, &xq.codes, m, CpuKernel::Auto).unwrap(),
                );
            });
            let peer = tritter_suite::median_wall(3, 15, || f32_gemm(&mut y, &x, &wf, m, n, k));
            println!(
                "RESULT ternary_a8_cpu M={m} {n}x{k}: {:.3} ms ({:.1} GB/s packed) | gemm f32: {:.3} ms ({:.1} GB/s) | speed-up {:.2}x",
                ours.as_secs_f64() * 1e3,
                w.packed_bytes() as f64 / ours.as_secs_f64() / 1e9,
                peer.as_secs_f64() * 1e3,
                (4 * n * k) as f64 / peer.as_secs_f64() / 1e9,
                peer.as_secs_f64() / ours.as_secs_f64()
            );

            let mut group = c.benchmark_group(format!("ternary_cpu_M{m}"));
            group
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(1))
                .sample_size(10);
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

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use cudarc::cublas::sys::cublasOperation_t;
    use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
    use cudarc::driver::CudaSlice;
    use half::bf16;
    use ternary_gemm::cuda::{
        ternary_matmul_a8_cuda, ternary_matmul_t_cuda, ternary_mlp_cuda, GemvActivations,
        GemvWorkspace, MlpWorkspace, TernaryMatrixGpu, TernaryMlpGpu,
    };
    use ternary_gemm::TernaryMlp;
    use tritter_kernels_cuda::testing::gpu_for_test;
    use tritter_kernels_cuda::Gpu;
    use tritter_suite::gpu_bench::{
        copy_bandwidth, rotation_sets, time_batch, time_graph, time_launches, Timing,
    };

    /// (n_out, k_in): 3B (hidden 2560) and 7B (hidden 4096) projections, the 16384x4096 /
    /// 4096x16384 MLP pair, and 32768x16384 (134 MB packed) where fixed launch and latency
    /// costs no longer hide the streaming rate; decode M = 1 and batches of 8 and 32.
    const SHAPES: &[(usize, usize)] = &[
        (2560, 2560),
        (4096, 4096),
        (16384, 4096),
        (4096, 16384),
        (32768, 16384),
    ];
    const MS: &[usize] = &[1, 8, 32];

    struct Ours {
        w: TernaryMatrixGpu,
        x: CudaSlice<bf16>,
        acts: GemvActivations,
        y: CudaSlice<f32>,
        ws: GemvWorkspace,
    }

    struct Peer {
        w: CudaSlice<bf16>,
        x: CudaSlice<bf16>,
        y: CudaSlice<bf16>,
    }

    /// cuBLAS bf16 `y = x · Wᵀ` for row-major W (n, k), x (m, k), y (m, n): in column-major
    /// terms y^T (n x m) = W (k x n col-major, transposed) · x^T (k x m).
    fn cublas_config(n: usize, k: usize, m: usize) -> GemmConfig<bf16> {
        GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: bf16::ONE,
            lda: k as i32,
            ldb: k as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        }
    }

    /// Deterministic bf16 activations on the device.
    fn random_bf16(gpu: &Gpu, n: usize, seed: u64) -> CudaSlice<bf16> {
        let host: Vec<bf16> = random_f32(n, seed)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        gpu.stream().clone_htod(&host).unwrap()
    }

    fn shape(
        c: &mut Criterion,
        gpu: &Gpu,
        blas: &CudaBlas,
        hbm: f64,
        n: usize,
        k: usize,
        m: usize,
    ) {
        let stream = gpu.stream();
        let wf = random_f32(n * k, 3);
        let w = absmean_quantize(&wf, n, k, ScaleGranularity::PerTensor).unwrap();
        let sets = rotation_sets(gpu, w.packed_bytes());
        let mut ours: Vec<Ours> = (0..sets)
            .map(|i| Ours {
                w: TernaryMatrixGpu::upload(gpu, &w).unwrap(),
                x: random_bf16(gpu, m * k, i as u64),
                acts: GemvActivations::new(gpu, m, k).unwrap(),
                y: stream.alloc_zeros(m * n).unwrap(),
                ws: GemvWorkspace::new(gpu, n).unwrap(),
            })
            .collect();
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let peer_sets = rotation_sets(gpu, 2 * n * k);
        let mut peers: Vec<Peer> = (0..peer_sets)
            .map(|i| Peer {
                w: stream.clone_htod(&wb).unwrap(),
                x: random_bf16(gpu, m * k, i as u64),
                y: stream.alloc_zeros(m * n).unwrap(),
            })
            .collect();
        for o in ours.iter_mut() {
            o.acts.quantize_from(gpu, &o.x.as_view()).unwrap();
        }

        let t_full = {
            let mut full = |i: usize| {
                let o = &mut ours[i % sets];
                o.acts.quantize_from(gpu, &o.x.as_view())?;
                ternary_matmul_a8_cuda(gpu, &o.w, &o.acts, &mut o.y.as_view_mut(), &mut o.ws)
            };
            time_launches(gpu, 20, 50, &mut full).unwrap()
        };
        let mut gemv = |i: usize| {
            let o = &mut ours[i % sets];
            ternary_matmul_a8_cuda(gpu, &o.w, &o.acts, &mut o.y.as_view_mut(), &mut o.ws)
        };
        let t_ours = time_launches(gpu, 20, 50, &mut gemv).unwrap();
        let cfg = cublas_config(n, k, m);
        let mut cublas = |i: usize| {
            let p = &mut peers[i % peer_sets];
            // SAFETY: W is (n, k) bf16, x is (m, k), y is (m, n); cfg describes exactly them.
            unsafe { blas.gemm(cfg, &p.w, &p.x, &mut p.y) }
        };
        let t_peer = time_launches(gpu, 20, 50, &mut cublas).unwrap();
        // The same launches replayed from a CUDA graph (how a decode step runs): device time
        // without the host's per-launch cost, for both sides.
        let graph = |name: &str, r: Result<Timing, String>, fallback: Timing| {
            r.unwrap_or_else(|e| {
                println!("note: {name} graph capture failed ({e}); using stream timing");
                fallback
            })
        };
        let g_ours = graph("ternary", time_graph(gpu, 20, 64, &mut gemv), t_ours);
        let g_peer = graph("cuBLAS", time_graph(gpu, 20, 64, &mut cublas), t_peer);
        // The practical floor for streaming this many bytes: cuBLAS bf16 over a matrix with
        // the packed size (n/8 x k bf16 = n x k at 2 bits), in a graph like ours.
        let floor = {
            let nf = n.div_ceil(8);
            let wf_small: Vec<bf16> = wb[..nf * k].to_vec();
            let fsets = rotation_sets(gpu, 2 * nf * k);
            let mut fl: Vec<Peer> = (0..fsets)
                .map(|_| Peer {
                    w: stream.clone_htod(&wf_small).unwrap(),
                    x: stream.clone_htod(&vec![bf16::ONE; m * k]).unwrap(),
                    y: stream.alloc_zeros(m * nf).unwrap(),
                })
                .collect();
            let fcfg = cublas_config(nf, k, m);
            let mut f = |i: usize| {
                let p = &mut fl[i % fsets];
                // SAFETY: W is (nf, k) bf16, x is (m, k), y is (m, nf); fcfg describes them.
                unsafe { blas.gemm(fcfg, &p.w, &p.x, &mut p.y) }
            };
            time_graph(gpu, 20, 64, &mut f).ok()
        };

        let packed = w.packed_bytes() as f64;
        let gbs = t_ours.gb_per_s(packed);
        println!(
            "RESULT ternary_gemv M={m} {n}x{k}: {:.2} us, {gbs:.0} GB/s packed = {:.0}% of d2d copy {hbm:.0} GB/s | incl. A8 quant {:.2} us | cuBLAS bf16 {:.2} us ({:.0} GB/s) | speed-up {:.2}x ({:.2}x incl. quant)",
            t_ours.median_ms * 1e3,
            100.0 * gbs / hbm,
            t_full.median_ms * 1e3,
            t_peer.median_ms * 1e3,
            t_peer.gb_per_s(2.0 * (n * k) as f64),
            t_peer.median_ms / t_ours.median_ms,
            t_peer.median_ms / t_full.median_ms,
        );
        let g_gbs = g_ours.gb_per_s(packed);
        println!(
            "RESULT ternary_gemv_graph M={m} {n}x{k}: {:.2} us, {g_gbs:.0} GB/s packed = {:.0}% of d2d copy | cuBLAS bf16 (graph) {:.2} us ({:.0} GB/s) | speed-up {:.2}x | cuBLAS streaming the same bytes: {}",
            g_ours.median_ms * 1e3,
            100.0 * g_gbs / hbm,
            g_peer.median_ms * 1e3,
            g_peer.gb_per_s(2.0 * (n * k) as f64),
            g_peer.median_ms / g_ours.median_ms,
            floor.map_or("n/a".to_owned(), |f| format!("{:.2} us ({:.0} GB/s)", f.median_ms * 1e3, f.gb_per_s(packed))),
        );

        let mut group = c.benchmark_group(format!("ternary_gpu_M{m}"));
        group
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(600))
            .sample_size(10);
        group.throughput(Throughput::Bytes(packed as u64));
        group.bench_function(BenchmarkId::new("w2a8", format!("{n}x{k}")), |b| {
            b.iter_custom(|it| time_batch(gpu, it as usize, &mut gemv).unwrap())
        });
        group.throughput(Throughput::Bytes(2 * (n * k) as u64));
        group.bench_function(BenchmarkId::new("cublas_bf16", format!("{n}x{k}")), |b| {
            b.iter_custom(|it| time_batch(gpu, it as usize, &mut cublas).unwrap())
        });
        group.finish();
    }

    /// Prefill / training GEMM: (n_out, k_in, M) on the 7B projection shapes.
    const GEMM_SHAPES: &[(usize, usize, usize)] = &[
        (4096, 4096, 128),
        (4096, 4096, 512),
        (4096, 4096, 4096),
        (16384, 4096, 4096),
    ];

    /// Tiled GEMM (M > 32) against cuBLAS bf16 GEMM of the same shape, TOP/s = 2 M N K / t.
    fn gemm_shape(gpu: &Gpu, blas: &CudaBlas, n: usize, k: usize, m: usize) {
        let stream = gpu.stream();
        let w = absmean_quantize(&random_f32(n * k, 3), n, k, ScaleGranularity::PerTensor).unwrap();
        let wg = TernaryMatrixGpu::upload(gpu, &w).unwrap();
        let mut acts = GemvActivations::new(gpu, m, k).unwrap();
        acts.quantize_from(gpu, &random_bf16(gpu, m * k, 1).as_view())
            .unwrap();
        let mut ws = GemvWorkspace::new(gpu, n).unwrap();
        let mut y = stream.alloc_zeros::<f32>(m * n).unwrap();
        let ours = time_launches(gpu, 10, 5, |_| {
            ternary_matmul_a8_cuda(gpu, &wg, &acts, &mut y.as_view_mut(), &mut ws)
        })
        .unwrap();
        let wb: Vec<bf16> = random_f32(n * k, 3)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let pw = stream.clone_htod(&wb).unwrap();
        let px = random_bf16(gpu, m * k, 1);
        let mut py = stream.alloc_zeros::<bf16>(m * n).unwrap();
        let cfg = cublas_config(n, k, m);
        // SAFETY: W is (n, k) bf16, x is (m, k), y is (m, n); cfg describes exactly them.
        let peer =
            time_launches(gpu, 10, 5, |_| unsafe { blas.gemm(cfg, &pw, &px, &mut py) }).unwrap();
        let ops = 2.0 * (m * n * k) as f64;
        println!(
            "RESULT ternary_gemm M={m} {n}x{k}: {:.1} us, {:.1} TOP/s | cuBLAS bf16 {:.1} us, {:.1} TFLOP/s | speed-up {:.2}x",
            ours.median_ms * 1e3,
            ours.tops(ops),
            peer.median_ms * 1e3,
            peer.tops(ops),
            peer.median_ms / ours.median_ms
        );
    }

    /// Transposed product for the STE backward, `dx (m, k) = dy (m, n) · (Wq * gamma)`
    /// (bf16 dy, f32 dx), against a cuBLAS bf16 GEMM of the same dimensions (M x n x k).
    fn gemm_t_shape(gpu: &Gpu, blas: &CudaBlas, n: usize, k: usize, m: usize) {
        let stream = gpu.stream();
        let w = absmean_quantize(&random_f32(n * k, 5), n, k, ScaleGranularity::PerTensor).unwrap();
        let wg = TernaryMatrixGpu::upload(gpu, &w).unwrap();
        let dy = random_bf16(gpu, m * n, 2);
        let mut dx = stream.alloc_zeros::<f32>(m * k).unwrap();
        let ours = time_launches(gpu, 10, 5, |_| {
            ternary_matmul_t_cuda(gpu, &wg, &dy.as_view(), m, &mut dx.as_view_mut())
        })
        .unwrap();
        let pw = random_bf16(gpu, n * k, 3);
        let mut py = stream.alloc_zeros::<bf16>(m * k).unwrap();
        let cfg = cublas_config(k, n, m);
        // SAFETY: cfg describes y (m, k) = x (m, n) · W^T with W (k, n): exactly these buffers.
        let peer =
            time_launches(gpu, 10, 5, |_| unsafe { blas.gemm(cfg, &pw, &dy, &mut py) }).unwrap();
        let ops = 2.0 * (m * n * k) as f64;
        println!(
            "RESULT ternary_gemm_t M={m} {n}x{k}: {:.1} us, {:.1} TFLOP/s | cuBLAS bf16 {:.1} us, {:.1} TFLOP/s | speed-up {:.2}x",
            ours.median_ms * 1e3,
            ours.tops(ops),
            peer.median_ms * 1e3,
            peer.tops(ops),
            peer.median_ms / ours.median_ms
        );
    }

    /// Decode MLP shapes (hidden, inter): 3B-like and the 7B 4096 / 16384 pair.
    const MLP_SHAPES: &[(usize, usize)] = &[(2560, 6912), (4096, 16384)];

    /// Fused squared-ReLU GLU MLP at decode (M = 1): our four launches (A8 of x, gate/up
    /// GEMV with the GLU epilogue, A8 of h, down GEMV) against three cuBLAS bf16 GEMVs
    /// (gate, up, down; the peer's elementwise relu²⊙ is not even counted), both timed as
    /// CUDA-graph replays, GB/s on our packed weight bytes.
    fn mlp_shape(gpu: &Gpu, blas: &CudaBlas, hidden: usize, inter: usize) {
        let stream = gpu.stream();
        let g = ScaleGranularity::PerTensor;
        let mlp = TernaryMlp::new(
            absmean_quantize(&random_f32(inter * hidden, 11), inter, hidden, g).unwrap(),
            absmean_quantize(&random_f32(inter * hidden, 12), inter, hidden, g).unwrap(),
            absmean_quantize(&random_f32(hidden * inter, 13), hidden, inter, g).unwrap(),
        )
        .unwrap();
        let gm = TernaryMlpGpu::upload(gpu, &mlp).unwrap();
        let mut ws = MlpWorkspace::new(gpu, &gm, 1).unwrap();
        let x = random_bf16(gpu, hidden, 4);
        let mut y = stream.alloc_zeros::<f32>(hidden).unwrap();
        let ours = time_graph(gpu, 10, 20, |_| {
            ternary_mlp_cuda(gpu, &gm, &x.as_view(), &mut y.as_view_mut(), &mut ws)
        })
        .unwrap();
        let wg = random_bf16(gpu, inter * hidden, 5);
        let wu = random_bf16(gpu, inter * hidden, 6);
        let wd = random_bf16(gpu, hidden * inter, 7);
        let mut hg = stream.alloc_zeros::<bf16>(inter).unwrap();
        let mut hu = stream.alloc_zeros::<bf16>(inter).unwrap();
        let mut yb = stream.alloc_zeros::<bf16>(hidden).unwrap();
        let (c_up, c_down) = (
            cublas_config(inter, hidden, 1),
            cublas_config(hidden, inter, 1),
        );
        let peer = time_graph(gpu, 10, 20, |_| {
            // SAFETY: each cfg describes (n, k) bf16 weights times one k-vector into n outputs,
            // exactly the buffers passed.
            unsafe {
                blas.gemm(c_up, &wg, &x, &mut hg)?;
                blas.gemm(c_up, &wu, &x, &mut hu)?;
                blas.gemm(c_down, &wd, &hg, &mut yb)
            }
        })
        .unwrap();
        let bytes = gm.weight_bytes() as f64;
        println!(
            "RESULT ternary_mlp M=1 hidden {hidden} inter {inter}: {:.2} us, {:.0} GB/s packed | cuBLAS bf16 3 GEMVs (graph) {:.2} us | speed-up {:.2}x",
            ours.median_ms * 1e3,
            bytes / (ours.median_ms * 1e-3) / 1e9,
            peer.median_ms * 1e3,
            peer.median_ms / ours.median_ms
        );
    }

    pub fn benches(c: &mut Criterion) {
        let Some(gpu) = gpu_for_test("ternary_gemm GPU bench") else {
            return;
        };
        println!("{}", tritter_suite::gpu_bench::device_header(&gpu));
        let blas = CudaBlas::new(gpu.stream().clone())
            .expect("cuBLAS (libcublas) must load for the peer baseline");
        for &(n, k, m) in GEMM_SHAPES {
            gemm_shape(&gpu, &blas, n, k, m);
        }
        for &(n, k, m) in GEMM_SHAPES {
            gemm_t_shape(&gpu, &blas, n, k, m);
        }
        for &(hidden, inter) in MLP_SHAPES {
            mlp_shape(&gpu, &blas, hidden, inter);
        }
        let hbm = copy_bandwidth(&gpu);
        for &(n, k) in SHAPES {
            for &m in MS {
                shape(c, &gpu, &blas, hbm, n, k, m);
            }
        }
    }
}

#[cfg(feature = "cuda")]
criterion_group!(benches, cpu, gpu::benches);
#[cfg(not(feature = "cuda"))]
criterion_group!(benches, cpu);
criterion_main!(benches);
