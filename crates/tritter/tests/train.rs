//! Trainer tests: bit-exact resume, learning on the built-in corpus, gradient
//! checkpointing equivalence, schedule and parameter groups, and typed errors on bad input
//! with the last good checkpoint intact.

use std::path::PathBuf;

use candle_core::{DType, Device};
use tritter::data::{corpus, PackedDataset, PAD_DOC};
use tritter::tokenizer::{MultimodalTokenizer, VocabLayout};
use tritter::train::{
    decays, device_from_name, latest_checkpoint, Silent, TrainOptions, Trainer, OPTIMIZER_FILE,
};
use tritter::{TritterConfig, TritterError};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tritter-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The test preset and small options: `seq_len` 32, batch 4, 2 micro-batches per step.
fn small() -> (TritterConfig, TrainOptions) {
    let cfg = TritterConfig::preset("test").unwrap();
    let opts = TrainOptions {
        steps: 8,
        batch_size: 4,
        seq_len: 32,
        grad_accum: 2,
        warmup_steps: 2,
        eval_batches: 2,
        ..TrainOptions::default()
    };
    (cfg, opts)
}

/// (train, validation) packed from the first few built-in corpus files of each split.
fn corpus_sets(
    cfg: &TritterConfig,
    seq_len: usize,
    files: usize,
) -> (PackedDataset, PackedDataset) {
    let tok = MultimodalTokenizer::new(VocabLayout::new(cfg.vocab_size).unwrap());
    let (train, val) = corpus::builtin_documents();
    let n = files.min(train.len());
    (
        PackedDataset::from_documents(&train[..n], &tok, seq_len).unwrap(),
        PackedDataset::from_documents(&val[..files.min(val.len())], &tok, seq_len).unwrap(),
    )
}

fn weights(t: &Trainer) -> Vec<(String, Vec<u32>)> {
    let data = t.model().varmap().data().lock().unwrap();
    let mut w: Vec<_> = data
        .iter()
        .map(|(n, v)| {
            let bits = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            (n.clone(), bits)
        })
        .collect();
    w.sort();
    w
}

