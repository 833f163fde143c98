//! Import of Hugging Face BitNet b1.58 checkpoints: a seeded random checkpoint written in
//! the HF layout (`config.json` + safetensors) imports, runs on the engine with the logits
//! of an independent plain re-implementation of transformers' BitNet forward (online
//! `AutoBitLinear` quantization), round-trips through `tritter export --hf`, and every kind
//! of bad input is a typed error naming actual and expected values.
//!
//! `TRITTER_HF_MODEL=<dir> TRITTER_HF_REFERENCE=<logits.json|.npy> [TRITTER_HF_IDS=1,2,3]`
//! compares the engine with logits written by `benches/peers/hf_bitnet_reference.py`
//! (skipped without them).

mod common;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use common::hf::{bf16_bytes, random_weights, reference_logits, write_hf_dir, Shapes, Weights};
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use ternary_gemm::{absmean_quantize, ScaleGranularity};
use tritter::engine::hf::{
    argmax, compare_logits, hf_absmean_quantize, import_hf_bitnet, HfBitnet, HfTensorProblem,
    ReferenceLogits, HF_EXPORT_CONFIG_FILE, HF_TOKENIZER_FILE,
};
use tritter::engine::{
    generate_stream, Architecture, CpuEngine, InferenceCheckpoint, KvCacheOptions, LogitsFor,
    StepInput,
};
use tritter::generate::SamplingOptions;
use tritter::{TritterConfig, TritterError, TritterModel};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tritter-engine-hf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A checkpoint directory of `shapes` with seed `seed`, single file.
fn hf_dir(name: &str, shapes: &Shapes, seed: u64) -> (PathBuf, Weights) {
    let dir = scratch(name);
    let w = random_weights(shapes, seed);
    write_hf_dir(&dir, &shapes.config_json(), &w, 1);
    (dir, w)
}

/// `L` ids covering the vocabulary, starting with id 0 (an ordinary token for HF models).
fn test_ids(s: &Shapes, len: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..len - 1).map(|i| ((i * 37) % s.vocab) as u32).collect();
    ids.push(s.vocab as u32 - 1);
    ids
}

fn as_f32(v: Vec<f64>) -> Vec<f32> {
    v.into_iter().map(|x| x as f32).collect()
}

/// The engine's logits against the f64 reference, within a bound set by the reference's own
/// f32 rounding noise (4x `|ref_f32 - ref_f64|`, at least 2e-6 of the logit scale), with
/// the same top-1 token at every position. Returns the engine's max abs difference.
fn assert_matches_reference(s: &Shapes, w: &Weights, engine: &CpuEngine, ids: &[u32]) -> f32 {
    let ours = engine.forward_full(ids).unwrap();
    let r64 = as_f32(reference_logits::<f64>(s, w, ids));
    let r32 = as_f32(reference_logits::<f32>(s, w, ids));
    let noise = compare_logits(&r32, &r64, s.vocab).unwrap();
    let c = compare_logits(&ours, &r64, s.vocab).unwrap();
    let bound = (4.0 * noise.max_abs_diff).max(2e-6 * c.reference_scale);
    println!("engine vs f64 reference: {c}");
    println!("f32 reference vs f64 reference: {noise}; bound {bound:.3e}");
    assert!(
        c.max_abs_diff <= bound,
        "engine differs from the reference by {} > {bound}",
        c.max_abs_diff
    );
    assert_eq!(c.top1_agree, c.positions, "top-1 tokens differ");
    c.max_abs_diff
}

fn hf_config_err(e: TritterError) -> (String, String, String) {
    match e {
        TritterError::HfConfig {
            key,
            actual,
            expected,
            ..
        } => (key, actual, expected),
        other => panic!("expected HfConfig, got {other}"),
    }
}

fn hf_tensor_err(e: TritterError) -> (String, HfTensorProblem, String, String) {
    match e {
        TritterError::HfTensor {
            tensor,
            problem,
            actual,
            expected,
            ..
        } => (tensor, problem, actual, expected),
        other => panic!("expected HfTensor, got {other}"),
    }
}

