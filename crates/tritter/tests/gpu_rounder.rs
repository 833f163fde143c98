//! GPU conformance of the embedding rounder's exact KNN (feature `cuda`; skipped without a
//! GPU, failed under `TRITTER_REQUIRE_GPU=1`): `GpuEmbeddingRounder` against the CPU
//! `EmbeddingRounder` on a table of shapes (V not a multiple of the 32-row tile, H from 8 to
//! 4100 including H not a multiple of 8, N from 1 to 300, k = 1..64, duplicated and zero
//! rows, zero queries, queries equal to table rows, a candidate subset).
//!
//! Error metric, two references per case:
//! * the same bf16 table in f64 (`dot(q, bf16(t_hat)) / |q|`): the GPU differs only in f32
//!   summation order, so similarities must agree within 1e-4 and ids may differ only among
//!   similarities within 1e-3 of each other (ties);
//! * the CPU rounder (f32 unit rows): bf16 rounding moves a similarity by at most 2^-8 (by
//!   Cauchy-Schwarz, each unit-row element has relative error <= 2^-8, the unit roundoff of
//!   bf16's 8-bit significand), so similarities must agree within 2^-8 + 1e-4 and ids may
//!   differ only among CPU similarities within twice that. (The first H100 run found a
//!   2.2e-3 difference at H = 8, above the 2^-9 this file first claimed.)

use tritter_kernels_cuda::gpu_test;

gpu_test!(
    /// GPU top-k ids and similarities equal the CPU exact KNN (up to ties and the stated
    /// bf16 tolerance) over the case table; the device API with a reused workspace gives
    /// bit-identical results to the host API.
    gpu_knn_matches_cpu => knn_conformance
);

gpu_test!(
    /// Bad input on the GPU path is a typed error: k = 0, k > 64, k > rows, NaN queries,
    /// wrong lengths, a workspace too small.
    gpu_knn_bad_input_is_refused => bad_input
);

#[cfg(feature = "cuda")]
mod common {
    use std::collections::BTreeSet;

    use half::bf16;
    use tritter::paradigm::rounder::EmbeddingRounder;

    /// Similarity tolerance against the same bf16 table in f64.
    pub const TOL_SAME_TABLE: f64 = 1e-4;
    /// Tie window against the same bf16 table.
    pub const TIE_SAME_TABLE: f64 = 1e-3;
    /// Similarity tolerance against the f32 CPU rounder: 2^-8 (bf16 unit roundoff) +
    /// summation error.
    pub const TOL_CPU: f64 = 1.0 / 256.0 + 1e-4;

    pub fn norm(x: &[f32]) -> f64 {
        x.iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    }

    /// `dot(q, row) / max(|q|, 1e-12)` in f64.
    pub fn sim(q: &[f32], row: impl Iterator<Item = f64>) -> f64 {
        let d: f64 = q.iter().zip(row).map(|(&a, b)| f64::from(a) * b).sum();
        d / norm(q).max(1e-12)
    }

    /// The similarity functions of the two references for `rounder`'s table.
    pub fn bf16_sim(r: &EmbeddingRounder, q: &[f32], id: u32) -> f64 {
        let h = r.hidden_size();
        let row = &r.normalized_table()[id as usize * h..(id as usize + 1) * h];
        sim(
            q,
            row.iter().map(|&v| f64::from(bf16::from_f32(v).to_f32())),
        )
    }

    pub fn f32_sim(r: &EmbeddingRounder, q: &[f32], id: u32) -> f64 {
        let h = r.hidden_size();
        let row = &r.normalized_table()[id as usize * h..(id as usize + 1) * h];
        sim(q, row.iter().map(|&v| f64::from(v)))
    }

