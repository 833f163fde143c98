//! GPU conformance of the FlashAttention kernels against the crate's f32 CPU reference: every
//! mask, fixed and varlen batches, GQA ratios, both head dims, bf16 and f16, lengths that are
//! not multiples of the tiles, queries bottom-right aligned to longer key sequences, and the
//! fused QK-Norm + RoPE prologue. Without a GPU these tests print SKIPPED (and fail with
//! TRITTER_REQUIRE_GPU=1).

use tritter_kernels_cuda::gpu_test;

gpu_test!(
    /// The forward kernel matches the reference (output within the 2e-2 bf16 / 4e-3
    /// f16 absolute bound, logsumexp within 1e-3) over the whole case table.
    forward_matches_reference => fwd
);
gpu_test!(
    /// Paired tiles (two query blocks per CTA) and single tiles give bitwise equal outputs and
    /// logsumexps over the whole case table, with and without the prologue.
    tile_schedules_agree_bitwise => schedules
);
gpu_test!(
    /// The fused QK-Norm + RoPE forward equals attention over the reference's normalized,
    /// rotated q and k rounded to the storage type (what the kernel computes in registers).
    fused_prologue_matches_reference => prologue
);
gpu_test!(
    /// The standalone qk_norm_rope kernel matches the reference to one rounding of the output.
    standalone_norm_rope_matches_reference => norm_rope
);
gpu_test!(
    /// Bad input to the GPU entry points is rejected before any launch, with typed errors.
    gpu_bad_input_is_rejected => bad_input
);

#[cfg(feature = "cuda")]
mod common {
    use cudarc::driver::CudaSlice;
    use flash_attn_sm120::cuda::{
        flash_attn_fwd_cuda, AttnDtype, NormRopeGpu, ProblemGpu, PrologueFwd, TileSchedule,
    };
    use flash_attn_sm120::reference::{attention_fwd_ref, FwdOut};
    use flash_attn_sm120::{Heads, Mask, MaskInputs, MaskMode, Positions, Problem, Seqs};
    use tritter_kernels_cuda::testing::random_f32;
    use tritter_kernels_cuda::Gpu;

    /// Uniform [-2, 2) times this has unit variance (the accuracy setting).
    pub const UNIT_VARIANCE: f32 = 0.866_025_4;

    /// Unit-variance values rounded to `T`, and their exact f32 widening.
    pub fn inputs<T: AttnDtype>(n: usize, seed: u64) -> (Vec<T>, Vec<f32>) {
        let t: Vec<T> = random_f32(n, seed)
            .into_iter()
            .map(|v| T::from_f32(v * UNIT_VARIANCE))
            .collect();
        let f = t.iter().map(|v| v.to_f32()).collect();
        (t, f)
    }

    pub fn upload<T: AttnDtype>(gpu: &Gpu, v: &[T]) -> CudaSlice<T> {
        gpu.stream().clone_htod(v).expect("upload")
    }

    pub fn download<T: AttnDtype>(gpu: &Gpu, v: &CudaSlice<T>) -> Vec<T> {
        gpu.stream().clone_dtoh(v).expect("download")
    }

    /// Absolute output bound of the issue for `T` (bf16 2e-2; f16 has 3 more mantissa bits).
    pub fn out_tol<T: AttnDtype>() -> f32 {
        if T::NAME == "bf16" {
            2e-2
        } else {
            4e-3
        }
    }

    /// Logsumexp bound of the issue.
    pub const LSE_TOL: f32 = 1e-3;

    /// One table row.
    #[derive(Debug, Clone)]
    pub struct Case {
        pub name: &'static str,
        pub problem: Problem,
    }

    fn fixed(name: &'static str, heads: Heads, b: usize, lq: usize, lk: usize, mask: Mask) -> Case {
        Case {
            name,
            problem: Problem::fixed(heads, b, lq, lk, mask),
        }
    }

