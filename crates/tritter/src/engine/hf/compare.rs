//! Logits of a peer implementation (`benches/peers/hf_bitnet_reference.py logits`) and
//! their comparison with the engine's: max and mean absolute difference, top-1 agreement.
//!
//! Two file formats, chosen by extension:
//! * `.json`: `{"ids": [..L], "logits": [[..V] x L], ...}` (other keys such as `impl`,
//!   `dtype` are kept as [`ReferenceLogits::meta`]);
//! * `.npy`: a little-endian f32 or f64 array `(L, V)` or `(1, L, V)` in C order (NumPy
//!   format 1.0-3.0); it carries no ids, so the caller supplies them.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::{Result, TritterError};

/// Logits `(L, V)` row-major for the token ids `ids` `(L,)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceLogits {
    /// The input ids, when the file records them (`.json`).
    pub ids: Option<Vec<u32>>,
    /// Positions `L`.
    pub positions: usize,
    /// Vocabulary `V`.
    pub vocab_size: usize,
    /// `(L, V)` row-major.
    pub logits: Vec<f32>,
    /// Other top-level JSON keys (`impl`, `dtype`, `device`, ...).
    pub meta: BTreeMap<String, Value>,
}

fn bad(path: &Path, detail: impl ToString) -> TritterError {
    TritterError::Data {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

impl ReferenceLogits {
    /// Logits of `ids` `(L,)` from a row-major `(L, V)` buffer.
    pub fn new(ids: Vec<u32>, vocab_size: usize, logits: Vec<f32>) -> Result<Self> {
        if vocab_size == 0 || logits.len() != ids.len() * vocab_size {
            return Err(TritterError::ShapeMismatch {
                what: "logits".into(),
                actual: vec![logits.len()],
                expected: format!("(L, V) = ({}, {vocab_size}) values", ids.len()),
            });
        }
        Ok(ReferenceLogits {
            positions: ids.len(),
            ids: Some(ids),
            vocab_size,
            logits,
            meta: BTreeMap::new(),
        })
    }

    /// Reads a `.json` or `.npy` file (module docs).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| TritterError::io(path, e))?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Self::from_json_bytes(&bytes, path),
            Some("npy") => Self::from_npy_bytes(&bytes, path),
            other => Err(bad(
                path,
                format!("extension is {other:?}; expected .json or .npy"),
            )),
        }
    }

    fn from_json_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let Value::Object(mut obj) =
            serde_json::from_slice(bytes).map_err(|e| bad(path, format!("not JSON: {e}")))?
        else {
            return Err(bad(path, "top level is not an object"));
        };
        let ids = match obj.remove("ids") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| bad(path, "ids holds a value that is not a token id"))?,
            ),
            Some(other) => return Err(bad(path, format!("ids is {other}; expected a list"))),
        };
        let rows = match obj.remove("logits") {
            Some(Value::Array(rows)) => rows,
            _ => return Err(bad(path, "logits is missing; expected a list of rows")),
        };
        let vocab_size = rows.first().and_then(Value::as_array).map_or(0, Vec::len);
        let mut logits = Vec::with_capacity(rows.len() * vocab_size);
        for (r, row) in rows.iter().enumerate() {
            let row = row
                .as_array()
                .filter(|a| a.len() == vocab_size)
                .ok_or_else(|| {
                    bad(
                        path,
                        format!("logits row {r} is not a list of {vocab_size} numbers"),
                    )
                })?;
            for v in row {
                logits.push(v.as_f64().ok_or_else(|| {
                    bad(path, format!("logits row {r} holds {v}; expected numbers"))
                })? as f32);
            }
        }
        if let Some(ids) = &ids {
            if ids.len() != rows.len() {
                return Err(bad(
                    path,
                    format!("{} ids but {} logits rows", ids.len(), rows.len()),
                ));
            }
        }
        if vocab_size == 0 {
            return Err(bad(path, "logits has no rows or empty rows"));
        }
        Ok(ReferenceLogits {
            ids,
            positions: rows.len(),
            vocab_size,
            logits,
            meta: obj.into_iter().collect(),
        })
    }

    fn from_npy_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        const MAGIC: &[u8] = b"\x93NUMPY";
        if bytes.len() < 10 || &bytes[..6] != MAGIC {
            return Err(bad(path, "not a .npy file (no \\x93NUMPY magic)"));
        }
        let (header_len, start) = match bytes[6] {
            1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
            2 | 3 if bytes.len() >= 12 => (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            ),
            v => return Err(bad(path, format!("npy version {v}; expected 1, 2 or 3"))),
        };
        let header = bytes
            .get(start..start + header_len)
            .and_then(|h| std::str::from_utf8(h).ok())
            .ok_or_else(|| bad(path, "truncated or non-UTF-8 npy header"))?;
        let field = |key: &str| -> Option<&str> {
            let at = header.find(&format!("'{key}'"))? + key.len() + 2;
            let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
            Some(rest)
        };
        let descr = field("descr")
            .and_then(|r| r.strip_prefix('\''))
            .and_then(|r| r.split('\'').next())
            .ok_or_else(|| bad(path, "npy header has no descr"))?;
        if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
            return Err(bad(path, "npy array is in Fortran order; expected C order"));
        }
        let shape: Vec<usize> = field("shape")
            .and_then(|r| r.strip_prefix('('))
            .and_then(|r| r.split(')').next())
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(|t| t.parse::<usize>())
                    .collect::<std::result::Result<Vec<_>, _>>()
            })
            .transpose()
            .ok()
            .flatten()
            .ok_or_else(|| bad(path, "npy header has no readable shape"))?;
        let (positions, vocab_size) = match shape.as_slice() {
            [l, v] | [1, l, v] => (*l, *v),
            other => {
                return Err(bad(
                    path,
                    format!("npy shape is {other:?}; expected (L, V) or (1, L, V)"),
                ))
            }
        };
        let data = &bytes[start + header_len..];
        let n = positions * vocab_size;
        let logits: Vec<f32> = match descr {
            "<f4" if data.len() == 4 * n => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            "<f8" if data.len() == 8 * n => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            "<f4" | "<f8" => {
                return Err(bad(
                    path,
                    format!(
                        "npy data is {} bytes; shape {shape:?} of {descr} needs more or less",
                        data.len()
                    ),
                ))
            }
            other => {
                return Err(bad(
                    path,
                    format!("npy dtype is {other:?}; expected '<f4' or '<f8'"),
                ))
            }
        };
        Ok(ReferenceLogits {
            ids: None,
            positions,
            vocab_size,
            logits,
            meta: BTreeMap::new(),
        })
    }

    /// Writes `.json` (with `ids` when known and the `meta` keys) or `.npy` (f32 `(L, V)`),
    /// by extension.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = match path.extension().and_then(|e| e.to_str()) {
            Some("json") => {
                let mut obj: serde_json::Map<String, Value> =
                    self.meta.clone().into_iter().collect();
                obj.insert("ids".into(), serde_json::to_value(&self.ids).expect("ids"));
                let rows: Vec<Value> = self
                    .logits
                    .chunks_exact(self.vocab_size.max(1))
                    .map(|r| r.iter().map(|&x| Value::from(f64::from(x))).collect())
                    .collect();
                obj.insert("logits".into(), Value::Array(rows));
                serde_json::to_vec(&Value::Object(obj)).expect("JSON serializes")
            }
            Some("npy") => {
                let mut header = format!(
                    "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
                    self.positions, self.vocab_size
                );
                while (10 + header.len() + 1) % 64 != 0 {
                    header.push(' ');
                }
                header.push('\n');
                let mut out = b"\x93NUMPY\x01\x00".to_vec();
                out.extend_from_slice(&(header.len() as u16).to_le_bytes());
                out.extend_from_slice(header.as_bytes());
                for x in &self.logits {
                    out.extend_from_slice(&x.to_le_bytes());
                }
                out
            }
            other => {
                return Err(bad(
                    path,
                    format!("extension is {other:?}; expected .json or .npy"),
                ))
            }
        };
        std::fs::write(path, bytes).map_err(|e| TritterError::io(path, e))
    }

    /// Row `p` `(V,)`.
    pub fn row(&self, p: usize) -> &[f32] {
        &self.logits[p * self.vocab_size..(p + 1) * self.vocab_size]
    }
}

