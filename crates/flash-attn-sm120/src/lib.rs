//! # flash-attn-sm120
//!
//! FlashAttention-2 forward and backward on `mma.sync` for consumer Blackwell (sm_120) and
//! Hopper (sm_90), with QK-Norm + RoPE fused into the load of q and k, GQA, and the masks of
//! DESIGN.md section 4 (causal, bidirectional, prefix-LM, sliding window, sinks, documents).
//!
//! Tensors: q `(B, Lq, Hq, D)`, k/v `(B, Lk, Hkv, D)` in bf16/f16, `Hq % Hkv == 0`; output
//! `(B, Lq, Hq, D)` plus logsumexp `(B, Hq, Lq)` f32.
//!
//! Status: the crate is part of the workspace build and CI; its kernels arrive with the
//! flash-attn issue. Nothing is exported yet, so nothing can be called by mistake.
