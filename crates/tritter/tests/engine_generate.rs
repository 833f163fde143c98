//! Generation on the CPU engine: sampling properties (top-p, top-k, repetition penalty),
//! stop tokens and sequences, continuous batching against solo runs, streaming and
//! cancellation, the end of the position range, windowed decoding far past the page pool,
//! parity with the reference loop, and typed errors for bad options.

mod common;

use std::ops::ControlFlow;

use common::engine::{bf16_reference, engine_of, random_tokens, windowed_test_config};
use proptest::prelude::*;
use tritter::engine::{
    generate_batch, generate_stream, CpuEngine, FinishReason, Generation, GenerationRequest,
    KvCacheFormat, KvCacheOptions, LogitsFor, StepInput,
};
use tritter::generate::{
    generate, sample_from_candidates, sample_token, sample_token_in_context, top_candidates,
    SamplingOptions, StopReason, TopSpec,
};
use tritter::model::SeededRng;
use tritter::paradigm::LatentMarkers;
use tritter::{TritterConfig, TritterError};

/// Greedy options (temperature 0), no stop at `<eos>`.
fn greedy(max_new_tokens: usize) -> SamplingOptions<'static> {
    SamplingOptions {
        max_new_tokens,
        temperature: 0.0,
        stop_at_eos: false,
        ..SamplingOptions::default()
    }
}

/// Candidate order of the sampler: logit descending, ties by the lower id.
fn order(logits: &[f32]) -> Vec<usize> {
    let mut o: Vec<usize> = (0..logits.len()).collect();
    o.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    o
}

fn logits_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-6.0f32..6.0, 2..80)
}

/// Rows of up to 2000 logits drawn from a few values, so ties are common and both
/// selection paths of `top_candidates` (heap for k <= V/16, select-and-sort above) run.
fn tied_logits_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec((-8i32..8).prop_map(|x| x as f32 * 0.5), 1..2000)
}

/// The filter of the sampler written out: below the clamped limit, and with `text_only`
/// `<eos>` or a non-special id that is not a latent marker.
fn admitted(spec: &TopSpec, v: usize) -> Vec<usize> {
    let n = spec.vocab_limit.map_or(v, |l| (l as usize).clamp(1, v));
    let markers = LatentMarkers::new(v).ok();
    (0..n)
        .filter(|&i| {
            !spec.text_only || i == 2 || (i >= 8 && !markers.is_some_and(|m| m.is_marker(i as u32)))
        })
        .collect()
}