    /// The conformance table: sizes straddle the kernel tiles (FWD_BLOCK_M queries,
    /// `fwd_tile` keys) so every partial-tile path runs.
    pub fn cases() -> Vec<Case> {
        use flash_attn_sm120::cuda::FWD_BLOCK_M as BM;
        // the smaller key block (D = 64); D = 128 blocks are twice this, so both straddle
        let (bn_small, _) = flash_attn_sm120::cuda::fwd_tile(64);
        let (bn_large, _) = flash_attn_sm120::cuda::fwd_tile(128);
        assert_eq!(bn_large % bn_small, 0);
        let bn = bn_small;
        let h = |q, kv, d| Heads::new(q, kv, d);
        let prefix = |p: Problem, lens: Vec<i32>| Problem {
            mask: Mask {
                mode: MaskMode::PrefixLm,
                ..p.mask
            },
            inputs: MaskInputs {
                prefix_lens: Some(lens),
                ..p.inputs
            },
            ..p
        };
        let mut v = vec![
            fixed(
                "causal d128 one tile",
                h(2, 2, 128),
                1,
                BM,
                BM,
                Mask::CAUSAL,
            ),
            fixed(
                "causal d64 odd",
                h(4, 2, 64),
                2,
                3 * bn + 5,
                3 * bn + 5,
                Mask::CAUSAL,
            ),
            fixed(
                "causal d128 gqa4 odd",
                h(8, 2, 128),
                2,
                BM + 37,
                BM + 37,
                Mask::CAUSAL,
            ),
            fixed(
                "causal d128 mqa",
                h(8, 1, 128),
                1,
                2 * BM + 1,
                2 * BM + 1,
                Mask::CAUSAL,
            ),
            fixed(
                "bidirectional d64",
                h(2, 1, 64),
                2,
                BM - 3,
                2 * bn + 9,
                Mask::BIDIRECTIONAL,
            ),
            fixed(
                "bidirectional lq > lk",
                h(2, 2, 128),
                1,
                BM + 20,
                bn - 7,
                Mask::BIDIRECTIONAL,
            ),
            fixed(
                "causal chunk lq < lk",
                h(4, 2, 128),
                2,
                70,
                3 * bn + 11,
                Mask::CAUSAL,
            ),
            fixed(
                "decode lq = 1",
                h(8, 2, 128),
                3,
                1,
                5 * bn + 3,
                Mask::CAUSAL,
            ),
            fixed(
                "window",
                h(4, 4, 64),
                1,
                4 * BM + 7,
                4 * BM + 7,
                Mask::sliding(bn + 3, 0),
            ),
            fixed(
                "window sinks",
                h(4, 2, 128),
                1,
                3 * BM + 1,
                3 * BM + 1,
                Mask::sliding(BM + 5, 4),
            ),
            fixed(
                "window sinks > block",
                h(2, 2, 64),
                2,
                5 * bn,
                5 * bn,
                Mask::sliding(bn / 2, bn + 2),
            ),
            fixed(
                "bidirectional window",
                h(2, 1, 64),
                1,
                2 * BM + 9,
                2 * BM + 9,
                Mask {
                    mode: MaskMode::Bidirectional,
                    window: Some(bn + 1),
                    sinks: 3,
                },
            ),
        ];
        let len = 2 * BM + 13;
        v.push(Case {
            name: "prefix-lm",
            problem: prefix(
                Problem::fixed(h(4, 2, 128), 3, len, len, Mask::CAUSAL),
                vec![0, (bn + 1) as i32, len as i32],
            ),
        });
        // documents: three packed documents per row, boundaries inside tiles
        let len = 3 * BM + 5;
        let docs: Vec<i32> = (0..2 * len)
            .map(|t| {
                let j = t % len;
                (t / len) as i32 * 10
                    + if j < 50 {
                        0
                    } else if j < 50 + BM + 30 {
                        1
                    } else {
                        2
                    }
            })
            .collect();
        let mut p = Problem::fixed(h(4, 2, 64), 2, len, len, Mask::CAUSAL);
        p.inputs.doc_ids = Some(docs.clone());
        v.push(Case {
            name: "documents causal",
            problem: p,
        });
        let mut p = Problem::fixed(h(4, 2, 128), 2, len, len, Mask::sliding(bn + 9, 3));
        p.inputs.doc_ids = Some(docs);
        v.push(Case {
            name: "documents window sinks",
            problem: p,
        });
        // varlen: lengths around the tiles, an empty sequence, lq < lk in one sequence
        let lens_q = [1usize, BM + 3, 0, 2 * bn - 1, 3 * BM];
        let lens_k = [1usize, BM + 3, 0, 3 * bn + 2, 3 * BM];
        let cu = |l: &[usize]| {
            std::iter::once(0)
                .chain(l.iter().scan(0, |s, &x| {
                    *s += x as i32;
                    Some(*s)
                }))
                .collect::<Vec<i32>>()
        };
        for (name, mask) in [
            ("varlen causal", Mask::CAUSAL),
            ("varlen window sinks", Mask::sliding(bn + 7, 2)),
            ("varlen bidirectional", Mask::BIDIRECTIONAL),
        ] {
            v.push(Case {
                name,
                problem: Problem {
                    heads: h(8, 2, 128),
                    seqs: Seqs::Varlen {
                        cu_q: cu(&lens_q),
                        cu_k: cu(&lens_k),
                    },
                    mask,
                    inputs: MaskInputs::default(),
                },
            });
        }
        let mut p = Problem {
            heads: h(4, 4, 64),
            seqs: Seqs::Varlen {
                cu_q: cu(&lens_q),
                cu_k: cu(&lens_k),
            },
            mask: Mask::CAUSAL,
            inputs: MaskInputs::default(),
        };
        p = prefix(p, vec![0, 5, 0, 17, (BM + 1) as i32]);
        v.push(Case {
            name: "varlen prefix-lm",
            problem: p,
        });
        v
    }

