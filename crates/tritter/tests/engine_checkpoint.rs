//! The inference checkpoint: export -> save -> load is exact and equals the forward pass's
//! quantization, the manifest describes the files, and damaged or mismatched directories
//! are typed errors (never panics).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::engine::gqa_window_config;
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use ternary_gemm::{ternary_to_safetensors, TernaryMatrix};
use tritter::data::{corpus, PackedDataset};
use tritter::engine::{
    expected_tensors, file_checksum, Architecture, CpuEngine, InferenceCheckpoint, LayerNorms,
    Manifest, NormPlacement, SourceInfo, TensorKind, DENSE_FILE, DENSE_FORMAT_TAG, MANIFEST_FILE,
    TERNARY_FILE,
};
use tritter::tokenizer::{MultimodalTokenizer, VocabLayout};
use tritter::train::{Silent, TrainOptions, Trainer};
use tritter::{TritterConfig, TritterError, TritterModel};

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("tritter-engine-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bf16_bits(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn tensor_f32(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Every stored bit of two checkpoints: packed words, scale bits, bf16 bits, config,
/// architecture, source.
fn assert_bit_identical(a: &InferenceCheckpoint, b: &InferenceCheckpoint) {
    assert_eq!(a.config, b.config);
    assert_eq!(a.architecture, b.architecture);
    assert_eq!(a.source, b.source);
    assert_eq!(bf16_bits(&a.embed_tokens), bf16_bits(&b.embed_tokens));
    assert_eq!(bf16_bits(&a.final_norm), bf16_bits(&b.final_norm));
    assert_eq!(
        a.lm_head.as_deref().map(bf16_bits),
        b.lm_head.as_deref().map(bf16_bits)
    );
    assert_eq!(
        a.latent_proj.as_deref().map(bf16_bits),
        b.latent_proj.as_deref().map(bf16_bits)
    );
    assert_eq!(a.layers.len(), b.layers.len());
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        for (ma, mb) in la.ternary().into_iter().zip(lb.ternary()) {
            assert_eq!((ma.n_out(), ma.k_in()), (mb.n_out(), mb.k_in()));
            assert_eq!(ma.packed(), mb.packed());
            assert_eq!(bits(ma.scales().as_slice()), bits(mb.scales().as_slice()));
        }
        let (na, nb) = (la.norms.rows(), lb.norms.rows());
        assert_eq!(na.len(), nb.len());
        for (x, y) in na.iter().zip(&nb) {
            assert_eq!(bf16_bits(x), bf16_bits(y));
        }
        let qk = |l: &tritter::engine::LayerWeights| {
            l.qk_norm
                .as_ref()
                .map(|q| (bf16_bits(&q.q_norm), bf16_bits(&q.k_norm)))
        };
        assert_eq!(qk(la), qk(lb));
    }
}

