//! Images (k-means patch codebook) and audio (mu-law) of the multimodal tokenizer, on
//! synthetic signals generated here. Test names live under `tokenizer_media::` so
//! `cargo test -p tritter tokenizer` selects them.

mod tokenizer_media {
    use std::io::Cursor;
    use std::sync::OnceLock;

    use image::{ImageFormat, Rgb, RgbImage};
    use tritter::tokenizer::audio::{DEFAULT_SAMPLE_RATE, MU_LAW_CODES};
    use tritter::tokenizer::image::{CODEBOOK_FORMAT, DEFAULT_PATCH_SIZE};
    use tritter::tokenizer::{
        mu_law_decode, mu_law_encode, psnr, snr_db, ImageCodebook, KMeansConfig, Modality,
        MuLawCodec, MultimodalTokenizer, Segment, SpecialToken, TokenizerError, VocabLayout,
        IMAGE_HEADER_TOKENS,
    };

    /// Vocab of the presets (DESIGN.md section 5).
    const PRESET_VOCAB: usize = 65536;
    /// Side of the synthetic test images: 8x8 patches of 8 pixels.
    const SIDE: u32 = 8 * DEFAULT_PATCH_SIZE;
    /// Codebook size of the tests: small so debug-build k-means stays well under a second.
    const TEST_CODES: usize = 64;

    /// Smooth RGB gradient; `phase` shifts the blue ramp so held-out images differ.
    fn gradient(phase: u32) -> RgbImage {
        RgbImage::from_fn(SIDE, SIDE, |x, y| {
            let s = SIDE - 1;
            Rgb([
                (x * 255 / s) as u8,
                (y * 255 / s) as u8,
                (((x + y + phase) % (2 * s)) * 255 / (2 * s)) as u8,
            ])
        })
    }

    /// Two-colour checkerboard with `square`-pixel squares shifted by `offset` pixels.
    fn checkerboard(square: u32, offset: u32, a: [u8; 3], b: [u8; 3]) -> RgbImage {
        RgbImage::from_fn(SIDE, SIDE, |x, y| {
            let on = ((x + offset) / square + (y + offset) / square) % 2 == 0;
            Rgb(if on { a } else { b })
        })
    }

    const DARK: [u8; 3] = [20, 30, 40];
    const LIGHT: [u8; 3] = [230, 220, 200];

    fn training_images() -> Vec<RgbImage> {
        vec![
            gradient(0),
            gradient(16),
            gradient(48),
            checkerboard(4, 0, DARK, LIGHT),
            checkerboard(4, 2, DARK, LIGHT),
            checkerboard(8, 0, LIGHT, DARK),
            checkerboard(16, 4, DARK, LIGHT),
        ]
    }

    fn config() -> KMeansConfig {
        KMeansConfig {
            seed: 42,
            ..KMeansConfig::new(TEST_CODES)
        }
    }

