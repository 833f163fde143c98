//! Ternary matrices and CPU products: pack/unpack and absmean round trips, validation, and
//! the fast W2A8 kernels (scalar and AVX2) against the scalar reference, exactly; the
//! transposed (STE backward) product and the squared-ReLU GLU MLP; the GPU GEMV table.

use proptest::prelude::*;
use ternary_gemm::{
    absmax_quantize_rows, absmean_quantize, load_ternary_safetensors, pack_ternary_rows,
    save_ternary_safetensors, ternary_from_safetensors, ternary_matmul_a8, ternary_matmul_a8_acc,
    ternary_matmul_a8_acc_ref, ternary_matmul_a8_ref, ternary_matmul_f32_ref, ternary_matmul_t,
    ternary_matmul_t_ref, ternary_to_safetensors, unpack_ternary_rows, words_per_row, CpuKernel,
    ScaleGranularity, TernaryMatrix, TernaryMlp, TernaryScales, CODES_PER_WORD,
};
use ternary_gemm::{
    repack_tiles, tiled_len, tiled_word_index, unrepack_tiles, TILE_BLOCK_WORDS, TILE_ROWS,
    TILE_ROW_WORDS, ZERO_WORD,
};

/// Largest k_in drawn: several 128-weight SIMD blocks plus a partial one.
const MAX_K: usize = 3 * 128 + 37;
const MAX_N: usize = 70;
/// Largest M drawn: more than one 4-row activation tile, and the decode range.
const MAX_M: usize = 9;

/// Scale granularity of a case.
fn granularity(per_row: bool) -> ScaleGranularity {
    if per_row {
        ScaleGranularity::PerRow
    } else {
        ScaleGranularity::PerTensor
    }
}

/// A GPU conformance test: `$module::run(&gpu)` when a GPU is usable (skipped with a printed
/// reason otherwise, failed under `TRITTER_REQUIRE_GPU=1`); without feature `cuda`,
/// `$module` is an uninhabited stub, so the test compiles and reports in every build.
use tritter_kernels_cuda::gpu_test;