/// Export takes exactly the forward pass's quantization (every ternary matrix dequantizes
/// to the values of `BitLinear::dequantized_weight`, ±0 aside) and rounds the rest to bf16 (nearest
/// even); save -> load gives back every bit (packed codes, scales, bf16 values), for the
/// test preset and a GQA config with an untied head and a latent projection.
#[test]
fn export_save_load_round_trip_is_exact() {
    for (i, cfg) in [TritterConfig::preset("test").unwrap(), gqa_window_config()]
        .into_iter()
        .enumerate()
    {
        let model = TritterModel::new(&cfg, DType::F32, &Device::Cpu, 3).unwrap();
        let source = SourceInfo {
            checkpoint: Some("in memory".into()),
            step: Some(7),
        };
        let ckpt = InferenceCheckpoint::from_model(&model, source).unwrap();
        for (layer, w) in model.layers().iter().zip(&ckpt.layers) {
            let (a, m) = (&layer.attn, &layer.mlp);
            let lins = [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ];
            for (lin, t) in lins.into_iter().zip(w.ternary()) {
                // Equal values; the forward's zeros may be -0 (round of a small negative).
                let forward = tensor_f32(&lin.dequantized_weight().unwrap());
                let ours = t.dequantize();
                let first_diff = ours.iter().zip(&forward).position(|(a, b)| a != b);
                assert_eq!(
                    first_diff, None,
                    "dequantized export differs from the forward"
                );
            }
        }
        let embed = tensor_f32(model.embedding().weight());
        let rounded: Vec<bf16> = embed.iter().map(|&x| bf16::from_f32(x)).collect();
        assert_eq!(bf16_bits(&ckpt.embed_tokens), bf16_bits(&rounded));
        assert_eq!(ckpt.lm_head.is_some(), !cfg.tie_embeddings);
        assert_eq!(ckpt.latent_proj.is_some(), cfg.latent_projection);

        let dir = scratch(&format!("roundtrip-{i}"));
        ckpt.save(&dir).unwrap();
        let back = InferenceCheckpoint::load(&dir).unwrap();
        assert_bit_identical(&ckpt, &back);
        assert!(
            !std::fs::read_dir(&dir).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp")),
            "no temporary file is left behind"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// The manifest of a training checkpoint's export: format and version, the source directory
/// and step, each file's size and checksum (matching the bytes on disk), and every tensor of
/// `expected_tensors` with its file, dtype, shape and byte count; `open` takes either kind
/// of directory.
#[test]
fn manifest_describes_the_export_of_a_training_run() {
    let cfg = TritterConfig::preset("test").unwrap();
    let opts = TrainOptions {
        steps: 2,
        batch_size: 2,
        seq_len: 16,
        warmup_steps: 1,
        eval_batches: 1,
        ..TrainOptions::default()
    };
    let tok = MultimodalTokenizer::new(VocabLayout::new(cfg.vocab_size).unwrap());
    let (train, _) = corpus::builtin_documents();
    let set = PackedDataset::from_documents(&train[..2], &tok, opts.seq_len).unwrap();
    let run = scratch("run");
    let mut trainer = Trainer::new(&cfg, opts, set, None, &Device::Cpu).unwrap();
    trainer.run(2, Some(&run), &mut Silent).unwrap();

    let ckpt = InferenceCheckpoint::from_trained_checkpoint(&run).unwrap();
    assert_eq!(ckpt.source.step, Some(2));
    assert!(ckpt.source.checkpoint.as_deref().unwrap().contains("step-"));
    let out = scratch("export");
    let manifest = ckpt.save(&out).unwrap();
    assert_eq!(manifest, Manifest::load(&out).unwrap());
    assert_eq!(manifest.format, tritter::engine::INFERENCE_FORMAT);
    assert_eq!(manifest.version, tritter::engine::INFERENCE_FORMAT_VERSION);
    assert_eq!(manifest.architecture, Architecture::TRITTER);
    for f in &manifest.files {
        let bytes = std::fs::read(out.join(&f.name)).unwrap();
        assert_eq!(f.bytes, bytes.len() as u64, "{}", f.name);
        assert_eq!(f.fnv1a64, file_checksum(&bytes), "{}", f.name);
    }
    let expected = expected_tensors(&cfg, &Architecture::TRITTER);
    assert_eq!(manifest.tensors.len(), expected.len());
    for (entry, spec) in manifest.tensors.iter().zip(&expected) {
        assert_eq!(
            (&entry.name, entry.dtype, &entry.shape),
            (&spec.name, spec.kind, &spec.shape)
        );
        let numel: usize = spec.shape.iter().product();
        let bytes = match spec.kind {
            TensorKind::Ternary => {
                let words = spec.shape[0] * ternary_gemm::words_per_row(spec.shape[1]);
                std::mem::size_of::<u32>() * words + std::mem::size_of::<f32>()
            }
            TensorKind::Bf16 => std::mem::size_of::<bf16>() * numel,
        };
        assert_eq!(entry.bytes, bytes as u64, "{}", entry.name);
        assert_eq!(entry.file, spec.kind.file());
    }
    let opened = InferenceCheckpoint::open(&out).unwrap();
    assert_bit_identical(&ckpt, &opened);
    assert_bit_identical(&ckpt, &InferenceCheckpoint::open(&run).unwrap());
    std::fs::remove_dir_all(&run).ok();
    std::fs::remove_dir_all(&out).ok();
}

/// A saved test-preset checkpoint in a fresh directory.
fn saved(name: &str) -> (PathBuf, InferenceCheckpoint) {
    let cfg = TritterConfig::preset("test").unwrap();
    let model = TritterModel::new(&cfg, DType::F32, &Device::Cpu, 5).unwrap();
    let ckpt = InferenceCheckpoint::from_model(&model, SourceInfo::default()).unwrap();
    let dir = scratch(name);
    ckpt.save(&dir).unwrap();
    (dir, ckpt)
}

/// Replaces `file` with `bytes` and records its new size and checksum in the manifest, so
/// that only the content check can object.
fn rewrite(dir: &Path, file: &str, bytes: &[u8]) {
    std::fs::write(dir.join(file), bytes).unwrap();
    let mut m = Manifest::load(dir).unwrap();
    let entry = m.files.iter_mut().find(|f| f.name == file).unwrap();
    entry.bytes = bytes.len() as u64;
    entry.fnv1a64 = file_checksum(bytes);
    m.save(dir).unwrap();
}

/// The dense file `bytes` without `skip`, plus `extra` bf16 tensors of zeros.
fn dense_without(bytes: &[u8], skip: &str, extra: &[(&str, Vec<usize>)]) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let mut views: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != skip)
        .collect();
    let zeros: Vec<Vec<u8>> = extra
        .iter()
        .map(|(_, s)| vec![0u8; 2 * s.iter().product::<usize>()])
        .collect();
    for ((name, shape), data) in extra.iter().zip(&zeros) {
        views.push((
            name.to_string(),
            TensorView::new(safetensors::Dtype::BF16, shape.clone(), data).unwrap(),
        ));
    }
    let meta = std::collections::HashMap::from([("format".into(), DENSE_FORMAT_TAG.into())]);
    safetensors::serialize(views, Some(meta)).unwrap()
}

fn assert_mismatch(e: &TritterError, needles: &[&str]) {
    assert!(
        matches!(e, TritterError::CheckpointMismatch { .. }),
        "not a CheckpointMismatch: {e:?}"
    );
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "{msg:?} lacks {n:?}");
    }
}

