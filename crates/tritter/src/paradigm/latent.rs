//! Latent-span markers and continuous thought (Coconut, Hao et al. 2024).
//!
//! A latent span is `<bot>` followed by latent slots and closed by `<eot>`. A latent slot has
//! no token: its input embedding is the final hidden state (after the final norm, then
//! through the optional `latent_proj` of [`TritterModel::latent_embedding`]) of the position
//! before it, fed back without sampling. The hidden states stay on the autograd graph, so
//! training backpropagates through the chain of thoughts.
//!
//! [`TritterModel::forward_latent`] computes this with repeated full passes: pass `p` fills
//! the `p`-th latent slot of every sequence (slots counted in sequence order, so several
//! spans per sequence work too) from the hidden states of pass `p`; a sequence with `k` slots
//! needs `k + 1` passes and a batch `max k + 1`. The CPU reference recomputes the prefix
//! each pass (Coconut's implementation caches it); the result is the same.

use candle_core::{DType, Tensor};

use crate::config::TritterConfig;
use crate::model::MaskSpec;
use crate::tokenizer::vocab::{LatentToken, MIN_LATENT_VOCAB_SIZE};
use crate::tokenizer::VocabLayout;
use crate::{Result, TritterError, TritterModel};

/// The ids of the latent-span markers of one vocab: `<bot> = V - 2`, `<eot> = V - 1`
/// (the layout of [`VocabLayout`], which keeps them out of the BPE and media ranges).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LatentMarkers {
    /// `<bot>`: a latent span follows.
    pub bot: u32,
    /// `<eot>`: the latent span ends.
    pub eot: u32,
}

impl LatentMarkers {
    /// The markers of a vocab of `vocab_size` ids. Errors (`InvalidConfig` on `vocab_size`)
    /// when the vocab has fewer than 266 ids (8 specials + 256 bytes + the two markers) or
    /// does not fit `u32`.
    pub fn new(vocab_size: usize) -> Result<Self> {
        if vocab_size < MIN_LATENT_VOCAB_SIZE {
            return Err(TritterError::config(
                "vocab_size",
                vocab_size,
                format!(
                    "expected >= {MIN_LATENT_VOCAB_SIZE} for the latent markers <bot>/<eot> \
                     (8 special tokens + 256 bytes + 2 markers)"
                ),
            ));
        }
        let layout = VocabLayout::new(vocab_size)?;
        match (
            layout.latent_id(LatentToken::Bot),
            layout.latent_id(LatentToken::Eot),
        ) {
            (Some(bot), Some(eot)) => Ok(LatentMarkers { bot, eot }),
            _ => Err(TritterError::config(
                "vocab_size",
                vocab_size,
                format!("expected a layout with latent markers (>= {MIN_LATENT_VOCAB_SIZE})"),
            )),
        }
    }

    /// The markers of `config.vocab_size` (see [`new`](Self::new)).
    pub fn from_config(config: &TritterConfig) -> Result<Self> {
        Self::new(config.vocab_size)
    }

    /// Whether `id` is `<bot>` or `<eot>`.
    pub fn is_marker(&self, id: u32) -> bool {
        id == self.bot || id == self.eot
    }
}

/// The 1-based ordinal of every latent slot of `(B, L)` `ids`/`latent` (0: a token
/// position) and the largest ordinal, after checking that every slot follows `<bot>` or
/// another slot. Ordinal `p` is filled by pass `p` of [`TritterModel::forward_latent`].
/// `vocab_size` gives the markers; it is only needed (and checked) when a slot exists.
fn latent_ordinals(
    ids: &[Vec<u32>],
    latent: &[Vec<u8>],
    vocab_size: usize,
) -> Result<(Vec<Vec<u32>>, u32)> {
    let mut markers: Option<LatentMarkers> = None;
    let mut max = 0;
    let mut ordinals = Vec::with_capacity(ids.len());
    for (b, (row, flags)) in ids.iter().zip(latent).enumerate() {
        let mut count = 0u32;
        let mut ord = vec![0u32; row.len()];
        for (i, &flag) in flags.iter().enumerate() {
            let err = |detail: String| TritterError::InvalidLatentSpan {
                batch: b,
                position: i,
                detail,
            };
            match flag {
                0 => continue,
                1 => {}
                other => {
                    return Err(err(format!(
                        "latent_mask holds {other}; expected 0 (token) or 1 (latent slot)"
                    )))
                }
            }
            if i == 0 {
                return Err(err("a latent slot at position 0 has no previous hidden state;                      expected latent slots only after <bot>, at positions >= 1"
                    .into()));
            }
            let m = match markers {
                Some(m) => m,
                None => *markers.insert(LatentMarkers::new(vocab_size)?),
            };
            if flags[i - 1] == 0 && row[i - 1] != m.bot {
                return Err(err(format!(
                    "the previous position holds token id {} but a latent slot expects <bot> \
                     (id {}) or another latent slot before it",
                    row[i - 1],
                    m.bot
                )));
            }
            count += 1;
            ord[i] = count;
        }
        max = max.max(count);
        ordinals.push(ord);
    }
    Ok((ordinals, max))
}