fn shape() -> impl Strategy<Value = (usize, usize, usize)> {
    (1..=MAX_N, 1..=MAX_K, 1..=MAX_M)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// pack then unpack returns the values; the packed length is n * ceil(k / 16).
    #[test]
    fn pack_unpack_round_trip((n, k) in (1..=MAX_N, 1..=MAX_K), seed in any::<u64>()) {
        let values: Vec<i8> = (0..n * k).map(|i| ((seed.wrapping_mul(i as u64 + 1) >> 7) % 3) as i8 - 1).collect();
        let packed = pack_ternary_rows(&values, n, k).unwrap();
        prop_assert_eq!(packed.len(), n * words_per_row(k));
        prop_assert_eq!(unpack_ternary_rows(&packed, n, k).unwrap(), values.clone());
        let m = TernaryMatrix::from_packed(n, k, packed, TernaryScales::PerTensor(0.5)).unwrap();
        prop_assert_eq!(m.values(), values);
    }

    /// The tiled device layout is a permutation plus ZERO_WORD padding: unrepack(repack(W))
    /// == W, every canonical word lands once, each lane's 4 words are (row g, word t),
    /// (g + 8, t), (g, t + 4), (g + 8, t + 4) of its block, and foreign padding is rejected.
    #[test]
    fn tiled_layout_round_trip((n, k) in (1..=MAX_N, 1..=MAX_K), seed in any::<u64>()) {
        let wpr = words_per_row(k);
        let packed: Vec<u32> = (0..n * wpr).map(|i| (seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) as u32).collect();
        let tiled = repack_tiles(&packed, n, k).unwrap();
        let quads = wpr.div_ceil(TILE_ROW_WORDS);
        prop_assert_eq!(tiled.len(), tiled_len(n, k));
        prop_assert_eq!(tiled.len(), n.div_ceil(TILE_ROWS) * quads * TILE_BLOCK_WORDS);
        prop_assert_eq!(unrepack_tiles(&tiled, n, k).unwrap(), packed.clone());
        // Lane (g, t) of block (T, q): words at 4 (4 g + t) .. +4 of the block.
        let (r, w) = ((seed as usize) % n, (seed as usize >> 16) % wpr);
        let (tile, q, g, t) = (r / TILE_ROWS, w / TILE_ROW_WORDS, r % 8, w % 4);
        let lane_base = (tile * quads + q) * TILE_BLOCK_WORDS + 4 * (4 * g + t);
        let slot = 2 * ((w % TILE_ROW_WORDS) / 4) + (r % TILE_ROWS) / 8;
        prop_assert_eq!(tiled_word_index(r, w, quads), lane_base + slot);
        prop_assert_eq!(tiled[lane_base + slot], packed[r * wpr + w]);
        let pads = tiled.len() - n * wpr;
        prop_assert_eq!(tiled.iter().filter(|&&v| v == ZERO_WORD).count() >= pads, true);
        if pads > 0 {
            let mut bad = tiled.clone();
            let i = (0..bad.len()).rev().find(|&i| (0..n).all(|r| (0..wpr).all(|w| tiled_word_index(r, w, quads) != i))).unwrap();
            bad[i] = 0;
            prop_assert!(unrepack_tiles(&bad, n, k).is_err());
        }
        prop_assert!(unrepack_tiles(&tiled[1..], n, k).is_err());
    }

    /// absmean: values are ternary, the scale is mean|W|, and quantize(dequantize(Wq)) == Wq.
    #[test]
    fn absmean_round_trip((n, k) in (1..=MAX_N, 1..=MAX_K), w in prop::collection::vec(-3.0f32..3.0, MAX_N * MAX_K), per_row in any::<bool>()) {
        let w = &w[..n * k];
        let g = granularity(per_row);
        let m = absmean_quantize(w, n, k, g).unwrap();
        let mean = w.iter().map(|v| f64::from(v.abs())).sum::<f64>() / (n * k) as f64;
        if !per_row {
            prop_assert!((f64::from(m.scales().row(0)) - mean).abs() <= 1e-6 * mean.max(1e-6));
        }
        // Idempotence: re-quantizing Wq * gamma gives gamma' = f * gamma (f = fraction of
        // non-zeros <= 1), so every non-zero maps to 1 / (f + eps / gamma) >= 0.5 and keeps its
        // sign, and zeros stay zero: the ternary values are unchanged wherever gamma >> eps.
        let again = absmean_quantize(&m.dequantize(), n, k, g).unwrap();
        let (a, b) = (m.values(), again.values());
        for r in 0..n {
            if m.scales().row(r) > 1e-4 {
                prop_assert_eq!(&a[r * k..(r + 1) * k], &b[r * k..(r + 1) * k], "row {}", r);
            }
        }
    }

    /// The fast A8 kernels (auto = AVX2 here when present, and scalar) equal the reference
    /// accumulators exactly, on shapes with k % 16 != 0, n_out = 1 and M = 1 included.
    #[test]
    fn a8_fast_equals_reference((n, k, m) in shape(), seed in any::<u64>()) {
        let vals: Vec<i8> = (0..n * k).map(|i| ((seed ^ (i as u64 * 0x9E37)) % 3) as i8 - 1).collect();
        let w = TernaryMatrix::from_values(n, k, &vals, TernaryScales::PerTensor(0.25)).unwrap();
        let codes: Vec<i8> = (0..m * k).map(|i| (seed.wrapping_add(i as u64 * 0x2545F491) >> 11) as i8).collect();
        let want = ternary_matmul_a8_acc_ref(&w, &codes, m).unwrap();
        prop_assert_eq!(&ternary_matmul_a8_acc(&w, &codes, m, CpuKernel::Auto).unwrap(), &want);
        prop_assert_eq!(&ternary_matmul_a8_acc(&w, &codes, m, CpuKernel::Scalar).unwrap(), &want);
    }

    /// The f32 reference equals a plain matmul with the dequantized weights; the A8 product
    /// tracks it within the activation quantization error.
    #[test]
    fn f32_reference_and_a8_agree((n, k, m) in shape(), x in prop::collection::vec(-2.0f32..2.0, MAX_M * MAX_K), wv in prop::collection::vec(-1.0f32..1.0, MAX_N * MAX_K)) {
        let x = &x[..m * k];
        let w = absmean_quantize(&wv[..n * k], n, k, ScaleGranularity::PerRow).unwrap();
        let deq = w.dequantize();
        let y = ternary_matmul_f32_ref(&w, x, m).unwrap();
        for mi in 0..m {
            for ni in 0..n {
                let plain: f64 = (0..k).map(|kk| f64::from(x[mi * k + kk]) * f64::from(deq[ni * k + kk])).sum();
                prop_assert!((f64::from(y[mi * n + ni]) - plain).abs() <= 1e-5 * (1.0 + plain.abs()));
            }
        }
        let xq = absmax_quantize_rows(x, m, k).unwrap();
        let y8 = ternary_matmul_a8(&w, &xq).unwrap();
        prop_assert_eq!(&y8, &ternary_matmul_a8_ref(&w, &xq).unwrap());
        for mi in 0..m {
            // each activation is off by at most half a step, 0.5 / s, and |Wq| <= 1
            let bound_x = 0.5 / xq.scales[mi] * k as f32;
            for ni in 0..n {
                let g = w.scales().row(ni);
                let err = (y8[mi * n + ni] - y[mi * n + ni]).abs();
                prop_assert!(err <= g * bound_x * 1.001 + 1e-4, "m {} n {}: {} vs {}", mi, ni, y8[mi * n + ni], y[mi * n + ni]);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// The transposed product is the adjoint of the forward product,
    /// <dy, x·(Wq γ)ᵀ> = <dy·(Wq γ), x>, and the fast CPU path matches the f64 reference.
    #[test]
    fn transposed_is_adjoint_and_fast_matches((n, k, m) in shape(), wv in prop::collection::vec(-1.0f32..1.0, MAX_N * MAX_K), x in prop::collection::vec(-2.0f32..2.0, MAX_M * MAX_K), dy in prop::collection::vec(-2.0f32..2.0, MAX_M * MAX_N)) {
        let w = absmean_quantize(&wv[..n * k], n, k, ScaleGranularity::PerRow).unwrap();
        let (x, dy) = (&x[..m * k], &dy[..m * n]);
        let y = ternary_matmul_f32_ref(&w, x, m).unwrap();
        let dx = ternary_matmul_t_ref(&w, dy, m).unwrap();
        let lhs: f64 = dy.iter().zip(&y).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
        let rhs: f64 = dx.iter().zip(x).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
        // y and dx are f64 sums rounded to f32 (relative error <= 2^-24 each), so the two
        // inner products differ by at most 2^-24 times their absolute sums (plus f64 noise).
        let abs_l: f64 = dy.iter().zip(&y).map(|(a, b)| f64::from(a.abs()) * f64::from(b.abs())).sum();
        let abs_r: f64 = dx.iter().zip(x).map(|(a, b)| f64::from(a.abs()) * f64::from(b.abs())).sum();
        prop_assert!((lhs - rhs).abs() <= 1.2e-7 * (abs_l + abs_r) + 1e-12, "adjoint: {} vs {}", lhs, rhs);
        let fast = ternary_matmul_t(&w, dy, m).unwrap();
        for (i, (a, b)) in fast.iter().zip(&dx).enumerate() {
            // f32 accumulation over n_out terms of magnitude <= |dy| * gamma
            let bound = 1e-5 * (1.0 + (n as f32) * 2.0 * w.scales().as_slice().iter().fold(0f32, |m, g| m.max(*g)));
            prop_assert!((a - b).abs() <= bound, "dx[{}]: {} vs {}", i, a, b);
        }
    }

    /// The squared-ReLU GLU MLP: fast CPU forward equals the reference bit for bit, and every
    /// output lies within the propagated A8 error of the same MLP computed in f64 without
    /// activation quantization (interval bound: gate/up off by <= gamma·Σ|Wq|·0.5/s, pushed
    /// through relu(g)²·u over the error box, plus the hidden A8 step <= max|h|/254).
    #[test]
    fn mlp_fast_equals_reference_and_within_a8_bound(hidden in 1usize..=96, inter in 1usize..=160, m in 1usize..=MAX_M, seed in any::<u64>()) {
        use tritter_kernels_cuda::testing::random_f32;
        let q = |r, c, s| absmean_quantize(&random_f32(r * c, s), r, c, ScaleGranularity::PerTensor).unwrap();
        let mlp = TernaryMlp::new(q(inter, hidden, seed), q(inter, hidden, seed ^ 1), q(hidden, inter, seed ^ 2)).unwrap();
        let x = random_f32(m * hidden, seed ^ 3);
        let y = mlp.forward(&x, m).unwrap();
        prop_assert_eq!(&y, &mlp.forward_ref(&x, m).unwrap());
        let (g, u, d) = mlp.parts();
        let (gv, uv, dv) = (g.values(), u.values(), d.values());
        let xq = absmax_quantize_rows(&x, m, hidden).unwrap();
        for mi in 0..m {
            let xr = &x[mi * hidden..(mi + 1) * hidden];
            let step = 0.5 / f64::from(xq.scales[mi]);
            // (f64 value, absolute A8 error bound) of gate and up outputs
            let proj = |w: &TernaryMatrix, v: &[i8], i: usize| {
                let row = &v[i * hidden..(i + 1) * hidden];
                let gam = f64::from(w.scales().row(i));
                let val: f64 = row.iter().zip(xr).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() * gam;
                let mag: f64 = row.iter().zip(xr).map(|(&a, &b)| f64::from(a.abs()) * f64::from(b.abs())).sum::<f64>() * gam;
                let err = gam * row.iter().map(|&a| f64::from(a.abs())).sum::<f64>() * step * (1.0 + 1e-6) + 1e-6 * mag;
                (val, err)
            };
            let mut hf = vec![0f64; inter];
            let mut herr = vec![0f64; inter];
            let mut hmax = 0f64;
            for i in 0..inter {
                let ((gf, eg), (uf, eu)) = (proj(g, &gv, i), proj(u, &uv, i));
                let r = |v: f64| v.max(0.0).powi(2);
                hf[i] = r(gf) * uf;
                let corners = [r(gf - eg) * (uf - eu), r(gf - eg) * (uf + eu), r(gf + eg) * (uf - eu), r(gf + eg) * (uf + eu)];
                let (lo, hi) = corners.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &c| (lo.min(c), hi.max(c)));
                herr[i] = (hi - hf[i]).max(hf[i] - lo) + 1e-6 * hf[i].abs();
                hmax = hmax.max(hi.abs()).max(lo.abs());
            }
            for o in 0..hidden {
                let row = &dv[o * inter..(o + 1) * inter];
                let gam = f64::from(d.scales().row(o));
                let yf: f64 = row.iter().zip(&hf).map(|(&a, &h)| f64::from(a) * h).sum::<f64>() * gam;
                let bound: f64 = gam * row.iter().zip(&herr).map(|(&a, &e)| f64::from(a.abs()) * (e + hmax / 254.0)).sum::<f64>();
                let got = f64::from(y[mi * hidden + o]);
                prop_assert!((got - yf).abs() <= bound * (1.0 + 1e-4) + 1e-5 * (1.0 + yf.abs()), "m {} o {}: {} vs {} (bound {})", mi, o, got, yf, bound);
            }
        }
    }
}

/// MLP projections with inconsistent shapes are refused, naming the mismatch.
#[test]
fn mlp_shape_mismatch_is_typed() {
    let z = |r: usize, c: usize| {
        TernaryMatrix::from_values(r, c, &vec![0; r * c], TernaryScales::PerTensor(1.0)).unwrap()
    };
    let err = TernaryMlp::new(z(8, 4), z(8, 4), z(4, 7)).unwrap_err();
    assert!(
        err.to_string().contains('7') && err.to_string().contains('8'),
        "{err}"
    );
    assert!(ternary_matmul_t(&z(8, 4), &[0.0; 7], 1).is_err());
    assert!(ternary_matmul_t(&z(8, 4), &[f32::NAN; 8], 1).is_err());
}

/// Shape and value errors are typed and name the numbers involved.
#[test]
fn bad_inputs_are_typed_errors() {
    let w = TernaryMatrix::from_values(
        2,
        CODES_PER_WORD + 1,
        &[0; 2 * (CODES_PER_WORD + 1)],
        TernaryScales::PerTensor(1.0),
    )
    .unwrap();
    let err = ternary_matmul_a8_acc(&w, &[0; CODES_PER_WORD], 1, CpuKernel::Auto).unwrap_err();
    assert!(
        err.to_string().contains(&format!("{}", CODES_PER_WORD + 1)),
        "{err}"
    );
    assert!(ternary_matmul_f32_ref(&w, &[], 0).is_err());
    assert!(pack_ternary_rows(&[2], 1, 1).is_err());
    assert!(absmean_quantize(&[f32::NAN, 1.0], 1, 2, ScaleGranularity::PerTensor).is_err());
    assert!(absmean_quantize::<f32>(&[], 0, 2, ScaleGranularity::PerTensor).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// safetensors save -> load returns the same matrix, for both scale granularities.
    #[test]
    fn safetensors_round_trip((n, k) in (1..=MAX_N, 1..=MAX_K), w in prop::collection::vec(-1.0f32..1.0, MAX_N * MAX_K), per_row in any::<bool>()) {
        let g = granularity(per_row);
        let a = absmean_quantize(&w[..n * k], n, k, g).unwrap();
        let b = absmean_quantize(&w[..k], 1, k, ScaleGranularity::PerTensor).unwrap();
        let bytes = ternary_to_safetensors(&[("layers.0.q", &a), ("layers.0.k", &b)]).unwrap();
        prop_assert_eq!(ternary_from_safetensors(&bytes, "layers.0.q").unwrap(), a);
        prop_assert_eq!(ternary_from_safetensors(&bytes, "layers.0.k").unwrap(), b);
    }
}

/// A file on disk round-trips; corrupt codes, a missing name and a foreign file are errors.
#[test]
fn safetensors_file_and_corruption() {
    let dir = std::env::temp_dir().join(format!("ternary-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    let k = CODES_PER_WORD * 2 + 3;
    let vals: Vec<i8> = (0..3 * k).map(|i| (i % 3) as i8 - 1).collect();
    let m = TernaryMatrix::from_values(3, k, &vals, TernaryScales::PerRow(vec![0.5, 1.0, 2.0]))
        .unwrap();
    save_ternary_safetensors(&path, &[("w", &m)]).unwrap();
    assert_eq!(load_ternary_safetensors(&path, "w").unwrap(), m);
    assert!(load_ternary_safetensors(&path, "missing")
        .unwrap_err()
        .to_string()
        .contains("missing"));

    // Turn the first weight's code into 3 (its offset read from the header): loading must
    // refuse it.
    let mut bytes = std::fs::read(&path).unwrap();
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let start = meta.info("w.packed").unwrap().data_offsets.0;
    bytes[8 + header_len + start] |= 0x03;
    assert!(ternary_from_safetensors(&bytes, "w").is_err());
    assert!(ternary_from_safetensors(b"not a safetensors file", "w").is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// GPU conformance cases (n_out, k_in, M): degenerate ends, k_in not a multiple of 16 / 64
/// (word-load kernel), one partial 16-row tile, split-K shapes, M in the 8-row and 32-row
/// kernels, the tiled GEMM (M > 32, K % 64 == 0, partial 64 x 64 tiles), its split-K for
/// small grids of 9..32 rows, and the word path above one 32-row chunk, and the 3B/7B
/// projection shapes.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GEMV_CASES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 16, 1),
    (17, 33, 3),
    (16, 64, 8),
    (33, 130, 5),
    (100, 1000, 11),
    (3, 2560, 16),
    (2560, 2560, 1),
    (4096, 4096, 1),
    (4096, 4096, 8),
    (1024, 16384, 8),
    (4096, 16384, 1),
    // M = 1, >= 2 batches of 4 blocks per warp, one wave of 16-row CTAs: the `_kl`
    // variant (activations a batch ahead), ragged in n_out and K, and with K split 3 ways
    // (88 CTAs on 132 SMs).
    (2500, 5000, 1),
    (1400, 16384, 1),
    (16384, 4096, 2),
    // >= 64 x 132 rows: the 64-row-CTA variant at M = 1 (ragged n_out, K % 128 != 0).
    (8500, 1000, 1),
    (48, 256, 32),
    (40, 2560, 21),
    (1024, 4096, 70),
    (100, 640, 64),
    (256, 1024, 130),
    (70, 4096, 257),
    (30, 1000, 45),
    // Split-K GEMM (9..32 rows, fewer small tiles than SMs, >= 16 quads): the 7B o and down
    // projections at a decode batch of 32 (4 and 5 splits on 132 SMs), and a ragged one
    // (K = 5000 ends inside a quad, n_out inside a tile) in 5 splits.
    (4096, 4096, 32),
    (4096, 13824, 32),
    (1000, 5000, 27),
    // Grid of 17 x 17 large (128 x 128) tiles, above the small-tile threshold of two CTAs
    // per SM on any GPU with <= 144 SMs: the large GEMM configuration, ragged in n_out and
    // M, and K = 1088 ends in half a 128-weight quad.
    (2100, 1088, 2049),
];

gpu_test!(
    /// GPU W2A8 product equals the CPU reference bit for bit (exact integer accumulation, same
    /// f32 epilogue) for per-tensor and per-row scales over the case table.
    gemv_gpu_matches_cpu_reference => gemv_conformance
);

#[cfg(feature = "cuda")]
mod gemv_conformance {
    use super::*;
    use half::bf16;
    use ternary_gemm::cuda::{
        ternary_matmul_a8_cuda, GemvActivations, GemvWorkspace, TernaryMatrixGpu,
    };
    use ternary_gemm::{gemv_order_codes, TernaryError};
    use tritter_kernels_cuda::testing::random_f32;
    use tritter_kernels_cuda::Gpu;

    pub fn run(gpu: &Gpu) {
        let stream = gpu.stream();
        // One workspace for every case: also checks the kernel leaves it zeroed between calls.
        let max_n = GEMV_CASES.iter().map(|c| c.0).max().unwrap();
        let mut ws = GemvWorkspace::new(gpu, max_n).unwrap();
        for (i, &(n, k, m)) in GEMV_CASES.iter().enumerate() {
            for per_row in [false, true] {
                let g = granularity(per_row);
                let w = absmean_quantize(&random_f32(n * k, i as u64), n, k, g).unwrap();
                let xq = absmax_quantize_rows(&random_f32(m * k, 100 + i as u64), m, k).unwrap();
                let want = ternary_matmul_a8_ref(&w, &xq).unwrap();

                let wg = TernaryMatrixGpu::upload(gpu, &w).unwrap();
                let codes = stream.clone_htod(&xq.codes).unwrap();
                let scales = stream.clone_htod(&xq.scales).unwrap();
                let mut acts = GemvActivations::new(gpu, m, k).unwrap();
                acts.load_codes(gpu, &codes.as_view(), &scales.as_view())
                    .unwrap();
                let (want_mma, want_sums) = gemv_order_codes(&xq.codes, m, k).unwrap();
                assert_eq!(
                    stream.clone_dtoh(&acts.codes_mma).unwrap(),
                    want_mma,
                    "a8_to_mma layout"
                );
                assert_eq!(
                    stream.clone_dtoh(&acts.sums).unwrap(),
                    want_sums,
                    "a8_to_mma sums"
                );
                // Poison the output so an unwritten element cannot pass.
                let mut y = stream.clone_htod(&vec![f32::NAN; m * n]).unwrap();
                ternary_matmul_a8_cuda(gpu, &wg, &acts, &mut y.as_view_mut(), &mut ws).unwrap();
                let got = stream.clone_dtoh(&y).unwrap();
                let mismatches = got
                    .iter()
                    .zip(&want)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                let max_diff = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                println!(
                    "gemv_w2a8 n_out {n:>5} k_in {k:>5} M {m:>2} {}: mismatches {mismatches}, max |diff| {max_diff:e}",
                    if per_row { "per-row   " } else { "per-tensor" }
                );
                assert_eq!(mismatches, 0, "n {n} k {k} m {m} per_row {per_row}");
            }
        }
        quantize_for_gemv(gpu);
        // Shape errors are typed, before any launch.
        let w =
            absmean_quantize(&random_f32(32 * 64, 1), 32, 64, ScaleGranularity::PerTensor).unwrap();
        let wg = TernaryMatrixGpu::upload(gpu, &w).unwrap();
        let acts = GemvActivations::new(gpu, 1, 63).unwrap();
        let mut y = stream.alloc_zeros::<f32>(32).unwrap();
        let err = ternary_matmul_a8_cuda(gpu, &wg, &acts, &mut y.as_view_mut(), &mut ws);
        assert!(
            matches!(
                err,
                Err(TernaryError::ShapeMismatch {
                    actual: 63,
                    expected: 64,
                    ..
                })
            ),
            "{err:?}"
        );
    }

    /// The fused quantize-into-GEMV-layout kernel equals CPU quantization + layout (codes,
    /// sums, scales bit-exact) for f32 and bf16, flags NaN rows, and the GEMV on its output
    /// equals the CPU reference.
    fn quantize_for_gemv(gpu: &Gpu) {
        let stream = gpu.stream();
        for &(m, k) in &[(1usize, 4096usize), (3, 1000), (8, 2560), (2, 7)] {
            let xf = random_f32(m * k, (m * k) as u64);
            let want = absmax_quantize_rows(&xf, m, k).unwrap();
            let (want_mma, want_sums) = gemv_order_codes(&want.codes, m, k).unwrap();
            let mut acts = GemvActivations::new(gpu, m, k).unwrap();
            acts.quantize_from(gpu, &stream.clone_htod(&xf).unwrap().as_view())
                .unwrap();
            acts.check_finite(gpu).unwrap();
            assert_eq!(
                stream.clone_dtoh(&acts.codes_mma).unwrap(),
                want_mma,
                "f32 {m}x{k} codes"
            );
            assert_eq!(
                stream.clone_dtoh(&acts.sums).unwrap(),
                want_sums,
                "f32 {m}x{k} sums"
            );
            assert_eq!(
                stream.clone_dtoh(&acts.scales).unwrap(),
                want.scales,
                "f32 {m}x{k} scales"
            );

            let xb: Vec<bf16> = xf.iter().map(|&v| bf16::from_f32(v)).collect();
            let want_b = absmax_quantize_rows(&xb, m, k).unwrap();
            acts.quantize_from(gpu, &stream.clone_htod(&xb).unwrap().as_view())
                .unwrap();
            assert_eq!(
                stream.clone_dtoh(&acts.codes_mma).unwrap(),
                gemv_order_codes(&want_b.codes, m, k).unwrap().0
            );
            assert_eq!(
                stream.clone_dtoh(&acts.scales).unwrap(),
                want_b.scales,
                "bf16 {m}x{k} scales"
            );

            let n = 40;
            let w =
                absmean_quantize(&random_f32(n * k, 9), n, k, ScaleGranularity::PerTensor).unwrap();
            let mut ws = GemvWorkspace::new(gpu, n).unwrap();
            let mut y = stream.alloc_zeros::<f32>(m * n).unwrap();
            ternary_matmul_a8_cuda(
                gpu,
                &TernaryMatrixGpu::upload(gpu, &w).unwrap(),
                &acts,
                &mut y.as_view_mut(),
                &mut ws,
            )
            .unwrap();
            assert_eq!(
                stream.clone_dtoh(&y).unwrap(),
                ternary_matmul_a8_ref(&w, &want_b).unwrap(),
                "bf16 {m}x{k} GEMV"
            );
        }
        let mut xf = random_f32(3 * 64, 4);
        xf[64 + 5] = f32::NAN;
        let mut acts = GemvActivations::new(gpu, 3, 64).unwrap();
        acts.quantize_from(gpu, &stream.clone_htod(&xf).unwrap().as_view())
            .unwrap();
        assert!(matches!(
            acts.check_finite(gpu),
            Err(TernaryError::NonFiniteRows {
                rows: 1,
                total: 3,
                ..
            })
        ));
        // Flags are per row and rewritten by every fill: a clean refill clears them.
        xf[64 + 5] = 0.5;
        acts.quantize_from(gpu, &stream.clone_htod(&xf).unwrap().as_view())
            .unwrap();
        acts.check_finite(gpu).unwrap();
    }
}

/// GPU transposed-product cases (n_out, k_in, M): degenerate ends, n_out not a multiple of
/// 8 (the unaligned-dY kernel), partial 128 x 128 output tiles and 64-row reduction stages,
/// k_in not a multiple of 16, and a 7B-shaped backward slice.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GEMM_T_CASES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (17, 33, 3),
    (64, 128, 128),
    (100, 1000, 130),
    (256, 1024, 257),
    (72, 2049, 33),
    (2560, 2560, 64),
    (4096, 1024, 256),
];

gpu_test!(
    /// GPU `dx = dy · (Wq * gamma)` (bf16 dy, f32 accumulation) matches the f64 CPU reference
    /// computed on the same bf16 inputs and bf16-rounded per-row scales, within the worst-case
    /// bound of f32 summation (n_out * 2^-23 times the terms' absolute sum: bf16 products are
    /// exact in f32, so summation is the only error), for per-tensor and per-row scales; every
    /// output element is written.
    gemm_t_gpu_matches_cpu_reference => gemm_t_conformance
);

#[cfg(feature = "cuda")]
mod gemm_t_conformance {
    use super::*;
    use half::bf16;
    use ternary_gemm::cuda::{ternary_matmul_t_cuda, TernaryMatrixGpu};
    use ternary_gemm::{TernaryError, TernaryMatrix, TernaryScales};
    use tritter_kernels_cuda::testing::random_f32;
    use tritter_kernels_cuda::Gpu;

    /// `w` with its scales rounded to bf16 when per row (what the kernel folds into the
    /// decoded tile), and `|w|` with `|gamma|` for the error bound.
    fn as_kernel_sees(w: &TernaryMatrix) -> (TernaryMatrix, TernaryMatrix) {
        let (n, k) = (w.n_out(), w.k_in());
        let scales = match w.scales() {
            TernaryScales::PerTensor(g) => TernaryScales::PerTensor(*g),
            TernaryScales::PerRow(g) => {
                TernaryScales::PerRow(g.iter().map(|&v| bf16::from_f32(v).to_f32()).collect())
            }
        };
        let abs_scales = match &scales {
            TernaryScales::PerTensor(g) => TernaryScales::PerTensor(g.abs()),
            TernaryScales::PerRow(g) => TernaryScales::PerRow(g.iter().map(|v| v.abs()).collect()),
        };
        let values = w.values();
        let abs: Vec<i8> = values.iter().map(|v| v.abs()).collect();
        (
            TernaryMatrix::from_values(n, k, &values, scales).unwrap(),
            TernaryMatrix::from_values(n, k, &abs, abs_scales).unwrap(),
        )
    }

    pub fn run(gpu: &Gpu) {
        let stream = gpu.stream();
        for (i, &(n, k, m)) in GEMM_T_CASES.iter().enumerate() {
            for per_row in [false, true] {
                let g = granularity(per_row);
                let w = absmean_quantize(&random_f32(n * k, 7 + i as u64), n, k, g).unwrap();
                let dy: Vec<bf16> = random_f32(m * n, 300 + i as u64)
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect();
                let dy_f32: Vec<f32> = dy.iter().map(|v| v.to_f32()).collect();
                let dy_abs: Vec<f32> = dy_f32.iter().map(|v| v.abs()).collect();
                let (w_seen, w_abs) = as_kernel_sees(&w);
                let want = ternary_matmul_t_ref(&w_seen, &dy_f32, m).unwrap();
                let bound = ternary_matmul_t_ref(&w_abs, &dy_abs, m).unwrap();

                let wg = TernaryMatrixGpu::upload(gpu, &w).unwrap();
                let dyg = stream.clone_htod(&dy).unwrap();
                let mut dx = stream.clone_htod(&vec![f32::NAN; m * k]).unwrap();
                ternary_matmul_t_cuda(gpu, &wg, &dyg.as_view(), m, &mut dx.as_view_mut()).unwrap();
                let got = stream.clone_dtoh(&dx).unwrap();
                let mut worst = 0f64;
                for ((&a, &b), &s) in got.iter().zip(&want).zip(&bound) {
                    let tol =
                        f64::from(s) * n as f64 * 2f64.powi(-23) + f64::from(f32::MIN_POSITIVE);
                    let err = (f64::from(a) - f64::from(b)).abs();
                    assert!(
                        err <= tol,
                        "n {n} k {k} m {m} per_row {per_row}: got {a}, want {b} (tolerance {tol:e})"
                    );
                    worst = worst.max(err / tol);
                }
                println!(
                    "gemm_t_bf16 n_out {n:>5} k_in {k:>5} M {m:>3} {}: max error / tolerance {worst:.3}",
                    if per_row { "per-row   " } else { "per-tensor" }
                );
            }
        }
        // Shape errors are typed, before any launch.
        let w =
            absmean_quantize(&random_f32(32 * 64, 1), 32, 64, ScaleGranularity::PerTensor).unwrap();
        let wg = TernaryMatrixGpu::upload(gpu, &w).unwrap();
        let dy = stream.alloc_zeros::<bf16>(2 * 31).unwrap();
        let mut dx = stream.alloc_zeros::<f32>(2 * 64).unwrap();
        let err = ternary_matmul_t_cuda(gpu, &wg, &dy.as_view(), 2, &mut dx.as_view_mut());
        assert!(
            matches!(
                err,
                Err(TernaryError::LengthMismatch {
                    actual: 62,
                    expected: 64,
                    ..
                })
            ),
            "{err:?}"
        );
    }
}

/// GPU fused MLP cases (hidden, inter, M): inter not a multiple of the 16-row GLU tile,
/// hidden not a multiple of 64 (word-load kernels), M in the 8-row and 32-row kernels and
/// past one 32-row chunk (the down projection then runs the GEMM), and a 7B decode shape.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const MLP_CASES: &[(usize, usize, usize)] = &[
    (64, 48, 1),
    (100, 70, 3),
    (256, 1000, 8),
    (130, 64, 20),
    (512, 1024, 40),
    // A decode batch of 24 whose down projection (512 x 4096, 8 small tiles) runs the
    // split-K GEMM (4 splits).
    (512, 4096, 24),
    // The GEMM path over several MLP_GEMM_ROWS chunks, inter not a multiple of 16.
    (96, 300, 600),
    (4096, 16384, 2),
    // gate/up of 8608 rows: the 64-row-CTA GLU variant at M = 1; the down GEMV splits K.
    (64, 4300, 1),
    // The 3B decode shape: the 64-row GLU variant, then the down GEMV's `_kl` variant.
    (2560, 6912, 1),
];

gpu_test!(
    /// The GPU squared-ReLU GLU MLP (interleaved gate/up GEMV with the relu²⊙ epilogue and the
    /// per-token max, A8 of the hidden vector, down projection) equals
    /// `TernaryMlp::forward_ref` bit for bit, for f32 and bf16 inputs and per-tensor/per-row
    /// scales; a NaN input row is reported by `check_finite`.
    mlp_gpu_matches_cpu_reference => mlp_conformance
);

#[cfg(feature = "cuda")]
mod mlp_conformance {
    use super::*;
    use half::bf16;
    use ternary_gemm::cuda::{ternary_mlp_cuda, MlpWorkspace, TernaryMlpGpu};
    use ternary_gemm::{TernaryError, TernaryMlp};
    use tritter_kernels_cuda::testing::random_f32;
    use tritter_kernels_cuda::Gpu;

    pub fn run(gpu: &Gpu) {
        let stream = gpu.stream();
        for (i, &(h, inter, m)) in MLP_CASES.iter().enumerate() {
            for per_row in [false, true] {
                let g = granularity(per_row);
                let seed = 1000 + 10 * i as u64;
                let mlp = TernaryMlp::new(
                    absmean_quantize(&random_f32(inter * h, seed), inter, h, g).unwrap(),
                    absmean_quantize(&random_f32(inter * h, seed + 1), inter, h, g).unwrap(),
                    absmean_quantize(&random_f32(h * inter, seed + 2), h, inter, g).unwrap(),
                )
                .unwrap();
                let x = random_f32(m * h, seed + 3);
                let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                let xb_f32: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
                let gm = TernaryMlpGpu::upload(gpu, &mlp).unwrap();
                let mut ws = MlpWorkspace::new(gpu, &gm, m).unwrap();
                for (dtype, want) in [
                    ("f32 ", mlp.forward_ref(&x, m).unwrap()),
                    ("bf16", mlp.forward_ref(&xb_f32, m).unwrap()),
                ] {
                    let mut y = stream.clone_htod(&vec![f32::NAN; m * h]).unwrap();
                    if dtype == "f32 " {
                        let xd = stream.clone_htod(&x).unwrap();
                        ternary_mlp_cuda(gpu, &gm, &xd.as_view(), &mut y.as_view_mut(), &mut ws)
                    } else {
                        let xd = stream.clone_htod(&xb).unwrap();
                        ternary_mlp_cuda(gpu, &gm, &xd.as_view(), &mut y.as_view_mut(), &mut ws)
                    }
                    .unwrap();
                    ws.check_finite(gpu).unwrap();
                    let got = stream.clone_dtoh(&y).unwrap();
                    let mismatches = got
                        .iter()
                        .zip(&want)
                        .filter(|(a, b)| a.to_bits() != b.to_bits())
                        .count();
                    println!(
                        "ternary_mlp hidden {h:>5} inter {inter:>5} M {m:>2} {dtype} {}: mismatches {mismatches}",
                        if per_row { "per-row   " } else { "per-tensor" }
                    );
                    assert_eq!(
                        mismatches, 0,
                        "hidden {h} inter {inter} m {m} per_row {per_row} {dtype}"
                    );
                }
            }
        }
        // A NaN input row surfaces as an error, and shape errors are typed.
        let (h, inter, m) = (64, 48, 2);
        let mk = |s| {
            absmean_quantize(
                &random_f32(inter * h, s),
                inter,
                h,
                ScaleGranularity::PerTensor,
            )
            .unwrap()
        };
        let down = absmean_quantize(
            &random_f32(h * inter, 9),
            h,
            inter,
            ScaleGranularity::PerTensor,
        )
        .unwrap();
        let down_copy = down.clone();
        let gm = TernaryMlpGpu::upload(gpu, &TernaryMlp::new(mk(7), mk(8), down).unwrap()).unwrap();
        let mut ws = MlpWorkspace::new(gpu, &gm, m).unwrap();
        let mut x = random_f32(m * h, 5);
        x[h + 3] = f32::NAN;
        let xd = stream.clone_htod(&x).unwrap();
        let mut y = stream.alloc_zeros::<f32>(m * h).unwrap();
        ternary_mlp_cuda(gpu, &gm, &xd.as_view(), &mut y.as_view_mut(), &mut ws).unwrap();
        assert!(matches!(
            ws.check_finite(gpu),
            Err(TernaryError::NonFiniteRows { .. })
        ));
        // The next clean call reports clean (flags rewritten, maxima reset).
        x[h + 3] = 0.25;
        let xd = stream.clone_htod(&x).unwrap();
        ternary_mlp_cuda(gpu, &gm, &xd.as_view(), &mut y.as_view_mut(), &mut ws).unwrap();
        ws.check_finite(gpu).unwrap();
        // ... and equals the reference bit for bit: no NaN maximum of h survived the call.
        let want = TernaryMlp::new(mk(7), mk(8), down_copy)
            .unwrap()
            .forward_ref(&x, m)
            .unwrap();
        let got = stream.clone_dtoh(&y).unwrap();
        assert!(got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let mut short = stream.alloc_zeros::<f32>(m * h - 1).unwrap();
        let err = ternary_mlp_cuda(gpu, &gm, &xd.as_view(), &mut short.as_view_mut(), &mut ws);
        assert!(
            matches!(err, Err(TernaryError::LengthMismatch { what: "y", .. })),
            "{err:?}"
        );
    }
}

/// Device absmean cases (n_out, k_in): one word, k_in not a multiple of 16 or of 128 (partial
/// words and tile blocks), n_out not a multiple of 16, and a 7B q/k/v-sized stack.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const ABSMEAN_CASES: &[(usize, usize)] = &[(1, 1), (17, 33), (64, 130), (100, 1000), (1536, 4096)];

gpu_test!(
    /// Device absmean quantization writes the same tiled codes and scales as the CPU
    /// `absmean_quantize` + `repack_tiles` (scales within 1e-6 relative: only the f64
    /// summation order differs), for a whole per-tensor matrix and for a per-row matrix filled
    /// block by block (three stacked layers with their own gamma), re-quantized in place; the
    /// optional bf16 dequantized copy equals `dequantize()` within one bf16 rounding.
    absmean_gpu_matches_cpu => absmean_conformance
);

#[cfg(feature = "cuda")]
mod absmean_conformance {
    use super::*;
    use ternary_gemm::cuda::{
        absmean_dequant_cuda, absmean_quantize_cuda, absmean_quantize_dequant_cuda,
        AbsmeanWorkspace, TernaryMatrixGpu,
    };
    use ternary_gemm::{repack_tiles, TernaryError, TernaryMatrix};
    use tritter_kernels_cuda::testing::random_f32;
    use tritter_kernels_cuda::Gpu;

    /// Tiles and scales of `m` as the device holds them.
    fn download(gpu: &Gpu, m: &TernaryMatrixGpu) -> (Vec<u32>, Vec<f32>) {
        let s = gpu.stream();
        (
            s.clone_dtoh(m.tiles()).unwrap(),
            s.clone_dtoh(m.scales()).unwrap(),
        )
    }

    fn assert_scales(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: scale count");
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{what}: scale {i} is {a}, the CPU gives {b}"
            );
        }
    }

    pub fn run(gpu: &Gpu) {
        let stream = gpu.stream();
        let mut ws = AbsmeanWorkspace::new(gpu).unwrap();
        for (i, &(n, k)) in ABSMEAN_CASES.iter().enumerate() {
            // Whole matrix, per-tensor gamma; quantized twice to show the update is in place.
            let w = random_f32(n * k, 40 + i as u64);
            let want = absmean_quantize(&w, n, k, ScaleGranularity::PerTensor).unwrap();
            let dw = stream.clone_htod(&w).unwrap();
            let mut m = TernaryMatrixGpu::zeros(gpu, n, k, false).unwrap();
            let w0: Vec<f32> = w.iter().map(|v| -2.0 * v).collect();
            let dw0 = stream.clone_htod(&w0).unwrap();
            absmean_quantize_cuda(gpu, &dw0.as_view(), 0..n, &mut m, &mut ws).unwrap();
            let mut deq = stream.alloc_zeros::<half::bf16>(n * k).unwrap();
            absmean_quantize_dequant_cuda(
                gpu,
                &dw.as_view(),
                0..n,
                &mut m,
                &mut ws,
                &mut deq.as_view_mut(),
            )
            .unwrap();
            let (tiles, scales) = download(gpu, &m);
            assert_eq!(
                tiles,
                repack_tiles(want.packed(), n, k).unwrap(),
                "{n}x{k} codes"
            );
            assert_scales(&scales, want.scales().as_slice(), "per-tensor");
            // The dequantize-only kernel writes the same bf16 values as the packer, on the
            // vectorized path (aligned, length % 8 == 0) and the scalar one (an offset view).
            let mut only = stream.alloc_zeros::<half::bf16>(n * k + 1).unwrap();
            for off in [0usize, 1] {
                let mut v = only.slice_mut(off..off + n * k);
                absmean_dequant_cuda(gpu, &dw.as_view(), &mut ws, &mut v).unwrap();
                let got = stream.clone_dtoh(&v).unwrap();
                assert_eq!(
                    got,
                    stream.clone_dtoh(&deq).unwrap(),
                    "{n}x{k} dequantize-only, offset {off}"
                );
            }
            // A copy of another length is refused.
            assert!(
                absmean_dequant_cuda(gpu, &dw.as_view(), &mut ws, &mut only.slice_mut(..)).is_err()
            );
            // The bf16 dequantized copy is Wq * gamma rounded once (within one bf16 step:
            // gamma may differ from the CPU's in its last f32 bit).
            let deq = stream.clone_dtoh(&deq).unwrap();
            for (j, (d, w)) in deq.iter().zip(want.dequantize()).enumerate() {
                let d = d.to_f32();
                assert!(
                    (d - w).abs() <= w.abs() * 2f32.powi(-8),
                    "deq {j}: {d} vs {w}"
                );
            }

            // Three stacked blocks of n rows, each its own gamma, in a per-row matrix.
            let blocks: Vec<Vec<f32>> = (0..3)
                .map(|b| {
                    random_f32(n * k, 90 + 3 * i as u64 + b)
                        .into_iter()
                        .map(|v| v * (1.0 + b as f32))
                        .collect()
                })
                .collect();
            let mut stacked = TernaryMatrixGpu::zeros(gpu, 3 * n, k, true).unwrap();
            let mut values = Vec::new();
            let mut gammas = Vec::new();
            for (b, wb) in blocks.iter().enumerate() {
                let q = absmean_quantize(wb, n, k, ScaleGranularity::PerTensor).unwrap();
                values.extend(q.values());
                gammas.extend(std::iter::repeat_n(q.scales().row(0), n));
                let d = stream.clone_htod(wb).unwrap();
                absmean_quantize_cuda(gpu, &d.as_view(), b * n..(b + 1) * n, &mut stacked, &mut ws)
                    .unwrap();
            }
            let want = TernaryMatrix::from_values(3 * n, k, &values, TernaryScales::PerRow(gammas))
                .unwrap();
            let (tiles, scales) = download(gpu, &stacked);
            assert_eq!(
                tiles,
                repack_tiles(want.packed(), 3 * n, k).unwrap(),
                "stacked codes"
            );
            assert_scales(&scales, want.scales().as_slice(), "stacked");
            println!(
                "absmean {n:>5} x {k:>5}: codes bit-exact, scales within 1e-6 (whole and stacked)"
            );
        }
        // Bad ranges and lengths are typed errors.
        let mut m = TernaryMatrixGpu::zeros(gpu, 32, 64, false).unwrap();
        let d = stream.alloc_zeros::<f32>(16 * 64).unwrap();
        let err = absmean_quantize_cuda(gpu, &d.as_view(), 0..16, &mut m, &mut ws);
        assert!(
            matches!(err, Err(TernaryError::ShapeMismatch { .. })),
            "{err:?}"
        );
        let mut m = TernaryMatrixGpu::zeros(gpu, 32, 64, true).unwrap();
        let err = absmean_quantize_cuda(gpu, &d.as_view(), 0..17, &mut m, &mut ws);
        assert!(
            matches!(err, Err(TernaryError::LengthMismatch { .. })),
            "{err:?}"
        );
        let err = absmean_quantize_cuda(gpu, &d.as_view(), 24..40, &mut m, &mut ws);
        assert!(
            matches!(err, Err(TernaryError::BadDimension { .. })),
            "{err:?}"
        );
    }
}