/// A manifest that does not parse is `CorruptCheckpoint`; a foreign format tag or another
/// version is `CheckpointMismatch` naming the actual and expected values; a missing manifest
/// or file is an I/O error naming the path.
#[test]
fn bad_manifests_are_typed_errors() {
    let (dir, _) = saved("manifest");
    let path = dir.join(MANIFEST_FILE);
    let good = std::fs::read_to_string(&path).unwrap();

    std::fs::write(&path, "{ not json").unwrap();
    let e = InferenceCheckpoint::load(&dir).unwrap_err();
    assert!(
        matches!(e, TritterError::CorruptCheckpoint { .. })
            && e.to_string().contains("manifest does not parse"),
        "{e:?}"
    );

    std::fs::write(&path, good.replace("\"tritter-inference\"", "\"gguf\"")).unwrap();
    let e = InferenceCheckpoint::load(&dir).unwrap_err();
    assert_mismatch(
        &e,
        &["format is \"gguf\"", "expected \"tritter-inference\""],
    );

    std::fs::write(&path, good.replace("\"version\": 1", "\"version\": 2")).unwrap();
    let e = InferenceCheckpoint::load(&dir).unwrap_err();
    assert_mismatch(&e, &["version is 2", "reads version 1"]);

    std::fs::write(&path, &good).unwrap();
    std::fs::remove_file(dir.join(DENSE_FILE)).unwrap();
    let e = InferenceCheckpoint::load(&dir).unwrap_err();
    assert!(
        matches!(&e, TritterError::Io { path, .. } if path.ends_with(DENSE_FILE)),
        "{e:?}"
    );
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        InferenceCheckpoint::load(&dir).unwrap_err(),
        TritterError::Io { .. }
    ));
    std::fs::remove_dir_all(&dir).ok();
}

