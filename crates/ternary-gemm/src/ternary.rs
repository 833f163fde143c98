//! Ternary weight matrices: absmean quantization and the canonical 2-bit packed layout
//! (DESIGN.md section 4).
//!
//! A weight matrix `W` is `(n_out, k_in)`. Quantization (BitNet b1.58 absmean):
//! `gamma = mean(|W|)`, `Wq = clamp(round(W / (gamma + eps)), -1, 1)`, eps = 1e-5; the
//! dequantized weight is `Wq * gamma`. `gamma` is per tensor by default, per output row on
//! request.
//!
//! Canonical packed layout (interchange and safetensors): `code = Wq + 1` in {0, 1, 2}
//! (3 is invalid); 16 codes per `u32`; weight `k` of a row sits at bits `2 * (k % 16)` of
//! word `k / 16` of that row; each row is padded with code 1 (a zero weight) to a multiple of
//! 16, so rows start on word boundaries: `words_per_row = ceil(k_in / 16)`.
//! A 7B model's linear layers take ~1.75 GB this way instead of 14 GB in bf16.

use crate::act_quant::check_shape;
use crate::{Element, Result, TernaryError};

/// Ternary codes per packed `u32`.
pub const CODES_PER_WORD: usize = 16;
/// The absmean quantizer's epsilon: `Wq = round(W / (gamma + eps))`.
pub const ABSMEAN_EPS: f32 = 1e-5;
/// The code of a zero weight, also the row padding.
pub const ZERO_CODE: u32 = 1;
/// A word of zero codes (`0b01` sixteen times): the pattern rows are padded with.
pub const ZERO_WORD: u32 = 0x5555_5555;

/// `u32` words holding one packed row of `k_in` weights.
pub fn words_per_row(k_in: usize) -> usize {
    k_in.div_ceil(CODES_PER_WORD)
}

/// How many scales a matrix carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleGranularity {
    /// One `gamma` for the whole matrix (BitNet b1.58 default).
    PerTensor,
    /// One `gamma` per output row.
    PerRow,
}

/// Scales of a ternary matrix: the dequantized weight is `Wq[n, k] * gamma(n)`.
#[derive(Debug, Clone, PartialEq)]
pub enum TernaryScales {
    /// One scale for every row.
    PerTensor(f32),
    /// `(n_out,)` scales.
    PerRow(Vec<f32>),
}

impl TernaryScales {
    /// The scale of output row `n`.
    ///
    /// # Panics
    /// If the scales are per row and `n >= n_out` (an index out of bounds, as with slices).
    #[inline]
    pub fn row(&self, n: usize) -> f32 {
        match self {
            TernaryScales::PerTensor(g) => *g,
            TernaryScales::PerRow(g) => g[n],
        }
    }

    /// Which granularity this is.
    pub fn granularity(&self) -> ScaleGranularity {
        match self {
            TernaryScales::PerTensor(_) => ScaleGranularity::PerTensor,
            TernaryScales::PerRow(_) => ScaleGranularity::PerRow,
        }
    }

    /// The scales as a slice: one element per tensor, or `n_out`.
    pub fn as_slice(&self) -> &[f32] {
        match self {
            TernaryScales::PerTensor(g) => std::slice::from_ref(g),
            TernaryScales::PerRow(g) => g,
        }
    }
}

/// A ternary weight matrix `(n_out, k_in)` in the canonical packed layout.
///
/// Invariants (checked by every constructor): `packed.len() == n_out * words_per_row(k_in)`,
/// no code is 3, padding codes are 1, scales are finite and non-negative, and a per-row
/// scale vector has `n_out` entries.
#[derive(Debug, Clone, PartialEq)]
pub struct TernaryMatrix {
    n_out: usize,
    k_in: usize,
    packed: Vec<u32>,
    scales: TernaryScales,
}

