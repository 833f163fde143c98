//! The paged cache against a plain model: random sequences of operations (add, append in
//! one call or layer by layer, fork, free, stale ids, bad positions, poisoned values, pool
//! exhaustion) run on a `CpuKvCache` and on a model that keeps every token in a `Vec` and
//! tracks page identities on its own; after every operation the cache must agree with the
//! model token by token, and every failed operation must leave the cache bit-identical.

use half::f16;
use kv_int4::{
    decode_attention_ref, quantize_group, CacheConfig, CpuKvCache, KvError, KvFormat, SeqId, GROUP,
};
use proptest::prelude::*;
use tritter_kernels_cuda::testing::random_f32;

/// Longest sequence in the model runs: a few pages of the largest page size plus a bit.
const MAX_SEQ_LEN: usize = 150;
/// Largest single append.
const MAX_APPEND: usize = 40;

#[derive(Debug, Clone)]
enum Op {
    Add,
    /// Append `n` tokens to live sequence `seq % live`; `pos_delta` shifts the start
    /// position (non-zero: must fail); `poison` puts a NaN in the input (must fail).
    Append {
        seq: usize,
        n: usize,
        pos_delta: i8,
        poison: bool,
        seed: u64,
    },
    /// The same through `begin_append` + `write_layer`, probing the pending state between
    /// layers (fork, second append, attending to an unwritten layer, rewriting a layer).
    AppendLayered {
        seq: usize,
        n: usize,
        seed: u64,
    },
    Fork {
        seq: usize,
    },
    Free {
        seq: usize,
    },
    /// Use a freed id (append, fork, free must all fail).
    Stale,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Add),
        6 => (any::<usize>(), 1..=MAX_APPEND, prop_oneof![8 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)], prop::bool::weighted(0.1), any::<u64>())
            .prop_map(|(seq, n, pos_delta, poison, seed)| Op::Append { seq, n, pos_delta, poison, seed }),
        2 => (any::<usize>(), 1..=MAX_APPEND / 2, any::<u64>()).prop_map(|(seq, n, seed)| Op::AppendLayered { seq, n, seed }),
        2 => any::<usize>().prop_map(|seq| Op::Fork { seq }),
        1 => any::<usize>().prop_map(|seq| Op::Free { seq }),
        1 => Just(Op::Stale),
    ]
}

fn config() -> impl Strategy<Value = CacheConfig> {
    (
        1usize..=2,
        1usize..=2,
        prop_oneof![Just(GROUP), Just(2 * GROUP)],
        prop_oneof![Just(8usize), Just(16)],
        3usize..=16,
        prop_oneof![Just(None), (1usize..=40, 0usize..=6).prop_map(Some)],
        prop_oneof![Just(KvFormat::Int4), Just(KvFormat::F16)],
    )
        .prop_map(|(layers, hkv, d, p, pages, window, format)| {
            let mut c = CacheConfig::new(layers, hkv, d, pages)
                .with_page_size(p)
                .with_format(format)
                .with_max_seq_len(MAX_SEQ_LEN);
            if let Some((w, s)) = window {
                c = c.with_window(w, s);
            }
            c
        })
}

/// One token of the model: per layer, the K and V rows `(heads_kv * head_dim,)` as the cache
/// must return them (quantized then dequantized, or rounded to f16).
type Token = Vec<(Vec<f32>, Vec<f32>)>;

#[derive(Debug, Clone)]
struct ModelSeq {
    id: SeqId,
    tokens: Vec<Token>,
    /// Identity of the physical page behind each logical page (shared after a fork).
    pages: Vec<Option<u64>>,
}

struct Model {
    cfg: CacheConfig,
    seqs: Vec<ModelSeq>,
    freed: Vec<SeqId>,
    next_page: u64,
}

impl Model {
    /// Token `j` can still be seen by some future query of a sequence of `len` tokens.
    fn token_needed(&self, j: usize, len: usize) -> bool {
        match self.cfg.window {
            None => true,
            Some(w) => j < w.sinks || j + w.window >= len,
        }
    }

