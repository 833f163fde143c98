//! The KV cache of the CPU engine: K (after QK-Norm and RoPE) and V of every layer for
//! each live sequence, with the config's sliding window and attention sinks.
//!
//! Two stores behind one type, [`KvCache`]:
//! * [`KvCacheFormat::F32`]: per sequence and layer, the first `S` sink tokens plus a ring
//!   of the last `W` tokens (or every token without a window), exact f32. Memory per
//!   sequence is bounded by `S + W` tokens, so contexts far longer than the window decode
//!   in constant memory.
//! * [`KvCacheFormat::Int4`] / [`KvCacheFormat::F16`]: `kv_int4`'s paged cache, one pool of
//!   pages shared by all sequences (block tables per sequence, pages returned to the pool as
//!   the window slides past them; DESIGN.md section 4 format), the layout the GPU engine
//!   uses. Values are quantized on write and dequantized on read by `kv_int4`.
//!
//! A forward round appends `n` tokens to a sequence: [`KvCache::begin`] reserves them,
//! each layer reads the keys stored before the round ([`KvCache::old_runs`]) and, after its
//! attention, writes the round's keys ([`KvCache::write`]). Queries of the round see the
//! round's own keys from the layer's activations, rounded as the store rounds them
//! ([`KvCache::as_stored`]), so a round never reads what it writes, yet every query sees
//! every key exactly as stored: the logits do not depend on how a prompt is split into
//! rounds, whatever the format. For the paged store a round must not evict a page that one of its queries still
//! needs; [`KvCache::max_chunk`] bounds the round's length accordingly.

use std::borrow::Cow;
use std::collections::BTreeMap;

use kv_int4::{AppendTicket, CacheConfig, CpuKvCache, KvFormat};

use crate::config::TritterConfig;
use crate::{Result, TritterError};

/// How K and V are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvCacheFormat {
    /// Exact f32, sinks + ring per sequence (4 bytes per value).
    F32,
    /// `kv_int4`'s paged cache in f16 (2 bytes per value).
    F16,
    /// `kv_int4`'s paged cache in INT4 groups of 32 with f16 scale and minimum (0.625 bytes
    /// per value); needs `head_dim % 32 == 0`.
    Int4,
}

/// Settings of a [`KvCache`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvCacheOptions {
    /// Storage format.
    pub format: KvCacheFormat,
    /// Tokens per page of the paged formats (a power of two in 8..=256).
    pub page_size: usize,
    /// Sequences the paged pool is sized for (each at the worst case: sinks plus window, or
    /// `max_position_embeddings` without a window).
    pub max_sequences: usize,
    /// Pool size in tokens, overriding the `max_sequences` sizing (paged formats).
    pub pool_tokens: Option<usize>,
    /// Tokens of one sequence processed per forward round (prefill chunk): bounds the
    /// activations of a round and lets other sequences' decode steps interleave with a long
    /// prompt in [`crate::engine::generate_batch`].
    pub max_prefill_chunk: usize,
}

impl KvCacheOptions {
    /// INT4 when the config sets `int4_kv_cache`, else f32; pages of 32 tokens, 8
    /// sequences, prefill chunks of 512 tokens.
    pub fn for_config(config: &TritterConfig) -> Self {
        KvCacheOptions {
            format: if config.int4_kv_cache {
                KvCacheFormat::Int4
            } else {
                KvCacheFormat::F32
            },
            page_size: kv_int4::DEFAULT_PAGE_SIZE,
            max_sequences: 8,
            pool_tokens: None,
            max_prefill_chunk: 512,
        }
    }
}

/// A sequence of a [`KvCache`]; ids are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(u64);

impl SequenceId {
    /// The raw id (logs, error messages).
    pub fn raw(self) -> u64 {
        self.0
    }

    /// The id `raw` (for the other engines' caches, which number their sequences the same way).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn from_raw(raw: u64) -> Self {
        SequenceId(raw)
    }
}

/// One layer of one sequence in the f32 store: sinks `(S, Hkv, D)` and the ring (or every
/// token) `(slots, Hkv, D)`.
#[derive(Debug, Clone, Default)]
struct F32Layer {
    sink_k: Vec<f32>,
    sink_v: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

#[derive(Debug, Clone)]
enum SeqStore {
    F32(Vec<F32Layer>),
    Paged(kv_int4::SeqId),
}

#[derive(Debug, Clone)]
struct SeqState {
    /// Tokens stored (or reserved by a round in progress).
    len: usize,
    store: SeqStore,
}

/// Keys and values of the consecutive positions `start..start + len`, each `(len, Hkv, D)`.
#[derive(Debug, Clone)]
pub(crate) struct KeyRun<'a> {
    pub start: usize,
    pub len: usize,
    pub k: Cow<'a, [f32]>,
    pub v: Cow<'a, [f32]>,
}