    /// Runs `case` on the GPU in `T`, the CTAs taking their query blocks by `schedule`, and
    /// returns (out as f32, lse).
    pub fn run_gpu<T: AttnDtype>(
        gpu: &Gpu,
        case: &Case,
        q: &[T],
        k: &[T],
        v: &[T],
        prologue: Option<(&NormRopeGpu<'_, T>, Positions)>,
        schedule: TileSchedule,
    ) -> (Vec<f32>, Vec<f32>) {
        let p = &case.problem;
        let positions = prologue.as_ref().map(|x| x.1.clone()).unwrap_or_default();
        let mut pb = ProblemGpu::new(gpu, p.clone(), positions).expect("problem");
        pb.set_tile_schedule(schedule);
        let (q, k, v) = (upload(gpu, q), upload(gpu, k), upload(gpu, v));
        let mut out = gpu.stream().alloc_zeros::<T>(p.q_len()).unwrap();
        let mut lse = gpu.stream().alloc_zeros::<f32>(p.lse_len()).unwrap();
        let mut k_hat = gpu.stream().alloc_zeros::<T>(p.kv_len()).unwrap();
        let pro = prologue.map(|x| PrologueFwd {
            norm_rope: x.0,
            k_hat: &mut k_hat,
        });
        flash_attn_fwd_cuda(gpu, &pb, &q, &k, &v, &mut out, &mut lse, pro)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let out = download(gpu, &out).iter().map(|x| x.to_f32()).collect();
        let lse = gpu.stream().clone_dtoh(&lse).unwrap();
        (out, lse)
    }

    /// Compares GPU and reference outputs; panics with the case and the worst index.
    pub fn compare(name: &str, what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{name}: {what} length");
        let (mut worst, mut at) = (0f32, 0);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let e = if g.is_finite() {
                (g - w).abs()
            } else {
                f32::INFINITY
            };
            if e > worst {
                worst = e;
                at = i;
            }
        }
        eprintln!("{name}: {what} max |err| {worst:.2e} (bound {tol:.0e})");
        assert!(
            worst <= tol,
            "{name}: {what}[{at}] = {} but the reference has {} (|err| {worst} > {tol})",
            got[at],
            want[at]
        );
    }

    pub fn reference(case: &Case, q: &[f32], k: &[f32], v: &[f32]) -> FwdOut {
        attention_fwd_ref(&case.problem, q, k, v, None)
            .unwrap_or_else(|e| panic!("{}: reference: {e}", case.name))
    }
}

#[cfg(feature = "cuda")]
mod fwd {
    use super::common::*;
    use flash_attn_sm120::cuda::{AttnDtype, TileSchedule};
    use half::{bf16, f16};
    use tritter_kernels_cuda::Gpu;

