//! Audio as 8-bit mu-law codes (ITU-T G.711 companding curve, continuous form as in WaveNet).
//!
//! A sample `x` in `[-1, 1]` is compressed by `F(x) = sgn(x) ln(1 + mu |x|) / ln(1 + mu)`,
//! `mu = 255`, and quantized uniformly to 256 codes, `code = round((F(x) + 1) / 2 * 255)`;
//! decoding inverts both steps. Quantization steps are small near zero and large near full
//! scale, so the SNR stays roughly level (~38 dB) over a wide range of loudness.
//!
//! WAV input (via `hound`) must already have the tokenizer's sample rate (a typed error
//! names both rates otherwise: resampling well needs a proper filter, which belongs in the
//! data pipeline). Multi-channel audio is mixed down to mono by averaging.

use std::io::Cursor;

use hound::{SampleFormat, WavReader, WavSpec, WavWriter};

use super::error::{Result, TokenizerError};

/// Number of mu-law codes (8 bits).
pub const MU_LAW_CODES: usize = 256;
/// The mu-law compression parameter.
pub const MU: f32 = 255.0;
/// Sample rate of the presets' audio tokenizer, in Hz.
pub const DEFAULT_SAMPLE_RATE: u32 = 16_000;

/// mu-law code (0..=255) of a sample in `[-1, 1]` (callers validate the range).
pub fn mu_law_encode(x: f32) -> u8 {
    let y = x.signum() * (MU * x.abs()).ln_1p() / MU.ln_1p();
    ((y + 1.0) * 0.5 * (MU_LAW_CODES - 1) as f32)
        .round()
        .clamp(0.0, (MU_LAW_CODES - 1) as f32) as u8
}

/// Sample in `[-1, 1]` of a mu-law code.
pub fn mu_law_decode(code: u8) -> f32 {
    let y = f32::from(code) / (MU_LAW_CODES - 1) as f32 * 2.0 - 1.0;
    y.signum() * ((1.0 + MU).powf(y.abs()) - 1.0) / MU
}

/// Signal-to-noise ratio in dB of `decoded` against `reference`:
/// `10 log10(sum ref^2 / sum (ref - dec)^2)`; infinite when identical.
/// Errors on different lengths or a silent (all-zero) reference.
pub fn snr_db(reference: &[f32], decoded: &[f32]) -> Result<f64> {
    if reference.len() != decoded.len() {
        return Err(TokenizerError::MetricShape(format!(
            "reference has {} samples but decoded has {}",
            reference.len(),
            decoded.len()
        )));
    }
    let signal: f64 = reference.iter().map(|&x| f64::from(x).powi(2)).sum();
    let noise: f64 = reference
        .iter()
        .zip(decoded)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    if signal == 0.0 {
        return Err(TokenizerError::MetricShape(
            "the reference is silent; SNR is undefined".into(),
        ));
    }
    Ok(if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    })
}

/// mu-law audio tokenizer at a fixed sample rate: WAV or `f32` samples to codes and back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MuLawCodec {
    sample_rate: u32,
}

impl MuLawCodec {
    /// A codec for audio at `sample_rate` Hz (> 0).
    pub fn new(sample_rate: u32) -> Result<Self> {
        if sample_rate == 0 {
            return Err(TokenizerError::InvalidSampleRate(sample_rate));
        }
        Ok(Self { sample_rate })
    }

    /// The sample rate in Hz that inputs must have and outputs carry.
    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// Codes of mono samples at `sample_rate` Hz; every sample must be finite and in [-1, 1].
    pub fn encode(&self, samples: &[f32], sample_rate: u32) -> Result<Vec<u8>> {
        if sample_rate != self.sample_rate {
            return Err(TokenizerError::SampleRate {
                actual: sample_rate,
                expected: self.sample_rate,
            });
        }
        if let Some(index) = samples.iter().position(|x| !(-1.0..=1.0).contains(x)) {
            return Err(TokenizerError::SampleOutOfRange {
                index,
                value: samples[index],
            });
        }
        Ok(samples.iter().map(|&x| mu_law_encode(x)).collect())
    }

    /// Samples in [-1, 1] of codes.
    pub fn decode(&self, codes: &[u8]) -> Vec<f32> {
        codes.iter().map(|&c| mu_law_decode(c)).collect()
    }

    /// Mono samples in [-1, 1] of a WAV file (8/16/24/32-bit integer PCM or 32-bit float),
    /// channels averaged. Errors on corrupt bytes, another sample rate or float samples
    /// outside [-1, 1].
    pub fn read_wav(&self, wav: &[u8]) -> Result<Vec<f32>> {
        let mut reader = WavReader::new(Cursor::new(wav)).map_err(TokenizerError::Wav)?;
        let spec = reader.spec();
        if spec.sample_rate != self.sample_rate {
            return Err(TokenizerError::SampleRate {
                actual: spec.sample_rate,
                expected: self.sample_rate,
            });
        }
        let interleaved: Vec<f32> = match spec.sample_format {
            SampleFormat::Float => reader
                .samples::<f32>()
                .collect::<std::result::Result<_, _>>()
                .map_err(TokenizerError::Wav)?,
            SampleFormat::Int => {
                let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f64;
                reader
                    .samples::<i32>()
                    .map(|s| s.map(|v| (f64::from(v) * scale) as f32))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(TokenizerError::Wav)?
            }
        };
        let channels = usize::from(spec.channels.max(1));
        if interleaved.len() % channels != 0 {
            return Err(TokenizerError::Wav(hound::Error::FormatError(
                "the sample count is not a multiple of the channel count",
            )));
        }
        let mono: Vec<f32> = interleaved
            .chunks_exact(channels)
            .map(|frame| frame.iter().sum::<f32>() / channels as f32)
            .collect();
        if let Some(index) = mono.iter().position(|x| !(-1.0..=1.0).contains(x)) {
            return Err(TokenizerError::SampleOutOfRange {
                index,
                value: mono[index],
            });
        }
        Ok(mono)
    }

    /// A mono 16-bit PCM WAV file of samples in [-1, 1] (values outside are clipped).
    pub fn write_wav(&self, samples: &[f32]) -> Result<Vec<u8>> {
        let spec = WavSpec {
            channels: 1,
            sample_rate: self.sample_rate,
            bits_per_sample: 16,
            sample_format: SampleFormat::Int,
        };
        let mut cursor = Cursor::new(Vec::new());
        {
            let mut writer = WavWriter::new(&mut cursor, spec).map_err(TokenizerError::Wav)?;
            for &x in samples {
                let v = (x.clamp(-1.0, 1.0) * f32::from(i16::MAX)).round() as i16;
                writer.write_sample(v).map_err(TokenizerError::Wav)?;
            }
            writer.finalize().map_err(TokenizerError::Wav)?;
        }
        Ok(cursor.into_inner())
    }
}