impl TritterModel {
    /// Final hidden states `(B, L, H)` of `input_ids` `(B, L)` u32 with continuous thoughts:
    /// where `latent_mask` `(B, L)` u8 is 1, the input embedding is
    /// [`latent_embedding`](Self::latent_embedding) of the final hidden state at the previous
    /// position (no sampling; the token id there is ignored but must be in the vocabulary,
    /// the curriculum writes `<pad>`). `positions` `(B, L)` u32 and `mask` as in
    /// [`forward`](Self::forward).
    ///
    /// Runs `k + 1` forward passes for `k` = the most latent slots of any sequence: pass `p`
    /// fills every sequence's `p`-th slot, the last pass gives the output. The hidden states
    /// fed back stay on the graph, so gradients flow through the thoughts. With no latent
    /// slot this is exactly one pass, bit-identical to the hidden states of `forward`.
    ///
    /// Errors: `latent_mask` not u8 `(B, L)` or holding values other than 0/1; a latent slot
    /// at position 0 or not preceded by `<bot>` or another slot (`InvalidLatentSpan`); a
    /// vocab below 266 ids when there is a latent slot (`InvalidConfig`); and the errors of
    /// `forward`.
    pub fn forward_latent(
        &self,
        input_ids: &Tensor,
        latent_mask: &Tensor,
        positions: &Tensor,
        mask: &MaskSpec,
    ) -> Result<Tensor> {
        let embeds = self.embed(input_ids)?; // checks dtype, rank and every id
        let (b, l) = input_ids.dims2()?;
        if latent_mask.dtype() != DType::U8 {
            return Err(TritterError::DTypeMismatch {
                what: "latent_mask".into(),
                actual: latent_mask.dtype(),
                expected: "u8 (1 = latent slot, 0 = token)".into(),
            });
        }
        if latent_mask.dims() != [b, l] {
            return Err(TritterError::ShapeMismatch {
                what: "latent_mask".into(),
                actual: latent_mask.dims().to_vec(),
                expected: format!("({b}, {l}) like input_ids"),
            });
        }
        let ids = input_ids.to_vec2::<u32>()?;
        let flags = latent_mask.to_vec2::<u8>()?;
        let (ordinals, passes) = latent_ordinals(&ids, &flags, self.config().vocab_size)?;
        let (rope, bias) = self.layer_context(b, l, positions, mask)?;
        let mut x = embeds;
        if passes > 0 {
            let h = self.config().hidden_size;
            let flat: Vec<u32> = ordinals.concat();
            let ordinal = Tensor::from_vec(flat, (b, l, 1), self.device())?;
            let first = Tensor::zeros((b, 1, h), self.dtype(), self.device())?;
            for p in 1..=passes {
                let hidden = self.run_layers(&x, &rope, &bias)?;
                let thought = self.latent_embedding(&hidden)?;
                // Position i takes the thought of position i - 1 (l >= 2: position 0 is
                // never latent).
                let shifted = Tensor::cat(&[&first, &thought.narrow(1, 0, l - 1)?], 1)?;
                let fill = ordinal.eq(p)?.broadcast_as((b, l, h))?;
                x = fill.where_cond(&shifted, &x)?;
            }
        }
        self.run_layers(&x, &rope, &bias)
    }
}
