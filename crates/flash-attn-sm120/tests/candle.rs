//! candle custom op (feature `candle`): `q.apply_op3(&k, &v, FlashAttn)` equals attention
//! written with plain candle ops (matmul, masked softmax), forward and gradients through
//! `Var` + `backward()`, for fixed and varlen batches with GQA; bf16 keeps its dtype; bad
//! shapes, dtypes and layouts are errors naming the numbers.
#![cfg(feature = "candle")]

use candle_core::{DType, Device, Tensor, Var, D};
use flash_attn_sm120::candle_ops::FlashAttn;
use flash_attn_sm120::{attention_fwd_ref, Heads, Mask, MaskInputs, Problem, Seqs};
use tritter_kernels_cuda::testing::random_f32;

/// Attention of packed `(total_q, Hq, D)` / `(total_k, Hkv, D)` tensors with candle ops,
/// one sequence at a time: `softmax(q k^T * scale + bias) v` with the mask as a `-inf` bias.
fn plain_attention(p: &Problem, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let (hq, hkv, d) = (p.heads.q, p.heads.kv, p.heads.dim);
    let group = hq / hkv;
    let mut outs = Vec::new();
    for b in 0..p.seqs.batch() {
        let (q0, lq, k0, lk) = p.seqs.seq(b);
        if lq == 0 {
            continue;
        }
        let qb = q.narrow(0, q0, lq).unwrap().transpose(0, 1).unwrap(); // (Hq, lq, D)
        let heads_of = |x: &Tensor| {
            // (lk, Hkv, D) -> (Hq, lk, D), each KV head repeated over its group.
            x.narrow(0, k0, lk)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .unsqueeze(1)
                .unwrap()
                .expand((hkv, group, lk, d))
                .unwrap()
                .reshape((hq, lk, d))
                .unwrap()
        };
        let (kb, vb) = (heads_of(k), heads_of(v));
        let bias: Vec<f32> = (0..lq)
            .flat_map(|i| (0..lk).map(move |j| (i, j)))
            .map(|(i, j)| {
                if p.visible(b, i, j) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let bias = Tensor::from_vec(bias, (1, lq, lk), &Device::Cpu).unwrap();
        let s = (qb
            .contiguous()
            .unwrap()
            .matmul(&kb.t().unwrap().contiguous().unwrap())
            .unwrap()
            * f64::from(p.heads.softmax_scale))
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
        let m = s.max_keepdim(D::Minus1).unwrap().detach();
        let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let o = probs.matmul(&vb.contiguous().unwrap()).unwrap(); // (Hq, lq, D)
        outs.push(o.transpose(0, 1).unwrap());
    }
    Tensor::cat(&outs, 0).unwrap()
}

/// Test problems: a fixed causal GQA batch with Lq < Lk and a varlen sliding-window batch.
fn problems() -> Vec<Problem> {
    vec![
        Problem::fixed(Heads::new(4, 2, 64), 2, 3, 5, Mask::CAUSAL),
        Problem {
            heads: Heads::new(2, 1, 64),
            seqs: Seqs::Varlen {
                cu_q: vec![0, 4, 5, 8],
                cu_k: vec![0, 6, 7, 10],
            },
            mask: Mask::sliding(3, 1),
            inputs: MaskInputs::default(),
        },
    ]
}

/// Random q, k, v tensors of the op's shapes for `p`.
fn tensors(p: &Problem, seed: u64) -> (Tensor, Tensor, Tensor) {
    let (qd, kd) = FlashAttn::new(p.clone()).expected_dims();
    let t = |n, dims: &[usize], s| Tensor::from_vec(random_f32(n, s), dims, &Device::Cpu).unwrap();
    (
        t(p.q_len(), &qd, seed),
        t(p.kv_len(), &kd, seed + 1),
        t(p.kv_len(), &kd, seed + 2),
    )
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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

/// Packs `(B, L, H, D)` into `(B * L, H, D)` (a no-op for varlen tensors).
fn packed(x: &Tensor) -> Tensor {
    match x.dims() {
        [b, l, h, d] => x.reshape((b * l, *h, *d)).unwrap(),
        _ => x.clone(),
    }
}

/// The op's forward equals plain candle attention and the reference, keeping q's shape.
#[test]
fn forward_matches_plain_candle() {
    for p in problems() {
        let (q, k, v) = tensors(&p, 1);
        let y = q.apply_op3(&k, &v, FlashAttn::new(p.clone())).unwrap();
        assert_eq!(y.dims(), q.dims());
        let want = plain_attention(&p, &packed(&q), &packed(&k), &packed(&v));
        let err = max_diff(&packed(&y), &want);
        assert!(err < 1e-5, "{p:?}: max error {err}");
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let r = attention_fwd_ref(&p, &flat(&q), &flat(&k), &flat(&v), None).unwrap();
        assert_eq!(flat(&y), r.out);
    }
}

/// Autograd through the op gives the same dq, dk, dv as autograd through plain candle
/// attention, for `loss = sum(c ∘ out)`.
#[test]
fn gradients_match_plain_candle() {
    for p in problems() {
        let (q, k, v) = tensors(&p, 11);
        let (q, k, v) = (
            Var::from_tensor(&q).unwrap(),
            Var::from_tensor(&k).unwrap(),
            Var::from_tensor(&v).unwrap(),
        );
        let c = Tensor::from_vec(random_f32(p.q_len(), 14), q.dims(), &Device::Cpu).unwrap();
        let y = q
            .as_tensor()
            .apply_op3(k.as_tensor(), v.as_tensor(), FlashAttn::new(p.clone()))
            .unwrap();
        let ga = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let yp = plain_attention(
            &p,
            &packed(q.as_tensor()),
            &packed(k.as_tensor()),
            &packed(v.as_tensor()),
        );
        let gb = (yp * packed(&c))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, x) in [("dq", &q), ("dk", &k), ("dv", &v)] {
            let a = ga.get(x.as_tensor()).expect("op gradient");
            let b = gb.get(x.as_tensor()).expect("plain gradient");
            assert_eq!(a.dims(), x.dims(), "{name}");
            let err = max_diff(a, b);
            assert!(err < 1e-4, "{name} of {p:?}: max error {err}");
        }
    }
}

/// bf16 and f16 inputs give an output of the same dtype, close to the f32 result of the
/// widened inputs.
#[test]
fn half_precision_keeps_its_dtype() {
    let p = problems().remove(0);
    let (q, k, v) = tensors(&p, 21);
    for dtype in [DType::BF16, DType::F16] {
        let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let y = cast(&q)
            .apply_op3(&cast(&k), &cast(&v), FlashAttn::new(p.clone()))
            .unwrap();
        assert_eq!(y.dtype(), dtype);
        let widen = |t: &Tensor| cast(t).to_dtype(DType::F32).unwrap();
        let want = widen(&q)
            .apply_op3(&widen(&k), &widen(&v), FlashAttn::new(p.clone()))
            .unwrap();
        let err = max_diff(&y.to_dtype(DType::F32).unwrap(), &want);
        assert!(err < 2e-2, "{dtype:?}: max error {err}");
    }
}

/// A wrong rank or shape, mixed dtypes, an unsupported dtype, a non-contiguous input and an
/// invalid problem are errors naming the numbers.
#[test]
fn bad_inputs_are_errors() {
    let p = problems().remove(0); // q (2, 3, 4, 64), k/v (2, 5, 2, 64)
    let (q, k, v) = tensors(&p, 31);
    let op = || FlashAttn::new(p.clone());
    let err = packed(&q).apply_op3(&k, &v, op()).unwrap_err().to_string();
    assert!(
        err.contains("[6, 4, 64]") && err.contains("[2, 3, 4, 64]"),
        "{err}"
    );
    let err = q
        .apply_op3(&k.narrow(1, 0, 4).unwrap().contiguous().unwrap(), &v, op())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("k has shape [2, 4, 2, 64]") && err.contains("[2, 5, 2, 64]"),
        "{err}"
    );
    let err = q
        .apply_op3(&k, &v.to_dtype(DType::BF16).unwrap(), op())
        .unwrap_err()
        .to_string();
    assert!(err.contains("BF16") && err.contains("F32"), "{err}");
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let err = f64s(&q)
        .apply_op3(&f64s(&k), &f64s(&v), op())
        .unwrap_err()
        .to_string();
    assert!(err.contains("F64") && err.contains("bf16"), "{err}");
    // (2, 5, 2, 64) viewed through a transpose of its two middle dims: not contiguous.
    let strided = Tensor::zeros((2, 2, 5, 64), DType::F32, &Device::Cpu)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let err = q.apply_op3(&strided, &v, op()).unwrap_err().to_string();
    assert!(err.contains("contiguous"), "{err}");
    let mut bad = p.clone();
    bad.mask.window = Some(0);
    let err = q
        .apply_op3(&k, &v, FlashAttn::new(bad))
        .unwrap_err()
        .to_string();
    assert!(err.contains("window is 0"), "{err}");
}
