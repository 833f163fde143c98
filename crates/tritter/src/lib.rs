//! # tritter
//!
//! The Tritter model assembled from the kernel crates (DESIGN.md section 5): a BitNet b1.58
//! transformer with QK-Norm, RoPE, GQA, squared-ReLU GLU and Chameleon norm placement.
//!
//! Available now:
//! * [`TritterConfig`]: hyper-parameters (serde JSON), presets `test` to `7b`, validation,
//!   analytic [`TritterConfig::param_count`];
//! * [`MemoryEstimate`]: weights (packed ternary / bf16), KV cache (fp16 / INT4, full or
//!   windowed) and activations, printable as a table;
//! * [`model`]: the candle reference model ([`TritterModel`], [`model::BitLinear`] with the
//!   straight-through estimator, attention masks in [`MaskSpec`]);
//! * [`checkpoint`]: safetensors + `config.json` directories, atomic writes, verified loads;
//! * [`engine`]: the inference engine on the CPU: export to packed ternary weights
//!   ([`engine::InferenceCheckpoint`]), [`engine::CpuEngine`] with a KV cache (f32 or paged
//!   INT4, sliding window + sinks), generation with top-k/top-p/repetition penalty/stop
//!   conditions, streaming and continuous batching ([`engine::generate_batch`]);
//! * [`tokenizer`]: the multimodal tokenizer (special tokens, bytes, optional BPE, image
//!   patch codebook, mu-law audio) with a documented id layout;
//! * [`paradigm`]: the embedding-prediction paradigm: `<bot>`/`<eot>` latent markers,
//!   continuous thought ([`TritterModel::forward_latent`]), embedding-prediction losses and
//!   the CE-to-embedding [`paradigm::Objective`], Coconut's curriculum and its trainer;
//! * [`TritterError`]: one error type with actual and expected values.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use tritter::{MaskSpec, TritterConfig, TritterModel};
//!
//! let cfg = TritterConfig::preset("test")?;
//! let model = TritterModel::new(&cfg, DType::F32, &Device::Cpu, 0)?;
//! let ids = Tensor::new(&[[1u32, 72, 105, 2]], &Device::Cpu)?; // (B, L) = (1, 4)
//! let pos = model.default_positions(1, 4)?;
//! let logits = model.forward(&ids, &pos, &MaskSpec::causal())?; // (1, 4, V)
//! assert_eq!(logits.dims(), &[1, 4, cfg.vocab_size]);
//! # Ok::<(), tritter::TritterError>(())
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod engine;
mod error;
pub mod generate;
pub mod memory;
pub mod model;
pub mod paradigm;
pub mod tokenizer;
pub mod train;

pub use config::{AttentionMode, Modality, ParamBreakdown, TritterConfig};
pub use error::{Result, TritterError};
pub use memory::{KvFormat, MemoryEstimate};
pub use model::{MaskSpec, TritterModel};

/// Compiles and runs the README's examples as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