/// How close two sets of logits `(L, V)` are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitsComparison {
    /// Positions `L` compared.
    pub positions: usize,
    /// `max |ours - reference|` over all `L * V` values.
    pub max_abs_diff: f32,
    /// Mean of `|ours - reference|`.
    pub mean_abs_diff: f64,
    /// `max |reference|`, the scale the differences are read against.
    pub reference_scale: f32,
    /// Positions whose argmax agrees (ties broken by the lower id).
    pub top1_agree: usize,
    /// Position of `max_abs_diff`.
    pub worst_position: usize,
}

impl LogitsComparison {
    /// `top1_agree / positions`.
    pub fn top1_agreement(&self) -> f64 {
        self.top1_agree as f64 / self.positions.max(1) as f64
    }
}

impl std::fmt::Display for LogitsComparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "max abs logit diff {:.3e} (position {}; reference scale max|logit| {:.3}, relative {:.2e}), mean abs diff {:.3e}, top-1 agreement {}/{} ({:.1}%)",
            self.max_abs_diff,
            self.worst_position,
            self.reference_scale,
            self.max_abs_diff / self.reference_scale.max(f32::MIN_POSITIVE),
            self.mean_abs_diff,
            self.top1_agree,
            self.positions,
            100.0 * self.top1_agreement()
        )
    }
}

/// The index of the largest value (the lower index on ties; NaN never wins).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Compares `ours` with `reference`, both `(L, V)` row-major with `V = vocab_size`.
pub fn compare_logits(
    ours: &[f32],
    reference: &[f32],
    vocab_size: usize,
) -> Result<LogitsComparison> {
    if vocab_size == 0 || ours.len() != reference.len() || ours.len() % vocab_size != 0 {
        return Err(TritterError::ShapeMismatch {
            what: "logits to compare".into(),
            actual: vec![ours.len(), reference.len()],
            expected: format!("two (L, V) buffers of equal length, V = {vocab_size}"),
        });
    }
    let positions = ours.len() / vocab_size;
    let mut c = LogitsComparison {
        positions,
        max_abs_diff: 0.0,
        mean_abs_diff: 0.0,
        reference_scale: 0.0,
        top1_agree: 0,
        worst_position: 0,
    };
    let mut sum = 0f64;
    for (p, (o, r)) in ours
        .chunks_exact(vocab_size)
        .zip(reference.chunks_exact(vocab_size))
        .enumerate()
    {
        for (&a, &b) in o.iter().zip(r) {
            let d = (a - b).abs();
            sum += f64::from(d);
            if d > c.max_abs_diff || d.is_nan() {
                c.max_abs_diff = d;
                c.worst_position = p;
            }
            c.reference_scale = c.reference_scale.max(b.abs());
        }
        if argmax(o) == argmax(r) {
            c.top1_agree += 1;
        }
    }
    c.mean_abs_diff = sum / ours.len().max(1) as f64;
    Ok(c)
}