    fn check<T: AttnDtype>(gpu: &Gpu, case: &Case, seed: u64) {
        let p = &case.problem;
        let (q, qf) = inputs::<T>(p.q_len(), seed);
        let (k, kf) = inputs::<T>(p.kv_len(), seed + 1);
        let (v, vf) = inputs::<T>(p.kv_len(), seed + 2);
        let (out, lse) = run_gpu(gpu, case, &q, &k, &v, None, TileSchedule::Auto);
        let want = reference(case, &qf, &kf, &vf);
        let name = format!("{} {}", case.name, T::NAME);
        compare(&name, "out", &out, &want.out, out_tol::<T>());
        compare(&name, "lse", &lse, &want.lse, LSE_TOL);
    }

    pub fn run(gpu: &Gpu) {
        for (i, case) in cases().iter().enumerate() {
            check::<bf16>(gpu, case, 100 + 10 * i as u64);
            check::<f16>(gpu, case, 500 + 10 * i as u64);
        }
    }
}

#[cfg(feature = "cuda")]
mod schedules {
    use super::common::*;
    use flash_attn_sm120::cuda::{NormRopeGpu, RopeTable, TileSchedule};
    use flash_attn_sm120::Positions;
    use half::bf16;
    use tritter_kernels_cuda::Gpu;

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|f| f.to_bits()).collect()
    }

    pub fn run(gpu: &Gpu) {
        for (i, case) in cases().iter().enumerate() {
            let p = &case.problem;
            let d = p.heads.dim;
            let (q, _) = inputs::<bf16>(p.q_len(), 900 + 10 * i as u64);
            let (k, _) = inputs::<bf16>(p.kv_len(), 901 + 10 * i as u64);
            let (v, _) = inputs::<bf16>(p.kv_len(), 902 + 10 * i as u64);
            let (lq, lk) = p.seqs.max_lens();
            let table = RopeTable::new(gpu, d, 10_000.0, lq.max(lk)).unwrap();
            let w = upload(gpu, &vec![bf16::from_f32(0.75); d]);
            let nr = NormRopeGpu {
                q_norm: &w,
                k_norm: &w,
                eps: 1e-6,
                rope: &table,
            };
            for with_prologue in [false, true] {
                let pro = || with_prologue.then(|| (&nr, Positions::default()));
                let single = run_gpu(gpu, case, &q, &k, &v, pro(), TileSchedule::Single);
                let paired = run_gpu(gpu, case, &q, &k, &v, pro(), TileSchedule::Paired);
                let name = format!("{} prologue={with_prologue}", case.name);
                assert_eq!(bits(&single.0), bits(&paired.0), "{name}: out differs");
                assert_eq!(bits(&single.1), bits(&paired.1), "{name}: lse differs");
            }
        }
    }
}

#[cfg(feature = "cuda")]
mod prologue {
    use super::common::*;
    use flash_attn_sm120::cuda::{AttnDtype, NormRopeGpu, RopeTable, TileSchedule};
    use flash_attn_sm120::reference::qk_norm_rope_ref;
    use flash_attn_sm120::{NormRope, Positions};
    use half::{bf16, f16};
    use tritter_kernels_cuda::testing::random_f32;
    use tritter_kernels_cuda::Gpu;

    /// Per-token default or explicit positions, as the reference applies them.
    fn positions_of(case: &Case, explicit: bool) -> Positions {
        let p = &case.problem;
        if !explicit {
            return Positions::default();
        }
        // explicit: a shifted, non-contiguous position stream (as after cache eviction)
        Positions {
            q: Some((0..p.seqs.total_q() as i32).map(|t| 3 * t + 7).collect()),
            k: Some((0..p.seqs.total_k() as i32).map(|t| 3 * t + 1).collect()),
        }
    }

