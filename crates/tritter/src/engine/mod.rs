//! The inference engine, CPU side (DESIGN.md section 5): the trained model exported to
//! packed ternary weights, run on ternary-gemm's CPU kernels with a KV cache, and
//! generation with continuous batching.
//!
//! * [`InferenceCheckpoint`]: export ([`InferenceCheckpoint::from_model`],
//!   `tritter export`), save and verified load of the inference format (canonical packed
//!   ternary weights + scales in ternary-gemm's safetensors format, bf16 norms and
//!   embeddings, `config.json`, `manifest.json`); the layer description has a
//!   [`NormPlacement`] (Tritter's Chameleon norms, or Hugging Face BitNet's pre-norm with
//!   sub-norms) and optional QK-Norm ([`Architecture`]), so other checkpoints plug in;
//! * [`CpuEngine`]: the forward pass on packed weights (A8 activations exactly as the
//!   reference BitLinear quantizes them), incremental decode over a [`KvCache`] (f32, or
//!   `kv_int4`'s paged INT4/F16 cache) with the config's sliding window and sinks;
//! * [`generate_batch`] / [`generate_stream`]: sampling with
//!   [`SamplingOptions`](crate::generate::SamplingOptions) (temperature, top-k, top-p,
//!   repetition penalty, stop tokens and sequences, seed, max tokens), a streaming callback,
//!   and continuous batching of many prompts;
//! * [`hf`]: import of Hugging Face BitNet b1.58 checkpoints (`config.json`, safetensors,
//!   `tokenizer.json`) into the same [`InferenceCheckpoint`] ([`hf::import_hf_bitnet`],
//!   [`hf::HfBitnet`]), and the comparison of logits with a peer implementation.
//!
//! ```
//! use std::ops::ControlFlow;
//! use candle_core::{DType, Device};
//! use tritter::engine::{generate_stream, CpuEngine, InferenceCheckpoint, KvCacheOptions, SourceInfo};
//! use tritter::generate::SamplingOptions;
//! use tritter::{TritterConfig, TritterModel};
//!
//! let cfg = TritterConfig::preset("test")?;
//! let model = TritterModel::new(&cfg, DType::F32, &Device::Cpu, 0)?;
//! let engine = CpuEngine::new(InferenceCheckpoint::from_model(&model, SourceInfo::default())?)?;
//! let options = SamplingOptions { max_new_tokens: 8, temperature: 0.7, top_p: 0.9, ..Default::default() };
//! let mut streamed = Vec::new();
//! let out = generate_stream(&engine, &[5, 112, 117, 98], &options, &KvCacheOptions::for_config(&cfg), |t| {
//!     streamed.push(t);
//!     ControlFlow::Continue(())
//! })?;
//! assert_eq!(out.tokens, streamed);
//! # Ok::<(), tritter::TritterError>(())
//! ```

mod bench;
mod checkpoint;
mod cpu;
mod generate;
#[cfg(feature = "cuda")]
mod gpu;
pub mod hf;
mod kv;
mod traits;

pub use bench::{bench_engine, BenchResult};
pub use checkpoint::{
    expected_tensors, file_checksum, Architecture, FileEntry, InferenceCheckpoint, LayerNorms,
    LayerWeights, Manifest, NormPlacement, QkNorm, SourceInfo, TensorEntry, TensorKind, TensorSpec,
    DENSE_FILE, DENSE_FORMAT_TAG, INFERENCE_FORMAT, INFERENCE_FORMAT_VERSION, MANIFEST_FILE,
    TERNARY_FILE,
};
pub use cpu::{CpuEngine, LogitsFor, StepInput};
pub use generate::{
    generate_batch, generate_stream, FinishReason, Generation, GenerationRequest, TokenEvent,
};
#[cfg(feature = "cuda")]
pub use gpu::{device_top_candidates, GpuCache, GpuEngine, DEVICE_TOP_MAX};
pub use kv::{KvCache, KvCacheFormat, KvCacheOptions, SequenceId};
pub use traits::{Engine, EngineCache, StepOutput};
