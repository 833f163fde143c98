use thiserror::Error;

/// Errors of `kv-int4`. Every message names the actual and the expected value; every error
/// returned by a cache operation leaves the cache exactly as it was before the call.
#[derive(Debug, Error)]
pub enum KvError {
    /// A configuration value is out of range.
    #[error("{what} = {actual} is invalid; expected {expected}")]
    BadConfig {
        /// Which setting, e.g. "page_size".
        what: &'static str,
        /// Value given.
        actual: usize,
        /// What is allowed, in words.
        expected: &'static str,
    },
    /// A buffer's length does not match the shape it was given with.
    #[error("{what} has {actual} elements but the shape {shape} needs {expected}")]
    LengthMismatch {
        /// Which buffer, e.g. "k" or "q".
        what: &'static str,
        /// The shape in words, e.g. "(layers=2, n=5, heads_kv=8, head_dim=128)".
        shape: String,
        /// Elements present.
        actual: usize,
        /// Elements the shape needs.
        expected: usize,
    },
    /// Two operands disagree on a dimension (head counts, head dim, batch).
    #[error("{what} is {actual} but the cache expects {expected}")]
    ShapeMismatch {
        /// What disagrees, e.g. "query heads (must be a multiple of heads_kv)".
        what: &'static str,
        /// Value given.
        actual: usize,
        /// Value required.
        expected: usize,
    },
    /// An input holds NaN or an infinity, or a value beyond the f16 range (|x| > 65504).
    #[error("{what} holds {value} at element {index}; inputs must be finite with |x| <= 65504 (f16 range)")]
    NonFinite {
        /// Which input.
        what: &'static str,
        /// Flat index of the first offending value (CPU), or the count of bad groups (GPU).
        index: usize,
        /// The value, as text.
        value: String,
    },
    /// The sequence id is not (or no longer) in the cache.
    #[error("unknown sequence id {0}; it was never added or has been freed")]
    UnknownSequence(u64),
    /// An append names a start position other than the sequence's current length.
    #[error("sequence {seq}: append starts at position {actual} but the next position is {expected} (positions must not go backwards or skip)")]
    BadPosition {
        /// Sequence id.
        seq: u64,
        /// Position given.
        actual: usize,
        /// The sequence's length, i.e. the only valid start.
        expected: usize,
    },
    /// The append would make the sequence longer than `max_seq_len`.
    #[error("sequence {seq}: appending {n} tokens to {len} exceeds max_seq_len = {max}")]
    SequenceTooLong {
        /// Sequence id.
        seq: u64,
        /// Current length.
        len: usize,
        /// Tokens to append.
        n: usize,
        /// The configured limit.
        max: usize,
    },
    /// Not enough free pages in the pool (nothing was changed).
    #[error("page pool exhausted: the operation needs {needed} free pages but {free} of {total} are free; free or shorten sequences, or size the pool larger")]
    PoolExhausted {
        /// Pages the operation needs.
        needed: usize,
        /// Pages free (counting pages the operation itself would release).
        free: usize,
        /// Pages in the pool.
        total: usize,
    },
    /// The sequence has an append whose layers are not all written yet.
    #[error("sequence {seq}: layer {layer} of the append at positions {start}..{end} is not written yet; write every layer (write_layer) before {op}")]
    PendingWrite {
        /// Sequence id.
        seq: u64,
        /// First unwritten layer.
        layer: usize,
        /// First appended position.
        start: usize,
        /// One past the last appended position.
        end: usize,
        /// What was attempted.
        op: &'static str,
    },
    /// An append ticket does not match the sequence's pending append.
    #[error(
        "sequence {seq}: the ticket for positions {start}..{end} is not the pending append ({why})"
    )]
    StaleTicket {
        /// Sequence id.
        seq: u64,
        /// Ticket start.
        start: usize,
        /// Ticket end.
        end: usize,
        /// Why, in words.
        why: &'static str,
    },
    /// A decode batch was built before the cache changed (its block tables may be stale).
    #[error("decode batch was built at cache epoch {batch} but the cache is at epoch {cache}; rebuild it after appends, forks and frees")]
    StaleBatch {
        /// Epoch recorded in the batch.
        batch: u64,
        /// Current epoch of the cache.
        cache: u64,
    },
    /// A sequence with no tokens cannot be attended to.
    #[error("sequence {0} is empty; decode attention needs at least one token")]
    EmptySequence(u64),
    /// An index (layer, batch entry) is out of range.
    #[error("{what} = {actual} is out of range; expected < {bound}")]
    OutOfRange {
        /// Which index.
        what: &'static str,
        /// Value given.
        actual: usize,
        /// Exclusive bound.
        bound: usize,
    },
    /// The requested path is not available for this configuration.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A CUDA runtime error (driver, module load, launch).
    #[error(transparent)]
    Cuda(#[from] tritter_kernels_cuda::KernelError),
}
