//! The unified token embedding shared by every modality.

use candle_core::Tensor;

use super::init::ParamBuilder;
use crate::config::PAD_TOKEN_ID;
use crate::Result;

/// One embedding table `(V, H)` for text, code, image and audio tokens (their id ranges
/// are disjoint, DESIGN.md section 5). The `<pad>` row (id 0) starts at zero and pad
/// inputs are masked, so the lookup gives it no gradient (PyTorch's `padding_idx`); with
/// tied embeddings the LM head still trains row 0 as an output class.
#[derive(Debug, Clone)]
pub struct UnifiedEmbedding {
    weight: Tensor,
}

impl UnifiedEmbedding {
    /// Creates `weight` `(vocab, hidden)` ~ N(0, std²) with a zero pad row.
    pub fn new(pb: &ParamBuilder, vocab: usize, hidden: usize, std: f64) -> Result<Self> {
        let weight =
            pb.normal_with_zero_rows("weight", &[vocab, hidden], std, &[PAD_TOKEN_ID as usize])?;
        Ok(UnifiedEmbedding { weight })
    }

    /// The table `(V, H)` (also the tied LM head).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `ids` `(B, L)` u32 (range-checked by the caller) -> `(B, L, H)`; pad positions give
    /// zeros.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let h = self.weight.dim(1)?;
        let e = self
            .weight
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, h))?;
        let keep = ids.ne(PAD_TOKEN_ID)?.to_dtype(e.dtype())?.unsqueeze(2)?; // (B, L, 1)
        Ok(e.broadcast_mul(&keep)?)
    }
}
