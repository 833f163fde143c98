//! Rotary position embedding, rotate-half convention (GPT-NeoX / Llama): dimension `i` of
//! the first half pairs with `i + D/2`.

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// The frequencies of one head: `inv_freq[i] = theta^(-2i / D)` for `i < D/2`.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    head_dim: usize,
}

/// `cos` and `sin` tables for one batch of positions, each `(B, 1, L, D)` in the model
/// dtype, broadcast over heads.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// `cos(pos * inv_freq)`, repeated over both halves.
    pub cos: Tensor,
    /// `sin(pos * inv_freq)`, repeated over both halves.
    pub sin: Tensor,
}

impl Rope {
    /// Frequencies for an even `head_dim` and base `theta`.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64))
            .collect();
        Rope { inv_freq, head_dim }
    }

    /// Tables for `positions` `(B, L)` (angles computed in f64, then rounded once).
    pub fn tables(
        &self,
        positions: &[Vec<u32>],
        dtype: DType,
        device: &Device,
    ) -> Result<RopeTables> {
        let b = positions.len();
        let l = positions.first().map_or(0, Vec::len);
        let d = self.head_dim;
        let mut cos = Vec::with_capacity(b * l * d);
        let mut sin = Vec::with_capacity(b * l * d);
        for row in positions {
            for &p in row {
                for (c, s) in self.cos_sin(p) {
                    cos.push(c);
                    sin.push(s);
                }
            }
        }
        let shape = (b, 1, l, d);
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        })
    }

    /// `(cos, sin)` of `position` for one head: `D` pairs, the angles `position * inv_freq`
    /// repeated over both halves (one row of [`tables`](Self::tables), which is built from
    /// it; the CPU engine rotates with the same values).
    pub fn cos_sin(&self, position: u32) -> impl Iterator<Item = (f32, f32)> + '_ {
        (0..2).flat_map(move |_| {
            self.inv_freq.iter().map(move |&f| {
                let a = f64::from(position) * f;
                (a.cos() as f32, a.sin() as f32)
            })
        })
    }

    /// Head width `D`.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// [`apply`](Self::apply) on one head vector `x` `(D,)` in place, with `cos`/`sin` `(D,)`
    /// from [`cos_sin`](Self::cos_sin): `x * cos + rotate_half(x) * sin`, each product
    /// rounded before the sum as in the tensor version.
    pub fn rotate_half_in_place(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = x.len() / 2;
        let (x1, x2) = x.split_at_mut(half);
        let (c1, c2) = cos.split_at(half);
        let (s1, s2) = sin.split_at(half);
        for i in 0..half {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * c1[i] + (-b) * s1[i];
            x2[i] = b * c2[i] + a * s2[i];
        }
    }

    /// Rotates `x` `(B, H, L, D)`: `x * cos + rotate_half(x) * sin` with
    /// `rotate_half([x1, x2]) = [-x2, x1]`.
    pub fn apply(x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
        let d = x.dim(3)?;
        let x1 = x.narrow(3, 0, d / 2)?;
        let x2 = x.narrow(3, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
        Ok((x.broadcast_mul(&tables.cos)? + rotated.broadcast_mul(&tables.sin)?)?)
    }
}
