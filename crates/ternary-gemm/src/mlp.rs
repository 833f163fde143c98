//! The squared-ReLU GLU MLP of BitNet b1.58 / Tritter on ternary weights:
//! `y = down(relu(gate(x))^2 * up(x))`.
//!
//! Shapes: `x` `(M, hidden)`, gate and up `(inter, hidden)`, down `(hidden, inter)`,
//! hidden `h` `(M, inter)`, `y` `(M, hidden)`. Each BitLinear quantizes its input per token
//! (A8): `x` once for gate and up (they share it), and `h` before down. The fused GPU kernel
//! will compute exactly this, so the reference here is its oracle.

use crate::{
    absmax_quantize_rows, ternary_matmul_a8, ternary_matmul_a8_ref, Result, TernaryError,
    TernaryMatrix,
};

/// Gate, up and down projections of one MLP block, shape-checked together.
#[derive(Debug, Clone, PartialEq)]
pub struct TernaryMlp {
    gate: TernaryMatrix,
    up: TernaryMatrix,
    down: TernaryMatrix,
}

impl TernaryMlp {
    /// Bundles the three projections; gate and up must be `(inter, hidden)` and down
    /// `(hidden, inter)`.
    pub fn new(gate: TernaryMatrix, up: TernaryMatrix, down: TernaryMatrix) -> Result<Self> {
        let (inter, hidden) = (gate.n_out(), gate.k_in());
        for (what, actual, expected) in [
            ("up n_out (intermediate)", up.n_out(), inter),
            ("up k_in (hidden)", up.k_in(), hidden),
            ("down n_out (hidden)", down.n_out(), hidden),
            ("down k_in (intermediate)", down.k_in(), inter),
        ] {
            if actual != expected {
                return Err(TernaryError::ShapeMismatch {
                    what,
                    actual,
                    expected,
                });
            }
        }
        Ok(TernaryMlp { gate, up, down })
    }

    /// Model width.
    pub fn hidden(&self) -> usize {
        self.gate.k_in()
    }

    /// Intermediate width.
    pub fn intermediate(&self) -> usize {
        self.gate.n_out()
    }

    /// The projections (gate, up, down).
    pub fn parts(&self) -> (&TernaryMatrix, &TernaryMatrix, &TernaryMatrix) {
        (&self.gate, &self.up, &self.down)
    }

    /// Reference forward on the scalar reference products; `x` `(m, hidden)` ->
    /// `(m, hidden)`.
    pub fn forward_ref(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.forward_with(x, m, ternary_matmul_a8_ref)
    }

    /// Forward on the fast CPU kernels (AVX2/rayon); equal to [`forward_ref`](Self::forward_ref)
    /// bit for bit (the integer products are exact and the float steps identical).
    pub fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.forward_with(x, m, ternary_matmul_a8)
    }

    fn forward_with(
        &self,
        x: &[f32],
        m: usize,
        matmul: fn(&TernaryMatrix, &crate::QuantizedActivations) -> Result<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let xq = absmax_quantize_rows(x, m, self.hidden())?;
        let g = matmul(&self.gate, &xq)?;
        let u = matmul(&self.up, &xq)?;
        let h: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| squared_relu(g) * u)
            .collect();
        let hq = absmax_quantize_rows(&h, m, self.intermediate())?;
        matmul(&self.down, &hq)
    }
}

/// `relu(g)^2`.
#[inline]
pub(crate) fn squared_relu(g: f32) -> f32 {
    let r = g.max(0.0);
    r * r
}
