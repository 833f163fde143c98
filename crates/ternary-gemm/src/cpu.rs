//! Fast CPU W2A8 product for decode and small batches (M = 1..64): runtime-detected AVX2
//! with a portable scalar fallback, rayon across output rows.
//!
//! Algorithm (bitnet.cpp-style, no multiplies by weights): with `code = w + 1` in {0,1,2},
//! `Σ_k w_k q_k = Σ_k code_k q_k - Σ_k q_k`. The row sum of the activations is computed once
//! per activation row, so the inner loop is an unsigned-by-signed byte dot product, which
//! AVX2 does 32 lanes at a time with `vpmaddubsw`.
//!
//! Layout trick: 8 canonical words (32 bytes) hold weights `128 b .. 128 b + 127`, and byte
//! `i` of them holds weights `4 i + j` at bits `2 j` (j = 0..3). Shifting the 32 bytes by
//! `2 j` and masking with 3 gives the codes of weights `4 i + j` for all 32 `i` at once.
//! The activations are permuted once per call to match (`xperm[128 b + 32 j + i] =
//! q[128 b + 4 i + j]`, zero padded), so the packed weights are read as stored: the weight
//! stream, which dominates traffic, needs no repacking.
//!
//! Bound: weight bytes. A GEMV streams `n_out * ceil(k_in/16) * 4` bytes; decode costs
//! 4 shifts/ands, 4 `vpmaddubsw` and 1 `vpmaddwd` per 32 bytes.

use rayon::prelude::*;

use crate::gemm_ref::{apply_a8_epilogue, check_x};
use crate::ternary::code_at;
use crate::{QuantizedActivations, Result, TernaryError, TernaryMatrix, CODES_PER_WORD};

/// Weights per SIMD block: 8 words of 16 codes.
const BLOCK: usize = 128;
const WORDS_PER_BLOCK: usize = BLOCK / CODES_PER_WORD;
/// Output rows per rayon task: enough work to amortize the task, small enough to balance.
const ROWS_PER_TASK: usize = 64;
/// Activation rows processed together per weight decode (accumulators held in registers).
const M_TILE: usize = 4;

/// Which CPU kernel runs the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuKernel {
    /// AVX2 when the CPU has it, else scalar.
    Auto,
    /// Portable scalar code.
    Scalar,
    /// AVX2 (`vpmaddubsw`); an error on CPUs without it.
    Avx2,
}

impl CpuKernel {
    /// True when AVX2 is available on this CPU.
    pub fn avx2_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    fn resolve(self) -> Result<Resolved> {
        match self {
            CpuKernel::Scalar => Ok(Resolved::Scalar),
            CpuKernel::Auto if Self::avx2_available() => Ok(Resolved::Avx2),
            CpuKernel::Auto => Ok(Resolved::Scalar),
            CpuKernel::Avx2 if Self::avx2_available() => Ok(Resolved::Avx2),
            CpuKernel::Avx2 => Err(TernaryError::Unsupported(
                "CpuKernel::Avx2 on a CPU without AVX2",
            )),
        }
    }
}

#[derive(Clone, Copy)]
enum Resolved {
    Scalar,
    Avx2,
}

/// Int8 activation rows laid out for the SIMD kernel: permuted per 128-block, zero padded,
/// with their row sums. Build once per call; reused across every output row.
struct PreparedActivations<'a> {
    codes: &'a [i8],
    k: usize,
    /// `(m, blocks * 128)` permuted codes.
    perm: Vec<i8>,
    /// `(m,)` Σ_k q[m, k].
    sums: Vec<i32>,
}

impl<'a> PreparedActivations<'a> {
    fn new(codes: &'a [i8], m: usize, k: usize) -> Self {
        let blocks = k.div_ceil(BLOCK);
        let mut perm = vec![0i8; m * blocks * BLOCK];
        let mut sums = vec![0i32; m];
        for (mi, row) in codes.chunks_exact(k).enumerate() {
            let dst = &mut perm[mi * blocks * BLOCK..][..blocks * BLOCK];
            for (kk, &q) in row.iter().enumerate() {
                let (b, r) = (kk / BLOCK, kk % BLOCK);
                dst[b * BLOCK + 32 * (r % 4) + r / 4] = q;
            }
            sums[mi] = row.iter().map(|&q| i32::from(q)).sum();
        }
        PreparedActivations {
            codes,
            k,
            perm,
            sums,
        }
    }
}

