//! Collects the workspace's own Rust and CUDA sources into `OUT_DIR/corpus.bin` and an index
//! `OUT_DIR/corpus_index.rs`, the built-in training corpus (`tritter::data::corpus`).
//!
//! Files: `*.rs`, `*.cu`, `*.cuh` under `crates/`, `kernels-cuda/`, `benches/`, `src/` and
//! `tests/` of the workspace root, hidden and `target` directories skipped, sorted by their
//! `/`-separated relative path (deterministic on every platform). A file is held out for
//! validation when the FNV-1a hash of its path is `0 mod 10` (stable as files come and go).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const ROOTS: &[&str] = &["crates", "kernels-cuda", "benches", "src", "tests"];
const EXTENSIONS: &[&str] = &["rs", "cu", "cuh"];
const VALIDATION_MODULUS: u64 = 10;

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            walk(&path, out);
        } else if kind.is_file()
            && path
                .extension()
                .is_some_and(|e| EXTENSIONS.contains(&e.to_string_lossy().as_ref()))
        {
            out.push(path);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .and_then(Path::parent)
        .expect("crates/tritter sits two levels below the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));

    let mut files = Vec::new();
    for r in ROOTS {
        let dir = root.join(r);
        // Cargo rescans a directory given here recursively for changed mtimes.
        println!("cargo:rerun-if-changed={}", dir.display());
        walk(&dir, &mut files);
    }
    let mut entries: Vec<(String, PathBuf)> = files
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(&root).ok()?;
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            Some((rel, p))
        })
        .collect();
    entries.sort();

    let mut blob = Vec::new();
    let mut index = String::from(
        "/// `(path, byte offset, byte length, held out for validation)` of each corpus file.\n\
         pub(crate) static CORPUS_INDEX: &[(&str, usize, usize, bool)] = &[\n",
    );
    for (rel, path) in &entries {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let validation = fnv1a(rel.as_bytes()) % VALIDATION_MODULUS == 0;
        index.push_str(&format!(
            "    ({rel:?}, {}, {}, {validation}),\n",
            blob.len(),
            bytes.len()
        ));
        blob.extend_from_slice(&bytes);
    }
    index.push_str("];\n");
    fs::File::create(out_dir.join("corpus.bin"))
        .and_then(|mut f| f.write_all(&blob))
        .expect("writing corpus.bin");
    fs::write(out_dir.join("corpus_index.rs"), index).expect("writing corpus_index.rs");
}
