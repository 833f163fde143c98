//! # flash-attn-sm120
//!
//! FlashAttention-2 forward and backward on `mma.sync` for consumer Blackwell (sm_120) and
//! Hopper (sm_90), with QK-Norm + RoPE fused into the load of q and k, GQA, and the masks of
//! DESIGN.md section 4 (causal, bidirectional, prefix-LM, sliding window, sinks, documents).
//!
//! Tensors: q `(B, Lq, Hq, D)` (or packed `(total_q, Hq, D)`), k/v `(B, Lk, Hkv, D)` in
//! bf16/f16, `Hq % Hkv == 0`; output like q plus logsumexp `(B, Hq, Lq)` f32. The problem
//! description ([`Problem`]) is shared by the CPU reference and the kernels.

pub mod error;
pub mod params;

pub use error::{AttnError, Result};
pub use params::{
    Heads, Mask, MaskInputs, MaskMode, NormRope, Positions, Problem, Seqs, SUPPORTED_HEAD_DIMS,
};

#[cfg(feature = "cuda")]
pub mod cuda;
