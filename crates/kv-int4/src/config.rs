//! Cache configuration and the page layout both storage backends share.

use crate::quant::{GROUP, GROUP_CODE_BYTES, GROUP_PARAM_BYTES};
use crate::{KvError, Result};

/// Tokens per page when none is given: 32 tokens of one KV head are 2 KB of INT4 codes at
/// D = 128 (plus 512 B of parameters), long contiguous runs for 16-byte loads.
pub const DEFAULT_PAGE_SIZE: usize = 32;
/// Page sizes the kernels accept: powers of two in `8..=256`.
pub const PAGE_SIZES: std::ops::RangeInclusive<usize> = 8..=256;

/// How K and V are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvFormat {
    /// Asymmetric 4-bit groups of 32 with f16 scale and minimum (0.625 bytes per value).
    Int4,
    /// Plain f16 (2 bytes per value): the baseline the INT4 cache is measured against.
    F16,
}

impl KvFormat {
    /// Bytes per stored value, times 8 (exact: 5 for INT4, 16 for f16).
    pub fn eighth_bytes_per_value(self) -> usize {
        match self {
            KvFormat::Int4 => 5,
            KvFormat::F16 => 16,
        }
    }
}

/// Sliding-window attention with StreamingLLM sinks: the decode query at position `p` sees
/// token `j` iff `j < sinks` or `p - window < j <= p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Most recent tokens visible (including the query's own token); at least 1.
    pub window: usize,
    /// First tokens of the sequence that stay visible forever.
    pub sinks: usize,
}

/// Shape and capacity of a paged KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Transformer layers; every page holds all layers' K and V for its tokens.
    pub layers: usize,
    /// KV heads per layer.
    pub heads_kv: usize,
    /// Head dimension D (a multiple of 32; the CUDA decode kernel takes 64 or 128).
    pub head_dim: usize,
    /// Tokens per page (a power of two in 8..=256).
    pub page_size: usize,
    /// Pages in the pool.
    pub num_pages: usize,
    /// Longest sequence accepted, in tokens (positions are `i32` on the device).
    pub max_seq_len: usize,
    /// Sliding window and sinks; `None` keeps every token.
    pub window: Option<Window>,
    /// Storage format.
    pub format: KvFormat,
}

impl CacheConfig {
    /// An INT4 cache of `num_pages` pages of [`DEFAULT_PAGE_SIZE`] tokens, no window,
    /// `max_seq_len` = 131072 (the Tritter presets' context).
    pub fn new(layers: usize, heads_kv: usize, head_dim: usize, num_pages: usize) -> Self {
        CacheConfig {
            layers,
            heads_kv,
            head_dim,
            page_size: DEFAULT_PAGE_SIZE,
            num_pages,
            max_seq_len: 131_072,
            window: None,
            format: KvFormat::Int4,
        }
    }

    /// Sets the page size (tokens per page).
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.page_size = page_size;
        self
    }

    /// Sets a sliding window of `window` tokens that keeps the first `sinks` tokens.
    pub fn with_window(mut self, window: usize, sinks: usize) -> Self {
        self.window = Some(Window { window, sinks });
        self
    }

    /// Sets the storage format.
    pub fn with_format(mut self, format: KvFormat) -> Self {
        self.format = format;
        self
    }

    /// Sets the longest sequence accepted.
    pub fn with_max_seq_len(mut self, max_seq_len: usize) -> Self {
        self.max_seq_len = max_seq_len;
        self
    }

    /// Sizes the pool to hold at least `bytes` of pages (rounded down to whole pages).
    pub fn with_pool_bytes(mut self, bytes: usize) -> Self {
        self.num_pages = bytes / self.layout().page_bytes().max(1);
        self
    }

    /// Sizes the pool to hold at least `tokens` tokens (rounded up to whole pages).
    pub fn with_pool_tokens(mut self, tokens: usize) -> Self {
        self.num_pages = tokens.div_ceil(self.page_size.max(1));
        self
    }

    /// Checks every field; called by the cache constructors.
    pub fn validate(&self) -> Result<()> {
        let bad = |what, actual, expected| {
            Err(KvError::BadConfig {
                what,
                actual,
                expected,
            })
        };
        if self.layers == 0 {
            return bad("layers", 0, "at least 1");
        }
        if self.heads_kv == 0 {
            return bad("heads_kv", 0, "at least 1");
        }
        if self.head_dim == 0 || self.head_dim % GROUP != 0 {
            return bad("head_dim", self.head_dim, "a positive multiple of 32");
        }
        if !self.page_size.is_power_of_two() || !PAGE_SIZES.contains(&self.page_size) {
            return bad(
                "page_size",
                self.page_size,
                "a power of two in 8..=256 tokens",
            );
        }
        if self.num_pages == 0 || self.num_pages > i32::MAX as usize {
            return bad("num_pages", self.num_pages, "1..=2^31-1");
        }
        if self.max_seq_len == 0 || self.max_seq_len > i32::MAX as usize {
            return bad("max_seq_len", self.max_seq_len, "1..=2^31-1");
        }
        if let Some(w) = self.window {
            if w.window == 0 {
                return bad("window", 0, "at least 1 token (the query's own)");
            }
        }
        let plane = self
            .layout()
            .page_bytes()
            .checked_mul(self.num_pages)
            .and_then(|b| b.checked_mul(self.layers));
        if plane.is_none() {
            return bad(
                "num_pages",
                self.num_pages,
                "a pool whose bytes fit in usize",
            );
        }
        Ok(())
    }

    /// The page layout of this configuration.
    pub fn layout(&self) -> PageLayout {
        PageLayout {
            heads_kv: self.heads_kv,
            head_dim: self.head_dim,
            page_size: self.page_size,
            format: self.format,
        }
    }

    /// Pages needed to hold `tokens` tokens of one sequence, ignoring the window.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }
}

