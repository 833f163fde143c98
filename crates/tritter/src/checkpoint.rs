//! Checkpoints: a directory holding `model.safetensors` (every parameter under its
//! documented name, see [`crate::model`]) and `config.json` (DESIGN.md section 4).
//!
//! * Writes are atomic per file: bytes go to a temporary name in the same directory, are
//!   fsynced, then renamed over the target (and the directory is fsynced), so a crash
//!   leaves the old file or the new one, never half of one.
//! * The safetensors header carries `format` ([`FORMAT_TAG`]), `dtype`, the `config` JSON
//!   and a `checksum` (FNV-1a 64 over names, dtypes, shapes and data). A load checks all
//!   of them, so a torn pair (new weights, old `config.json`), a flipped bit or a truncated
//!   file is reported instead of loaded.
//! * Loads check every tensor (presence, shape, dtype) before assigning any, so a failed
//!   load leaves the model as it was. Save then load is bit-exact.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::config::TritterConfig;
use crate::model::{fnv1a, InitMode, TritterModel, FNV_OFFSET};
use crate::{Result, TritterError};

/// The tensor file of a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The config file of a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// The `format` metadata value of this layout (f32/bf16 shadow weights, names of
/// [`crate::model`]).
pub const FORMAT_TAG: &str = "tritter-reference-v1";

impl TritterModel {
    /// Saves the parameters and config into directory `dir` (created if missing).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| TritterError::io(dir, e))?;
        let mut named = Vec::new();
        {
            let data = self
                .varmap()
                .data()
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (name, var) in data.iter() {
                let t = var.as_tensor();
                named.push((name.clone(), t.dims().to_vec(), tensor_bytes(t)?));
            }
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let st_dtype = st_dtype(self.dtype())?;
        let checksum = named.iter().fold(FNV_OFFSET, |h, (n, shape, bytes)| {
            entry_hash(h, n, st_dtype, shape, bytes)
        });
        let config_json = serde_json::to_string(self.config()).expect("a config serializes");
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT_TAG.to_string()),
            ("dtype".to_string(), dtype_name(self.dtype()).to_string()),
            ("config".to_string(), config_json),
            ("checksum".to_string(), format!("{checksum:016x}")),
        ]);
        let views = named
            .iter()
            .map(|(n, shape, bytes)| {
                TensorView::new(st_dtype, shape.clone(), bytes).map(|v| (n.as_str(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| corrupt(dir.join(WEIGHTS_FILE), e))?;
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| corrupt(dir.join(WEIGHTS_FILE), e))?;
        write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
        write_atomic(&dir.join(CONFIG_FILE), self.config().to_json().as_bytes())?;
        sync_dir(dir)
    }

    /// Loads a checkpoint directory into a new model on `device`, in the dtype it was saved
    /// in.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = TritterConfig::load(dir.join(CONFIG_FILE))?;
        let file = read_weights(dir)?;
        let st = parse(&file, &dir.join(WEIGHTS_FILE))?;
        let dtype = st.check_config(&config)?;
        let model = TritterModel::build(&config, dtype, device, InitMode::Zeros)?;
        model.assign(&st)?;
        Ok(model)
    }

    /// Loads a checkpoint's parameters into this model; the checkpoint's config and dtype
    /// must equal the model's. Nothing is assigned unless every tensor checks out.
    pub fn load_weights(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let config = TritterConfig::load(dir.join(CONFIG_FILE))?;
        if &config != self.config() {
            return Err(TritterError::CheckpointMismatch {
                path: dir.join(CONFIG_FILE),
                detail: format!(
                    "config differs from the model's: {}",
                    config_diff(&config, self.config())
                ),
            });
        }
        let file = read_weights(dir)?;
        let st = parse(&file, &dir.join(WEIGHTS_FILE))?;
        let dtype = st.check_config(&config)?;
        if dtype != self.dtype() {
            return Err(TritterError::CheckpointMismatch {
                path: st.path.clone(),
                detail: format!(
                    "weights are {} but the model is {}; build the model with the checkpoint's dtype",
                    dtype_name(dtype),
                    dtype_name(self.dtype())
                ),
            });
        }
        self.assign(&st)
    }

    /// Checks every tensor of `st` against the model's variables, then assigns them all.
    fn assign(&self, st: &Parsed) -> Result<()> {
        let data = self
            .varmap()
            .data()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mismatch = |detail: String| TritterError::CheckpointMismatch {
            path: st.path.clone(),
            detail,
        };
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut staged = Vec::with_capacity(names.len());
        for name in names {
            let var = &data[name];
            let view = st.tensors.tensor(name).map_err(|_| {
                mismatch(format!(
                    "tensor {name} is missing (expected shape {:?})",
                    var.dims()
                ))
            })?;
            if view.shape() != var.dims() {
                return Err(mismatch(format!(
                    "tensor {name} has shape {:?} but the model expects {:?}",
                    view.shape(),
                    var.dims()
                )));
            }
            if view.dtype() != st_dtype(var.dtype())? {
                return Err(mismatch(format!(
                    "tensor {name} has dtype {:?} but the model expects {:?}",
                    view.dtype(),
                    var.dtype()
                )));
            }
            let t = tensor_from_bytes(view.data(), var.dtype(), view.shape(), var.device())?;
            staged.push((var, t));
        }
        if let Some(extra) = st
            .tensors
            .names()
            .into_iter()
            .find(|n| !data.contains_key(*n))
        {
            return Err(mismatch(format!(
                "tensor {extra} is not a parameter of this model"
            )));
        }
        for (var, t) in staged {
            var.set(&t)?;
        }
        Ok(())
    }
}