    fn check<T: AttnDtype>(gpu: &Gpu, case: &Case, explicit: bool, seed: u64) {
        let p = &case.problem;
        let d = p.heads.dim;
        let nr = NormRope {
            eps: 1e-6,
            rope_theta: 10_000.0,
        };
        // raw inputs with a non-unit scale, so the norm matters
        let (q, _) = inputs::<T>(p.q_len(), seed);
        let (k, _) = inputs::<T>(p.kv_len(), seed + 1);
        let (v, vf) = inputs::<T>(p.kv_len(), seed + 2);
        let q = q
            .iter()
            .map(|x| T::from_f32(x.to_f32() * 3.0))
            .collect::<Vec<_>>();
        let wq: Vec<T> = random_f32(d, seed + 3)
            .iter()
            .map(|x| T::from_f32(1.0 + 0.2 * x))
            .collect();
        let wk: Vec<T> = random_f32(d, seed + 4)
            .iter()
            .map(|x| T::from_f32(1.0 + 0.2 * x))
            .collect();
        let f = |x: &[T]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        let pos = positions_of(case, explicit);
        let (pq, pk) = case.problem.resolve_positions(&pos);
        // the kernel rounds the normalized, rotated rows to T before the MMAs
        let round = |x: Vec<f32>| {
            x.into_iter()
                .map(|v| T::from_f32(v).to_f32())
                .collect::<Vec<_>>()
        };
        let qn = round(
            qk_norm_rope_ref(&f(&q), p.seqs.total_q(), p.heads.q, d, &f(&wq), &nr, &pq).unwrap(),
        );
        let kn = round(
            qk_norm_rope_ref(&f(&k), p.seqs.total_k(), p.heads.kv, d, &f(&wk), &nr, &pk).unwrap(),
        );
        let want = reference(case, &qn, &kn, &vf);
        let max_pos = pq.iter().chain(&pk).copied().max().unwrap_or(0) as usize;
        let table = RopeTable::new(gpu, d, nr.rope_theta, max_pos + 1).unwrap();
        let (gq, gk) = (upload(gpu, &wq), upload(gpu, &wk));
        let g = NormRopeGpu {
            q_norm: &gq,
            k_norm: &gk,
            eps: nr.eps,
            rope: &table,
        };
        let (out, lse) = run_gpu(gpu, case, &q, &k, &v, Some((&g, pos)), TileSchedule::Auto);
        let name = format!("{} {} prologue explicit={explicit}", case.name, T::NAME);
        // |logit| <= |q||k| scale = sqrt(D) after the norm: one rounding flip of an input
        // element moves a logit by ~2^-8 relative; the bound is the unfused one.
        compare(&name, "out", &out, &want.out, out_tol::<T>());
        compare(&name, "lse", &lse, &want.lse, 2.0 * LSE_TOL);
    }

    pub fn run(gpu: &Gpu) {
        let all = cases();
        for (i, case) in all.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
            check::<bf16>(gpu, case, false, 900 + i as u64);
            check::<f16>(gpu, case, i % 2 == 0, 1900 + i as u64);
        }
    }
}

#[cfg(feature = "cuda")]
mod norm_rope {
    use super::common::*;
    use flash_attn_sm120::cuda::{qk_norm_rope_cuda, AttnDtype, RopeTable};
    use flash_attn_sm120::reference::qk_norm_rope_ref;
    use flash_attn_sm120::NormRope;
    use half::{bf16, f16};
    use tritter_kernels_cuda::testing::random_f32;
    use tritter_kernels_cuda::Gpu;

    fn check<T: AttnDtype>(gpu: &Gpu, tokens: usize, heads: usize, d: usize, explicit: bool) {
        let nr = NormRope {
            eps: 1e-5,
            rope_theta: 500_000.0,
        };
        let (x, xf) = inputs::<T>(tokens * heads * d, 77 + d as u64);
        let w: Vec<T> = random_f32(d, 5)
            .iter()
            .map(|v| T::from_f32(1.0 + 0.3 * v))
            .collect();
        let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let pos: Vec<i32> = if explicit {
            (0..tokens as i32).map(|t| 1000 + 5 * t).collect()
        } else {
            (0..tokens as i32).collect()
        };
        let want = qk_norm_rope_ref(&xf, tokens, heads, d, &wf, &nr, &pos).unwrap();
        let table = RopeTable::new(
            gpu,
            d,
            nr.rope_theta,
            *pos.iter().max().unwrap() as usize + 1,
        )
        .unwrap();
        let (gx, gw) = (upload(gpu, &x), upload(gpu, &w));
        let mut gy = gpu.stream().alloc_zeros::<T>(x.len()).unwrap();
        qk_norm_rope_cuda(
            gpu,
            &gx,
            &mut gy,
            tokens,
            heads,
            &gw,
            nr.eps,
            &table,
            explicit.then_some(&pos[..]),
        )
        .unwrap();
        let got: Vec<f32> = download(gpu, &gy).iter().map(|v| v.to_f32()).collect();
        // one rounding of the output (|y| <= |w| sqrt(D)) plus f32 arithmetic
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let ulp = if T::NAME == "bf16" {
                2f32.powi(-8)
            } else {
                2f32.powi(-11)
            };
            let tol = w.abs() * ulp + 1e-5;
            assert!(
                (g - w).abs() <= tol,
                "{} d{d} [{i}]: {g} vs {w} (tol {tol})",
                T::NAME
            );
        }
    }

    pub fn run(gpu: &Gpu) {
        for d in flash_attn_sm120::SUPPORTED_HEAD_DIMS {
            check::<bf16>(gpu, 37, 3, d, false);
            check::<f16>(gpu, 37, 3, d, true);
        }
    }
}