/// The sampler as it was before `top_candidates` (a full sort of the candidates per
/// token), kept as the oracle of the selection-based one.
fn sort_sampler(logits: &[f32], opts: &SamplingOptions<'_>, rng: &mut SeededRng) -> Option<u32> {
    let spec = opts.top_spec(logits.len());
    let mut order = admitted(&spec, logits.len());
    if order.is_empty() {
        return None;
    }
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if opts.temperature <= 0.0 {
        return Some(order[0] as u32);
    }
    let k = if opts.top_k == 0 {
        order.len()
    } else {
        opts.top_k.min(order.len())
    };
    let max = f64::from(logits[order[0]]);
    let mut w: Vec<f64> = order[..k]
        .iter()
        .map(|&i| ((f64::from(logits[i]) - max) / opts.temperature).exp())
        .collect();
    if opts.top_p < 1.0 {
        let total: f64 = w.iter().sum();
        let mut c = 0.0;
        let keep = w
            .iter()
            .position(|x| {
                c += x;
                c >= opts.top_p * total
            })
            .map_or(w.len(), |i| i + 1);
        w.truncate(keep);
    }
    let total: f64 = w.iter().sum();
    let mut r = rng.uniform() * total;
    for (&i, x) in order.iter().zip(&w) {
        if r < *x {
            return Some(i as u32);
        }
        r -= x;
    }
    Some(order[w.len() - 1] as u32)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// `top_candidates` is the first `k` of the fully sorted admitted ids (logit descending,
    /// ties by the lower id), for any k, vocab limit and text filter, ties everywhere.
    #[test]
    fn top_candidates_equal_the_sorted_prefix(
        logits in tied_logits_strategy(), k in 1usize..80, limit in prop::option::of(0u32..2100), text_only: bool,
    ) {
        let spec = TopSpec { k, vocab_limit: limit, text_only };
        let mut order = admitted(&spec, logits.len());
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        order.truncate(k);
        match top_candidates(&logits, &spec) {
            Ok(c) => {
                let ids: Vec<usize> = c.ids.iter().map(|&i| i as usize).collect();
                prop_assert_eq!(&ids, &order);
                let l: Vec<f32> = order.iter().map(|&i| logits[i]).collect();
                prop_assert_eq!(c.logits, l);
            }
            Err(_) => prop_assert!(order.is_empty(), "error although {} ids pass", order.len()),
        }
    }

    /// Sampling through the selection draws the same tokens, seed for seed, as the
    /// sort-based sampler it replaced, and the same again from the candidates alone.
    #[test]
    fn selection_sampler_equals_the_sort_sampler(
        logits in tied_logits_strategy(), t in prop::sample::select(vec![0.0, 0.3, 1.0, 2.5]),
        k in 0usize..70, p in prop::sample::select(vec![1.0, 0.9, 0.5, 1e-9]),
        limit in prop::option::of(1u32..2100), text_only: bool, seed: u64,
    ) {
        let opts = SamplingOptions {
            temperature: t, top_k: k, top_p: p, vocab_limit: limit, text_only, ..SamplingOptions::default()
        };
        let (mut a, mut b, mut c) = (SeededRng::new(seed), SeededRng::new(seed), SeededRng::new(seed));
        for _ in 0..5 {
            let want = sort_sampler(&logits, &opts, &mut b);
            let got = sample_token_in_context(&logits, &[], &opts, &mut a).ok();
            prop_assert_eq!(got, want);
            if want.is_some() {
                let cands = top_candidates(&logits, &opts.top_spec(logits.len())).unwrap();
                prop_assert_eq!(sample_from_candidates(&cands, &opts, &mut c).ok(), want);
            }
        }
    }

    /// A tiny `top_p` keeps only the most likely token: sampling equals the greedy pick at
    /// any temperature and top-k.
    #[test]
    fn tiny_top_p_is_greedy(logits in logits_strategy(), t in 0.1f64..3.0, k in 0usize..10, seed: u64) {
        let opts = SamplingOptions { temperature: t, top_k: k, top_p: 1e-9, ..SamplingOptions::default() };
        let mut rng = SeededRng::new(seed);
        let id = sample_token(&logits, &opts, &mut rng).unwrap();
        prop_assert_eq!(id as usize, order(&logits)[0]);
    }

    /// `top_k = 1` is greedy too.
    #[test]
    fn top_k_one_is_greedy(logits in logits_strategy(), t in 0.1f64..3.0, seed: u64) {
        let opts = SamplingOptions { temperature: t, top_k: 1, ..SamplingOptions::default() };
        let id = sample_token(&logits, &opts, &mut SeededRng::new(seed)).unwrap();
        prop_assert_eq!(id as usize, order(&logits)[0]);
    }

    /// Every draw lies in the nucleus computed independently: the smallest prefix of the
    /// top-k candidates whose normalized softmax(logits / t) mass reaches `top_p`.
    #[test]
    fn top_p_draws_stay_in_the_nucleus(
        logits in logits_strategy(), t in 0.2f64..2.0, p in 0.05f64..0.95, k in 0usize..20, seed: u64,
    ) {
        let o = order(&logits);
        let kept = if k == 0 { o.len() } else { k.min(o.len()) };
        let max = f64::from(logits[o[0]]);
        let w: Vec<f64> = o[..kept].iter().map(|&i| ((f64::from(logits[i]) - max) / t).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut mass = 0.0;
        // `p + 1e-12`: a draw exactly on the boundary may go either way in floating point.
        let nucleus = w.iter().position(|x| { mass += x / total; mass >= p - 1e-12 }).unwrap() + 1;
        let opts = SamplingOptions { temperature: t, top_k: k, top_p: p, ..SamplingOptions::default() };
        let mut rng = SeededRng::new(seed);
        for _ in 0..20 {
            let id = sample_token(&logits, &opts, &mut rng).unwrap() as usize;
            prop_assert!(o[..nucleus.max(1)].contains(&id) || o[..(nucleus + 1).min(kept)].contains(&id),
                "id {} outside the nucleus {:?}", id, &o[..nucleus]);
        }
    }

    /// The repetition penalty follows its definition: the greedy pick with the penalty is the
    /// argmax of the logits with every context id's logit divided by θ when positive and
    /// multiplied by θ otherwise (ids outside the vocabulary ignored, repeats counted once).
    #[test]
    fn repetition_penalty_matches_its_definition(
        logits in logits_strategy(), theta in 0.3f32..4.0, context in prop::collection::vec(0u32..100, 0..12),
    ) {
        let mut penalized = logits.clone();
        let mut seen = std::collections::BTreeSet::new();
        for &c in &context {
            let i = c as usize;
            if i < penalized.len() && seen.insert(i) {
                penalized[i] = if penalized[i] > 0.0 { penalized[i] / theta } else { penalized[i] * theta };
            }
        }
        let opts = SamplingOptions { temperature: 0.0, repetition_penalty: theta, ..SamplingOptions::default() };
        let id = sample_token_in_context(&logits, &context, &opts, &mut SeededRng::new(0)).unwrap();
        prop_assert_eq!(id as usize, order(&penalized)[0]);
    }

    /// With top_p = 1 and penalty 1 (the defaults) the draws are the ones of the plain
    /// top-k sampler: the new options change nothing unless set.
    #[test]
    fn default_new_options_keep_the_old_draws(logits in logits_strategy(), t in 0.2f64..2.0, k in 0usize..20, seed: u64) {
        let opts = SamplingOptions { temperature: t, top_k: k, ..SamplingOptions::default() };
        let (mut a, mut b) = (SeededRng::new(seed), SeededRng::new(seed));
        let o = order(&logits);
        let kept = if k == 0 { o.len() } else { k.min(o.len()) };
        let max = f64::from(logits[o[0]]);
        let w: Vec<f64> = o[..kept].iter().map(|&i| ((f64::from(logits[i]) - max) / t).exp()).collect();
        for _ in 0..10 {
            // The pre-top-p sampler: one uniform scaled by the top-k mass, walked in order.
            let mut r = b.uniform() * w.iter().sum::<f64>();
            let mut expected = o[kept - 1];
            for (&i, x) in o[..kept].iter().zip(&w) {
                if r < *x { expected = i; break; }
                r -= x;
            }
            let context = [o[0] as u32];
            let got = sample_token_in_context(&logits, &context, &opts, &mut a).unwrap();
            prop_assert_eq!(got as usize, expected);
        }
    }
}

/// `stop_reason`: `<eos>` only with `stop_at_eos`, stop tokens on the last token, stop
/// sequences as a suffix of the generated tokens.
#[test]
fn stop_reason_follows_the_options() {
    let seqs = vec![vec![20, 21], vec![30]];
    let o = SamplingOptions {
        stop_tokens: &[9],
        stop_sequences: &seqs,
        ..SamplingOptions::default()
    };
    assert_eq!(o.stop_reason(&[]), None);
    assert_eq!(o.stop_reason(&[5, 2]), Some(StopReason::Eos));
    let no_eos = SamplingOptions {
        stop_at_eos: false,
        ..o
    };
    assert_eq!(no_eos.stop_reason(&[5, 2]), None);
    assert_eq!(o.stop_reason(&[9, 5]), None);
    assert_eq!(o.stop_reason(&[5, 9]), Some(StopReason::StopToken(9)));
    assert_eq!(o.stop_reason(&[20, 21, 5]), None);
    assert_eq!(
        o.stop_reason(&[1, 20, 21]),
        Some(StopReason::StopSequence(0))
    );
    assert_eq!(o.stop_reason(&[30]), Some(StopReason::StopSequence(1)));
}

fn test_engine(seed: u64) -> (TritterConfig, CpuEngine) {
    let cfg = TritterConfig::preset("test").unwrap();
    let engine = engine_of(&bf16_reference(&cfg, seed));
    (cfg, engine)
}

fn run_one(
    engine: &CpuEngine,
    prompt: &[u32],
    options: &SamplingOptions<'_>,
    cache: &KvCacheOptions,
) -> Generation {
    generate_stream(
        engine,
        prompt,
        options,
        cache,
        |_| ControlFlow::Continue(()),
    )
    .unwrap()
}

/// A stop token ends generation right after it is generated (it is the last returned
/// token), and so does a stop sequence; the tokens before are those of the unstopped run.
#[test]
fn stop_token_and_stop_sequence_end_generation() {
    let (cfg, engine) = test_engine(51);
    let cache = KvCacheOptions::for_config(&cfg);
    let prompt = random_tokens(&cfg, 6, 52);
    let sampled = SamplingOptions {
        max_new_tokens: 24,
        temperature: 1.0,
        top_k: 0,
        seed: 53,
        stop_at_eos: false,
        ..SamplingOptions::default()
    };
    let free = run_one(&engine, &prompt, &sampled, &cache);
    assert_eq!(free.finish, FinishReason::MaxTokens);
    assert_eq!(free.tokens.len(), 24);

    let stop = free.tokens[5];
    let first = free.tokens.iter().position(|&t| t == stop).unwrap();
    let stopped = run_one(
        &engine,
        &prompt,
        &SamplingOptions {
            stop_tokens: &[stop],
            ..sampled
        },
        &cache,
    );
    assert_eq!(stopped.tokens, free.tokens[..=first]);
    assert_eq!(
        stopped.finish,
        FinishReason::Stop(StopReason::StopToken(stop))
    );

    let seq = vec![free.tokens[7..10].to_vec()];
    let end = (3..=free.tokens.len())
        .find(|&n| free.tokens[..n].ends_with(&seq[0]))
        .unwrap();
    let stopped = run_one(
        &engine,
        &prompt,
        &SamplingOptions {
            stop_sequences: &seq,
            ..sampled
        },
        &cache,
    );
    assert_eq!(stopped.tokens, free.tokens[..end]);
    assert_eq!(
        stopped.finish,
        FinishReason::Stop(StopReason::StopSequence(0))
    );
}

/// Requests of different lengths, seeds and options, run with continuous batching (two at
/// a time, prompts fed in chunks of 3, sequences leaving and joining) give exactly the
/// tokens and finish reasons of each request run alone, with the f32 cache and with the
/// paged INT4 cache under a sliding window.
#[test]
fn continuous_batching_matches_solo_runs() {
    for (cfg, format) in [
        (TritterConfig::preset("test").unwrap(), KvCacheFormat::F32),
        (windowed_test_config(), KvCacheFormat::Int4),
    ] {
        let engine = engine_of(&bf16_reference(&cfg, 61));
        let stops = vec![vec![100u32, 101]];
        let prompts: Vec<Vec<u32>> = [1usize, 7, 12, 3, 20, 5]
            .iter()
            .enumerate()
            .map(|(i, &n)| random_tokens(&cfg, n, 70 + i as u64))
            .collect();
        let requests: Vec<GenerationRequest<'_>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| GenerationRequest {
                prompt: p,
                options: SamplingOptions {
                    max_new_tokens: 6 + 3 * i,
                    temperature: [0.0, 0.7, 1.2][i % 3],
                    top_k: [0, 20, 5][i % 3],
                    top_p: [1.0, 0.9, 0.6][i % 3],
                    repetition_penalty: [1.0, 1.3][i % 2],
                    seed: 80 + i as u64,
                    stop_tokens: if i == 4 { &[2, 300] } else { &[] },
                    stop_sequences: &stops,
                    ..SamplingOptions::default()
                },
            })
            .collect();
        let mut cache = KvCacheOptions::for_config(&cfg);
        cache.format = format;
        cache.page_size = 8;
        let solo: Vec<Generation> = requests
            .iter()
            .map(|r| {
                let one = KvCacheOptions {
                    max_sequences: 1,
                    ..cache.clone()
                };
                run_one(&engine, r.prompt, &r.options, &one)
            })
            .collect();
        let batched = KvCacheOptions {
            max_sequences: 2,
            max_prefill_chunk: 3,
            ..cache.clone()
        };
        let mut events = Vec::new();
        let together = generate_batch(&engine, &requests, &batched, |e| {
            events.push(*e);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(together, solo, "{format:?}");
        for (i, g) in together.iter().enumerate() {
            let streamed: Vec<u32> = events
                .iter()
                .filter(|e| e.request == i)
                .map(|e| e.token)
                .collect();
            assert_eq!(streamed, g.tokens, "request {i}: streamed tokens");
        }
        // Requests really interleaved: some token of a later request came before a token
        // of an earlier one.
        assert!(events.windows(2).any(|w| w[1].request < w[0].request));
    }
}

/// Generation is deterministic given the seed, the callback sees every token in order with
/// its index, and returning `Break` ends that request (`Cancelled`) without touching the
/// others.
#[test]
fn streaming_is_deterministic_and_break_cancels() {
    let (cfg, engine) = test_engine(91);
    let cache = KvCacheOptions::for_config(&cfg);
    let prompt = random_tokens(&cfg, 5, 92);
    let opts = SamplingOptions {
        max_new_tokens: 12,
        temperature: 0.9,
        seed: 93,
        stop_at_eos: false,
        ..SamplingOptions::default()
    };
    let a = run_one(&engine, &prompt, &opts, &cache);
    assert_eq!(a, run_one(&engine, &prompt, &opts, &cache));
    let mut seen = Vec::new();
    let cut = generate_stream(&engine, &prompt, &opts, &cache, |t| {
        seen.push(t);
        if seen.len() == 4 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(cut.finish, FinishReason::Cancelled);
    assert_eq!(cut.tokens, a.tokens[..4]);
    assert_eq!(seen, cut.tokens);

    let requests = [
        GenerationRequest {
            prompt: &prompt,
            options: opts,
        },
        GenerationRequest {
            prompt: &prompt[..2],
            options: opts,
        },
    ];
    let out = generate_batch(&engine, &requests, &cache, |e| {
        assert!(e.index < opts.max_new_tokens);
        if e.request == 0 && e.index == 1 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(out[0].finish, FinishReason::Cancelled);
    assert_eq!(out[0].tokens, a.tokens[..2]);
    assert_eq!(out[1], run_one(&engine, &prompt[..2], &opts, &cache));
}

/// A prompt that fills the position range gets one token and `ContextFull`; one that leaves
/// room for k tokens gets k + 1 tokens at most (the last one is never fed); zero
/// `max_new_tokens` returns nothing.
#[test]
fn end_of_position_range_and_zero_tokens() {
    let (cfg, engine) = test_engine(95);
    let cache = KvCacheOptions::for_config(&cfg);
    let max = cfg.max_position_embeddings;
    let full = random_tokens(&cfg, max, 96);
    let g = run_one(&engine, &full, &greedy(10), &cache);
    assert_eq!((g.tokens.len(), g.finish), (1, FinishReason::ContextFull));
    let g = run_one(&engine, &full[..max - 3], &greedy(10), &cache);
    assert_eq!((g.tokens.len(), g.finish), (4, FinishReason::ContextFull));
    let g = run_one(&engine, &full[..4], &greedy(0), &cache);
    assert_eq!((g.tokens.len(), g.finish), (0, FinishReason::MaxTokens));
}

/// With a sliding window the paged INT4 cache recycles pages: a pool sized for one sequence
/// (sinks + window + slack, far fewer tokens than decoded) decodes to the end of the
/// position range token by token, and the free pages stay constant once the window is full.
#[test]
fn windowed_decode_runs_far_past_the_pool() {
    let cfg = windowed_test_config();
    let engine = engine_of(&bf16_reference(&cfg, 97));
    let mut options = KvCacheOptions::for_config(&cfg);
    options.format = KvCacheFormat::Int4;
    options.page_size = 8;
    options.max_sequences = 1;
    let mut cache = engine.new_cache(&options).unwrap();
    let pool = cache.free_pages().unwrap();
    assert!(pool * options.page_size < cfg.max_position_embeddings / 4);
    let seq = cache.add_sequence();
    let tokens = random_tokens(&cfg, cfg.max_position_embeddings, 98);
    let mut free = Vec::new();
    for t in &tokens {
        let step = StepInput {
            seq,
            tokens: std::slice::from_ref(t),
            logits: LogitsFor::Last,
        };
        let logits = engine.step(&mut cache, &[step]).unwrap().pop().unwrap();
        assert!(logits.iter().all(|v| v.is_finite()));
        free.push(cache.free_pages().unwrap());
    }
    let w = cfg.sliding_window.unwrap();
    let settled = &free[2 * w..];
    assert!(settled
        .iter()
        .all(|&f| f + 1 >= free[2 * w] && f <= free[2 * w] + 1));
    cache.free(seq).unwrap();
    assert_eq!(cache.free_pages(), Some(pool));
}

/// The engine and the reference loop (`generate`, which re-runs the candle model on the
/// same weights for every token) produce the same tokens, greedy and sampled with top-k,
/// top-p and the repetition penalty (the logits agree to ~1e-6, far from any sampling
/// boundary these seeds meet).
#[test]
fn engine_generation_matches_the_reference_loop() {
    let cfg = TritterConfig::preset("test").unwrap();
    let model = bf16_reference(&cfg, 99);
    let engine = engine_of(&model);
    let cache = KvCacheOptions::for_config(&cfg);
    let prompt = random_tokens(&cfg, 9, 100);
    for opts in [
        greedy(16),
        SamplingOptions {
            max_new_tokens: 16,
            temperature: 0.8,
            top_k: 30,
            top_p: 0.9,
            repetition_penalty: 1.2,
            seed: 101,
            ..SamplingOptions::default()
        },
    ] {
        let reference = generate(&model, &prompt, &opts).unwrap();
        let ours = run_one(&engine, &prompt, &opts, &cache);
        assert_eq!(ours.tokens, reference);
    }
}

/// Bad options and requests are typed errors before anything runs: top_p outside (0, 1],
/// a non-positive penalty, an empty stop sequence, latent steps on the engine, an empty
/// prompt, an id outside the vocabulary.
#[test]
fn bad_options_are_typed_errors() {
    let (cfg, engine) = test_engine(103);
    let cache = KvCacheOptions::for_config(&cfg);
    let prompt = [5u32, 6];
    let empty_seq = vec![vec![]];
    let cases: Vec<(SamplingOptions<'_>, &str)> = vec![
        (
            SamplingOptions {
                top_p: 0.0,
                ..greedy(3)
            },
            "top_p",
        ),
        (
            SamplingOptions {
                top_p: 1.5,
                ..greedy(3)
            },
            "top_p",
        ),
        (
            SamplingOptions {
                top_p: f64::NAN,
                ..greedy(3)
            },
            "top_p",
        ),
        (
            SamplingOptions {
                repetition_penalty: 0.0,
                ..greedy(3)
            },
            "repetition_penalty",
        ),
        (
            SamplingOptions {
                stop_sequences: &empty_seq,
                ..greedy(3)
            },
            "stop_sequences",
        ),
        (
            SamplingOptions {
                latent_steps: 2,
                ..greedy(3)
            },
            "latent_steps",
        ),
    ];
    for (opts, what) in cases {
        let e = generate_stream(&engine, &prompt, &opts, &cache, |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
        assert!(
            matches!(&e, TritterError::InvalidArgument { what: w, .. } if *w == what),
            "{what}: {e:?}"
        );
    }
    let e = generate_stream(&engine, &[], &greedy(3), &cache, |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(matches!(e, TritterError::ShapeMismatch { .. }), "{e:?}");
    let bad = [1, cfg.vocab_size as u32];
    let e = generate_stream(&engine, &bad, &greedy(3), &cache, |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(
        matches!(e, TritterError::TokenOutOfRange { position: 1, .. }),
        "{e:?}"
    );
}

/// `bench_engine` on the CPU engine: throughputs are positive and consistent with the
/// timings (`batch * prompt / prefill_s`, `batch / step_s`), the sequences are freed (a
/// second run on the same options works), and bad arguments are typed errors.
#[test]
fn bench_engine_measures_and_refuses_bad_arguments() {
    let cfg = windowed_test_config();
    let engine = engine_of(&bf16_reference(&cfg, 2));
    let mut opts = KvCacheOptions::for_config(&cfg);
    opts.max_sequences = 3;
    for _ in 0..2 {
        let r = tritter::engine::bench_engine(&engine, &opts, 3, 9, 4, 1, || None).unwrap();
        assert_eq!((r.batch, r.prompt_len, r.decode_steps), (3, 9, 4));
        assert!(r.prefill_s > 0.0 && r.decode_step_s > 0.0);
        let rel = |a: f64, b: f64| (a - b).abs() / b;
        assert!(rel(r.prefill_tokens_per_s, 27.0 / r.prefill_s) < 1e-9);
        assert!(rel(r.decode_tokens_per_s, 3.0 / r.decode_step_s) < 1e-9);
        assert_eq!(r.peak_memory_bytes, None);
    }
    let mut calls = 0;
    let r = tritter::engine::bench_engine(&engine, &opts, 1, 5, 2, 1, || {
        calls += 1;
        Some(100 * calls)
    })
    .unwrap();
    assert_eq!(r.peak_memory_bytes, Some(300), "peak of the three samples");
    for (b, p, d) in [(0, 5, 2), (1, 0, 2), (1, 5, 0)] {
        let err = tritter::engine::bench_engine(&engine, &opts, b, p, d, 1, || None).unwrap_err();
        assert!(matches!(err, TritterError::InvalidArgument { .. }), "{err}");
    }
    let long = cfg.max_position_embeddings;
    let err = tritter::engine::bench_engine(&engine, &opts, 1, long, 1, 1, || None).unwrap_err();
    assert!(matches!(err, TritterError::SequenceTooLong { .. }), "{err}");
}
