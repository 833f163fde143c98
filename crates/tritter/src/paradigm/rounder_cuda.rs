//! GPU exact KNN of the embedding rounder (feature `cuda`): the kernels of
//! `kernels-cuda/kernels/embed_knn.cu` through cudarc.
//!
//! [`GpuEmbeddingRounder`] uploads the rounder's row-normalized table as bf16 `(rows, ld)`
//! (`rows` = the candidate ids, in ascending id order; `ld = round_up(H, 8)`, zero-padded),
//! plus the row -> token id map. [`GpuEmbeddingRounder::knn`] takes host queries `(N, H)` f32
//! and returns the same [`KnnResult`] as [`EmbeddingRounder::knn`] up to bf16 rounding of the
//! table: each similarity is within `2^-8` (plus f32 summation error) of the f32 one, so ids
//! may differ in order only where the f32 similarities are that close.
//! [`GpuEmbeddingRounder::knn_device`] is the asynchronous form on device buffers.
//!
//! Why bf16 table and f32 queries: the pass is memory bound on the table for small `N`, so
//! the table is stored at half the f32 bytes; the queries are tiny and stay f32.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;
use tritter_kernels_cuda::{images, Gpu, KernelError};

use super::rounder::{EmbeddingRounder, KnnResult};
use crate::{Result, TritterError};

/// Largest `k` the GPU kernels support.
pub const GPU_MAX_K: usize = 64;
/// Threads per block of both kernels (`kThreads`).
const THREADS: u32 = 256;
/// Table rows per tile of pass 1 (`kTileRows`); chunks are multiples of it.
const TILE_ROWS: usize = 32;
/// Pass-1 blocks aimed for per SM.
const BLOCKS_PER_SM: usize = 2;
/// Largest grid y dimension.
const MAX_GRID_Y: usize = 65_535;

/// How a launch splits the work: queries per block, chunks of table rows, candidates kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnnPlan {
    /// Queries per pass-1 block (1, 2, 4 or 8).
    pub queries_per_block: usize,
    /// Table rows per pass-1 block (a multiple of 32).
    pub rows_per_chunk: usize,
    /// Number of row chunks (grid y of pass 1).
    pub num_chunks: usize,
    /// Candidates kept per chunk and query: the power of two `>= k`.
    pub kp: usize,
}

impl KnnPlan {
    /// The plan for `n` queries, top-`k`, over `rows` table rows on `sm_count` SMs: about
    /// two pass-1 blocks per SM in total.
    pub fn new(n: usize, k: usize, rows: usize, sm_count: usize) -> Self {
        let qt = match n {
            0 | 1 => 1,
            2 => 2,
            3 | 4 => 4,
            _ => 8,
        };
        let qtiles = n.div_ceil(qt).max(1);
        let want = (BLOCKS_PER_SM * sm_count.max(1)).div_ceil(qtiles).max(1);
        let min_rows = rows.div_ceil(MAX_GRID_Y);
        let rows_per_chunk = rows
            .div_ceil(want)
            .max(min_rows)
            .max(1)
            .next_multiple_of(TILE_ROWS);
        KnnPlan {
            queries_per_block: qt,
            rows_per_chunk,
            num_chunks: rows.div_ceil(rows_per_chunk).max(1),
            kp: k.max(1).next_power_of_two(),
        }
    }

    /// Candidate entries of pass 1: `n * num_chunks * kp`.
    pub fn candidates(&self, n: usize) -> usize {
        n * self.num_chunks * self.kp
    }
}

/// Device scratch of [`GpuEmbeddingRounder::knn_device`]: pass 1's per-chunk candidates
/// (scores and rows). Allocate once for the largest `(N, k)` and reuse.
pub struct KnnWorkspace {
    cand_s: CudaSlice<f32>,
    cand_i: CudaSlice<u32>,
}

impl std::fmt::Debug for KnnWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnnWorkspace")
            .field("capacity", &self.cand_s.len())
            .finish()
    }
}

impl KnnWorkspace {
    /// Scratch for up to `n` queries and top-`k` against `rounder`'s table on its device.
    pub fn new(rounder: &GpuEmbeddingRounder, n: usize, k: usize) -> Result<Self> {
        let len = rounder.plan(n, k).candidates(n).max(1);
        let stream = rounder.gpu.stream();
        Ok(KnnWorkspace {
            cand_s: stream
                .alloc_zeros::<f32>(len)
                .map_err(KernelError::driver("allocating the KNN candidate scores"))?,
            cand_i: stream
                .alloc_zeros::<u32>(len)
                .map_err(KernelError::driver("allocating the KNN candidate rows"))?,
        })
    }

    /// Candidate entries it holds.
    pub fn capacity(&self) -> usize {
        self.cand_s.len()
    }
}