/// The tokens a round appends to a sequence (from [`KvCache::begin`]).
#[derive(Debug)]
pub(crate) struct Append {
    pub seq: SequenceId,
    pub start: usize,
    pub len: usize,
    ticket: Option<AppendTicket>,
}

/// The KV cache of every live sequence of a [`crate::engine::CpuEngine`] (see the module
/// docs). Create it with [`crate::engine::CpuEngine::new_cache`].
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: usize,
    heads_kv: usize,
    head_dim: usize,
    /// `(window W, sinks S)`.
    window: Option<(usize, usize)>,
    max_len: usize,
    options: KvCacheOptions,
    paged: Option<CpuKvCache>,
    seqs: BTreeMap<u64, SeqState>,
    next_id: u64,
}

impl KvCache {
    /// An empty cache for `config` (validated) with `options`.
    pub fn new(config: &TritterConfig, options: &KvCacheOptions) -> Result<Self> {
        config.validate()?;
        if options.max_prefill_chunk == 0 {
            return Err(TritterError::argument(
                "max_prefill_chunk",
                0,
                "expected >= 1 token per forward round",
            ));
        }
        let (layers, heads_kv, head_dim) =
            (config.num_layers, config.num_kv_heads, config.head_dim());
        let window = config.sliding_window.map(|w| (w, config.attention_sinks));
        let max_len = config.max_position_embeddings;
        let paged = paged_config(config, options)?
            .map(CpuKvCache::new)
            .transpose()?;
        Ok(KvCache {
            layers,
            heads_kv,
            head_dim,
            window,
            max_len,
            options: options.clone(),
            paged,
            seqs: BTreeMap::new(),
            next_id: 0,
        })
    }

    /// The options it was made with.
    pub fn options(&self) -> &KvCacheOptions {
        &self.options
    }

    /// The storage format.
    pub fn format(&self) -> KvCacheFormat {
        self.options.format
    }

    /// Starts an empty sequence.
    pub fn add_sequence(&mut self) -> SequenceId {
        let id = self.next_id;
        self.next_id += 1;
        let store = match &mut self.paged {
            Some(p) => SeqStore::Paged(p.add_sequence()),
            None => SeqStore::F32(vec![F32Layer::default(); self.layers]),
        };
        self.seqs.insert(id, SeqState { len: 0, store });
        SequenceId(id)
    }

    /// Frees a sequence (and its pages).
    pub fn free(&mut self, seq: SequenceId) -> Result<()> {
        let state = self.seqs.remove(&seq.0).ok_or_else(|| unknown(seq))?;
        if let (SeqStore::Paged(id), Some(p)) = (state.store, &mut self.paged) {
            p.free(id)?;
        }
        Ok(())
    }

    /// Tokens stored for `seq` (its next position).
    pub fn len(&self, seq: SequenceId) -> Result<usize> {
        Ok(self.state(seq)?.len)
    }