    /// Checks one top-k row against `sim_of` over `cands`; returns the largest similarity
    /// error. See the file docs for the rules.
    pub fn check_row(
        case: &str,
        cands: &[u32],
        ids: &[u32],
        sims: &[f32],
        sim_of: &dyn Fn(u32) -> f64,
        tol: f64,
        tie: f64,
    ) -> f64 {
        let mut truth: Vec<(f64, u32)> = cands.iter().map(|&id| (sim_of(id), id)).collect();
        truth.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let distinct: BTreeSet<u32> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), ids.len(), "{case}: duplicate ids {ids:?}");
        let mut worst = 0f64;
        for (j, (&id, &s)) in ids.iter().zip(sims).enumerate() {
            assert!(
                cands.binary_search(&id).is_ok(),
                "{case}: position {j}: id {id} is not a candidate"
            );
            let true_s = sim_of(id);
            let err = (f64::from(s) - true_s).abs();
            worst = worst.max(err);
            assert!(
                err <= tol,
                "{case}: position {j}: id {id} similarity {s} vs reference {true_s}"
            );
            assert!(
                (true_s - truth[j].0).abs() <= tie,
                "{case}: position {j}: id {id} (similarity {true_s}) but the reference {j}-th is {:?}",
                truth[j]
            );
            let isolated = (j == 0 || truth[j - 1].0 - truth[j].0 > tie)
                && truth.get(j + 1).is_none_or(|n| truth[j].0 - n.0 > tie);
            if isolated {
                assert_eq!(
                    id, truth[j].1,
                    "{case}: position {j}: no tie, yet another id"
                );
            }
            if j > 0 {
                assert!(sims[j - 1] >= s, "{case}: similarities not sorted {sims:?}");
            }
        }
        worst
    }
}

#[cfg(feature = "cuda")]
mod knn_conformance {
    use std::sync::Arc;

    use super::common::*;
    use tritter::paradigm::rounder::EmbeddingRounder;
    use tritter::paradigm::rounder_cuda::{GpuEmbeddingRounder, KnnWorkspace};
    use tritter_kernels_cuda::testing::random_f32;
    use tritter_kernels_cuda::Gpu;

    /// How a case's table and queries are made.
    #[derive(Clone, Copy, Debug)]
    enum Data {
        /// Random table and queries.
        Random,
        /// Every row one of 3 distinct rows (all-ties lists), one zero row, queries equal
        /// to table rows plus one zero query.
        Adversarial,
        /// Random, without ids 0..8 (the specials) as candidates.
        Subset,
    }

    /// (V, H, N, k, data).
    const CASES: &[(usize, usize, usize, usize, Data)] = &[
        (1000, 64, 1, 1, Data::Random),
        (1000, 64, 1, 64, Data::Random),
        (1, 64, 3, 1, Data::Random),
        (64, 64, 17, 64, Data::Random),
        (4099, 128, 3, 10, Data::Random),
        (777, 96, 8, 64, Data::Random),
        (5000, 100, 9, 33, Data::Random),
        (3001, 2048, 2, 64, Data::Random),
        (513, 4100, 5, 5, Data::Random),
        (20000, 512, 64, 64, Data::Random),
        (2000, 8, 300, 16, Data::Random),
        (70, 12, 4, 64, Data::Random),
        (1500, 64, 6, 64, Data::Adversarial),
        (200, 128, 2, 1, Data::Adversarial),
        (3000, 256, 9, 40, Data::Subset),
    ];

    pub fn run(gpu: &Arc<Gpu>) {
        for (i, &(v, h, n, k, data)) in CASES.iter().enumerate() {
            let case = format!("V={v} H={h} N={n} k={k} {data:?}");
            let mut table = random_f32(v * h, 100 + i as u64);
            let mut queries = random_f32(n * h, 200 + i as u64);
            if let Data::Adversarial = data {
                for r in 0..v {
                    let src = (r % 3) * h;
                    let row: Vec<f32> = table[src..src + h].to_vec();
                    table[r * h..(r + 1) * h].copy_from_slice(&row);
                }
                table[(v / 2) * h..(v / 2 + 1) * h].fill(0.0);
                for q in 0..n {
                    let src = ((q * 7) % v) * h;
                    let row: Vec<f32> = table[src..src + h].to_vec();
                    queries[q * h..(q + 1) * h].copy_from_slice(&row);
                }
                queries[..h].fill(0.0);
            }
            let mut cpu = EmbeddingRounder::from_table(&table, v, h).unwrap();
            if let Data::Subset = data {
                cpu = cpu.with_candidate_range(8..v as u32).unwrap();
            }
            let dev = GpuEmbeddingRounder::new(gpu, &cpu).unwrap();
            let got = dev.knn(&queries, n, k).unwrap();
            let want = cpu.knn(&queries, n, k).unwrap();
            assert_eq!((got.n(), got.k()), (n, k), "{case}");
            let (mut worst_same, mut worst_cpu, mut id_diffs) = (0f64, 0f64, 0usize);
            for qi in 0..n {
                let q = &queries[qi * h..(qi + 1) * h];
                let (ids, sims) = got.row(qi).unwrap();
                let same = |id: u32| bf16_sim(&cpu, q, id);
                let f32s = |id: u32| f32_sim(&cpu, q, id);
                worst_same = worst_same.max(check_row(
                    &case,
                    cpu.candidates(),
                    ids,
                    sims,
                    &same,
                    TOL_SAME_TABLE,
                    TIE_SAME_TABLE,
                ));
                worst_cpu = worst_cpu.max(check_row(
                    &case,
                    cpu.candidates(),
                    ids,
                    sims,
                    &f32s,
                    TOL_CPU,
                    2.0 * TOL_CPU,
                ));
                let (cpu_ids, _) = want.row(qi).unwrap();
                id_diffs += ids.iter().zip(cpu_ids).filter(|(a, b)| a != b).count();
            }
            // Device API, workspace reused across two calls: identical to the host API.
            let stream = gpu.stream();
            let qd = stream.clone_htod(&queries).unwrap();
            let mut ids_d = stream.alloc_zeros::<u32>(n * k).unwrap();
            let mut sims_d = stream.alloc_zeros::<f32>(n * k).unwrap();
            let mut ws = KnnWorkspace::new(&dev, n, k).unwrap();
            for _ in 0..2 {
                dev.knn_device(
                    &qd.as_view(),
                    n,
                    k,
                    &mut ids_d.as_view_mut(),
                    &mut sims_d.as_view_mut(),
                    &mut ws,
                )
                .unwrap();
            }
            assert_eq!(stream.clone_dtoh(&ids_d).unwrap(), got.ids(), "{case}");
            assert_eq!(
                stream.clone_dtoh(&sims_d).unwrap(),
                got.similarities(),
                "{case}"
            );
            println!(
                "{case}: plan {:?}, max |sim err| vs same bf16 table {worst_same:.2e}, vs f32 CPU {worst_cpu:.2e}, ids differing from the CPU (ties) {id_diffs}/{}",
                dev.plan(n, k),
                n * k
            );
        }
    }
}

