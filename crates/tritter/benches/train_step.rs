//! CPU training throughput (tokens/s) of the reference model: one full optimizer step
//! (forward, backward, clipping, AdamW) of the `test` and `100m` presets on byte tokens.
//!
//! `cargo bench -p tritter --bench train_step`; criterion reports "elements/s" = tokens/s.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tritter::data::PackedDataset;
use tritter::model::SeededRng;
use tritter::train::{TrainOptions, Trainer};
use tritter::TritterConfig;

/// (preset, batch, seq_len): the test preset at the CLI's default shape, 100M at a shape a
/// 2-core machine finishes in seconds.
const CASES: &[(&str, usize, usize)] = &[("test", 16, 128), ("100m", 1, 128)];

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step_cpu");
    group.sample_size(10);
    for &(preset, batch, seq_len) in CASES {
        let cfg = TritterConfig::preset(preset).unwrap();
        let mut rng = SeededRng::new(1);
        // Random byte-token documents: enough sequences that a batch never repeats.
        let docs: Vec<Vec<u32>> = (0..batch * 4)
            .map(|_| (0..seq_len).map(|_| 8 + rng.below(256) as u32).collect())
            .collect();
        let data = PackedDataset::from_token_documents(&docs, seq_len).unwrap();
        let opts = TrainOptions {
            steps: u64::MAX / 2,
            batch_size: batch,
            seq_len,
            ..TrainOptions::default()
        };
        let mut trainer = Trainer::new(&cfg, opts, data, None, &Device::Cpu).unwrap();
        group.throughput(Throughput::Elements((batch * seq_len) as u64));
        group.bench_function(format!("{preset}_b{batch}_l{seq_len}"), |b| {
            b.iter(|| trainer.train_step().unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
