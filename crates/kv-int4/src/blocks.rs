//! Host-side bookkeeping of the paged cache, identical for CPU and GPU storage: the page
//! allocator (free list + reference counts), per-sequence block tables, the sliding window
//! with sinks, fork (shared full pages, copied tail page) and free.
//!
//! Every operation validates completely before it changes anything, so an error leaves the
//! bookkeeping exactly as it was. Safety argument for "no sequence reads or overwrites
//! another's pages": a page is written only at slots `>= len` of the sequence whose block
//! table maps it, and such a page always has reference count 1 (new pages are private; the
//! one partially filled tail page is copied on fork, never shared); pages are read only
//! through the reader's own block table at positions `< len`, every one of which it wrote
//! itself or inherited by fork.

use std::collections::BTreeMap;

use crate::config::CacheConfig;
use crate::{KvError, Result};

/// Identifies a sequence of a cache. Ids are never reused, so a freed id stays invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub(crate) u64);

impl SeqId {
    /// The raw id (for logs and error messages).
    pub fn raw(self) -> u64 {
        self.0
    }
}

/// An append whose pages are reserved: tokens `start..end` of `seq` now count as part of
/// the sequence, and each layer's K/V must be written once with `write_layer` before that
/// layer can be attended to or the sequence appended to or forked again.
///
/// Why two steps: an engine runs layer by layer, so layer `l`'s new K/V exist only after
/// layers `0..l` ran, yet all layers must share one block table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendTicket {
    pub(crate) seq: SeqId,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

impl AppendTicket {
    /// The sequence appended to.
    pub fn seq(&self) -> SeqId {
        self.seq
    }
    /// First appended position.
    pub fn start(&self) -> usize {
        self.start
    }
    /// One past the last appended position.
    pub fn end(&self) -> usize {
        self.end
    }
    /// Tokens appended.
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    /// True for an empty append (never produced by the cache).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    start: usize,
    end: usize,
    written: Vec<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Sequence {
    len: usize,
    /// Logical page -> physical page; `None` once evicted by the window (or never needed).
    pages: Vec<Option<u32>>,
    pending: Option<Pending>,
}

/// A page copy the storage must perform for a fork (all layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageCopy {
    pub src: u32,
    pub dst: u32,
}

/// The allocator and block tables of one cache (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockManager {
    cfg: CacheConfig,
    /// Free page ids, popped from the end (initially so that page 0 is handed out first).
    free: Vec<u32>,
    /// References to each page from block tables.
    refs: Vec<u32>,
    seqs: BTreeMap<u64, Sequence>,
    next_id: u64,
    epoch: u64,
}

impl BlockManager {
    /// Empty bookkeeping for `cfg` (validated).
    pub fn new(cfg: CacheConfig) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.num_pages;
        Ok(BlockManager {
            free: (0..n as u32).rev().collect(),
            refs: vec![0; n],
            cfg,
            seqs: BTreeMap::new(),
            next_id: 0,
            epoch: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// Incremented by every operation that changes a block table (append, fork, free);
    /// decode batches record it and are refused once it moved.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Pages currently free.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Live sequence ids, ascending.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().map(|&k| SeqId(k))
    }

    /// Starts a new, empty sequence (no pages are taken until it is appended to).
    pub fn add_sequence(&mut self) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(
            id,
            Sequence {
                len: 0,
                pages: Vec::new(),
                pending: None,
            },
        );
        SeqId(id)
    }

    fn seq(&self, id: SeqId) -> Result<&Sequence> {
        self.seqs.get(&id.0).ok_or(KvError::UnknownSequence(id.0))
    }

