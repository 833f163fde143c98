//! The paged cache: [`BlockManager`] bookkeeping over a page store. [`CpuKvCache`] keeps the
//! pool in a `Vec<u8>` with exactly the byte layout of the GPU pool ([`PageLayout`]), so the
//! GPU cache downloads into it bit for bit ([`crate::cuda`]).

use half::{bf16, f16};

use crate::blocks::{AppendTicket, BlockManager, PageCopy, SeqId};
use crate::config::{CacheConfig, KvFormat, PageLayout};
use crate::quant::{
    check_storable, quantize_group, Int4Group, GROUP, GROUP_CODE_BYTES, GROUP_PARAM_BYTES,
};
use crate::{KvError, Result};

/// Storage of a pool of pages (`layers * num_pages` pages of `page_bytes` each).
pub trait PageStore {
    /// Copies page `src` over page `dst` in every layer (the tail page of a fork).
    fn copy_page(&mut self, layout: &CacheConfig, src: u32, dst: u32) -> Result<()>;
}

/// A host pool: `layers * num_pages * page_bytes` bytes, `[layer][page][page_bytes]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuPages {
    /// The pool bytes.
    pub bytes: Vec<u8>,
}

impl PageStore for CpuPages {
    fn copy_page(&mut self, cfg: &CacheConfig, src: u32, dst: u32) -> Result<()> {
        let pb = cfg.layout().page_bytes();
        for l in 0..cfg.layers {
            let s = (l * cfg.num_pages + src as usize) * pb;
            let d = (l * cfg.num_pages + dst as usize) * pb;
            self.bytes.copy_within(s..s + pb, d);
        }
        Ok(())
    }
}

/// A paged KV cache: bookkeeping plus pages in a store `S` ([`CpuPages`] or, with feature
/// `cuda`, `cuda::GpuPages`).
#[derive(Debug, Clone)]
pub struct PagedKvCache<S> {
    pub(crate) blocks: BlockManager,
    pub(crate) store: S,
}

/// The CPU cache (reference and CPU inference).
pub type CpuKvCache = PagedKvCache<CpuPages>;

/// A copy of a cache's host bookkeeping ([`PagedKvCache::bookkeeping_snapshot`]).
#[derive(Debug, Clone)]
pub struct BookkeepingSnapshot {
    blocks: BlockManager,
}

impl<S: PageStore> PagedKvCache<S> {
    /// The bookkeeping (block tables, allocator), read-only.
    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        self.blocks.config()
    }

    /// The page store, read-only.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// A copy of the host bookkeeping (block tables, allocator, pending appends and which of
    /// their layers are written) for [`restore_bookkeeping`](Self::restore_bookkeeping).
    ///
    /// Why: work recorded but not run, such as a step captured into a CUDA graph whose
    /// capture then fails, marks layers written whose writes never happened; the step can
    /// only run again from the bookkeeping as it was before.
    pub fn bookkeeping_snapshot(&self) -> BookkeepingSnapshot {
        BookkeepingSnapshot {
            blocks: self.blocks.clone(),
        }
    }

    /// Puts back `snapshot`, which must differ from the cache's bookkeeping only in layers of
    /// pending appends marked written since (no sequence added, no append begun, no fork or
    /// free, same configuration), so no page, sequence or id changes hands. Otherwise a
    /// [`KvError::Unsupported`] naming what changed, and the cache is unchanged.
    pub fn restore_bookkeeping(&mut self, snapshot: BookkeepingSnapshot) -> Result<()> {
        if let Some(what) = self.blocks.differs_beyond_written(&snapshot.blocks) {
            return Err(KvError::Unsupported(format!(
                "restoring a bookkeeping snapshot: {what} differs from the snapshot's; only \
                 layers marked written since may differ"
            )));
        }
        self.blocks = snapshot.blocks;
        Ok(())
    }

    /// Starts a new empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        self.blocks.add_sequence()
    }

    /// Tokens of `seq`.
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        self.blocks.len(seq)
    }

    /// Reserves `n` tokens of `seq` starting at `pos` (must equal its length); see
    /// [`AppendTicket`] and [`BlockManager::begin_append`].
    pub fn begin_append(&mut self, seq: SeqId, pos: usize, n: usize) -> Result<AppendTicket> {
        self.blocks.begin_append(seq, pos, n)
    }

    /// A new sequence holding the same tokens as `seq` (shared full pages, copied tail page).
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let (new, copy) = self.blocks.fork(seq)?;
        if let Some(PageCopy { src, dst }) = copy {
            let cfg = self.blocks.config().clone();
            self.store.copy_page(&cfg, src, dst)?;
        }
        Ok(new)
    }

    /// Frees `seq` and returns its pages to the pool.
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        self.blocks.free(seq)
    }
}

