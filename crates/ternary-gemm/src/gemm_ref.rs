//! Scalar reference products of a ternary matrix with activations: the oracle every fast
//! path (CPU SIMD, CUDA) is tested against.
//!
//! Shapes: `W` `(n_out, k_in)` ternary, `x` `(M, k_in)` row-major, `y = x · Wᵀ` `(M, n_out)`.
//! * f32 activations: `y[m, n] = gamma_n * Σ_k Wq[n, k] x[m, k]`, accumulated in f64.
//! * int8 activations (A8): `acc[m, n] = Σ_k Wq[n, k] q[m, k]` exactly in i32, then
//!   `y[m, n] = acc * (gamma_n / s_m)` ([`a8_epilogue`]).

use crate::ternary::code_at;
use crate::{QuantizedActivations, Result, TernaryError, TernaryMatrix};

pub(crate) fn check_x(w: &TernaryMatrix, len: usize, m: usize) -> Result<()> {
    let k = w.k_in();
    if m == 0 || m > i32::MAX as usize {
        return Err(TernaryError::BadDimension {
            what: "M (activation rows)",
            actual: m,
            expected: "1 ..= 2^31 - 1",
        });
    }
    if len % m != 0 || len / m != k {
        return Err(TernaryError::ShapeMismatch {
            what: "x columns (k_in) = x.len() / M",
            actual: len / m,
            expected: k,
        });
    }
    Ok(())
}

/// Checks that quantized activations are self-consistent: `codes` `(rows, cols)`, `scales`
/// `(rows,)`, every scale finite and positive.
pub(crate) fn check_quantized(xq: &QuantizedActivations) -> Result<()> {
    crate::act_quant::check_shape("codes", xq.codes.len(), xq.rows, xq.cols)?;
    if xq.scales.len() != xq.rows {
        return Err(TernaryError::LengthMismatch {
            what: "scales",
            rows: xq.rows,
            cols: 1,
            actual: xq.scales.len(),
            expected: xq.rows,
        });
    }
    if let Some((row, s)) = xq
        .scales
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s > 0.0))
    {
        return Err(TernaryError::NonFinite {
            what: "activation scales (must be finite and > 0)",
            row,
            col: 0,
            value: s.to_string(),
        });
    }
    Ok(())
}

/// The A8 epilogue: `acc * (gamma / s)` in f32; the CUDA kernels use the same expression.
#[inline]
pub fn a8_epilogue(acc: i32, gamma: f32, s: f32) -> f32 {
    acc as f32 * (gamma / s)
}

/// `y = x · (Wq * gamma)ᵀ` for f32 activations `x` `(m, k_in)`; returns `(m, n_out)`.
pub fn ternary_matmul_f32_ref(w: &TernaryMatrix, x: &[f32], m: usize) -> Result<Vec<f32>> {
    check_x(w, x.len(), m)?;
    let (n_out, k) = (w.n_out(), w.k_in());
    let mut y = vec![0f32; m * n_out];
    for n in 0..n_out {
        let row = w.row_words(n);
        let g = f64::from(w.scales().row(n));
        for (mi, xr) in x.chunks_exact(k).enumerate() {
            let mut acc = 0f64;
            for (kk, &xv) in xr.iter().enumerate() {
                let code = code_at(row, kk);
                acc += (f64::from(code) - 1.0) * f64::from(xv);
            }
            y[mi * n_out + n] = (acc * g) as f32;
        }
    }
    Ok(y)
}

/// Exact integer accumulators `acc[m, n] = Σ_k Wq[n, k] q[m, k]` for int8 codes
/// `(m, k_in)`; returns `(m, n_out)` i32. |acc| <= 128 * k_in, so no overflow for any k_in
/// below 2^24.
pub fn ternary_matmul_a8_acc_ref(w: &TernaryMatrix, codes: &[i8], m: usize) -> Result<Vec<i32>> {
    check_x(w, codes.len(), m)?;
    let (n_out, k) = (w.n_out(), w.k_in());
    let mut acc = vec![0i32; m * n_out];
    for n in 0..n_out {
        let row = w.row_words(n);
        for (mi, qr) in codes.chunks_exact(k).enumerate() {
            let mut a = 0i32;
            for (kk, &q) in qr.iter().enumerate() {
                let code = code_at(row, kk);
                a += (code as i32 - 1) * i32::from(q);
            }
            acc[mi * n_out + n] = a;
        }
    }
    Ok(acc)
}

/// The A8 product `y = (Wq · q) * gamma / s` for quantized activations; `(m, n_out)` f32.
pub fn ternary_matmul_a8_ref(w: &TernaryMatrix, xq: &QuantizedActivations) -> Result<Vec<f32>> {
    check_quantized(xq)?;
    let acc = ternary_matmul_a8_acc_ref(w, &xq.codes, xq.rows)?;
    Ok(apply_a8_epilogue(w, &xq.scales, &acc))
}

pub(crate) fn apply_a8_epilogue(w: &TernaryMatrix, scales: &[f32], acc: &[i32]) -> Vec<f32> {
    let n_out = w.n_out();
    acc.chunks_exact(n_out)
        .zip(scales)
        .flat_map(|(row, &s)| {
            row.iter()
                .enumerate()
                .map(move |(n, &a)| a8_epilogue(a, w.scales().row(n), s))
        })
        .collect()
}

/// The transposed product of the straight-through-estimator backward pass:
/// `dx = dy · (Wq * gamma)`, `dy` `(m, n_out)` f32, returns `(m, k_in)` f32, accumulated in
/// f64 (the reference for every fast path).
pub fn ternary_matmul_t_ref(w: &TernaryMatrix, dy: &[f32], m: usize) -> Result<Vec<f32>> {
    check_dy(w, dy.len(), m)?;
    let (n_out, k) = (w.n_out(), w.k_in());
    let mut acc = vec![0f64; m * k];
    for n in 0..n_out {
        let row = w.row_words(n);
        let g = f64::from(w.scales().row(n));
        for mi in 0..m {
            let s = f64::from(dy[mi * n_out + n]) * g;
            if s == 0.0 {
                continue;
            }
            for (kk, a) in acc[mi * k..(mi + 1) * k].iter_mut().enumerate() {
                let code = code_at(row, kk);
                *a += (f64::from(code) - 1.0) * s;
            }
        }
    }
    Ok(acc.into_iter().map(|v| v as f32).collect())
}

/// Checks `dy` is `(m, n_out)` with `m >= 1`.
pub(crate) fn check_dy(w: &TernaryMatrix, len: usize, m: usize) -> Result<()> {
    if m == 0 || m > i32::MAX as usize {
        return Err(TernaryError::BadDimension {
            what: "M (gradient rows)",
            actual: m,
            expected: "1 ..= 2^31 - 1",
        });
    }
    if len % m != 0 || len / m != w.n_out() {
        return Err(TernaryError::ShapeMismatch {
            what: "dy columns (n_out) = dy.len() / M",
            actual: len / m,
            expected: w.n_out(),
        });
    }
    Ok(())
}