impl TernaryMatrix {
    /// Builds a matrix from canonical packed words, validating codes, padding and scales.
    pub fn from_packed(
        n_out: usize,
        k_in: usize,
        packed: Vec<u32>,
        scales: TernaryScales,
    ) -> Result<Self> {
        check_dims(n_out, k_in)?;
        let wpr = check_packed_len(packed.len(), n_out, k_in)?;
        check_scales(&scales, n_out)?;
        let pad = wpr * CODES_PER_WORD - k_in;
        for (n, row) in packed.chunks_exact(wpr).enumerate() {
            for (w, &word) in row.iter().enumerate() {
                // A code is 3 exactly when both of its bits are set.
                let threes = word & (word >> 1) & 0x5555_5555;
                if threes != 0 {
                    let j = threes.trailing_zeros() as usize / 2;
                    return Err(TernaryError::InvalidCode {
                        row: n,
                        col: w * CODES_PER_WORD + j,
                    });
                }
            }
            if pad > 0 {
                let last = row[wpr - 1];
                let used = CODES_PER_WORD - pad;
                if last >> (2 * used) != ZERO_WORD >> (2 * used) {
                    return Err(TernaryError::BadPadding {
                        row: n,
                        actual: last >> (2 * used),
                        expected: ZERO_WORD >> (2 * used),
                    });
                }
            }
        }
        Ok(TernaryMatrix {
            n_out,
            k_in,
            packed,
            scales,
        })
    }

    /// Builds a matrix from ternary values `(n_out, k_in)` in {-1, 0, 1}.
    pub fn from_values(
        n_out: usize,
        k_in: usize,
        values: &[i8],
        scales: TernaryScales,
    ) -> Result<Self> {
        let packed = pack_ternary_rows(values, n_out, k_in)?;
        Self::from_packed(n_out, k_in, packed, scales)
    }

    /// Output features (rows of W).
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// Input features (columns of W).
    pub fn k_in(&self) -> usize {
        self.k_in
    }

    /// Words per packed row, `ceil(k_in / 16)`.
    pub fn words_per_row(&self) -> usize {
        words_per_row(self.k_in)
    }

    /// The canonical packed words, `(n_out, words_per_row)` row-major.
    pub fn packed(&self) -> &[u32] {
        &self.packed
    }

    /// Packed row `n` (`words_per_row` words), or `None` when `n >= n_out`.
    pub fn packed_row(&self, n: usize) -> Option<&[u32]> {
        (n < self.n_out).then(|| self.row_words(n))
    }

    /// Packed row `n` for the crate's kernels, which only iterate `0..n_out`.
    pub(crate) fn row_words(&self, n: usize) -> &[u32] {
        let wpr = self.words_per_row();
        &self.packed[n * wpr..(n + 1) * wpr]
    }

    /// The scales.
    pub fn scales(&self) -> &TernaryScales {
        &self.scales
    }

    /// Bytes of packed weights (what a GEMV must stream): `4 * n_out * words_per_row`.
    pub fn packed_bytes(&self) -> usize {
        4 * self.packed.len()
    }

    /// The ternary values `(n_out, k_in)` in {-1, 0, 1}.
    pub fn values(&self) -> Vec<i8> {
        unpack_ternary_rows(&self.packed, self.n_out, self.k_in)
            .expect("invariants checked at construction")
    }

    /// The dequantized weights `Wq * gamma`, `(n_out, k_in)` f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n_out * self.k_in);
        for (n, row) in self.values().chunks_exact(self.k_in.max(1)).enumerate() {
            let g = self.scales.row(n);
            out.extend(row.iter().map(|&v| f32::from(v) * g));
        }
        out
    }
}

fn check_dims(n_out: usize, k_in: usize) -> Result<()> {
    if n_out == 0 || n_out > i32::MAX as usize {
        return Err(TernaryError::BadDimension {
            what: "n_out",
            actual: n_out,
            expected: "1 ..= 2^31 - 1",
        });
    }
    if k_in == 0 || k_in > i32::MAX as usize {
        return Err(TernaryError::BadDimension {
            what: "k_in",
            actual: k_in,
            expected: "1 ..= 2^31 - 1",
        });
    }
    Ok(())
}

/// The 2-bit code (0..2, or 3 if corrupt) of weight `k` of a canonical packed row.
#[inline]
pub(crate) fn code_at(row: &[u32], k: usize) -> u32 {
    (row[k / CODES_PER_WORD] >> (2 * (k % CODES_PER_WORD))) & 3
}

