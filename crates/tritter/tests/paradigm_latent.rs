//! The embedding-prediction paradigm, part A: latent markers, continuous thought
//! (`forward_latent`, latent generation), embedding-prediction losses and the training
//! objective, Coconut's curriculum and its trainer. Sizes come from the `test` preset.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{check_grad, randn, var, weighted_sum};
use tritter::data::PackedDataset;
use tritter::generate::{generate, sample_token, SamplingOptions};
use tritter::model::SeededRng;
use tritter::paradigm::{
    embedding_loss_sum, Curriculum, EmbeddingLossKind, EmbeddingObjective, LatentBatch,
    LatentMarkers, LatentSequence, Objective, ReasoningExample, ReasoningTrainer,
};
use tritter::tokenizer::{LatentToken, MultimodalTokenizer, Segment, TokenKind, VocabLayout};
use tritter::train::{StepMetrics, TrainOptions, Trainer};
use tritter::{MaskSpec, TritterConfig, TritterError, TritterModel};

const PAD: u32 = 0;
const EOS: u32 = 2;

fn test_config() -> TritterConfig {
    TritterConfig::preset("test").unwrap()
}

/// The test preset in full precision with a larger init (as `tests/gradients.rs`), so
/// finite differences see a smooth function with signal well above f32 rounding.
fn fp_config() -> TritterConfig {
    TritterConfig {
        quantize_bitlinear: false,
        initializer_range: 0.2,
        ..test_config()
    }
}

fn model(cfg: &TritterConfig, seed: u64) -> TritterModel {
    TritterModel::new(cfg, DType::F32, &Device::Cpu, seed).unwrap()
}

/// `(1, L)` ids and latent mask of `prefix <bot> [k slots] <eot> suffix`, slots holding
/// `<pad>`.
fn span(m: LatentMarkers, prefix: &[u32], k: usize, suffix: &[u32]) -> (Vec<u32>, Vec<u8>) {
    let mut ids = prefix.to_vec();
    ids.push(m.bot);
    ids.extend(std::iter::repeat_n(PAD, k));
    ids.push(m.eot);
    ids.extend_from_slice(suffix);
    let mut latent = vec![0u8; ids.len()];
    latent[prefix.len() + 1..prefix.len() + 1 + k].fill(1);
    (ids, latent)
}

fn row(ids: &[u32]) -> Tensor {
    Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap()
}

fn row_u8(flags: &[u8]) -> Tensor {
    Tensor::from_slice(flags, (1, flags.len()), &Device::Cpu).unwrap()
}

