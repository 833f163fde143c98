//! INT4 KV cache. GPU (feature `cuda`): quantization into pages (GB/s on bytes read +
//! written, % of the device-to-device copy rate measured in the same run) and split-KV decode
//! attention for B in {1, 8, 32}, Hq = 32, Hkv = 8, D = 128, Lkv in {4K, 32K, 128K}: the
//! INT4 cache against the same kernel over an f16 cache with the same block tables, both in
//! this run, GB/s counted on the INT4 bytes. CPU (always): the reference quantizer and a
//! small reference decode, for orientation only.
//!
//! Run: `cargo bench --bench kv_int4` (add `--features cuda` for the GPU groups).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kv_int4::{decode_attention_ref, quantize_int4, CacheConfig, CpuKvCache};
use tritter_suite::random_f32;

fn cpu(c: &mut Criterion) {
    println!(
        "{}",
        tritter_suite::build_info::header("CPU (reference code, single thread)")
    );
    let (hkv, d) = (8, 128);
    let n = 4096;
    let x = random_f32(n * hkv * d, 1);
    let t = tritter_suite::median_wall(1, 5, || {
        std::hint::black_box(quantize_int4(&x, d).unwrap());
    });
    let bytes = (x.len() * 4) as f64 + x.len() as f64 * 0.625;
    println!(
        "RESULT kv_quantize_cpu n={n} Hkv={hkv} D={d}: {:.2} ms, {:.2} GB/s (f32 in + INT4 out)",
        t.as_secs_f64() * 1e3,
        bytes / t.as_secs_f64() / 1e9
    );
    let mut group = c.benchmark_group("kv_int4_cpu");
    group
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(1))
        .sample_size(10)
        .throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("quantize_4096x8x128", |b| {
        b.iter(|| quantize_int4(&x, d).unwrap())
    });
    group.finish();

    let hq = 32;
    let mut cache = CpuKvCache::new(CacheConfig::new(1, hkv, d, n / 32)).unwrap();
    let s = cache.add_sequence();
    cache.append(s, 0, n, &x, &x).unwrap();
    let q = random_f32(hq * d, 2);
    let t = tritter_suite::median_wall(1, 3, || {
        std::hint::black_box(decode_attention_ref(&cache, 0, &[s], &q, hq, 0.088).unwrap());
    });
    println!(
        "RESULT kv_decode_ref_cpu B=1 Lkv={n} Hq={hq} Hkv={hkv} D={d}: {:.2} ms (f64 reference, not a fast path)",
        t.as_secs_f64() * 1e3
    );
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use cudarc::driver::CudaSlice;
    use half::f16;
    use kv_int4::cuda::{
        decode_attention_cuda, decode_tc_variants, set_decode_tuning, split_plan, DecodeBatch,
        DecodeWorkspace, GpuKvCache,
    };
    use kv_int4::{bytes_per_token_per_layer, KvFormat};
    use std::sync::Arc;
    use tritter_kernels_cuda::testing::gpu_for_test;
    use tritter_kernels_cuda::Gpu;
    use tritter_suite::gpu_bench::{
        copy_bandwidth, rotation_sets, time_batch, time_graph, time_launches, Timing,
    };

    const HQ: usize = 32;
    const HKV: usize = 8;
    const D: usize = 128;
    const BS: &[usize] = &[1, 8, 32];
    const LKVS: &[usize] = &[4096, 32768, 131072];
    /// Tokens per append while filling a cache (bounds the staging buffer).
    const FILL_CHUNK: usize = 16384;

    fn random_f16(gpu: &Gpu, n: usize, seed: u64) -> CudaSlice<f16> {
        let host: Vec<f16> = random_f32(n, seed).into_iter().map(f16::from_f32).collect();
        gpu.stream().clone_htod(&host).unwrap()
    }

    /// The spec HBM bandwidth of known parts, GB/s (for "% of peak" next to the measured copy).
    fn spec_bandwidth(gpu: &Gpu) -> Option<f64> {
        let name = &gpu.info().name;
        if name.contains("H100") && (name.contains("HBM3") || name.contains("SXM")) {
            Some(3350.0)
        } else if name.contains("H200") {
            Some(4800.0)
        } else {
            None
        }
    }

    /// Graph replay timing (how a decode step runs), falling back to stream timing.
    fn timed<E: std::fmt::Debug>(gpu: &Gpu, mut f: impl FnMut(usize) -> Result<(), E>) -> Timing {
        let stream = time_launches(gpu, 10, 20, &mut f).unwrap();
        time_graph(gpu, 10, 20, &mut f).unwrap_or_else(|e| {
            println!("note: graph capture failed ({e}); using stream timing");
            stream
        })
    }

    /// A cache of `format` holding `sets * b` sequences of `lkv` tokens, and one decode batch
    /// per set (rotated so repeated launches stream from HBM, not L2).
    fn filled(
        gpu: &Arc<Gpu>,
        format: KvFormat,
        b: usize,
        lkv: usize,
        sets: usize,
    ) -> (GpuKvCache, Vec<DecodeBatch>) {
        let cfg = CacheConfig::new(1, HKV, D, 1)
            .with_format(format)
            .with_max_seq_len(lkv)
            .with_pool_tokens(sets * b * lkv);
        let mut cache = GpuKvCache::new(gpu, cfg).unwrap();
        let chunk = FILL_CHUNK.min(lkv);
        let k = random_f16(gpu, chunk * HKV * D, 1);
        let v = random_f16(gpu, chunk * HKV * D, 2);
        let mut batches = Vec::new();
        for _ in 0..sets {
            let ids: Vec<_> = (0..b)
                .map(|_| {
                    let s = cache.add_sequence();
                    let mut pos = 0;
                    while pos < lkv {
                        let n = chunk.min(lkv - pos);
                        let e = n * HKV * D;
                        cache
                            .append(s, pos, n, &k.slice(..e), &v.slice(..e))
                            .unwrap();
                        pos += n;
                    }
                    s
                })
                .collect();
            batches.push(ids);
        }
        let batches = batches
            .iter()
            .map(|ids| cache.decode_batch(ids).unwrap())
            .collect();
        (cache, batches)
    }

    /// One decode-attention setup: a filled cache (`b` sequences of `lkv` tokens per rotation
    /// set), queries `(b, Hq, D)` and the output buffer; `time` runs the decode kernel with
    /// the current tuning and the split plan's workspace.
    struct DecodeSetup {
        format: KvFormat,
        b: usize,
        sets: usize,
        cache: GpuKvCache,
        batches: Vec<DecodeBatch>,
        q: CudaSlice<f16>,
        out: CudaSlice<f16>,
    }

    impl DecodeSetup {
        fn new(gpu: &Arc<Gpu>, format: KvFormat, b: usize, lkv: usize) -> Self {
            let bytes = b * lkv * bytes_per_token_per_layer(format, HKV, D);
            let sets = rotation_sets(gpu, bytes);
            let (cache, batches) = filled(gpu, format, b, lkv, sets);
            DecodeSetup {
                format,
                b,
                sets,
                cache,
                batches,
                q: random_f16(gpu, b * HQ * D, 3),
                out: gpu.stream().alloc_zeros::<f16>(b * HQ * D).unwrap(),
            }
        }

        /// `(splits, tiles per split)` of the current plan (and tuning override).
        fn plan(&self, gpu: &Gpu) -> (usize, usize) {
            split_plan(
                self.format,
                gpu.info().sm_count as usize,
                self.b,
                HKV,
                self.batches[0].max_tiles(),
            )
        }

        /// Decode timing over the rotation sets, and the splits it ran with.
        fn time(&mut self, gpu: &Arc<Gpu>) -> (Timing, usize) {
            let (splits, _) = self.plan(gpu);
            let mut ws = DecodeWorkspace::new(gpu, self.b * HQ, D, splits).unwrap();
            let scale = 1.0 / (D as f32).sqrt();
            let DecodeSetup {
                sets,
                cache,
                batches,
                q,
                out,
                ..
            } = self;
            let t = timed(gpu, |i| {
                decode_attention_cuda(
                    cache,
                    0,
                    &batches[i % *sets],
                    &q.as_view(),
                    HQ,
                    scale,
                    &mut out.as_view_mut(),
                    &mut ws,
                )
            });
            (t, splits)
        }
    }

    fn decode_time(gpu: &Arc<Gpu>, format: KvFormat, b: usize, lkv: usize) -> (Timing, usize) {
        DecodeSetup::new(gpu, format, b, lkv).time(gpu)
    }

    /// `TRITTER_KV_SWEEP=1`: every compiled INT4 tensor-core variant x {1, 2, 4} times its
    /// default number of splits, at Lkv = 131072 for B = 1 and 32 (tuning; one line each).
    fn sweep(gpu: &Arc<Gpu>, hbm: f64) {
        let lkv = 131072;
        for b in [1, 32] {
            let bytes = b * lkv * bytes_per_token_per_layer(KvFormat::Int4, HKV, D);
            let mut setup = DecodeSetup::new(gpu, KvFormat::Int4, b, lkv);
            for v in decode_tc_variants() {
                set_decode_tuning(Some(v), None).unwrap();
                let (default_splits, _) = setup.plan(gpu);
                for mult in [1, 2, 4] {
                    let forced = (mult > 1).then_some(mult * default_splits);
                    set_decode_tuning(Some(v), forced).unwrap();
                    let (_, tps) = setup.plan(gpu);
                    let (t, splits) = setup.time(gpu);
                    let gbs = t.gb_per_s(bytes as f64);
                    println!(
                        "RESULT kv_sweep B={b} Lkv={lkv} Hq={HQ} Hkv={HKV} D={D} variant={v} splits={splits} ({mult}x default {default_splits}, {tps} tiles each): int4 {:.2} us, {gbs:.0} GB/s on INT4 bytes = {:.0}% of d2d copy {hbm:.0} GB/s",
                        t.median_ms * 1e3,
                        100.0 * gbs / hbm,
                    );
                }
            }
            set_decode_tuning(None, None).unwrap();
        }
    }

    fn quantize(c: &mut Criterion, gpu: &Arc<Gpu>, hbm: f64) {
        let n = 32768;
        let e = n * HKV * D;
        let cfg = CacheConfig::new(1, HKV, D, 1)
            .with_max_seq_len(n)
            .with_pool_tokens(n);
        let mut cache = GpuKvCache::new(gpu, cfg).unwrap();
        let s = cache.add_sequence();
        let k = random_f16(gpu, e, 4);
        let v = random_f16(gpu, e, 5);
        let ticket = cache.append(s, 0, n, &k.as_view(), &v.as_view()).unwrap();
        // f16 in, codes + params out, for K and V.
        let bytes =
            (2 * e * 2) as f64 + (n * bytes_per_token_per_layer(KvFormat::Int4, HKV, D)) as f64;
        let t = time_launches(gpu, 10, 20, |_| {
            cache.bench_rewrite_layer(&ticket, 0, &k.as_view(), &v.as_view())
        })
        .unwrap();
        let mut fresh = GpuKvCache::new(gpu, cache.config().clone()).unwrap();
        let full = time_launches(gpu, 5, 3, |_| {
            let s = fresh.add_sequence();
            fresh.append(s, 0, n, &k.as_view(), &v.as_view())?;
            fresh.free(s)
        })
        .unwrap();
        let gbs = t.gb_per_s(bytes);
        println!(
            "RESULT kv_quantize n={n} Hkv={HKV} D={D}: {:.2} us, {gbs:.0} GB/s read+written = {:.0}% of d2d copy {hbm:.0} GB/s{} | full append (finite check + sync + write) {:.2} us",
            t.median_ms * 1e3,
            100.0 * gbs / hbm,
            spec_bandwidth(gpu).map_or(String::new(), |p| format!(", {:.0}% of spec {p:.0} GB/s", 100.0 * gbs / p)),
            full.median_ms * 1e3
        );
        let mut group = c.benchmark_group("kv_int4_gpu");
        group
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(600))
            .sample_size(10)
            .throughput(Throughput::Bytes(bytes as u64));
        group.bench_function("quantize_32768x8x128", |b| {
            b.iter_custom(|it| {
                time_batch(gpu, it as usize, |_| {
                    cache.bench_rewrite_layer(&ticket, 0, &k.as_view(), &v.as_view())
                })
                .unwrap()
            })
        });
        group.finish();
    }

    pub fn benches(c: &mut Criterion) {
        let Some(gpu) = gpu_for_test("kv_int4 GPU bench") else {
            return;
        };
        println!("{}", tritter_suite::gpu_bench::device_header(&gpu));
        let hbm = copy_bandwidth(&gpu);
        let spec = spec_bandwidth(&gpu);
        quantize(c, &gpu, hbm);
        for &lkv in LKVS {
            for &b in BS {
                let (t4, splits) = decode_time(&gpu, KvFormat::Int4, b, lkv);
                let (t16, _) = decode_time(&gpu, KvFormat::F16, b, lkv);
                let int4_bytes =
                    (b * lkv * bytes_per_token_per_layer(KvFormat::Int4, HKV, D)) as f64;
                let f16_bytes = (b * lkv * bytes_per_token_per_layer(KvFormat::F16, HKV, D)) as f64;
                let gbs = t4.gb_per_s(int4_bytes);
                println!(
                    "RESULT kv_decode B={b} Lkv={lkv} Hq={HQ} Hkv={HKV} D={D}: int4 {:.2} us, {gbs:.0} GB/s on INT4 bytes = {:.0}% of d2d copy {hbm:.0} GB/s{} ({splits} splits) | fp16 cache {:.2} us ({:.0} GB/s) | speed-up {:.2}x (fp16/int4)",
                    t4.median_ms * 1e3,
                    100.0 * gbs / hbm,
                    spec.map_or(String::new(), |p| format!(", {:.0}% of spec {p:.0} GB/s", 100.0 * gbs / p)),
                    t16.median_ms * 1e3,
                    t16.gb_per_s(f16_bytes),
                    t16.median_ms / t4.median_ms
                );
            }
        }
        if std::env::var("TRITTER_KV_SWEEP").is_ok_and(|s| s == "1") {
            sweep(&gpu, hbm);
        }
    }
}

#[cfg(feature = "cuda")]
criterion_group!(benches, cpu, gpu::benches);
#[cfg(not(feature = "cuda"))]
criterion_group!(benches, cpu);
criterion_main!(benches);