/// Checks a packed buffer holds `n_out * words_per_row(k_in)` words; returns words per row.
pub(crate) fn check_packed_len(len: usize, n_out: usize, k_in: usize) -> Result<usize> {
    let wpr = words_per_row(k_in);
    if len != n_out * wpr {
        return Err(TernaryError::LengthMismatch {
            what: "packed words",
            rows: n_out,
            cols: wpr,
            actual: len,
            expected: n_out * wpr,
        });
    }
    Ok(wpr)
}

fn check_scales(scales: &TernaryScales, n_out: usize) -> Result<()> {
    if let TernaryScales::PerRow(g) = scales {
        if g.len() != n_out {
            return Err(TernaryError::LengthMismatch {
                what: "per-row scales",
                rows: n_out,
                cols: 1,
                actual: g.len(),
                expected: n_out,
            });
        }
    }
    for (n, &g) in scales.as_slice().iter().enumerate() {
        if !g.is_finite() || g < 0.0 {
            return Err(TernaryError::NonFinite {
                what: "scales (must be finite and >= 0)",
                row: n,
                col: 0,
                value: g.to_string(),
            });
        }
    }
    Ok(())
}

/// Packs ternary values `(n_out, k_in)` in {-1, 0, 1} into the canonical layout
/// `(n_out, ceil(k_in / 16))` u32, padding each row with code 1.
pub fn pack_ternary_rows(values: &[i8], n_out: usize, k_in: usize) -> Result<Vec<u32>> {
    check_dims(n_out, k_in)?;
    check_shape("ternary values", values.len(), n_out, k_in)?;
    let wpr = words_per_row(k_in);
    let mut packed = vec![ZERO_WORD; n_out * wpr];
    for (n, row) in values.chunks_exact(k_in).enumerate() {
        for (k, &v) in row.iter().enumerate() {
            if !(-1..=1).contains(&v) {
                return Err(TernaryError::NotTernary {
                    row: n,
                    col: k,
                    value: v,
                });
            }
            let word = &mut packed[n * wpr + k / CODES_PER_WORD];
            let shift = 2 * (k % CODES_PER_WORD);
            *word = (*word & !(3 << shift)) | (((v + 1) as u32) << shift);
        }
    }
    Ok(packed)
}

/// Unpacks canonical words `(n_out, ceil(k_in / 16))` into values `(n_out, k_in)`;
/// rejects code 3.
pub fn unpack_ternary_rows(packed: &[u32], n_out: usize, k_in: usize) -> Result<Vec<i8>> {
    check_dims(n_out, k_in)?;
    let wpr = check_packed_len(packed.len(), n_out, k_in)?;
    let mut out = Vec::with_capacity(n_out * k_in);
    for (n, row) in packed.chunks_exact(wpr).enumerate() {
        for k in 0..k_in {
            let code = code_at(row, k);
            if code == 3 {
                return Err(TernaryError::InvalidCode { row: n, col: k });
            }
            out.push(code as i8 - 1);
        }
    }
    Ok(out)
}