fn forward_latent(model: &TritterModel, ids: &[u32], latent: &[u8]) -> Tensor {
    let pos = model.default_positions(1, ids.len()).unwrap();
    model
        .forward_latent(&row(ids), &row_u8(latent), &pos, &MaskSpec::causal())
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The markers are the top two ids of the vocab, outside every tokenizer range, and decode
/// as `<bot>`/`<eot>`.
#[test]
fn markers_are_top_two_ids_and_decode_by_name() {
    let cfg = test_config();
    let m = LatentMarkers::from_config(&cfg).unwrap();
    assert_eq!((m.bot, m.eot), (510, 511));
    let layout = VocabLayout::new(cfg.vocab_size).unwrap();
    assert_eq!(layout.latent_range(), 510..512);
    assert!(layout.bpe_range().end <= m.bot && layout.audio_range().end <= m.bot);
    assert_eq!(
        layout.classify(m.bot, 0).unwrap(),
        TokenKind::Latent(LatentToken::Bot)
    );
    let tok = MultimodalTokenizer::new(layout);
    let all_bytes: Vec<u8> = (0..=255).collect();
    let ids = tok.encode_text(&all_bytes).unwrap();
    assert!(ids.iter().all(|&id| !m.is_marker(id)));
    assert_eq!(
        tok.decode(&[m.bot, m.eot]).unwrap(),
        vec![
            Segment::Latent(LatentToken::Bot),
            Segment::Latent(LatentToken::Eot)
        ]
    );
    let big = LatentMarkers::new(65536).unwrap();
    assert_eq!((big.bot, big.eot), (65534, 65535));
}

/// With an all-false latent mask `forward_latent` gives exactly the hidden states (and so
/// the logits) of `forward`.
#[test]
fn forward_latent_without_slots_equals_forward_exactly() {
    let cfg = test_config();
    let model = model(&cfg, 1);
    let ids = Tensor::new(
        &[[1u32, 72, 105, 33, 2, 0, 9], [4, 8, 300, 509, 10, 11, 12]],
        &Device::Cpu,
    )
    .unwrap();
    let pos = model.default_positions(2, 7).unwrap();
    let latent = Tensor::zeros((2, 7), DType::U8, &Device::Cpu).unwrap();
    let mask = MaskSpec::causal();
    let hidden = model.forward_latent(&ids, &latent, &pos, &mask).unwrap();
    let reference = model
        .forward_embeddings(&model.embed(&ids).unwrap(), &pos, &mask)
        .unwrap();
    assert_eq!(max_abs_diff(&hidden, &reference), 0.0);
    let logits = model.logits(&hidden).unwrap();
    assert_eq!(
        max_abs_diff(&logits, &model.forward(&ids, &pos, &mask).unwrap()),
        0.0
    );
}

/// A latent slot's input is the final hidden state of the position before it: two slots
/// computed by hand with three `forward_embeddings` passes match `forward_latent`.
#[test]
fn latent_slots_take_the_previous_final_hidden_state() {
    let cfg = test_config();
    let model = model(&cfg, 2);
    let m = LatentMarkers::from_config(&cfg).unwrap();
    let (ids, latent) = span(m, &[1, 72, 105], 2, &[40, 41]);
    let pos = model.default_positions(1, ids.len()).unwrap();
    let mask = MaskSpec::causal();
    let mut embeds = model.embed(&row(&ids)).unwrap();
    for slot in [4usize, 5] {
        let h = model.forward_embeddings(&embeds, &pos, &mask).unwrap();
        let thought = h.narrow(1, slot - 1, 1).unwrap();
        let before = embeds.narrow(1, 0, slot).unwrap();
        let after = embeds.narrow(1, slot + 1, ids.len() - slot - 1).unwrap();
        embeds = Tensor::cat(&[&before, &thought, &after], 1).unwrap();
    }
    let by_hand = model.forward_embeddings(&embeds, &pos, &mask).unwrap();
    let hidden = forward_latent(&model, &ids, &latent);
    assert!(max_abs_diff(&hidden, &by_hand) < 1e-6);
}

/// Continuous thoughts change the output: the hidden states after the span differ from
/// feeding `<pad>` or a token embedding at the latent slots, those before it do not.
#[test]
fn latent_steps_change_the_output() {
    let cfg = test_config();
    let model = model(&cfg, 3);
    let m = LatentMarkers::from_config(&cfg).unwrap();
    let (ids, latent) = span(m, &[1, 72, 105], 3, &[40, 41, 42]);
    let with_thoughts = forward_latent(&model, &ids, &latent);
    let zeros = vec![0u8; ids.len()];
    let with_pad = forward_latent(&model, &ids, &zeros);
    let mut token_ids = ids.clone();
    for (id, &l) in token_ids.iter_mut().zip(&latent) {
        if l == 1 {
            *id = 72;
        }
    }
    let with_tokens = forward_latent(&model, &token_ids, &zeros);
    let first_slot = 4;
    let head = |t: &Tensor| t.narrow(1, 0, first_slot).unwrap();
    let tail = |t: &Tensor| t.narrow(1, first_slot, ids.len() - first_slot).unwrap();
    assert_eq!(max_abs_diff(&head(&with_thoughts), &head(&with_pad)), 0.0);
    for other in [&with_pad, &with_tokens] {
        let d = max_abs_diff(&tail(&with_thoughts), &tail(other));
        assert!(
            d > 1e-3,
            "latent slots changed the hidden states by only {d}"
        );
        let last = |t: &Tensor| {
            model
                .logits(t)
                .unwrap()
                .narrow(1, ids.len() - 1, 1)
                .unwrap()
        };
        assert!(max_abs_diff(&last(&with_thoughts), &last(other)) > 1e-4);
    }
}

/// Gradients flow through the thoughts: `latent_proj` (used only at latent slots) gets a
/// nonzero gradient that matches central finite differences, and none without slots.
#[test]
fn gradients_flow_through_latent_steps() {
    let cfg = TritterConfig {
        latent_projection: true,
        ..fp_config()
    };
    let model = model(&cfg, 4);
    let m = LatentMarkers::from_config(&cfg).unwrap();
    let (ids, latent) = span(m, &[1, 72, 105], 3, &[40, 41]);
    let proj = var(model.varmap(), "latent_proj.weight");
    let r = randn(9, &[1, ids.len(), cfg.hidden_size], 1.0);
    let loss = || weighted_sum(&forward_latent(&model, &ids, &latent), &r);
    let grads = loss().backward().unwrap();
    let g = grads
        .get(proj.as_tensor())
        .expect("latent_proj is on the graph");
    let norm = g
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    assert!(norm > 1e-3, "latent_proj gradient norm {norm}");
    let check = check_grad(&proj, &loss, 12, 1e-2, 7);
    eprintln!("latent_proj: {check:?}");
    assert!(check.fd_norm > 1e-4, "vacuous check {check:?}");
    assert!(
        check.rel_err < 5e-3,
        "finite differences disagree: {check:?}"
    );
    let zeros = vec![0u8; ids.len()];
    let plain = weighted_sum(&forward_latent(&model, &ids, &zeros), &r)
        .backward()
        .unwrap();
    assert!(plain.get(proj.as_tensor()).is_none());
}

/// The identity-initialized projection is counted by `param_count` and leaves the thoughts
/// as without it.
#[test]
fn latent_projection_is_counted_and_starts_as_identity() {
    let with = TritterConfig {
        latent_projection: true,
        ..test_config()
    };
    let without = test_config();
    let h = with.hidden_size as u64;
    assert_eq!(with.param_count(), without.param_count() + h * h);
    let a = model(&with, 5);
    assert_eq!(a.param_count(), with.param_count());
    let b = model(&without, 5);
    let m = LatentMarkers::from_config(&with).unwrap();
    let (ids, latent) = span(m, &[1, 72], 2, &[40]);
    assert!(
        max_abs_diff(
            &forward_latent(&a, &ids, &latent),
            &forward_latent(&b, &ids, &latent)
        ) < 1e-6
    );
}

/// MSE and cosine match a hand computation on small tensors, masked positions count 0.
#[test]
fn embedding_losses_match_hand_computation() {
    let dev = Device::Cpu;
    let p = [[1.0f32, 2.0, 3.0], [0.5, -1.0, 2.0], [7.0, 7.0, 7.0]];
    let t = [[1.0f32, 0.0, -1.0], [0.5, -1.0, 1.0], [0.0, 0.0, 0.0]];
    let mask = Tensor::new(&[[1.0f32, 1.0, 0.0]], &dev).unwrap();
    let pt = Tensor::new(&[p], &dev).unwrap();
    let tt = Tensor::new(&[t], &dev).unwrap();
    let value = |kind| {
        f64::from(
            embedding_loss_sum(kind, &pt, &tt, &mask)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        )
    };
    // MSE: mean over H per position: (0 + 4 + 16) / 3 and (0 + 0 + 1) / 3.
    assert!((value(EmbeddingLossKind::Mse) - (20.0 / 3.0 + 1.0 / 3.0)).abs() < 1e-5);
    // Cosine: 1 - p.t / (|p| |t|).
    let cos = |a: [f32; 3], b: [f32; 3]| {
        let dot: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
        let n = |v: [f32; 3]| v.iter().map(|x| f64::from(x * x)).sum::<f64>().sqrt();
        1.0 - dot / (n(a) * n(b))
    };
    let expected = cos(p[0], t[0]) + cos(p[1], t[1]);
    assert!((value(EmbeddingLossKind::Cosine) - expected).abs() < 1e-5);
    // The masked third position has a zero target: still finite, and contributes nothing.
    assert!(value(EmbeddingLossKind::Cosine).is_finite());
}

/// The target is detached: it gets no gradient while the prediction does.
#[test]
fn embedding_target_gets_no_gradient() {
    let pred = Var::from_tensor(&randn(1, &[2, 3, 8], 1.0)).unwrap();
    let target = Var::from_tensor(&randn(2, &[2, 3, 8], 1.0)).unwrap();
    let mask = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
    for kind in [EmbeddingLossKind::Mse, EmbeddingLossKind::Cosine] {
        let loss = embedding_loss_sum(kind, pred.as_tensor(), target.as_tensor(), &mask).unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(pred.as_tensor()).is_some(), "{kind:?}");
        assert!(grads.get(target.as_tensor()).is_none(), "{kind:?}");
    }
}

