//! GPU conformance of the FlashAttention backward against the crate's CPU reference
//! (`attention_bwd_ref`): every mask, fixed and varlen batches (an empty sequence, lq < lk,
//! lq > lk), GQA ratios 1/4/8, both head dims, bf16 and f16, lengths that are not multiples of
//! the tiles, both dq modes; the determinism of the deterministic mode; the QK-Norm + RoPE
//! prologue's gradients (raw dq, dk, dq_norm, dk_norm); and bad input. Without a GPU these
//! tests print SKIPPED (and fail with TRITTER_REQUIRE_GPU=1).
//!
//! Tolerance (FlashAttention's tests/test_flash_attn.py): a gradient passes when
//! `max |gpu - ref| <= 2 * max |lowp - ref| + eps_T * max |ref|`, where `ref` is the f32/f64
//! reference and `lowp` is the same math evaluated the way any 16-bit kernel must: the
//! probabilities and dS rounded to the storage type before the products that consume them
//! (they are MMA operands), f32 accumulation. FlashAttention uses a PyTorch bf16 run as
//! `lowp`; here it is [`table::lowp_bwd`]. The factor 2 leaves room for a different
//! summation order and `ex2.approx`; `eps_T * max |ref|` (one rounding of the largest
//! gradient: 2^-8 bf16, 2^-11 f16) covers the final rounding of dq/dk/dv to the storage type,
//! which `lowp` does not apply.

use tritter_kernels_cuda::gpu_test;

gpu_test!(
    /// The backward (atomic and deterministic dq) matches the reference over the case table,
    /// with single and with paired tiles per CTA.
    backward_matches_reference => bwd
);
gpu_test!(
    /// Two deterministic runs (with an atomic run between them) are bitwise equal, and equal
    /// to the deterministic run with paired tiles.
    deterministic_backward_is_bitwise_reproducible => determinism
);
gpu_test!(
    /// With the QK-Norm + RoPE prologue, raw dq, dk, dv and the norm weights' gradients match
    /// the reference.
    prologue_backward_matches_reference => prologue
);
gpu_test!(
    /// Bad input to the backward is rejected before any launch, with typed errors.
    gpu_bwd_bad_input_is_rejected => bad_input
);

/// The case table and the low-precision oracle (plain CPU code, also checked without a GPU).
mod table {
    use flash_attn_sm120::{Heads, Mask, MaskInputs, MaskMode, Problem, Seqs};

    /// Query rows and keys per tile of the backward kernels (`BWD_BLOCK_M`, `BWD_BLOCK_N`;
    /// the GPU tests assert they still match).
    pub const BM: usize = 64;
    pub const BN: usize = 64;

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

