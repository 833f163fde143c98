//! Per-token absmax int8 activation quantization (BitNet b1.58 "A8", DESIGN.md section 4).
//!
//! For each row (token) `x[m, :]` of an `(M, K)` activation matrix:
//! `s = 127 / max(max_k |x[m, k]|, 1e-5)`, `q = clamp(round(x * s), -128, 127)` with
//! round-half-away-from-zero (`f32::round`). A ternary product is then `y = (Wq · q) * gamma / s`,
//! so all inner products run in integers and one f32 multiply per output rescales them.
//! The 1e-5 floor keeps an all-zero row finite (s = 1.27e7, every code 0), as BitNet does.

use rayon::prelude::*;

use crate::{Element, Result, TernaryError};

/// Largest code magnitude; the row maximum maps to ±127.
pub const ACT_QUANT_QMAX: f32 = 127.0;
/// Floor on the row absmax, so an all-zero row gets a finite scale.
pub const ACT_QUANT_EPS: f32 = 1e-5;

/// Rows per rayon task: below this, threading costs more than it saves.
const PAR_MIN_ELEMS: usize = 1 << 14;

/// Int8 activations with one scale per row. `codes` is `(rows, cols)` row-major, `scales`
/// is `(rows,)`; the real value of a code is `code / scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedActivations {
    /// Rows (tokens), M.
    pub rows: usize,
    /// Columns (features), K.
    pub cols: usize,
    /// `(rows, cols)` int8 codes.
    pub codes: Vec<i8>,
    /// `(rows,)` scales `s = 127 / max|x_row|`.
    pub scales: Vec<f32>,
}

/// Quantizes one row: writes `codes[k] = clamp(round(x[k] * s))` and returns `s`.
///
/// This is the scalar reference every fast path (CPU threads, CUDA) must match bit for bit.
/// `row` is only used in the error for a non-finite value.
pub fn absmax_quantize_row_ref<T: Element>(x: &[T], codes: &mut [i8], row: usize) -> Result<f32> {
    if codes.len() != x.len() {
        return Err(TernaryError::LengthMismatch {
            what: "codes",
            rows: 1,
            cols: x.len(),
            actual: codes.len(),
            expected: x.len(),
        });
    }
    let mut amax = 0.0f32;
    for (col, v) in x.iter().enumerate() {
        let v = v.to_f32();
        if !v.is_finite() {
            return Err(TernaryError::NonFinite {
                what: "x",
                row,
                col,
                value: v.to_string(),
            });
        }
        amax = amax.max(v.abs());
    }
    let s = ACT_QUANT_QMAX / amax.max(ACT_QUANT_EPS);
    for (q, v) in codes.iter_mut().zip(x) {
        *q = (v.to_f32() * s).round().clamp(-128.0, 127.0) as i8;
    }
    Ok(s)
}

/// The fast row kernel behind [`absmax_quantize_rows`]: same result as the reference, written
/// so LLVM vectorizes both passes (8 independent max lanes; rounding through an exact
/// truncate-and-compare instead of a libm `roundf` call per element).
fn absmax_quantize_row_fast<T: Element>(x: &[T], codes: &mut [i8], row: usize) -> Result<f32> {
    const LANES: usize = 8;
    let mut lanes = [0f32; LANES];
    let mut bad = false;
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            let a = v.to_f32().abs();
            bad |= !a.is_finite(); // NaN or Inf
            *m = if a > *m { a } else { *m };
        }
    }
    for v in chunks.remainder() {
        let a = v.to_f32().abs();
        bad |= !a.is_finite();
        lanes[0] = if a > lanes[0] { a } else { lanes[0] };
    }
    if bad || codes.len() != x.len() {
        // The reference names the first offending value (or the length mismatch).
        return absmax_quantize_row_ref(x, codes, row);
    }
    let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
    let s = ACT_QUANT_QMAX / amax.max(ACT_QUANT_EPS);
    for (q, v) in codes.iter_mut().zip(x) {
        *q = round_half_away_to_i8(v.to_f32() * s);
    }
    Ok(s)
}

/// `clamp(round(y), -128, 127)` with round half away from zero, exactly as `f32::round`,
/// for finite `y` of magnitude below 2^31: truncation toward zero, then the fraction
/// `y - trunc(y)` (exact in f32) decides the step. Vectorizes on plain SSE2.
#[inline(always)]
fn round_half_away_to_i8(y: f32) -> i8 {
    let t = y as i32;
    let frac = y - t as f32;
    let r = t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5);
    r.clamp(-128, 127) as i8
}

