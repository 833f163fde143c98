//! Mask perturbation tests: changing the input at position j changes the output at i
//! exactly when the mask (and, through a stack of layers, its receptive field) lets i see j.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::randn;
use tritter::model::{Attention, ParamBuilder, Rope, SeededRng};
use tritter::{AttentionMode, MaskSpec, TritterConfig, TritterModel};

/// Sequence length of the checks: long enough for windows, sinks, prefixes and several
/// documents to interact.
const LEN: usize = 12;
/// Sliding window of the windowed cases (smaller than LEN, so it bites).
const WINDOW: usize = 4;
/// Sink keys of the sink case.
const SINKS: usize = 2;

fn doc_ids() -> Vec<Vec<u32>> {
    // Two sequences packed with documents of different lengths.
    let docs = |lens: &[usize]| -> Vec<u32> {
        lens.iter()
            .enumerate()
            .flat_map(|(d, &n)| std::iter::repeat_n(d as u32, n))
            .collect()
    };
    vec![docs(&[3, 5, 4]), docs(&[7, 5])]
}

/// Every mask configuration the model supports, by name.
fn cases() -> Vec<(&'static str, MaskSpec)> {
    vec![
        ("causal", MaskSpec::causal()),
        ("bidirectional", MaskSpec::new(AttentionMode::Bidirectional)),
        ("embedding", MaskSpec::new(AttentionMode::Embedding)),
        (
            "prefix_lm",
            MaskSpec::new(AttentionMode::PrefixLm).with_prefix_lens(vec![4, 9]),
        ),
        ("sliding window", MaskSpec::causal().with_window(WINDOW, 0)),
        (
            "window + sinks",
            MaskSpec::causal().with_window(WINDOW, SINKS),
        ),
        ("documents", MaskSpec::causal().with_doc_ids(doc_ids())),
        (
            "documents + window + sinks",
            MaskSpec::causal()
                .with_window(WINDOW, SINKS)
                .with_doc_ids(doc_ids()),
        ),
        (
            "bidirectional window",
            MaskSpec::new(AttentionMode::Bidirectional).with_window(WINDOW, 0),
        ),
    ]
}