#[cfg(feature = "cuda")]
mod bad_input {
    use super::common::*;
    use flash_attn_sm120::cuda::{
        flash_attn_fwd_cuda, NormRopeGpu, ProblemGpu, PrologueFwd, RopeTable,
    };
    use flash_attn_sm120::{AttnError, Heads, Mask, Positions, Problem};
    use half::bf16;
    use tritter_kernels_cuda::Gpu;

    pub fn run(gpu: &Gpu) {
        let p = Problem::fixed(Heads::new(4, 2, 64), 2, 33, 33, Mask::CAUSAL);
        let pb = ProblemGpu::new(gpu, p.clone(), Positions::default()).unwrap();
        let (q, _) = inputs::<bf16>(p.q_len(), 1);
        let (k, _) = inputs::<bf16>(p.kv_len(), 2);
        let (q, k) = (upload(gpu, &q), upload(gpu, &k));
        let short = upload(gpu, &vec![bf16::ZERO; p.kv_len() - 1]);
        let mut out = gpu.stream().alloc_zeros::<bf16>(p.q_len()).unwrap();
        let mut lse = gpu.stream().alloc_zeros::<f32>(p.lse_len()).unwrap();
        let e =
            flash_attn_fwd_cuda(gpu, &pb, &q, &k, &short, &mut out, &mut lse, None).unwrap_err();
        assert!(matches!(e, AttnError::Shape { what: "v", .. }), "{e}");
        // a RoPE table that does not cover position 32
        let table = RopeTable::new(gpu, 64, 10_000.0, 32).unwrap();
        let w = upload(gpu, &[bf16::ONE; 64]);
        let nr = NormRopeGpu {
            q_norm: &w,
            k_norm: &w,
            eps: 1e-6,
            rope: &table,
        };
        let mut k_hat = gpu.stream().alloc_zeros::<bf16>(p.kv_len()).unwrap();
        let e = flash_attn_fwd_cuda(
            gpu,
            &pb,
            &q,
            &k,
            &k,
            &mut out,
            &mut lse,
            Some(PrologueFwd {
                norm_rope: &nr,
                k_hat: &mut k_hat,
            }),
        )
        .unwrap_err();
        assert!(e.to_string().contains("position 32"), "{e}");
        // a table for the wrong head dim
        let table = RopeTable::new(gpu, 128, 10_000.0, 64).unwrap();
        let nr = NormRopeGpu { rope: &table, ..nr };
        let e = flash_attn_fwd_cuda(
            gpu,
            &pb,
            &q,
            &k,
            &k,
            &mut out,
            &mut lse,
            Some(PrologueFwd {
                norm_rope: &nr,
                k_hat: &mut k_hat,
            }),
        )
        .unwrap_err();
        assert!(e.to_string().contains("D = 128"), "{e}");
        // a k_hat workspace of the wrong length
        let table = RopeTable::new(gpu, 64, 10_000.0, 64).unwrap();
        let nr = NormRopeGpu { rope: &table, ..nr };
        let mut short_hat = gpu.stream().alloc_zeros::<bf16>(p.kv_len() - 1).unwrap();
        let e = flash_attn_fwd_cuda(
            gpu,
            &pb,
            &q,
            &k,
            &k,
            &mut out,
            &mut lse,
            Some(PrologueFwd {
                norm_rope: &nr,
                k_hat: &mut short_hat,
            }),
        )
        .unwrap_err();
        assert!(matches!(e, AttnError::Shape { what: "k_hat", .. }), "{e}");
        // invalid problems never reach the device
        let bad = Problem::fixed(Heads::new(4, 3, 64), 1, 8, 8, Mask::CAUSAL);
        assert!(matches!(
            ProblemGpu::new(gpu, bad, Positions::default()),
            Err(AttnError::Heads(_))
        ));
    }
}