    /// Live sequences, ascending.
    pub fn sequences(&self) -> impl Iterator<Item = SequenceId> + '_ {
        self.seqs.keys().map(|&k| SequenceId(k))
    }

    /// Pages free in the paged pool (`None` for the f32 store).
    pub fn free_pages(&self) -> Option<usize> {
        self.paged.as_ref().map(|p| p.blocks().free_pages())
    }

    /// Largest position + 1 a sequence may reach (`max_position_embeddings`).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    fn state(&self, seq: SequenceId) -> Result<&SeqState> {
        self.seqs.get(&seq.0).ok_or_else(|| unknown(seq))
    }

    /// The longest round (at most `wanted` tokens, at most `max_prefill_chunk`) that `seq`
    /// can append now without the paged store evicting a page one of the round's queries
    /// still reads. With window `W`, page `P` and the round starting at `start`, the oldest
    /// key the first query needs is `t0 = start + 1 - W`, and a round of `c` tokens keeps
    /// its page iff `c <= P - t0 mod P` (`c <= P - t0` while `t0 <= 0`).
    pub(crate) fn max_chunk(&self, seq: SequenceId, wanted: usize) -> Result<usize> {
        let start = self.len(seq)?;
        let mut c = wanted.min(self.options.max_prefill_chunk);
        if let (Some(_), Some((w, _))) = (&self.paged, self.window) {
            let p = self.options.page_size as i64;
            let t0 = start as i64 + 1 - w as i64;
            let safe = if t0 <= 0 { p - t0 } else { p - t0 % p };
            c = c.min(safe.max(1) as usize);
        }
        Ok(c.max(1))
    }

    /// Reserves `n` tokens at the end of `seq` for a round.
    pub(crate) fn begin(&mut self, seq: SequenceId, n: usize) -> Result<Append> {
        let state = self.seqs.get_mut(&seq.0).ok_or_else(|| unknown(seq))?;
        let start = state.len;
        if start + n > self.max_len {
            return Err(TritterError::SequenceTooLong {
                len: start + n,
                max: self.max_len,
            });
        }
        let ticket = match (&state.store, &mut self.paged) {
            (SeqStore::Paged(id), Some(p)) => Some(p.begin_append(*id, start, n)?),
            _ => None,
        };
        state.len = start + n;
        Ok(Append {
            seq,
            start,
            len: n,
            ticket,
        })
    }

    /// The keys a round starting at `start` may need from the store, for `layer`: the sinks
    /// `0..min(S, start)` and the window `max(S, start + 1 - W)..start` (every token
    /// `0..start` without a window), as ascending runs of consecutive positions.
    pub(crate) fn old_runs(
        &self,
        seq: SequenceId,
        layer: usize,
        start: usize,
    ) -> Result<Vec<KeyRun<'_>>> {
        let (sinks, lo) = match self.window {
            Some((w, s)) => (s.min(start), s.max((start + 1).saturating_sub(w))),
            None => (0, 0),
        };
        let row = self.heads_kv * self.head_dim;
        let mut runs = Vec::new();
        match &self.state(seq)?.store {
            SeqStore::F32(layers) => {
                let l = &layers[layer];
                if sinks > 0 {
                    runs.push(KeyRun {
                        start: 0,
                        len: sinks,
                        k: Cow::Borrowed(&l.sink_k[..sinks * row]),
                        v: Cow::Borrowed(&l.sink_v[..sinks * row]),
                    });
                }
                match self.window {
                    None if start > 0 => runs.push(KeyRun {
                        start: 0,
                        len: start,
                        k: Cow::Borrowed(&l.k[..start * row]),
                        v: Cow::Borrowed(&l.v[..start * row]),
                    }),
                    Some((w, _)) if lo < start => {
                        // Ring slot of position p is p % W; split where the slots wrap.
                        let mut p = lo;
                        while p < start {
                            let slot = p % w;
                            let n = (start - p).min(w - slot);
                            runs.push(KeyRun {
                                start: p,
                                len: n,
                                k: Cow::Borrowed(&l.k[slot * row..(slot + n) * row]),
                                v: Cow::Borrowed(&l.v[slot * row..(slot + n) * row]),
                            });
                            p += n;
                        }
                    }
                    _ => {}
                }
            }
            SeqStore::Paged(id) => {
                let cache = self
                    .paged
                    .as_ref()
                    .expect("paged sequences live in a paged cache");
                for (a, b) in [(0, sinks), (lo, start)] {
                    if a >= b {
                        continue;
                    }
                    let (mut k, mut v) = (Vec::with_capacity((b - a) * row), Vec::new());
                    v.reserve((b - a) * row);
                    for pos in a..b {
                        let (kr, vr) = cache.read_token(*id, layer, pos)?.ok_or_else(|| {
                            TritterError::argument(
                                "KV cache read",
                                format!("position {pos} of sequence {} is evicted", seq.0),
                                format!("stored (rounds are bounded by max_chunk; start {start})"),
                            )
                        })?;
                        k.extend_from_slice(&kr);
                        v.extend_from_slice(&vr);
                    }
                    runs.push(KeyRun {
                        start: a,
                        len: b - a,
                        k: Cow::Owned(k),
                        v: Cow::Owned(v),
                    });
                }
            }
        }
        Ok(runs)
    }

    /// `x` `(rows, Hkv * D)` as the store gives it back: `None` (unchanged) for f32, rounded through
    /// f16, or quantized to INT4 groups and dequantized (the same `kv_int4` functions as the
    /// write and the read). Attention uses the round's own keys in this form, so every key
    /// a query sees is the stored one and results do not depend on how a prompt was split
    /// into rounds.
    pub(crate) fn as_stored(&self, x: &[f32]) -> Result<Option<Vec<f32>>> {
        Ok(match self.options.format {
            KvCacheFormat::F32 => None,
            KvCacheFormat::F16 => {
                kv_int4::quant::check_storable("k/v", x)?;
                Some(x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect())
            }
            KvCacheFormat::Int4 => Some(kv_int4::dequantize_int4(&kv_int4::quantize_int4(
                x,
                self.head_dim,
            )?)),
        })
    }

    /// Stores the round's keys and values of `layer`, each `(append.len, Hkv, D)`.
    pub(crate) fn write(
        &mut self,
        append: &Append,
        layer: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let row = self.heads_kv * self.head_dim;
        let window = self.window;
        let state = self
            .seqs
            .get_mut(&append.seq.0)
            .ok_or_else(|| unknown(append.seq))?;
        match (&mut state.store, &append.ticket) {
            (SeqStore::Paged(_), Some(ticket)) => {
                let cache = self
                    .paged
                    .as_mut()
                    .expect("paged sequences live in a paged cache");
                cache.write_layer(ticket, layer, k, v)?;
            }
            (SeqStore::F32(layers), _) => {
                let l = &mut layers[layer];
                for t in 0..append.len {
                    let pos = append.start + t;
                    let (kr, vr) = (&k[t * row..(t + 1) * row], &v[t * row..(t + 1) * row]);
                    match window {
                        Some((w, s)) => {
                            if pos < s {
                                l.sink_k.extend_from_slice(kr);
                                l.sink_v.extend_from_slice(vr);
                            }
                            let slot = pos % w;
                            if l.k.len() == slot * row {
                                l.k.extend_from_slice(kr);
                                l.v.extend_from_slice(vr);
                            } else {
                                l.k[slot * row..(slot + 1) * row].copy_from_slice(kr);
                                l.v[slot * row..(slot + 1) * row].copy_from_slice(vr);
                            }
                        }
                        None => {
                            l.k.extend_from_slice(kr);
                            l.v.extend_from_slice(vr);
                        }
                    }
                }
            }
            (SeqStore::Paged(_), None) => {
                return Err(TritterError::argument(
                    "KV append",
                    "no ticket for a paged sequence",
                    "an append from KvCache::begin",
                ))
            }
        }
        Ok(())
    }
}

