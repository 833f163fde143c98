//! The safetensors weights of a Hugging Face BitNet checkpoint: which files, which names,
//! dtype and shape checks, and the quantization transformers' online `AutoBitLinear`
//! applies on every forward ([`hf_absmean_quantize`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use ternary_gemm::{TernaryMatrix, TernaryScales};

use crate::engine::checkpoint::{TensorKind, TensorSpec};
use crate::{Result, TritterError};

/// The weights of a single-file checkpoint.
pub const HF_WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint: `{"weight_map": {tensor name: shard file}}`.
pub const HF_WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// The floor transformers' `WeightQuant` puts under `mean|W|` (`clamp_(min=1e-5)`).
pub const HF_WEIGHT_SCALE_FLOOR: f32 = 1e-5;

/// What is wrong with a tensor of a Hugging Face checkpoint ([`TritterError::HfTensor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfTensorProblem {
    /// The config implies it, no file holds it.
    Missing,
    /// A file holds it, the model has no such tensor.
    Unexpected,
    /// Two shards hold it.
    Duplicate,
    /// Not BF16, F16 or F32.
    UnsupportedDtype,
    /// Dims differ from what the config implies.
    WrongShape,
    /// Holds NaN or an infinity.
    NonFinite,
}

impl std::fmt::Display for HfTensorProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HfTensorProblem::Missing => "missing",
            HfTensorProblem::Unexpected => "not part of the model",
            HfTensorProblem::Duplicate => "in two shards",
            HfTensorProblem::UnsupportedDtype => "unsupported dtype",
            HfTensorProblem::WrongShape => "wrong shape",
            HfTensorProblem::NonFinite => "non-finite value",
        })
    }
}

/// The Hugging Face name of a tensor of the inference checkpoint: `model.` before
/// everything but `lm_head.weight`, and `self_attn` for `attn`
/// (`layers.0.attn.q_proj.weight` -> `model.layers.0.self_attn.q_proj.weight`).
pub fn hf_tensor_name(name: &str) -> String {
    if name.starts_with("lm_head.") {
        return name.to_string();
    }
    format!("model.{}", name.replacen(".attn.", ".self_attn.", 1))
}

/// Tensors a checkpoint may hold that the import skips: RoPE's `inv_freq` buffers (the
/// engine computes its own) and, with tied embeddings, `lm_head.weight` (transformers ties
/// it to the embedding after loading, so the file's copy is never used).
fn ignored(name: &str, tied: bool) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight")
}

/// BitNet b1.58 weight quantization exactly as transformers' online `AutoBitLinear`
/// computes it on every forward (`WeightQuant`): in f32, `s = 1 / max(mean|W|, 1e-5)`,
/// `Wq = clamp(round(W * s), -1, 1)` with round half to even (`torch.round`), dequantized
/// `Wq / s`. `w` is `(n_out, k_in)` row-major; the result has one per-tensor scale
/// `max(mean|W|, 1e-5)`.
///
/// Why not `ternary_gemm::absmean_quantize`: it divides by `mean|W| + 1e-5` and rounds half
/// away from zero (DESIGN.md section 4), so its ±0.5 thresholds sit `1e-5 / mean|W|`
/// relative higher (5e-4 for a fresh `initializer_range = 0.02` init; 1e-5 for the 2B4T
/// weights, whose mean is near 1) and an exact tie rounds the other way. A weight between
/// the two thresholds gets 0 there and ±1 in transformers. On bf16 weights, whose grid is
/// coarser than that gap, this is rare (none in a (256, 256) N(0, 0.02²) test matrix) but
/// possible; this function gives transformers' codes always. The mean is summed in f64 and
/// rounded to f32 (torch sums in f32 in its own order, so the two scales may differ in the
/// last bit, which moves a code only for a weight within one f32 ulp of a threshold).
///
/// Errors: a NaN/Inf weight (its row and column), or `w.len() != n_out * k_in`.
pub fn hf_absmean_quantize(w: &[f32], n_out: usize, k_in: usize) -> Result<TernaryMatrix> {
    if w.len() != n_out * k_in || n_out == 0 || k_in == 0 {
        return Err(TritterError::ShapeMismatch {
            what: "weights to quantize".into(),
            actual: vec![w.len()],
            expected: format!("n_out * k_in = {n_out} * {k_in} values, both > 0"),
        });
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(TritterError::NonFinite {
            what: format!(
                "weights ({n_out}, {k_in}), row {} column {}",
                i / k_in,
                i % k_in
            ),
            index: i,
            value: w[i].to_string(),
        });
    }
    let sum: f64 = w.iter().map(|v| f64::from(v.abs())).sum();
    let gamma = ((sum / w.len() as f64) as f32).max(HF_WEIGHT_SCALE_FLOOR);
    let s = 1.0f32 / gamma;
    let codes: Vec<i8> = w
        .iter()
        .map(|&v| (v * s).round_ties_even().clamp(-1.0, 1.0) as i8)
        .collect();
    Ok(TernaryMatrix::from_values(
        n_out,
        k_in,
        &codes,
        TernaryScales::PerTensor(gamma),
    )?)
}