    fn codebook() -> &'static ImageCodebook {
        static CB: OnceLock<ImageCodebook> = OnceLock::new();
        CB.get_or_init(|| {
            ImageCodebook::train(&training_images(), DEFAULT_PATCH_SIZE, &config()).unwrap()
        })
    }

    fn image_tokenizer() -> MultimodalTokenizer {
        MultimodalTokenizer::new(VocabLayout::new(PRESET_VOCAB).unwrap())
            .with_image_codebook(codebook().clone())
            .unwrap()
    }

    fn decode_one_image(tok: &MultimodalTokenizer, ids: &[u32]) -> RgbImage {
        match tok.decode(ids).unwrap().as_slice() {
            [Segment::Image(img)] => img.clone(),
            other => panic!("expected one image segment, got {other:?}"),
        }
    }

    /// Encoding emits `<image>`, the patch-grid header and one in-range code per patch, and
    /// decoding reaches the PSNR bounds on training and held-out synthetic images.
    #[test]
    fn image_round_trip_psnr_bound() {
        let tok = image_tokenizer();
        let range = tok.layout().image_range();
        let grid = SIDE / DEFAULT_PATCH_SIZE;
        // Measured (seed 42, k = 64 shared by 3 gradients and 4 checkerboards, debug and
        // release alike): gradient trained 24.98 dB, held out 20.98 dB; shifted 4px checkerboard
        // reproduced exactly (infinite); held-out 8px checkerboard 48.55 dB. Bounds sit ~3 dB
        // below, leaving room for float-rounding differences in k-means across platforms.
        let cases = [
            ("gradient (trained)", gradient(16), 22.0),
            ("gradient (held out)", gradient(32), 18.0),
            (
                "checkerboard 4px shifted (trained)",
                checkerboard(4, 2, DARK, LIGHT),
                45.0,
            ),
            (
                "checkerboard 8px swapped (held out)",
                checkerboard(8, 0, DARK, LIGHT),
                45.0,
            ),
        ];
        for (name, img, bound) in cases {
            let ids = tok.encode_image(&img).unwrap();
            assert_eq!(ids[0], SpecialToken::Image.id());
            let header: Vec<u32> = [grid as u16, grid as u16]
                .iter()
                .flat_map(|s| s.to_be_bytes())
                .map(|b| tok.layout().byte_id(b))
                .collect();
            assert_eq!(ids[1..1 + IMAGE_HEADER_TOKENS], header[..]);
            let codes = &ids[1 + IMAGE_HEADER_TOKENS..];
            assert_eq!(codes.len(), (grid * grid) as usize);
            assert!(codes.iter().all(|c| range.contains(c)));
            let decoded = decode_one_image(&tok, &ids);
            let db = psnr(&img, &decoded).unwrap();
            println!("PSNR {name}: {db:.2} dB");
            assert!(
                db >= bound,
                "PSNR of {name} is {db:.2} dB, below the {bound} dB bound"
            );
        }
    }

    /// PNG bytes encode exactly like the decoded image; JPEG bytes decode and encode too.
    #[test]
    fn image_png_and_jpeg_bytes_encode() {
        let tok = image_tokenizer();
        let img = gradient(8);
        for format in [ImageFormat::Png, ImageFormat::Jpeg] {
            let mut bytes = Cursor::new(Vec::new());
            img.write_to(&mut bytes, format).unwrap();
            let ids = tok.encode_image_bytes(bytes.get_ref()).unwrap();
            if format == ImageFormat::Png {
                assert_eq!(ids, tok.encode_image(&img).unwrap());
            }
            assert_eq!(decode_one_image(&tok, &ids).dimensions(), img.dimensions());
        }
    }

    /// k-means is deterministic for a seed, and the safetensors save/load gives an
    /// identical codebook (hence identical codes).
    #[test]
    fn codebook_deterministic_and_save_load_identical() {
        let cb = codebook();
        assert_eq!(cb.num_codes(), TEST_CODES);
        assert_eq!(cb.patch_dim(), 3 * (DEFAULT_PATCH_SIZE as usize).pow(2));
        let again =
            ImageCodebook::train(&training_images(), DEFAULT_PATCH_SIZE, &config()).unwrap();
        assert_eq!(&again, cb);

        let dir = std::env::temp_dir().join(format!("tritter-codebook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("image_codebook.safetensors");
        cb.save(&path).unwrap();
        let loaded = ImageCodebook::load(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(&loaded, cb);
        assert_eq!(
            loaded.encode(&gradient(5)).unwrap(),
            cb.encode(&gradient(5)).unwrap()
        );

        // A patch subsample is deterministic too and still yields the requested size.
        let sub = KMeansConfig {
            max_patches: Some(4 * TEST_CODES),
            ..config()
        };
        let a = ImageCodebook::train(&training_images(), DEFAULT_PATCH_SIZE, &sub).unwrap();
        let b = ImageCodebook::train(&training_images(), DEFAULT_PATCH_SIZE, &sub).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.num_codes(), TEST_CODES);
    }

    /// Wrong sizes, undecodable bytes, malformed codebooks, codebooks larger than the image
    /// range and malformed image id sequences are typed errors with actual/expected values.
    #[test]
    fn image_errors_are_typed() {
        let tok = image_tokenizer();
        let err = tok.encode_image(&RgbImage::new(100, 64)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "image is 100x64 but the patch size 8 needs non-zero multiples of 8"
        );
        assert!(matches!(
            tok.encode_image(&RgbImage::new(0, 0)),
            Err(TokenizerError::ImageSize { .. })
        ));
        let err = tok
            .encode_image_bytes(b"\x89PNG\r\n\x1a\n not really")
            .unwrap_err();
        assert!(matches!(err, TokenizerError::ImageDecode(_)), "{err}");

        let mut bytes = codebook().to_safetensors().unwrap();
        let err = ImageCodebook::from_safetensors(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(matches!(err, TokenizerError::Safetensors(_)), "{err}");
        let tag = bytes
            .windows(CODEBOOK_FORMAT.len())
            .position(|w| w == CODEBOOK_FORMAT.as_bytes())
            .unwrap();
        bytes[tag] = b'X';
        let err = ImageCodebook::from_safetensors(&bytes).unwrap_err();
        assert!(
            err.to_string()
                .contains("expected \"tritter-image-codebook\""),
            "{err}"
        );
        let err = ImageCodebook::from_centroids(DEFAULT_PATCH_SIZE, vec![0.0; 100]).unwrap_err();
        assert!(err.to_string().contains("patch dimension 192"), "{err}");
        let err =
            ImageCodebook::from_centroids(DEFAULT_PATCH_SIZE, vec![f32::NAN; 192]).unwrap_err();
        assert!(matches!(err, TokenizerError::Codebook(_)), "{err}");
        let err = ImageCodebook::train(&[gradient(0)], DEFAULT_PATCH_SIZE, &KMeansConfig::new(65))
            .unwrap_err();
        assert!(matches!(err, TokenizerError::KMeans(_)), "{err}");

        // 4096 vocab: 512 image ids, so a 513-code codebook does not fit.
        let small = VocabLayout::new(4096).unwrap();
        let big = ImageCodebook::from_centroids(1, vec![0.5; 3 * 513]).unwrap();
        let err = MultimodalTokenizer::new(small)
            .with_image_codebook(big)
            .unwrap_err();
        assert!(
            matches!(
                err,
                TokenizerError::ModalityUnavailable {
                    modality: Modality::Image,
                    needed: 513,
                    available: 512,
                    ..
                }
            ),
            "{err}"
        );

        let ids = tok.encode_image(&gradient(0)).unwrap();
        let err = tok.decode(&ids[..ids.len() - 1]).unwrap_err();
        assert!(
            matches!(err, TokenizerError::TruncatedImage { position: 0, .. }),
            "{err}"
        );
        let err = tok.decode(&ids[..3]).unwrap_err();
        assert!(
            matches!(err, TokenizerError::TruncatedImage { .. }),
            "{err}"
        );
        let mut beyond = ids.clone();
        beyond[1 + IMAGE_HEADER_TOKENS] = tok.layout().image_range().start + TEST_CODES as u32;
        let err = tok.decode(&beyond).unwrap_err();
        assert!(
            matches!(err, TokenizerError::CodeOutOfCodebook { code: 64, .. }),
            "{err}"
        );
        let mut wrong = ids.clone();
        wrong[2] = tok.layout().image_range().start;
        let err = tok.decode(&wrong).unwrap_err();
        assert!(
            matches!(err, TokenizerError::UnexpectedToken { position: 2, .. }),
            "{err}"
        );
    }

    /// `seconds` of a sine at `freq` Hz and `amplitude`, at the default sample rate.
    fn sine(freq: f32, amplitude: f32, seconds: f32) -> Vec<f32> {
        let n = (DEFAULT_SAMPLE_RATE as f32 * seconds) as usize;
        (0..n)
            .map(|i| {
                amplitude
                    * (2.0 * std::f32::consts::PI * freq * i as f32 / DEFAULT_SAMPLE_RATE as f32)
                        .sin()
            })
            .collect()
    }

    fn wav_bytes(samples: &[f32], channels: u16, rate: u32) -> Vec<u8> {
        let spec = hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut cursor = Cursor::new(Vec::new());
        let mut w = hound::WavWriter::new(&mut cursor, spec).unwrap();
        for &x in samples {
            for _ in 0..channels {
                w.write_sample((x * f32::from(i16::MAX)).round() as i16)
                    .unwrap();
            }
        }
        w.finalize().unwrap();
        cursor.into_inner()
    }

    fn audio_tokenizer() -> MultimodalTokenizer {
        MultimodalTokenizer::new(VocabLayout::new(PRESET_VOCAB).unwrap())
            .with_audio(MuLawCodec::new(DEFAULT_SAMPLE_RATE).unwrap())
            .unwrap()
    }

    /// WAV -> `<audio>` + one in-range code per sample -> samples reaches the mu-law SNR
    /// bounds for loud and quiet sines (mu-law keeps the SNR roughly level).
    #[test]
    fn audio_round_trip_snr_bound() {
        let tok = audio_tokenizer();
        let codec = tok.audio_codec().unwrap();
        // Measured: amplitude 0.8 38.17 dB, amplitude 0.05 36.86 dB (against the 16-bit WAV
        // samples; 8-bit mu-law's theoretical ~38 dB). Bounds ~3 dB below the measurement.
        for (amplitude, bound) in [(0.8, 35.0), (0.05, 34.0)] {
            let wav = wav_bytes(&sine(440.0, amplitude, 0.5), 1, DEFAULT_SAMPLE_RATE);
            let reference = codec.read_wav(&wav).unwrap();
            let ids = tok.encode_wav(&wav).unwrap();
            assert_eq!(ids[0], SpecialToken::Audio.id());
            assert_eq!(ids.len(), 1 + reference.len());
            let range = tok.layout().audio_range();
            assert!(ids[1..]
                .iter()
                .all(|&id| id >= range.start && id < range.start + MU_LAW_CODES as u32));
            let segments = tok.decode(&ids).unwrap();
            let [Segment::Audio {
                samples,
                sample_rate,
            }] = segments.as_slice()
            else {
                panic!("expected one audio segment");
            };
            assert_eq!(*sample_rate, DEFAULT_SAMPLE_RATE);
            let db = snr_db(&reference, samples).unwrap();
            println!("SNR sine 440 Hz amplitude {amplitude}: {db:.2} dB");
            assert!(db >= bound, "SNR {db:.2} dB below the {bound} dB bound");

            // Decoded samples survive a WAV write/read (16-bit) with the same SNR to 0.5 dB.
            let back = codec.read_wav(&codec.write_wav(samples).unwrap()).unwrap();
            assert!((snr_db(&reference, &back).unwrap() - db).abs() < 0.5);
        }
    }

    /// mu-law maps -1 and 1 to the end codes, is monotone, and decode(encode(x)) stays within
    /// half a quantization step of the companded curve.
    #[test]
    fn mu_law_is_monotone_and_covers_all_codes() {
        assert_eq!(mu_law_encode(-1.0), 0);
        assert_eq!(usize::from(mu_law_encode(1.0)), MU_LAW_CODES - 1);
        let mut last = 0u8;
        for i in 0..=2000 {
            let x = i as f32 / 1000.0 - 1.0;
            let c = mu_law_encode(x);
            assert!(c >= last, "not monotone at {x}");
            last = c;
            assert_eq!(mu_law_encode(mu_law_decode(c)), c);
        }
        let codes: std::collections::HashSet<u8> =
            (0..=255).map(|c| mu_law_encode(mu_law_decode(c))).collect();
        assert_eq!(codes.len(), MU_LAW_CODES);
    }

    /// Stereo WAV is mixed down to mono by averaging channels.
    #[test]
    fn audio_stereo_wav_is_mixed_down() {
        let tok = audio_tokenizer();
        let mono = sine(220.0, 0.5, 0.1);
        let stereo = wav_bytes(&mono, 2, DEFAULT_SAMPLE_RATE);
        let one = wav_bytes(&mono, 1, DEFAULT_SAMPLE_RATE);
        assert_eq!(
            tok.encode_wav(&stereo).unwrap(),
            tok.encode_wav(&one).unwrap()
        );
    }

    /// Another sample rate, corrupt WAV bytes, out-of-range samples and codes beyond the 256
    /// mu-law codes are typed errors.
    #[test]
    fn audio_errors_are_typed() {
        let tok = audio_tokenizer();
        let err = tok
            .encode_wav(&wav_bytes(&sine(440.0, 0.5, 0.01), 1, 44_100))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "audio is sampled at 44100 Hz but the audio tokenizer expects 16000 Hz; resample it first (e.g. `sox in.wav -r 16000 out.wav`)"
        );
        assert!(matches!(
            tok.encode_wav(b"RIFF\x00\x00garbage"),
            Err(TokenizerError::Wav(_))
        ));
        let err = tok
            .encode_audio(&[0.0, 1.5, 0.0], DEFAULT_SAMPLE_RATE)
            .unwrap_err();
        assert!(
            matches!(err, TokenizerError::SampleOutOfRange { index: 1, .. }),
            "{err}"
        );
        assert!(tok.encode_audio(&[f32::NAN], DEFAULT_SAMPLE_RATE).is_err());
        assert!(matches!(
            MuLawCodec::new(0),
            Err(TokenizerError::InvalidSampleRate(0))
        ));
        let beyond = tok.layout().audio_range().start + MU_LAW_CODES as u32;
        let err = tok.decode(&[SpecialToken::Audio.id(), beyond]).unwrap_err();
        assert!(
            matches!(
                err,
                TokenizerError::CodeOutOfCodebook {
                    modality: Modality::Audio,
                    code: 256,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// A sequence mixing every modality decodes into the segments it was built from.
    #[test]
    fn mixed_sequence_decodes_into_segments() {
        let tok = image_tokenizer()
            .with_audio(MuLawCodec::new(DEFAULT_SAMPLE_RATE).unwrap())
            .unwrap();
        let img = checkerboard(4, 0, DARK, LIGHT);
        let mut ids = vec![SpecialToken::Bos.id()];
        ids.extend(tok.encode_text(b"caption \xff").unwrap());
        ids.extend(tok.encode_image(&img).unwrap());
        ids.extend(
            tok.encode_audio(&[0.0, 0.5, -0.5], DEFAULT_SAMPLE_RATE)
                .unwrap(),
        );
        ids.extend(tok.encode_code("x = 1").unwrap());
        ids.push(SpecialToken::Eos.id());
        let segments = tok.decode(&ids).unwrap();
        assert_eq!(segments.len(), 6);
        assert_eq!(segments[0], Segment::Special(SpecialToken::Bos));
        assert_eq!(segments[1], Segment::Text(b"caption \xff".to_vec()));
        assert!(matches!(&segments[2], Segment::Image(i) if psnr(&img, i).unwrap().is_infinite()));
        assert!(matches!(&segments[3], Segment::Audio { samples, .. } if samples.len() == 3));
        assert_eq!(segments[4], Segment::Code(b"x = 1".to_vec()));
        assert_eq!(segments[5], Segment::Special(SpecialToken::Eos));
    }
}