/// Element types accepted as K/V input on the CPU.
pub trait KvInput: Copy {
    /// The value as f32 (exact for f16 and bf16).
    fn to_f32(self) -> f32;
}
impl KvInput for f32 {
    fn to_f32(self) -> f32 {
        self
    }
}
impl KvInput for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
impl KvInput for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Checks `x` holds `expected` elements, naming the shape.
pub(crate) fn check_len(
    what: &'static str,
    actual: usize,
    expected: usize,
    shape: impl FnOnce() -> String,
) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(KvError::LengthMismatch {
            what,
            shape: shape(),
            actual,
            expected,
        })
    }
}

impl CpuKvCache {
    /// An empty cache with a zeroed host pool.
    pub fn new(cfg: CacheConfig) -> Result<Self> {
        let blocks = BlockManager::new(cfg)?;
        let cfg = blocks.config();
        let bytes = vec![0u8; cfg.layers * cfg.num_pages * cfg.layout().page_bytes()];
        Ok(PagedKvCache {
            blocks,
            store: CpuPages { bytes },
        })
    }

    /// Assembles a cache from bookkeeping and pool bytes (e.g. a GPU cache's download).
    pub fn from_parts(blocks: BlockManager, bytes: Vec<u8>) -> Result<Self> {
        let cfg = blocks.config();
        let want = cfg.layers * cfg.num_pages * cfg.layout().page_bytes();
        check_len("pool bytes", bytes.len(), want, || {
            "(layers, num_pages, page_bytes)".into()
        })?;
        Ok(PagedKvCache {
            blocks,
            store: CpuPages { bytes },
        })
    }

    /// Writes one layer of a pending append: `k`, `v` are `(n, heads_kv, head_dim)` with `n =
    /// ticket.len()`. INT4 caches quantize per group ([`quantize_group`]); F16 caches round
    /// to nearest. Validates the ticket, the shapes and every value (finite, `|x| <= 65504`)
    /// before writing anything.
    pub fn write_layer<T: KvInput>(
        &mut self,
        ticket: &AppendTicket,
        layer: usize,
        k: &[T],
        v: &[T],
    ) -> Result<()> {
        self.blocks.check_ticket(ticket, layer)?;
        let k = to_f32_checked("k", k, ticket.len(), self.config())?;
        let v = to_f32_checked("v", v, ticket.len(), self.config())?;
        self.write_unchecked(ticket, layer, &k, &v);
        self.blocks.finish_layer(ticket, layer);
        Ok(())
    }

    /// Appends `n` tokens at position `pos` to every layer: `k`, `v` are `(layers, n,
    /// heads_kv, head_dim)`. All-or-nothing: on any error (shape, non-finite value, position,
    /// pool exhausted) the cache is unchanged.
    pub fn append<T: KvInput>(
        &mut self,
        seq: SeqId,
        pos: usize,
        n: usize,
        k: &[T],
        v: &[T],
    ) -> Result<AppendTicket> {
        let cfg = self.config().clone();
        check_kv_lens(&cfg, true, n, k.len(), v.len())?;
        let layer_elems = n * cfg.heads_kv * cfg.head_dim;
        let kf: Vec<f32> = k.iter().map(|x| x.to_f32()).collect();
        let vf: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
        check_storable("k", &kf)?;
        check_storable("v", &vf)?;
        let ticket = self.blocks.begin_append(seq, pos, n)?;
        for l in 0..cfg.layers {
            let r = l * layer_elems..(l + 1) * layer_elems;
            self.write_unchecked(&ticket, l, &kf[r.clone()], &vf[r]);
            self.blocks.finish_layer(&ticket, l);
        }
        Ok(ticket)
    }

    fn write_unchecked(&mut self, ticket: &AppendTicket, layer: usize, k: &[f32], v: &[f32]) {
        let cfg = self.blocks.config();
        let lay = cfg.layout();
        let (hkv, d) = (cfg.heads_kv, cfg.head_dim);
        let plane = layer * cfg.num_pages;
        for (t, page, slot) in self.blocks.ticket_slots(ticket) {
            debug_assert_eq!(self.blocks.page_refs(page), 1, "writes go to private pages");
            let base = (plane + page as usize) * lay.page_bytes();
            let row0 = (t - ticket.start) * hkv * d;
            for (kv, x) in [k, v].into_iter().enumerate() {
                for h in 0..hkv {
                    let row = &x[row0 + h * d..row0 + (h + 1) * d];
                    write_token(
                        &mut self.store.bytes[base..base + lay.page_bytes()],
                        &lay,
                        kv,
                        h,
                        slot,
                        row,
                    );
                }
            }
        }
    }

