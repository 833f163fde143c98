//! Data pipeline tests: loaders on fixtures written by the tests (directory, JSONL with
//! malformed lines in both modes, parquet), packing invariants, seeded split and shuffling,
//! cursor resumption, and typed errors on bad input.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use tritter::data::{
    corpus, load_documents, split_documents, DataLoader, Document, MalformedPolicy, PackedDataset,
    SourceOptions, PAD_DOC,
};
use tritter::tokenizer::{Modality, MultimodalTokenizer, SpecialToken, VocabLayout};
use tritter::TritterError;

/// A fresh, empty directory under the system temp dir, unique per test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tritter-data-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn bytes_tokenizer() -> MultimodalTokenizer {
    MultimodalTokenizer::new(VocabLayout::new(512).unwrap())
}

/// Code and text extensions get `<code>`/`<text>`; other files, hidden and `target` entries
/// and empty files are skipped and counted; order is sorted by path.
#[test]
fn directory_loader_classifies_by_extension() {
    let dir = scratch("dir");
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::create_dir_all(dir.join(".git")).unwrap();
    fs::create_dir_all(dir.join("target")).unwrap();
    fs::write(dir.join("b.rs"), "fn main() {}").unwrap();
    fs::write(dir.join("a.md"), "# title").unwrap();
    fs::write(dir.join("sub/k.cu"), "__global__ void k() {}").unwrap();
    fs::write(dir.join("image.png"), [0x89u8, b'P', b'N', b'G']).unwrap();
    fs::write(dir.join("empty.txt"), "").unwrap();
    fs::write(dir.join(".git/x.rs"), "hidden").unwrap();
    fs::write(dir.join("target/y.rs"), "build output").unwrap();
    let (docs, report) = load_documents(&dir, &SourceOptions::default()).unwrap();
    let got: Vec<(Modality, &[u8])> = docs.iter().map(|d| (d.modality, &d.bytes[..])).collect();
    assert_eq!(
        got,
        vec![
            (Modality::Text, &b"# title"[..]),
            (Modality::Code, &b"fn main() {}"[..]),
            (Modality::Code, &b"__global__ void k() {}"[..]),
        ]
    );
    assert_eq!(report.documents, 3);
    assert_eq!(
        report.skipped, 2,
        "image.png (extension) and empty.txt (empty)"
    );
    let ids = docs[1].tokenize(&bytes_tokenizer()).unwrap();
    assert_eq!(ids[0], SpecialToken::Code.id());
    assert_eq!(*ids.last().unwrap(), SpecialToken::Eos.id());
    assert_eq!(ids.len(), docs[1].bytes.len() + 2);
}

/// JSONL: the configured field is read; malformed lines (bad JSON, missing field, wrong
/// type) are skipped and counted, or stop the load with their line number.
#[test]
fn jsonl_malformed_lines_skip_or_fail() {
    let dir = scratch("jsonl");
    let path = dir.join("d.jsonl");
    let lines = [
        r#"{"content": "first", "text": "not this"}"#,
        r#"{"content": 5}"#,
        r#"not json"#,
        "",
        r#"{"other": "x"}"#,
        r#"{"content": "second \u00e9"}"#,
    ];
    fs::write(&path, lines.join("\n")).unwrap();
    let skip = SourceOptions {
        text_field: "content".into(),
        ..SourceOptions::default()
    };
    let (docs, report) = load_documents(&path, &skip).unwrap();
    let texts: Vec<&[u8]> = docs.iter().map(|d| &d.bytes[..]).collect();
    assert_eq!(texts, vec![&b"first"[..], "second é".as_bytes()]);
    assert_eq!(report.malformed, 3);
    assert!(docs.iter().all(|d| d.modality == Modality::Text));

    let fail = SourceOptions {
        malformed: MalformedPolicy::Fail,
        ..skip
    };
    match load_documents(&path, &fail) {
        Err(TritterError::MalformedRecord { line, detail, .. }) => {
            assert_eq!(line, 2, "the first malformed line");
            assert!(detail.contains("a number"), "{detail}");
        }
        other => panic!("expected MalformedRecord, got {other:?}"),
    }
}