/// Byte layout of one page of one layer (the pool is `[layer][page][...]`, each page of each
/// layer `page_bytes()` long):
///
/// ```text
/// INT4:  K codes  [heads_kv][page_size][head_dim / 2]   u8, low nibble first
///        K params [heads_kv][page_size][head_dim / 32]  half2 (scale, min)
///        V codes  [heads_kv][page_size][head_dim / 2]
///        V params [heads_kv][page_size][head_dim / 32]
/// F16:   K [heads_kv][page_size][head_dim] f16, then V likewise
/// ```
///
/// Why: the decode kernel's CTA works on one KV head, so all of a head's tokens in a page
/// are contiguous (`page_size * head_dim / 2` bytes of codes), and a token's codes are one
/// contiguous `head_dim / 2` bytes that 16-byte `cp.async` copies move whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLayout {
    /// KV heads.
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Storage format.
    pub format: KvFormat,
}

impl PageLayout {
    /// Bytes of one token's codes (INT4) or values (F16) for one head.
    pub fn token_value_bytes(&self) -> usize {
        match self.format {
            KvFormat::Int4 => self.head_dim / 2,
            KvFormat::F16 => self.head_dim * 2,
        }
    }

    /// Bytes of one token's group parameters for one head (0 for F16).
    pub fn token_param_bytes(&self) -> usize {
        match self.format {
            KvFormat::Int4 => self.head_dim / GROUP * GROUP_PARAM_BYTES,
            KvFormat::F16 => 0,
        }
    }

    /// Bytes of the value (code) region of K (or V) in one page.
    pub fn values_bytes(&self) -> usize {
        self.heads_kv * self.page_size * self.token_value_bytes()
    }

    /// Bytes of the parameter region of K (or V) in one page.
    pub fn params_bytes(&self) -> usize {
        self.heads_kv * self.page_size * self.token_param_bytes()
    }

    /// Bytes of one page of one layer: K and V, values and parameters.
    pub fn page_bytes(&self) -> usize {
        2 * (self.values_bytes() + self.params_bytes())
    }

    /// Offset in a page of the value bytes of (`kv` = 0 for K, 1 for V, `head`, `slot`).
    pub fn value_offset(&self, kv: usize, head: usize, slot: usize) -> usize {
        kv * (self.values_bytes() + self.params_bytes())
            + (head * self.page_size + slot) * self.token_value_bytes()
    }

    /// Offset in a page of the parameter bytes of (`kv`, `head`, `slot`) (INT4 only).
    pub fn param_offset(&self, kv: usize, head: usize, slot: usize) -> usize {
        kv * (self.values_bytes() + self.params_bytes())
            + self.values_bytes()
            + (head * self.page_size + slot) * self.token_param_bytes()
    }

    /// Bytes per token per layer for K and V together.
    pub fn bytes_per_token(&self) -> usize {
        self.page_bytes() / self.page_size
    }
}

const _: () = assert!(GROUP_CODE_BYTES * 2 == GROUP);
