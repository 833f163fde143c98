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
                for _half in 0..2 {
                    for &f in &self.inv_freq {
                        let a = f64::from(p) * f;
                        cos.push(a.cos() as f32);
                        sin.push(a.sin() as f32);
                    }
                }
            }
        }
        let shape = (b, 1, l, d);
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        })
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