fn write_parquet(path: &PathBuf, column: &str, values: &[&str]) {
    let schema = Arc::new(
        parse_message_type(&format!(
            "message doc {{ REQUIRED BYTE_ARRAY {column} (UTF8); REQUIRED INT32 id; }}"
        ))
        .unwrap(),
    );
    let file = fs::File::create(path).unwrap();
    let mut writer =
        SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build()))
            .unwrap();
    let mut rg = writer.next_row_group().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    let data: Vec<ByteArray> = values.iter().map(|v| ByteArray::from(*v)).collect();
    col.typed::<ByteArrayType>()
        .write_batch(&data, None, None)
        .unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    let ids: Vec<i32> = (0..values.len() as i32).collect();
    col.typed::<parquet::data_type::Int32Type>()
        .write_batch(&ids, None, None)
        .unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    writer.close().unwrap();
}

/// Parquet: the string column comes back row by row; an unknown column names the
/// available ones.
#[test]
fn parquet_string_column() {
    let dir = scratch("parquet");
    let path = dir.join("d.parquet");
    let values = ["alpha", "", "gamma δ"];
    write_parquet(&path, "text", &values);
    let (docs, report) = load_documents(&path, &SourceOptions::default()).unwrap();
    let texts: Vec<&[u8]> = docs.iter().map(|d| &d.bytes[..]).collect();
    assert_eq!(texts, vec![values[0].as_bytes(), values[2].as_bytes()]);
    assert_eq!(report.skipped, 1, "the empty row");
    let wrong = SourceOptions {
        text_field: "body".into(),
        ..SourceOptions::default()
    };
    match load_documents(&path, &wrong) {
        Err(TritterError::Data { detail, .. }) => {
            assert!(detail.contains("[text, id]"), "{detail}")
        }
        other => panic!("expected a Data error, got {other:?}"),
    }
}

/// Packing: every position's document id changes exactly after an `<eos>`, every real
/// token of the stream appears once (sequences overlap by exactly one token), padding only
/// at the very end, and targets are the inputs shifted by one.
#[test]
fn packing_respects_document_boundaries_and_covers_every_token() {
    let tok = bytes_tokenizer();
    let docs: Vec<Document> = ["a", "bc", "hello world", "", "x".repeat(37).as_str(), "yz"]
        .iter()
        .enumerate()
        .map(|(i, t)| Document {
            modality: if i % 2 == 0 {
                Modality::Code
            } else {
                Modality::Text
            },
            bytes: t.as_bytes().to_vec(),
            source: format!("doc{i}"),
        })
        .collect();
    let stream: Vec<u32> = docs
        .iter()
        .flat_map(|d| d.tokenize(&tok).unwrap())
        .collect();
    let eos = SpecialToken::Eos.id();
    for seq_len in [1, 2, 7, 16, stream.len() - 1, stream.len() + 5] {
        let packed = PackedDataset::from_documents(&docs, &tok, seq_len).unwrap();
        assert_eq!(packed.num_tokens(), stream.len());
        assert_eq!(packed.len(), (stream.len() - 1).div_ceil(seq_len));
        let mut rebuilt = Vec::new();
        for i in 0..packed.len() {
            let (t, d) = packed.sequence(i).unwrap();
            assert_eq!(t.len(), seq_len + 1);
            for p in 0..seq_len {
                if d[p] == PAD_DOC {
                    assert_eq!(d[p + 1], PAD_DOC, "padding is a suffix");
                    continue;
                }
                assert_eq!(
                    d[p + 1] != d[p],
                    t[p] == eos,
                    "seq_len {seq_len}, sequence {i}, position {p}: doc id changes iff <eos>"
                );
            }
            let start = usize::from(i > 0);
            rebuilt.extend(
                t.iter()
                    .zip(d)
                    .skip(start)
                    .filter(|(_, &doc)| doc != PAD_DOC)
                    .map(|(&tok, _)| tok),
            );
        }
        assert_eq!(
            rebuilt, stream,
            "seq_len {seq_len}: every token exactly once"
        );
        let batch = packed.batch(&[0], &Device::Cpu).unwrap();
        let (t, _) = packed.sequence(0).unwrap();
        assert_eq!(batch.inputs.to_vec2::<u32>().unwrap()[0], t[..seq_len]);
        assert_eq!(batch.targets.to_vec2::<u32>().unwrap()[0], t[1..]);
    }
}

