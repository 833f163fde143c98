//! The INT4 group format (DESIGN.md section 4) and its CPU reference.
//!
//! A group is [`GROUP`] = 32 consecutive values along the head dim of one token and head:
//!
//! ```text
//! min_h   = f16(min(x))                  (round to nearest even; -0 normalized to +0)
//! scale_h = f16((max(x) - min(x)) / 15)  (f32 division, then round to nearest even;
//!                                         the next smaller f16 while 15 * scale_h + min_h
//!                                         >= 65520, so no code dequantizes to an f16 inf)
//! code    = clamp(round((x - min_h) / scale_h), 0, 15)   (0 when scale_h == 0;
//!                                                         round half away from zero)
//! x_hat   = code * scale_h + min_h        (f32)
//! ```
//!
//! Codes use the f16-*rounded* scale and minimum, so the error bound holds for the stored
//! parameters: `|x - x_hat| <= scale_h / 2 + |min - min_h| + 2^-20 * (1 + max|x|)`
//! ([`group_error_bound`]). `|min - min_h| <= 2^-11 |min|` (half an f16 ulp), the last term
//! covers f32 rounding and an f16 scale that underflows to zero. Two codes per byte, low
//! nibble first: value `2i` in bits 0..4 of byte `i`, value `2i + 1` in bits 4..8.

use half::f16;

use crate::{KvError, Result};

/// Values per quantization group along the head dim.
pub const GROUP: usize = 32;
/// Bytes of one group's codes (two 4-bit codes per byte).
pub const GROUP_CODE_BYTES: usize = GROUP / 2;
/// Bytes of one group's parameters: f16 scale and f16 minimum (stored as a `half2`,
/// scale in the low half).
pub const GROUP_PARAM_BYTES: usize = 4;
/// Bytes of one group: 16 bytes of codes + 4 bytes of parameters = 0.625 bytes per value.
pub const GROUP_BYTES: usize = GROUP_CODE_BYTES + GROUP_PARAM_BYTES;
/// Largest code.
pub const CODE_MAX: u8 = 15;
/// Largest finite f16; inputs beyond it cannot be stored (the f16 minimum would be Inf).
pub const F16_MAX: f32 = 65504.0;
/// The smallest value that rounds to f16 infinity (65504 plus half a step, a tie that
/// rounds to the even infinity).
const F16_OVERFLOW: f32 = 65520.0;

const _: () = assert!(GROUP_BYTES == 20 && GROUP_BYTES * 8 == 5 * GROUP);

/// One quantized group: 16 bytes of codes, the f16 scale and the f16 minimum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Int4Group {
    /// `codes[i]` holds value `2i` in its low nibble and `2i + 1` in its high nibble.
    pub codes: [u8; GROUP_CODE_BYTES],
    /// Step between codes, f16.
    pub scale: f16,
    /// Value of code 0, f16.
    pub min: f16,
}

impl Int4Group {
    /// Code of value `i` (0..32).
    pub fn code(&self, i: usize) -> u8 {
        (self.codes[i / 2] >> (4 * (i % 2))) & 0xF
    }

    /// The 32 dequantized values `code * scale + min` (f32).
    pub fn dequantize(&self) -> [f32; GROUP] {
        let (s, m) = (self.scale.to_f32(), self.min.to_f32());
        std::array::from_fn(|i| f32::from(self.code(i)).mul_add(s, m))
    }

    /// The parameters as stored in a page: one little-endian `half2` (scale, min).
    pub fn param_bytes(&self) -> [u8; GROUP_PARAM_BYTES] {
        let (s, m) = (self.scale.to_le_bytes(), self.min.to_le_bytes());
        [s[0], s[1], m[0], m[1]]
    }