/// The embedding table of an [`EmbeddingRounder`] on the GPU, for exact cosine top-k with
/// `k <= 64` (see the module docs).
pub struct GpuEmbeddingRounder {
    gpu: Arc<Gpu>,
    /// `(rows, ld)` bf16 unit rows, zero-padded.
    table: CudaSlice<bf16>,
    /// `(rows,)` token id of each row.
    id_map: CudaSlice<u32>,
    rows: usize,
    hidden: usize,
    ld: usize,
}

impl std::fmt::Debug for GpuEmbeddingRounder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuEmbeddingRounder")
            .field("rows", &self.rows)
            .field("hidden", &self.hidden)
            .field("ld", &self.ld)
            .finish()
    }
}

fn check_i32(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| TritterError::argument(what, v, "at most i32::MAX for a launch"))
}

impl GpuEmbeddingRounder {
    /// Uploads `rounder`'s candidate rows (normalized, as bf16) to `gpu`.
    pub fn new(gpu: &Arc<Gpu>, rounder: &EmbeddingRounder) -> Result<Self> {
        let hidden = rounder.hidden_size();
        let ld = hidden.next_multiple_of(8);
        let ids = rounder.candidates();
        let rows = ids.len();
        check_i32("embedding width", ld)?;
        check_i32("candidate rows", rows)?;
        let table = rounder.normalized_table();
        let mut host = vec![bf16::ZERO; rows * ld];
        for (dst, &id) in host.chunks_exact_mut(ld).zip(ids) {
            let src = &table[id as usize * hidden..(id as usize + 1) * hidden];
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = bf16::from_f32(s);
            }
        }
        let stream = gpu.stream();
        Ok(GpuEmbeddingRounder {
            gpu: gpu.clone(),
            table: stream
                .clone_htod(&host)
                .map_err(KernelError::driver("uploading the embedding table"))?,
            id_map: stream
                .clone_htod(ids)
                .map_err(KernelError::driver("uploading the candidate ids"))?,
            rows,
            hidden,
            ld,
        })
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Candidate rows on the device.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Embedding width `H`.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Row stride of the device table, `round_up(H, 8)`.
    pub fn row_stride(&self) -> usize {
        self.ld
    }

    /// Bytes of the device table (`rows * ld * 2`): what one KNN launch streams, the
    /// numerator of its GB/s.
    pub fn table_bytes(&self) -> usize {
        self.rows * self.ld * 2
    }

    /// The device table `(rows, ld)` bf16 (e.g. for a peer GEMM over the same bytes).
    pub fn table(&self) -> &CudaSlice<bf16> {
        &self.table
    }

    /// The launch plan for `n` queries and top-`k` on this device.
    pub fn plan(&self, n: usize, k: usize) -> KnnPlan {
        KnnPlan::new(n, k, self.rows, self.gpu.info().sm_count as usize)
    }

    fn check_k(&self, k: usize) -> Result<()> {
        let max = GPU_MAX_K.min(self.rows);
        if k == 0 || k > max {
            return Err(TritterError::argument(
                "k",
                k,
                format!(
                    "in 1..={max} (the GPU kernel's limit {GPU_MAX_K} and the {} candidate rows)",
                    self.rows
                ),
            ));
        }
        Ok(())
    }

    /// Exact top-`k` (`k <= 64`) of `n` host queries `(n, H)` f32: validates (length,
    /// NaN/Inf, k), uploads, runs both passes and downloads (synchronizes).
    pub fn knn(&self, queries: &[f32], n: usize, k: usize) -> Result<KnnResult> {
        if n.checked_mul(self.hidden) != Some(queries.len()) {
            return Err(TritterError::ShapeMismatch {
                what: "queries".into(),
                actual: vec![queries.len()],
                expected: format!("N * H = {n} * {} values", self.hidden),
            });
        }
        if let Some(index) = queries.iter().position(|v| !v.is_finite()) {
            return Err(TritterError::NonFinite {
                what: "queries".into(),
                index,
                value: queries[index].to_string(),
            });
        }
        self.check_k(k)?;
        if n == 0 {
            return KnnResult::from_parts(0, k, Vec::new(), Vec::new());
        }
        let stream = self.gpu.stream();
        let q = stream
            .clone_htod(queries)
            .map_err(KernelError::driver("uploading the queries"))?;
        let mut ids = stream
            .alloc_zeros::<u32>(n * k)
            .map_err(KernelError::driver("allocating the top-k ids"))?;
        let mut sims = stream
            .alloc_zeros::<f32>(n * k)
            .map_err(KernelError::driver("allocating the top-k similarities"))?;
        let mut ws = KnnWorkspace::new(self, n, k)?;
        self.knn_device(
            &q.as_view(),
            n,
            k,
            &mut ids.as_view_mut(),
            &mut sims.as_view_mut(),
            &mut ws,
        )?;
        let ids = stream
            .clone_dtoh(&ids)
            .map_err(KernelError::driver("downloading the top-k ids"))?;
        let sims = stream
            .clone_dtoh(&sims)
            .map_err(KernelError::driver("downloading the top-k similarities"))?;
        KnnResult::from_parts(n, k, ids, sims)
    }