/// BitNet b1.58 absmean quantization of `w` `(n_out, k_in)` (f32, bf16 or f16):
/// `gamma = mean(|W|)` (per tensor or per row), `Wq = clamp(round(W / (gamma + eps)), -1, 1)`.
///
/// Errors on a shape mismatch, zero dimensions, or a NaN/Inf weight (named by position).
/// The mean is accumulated in f64 so the scale does not depend on summation order.
pub fn absmean_quantize<T: Element>(
    w: &[T],
    n_out: usize,
    k_in: usize,
    granularity: ScaleGranularity,
) -> Result<TernaryMatrix> {
    check_dims(n_out, k_in)?;
    check_shape("weights", w.len(), n_out, k_in)?;
    let mut row_sums = vec![0f64; n_out];
    for (n, row) in w.chunks_exact(k_in).enumerate() {
        for (k, v) in row.iter().enumerate() {
            let v = v.to_f32();
            if !v.is_finite() {
                return Err(TernaryError::NonFinite {
                    what: "weights",
                    row: n,
                    col: k,
                    value: v.to_string(),
                });
            }
            row_sums[n] += f64::from(v.abs());
        }
    }
    let scales = match granularity {
        ScaleGranularity::PerTensor => {
            TernaryScales::PerTensor((row_sums.iter().sum::<f64>() / (n_out * k_in) as f64) as f32)
        }
        ScaleGranularity::PerRow => {
            TernaryScales::PerRow(row_sums.iter().map(|s| (s / k_in as f64) as f32).collect())
        }
    };
    let mut values = Vec::with_capacity(n_out * k_in);
    for (n, row) in w.chunks_exact(k_in).enumerate() {
        let denom = scales.row(n) + ABSMEAN_EPS;
        values.extend(
            row.iter()
                .map(|v| (v.to_f32() / denom).round().clamp(-1.0, 1.0) as i8),
        );
    }
    TernaryMatrix::from_values(n_out, k_in, &values, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weight k of a row lands at bits 2*(k % 16) of word k / 16 with code w + 1; the row
    /// tail is padded with code 1.
    #[test]
    fn canonical_bit_positions() {
        let k_in = CODES_PER_WORD + 2;
        let mut v = vec![0i8; k_in];
        v[0] = -1; // code 0 at bits 0..2 of word 0
        v[1] = 1; // code 2 at bits 2..4 of word 0
        v[CODES_PER_WORD + 1] = 1; // code 2 at bits 2..4 of word 1
        let p = pack_ternary_rows(&v, 1, k_in).unwrap();
        assert_eq!(p.len(), words_per_row(k_in));
        assert_eq!(p[0] & 0xF, 0b10_00);
        assert_eq!((p[0] >> 4), 0x5555_5555 >> 4);
        assert_eq!(p[1] & 0xF, 0b10_01);
        assert_eq!(p[1] >> 4, 0x5555_5555 >> 4, "padding must be code 1");
    }

    /// Code 3 anywhere is rejected with its position.
    #[test]
    fn code_three_is_rejected() {
        let mut p = vec![0x5555_5555u32; 2];
        p[1] |= 3 << 6;
        let err =
            TernaryMatrix::from_packed(1, 2 * CODES_PER_WORD, p, TernaryScales::PerTensor(1.0))
                .unwrap_err();
        assert!(
            matches!(err, TernaryError::InvalidCode { row: 0, col } if col == CODES_PER_WORD + 3),
            "{err}"
        );
    }

    /// Padding codes other than 1 are rejected (they would change a K-padded kernel's sums).
    #[test]
    fn bad_padding_is_rejected() {
        let p = vec![ZERO_WORD & !(3 << 30)]; // k_in = 15: code 0 in the padding slot k = 15
        let err =
            TernaryMatrix::from_packed(1, CODES_PER_WORD - 1, p, TernaryScales::PerTensor(1.0))
                .unwrap_err();
        assert!(
            matches!(err, TernaryError::BadPadding { row: 0, .. }),
            "{err}"
        );
    }

    /// NaN, negative and wrongly sized scales are refused.
    #[test]
    fn bad_scales_are_rejected() {
        let p = vec![0x5555_5555u32; 2];
        for s in [f32::NAN, -1.0, f32::INFINITY] {
            assert!(
                TernaryMatrix::from_packed(2, 16, p.clone(), TernaryScales::PerTensor(s)).is_err()
            );
        }
        let err =
            TernaryMatrix::from_packed(2, 16, p, TernaryScales::PerRow(vec![1.0])).unwrap_err();
        assert!(
            err.to_string().contains("1 elements") && err.to_string().contains("needs 2"),
            "{err}"
        );
    }

    /// absmean follows the formula: gamma = mean|W|, values round(W / gamma) clipped.
    #[test]
    fn absmean_matches_formula() {
        let w = [0.1f32, -0.5, 2.0, 0.0, -0.05, 0.3];
        let m = absmean_quantize(&w, 2, 3, ScaleGranularity::PerTensor).unwrap();
        let gamma = w.iter().map(|v| v.abs()).sum::<f32>() / 6.0;
        assert!((m.scales().row(0) - gamma).abs() < 1e-7);
        assert_eq!(m.values(), vec![0, -1, 1, 0, 0, 1]);
        let r = absmean_quantize(&w, 2, 3, ScaleGranularity::PerRow).unwrap();
        assert_eq!(r.scales().granularity(), ScaleGranularity::PerRow);
        assert!((r.scales().row(1) - (0.35f32 / 3.0)).abs() < 1e-7);
    }
}
