//! Training checkpoints (DESIGN.md section 4): a directory `step-{step:08}` holding the
//! model checkpoint of [`crate::checkpoint`] (`model.safetensors`, `config.json`) plus
//! `optimizer.safetensors` (AdamW moments `m.{name}`, `v.{name}` and update count `t`) and
//! `trainer_state.json` ([`TrainerState`]: step, tokens, data cursor, options).
//!
//! Atomicity: everything is written into a temporary sibling directory, every file is
//! fsynced, then the directory is renamed into place and `latest` (a one-line file naming
//! the newest checkpoint) is replaced atomically. A crash or a full disk leaves either the
//! previous state or the new one; the temporary directory is removed on error.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::TrainOptions;
use crate::checkpoint::{read_json, write_atomic};
use crate::data::DataCursor;
use crate::{Result, TritterError, TritterModel};

/// Optimizer state file of a training checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer state file of a training checkpoint.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// The file in a checkpoints directory naming the newest checkpoint.
pub const LATEST_FILE: &str = "latest";
/// `format` value of [`TrainerState`].
const STATE_FORMAT: &str = "tritter-trainer-v1";

/// Everything besides weights and moments that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Target tokens trained on.
    pub tokens_seen: u64,
    /// Where the training data loader stands (epoch, position, shuffle seed, dataset id).
    pub cursor: DataCursor,
    /// The run's options (schedule, batch, seed...).
    pub options: TrainOptions,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format: String,
    #[serde(flatten)]
    state: TrainerState,
}

impl TrainerState {
    /// Reads `dir/trainer_state.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(TRAINER_STATE_FILE);
        let file: StateFile = read_json(&path, "trainer state")?;
        if file.format != STATE_FORMAT {
            return Err(TritterError::CheckpointMismatch {
                path,
                detail: format!("format is {:?} but expected {STATE_FORMAT:?}", file.format),
            });
        }
        Ok(file.state)
    }
}

/// The checkpoint directory `path` refers to: itself if it holds `trainer_state.json`,
/// else the one named by `path/latest` or `path/checkpoints/latest` (a run directory).
pub fn latest_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(TRAINER_STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    for dir in [path.to_path_buf(), path.join("checkpoints")] {
        let latest = dir.join(LATEST_FILE);
        if latest.is_file() {
            let name =
                std::fs::read_to_string(&latest).map_err(|e| TritterError::io(&latest, e))?;
            let ckpt = dir.join(name.trim());
            if ckpt.join(TRAINER_STATE_FILE).is_file() {
                return Ok(ckpt);
            }
            return Err(TritterError::CheckpointMismatch {
                path: latest,
                detail: format!(
                    "names {:?}, which holds no {TRAINER_STATE_FILE}",
                    name.trim()
                ),
            });
        }
    }
    Err(TritterError::Data {
        path: path.to_path_buf(),
        detail: format!(
            "no training checkpoint here; expected a step-* directory with {TRAINER_STATE_FILE}, \
             or a run directory with checkpoints/{LATEST_FILE}"
        ),
    })
}

/// The model checkpoint directory `path` refers to: itself if it holds a `config.json`
/// (a model or step-* directory), else [`latest_checkpoint`] (a run directory).
pub fn model_checkpoint_dir(path: &Path) -> Result<PathBuf> {
    if path.join(crate::checkpoint::CONFIG_FILE).is_file() {
        Ok(path.to_path_buf())
    } else {
        latest_checkpoint(path)
    }
}

/// The directory name of the checkpoint of step `step` (`step-00000042`).
pub(crate) fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint (see the module docs) and returns its directory.
pub(crate) fn save(
    checkpoints_dir: &Path,
    model: &TritterModel,
    optimizer: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    std::fs::create_dir_all(checkpoints_dir).map_err(|e| TritterError::io(checkpoints_dir, e))?;
    let name = step_dir_name(state.step);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = checkpoints_dir.join(format!(".tmp-{name}-{}-{n}", std::process::id()));
    let result = (|| -> Result<PathBuf> {
        model.save(&tmp)?;
        let opt_path = tmp.join(OPTIMIZER_FILE);
        optimizer.save(&opt_path)?;
        fsync(&opt_path)?;
        let json = serde_json::to_string_pretty(&StateFile {
            format: STATE_FORMAT.into(),
            state: state.clone(),
        })
        .map_err(|e| TritterError::ConfigJson {
            path: tmp.join(TRAINER_STATE_FILE),
            source: e,
        })?;
        write_atomic(&tmp.join(TRAINER_STATE_FILE), json.as_bytes())?;
        fsync(&tmp)?;
        let target = checkpoints_dir.join(&name);
        if target.exists() {
            // Re-saving a step (a resumed run reaching it again): move the old one aside
            // first, rename the new one in, then delete the old one.
            let old = checkpoints_dir.join(format!(".old-{name}-{}-{n}", std::process::id()));
            std::fs::rename(&target, &old).map_err(|e| TritterError::io(&target, e))?;
            std::fs::rename(&tmp, &target).map_err(|e| TritterError::io(&target, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &target).map_err(|e| TritterError::io(&target, e))?;
        }
        write_atomic(&checkpoints_dir.join(LATEST_FILE), name.as_bytes())?;
        fsync(checkpoints_dir)?;
        Ok(target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// fsyncs a file or (on unix) a directory.
fn fsync(path: &Path) -> Result<()> {
    if path.is_dir() && !cfg!(unix) {
        return Ok(());
    }
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| TritterError::io(path, e))
}