/// The objective moves linearly from CE only to the target mix over the transition.
#[test]
fn objective_transition_is_linear_by_step() {
    let o = Objective {
        ce_weight: 0.5,
        embedding: Some(EmbeddingObjective {
            kind: EmbeddingLossKind::Cosine,
            weight: 2.0,
        }),
        transition_start: 10,
        transition_steps: 4,
    };
    let w = |s| {
        let w = o.weights_at(s);
        (w.ce, w.embedding)
    };
    assert_eq!(w(0), (1.0, 0.0));
    assert_eq!(w(10), (1.0, 0.0));
    assert_eq!(w(12), (0.75, 1.0));
    assert_eq!(w(14), (0.5, 2.0));
    assert_eq!(w(1000), (0.5, 2.0));
    let d = Objective::default().weights_at(5);
    assert_eq!((d.ce, d.embedding), (1.0, 0.0));
}

/// A tiny learnable token corpus: repeated ascending byte runs from varying starts.
fn tiny_corpus(seq_len: usize) -> PackedDataset {
    let docs: Vec<Vec<u32>> = (0..24u32)
        .map(|d| {
            let mut doc: Vec<u32> = (0..40).map(|i| 8 + 65 + (d + i) % 12).collect();
            doc.push(EOS);
            doc
        })
        .collect();
    PackedDataset::from_token_documents(&docs, seq_len).unwrap()
}

