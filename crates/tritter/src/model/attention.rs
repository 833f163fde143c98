//! Multi-head attention with QK-Norm, RoPE and grouped-query attention (GQA).

use candle_core::{DType, Tensor, D};

use super::bitlinear::BitLinear;
use super::init::ParamBuilder;
use super::norm::RmsNorm;
use super::rope::{Rope, RopeTables};
use crate::config::TritterConfig;
use crate::Result;

/// Attention block: BitLinear q/k/v/o, RMSNorm over D on q and k (QK-Norm, before RoPE,
/// keeps logits bounded without softcapping), RoPE, GQA (query head `h` reads KV head
/// `h / (Hq / Hkv)`), softmax in f32 with an additive mask. Parameters: `q_proj` `(H, H)`,
/// `k_proj`/`v_proj` `(Hkv*D, H)`, `o_proj` `(H, H)`, `q_norm`/`k_norm` `(D,)`.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection.
    pub q_proj: BitLinear,
    /// Key projection.
    pub k_proj: BitLinear,
    /// Value projection.
    pub v_proj: BitLinear,
    /// Output projection.
    pub o_proj: BitLinear,
    /// QK-Norm of queries.
    pub q_norm: RmsNorm,
    /// QK-Norm of keys.
    pub k_norm: RmsNorm,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Creates the block's parameters under `pb` (`q_proj.weight`, ..., `k_norm.weight`).
    pub fn new(pb: &ParamBuilder, cfg: &TritterConfig) -> Result<Self> {
        let (h, kv, d) = (cfg.hidden_size, cfg.kv_dim(), cfg.head_dim());
        let (std, q) = (cfg.initializer_range, cfg.quantize_bitlinear);
        Ok(Attention {
            q_proj: BitLinear::new(&pb.pp("q_proj"), h, h, std, q)?,
            k_proj: BitLinear::new(&pb.pp("k_proj"), h, kv, std, q)?,
            v_proj: BitLinear::new(&pb.pp("v_proj"), h, kv, std, q)?,
            o_proj: BitLinear::new(&pb.pp("o_proj"), h, h, std, q)?,
            q_norm: RmsNorm::new(&pb.pp("q_norm"), d, cfg.norm_eps)?,
            k_norm: RmsNorm::new(&pb.pp("k_norm"), d, cfg.norm_eps)?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: d,
        })
    }

    /// `x` `(B, L, H)` -> `(B, L, H)`; `rope` from [`Rope::tables`] `(B, 1, L, D)`, `bias`
    /// the additive mask `(B, 1, L, L)` f32 from `MaskSpec::to_bias`.
    pub fn forward(&self, x: &Tensor, rope: &RopeTables, bias: &Tensor) -> Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let (hq, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // (B, L, Hq, D) -> QK-Norm -> (B, Hq, L, D) -> RoPE
        let q = self.q_proj.forward(x)?.reshape((b, l, hq, d))?;
        let q = self.q_norm.forward(&q)?.transpose(1, 2)?.contiguous()?;
        let q = Rope::apply(&q, rope)?;
        let k = self.k_proj.forward(x)?.reshape((b, l, hkv, d))?;
        let k = self.k_norm.forward(&k)?.transpose(1, 2)?.contiguous()?;
        let k = Rope::apply(&k, rope)?;
        let v = self.v_proj.forward(x)?.reshape((b, l, hkv, d))?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = (repeat_kv(&k, hq / hkv)?, repeat_kv(&v, hq / hkv)?); // (B, Hq, L, D)

        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?; // (B, Hq, L, L)
        let scores = scores.broadcast_add(bias)?;
        let max = scores.max_keepdim(D::Minus1)?.detach(); // softmax is shift-invariant
        let e = scores.broadcast_sub(&max)?.exp()?;
        let p = e
            .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
            .to_dtype(x.dtype())?;
        let o = p.matmul(&v)?; // (B, Hq, L, D)
        let o = o.transpose(1, 2)?.reshape((b, l, h))?;
        self.o_proj.forward(&o)
    }
}

/// `(B, Hkv, L, D)` -> `(B, Hkv * rep, L, D)`, KV head `g` serving query heads
/// `g * rep .. (g + 1) * rep`.
fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, hkv, l, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, hkv, rep, l, d))?
        .reshape((b, hkv * rep, l, d))?)
}