/// Losses of a run of 2N steps equal, bit for bit, those of N steps, a checkpoint, a fresh
/// process-like resume and N more steps; final weights are identical too.
#[test]
fn resume_matches_uninterrupted_run_exactly() {
    let (cfg, opts) = small();
    let half = opts.steps / 2;
    let (train, val) = corpus_sets(&cfg, opts.seq_len, 3);

    let mut a = Trainer::new(
        &cfg,
        opts.clone(),
        train.clone(),
        Some(val.clone()),
        &Device::Cpu,
    )
    .unwrap();
    let full: Vec<u64> = (0..opts.steps)
        .map(|_| a.train_step().unwrap().loss.to_bits())
        .collect();

    let dir = scratch("resume");
    let mut b = Trainer::new(
        &cfg,
        opts.clone(),
        train.clone(),
        Some(val.clone()),
        &Device::Cpu,
    )
    .unwrap();
    let mut split: Vec<u64> = (0..half)
        .map(|_| b.train_step().unwrap().loss.to_bits())
        .collect();
    let ckpt = b.save_checkpoint(&dir).unwrap();
    drop(b);
    assert_eq!(latest_checkpoint(&dir).unwrap(), ckpt);
    let mut c = Trainer::resume(&ckpt, &cfg, train, Some(val), None, &Device::Cpu).unwrap();
    assert_eq!(c.step(), half);
    split.extend((half..opts.steps).map(|_| c.train_step().unwrap().loss.to_bits()));

    assert_eq!(split, full, "losses of the resumed run");
    assert_eq!(weights(&c), weights(&a), "final weights");
    assert!(
        f64::from_bits(full[0]) > f64::from_bits(full[full.len() - 1]),
        "the loss moves down over the run: {:?}",
        full.iter().map(|b| f64::from_bits(*b)).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Cross-entropy (nats per target) of the first `sequences` sequences of `eval` under the
/// add-one-smoothed unigram distribution of `train`'s targets over `vocab` ids: what a model
/// that knows token frequencies but no context scores on those validation targets.
fn unigram_cross_entropy(
    train: &PackedDataset,
    eval: &PackedDataset,
    sequences: usize,
    vocab: usize,
) -> f64 {
    let targets = |set: &PackedDataset, n: usize| {
        (0..n.min(set.len()))
            .flat_map(|i| {
                let (t, d) = set.sequence(i).unwrap();
                t[1..]
                    .iter()
                    .zip(&d[1..])
                    .filter(|(_, &doc)| doc != PAD_DOC)
                    .map(|(&tok, _)| tok)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<u32>>()
    };
    let mut counts = vec![0u64; vocab];
    let train_targets = targets(train, usize::MAX);
    for &t in &train_targets {
        counts[t as usize] += 1;
    }
    let denom = (train_targets.len() + vocab) as f64;
    let eval_targets = targets(eval, sequences);
    -eval_targets
        .iter()
        .map(|&t| ((counts[t as usize] + 1) as f64 / denom).ln())
        .sum::<f64>()
        / eval_targets.len() as f64
}

/// A short run on the built-in corpus brings the validation loss below what token
/// frequencies alone give on the same validation targets (so the model uses context). The
/// baseline is the unigram cross-entropy of the evaluated validation sequences, not the
/// training set's entropy: the held-out files have their own token mix, which moves with
/// every file added to the repository.
#[test]
fn training_on_builtin_corpus_beats_unigram_entropy() {
    let cfg = TritterConfig::preset("test").unwrap();
    let opts = TrainOptions {
        steps: 150,
        batch_size: 8,
        seq_len: 64,
        warmup_steps: 10,
        eval_batches: 4,
        eval_every: 0,
        ..TrainOptions::default()
    };
    let (train, val) = corpus_sets(&cfg, opts.seq_len, usize::MAX);
    let baseline = unigram_cross_entropy(
        &train,
        &val,
        opts.eval_batches * opts.batch_size,
        cfg.vocab_size,
    );
    let mut t = Trainer::new(&cfg, opts.clone(), train, Some(val), &Device::Cpu).unwrap();
    let summary = t.run(opts.steps, None, &mut Silent).unwrap();
    let before = summary.val_before.unwrap().loss;
    let after = summary.val_after.unwrap().loss;
    assert!(
        before > baseline,
        "an untrained model is worse than unigram: {before} vs {baseline}"
    );
    assert!(
        after < baseline,
        "validation loss {after} nats should be below the unigram cross-entropy {baseline} (was {before})"
    );
}

/// Gradient checkpointing (per-layer recompute) gives the same loss and, after one update,
/// the same weights as plain backpropagation, up to float rounding.
#[test]
fn gradient_checkpointing_matches_full_backprop() {
    let (cfg, opts) = small();
    let (train, _) = corpus_sets(&cfg, opts.seq_len, 2);
    let mut ckpt_cfg = cfg.clone();
    ckpt_cfg.gradient_checkpointing = true;
    let mut plain = Trainer::new(&cfg, opts.clone(), train.clone(), None, &Device::Cpu).unwrap();
    let mut recompute = Trainer::new(&ckpt_cfg, opts, train, None, &Device::Cpu).unwrap();
    for _ in 0..2 {
        let (p, r) = (plain.train_step().unwrap(), recompute.train_step().unwrap());
        assert!(
            (p.loss - r.loss).abs() < 1e-5 * p.loss,
            "{} vs {}",
            p.loss,
            r.loss
        );
        assert!(
            (p.grad_norm - r.grad_norm).abs() < 1e-4 * p.grad_norm,
            "{} vs {}",
            p.grad_norm,
            r.grad_norm
        );
    }
    let (wp, wr) = (weights(&plain), weights(&recompute));
    let mut max_diff = 0f32;
    for ((np, p), (nr, r)) in wp.iter().zip(&wr) {
        assert_eq!(np, nr);
        for (a, b) in p.iter().zip(r) {
            max_diff = max_diff.max((f32::from_bits(*a) - f32::from_bits(*b)).abs());
        }
    }
    // One AdamW step moves a weight by at most ~lr; the paths must agree far below that.
    assert!(
        max_diff < 1e-2 * TrainOptions::default().lr as f32,
        "max weight difference {max_diff}"
    );
}

/// Warmup is linear to the peak, cosine decays to `min_lr_ratio * peak` at the last step;
/// norms and the embedding are not weight-decayed, linear matrices are.
#[test]
fn schedule_and_parameter_groups() {
    let opts = TrainOptions {
        steps: 100,
        warmup_steps: 10,
        ..TrainOptions::default()
    };
    let s = opts.schedule();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12 * b.abs().max(1.0);
    assert!(close(s.lr(0), opts.lr / opts.warmup_steps as f64));
    assert!(close(s.lr(opts.warmup_steps - 1), opts.lr));
    assert!(close(s.lr(opts.warmup_steps), opts.lr));
    assert!(close(s.lr(opts.steps - 1), opts.lr * opts.min_lr_ratio));
    assert!((opts.warmup_steps..opts.steps - 1).all(|i| s.lr(i + 1) <= s.lr(i)));
    assert!(!decays("embed_tokens.weight", &[512, 64]));
    assert!(!decays("layers.0.attn_norm.weight", &[64]));
    assert!(!decays("layers.1.attn.q_norm.weight", &[32]));
    assert!(decays("layers.0.mlp.up_proj.weight", &[128, 64]));
    assert!(decays("lm_head.weight", &[512, 64]));
}

/// Bad input: a checkpoint resumed with another config, a checkpoint missing its optimizer
/// state, other data, a CUDA device, and a save that cannot be written are typed errors;
/// the last good checkpoint still loads and resumes.
#[test]
fn bad_resume_inputs_are_typed_errors_and_keep_the_last_checkpoint() {
    let (cfg, opts) = small();
    let (train, val) = corpus_sets(&cfg, opts.seq_len, 2);
    let dir = scratch("bad");
    let mut t = Trainer::new(
        &cfg,
        opts.clone(),
        train.clone(),
        Some(val.clone()),
        &Device::Cpu,
    )
    .unwrap();
    t.train_step().unwrap();
    let good = t.save_checkpoint(&dir).unwrap();

    let mut other = cfg.clone();
    other.intermediate_size *= 2;
    match Trainer::resume(&good, &other, train.clone(), None, None, &Device::Cpu) {
        Err(TritterError::CheckpointMismatch { detail, .. }) => {
            assert!(detail.contains("intermediate_size"), "{detail}")
        }
        r => panic!("expected CheckpointMismatch, got {:?}", r.map(|t| t.step())),
    }
    let (other_data, _) = corpus_sets(&cfg, opts.seq_len, 3);
    assert!(matches!(
        Trainer::resume(&good, &cfg, other_data, None, None, &Device::Cpu),
        Err(TritterError::CheckpointMismatch { .. })
    ));
    assert!(matches!(
        device_from_name("cuda"),
        Err(TritterError::DeviceUnavailable { .. })
    ));
    // A save into a path whose parent is a file fails with an I/O error and leaves nothing.
    let blocker = dir.join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    t.train_step().unwrap();
    assert!(matches!(
        t.save_checkpoint(&blocker.join("checkpoints")),
        Err(TritterError::Io { .. })
    ));
    // A checkpoint with its optimizer state removed is refused, not half loaded.
    let torn = dir.join("torn");
    std::fs::create_dir_all(&torn).unwrap();
    for f in std::fs::read_dir(&good).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), torn.join(f.file_name())).unwrap();
    }
    std::fs::remove_file(torn.join(OPTIMIZER_FILE)).unwrap();
    assert!(Trainer::resume(&torn, &cfg, train.clone(), None, None, &Device::Cpu).is_err());
    // The good checkpoint is intact: it resumes at its step with its weights.
    let r = Trainer::resume(
        &latest_checkpoint(&dir).unwrap(),
        &cfg,
        train,
        Some(val),
        None,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(r.step(), 1);
    let loaded = tritter::TritterModel::load(&good, &Device::Cpu).unwrap();
    assert_eq!(loaded.dtype(), DType::F32);
    let _ = std::fs::remove_dir_all(dir);
}

/// Options that would train the wrong thing are typed errors before any step: a non-causal
/// attention mode (each position would see its own target), gradient checkpointing with
/// dropout (the recompute cannot replay the masks), and a warmup as long as the run.
#[test]
fn options_that_would_mistrain_are_rejected() {
    use tritter::AttentionMode;
    let (cfg, opts) = small();
    assert!(opts.validate(&cfg).is_ok());
    for mode in [
        AttentionMode::Bidirectional,
        AttentionMode::Embedding,
        AttentionMode::PrefixLm,
    ] {
        let bad = TritterConfig {
            attention_mode: mode,
            ..cfg.clone()
        };
        let err = opts.validate(&bad).unwrap_err();
        assert!(
            matches!(
                &err,
                TritterError::InvalidTrainOption {
                    field: "attention_mode",
                    ..
                }
            ),
            "{mode:?}: {err}"
        );
    }
    let bad = TritterConfig {
        gradient_checkpointing: true,
        dropout: 0.1,
        ..cfg.clone()
    };
    assert!(matches!(
        opts.validate(&bad),
        Err(TritterError::InvalidTrainOption {
            field: "gradient_checkpointing",
            ..
        })
    ));
    let long_warmup = TrainOptions {
        warmup_steps: opts.steps,
        ..opts.clone()
    };
    assert!(matches!(
        long_warmup.validate(&cfg),
        Err(TritterError::InvalidTrainOption {
            field: "warmup",
            ..
        })
    ));
}

/// `text_only` sampling never returns a special or modality id other than `<eos>` (even
/// when they hold the largest logits), and non-finite logits are an error, not a silent
/// pick.
#[test]
fn text_only_sampling_skips_specials_and_rejects_nonfinite_logits() {
    use tritter::generate::{sample_token, SamplingOptions};
    use tritter::model::SeededRng;
    use tritter::tokenizer::SpecialToken;
    let layout = VocabLayout::new(TritterConfig::preset("test").unwrap().vocab_size).unwrap();
    let limit = layout.byte_range().end as usize;
    let eos = SpecialToken::Eos.id() as usize;
    let specials = SpecialToken::ALL.len();
    let mut logits = vec![0.0f32; limit];
    for (i, l) in logits.iter_mut().enumerate().take(specials) {
        *l = if i == eos { 5.0 } else { 10.0 };
    }
    let opts = SamplingOptions {
        temperature: 1.0,
        top_k: 0,
        vocab_limit: Some(limit as u32),
        text_only: true,
        ..SamplingOptions::default()
    };
    let mut rng = SeededRng::new(3);
    for _ in 0..200 {
        let id = sample_token(&logits, &opts, &mut rng).unwrap() as usize;
        assert!(id == eos || id >= specials, "sampled special id {id}");
    }
    let greedy = SamplingOptions {
        temperature: 0.0,
        ..opts
    };
    assert_eq!(
        sample_token(&logits, &greedy, &mut rng).unwrap() as usize,
        eos
    );
    logits[specials + 1] = f32::INFINITY;
    assert!(sample_token(&logits, &opts, &mut rng).is_err());
}