/// The embedding loss falls during a short CPU run with CE + MSE and is reported beside
/// the cross-entropy; before the transition its weight is 0.
#[test]
fn embedding_loss_decreases_in_short_training() {
    let cfg = test_config();
    let options = TrainOptions {
        steps: 30,
        batch_size: 4,
        seq_len: 32,
        warmup_steps: 2,
        eval_batches: 1,
        objective: Objective {
            ce_weight: 1.0,
            embedding: Some(EmbeddingObjective {
                kind: EmbeddingLossKind::Mse,
                weight: 1.0,
            }),
            transition_start: 1,
            transition_steps: 4,
        },
        ..TrainOptions::default()
    };
    let mut trainer = Trainer::new(&cfg, options, tiny_corpus(32), None, &Device::Cpu).unwrap();
    let metrics: Vec<StepMetrics> = (0..30).map(|_| trainer.train_step().unwrap()).collect();
    assert_eq!(metrics[0].embedding_weight, 0.0);
    assert_eq!(metrics[0].loss, metrics[0].ce_loss);
    assert_eq!(metrics[29].embedding_weight, 1.0);
    let emb: Vec<f64> = metrics.iter().map(|m| m.embedding_loss.unwrap()).collect();
    let first = emb[..3].iter().sum::<f64>() / 3.0;
    let last = emb[27..].iter().sum::<f64>() / 3.0;
    eprintln!("embedding loss {first:.4} -> {last:.4}");
    assert!(last < 0.95 * first, "embedding loss {first} -> {last}");
    let m = metrics[29];
    assert!((m.loss - (m.ce_loss + m.embedding_loss.unwrap())).abs() < 1e-5);
}

/// With an embedding loss (and the latent projection) gradient checkpointing gives the
/// same loss terms and gradient norm as plain backpropagation, up to float rounding.
#[test]
fn embedding_objective_matches_under_gradient_checkpointing() {
    let cfg = TritterConfig {
        latent_projection: true,
        ..test_config()
    };
    let ckpt = TritterConfig {
        gradient_checkpointing: true,
        ..cfg.clone()
    };
    let options = TrainOptions {
        steps: 4,
        batch_size: 2,
        seq_len: 32,
        warmup_steps: 1,
        objective: Objective {
            ce_weight: 0.5,
            embedding: Some(EmbeddingObjective {
                kind: EmbeddingLossKind::Cosine,
                weight: 2.0,
            }),
            ..Objective::default()
        },
        ..TrainOptions::default()
    };
    let mut plain =
        Trainer::new(&cfg, options.clone(), tiny_corpus(32), None, &Device::Cpu).unwrap();
    let mut recompute = Trainer::new(&ckpt, options, tiny_corpus(32), None, &Device::Cpu).unwrap();
    for _ in 0..2 {
        let (p, r) = (plain.train_step().unwrap(), recompute.train_step().unwrap());
        let (pe, re) = (p.embedding_loss.unwrap(), r.embedding_loss.unwrap());
        assert!(
            (p.loss - r.loss).abs() < 1e-5 * p.loss,
            "{} vs {}",
            p.loss,
            r.loss
        );
        assert!((pe - re).abs() < 1e-5 * pe, "{pe} vs {re}");
        assert!(
            (p.grad_norm - r.grad_norm).abs() < 1e-4 * p.grad_norm,
            "{} vs {}",
            p.grad_norm,
            r.grad_norm
        );
    }
}

