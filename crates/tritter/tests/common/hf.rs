//! Helpers of the Hugging Face import tests: a seeded random BitNet checkpoint written in
//! the HF layout (`config.json` + safetensors, optionally sharded), and an independent,
//! plain re-implementation of transformers' BitNet forward with online quantization
//! (`AutoBitLinear`: `WeightQuant` + `ActQuant`), generic over f32/f64 so a test can
//! measure the reference's own rounding noise.

use std::collections::{BTreeMap, HashMap};
use std::ops::{Add, Div, Mul, Neg, Sub};
use std::path::Path;

use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use tritter::model::SeededRng;

/// The shapes and constants of a small HF BitNet config.
#[derive(Debug, Clone, Copy)]
pub struct Shapes {
    /// `vocab_size`.
    pub vocab: usize,
    /// `hidden_size` H.
    pub hidden: usize,
    /// `intermediate_size` I.
    pub inter: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `num_key_value_heads`.
    pub kv_heads: usize,
    /// `max_position_embeddings`.
    pub max_pos: usize,
    /// `rope_theta`.
    pub theta: f64,
    /// `rms_norm_eps`.
    pub eps: f64,
    /// `tie_word_embeddings`.
    pub tied: bool,
}

impl Shapes {
    /// GQA 4 query heads over 2 KV heads of D = 16, 2 layers, vocab 300, tied.
    pub fn small() -> Self {
        Shapes {
            vocab: 300,
            hidden: 64,
            inter: 96,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            max_pos: 64,
            theta: 10_000.0,
            eps: 1e-5,
            tied: true,
        }
    }

    /// Per-head width D.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// The `config.json` object transformers' `save_pretrained` writes for these shapes,
    /// with the online BitNet quantization config of the bf16 release.
    pub fn config_json(&self) -> Value {
        json!({
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.inter,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "hidden_act": "relu2",
            "max_position_embeddings": self.max_pos,
            "initializer_range": 0.02,
            "rms_norm_eps": self.eps,
            "rope_theta": self.theta,
            "rope_scaling": null,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": null,
            "tie_word_embeddings": self.tied,
            "torch_dtype": "bfloat16",
            "use_cache": true,
            "quantization_config": {
                "quant_method": "bitnet",
                "linear_class": "autobitlinear",
                "quantization_mode": "online"
            }
        })
    }
}

/// Tensors by HF name: shape and bf16 values.
pub type Weights = BTreeMap<String, (Vec<usize>, Vec<bf16>)>;

/// A seeded random model: linears N(0, 0.02²) (transformers' init), embedding (and
/// untied head) N(0, 1) so logits spread over several units, norms 1 + N(0, 0.2²) so every
/// norm weight matters.
pub fn random_weights(s: &Shapes, seed: u64) -> Weights {
    let mut rng = SeededRng::new(seed);
    let mut w = Weights::new();
    let mut put = |name: String, shape: Vec<usize>, std: f64, offset: f32| {
        let n = shape.iter().product();
        let v = rng
            .normal_vec(n, std)
            .into_iter()
            .map(|x| bf16::from_f32(x + offset))
            .collect();
        w.insert(name, (shape, v));
    };
    let (h, i, kv) = (s.hidden, s.inter, s.kv_heads * s.head_dim());
    put(
        "model.embed_tokens.weight".into(),
        vec![s.vocab, h],
        1.0,
        0.0,
    );
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", vec![h, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, h]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
        ] {
            put(format!("{p}.{name}.weight"), shape, 0.02, 0.0);
        }
        for (name, len) in [
            ("input_layernorm", h),
            ("post_attention_layernorm", h),
            ("self_attn.attn_sub_norm", h),
            ("mlp.ffn_sub_norm", i),
        ] {
            put(format!("{p}.{name}.weight"), vec![len], 0.2, 1.0);
        }
    }
    put("model.norm.weight".into(), vec![h], 0.2, 1.0);
    if !s.tied {
        put("lm_head.weight".into(), vec![s.vocab, h], 1.0, 0.0);
    }
    w
}