/// Quantizes an `(rows, cols)` row-major activation matrix, one scale per row, with rows
/// spread over rayon threads. Same result as calling [`absmax_quantize_row_ref`] per row.
///
/// Errors: `x.len() != rows * cols`, `cols == 0`, or any NaN/Inf (named by row and column).
pub fn absmax_quantize_rows<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
) -> Result<QuantizedActivations> {
    check_shape("x", x.len(), rows, cols)?;
    let mut codes = vec![0i8; x.len()];
    let mut scales = vec![0f32; rows];
    if rows > 0 {
        let rows_per_task = PAR_MIN_ELEMS.div_ceil(cols).max(1);
        codes
            .par_chunks_mut(cols * rows_per_task)
            .zip(x.par_chunks(cols * rows_per_task))
            .zip(scales.par_chunks_mut(rows_per_task))
            .enumerate()
            .try_for_each(|(task, ((q, xs), s))| {
                for (i, ((qr, xr), sr)) in
                    q.chunks_mut(cols).zip(xs.chunks(cols)).zip(s).enumerate()
                {
                    *sr = absmax_quantize_row_fast(xr, qr, task * rows_per_task + i)?;
                }
                Ok::<_, TernaryError>(())
            })?;
    }
    Ok(QuantizedActivations {
        rows,
        cols,
        codes,
        scales,
    })
}