/// The default objective reports CE only (`loss == ce_loss`, no embedding loss).
#[test]
fn default_objective_is_plain_cross_entropy() {
    let cfg = test_config();
    let options = TrainOptions {
        steps: 2,
        batch_size: 2,
        seq_len: 32,
        warmup_steps: 1,
        ..TrainOptions::default()
    };
    let mut trainer = Trainer::new(&cfg, options, tiny_corpus(32), None, &Device::Cpu).unwrap();
    let m = trainer.train_step().unwrap();
    assert_eq!(m.loss, m.ce_loss);
    assert_eq!(m.embedding_loss, None);
    assert_eq!((m.ce_weight, m.embedding_weight), (1.0, 0.0));
}

/// TrainOptions JSON written before the objective existed still loads, with the default.
#[test]
fn old_train_options_json_deserializes() {
    let mut json = serde_json::to_value(TrainOptions::default()).unwrap();
    json.as_object_mut().unwrap().remove("objective");
    let old: TrainOptions = serde_json::from_value(json).unwrap();
    assert_eq!(old, TrainOptions::default());
    assert_eq!(old.objective, Objective::default());
}

fn example() -> ReasoningExample {
    ReasoningExample {
        question: vec![10, 11],
        steps: vec![vec![20, 21], vec![30]],
        answer: vec![40],
    }
}

/// Curriculum stages 0..=steps+1 have the exact Coconut layout and loss mask.
#[test]
fn curriculum_sequences_have_exact_layout() {
    let m = LatentMarkers::from_config(&test_config()).unwrap();
    let (bot, eot) = (m.bot, m.eot);
    let c = Curriculum {
        thoughts_per_step: 2,
        steps_per_stage: 5,
        max_stage: 3,
    };
    let ex = example();
    let (f, t) = (false, true);
    let expected = [
        LatentSequence {
            ids: vec![10, 11, 20, 21, 30, 40, EOS],
            latent_mask: vec![f; 7],
            loss_mask: vec![f, f, t, t, t, t, t],
        },
        LatentSequence {
            ids: vec![10, 11, bot, PAD, PAD, eot, 30, 40, EOS],
            latent_mask: vec![f, f, f, t, t, f, f, f, f],
            loss_mask: vec![f, f, f, f, f, f, t, t, t],
        },
        LatentSequence {
            ids: vec![10, 11, bot, PAD, PAD, PAD, PAD, eot, 40, EOS],
            latent_mask: vec![f, f, f, t, t, t, t, f, f, f],
            loss_mask: vec![f, f, f, f, f, f, f, f, t, t],
        },
    ];
    for stage in 0..=ex.steps.len() + 1 {
        let got = c.build(&ex, stage, m).unwrap();
        assert_eq!(got, expected[stage.min(2)], "stage {stage}");
        assert_eq!(c.latent_slots(&ex, stage), 2 * stage.min(2));
    }
    let stages: Vec<usize> = (0..22).step_by(5).map(|s| c.stage_at(s)).collect();
    assert_eq!(stages, [0, 1, 2, 3, 3]);
}

/// The batch builder shifts targets by one, right-pads with `<pad>` and counts only the
/// loss targets.
#[test]
fn latent_batch_pads_and_shifts() {
    let m = LatentMarkers::from_config(&test_config()).unwrap();
    let c = Curriculum {
        thoughts_per_step: 1,
        steps_per_stage: 1,
        max_stage: 2,
    };
    let s0 = c.build(&example(), 0, m).unwrap(); // 7 tokens
    let s2 = c.build(&example(), 2, m).unwrap(); // 10 tokens... q(2) bot 2 eot answer eos = 8
    let batch = LatentBatch::new(&[s0.clone(), s2.clone()], &Device::Cpu).unwrap();
    let l = s2.ids.len() - 1;
    assert_eq!(batch.inputs.dims(), &[2, l]);
    let inputs = batch.inputs.to_vec2::<u32>().unwrap();
    let targets = batch.targets.to_vec2::<u32>().unwrap();
    let loss = batch.loss_mask.to_vec2::<f32>().unwrap();
    let latent = batch.latent_mask.to_vec2::<u8>().unwrap();
    let n0 = s0.ids.len() - 1;
    assert_eq!(&inputs[0][..n0], &s0.ids[..n0]);
    assert!(inputs[0][n0..].iter().all(|&id| id == PAD));
    assert_eq!(&targets[0][..n0], &s0.ids[1..]);
    assert!(loss[0][n0..].iter().all(|&v| v == 0.0));
    assert_eq!(inputs[1], s2.ids[..l]);
    assert_eq!(targets[1], s2.ids[1..]);
    let want: Vec<u8> = s2.latent_mask[..l].iter().map(|&b| u8::from(b)).collect();
    assert_eq!(latent[1], want);
    let count = |s: &LatentSequence| s.loss_mask.iter().filter(|&&b| b).count();
    assert_eq!(batch.num_targets, count(&s0) + count(&s2));
}

