//! Helpers of the inference-engine tests: configs, a reference model whose high-precision
//! weights are exactly the engine's bf16 ones, token streams and error metrics.

use candle_core::{DType, Device, Tensor};
use half::bf16;
use tritter::config::MIN_VOCAB_SIZE;
use tritter::engine::{CpuEngine, InferenceCheckpoint, SourceInfo};
use tritter::model::SeededRng;
use tritter::{TritterConfig, TritterModel};

/// The BitLinear weights of a layer: everything else is stored in bf16 by the export.
const BITLINEAR: [&str; 7] = [
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
];

/// A small config with the parts the test preset lacks: GQA 6 query heads over 2 KV heads
/// (D = 16), 3 layers, a sliding window with sinks, an untied LM head and a latent
/// projection.
pub fn gqa_window_config() -> TritterConfig {
    let mut cfg = TritterConfig::preset("test").unwrap();
    cfg.hidden_size = 96;
    cfg.num_heads = 6;
    cfg.num_kv_heads = 2;
    cfg.num_layers = 3;
    cfg.intermediate_size = 160;
    cfg.vocab_size = MIN_VOCAB_SIZE + 36;
    cfg.max_position_embeddings = 96;
    cfg.sliding_window = Some(12);
    cfg.attention_sinks = 3;
    cfg.tie_embeddings = false;
    cfg.latent_projection = true;
    cfg.validate().unwrap();
    cfg
}

/// The test preset with a sliding window of 8 and 2 sinks (D = 32, so the paged INT4/F16
/// caches apply).
pub fn windowed_test_config() -> TritterConfig {
    let mut cfg = TritterConfig::preset("test").unwrap();
    cfg.sliding_window = Some(8);
    cfg.attention_sinks = 2;
    cfg.validate().unwrap();
    cfg
}

/// A seeded f32 reference model whose non-BitLinear parameters (embedding, norms, LM head,
/// latent projection) are rounded to bf16, so that it and the exported engine hold the same
/// weights. The norms, 1 at init, get random values around 1 so that they matter.
pub fn bf16_reference(cfg: &TritterConfig, seed: u64) -> TritterModel {
    let model = TritterModel::new(cfg, DType::F32, &Device::Cpu, seed).unwrap();
    let mut rng = SeededRng::new(seed ^ 0x5eed);
    let data = model.varmap().data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        if BITLINEAR.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        let var = &data[name];
        let mut v = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        if name.contains("norm") {
            for x in &mut v {
                *x = 1.0 + 0.2 * rng.normal() as f32;
            }
        }
        let rounded: Vec<f32> = v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        var.set(&Tensor::from_vec(rounded, var.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    drop(data);
    model
}

/// The engine of `model`'s export.
pub fn engine_of(model: &TritterModel) -> CpuEngine {
    CpuEngine::new(InferenceCheckpoint::from_model(model, SourceInfo::default()).unwrap()).unwrap()
}

/// `n` token ids in `1..vocab` (no `<pad>`), seeded.
pub fn random_tokens(cfg: &TritterConfig, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = SeededRng::new(seed);
    (0..n)
        .map(|_| 1 + rng.below(cfg.vocab_size as u64 - 1) as u32)
        .collect()
}

/// Reference logits `(L, V)` row-major of one sequence at positions `0..L` under the
/// config's mask.
pub fn reference_logits(model: &TritterModel, tokens: &[u32]) -> Vec<f32> {
    let ids = Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu).unwrap();
    let pos = model.default_positions(1, tokens.len()).unwrap();
    let mask = tritter::MaskSpec::from_config(model.config());
    model
        .forward(&ids, &pos, &mask)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// `max |a - b|`.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `max |a|`.
pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().map(|x| x.abs()).fold(0.0, f32::max)
}
