//! Document sources: directories of text/code files, JSONL files, parquet files.

use std::fs;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use super::Document;
use crate::tokenizer::Modality;
use crate::{Result, TritterError};

/// Extensions read as `<code>` documents from a directory.
pub const CODE_EXTENSIONS: &[&str] = &[
    "rs", "cu", "cuh", "c", "h", "cc", "cpp", "hpp", "py", "js", "ts", "go", "java", "sh", "toml",
    "yaml", "yml",
];
/// Extensions read as `<text>` documents from a directory.
pub const TEXT_EXTENSIONS: &[&str] = &["txt", "md", "rst", "tex"];

/// What to do with a JSONL line (or parquet row) that is not valid JSON or lacks the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MalformedPolicy {
    /// Skip it and count it in [`LoadReport::malformed`].
    #[default]
    Skip,
    /// Stop with [`TritterError::MalformedRecord`] naming the line.
    Fail,
}

/// How [`load_documents`] reads its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOptions {
    /// The JSON field (JSONL) or column (parquet) holding the document text.
    pub text_field: String,
    /// Malformed JSONL lines / parquet rows.
    pub malformed: MalformedPolicy,
    /// Modality of JSONL/parquet records and of single files (`Text` by default; directory
    /// files are classified by extension).
    pub record_modality: Modality,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            text_field: "text".into(),
            malformed: MalformedPolicy::Skip,
            record_modality: Modality::Text,
        }
    }
}

/// What [`load_documents`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Files read.
    pub files: usize,
    /// Documents kept (non-empty).
    pub documents: usize,
    /// Malformed records skipped (JSONL lines, parquet rows).
    pub malformed: usize,
    /// Empty documents and files with other extensions skipped.
    pub skipped: usize,
}

/// Reads the documents at `path`:
/// * a directory: every file with an extension of `CODE_EXTENSIONS` (as `<code>`) or
///   `TEXT_EXTENSIONS` (as `<text>`), recursively, hidden entries and `target/` skipped,
///   in sorted path order;
/// * `*.jsonl` / `*.json`: one JSON object per line, text in `options.text_field`;
/// * `*.parquet`: the string column `options.text_field`, one document per row;
/// * any other file: one document of modality `options.record_modality`.
///
/// Errors: a missing or unreadable path, an unknown field, a malformed record under
/// [`MalformedPolicy::Fail`], and a source without any non-empty document.
pub fn load_documents(path: &Path, options: &SourceOptions) -> Result<(Vec<Document>, LoadReport)> {
    let meta = fs::metadata(path).map_err(|e| {
        TritterError::data(
            path,
            format!(
                "cannot read it ({e}); expected a directory, a .jsonl, a .parquet or a text file"
            ),
        )
    })?;
    let mut report = LoadReport::default();
    let mut docs = Vec::new();
    if meta.is_dir() {
        let mut files = Vec::new();
        walk(path, &mut files)?;
        files.sort();
        for file in files {
            let ext = file
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            let modality = if CODE_EXTENSIONS.contains(&ext.as_str()) {
                Modality::Code
            } else if TEXT_EXTENSIONS.contains(&ext.as_str()) {
                Modality::Text
            } else {
                report.skipped += 1;
                continue;
            };
            let bytes = fs::read(&file).map_err(|e| TritterError::io(&file, e))?;
            report.files += 1;
            push_doc(
                &mut docs,
                &mut report,
                modality,
                bytes,
                file.display().to_string(),
            );
        }
    } else {
        report.files = 1;
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        match ext.as_str() {
            "jsonl" | "json" => read_jsonl(path, options, &mut docs, &mut report)?,
            "parquet" => read_parquet(path, options, &mut docs, &mut report)?,
            _ => {
                let bytes = fs::read(path).map_err(|e| TritterError::io(path, e))?;
                push_doc(
                    &mut docs,
                    &mut report,
                    options.record_modality,
                    bytes,
                    path.display().to_string(),
                );
            }
        }
    }
    if docs.is_empty() {
        return Err(TritterError::EmptyDataset {
            what: path.display().to_string(),
            detail: format!(
                "no non-empty documents ({} files read, {} malformed records, {} skipped); expected \
                 files with extensions {} or {}, or records with a non-empty {:?} field",
                report.files,
                report.malformed,
                report.skipped,
                CODE_EXTENSIONS.join("/"),
                TEXT_EXTENSIONS.join("/"),
                options.text_field
            ),
        });
    }
    Ok((docs, report))
}

