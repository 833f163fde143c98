//! # flash-attn-sm120
//!
//! FlashAttention-2 forward and backward on `mma.sync` for consumer Blackwell (sm_120) and
//! Hopper (sm_90), with QK-Norm + RoPE fused into the load of q and k, GQA, and the masks of
//! DESIGN.md section 4 (causal, bidirectional, prefix-LM, sliding window, sinks, documents).
//!
//! Tensors: q `(B, Lq, Hq, D)` (or packed `(total_q, Hq, D)`), k/v `(B, Lk, Hkv, D)` in
//! bf16/f16, `Hq % Hkv == 0`; output like q plus logsumexp `(B, Hq, Lq)` f32. The problem
//! description ([`Problem`]) is shared by the CPU reference and the kernels.
//!
//! Available now:
//! * [`Problem`] and its parts, validated on the host ([`AttnError`] names actual and
//!   expected values);
//! * the f32 CPU reference ([`mod@reference`]): [`attention_fwd_ref`] (output + logsumexp),
//!   [`attention_bwd_ref`] (dq, dk, dv and the norm weights' gradients),
//!   [`attention_probs_ref`], and the QK-Norm + RoPE prologue [`qk_norm_rope_ref`] /
//!   [`qk_norm_rope_bwd_ref`];
//! * feature `candle`: `candle_ops::FlashAttn`, a `CustomOp3` with autograd (CPU forward
//!   and backward through the reference; with `candle-cuda`, CUDA forward and backward
//!   through the kernels on the candle device's stream);
//! * feature `cuda`: module `cuda`, the FlashAttention-2 forward kernel (every mask, varlen, GQA,
//!   the fused QK-Norm + RoPE prologue) and the standalone QK-Norm + RoPE kernel, and the FlashAttention-2 backward
//!   (`cuda::flash_attn_bwd_cuda`: atomic or deterministic dq, prologue gradients).

#[cfg(feature = "candle-cuda")]
mod candle_cuda;
#[cfg(feature = "candle")]
pub mod candle_ops;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod params;
pub mod reference;

pub use error::{AttnError, Result};
pub use params::{
    Heads, Mask, MaskInputs, MaskMode, NormRope, Positions, Problem, Seqs, TileSchedule,
    SUPPORTED_HEAD_DIMS,
};

pub use reference::{
    attention_bwd_ref, attention_fwd_ref, attention_probs_ref, qk_norm_rope_bwd_ref,
    qk_norm_rope_ref, FwdOut, Grads, Prologue,
};

/// Compiles and runs the README's examples as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