/// Tied embeddings: the imported model's logits equal the plain reference forward's
/// (f64) within its own f32 noise, with the same top-1 at every position, id 0 included.
#[test]
fn tied_import_matches_reference_forward() {
    let s = Shapes::small();
    let (dir, w) = hf_dir("tied", &s, 7);
    let m = HfBitnet::import(&dir).unwrap();
    assert_eq!(m.checkpoint.architecture, Architecture::HF_BITNET);
    assert!(m.checkpoint.lm_head.is_none());
    assert_eq!(m.checkpoint.config.num_layers, s.layers);
    assert_eq!(m.checkpoint.config.num_kv_heads, s.kv_heads);
    assert_eq!(m.checkpoint.config.norm_eps, s.eps);
    assert_eq!(m.checkpoint.config.rope_theta, s.theta);
    assert_eq!(m.stop_token_ids, vec![2]);
    let engine = CpuEngine::new(m.checkpoint).unwrap();
    let ids = test_ids(&s, 24);
    assert_eq!(ids[0], 0);
    assert_matches_reference(&s, &w, &engine, &ids);
    std::fs::remove_dir_all(dir).ok();
}

/// Untied embeddings: `lm_head.weight` is imported and used (the reference reads it), and
/// an untied config without it is a typed missing-tensor error.
#[test]
fn untied_head_is_imported_and_required() {
    let s = Shapes {
        tied: false,
        ..Shapes::small()
    };
    let (dir, mut w) = hf_dir("untied", &s, 11);
    let m = HfBitnet::import(&dir).unwrap();
    let head = m.checkpoint.lm_head.clone().expect("untied head");
    assert_eq!(head, w["lm_head.weight"].1);
    let engine = CpuEngine::new(m.checkpoint).unwrap();
    assert_matches_reference(&s, &w, &engine, &test_ids(&s, 16));

    w.remove("lm_head.weight");
    write_hf_dir(&dir, &s.config_json(), &w, 1);
    let (tensor, problem, _, expected) = hf_tensor_err(import_hf_bitnet(&dir).unwrap_err());
    assert_eq!(
        (tensor.as_str(), problem),
        ("lm_head.weight", HfTensorProblem::Missing)
    );
    assert!(
        expected.contains(&format!("[{}, {}]", s.vocab, s.hidden))
            && expected.contains("tie_word_embeddings is false"),
        "{expected}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// A tied checkpoint that still stores `lm_head.weight` (older `save_pretrained`) imports,
/// ignoring it as transformers does; so do RoPE `inv_freq` buffers.
#[test]
fn tied_checkpoint_ignores_stored_head_and_rope_buffers() {
    let s = Shapes::small();
    let (dir, mut w) = hf_dir("tied-extra", &s, 3);
    let reference = import_hf_bitnet(&dir).unwrap();
    let junk = vec![bf16::from_f32(9.0); s.vocab * s.hidden];
    w.insert("lm_head.weight".into(), (vec![s.vocab, s.hidden], junk));
    w.insert(
        "model.rotary_emb.inv_freq".into(),
        (vec![s.head_dim() / 2], vec![bf16::ONE; s.head_dim() / 2]),
    );
    write_hf_dir(&dir, &s.config_json(), &w, 1);
    assert_eq!(import_hf_bitnet(&dir).unwrap(), reference);
    std::fs::remove_dir_all(dir).ok();
}

/// A sharded checkpoint (`model.safetensors.index.json` + 3 shards) imports to exactly the
/// single-file checkpoint; an index naming a shard that lacks the tensor is a typed error.
#[test]
fn sharded_index_imports_identically() {
    let s = Shapes {
        tied: false,
        ..Shapes::small()
    };
    let (single, w) = hf_dir("single", &s, 5);
    let sharded = scratch("sharded");
    write_hf_dir(&sharded, &s.config_json(), &w, 3);
    assert!(sharded.join("model-00002-of-00003.safetensors").is_file());
    let a = import_hf_bitnet(&single).unwrap();
    let mut b = import_hf_bitnet(&sharded).unwrap();
    b.source = a.source.clone();
    assert_eq!(a, b);

    let index_path = sharded.join("model.safetensors.index.json");
    let mut index: Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let wrong = if index["weight_map"][name] == "model-00001-of-00003.safetensors" {
        "model-00002-of-00003.safetensors"
    } else {
        "model-00001-of-00003.safetensors"
    };
    index["weight_map"][name] = json!(wrong);
    std::fs::write(&index_path, index.to_string()).unwrap();
    let (tensor, problem, actual, _) = hf_tensor_err(import_hf_bitnet(&sharded).unwrap_err());
    assert_eq!(
        (tensor.as_str(), problem, actual.as_str()),
        (name, HfTensorProblem::Missing, "absent from the shard")
    );
    std::fs::remove_dir_all(single).ok();
    std::fs::remove_dir_all(sharded).ok();
}

/// F32 weights holding bf16 values import to the bf16 checkpoint exactly; F16 weights
/// import (norms and embedding rounded to bf16) and run.
#[test]
fn f32_and_f16_weights_import() {
    let s = Shapes::small();
    let (dir, w) = hf_dir("dtypes", &s, 13);
    let from_bf16 = import_hf_bitnet(&dir).unwrap();
    for dtype in [Dtype::F32, Dtype::F16] {
        let tensors: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = w
            .iter()
            .map(|(n, (shape, v))| {
                let bytes = match dtype {
                    Dtype::F32 => v.iter().flat_map(|x| x.to_f32().to_le_bytes()).collect(),
                    _ => v
                        .iter()
                        .flat_map(|x| half::f16::from_f32(x.to_f32()).to_le_bytes())
                        .collect(),
                };
                (n.clone(), shape.clone(), dtype, bytes)
            })
            .collect();
        write_raw(&dir.join("model.safetensors"), &tensors);
        let mut ckpt = import_hf_bitnet(&dir).unwrap();
        if dtype == Dtype::F32 {
            ckpt.source = from_bf16.source.clone();
            assert_eq!(ckpt, from_bf16);
        } else {
            let logits = CpuEngine::new(ckpt)
                .unwrap()
                .forward_full(&test_ids(&s, 4))
                .unwrap();
            assert!(logits.iter().all(|x| x.is_finite()));
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Writes tensors of any dtype into one safetensors file.
fn write_raw(path: &Path, tensors: &[(String, Vec<usize>, Dtype, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, dtype, b)| {
            (
                n.clone(),
                TensorView::new(*dtype, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

/// The weights of `w` as raw bf16 tensors, `edit` applied to the named one.
fn raw_with(
    w: &Weights,
    name: &str,
    edit: impl FnOnce(&mut Vec<usize>, &mut Dtype, &mut Vec<u8>),
) -> Vec<(String, Vec<usize>, Dtype, Vec<u8>)> {
    let mut out: Vec<_> = w
        .iter()
        .map(|(n, (shape, v))| (n.clone(), shape.clone(), Dtype::BF16, bf16_bytes(v)))
        .collect();
    let t = out.iter_mut().find(|t| t.0 == name).expect("tensor");
    edit(&mut t.1, &mut t.2, &mut t.3);
    out
}

/// Missing, unexpected, misshapen, non-float and non-finite tensors are typed errors naming
/// the tensor, what was found and what the config implies.
#[test]
fn bad_tensors_are_typed_errors() {
    let s = Shapes::small();
    let (dir, w) = hf_dir("bad-tensors", &s, 17);
    let st = dir.join("model.safetensors");
    let (h, i) = (s.hidden, s.inter);

    // Missing: one MLP matrix of the last layer.
    let missing = format!("model.layers.{}.mlp.up_proj.weight", s.layers - 1);
    let mut fewer = w.clone();
    fewer.remove(&missing);
    write_hf_dir(&dir, &s.config_json(), &fewer, 1);
    let (tensor, problem, actual, expected) = hf_tensor_err(import_hf_bitnet(&dir).unwrap_err());
    assert_eq!((tensor, problem), (missing, HfTensorProblem::Missing));
    assert_eq!(actual, "no file holds it");
    assert!(expected.contains(&format!("[{i}, {h}]")), "{expected}");

    // Unexpected: a layer beyond num_hidden_layers.
    let mut more = w.clone();
    let extra = format!("model.layers.{}.input_layernorm.weight", s.layers);
    more.insert(extra.clone(), (vec![h], vec![bf16::ONE; h]));
    write_hf_dir(&dir, &s.config_json(), &more, 1);
    let (tensor, problem, _, _) = hf_tensor_err(import_hf_bitnet(&dir).unwrap_err());
    assert_eq!((tensor, problem), (extra, HfTensorProblem::Unexpected));

    // Wrong shape: q_proj one column short.
    let q = "model.layers.0.self_attn.q_proj.weight";
    write_raw(
        &st,
        &raw_with(&w, q, |shape, _, bytes| {
            shape[1] = h - 1;
            bytes.truncate(2 * h * (h - 1));
        }),
    );
    let e = import_hf_bitnet(&dir).unwrap_err();
    let msg = e.to_string();
    let (tensor, problem, actual, expected) = hf_tensor_err(e);
    assert_eq!((tensor.as_str(), problem), (q, HfTensorProblem::WrongShape));
    assert_eq!(actual, format!("[{h}, {}]", h - 1));
    assert!(expected.starts_with(&format!("[{h}, {h}]")), "{expected}");
    assert!(msg.contains(q) && msg.contains("wrong shape"), "{msg}");

    // Unsupported dtype: an I32 norm.
    let norm = "model.layers.0.input_layernorm.weight";
    write_raw(
        &st,
        &raw_with(&w, norm, |_, dtype, bytes| {
            *dtype = Dtype::I32;
            *bytes = vec![0u8; 4 * h];
        }),
    );
    let (tensor, problem, actual, expected) = hf_tensor_err(import_hf_bitnet(&dir).unwrap_err());
    assert_eq!(
        (tensor.as_str(), problem, actual.as_str(), expected.as_str()),
        (
            norm,
            HfTensorProblem::UnsupportedDtype,
            "I32",
            "BF16, F16 or F32"
        )
    );

    // Non-finite: a NaN in a linear (quantized) and an Inf in a norm (kept), by position.
    let k = "model.layers.1.self_attn.k_proj.weight";
    for (name, value, at) in [(k, f32::NAN, h + 3), (norm, f32::INFINITY, 5)] {
        write_raw(
            &st,
            &raw_with(&w, name, |_, _, bytes| {
                bytes[2 * at..2 * at + 2].copy_from_slice(&bf16::from_f32(value).to_le_bytes());
            }),
        );
        let (tensor, problem, actual, expected) =
            hf_tensor_err(import_hf_bitnet(&dir).unwrap_err());
        assert_eq!(
            (tensor.as_str(), problem),
            (name, HfTensorProblem::NonFinite)
        );
        assert!(actual.contains(&format!("flat index {at}")), "{actual}");
        assert_eq!(expected, "finite values");
    }

    // No weights at all.
    std::fs::remove_file(&st).unwrap();
    let (_, problem, actual, _) = hf_tensor_err(import_hf_bitnet(&dir).unwrap_err());
    assert_eq!(
        (problem, actual.as_str()),
        (HfTensorProblem::Missing, "no weights file")
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Config keys the engine cannot honour are typed errors naming the key, its value and
/// what would be accepted; keys with transformers defaults may be absent.
#[test]
fn bad_configs_are_typed_errors() {
    let s = Shapes::small();
    let (dir, w) = hf_dir("bad-config", &s, 19);
    let base = s.config_json();
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "model_type",
            Box::new(|c| c["model_type"] = json!("llama")),
            "\"llama\"",
        ),
        (
            "model_type",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("model_type");
            }),
            "missing",
        ),
        (
            "hidden_size",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("hidden_size");
            }),
            "missing",
        ),
        (
            "hidden_size",
            Box::new(|c| c["hidden_size"] = json!("64")),
            "\"64\"",
        ),
        (
            "hidden_act",
            Box::new(|c| c["hidden_act"] = json!("silu")),
            "\"silu\"",
        ),
        (
            "attention_bias",
            Box::new(|c| c["attention_bias"] = json!(true)),
            "true",
        ),
        ("head_dim", Box::new(|c| c["head_dim"] = json!(32)), "32"),
        (
            "rope_scaling",
            Box::new(|c| c["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0})),
            "{\"factor\":2.0,\"rope_type\":\"linear\"}",
        ),
        (
            "rope_parameters",
            Box::new(|c| c["rope_parameters"] = json!({"rope_type": "yarn"})),
            "{\"rope_type\":\"yarn\"}",
        ),
        (
            "num_key_value_heads",
            Box::new(|c| c["num_key_value_heads"] = json!(3)),
            "3",
        ),
        (
            "vocab_size",
            Box::new(|c| c["vocab_size"] = json!(100)),
            "100",
        ),
        (
            "quantization_config.quantization_mode",
            Box::new(|c| c["quantization_config"]["quantization_mode"] = json!("offline")),
            "\"offline\"",
        ),
        (
            "quantization_config.use_rms_norm",
            Box::new(|c| c["quantization_config"]["use_rms_norm"] = json!(true)),
            "true",
        ),
        (
            "quantization_config.quant_method",
            Box::new(|c| c["quantization_config"]["quant_method"] = json!("gptq")),
            "\"gptq\"",
        ),
        (
            "partial_rotary_factor",
            Box::new(|c| c["partial_rotary_factor"] = json!(0.5)),
            "0.5",
        ),
    ];
    for (key, edit, actual) in cases {
        let mut cfg = base.clone();
        edit(&mut cfg);
        write_hf_dir(&dir, &cfg, &w, 1);
        let err = import_hf_bitnet(&dir).unwrap_err();
        let msg = err.to_string();
        let (k, a, expected) = hf_config_err(err);
        assert_eq!((k.as_str(), a.as_str()), (key, actual), "{msg}");
        assert!(!expected.is_empty() && msg.contains("config.json"), "{msg}");
    }

    // Defaults: absent optional keys (kv heads = heads then, so the weights change shape),
    // a default rope_scaling, rope_parameters carrying the theta, no quantization_config.
    let mut cfg = base.clone();
    let obj = cfg.as_object_mut().unwrap();
    for key in [
        "rms_norm_eps",
        "quantization_config",
        "rope_theta",
        "hidden_act",
    ] {
        obj.remove(key);
    }
    obj.insert("rope_scaling".into(), json!({"rope_type": "default"}));
    obj.insert(
        "rope_parameters".into(),
        json!({"rope_type": "default", "rope_theta": s.theta}),
    );
    obj.insert("eos_token_id".into(), json!([2, 5]));
    write_hf_dir(&dir, &cfg, &w, 1);
    let m = HfBitnet::import(&dir).unwrap();
    assert_eq!(m.config.rope_theta, s.theta);
    assert_eq!(m.config.rms_norm_eps, 1e-5);
    assert_eq!(m.stop_token_ids, vec![2, 5]);
    assert_eq!(
        m.config.quantization,
        tritter::engine::hf::HfQuantization::Absent
    );
    std::fs::remove_dir_all(dir).ok();
}

/// `hf_absmean_quantize` reproduces transformers' `WeightQuant` code for code (f32 scale
/// `1 / max(mean|W|, 1e-5)`, round half to even), where ternary-gemm's `absmean_quantize`
/// (`W / (mean|W| + 1e-5)`) differs for a weight between the two thresholds.
#[test]
fn weight_quantization_is_transformers_weight_quant() {
    // A tie: mean|W| = 0.5, so 0.25 * 2 = 0.5 exactly rounds to 0 (half to even) and
    // 0.75 * 2 = 1.5 to 2, clamped to 1.
    let w = [0.75f32, 0.25, -0.75, -0.25];
    let m = hf_absmean_quantize(&w, 1, 4).unwrap();
    assert_eq!(m.values(), vec![1, 0, -1, 0]);
    assert_eq!(m.scales().as_slice(), &[0.5]);

    // A (256, 256) N(0, 0.02²) matrix, as a fresh checkpoint holds.
    let (n, k) = (256, 256);
    let v: Vec<f32> = tritter::model::SeededRng::new(1)
        .normal_vec(n * k, 0.02)
        .into_iter()
        .map(|x| bf16::from_f32(x).to_f32())
        .collect();
    let ours = hf_absmean_quantize(&v, n, k).unwrap();
    let mean = v.iter().map(|x| f64::from(x.abs())).sum::<f64>() / v.len() as f64;
    let s = 1.0f32 / (mean as f32).max(1e-5);
    let expected: Vec<i8> = v
        .iter()
        .map(|&x| (x * s).round_ties_even().clamp(-1.0, 1.0) as i8)
        .collect();
    assert_eq!(ours.values(), expected);
    // Between the two thresholds: w / mean|W| = 0.5 (1 + 1e-6) rounds to 1 here, to 0
    // with the added epsilon.
    let b = 0.25f32 * (1.0 + 1e-6);
    let pair = [1.0 - b, b];
    assert_eq!(
        hf_absmean_quantize(&pair, 1, 2).unwrap().values(),
        vec![1, 1]
    );
    let tg_pair = absmean_quantize(&pair, 1, 2, ScaleGranularity::PerTensor).unwrap();
    assert_eq!(tg_pair.values(), vec![1, 0]);

    let tg = absmean_quantize(&v, n, k, ScaleGranularity::PerTensor).unwrap();
    let differ = tg
        .values()
        .iter()
        .zip(&expected)
        .filter(|(a, b)| a != b)
        .count();
    println!(
        "ternary-gemm absmean_quantize differs from transformers' WeightQuant on {differ} of {} codes (mean|W| = {mean:.4})",
        n * k
    );
    assert!(hf_absmean_quantize(&[f32::NAN, 0.0], 1, 2).is_err());
    assert!(hf_absmean_quantize(&[0.0; 3], 1, 2).is_err());
}

/// Incremental decoding (token by token through the KV cache) gives the same logits as
/// the whole sequence at once, as for Tritter checkpoints.
#[test]
fn decode_step_by_step_equals_full_forward() {
    let s = Shapes::small();
    let (dir, _) = hf_dir("decode", &s, 23);
    let engine = CpuEngine::new(import_hf_bitnet(&dir).unwrap()).unwrap();
    let ids = test_ids(&s, 10);
    let full = engine.forward_full(&ids).unwrap();
    let mut cache = engine
        .new_cache(&KvCacheOptions::for_config(engine.config()))
        .unwrap();
    let seq = cache.add_sequence();
    for (p, id) in ids.iter().enumerate() {
        let out = engine
            .step(
                &mut cache,
                &[StepInput {
                    seq,
                    tokens: &[*id],
                    logits: LogitsFor::Last,
                }],
            )
            .unwrap();
        assert_eq!(out[0], full[p * s.vocab..(p + 1) * s.vocab], "position {p}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// A word-level `tokenizer.json` with `<s>` prepended by its post-processor (as Llama 3's
/// adds `<|begin_of_text|>`); ids 0..8 special, words from 8.
fn word_tokenizer_json(words: &[&str]) -> String {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert((*t).into(), json!(i));
    }
    for (i, w) in words.iter().enumerate() {
        vocab.insert((*w).into(), json!(8 + i));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
    .to_string()
}

/// `tokenizer.json` is loaded with the `tokenizers` crate (post-processor included), and
/// greedy generation with the config's eos as stop token picks the argmax of the full
/// forward at every step.
#[test]
fn tokenizer_and_greedy_generation() {
    let s = Shapes::small();
    let (dir, _) = hf_dir("tokenizer", &s, 29);
    let words = ["hello", "world", "ternary", "weights"];
    std::fs::write(dir.join(HF_TOKENIZER_FILE), word_tokenizer_json(&words)).unwrap();
    let m = HfBitnet::import(&dir).unwrap();
    let tok = m.tokenizer.as_ref().expect("tokenizer.json loaded");
    let ids = tok.encode("hello world", true).unwrap();
    assert_eq!(ids, vec![1, 8, 9]);
    assert_eq!(tok.encode("ternary weights", false).unwrap(), vec![10, 11]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "hello world");

    let engine = CpuEngine::new(m.checkpoint.clone()).unwrap();
    let options = SamplingOptions {
        max_new_tokens: 6,
        temperature: 0.0,
        stop_at_eos: false,
        stop_tokens: &m.stop_token_ids,
        ..SamplingOptions::default()
    };
    let cache = KvCacheOptions::for_config(engine.config());
    let g = generate_stream(&engine, &ids, &options, &cache, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    let mut context = ids.clone();
    for &t in &g.tokens {
        let logits = engine.forward_full(&context).unwrap();
        let last = &logits[(context.len() - 1) * s.vocab..];
        assert_eq!(t as usize, argmax(last));
        context.push(t);
    }
    assert!(!g.tokens.is_empty());

    // A tokenizer with more ids than the embedding has rows is refused.
    let many: Vec<String> = (0..s.vocab).map(|i| format!("w{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    std::fs::write(dir.join(HF_TOKENIZER_FILE), word_tokenizer_json(&many)).unwrap();
    let (key, _, _) = hf_config_err(HfBitnet::import(&dir).unwrap_err());
    assert_eq!(key, "vocabulary");
    std::fs::remove_dir_all(dir).ok();
}

/// `HfBitnet::save` (what `tritter export --hf` writes) reopens bit-identical with its
/// config, tokenizer and stop ids; a Tritter export is refused by `HfBitnet::open`.
#[test]
fn export_round_trip() {
    let s = Shapes::small();
    let (dir, _) = hf_dir("export-src", &s, 31);
    std::fs::write(
        dir.join(HF_TOKENIZER_FILE),
        word_tokenizer_json(&["hello", "world"]),
    )
    .unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        json!({"eos_token_id": [2, 7]}).to_string(),
    )
    .unwrap();
    let m = HfBitnet::import(&dir).unwrap();
    assert_eq!(m.stop_token_ids, vec![2, 7]);
    let out = scratch("export-out");
    m.save(&out).unwrap();
    assert!(out.join(HF_EXPORT_CONFIG_FILE).is_file());
    let back = HfBitnet::open(&out).unwrap();
    assert_eq!(back.checkpoint, m.checkpoint);
    assert_eq!(back.config, m.config);
    assert_eq!(back.stop_token_ids, m.stop_token_ids);
    assert_eq!(
        back.tokenizer.unwrap().encode("hello world", true).unwrap(),
        vec![1, 8, 9]
    );
    assert_eq!(InferenceCheckpoint::load(&out).unwrap(), m.checkpoint);

    let tritter_dir = scratch("export-tritter");
    let cfg = TritterConfig::preset("test").unwrap();
    let model =
        TritterModel::new(&cfg, candle_core::DType::F32, &candle_core::Device::Cpu, 0).unwrap();
    InferenceCheckpoint::from_model(&model, Default::default())
        .unwrap()
        .save(&tritter_dir)
        .unwrap();
    let err = HfBitnet::open(&tritter_dir).unwrap_err();
    assert!(
        matches!(&err, TritterError::CheckpointMismatch { detail, .. } if detail.contains("hf_config.json")),
        "{err}"
    );
    for d in [dir, out, tritter_dir] {
        std::fs::remove_dir_all(d).ok();
    }
}

/// Manifests written before `zero_pad_embedding` existed read as Tritter's (`true`).
#[test]
fn old_manifest_architecture_defaults_to_zero_pad() {
    let arch: Architecture =
        serde_json::from_str(r#"{"norm_placement": "chameleon", "qk_norm": true}"#).unwrap();
    assert_eq!(arch, Architecture::TRITTER);
    let hf: Architecture = serde_json::from_str(
        r#"{"norm_placement": "pre_norm_sub_norm", "qk_norm": false, "zero_pad_embedding": false}"#,
    )
    .unwrap();
    assert_eq!(hf, Architecture::HF_BITNET);
}

/// Reference logits files: `.json` and `.npy` round-trip, and the comparison reports
/// the max difference, its position and the top-1 agreement.
#[test]
fn reference_logits_files_and_comparison() {
    let dir = scratch("logits-files");
    std::fs::create_dir_all(&dir).unwrap();
    let (l, v) = (3, 5);
    let logits: Vec<f32> = (0..l * v).map(|i| (i as f32 * 0.37).sin()).collect();
    let r = ReferenceLogits::new(vec![4, 0, 2], v, logits.clone()).unwrap();
    for name in ["r.json", "r.npy"] {
        r.save(dir.join(name)).unwrap();
        let back = ReferenceLogits::load(dir.join(name)).unwrap();
        assert_eq!((back.positions, back.vocab_size), (l, v));
        assert_eq!(back.logits, logits, "{name}");
        assert_eq!(back.ids.is_some(), name.ends_with("json"));
    }
    let mut other = logits.clone();
    other[v + argmax(&logits[v..2 * v])] += 0.25; // position 1, argmax kept
    other[2 * v..].iter_mut().for_each(|x| *x = -*x); // position 2's argmax moves
    let c = compare_logits(&other, &logits, v).unwrap();
    assert_eq!((c.worst_position, c.top1_agree), (2, 2));
    assert!(c.max_abs_diff > 0.25 && c.to_string().contains("top-1 agreement 2/3"));
    assert!(compare_logits(&other[1..], &logits[1..], v).is_err());
    std::fs::write(dir.join("bad.json"), r#"{"logits": [[1, 2], [3]]}"#).unwrap();
    assert!(ReferenceLogits::load(dir.join("bad.json")).is_err());
    std::fs::remove_dir_all(dir).ok();
}

/// The CLI end to end: `export --hf`, `generate --hf` (tokenizer and ids prompts), and
/// `eval-hf` against reference logits (here the f64 reference of this file) printing the
/// max abs logit difference and top-1 agreement.
#[test]
fn cli_export_generate_eval() {
    let s = Shapes::small();
    let (dir, w) = hf_dir("cli", &s, 37);
    std::fs::write(
        dir.join(HF_TOKENIZER_FILE),
        word_tokenizer_json(&["hello", "world"]),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_tritter");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "tritter {args:?} failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let export = scratch("cli-export");
    let d = dir.to_str().unwrap();
    let e = export.to_str().unwrap();
    let text = run(&["export", "--hf", d, "--out", e]);
    assert!(text.contains("tokenizer.json copied"), "{text}");
    for model in [d, e] {
        let text = run(&[
            "generate",
            "--hf",
            model,
            "--prompt",
            "hello world",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ]);
        assert!(text.starts_with("<s> hello world"), "{text}");
    }
    let text = run(&[
        "generate",
        "--hf",
        d,
        "--prompt-ids",
        "1,8,9",
        "--max-tokens",
        "3",
        "--kv-cache",
        "f32",
    ]);
    assert!(text.starts_with("<s> hello world"), "{text}");

    let ids = test_ids(&s, 8);
    let reference = ReferenceLogits::new(
        ids.clone(),
        s.vocab,
        as_f32(reference_logits::<f64>(&s, &w, &ids)),
    )
    .unwrap();
    let ref_path = export.join("reference.json");
    reference.save(&ref_path).unwrap();
    let ours = export.join("ours.npy");
    let text = run(&[
        "eval-hf",
        "--hf",
        e,
        "--reference",
        ref_path.to_str().unwrap(),
        "--out",
        ours.to_str().unwrap(),
    ]);
    println!("{text}");
    assert!(text.contains("top-1 agreement 8/8"), "{text}");
    assert!(text.contains("RESULT positions=8"), "{text}");
    let written = ReferenceLogits::load(&ours).unwrap();
    let c = compare_logits(&written.logits, &reference.logits, s.vocab).unwrap();
    assert!(c.max_abs_diff < 1e-4 * c.reference_scale, "{c}");
    for d in [dir, export] {
        std::fs::remove_dir_all(d).ok();
    }
}

/// With `TRITTER_HF_MODEL` and `TRITTER_HF_REFERENCE` set (logits from
/// `benches/peers/hf_bitnet_reference.py logits`, ids from the .json or `TRITTER_HF_IDS`),
/// prints the engine's max abs logit difference and top-1 agreement against them; asserts
/// top-1 agreement >= 90% and a max difference <= 1% of the logit scale. Skipped otherwise.
#[test]
fn python_reference_logits_when_given() {
    let (Ok(model), Ok(reference)) = (
        std::env::var("TRITTER_HF_MODEL"),
        std::env::var("TRITTER_HF_REFERENCE"),
    ) else {
        println!("skipped: set TRITTER_HF_MODEL=<dir> and TRITTER_HF_REFERENCE=<logits.json|npy>");
        return;
    };
    let r = ReferenceLogits::load(&reference).unwrap();
    let ids: Vec<u32> = match std::env::var("TRITTER_HF_IDS") {
        Ok(list) => list.split(',').map(|t| t.trim().parse().unwrap()).collect(),
        Err(_) => r
            .ids
            .clone()
            .expect("a .json reference with ids, or TRITTER_HF_IDS"),
    };
    let m = HfBitnet::open(&model).unwrap();
    let engine = CpuEngine::new(m.checkpoint).unwrap();
    let ours = engine.forward_full(&ids).unwrap();
    let c = compare_logits(&ours, &r.logits, r.vocab_size).unwrap();
    println!(
        "{model} vs {reference} (impl {:?}, dtype {:?}): {c}",
        r.meta.get("impl"),
        r.meta.get("dtype")
    );
    assert!(c.top1_agreement() >= 0.9, "{c}");
    assert!(c.max_abs_diff <= 0.01 * c.reference_scale, "{c}");
}