/// Exact integer accumulators `(m, n_out)` of `Wq · q` for int8 codes `(m, k_in)`; equal to
/// [`ternary_matmul_a8_acc_ref`](crate::ternary_matmul_a8_acc_ref) on every input.
pub fn ternary_matmul_a8_acc(
    w: &TernaryMatrix,
    codes: &[i8],
    m: usize,
    kernel: CpuKernel,
) -> Result<Vec<i32>> {
    check_x(w, codes.len(), m)?;
    let kernel = kernel.resolve()?;
    let (n_out, k) = (w.n_out(), w.k_in());
    let prep = PreparedActivations::new(codes, m, k);
    // Computed as (n_out, m) so tasks own disjoint output rows, then transposed.
    let mut acc_t = vec![0i32; n_out * m];
    acc_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| {
            for (i, out_row) in out.chunks_exact_mut(m).enumerate() {
                let n = task * ROWS_PER_TASK + i;
                row_dot(kernel, w.row_words(n), &prep, out_row);
            }
        });
    let mut acc = vec![0i32; m * n_out];
    for n in 0..n_out {
        for mi in 0..m {
            acc[mi * n_out + n] = acc_t[n * m + mi];
        }
    }
    Ok(acc)
}

/// The A8 product `y = (Wq · q) * gamma / s`, `(m, n_out)` f32, on the fast kernel.
pub fn ternary_matmul_a8(w: &TernaryMatrix, xq: &QuantizedActivations) -> Result<Vec<f32>> {
    crate::gemm_ref::check_quantized(xq)?;
    let acc = ternary_matmul_a8_acc(w, &xq.codes, xq.rows, CpuKernel::Auto)?;
    Ok(apply_a8_epilogue(w, &xq.scales, &acc))
}