    /// Rebuilds a group from its stored codes and `half2` parameter bytes.
    pub fn from_bytes(codes: &[u8], params: &[u8]) -> Self {
        let mut c = [0u8; GROUP_CODE_BYTES];
        c.copy_from_slice(&codes[..GROUP_CODE_BYTES]);
        Int4Group {
            codes: c,
            scale: f16::from_le_bytes([params[0], params[1]]),
            min: f16::from_le_bytes([params[2], params[3]]),
        }
    }
}

/// Quantizes one group of 32 finite values with `|x| <= 65504` (the caller validates;
/// [`quantize_int4`] does). Bit-exact with the CUDA kernel `kv_quantize_pages`.
pub fn quantize_group(x: &[f32; GROUP]) -> Int4Group {
    let (mut lo, mut hi) = (x[0], x[0]);
    for &v in &x[1..] {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    // `+ 0.0` turns -0 into +0, so -0/+0 ties never change the stored bits.
    let min = f16::from_f32(lo + 0.0);
    let mut scale = f16::from_f32((hi - lo) / 15.0 + 0.0);
    // Every code must dequantize to a finite f16 (`code * scale + min` rounded once, as the
    // tensor-core decode kernel computes it): where the top code would round past 65504
    // (a group maximum within a scale rounding of it), take the next smaller scale. The
    // top values then clamp to code 15, within a few f16 steps of the scale, far inside the
    // `scale / 2` bound.
    while 15.0 * scale.to_f32() + min.to_f32() >= F16_OVERFLOW {
        scale = f16::from_bits(scale.to_bits() - 1);
    }
    let (s, m) = (scale.to_f32(), min.to_f32());
    let mut codes = [0u8; GROUP_CODE_BYTES];
    if s > 0.0 {
        for (i, &v) in x.iter().enumerate() {
            let q = ((v - m) / s).round().clamp(0.0, f32::from(CODE_MAX)) as u8;
            codes[i / 2] |= q << (4 * (i % 2));
        }
    }
    Int4Group { codes, scale, min }
}

/// The worst-case reconstruction error of a group quantized from `x` (see the module docs):
/// `scale_h / 2 + |min - min_h| + 2^-20 * (1 + max|x|)`.
pub fn group_error_bound(x: &[f32; GROUP], g: &Int4Group) -> f32 {
    let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    0.5 * g.scale.to_f32() + (lo - g.min.to_f32()).abs() + (1.0 + amax) * (2f32).powi(-20)
}

/// Checks that every value is finite and within the f16 range, naming the first offender.
pub fn check_storable(what: &'static str, x: &[f32]) -> Result<()> {
    match x.iter().position(|v| !v.is_finite() || v.abs() > F16_MAX) {
        None => Ok(()),
        Some(index) => Err(KvError::NonFinite {
            what,
            index,
            value: x[index].to_string(),
        }),
    }
}

/// Quantizes rows of `head_dim` values (`x` is `(rows, head_dim)`, `head_dim` a multiple of
/// 32) into `rows * head_dim / 32` groups, row-major. Validates finiteness and range first.
pub fn quantize_int4(x: &[f32], head_dim: usize) -> Result<Vec<Int4Group>> {
    if head_dim == 0 || head_dim % GROUP != 0 {
        return Err(KvError::BadConfig {
            what: "head_dim",
            actual: head_dim,
            expected: "a positive multiple of 32 (INT4 groups of 32 along the head dim)",
        });
    }
    if x.len() % head_dim != 0 {
        return Err(KvError::LengthMismatch {
            what: "x",
            shape: format!("(rows, head_dim={head_dim})"),
            actual: x.len(),
            expected: x.len().div_ceil(head_dim) * head_dim,
        });
    }
    check_storable("x", x)?;
    Ok(x.chunks_exact(GROUP)
        .map(|c| quantize_group(c.try_into().expect("chunk of GROUP values")))
        .collect())
}

/// Dequantizes groups back to `(groups * 32,)` f32 values.
pub fn dequantize_int4(groups: &[Int4Group]) -> Vec<f32> {
    groups.iter().flat_map(|g| g.dequantize()).collect()
}