/// Split: seeded and deterministic, disjoint, complete, at least the requested fraction
/// held out; a single document is split by bytes.
#[test]
fn split_is_seeded_disjoint_and_complete() {
    let docs: Vec<Document> = (0..20)
        .map(|i| Document {
            modality: Modality::Text,
            bytes: vec![b'a' + i as u8; 10 + i],
            source: format!("d{i}"),
        })
        .collect();
    let fraction = 0.2;
    let (train, val) = split_documents(docs.clone(), fraction, 7).unwrap();
    let (train2, val2) = split_documents(docs.clone(), fraction, 7).unwrap();
    assert_eq!((&train, &val), (&train2, &val2));
    assert_eq!(train.len() + val.len(), docs.len());
    let total: usize = docs.iter().map(|d| d.bytes.len()).sum();
    let val_bytes: usize = val.iter().map(|d| d.bytes.len()).sum();
    assert!(val_bytes as f64 >= fraction * total as f64);
    assert!(val.iter().all(|v| !train.contains(v)));
    let (_, other_val) = split_documents(docs.clone(), fraction, 8).unwrap();
    assert_ne!(val, other_val, "another seed holds out other documents");
    let one = vec![docs[5].clone()];
    let (t, v) = split_documents(one, 0.25, 0).unwrap();
    assert_eq!(
        [t[0].bytes.clone(), v[0].bytes.clone()].concat(),
        docs[5].bytes
    );
    assert!(matches!(
        split_documents(docs, 1.0, 0),
        Err(TritterError::InvalidTrainOption { .. })
    ));
}

/// Loader: each epoch is a permutation of all sequences, epochs differ, and a loader rebuilt
/// from a saved cursor serves exactly the batches the original would have served next; a
/// cursor of other data is refused.
#[test]
fn loader_epochs_and_cursor_resume() {
    let tokens: Vec<Vec<u32>> = (0..9u32).map(|d| vec![8 + d; 10 + d as usize]).collect();
    let packed = PackedDataset::from_token_documents(&tokens, 8).unwrap();
    let n = packed.len();
    let batch = 3;
    let mut a = DataLoader::new(packed.clone(), batch, 42).unwrap();
    let epoch0: Vec<usize> = (0..n.div_ceil(batch))
        .flat_map(|_| a.next_indices())
        .collect();
    let mut sorted = epoch0[..n].to_vec();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..n).collect::<Vec<_>>(),
        "epoch 0 is a permutation"
    );
    let cursor = a.cursor();
    let cursor_json = serde_json::to_string(&cursor).unwrap();
    let expected: Vec<Vec<usize>> = (0..2 * n).map(|_| a.next_indices()).collect();
    let mut b = DataLoader::with_cursor(
        packed.clone(),
        batch,
        serde_json::from_str(&cursor_json).unwrap(),
    )
    .unwrap();
    let resumed: Vec<Vec<usize>> = (0..2 * n).map(|_| b.next_indices()).collect();
    assert_eq!(resumed, expected);
    let mut c = DataLoader::new(packed.clone(), n, 42).unwrap();
    let (e0, e1) = (c.next_indices(), c.next_indices());
    assert_ne!(e0, e1, "epochs are reshuffled");
    let other = PackedDataset::from_token_documents(&tokens[1..], 8).unwrap();
    assert!(matches!(
        DataLoader::with_cursor(other, batch, cursor),
        Err(TritterError::CheckpointMismatch { .. })
    ));
}