    /// Dequantized K and V of token `pos` of `seq` in `layer`, each `(heads_kv, head_dim)`,
    /// or `None` when the token is evicted or `pos >= len`. Reads whatever the page holds, so
    /// call it on written layers.
    pub fn read_token(
        &self,
        seq: SeqId,
        layer: usize,
        pos: usize,
    ) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        self.blocks.check_layer(layer)?;
        let Some((page, slot)) = self.blocks.locate(seq, pos)? else {
            return Ok(None);
        };
        let cfg = self.blocks.config();
        let lay = cfg.layout();
        let base = (layer * cfg.num_pages + page as usize) * lay.page_bytes();
        let pg = &self.store.bytes[base..base + lay.page_bytes()];
        let read = |kv| {
            (0..cfg.heads_kv)
                .flat_map(|h| read_token_row(pg, &lay, kv, h, slot))
                .collect()
        };
        Ok(Some((read(0), read(1))))
    }
}

/// k and v of an append hold `(layers, n, heads_kv, head_dim)` values each (`all_layers`, one
/// call for every layer) or `(n, heads_kv, head_dim)` (one layer's write). Shared by the CPU and
/// GPU caches, so both name the same shapes.
pub(crate) fn check_kv_lens(
    cfg: &CacheConfig,
    all_layers: bool,
    n: usize,
    k: usize,
    v: usize,
) -> Result<()> {
    let layers = if all_layers { cfg.layers } else { 1 };
    let want = layers * n * cfg.heads_kv * cfg.head_dim;
    let shape = || {
        if all_layers {
            format!(
                "(layers={}, n={n}, heads_kv={}, head_dim={})",
                cfg.layers, cfg.heads_kv, cfg.head_dim
            )
        } else {
            format!(
                "(n={n}, heads_kv={}, head_dim={})",
                cfg.heads_kv, cfg.head_dim
            )
        }
    };
    check_len("k", k, want, shape)?;
    check_len("v", v, want, shape)
}

fn to_f32_checked<T: KvInput>(
    what: &'static str,
    x: &[T],
    n: usize,
    cfg: &CacheConfig,
) -> Result<Vec<f32>> {
    let want = n * cfg.heads_kv * cfg.head_dim;
    check_len(what, x.len(), want, || {
        format!(
            "(n={n}, heads_kv={}, head_dim={})",
            cfg.heads_kv, cfg.head_dim
        )
    })?;
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    check_storable(what, &xf)?;
    Ok(xf)
}

/// Stores one token row `(head_dim,)` of K (`kv` = 0) or V (1) for `head` at `slot` of `page`
/// (one layer's page bytes).
pub(crate) fn write_token(
    page: &mut [u8],
    lay: &PageLayout,
    kv: usize,
    head: usize,
    slot: usize,
    row: &[f32],
) {
    let vo = lay.value_offset(kv, head, slot);
    match lay.format {
        KvFormat::Int4 => {
            let po = lay.param_offset(kv, head, slot);
            for (g, chunk) in row.chunks_exact(GROUP).enumerate() {
                let q = quantize_group(chunk.try_into().expect("group of 32"));
                page[vo + g * GROUP_CODE_BYTES..vo + (g + 1) * GROUP_CODE_BYTES]
                    .copy_from_slice(&q.codes);
                page[po + g * GROUP_PARAM_BYTES..po + (g + 1) * GROUP_PARAM_BYTES]
                    .copy_from_slice(&q.param_bytes());
            }
        }
        KvFormat::F16 => {
            for (i, &x) in row.iter().enumerate() {
                page[vo + 2 * i..vo + 2 * i + 2].copy_from_slice(&f16::from_f32(x).to_le_bytes());
            }
        }
    }
}

/// Reads back one token row `(head_dim,)` as f32 (dequantized for INT4).
pub(crate) fn read_token_row(
    page: &[u8],
    lay: &PageLayout,
    kv: usize,
    head: usize,
    slot: usize,
) -> Vec<f32> {
    let vo = lay.value_offset(kv, head, slot);
    match lay.format {
        KvFormat::Int4 => {
            let po = lay.param_offset(kv, head, slot);
            (0..lay.head_dim / GROUP)
                .flat_map(|g| {
                    Int4Group::from_bytes(
                        &page[vo + g * GROUP_CODE_BYTES..],
                        &page[po + g * GROUP_PARAM_BYTES..],
                    )
                    .dequantize()
                })
                .collect()
        }
        KvFormat::F16 => (0..lay.head_dim)
            .map(|i| f16::from_le_bytes([page[vo + 2 * i], page[vo + 2 * i + 1]]).to_f32())
            .collect(),
    }
}
