//! The device layout of packed ternary weights ("MMA tiles"), DESIGN.md section 4: the
//! canonical words `(n_out, ceil(k_in / 16))` regrouped so that every GPU kernel reads a
//! warp's tensor-core operand with one 16-byte load per lane.
//!
//! The matrix is cut into blocks of 16 rows x 8 words (128 weights), 512 bytes each, stored
//! row-tile-major: block `(T, q)` (rows `16 T..16 T + 16`, words `8 q..8 q + 8`) starts at
//! word `128 (T * quads + q)`, `quads = ceil(words_per_row / 8)`. Inside a block, lane
//! `L = 4 g + t` (g < 8, t < 4) of an `mma.sync.m16n8k32` warp owns the 4 words at
//! `4 L`: word `t` of row `g`, word `t` of row `g + 8`, word `t + 4` of row `g`, word
//! `t + 4` of row `g + 8` — its A registers a0, a1, a2, a3 for all four k-steps of the
//! block (k-step j takes `(word >> 2j) & 0x03030303`). Rows are padded to a multiple of 16
//! and words to a multiple of 8 with [`ZERO_WORD`] (zero weights), so every block is whole.
//!
//! Why: a GEMV streams weights at memory speed only with wide, coalesced loads and many
//! bytes in flight per register. In this layout a warp's load of one block is 512
//! contiguous bytes landing directly in the registers the MMA consumes — no shared-memory
//! staging, no per-word address arithmetic — and the GEMMs copy whole blocks with 16-byte
//! `cp.async`s and read them back with one conflict-free 16-byte shared load per lane.

use crate::ternary::check_packed_len;
use crate::{words_per_row, Result, TernaryError, ZERO_WORD};

/// Rows of one tile block.
pub const TILE_ROWS: usize = 16;
/// Packed words of a row in one tile block (128 weights).
pub const TILE_ROW_WORDS: usize = 8;
/// Words of one tile block (16 rows x 8 words, 512 bytes).
pub const TILE_BLOCK_WORDS: usize = TILE_ROWS * TILE_ROW_WORDS;

/// Words of the tiled layout of an `(n_out, k_in)` matrix, padding included:
/// `ceil(n_out / 16) * ceil(words_per_row / 8) * 128`.
pub fn tiled_len(n_out: usize, k_in: usize) -> usize {
    n_out.div_ceil(TILE_ROWS) * words_per_row(k_in).div_ceil(TILE_ROW_WORDS) * TILE_BLOCK_WORDS
}

/// Position in the tiled layout of canonical word `word` of row `n`, for a matrix of
/// `quads = ceil(words_per_row / 8)` blocks per row tile (see the module docs).
#[inline]
pub fn tiled_word_index(n: usize, word: usize, quads: usize) -> usize {
    let (tile, r) = (n / TILE_ROWS, n % TILE_ROWS);
    let (half, g) = (r / 8, r % 8);
    let (q, w) = (word / TILE_ROW_WORDS, word % TILE_ROW_WORDS);
    let (hi, t) = (w / 4, w % 4);
    ((tile * quads + q) * 32 + 4 * g + t) * 4 + 2 * hi + half
}

/// Canonical packed words `(n_out, ceil(k_in / 16))` -> the tiled device layout
/// ([`tiled_len`] words), padding with [`ZERO_WORD`]. Codes are copied, not validated
/// (`TernaryMatrix` has done that).
pub fn repack_tiles(packed: &[u32], n_out: usize, k_in: usize) -> Result<Vec<u32>> {
    let wpr = check_packed_len(packed.len(), n_out, k_in)?;
    let quads = wpr.div_ceil(TILE_ROW_WORDS);
    let mut out = vec![ZERO_WORD; tiled_len(n_out, k_in)];
    for (n, row) in packed.chunks_exact(wpr).enumerate() {
        for (w, &v) in row.iter().enumerate() {
            out[tiled_word_index(n, w, quads)] = v;
        }
    }
    Ok(out)
}

/// Inverse of [`repack_tiles`]: the tiled layout -> canonical words `(n_out, ceil(k_in / 16))`.
/// The padding must hold [`ZERO_WORD`] (anything else means the buffer is not a tiled
/// matrix of this shape).
pub fn unrepack_tiles(tiled: &[u32], n_out: usize, k_in: usize) -> Result<Vec<u32>> {
    let expected = tiled_len(n_out, k_in);
    if tiled.len() != expected {
        return Err(TernaryError::LengthMismatch {
            what: "tiled weights",
            rows: n_out,
            cols: k_in,
            actual: tiled.len(),
            expected,
        });
    }
    let wpr = words_per_row(k_in);
    let quads = wpr.div_ceil(TILE_ROW_WORDS);
    let mut out = vec![0u32; n_out * wpr];
    let mut seen = vec![false; expected];
    for n in 0..n_out {
        for w in 0..wpr {
            let i = tiled_word_index(n, w, quads);
            out[n * wpr + w] = tiled[i];
            seen[i] = true;
        }
    }
    if let Some(i) = (0..expected).find(|&i| !seen[i] && tiled[i] != ZERO_WORD) {
        return Err(TernaryError::BadDimension {
            what: "tiled weights: index of a padding word that is not ZERO_WORD",
            actual: i,
            expected: "padding words equal to 0x55555555 (zero weights)",
        });
    }
    Ok(out)
}
