//! Per-token absmax int8 quantization: property tests of the CPU paths against the scalar
//! reference and the format's error bound, and the GPU conformance table (bit-exact codes
//! and scales against the CPU reference on random and adversarial shapes and values).

use half::{bf16, f16};
use proptest::prelude::*;
use ternary_gemm::{
    absmax_quantize_row_ref, absmax_quantize_rows, dequantize_rows, Element, QuantizedActivations,
    ACT_QUANT_EPS, ACT_QUANT_QMAX,
};
use tritter_kernels_cuda::testing::random_f32;

/// Largest K the property tests draw: above one 16-code word and one CUDA vector.
const MAX_COLS: usize = 300;
const MAX_ROWS: usize = 9;

fn matrix(max_rows: usize, max_cols: usize) -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1..=max_rows, 1..=max_cols).prop_flat_map(|(r, c)| {
        // Wide dynamic range: most values moderate, some tiny, some huge.
        let value = prop_oneof![
            8 => -4.0f32..4.0,
            1 => -1e-6f32..1e-6,
            1 => -1e6f32..1e6,
        ];
        (Just(r), Just(c), prop::collection::vec(value, r * c))
    })
}

fn reference<T: Element>(x: &[T], rows: usize, cols: usize) -> QuantizedActivations {
    let mut codes = vec![0i8; rows * cols];
    let scales = (0..rows)
        .map(|r| {
            absmax_quantize_row_ref(&x[r * cols..][..cols], &mut codes[r * cols..][..cols], r)
                .unwrap()
        })
        .collect();
    QuantizedActivations {
        rows,
        cols,
        codes,
        scales,
    }
}

fn check_bound<T: Element>(x: &[T], q: &QuantizedActivations) -> Result<(), TestCaseError> {
    let deq = dequantize_rows(q).unwrap();
    for r in 0..q.rows {
        let s = q.scales[r];
        let row = &x[r * q.cols..][..q.cols];
        let amax = row.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
        prop_assert_eq!(s, ACT_QUANT_QMAX / amax.max(ACT_QUANT_EPS));
        for (c, v) in row.iter().enumerate() {
            let v = v.to_f32();
            let err = (v - deq[r * q.cols + c]).abs();
            // half a quantization step, plus f32 rounding of x*s and of 1/s
            let bound = 0.5 / s * (1.0 + 1e-5) + v.abs() * 4.0 * f32::EPSILON;
            prop_assert!(
                err <= bound,
                "row {} col {}: |{} - deq| = {} > {}",
                r,
                c,
                v,
                err,
                bound
            );
        }
        if amax >= ACT_QUANT_EPS {
            let peak = q.codes[r * q.cols..][..q.cols]
                .iter()
                .map(|c| c.unsigned_abs())
                .max()
                .unwrap();
            prop_assert_eq!(peak, 127, "the row maximum must map to ±127");
        }
    }
    Ok(())
}

fn props<T: Element>(
    rows: usize,
    cols: usize,
    xs: Vec<f32>,
    convert: fn(f32) -> T,
) -> Result<(), TestCaseError> {
    let x: Vec<T> = xs.into_iter().map(convert).collect();
    let fast = absmax_quantize_rows(&x, rows, cols).unwrap();
    prop_assert_eq!(&fast, &reference(&x, rows, cols));
    check_bound(&x, &fast)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// f32: the threaded path equals the scalar reference, and dequantization is within half a step.
    #[test]
    fn f32_matches_reference_and_bound((rows, cols, xs) in matrix(MAX_ROWS, MAX_COLS)) {
        props::<f32>(rows, cols, xs, |v| v)?;
    }

    /// bf16: same properties on bf16 inputs (exact widening to f32).
    #[test]
    fn bf16_matches_reference_and_bound((rows, cols, xs) in matrix(MAX_ROWS, MAX_COLS)) {
        props::<bf16>(rows, cols, xs, bf16::from_f32)?;
    }

    /// f16: same properties on f16 inputs (values beyond f16 range become ±Inf and are excluded).
    #[test]
    fn f16_matches_reference_and_bound((rows, cols, xs) in matrix(MAX_ROWS, MAX_COLS)) {
        let xs = xs.into_iter().map(|v| v.clamp(-60000.0, 60000.0)).collect();
        props::<f16>(rows, cols, xs, f16::from_f32)?;
    }

    /// Many rows: the rayon split (several rows per task) keeps rows and scales aligned.
    #[test]
    fn many_rows_split_across_threads((rows, cols, xs) in matrix(200, 97)) {
        props::<f32>(rows, cols, xs, |v| v)?;
    }
}

/// Cases of the GPU conformance table: (rows, cols). Odd widths hit the scalar path; widths
/// that are multiples of 8 hit the vector path, held in registers up to 1024 vectors per row
/// (8192 bf16, 4096 f32) and streamed twice beyond; 1 x 1 and 1 x 7 are the degenerate ends.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GPU_CASES: &[(usize, usize)] = &[
    (1, 1),
    (1, 7),
    (1, 4096),
    (3, 2560),
    (17, 4099),
    (64, 4096),
    (257, 128),
    (1000, 24),
    (2048, 4096),
    (5, 16384),
    (2, 8192),
    (2, 8200),
];

