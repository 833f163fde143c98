//! CUDA paths (feature `cuda`): the same cache on a device pool, written by
//! `kv_write_{int4,f16}` (quantizing straight into the pages) and read by the split-KV decode
//! kernels `kv_decode_*` (`kernels-cuda/kernels/kv_int4.cu`; the INT4 tensor-core kernel
//! merges its splits in the last CTA of each head, the f16 and SIMT kernels through
//! `kv_decode_reduce`). The host bookkeeping is the same [`BlockManager`]
//! as on the CPU, so a GPU cache downloads bit for bit into a [`CpuKvCache`]
//! ([`GpuKvCache::to_cpu`]) for checking.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::f16;
use tritter_kernels_cuda::{images, Gpu, KernelArgs, KernelError};

use crate::blocks::{AppendTicket, SeqId};
use crate::cache::{check_kv_lens, check_len, CpuKvCache, PageStore, PagedKvCache};
use crate::config::{CacheConfig, KvFormat};
use crate::{gqa_group, BlockManager, KvError, Result};

/// Tokens per pipeline stage of the decode kernel (`kTile` in the kernel).
pub const DECODE_TILE: usize = 32;
/// Threads per decode CTA (`kThreads`).
const DECODE_THREADS: u32 = 128;
/// Threads of `kv_decode_reduce` (`kReduceThreads` in kv_int4.cu; a multiple of D = 64, 128).
const REDUCE_THREADS: u32 = 256;
/// Threads per write CTA (`kWriteThreads`).
const WRITE_THREADS: u32 = 256;
/// Slot batches of at most this many tokens (decode steps) are written by the warp-per-head
/// kernel ([`GpuKvCache::write_layer_slots`]).
pub const WARP_WRITE_MAX_TOKENS: usize = 64;
/// Fewest tiles a split takes (so the cp.async pipeline fills and the reduction stays small
/// next to the K/V bytes).
pub const MIN_TILES_PER_SPLIT: usize = 4;
/// Decode CTAs aimed for per SM: 4 warps each, so about 32 warps per SM in flight.
pub const TARGET_CTAS_PER_SM: usize = 8;
/// Resident CTAs per SM of the INT4 tensor-core decode kernel (`tc::kDefMinBlocks`: its
/// launch bounds size the registers for 4 CTAs of 128 threads per SM, 127 registers and
/// 36.8 KB of shared memory each on sm_90; sm_120's 100 KB per SM holds 2 of them).
pub const INT4_CTAS_PER_SM: usize = 4;

/// A device pool of pages, `[layer][page][page_bytes]`, zero-initialized.
pub struct GpuPages {
    gpu: Arc<Gpu>,
    pool: CudaSlice<u8>,
    /// `(2,)` non-finite counters of the last write (k, v).
    counter: CudaSlice<u32>,
    /// The last append's page list, on the host and `(pages,)` on the device: a layer-by-layer
    /// append writes every layer through the same list (and the quantize bench re-runs one),
    /// so only a new list costs a host-to-device copy before the write kernel.
    last_pages: Option<(Vec<i32>, CudaSlice<i32>)>,
}

impl GpuPages {
    /// The pool and the device copy of `pages`, uploaded unless it equals the last list
    /// (see `last_pages`). A list is never written in place, so a kernel still reading the
    /// previous one is unaffected (its buffer is freed in stream order).
    fn pool_and_pages(&mut self, pages: &[i32]) -> Result<(&mut CudaSlice<u8>, &CudaSlice<i32>)> {
        let dev = match self.last_pages.take() {
            Some((host, dev)) if host == pages => (host, dev),
            _ => {
                let dev = self
                    .gpu
                    .stream()
                    .clone_htod(pages)
                    .map_err(KernelError::driver("uploading the append's pages"))?;
                (pages.to_vec(), dev)
            }
        };
        let (_, dev) = self.last_pages.insert(dev);
        Ok((&mut self.pool, dev))
    }
}

impl std::fmt::Debug for GpuPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuPages")
            .field("bytes", &self.pool.len())
            .finish()
    }
}

impl PageStore for GpuPages {
    fn copy_page(&mut self, cfg: &CacheConfig, src: u32, dst: u32) -> Result<()> {
        let pb = cfg.layout().page_bytes();
        let stream = self.gpu.stream().clone();
        for l in 0..cfg.layers {
            let s = (l * cfg.num_pages + src as usize) * pb;
            let d = (l * cfg.num_pages + dst as usize) * pb;
            let (lo, mut hi) = self.pool.split_at_mut(s.max(d));
            let res = if s < d {
                stream.memcpy_dtod(&lo.slice(s..s + pb), &mut hi.slice_mut(..pb))
            } else {
                let mut lo = lo;
                stream.memcpy_dtod(&hi.slice(..pb), &mut lo.slice_mut(d..d + pb))
            };
            res.map_err(KernelError::driver("copying a page for a fork"))?;
        }
        Ok(())
    }
}

/// The GPU cache.
pub type GpuKvCache = PagedKvCache<GpuPages>;

fn alloc_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> KvError + '_ {
    move |e| KernelError::driver(format!("allocating {what}"))(e).into()
}

impl GpuKvCache {
    /// An empty cache whose pool (`layers * num_pages * page_bytes` bytes, zeroed) lives on
    /// `gpu`.
    pub fn new(gpu: &Arc<Gpu>, cfg: CacheConfig) -> Result<Self> {
        let blocks = BlockManager::new(cfg)?;
        let c = blocks.config();
        let bytes = c.layers * c.num_pages * c.layout().page_bytes();
        let stream = gpu.stream();
        let pool = stream
            .alloc_zeros::<u8>(bytes)
            .map_err(alloc_err("the page pool"))?;
        let counter = stream
            .alloc_zeros::<u32>(2)
            .map_err(alloc_err("the non-finite counters"))?;
        Ok(PagedKvCache {
            blocks,
            store: GpuPages {
                gpu: gpu.clone(),
                pool,
                counter,
                last_pages: None,
            },
        })
    }

