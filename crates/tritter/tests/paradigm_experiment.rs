//! The paradigm's evaluation (`tritter eval --mode`): answer extraction, the counts and
//! consistency of the three modes, and bad input.

use candle_core::{DType, Device, Tensor};
use tritter::paradigm::curriculum::Curriculum;
use tritter::paradigm::experiment::{
    answer_of, evaluate_corpus, evaluate_task, EvalMode, EvalOptions,
};
use tritter::paradigm::task::{text_to_ids, TaskKind};
use tritter::paradigm::{LatentMarkers, ReasoningExample};
use tritter::tokenizer::vocab::SpecialToken;
use tritter::{MaskSpec, TritterConfig, TritterError, TritterModel};

fn model() -> TritterModel {
    let cfg = TritterConfig::preset("test").unwrap();
    TritterModel::new(&cfg, DType::F32, &Device::Cpu, 11).unwrap()
}

fn examples(n: usize) -> Vec<ReasoningExample> {
    TaskKind::Arithmetic.generate(n, 5, 2).unwrap()
}

/// The answer is what follows the last line break before `<eos>`, or everything before
/// `<eos>` without a line break.
#[test]
fn answer_is_the_last_line_before_eos() {
    let eos = SpecialToken::Eos.id();
    let mut ids = text_to_ids("b=12\nc=24\n24");
    ids.push(eos);
    ids.extend(text_to_ids("\n99"));
    assert_eq!(answer_of(&ids), &text_to_ids("24")[..]);
    assert_eq!(answer_of(&text_to_ids("yes")), &text_to_ids("yes")[..]);
    assert_eq!(answer_of(&[eos]), &[] as &[u32]);
}

/// Teacher-forced counts follow the curriculum: token/embedding modes score every step,
/// the answer and `<eos>`; latent mode only the answer and `<eos>`; every example is
/// generated once.
#[test]
fn task_counts_follow_the_mode() {
    let m = model();
    let ex = examples(4);
    let spelled: usize = ex
        .iter()
        .map(|e| e.steps.iter().map(Vec::len).sum::<usize>() + e.answer.len() + 1)
        .sum();
    let answers: usize = ex.iter().map(|e| e.answer.len() + 1).sum();
    for (mode, targets) in [
        (EvalMode::Token, spelled),
        (EvalMode::Embedding, spelled),
        (EvalMode::Latent, answers),
    ] {
        let opts = EvalOptions {
            mode,
            max_new_tokens: 8,
            ..EvalOptions::default()
        };
        let r = evaluate_task(&m, TaskKind::Arithmetic, &ex, &opts, 3).unwrap();
        assert_eq!(r.mode, mode);
        assert_eq!(r.next_token.total, targets, "{mode}");
        assert!(r.next_token.correct <= r.next_token.total);
        let task = r.task.unwrap();
        assert_eq!(task.total, ex.len());
        assert!(task.correct <= task.total);
        if mode == EvalMode::Embedding {
            assert!(r.fallbacks.total >= targets, "every prediction is rounded");
        } else {
            assert_eq!(r.fallbacks.total, 0);
        }
    }
}