#[cfg(feature = "cuda")]
mod bad_input {
    use std::sync::Arc;

    use tritter::paradigm::rounder::EmbeddingRounder;
    use tritter::paradigm::rounder_cuda::{GpuEmbeddingRounder, KnnWorkspace, GPU_MAX_K};
    use tritter::TritterError;
    use tritter_kernels_cuda::testing::random_f32;
    use tritter_kernels_cuda::Gpu;

    pub fn run(gpu: &Arc<Gpu>) {
        let (v, h) = (300, 64);
        let cpu = EmbeddingRounder::from_table(&random_f32(v * h, 1), v, h).unwrap();
        let dev = GpuEmbeddingRounder::new(gpu, &cpu).unwrap();
        let q = random_f32(2 * h, 2);
        let is_arg = |e: TritterError, what: &str| {
            assert!(
                matches!(&e, TritterError::InvalidArgument { what: w, .. } if *w == what),
                "{e}"
            );
        };
        is_arg(dev.knn(&q, 2, 0).unwrap_err(), "k");
        is_arg(dev.knn(&q, 2, GPU_MAX_K + 1).unwrap_err(), "k");
        let small = cpu.clone().with_candidates(&[1, 2, 3]).unwrap();
        let dev_small = GpuEmbeddingRounder::new(gpu, &small).unwrap();
        is_arg(dev_small.knn(&q, 2, 4).unwrap_err(), "k");
        assert!(matches!(
            dev.knn(&q[1..], 2, 1),
            Err(TritterError::ShapeMismatch { .. })
        ));
        let mut qn = q.clone();
        qn[5] = f32::NAN;
        assert!(matches!(
            dev.knn(&qn, 2, 1),
            Err(TritterError::NonFinite { index: 5, .. })
        ));
        let stream = gpu.stream();
        let qd = stream.clone_htod(&q).unwrap();
        let mut ids = stream.alloc_zeros::<u32>(2 * 8).unwrap();
        let mut sims = stream.alloc_zeros::<f32>(2 * 8).unwrap();
        let mut ws = KnnWorkspace::new(&dev, 1, 1).unwrap();
        let e = dev
            .knn_device(
                &qd.as_view(),
                2,
                8,
                &mut ids.as_view_mut(),
                &mut sims.as_view_mut(),
                &mut ws,
            )
            .unwrap_err();
        is_arg(e, "KNN workspace");
        let mut ws = KnnWorkspace::new(&dev, 2, 8).unwrap();
        let e = dev
            .knn_device(
                &qd.as_view(),
                2,
                7,
                &mut ids.as_view_mut(),
                &mut sims.as_view_mut(),
                &mut ws,
            )
            .unwrap_err();
        assert!(matches!(e, TritterError::ShapeMismatch { .. }), "{e}");
        assert_eq!(dev.knn(&[], 0, 3).unwrap().n(), 0);
    }
}