/// Maps codes back to real values, `x ≈ code / s`; `(rows, cols)` f32.
///
/// Round trip: `|x - dequant(quant(x))| <= 0.5 / s = max|x_row| / 254` per element.
pub fn dequantize_rows(q: &QuantizedActivations) -> Result<Vec<f32>> {
    check_shape("codes", q.codes.len(), q.rows, q.cols)?;
    if q.scales.len() != q.rows {
        return Err(TernaryError::LengthMismatch {
            what: "scales",
            rows: q.rows,
            cols: 1,
            actual: q.scales.len(),
            expected: q.rows,
        });
    }
    if q.cols == 0 {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(q.codes.len());
    for (row, (codes, &s)) in q.codes.chunks(q.cols).zip(&q.scales).enumerate() {
        if !(s.is_finite() && s > 0.0) {
            return Err(TernaryError::NonFinite {
                what: "scales",
                row,
                col: 0,
                value: s.to_string(),
            });
        }
        let inv = 1.0 / s;
        out.extend(codes.iter().map(|&c| f32::from(c) * inv));
    }
    Ok(out)
}

/// Codes per block of the GEMV's MMA k order: activation rows are padded to a multiple.
pub const GEMV_K_BLOCK: usize = 128;

/// Row length of GEMV-ready activations: `cols` rounded up to a multiple of 128.
pub fn gemv_padded_cols(cols: usize) -> usize {
    cols.div_ceil(GEMV_K_BLOCK) * GEMV_K_BLOCK
}

/// Position of code `k` of a row in the GEMV's MMA k order: within each 128-code block,
/// code `16 t + 4 e + j` (t < 8, e < 4, j < 4) sits at byte `32 j + 4 t + e`.
///
/// Why: with this order a GPU thread's 32-bit MMA operand for k-step `j` is one aligned
/// load, matching weights decoded as `(word[t] >> 2 j) & 0x03030303` from the canonical
/// packed layout, so neither operand is shuffled at run time.
#[inline]
pub fn gemv_code_position(k: usize) -> usize {
    let (blk, r) = (k / GEMV_K_BLOCK, k % GEMV_K_BLOCK);
    let (t, e, j) = (r / 16, (r % 16) / 4, r % 4);
    GEMV_K_BLOCK * blk + 32 * j + 4 * t + e
}

/// Reference of the GEMV-ready layout: `(rows, cols)` codes -> `(rows, gemv_padded_cols)`
/// codes in MMA k order (zero padded) and the `(rows,)` row sums.
pub fn gemv_order_codes(codes: &[i8], rows: usize, cols: usize) -> Result<(Vec<i8>, Vec<i32>)> {
    check_shape("codes", codes.len(), rows, cols)?;
    let kp = gemv_padded_cols(cols);
    let mut out = vec![0i8; rows * kp];
    let mut sums = vec![0i32; rows];
    for (r, row) in codes.chunks_exact(cols).enumerate() {
        for (k, &q) in row.iter().enumerate() {
            out[r * kp + gemv_code_position(k)] = q;
        }
        sums[r] = row.iter().map(|&q| i32::from(q)).sum();
    }
    Ok((out, sums))
}

/// Checks `len == rows * cols` and `cols` in `1..=i32::MAX` (the kernels index with i32).
pub(crate) fn check_shape(what: &'static str, len: usize, rows: usize, cols: usize) -> Result<()> {
    if cols == 0 || cols > i32::MAX as usize {
        return Err(TernaryError::BadDimension {
            what: "cols",
            actual: cols,
            expected: "1 ..= 2^31 - 1",
        });
    }
    if rows > i32::MAX as usize {
        return Err(TernaryError::BadDimension {
            what: "rows",
            actual: rows,
            expected: "0 ..= 2^31 - 1",
        });
    }
    let expected = rows.checked_mul(cols).ok_or(TernaryError::BadDimension {
        what: "rows * cols",
        actual: usize::MAX,
        expected: "rows * cols to fit in usize",
    })?;
    if len != expected {
        return Err(TernaryError::LengthMismatch {
            what,
            rows,
            cols,
            actual: len,
            expected,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row maximum maps to exactly ±127 and the scale follows the formula.
    #[test]
    fn row_max_maps_to_qmax() {
        let x = [0.5f32, -2.0, 1.0, 0.0];
        let mut q = [0i8; 4];
        let s = absmax_quantize_row_ref(&x, &mut q, 0).unwrap();
        assert_eq!(s, ACT_QUANT_QMAX / 2.0);
        assert_eq!(q, [32, -127, 64, 0]);
    }

    /// An all-zero row gets the eps-floored finite scale and all-zero codes.
    #[test]
    fn zero_row_is_finite() {
        let x = [0.0f32; 8];
        let mut q = [1i8; 8];
        let s = absmax_quantize_row_ref(&x, &mut q, 0).unwrap();
        assert_eq!(s, ACT_QUANT_QMAX / ACT_QUANT_EPS);
        assert!(q.iter().all(|&c| c == 0));
    }

    /// NaN is rejected with its position, never quantized.
    #[test]
    fn nan_is_rejected_with_position() {
        let x = [1.0f32, 2.0, f32::NAN, 3.0, 4.0, 5.0];
        let err = absmax_quantize_rows(&x, 2, 3).unwrap_err();
        assert!(
            matches!(err, TernaryError::NonFinite { row: 0, col: 2, .. }),
            "{err}"
        );
    }

    /// A length that does not match the shape is an error naming both numbers.
    #[test]
    fn shape_mismatch_names_actual_and_expected() {
        let err = absmax_quantize_rows(&[0.0f32; 7], 2, 4).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains('7') && msg.contains('8'), "{msg}");
    }

    /// The vectorizable rounding equals `f32::round` + clamp on ties, near-ties and the range ends.
    #[test]
    fn fast_rounding_matches_round() {
        let mut ys = vec![
            0.0f32, -0.0, 0.5, -0.5, 1.5, -1.5, 126.5, -126.5, 127.0, -127.0, 127.49, -128.6,
        ];
        ys.extend([0.49999997f32, -0.49999997, 2.4999998, -2.5000002]);
        ys.extend((0..=2000).map(|i| i as f32 * 0.127 - 127.0));
        for y in ys {
            assert_eq!(
                round_half_away_to_i8(y),
                y.round().clamp(-128.0, 127.0) as i8,
                "y = {y}"
            );
        }
    }

    /// The GEMV order is a permutation of each 128-block (every position hit once).
    #[test]
    fn gemv_order_is_a_block_permutation() {
        let mut seen = [false; GEMV_K_BLOCK];
        for k in 0..GEMV_K_BLOCK {
            let p = gemv_code_position(k + GEMV_K_BLOCK) - GEMV_K_BLOCK;
            assert!(!seen[p], "position {p} hit twice");
            seen[p] = true;
        }
        assert_eq!(gemv_code_position(16 * 2 + 4 + 3), 32 * 3 + 4 * 2 + 1);
        let (codes, sums) = gemv_order_codes(&[1, -2, 3], 1, 3).unwrap();
        assert_eq!(codes.len(), GEMV_K_BLOCK);
        assert_eq!(sums, vec![2]);
    }

    /// Zero columns are refused (a kernel cannot quantize an empty row).
    #[test]
    fn zero_cols_is_refused() {
        assert!(matches!(
            absmax_quantize_rows::<f32>(&[], 3, 0),
            Err(TernaryError::BadDimension { what: "cols", .. })
        ));
    }
}
