//! Seeded, resumable batching over a [`PackedDataset`].

use candle_core::Device;
use serde::{Deserialize, Serialize};

pub use super::pack::Batch;
use super::pack::PackedDataset;
use super::shuffle;
use crate::model::SeededRng;
use crate::{Result, TritterError};

/// Where a [`DataLoader`] stands: the epoch, the next position in that epoch's
/// permutation, and what the permutation is drawn from. Saved in checkpoints.
///
/// The permutation of epoch `e` is a Fisher-Yates shuffle driven by
/// `SeededRng::new(epoch_seed(seed, e))`, so `(seed, epoch)` is the whole RNG state and a
/// resumed loader reproduces the remaining order exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    /// Completed passes over the data.
    pub epoch: u64,
    /// Sequences of the current epoch already served.
    pub position: usize,
    /// Shuffle seed.
    pub seed: u64,
    /// Sequences in the dataset the cursor belongs to.
    pub num_sequences: usize,
    /// [`PackedDataset::fingerprint`] of that dataset.
    pub fingerprint: u64,
}

/// The seed of epoch `epoch`'s permutation (SplitMix-style mixing of seed and epoch).
fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    let mut rng = SeededRng::new(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    rng.next_u64()
}

/// Serves batches of `batch_size` packed sequences in a per-epoch seeded random order;
/// an epoch boundary inside a batch continues with the next epoch's order.
#[derive(Debug, Clone)]
pub struct DataLoader {
    dataset: PackedDataset,
    batch_size: usize,
    cursor: DataCursor,
    order: Vec<usize>,
}

impl DataLoader {
    /// A loader at the start of epoch 0.
    pub fn new(dataset: PackedDataset, batch_size: usize, seed: u64) -> Result<Self> {
        let cursor = DataCursor {
            epoch: 0,
            position: 0,
            seed,
            num_sequences: dataset.len(),
            fingerprint: dataset.fingerprint(),
        };
        Self::with_cursor(dataset, batch_size, cursor)
    }

    /// A loader resuming at `cursor`. Errors when the cursor belongs to another dataset
    /// (different sequence count or fingerprint) or points past the epoch's end.
    pub fn with_cursor(
        dataset: PackedDataset,
        batch_size: usize,
        cursor: DataCursor,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(TritterError::option("batch_size", 0, "expected >= 1"));
        }
        if cursor.num_sequences != dataset.len() || cursor.fingerprint != dataset.fingerprint() {
            return Err(TritterError::CheckpointMismatch {
                path: "data cursor".into(),
                detail: format!(
                    "the cursor was saved for a dataset of {} sequences (fingerprint {:016x}) but the \
                     data now has {} sequences (fingerprint {:016x}); resume with the same data, \
                     tokenizer and --seq-len",
                    cursor.num_sequences,
                    cursor.fingerprint,
                    dataset.len(),
                    dataset.fingerprint()
                ),
            });
        }
        if cursor.position > dataset.len() {
            return Err(TritterError::CheckpointMismatch {
                path: "data cursor".into(),
                detail: format!(
                    "position {} is past the {} sequences of an epoch",
                    cursor.position,
                    dataset.len()
                ),
            });
        }
        let order = Self::permutation(dataset.len(), cursor.seed, cursor.epoch);
        Ok(DataLoader {
            dataset,
            batch_size,
            cursor,
            order,
        })
    }

    fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        shuffle(&mut order, &mut SeededRng::new(epoch_seed(seed, epoch)));
        order
    }

    /// The cursor to save (points at the next batch).
    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    /// The dataset.
    pub fn dataset(&self) -> &PackedDataset {
        &self.dataset
    }

    /// Sequences per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Serves batches of `batch_size` from the current cursor on (data-parallel training
    /// draws the global batch, `world x` the per-rank one, from one loader, so the order and
    /// the saved cursor do not depend on the number of ranks).
    pub fn set_batch_size(&mut self, batch_size: usize) -> Result<()> {
        if batch_size == 0 {
            return Err(TritterError::option("batch_size", 0, "expected >= 1"));
        }
        self.batch_size = batch_size;
        Ok(())
    }

    /// The indices of the next batch, advancing the cursor.
    pub fn next_indices(&mut self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.batch_size);
        while out.len() < self.batch_size {
            if self.cursor.position >= self.order.len() {
                self.cursor.epoch += 1;
                self.cursor.position = 0;
                self.order =
                    Self::permutation(self.dataset.len(), self.cursor.seed, self.cursor.epoch);
            }
            out.push(self.order[self.cursor.position]);
            self.cursor.position += 1;
        }
        out
    }

    /// The next batch on `device`, advancing the cursor.
    pub fn next_batch(&mut self, device: &Device) -> Result<Batch> {
        let idx = self.next_indices();
        self.dataset.batch(&idx, device)
    }
}
