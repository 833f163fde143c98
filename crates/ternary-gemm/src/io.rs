//! safetensors save/load of ternary matrices in the canonical packed layout.
//!
//! For a matrix named `name` the file holds:
//! * `{name}.packed`: U32 `(n_out, ceil(k_in / 16))`, canonical codes (DESIGN.md section 4);
//! * `{name}.scales`: F32 `(1,)` per tensor or `(n_out,)` per row;
//! * metadata `format = "tritter-ternary/1"`, `{name}.k_in`, `{name}.scale` =
//!   `per_tensor` | `per_row`.
//!
//! `k_in` is stored because the packed shape only gives it rounded up to 16. Writes go to a
//! temporary file that is renamed into place, so a crash never leaves a half-written file.
//! Loading validates everything `TernaryMatrix::from_packed` does (code 3, padding, scales).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::{ternary::words_per_row, Result};
use crate::{ScaleGranularity, TernaryError, TernaryMatrix, TernaryScales};

/// The `format` metadata value of files written by this crate.
pub const TERNARY_FORMAT_TAG: &str = "tritter-ternary/1";

fn fmt_err(msg: impl Into<String>) -> TernaryError {
    TernaryError::Format(msg.into())
}

/// Serializes named matrices into safetensors bytes.
pub fn ternary_to_safetensors(matrices: &[(&str, &TernaryMatrix)]) -> Result<Vec<u8>> {
    let mut meta = HashMap::from([("format".to_owned(), TERNARY_FORMAT_TAG.to_owned())]);
    let mut bufs: Vec<(String, Dtype, Vec<usize>, &[u8])> = Vec::new();
    for (name, m) in matrices {
        meta.insert(format!("{name}.k_in"), m.k_in().to_string());
        let scale = match m.scales().granularity() {
            ScaleGranularity::PerTensor => "per_tensor",
            ScaleGranularity::PerRow => "per_row",
        };
        meta.insert(format!("{name}.scale"), scale.to_owned());
        bufs.push((
            format!("{name}.packed"),
            Dtype::U32,
            vec![m.n_out(), m.words_per_row()],
            bytemuck::cast_slice(m.packed()),
        ));
        let scales = m.scales().as_slice();
        bufs.push((
            format!("{name}.scales"),
            Dtype::F32,
            vec![scales.len()],
            bytemuck::cast_slice(scales),
        ));
    }
    let views = bufs
        .iter()
        .map(|(n, dt, shape, data)| {
            TensorView::new(*dt, shape.clone(), data)
                .map(|v| (n.clone(), v))
                .map_err(|e| fmt_err(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, Some(meta)).map_err(|e| fmt_err(e.to_string()))
}

/// Writes named matrices to `path` atomically (temporary file + rename).
pub fn save_ternary_safetensors(
    path: impl AsRef<Path>,
    matrices: &[(&str, &TernaryMatrix)],
) -> Result<()> {
    let path = path.as_ref();
    let bytes = ternary_to_safetensors(matrices)?;
    let io = |source| TernaryError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, &bytes).map_err(io)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// Reads the matrix `name` from safetensors bytes written by [`ternary_to_safetensors`].
pub fn ternary_from_safetensors(bytes: &[u8], name: &str) -> Result<TernaryMatrix> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| fmt_err(e.to_string()))?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    match meta.get("format") {
        Some(tag) if tag == TERNARY_FORMAT_TAG => {}
        other => {
            return Err(fmt_err(format!(
                "metadata format is {other:?} but a ternary file needs {TERNARY_FORMAT_TAG:?}"
            )))
        }
    }
    let st = SafeTensors::deserialize(bytes).map_err(|e| fmt_err(e.to_string()))?;
    let k_in: usize = meta
        .get(&format!("{name}.k_in"))
        .ok_or_else(|| {
            fmt_err(format!(
                "no metadata {name}.k_in (is `{name}` in this file?)"
            ))
        })?
        .parse()
        .map_err(|e| fmt_err(format!("{name}.k_in: {e}")))?;
    let packed = st
        .tensor(&format!("{name}.packed"))
        .map_err(|e| fmt_err(format!("{name}.packed: {e}")))?;
    let scales = st
        .tensor(&format!("{name}.scales"))
        .map_err(|e| fmt_err(format!("{name}.scales: {e}")))?;
    if packed.dtype() != Dtype::U32 || scales.dtype() != Dtype::F32 {
        return Err(fmt_err(format!(
            "{name}: dtypes are {:?}/{:?} but must be U32 packed / F32 scales",
            packed.dtype(),
            scales.dtype()
        )));
    }
    let &[n_out, wpr] = packed.shape() else {
        return Err(fmt_err(format!(
            "{name}.packed has shape {:?}; expected [n_out, words]",
            packed.shape()
        )));
    };
    if wpr != words_per_row(k_in) {
        return Err(fmt_err(format!(
            "{name}.packed has {wpr} words per row but k_in = {k_in} needs {}",
            words_per_row(k_in)
        )));
    }
    let words: Vec<u32> = packed
        .data()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let g: Vec<f32> = scales
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let scales = match meta.get(&format!("{name}.scale")).map(String::as_str) {
        Some("per_tensor") if g.len() == 1 => TernaryScales::PerTensor(g[0]),
        Some("per_row") => TernaryScales::PerRow(g),
        other => {
            return Err(fmt_err(format!(
                "{name}.scale is {other:?} with {} scales; expected per_tensor with 1 or per_row with n_out",
                g.len()
            )))
        }
    };
    TernaryMatrix::from_packed(n_out, k_in, words, scales)
}

/// Reads the matrix `name` from a file written by [`save_ternary_safetensors`].
pub fn load_ternary_safetensors(path: impl AsRef<Path>, name: &str) -> Result<TernaryMatrix> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| TernaryError::Io {
        path: path.display().to_string(),
        source,
    })?;
    ternary_from_safetensors(&bytes, name)
}
