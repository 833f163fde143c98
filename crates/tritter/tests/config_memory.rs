//! Config presets, validation messages, JSON round trips, analytic parameter counts against
//! instantiated models, and the memory estimator against DESIGN.md's worked example.

use candle_core::{DType, Device};
use tritter::config::{Modality, MIN_VOCAB_SIZE, PRESET_NAMES};
use tritter::memory::{training_activation_bytes, KV_INT4_GROUP_BYTES};
use tritter::{KvFormat, MemoryEstimate, TritterConfig, TritterError, TritterModel};

/// Context of the long-context budget (DESIGN.md section 5): 128K tokens.
const CONTEXT_128K: usize = 131_072;
/// The RTX 5080's memory, the reference budget.
const RTX_5080_BYTES: u64 = 16_000_000_000;

/// Every preset validates, and its parameter count is within ±20% of the size its name
/// says. Marketing sizes round to one significant digit (Llama-2-7B has 6.74B parameters,
/// GPT-2 "small" 124M against the 117M of its paper); ±20% still keeps every preset
/// closer to its own name than to its neighbour's.
#[test]
fn presets_validate_and_match_their_names() {
    let nominal = [
        ("100m", 100e6),
        ("500m", 500e6),
        ("1b", 1e9),
        ("3b", 3e9),
        ("7b", 7e9),
    ];
    for name in PRESET_NAMES {
        let cfg = TritterConfig::preset(name).unwrap();
        cfg.validate().unwrap();
        assert_eq!(TritterConfig::preset(&name.to_uppercase()).unwrap(), cfg);
        if let Some(&(_, n)) = nominal.iter().find(|(p, _)| *p == name) {
            let count = cfg.param_count() as f64;
            assert!(
                (0.8 * n..=1.2 * n).contains(&count),
                "{name}: {count:.3e} parameters is not within 20% of {n:.0e}"
            );
            assert_eq!(cfg.vocab_size, 65_536);
            assert_eq!(cfg.max_position_embeddings, CONTEXT_128K);
        }
    }
    let t = TritterConfig::preset("test").unwrap();
    assert_eq!((t.hidden_size, t.num_layers, t.num_heads), (64, 2, 2));
    let seven = TritterConfig::preset("7b").unwrap();
    assert_eq!((seven.num_kv_heads, seven.head_dim()), (8, 128));
    let e = TritterConfig::preset("13b").unwrap_err();
    assert!(
        matches!(e, TritterError::UnknownPreset { .. }) && e.to_string().contains("7b"),
        "{e}"
    );
}

/// The analytic count equals the instantiated model's, for the tied test preset and a
/// mid-size untied GQA config (built at once: no weights are trained).
#[test]
fn param_count_matches_instantiated_model() {
    let test = TritterConfig::preset("test").unwrap();
    let mid = TritterConfig {
        hidden_size: 256,
        num_layers: 3,
        num_heads: 8,
        num_kv_heads: 2,
        intermediate_size: 640,
        vocab_size: 1024,
        tie_embeddings: false,
        ..test.clone()
    };
    for cfg in [test, mid] {
        let model = TritterModel::new(&cfg, DType::F32, &Device::Cpu, 0).unwrap();
        assert_eq!(model.param_count(), cfg.param_count(), "{cfg:?}");
        let b = cfg.param_breakdown();
        assert_eq!(b.linear_matrices, 7 * cfg.num_layers as u64);
    }
}

/// Each validation rule fires with the actual value and the expected one.
#[test]
fn invalid_configs_name_actual_and_expected() {
    let base = TritterConfig::preset("test").unwrap();
    let cases: Vec<(TritterConfig, &[&str])> = vec![
        (
            TritterConfig {
                hidden_size: 65,
                ..base.clone()
            },
            &[
                "hidden_size % num_heads",
                "1 (65 % 2)",
                "multiple of num_heads",
            ],
        ),
        (
            TritterConfig {
                num_heads: 4,
                num_kv_heads: 3,
                hidden_size: 128,
                ..base.clone()
            },
            &["num_heads % num_kv_heads", "1 (4 % 3)"],
        ),
        (
            TritterConfig {
                vocab_size: MIN_VOCAB_SIZE - 1,
                ..base.clone()
            },
            &["vocab_size is 263", ">= 264"],
        ),
        (
            TritterConfig {
                sliding_window: Some(base.max_position_embeddings + 1),
                ..base.clone()
            },
            &["sliding_window is 257", "max_position_embeddings (256)"],
        ),
        (
            TritterConfig {
                hidden_size: 6,
                num_heads: 2,
                num_kv_heads: 1,
                ..base.clone()
            },
            &["head_dim is 3", "even"],
        ),
        (
            TritterConfig {
                modalities: vec![],
                ..base.clone()
            },
            &["modalities", "text, code, image, audio"],
        ),
        (
            TritterConfig {
                modalities: vec![Modality::Text, Modality::Text],
                ..base.clone()
            },
            &["modalities", "at most once"],
        ),
        (
            TritterConfig {
                attention_sinks: 4,
                ..base.clone()
            },
            &["attention_sinks is 4", "sliding_window is null"],
        ),
        (
            TritterConfig {
                int4_kv_cache: true,
                hidden_size: 96,
                num_heads: 2,
                ..base.clone()
            },
            &["head_dim is 48", "multiple of 32"],
        ),
        (
            TritterConfig {
                dropout: 1.0,
                ..base.clone()
            },
            &["dropout is 1", "[0, 1)"],
        ),
        (
            TritterConfig {
                num_layers: 0,
                ..base.clone()
            },
            &["num_layers is 0", ">= 1"],
        ),
        (
            TritterConfig {
                rope_theta: f64::NAN,
                ..base.clone()
            },
            &["rope_theta is NaN"],
        ),
    ];
    for (cfg, needles) in cases {
        let e = cfg.validate().unwrap_err();
        assert!(matches!(e, TritterError::InvalidConfig { .. }), "{e:?}");
        let msg = e.to_string();
        for n in needles {
            assert!(msg.contains(n), "{msg:?} lacks {n:?}");
        }
        // Building a model refuses it too.
        assert!(TritterModel::new(&cfg, DType::F32, &Device::Cpu, 0).is_err());
    }
}