/// Data-parallel sharding: a loader serving the global batch (`world x` the per-rank batch)
/// gives rank `r` rows `r * b..(r + 1) * b`, the ranks' rows are disjoint and together are
/// the batch one loader of the global size serves; the per-sequence target counts sum to
/// the global batch's `num_targets` (the loss denominator every rank uses).
#[test]
fn data_parallel_shards_are_disjoint_and_complete() {
    let tokens: Vec<Vec<u32>> = (0..11u32)
        .map(|d| vec![8 + d; 5 + 3 * d as usize])
        .collect();
    let packed = PackedDataset::from_token_documents(&tokens, 16).unwrap();
    let (b, world) = (2, 3);
    let mut single = DataLoader::new(packed.clone(), b * world, 7).unwrap();
    let mut global = DataLoader::new(packed.clone(), b, 7).unwrap();
    global.set_batch_size(b * world).unwrap();
    assert!(global.set_batch_size(0).is_err(), "batch 0 is refused");
    for _ in 0..2 * packed.len() {
        let idx = global.next_indices();
        assert_eq!(
            idx,
            single.next_indices(),
            "one order whatever the world size"
        );
        let whole = packed.batch(&idx, &Device::Cpu).unwrap();
        let mut seen = Vec::new();
        let mut targets = 0;
        for r in 0..world {
            let rows = &idx[r * b..(r + 1) * b];
            seen.extend_from_slice(rows);
            targets += rows
                .iter()
                .map(|&i| packed.num_targets_of(i).unwrap())
                .sum::<usize>();
        }
        assert_eq!(seen, idx, "the shards tile the global batch");
        assert_eq!(targets, whole.num_targets, "global denominator");
    }
    assert_eq!(packed.num_targets_of(packed.len()), None);
}

/// Bad input: a missing path, a directory without usable files, an empty JSONL and a
/// dataset too small to pack are typed errors naming the problem.
#[test]
fn bad_data_inputs_are_typed_errors() {
    let dir = scratch("bad");
    let missing = dir.join("nope");
    match load_documents(&missing, &SourceOptions::default()) {
        Err(TritterError::Data { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected Data, got {other:?}"),
    }
    fs::write(dir.join("notes.bin"), [1u8, 2, 3]).unwrap();
    assert!(matches!(
        load_documents(&dir, &SourceOptions::default()),
        Err(TritterError::EmptyDataset { .. })
    ));
    let jsonl = dir.join("e.jsonl");
    fs::write(&jsonl, "\n\n").unwrap();
    assert!(matches!(
        load_documents(&jsonl, &SourceOptions::default()),
        Err(TritterError::EmptyDataset { .. })
    ));
    assert!(matches!(
        PackedDataset::from_token_documents(&[vec![SpecialToken::Eos.id()]], 4),
        Err(TritterError::EmptyDataset { .. })
    ));
    assert!(matches!(
        PackedDataset::from_token_documents(&[vec![8, 9]], 0),
        Err(TritterError::InvalidTrainOption { .. })
    ));
}

/// The built-in corpus is non-empty, sorted, includes Rust and CUDA sources and holds out
/// a validation part disjoint from training.
#[test]
fn builtin_corpus_has_sources_and_a_validation_part() {
    let files: Vec<_> = corpus::files().collect();
    assert!(files.windows(2).all(|w| w[0].path < w[1].path), "sorted");
    assert!(files.iter().any(|f| f.path.ends_with(".rs")));
    assert!(files.iter().any(|f| f.path.ends_with(".cu")));
    assert_eq!(
        files.iter().map(|f| f.bytes.len()).sum::<usize>(),
        corpus::total_bytes()
    );
    let (train, val) = corpus::builtin_documents();
    assert!(!train.is_empty() && !val.is_empty());
    assert_eq!(train.len() + val.len(), files.len());
    assert!(val
        .iter()
        .all(|v| !train.iter().any(|t| t.source == v.source)));
}
