//! Ternary matrices and CPU products: pack/unpack and absmean round trips, validation, and
//! the fast W2A8 kernels (scalar and AVX2) against the scalar reference, exactly.

use proptest::prelude::*;
use ternary_gemm::{
    absmax_quantize_rows, absmean_quantize, load_ternary_safetensors, pack_ternary_rows,
    save_ternary_safetensors, ternary_from_safetensors, ternary_matmul_a8, ternary_matmul_a8_acc,
    ternary_matmul_a8_acc_ref, ternary_matmul_a8_ref, ternary_matmul_f32_ref,
    ternary_to_safetensors, unpack_ternary_rows, words_per_row, CpuKernel, ScaleGranularity,
    TernaryMatrix, TernaryScales, CODES_PER_WORD,
};

/// Largest k_in drawn: several 128-weight SIMD blocks plus a partial one.
const MAX_K: usize = 3 * 128 + 37;
const MAX_N: usize = 70;
/// Largest M drawn: more than one 4-row activation tile, and the decode range.
const MAX_M: usize = 9;

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

    /// absmean: values are ternary, the scale is mean|W|, and quantize(dequantize(Wq)) == Wq.
    #[test]
    fn absmean_round_trip((n, k) in (1..=MAX_N, 1..=MAX_K), w in prop::collection::vec(-3.0f32..3.0, MAX_N * MAX_K), per_row in any::<bool>()) {
        let w = &w[..n * k];
        let g = if per_row { ScaleGranularity::PerRow } else { ScaleGranularity::PerTensor };
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
        let g = if per_row { ScaleGranularity::PerRow } else { ScaleGranularity::PerTensor };
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