    /// The conformance table: sizes straddle the backward tiles (64 queries x 64 keys) and
    /// the forward's 128-row query tiles, so every partial-tile and skip path runs.
    pub fn cases() -> Vec<Case> {
        let h = Heads::new;
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
                BN,
                Mask::CAUSAL,
            ),
            fixed(
                "causal d64 odd",
                h(4, 2, 64),
                2,
                3 * BN + 5,
                3 * BN + 5,
                Mask::CAUSAL,
            ),
            fixed(
                "causal d128 gqa4 odd",
                h(8, 2, 128),
                2,
                2 * BM + 37,
                2 * BM + 37,
                Mask::CAUSAL,
            ),
            fixed(
                "causal d64 gqa8",
                h(8, 1, 64),
                1,
                4 * BM + 1,
                4 * BM + 1,
                Mask::CAUSAL,
            ),
            fixed(
                "bidirectional d64",
                h(2, 1, 64),
                2,
                BM - 3,
                2 * BN + 9,
                Mask::BIDIRECTIONAL,
            ),
            fixed(
                "bidirectional lq > lk",
                h(2, 2, 128),
                1,
                2 * BM + 20,
                BN - 7,
                Mask::BIDIRECTIONAL,
            ),
            fixed(
                "causal chunk lq < lk",
                h(4, 2, 128),
                2,
                70,
                3 * BN + 11,
                Mask::CAUSAL,
            ),
            fixed(
                "decode lq = 1",
                h(8, 2, 128),
                3,
                1,
                5 * BN + 3,
                Mask::CAUSAL,
            ),
            fixed(
                "window",
                h(4, 4, 64),
                1,
                6 * BM + 7,
                6 * BM + 7,
                Mask::sliding(BN + 3, 0),
            ),
            fixed(
                "window sinks",
                h(4, 2, 128),
                1,
                5 * BM + 1,
                5 * BM + 1,
                Mask::sliding(2 * BM + 5, 4),
            ),
            fixed(
                "window sinks > block",
                h(2, 2, 64),
                2,
                5 * BN,
                5 * BN,
                Mask::sliding(BN / 2, BN + 2),
            ),
            fixed(
                "bidirectional window",
                h(2, 1, 64),
                1,
                4 * BM + 9,
                4 * BM + 9,
                Mask {
                    mode: MaskMode::Bidirectional,
                    window: Some(BN + 1),
                    sinks: 3,
                },
            ),
        ];
        let len = 4 * BM + 13;
        v.push(Case {
            name: "prefix-lm",
            problem: prefix(
                Problem::fixed(h(4, 2, 128), 3, len, len, Mask::CAUSAL),
                vec![0, (BN + 1) as i32, len as i32],
            ),
        });
        // documents: three packed documents per row, boundaries inside tiles
        let len = 6 * BM + 5;
        let docs: Vec<i32> = (0..2 * len)
            .map(|t| {
                let j = t % len;
                (t / len) as i32 * 10
                    + if j < 50 {
                        0
                    } else if j < 50 + 2 * BM + 30 {
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
        let mut p = Problem::fixed(h(4, 2, 128), 2, len, len, Mask::sliding(BN + 9, 3));
        p.inputs.doc_ids = Some(docs);
        v.push(Case {
            name: "documents window sinks",
            problem: p,
        });
        // varlen: lengths around the tiles, an empty sequence, lq < lk in one sequence
        let lens_q = [1usize, 2 * BM + 3, 0, 2 * BN - 1, 3 * BM];
        let lens_k = [1usize, 2 * BM + 3, 0, 3 * BN + 2, 3 * BM];
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
            ("varlen window sinks", Mask::sliding(BN + 7, 2)),
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
        let p = Problem {
            heads: h(4, 4, 64),
            seqs: Seqs::Varlen {
                cu_q: cu(&lens_q),
                cu_k: cu(&lens_k),
            },
            mask: Mask::CAUSAL,
            inputs: MaskInputs::default(),
        };
        v.push(Case {
            name: "varlen prefix-lm",
            problem: prefix(p, vec![0, 5, 0, 17, (BM + 1) as i32]),
        });
        v
    }

    /// The backward evaluated as a 16-bit kernel must (module docs): f32 scores and sums,
    /// P and dS rounded to the storage type (`round`) where they become MMA operands, probabilities from the given
    /// `lse`, delta from the given (16-bit) `out`. Returns (dq, dk, dv) unrounded.
    #[allow(clippy::too_many_arguments)]
    pub fn lowp_bwd(
        round: fn(f32) -> f32,
        p: &Problem,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        dout: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (hq, hkv, d) = (p.heads.q, p.heads.kv, p.heads.dim);
        let scale = p.heads.softmax_scale;
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; k.len()];
        let mut dv = vec![0f32; v.len()];
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        for b in 0..p.seqs.batch() {
            let (q0, lq, k0, lk) = p.seqs.seq(b);
            for h in 0..hq {
                let hk = h / (hq / hkv);
                for i in 0..lq {
                    let t = q0 + i;
                    let qi = &q[(t * hq + h) * d..][..d];
                    let doi = &dout[(t * hq + h) * d..][..d];
                    let delta = dot(doi, &out[(t * hq + h) * d..][..d]);
                    let l = lse[p.seqs.lse_index(hq, b, i, t, h)];
                    for j in 0..lk {
                        if !p.visible(b, i, j) {
                            continue;
                        }
                        let kr = (k0 + j) * hkv + hk;
                        let kj = &k[kr * d..][..d];
                        let vj = &v[kr * d..][..d];
                        let pij = (dot(qi, kj) * scale - l).exp();
                        let ds = pij * (dot(doi, vj) - delta);
                        let (pt, dst) = (round(pij), round(ds));
                        for c in 0..d {
                            dv[kr * d + c] += pt * doi[c];
                            dk[kr * d + c] += dst * qi[c] * scale;
                            dq[(t * hq + h) * d + c] += dst * kj[c] * scale;
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }
}

/// The oracle of the tolerance is itself checked: `lowp_bwd` with bf16 rounding lands near
/// the reference (it is the same math), but not on it (the roundings happen).
#[test]
fn lowp_oracle_is_near_the_reference() {
    use flash_attn_sm120::{attention_bwd_ref, attention_fwd_ref};
    use tritter_kernels_cuda::testing::random_f32;
    let bf = |x: f32| half::bf16::from_f32(x).to_f32();
    // the cheaper half of the table (the oracle is O(Lq Lk Hq D) without tiling; debug build)
    let cost = |p: &flash_attn_sm120::Problem| p.q_len() * p.seqs.max_lens().1;
    for case in table::cases()
        .iter()
        .filter(|c| cost(&c.problem) <= 40_000_000)
    {
        eprintln!("{}: checking the lowp oracle", case.name);
        let p = &case.problem;
        let r = |n, seed| {
            random_f32(n, seed)
                .into_iter()
                .map(bf)
                .collect::<Vec<f32>>()
        };
        let (q, k, v, dout) = (
            r(p.q_len(), 1),
            r(p.kv_len(), 2),
            r(p.kv_len(), 3),
            r(p.q_len(), 4),
        );
        let fwd = attention_fwd_ref(p, &q, &k, &v, None).unwrap();
        let out: Vec<f32> = fwd.out.iter().map(|&x| bf(x)).collect();
        let want = attention_bwd_ref(p, &q, &k, &v, None, &out, Some(&fwd.lse), &dout).unwrap();
        let (dq, dk, dv) = table::lowp_bwd(bf, p, &q, &k, &v, &out, &fwd.lse, &dout);
        for (what, got, want) in [
            ("dq", &dq, &want.dq),
            ("dk", &dk, &want.dk),
            ("dv", &dv, &want.dv),
        ] {
            let mag = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = got
                .iter()
                .zip(want.iter())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 2f32.powi(-5) * mag && (mag == 0.0 || err > 0.0),
                "{}: lowp {what} max |err| {err:e} vs max |ref| {mag:e}",
                case.name
            );
        }
    }
}

#[cfg(feature = "cuda")]
mod common {
    use cudarc::driver::CudaSlice;
    use flash_attn_sm120::cuda::{
        flash_attn_bwd_cuda, flash_attn_fwd_cuda, AttnDtype, BwdMode, BwdWorkspace, GradsGpu,
        NormGradsGpu, NormRopeGpu, ProblemGpu, PrologueBwd, PrologueFwd,
    };
    use tritter_kernels_cuda::testing::random_f32;
    use tritter_kernels_cuda::Gpu;

    pub use super::table::{cases, lowp_bwd, Case};

    /// Uniform [-2, 2) times this has unit variance.
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

    pub fn download<T: AttnDtype>(gpu: &Gpu, v: &CudaSlice<T>) -> Vec<f32> {
        let host = gpu.stream().clone_dtoh(v).expect("download");
        host.iter().map(|x| x.to_f32()).collect()
    }

    /// Rounds to `T` and back.
    pub fn round<T: AttnDtype>(x: f32) -> f32 {
        T::from_f32(x).to_f32()
    }

    /// One rounding of `T` relative to the value (2^-8 bf16, 2^-11 f16).
    pub fn eps<T: AttnDtype>() -> f32 {
        if T::NAME == "bf16" {
            2f32.powi(-8)
        } else {
            2f32.powi(-11)
        }
    }

    /// Device tensors of one problem: inputs, forward results, gradients, workspace.
    pub struct Run<T: AttnDtype> {
        pub pb: ProblemGpu,
        pub q: CudaSlice<T>,
        pub k: CudaSlice<T>,
        pub v: CudaSlice<T>,
        pub dout: CudaSlice<T>,
        pub out: CudaSlice<T>,
        pub lse: CudaSlice<f32>,
        pub grads: GradsGpu<T>,
        pub ws: BwdWorkspace<T>,
        pub norm_grads: Option<NormGradsGpu>,
    }

    impl<T: AttnDtype> Run<T> {
        /// Uploads the inputs and runs the forward (with `prologue`, q and k are raw).
        pub fn new(
            gpu: &Gpu,
            pb: ProblemGpu,
            host: [&[T]; 4],
            prologue: Option<&NormRopeGpu<'_, T>>,
        ) -> Self {
            let p = pb.problem().clone();
            let [q, k, v, dout] = host.map(|x| upload(gpu, x));
            let mut out = gpu.stream().alloc_zeros::<T>(p.q_len()).unwrap();
            let mut lse = gpu.stream().alloc_zeros::<f32>(p.lse_len()).unwrap();
            let mut k_hat = gpu.stream().alloc_zeros::<T>(p.kv_len()).unwrap();
            let pro = prologue.map(|norm_rope| PrologueFwd {
                norm_rope,
                k_hat: &mut k_hat,
            });
            flash_attn_fwd_cuda(gpu, &pb, &q, &k, &v, &mut out, &mut lse, pro).expect("forward");
            Run {
                grads: GradsGpu::new(gpu, &p).unwrap(),
                ws: BwdWorkspace::new(gpu, &p, prologue.is_some()).unwrap(),
                norm_grads: prologue.map(|_| NormGradsGpu::new(gpu, p.heads.dim).unwrap()),
                pb,
                q,
                k,
                v,
                dout,
                out,
                lse,
            }
        }

        /// Runs the backward in `mode`; returns (dq, dk, dv[, dq_norm, dk_norm]) as f32.
        pub fn backward(
            &mut self,
            gpu: &Gpu,
            mode: BwdMode,
            prologue: Option<&NormRopeGpu<'_, T>>,
        ) -> Vec<Vec<f32>> {
            let pr = match (prologue, self.norm_grads.as_mut()) {
                (Some(norm_rope), Some(grads)) => Some(PrologueBwd { norm_rope, grads }),
                _ => None,
            };
            flash_attn_bwd_cuda(
                gpu,
                &self.pb,
                &self.q,
                &self.k,
                &self.v,
                &self.out,
                &self.lse,
                &self.dout,
                &mut self.grads,
                &mut self.ws,
                pr,
                mode,
            )
            .expect("backward");
            let mut r = vec![
                download(gpu, &self.grads.dq),
                download(gpu, &self.grads.dk),
                download(gpu, &self.grads.dv),
            ];
            if let Some(ng) = &self.norm_grads {
                r.push(gpu.stream().clone_dtoh(&ng.dq_norm).unwrap());
                r.push(gpu.stream().clone_dtoh(&ng.dk_norm).unwrap());
            }
            r
        }

        /// The forward's output (f32) and logsumexp.
        pub fn forward_results(&self, gpu: &Gpu) -> (Vec<f32>, Vec<f32>) {
            (
                download(gpu, &self.out),
                gpu.stream().clone_dtoh(&self.lse).unwrap(),
            )
        }
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, usize) {
        let mut worst = (0f32, 0);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let e = if x.is_finite() {
                (x - y).abs()
            } else {
                f32::INFINITY
            };
            if e > worst.0 {
                worst = (e, i);
            }
        }
        worst
    }

    /// FlashAttention's criterion (module docs); panics with the case and the worst index.
    pub fn compare<T: AttnDtype>(name: &str, what: &str, got: &[f32], want: &[f32], lowp: &[f32]) {
        assert_eq!(got.len(), want.len(), "{name}: {what} length");
        let (err, at) = max_abs_diff(got, want);
        let (err_lp, _) = max_abs_diff(lowp, want);
        let mag = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let tol = 2.0 * err_lp + eps::<T>() * mag + 1e-6;
        eprintln!(
            "{name}: {what} max |err| {err:.2e} (lowp {err_lp:.2e}, max |ref| {mag:.2e}, \
             bound {tol:.2e})"
        );
        assert!(
            err <= tol,
            "{name}: {what}[{at}] = {} but the reference has {} (|err| {err:.3e} > {tol:.3e}; \
             lowp error {err_lp:.3e})",
            got[at],
            want[at]
        );
    }
}

#[cfg(feature = "cuda")]
mod bwd {
    use super::common::*;
    use flash_attn_sm120::cuda::{AttnDtype, BwdMode, ProblemGpu, TileSchedule};
    use flash_attn_sm120::{attention_bwd_ref, Positions};
    use half::{bf16, f16};
    use tritter_kernels_cuda::Gpu;

    fn check<T: AttnDtype>(gpu: &Gpu, case: &Case, seed: u64) {
        let p = &case.problem;
        let (q, qf) = inputs::<T>(p.q_len(), seed);
        let (k, kf) = inputs::<T>(p.kv_len(), seed + 1);
        let (v, vf) = inputs::<T>(p.kv_len(), seed + 2);
        let (dout, doutf) = inputs::<T>(p.q_len(), seed + 3);
        for schedule in [TileSchedule::Single, TileSchedule::Paired] {
            let mut pb = ProblemGpu::new(gpu, p.clone(), Positions::default()).expect("problem");
            pb.set_tile_schedule(schedule);
            let mut run = Run::new(gpu, pb, [&q, &k, &v, &dout], None);
            let (out, lse) = run.forward_results(gpu);
            let want = attention_bwd_ref(p, &qf, &kf, &vf, None, &out, Some(&lse), &doutf)
                .unwrap_or_else(|e| panic!("{}: reference: {e}", case.name));
            let (lq, lk, lv) = lowp_bwd(round::<T>, p, &qf, &kf, &vf, &out, &lse, &doutf);
            for mode in [BwdMode::Atomic, BwdMode::Deterministic] {
                let got = run.backward(gpu, mode, None);
                let name = format!("{} {} {mode:?} {schedule:?}", case.name, T::NAME);
                compare::<T>(&name, "dq", &got[0], &want.dq, &lq);
                compare::<T>(&name, "dk", &got[1], &want.dk, &lk);
                compare::<T>(&name, "dv", &got[2], &want.dv, &lv);
            }
        }
    }

    pub fn run(gpu: &Gpu) {
        use flash_attn_sm120::cuda::{BWD_BLOCK_M, BWD_BLOCK_N};
        assert_eq!(
            (super::table::BM, super::table::BN),
            (BWD_BLOCK_M, BWD_BLOCK_N),
            "table tiles"
        );
        for (i, case) in cases().iter().enumerate() {
            check::<bf16>(gpu, case, 100 + 10 * i as u64);
            check::<f16>(gpu, case, 500 + 10 * i as u64);
        }
    }
}

#[cfg(feature = "cuda")]
mod determinism {
    use super::common::*;
    use flash_attn_sm120::cuda::{
        AttnDtype, BwdMode, NormRopeGpu, ProblemGpu, RopeTable, TileSchedule,
    };
    use flash_attn_sm120::{Heads, Mask, Positions, Problem};
    use half::{bf16, f16};
    use tritter_kernels_cuda::Gpu;

    fn bits(x: &[Vec<f32>]) -> Vec<Vec<u32>> {
        x.iter()
            .map(|v| v.iter().map(|f| f.to_bits()).collect())
            .collect()
    }

    fn check<T: AttnDtype>(gpu: &Gpu, p: Problem, with_prologue: bool, seed: u64) {
        let d = p.heads.dim;
        let (q, _) = inputs::<T>(p.q_len(), seed);
        let (k, _) = inputs::<T>(p.kv_len(), seed + 1);
        let (v, _) = inputs::<T>(p.kv_len(), seed + 2);
        let (dout, _) = inputs::<T>(p.q_len(), seed + 3);
        let (max_lq, max_lk) = p.seqs.max_lens();
        let table = RopeTable::new(gpu, d, 10_000.0, max_lq.max(max_lk)).unwrap();
        let w = upload(gpu, &vec![T::from_f32(1.25); d]);
        let nr = NormRopeGpu {
            q_norm: &w,
            k_norm: &w,
            eps: 1e-6,
            rope: &table,
        };
        let nr = with_prologue.then_some(&nr);
        let mut pb = ProblemGpu::new(gpu, p.clone(), Positions::default()).unwrap();
        pb.set_tile_schedule(TileSchedule::Single);
        let mut run = Run::new(gpu, pb, [&q, &k, &v, &dout], nr);
        let first = bits(&run.backward(gpu, BwdMode::Deterministic, nr));
        let _ = run.backward(gpu, BwdMode::Atomic, nr); // leaves other values in the buffers
        let second = bits(&run.backward(gpu, BwdMode::Deterministic, nr));
        // Paired tiles run the same per-tile arithmetic in the same order: bitwise equal too.
        let mut pb = ProblemGpu::new(gpu, p, Positions::default()).unwrap();
        pb.set_tile_schedule(TileSchedule::Paired);
        let mut run = Run::new(gpu, pb, [&q, &k, &v, &dout], nr);
        let paired = bits(&run.backward(gpu, BwdMode::Deterministic, nr));
        for (other, what) in [
            (&second, "two deterministic runs"),
            (&paired, "single and paired tiles"),
        ] {
            for (i, (a, b)) in first.iter().zip(other).enumerate() {
                let diff = a.iter().zip(b).filter(|(x, y)| x != y).count();
                assert_eq!(
                    diff,
                    0,
                    "{} prologue={with_prologue}: output {i} (dq, dk, dv, dq_norm, dk_norm) \
                     differs in {diff} of {} elements between {what}",
                    T::NAME,
                    a.len()
                );
            }
        }
    }

    pub fn run(gpu: &Gpu) {
        // many key blocks adding into the same dq rows (GQA 8, causal, long): where atomics
        // would reorder sums
        let p = Problem::fixed(Heads::new(8, 1, 128), 2, 517, 517, Mask::CAUSAL);
        check::<bf16>(gpu, p.clone(), false, 11);
        check::<f16>(gpu, p, true, 21);
        let p = Problem::fixed(Heads::new(4, 2, 64), 1, 300, 700, Mask::BIDIRECTIONAL);
        check::<bf16>(gpu, p, true, 31);
    }
}

#[cfg(feature = "cuda")]
mod prologue {
    use super::common::*;
    use flash_attn_sm120::cuda::{AttnDtype, BwdMode, NormRopeGpu, ProblemGpu, RopeTable};
    use flash_attn_sm120::{
        attention_bwd_ref, qk_norm_rope_bwd_ref, qk_norm_rope_ref, NormRope, Positions, Prologue,
    };
    use half::{bf16, f16};
    use tritter_kernels_cuda::testing::random_f32;
    use tritter_kernels_cuda::Gpu;

    /// Default positions, or an explicit shifted, non-contiguous stream (as after eviction).
    fn positions_of(case: &Case, explicit: bool) -> Positions {
        let p = &case.problem;
        if !explicit {
            return Positions::default();
        }
        Positions {
            q: Some((0..p.seqs.total_q() as i32).map(|t| 3 * t + 7).collect()),
            k: Some((0..p.seqs.total_k() as i32).map(|t| 3 * t + 1).collect()),
        }
    }

    fn check<T: AttnDtype>(gpu: &Gpu, case: &Case, explicit: bool, seed: u64) {
        let p = &case.problem;
        let (tq, tk, d) = (p.seqs.total_q(), p.seqs.total_k(), p.heads.dim);
        let nr = NormRope {
            eps: 1e-6,
            rope_theta: 10_000.0,
        };
        // raw inputs with a non-unit scale, so the norm matters
        let (q, _) = inputs::<T>(p.q_len(), seed);
        let q: Vec<T> = q.iter().map(|x| T::from_f32(x.to_f32() * 3.0)).collect();
        let qf: Vec<f32> = q.iter().map(|x| x.to_f32()).collect();
        let (k, kf) = inputs::<T>(p.kv_len(), seed + 1);
        let (v, vf) = inputs::<T>(p.kv_len(), seed + 2);
        let (dout, doutf) = inputs::<T>(p.q_len(), seed + 3);
        let wq: Vec<T> = random_f32(d, seed + 4)
            .iter()
            .map(|x| T::from_f32(1.0 + 0.2 * x))
            .collect();
        let wk: Vec<T> = random_f32(d, seed + 5)
            .iter()
            .map(|x| T::from_f32(1.0 + 0.2 * x))
            .collect();
        let f = |x: &[T]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        let (wqf, wkf) = (f(&wq), f(&wk));
        let pos = positions_of(case, explicit);
        let (pq, pk) = case.problem.resolve_positions(&pos);
        let max_pos = pq.iter().chain(&pk).copied().max().unwrap_or(0) as usize;
        let table = RopeTable::new(gpu, d, nr.rope_theta, max_pos + 1).unwrap();
        let (gq, gk) = (upload(gpu, &wq), upload(gpu, &wk));
        let g = NormRopeGpu {
            q_norm: &gq,
            k_norm: &gk,
            eps: nr.eps,
            rope: &table,
        };
        let pb = ProblemGpu::new(gpu, p.clone(), pos.clone()).expect("problem");
        let mut run = Run::new(gpu, pb, [&q, &k, &v, &dout], Some(&g));
        let (out, lse) = run.forward_results(gpu);

        let prologue = Prologue {
            q_norm: &wqf,
            k_norm: &wkf,
            norm_rope: nr,
            positions: &pos,
        };
        let want = attention_bwd_ref(p, &qf, &kf, &vf, Some(prologue), &out, Some(&lse), &doutf)
            .unwrap_or_else(|e| panic!("{}: reference: {e}", case.name));
        // low precision: attention on the T-rounded q_hat/k_hat the kernels use, then the
        // reference norm backward of its f32 d(q_hat), d(k_hat)
        let rnd = |x: Vec<f32>| x.into_iter().map(round::<T>).collect::<Vec<_>>();
        let qh = rnd(qk_norm_rope_ref(&qf, tq, p.heads.q, d, &wqf, &nr, &pq).unwrap());
        let kh = rnd(qk_norm_rope_ref(&kf, tk, p.heads.kv, d, &wkf, &nr, &pk).unwrap());
        let (dqh, dkh, lv) = lowp_bwd(round::<T>, p, &qh, &kh, &vf, &out, &lse, &doutf);
        let (lq, lqn) = qk_norm_rope_bwd_ref(&qf, tq, p.heads.q, d, &wqf, &nr, &pq, &dqh).unwrap();
        let (lk, lkn) = qk_norm_rope_bwd_ref(&kf, tk, p.heads.kv, d, &wkf, &nr, &pk, &dkh).unwrap();
        let want_qn = want.dq_norm.clone().expect("reference dq_norm");
        let want_kn = want.dk_norm.clone().expect("reference dk_norm");
        for mode in [BwdMode::Atomic, BwdMode::Deterministic] {
            let got = run.backward(gpu, mode, Some(&g));
            let name = format!(
                "{} {} prologue explicit={explicit} {mode:?}",
                case.name,
                T::NAME
            );
            compare::<T>(&name, "dq (raw)", &got[0], &want.dq, &lq);
            compare::<T>(&name, "dk (raw)", &got[1], &want.dk, &lk);
            compare::<T>(&name, "dv", &got[2], &want.dv, &lv);
            compare::<T>(&name, "dq_norm", &got[3], &want_qn, &lqn);
            compare::<T>(&name, "dk_norm", &got[4], &want_kn, &lkn);
        }
    }

    pub fn run(gpu: &Gpu) {
        let all = cases();
        for (i, case) in all.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
            check::<bf16>(gpu, case, i % 2 == 1, 900 + i as u64);
            check::<f16>(gpu, case, i % 2 == 0, 1900 + i as u64);
        }
    }
}

#[cfg(feature = "cuda")]
mod bad_input {
    use super::common::*;
    use flash_attn_sm120::cuda::{
        flash_attn_bwd_cuda, BwdMode, BwdWorkspace, GradsGpu, NormGradsGpu, NormRopeGpu,
        ProblemGpu, PrologueBwd, RopeTable,
    };
    use flash_attn_sm120::{AttnError, Heads, Mask, Positions, Problem};
    use half::bf16;
    use tritter_kernels_cuda::Gpu;

    pub fn run(gpu: &Gpu) {
        let p = Problem::fixed(Heads::new(4, 2, 64), 2, 33, 33, Mask::CAUSAL);
        let pb = ProblemGpu::new(gpu, p.clone(), Positions::default()).unwrap();
        let (q, _) = inputs::<bf16>(p.q_len(), 1);
        let (k, _) = inputs::<bf16>(p.kv_len(), 2);
        let mut run = Run::new(gpu, pb, [&q, &k, &k, &q], None);
        let short_q = upload(gpu, &vec![bf16::ZERO; p.q_len() - 1]);
        let short_lse = gpu.stream().alloc_zeros::<f32>(p.lse_len() + 1).unwrap();
        macro_rules! bwd {
            ($dout:expr, $lse:expr, $grads:expr, $ws:expr, $pro:expr) => {
                flash_attn_bwd_cuda(
                    gpu,
                    &run.pb,
                    &run.q,
                    &run.k,
                    &run.v,
                    &run.out,
                    $lse,
                    $dout,
                    $grads,
                    $ws,
                    $pro,
                    BwdMode::Atomic,
                )
                .unwrap_err()
            };
        }
        let e = bwd!(&short_q, &run.lse, &mut run.grads, &mut run.ws, None);
        assert!(matches!(e, AttnError::Shape { what: "dout", .. }), "{e}");
        let e = bwd!(&run.dout, &short_lse, &mut run.grads, &mut run.ws, None);
        assert!(matches!(e, AttnError::Shape { what: "lse", .. }), "{e}");
        // gradients and workspace sized for a smaller problem
        let small = Problem::fixed(Heads::new(4, 2, 64), 1, 33, 33, Mask::CAUSAL);
        let mut small_grads = GradsGpu::<bf16>::new(gpu, &small).unwrap();
        let e = bwd!(&run.dout, &run.lse, &mut small_grads, &mut run.ws, None);
        assert!(matches!(e, AttnError::Shape { what: "dq", .. }), "{e}");
        let mut small_ws = BwdWorkspace::<bf16>::new(gpu, &small, false).unwrap();
        let e = bwd!(&run.dout, &run.lse, &mut run.grads, &mut small_ws, None);
        assert!(
            matches!(
                e,
                AttnError::Shape {
                    what: "workspace dq_accum",
                    ..
                }
            ),
            "{e}"
        );
        // a prologue with a workspace built without its buffers, wrong-size norm gradients, a
        // RoPE table that does not cover position 32
        let table = RopeTable::new(gpu, 64, 10_000.0, 64).unwrap();
        let w = upload(gpu, &[bf16::ONE; 64]);
        let nr = NormRopeGpu {
            q_norm: &w,
            k_norm: &w,
            eps: 1e-6,
            rope: &table,
        };
        let mut ng = NormGradsGpu::new(gpu, 64).unwrap();
        let e = bwd!(
            &run.dout,
            &run.lse,
            &mut run.grads,
            &mut run.ws,
            Some(PrologueBwd {
                norm_rope: &nr,
                grads: &mut ng
            })
        );
        assert!(e.to_string().contains("with_prologue"), "{e}");
        let mut ws = BwdWorkspace::<bf16>::new(gpu, &p, true).unwrap();
        let mut bad_ng = NormGradsGpu::new(gpu, 128).unwrap();
        let e = bwd!(
            &run.dout,
            &run.lse,
            &mut run.grads,
            &mut ws,
            Some(PrologueBwd {
                norm_rope: &nr,
                grads: &mut bad_ng
            })
        );
        assert!(
            matches!(
                e,
                AttnError::Shape {
                    what: "dq_norm",
                    ..
                }
            ),
            "{e}"
        );
        let short_table = RopeTable::new(gpu, 64, 10_000.0, 32).unwrap();
        let nr_short = NormRopeGpu {
            rope: &short_table,
            ..nr
        };
        let e = bwd!(
            &run.dout,
            &run.lse,
            &mut run.grads,
            &mut ws,
            Some(PrologueBwd {
                norm_rope: &nr_short,
                grads: &mut ng,
            })
        );
        assert!(e.to_string().contains("position 32"), "{e}");
    }
}