    /// Tokens in the sequence (including a pending append).
    pub fn len(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.len)
    }

    /// The block table: physical page of each logical page, `None` where evicted.
    pub fn block_table(&self, id: SeqId) -> Result<&[Option<u32>]> {
        Ok(&self.seq(id)?.pages)
    }

    /// Physical page and slot of token `pos` of `id`, or `None` when it is evicted or
    /// `pos >= len`.
    pub fn locate(&self, id: SeqId, pos: usize) -> Result<Option<(u32, usize)>> {
        let s = self.seq(id)?;
        let p = self.cfg.page_size;
        if pos >= s.len {
            return Ok(None);
        }
        Ok(s.pages
            .get(pos / p)
            .copied()
            .flatten()
            .map(|pg| (pg, pos % p)))
    }

    /// `(sinks_end, window_start)`: a sequence of `len` tokens, queried at position
    /// `len - 1`, sees tokens `0..sinks_end` and `window_start..len`.
    pub fn visible_ranges(&self, len: usize) -> (usize, usize) {
        visible_ranges(&self.cfg, len)
    }

    /// True when logical page `k` must stay mapped for a sequence of `len` tokens: it holds a
    /// sink, or a token some future query can see (`j >= len - window`).
    fn page_needed(&self, k: usize, len: usize) -> bool {
        let p = self.cfg.page_size;
        match self.cfg.window {
            None => true,
            Some(w) => k * p < w.sinks || (k + 1) * p + w.window > len,
        }
    }

    /// Reference count of page `page` (0 when free).
    pub fn page_refs(&self, page: u32) -> u32 {
        self.refs[page as usize]
    }

    fn check_no_pending(&self, id: SeqId, s: &Sequence, op: &'static str) -> Result<()> {
        match &s.pending {
            None => Ok(()),
            Some(p) => Err(KvError::PendingWrite {
                seq: id.0,
                layer: p.written.iter().position(|w| !w).unwrap_or(0),
                start: p.start,
                end: p.end,
                op,
            }),
        }
    }

    /// Fails unless layer `layer` of `id` is fully written and the sequence is not empty:
    /// the precondition of decode attention.
    pub fn check_readable(&self, id: SeqId, layer: usize) -> Result<()> {
        self.check_layer(layer)?;
        let s = self.seq(id)?;
        if s.len == 0 {
            return Err(KvError::EmptySequence(id.0));
        }
        if let Some(p) = &s.pending {
            if !p.written[layer] {
                return Err(KvError::PendingWrite {
                    seq: id.0,
                    layer,
                    start: p.start,
                    end: p.end,
                    op: "attending to it",
                });
            }
        }
        Ok(())
    }

    pub(crate) fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.cfg.layers {
            return Err(KvError::OutOfRange {
                what: "layer",
                actual: layer,
                bound: self.cfg.layers,
            });
        }
        Ok(())
    }

    /// Reserves `n` tokens at position `pos` (which must equal the current length): takes
    /// the pages the tokens need, returns pages the window no longer needs to the pool.
    /// Errors (unknown id, wrong position, too long, pool exhausted, previous append not
    /// fully written) change nothing.
    pub fn begin_append(&mut self, id: SeqId, pos: usize, n: usize) -> Result<AppendTicket> {
        let s = self.seq(id)?;
        self.check_no_pending(id, s, "appending again")?;
        if pos != s.len {
            return Err(KvError::BadPosition {
                seq: id.0,
                actual: pos,
                expected: s.len,
            });
        }
        if n == 0 {
            return Err(KvError::BadConfig {
                what: "n (tokens to append)",
                actual: 0,
                expected: "at least 1",
            });
        }
        let new_len = s.len.saturating_add(n);
        if new_len > self.cfg.max_seq_len {
            return Err(KvError::SequenceTooLong {
                seq: id.0,
                len: s.len,
                n,
                max: self.cfg.max_seq_len,
            });
        }
        let total_pages = self.cfg.pages_for(new_len);
        let released = s
            .pages
            .iter()
            .enumerate()
            .filter(|&(k, pg)| {
                pg.is_some_and(|pg| self.refs[pg as usize] == 1) && !self.page_needed(k, new_len)
            })
            .count();
        let needed = (0..total_pages)
            .filter(|&k| {
                s.pages.get(k).copied().flatten().is_none() && self.page_needed(k, new_len)
            })
            .count();
        if needed > self.free.len() + released {
            return Err(KvError::PoolExhausted {
                needed,
                free: self.free.len() + released,
                total: self.cfg.num_pages,
            });
        }
        // Validated: mutate. Evict first, so this append may reuse the released pages.
        let layers = self.cfg.layers;
        let mut s = self.seqs.remove(&id.0).expect("checked above");
        for (k, slot) in s.pages.iter_mut().enumerate() {
            if let Some(pg) = *slot {
                if !self.page_needed(k, new_len) {
                    self.release(pg);
                    *slot = None;
                }
            }
        }
        s.pages.resize(total_pages, None);
        for (k, slot) in s.pages.iter_mut().enumerate() {
            if slot.is_none() && self.page_needed(k, new_len) {
                let pg = self.free.pop().expect("pool checked above");
                self.refs[pg as usize] = 1;
                *slot = Some(pg);
            }
        }
        s.pending = Some(Pending {
            start: pos,
            end: new_len,
            written: vec![false; layers],
        });
        s.len = new_len;
        self.seqs.insert(id.0, s);
        self.epoch += 1;
        Ok(AppendTicket {
            seq: id,
            start: pos,
            end: new_len,
        })
    }

    /// Fails unless `ticket` is the pending append of its sequence and `layer` of it is not
    /// written yet. Call before writing; the cache's write marks the layer written after.
    pub fn check_ticket(&self, ticket: &AppendTicket, layer: usize) -> Result<()> {
        self.check_layer(layer)?;
        let s = self.seq(ticket.seq)?;
        let stale = |why| KvError::StaleTicket {
            seq: ticket.seq.0,
            start: ticket.start,
            end: ticket.end,
            why,
        };
        match &s.pending {
            None => Err(stale("the sequence has no pending append")),
            Some(p) if p.start != ticket.start || p.end != ticket.end => Err(stale(
                "the sequence's pending append covers other positions",
            )),
            Some(p) if p.written[layer] => Err(stale("this layer is already written")),
            Some(_) => Ok(()),
        }
    }

    /// What, if anything, distinguishes `self` from `earlier` beyond layers of pending
    /// appends marked written since (an append completed by its last layer included): the
    /// condition for putting `earlier` back (`PagedKvCache::restore_bookkeeping`), under
    /// which no page, sequence or id changes hands.
    pub(crate) fn differs_beyond_written(&self, earlier: &BlockManager) -> Option<&'static str> {
        if self.cfg != earlier.cfg {
            return Some("the configuration");
        }
        if self.epoch != earlier.epoch {
            return Some("the epoch (an append, fork or free happened since)");
        }
        if self.free != earlier.free || self.refs != earlier.refs {
            return Some("the page allocator");
        }
        if self.next_id != earlier.next_id {
            return Some("the sequence ids (a sequence was added since)");
        }
        if self.seqs.len() != earlier.seqs.len() {
            return Some("the set of sequences");
        }
        for ((id, now), (id0, was)) in self.seqs.iter().zip(&earlier.seqs) {
            if id != id0 || now.len != was.len || now.pages != was.pages {
                return Some("a sequence's length or block table");
            }
            let same_append = match (&now.pending, &was.pending) {
                (Some(p), Some(q)) => p.start == q.start && p.end == q.end,
                (None, Some(_)) | (None, None) => true,
                (Some(_), None) => false,
            };
            if !same_append {
                return Some("a sequence's pending append");
            }
        }
        None
    }

    /// Marks `layer` of the pending append written; the append completes with its last
    /// layer. `ticket` must have passed [`check_ticket`](Self::check_ticket).
    pub(crate) fn finish_layer(&mut self, ticket: &AppendTicket, layer: usize) {
        let s = self.seqs.get_mut(&ticket.seq.0).expect("ticket checked");
        let p = s.pending.as_mut().expect("ticket checked");
        p.written[layer] = true;
        if p.written.iter().all(|&w| w) {
            s.pending = None;
        }
    }

    /// `(position, page, slot)` of every token of `ticket` that has a page (tokens the window
    /// already evicted have none and are not stored).
    pub(crate) fn ticket_slots(&self, ticket: &AppendTicket) -> Vec<(usize, u32, usize)> {
        let s = &self.seqs[&ticket.seq.0];
        let p = self.cfg.page_size;
        (ticket.start..ticket.end)
            .filter_map(|t| s.pages[t / p].map(|pg| (t, pg, t % p)))
            .collect()
    }

    /// Logical page range `first..first + pages.len()` covering `ticket`, with each page as
    /// an `i32` (-1 where none): the form the GPU write kernel takes.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn ticket_pages(&self, ticket: &AppendTicket) -> (usize, Vec<i32>) {
        let s = &self.seqs[&ticket.seq.0];
        let p = self.cfg.page_size;
        let first = ticket.start / p;
        let last = (ticket.end - 1) / p;
        let pages = s.pages[first..=last]
            .iter()
            .map(|pg| pg.map_or(-1, |v| v as i32))
            .collect();
        (first, pages)
    }

    /// Starts a new sequence with the same tokens as `id`: full pages are shared (reference
    /// counted; never written again), the partially filled tail page is copied, so it costs
    /// at most one free page. Returns the new id and the page copy the storage must do.
    pub(crate) fn fork(&mut self, id: SeqId) -> Result<(SeqId, Option<PageCopy>)> {
        let s = self.seq(id)?;
        self.check_no_pending(id, s, "forking it")?;
        let p = self.cfg.page_size;
        let tail = (s.len % p != 0).then(|| s.len / p);
        if tail.is_some() && self.free.is_empty() {
            return Err(KvError::PoolExhausted {
                needed: 1,
                free: 0,
                total: self.cfg.num_pages,
            });
        }
        let mut pages = s.pages.clone();
        let len = s.len;
        let mut copy = None;
        for (k, pg) in pages.iter_mut().enumerate() {
            if let Some(src) = *pg {
                if Some(k) == tail {
                    let dst = self.free.pop().expect("checked above");
                    self.refs[dst as usize] = 1;
                    *pg = Some(dst);
                    copy = Some(PageCopy { src, dst });
                } else {
                    self.refs[src as usize] += 1;
                }
            }
        }
        let new = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(
            new.0,
            Sequence {
                len,
                pages,
                pending: None,
            },
        );
        self.epoch += 1;
        Ok((new, copy))
    }

    /// Removes `id`, returning every page it alone held to the pool.
    pub fn free(&mut self, id: SeqId) -> Result<()> {
        let s = self
            .seqs
            .remove(&id.0)
            .ok_or(KvError::UnknownSequence(id.0))?;
        for pg in s.pages.into_iter().flatten() {
            self.release(pg);
        }
        self.epoch += 1;
        Ok(())
    }

    fn release(&mut self, pg: u32) {
        let r = &mut self.refs[pg as usize];
        *r -= 1;
        if *r == 0 {
            self.free.push(pg);
        }
    }

    /// Checks the allocator's invariants: every page is either free (reference count 0,
    /// listed once) or referenced exactly `refs` times by block tables; a sequence's tail
    /// page (the one the next append writes) is private. For tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let mut counted = vec![0u32; self.cfg.num_pages];
        let p = self.cfg.page_size;
        for (id, s) in &self.seqs {
            if s.pages.len() != s.len.div_ceil(p) {
                return Err(format!(
                    "seq {id}: {} block-table entries for len {}",
                    s.pages.len(),
                    s.len
                ));
            }
            for (k, pg) in s.pages.iter().enumerate() {
                if pg.is_some() != self.page_needed(k, s.len) {
                    return Err(format!(
                        "seq {id}: page {k} mapped = {}, needed = {}",
                        pg.is_some(),
                        !pg.is_some()
                    ));
                }
                if let Some(pg) = pg {
                    counted[*pg as usize] += 1;
                }
            }
            if s.len % p != 0 {
                let tail = s.pages[s.len / p].ok_or(format!("seq {id}: tail page unmapped"))?;
                if self.refs[tail as usize] != 1 {
                    return Err(format!("seq {id}: tail page {tail} is shared"));
                }
            }
        }
        let mut is_free = vec![false; self.cfg.num_pages];
        for &f in &self.free {
            if std::mem::replace(&mut is_free[f as usize], true) {
                return Err(format!("page {f} listed free twice"));
            }
        }
        for pg in 0..self.cfg.num_pages {
            if counted[pg] != self.refs[pg] {
                return Err(format!(
                    "page {pg}: refs {} but {} references",
                    self.refs[pg], counted[pg]
                ));
            }
            if is_free[pg] != (counted[pg] == 0) {
                return Err(format!(
                    "page {pg}: free = {} with {} references",
                    is_free[pg], counted[pg]
                ));
            }
        }
        Ok(())
    }
}

/// `(sinks_end, window_start)` for a sequence of `len` tokens of a cache configured with
/// `cfg`'s window (see [`BlockManager::visible_ranges`]).
pub fn visible_ranges(cfg: &CacheConfig, len: usize) -> (usize, usize) {
    match cfg.window {
        None => (len, len),
        Some(w) => {
            let sinks = w.sinks.min(len);
            (sinks, len.saturating_sub(w.window).max(sinks))
        }
    }
}

/// True when the decode query at position `p` sees token `j` under `cfg`'s window:
/// `j <= p` and (`j < sinks` or `p - window < j`).
pub fn is_visible(cfg: &CacheConfig, j: usize, p: usize) -> bool {
    j <= p
        && match cfg.window {
            None => true,
            Some(w) => j < w.sinks || j + w.window > p,
        }
}
