//! Atomic file writes: a crash never leaves a half-written tokenizer file (DESIGN.md section 4).

use std::io::Write;
use std::path::Path;

use super::error::{Result, TokenizerError};

/// Writes `bytes` to `<path>.tmp`, syncs it and renames it over `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let io = |op: &'static str, p: &Path| {
        let path = p.to_owned();
        move |source| TokenizerError::Io { op, path, source }
    };
    let mut file = std::fs::File::create(tmp).map_err(io("create", tmp))?;
    file.write_all(bytes).map_err(io("write", tmp))?;
    file.sync_all().map_err(io("sync", tmp))?;
    drop(file);
    std::fs::rename(tmp, path).map_err(io("rename to", path))
}