/// Little-endian bytes of bf16 values.
pub fn bf16_bytes(v: &[bf16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `config` and `weights` into `dir` (created) as HF does: `model.safetensors`, or
/// with `shards > 1` the tensors dealt round-robin into
/// `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
pub fn write_hf_dir(dir: &Path, config: &Value, weights: &Weights, shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    let bytes: Vec<(&String, &Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(n, (shape, v))| (n, shape, bf16_bytes(v)))
        .collect();
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    if shards <= 1 {
        write_views(&dir.join("model.safetensors"), &bytes, meta);
        return;
    }
    let mut map = serde_json::Map::new();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let part: Vec<_> = bytes
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == s)
            .map(|(_, t)| {
                map.insert(t.0.clone(), Value::String(file.clone()));
                (t.0, t.1, t.2.clone())
            })
            .collect();
        write_views(&dir.join(&file), &part, meta.clone());
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
}

/// One safetensors file of bf16 tensors.
pub fn write_views(
    path: &Path,
    tensors: &[(&String, &Vec<usize>, Vec<u8>)],
    meta: Option<HashMap<String, String>>,
) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, b)| {
            (
                (*n).clone(),
                TensorView::new(Dtype::BF16, (*shape).clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

/// The arithmetic the reference needs, for f32 and f64.
pub trait Real:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    /// From f64 (rounded for f32).
    fn of(x: f64) -> Self;
    /// To f64 (exact).
    fn f64(self) -> f64;
    /// Square root.
    fn sqrt(self) -> Self;
    /// e^x.
    fn exp(self) -> Self;
    /// Round half to even (`torch.round`).
    fn round_even(self) -> Self;
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        f64::from(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn round_even(self) -> Self {
        self.round_ties_even()
    }
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn round_even(self) -> Self {
        self.round_ties_even()
    }
}

fn clamp<T: Real>(x: T, lo: f64, hi: f64) -> T {
    let (lo, hi) = (T::of(lo), T::of(hi));
    if x < lo {
        lo
    } else if x > hi {
        hi
    } else {
        x
    }
}

/// A tensor in `T`, row-major.
fn values<T: Real>(w: &Weights, name: &str) -> Vec<T> {
    w.get(name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
        .1
        .iter()
        .map(|x| T::of(f64::from(x.to_f32())))
        .collect()
}

/// transformers' `WeightQuant`: `s = 1 / max(mean|W|, 1e-5)`, `round(W s).clamp(-1, 1) / s`.
fn weight_quant<T: Real>(w: &[T]) -> Vec<T> {
    let mean = w.iter().map(|x| x.f64().abs()).sum::<f64>() / w.len() as f64;
    let s = T::of(1.0) / T::of(mean.max(1e-5));
    w.iter()
        .map(|&x| clamp((x * s).round_even(), -1.0, 1.0) / s)
        .collect()
}

/// transformers' `ActQuant` on one row: `s = 127 / max(max|x|, 1e-5)`,
/// `round(x s).clamp(-128, 127) / s`.
fn act_quant<T: Real>(x: &[T]) -> Vec<T> {
    let amax = x.iter().map(|v| v.f64().abs()).fold(0.0, f64::max);
    let s = T::of(127.0) / T::of(amax.max(1e-5));
    x.iter()
        .map(|&v| clamp((v * s).round_even(), -128.0, 127.0) / s)
        .collect()
}

/// An online `AutoBitLinear`: rows `x` `(n, k)` times the quantized `W` `(o, k)`.
fn bitlinear<T: Real>(x: &[T], wq: &[T], k: usize) -> Vec<T> {
    let o = wq.len() / k;
    let mut out = Vec::with_capacity(x.len() / k * o);
    for row in x.chunks_exact(k) {
        let xq = act_quant(row);
        for wr in wq.chunks_exact(k) {
            out.push(
                xq.iter()
                    .zip(wr)
                    .fold(T::of(0.0), |acc, (&a, &b)| acc + a * b),
            );
        }
    }
    out
}

/// `BitNetRMSNorm` on every row: `w * x / sqrt(mean(x²) + eps)`.
fn rms_norm<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let ms = row.iter().fold(T::of(0.0), |a, &v| a + v * v) / T::of(d as f64);
        let r = (ms + T::of(eps)).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &g)| g * (v / r)));
    }
    out
}

/// Rotate-half RoPE on every head of `x` `(L, heads * D)` at positions `0..L`.
fn rope<T: Real>(x: &mut [T], heads: usize, d: usize, theta: f64) {
    let half = d / 2;
    for (p, row) in x.chunks_exact_mut(heads * d).enumerate() {
        for head in row.chunks_exact_mut(d) {
            for i in 0..half {
                let angle = p as f64 * theta.powf(-2.0 * i as f64 / d as f64);
                let (c, s) = (T::of(angle.cos()), T::of(angle.sin()));
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * c - b * s;
                head[i + half] = b * c + a * s;
            }
        }
    }
}