    /// The device the pool lives on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.store.gpu
    }

    /// The pool, `[layer][page][page_bytes]` bytes.
    pub fn pool(&self) -> &CudaSlice<u8> {
        &self.store.pool
    }

    /// Copies bookkeeping and pool into a [`CpuKvCache`] (synchronizes): the CPU reference
    /// then reads exactly what the GPU stored.
    pub fn to_cpu(&self) -> Result<CpuKvCache> {
        let bytes = self
            .store
            .gpu
            .stream()
            .clone_dtoh(&self.store.pool)
            .map_err(KernelError::driver("copying the page pool to the host"))?;
        CpuKvCache::from_parts(self.blocks.clone(), bytes)
    }

    /// Fails if `k` or `v` holds NaN or Inf (runs a counting kernel and synchronizes).
    fn check_finite(&mut self, k: &CudaView<'_, f16>, v: &CudaView<'_, f16>) -> Result<()> {
        let gpu = self.store.gpu.clone();
        let stream = gpu.stream();
        stream
            .memset_zeros(&mut self.store.counter)
            .map_err(KernelError::driver("clearing the non-finite counters"))?;
        let func = gpu.function(&images::KV_INT4, "kv_count_nonfinite_f16")?;
        for (i, x) in [k, v].into_iter().enumerate() {
            if x.is_empty() {
                continue;
            }
            let n = x.len() as i64;
            let blocks = x.len().div_ceil(256).min(1024) as u32;
            let mut counter = self.store.counter.slice_mut(i..i + 1);
            let mut launch = stream.launch_builder(&func);
            launch.arg(x).arg(&n).arg(&mut counter);
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches `kv_count_nonfinite_f16(const __half*, long long, unsigned*)`;
            // the kernel reads x[0..n) (n = x.len()) and adds to one counter.
            unsafe { launch.launch(cfg) }
                .map_err(KernelError::driver("launching kv_count_nonfinite_f16"))?;
        }
        let counts = stream
            .clone_dtoh(&self.store.counter)
            .map_err(KernelError::driver("reading the non-finite counters"))?;
        for (what, c) in [("k", counts[0]), ("v", counts[1])] {
            if c > 0 {
                return Err(KvError::NonFinite {
                    what,
                    index: c as usize,
                    value: format!("NaN or Inf ({c} values)"),
                });
            }
        }
        Ok(())
    }

    /// Launches the write kernel for `layers` consecutive layers starting at `layer0`:
    /// `k`, `v` are `(layers, n, heads_kv, head_dim)` f16.
    fn launch_write(
        &mut self,
        ticket: &AppendTicket,
        layer0: usize,
        layers: usize,
        k: &CudaView<'_, f16>,
        v: &CudaView<'_, f16>,
    ) -> Result<()> {
        let cfg = self.blocks.config().clone();
        let (first, pages) = self.blocks.ticket_pages(ticket);
        let gpu = self.store.gpu.clone();
        let stream = gpu.stream();
        let (pool, pages) = self.store.pool_and_pages(&pages)?;
        let n = ticket.len();
        let groups = 2 * n * cfg.heads_kv * (cfg.head_dim / crate::GROUP);
        // One thread per (K, V) pair of groups.
        let blocks = (groups / 2).div_ceil(WRITE_THREADS as usize);
        // The kernel indexes groups in 32-bit arithmetic (64-bit division per thread cost
        // more than the quantization itself).
        if blocks > i32::MAX as usize || groups > i32::MAX as usize {
            return Err(KvError::Unsupported(format!(
                "an append of {n} tokens is {groups} groups of 32 values, more than one launch takes ({}); append in chunks",
                i32::MAX
            )));
        }
        let name = match cfg.format {
            KvFormat::Int4 => "kv_write_int4",
            KvFormat::F16 => "kv_write_f16",
        };
        let func = gpu.function(&images::KV_INT4, name)?;
        let i = |x: usize| x as i32; // bounded by validate() / max_seq_len (i32)
        let (first_page, start, n_i, hkv, d, p, np) = (
            i(first),
            i(ticket.start),
            i(n),
            i(cfg.heads_kv),
            i(cfg.head_dim),
            i(cfg.page_size),
            i(cfg.num_pages),
        );
        let page_bytes = cfg.layout().page_bytes() as i64;
        let layer0_i = i(layer0);
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(k)
            .arg(v)
            .arg(pool)
            .arg(pages)
            .arg(&first_page)
            .arg(&start)
            .arg(&n_i)
            .arg(&hkv)
            .arg(&d)
            .arg(&p)
            .arg(&np)
            .arg(&page_bytes)
            .arg(&layer0_i);
        let lc = LaunchConfig {
            grid_dim: (blocks as u32, layers as u32, 1),
            block_dim: (WRITE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `kv_write_*(const __half*, const __half*, uint8_t*, const int*, int,
        // int, int, int, int, int, int, long long, int)`. k and v hold layers * n * heads_kv *
        // head_dim values (checked by the callers); `pages` covers the logical pages
        // first..=last of the ticket; every page id is < num_pages (the allocator's) and the
        // pool holds layers_total * num_pages * page_bytes bytes with layer0 + layers <=
        // layers_total; each thread writes one group inside its own page slot.
        unsafe { launch.launch(lc) }.map_err(KernelError::driver(format!("launching {name}")))?;
        Ok(())
    }

    /// Writes one layer of a pending append: `k`, `v` are `(n, heads_kv, head_dim)` f16 on
    /// the device. Checks the ticket, the shapes and finiteness (one counting kernel and a
    /// host synchronization) before any page is touched, then quantizes straight into the
    /// pages (asynchronous).
    pub fn write_layer(
        &mut self,
        ticket: &AppendTicket,
        layer: usize,
        k: &CudaView<'_, f16>,
        v: &CudaView<'_, f16>,
    ) -> Result<()> {
        self.blocks.check_ticket(ticket, layer)?;
        let cfg = self.blocks.config();
        check_kv_lens(cfg, false, ticket.len(), k.len(), v.len())?;
        self.check_finite(k, v)?;
        self.launch_write(ticket, layer, 1, k, v)?;
        self.blocks.finish_layer(ticket, layer);
        Ok(())
    }

    /// Benchmark hook: re-runs only the quantize-into-pages kernel for `layer` of an append
    /// that already completed (no finiteness check, no synchronization, no bookkeeping
    /// change), so a bench can time the kernel alone. `k`, `v` as in
    /// [`write_layer`](Self::write_layer); they must be finite (not checked here), which is
    /// why this is not the write API.
    #[doc(hidden)]
    pub fn bench_rewrite_layer(
        &mut self,
        ticket: &AppendTicket,
        layer: usize,
        k: &CudaView<'_, f16>,
        v: &CudaView<'_, f16>,
    ) -> Result<()> {
        self.blocks.check_layer(layer)?;
        let cfg = self.blocks.config();
        if self.blocks.len(ticket.seq)? < ticket.end {
            return Err(KvError::StaleTicket {
                seq: ticket.seq.raw(),
                start: ticket.start,
                end: ticket.end,
                why: "the sequence is shorter than the ticket",
            });
        }
        check_kv_lens(cfg, false, ticket.len(), k.len(), v.len())?;
        self.launch_write(ticket, layer, 1, k, v)
    }

    /// Appends `n` tokens at `pos` to every layer in one launch: `k`, `v` are `(layers, n,
    /// heads_kv, head_dim)` f16. All-or-nothing: shapes, finiteness, position and pool are
    /// checked before anything changes.
    pub fn append(
        &mut self,
        seq: SeqId,
        pos: usize,
        n: usize,
        k: &CudaView<'_, f16>,
        v: &CudaView<'_, f16>,
    ) -> Result<AppendTicket> {
        let cfg = self.blocks.config().clone();
        check_kv_lens(&cfg, true, n, k.len(), v.len())?;
        self.check_finite(k, v)?;
        let ticket = self.blocks.begin_append(seq, pos, n)?;
        self.launch_write(&ticket, 0, cfg.layers, k, v)?;
        for l in 0..cfg.layers {
            self.blocks.finish_layer(&ticket, l);
        }
        Ok(ticket)
    }

    /// The pool slots of every token of `tickets` (pending appends of distinct sequences,
    /// typically one token each in a decode step), in ticket order, uploaded once and then
    /// used by [`write_layer_slots`](Self::write_layer_slots) for every layer: one launch
    /// per layer for the whole batch instead of one per sequence.
    pub fn slot_batch(&self, tickets: &[AppendTicket]) -> Result<SlotBatch> {
        let slots = self.batch_slots(tickets)?;
        let n = slots.len();
        let dev = self
            .store
            .gpu
            .stream()
            .clone_htod(&if slots.is_empty() { vec![-1] } else { slots })
            .map_err(KernelError::driver("uploading the slot batch"))?;
        Ok(SlotBatch {
            tickets: tickets.to_vec(),
            tokens: n,
            slots: dev,
        })
    }

    /// Refills `batch` in place (same device buffer) with the slots of `tickets`, which must
    /// cover exactly `batch.tokens()` tokens: for a caller that replays a captured CUDA graph
    /// whose writes read that buffer (an engine's decode step). Fails, changing nothing, on
    /// another token count or a bad ticket.
    pub fn slot_batch_refill(&self, tickets: &[AppendTicket], batch: &mut SlotBatch) -> Result<()> {
        let slots = self.batch_slots(tickets)?;
        if slots.len() != batch.tokens {
            return Err(KvError::ShapeMismatch {
                what: "tokens of a refilled slot batch",
                actual: slots.len(),
                expected: batch.tokens,
            });
        }
        if !slots.is_empty() {
            self.store
                .gpu
                .stream()
                .memcpy_htod(&slots, &mut batch.slots.slice_mut(..slots.len()))
                .map_err(KernelError::driver("uploading the slot batch"))?;
        }
        batch.tickets = tickets.to_vec();
        Ok(())
    }

    /// Marks every layer of `batch`'s appends written without launching anything: for a
    /// caller that has just launched a captured CUDA graph holding one
    /// [`write_layer_slots`](Self::write_layer_slots) (or
    /// [`write_layer_slots_with`](Self::write_layer_slots_with)) per layer on this batch's
    /// buffers (the graph wrote the pages). Checks every ticket and layer first and changes nothing on an
    /// error. Calling it without those writes would let decode attention read stale slots
    /// of the batch's own sequences (never another sequence's: the slots are their pages).
    pub fn record_graph_writes(&mut self, batch: &SlotBatch) -> Result<()> {
        let layers = self.blocks.config().layers;
        for t in &batch.tickets {
            for l in 0..layers {
                self.blocks.check_ticket(t, l)?;
            }
        }
        for t in &batch.tickets {
            for l in 0..layers {
                self.blocks.finish_layer(t, l);
            }
        }
        Ok(())
    }

    /// Pool slot per token of `tickets` (module docs of [`SlotBatch`]).
    fn batch_slots(&self, tickets: &[AppendTicket]) -> Result<Vec<i32>> {
        let cfg = self.blocks.config();
        if cfg.num_pages.saturating_mul(cfg.page_size) > i32::MAX as usize {
            return Err(KvError::Unsupported(format!(
                "a slot batch addresses pool slots as i32, but the pool has {} pages of {} tokens",
                cfg.num_pages, cfg.page_size
            )));
        }
        let mut slots = Vec::new();
        for (i, t) in tickets.iter().enumerate() {
            self.blocks.check_ticket(t, 0)?;
            if tickets[..i].iter().any(|o| o.seq == t.seq) {
                return Err(KvError::Unsupported(format!(
                    "sequence {} appears twice in one slot batch (one pending append per sequence)",
                    t.seq.raw()
                )));
            }
            let (first, pages) = self.blocks.ticket_pages(t);
            let p = cfg.page_size;
            slots.extend((t.start..t.end).map(|pos| {
                let page = pages[pos / p - first];
                if page < 0 {
                    -1
                } else {
                    page * p as i32 + (pos % p) as i32
                }
            }));
        }
        Ok(slots)
    }

    /// Writes layer `layer` of every append of `batch`: `k`, `v` `(n, heads_kv, head_dim)`
    /// f16 on the device, `n = batch.tokens()`, tokens in the batch's order. Asynchronous and
    /// without a host synchronization: a group of 32 values holding NaN or Inf is stored as
    /// zeros and counted into `nonfinite[0]` (never stored as garbage), so the caller checks
    /// the counter once per step (an engine reads it with the step's logits) instead of once
    /// per layer as [`write_layer`](Self::write_layer) does. Tickets and shapes are checked
    /// before anything is launched. Batches of up to [`WARP_WRITE_MAX_TOKENS`] tokens (decode
    /// steps) run a warp per token, head and K|V (a lane per value); larger ones a thread per
    /// group of 32 values: the same bytes either way.
    pub fn write_layer_slots(
        &mut self,
        batch: &SlotBatch,
        layer: usize,
        k: &CudaView<'_, f16>,
        v: &CudaView<'_, f16>,
        nonfinite: &mut CudaSlice<u32>,
    ) -> Result<()> {
        let cfg = self.blocks.config().clone();
        check_kv_lens(&cfg, false, batch.tokens, k.len(), v.len())?;
        self.write_layer_slots_with(batch, layer, nonfinite, |mut st| {
            let warp = st.tokens <= WARP_WRITE_MAX_TOKENS;
            let name = match (st.format, warp) {
                (KvFormat::Int4, false) => "kv_write_slots_int4",
                (KvFormat::F16, false) => "kv_write_slots_f16",
                (KvFormat::Int4, true) => "kv_write_slots_warp_int4",
                (KvFormat::F16, true) => "kv_write_slots_warp_f16",
            };
            let gpu = st.gpu;
            let func = gpu.function(&images::KV_INT4, name)?;
            let i = |x: usize| x as i32; // bounded by validate() and write_layer_slots_with
            let (n, hkv, d, shift, np, layer_i) = (
                i(st.tokens),
                i(st.heads_kv),
                i(st.head_dim),
                st.page_shift as i32,
                i(st.num_pages),
                i(st.layer),
            );
            let threads = if warp {
                // A warp per (token, head, K or V).
                2 * st.tokens * st.heads_kv * 32
            } else {
                // A thread per (K, V) pair of groups.
                st.tokens * st.heads_kv * (st.head_dim / crate::GROUP)
            };
            let mut launch = gpu.stream().launch_builder(&func);
            launch
                .arg(k)
                .arg(v)
                .arg(&mut st.pool)
                .arg(st.slots)
                .arg(&n)
                .arg(&hkv)
                .arg(&d)
                .arg(&shift)
                .arg(&np)
                .arg(&st.page_bytes)
                .arg(&layer_i)
                .arg(st.nonfinite);
            let lc = LaunchConfig {
                grid_dim: (threads.div_ceil(WRITE_THREADS as usize) as u32, 1, 1),
                block_dim: (WRITE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches `kv_write_slots_*(const __half*, const __half*, uint8_t*, const
            // int*, int, int, int, int, int, long long, int, unsigned*)`; k and v hold
            // n * heads_kv * head_dim values (checked), slots n entries (built by slot_batch
            // from the tickets' pages, each < num_pages * page_size or -1), layer < layers
            // (checked), the pool layers * num_pages * page_bytes bytes; each thread (warp)
            // writes one group (head) inside its own token's slot.
            unsafe { launch.launch(lc) }
                .map_err(KernelError::driver(format!("launching {name}")))?;
            Ok(())
        })
    }

    /// Writes layer `layer` of every append of `batch` with a kernel of the caller's: `launch`
    /// gets the pool and the batch's slots as raw launch parameters ([`SlotStore`]) and must
    /// enqueue, on the cache's stream, a kernel that stores every token's K and V exactly as
    /// `kv_int4_store.cuh` of `tritter-kernels-cuda` does (`store_group_warp`, or
    /// `group_dst` + `quantize_group32`): what a fused producer uses to append in the launch
    /// that computes K and V (the tritter engine's QK-Norm + RoPE + append), saving a launch
    /// and a round trip of K and V per layer. Tickets are checked before `launch` runs, the
    /// layer is marked written only when it returns `Ok`. The stores must stay inside each
    /// token's slot (`slots[t] = page * page_size + slot`, -1: not stored) and count each
    /// group holding NaN or Inf into `nonfinite[0]` instead of storing it.
    pub fn write_layer_slots_with<F>(
        &mut self,
        batch: &SlotBatch,
        layer: usize,
        nonfinite: &mut CudaSlice<u32>,
        launch: F,
    ) -> Result<()>
    where
        F: FnOnce(SlotStore<'_>) -> Result<()>,
    {
        for t in &batch.tickets {
            self.blocks.check_ticket(t, layer)?;
        }
        let cfg = self.blocks.config().clone();
        if nonfinite.is_empty() {
            return Err(KvError::LengthMismatch {
                what: "nonfinite",
                shape: "(1,)".into(),
                actual: 0,
                expected: 1,
            });
        }
        let groups = 2 * batch.tokens * cfg.heads_kv * (cfg.head_dim / crate::GROUP);
        if groups > i32::MAX as usize {
            return Err(KvError::Unsupported(format!(
                "a slot batch of {} tokens is {groups} groups of 32 values, more than one launch takes ({}); split it",
                batch.tokens,
                i32::MAX
            )));
        }
        if batch.tokens > 0 {
            let gpu = self.store.gpu.clone();
            launch(SlotStore {
                gpu: &gpu,
                pool: self.store.pool.as_view_mut(),
                slots: &batch.slots,
                nonfinite,
                tokens: batch.tokens,
                format: cfg.format,
                heads_kv: cfg.heads_kv,
                head_dim: cfg.head_dim,
                page_shift: cfg.page_size.trailing_zeros(),
                num_pages: cfg.num_pages,
                page_bytes: cfg.layout().page_bytes() as i64,
                layer,
            })?;
        }
        for t in &batch.tickets {
            self.blocks.finish_layer(t, layer);
        }
        Ok(())
    }

    /// Uploads the block tables and lengths of `seqs` for decode attention. The batch is tied
    /// to the cache's current epoch: any later append, fork or free makes it stale (refused
    /// by [`decode_attention_cuda`]), so it can never read pages that changed owner.
    pub fn decode_batch(&self, seqs: &[SeqId]) -> Result<DecodeBatch> {
        self.decode_batch_with_stride(seqs, 1)
    }

    /// [`decode_batch`](Self::decode_batch) with block-table rows at least `min_stride`
    /// pages wide, so that [`decode_batch_refill`](Self::decode_batch_refill) can reuse its
    /// buffers while the sequences grow.
    pub fn decode_batch_with_stride(
        &self,
        seqs: &[SeqId],
        min_stride: usize,
    ) -> Result<DecodeBatch> {
        let (lens, stride) = self.batch_lens(seqs)?;
        let stride = stride.max(min_stride);
        let (tables, lens_i, max_tiles) = self.batch_tables(seqs, &lens, stride)?;
        let stream = self.store.gpu.stream();
        Ok(DecodeBatch {
            epoch: self.blocks.epoch(),
            seqs: seqs.to_vec(),
            lens,
            bt_stride: stride,
            max_tiles,
            block_tables: stream
                .clone_htod(&if tables.is_empty() { vec![-1] } else { tables })
                .map_err(KernelError::driver("uploading block tables"))?,
            seq_lens: stream
                .clone_htod(&if lens_i.is_empty() { vec![0] } else { lens_i })
                .map_err(KernelError::driver("uploading sequence lengths"))?,
        })
    }

    /// Rewrites `batch` in place (same device buffers, same stride) for `seqs`, as many as
    /// the batch holds, each needing at most `batch`'s stride of block-table entries: for a
    /// caller that replays a captured CUDA graph whose decode kernels read those buffers.
    /// Fails, changing nothing, when the shape does not fit (then make a new batch).
    pub fn decode_batch_refill(&self, seqs: &[SeqId], batch: &mut DecodeBatch) -> Result<()> {
        let (lens, stride) = self.batch_lens(seqs)?;
        if seqs.len() != batch.seqs.len() || stride > batch.bt_stride {
            return Err(KvError::ShapeMismatch {
                what: "a refilled decode batch (sequences, block-table stride)",
                actual: if seqs.len() != batch.seqs.len() {
                    seqs.len()
                } else {
                    stride
                },
                expected: if seqs.len() != batch.seqs.len() {
                    batch.seqs.len()
                } else {
                    batch.bt_stride
                },
            });
        }
        let (tables, lens_i, max_tiles) = self.batch_tables(seqs, &lens, batch.bt_stride)?;
        let stream = self.store.gpu.stream();
        if !tables.is_empty() {
            stream
                .memcpy_htod(&tables, &mut batch.block_tables.slice_mut(..tables.len()))
                .map_err(KernelError::driver("uploading block tables"))?;
            stream
                .memcpy_htod(&lens_i, &mut batch.seq_lens.slice_mut(..lens_i.len()))
                .map_err(KernelError::driver("uploading sequence lengths"))?;
        }
        batch.epoch = self.blocks.epoch();
        batch.seqs = seqs.to_vec();
        batch.lens = lens;
        batch.max_tiles = max_tiles;
        Ok(())
    }

    /// Lengths of `seqs` (none empty) and the widest block table among them.
    fn batch_lens(&self, seqs: &[SeqId]) -> Result<(Vec<usize>, usize)> {
        let mut lens = Vec::with_capacity(seqs.len());
        let mut stride = 1;
        for &s in seqs {
            let len = self.blocks.len(s)?;
            if len == 0 {
                return Err(KvError::EmptySequence(s.raw()));
            }
            lens.push(len);
            stride = stride.max(self.blocks.block_table(s)?.len());
        }
        Ok((lens, stride))
    }

    /// `(B, stride)` block tables (-1 where evicted or past the end), lengths as i32, and
    /// the most tiles any sequence walks.
    fn batch_tables(
        &self,
        seqs: &[SeqId],
        lens: &[usize],
        stride: usize,
    ) -> Result<(Vec<i32>, Vec<i32>, usize)> {
        let cfg = self.blocks.config();
        let mut tables = vec![-1i32; seqs.len() * stride];
        for (b, &s) in seqs.iter().enumerate() {
            for (k, pg) in self.blocks.block_table(s)?.iter().enumerate() {
                tables[b * stride + k] = pg.map_or(-1, |p| p as i32);
            }
        }
        let max_tiles = lens
            .iter()
            .map(|&l| visible_tiles(cfg, l))
            .max()
            .unwrap_or(0);
        let lens_i: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        Ok((tables, lens_i, max_tiles))
    }
}

/// Replaces `x` (groups of [`GROUP`](crate::GROUP) f16 values, e.g. `(n, heads_kv,
/// head_dim)` keys) by its INT4 round trip: each group quantized exactly as the cache stores
/// it and dequantized as the CPU does (`code * scale + min`, rounded to f16). An engine runs
/// it on a prompt's own keys and values before the prompt's attention, so the prompt sees
/// them as later tokens will read them from the INT4 pages (the CPU engine's rule: logits do
/// not depend on how a prompt is chunked). Asynchronous; one thread per group.
pub fn round_trip_int4_cuda(gpu: &Gpu, x: &mut CudaViewMut<'_, f16>) -> Result<()> {
    if x.len() % crate::GROUP != 0 {
        return Err(KvError::LengthMismatch {
            what: "x (INT4 round trip)",
            shape: format!("(groups, {})", crate::GROUP),
            actual: x.len(),
            expected: x.len().next_multiple_of(crate::GROUP),
        });
    }
    let groups = x.len() / crate::GROUP;
    if groups == 0 {
        return Ok(());
    }
    if groups > i32::MAX as usize {
        return Err(KvError::Unsupported(format!(
            "{groups} groups in one INT4 round trip, more than one launch takes; split it"
        )));
    }
    let func = gpu.function(&images::KV_INT4, "kv_round_trip_int4")?;
    let g = groups as i32;
    let mut launch = gpu.stream().launch_builder(&func);
    launch.arg(x).arg(&g);
    let lc = LaunchConfig {
        grid_dim: (groups.div_ceil(WRITE_THREADS as usize) as u32, 1, 1),
        block_dim: (WRITE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `kv_round_trip_int4(__half*, int)`; x holds groups * 32 values
    // (checked), each thread rewrites its own group, bounds-checked against `groups`.
    unsafe { launch.launch(lc) }.map_err(KernelError::driver("launching kv_round_trip_int4"))?;
    Ok(())
}

/// Tiles of [`DECODE_TILE`] tokens the decode kernel walks for a sequence of `len` tokens
/// (sink tiles, then window tiles, without duplicates): mirrors `seq_view` in the kernel.
pub fn visible_tiles(cfg: &CacheConfig, len: usize) -> usize {
    let (sinks_end, window_start) = crate::visible_ranges(cfg, len);
    let t = DECODE_TILE;
    let n_sink = sinks_end.div_ceil(t);
    let w0 = (window_start / t).max(n_sink);
    n_sink + len.div_ceil(t).saturating_sub(w0)
}

/// `(num_splits, tiles_per_split)` of a decode launch of `format`'s kernel.
///
/// F16 (SIMT kernel): about [`TARGET_CTAS_PER_SM`] CTAs per SM over `batch * heads_kv`
/// (sequence, head) pairs, at least [`MIN_TILES_PER_SPLIT`] tiles per split.
///
/// INT4 (tensor-core kernel, [`INT4_CTAS_PER_SM`] resident CTAs per SM): an even number of
/// tiles per split (the kernel walks 2 tiles per pipeline stage), and among `want ..= 4 *
/// want` splits (`want` filling every CTA slot once) the one with the shortest critical
/// path `waves * tiles_per_split`, so a launch never ends on a nearly empty wave.
pub fn split_plan(
    format: KvFormat,
    sm_count: usize,
    batch: usize,
    heads_kv: usize,
    max_tiles: usize,
) -> (usize, usize) {
    let tc = format == KvFormat::Int4 && !int4_simt();
    // An unknown variant name fails the launch; the plan falls back to the default's.
    let v = if tc {
        tc_variant().unwrap_or(TC_VARIANTS[0])
    } else {
        TC_VARIANTS[0]
    };
    plan(
        tc,
        v.ctas_per_sm,
        forced_splits(),
        sm_count,
        batch,
        heads_kv,
        max_tiles,
    )
}

/// A compiled instantiation of the INT4 tensor-core decode kernel: `stages` pipeline stages
/// of 64 tokens, launch bounds of `ctas_per_sm` CTAs of 128 threads per SM. Tuning only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TcVariant {
    /// `s{S}m{M}`, as `TRITTER_KV_TC_VARIANT` takes it.
    name: &'static str,
    stages: usize,
    ctas_per_sm: usize,
}

/// The variants compiled in `kv_int4.cu` (`KV_DECODE_TC_ALL`); the first is the default
/// (`kv_decode_int4tc_d*_g*`), the others are `kv_decode_int4tc_s{S}_m{M}_d*_g*`.
const TC_VARIANTS: &[TcVariant] = &[
    TcVariant {
        name: "s3m4",
        stages: 3,
        ctas_per_sm: INT4_CTAS_PER_SM,
    },
    TcVariant {
        name: "s4m3",
        stages: 4,
        ctas_per_sm: 3,
    },
    TcVariant {
        name: "s5m3",
        stages: 5,
        ctas_per_sm: 3,
    },
    TcVariant {
        name: "s6m3",
        stages: 6,
        ctas_per_sm: 3,
    },
    TcVariant {
        name: "s8m2",
        stages: 8,
        ctas_per_sm: 2,
    },
];

impl TcVariant {
    fn is_default(&self) -> bool {
        *self == TC_VARIANTS[0]
    }
    /// Shared-memory bytes of the stages (`StageMem::kBytes`).
    fn stage_bytes(&self, d: usize) -> usize {
        // 64 tokens of K and V: code rows padded to D/2 + 16 bytes, D/32 half2 params each.
        self.stages * 2 * 64 * (d / 2 + 16 + d / 32 * 4)
    }
    /// Whether the stages are dynamic shared memory (`StageMem::kDynamic`: above 40 KB).
    fn dynamic_smem(&self, d: usize) -> Option<usize> {
        let bytes = self.stage_bytes(d);
        (bytes > 40960).then_some(bytes)
    }
    /// The kernel name for head dim `d` and group `g` (validated by `decode_kernel`).
    fn kernel(&self, d: usize, g: usize) -> &'static str {
        static NAMES: OnceLock<HashMap<(&'static str, usize, usize), &'static str>> =
            OnceLock::new();
        let names = NAMES.get_or_init(|| {
            let mut m = HashMap::new();
            for v in TC_VARIANTS.iter().skip(1) {
                for d in [64, 128] {
                    for g in [1, 2, 4, 8] {
                        let n = format!(
                            "kv_decode_int4tc_s{}_m{}_d{d}_g{g}",
                            v.stages, v.ctas_per_sm
                        );
                        m.insert((v.name, d, g), &*Box::leak(n.into_boxed_str()));
                    }
                }
            }
            m
        });
        names.get(&(self.name, d, g)).copied().unwrap_or("")
    }
}

/// Programmatic tuning overrides ([`set_decode_tuning`]); `None` fields fall back to the
/// environment (`TRITTER_KV_TC_VARIANT`, `TRITTER_KV_SPLITS`).
static TUNING: Mutex<(Option<TcVariant>, Option<usize>)> = Mutex::new((None, None));

fn tc_variant_named(name: &str) -> Result<TcVariant> {
    TC_VARIANTS
        .iter()
        .find(|v| v.name == name)
        .copied()
        .ok_or_else(|| {
            let known: Vec<_> = TC_VARIANTS.iter().map(|v| v.name).collect();
            KvError::Unsupported(format!(
                "unknown INT4 tensor-core decode variant {name:?}; compiled: {known:?}"
            ))
        })
}

/// The tensor-core variant in use: [`set_decode_tuning`]'s, else `TRITTER_KV_TC_VARIANT`,
/// else the default.
fn tc_variant() -> Result<TcVariant> {
    if let Some(v) = TUNING.lock().unwrap_or_else(|p| p.into_inner()).0 {
        return Ok(v);
    }
    match std::env::var("TRITTER_KV_TC_VARIANT") {
        Ok(name) if !name.is_empty() => tc_variant_named(&name),
        _ => Ok(TC_VARIANTS[0]),
    }
}

/// The forced number of splits of the INT4 tensor-core kernel, if any: [`set_decode_tuning`]'s,
/// else `TRITTER_KV_SPLITS` (ignored unless a positive integer).
fn forced_splits() -> Option<usize> {
    if let Some(n) = TUNING.lock().unwrap_or_else(|p| p.into_inner()).1 {
        return Some(n);
    }
    std::env::var("TRITTER_KV_SPLITS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
}

/// Tuning only (benches): overrides the INT4 tensor-core decode variant (`"s4m3"`, ...; see
/// [`decode_tc_variants`]) and forces its number of splits (clamped to a valid plan), for
/// every later [`split_plan`] / [`decode_attention_cuda`] of the process. `None` falls back
/// to `TRITTER_KV_TC_VARIANT` / `TRITTER_KV_SPLITS`, then the defaults. Process-wide state:
/// not for production use.
#[doc(hidden)]
pub fn set_decode_tuning(variant: Option<&str>, splits: Option<usize>) -> Result<()> {
    let v = variant.map(tc_variant_named).transpose()?;
    *TUNING.lock().unwrap_or_else(|p| p.into_inner()) = (v, splits.filter(|&n| n > 0));
    Ok(())
}

/// Tuning only: the names of the compiled INT4 tensor-core decode variants, the default
/// first.
#[doc(hidden)]
pub fn decode_tc_variants() -> Vec<&'static str> {
    TC_VARIANTS.iter().map(|v| v.name).collect()
}

/// `TRITTER_KV_INT4_SIMT` set: INT4 decode runs the previous SIMT kernel
/// (`kv_decode_int4_*`, FP32 FMAs) instead of the tensor-core one, for A/B comparisons.
fn int4_simt() -> bool {
    std::env::var_os("TRITTER_KV_INT4_SIMT").is_some()
}

/// `ctas_per_sm` and `forced` (a number of splits, clamped to `1 ..= ceil(max_tiles / 2)`)
/// apply to the tensor-core kernel only.
fn plan(
    tc: bool,
    ctas_per_sm: usize,
    forced: Option<usize>,
    sm_count: usize,
    batch: usize,
    heads_kv: usize,
    max_tiles: usize,
) -> (usize, usize) {
    let max_tiles = max_tiles.max(1);
    let pairs = (batch * heads_kv).max(1);
    let max_splits = max_tiles.div_ceil(MIN_TILES_PER_SPLIT).max(1);
    if !tc {
        let want = (sm_count.max(1) * TARGET_CTAS_PER_SM).div_ceil(pairs);
        let splits = want.clamp(1, max_splits);
        let tiles_per_split = max_tiles.div_ceil(splits);
        (max_tiles.div_ceil(tiles_per_split), tiles_per_split)
    } else if let Some(n) = forced {
        let n = n.clamp(1, max_tiles.div_ceil(2));
        let tps = max_tiles.div_ceil(n);
        let tps = tps + tps % 2;
        (max_tiles.div_ceil(tps), tps)
    } else {
        let slots = sm_count.max(1) * ctas_per_sm;
        // The largest split count that still fits one wave first: on a tie in
        // `waves * tiles_per_split` fewer, longer CTAs win (fewer partials to merge, less
        // per-CTA prologue and epilogue; with 3 CTAs per SM, B = 1, 128K: 49 splits, 1 wave,
        // 98 us vs 98 splits, 2 waves, 104 us on the H100).
        let want = (slots / pairs).clamp(1, max_splits);
        let mut best = (usize::MAX, 1, max_tiles + max_tiles % 2);
        for s in want..=(4 * want).min(max_splits) {
            let tps = max_tiles.div_ceil(s);
            let tps = tps + tps % 2;
            let splits = max_tiles.div_ceil(tps);
            let cost = (pairs * splits).div_ceil(slots) * tps;
            if cost < best.0 {
                best = (cost, splits, tps);
            }
        }
        (best.1, best.2)
    }
}

/// One layer of a [`SlotBatch`] as launch parameters, for a kernel that computes K and V and
/// stores them in the same launch ([`GpuKvCache::write_layer_slots_with`]). The page layout
/// and the group format are `kv_int4_store.cuh`'s (`tritter-kernels-cuda`).
pub struct SlotStore<'a> {
    /// The cache's GPU; the kernel goes on its stream.
    pub gpu: &'a Arc<Gpu>,
    /// `(layers, num_pages, page_bytes)` bytes: the page pool of every layer (a view: the
    /// pool itself stays the cache's).
    pub pool: CudaViewMut<'a, u8>,
    /// `(tokens,)` pool slot `page * page_size + slot` per token of the batch, -1 where the
    /// token is not stored (outside the window).
    pub slots: &'a CudaSlice<i32>,
    /// `(1,)` counter of non-finite groups (stored as zeros instead).
    pub nonfinite: &'a mut CudaSlice<u32>,
    /// Tokens of the batch (rows of the caller's K and V).
    pub tokens: usize,
    /// INT4 or f16 pages.
    pub format: KvFormat,
    /// KV heads per token.
    pub heads_kv: usize,
    /// Values per head (a multiple of 32).
    pub head_dim: usize,
    /// log2 of the page size in tokens.
    pub page_shift: u32,
    /// Pages per layer.
    pub num_pages: usize,
    /// Bytes per page (K and V of every head).
    pub page_bytes: i64,
    /// The layer written.
    pub layer: usize,
}

impl std::fmt::Debug for SlotStore<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotStore")
            .field("tokens", &self.tokens)
            .field("format", &self.format)
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

/// Pool slots of a batch of pending appends (from [`GpuKvCache::slot_batch`]).
#[derive(Debug)]
pub struct SlotBatch {
    tickets: Vec<AppendTicket>,
    tokens: usize,
    /// `(tokens,)` pool slot `page * page_size + slot` per token, -1 where not stored.
    slots: CudaSlice<i32>,
}

impl SlotBatch {
    /// Tokens of all the appends, in ticket order.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// The appends.
    pub fn tickets(&self) -> &[AppendTicket] {
        &self.tickets
    }
}

/// Block tables and lengths of a decode batch on the device; build with
/// [`GpuKvCache::decode_batch`], reuse for every layer of one decode step.
#[derive(Debug)]
pub struct DecodeBatch {
    epoch: u64,
    seqs: Vec<SeqId>,
    lens: Vec<usize>,
    bt_stride: usize,
    max_tiles: usize,
    /// `(B, bt_stride)` physical page per logical page, -1 where evicted or past the end.
    pub block_tables: CudaSlice<i32>,
    /// `(B,)` sequence lengths (the query of sequence b sits at position `len_b - 1`).
    pub seq_lens: CudaSlice<i32>,
}

impl DecodeBatch {
    /// The sequences, in batch order.
    pub fn seqs(&self) -> &[SeqId] {
        &self.seqs
    }
    /// Their lengths.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }
    /// Most tiles any sequence of the batch walks.
    pub fn max_tiles(&self) -> usize {
        self.max_tiles
    }
    /// Block-table entries per sequence (the row stride of `block_tables`).
    pub fn stride(&self) -> usize {
        self.bt_stride
    }
}

/// Split-KV partials: `o` `(B, Hq, splits, D)` f32 and `(m, l)` `(B, Hq, splits, 2)` f32,
/// plus one ticket counter per (sequence, KV head) for the tensor-core kernel's fused merge
/// (the last CTA of a head merges; it resets the counter, so the workspace stays reusable and
/// graph-replayable). Grows on demand; allocate once and reuse (no allocation on the hot path
/// after warm-up). One workspace serves one stream at a time.
pub struct DecodeWorkspace {
    o_part: CudaSlice<f32>,
    ml_part: CudaSlice<f32>,
    tickets: CudaSlice<u32>,
}

impl std::fmt::Debug for DecodeWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeWorkspace")
            .field("o_floats", &self.o_part.len())
            .finish()
    }
}

impl DecodeWorkspace {
    /// A workspace for up to `rows = B * Hq` query rows of `head_dim` with `splits` splits.
    pub fn new(gpu: &Gpu, rows: usize, head_dim: usize, splits: usize) -> Result<Self> {
        let s = gpu.stream();
        Ok(DecodeWorkspace {
            o_part: s
                .alloc_zeros((rows * head_dim * splits).max(1))
                .map_err(alloc_err("decode partial outputs"))?,
            ml_part: s
                .alloc_zeros((rows * 2 * splits).max(2))
                .map_err(alloc_err("decode partial max/sum"))?,
            // B * Hkv <= rows = B * Hq counters
            tickets: s
                .alloc_zeros(rows.max(1))
                .map_err(alloc_err("decode merge tickets"))?,
        })
    }

    /// Grows the workspace to `rows` x `splits` if it is smaller. Refused while the stream
    /// captures a CUDA graph: the allocation would become a node of the graph and the freed
    /// buffers would still be written by its replays; reserve for [`split_plan`]'s splits
    /// before capturing (as the Tritter engine does).
    fn ensure(&mut self, gpu: &Gpu, rows: usize, head_dim: usize, splits: usize) -> Result<()> {
        if self.o_part.len() < rows * head_dim * splits
            || self.ml_part.len() < rows * 2 * splits
            || self.tickets.len() < rows
        {
            // SAFETY: a query on a live stream of the workspace's own handle.
            let status =
                unsafe { cudarc::driver::result::stream::is_capturing(gpu.stream().cu_stream()) };
            if !matches!(
                status,
                Ok(cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
            ) {
                return Err(KvError::Unsupported(format!(
                    "growing the decode workspace to {rows} rows x {splits} splits while the \
                     stream is capturing a CUDA graph (capture status {status:?}): reserve it \
                     for split_plan's splits before the capture"
                )));
            }
            *self = DecodeWorkspace::new(gpu, rows, head_dim, splits)?;
        }
        Ok(())
    }
}

/// The decode kernel of `format`, `d`, `g`; `tc`: INT4 on tensor cores (`kv_decode_int4tc_*`)
/// rather than the SIMT kernel.
fn decode_kernel(format: KvFormat, tc: bool, d: usize, g: usize) -> Result<&'static str> {
    let name = decode_kernel_default(format, tc, d, g)?;
    if tc {
        let v = tc_variant()?;
        if !v.is_default() {
            return Ok(v.kernel(d, g));
        }
    }
    Ok(name)
}

fn decode_kernel_default(format: KvFormat, tc: bool, d: usize, g: usize) -> Result<&'static str> {
    Ok(match (format, d, g) {
        (KvFormat::Int4, 64, 1) if tc => "kv_decode_int4tc_d64_g1",
        (KvFormat::Int4, 64, 1) => "kv_decode_int4_d64_g1",
        (KvFormat::Int4, 64, 2) if tc => "kv_decode_int4tc_d64_g2",
        (KvFormat::Int4, 64, 2) => "kv_decode_int4_d64_g2",
        (KvFormat::Int4, 64, 4) if tc => "kv_decode_int4tc_d64_g4",
        (KvFormat::Int4, 64, 4) => "kv_decode_int4_d64_g4",
        (KvFormat::Int4, 64, 8) if tc => "kv_decode_int4tc_d64_g8",
        (KvFormat::Int4, 64, 8) => "kv_decode_int4_d64_g8",
        (KvFormat::Int4, 128, 1) if tc => "kv_decode_int4tc_d128_g1",
        (KvFormat::Int4, 128, 1) => "kv_decode_int4_d128_g1",
        (KvFormat::Int4, 128, 2) if tc => "kv_decode_int4tc_d128_g2",
        (KvFormat::Int4, 128, 2) => "kv_decode_int4_d128_g2",
        (KvFormat::Int4, 128, 4) if tc => "kv_decode_int4tc_d128_g4",
        (KvFormat::Int4, 128, 4) => "kv_decode_int4_d128_g4",
        (KvFormat::Int4, 128, 8) if tc => "kv_decode_int4tc_d128_g8",
        (KvFormat::Int4, 128, 8) => "kv_decode_int4_d128_g8",
        (KvFormat::F16, 64, 1) => "kv_decode_f16_d64_g1",
        (KvFormat::F16, 64, 2) => "kv_decode_f16_d64_g2",
        (KvFormat::F16, 64, 4) => "kv_decode_f16_d64_g4",
        (KvFormat::F16, 64, 8) => "kv_decode_f16_d64_g8",
        (KvFormat::F16, 128, 1) => "kv_decode_f16_d128_g1",
        (KvFormat::F16, 128, 2) => "kv_decode_f16_d128_g2",
        (KvFormat::F16, 128, 4) => "kv_decode_f16_d128_g4",
        (KvFormat::F16, 128, 8) => "kv_decode_f16_d128_g8",
        _ => {
            return Err(KvError::Unsupported(format!(
                "the CUDA decode kernel takes head_dim 64 or 128 and heads_q / heads_kv in {{1, 2, 4, 8}}; got head_dim {d}, group {g} (the CPU reference takes any)"
            )))
        }
    })
}

/// Decode attention on the GPU, one query token per sequence of `batch`:
/// `q` `(B, heads_q, head_dim)` f16 -> `out` `(B, heads_q, head_dim)` f16, over layer `layer`
/// of `cache` (INT4 or f16 pages), with the cache's window and sinks, `softmax(q·kᵀ *
/// softmax_scale)·v`. Split-KV over [`split_plan`] CTAs; the splits are merged by the last
/// CTA of each (sequence, KV head) (INT4 tensor-core kernel) or by a reduction kernel (f16
/// and SIMT INT4 kernels); asynchronous. Launched with programmatic dependent launch: the
/// kernels wait for the previous kernel on the stream before their first read, so they can
/// be resident before it ends (`TRITTER_PDL=0` turns that off).
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_cuda(
    cache: &GpuKvCache,
    layer: usize,
    batch: &DecodeBatch,
    q: &CudaView<'_, f16>,
    heads_q: usize,
    softmax_scale: f32,
    out: &mut CudaViewMut<'_, f16>,
    ws: &mut DecodeWorkspace,
) -> Result<()> {
    let blocks = cache.blocks();
    if batch.epoch != blocks.epoch() {
        return Err(KvError::StaleBatch {
            batch: batch.epoch,
            cache: blocks.epoch(),
        });
    }
    let cfg = blocks.config();
    let (hkv, d) = (cfg.heads_kv, cfg.head_dim);
    let g = gqa_group(heads_q, hkv)?;
    let tc = cfg.format == KvFormat::Int4 && !int4_simt();
    let name = decode_kernel(cfg.format, tc, d, g)?;
    let b = batch.seqs.len();
    let shape = || format!("(B={b}, heads_q={heads_q}, head_dim={d})");
    check_len("q", q.len(), b * heads_q * d, shape)?;
    check_len("out", out.len(), b * heads_q * d, shape)?;
    if !softmax_scale.is_finite() {
        return Err(KvError::NonFinite {
            what: "softmax_scale",
            index: 0,
            value: softmax_scale.to_string(),
        });
    }
    for &s in &batch.seqs {
        blocks.check_readable(s, layer)?;
    }
    if b == 0 {
        return Ok(());
    }
    let gpu = cache.gpu();
    let variant = if tc { tc_variant()? } else { TC_VARIANTS[0] };
    let (splits, tps) = plan(
        tc,
        variant.ctas_per_sm,
        if tc { forced_splits() } else { None },
        gpu.info().sm_count as usize,
        b,
        hkv,
        batch.max_tiles,
    );
    let rows = b * heads_q;
    ws.ensure(gpu, rows, d, splits)?;
    let pb = cfg.layout().page_bytes();
    let plane = cfg.num_pages * pb;
    let pool = cache.pool().slice(layer * plane..(layer + 1) * plane);
    let (sinks, window) = match cfg.window {
        None => (0i32, i32::MAX),
        Some(w) => (
            w.sinks.min(i32::MAX as usize) as i32,
            w.window.min(i32::MAX as usize) as i32,
        ),
    };
    let i = |x: usize| x as i32; // bounded by validate() (i32 page ids, lengths, heads)
    let (stride, hkv_i, shift, np) = (
        i(batch.bt_stride),
        i(hkv),
        i(cfg.page_size.trailing_zeros() as usize),
        i(cfg.num_pages),
    );
    let (tps_i, splits_i) = (i(tps), i(splits));
    let page_bytes = pb as i64;
    let scale_log2 = softmax_scale * std::f32::consts::LOG2_E;
    let func = gpu.function(&images::KV_INT4, name)?;
    // Tuning variants: stages above 40 KB are dynamic shared memory (raise the limit), and
    // ask for the largest shared-memory carveout so `ctas_per_sm` CTAs can be resident.
    let dyn_smem = if tc && !variant.is_default() {
        use cudarc::driver::sys::CUfunction_attribute_enum as A;
        let dyn_smem = variant.dynamic_smem(d).unwrap_or(0);
        let attr = |a, v: usize| {
            func.set_attribute(a, v as i32)
                .map_err(KernelError::driver(format!(
                    "setting an attribute of {name}"
                )))
        };
        attr(A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dyn_smem)?;
        attr(A::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100)?;
        dyn_smem
    } else {
        0
    };
    let mut args = KernelArgs::new();
    args.ptr(gpu, q)
        .ptr(gpu, &pool)
        .ptr(gpu, &batch.block_tables)
        .ptr(gpu, &batch.seq_lens)
        .i32(stride)
        .i32(hkv_i)
        .i32(shift)
        .i32(np)
        .i64(page_bytes)
        .i32(sinks)
        .i32(window)
        .i32(tps_i)
        .i32(splits_i)
        .f32(scale_log2)
        .ptr_mut(gpu, &mut ws.o_part)
        .ptr_mut(gpu, &mut ws.ml_part);
    if tc {
        args.ptr_mut(gpu, &mut *out).ptr_mut(gpu, &mut ws.tickets);
    }
    let cfg_split = LaunchConfig {
        grid_dim: (splits as u32, hkv as u32, b as u32),
        block_dim: (DECODE_THREADS, 1, 1),
        shared_mem_bytes: dyn_smem as u32,
    };
    // SAFETY: matches `kv_decode_*(const __half*, const uint8_t*, const int*, const int*, int,
    // int, int, int, long long, int, int, int, int, float, float*, float2*)`. q holds B * Hq *
    // D values (checked); the pool view is this layer's num_pages * page_bytes bytes and
    // every page id read from the block tables is bounds-checked by the kernel; block tables
    // are (B, stride) and the kernel reads only logical pages of visible tokens (< len <=
    // stride * page_size); the workspace holds rows * splits * D and rows * splits * 2 floats
    // and rows >= B * Hkv tickets (zeroed at allocation; the kernel's last CTA per head puts
    // its counter back to 0). The tensor-core kernels take `(__half* out, unsigned*
    // tickets)` after those: out holds B * Hq * D halves (checked). PDL: the kernel's first
    // statement is its griddepcontrol.wait (q and the new token's K/V come from the kernel
    // before it), so it may be launched before that kernel ends.
    unsafe { gpu.launch_pdl(&func, name, cfg_split, args) }?;
    if tc {
        return Ok(());
    }

    let reduce = gpu.function(&images::KV_INT4, "kv_decode_reduce")?;
    let mut args = KernelArgs::new();
    args.ptr(gpu, &ws.o_part)
        .ptr(gpu, &ws.ml_part)
        .ptr_mut(gpu, out)
        .i32(i(splits))
        .i32(i(d));
    let cfg_reduce = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `kv_decode_reduce(const float*, const float2*, __half*, int, int)`;
    // reads rows * splits partials written above, writes rows * D outputs (out checked); it
    // waits (griddepcontrol.wait) before its first read, so PDL is allowed.
    unsafe { gpu.launch_pdl(&reduce, "kv_decode_reduce", cfg_reduce, args) }?;
    Ok(())
}
