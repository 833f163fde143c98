//! FlashAttention forward. GPU: TFLOP/s counted as FlashAttention does (4 B H Lq Lk D, halved
//! for causal; a window counts the visible pairs), next to a materialized baseline measured in
//! the same run (cuBLAS bf16 Q K^T, a softmax kernel, cuBLAS P V) where its L x L scores fit,
//! plus the fused QK-Norm + RoPE prologue against the plain kernel and against separate
//! norm-rope kernels followed by attention, and paired against single tiles per CTA
//! (`TileSchedule`) on causal shapes, the 500M training shape among them. CPU: the f32
//! reference on a small shape.
//!
//! Run: `cargo bench --bench flash_attn` (add `--features cuda` for the GPU groups).

use criterion::{criterion_group, criterion_main, Criterion};
use flash_attn_sm120::reference::attention_fwd_ref;
use flash_attn_sm120::{Heads, Mask, Problem};
use tritter_suite::random_f32;

fn cpu(c: &mut Criterion) {
    let p = Problem::fixed(Heads::new(4, 2, 64), 1, 256, 256, Mask::CAUSAL);
    let q = random_f32(p.q_len(), 1);
    let k = random_f32(p.kv_len(), 2);
    let v = random_f32(p.kv_len(), 3);
    c.bench_function("flash_attn_ref_cpu causal B=1 H=4 L=256 D=64", |b| {
        b.iter(|| attention_fwd_ref(&p, &q, &k, &v, None).unwrap())
    });
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use cudarc::cublas::sys::cublasOperation_t;
    use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
    use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
    use flash_attn_sm120::cuda::{
        flash_attn_bwd_cuda, flash_attn_fwd_cuda, qk_norm_rope_cuda, BwdMode, BwdWorkspace,
        GradsGpu, NormRopeGpu, ProblemGpu, PrologueFwd, RopeTable, TileSchedule,
    };
    use flash_attn_sm120::{MaskMode, Positions};
    use half::bf16;
    use tritter_kernels_cuda::testing::gpu_for_test;
    use tritter_kernels_cuda::{images, Gpu};
    use tritter_suite::gpu_bench::{time_launches, Timing};

    /// (B, H, L, D, mask): the FlashAttention benchmark setting (B L = 16K tokens, H D = 2048)
    /// at L = 2K and 8K, L = 32K with B = 1, and a 4096-token window at 32K.
    fn shapes() -> Vec<(usize, usize, usize, usize, Mask)> {
        vec![
            (8, 16, 2048, 128, Mask::CAUSAL),
            (2, 16, 8192, 128, Mask::CAUSAL),
            (2, 16, 8192, 128, Mask::BIDIRECTIONAL),
            (2, 32, 8192, 64, Mask::CAUSAL),
            (1, 16, 32768, 128, Mask::CAUSAL),
            (1, 16, 32768, 128, Mask::sliding(4096, 0)),
        ]
    }

    /// Largest materialized score buffer the baseline allocates.
    const BASELINE_MAX_BYTES: usize = 16 << 30;

    fn random_bf16(gpu: &Gpu, n: usize, seed: u64) -> CudaSlice<bf16> {
        let host: Vec<bf16> = random_f32(n, seed)
            .into_iter()
            .map(|v| bf16::from_f32(v * 0.866))
            .collect();
        gpu.stream().clone_htod(&host).unwrap()
    }

    /// Visible (query, key) pairs of one head, as FlashAttention counts work.
    fn pairs(l: usize, mask: Mask) -> f64 {
        let l = l as f64;
        match (mask.mode, mask.window) {
            (MaskMode::Bidirectional, None) => l * l,
            (_, Some(w)) => {
                let w = (w as f64).min(l);
                w * l - w * (w - 1.0) / 2.0
            }
            _ => l * (l + 1.0) / 2.0,
        }
    }

    fn tflops(t: &Timing, flops: f64) -> f64 {
        flops / (t.median_ms * 1e-3) / 1e12
    }

    /// Materialized attention per batch entry: S = Q K^T (cuBLAS, heads batched), softmax in
    /// place, O = P V (cuBLAS). bf16 in and out, f32 accumulation inside cuBLAS.
    #[allow(clippy::too_many_arguments)]
    fn baseline(
        gpu: &Gpu,
        blas: &CudaBlas,
        q: &CudaSlice<bf16>,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        o: &mut CudaSlice<bf16>,
        s: &mut CudaSlice<bf16>,
        (b, h, l, d): (usize, usize, usize, usize),
        causal: bool,
    ) {
        let ld = (h * d) as i32;
        let li = l as i32;
        let softmax = gpu
            .function(&images::FLASH_FWD, "attn_softmax_rows_bf16")
            .unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        for bi in 0..b {
            let off = bi * l * h * d;
            let qk = StridedBatchedConfig {
                gemm: GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: li,
                    n: li,
                    k: d as i32,
                    alpha: bf16::ONE,
                    lda: ld,
                    ldb: ld,
                    beta: bf16::ZERO,
                    ldc: li,
                },
                batch_size: h as i32,
                stride_a: d as i64,
                stride_b: d as i64,
                stride_c: (l * l) as i64,
            };
            // SAFETY: strided views inside q, k (l rows of h*d) and s (h * l * l), checked sizes.
            unsafe {
                blas.gemm_strided_batched(qk, &k.slice(off..), &q.slice(off..), s)
                    .unwrap()
            };
            let (n_i, lq_i, causal_i) = (li, li, i32::from(causal));
            let mut launch = gpu.stream().launch_builder(&softmax);
            launch
                .arg(&mut *s)
                .arg(&n_i)
                .arg(&lq_i)
                .arg(&scale)
                .arg(&causal_i);
            // SAFETY: attn_softmax_rows_bf16(bf16*, int, int, float, int) over h*l rows of l.
            unsafe {
                launch
                    .launch(LaunchConfig {
                        grid_dim: ((h * l) as u32, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    })
                    .unwrap()
            };
            let pv = StridedBatchedConfig {
                gemm: GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_N,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: d as i32,
                    n: li,
                    k: li,
                    alpha: bf16::ONE,
                    lda: ld,
                    ldb: li,
                    beta: bf16::ZERO,
                    ldc: ld,
                },
                batch_size: h as i32,
                stride_a: d as i64,
                stride_b: (l * l) as i64,
                stride_c: d as i64,
            };
            // SAFETY: as above; o has the layout of q.
            unsafe {
                blas.gemm_strided_batched(pv, &v.slice(off..), &*s, &mut o.slice_mut(off..))
                    .unwrap()
            };
        }
    }

    fn shape(gpu: &Gpu, blas: &CudaBlas, (b, h, l, d, mask): (usize, usize, usize, usize, Mask)) {
        let p = Problem::fixed(Heads::new(h, h, d), b, l, l, mask);
        let pb = ProblemGpu::new(gpu, p.clone(), Positions::default()).unwrap();
        let q = random_bf16(gpu, p.q_len(), 1);
        let k = random_bf16(gpu, p.kv_len(), 2);
        let v = random_bf16(gpu, p.kv_len(), 3);
        let mut o = gpu.stream().alloc_zeros::<bf16>(p.q_len()).unwrap();
        let mut lse = gpu.stream().alloc_zeros::<f32>(p.lse_len()).unwrap();
        let flops = 4.0 * (b * h * d) as f64 * pairs(l, mask);
        let (samples, batch) = if l >= 32768 { (3, 2) } else { (5, 5) };
        let ours = time_launches(gpu, samples, batch, |_| {
            flash_attn_fwd_cuda(gpu, &pb, &q, &k, &v, &mut o, &mut lse, None)
        })
        .unwrap();
        let label = format!(
            "flash_fwd {:?}{} B={b} H={h} L={l} D={d}",
            mask.mode,
            mask.window.map(|w| format!(" W={w}")).unwrap_or_default()
        );
        let ours_tf = tflops(&ours, flops);
        let s_bytes = h * l * l * 2;
        if mask.window.is_none() && s_bytes <= BASELINE_MAX_BYTES {
            let mut s = gpu.stream().alloc_zeros::<bf16>(h * l * l).unwrap();
            let mut o2 = gpu.stream().alloc_zeros::<bf16>(p.q_len()).unwrap();
            let causal = mask.mode == MaskMode::Causal;
            let peer = time_launches(gpu, samples, batch, |_| {
                baseline(gpu, blas, &q, &k, &v, &mut o2, &mut s, (b, h, l, d), causal);
                Ok::<(), ()>(())
            })
            .unwrap();
            println!(
                "RESULT {label}: {:.3} ms, {ours_tf:.1} TFLOP/s | materialized cuBLAS+softmax: {:.3} ms, {:.1} TFLOP/s | speed-up {:.2}x",
                ours.median_ms,
                peer.median_ms,
                tflops(&peer, flops),
                peer.median_ms / ours.median_ms
            );
        } else {
            println!(
                "RESULT {label}: {:.3} ms, {ours_tf:.1} TFLOP/s | materialized baseline skipped (L x L scores {:.1} GiB or windowed)",
                ours.median_ms,
                s_bytes as f64 / (1u64 << 30) as f64
            );
        }
    }

    /// Fused prologue vs plain kernel vs norm-rope kernels + plain kernel.
    fn prologue(gpu: &Gpu, (b, h, l, d): (usize, usize, usize, usize)) {
        let p = Problem::fixed(Heads::new(h, h, d), b, l, l, Mask::CAUSAL);
        let pb = ProblemGpu::new(gpu, p.clone(), Positions::default()).unwrap();
        let q = random_bf16(gpu, p.q_len(), 1);
        let k = random_bf16(gpu, p.kv_len(), 2);
        let v = random_bf16(gpu, p.kv_len(), 3);
        let mut qn = gpu.stream().alloc_zeros::<bf16>(p.q_len()).unwrap();
        let mut kn = gpu.stream().alloc_zeros::<bf16>(p.kv_len()).unwrap();
        let mut o = gpu.stream().alloc_zeros::<bf16>(p.q_len()).unwrap();
        let mut lse = gpu.stream().alloc_zeros::<f32>(p.lse_len()).unwrap();
        let w = gpu.stream().clone_htod(&vec![bf16::ONE; d]).unwrap();
        let table = RopeTable::new(gpu, d, 10_000.0, l).unwrap();
        let nr = NormRopeGpu {
            q_norm: &w,
            k_norm: &w,
            eps: 1e-6,
            rope: &table,
        };
        let plain = time_launches(gpu, 5, 5, |_| {
            flash_attn_fwd_cuda(gpu, &pb, &q, &k, &v, &mut o, &mut lse, None)
        })
        .unwrap();
        let mut k_hat = gpu.stream().alloc_zeros::<bf16>(p.kv_len()).unwrap();
        let fused = time_launches(gpu, 5, 5, |_| {
            let pro = PrologueFwd {
                norm_rope: &nr,
                k_hat: &mut k_hat,
            };
            flash_attn_fwd_cuda(gpu, &pb, &q, &k, &v, &mut o, &mut lse, Some(pro))
        })
        .unwrap();
        let pos: Vec<i32> = (0..l as i32).cycle().take(b * l).collect();
        let separate = time_launches(gpu, 5, 5, |_| {
            qk_norm_rope_cuda(gpu, &q, &mut qn, b * l, h, &w, 1e-6, &table, Some(&pos))?;
            qk_norm_rope_cuda(gpu, &k, &mut kn, b * l, h, &w, 1e-6, &table, Some(&pos))?;
            flash_attn_fwd_cuda(gpu, &pb, &qn, &kn, &v, &mut o, &mut lse, None)
        })
        .unwrap();
        println!(
            "RESULT flash_fwd_prologue Causal B={b} H={h} L={l} D={d}: fused {:.3} ms | plain {:.3} ms (fused/plain {:.3}) | separate norm-rope + plain {:.3} ms (fused/separate {:.3})",
            fused.median_ms,
            plain.median_ms,
            fused.median_ms / plain.median_ms,
            separate.median_ms,
            fused.median_ms / separate.median_ms
        );
    }

    /// Random inputs and the outputs, gradients and workspace of one attention problem.
    struct Bufs {
        q: CudaSlice<bf16>,
        k: CudaSlice<bf16>,
        v: CudaSlice<bf16>,
        dout: CudaSlice<bf16>,
        o: CudaSlice<bf16>,
        lse: CudaSlice<f32>,
        grads: GradsGpu<bf16>,
        ws: BwdWorkspace<bf16>,
    }

    impl Bufs {
        fn new(gpu: &Gpu, p: &Problem) -> Bufs {
            Bufs {
                q: random_bf16(gpu, p.q_len(), 1),
                k: random_bf16(gpu, p.kv_len(), 2),
                v: random_bf16(gpu, p.kv_len(), 3),
                dout: random_bf16(gpu, p.q_len(), 4),
                o: gpu.stream().alloc_zeros::<bf16>(p.q_len()).unwrap(),
                lse: gpu.stream().alloc_zeros::<f32>(p.lse_len()).unwrap(),
                grads: GradsGpu::<bf16>::new(gpu, p).unwrap(),
                ws: BwdWorkspace::<bf16>::new(gpu, p, false).unwrap(),
            }
        }

        /// The forward's time (5 samples of 5 launches); leaves o and lse for the backward.
        fn time_fwd(&mut self, gpu: &Gpu, pb: &ProblemGpu) -> Timing {
            time_launches(gpu, 5, 5, |_| {
                flash_attn_fwd_cuda(
                    gpu,
                    pb,
                    &self.q,
                    &self.k,
                    &self.v,
                    &mut self.o,
                    &mut self.lse,
                    None,
                )
            })
            .unwrap()
        }

        /// The backward's time in `mode` (5 samples of 5 launches), from the forward's o, lse.
        fn time_bwd(&mut self, gpu: &Gpu, pb: &ProblemGpu, mode: BwdMode) -> Timing {
            time_launches(gpu, 5, 5, |_| {
                flash_attn_bwd_cuda(
                    gpu,
                    pb,
                    &self.q,
                    &self.k,
                    &self.v,
                    &self.o,
                    &self.lse,
                    &self.dout,
                    &mut self.grads,
                    &mut self.ws,
                    None,
                    mode,
                )
            })
            .unwrap()
        }
    }

    /// Backward (both dq modes) against the forward of the same shape; FLOPs counted as
    /// FlashAttention does (2.5x the forward's: five matmuls instead of two).
    fn backward(gpu: &Gpu, (batch, h, l, d, mask): (usize, usize, usize, usize, Mask)) {
        let p = Problem::fixed(Heads::new(h, h, d), batch, l, l, mask);
        let pb = ProblemGpu::new(gpu, p.clone(), Positions::default()).unwrap();
        let mut b = Bufs::new(gpu, &p);
        let fwd = b.time_fwd(gpu, &pb);
        let flops = 4.0 * (batch * h * d) as f64 * pairs(l, mask);
        for mode in [BwdMode::Atomic, BwdMode::Deterministic] {
            let bwd = b.time_bwd(gpu, &pb, mode);
            let (tf_f, tf_b) = (tflops(&fwd, flops), tflops(&bwd, 2.5 * flops));
            println!(
                "RESULT flash_bwd {mode:?} {:?} B={batch} H={h} L={l} D={d}: {:.3} ms, {tf_b:.1} TFLOP/s | forward {:.3} ms, {tf_f:.1} TFLOP/s | bwd/fwd throughput {:.2}",
                mask.mode,
                bwd.median_ms,
                fwd.median_ms,
                tf_b / tf_f
            );
        }
    }

    /// Forward and atomic backward with one tile per CTA against pairs of tiles
    /// (`TileSchedule`; which one `Auto` takes depends on the shape), same run, same inputs.
    fn schedules(gpu: &Gpu, heads: Heads, batch: usize, l: usize) {
        let p = Problem::fixed(heads, batch, l, l, Mask::CAUSAL);
        let mut b = Bufs::new(gpu, &p);
        let flops = 4.0 * (batch * heads.q * heads.dim) as f64 * pairs(l, Mask::CAUSAL);
        let mut times = Vec::new();
        for schedule in [TileSchedule::Single, TileSchedule::Paired] {
            let mut pb = ProblemGpu::new(gpu, p.clone(), Positions::default()).unwrap();
            pb.set_tile_schedule(schedule);
            let fwd = b.time_fwd(gpu, &pb);
            let bwd = b.time_bwd(gpu, &pb, BwdMode::Atomic);
            times.push((fwd, bwd));
        }
        let [(f1, b1), (f2, b2)] = [&times[0], &times[1]];
        println!(
            "RESULT flash_schedule Causal B={batch} Hq={} Hkv={} L={l} D={}: forward single {:.3} ms \
             ({:.1} TFLOP/s), paired {:.3} ms ({:.1}), paired/single time {:.3} | backward single \
             {:.3} ms ({:.1}), paired {:.3} ms ({:.1}), paired/single time {:.3}",
            heads.q,
            heads.kv,
            heads.dim,
            f1.median_ms,
            tflops(f1, flops),
            f2.median_ms,
            tflops(f2, flops),
            f2.median_ms / f1.median_ms,
            b1.median_ms,
            tflops(b1, 2.5 * flops),
            b2.median_ms,
            tflops(b2, 2.5 * flops),
            b2.median_ms / b1.median_ms
        );
    }

    pub fn benches(_c: &mut Criterion) {
        let Some(gpu) = gpu_for_test("flash_attn GPU bench") else {
            return;
        };
        println!("{}", tritter_suite::gpu_bench::device_header(&gpu));
        let blas = CudaBlas::new(gpu.stream().clone())
            .expect("cuBLAS (libcublas) must load for the peer baseline");
        for s in shapes() {
            shape(&gpu, &blas, s);
        }
        prologue(&gpu, (2, 16, 8192, 128));
        backward(&gpu, (2, 16, 8192, 128, Mask::CAUSAL));
        backward(&gpu, (2, 32, 8192, 64, Mask::CAUSAL));
        backward(&gpu, (2, 16, 8192, 128, Mask::BIDIRECTIONAL));
        // the 500M preset's attention at its 8 x 2048 training batch, then the bench shapes
        schedules(&gpu, Heads::new(16, 4, 64), 8, 2048);
        schedules(&gpu, Heads::new(16, 16, 128), 8, 2048);
        schedules(&gpu, Heads::new(16, 16, 128), 2, 8192);
        schedules(&gpu, Heads::new(32, 32, 64), 2, 8192);
    }
}

#[cfg(feature = "cuda")]
criterion_group!(benches, cpu, gpu::benches);
#[cfg(not(feature = "cuda"))]
criterion_group!(benches, cpu);
criterion_main!(benches);