/// Token mode's teacher-forced accuracy equals an independent count from `forward`'s logits
/// on the stage-0 sequences (argmax, lowest id on ties).
#[test]
fn token_accuracy_matches_forward_argmax() {
    let m = model();
    let ex = examples(3);
    let markers = LatentMarkers::from_config(m.config()).unwrap();
    let cur = Curriculum {
        thoughts_per_step: 1,
        steps_per_stage: 1,
        max_stage: 0,
    };
    let (mut correct, mut total) = (0, 0);
    for e in &ex {
        let seq = cur.build(e, 0, markers).unwrap();
        let n = seq.ids.len() - 1;
        let ids = Tensor::from_slice(&seq.ids[..n], (1, n), &Device::Cpu).unwrap();
        let logits = m
            .forward(
                &ids,
                &m.default_positions(1, n).unwrap(),
                &MaskSpec::causal(),
            )
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        for (i, row) in logits[0].iter().enumerate() {
            if seq.loss_mask[i + 1] {
                let mut best = 0;
                for (j, &x) in row.iter().enumerate() {
                    if x > row[best] {
                        best = j;
                    }
                }
                total += 1;
                correct += usize::from(best as u32 == seq.ids[i + 1]);
            }
        }
    }
    let opts = EvalOptions {
        max_new_tokens: 1,
        ..EvalOptions::default()
    };
    let r = evaluate_task(&m, TaskKind::Arithmetic, &ex, &opts, 2).unwrap();
    assert_eq!((r.next_token.correct, r.next_token.total), (correct, total));
}

/// A threshold above every confidence makes the embedding mode fall back to the logits on
/// every prediction, which then scores exactly like token mode.
#[test]
fn embedding_mode_falls_back_above_threshold() {
    let m = model();
    let ex = examples(3);
    let token = evaluate_task(
        &m,
        TaskKind::Arithmetic,
        &ex,
        &EvalOptions {
            max_new_tokens: 6,
            ..EvalOptions::default()
        },
        4,
    )
    .unwrap();
    let emb = evaluate_task(
        &m,
        TaskKind::Arithmetic,
        &ex,
        &EvalOptions {
            mode: EvalMode::Embedding,
            rounder_threshold: 2.0,
            max_new_tokens: 6,
            ..EvalOptions::default()
        },
        4,
    )
    .unwrap();
    assert!(emb.fallbacks.total > 0);
    assert_eq!(emb.fallbacks.correct, emb.fallbacks.total);
    assert_eq!(emb.next_token, token.next_token);
    assert_eq!(emb.task, token.task);
}

/// Modes parse by name; bad options, latent mode on a corpus and empty inputs are errors,
/// not panics.
#[test]
fn bad_input_is_refused() {
    for mode in EvalMode::ALL {
        assert_eq!(mode.to_string().parse::<EvalMode>().unwrap(), mode);
    }
    assert!(matches!(
        "latentish".parse::<EvalMode>(),
        Err(TritterError::InvalidArgument { .. })
    ));
    let m = model();
    let bad = [
        EvalOptions {
            thoughts_per_step: 0,
            ..EvalOptions::default()
        },
        EvalOptions {
            rounder_threshold: f32::NAN,
            ..EvalOptions::default()
        },
        EvalOptions {
            max_new_tokens: 0,
            ..EvalOptions::default()
        },
    ];
    for opts in bad {
        assert!(opts.validate().is_err());
        assert!(evaluate_task(&m, TaskKind::Arithmetic, &examples(1), &opts, 1).is_err());
    }
    let ok = EvalOptions::default();
    assert!(matches!(
        evaluate_task(&m, TaskKind::Arithmetic, &[], &ok, 1),
        Err(TritterError::EmptyDataset { .. })
    ));
    assert!(evaluate_task(&m, TaskKind::Arithmetic, &examples(1), &ok, 0).is_err());
    let docs = vec![text_to_ids("abc def ghi"), text_to_ids("jk")];
    let set = tritter::data::PackedDataset::from_token_documents(&docs, 4).unwrap();
    let latent = EvalOptions {
        mode: EvalMode::Latent,
        ..EvalOptions::default()
    };
    assert!(matches!(
        evaluate_corpus(&m, &set, &latent, 2, 0, true),
        Err(TritterError::InvalidArgument { .. })
    ));
    // Scored targets are exactly the loss targets of the perplexity evaluation.
    let token = evaluate_corpus(&m, &set, &ok, 2, 0, true).unwrap();
    let nll = tritter::train::evaluate(&m, &set, 2, 0, true)
        .unwrap()
        .unwrap();
    assert_eq!(token.next_token.total, nll.tokens);
}