/// Imported tensors by inference-checkpoint name: quantized linears and bf16 rest.
pub(crate) struct ImportedTensors {
    pub ternary: BTreeMap<String, TernaryMatrix>,
    pub dense: BTreeMap<String, Vec<bf16>>,
}

/// One converted tensor.
enum Converted {
    Ternary(TernaryMatrix),
    Dense(Vec<bf16>),
}

/// The safetensors files of `dir` and, for a sharded checkpoint, the tensors the index
/// assigns to each.
fn weight_files(dir: &Path) -> Result<Vec<(PathBuf, Option<BTreeSet<String>>)>> {
    let index = dir.join(HF_WEIGHTS_INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| TritterError::io(&index, e))?;
        let bad = |actual: String| TritterError::HfConfig {
            path: index.clone(),
            key: "weight_map".into(),
            actual,
            expected: "an object mapping every tensor name to a shard file name in this directory"
                .into(),
        };
        let json: Value =
            serde_json::from_str(&text).map_err(|source| TritterError::ConfigJson {
                path: index.clone(),
                source,
            })?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                bad(json
                    .get("weight_map")
                    .map_or("missing".into(), Value::to_string))
            })?;
        let mut shards: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .filter(|f| !f.is_empty() && !f.contains(['/', '\\']))
                .ok_or_else(|| bad(format!("{name:?} -> {file}")))?;
            shards
                .entry(file.to_string())
                .or_default()
                .insert(name.clone());
        }
        return Ok(shards
            .into_iter()
            .map(|(file, names)| (dir.join(file), Some(names)))
            .collect());
    }
    let single = dir.join(HF_WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![(single, None)]);
    }
    Err(TritterError::HfTensor {
        path: dir.to_path_buf(),
        tensor: "(all)".into(),
        problem: HfTensorProblem::Missing,
        actual: "no weights file".into(),
        expected: format!("{HF_WEIGHTS_FILE} or {HF_WEIGHTS_INDEX_FILE} with its shards"),
    })
}