    /// Asynchronous exact top-`k` on device buffers: `queries` `(n, H)` f32, outputs `ids`
    /// and `sims` `(n, k)` (token ids; cosine similarities, descending, lower id first on
    /// ties). Checks lengths, `k` and the workspace size; the queries must be finite (not
    /// checked here: NaN dots rank last, never out of bounds). Two launches on
    /// [`Gpu::stream`].
    pub fn knn_device(
        &self,
        queries: &CudaView<'_, f32>,
        n: usize,
        k: usize,
        ids: &mut CudaViewMut<'_, u32>,
        sims: &mut CudaViewMut<'_, f32>,
        ws: &mut KnnWorkspace,
    ) -> Result<()> {
        self.check_k(k)?;
        let want = [n * self.hidden, n * k, n * k];
        let got = [queries.len(), ids.len(), sims.len()];
        if want != got {
            return Err(TritterError::ShapeMismatch {
                what: "queries / ids / sims".into(),
                actual: got.to_vec(),
                expected: format!(
                    "[N * H, N * k, N * k] = {want:?} for N = {n}, H = {}, k = {k}",
                    self.hidden
                ),
            });
        }
        if n == 0 {
            return Ok(());
        }
        let plan = self.plan(n, k);
        if ws.capacity() < plan.candidates(n) {
            return Err(TritterError::argument(
                "KNN workspace",
                ws.capacity(),
                format!(
                    "at least {} candidate entries for N = {n}, k = {k}; make it with KnnWorkspace::new(rounder, {n}, {k})",
                    plan.candidates(n)
                ),
            ));
        }
        let n_i = check_i32("number of queries", n)?;
        let h_i = check_i32("embedding width", self.hidden)?;
        let ld_i = self.ld as i32; // checked in new()
        let rows_ll = self.rows as i64;
        let rpc = check_i32("rows per chunk", plan.rows_per_chunk)?;
        let kp_i = plan.kp as i32; // <= 64
        let k_i = k as i32; // <= 64
        let chunks_i = plan.num_chunks as i32; // <= 65535
        let qtiles = n.div_ceil(plan.queries_per_block);
        let qtiles = u32::try_from(qtiles).map_err(|_| {
            TritterError::argument("number of queries", n, "fewer than 2^32 query tiles")
        })?;

        let name = match plan.queries_per_block {
            1 => "embed_knn_topk_q1",
            2 => "embed_knn_topk_q2",
            4 => "embed_knn_topk_q4",
            _ => "embed_knn_topk_q8",
        };
        let gpu = &self.gpu;
        let stream = gpu.stream();
        let f1 = gpu.function(&images::EMBED_KNN, name)?;
        let mut l1 = stream.launch_builder(&f1);
        l1.arg(&self.table)
            .arg(queries)
            .arg(&n_i)
            .arg(&h_i)
            .arg(&ld_i)
            .arg(&rows_ll)
            .arg(&rpc)
            .arg(&kp_i)
            .arg(&mut ws.cand_s)
            .arg(&mut ws.cand_i);
        let cfg1 = LaunchConfig {
            grid_dim: (qtiles, plan.num_chunks as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `embed_knn_topk_q*(const bf16*, const float*, int, int, int, long
        // long, int, int, float*, unsigned*)`. The table holds rows * ld bf16 (ld a multiple of
        // 8, so every 16-byte load is aligned and in bounds for rows < rows); queries hold
        // n * h f32 (checked above); grid y = num_chunks = ceil(rows / rows_per_chunk) <=
        // 65535; the kernel writes cand[(q * num_chunks + chunk) * kp + j] for q < n, j < kp,
        // within the workspace's n * num_chunks * kp entries (checked above).
        unsafe { l1.launch(cfg1) }.map_err(KernelError::driver(format!("launching {name}")))?;

        let f2 = gpu.function(&images::EMBED_KNN, "embed_knn_merge")?;
        let mut l2 = stream.launch_builder(&f2);
        l2.arg(&ws.cand_s)
            .arg(&ws.cand_i)
            .arg(&chunks_i)
            .arg(&kp_i)
            .arg(queries)
            .arg(&h_i)
            .arg(&k_i)
            .arg(&self.id_map)
            .arg(&rows_ll)
            .arg(ids)
            .arg(sims);
        let cfg2 = LaunchConfig {
            grid_dim: (n as u32, 1, 1), // n <= i32::MAX, checked above
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `embed_knn_merge(const float*, const unsigned*, int, int, const
        // float*, int, int, const unsigned*, long long, unsigned*, float*)`. Block q reads
        // cand[q * num_chunks * kp ..][.. num_chunks * kp] (written by pass 1, in bounds as
        // above) and query q's h values, reads id_map only at rows < rows (its length), and
        // writes ids/sims[q * k .. q * k + k) with k <= 64 < 256 threads, within the n * k
        // outputs (checked above).
        unsafe { l2.launch(cfg2) }.map_err(KernelError::driver("launching embed_knn_merge"))?;
        Ok(())
    }
}