    fn page_needed(&self, k: usize, len: usize) -> bool {
        let p = self.cfg.page_size;
        (k * p..(k + 1) * p).any(|j| self.token_needed(j, len))
    }

    fn live_pages(&self) -> usize {
        let mut ids: Vec<u64> = self
            .seqs
            .iter()
            .flat_map(|s| s.pages.iter().flatten().copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// The pages of `seq` after growing to `len`, with fresh identities where needed.
    fn grown_pages(&mut self, seq: &ModelSeq, len: usize) -> Vec<Option<u64>> {
        let n = len.div_ceil(self.cfg.page_size);
        (0..n)
            .map(|k| {
                if !self.page_needed(k, len) {
                    None
                } else if let Some(Some(id)) = seq.pages.get(k) {
                    Some(*id)
                } else {
                    self.next_page += 1;
                    Some(self.next_page)
                }
            })
            .collect()
    }

    /// What the cache must return for an input row.
    fn stored(&self, row: &[f32]) -> Vec<f32> {
        match self.cfg.format {
            KvFormat::Int4 => row
                .chunks_exact(GROUP)
                .flat_map(|c| quantize_group(c.try_into().unwrap()).dequantize())
                .collect(),
            KvFormat::F16 => row.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        }
    }
}

/// Everything observable about the cache, for "unchanged" checks.
fn snapshot(c: &CpuKvCache) -> (kv_int4::BlockManager, Vec<u8>) {
    (c.blocks().clone(), c.store().bytes.clone())
}

/// The cache agrees with the model token by token: lengths, which tokens are stored (a
/// token is stored iff its page is still needed), the stored values bit for bit, pool usage.
fn check(cache: &CpuKvCache, model: &Model) -> Result<(), TestCaseError> {
    cache
        .blocks()
        .check_invariants()
        .map_err(TestCaseError::fail)?;
    let live: Vec<SeqId> = cache.blocks().sequences().collect();
    let mut want: Vec<SeqId> = model.seqs.iter().map(|s| s.id).collect();
    want.sort();
    prop_assert_eq!(live, want);
    prop_assert_eq!(
        cache.blocks().free_pages(),
        model.cfg.num_pages - model.live_pages()
    );
    let p = model.cfg.page_size;
    for s in &model.seqs {
        prop_assert_eq!(cache.len(s.id).unwrap(), s.tokens.len());
        for (j, tok) in s.tokens.iter().enumerate() {
            for (l, (k, v)) in tok.iter().enumerate() {
                let got = cache.read_token(s.id, l, j).unwrap();
                match (s.pages[j / p], got) {
                    (None, None) => {}
                    (Some(_), Some((gk, gv))) => {
                        prop_assert!(
                            gk.iter().zip(k).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "seq {:?} token {} layer {} K",
                            s.id,
                            j,
                            l
                        );
                        prop_assert!(
                            gv.iter().zip(v).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "seq {:?} token {} layer {} V",
                            s.id,
                            j,
                            l
                        );
                    }
                    (want, got) => prop_assert!(
                        false,
                        "seq {:?} token {}: model page {:?}, cache has data: {}",
                        s.id,
                        j,
                        want,
                        got.is_some()
                    ),
                }
            }
        }
    }
    Ok(())
}

/// `(layers, n, heads_kv, head_dim)` input for an append.
fn input(cfg: &CacheConfig, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let e = cfg.layers * n * cfg.heads_kv * cfg.head_dim;
    (random_f32(e, seed), random_f32(e, seed ^ 0xABCD))
}

/// The model's tokens for an input.
fn model_tokens(model: &Model, n: usize, k: &[f32], v: &[f32]) -> Vec<Token> {
    let c = &model.cfg;
    let row = c.heads_kv * c.head_dim;
    (0..n)
        .map(|t| {
            (0..c.layers)
                .map(|l| {
                    let o = (l * n + t) * row;
                    (model.stored(&k[o..o + row]), model.stored(&v[o..o + row]))
                })
                .collect()
        })
        .collect()
}

fn run(cfg: CacheConfig, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut cache = CpuKvCache::new(cfg.clone()).unwrap();
    let mut model = Model {
        cfg: cfg.clone(),
        seqs: Vec::new(),
        freed: Vec::new(),
        next_page: 0,
    };
    for op in ops {
        let before = snapshot(&cache);
        match op {
            Op::Add => {
                let id = cache.add_sequence();
                model.seqs.push(ModelSeq {
                    id,
                    tokens: Vec::new(),
                    pages: Vec::new(),
                });
            }
            Op::Append {
                seq,
                n,
                pos_delta,
                poison,
                seed,
            } => {
                if model.seqs.is_empty() {
                    continue;
                }
                let i = seq % model.seqs.len();
                let s = model.seqs[i].clone();
                let len = s.tokens.len();
                let pos = len as i64 + i64::from(pos_delta);
                if pos < 0 {
                    continue;
                }
                let (mut k, v) = input(&cfg, n, seed);
                if poison {
                    let at = (seed as usize) % k.len();
                    k[at] = f32::NAN;
                }
                let res = cache.append(s.id, pos as usize, n, &k, &v);
                let pages = model.grown_pages(&s, len + n);
                let others: usize = {
                    let mut ids: Vec<u64> = model
                        .seqs
                        .iter()
                        .enumerate()
                        .filter(|&(j, _)| j != i)
                        .flat_map(|(_, s)| s.pages.iter().flatten().copied())
                        .collect();
                    ids.extend(pages.iter().flatten().copied());
                    ids.sort_unstable();
                    ids.dedup();
                    ids.len()
                };
                match res {
                    Err(e) => {
                        let expected = poison
                            || pos_delta != 0
                            || len + n > MAX_SEQ_LEN
                            || others > cfg.num_pages;
                        prop_assert!(expected, "unexpected error {e}");
                        match e {
                            KvError::NonFinite { .. } => prop_assert!(poison),
                            KvError::BadPosition { .. } => prop_assert!(pos_delta != 0 && !poison),
                            KvError::SequenceTooLong { .. } => prop_assert!(len + n > MAX_SEQ_LEN),
                            KvError::PoolExhausted { .. } => prop_assert!(others > cfg.num_pages),
                            e => prop_assert!(false, "unexpected error kind {e}"),
                        }
                        prop_assert!(
                            snapshot(&cache) == before,
                            "a failed append changed the cache"
                        );
                    }
                    Ok(t) => {
                        prop_assert!(
                            !poison
                                && pos_delta == 0
                                && len + n <= MAX_SEQ_LEN
                                && others <= cfg.num_pages
                        );
                        prop_assert_eq!((t.start(), t.end()), (len, len + n));
                        let toks = model_tokens(&model, n, &k, &v);
                        let m = &mut model.seqs[i];
                        m.tokens.extend(toks);
                        m.pages = pages;
                    }
                }
            }
            Op::AppendLayered { seq, n, seed } => {
                if model.seqs.is_empty() {
                    continue;
                }
                let i = seq % model.seqs.len();
                let s = model.seqs[i].clone();
                let len = s.tokens.len();
                let Ok(t) = cache.begin_append(s.id, len, n) else {
                    prop_assert!(
                        snapshot(&cache) == before,
                        "a failed begin_append changed the cache"
                    );
                    continue;
                };
                let pages = model.grown_pages(&s, len + n);
                let (k, v) = input(&cfg, n, seed);
                let row = cfg.heads_kv * cfg.head_dim;
                for l in 0..cfg.layers {
                    // Pending: these must fail and change nothing.
                    let mid = snapshot(&cache);
                    prop_assert!(
                        matches!(cache.fork(s.id), Err(KvError::PendingWrite { .. })),
                        "unexpected result"
                    );
                    prop_assert!(
                        matches!(
                            cache.begin_append(s.id, len + n, 1),
                            Err(KvError::PendingWrite { .. })
                        ),
                        "unexpected result"
                    );
                    let q = vec![0.5f32; row];
                    prop_assert!(
                        matches!(
                            decode_attention_ref(&cache, l, &[s.id], &q, cfg.heads_kv, 1.0),
                            Err(KvError::PendingWrite { .. })
                        ),
                        "unexpected result"
                    );
                    let mut bad = k[l * n * row..(l + 1) * n * row].to_vec();
                    bad[0] = f32::INFINITY;
                    prop_assert!(
                        matches!(
                            cache.write_layer(&t, l, &bad, &v[l * n * row..(l + 1) * n * row]),
                            Err(KvError::NonFinite { .. })
                        ),
                        "unexpected result"
                    );
                    prop_assert!(
                        matches!(
                            cache.write_layer(&t, l, &bad[1..], &v[l * n * row..(l + 1) * n * row]),
                            Err(KvError::LengthMismatch { .. })
                        ),
                        "unexpected result"
                    );
                    prop_assert!(
                        snapshot(&cache) == mid,
                        "a failed call on a pending append changed the cache"
                    );
                    cache
                        .write_layer(
                            &t,
                            l,
                            &k[l * n * row..(l + 1) * n * row],
                            &v[l * n * row..(l + 1) * n * row],
                        )
                        .unwrap();
                    let again = cache.write_layer(
                        &t,
                        l,
                        &k[l * n * row..(l + 1) * n * row],
                        &v[l * n * row..(l + 1) * n * row],
                    );
                    prop_assert!(
                        matches!(again, Err(KvError::StaleTicket { .. })),
                        "{:?}",
                        again
                    );
                }
                let toks = model_tokens(&model, n, &k, &v);
                let m = &mut model.seqs[i];
                m.tokens.extend(toks);
                m.pages = pages;
            }
            Op::Fork { seq } => {
                if model.seqs.is_empty() {
                    continue;
                }
                let s = model.seqs[seq % model.seqs.len()].clone();
                let tail = s.tokens.len() % cfg.page_size != 0;
                let res = cache.fork(s.id);
                if tail && model.live_pages() + 1 > cfg.num_pages {
                    prop_assert!(
                        matches!(res, Err(KvError::PoolExhausted { .. })),
                        "{:?}",
                        res
                    );
                    prop_assert!(
                        snapshot(&cache) == before,
                        "a failed fork changed the cache"
                    );
                } else {
                    let id = res.unwrap();
                    let mut pages = s.pages.clone();
                    if tail {
                        model.next_page += 1;
                        *pages.last_mut().unwrap() = Some(model.next_page);
                    }
                    model.seqs.push(ModelSeq {
                        id,
                        tokens: s.tokens.clone(),
                        pages,
                    });
                }
            }
            Op::Free { seq } => {
                if model.seqs.is_empty() {
                    continue;
                }
                let s = model.seqs.remove(seq % model.seqs.len());
                cache.free(s.id).unwrap();
                model.freed.push(s.id);
            }
            Op::Stale => {
                let Some(&id) = model.freed.last() else {
                    continue;
                };
                let (k, v) = input(&cfg, 1, 1);
                prop_assert!(matches!(
                    cache.append(id, 0, 1, &k, &v),
                    Err(KvError::UnknownSequence(_))
                ));
                prop_assert!(matches!(cache.fork(id), Err(KvError::UnknownSequence(_))));
                prop_assert!(matches!(cache.free(id), Err(KvError::UnknownSequence(_))));
                prop_assert!(
                    snapshot(&cache) == before,
                    "a call with a stale id changed the cache"
                );
            }
        }
        check(&cache, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Random operation sequences agree with the Vec model token by token, and failed
    /// operations leave the cache bit-identical.
    #[test]
    fn cache_matches_vec_model(cfg in config(), ops in prop::collection::vec(op(), 1..40)) {
        run(cfg, ops)?;
    }
}

/// A deterministic long run with a window and sinks: pages outside the window go back to the
/// pool, so a sequence far longer than the pool keeps streaming; the sinks stay readable.
#[test]
fn window_streams_past_pool_size() {
    let (w, sinks, p) = (48usize, 4usize, 8usize);
    let pages_needed = 1 + w.div_ceil(p) + 1; // sink page, window pages, one partial page
    let cfg = CacheConfig::new(1, 1, GROUP, pages_needed)
        .with_page_size(p)
        .with_window(w, sinks)
        .with_max_seq_len(100_000);
    let mut cache = CpuKvCache::new(cfg.clone()).unwrap();
    let s = cache.add_sequence();
    let total = 50 * pages_needed * p;
    for pos in 0..total {
        let x = random_f32(GROUP, pos as u64);
        cache.append(s, pos, 1, &x, &x).unwrap();
        cache.blocks().check_invariants().unwrap();
    }
    for j in 0..sinks {
        assert!(
            cache.read_token(s, 0, j).unwrap().is_some(),
            "sink {j} was evicted"
        );
    }
    for j in total - w..total {
        assert!(
            cache.read_token(s, 0, j).unwrap().is_some(),
            "window token {j} was evicted"
        );
    }
    assert!(cache.read_token(s, 0, total / 2).unwrap().is_none());
}

/// Exhausting the pool is an error that names the numbers, and changes nothing; freeing a
/// sequence makes room again.
#[test]
fn pool_exhaustion_is_clean() {
    let cfg = CacheConfig::new(1, 1, GROUP, 4).with_page_size(8);
    let mut cache = CpuKvCache::new(cfg).unwrap();
    let a = cache.add_sequence();
    let b = cache.add_sequence();
    let x = random_f32(24 * GROUP, 3);
    cache.append(a, 0, 24, &x, &x).unwrap(); // 3 pages
    let before = snapshot(&cache);
    let err = cache
        .append(b, 0, 16, &x[..16 * GROUP], &x[..16 * GROUP])
        .unwrap_err();
    assert!(
        matches!(
            err,
            KvError::PoolExhausted {
                needed: 2,
                free: 1,
                total: 4
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("needs 2 free pages but 1 of 4"),
        "{err}"
    );
    assert!(snapshot(&cache) == before);
    cache.free(a).unwrap();
    cache
        .append(b, 0, 16, &x[..16 * GROUP], &x[..16 * GROUP])
        .unwrap();
}

/// A bookkeeping snapshot taken after an append began puts back its unwritten layers, so
/// the writes run again and store the same bytes; it is refused, leaving the cache as it
/// was, once a block table changed or when it comes from a cache of another configuration.
#[test]
fn bookkeeping_snapshot_restores_pending_writes() {
    let layers = 2;
    let cfg = CacheConfig::new(layers, 1, GROUP, 4).with_page_size(8);
    let mut cache = CpuKvCache::new(cfg.clone()).unwrap();
    let s = cache.add_sequence();
    let n = 5;
    let x = random_f32(n * GROUP, 9);
    let t = cache.begin_append(s, 0, n).unwrap();
    let snap = cache.bookkeeping_snapshot();
    for l in 0..layers {
        cache.write_layer(&t, l, &x, &x).unwrap();
    }
    let written = snapshot(&cache);
    let err = cache.write_layer(&t, 0, &x, &x).unwrap_err();
    assert!(matches!(err, KvError::StaleTicket { .. }), "{err}");
    cache.restore_bookkeeping(snap).unwrap();
    for l in 0..layers {
        cache.write_layer(&t, l, &x, &x).unwrap();
    }
    assert!(snapshot(&cache) == written, "the writes run again differ");

    // Refused, the cache unchanged: a sequence added, a sequence freed, another config.
    let snap = cache.bookkeeping_snapshot();
    let other = cache.add_sequence();
    let before = snapshot(&cache);
    let err = cache.restore_bookkeeping(snap.clone()).unwrap_err();
    assert!(err.to_string().contains("sequence ids"), "{err}");
    assert!(
        snapshot(&cache) == before,
        "a refused restore changed the cache"
    );
    cache.free(other).unwrap();
    let before = snapshot(&cache);
    let err = cache.restore_bookkeeping(snap).unwrap_err();
    assert!(matches!(err, KvError::Unsupported(_)), "{err}");
    assert!(
        snapshot(&cache) == before,
        "a refused restore changed the cache"
    );
    let mut fresh = CpuKvCache::new(cfg.clone()).unwrap();
    let foreign = CpuKvCache::new(cfg.with_page_size(16))
        .unwrap()
        .bookkeeping_snapshot();
    let err = fresh.restore_bookkeeping(foreign).unwrap_err();
    assert!(err.to_string().contains("configuration"), "{err}");
}
