//! Gradient checks of every block of the reference model against central finite
//! differences (f32 forward, f64 loss), and the straight-through estimator of BitLinear.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use common::{check_grad, check_grad_at, randn, var, weighted_sum};
use ternary_gemm::{absmax_quantize_rows, dequantize_rows, ternary_matmul_t};
use tritter::model::{
    Attention, BitLinear, DecoderLayer, Mlp, ParamBuilder, RmsNorm, Rope, RopeTables,
};
use tritter::{MaskSpec, TritterConfig};

/// Coordinates sampled per tensor.
const SAMPLES: usize = 12;
/// Finite-difference step: large enough that f32 rounding of the forward pass (~1e-7
/// relative) stays far below the truncation error O(eps²).
const EPS: f64 = 1e-2;
/// Largest accepted `||g - g_fd|| / ||g_fd||`: central differences at EPS on these smooth
/// blocks agree to ~1e-4; a wrong factor or a missing path gives O(1).
const TOL: f64 = 2e-3;

/// The test preset in full precision (quantization is piecewise constant, its true
/// gradient is zero almost everywhere; STE is tested separately), with a larger init so
/// every path carries a signal well above rounding noise.
fn fp_config() -> TritterConfig {
    TritterConfig {
        quantize_bitlinear: false,
        initializer_range: 0.2,
        ..TritterConfig::preset("test").unwrap()
    }
}

/// Batch and length of the check inputs: two sequences of an odd length.
fn shape(cfg: &TritterConfig) -> (usize, usize, usize) {
    (2, 5, cfg.hidden_size)
}

fn assert_close(name: &str, c: common::GradCheck) {
    eprintln!("{name}: {c:?}");
    assert!(
        c.fd_norm > 1e-4,
        "{name}: finite-difference gradient is ~0 ({c:?}); the check is vacuous"
    );
    assert!(
        c.rel_err < TOL,
        "{name}: relative error {:.2e} >= {TOL:.0e} ({c:?})",
        c.rel_err
    );
}

fn rope_and_bias(cfg: &TritterConfig, b: usize, l: usize) -> (RopeTables, Tensor) {
    let positions: Vec<Vec<u32>> = (0..b)
        .map(|bi| (0..l as u32).map(|p| p + 3 * bi as u32).collect())
        .collect();
    let rope = Rope::new(cfg.head_dim(), cfg.rope_theta)
        .tables(&positions, DType::F32, &Device::Cpu)
        .unwrap();
    let bias = MaskSpec::causal().to_bias(b, l, &Device::Cpu).unwrap();
    (rope, bias)
}

/// Checks the input and each named parameter of a block whose forward is `f`.
fn check_block(
    what: &str,
    varmap: &VarMap,
    params: &[&str],
    x: &Var,
    out_dims: &[usize],
    f: &dyn Fn(&Tensor) -> Tensor,
) {
    let r = randn(99, out_dims, 1.0);
    let loss = || weighted_sum(&f(x.as_tensor()), &r);
    assert_close(
        &format!("{what}: input"),
        check_grad(x, &loss, SAMPLES, EPS, 1),
    );
    for (i, p) in params.iter().enumerate() {
        let v = var(varmap, p);
        assert_close(
            &format!("{what}: {p}"),
            check_grad(&v, &loss, SAMPLES, EPS, 10 + i as u64),
        );
    }
}

/// BitLinear with quantization off is `x · Wᵀ`: gradients w.r.t. x and W.
#[test]
fn bitlinear_full_precision_gradients() {
    let cfg = fp_config();
    let (b, l, h) = shape(&cfg);
    let varmap = VarMap::new();
    let pb = ParamBuilder::new(&varmap, DType::F32, &Device::Cpu, 1);
    let lin = BitLinear::new(
        &pb.pp("lin"),
        h,
        cfg.intermediate_size,
        cfg.initializer_range,
        false,
    )
    .unwrap();
    let x = Var::from_tensor(&randn(2, &[b, l, h], 1.0)).unwrap();
    check_block(
        "BitLinear",
        &varmap,
        &["lin.weight"],
        &x,
        &[b, l, cfg.intermediate_size],
        &|x| lin.forward(x).unwrap(),
    );
}

