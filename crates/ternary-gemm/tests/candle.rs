//! candle custom ops (feature `candle`): forward equals the crate's CPU kernels for any
//! leading shape and f32/bf16 input, bad inputs are errors naming the numbers, and autograd
//! through `TernaryLinear` yields the straight-through-estimator gradient `dy · (Wq γ)`.
#![cfg(feature = "candle")]

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use ternary_gemm::candle_ops::{TernaryLinear, TernaryMlpOp};
use ternary_gemm::{
    absmax_quantize_rows, absmean_quantize, ternary_matmul_a8, ternary_matmul_t, ScaleGranularity,
    TernaryMatrix, TernaryMlp,
};
use tritter_kernels_cuda::testing::random_f32;

/// (n_out, k_in) of the test weight: k_in not a multiple of 16 or 128.
const N_OUT: usize = 24;
const K_IN: usize = 40;
/// Leading dims of the activations: a (batch, seq) pair.
const LEAD: [usize; 2] = [2, 3];

fn weight() -> Arc<TernaryMatrix> {
    Arc::new(
        absmean_quantize(
            &random_f32(N_OUT * K_IN, 1),
            N_OUT,
            K_IN,
            ScaleGranularity::PerRow,
        )
        .unwrap(),
    )
}

/// `x.apply_op1(TernaryLinear)` equals A8 quantization + `ternary_matmul_a8`, keeping the
/// leading dims, for f32 and (rounded) bf16.
#[test]
fn linear_forward_matches_kernels() {
    let w = weight();
    let m = LEAD.iter().product::<usize>();
    let x = random_f32(m * K_IN, 2);
    let t = Tensor::from_vec(x.clone(), (LEAD[0], LEAD[1], K_IN), &Device::Cpu).unwrap();
    let y = t.apply_op1(TernaryLinear::new(w.clone())).unwrap();
    assert_eq!(y.dims(), &[LEAD[0], LEAD[1], N_OUT]);
    let want = ternary_matmul_a8(&w, &absmax_quantize_rows(&x, m, K_IN).unwrap()).unwrap();
    assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);

    let yb = t
        .to_dtype(DType::BF16)
        .unwrap()
        .apply_op1(TernaryLinear::new(w.clone()))
        .unwrap();
    assert_eq!(yb.dtype(), DType::BF16);
    let xb: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let want_b: Vec<half::bf16> =
        ternary_matmul_a8(&w, &absmax_quantize_rows(&xb, m, K_IN).unwrap())
            .unwrap()
            .into_iter()
            .map(half::bf16::from_f32)
            .collect();
    assert_eq!(
        yb.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
        want_b
    );
}

/// Wrong feature count and non-contiguous input are errors, not panics.
#[test]
fn linear_bad_input_is_an_error() {
    let w = weight();
    let bad = Tensor::zeros((2, K_IN + 1), DType::F32, &Device::Cpu).unwrap();
    let err = bad
        .apply_op1(TernaryLinear::new(w.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&(K_IN + 1).to_string()) && err.contains(&K_IN.to_string()),
        "{err}"
    );
    let strided = Tensor::zeros((K_IN, 3), DType::F32, &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    let err = strided
        .apply_op1(TernaryLinear::new(w))
        .unwrap_err()
        .to_string();
    assert!(err.contains("contiguous"), "{err}");
}

/// Autograd: d(sum(c ⊙ y))/dx = c · (Wq γ) (straight-through estimator for the A8 step).
#[test]
fn linear_backward_is_ste() {
    let w = weight();
    let m = LEAD.iter().product::<usize>();
    let x = Var::from_tensor(
        &Tensor::from_vec(random_f32(m * K_IN, 3), (m, K_IN), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let c = random_f32(m * N_OUT, 4);
    let ct = Tensor::from_vec(c.clone(), (m, N_OUT), &Device::Cpu).unwrap();
    let y = x
        .as_tensor()
        .apply_op1(TernaryLinear::new(w.clone()))
        .unwrap();
    let grads = (y * ct).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads
        .get(x.as_tensor())
        .expect("gradient for x")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(dx, ternary_matmul_t(&w, &c, m).unwrap());
}

/// The MLP op equals `TernaryMlp::forward`.
#[test]
fn mlp_forward_matches_kernels() {
    let (hidden, inter) = (K_IN, N_OUT);
    let q = |r: usize, c: usize, s: u64| {
        absmean_quantize(&random_f32(r * c, s), r, c, ScaleGranularity::PerTensor).unwrap()
    };
    let mlp = Arc::new(
        TernaryMlp::new(
            q(inter, hidden, 5),
            q(inter, hidden, 6),
            q(hidden, inter, 7),
        )
        .unwrap(),
    );
    let m = LEAD.iter().product::<usize>();
    let x = random_f32(m * hidden, 8);
    let t = Tensor::from_vec(x.clone(), (LEAD[0], LEAD[1], hidden), &Device::Cpu).unwrap();
    let y = t.apply_op1(TernaryMlpOp::new(mlp.clone())).unwrap();
    assert_eq!(y.dims(), &[LEAD[0], LEAD[1], hidden]);
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        mlp.forward(&x, m).unwrap()
    );
}