/// A parsed, checksum-verified weights file.
struct Parsed<'a> {
    path: PathBuf,
    tensors: SafeTensors<'a>,
    metadata: HashMap<String, String>,
}

impl Parsed<'_> {
    /// Verifies the format tag and that the embedded config equals `config`; returns the
    /// stored dtype.
    fn check_config(&self, config: &TritterConfig) -> Result<DType> {
        let get = |key: &str| {
            self.metadata
                .get(key)
                .ok_or_else(|| TritterError::CheckpointMismatch {
                    path: self.path.clone(),
                    detail: format!(
                        "metadata key {key:?} is missing; not a {FORMAT_TAG} checkpoint"
                    ),
                })
        };
        let format = get("format")?;
        if format != FORMAT_TAG {
            return Err(TritterError::CheckpointMismatch {
                path: self.path.clone(),
                detail: format!("format is {format:?} but expected {FORMAT_TAG:?}"),
            });
        }
        let embedded: TritterConfig =
            serde_json::from_str(get("config")?).map_err(|e| TritterError::CorruptCheckpoint {
                path: self.path.clone(),
                detail: format!("embedded config does not parse: {e}"),
            })?;
        if &embedded != config {
            return Err(TritterError::CheckpointMismatch {
                path: self.path.clone(),
                detail: format!(
                    "{CONFIG_FILE} differs from the config saved with the weights (a torn or mixed checkpoint): {}",
                    config_diff(config, &embedded)
                ),
            });
        }
        match get("dtype")?.as_str() {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            other => Err(TritterError::CheckpointMismatch {
                path: self.path.clone(),
                detail: format!("dtype is {other:?} but expected \"f32\" or \"bf16\""),
            }),
        }
    }
}

fn read_weights(dir: &Path) -> Result<Vec<u8>> {
    let path = dir.join(WEIGHTS_FILE);
    std::fs::read(&path).map_err(|e| TritterError::io(path, e))
}