/// Reads every tensor `expected` lists (inference-checkpoint names and shapes) from the
/// safetensors files of `dir`, quantizing the ternary ones with [`hf_absmean_quantize`]
/// and rounding the others to bf16 (exact for a bf16 checkpoint). Shards are read one at a
/// time, their tensors converted in parallel.
pub(crate) fn read_weights(
    dir: &Path,
    expected: &[TensorSpec],
    tied: bool,
) -> Result<ImportedTensors> {
    let by_hf_name: BTreeMap<String, &TensorSpec> = expected
        .iter()
        .map(|s| (hf_tensor_name(&s.name), s))
        .collect();
    let mut out = ImportedTensors {
        ternary: BTreeMap::new(),
        dense: BTreeMap::new(),
    };
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (path, assigned) in weight_files(dir)? {
        let bytes = std::fs::read(&path).map_err(|e| TritterError::io(&path, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| TritterError::CorruptCheckpoint {
            path: path.clone(),
            detail: format!("not a safetensors file: {e}"),
        })?;
        let names: BTreeSet<String> = st.names().into_iter().map(str::to_string).collect();
        if let Some(assigned) = &assigned {
            if let Some(name) = assigned.iter().find(|n| !names.contains(*n)) {
                return Err(tensor_err(
                    &path,
                    name,
                    HfTensorProblem::Missing,
                    "absent from the shard",
                    format!("it in the shard, as {HF_WEIGHTS_INDEX_FILE} says"),
                ));
            }
        }
        let mut jobs: Vec<(&TensorSpec, String, TensorView<'_>)> = Vec::new();
        for name in &names {
            if let Some(first) = seen.insert(name.clone(), path.clone()) {
                return Err(tensor_err(
                    &path,
                    name,
                    HfTensorProblem::Duplicate,
                    format!("also in {}", first.display()),
                    "each tensor in one shard",
                ));
            }
            if ignored(name, tied) {
                continue;
            }
            let Some(spec) = by_hf_name.get(name) else {
                return Err(tensor_err(
                    &path,
                    name,
                    HfTensorProblem::Unexpected,
                    "a tensor this model does not have",
                    "only the tensors config.json implies (tie_word_embeddings, num_hidden_layers, ...)",
                ));
            };
            let view = st
                .tensor(name)
                .map_err(|e| TritterError::CorruptCheckpoint {
                    path: path.clone(),
                    detail: format!("tensor {name}: {e}"),
                })?;
            jobs.push((spec, name.clone(), view));
        }
        let converted = jobs
            .par_iter()
            .map(|(spec, name, view)| convert(&path, name, spec, view))
            .collect::<Result<Vec<_>>>()?;
        for ((spec, _, _), c) in jobs.iter().zip(converted) {
            match c {
                Converted::Ternary(m) => out.ternary.insert(spec.name.clone(), m),
                Converted::Dense(v) => {
                    out.dense.insert(spec.name.clone(), v);
                    None
                }
            };
        }
    }
    for (hf_name, spec) in &by_hf_name {
        if !seen.contains_key(hf_name) {
            return Err(tensor_err(
                dir,
                hf_name,
                HfTensorProblem::Missing,
                "no file holds it",
                format!(
                    "{} of shape {:?} (implied by config.json{})",
                    "BF16, F16 or F32",
                    spec.shape,
                    if spec.name == "lm_head.weight" {
                        "; tie_word_embeddings is false"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    Ok(out)
}

fn tensor_err(
    path: &Path,
    tensor: &str,
    problem: HfTensorProblem,
    actual: impl ToString,
    expected: impl ToString,
) -> TritterError {
    TritterError::HfTensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        problem,
        actual: actual.to_string(),
        expected: expected.to_string(),
    }
}

/// One tensor: dtype and shape checked, values finite, then quantized or kept as bf16.
fn convert(path: &Path, name: &str, spec: &TensorSpec, view: &TensorView<'_>) -> Result<Converted> {
    if view.shape() != spec.shape.as_slice() {
        return Err(tensor_err(
            path,
            name,
            HfTensorProblem::WrongShape,
            format!("{:?}", view.shape()),
            format!("{:?} (implied by config.json)", spec.shape),
        ));
    }
    let data = view.data();
    let nonfinite = |i: usize, v: f32| {
        tensor_err(
            path,
            name,
            HfTensorProblem::NonFinite,
            format!(
                "{v} at flat index {i} (row {}, column {})",
                i / spec.shape[spec.shape.len() - 1],
                i % spec.shape[spec.shape.len() - 1]
            ),
            "finite values",
        )
    };
    match spec.kind {
        TensorKind::Ternary => {
            let w: Vec<f32> = match view.dtype() {
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                other => return Err(unsupported(path, name, other)),
            };
            if let Some(i) = w.iter().position(|v| !v.is_finite()) {
                return Err(nonfinite(i, w[i]));
            }
            let m = hf_absmean_quantize(&w, spec.shape[0], spec.shape[1])?;
            Ok(Converted::Ternary(m))
        }
        TensorKind::Bf16 => {
            let v: Vec<bf16> = match view.dtype() {
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| bf16::from_f32(f16::from_le_bytes([c[0], c[1]]).to_f32()))
                    .collect(),
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
                other => return Err(unsupported(path, name, other)),
            };
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(nonfinite(i, v[i].to_f32()));
            }
            Ok(Converted::Dense(v))
        }
    }
}

fn unsupported(path: &Path, name: &str, dtype: Dtype) -> TritterError {
    tensor_err(
        path,
        name,
        HfTensorProblem::UnsupportedDtype,
        format!("{dtype:?}"),
        "BF16, F16 or F32",
    )
}
