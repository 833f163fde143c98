//! Helpers shared by the integration tests: seeded random tensors and a central
//! finite-difference gradient checker.
#![allow(dead_code)] // each test binary uses a subset

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use tritter::model::SeededRng;

/// A `(dims)` f32 tensor with N(0, std²) entries from `seed`.
pub fn randn(seed: u64, dims: &[usize], std: f64) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(SeededRng::new(seed).normal_vec(n, std), dims, &Device::Cpu).unwrap()
}

/// The variable named `name` in `varmap`.
pub fn var(varmap: &VarMap, name: &str) -> Var {
    varmap
        .data()
        .lock()
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("no parameter {name}"))
        .clone()
}

/// `sum(out * r)` in f64 for a fixed random `r`: a scalar loss whose gradient w.r.t. `out`
/// is `r`, so every output element is checked.
pub fn weighted_sum(out: &Tensor, r: &Tensor) -> Tensor {
    (out.to_dtype(DType::F64).unwrap() * r.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
}

/// Result of one finite-difference check.
#[derive(Debug)]
pub struct GradCheck {
    /// `||g_autograd - g_fd|| / ||g_fd||` over the sampled coordinates.
    pub rel_err: f64,
    /// `||g_fd||` over the sampled coordinates (must be well above 0 for the check to mean
    /// anything).
    pub fd_norm: f64,
}

/// Compares candle's gradient of `loss()` w.r.t. `var` with central differences
/// `(L(v + eps) - L(v - eps)) / (2 eps)` at `samples` random coordinates.
pub fn check_grad(
    var: &Var,
    loss: &dyn Fn() -> Tensor,
    samples: usize,
    eps: f64,
    seed: u64,
) -> GradCheck {
    let n = var.as_tensor().elem_count() as u64;
    let mut rng = SeededRng::new(seed);
    let coords: Vec<usize> = (0..samples).map(|_| rng.below(n) as usize).collect();
    check_grad_at(var, loss, &coords, eps)
}

/// As [`check_grad`] at the given flat coordinates.
pub fn check_grad_at(
    var: &Var,
    loss: &dyn Fn() -> Tensor,
    coords: &[usize],
    eps: f64,
) -> GradCheck {
    let l = loss();
    let grads = l.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("the loss depends on the variable")
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let original = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let dims = var.as_tensor().dims().to_vec();
    let (mut diff2, mut ref2) = (0f64, 0f64);
    for &k in coords {
        let eval = |delta: f64| {
            let mut v = original.clone();
            v[k] = (f64::from(v[k]) + delta) as f32;
            var.set(&Tensor::from_vec(v, dims.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            loss().to_scalar::<f64>().unwrap()
        };
        // The actual perturbation after rounding to f32, so the quotient is exact in x.
        let up = (f64::from(original[k]) + eps) as f32;
        let down = (f64::from(original[k]) - eps) as f32;
        let fd = (eval(eps) - eval(-eps)) / (f64::from(up) - f64::from(down));
        diff2 += (g[k] - fd).powi(2);
        ref2 += fd * fd;
    }
    var.set(&Tensor::from_vec(original, dims.as_slice(), &Device::Cpu).unwrap())
        .unwrap();
    GradCheck {
        rel_err: diff2.sqrt() / ref2.sqrt().max(f64::MIN_POSITIVE),
        fd_norm: ref2.sqrt(),
    }
}

pub mod engine;
pub mod hf;