/// Adversarial row contents, applied to the first rows of each case.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn adversarial(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut x = random_f32(rows * cols, seed);
    let row = |x: &mut Vec<f32>, r: usize, f: &dyn Fn(usize) -> f32| {
        if r < rows {
            for c in 0..cols {
                x[r * cols + c] = f(c);
            }
        }
    };
    row(&mut x, 0, &|_| 0.0); // all zero: eps floor
    row(&mut x, 1, &|c| if c == cols / 2 { -1e30 } else { 1e28 }); // huge, negative max
    row(&mut x, 2, &|c| (c as f32 + 1.0) * 1e-30); // tiny: below eps
                                                   // exact rounding ties: amax 127 gives s = 1, values n + 0.5 round away from zero
    row(&mut x, 3, &|c| {
        if c == 0 {
            127.0
        } else {
            (c % 254) as f32 - 126.5
        }
    });
    x
}

/// GPU conformance: codes bit-exact, scales bit-exact, for f32/bf16/f16, aligned and
/// unaligned buffers, and non-finite rows reported (never silently quantized).
#[test]
fn act_quant_gpu_matches_cpu_reference() {
    let Some(gpu) =
        tritter_kernels_cuda::testing::gpu_for_test("act_quant_gpu_matches_cpu_reference")
    else {
        return;
    };
    gpu_conformance::run(&gpu);
}

#[cfg(not(feature = "cuda"))]
mod gpu_conformance {
    pub fn run(gpu: &tritter_kernels_cuda::Gpu) {
        match *gpu {}
    }
}

#[cfg(feature = "cuda")]
mod gpu_conformance {
    use super::*;
    use cudarc::driver::DeviceRepr;
    use ternary_gemm::cuda::{absmax_quantize_rows_cuda, DeviceActivation};
    use ternary_gemm::TernaryError;
    use tritter_kernels_cuda::Gpu;

    /// Runs one case; `offset` > 0 shifts the input view so the vector path is refused.
    fn case<T: DeviceActivation + DeviceRepr>(
        gpu: &Gpu,
        rows: usize,
        cols: usize,
        offset: usize,
        convert: fn(f32) -> T,
    ) {
        let x: Vec<T> = adversarial(rows, cols, (rows * 31 + cols) as u64)
            .into_iter()
            .map(convert)
            .collect();
        let want = reference(&x, rows, cols);
        let mut padded = vec![convert(0.0); offset];
        padded.extend_from_slice(&x);
        let dx = gpu.stream().clone_htod(&padded).unwrap();
        let got = absmax_quantize_rows_cuda(gpu, &dx.slice(offset..), rows, cols)
            .unwrap()
            .to_host(gpu)
            .unwrap();
        let code_mismatch = got
            .codes
            .iter()
            .zip(&want.codes)
            .filter(|(a, b)| a != b)
            .count();
        let max_ulp = got
            .scales
            .iter()
            .zip(&want.scales)
            .map(|(a, b)| (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs())
            .max()
            .unwrap_or(0);
        println!(
            "act_quant {:>4} {rows:>5}x{cols:<5} offset {offset}: code mismatches {code_mismatch}, max scale ulp {max_ulp}",
            T::NAME
        );
        assert_eq!(
            code_mismatch,
            0,
            "{} {rows}x{cols} offset {offset}: codes differ",
            T::NAME
        );
        assert_eq!(
            max_ulp,
            0,
            "{} {rows}x{cols} offset {offset}: scales differ",
            T::NAME
        );
    }

    fn nonfinite_is_reported<T: DeviceActivation + DeviceRepr>(gpu: &Gpu, convert: fn(f32) -> T) {
        let (rows, cols) = (6, 40);
        let mut x: Vec<f32> = random_f32(rows * cols, 5);
        x[cols + 3] = f32::NAN;
        x[4 * cols + 39] = f32::INFINITY;
        let x: Vec<T> = x.into_iter().map(convert).collect();
        let dx = gpu.stream().clone_htod(&x).unwrap();
        let q = absmax_quantize_rows_cuda(gpu, &dx.as_view(), rows, cols).unwrap();
        match q.check_finite(gpu) {
            Err(TernaryError::NonFiniteRows {
                rows: 2, total: 6, ..
            }) => {}
            other => panic!(
                "{}: expected 2 non-finite rows of 6, got {other:?}",
                T::NAME
            ),
        }
        let scales = gpu.stream().clone_dtoh(&q.scales).unwrap();
        for (r, s) in scales.iter().enumerate() {
            assert_eq!(
                s.is_nan(),
                r == 1 || r == 4,
                "{}: row {r} scale {s}",
                T::NAME
            );
        }
    }

    pub fn run(gpu: &Gpu) {
        println!("device: {:?}", gpu.info());
        for &(rows, cols) in GPU_CASES {
            for offset in [0, 1] {
                case::<f32>(gpu, rows, cols, offset, |v| v);
                case::<bf16>(gpu, rows, cols, offset, bf16::from_f32);
                case::<f16>(gpu, rows, cols, offset, |v| {
                    f16::from_f32(v.clamp(-60000.0, 60000.0))
                });
            }
        }
        nonfinite_is_reported::<f32>(gpu, |v| v);
        nonfinite_is_reported::<bf16>(gpu, bf16::from_f32);
        nonfinite_is_reported::<f16>(gpu, f16::from_f32);
        // Shape errors are typed, before any launch.
        let dx = gpu.stream().clone_htod(&[0f32; 10]).unwrap();
        assert!(matches!(
            absmax_quantize_rows_cuda(gpu, &dx.as_view(), 3, 4),
            Err(TernaryError::LengthMismatch {
                actual: 10,
                expected: 12,
                ..
            })
        ));
    }
}