fn row_dot(kernel: Resolved, row: &[u32], prep: &PreparedActivations<'_>, out: &mut [i32]) {
    match kernel {
        Resolved::Scalar => {
            for (mi, o) in out.iter_mut().enumerate() {
                *o = scalar_dot(row, &prep.codes[mi * prep.k..][..prep.k]);
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Resolved::Avx2` is only produced after `is_x86_feature_detected!("avx2")`.
        Resolved::Avx2 => unsafe { avx2::row_dot(row, prep, out) },
        #[cfg(not(target_arch = "x86_64"))]
        Resolved::Avx2 => unreachable!("AVX2 is never resolved off x86_64"),
    }
}

/// `Σ_k (code_k - 1) q_k` over one canonical row, word by word.
fn scalar_dot(row: &[u32], q: &[i8]) -> i32 {
    let mut code_dot = 0i32;
    for (word, chunk) in row.iter().zip(q.chunks(CODES_PER_WORD)) {
        for (j, &x) in chunk.iter().enumerate() {
            code_dot += ((word >> (2 * j)) & 3) as i32 * i32::from(x);
        }
    }
    code_dot - q.iter().map(|&x| i32::from(x)).sum::<i32>()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// One output row against every prepared activation row.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn row_dot(row: &[u32], prep: &PreparedActivations<'_>, out: &mut [i32]) {
        let blocks = prep.k.div_ceil(BLOCK);
        let full = row.len() / WORDS_PER_BLOCK;
        // The last, partial block: its words copied into a zero-filled block. Code 0 against
        // zero-padded activations contributes nothing.
        let mut tail = [0u32; WORDS_PER_BLOCK];
        tail[..row.len() - full * WORDS_PER_BLOCK].copy_from_slice(&row[full * WORDS_PER_BLOCK..]);

        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let stride = blocks * BLOCK;
        for (tile, out_tile) in out.chunks_mut(M_TILE).enumerate() {
            let m0 = tile * M_TILE;
            let mut acc = [_mm256_setzero_si256(); M_TILE];
            for b in 0..blocks {
                let words = if b < full {
                    &row[b * WORDS_PER_BLOCK..][..WORDS_PER_BLOCK]
                } else {
                    &tail[..]
                };
                // SAFETY: `words` has 8 u32 = 32 bytes; unaligned load.
                let v = _mm256_loadu_si256(words.as_ptr().cast());
                let c0 = _mm256_and_si256(v, mask);
                let c1 = _mm256_and_si256(_mm256_srli_epi16(v, 2), mask);
                let c2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                let c3 = _mm256_and_si256(_mm256_srli_epi16(v, 6), mask);
                for (t, a) in acc.iter_mut().enumerate().take(out_tile.len()) {
                    let xp = prep.perm.as_ptr().add((m0 + t) * stride + b * BLOCK);
                    // SAFETY: `perm` holds `stride` bytes per row and b * 128 + 128 <= stride.
                    let x0 = _mm256_loadu_si256(xp.cast());
                    let x1 = _mm256_loadu_si256(xp.add(32).cast());
                    let x2 = _mm256_loadu_si256(xp.add(64).cast());
                    let x3 = _mm256_loadu_si256(xp.add(96).cast());
                    // u8 codes (<= 2) x i8 -> i16 pair sums, |.| <= 512; four of them <= 2048.
                    let s01 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(c0, x0),
                        _mm256_maddubs_epi16(c1, x1),
                    );
                    let s23 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(c2, x2),
                        _mm256_maddubs_epi16(c3, x3),
                    );
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(_mm256_add_epi16(s01, s23), ones));
                }
            }
            for (t, o) in out_tile.iter_mut().enumerate() {
                *o = hsum_epi32(acc[t]) - prep.sums[m0 + t];
            }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hsum_epi32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }
}

/// Columns of `dx` per rayon task in [`ternary_matmul_t`]: a multiple of 16 (whole words).
const T_COLS_PER_TASK: usize = 256;

/// Fast CPU transposed product `dx = dy · (Wq * gamma)`, `dy` `(m, n_out)` f32 ->
/// `(m, k_in)` f32 (the STE backward of a ternary layer). Tasks own disjoint column blocks of
/// `dx`; each decodes its slice of a weight row once into {-1, 0, 1} and applies it to all
/// `m` rows as an AXPY, which LLVM vectorizes. Accumulates in f32 in row order, so it
/// matches [`ternary_matmul_t_ref`](crate::ternary_matmul_t_ref) to f32 rounding.
pub fn ternary_matmul_t(w: &TernaryMatrix, dy: &[f32], m: usize) -> Result<Vec<f32>> {
    crate::gemm_ref::check_dy(w, dy.len(), m)?;
    if let Some((i, v)) = dy.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(TernaryError::NonFinite {
            what: "dy",
            row: i / w.n_out(),
            col: i % w.n_out(),
            value: v.to_string(),
        });
    }
    let (n_out, k) = (w.n_out(), w.k_in());
    let blocks = k.div_ceil(T_COLS_PER_TASK);
    // Computed per column block as (m, block) tiles, then scattered into (m, k).
    let tiles: Vec<Vec<f32>> = (0..blocks)
        .into_par_iter()
        .map(|b| {
            let k0 = b * T_COLS_PER_TASK;
            let width = T_COLS_PER_TASK.min(k - k0);
            let mut tile = vec![0f32; m * width];
            let mut wrow = vec![0f32; width];
            for n in 0..n_out {
                let row = w.row_words(n);
                for (j, v) in wrow.iter_mut().enumerate() {
                    *v = code_at(row, k0 + j) as f32 - 1.0;
                }
                let g = w.scales().row(n);
                for mi in 0..m {
                    let s = dy[mi * n_out + n] * g;
                    if s != 0.0 {
                        for (t, &v) in tile[mi * width..(mi + 1) * width].iter_mut().zip(&wrow) {
                            *t += s * v;
                        }
                    }
                }
            }
            tile
        })
        .collect();
    let mut dx = vec![0f32; m * k];
    for (b, tile) in tiles.iter().enumerate() {
        let k0 = b * T_COLS_PER_TASK;
        let width = T_COLS_PER_TASK.min(k - k0);
        for mi in 0..m {
            dx[mi * k + k0..mi * k + k0 + width]
                .copy_from_slice(&tile[mi * width..(mi + 1) * width]);
        }
    }
    Ok(dx)
}
