//! Id layout, byte-level text/code and the BPE vocabulary of the multimodal tokenizer.
//! Test names live under `tokenizer_text::` so `cargo test -p tritter tokenizer` selects them.

mod tokenizer_text {
    use std::sync::OnceLock;

    use proptest::prelude::*;
    use tritter::tokenizer::bytes::{decode_bytes, encode_bytes};
    use tritter::tokenizer::vocab::{
        BYTE_OFFSET, MAX_MEDIA_CODES, MIN_LATENT_VOCAB_SIZE, MIN_MEDIA_CODES, MIN_VOCAB_SIZE,
        NUM_BYTE_TOKENS, NUM_SPECIAL_TOKENS,
    };
    use tritter::tokenizer::{
        BpeTrainingConfig, BpeVocab, LatentToken, Modality, MultimodalTokenizer, Segment,
        SpecialToken, TokenKind, TokenizerError, VocabLayout,
    };

    /// Vocab of the presets (DESIGN.md section 5).
    const PRESET_VOCAB: usize = 65536;
    /// Merges learned in tests: enough to see compression, small enough for a debug build.
    const TEST_MERGES: usize = 300;

    fn all_ranges(l: &VocabLayout) -> [std::ops::Range<u32>; 6] {
        [
            l.special_range(),
            l.byte_range(),
            l.bpe_range(),
            l.image_range(),
            l.audio_range(),
            l.latent_range(),
        ]
    }

    /// The special ids and names are those of DESIGN.md section 5, in order.
    #[test]
    fn special_ids_match_design() {
        let names = [
            "<pad>", "<bos>", "<eos>", "<unk>", "<text>", "<code>", "<image>", "<audio>",
        ];
        assert_eq!(SpecialToken::ALL.len(), NUM_SPECIAL_TOKENS as usize);
        for (id, (s, name)) in (0u32..).zip(SpecialToken::ALL.iter().zip(names)) {
            assert_eq!(s.id(), id);
            assert_eq!(s.as_str(), name);
            assert_eq!(SpecialToken::from_id(id), Some(*s));
        }
        assert_eq!(SpecialToken::from_id(NUM_SPECIAL_TOKENS), None);
        assert_eq!(Modality::Image.prefix_token(), SpecialToken::Image);
    }

    /// The preset vocab gets exactly the documented table: BPE to 49150, 8192 image, 8192
    /// audio, then `<bot>` = 65534 and `<eot>` = 65535.
    #[test]
    fn layout_of_preset_vocab_matches_table() {
        let l = VocabLayout::new(PRESET_VOCAB).unwrap();
        let media = MAX_MEDIA_CODES;
        let v = PRESET_VOCAB as u32;
        let top = v - 2;
        assert_eq!(l.byte_range(), BYTE_OFFSET..BYTE_OFFSET + NUM_BYTE_TOKENS);
        assert_eq!(l.bpe_range(), MIN_VOCAB_SIZE as u32..top - 2 * media);
        assert_eq!(l.bpe_range().end, 49150);
        assert_eq!(l.image_range(), top - 2 * media..top - media);
        assert_eq!(l.audio_range(), top - media..top);
        assert_eq!(l.latent_range(), 65534..65536);
        assert_eq!(l.latent_id(LatentToken::Bot), Some(65534));
        assert_eq!(l.latent_id(LatentToken::Eot), Some(65535));
    }

    proptest! {
        /// For any vocab size the six ranges are contiguous, disjoint, cover 0..vocab exactly,
        /// media ranges are empty or within [256, 8192], the latent markers are the top two
        /// ids, and `classify` agrees at every boundary.
        #[test]
        fn layout_ranges_disjoint_and_cover_vocab(vocab in MIN_VOCAB_SIZE..(1usize << 22)) {
            let l = VocabLayout::new(vocab).unwrap();
            let ranges = all_ranges(&l);
            prop_assert_eq!(ranges[0].start, 0);
            for w in ranges.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
            }
            prop_assert_eq!(ranges[5].end as usize, vocab);
            let markers = if vocab >= MIN_LATENT_VOCAB_SIZE { 2 } else { 0 };
            prop_assert_eq!(l.latent_range().len(), markers);
            for media in [l.image_range(), l.audio_range()] {
                let n = media.len() as u32;
                prop_assert!(n == 0 || (MIN_MEDIA_CODES..=MAX_MEDIA_CODES).contains(&n));
            }
            prop_assert_eq!(l.image_range().len(), l.audio_range().len());
            for r in ranges.iter().filter(|r| !r.is_empty()) {
                for id in [r.start, r.end - 1] {
                    let kind = l.classify(id, 0).unwrap();
                    let expected_range = match kind {
                        TokenKind::Special(_) => &ranges[0],
                        TokenKind::Byte(_) => &ranges[1],
                        TokenKind::Bpe(_) => &ranges[2],
                        TokenKind::ImageCode(_) => &ranges[3],
                        TokenKind::AudioCode(_) => &ranges[4],
                        TokenKind::Latent(_) => &ranges[5],
                    };
                    prop_assert_eq!(expected_range, r);
                }
            }
            prop_assert!(l.classify(vocab as u32, 0).is_err());
        }

