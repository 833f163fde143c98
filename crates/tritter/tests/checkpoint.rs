//! Checkpoints: save -> load is bit-exact (f32 and bf16), writes leave no temporary files,
//! and mismatched or corrupt checkpoints are typed errors that leave the model untouched.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tritter::checkpoint::{CONFIG_FILE, WEIGHTS_FILE};
use tritter::{TritterConfig, TritterError, TritterModel};

/// A fresh, empty directory under the target's temp dir, unique per test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tritter-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every parameter as raw f32 bits (bf16 widened exactly), sorted by name.
fn snapshot(m: &TritterModel) -> Vec<(String, Vec<u32>)> {
    let data = m.varmap().data().lock().unwrap();
    let mut v: Vec<_> = data
        .iter()
        .map(|(n, var)| {
            let bits = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            (n.clone(), bits)
        })
        .collect();
    v.sort();
    v
}

fn untied_test_config() -> TritterConfig {
    TritterConfig {
        tie_embeddings: false,
        ..TritterConfig::preset("test").unwrap()
    }
}

/// Save then load reproduces every parameter bit for bit and the same logits, in f32 and
/// bf16, and leaves only the two checkpoint files in the directory.
#[test]
fn save_load_round_trip_is_bit_exact() {
    for dtype in [DType::F32, DType::BF16] {
        let cfg = untied_test_config();
        let model = TritterModel::new(&cfg, dtype, &Device::Cpu, 21).unwrap();
        let dir = scratch(&format!("roundtrip-{dtype:?}"));
        model.save(&dir).unwrap();
        let loaded = TritterModel::load(&dir, &Device::Cpu).unwrap();
        assert_eq!(loaded.dtype(), dtype);
        assert_eq!(loaded.config(), &cfg);
        assert_eq!(snapshot(&loaded), snapshot(&model));
        let names: Vec<_> = snapshot(&model).into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"layers.1.attn.q_proj.weight".to_string()));
        assert!(names.contains(&"lm_head.weight".to_string()));

        let ids = Tensor::new(&[[1u32, 9, 77, 2]], &Device::Cpu).unwrap();
        let pos = model.default_positions(1, 4).unwrap();
        let mask = tritter::MaskSpec::causal();
        let a = model
            .forward(&ids, &pos, &mask)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let b = loaded
            .forward(&ids, &pos, &mask)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(bits(&a), bits(&b));

        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [CONFIG_FILE, WEIGHTS_FILE],
            "no temporary files remain"
        );
        // Saving again over an existing checkpoint replaces it.
        model.save(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn saved(name: &str) -> (TritterModel, PathBuf) {
    let model = TritterModel::new(&untied_test_config(), DType::F32, &Device::Cpu, 22).unwrap();
    let dir = scratch(name);
    model.save(&dir).unwrap();
    (model, dir)
}

fn load_err(dir: &Path) -> TritterError {
    TritterModel::load(dir, &Device::Cpu).unwrap_err()
}

/// A flipped data bit, a truncated file and a garbage header are `CorruptCheckpoint`.
#[test]
fn corrupt_checkpoints_are_detected() {
    let (_, dir) = saved("corrupt");
    let path = dir.join(WEIGHTS_FILE);
    let good = std::fs::read(&path).unwrap();

    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    std::fs::write(&path, &flipped).unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(e, TritterError::CorruptCheckpoint { .. }) && e.to_string().contains("checksum"),
        "{e}"
    );

    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    assert!(matches!(
        load_err(&dir),
        TritterError::CorruptCheckpoint { .. }
    ));

    std::fs::write(&path, b"not a safetensors file").unwrap();
    assert!(matches!(
        load_err(&dir),
        TritterError::CorruptCheckpoint { .. }
    ));

    std::fs::remove_file(&path).unwrap();
    assert!(matches!(load_err(&dir), TritterError::Io { .. }));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A checkpoint of another config, another dtype, or a `config.json` that disagrees with
/// the weights is refused with what differs, and the target model is left unchanged.
#[test]
fn mismatched_checkpoints_are_refused() {
    let (model, dir) = saved("mismatch");

    // Loading into a model of another shape.
    let wider = TritterConfig {
        intermediate_size: 2 * model.config().intermediate_size,
        ..model.config().clone()
    };
    let other = TritterModel::new(&wider, DType::F32, &Device::Cpu, 23).unwrap();
    let before = snapshot(&other);
    let e = other.load_weights(&dir).unwrap_err();
    assert!(
        matches!(e, TritterError::CheckpointMismatch { .. }),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("intermediate_size is 128 but expected 256"),
        "{e}"
    );
    assert_eq!(snapshot(&other), before, "a failed load changes nothing");

    // Loading into a model of another dtype.
    let bf16 = TritterModel::new(model.config(), DType::BF16, &Device::Cpu, 24).unwrap();
    let e = bf16.load_weights(&dir).unwrap_err();
    assert!(
        e.to_string()
            .contains("weights are f32 but the model is bf16"),
        "{e}"
    );

    // A torn pair: config.json from another model beside these weights.
    let cfg_path = dir.join(CONFIG_FILE);
    let good_cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, wider.to_json()).unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(e, TritterError::CheckpointMismatch { .. }) && e.to_string().contains("torn"),
        "{e}"
    );

    // An invalid config.json is a config error.
    std::fs::write(
        &cfg_path,
        good_cfg.replace("\"vocab_size\": 512", "\"vocab_size\": 100"),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(matches!(e, TritterError::InvalidConfig { .. }), "{e:?}");

    // Same config and dtype: loads into an existing model exactly.
    std::fs::write(&cfg_path, &good_cfg).unwrap();
    let same = TritterModel::new(model.config(), DType::F32, &Device::Cpu, 25).unwrap();
    assert_ne!(snapshot(&same), snapshot(&model));
    same.load_weights(&dir).unwrap();
    assert_eq!(snapshot(&same), snapshot(&model));
    std::fs::remove_dir_all(&dir).unwrap();
}