/// JSON round trip is exact; unknown fields and unknown modalities are refused.
#[test]
fn config_json_round_trip_and_rejections() {
    for name in PRESET_NAMES {
        let cfg = TritterConfig::preset(name).unwrap();
        assert_eq!(TritterConfig::from_json(&cfg.to_json()).unwrap(), cfg);
    }
    let json = TritterConfig::preset("test").unwrap().to_json();
    let typo = json.replacen("\"dropout\"", "\"drop_out\"", 1);
    let e = TritterConfig::from_json(&typo).unwrap_err().to_string();
    assert!(e.contains("drop_out"), "{e}");
    let video = json.replacen("\"audio\"", "\"video\"", 1);
    let e = TritterConfig::from_json(&video).unwrap_err().to_string();
    assert!(e.contains("video") && e.contains("audio"), "{e}");
    // quantize_bitlinear defaults to true when absent (configs written before it existed).
    let without = json.replace(",\n  \"quantize_bitlinear\": true", "");
    assert_ne!(without, json);
    assert!(
        TritterConfig::from_json(&without)
            .unwrap()
            .quantize_bitlinear
    );
}

/// DESIGN.md's worked example: 7B, 8 KV heads of D = 128, INT4 (0.625 B/value) at 128K is
/// 32 x 2 x 8 x 128 x 0.625 B x 131072 = 5.4 GB; 16 KV heads would be 10.7 GB.
#[test]
fn memory_reproduces_design_worked_example() {
    assert_eq!(KV_INT4_GROUP_BYTES as f64 / 32.0, 0.625);
    let seven = TritterConfig::preset("7b").unwrap();
    let est = MemoryEstimate::new(&seven, CONTEXT_128K, 1).unwrap();
    let kv = est.kv_bytes(KvFormat::Int4, false);
    let expected = (32.0 * 2.0 * 8.0 * 128.0 * 0.625 * CONTEXT_128K as f64) as u64;
    assert_eq!(kv, expected);
    assert_eq!(format!("{:.1}", kv as f64 / 1e9), "5.4");
    assert_eq!(est.kv_bytes(KvFormat::Fp16, false), kv * 16 / 5); // 2 B vs 0.625 B
    let sixteen = TritterConfig {
        num_kv_heads: 16,
        ..seven.clone()
    };
    let kv16 = MemoryEstimate::new(&sixteen, CONTEXT_128K, 1)
        .unwrap()
        .kv_bytes(KvFormat::Int4, false);
    assert_eq!(format!("{:.1}", kv16 as f64 / 1e9), "10.7");
    // Windowed: window + sinks tokens instead of the whole context.
    let w = seven.sliding_window.unwrap() + seven.attention_sinks;
    assert_eq!(
        est.kv_bytes(KvFormat::Int4, true),
        kv / CONTEXT_128K as u64 * w as u64
    );
}

/// The RTX 5080 budget: 7B ternary linear weights in 1.4-1.8 GB (issue 8), activations
/// 2-3 GB (DESIGN.md), and weights + INT4 KV at 128K + activations under 16 GB, while the
/// same with all-bf16 weights would not fit.
#[test]
fn seven_b_fits_the_rtx_5080() {
    let seven = TritterConfig::preset("7b").unwrap();
    let est = MemoryEstimate::new(&seven, CONTEXT_128K, 1).unwrap();
    let gb = |b: u64| b as f64 / 1e9;
    assert!((1.4..=1.8).contains(&gb(est.ternary_linear_bytes)), "{est}");
    assert!((2.0..=3.0).contains(&gb(est.activation_bytes)), "{est}");
    assert!(est.inference_total_bytes() < RTX_5080_BYTES, "{est}");
    let bf16_total = est.inference_total_bytes() - est.ternary_weight_bytes() + est.all_bf16_bytes;
    assert!(bf16_total > RTX_5080_BYTES, "{est}");
    let table = est.to_string();
    for row in [
        "packed ternary",
        "all bf16",
        "KV cache INT4, 131072 tokens",
        "window 4096 + 4 sinks",
        "activations",
        "total",
    ] {
        assert!(table.contains(row), "table lacks {row:?}:\n{table}");
    }
    // Packed ternary is 2 bits per weight plus one f32 scale per matrix.
    let p = est.params;
    assert_eq!(
        est.ternary_linear_bytes,
        p.linear / 4 + 4 * p.linear_matrices
    );
    // Gradient checkpointing keeps one layer's activations instead of all of them.
    let ckpt = training_activation_bytes(&seven, 1, 4096);
    let full = training_activation_bytes(
        &TritterConfig {
            gradient_checkpointing: false,
            ..seven
        },
        1,
        4096,
    );
    assert!(ckpt < full / 4, "{ckpt} vs {full}");
}

/// Estimates refuse contexts beyond the model's positions and empty batches.
#[test]
fn memory_rejects_bad_queries() {
    let cfg = TritterConfig::preset("3b").unwrap();
    let e = MemoryEstimate::new(&cfg, CONTEXT_128K + 1, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("131073") && e.contains("131072"), "{e}");
    assert!(MemoryEstimate::new(&cfg, CONTEXT_128K, 0).is_err());
    assert!(MemoryEstimate::new(&cfg, 0, 1).is_err());
}