/// Parses the safetensors header and verifies the checksum over all tensors.
fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<Parsed<'a>> {
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| corrupt(path.to_path_buf(), e))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| corrupt(path.to_path_buf(), e))?;
    let stored = metadata
        .get("checksum")
        .ok_or_else(|| TritterError::CorruptCheckpoint {
            path: path.to_path_buf(),
            detail: "no checksum in the header".into(),
        })?;
    let mut names = tensors.names();
    names.sort();
    let mut h = FNV_OFFSET;
    for name in names {
        let v = tensors
            .tensor(name)
            .map_err(|e| corrupt(path.to_path_buf(), e))?;
        h = entry_hash(h, name, v.dtype(), v.shape(), v.data());
    }
    let actual = format!("{h:016x}");
    if &actual != stored {
        return Err(TritterError::CorruptCheckpoint {
            path: path.to_path_buf(),
            detail: format!("checksum is {actual} but the header records {stored}"),
        });
    }
    Ok(Parsed {
        path: path.to_path_buf(),
        tensors,
        metadata,
    })
}

fn corrupt(path: PathBuf, e: impl std::fmt::Display) -> TritterError {
    TritterError::CorruptCheckpoint {
        path,
        detail: e.to_string(),
    }
}

/// FNV-1a over one tensor entry: name, dtype, rank, dims, data.
fn entry_hash(mut h: u64, name: &str, dtype: Dtype, shape: &[usize], data: &[u8]) -> u64 {
    h = fnv1a(name.as_bytes(), h);
    h = fnv1a(format!("{dtype:?}").as_bytes(), h);
    h = fnv1a(&(shape.len() as u64).to_le_bytes(), h);
    for &d in shape {
        h = fnv1a(&(d as u64).to_le_bytes(), h);
    }
    fnv1a(data, h)
}

/// The first top-level field where two configs differ, as `field: a vs b`.
fn config_diff(a: &TritterConfig, b: &TritterConfig) -> String {
    let (va, vb) = (
        serde_json::to_value(a).expect("a config serializes"),
        serde_json::to_value(b).expect("a config serializes"),
    );
    if let (Some(ma), Some(mb)) = (va.as_object(), vb.as_object()) {
        for (k, x) in ma {
            let y = mb.get(k).cloned().unwrap_or_default();
            if *x != y {
                return format!("{k} is {x} but expected {y}");
            }
        }
    }
    "configs differ".into()
}

fn st_dtype(dtype: DType) -> Result<Dtype> {
    match dtype {
        DType::F32 => Ok(Dtype::F32),
        DType::BF16 => Ok(Dtype::BF16),
        other => Err(TritterError::DTypeMismatch {
            what: "checkpoint tensor".into(),
            actual: other,
            expected: "f32 or bf16".into(),
        }),
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// Little-endian bytes of a tensor (f32 or bf16), exactly as stored in memory.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<bf16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        other => {
            return Err(TritterError::DTypeMismatch {
                what: "checkpoint tensor".into(),
                actual: other,
                expected: "f32 or bf16".into(),
            })
        }
    })
}

fn tensor_from_bytes(
    bytes: &[u8],
    dtype: DType,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    Ok(match dtype {
        DType::F32 => {
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(v, shape, device)?
        }
        _ => {
            let v: Vec<bf16> = bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect();
            Tensor::from_vec(v, shape, device)?
        }
    })
}

/// Reads and parses the JSON file `path` of a checkpoint: an I/O error names the path, a
/// parse error is [`TritterError::CorruptCheckpoint`] ("{what} does not parse: ...").
/// Shared by the trainer state and the inference manifest.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TritterError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TritterError::CorruptCheckpoint {
        path: path.to_path_buf(),
        detail: format!("{what} does not parse: {e}"),
    })
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync,
/// rename. The temporary file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "checkpoint".into(), |n| n.to_string_lossy().into_owned());
    // Unique per process and call, so concurrent saves never share a temporary file.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        TritterError::io(path, e)
    })
}

/// fsyncs a directory so the renames in it are durable (a no-op where directories cannot
/// be opened, e.g. Windows).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| TritterError::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
