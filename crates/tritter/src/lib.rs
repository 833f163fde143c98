//! # tritter
//!
//! The Tritter model assembled from the kernel crates: config and presets (test to 7B),
//! multimodal tokenizer, a candle reference model with BitLinear (straight-through
//! estimator), the trainer, the GPU engine and the `tritter` CLI (DESIGN.md section 5).
//!
//! Status: the crate is part of the workspace build and CI; the model arrives with the
//! tritter issues. Nothing is exported yet, so nothing can be called by mistake.

pub mod tokenizer;