/// The reasoning trainer walks the curriculum stages and trains with finite losses and an
/// embedding loss reported when the objective has one.
#[test]
fn reasoning_trainer_follows_the_curriculum() {
    let cfg = TritterConfig {
        latent_projection: true,
        ..test_config()
    };
    let examples: Vec<ReasoningExample> = (0..6u32)
        .map(|i| ReasoningExample {
            question: vec![1, 60 + i, 61 + i],
            steps: vec![vec![70 + i], vec![80 + i, 81]],
            answer: vec![90 + i],
        })
        .collect();
    let options = TrainOptions {
        steps: 9,
        batch_size: 3,
        seq_len: 16,
        warmup_steps: 1,
        objective: Objective {
            embedding: Some(EmbeddingObjective {
                kind: EmbeddingLossKind::Cosine,
                weight: 0.5,
            }),
            ..Objective::default()
        },
        ..TrainOptions::default()
    };
    let curriculum = Curriculum {
        thoughts_per_step: 2,
        steps_per_stage: 3,
        max_stage: 2,
    };
    let mut trainer =
        ReasoningTrainer::new(&cfg, options, curriculum, examples, &Device::Cpu).unwrap();
    let mut stages = Vec::new();
    for _ in 0..9 {
        let r = trainer.train_step().unwrap();
        assert!(r.metrics.loss.is_finite() && r.metrics.embedding_loss.is_some());
        stages.push(r.stage);
    }
    assert_eq!(stages, [0, 0, 0, 1, 1, 1, 2, 2, 2]);
    assert_eq!(trainer.step(), 9);
}

