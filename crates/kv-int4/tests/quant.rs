//! The INT4 group format: the stated worst-case error bound holds value by value, codes and
//! parameters behave at the edges (constant groups, huge and tiny magnitudes), bad input is
//! a typed error.

use half::f16;
use kv_int4::quant::{check_storable, F16_MAX};
use kv_int4::{dequantize_int4, group_error_bound, quantize_group, quantize_int4, KvError, GROUP};
use proptest::prelude::*;

/// A group drawn at a random magnitude (1e-6 .. 6e4) and offset, so f16 rounding of the
/// minimum and of the scale, and subnormal scales, are all exercised.
fn group() -> impl Strategy<Value = [f32; GROUP]> {
    (
        prop::collection::vec(-1.0f32..1.0, GROUP),
        -6i32..5,
        -1.0f32..1.0,
    )
        .prop_map(|(v, exp, off)| {
            let mag = 10f32.powi(exp);
            std::array::from_fn(|i| ((v[i] + off) * mag).clamp(-F16_MAX, F16_MAX))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every value reconstructs within `scale_h / 2 + |min - min_h| + 2^-20 (1 + max|x|)`.
    #[test]
    fn round_trip_within_bound(x in group()) {
        let g = quantize_group(&x);
        let bound = group_error_bound(&x, &g);
        let back = g.dequantize();
        for i in 0..GROUP {
            prop_assert!((x[i] - back[i]).abs() <= bound, "value {i}: {} vs {} (bound {bound}, scale {}, min {})", x[i], back[i], g.scale, g.min);
        }
        // Every code dequantizes to a finite f16 (the decode kernel rounds once to f16).
        prop_assert!(f16::from_f32(15.0 * g.scale.to_f32() + g.min.to_f32()).is_finite());
        // The f16 slack is at most half an f16 ulp of the minimum (or of a subnormal).
        let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
        prop_assert!((lo - g.min.to_f32()).abs() <= (lo.abs() * 2f32.powi(-11)).max(2f32.powi(-25)));
    }

    /// Quantizing the dequantized group again gives the same codes and parameters wherever the
    /// scale is a normal f16 (the format is a fixed point of itself).
    #[test]
    fn requantize_is_stable(x in group()) {
        let g = quantize_group(&x);
        prop_assume!(g.scale.to_f32() >= 1e-3 && g.min.to_f32().abs() < 1e3 * g.scale.to_f32());
        let again = quantize_group(&g.dequantize());
        let back = again.dequantize();
        let first = g.dequantize();
        for i in 0..GROUP {
            prop_assert!((back[i] - first[i]).abs() <= group_error_bound(&first, &again));
        }
    }

    /// `quantize_int4` over rows equals group-by-group quantization and round-trips.
    #[test]
    fn rows_equal_groups(rows in 1usize..4, groups in 1usize..5, seed in any::<u64>()) {
        let d = groups * GROUP;
        let x = tritter_kernels_cuda::testing::random_f32(rows * d, seed);
        let q = quantize_int4(&x, d).unwrap();
        prop_assert_eq!(q.len(), rows * groups);
        let back = dequantize_int4(&q);
        for (gi, chunk) in x.chunks_exact(GROUP).enumerate() {
            let want = quantize_group(chunk.try_into().unwrap());
            prop_assert_eq!(q[gi], want);
            let bound = group_error_bound(chunk.try_into().unwrap(), &want);
            for i in 0..GROUP {
                prop_assert!((chunk[i] - back[gi * GROUP + i]).abs() <= bound);
            }
        }
    }
}

/// Groups reaching the f16 maximum keep every code finite when dequantized in f16 (one
/// rounding of `code * scale + min`, as the tensor-core decode kernel does) and stay within
/// the error bound: the scale steps down where the top code would round to infinity.
#[test]
fn f16_edge_groups_dequantize_finite() {
    let ramp = |lo: f32, hi: f32| -> [f32; GROUP] {
        std::array::from_fn(|i| lo + (hi - lo) * i as f32 / (GROUP - 1) as f32)
    };
    for x in [
        ramp(0.0, F16_MAX),
        ramp(-F16_MAX, F16_MAX),
        ramp(65000.0, F16_MAX),
        ramp(-1.0, F16_MAX),
        ramp(-F16_MAX, 0.0),
    ] {
        let g = quantize_group(&x);
        let (s, m) = (g.scale.to_f32(), g.min.to_f32());
        for c in 0..=15u8 {
            let v = f16::from_f32(f32::from(c) * s + m);
            assert!(v.is_finite(), "code {c}: {} * {s} + {m} rounds to {v}", c);
        }
        let bound = group_error_bound(&x, &g);
        let back = g.dequantize();
        for i in 0..GROUP {
            assert!(
                (x[i] - back[i]).abs() <= bound,
                "value {i}: {} vs {} (bound {bound})",
                x[i],
                back[i]
            );
        }
    }
    // The unadjusted scale of 0..65504 (f16(65504 / 15) = 4368) would overflow: 15 * 4368.
    assert!(f16::from_f32(15.0 * 4368.0).is_infinite());
}

/// A constant group stores scale 0, all codes 0 and reconstructs as f16(value).
#[test]
fn constant_group_is_exact_in_f16() {
    for c in [0.0f32, -0.0, 1.0, -3.3, 65504.0, 1e-7] {
        let g = quantize_group(&[c; GROUP]);
        assert_eq!(g.scale.to_f32(), 0.0);
        assert_eq!(g.scale.to_bits(), 0, "scale is +0, never -0");
        assert!(g.codes.iter().all(|&b| b == 0));
        assert_eq!(g.min, f16::from_f32(c + 0.0));
        assert!(g
            .dequantize()
            .iter()
            .all(|&v| v == f16::from_f32(c).to_f32()));
    }
}

/// The extremes of a group map to codes 0 and 15, and the layout is two codes per byte, low
/// nibble first.
#[test]
fn codes_span_and_nibble_order() {
    let x: [f32; GROUP] = std::array::from_fn(|i| (i % 16) as f32);
    let g = quantize_group(&x);
    assert_eq!(g.scale.to_f32(), 1.0);
    assert_eq!(g.min.to_f32(), 0.0);
    for i in 0..GROUP {
        assert_eq!(g.code(i), (i % 16) as u8);
    }
    assert_eq!(
        g.codes[0], 0x10,
        "value 0 in the low nibble, value 1 in the high nibble"
    );
    assert_eq!(g.codes[7], 0xFE);
}

/// NaN, infinities and values beyond the f16 range are errors naming the first offender;
/// head dims that are not multiples of 32 are rejected.
#[test]
fn bad_input_is_a_typed_error() {
    let mut x = vec![0.5f32; 64];
    x[37] = f32::NAN;
    assert!(matches!(
        quantize_int4(&x, 64),
        Err(KvError::NonFinite { index: 37, .. })
    ));
    x[37] = 70000.0;
    assert!(matches!(
        check_storable("x", &x),
        Err(KvError::NonFinite { index: 37, .. })
    ));
    x[37] = f32::NEG_INFINITY;
    assert!(matches!(
        quantize_int4(&x, 64),
        Err(KvError::NonFinite { index: 37, .. })
    ));
    assert!(matches!(
        quantize_int4(&[0.0; 48], 48),
        Err(KvError::BadConfig { actual: 48, .. })
    ));
    assert!(matches!(
        quantize_int4(&[0.0; 48], 32),
        Err(KvError::LengthMismatch {
            actual: 48,
            expected: 64,
            ..
        })
    ));
}