fn push_doc(
    docs: &mut Vec<Document>,
    report: &mut LoadReport,
    modality: Modality,
    bytes: Vec<u8>,
    source: String,
) {
    if bytes.is_empty() {
        report.skipped += 1;
    } else {
        report.documents += 1;
        docs.push(Document {
            modality,
            bytes,
            source,
        });
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| TritterError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| TritterError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| TritterError::io(&path, e))?;
        if kind.is_dir() {
            walk(&path, out)?;
        } else if kind.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

fn malformed(
    options: &SourceOptions,
    report: &mut LoadReport,
    path: &Path,
    line: usize,
    detail: String,
) -> Result<()> {
    match options.malformed {
        MalformedPolicy::Skip => {
            report.malformed += 1;
            Ok(())
        }
        MalformedPolicy::Fail => Err(TritterError::MalformedRecord {
            path: path.to_path_buf(),
            line,
            detail,
        }),
    }
}

fn read_jsonl(
    path: &Path,
    options: &SourceOptions,
    docs: &mut Vec<Document>,
    report: &mut LoadReport,
) -> Result<()> {
    let text = fs::read(path).map_err(|e| TritterError::io(path, e))?;
    let field = options.text_field.as_str();
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                malformed(
                    options,
                    report,
                    path,
                    line_no,
                    format!("not valid JSON ({e})"),
                )?;
                continue;
            }
        };
        match value.get(field) {
            Some(serde_json::Value::String(s)) => push_doc(
                docs,
                report,
                options.record_modality,
                s.as_bytes().to_vec(),
                format!("{}:{line_no}", path.display()),
            ),
            Some(other) => malformed(
                options,
                report,
                path,
                line_no,
                format!("field {field:?} is {} but expected a string", json_kind(other)),
            )?,
            None => malformed(
                options,
                report,
                path,
                line_no,
                format!("no field {field:?} (expected an object with a string {field:?}; use --text-field to pick another)"),
            )?,
        }
    }
    Ok(())
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Reads the string column `options.text_field` of a parquet file through the record API
/// (no arrow). Codecs: uncompressed and snappy.
fn read_parquet(
    path: &Path,
    options: &SourceOptions,
    docs: &mut Vec<Document>,
    report: &mut LoadReport,
) -> Result<()> {
    let file = fs::File::open(path).map_err(|e| TritterError::io(path, e))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| TritterError::data(path, format!("not a readable parquet file: {e}")))?;
    let field = options.text_field.as_str();
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let columns: Vec<String> = schema
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    if !columns.iter().any(|c| c == field) {
        return Err(TritterError::data(
            path,
            format!(
                "no column {field:?}; the file has columns [{}] (pick one with --text-field)",
                columns.join(", ")
            ),
        ));
    }
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| TritterError::data(path, format!("cannot read rows: {e}")))?;
    for (i, row) in rows.enumerate() {
        let row_no = i + 1;
        let row = row.map_err(|e| TritterError::data(path, format!("row {row_no}: {e}")))?;
        let value = row
            .get_column_iter()
            .find(|(name, _)| name.as_str() == field)
            .map(|(_, v)| v);
        let bytes = match value {
            Some(Field::Str(s)) => s.as_bytes().to_vec(),
            Some(Field::Bytes(b)) => b.data().to_vec(),
            other => {
                let found = other.map_or_else(|| "missing".to_string(), |v| format!("{v:?}"));
                malformed(
                    options,
                    report,
                    path,
                    row_no,
                    format!("column {field:?} is {found} but expected a string"),
                )?;
                continue;
            }
        };
        push_doc(
            docs,
            report,
            options.record_modality,
            bytes,
            format!("{}#{row_no}", path.display()),
        );
    }
    Ok(())
}
