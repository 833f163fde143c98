//! AdamW over the model's `candle_core::Var`s with two parameter groups, a warmup + cosine
//! learning-rate schedule and global-norm gradient clipping.
//!
//! Written over plain `Var`s (rather than `candle_nn::AdamW`) because candle-nn's optimizer
//! has one weight decay for all parameters and no access to its moments, which a
//! checkpoint must save for an exact resume.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Result, TritterError};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay beta1.
    pub beta1: f64,
    /// Second-moment decay beta2.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay of the decay group (matrices); norms and embeddings get 0.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// Whether the parameter `name` of shape `dims` is weight-decayed: matrices of the
/// BitLinear layers and an untied LM head are; norm weights (rank 1) and the embedding
/// table (`embed_tokens.*`, also the tied LM head) are not, as in GPT-2/llm.c practice.
pub fn decays(name: &str, dims: &[usize]) -> bool {
    dims.len() >= 2 && !name.starts_with("embed_tokens")
}

/// One parameter and its moments.
#[derive(Debug)]
struct ParamState {
    name: String,
    var: Var,
    /// First moment, f32, shape of the parameter.
    m: Tensor,
    /// Second moment, f32.
    v: Tensor,
    decay: bool,
}

/// AdamW with decoupled weight decay on the decay group only:
/// `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g²`,
/// `w -= lr (m̂ / (sqrt(v̂) + eps) + wd w)` with bias-corrected `m̂`, `v̂`.
/// Moments are f32 whatever the parameter dtype.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
    /// Updates applied so far (the bias-correction exponent).
    t: u64,
}

