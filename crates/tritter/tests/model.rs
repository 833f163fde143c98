//! The reference model end to end: BitLinear against ternary-gemm's kernel, input
//! validation, the embedding entry point, bf16 against f32, the pad row, and overfitting
//! one batch with AdamW.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use common::randn;
use ternary_gemm::candle_ops::TernaryLinear;
use tritter::model::{BitLinear, ParamBuilder, SeededRng};
use tritter::{MaskSpec, TritterConfig, TritterError, TritterModel};

fn test_model(seed: u64) -> (TritterConfig, TritterModel) {
    let cfg = TritterConfig::preset("test").unwrap();
    let model = TritterModel::new(&cfg, DType::F32, &Device::Cpu, seed).unwrap();
    (cfg, model)
}

fn random_ids(cfg: &TritterConfig, b: usize, l: usize, seed: u64) -> Tensor {
    let mut rng = SeededRng::new(seed);
    let ids: Vec<u32> = (0..b * l)
        .map(|_| 1 + rng.below(cfg.vocab_size as u64 - 1) as u32)
        .collect();
    Tensor::from_vec(ids, (b, l), &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// BitLinear's quantized forward (candle ops, the readable definition) agrees with
/// ternary-gemm's `TernaryLinear` custom op (integer W2A8 kernel) on the same weights, for
/// odd shapes; the difference is float rounding only (1e-5 of the output scale).
#[test]
fn bitlinear_matches_ternary_gemm_kernel() {
    for (seed, (rows, k_in, n_out)) in [(3, 17, 5), (7, 64, 128), (5, 100, 33)]
        .into_iter()
        .enumerate()
    {
        let varmap = VarMap::new();
        let pb = ParamBuilder::new(&varmap, DType::F32, &Device::Cpu, seed as u64);
        let lin = BitLinear::new(&pb.pp("lin"), k_in, n_out, 0.05, true).unwrap();
        let x = randn(40 + seed as u64, &[rows, k_in], 1.0);
        let ours = lin.forward(&x).unwrap();
        let kernel = x
            .apply_op1(TernaryLinear::new(lin.to_ternary().unwrap()))
            .unwrap();
        let scale = max_abs(&kernel);
        let err = max_abs(&(&ours - &kernel).unwrap());
        assert!(scale > 0.0);
        assert!(
            err <= 1e-5 * scale,
            "({rows}, {k_in}) x ({n_out}): max |diff| {err} vs scale {scale}"
        );
        // And the quantizer really is ternary: the dequantized weight has 3 values.
        let mut vals = lin
            .dequantized_weight()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        vals.sort_by(f32::total_cmp);
        vals.dedup();
        assert!(vals.len() <= 3, "{vals:?}");
    }
}

/// Bad input gives typed errors naming actual and expected values, never a panic.
#[test]
fn bad_input_is_a_typed_error() {
    let (cfg, model) = test_model(1);
    let mask = MaskSpec::causal();
    let pos = model.default_positions(1, 3).unwrap();
    let v = cfg.vocab_size as u32;
    let ids = Tensor::new(&[[1u32, v, 5]], &Device::Cpu).unwrap();
    let e = model.forward(&ids, &pos, &mask).unwrap_err();
    assert!(
        matches!(e, TritterError::TokenOutOfRange { position: 1, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string().contains(&format!("token id {v}"))
            && e.to_string().contains(&format!(">= vocab_size {v}")),
        "{e}"
    );

    let long = cfg.max_position_embeddings + 1;
    let ids = Tensor::ones((1, long), DType::U32, &Device::Cpu).unwrap();
    let pos_long = Tensor::zeros((1, long), DType::U32, &Device::Cpu).unwrap();
    let e = model.forward(&ids, &pos_long, &mask).unwrap_err();
    assert!(matches!(e, TritterError::SequenceTooLong { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&format!(
            "{long} > max_position_embeddings {}",
            cfg.max_position_embeddings
        )),
        "{e}"
    );

    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let bad_pos = Tensor::new(
        &[[0u32, 1, cfg.max_position_embeddings as u32]],
        &Device::Cpu,
    )
    .unwrap();
    let e = model.forward(&ids, &bad_pos, &mask).unwrap_err();
    assert!(
        matches!(e, TritterError::PositionOutOfRange { index: 2, .. }),
        "{e:?}"
    );

    let e = model
        .forward(&ids.to_dtype(DType::I64).unwrap(), &pos, &mask)
        .unwrap_err();
    assert!(
        matches!(e, TritterError::DTypeMismatch { .. }) && e.to_string().contains("u32"),
        "{e}"
    );

    let short_pos = model.default_positions(1, 2).unwrap();
    let e = model.forward(&ids, &short_pos, &mask).unwrap_err();
    assert!(matches!(e, TritterError::ShapeMismatch { .. }), "{e:?}");

    let embeds = Tensor::zeros((1, 3, cfg.hidden_size + 1), DType::F32, &Device::Cpu).unwrap();
    let e = model.forward_embeddings(&embeds, &pos, &mask).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("(B, L, {})", cfg.hidden_size)),
        "{e}"
    );
    let nan = Tensor::new(&[[[f32::NAN; 64]; 3]], &Device::Cpu).unwrap();
    assert_eq!(nan.dim(2).unwrap(), cfg.hidden_size);
    let e = model.forward_embeddings(&nan, &pos, &mask).unwrap_err();
    assert!(
        matches!(e, TritterError::NonFinite { index: 0, .. }) && e.to_string().contains("NaN"),
        "{e}"
    );
    let e = TritterModel::new(&cfg, DType::F16, &Device::Cpu, 0).unwrap_err();
    assert!(e.to_string().contains("f32 or bf16"), "{e}");
}

/// `forward` is `logits(forward_embeddings(embed(ids)))`: the embedding entry point is the
/// same network; and the pad row is zero and gets no gradient.
#[test]
fn embedding_entry_point_and_pad_row() {
    let (cfg, model) = test_model(2);
    let (b, l) = (2, 7);
    let mut ids = random_ids(&cfg, b, l, 3).to_vec2::<u32>().unwrap();
    ids[1][l - 1] = tritter::config::PAD_TOKEN_ID;
    let ids = Tensor::new(ids, &Device::Cpu).unwrap();
    let pos = model.default_positions(b, l).unwrap();
    let mask = MaskSpec::from_config(&cfg);
    let logits = model.forward(&ids, &pos, &mask).unwrap();
    let hidden = model
        .forward_embeddings(&model.embed(&ids).unwrap(), &pos, &mask)
        .unwrap();
    assert_eq!(hidden.dims(), &[b, l, cfg.hidden_size]);
    assert_eq!(
        max_abs(&(model.logits(&hidden).unwrap() - &logits).unwrap()),
        0.0
    );

    assert_eq!(
        max_abs(&model.embedding().weight().get(0).unwrap()),
        0.0,
        "pad row starts at zero"
    );
    // With a tied head the pad row also gets gradient as an output class; untie to see the
    // input path alone.
    let untied = TritterConfig {
        tie_embeddings: false,
        ..cfg
    };
    let m2 = TritterModel::new(&untied, DType::F32, &Device::Cpu, 2).unwrap();
    let l2 = m2.forward(&ids, &pos, &mask).unwrap();
    let grads = l2.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let g_table = grads.get(m2.embedding().weight()).unwrap();
    assert_eq!(
        max_abs(&g_table.get(0).unwrap()),
        0.0,
        "pad row gets no gradient"
    );
    assert!(max_abs(g_table) > 0.0, "the other rows of the batch do");
}

/// bf16 parameters give the f32 model's logits up to bf16 rounding: the f32 model gets the
/// bf16 model's weights (exactly representable), so only the compute precision differs.
#[test]
fn bf16_matches_f32() {
    for quantize in [false, true] {
        let cfg = TritterConfig {
            quantize_bitlinear: quantize,
            ..TritterConfig::preset("test").unwrap()
        };
        let bf16m = TritterModel::new(&cfg, DType::BF16, &Device::Cpu, 4).unwrap();
        let f32m = TritterModel::new(&cfg, DType::F32, &Device::Cpu, 4).unwrap();
        for (name, v) in bf16m.varmap().data().lock().unwrap().iter() {
            common::var(f32m.varmap(), name)
                .set(&v.as_tensor().to_dtype(DType::F32).unwrap())
                .unwrap();
        }
        let ids = random_ids(&cfg, 2, 9, 5);
        let pos = f32m.default_positions(2, 9).unwrap();
        let a = f32m.forward(&ids, &pos, &MaskSpec::causal()).unwrap();
        let b = bf16m.forward(&ids, &pos, &MaskSpec::causal()).unwrap();
        assert_eq!(b.dtype(), DType::BF16);
        let b = b.to_dtype(DType::F32).unwrap();
        let rms = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let rel = rms(&(&a - &b).unwrap()) / rms(&a);
        eprintln!("quantize {quantize}: bf16 vs f32 relative RMS error {rel}");
        assert!(
            rel < 0.05,
            "quantize {quantize}: bf16 vs f32 relative RMS error {rel}"
        );
    }
}

/// The test preset overfits one batch with plain candle-nn AdamW: the loss falls from
/// about ln(V) to well below it within a few dozen steps, through the STE.
#[test]
fn test_preset_overfits_one_batch() {
    let (cfg, model) = test_model(6);
    let (b, l) = (2, 16);
    let ids = random_ids(&cfg, b, l + 1, 7);
    let inputs = ids.narrow(1, 0, l).unwrap();
    let targets = ids.narrow(1, 1, l).unwrap().flatten_all().unwrap();
    let pos = model.default_positions(b, l).unwrap();
    let mask = MaskSpec::causal();
    let params = ParamsAdamW {
        lr: 1e-2,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(model.varmap().all_vars(), params).unwrap();
    let loss_fn = || {
        let logits = model.forward(&inputs, &pos, &mask).unwrap();
        candle_nn::loss::cross_entropy(&logits.reshape((b * l, cfg.vocab_size)).unwrap(), &targets)
            .unwrap()
    };
    let ln_v = (cfg.vocab_size as f32).ln();
    let first = loss_fn().to_scalar::<f32>().unwrap();
    assert!(
        (first - ln_v).abs() < 0.5,
        "initial loss {first} should be near ln(V) = {ln_v}"
    );
    let mut last = first;
    for _ in 0..STEPS {
        let loss = loss_fn();
        last = loss.to_scalar::<f32>().unwrap();
        opt.backward_step(&loss).unwrap();
    }
    eprintln!("overfit: loss {first} -> {last} in {STEPS} steps (ln V = {ln_v})");
    assert!(
        last < 0.25 * ln_v,
        "loss {first} -> {last} after {STEPS} steps; expected < ln(V)/4 = {}",
        0.25 * ln_v
    );
}

/// AdamW steps of the overfit test.
const STEPS: usize = 40;