fn unknown(seq: SequenceId) -> TritterError {
    TritterError::argument(
        "sequence",
        seq.0,
        "a live sequence of this KV cache (added and not freed)",
    )
}

/// The `kv_int4` configuration of the paged store for `config` and `options` (`None` for the
/// f32 store): page size checked, pool sized for `max_sequences` worst-case sequences (sinks
/// plus window, or `max_position_embeddings`) unless `pool_tokens` is given. Shared by the
/// CPU cache and the GPU engine's cache, so both hold the same pages.
pub(crate) fn paged_config(
    config: &TritterConfig,
    options: &KvCacheOptions,
) -> Result<Option<CacheConfig>> {
    let (layers, heads_kv, head_dim) = (config.num_layers, config.num_kv_heads, config.head_dim());
    let window = config.sliding_window.map(|w| (w, config.attention_sinks));
    let max_len = config.max_position_embeddings;
    Ok(match options.format {
        KvCacheFormat::F32 => None,
        KvCacheFormat::F16 | KvCacheFormat::Int4 => {
            let p = options.page_size;
            if !p.is_power_of_two() || !kv_int4::PAGE_SIZES.contains(&p) {
                return Err(TritterError::argument(
                    "page_size",
                    p,
                    "expected a power of two in 8..=256 tokens",
                ));
            }
            if head_dim % kv_int4::GROUP != 0 {
                return Err(TritterError::config(
                    "head_dim",
                    head_dim,
                    format!(
                        "expected a multiple of {} for the paged INT4/F16 KV cache; use the f32 cache",
                        kv_int4::GROUP
                    ),
                ));
            }
            let per_seq = match window {
                Some((w, s)) => s.div_ceil(p) + (w + p).div_ceil(p) + 1,
                None => max_len.div_ceil(p),
            };
            let pages = options
                .pool_tokens
                .map_or(options.max_sequences.max(1) * per_seq, |t| t.div_ceil(p));
            let format = match options.format {
                KvCacheFormat::Int4 => KvFormat::Int4,
                _ => KvFormat::F16,
            };
            let mut cfg = CacheConfig::new(layers, heads_kv, head_dim, pages.max(1))
                .with_page_size(p)
                .with_max_seq_len(max_len)
                .with_format(format);
            if let Some((w, s)) = window {
                cfg = cfg.with_window(w, s);
            }
            Some(cfg)
        }
    })
}