        /// Any byte string, with or without a prefix, becomes one byte id per byte and decodes
        /// back exactly, through `decode_bytes` and through the facade.
        #[test]
        fn byte_round_trip_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let layout = VocabLayout::new(PRESET_VOCAB).unwrap();
            let ids = encode_bytes(&bytes, None);
            prop_assert_eq!(ids.len(), bytes.len());
            prop_assert!(ids.iter().all(|id| layout.byte_range().contains(id)));
            prop_assert_eq!(decode_bytes(&ids, &layout).unwrap(), bytes.clone());

            let tok = MultimodalTokenizer::new(layout);
            let text = tok.encode_text(&bytes).unwrap();
            prop_assert_eq!(text[0], SpecialToken::Text.id());
            prop_assert_eq!(&text[1..], &ids[..]);
            prop_assert_eq!(tok.decode(&text).unwrap(), vec![Segment::Text(bytes.clone())]);
            let code = tok.encode_code(&bytes).unwrap();
            prop_assert_eq!(code[0], SpecialToken::Code.id());
            prop_assert_eq!(tok.decode(&code).unwrap(), vec![Segment::Code(bytes.clone())]);
        }
    }

    /// Too small a vocab, media ranges that overflow, and a modality without room are typed
    /// errors whose messages carry the actual and expected values.
    #[test]
    fn layout_rejects_small_vocab_overflow_and_missing_room() {
        let err = VocabLayout::new(MIN_VOCAB_SIZE - 1).unwrap_err();
        assert!(matches!(err, TokenizerError::VocabTooSmall { .. }));
        assert_eq!(
            err.to_string(),
            "vocab_size 263 is below the minimum 264 (8 special tokens + 256 bytes)"
        );
        let err = VocabLayout::with_media_codes(1000, 500, 500).unwrap_err();
        assert!(
            matches!(err, TokenizerError::LayoutOverflow { available: 734, .. }),
            "{err}"
        );

        // 1024 / 8 = 128 < 256: images and audio are disabled, BPE takes everything.
        let small = VocabLayout::new(1024).unwrap();
        assert!(small.image_range().is_empty() && small.audio_range().is_empty());
        assert_eq!(small.bpe_range(), MIN_VOCAB_SIZE as u32..1022);
        let err = small.require(Modality::Audio, 256).unwrap_err();
        assert_eq!(
            err.to_string(),
            "audio needs 256 ids but the layout for vocab_size 1024 reserves 0; use a larger vocab or a smaller audio vocabulary"
        );
        let codec = tritter::tokenizer::MuLawCodec::new(16_000).unwrap();
        let err = MultimodalTokenizer::new(small)
            .with_audio(codec)
            .unwrap_err();
        assert!(matches!(
            err,
            TokenizerError::ModalityUnavailable {
                modality: Modality::Audio,
                ..
            }
        ));
    }

    /// Ids outside the vocab, media codes outside their segment, BPE ids without a BPE
    /// vocabulary and unconfigured media segments are typed errors, not panics.
    #[test]
    fn decode_rejects_invalid_sequences() {
        let layout = VocabLayout::new(PRESET_VOCAB).unwrap();
        let tok = MultimodalTokenizer::new(layout.clone());
        let bad = PRESET_VOCAB as u32 + 4464;
        let err = tok.decode(&[SpecialToken::Bos.id(), bad]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "token id 70000 at position 1 >= vocab_size 65536"
        );

        let image_code = layout.image_range().start;
        let err = tok.decode(&[image_code]).unwrap_err();
        assert!(
            matches!(err, TokenizerError::UnexpectedToken { position: 0, .. }),
            "{err}"
        );
        let err = tok
            .decode(&[SpecialToken::Text.id(), layout.audio_range().start])
            .unwrap_err();
        assert!(
            matches!(err, TokenizerError::UnexpectedToken { position: 1, .. }),
            "{err}"
        );

        let err = tok
            .decode(&[SpecialToken::Text.id(), layout.bpe_range().start])
            .unwrap_err();
        assert!(matches!(err, TokenizerError::UnknownBpeId { .. }), "{err}");
        let err = tok.decode(&[SpecialToken::Image.id()]).unwrap_err();
        assert!(matches!(
            err,
            TokenizerError::ModalityNotConfigured {
                modality: Modality::Image,
                ..
            }
        ));
        let err = tok.encode_audio(&[0.0], 16_000).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no audio model is configured: call with_audio"
        );
    }

    /// Framing specials and prefix-less bytes decode as their own segments, in order.
    #[test]
    fn decode_splits_specials_and_segments() {
        let tok = MultimodalTokenizer::new(VocabLayout::new(PRESET_VOCAB).unwrap());
        let mut ids = vec![SpecialToken::Bos.id()];
        ids.extend(tok.encode_text("hi").unwrap());
        ids.extend(tok.encode_code("fn f() {}").unwrap());
        ids.extend(tok.encode_text("").unwrap());
        ids.push(SpecialToken::Eos.id());
        // Prefix-less bytes run until the next non-text id.
        ids.extend(encode_bytes(b"raw", None));
        ids.push(SpecialToken::Pad.id());
        assert_eq!(
            tok.decode(&ids).unwrap(),
            vec![
                Segment::Special(SpecialToken::Bos),
                Segment::Text(b"hi".to_vec()),
                Segment::Code(b"fn f() {}".to_vec()),
                Segment::Text(Vec::new()),
                Segment::Special(SpecialToken::Eos),
                Segment::Text(b"raw".to_vec()),
                Segment::Special(SpecialToken::Pad),
            ]
        );
    }

    /// A deterministic corpus of prose and code with repeated words, so merges are learned.
    fn corpus() -> Vec<String> {
        let words = [
            "the",
            "model",
            "token",
            "ternary",
            "weights",
            "attention",
            "layer",
            "kernel",
            "über",
            "naïve",
            "日本語",
            "emoji 🙂",
        ];
        let mut lines = Vec::new();
        for i in 0..400usize {
            let a = words[i % words.len()];
            let b = words[(i * 7 + 3) % words.len()];
            lines.push(format!("The {a} of the {b} is {i}; the {b} has {a}s.\n"));
            lines.push(format!(
                "fn {a}_{i}(x: &[f32]) -> f32 {{ x.iter().sum::<f32>() * {i}.0 }}\n"
            ));
        }
        lines
    }

    fn trained() -> &'static (VocabLayout, BpeVocab) {
        static BPE: OnceLock<(VocabLayout, BpeVocab)> = OnceLock::new();
        BPE.get_or_init(|| {
            let layout = VocabLayout::new(PRESET_VOCAB).unwrap();
            let config = BpeTrainingConfig {
                num_merges: TEST_MERGES,
                min_frequency: 2,
            };
            let bpe = BpeVocab::train(corpus().into_iter(), &layout, &config).unwrap();
            (layout, bpe)
        })
    }

    /// Training fills ids 264.. with at most `num_merges` tokens, compresses its corpus, is
    /// deterministic, and save/load through tokenizer.json gives the same JSON and ids.
    #[test]
    fn bpe_train_save_load_round_trip() {
        let (layout, bpe) = trained();
        let merged = bpe.num_merged_tokens();
        assert!(
            merged > TEST_MERGES / 2 && merged <= TEST_MERGES,
            "{merged} merged tokens"
        );
        let vocab = bpe.hf_tokenizer().get_vocab(true);
        assert_eq!(vocab.len(), MIN_VOCAB_SIZE + merged);
        assert!(vocab
            .values()
            .all(|&id| (id as usize) < MIN_VOCAB_SIZE + merged));

        let tok = MultimodalTokenizer::new(layout.clone())
            .with_bpe(bpe.clone())
            .unwrap();
        let sample = corpus()[0].clone() + &corpus()[1];
        let ids = tok.encode_text(&sample).unwrap();
        assert!(
            ids.len() * 2 < sample.len(),
            "{} ids for {} bytes: BPE should at least halve the length",
            ids.len(),
            sample.len()
        );
        assert!(ids[1..].iter().any(|id| layout.bpe_range().contains(id)));

        let config = BpeTrainingConfig {
            num_merges: TEST_MERGES,
            min_frequency: 2,
        };
        let retrained = BpeVocab::train(corpus().into_iter(), layout, &config).unwrap();
        assert_eq!(
            retrained.to_json(false).unwrap(),
            bpe.to_json(false).unwrap()
        );

        let dir = std::env::temp_dir().join(format!("tritter-bpe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        bpe.save(&path).unwrap();
        let loaded = BpeVocab::load(&path, layout).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.to_json(true).unwrap(), bpe.to_json(true).unwrap());
        let tok2 = MultimodalTokenizer::new(layout.clone())
            .with_bpe(loaded)
            .unwrap();
        assert_eq!(tok2.encode_text(&sample).unwrap(), ids);
        assert_eq!(
            tok2.decode(&ids).unwrap(),
            vec![Segment::Text(sample.into_bytes())]
        );
    }

    /// The saved tokenizer.json is a standard HF file: plain `tokenizers` gives the same ids
    /// for UTF-8 text, with single bytes at 8 + b.
    #[test]
    fn bpe_json_is_standard_hf_tokenizer_with_tritter_ids() {
        let (layout, bpe) = trained();
        let hf: tokenizers::Tokenizer = bpe.to_json(false).unwrap().parse().unwrap();
        let tok = MultimodalTokenizer::new(layout.clone())
            .with_bpe(bpe.clone())
            .unwrap();
        for text in ["the ternary kernel", "fn model_3(x: &[f32])", "ü"] {
            let hf_ids = hf.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(hf_ids, tok.encode_text(text).unwrap()[1..]);
        }
        assert_eq!(hf.token_to_id("a"), Some(layout.byte_id(b'a')));
        assert_eq!(hf.token_to_id("<image>"), Some(SpecialToken::Image.id()));
    }

    /// Literal special-token text in the input is text, never a special id.
    #[test]
    fn bpe_special_token_text_stays_text() {
        let (layout, bpe) = trained();
        let tok = MultimodalTokenizer::new(layout.clone())
            .with_bpe(bpe.clone())
            .unwrap();
        let text = "<bos>x<image><eos>";
        let ids = tok.encode_text(text).unwrap();
        assert!(ids[1..].iter().all(|&id| id >= NUM_SPECIAL_TOKENS));
        assert_eq!(
            tok.decode(&ids).unwrap(),
            vec![Segment::Text(text.as_bytes().to_vec())]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Any byte string (mostly corpus-like text with invalid UTF-8 mixed in) round-trips
        /// exactly through the BPE; invalid bytes fall back to their byte ids.
        #[test]
        fn bpe_round_trip_any_bytes(
            parts in proptest::collection::vec(
                prop_oneof![
                    "[a-z ;:_(){}.]{0,24}".prop_map(String::into_bytes),
                    "\\PC{0,8}".prop_map(String::into_bytes),
                    proptest::collection::vec(any::<u8>(), 0..16),
                ],
                0..8,
            )
        ) {
            let (layout, bpe) = trained();
            let bytes: Vec<u8> = parts.concat();
            let tok = MultimodalTokenizer::new(layout.clone()).with_bpe(bpe.clone()).unwrap();
            let ids = tok.encode_text(&bytes).unwrap();
            prop_assert!(ids[1..].iter().all(|&id| id >= NUM_SPECIAL_TOKENS
                && id < MIN_VOCAB_SIZE as u32 + bpe.num_merged_tokens() as u32));
            prop_assert_eq!(tok.decode(&ids).unwrap(), vec![Segment::Text(bytes.clone())]);
            if std::str::from_utf8(&bytes).is_err() {
                let invalid = bytes.utf8_chunks().flat_map(|c| c.invalid().to_vec()).next().unwrap();
                prop_assert!(ids.contains(&layout.byte_id(invalid)));
            }
        }
    }

    /// tokenizer.json files that would break the layout or exactness are typed errors: a
    /// normalizer, ids beyond a smaller layout's BPE range, a mismatched layout, bad JSON,
    /// and more merges than the range holds.
    #[test]
    fn bpe_rejects_files_that_break_the_layout() {
        let (layout, bpe) = trained();
        let json = bpe.to_json(false).unwrap();

        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["normalizer"] = serde_json::json!({"type": "Lowercase"});
        let err = BpeVocab::from_json(&value.to_string(), layout).unwrap_err();
        assert!(matches!(err, TokenizerError::BpeFormat(_)), "{err}");
        assert!(err.to_string().contains("normalizer"), "{err}");

        // 300 merges need ids up to 564; vocab 512 ends its BPE range at 510 (the top two
        // ids are the latent markers <bot>/<eot>).
        let tiny = VocabLayout::new(512).unwrap();
        let err = BpeVocab::from_json(&json, &tiny).unwrap_err();
        assert!(
            err.to_string().contains("outside the BPE range 264..510"),
            "{err}"
        );

        let other = VocabLayout::new(32000).unwrap();
        let for_other = BpeVocab::from_json(&json, &other).unwrap();
        let err = MultimodalTokenizer::new(layout.clone())
            .with_bpe(for_other)
            .unwrap_err();
        assert!(matches!(err, TokenizerError::BpeFormat(_)), "{err}");

        let err = BpeVocab::from_json("{ not json", layout).unwrap_err();
        assert!(matches!(err, TokenizerError::Bpe(_)), "{err}");

        let config = BpeTrainingConfig {
            num_merges: tiny.bpe_range().len() + 1,
            min_frequency: 2,
        };
        let err = BpeVocab::train(corpus().into_iter(), &tiny, &config).unwrap_err();
        assert!(
            matches!(err, TokenizerError::ModalityUnavailable { .. }),
            "{err}"
        );
    }
}