/// RMSNorm: gradients w.r.t. the input and the learned scale.
#[test]
fn rmsnorm_gradients() {
    let cfg = fp_config();
    let (b, l, h) = shape(&cfg);
    let varmap = VarMap::new();
    let pb = ParamBuilder::new(&varmap, DType::F32, &Device::Cpu, 1);
    let norm = RmsNorm::new(&pb.pp("norm"), h, cfg.norm_eps).unwrap();
    // A non-trivial scale, so d/dx is not that of the unit-weight norm only.
    var(&varmap, "norm.weight")
        .set(&(randn(3, &[h], 0.3) + 1.0).unwrap())
        .unwrap();
    let x = Var::from_tensor(&randn(4, &[b, l, h], 1.0)).unwrap();
    check_block("RMSNorm", &varmap, &["norm.weight"], &x, &[b, l, h], &|x| {
        norm.forward(x).unwrap()
    });
}

/// Attention (QK-Norm, RoPE, GQA, causal softmax): input, all projections and both
/// QK-Norm scales.
#[test]
fn attention_gradients() {
    let cfg = fp_config();
    let (b, l, h) = shape(&cfg);
    let varmap = VarMap::new();
    let pb = ParamBuilder::new(&varmap, DType::F32, &Device::Cpu, 5);
    let attn = Attention::new(&pb.pp("attn"), &cfg).unwrap();
    for n in ["attn.q_norm.weight", "attn.k_norm.weight"] {
        var(&varmap, n)
            .set(&(randn(6, &[cfg.head_dim()], 0.3) + 1.0).unwrap())
            .unwrap();
    }
    let (rope, bias) = rope_and_bias(&cfg, b, l);
    let x = Var::from_tensor(&randn(7, &[b, l, h], 1.0)).unwrap();
    let params = [
        "attn.q_proj.weight",
        "attn.k_proj.weight",
        "attn.v_proj.weight",
        "attn.o_proj.weight",
        "attn.q_norm.weight",
        "attn.k_norm.weight",
    ];
    check_block("Attention", &varmap, &params, &x, &[b, l, h], &|x| {
        attn.forward(x, &rope, &bias).unwrap()
    });
}

/// Squared-ReLU GLU MLP: input and gate/up/down weights.
#[test]
fn mlp_gradients() {
    let cfg = fp_config();
    let (b, l, h) = shape(&cfg);
    let varmap = VarMap::new();
    let pb = ParamBuilder::new(&varmap, DType::F32, &Device::Cpu, 8);
    let mlp = Mlp::new(&pb.pp("mlp"), &cfg).unwrap();
    let x = Var::from_tensor(&randn(9, &[b, l, h], 1.0)).unwrap();
    let params = [
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ];
    check_block("MLP", &varmap, &params, &x, &[b, l, h], &|x| {
        mlp.forward(x).unwrap()
    });
}

/// A whole decoder layer (Chameleon norms around attention and MLP).
#[test]
fn decoder_layer_gradients() {
    let cfg = fp_config();
    let (b, l, h) = shape(&cfg);
    let varmap = VarMap::new();
    let pb = ParamBuilder::new(&varmap, DType::F32, &Device::Cpu, 11);
    let layer = DecoderLayer::new(&pb.pp("layer"), &cfg).unwrap();
    let (rope, bias) = rope_and_bias(&cfg, b, l);
    let x = Var::from_tensor(&randn(12, &[b, l, h], 1.0)).unwrap();
    let params = [
        "layer.attn.q_proj.weight",
        "layer.attn.v_proj.weight",
        "layer.attn.k_norm.weight",
        "layer.attn_norm.weight",
        "layer.mlp.up_proj.weight",
        "layer.mlp_norm.weight",
    ];
    check_block("DecoderLayer", &varmap, &params, &x, &[b, l, h], &|x| {
        layer.forward(x, &rope, &bias, false).unwrap()
    });
}