impl AdamW {
    /// An optimizer over `vars` (name, var), sorted by name for a deterministic order.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut vars = vars;
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = Tensor::zeros(var.dims(), DType::F32, var.device())?;
                Ok(ParamState {
                    decay: decays(&name, var.dims()),
                    name,
                    var,
                    m: zeros.clone(),
                    v: zeros,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            config,
            params,
            t: 0,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Updates applied so far.
    pub fn num_updates(&self) -> u64 {
        self.t
    }

    /// `(name, var, in the decay group)` of every parameter, in update order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &Var, bool)> {
        self.params
            .iter()
            .map(|p| (p.name.as_str(), &p.var, p.decay))
    }

    /// Applies one update with learning rate `lr`; `grads[i]` is the gradient of the
    /// `i`-th parameter of [`params`](Self::params) (`None`: no gradient, moments decay
    /// only as if it were zero).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(TritterError::ShapeMismatch {
                what: "gradient list".into(),
                actual: vec![grads.len()],
                expected: format!("one entry per parameter ({})", self.params.len()),
            });
        }
        self.t += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let bc1 = 1.0 - beta1.powi(self.t as i32);
        let bc2 = 1.0 - beta2.powi(self.t as i32);
        for (p, g) in self.params.iter_mut().zip(grads) {
            let g = match g {
                Some(g) => g.to_dtype(DType::F32)?,
                None => Tensor::zeros(p.var.dims(), DType::F32, p.var.device())?,
            };
            p.m = ((&p.m * beta1)? + (&g * (1.0 - beta1))?)?;
            p.v = ((&p.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&p.m / bc1)?;
            let v_hat = (&p.v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
            let w = p.var.as_tensor().to_dtype(DType::F32)?;
            let w = if p.decay && weight_decay > 0.0 {
                (&w * (1.0 - lr * weight_decay))?
            } else {
                w
            };
            let w = (w - (update * lr)?)?;
            p.var.set(&w.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// The moments `(m, v)` of parameter `name` (f32, the parameter's shape).
    pub fn moments(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(|p| (&p.m, &p.v))
    }

    /// Replaces the moments of `name` and the update count: the state of an optimizer that
    /// ran elsewhere (the GPU engine), so a checkpoint saves it and a resume continues it.
    /// Shapes are checked before anything is assigned.
    pub fn set_state(
        &mut self,
        moments: Vec<(String, Tensor, Tensor)>,
        updates: u64,
    ) -> Result<()> {
        for (name, m, v) in &moments {
            let p = self
                .params
                .iter()
                .find(|p| &p.name == name)
                .ok_or_else(|| {
                    TritterError::config(
                        "optimizer parameter",
                        name,
                        "a parameter of this optimizer",
                    )
                })?;
            for t in [m, v] {
                if t.dims() != p.var.dims() || t.dtype() != DType::F32 {
                    return Err(TritterError::ShapeMismatch {
                        what: format!("optimizer moment of {name}"),
                        actual: t.dims().to_vec(),
                        expected: format!("{:?} f32", p.var.dims()),
                    });
                }
            }
        }
        for (name, m, v) in moments {
            if let Some(p) = self.params.iter_mut().find(|p| p.name == name) {
                p.m = m;
                p.v = v;
            }
        }
        self.t = updates;
        Ok(())
    }

    /// Saves the moments (`m.{name}`, `v.{name}`, f32) and the update count to a
    /// safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for p in &self.params {
            tensors.insert(format!("m.{}", p.name), p.m.clone());
            tensors.insert(format!("v.{}", p.name), p.v.clone());
        }
        tensors.insert(
            "t".to_string(),
            Tensor::new(&[self.t as u32, (self.t >> 32) as u32], &Device::Cpu)?,
        );
        candle_core::safetensors::save(&tensors, path).map_err(|e| TritterError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Loads moments saved by [`save`](Self::save); every tensor is checked (presence,
    /// shape, dtype) before any is assigned.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = self
            .params
            .first()
            .map_or(Device::Cpu, |p| p.var.device().clone());
        let tensors = candle_core::safetensors::load(path, &device).map_err(|e| {
            TritterError::CorruptCheckpoint {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }
        })?;
        let mismatch = |detail: String| TritterError::CheckpointMismatch {
            path: path.to_path_buf(),
            detail,
        };
        let mut staged = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let mut pair = Vec::with_capacity(2);
            for key in [format!("m.{}", p.name), format!("v.{}", p.name)] {
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| mismatch(format!("optimizer moment {key} is missing")))?;
                if t.dims() != p.var.dims() || t.dtype() != DType::F32 {
                    return Err(mismatch(format!(
                        "optimizer moment {key} is {:?} {:?} but expected {:?} F32",
                        t.dims(),
                        t.dtype(),
                        p.var.dims()
                    )));
                }
                pair.push(t.clone());
            }
            staged.push(pair);
        }
        let expected = 2 * self.params.len() + 1;
        if tensors.len() != expected {
            return Err(mismatch(format!(
                "{} tensors but expected {expected} (m and v per parameter, and t)",
                tensors.len()
            )));
        }
        let t = tensors
            .get("t")
            .ok_or_else(|| mismatch("update count t is missing".into()))?
            .to_vec1::<u32>()?;
        let [lo, hi] = t[..] else {
            return Err(mismatch(format!(
                "t has {} entries but expected 2",
                t.len()
            )));
        };
        for (p, pair) in self.params.iter_mut().zip(staged) {
            let mut it = pair.into_iter();
            p.m = it.next().expect("two moments");
            p.v = it.next().expect("two moments");
        }
        self.t = u64::from(lo) | (u64::from(hi) << 32);
        Ok(())
    }
}

/// Warmup + cosine learning-rate schedule: linear from `peak / warmup` to `peak` over the
/// first `warmup` steps, then cosine decay to `peak * min_ratio` at step `total - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// Total steps of the run.
    pub total: u64,
    /// Final learning rate as a fraction of the peak.
    pub min_ratio: f64,
}

impl LrSchedule {
    /// The learning rate of (0-based) step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let min = self.peak * self.min_ratio;
        let span = self.total.saturating_sub(self.warmup + 1).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        min + (self.peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// Global L2 norm of `grads` (f32 accumulation in f64).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.iter().flatten() {
        sq += f64::from(
            g.to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()?,
        );
    }
    Ok(sq.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm` (`max_norm <= 0`: no
/// clipping). Returns the norm before clipping.
pub fn clip_global_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}