/// Latent generation: `latent_steps == 0` samples exactly as the token-only loop over
/// `forward`; with thoughts the first token is the greedy pick of `forward_latent` over
/// `prompt <bot> thoughts <eot>`.
#[test]
fn generation_with_latent_steps_matches_forward_latent() {
    let cfg = test_config();
    let model = model(&cfg, 6);
    let prompt = [5u32, 120, 110, 33];
    let greedy = SamplingOptions {
        max_new_tokens: 4,
        temperature: 0.0,
        stop_at_eos: false,
        ..SamplingOptions::default()
    };
    let plain = generate(&model, &prompt, &greedy).unwrap();
    let mut ids = prompt.to_vec();
    let mut rng = SeededRng::new(0);
    for _ in 0..4 {
        let pos = model.default_positions(1, ids.len()).unwrap();
        let logits = model
            .forward(&row(&ids), &pos, &MaskSpec::causal())
            .unwrap();
        let last = logits
            .get(0)
            .unwrap()
            .get(ids.len() - 1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        ids.push(sample_token(&last, &greedy, &mut rng).unwrap());
    }
    assert_eq!(plain, ids[prompt.len()..]);

    let m = LatentMarkers::from_config(&cfg).unwrap();
    let latent_opts = SamplingOptions {
        latent_steps: 3,
        ..greedy
    };
    let thought = generate(&model, &prompt, &latent_opts).unwrap();
    assert_eq!(thought.len(), 4);
    let (ids, latent) = span(m, &prompt, 3, &[]);
    let hidden = forward_latent(&model, &ids, &latent);
    let last = model
        .logits(&hidden)
        .unwrap()
        .get(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(thought[0], sample_token(&last, &greedy, &mut rng).unwrap());
    // Text-only sampling never returns a latent marker, even when it is the most likely id.
    let mut logits = vec![0.0f32; cfg.vocab_size];
    logits[m.bot as usize] = 50.0;
    logits[m.eot as usize] = 50.0;
    let text = SamplingOptions {
        text_only: true,
        ..greedy
    };
    assert!(!m.is_marker(sample_token(&logits, &text, &mut rng).unwrap()));
}

/// Bad input fails with the right variant: misplaced latent slots, a vocab too small for
/// the markers, a non-u8 latent mask, bad objective weights and curricula.
#[test]
fn bad_input_returns_the_right_errors() {
    let cfg = test_config();
    let model = model(&cfg, 7);
    let pos = model.default_positions(1, 4).unwrap();
    let run = |ids: &[u32], latent: &[u8]| {
        model.forward_latent(&row(ids), &row_u8(latent), &pos, &MaskSpec::causal())
    };
    let err = run(&[1, 72, 73, 74], &[1, 0, 0, 0]).unwrap_err();
    assert!(
        matches!(
            err,
            TritterError::InvalidLatentSpan {
                batch: 0,
                position: 0,
                ..
            }
        ),
        "{err}"
    );
    let err = run(&[1, 72, 73, 74], &[0, 0, 1, 0]).unwrap_err();
    assert!(
        matches!(err, TritterError::InvalidLatentSpan { position: 2, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("token id 72") && msg.contains("510"), "{msg}");
    let err = run(&[1, 72, 73, 74], &[0, 2, 0, 0]).unwrap_err();
    assert!(
        matches!(err, TritterError::InvalidLatentSpan { .. }),
        "{err}"
    );
    let as_u32 = Tensor::zeros((1, 4), DType::U32, &Device::Cpu).unwrap();
    let err = model
        .forward_latent(&row(&[1, 2, 3, 4]), &as_u32, &pos, &MaskSpec::causal())
        .unwrap_err();
    assert!(matches!(err, TritterError::DTypeMismatch { .. }), "{err}");

    let err = LatentMarkers::new(265).unwrap_err();
    assert!(
        matches!(
            err,
            TritterError::InvalidConfig {
                field: "vocab_size",
                ..
            }
        ),
        "{err}"
    );
    let small = TritterConfig {
        vocab_size: 264,
        ..cfg.clone()
    };
    let small_model = TritterModel::new(&small, DType::F32, &Device::Cpu, 0).unwrap();
    let err = small_model
        .forward_latent(
            &row(&[1, 263, 0, 4]),
            &row_u8(&[0, 0, 1, 0]),
            &pos,
            &MaskSpec::causal(),
        )
        .unwrap_err();
    assert!(matches!(err, TritterError::InvalidConfig { .. }), "{err}");
    let err = generate(
        &small_model,
        &[1],
        &SamplingOptions {
            latent_steps: 1,
            ..SamplingOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, TritterError::InvalidConfig { .. }), "{err}");

    let bad = [
        (
            Objective {
                ce_weight: 0.0,
                ..Objective::default()
            },
            "--ce-weight / --embedding-weight",
        ),
        (
            Objective {
                ce_weight: -1.0,
                ..Objective::default()
            },
            "--ce-weight",
        ),
        (
            Objective {
                embedding: Some(EmbeddingObjective {
                    kind: EmbeddingLossKind::Mse,
                    weight: f64::NAN,
                }),
                ..Objective::default()
            },
            "--embedding-weight",
        ),
    ];
    for (objective, flag) in bad {
        let err = objective.validate().unwrap_err();
        assert!(
            matches!(err, TritterError::InvalidTrainOption { field, .. } if field == flag),
            "{err}"
        );
        let options = TrainOptions {
            objective,
            ..TrainOptions::default()
        };
        assert!(matches!(
            options.validate(&cfg),
            Err(TritterError::InvalidTrainOption { .. })
        ));
    }
    let no_thoughts = Curriculum {
        thoughts_per_step: 0,
        steps_per_stage: 1,
        max_stage: 1,
    };
    assert!(matches!(
        no_thoughts.validate(),
        Err(TritterError::InvalidTrainOption { .. })
    ));
    let m = LatentMarkers::from_config(&cfg).unwrap();
    let marked = ReasoningExample {
        question: vec![1],
        steps: vec![vec![m.eot]],
        answer: vec![3],
    };
    let c = Curriculum {
        thoughts_per_step: 1,
        steps_per_stage: 1,
        max_stage: 1,
    };
    assert!(matches!(
        c.build(&marked, 0, m),
        Err(TritterError::InvalidLatentSpan { .. })
    ));
}