/// The STE forward value is `xq · (Wq γ)ᵀ`; its gradient reaches the shadow weight and
/// equals the gradient w.r.t. the dequantized weight, `dyᵀ · xq`; the input gradient is
/// `dy · (Wq γ)`, which ternary-gemm's transposed kernel computes independently.
#[test]
fn ste_gradient_reaches_shadow_weights() {
    let cfg = TritterConfig::preset("test").unwrap();
    let (b, l, h) = shape(&cfg);
    let n_out = cfg.intermediate_size;
    let varmap = VarMap::new();
    let pb = ParamBuilder::new(&varmap, DType::F32, &Device::Cpu, 13);
    let lin = BitLinear::new(&pb.pp("lin"), h, n_out, cfg.initializer_range, true).unwrap();
    let x = Var::from_tensor(&randn(14, &[b, l, h], 1.0)).unwrap();
    let dy = randn(15, &[b, l, n_out], 1.0);

    let y = lin.forward(x.as_tensor()).unwrap();
    let grads = weighted_sum(&y, &dy).backward().unwrap();
    let g_shadow = grads
        .get(lin.weight())
        .expect("STE gradient reaches the shadow weight");
    let g_x = grads
        .get(x.as_tensor())
        .expect("STE gradient reaches the input");

    // Independent oracle: fake-quantized x from ternary-gemm's A8 quantizer and a plain
    // matmul against the dequantized weight as a fresh variable.
    let rows = b * l;
    let xv = x
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let xq = dequantize_rows(&absmax_quantize_rows(&xv, rows, h).unwrap()).unwrap();
    let xq = Tensor::from_vec(xq, (rows, h), &Device::Cpu).unwrap();
    let wdq = Var::from_tensor(&lin.dequantized_weight().unwrap()).unwrap();
    let y_ref = xq.matmul(&wdq.as_tensor().t().unwrap()).unwrap();
    let g_ref = weighted_sum(&y_ref, &dy.reshape((rows, n_out)).unwrap())
        .backward()
        .unwrap();
    let g_wdq = g_ref.get(wdq.as_tensor()).unwrap();

    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let scale = max_abs(g_wdq);
    assert!(scale > 1e-3, "gradient w.r.t. the dequantized weight is ~0");
    let err = max_abs(&(g_shadow - g_wdq).unwrap());
    assert!(
        err <= 1e-5 * scale,
        "shadow gradient differs from dL/d(Wq γ): max |diff| {err} vs scale {scale}"
    );
    let y_err = max_abs(&(y.reshape((rows, n_out)).unwrap() - &y_ref).unwrap());
    assert!(
        y_err <= 1e-5 * max_abs(&y_ref),
        "STE forward value is not xq · (Wq γ)ᵀ: {y_err}"
    );

    let dyv = dy.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let dx_kernel = ternary_matmul_t(&lin.to_ternary().unwrap(), &dyv, rows).unwrap();
    let dx_kernel = Tensor::from_vec(dx_kernel, (b, l, h), &Device::Cpu).unwrap();
    let dx_scale = max_abs(&dx_kernel);
    let dx_err = max_abs(&(g_x - &dx_kernel).unwrap());
    assert!(
        dx_err <= 1e-5 * dx_scale,
        "input gradient differs from dy · (Wq γ): {dx_err} vs {dx_scale}"
    );
}

/// The whole model (untied head) under cross-entropy: embedding table, final norm, LM head
/// and a layer weight, i.e. every path from the loss back to the token embeddings.
#[test]
fn full_model_gradients() {
    let cfg = TritterConfig {
        tie_embeddings: false,
        ..fp_config()
    };
    let (b, l, _) = shape(&cfg);
    let model = tritter::TritterModel::new(&cfg, DType::F32, &Device::Cpu, 17).unwrap();
    let mut rng = tritter::model::SeededRng::new(18);
    let ids_vec: Vec<u32> = (0..b * l)
        .map(|_| 1 + rng.below(cfg.vocab_size as u64 - 1) as u32)
        .collect();
    let ids = Tensor::from_vec(ids_vec.clone(), (b, l), &Device::Cpu).unwrap();
    let targets: Vec<u32> = (0..b * l)
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let targets = Tensor::from_vec(targets, b * l, &Device::Cpu).unwrap();
    let pos = model.default_positions(b, l).unwrap();
    let mask = MaskSpec::causal();
    let loss = || {
        let logits = model.forward(&ids, &pos, &mask).unwrap();
        let logits = logits
            .reshape((b * l, cfg.vocab_size))
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
    };
    for (i, name) in [
        "embed_tokens.weight",
        "norm.weight",
        "lm_head.weight",
        "layers.1.mlp.down_proj.weight",
    ]
    .iter()
    .enumerate()
    {
        let v = var(model.varmap(), name);
        let c = if *name == "embed_tokens.weight" {
            // Only the rows of the batch's tokens get a gradient: sample there, one
            // coordinate per (token, a spread of columns).
            let h = cfg.hidden_size;
            let coords: Vec<usize> = ids_vec
                .iter()
                .take(SAMPLES)
                .enumerate()
                .map(|(k, &id)| id as usize * h + (k * 7) % h)
                .collect();
            check_grad_at(&v, &loss, &coords, EPS)
        } else {
            check_grad(&v, &loss, SAMPLES, EPS, 20 + i as u64)
        };
        assert_close(&format!("model: {name}"), c);
    }
}