/// Max |a - b| per (batch, position) of two `(B, L, X)` tensors.
fn row_diffs(a: &Tensor, b: &Tensor) -> Vec<Vec<f32>> {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_keepdim(2)
        .unwrap()
        .squeeze(2)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// One attention block (quantized, as deployed): output row i changes when input row j
/// changes iff `mask.visible(b, i, j)`, and unchanged rows are bit-identical.
#[test]
fn attention_output_depends_exactly_on_visible_keys() {
    let cfg = TritterConfig::preset("test").unwrap();
    let (b, h) = (2, cfg.hidden_size);
    let varmap = VarMap::new();
    let pb = ParamBuilder::new(&varmap, DType::F32, &Device::Cpu, 31);
    let attn = Attention::new(&pb.pp("attn"), &cfg).unwrap();
    let positions: Vec<Vec<u32>> = vec![(0..LEN as u32).collect(); b];
    let rope = Rope::new(cfg.head_dim(), cfg.rope_theta)
        .tables(&positions, DType::F32, &Device::Cpu)
        .unwrap();
    let x = randn(32, &[b, LEN, h], 1.0);
    for (name, mask) in cases() {
        let bias = mask.to_bias(b, LEN, &Device::Cpu).unwrap();
        let base = attn.forward(&x, &rope, &bias).unwrap();
        for j in 0..LEN {
            let noise = randn(100 + j as u64, &[b, 1, h], 1.0);
            let x2 = x.slice_assign(&[0..b, j..j + 1, 0..h], &noise).unwrap();
            let out = attn.forward(&x2, &rope, &bias).unwrap();
            for (bi, row) in row_diffs(&base, &out).iter().enumerate() {
                for (i, &d) in row.iter().enumerate() {
                    if mask.visible(bi, i, j) {
                        assert!(d > 0.0, "{name}: b{bi} query {i} should see key {j}");
                    } else {
                        assert_eq!(d, 0.0, "{name}: b{bi} query {i} must not see key {j}");
                    }
                }
            }
        }
    }
}

/// Whether, through `layers` stacked layers, token j can influence position i: the
/// transitive closure of `visible`, computed by reachability over the layers.
fn reachable(mask: &MaskSpec, layers: usize, b: usize, j: usize) -> Vec<bool> {
    let mut r: Vec<bool> = (0..LEN).map(|i| i == j).collect();
    for _ in 0..layers {
        r = (0..LEN)
            .map(|i| r[i] || (0..LEN).any(|k| r[k] && mask.visible(b, i, k)))
            .collect();
    }
    r
}

/// The whole model: changing token j never changes the logits at a position that cannot
/// reach j through the layers (for causal masks: never at i < j), and does change them
/// where it can.
#[test]
fn model_logits_never_see_masked_tokens() {
    let cfg = TritterConfig::preset("test").unwrap();
    let model = TritterModel::new(&cfg, DType::F32, &Device::Cpu, 33).unwrap();
    let b = 2;
    let mut rng = SeededRng::new(34);
    let mut ids: Vec<u32> = (0..b * LEN)
        .map(|_| 1 + rng.below(cfg.vocab_size as u64 - 1) as u32)
        .collect();
    let pos = model.default_positions(b, LEN).unwrap();
    for (name, mask) in cases() {
        let ids_t = Tensor::from_vec(ids.clone(), (b, LEN), &Device::Cpu).unwrap();
        let base = model.forward(&ids_t, &pos, &mask).unwrap();
        for j in 0..LEN {
            let saved: Vec<u32> = (0..b).map(|bi| ids[bi * LEN + j]).collect();
            for bi in 0..b {
                let id = &mut ids[bi * LEN + j];
                *id = 1 + (*id % (cfg.vocab_size as u32 - 1)); // a different non-pad token
            }
            let ids2 = Tensor::from_vec(ids.clone(), (b, LEN), &Device::Cpu).unwrap();
            let out = model.forward(&ids2, &pos, &mask).unwrap();
            for (bi, row) in row_diffs(&base, &out).iter().enumerate() {
                let reach = reachable(&mask, cfg.num_layers, bi, j);
                for (i, &d) in row.iter().enumerate() {
                    if mask.mode == AttentionMode::Causal && i < j {
                        assert!(!reach[i], "{name}: reachability must be causal");
                    }
                    if reach[i] {
                        assert!(
                            d > 0.0,
                            "{name}: b{bi} position {i} should depend on token {j}"
                        );
                    } else {
                        assert_eq!(
                            d, 0.0,
                            "{name}: b{bi} position {i} must not depend on token {j}"
                        );
                    }
                }
            }
            for (bi, s) in saved.into_iter().enumerate() {
                ids[bi * LEN + j] = s;
            }
        }
    }
}

/// The mask rules themselves, on hand-checked cases of DESIGN.md section 4.
#[test]
fn mask_rules_match_the_design() {
    let w = MaskSpec::causal().with_window(WINDOW, SINKS);
    let i = LEN - 1;
    // Window: i - W < j <= i.
    assert!(w.visible(0, i, i) && w.visible(0, i, i + 1 - WINDOW));
    assert!(!w.visible(0, i, i - WINDOW) && !w.visible(0, i, SINKS));
    // Sinks: always visible, but never from the past (causality wins).
    assert!((0..SINKS).all(|s| w.visible(0, i, s)));
    assert!(!w.visible(0, 0, 1));
    // Prefix-LM: the prefix is bidirectional, the rest causal.
    let p = MaskSpec::new(AttentionMode::PrefixLm).with_prefix_lens(vec![4]);
    assert!(p.visible(0, 0, 3) && !p.visible(0, 0, 4) && !p.visible(0, 5, 6));
    // Documents: no attention across documents.
    let d = MaskSpec::causal().with_doc_ids(doc_ids());
    assert!(d.visible(0, 2, 0) && !d.visible(0, 3, 2) && d.visible(1, 6, 0));
}

/// Masks that do not fit the batch are refused with what was expected.
#[test]
fn bad_masks_are_typed_errors() {
    let dev = Device::Cpu;
    let err = |m: MaskSpec| m.to_bias(2, LEN, &dev).unwrap_err().to_string();
    let e = err(MaskSpec::new(AttentionMode::PrefixLm));
    assert!(e.contains("prefix_lens"), "{e}");
    let e = err(MaskSpec::new(AttentionMode::PrefixLm).with_prefix_lens(vec![1]));
    assert!(e.contains("1 entries") && e.contains("2 sequences"), "{e}");
    let e = err(MaskSpec::new(AttentionMode::PrefixLm).with_prefix_lens(vec![1, LEN + 1]));
    assert!(e.contains(&format!("<= sequence length {LEN}")), "{e}");
    let e = err(MaskSpec::causal().with_doc_ids(vec![vec![0; LEN]]));
    assert!(e.contains("1 rows"), "{e}");
    let e = err(MaskSpec::causal().with_window(0, 0));
    assert!(e.contains("sliding_window is 0"), "{e}");
    let e = err(MaskSpec {
        sinks: 2,
        ..MaskSpec::causal()
    });
    assert!(e.contains("no sliding window"), "{e}");
}