/// A flipped byte, a truncated file or a file replaced behind the manifest's back (a torn
/// export) is `CorruptCheckpoint` naming the file, the actual and the recorded value.
#[test]
fn damaged_files_are_detected() {
    let (dir, _) = saved("damage");
    let path = dir.join(TERNARY_FILE);
    let good = std::fs::read(&path).unwrap();
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x10;
    std::fs::write(&path, &flipped).unwrap();
    let e = InferenceCheckpoint::load(&dir).unwrap_err();
    assert!(
        matches!(&e, TritterError::CorruptCheckpoint { path, detail }
            if path.ends_with(TERNARY_FILE) && detail.contains("checksum is")),
        "{e:?}"
    );
    std::fs::write(&path, &good[..good.len() - 3]).unwrap();
    let e = InferenceCheckpoint::load(&dir).unwrap_err();
    assert!(
        e.to_string().contains(&format!(
            "is {} bytes but the manifest records {}",
            good.len() - 3,
            good.len()
        )),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Tensors that are missing, extra or of the wrong shape (in the files, with a consistent
/// manifest, or in the manifest's list) are `CheckpointMismatch` naming the tensor and the
/// actual and expected shapes; so is a config.json whose model differs from the files.
#[test]
fn missing_extra_and_misshaped_tensors_are_typed_errors() {
    let (dir, ckpt) = saved("tensors");
    let cfg = &ckpt.config;
    let h = cfg.hidden_size;

    let dense = std::fs::read(dir.join(DENSE_FILE)).unwrap();
    rewrite(&dir, DENSE_FILE, &dense_without(&dense, "norm.weight", &[]));
    let e = InferenceCheckpoint::load(&dir).unwrap_err();
    assert_mismatch(&e, &["norm.weight is missing", &format!("[{h}]")]);

    rewrite(
        &dir,
        DENSE_FILE,
        &dense_without(&dense, "", &[("stray.weight", vec![3])]),
    );
    let e = InferenceCheckpoint::load(&dir).unwrap_err();
    assert_mismatch(&e, &["stray.weight is not part of"]);

    let (dir, ckpt) = saved("shape");
    let q = "layers.0.attn.q_proj.weight";
    let mut named: Vec<(String, TernaryMatrix)> = Vec::new();
    for (l, layer) in ckpt.layers.iter().enumerate() {
        let parts = ["q_proj", "k_proj", "v_proj", "o_proj"].map(|p| format!("attn.{p}"));
        let mlp = ["gate_proj", "up_proj", "down_proj"].map(|p| format!("mlp.{p}"));
        for (part, m) in parts.iter().chain(&mlp).zip(layer.ternary()) {
            named.push((format!("layers.{l}.{part}.weight"), m.clone()));
        }
    }
    let wide = h + 16;
    named[0].1 =
        TernaryMatrix::from_values(h, wide, &vec![1; h * wide], named[0].1.scales().clone())
            .unwrap();
    let refs: Vec<(&str, &TernaryMatrix)> = named.iter().map(|(n, m)| (n.as_str(), m)).collect();
    rewrite(&dir, TERNARY_FILE, &ternary_to_safetensors(&refs).unwrap());
    let e = InferenceCheckpoint::load(&dir).unwrap_err();
    assert_mismatch(
        &e,
        &[
            q,
            &format!("shape [{h}, {wide}]"),
            &format!("expects [{h}, {h}]"),
        ],
    );

    let (dir2, _) = saved("manifest-list");
    let mut m = Manifest::load(&dir2).unwrap();
    m.tensors.retain(|t| t.name != q);
    m.save(&dir2).unwrap();
    let e = InferenceCheckpoint::load(&dir2).unwrap_err();
    assert_mismatch(&e, &["lists no tensor", q, &format!("[{h}, {h}]")]);
    let mut m = Manifest::load(&dir2).unwrap();
    m.tensors = Manifest::load(&dir).unwrap().tensors;
    m.tensors[1].shape = vec![h, h + 1];
    m.save(&dir2).unwrap();
    let e = InferenceCheckpoint::load(&dir2).unwrap_err();
    assert_mismatch(
        &e,
        &[q, &format!("[{h}, {}]", h + 1), "config.json implies"],
    );

    // A config with one more layer (checksum updated): the files lack its tensors.
    let (dir3, ckpt) = saved("config");
    let mut bigger = ckpt.config.clone();
    bigger.num_layers += 1;
    rewrite(&dir3, "config.json", bigger.to_json().as_bytes());
    let e = InferenceCheckpoint::load(&dir3).unwrap_err();
    assert_mismatch(
        &e,
        &[
            &format!("layers.{}.", ckpt.config.num_layers),
            "lists no tensor",
        ],
    );
    for d in [dir, dir2, dir3] {
        std::fs::remove_dir_all(&d).ok();
    }
}

/// The HF BitNet layout (pre-norm with sub-norms, no QK-Norm) round-trips through save and
/// load, and the engine runs it: finite logits, and token-by-token decode equal to the full
/// forward bit for bit (its own consistency; there is no HF reference model here).
#[test]
fn hf_bitnet_architecture_round_trips_and_runs() {
    let cfg = TritterConfig::preset("test").unwrap();
    let model = TritterModel::new(&cfg, DType::F32, &Device::Cpu, 9).unwrap();
    let mut ckpt = InferenceCheckpoint::from_model(&model, SourceInfo::default()).unwrap();
    ckpt.architecture = Architecture::HF_BITNET;
    let ramp = |n: usize, k: usize| -> Vec<bf16> {
        (0..n)
            .map(|i| bf16::from_f32(0.8 + 0.4 * ((i * k) % 7) as f32 / 7.0))
            .collect()
    };
    for layer in &mut ckpt.layers {
        layer.qk_norm = None;
        layer.norms = LayerNorms::PreNormSubNorm {
            input_layernorm: ramp(cfg.hidden_size, 1),
            post_attention_layernorm: ramp(cfg.hidden_size, 2),
            attn_sub_norm: ramp(cfg.hidden_size, 3),
            ffn_sub_norm: ramp(cfg.intermediate_size, 4),
        };
    }
    assert_eq!(
        ckpt.layers[0].norms.placement(),
        NormPlacement::PreNormSubNorm
    );
    let dir = scratch("hf");
    ckpt.save(&dir).unwrap();
    let back = InferenceCheckpoint::load(&dir).unwrap();
    assert_bit_identical(&ckpt, &back);
    let engine = CpuEngine::new(back).unwrap();
    let tokens = common::engine::random_tokens(&cfg, cfg.max_position_embeddings / 8, 10);
    let full = engine.forward_full(&tokens).unwrap();
    assert!(full.iter().all(|v| v.is_finite()));
    let mut cache = engine
        .new_cache(&tritter::engine::KvCacheOptions::for_config(&cfg))
        .unwrap();
    let seq = cache.add_sequence();
    let mut inc = Vec::new();
    for t in &tokens {
        let step = tritter::engine::StepInput {
            seq,
            tokens: std::slice::from_ref(t),
            logits: tritter::engine::LogitsFor::Last,
        };
        inc.extend(engine.step(&mut cache, &[step]).unwrap().pop().unwrap());
    }
    assert_eq!(bits(&full), bits(&inc));
    // A layer whose norms do not match the declared architecture is refused.
    ckpt.architecture = Architecture::TRITTER;
    assert!(CpuEngine::new(ckpt).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// Export refuses a model without quantization (nothing ternary to export), with the field
/// and the fix in the message.
#[test]
fn full_precision_model_is_not_exported() {
    let mut cfg = TritterConfig::preset("test").unwrap();
    cfg.quantize_bitlinear = false;
    let model = TritterModel::new(&cfg, DType::F32, &Device::Cpu, 1).unwrap();
    let e = InferenceCheckpoint::from_model(&model, SourceInfo::default()).unwrap_err();
    assert!(
        matches!(
            e,
            TritterError::InvalidConfig {
                field: "quantize_bitlinear",
                ..
            }
        ),
        "{e:?}"
    );
}

/// `InferenceCheckpoint::random` gives a valid checkpoint of the config's shapes (untied
/// head, window config included), the same weights for the same seed and others for another,
/// codes -1/0/+1 in about 1/4, 1/2, 1/4, a save/open round trip, and finite CPU-engine
/// logits.
#[test]
fn random_checkpoints_are_valid_seeded_and_run() {
    for cfg in [TritterConfig::preset("test").unwrap(), gqa_window_config()] {
        let a = InferenceCheckpoint::random(&cfg, 5).unwrap();
        a.validate().unwrap();
        assert_eq!(a.layers.len(), cfg.num_layers);
        assert_eq!(a.lm_head.is_some(), !cfg.tie_embeddings);
        assert_bit_identical(&a, &InferenceCheckpoint::random(&cfg, 5).unwrap());
        let b = InferenceCheckpoint::random(&cfg, 6).unwrap();
        assert_ne!(
            a.layers[0].q_proj, b.layers[0].q_proj,
            "seeds give equal weights"
        );

        let mut counts = [0usize; 3];
        for l in &a.layers {
            for m in l.ternary() {
                for v in m.values() {
                    counts[(v + 1) as usize] += 1;
                }
            }
        }
        let total: usize = counts.iter().sum();
        let frac: Vec<f64> = counts.iter().map(|&c| c as f64 / total as f64).collect();
        for (f, want) in frac.iter().zip([0.25, 0.5, 0.25]) {
            assert!(
                (f - want).abs() < 0.02,
                "code fractions {frac:?}, want 1/4, 1/2, 1/4"
            );
        }

        let dir = scratch(&format!("random-{}", cfg.hidden_size));
        a.save(&dir).unwrap();
        assert_bit_identical(&a, &InferenceCheckpoint::open(&dir).unwrap());
        let engine = CpuEngine::new(a).unwrap();
        let logits = engine.forward_full(&[1, 40, 41, 42]).unwrap();
        assert_eq!(logits.len(), 4 * cfg.vocab_size);
        assert!(logits.iter().all(|x| x.is_finite()));
    }
}