/// Logits `(L, V)` (as f64) of `ids` at positions `0..L`: transformers' BitNet forward with
/// online quantization, computed plainly in `T`.
pub fn reference_logits<T: Real>(s: &Shapes, w: &Weights, ids: &[u32]) -> Vec<f64> {
    let (h, d, l) = (s.hidden, s.head_dim(), ids.len());
    let (hq, hkv) = (s.heads, s.kv_heads);
    let embed = values::<T>(w, "model.embed_tokens.weight");
    let mut x: Vec<T> = ids
        .iter()
        .flat_map(|&id| embed[id as usize * h..(id as usize + 1) * h].to_vec())
        .collect();
    for layer in 0..s.layers {
        let p = |n: &str| format!("model.layers.{layer}.{n}.weight");
        let q_w = weight_quant(&values::<T>(w, &p("self_attn.q_proj")));
        let k_w = weight_quant(&values::<T>(w, &p("self_attn.k_proj")));
        let v_w = weight_quant(&values::<T>(w, &p("self_attn.v_proj")));
        let o_w = weight_quant(&values::<T>(w, &p("self_attn.o_proj")));
        let g_w = weight_quant(&values::<T>(w, &p("mlp.gate_proj")));
        let u_w = weight_quant(&values::<T>(w, &p("mlp.up_proj")));
        let d_w = weight_quant(&values::<T>(w, &p("mlp.down_proj")));

        let xn = rms_norm(&x, &values::<T>(w, &p("input_layernorm")), s.eps);
        let mut q = bitlinear(&xn, &q_w, h);
        let mut k = bitlinear(&xn, &k_w, h);
        let v = bitlinear(&xn, &v_w, h);
        rope(&mut q, hq, d, s.theta);
        rope(&mut k, hkv, d, s.theta);
        let scale = T::of(1.0 / (d as f64).sqrt());
        let mut att = vec![T::of(0.0); l * hq * d];
        for i in 0..l {
            for head in 0..hq {
                let g = head / (hq / hkv);
                let qv = &q[(i * hq + head) * d..][..d];
                let scores: Vec<T> = (0..=i)
                    .map(|j| {
                        let kv = &k[(j * hkv + g) * d..][..d];
                        qv.iter().zip(kv).fold(T::of(0.0), |a, (&x, &y)| a + x * y) * scale
                    })
                    .collect();
                let max = scores
                    .iter()
                    .fold(scores[0], |m, &v| if v > m { v } else { m });
                let e: Vec<T> = scores.iter().map(|&v| (v - max).exp()).collect();
                let sum = e.iter().fold(T::of(0.0), |a, &v| a + v);
                let out = &mut att[(i * hq + head) * d..][..d];
                for (j, &ej) in e.iter().enumerate() {
                    let vv = &v[(j * hkv + g) * d..][..d];
                    for (o, &vx) in out.iter_mut().zip(vv) {
                        *o = *o + ej / sum * vx;
                    }
                }
            }
        }
        let att = rms_norm(&att, &values::<T>(w, &p("self_attn.attn_sub_norm")), s.eps);
        let o = bitlinear(&att, &o_w, h);
        x.iter_mut().zip(&o).for_each(|(a, &b)| *a = *a + b);

        let xn = rms_norm(&x, &values::<T>(w, &p("post_attention_layernorm")), s.eps);
        let gate = bitlinear(&xn, &g_w, h);
        let up = bitlinear(&xn, &u_w, h);
        let m: Vec<T> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| {
                let r = if g > T::of(0.0) { g } else { T::of(0.0) };
                r * r * u
            })
            .collect();
        let m = rms_norm(&m, &values::<T>(w, &p("mlp.ffn_sub_norm")), s.eps);
        let down = bitlinear(&m, &d_w, s.inter);
        x.iter_mut().zip(&down).for_each(|(a, &b)| *a = *a + b);
    }
    let x = rms_norm(&x, &values::<T>(w, "model.norm.weight"), s.eps);
    let head = if s.tied {
        embed
    } else {
        values::<T>(w, "lm_head.weight")
    };
    let mut logits = Vec::with_capacity(l * s.vocab);
    for row in x.chunks_exact(h) {
        for e in head.chunks_exact(h) {
            logits.push(
                row.iter()
                    .zip(e)
                    .fold(T::of(0.0), |a, (&x, &y)| a + x * y)
                    .f64(),
            );
        }
    }
    logits
}
