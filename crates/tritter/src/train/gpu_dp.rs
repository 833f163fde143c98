//! Data parallelism of the GPU training engine (issue 13), in the manner of PyTorch DDP and
//! ZeRO-1, on NCCL ([`DataParallel`]).
//!
//! * DDP: every rank holds the whole model and AdamW state and runs the same update on the
//!   gradients summed over ranks. Each rank's loss is already divided by the *global*
//!   target count (the trainer computes it from the global batch), so the sum over ranks is
//!   exactly the gradient of the doubled batch on one GPU. In the step's last micro-batch
//!   (`forward_backward_final`) the gradient is summed in buckets while the backward pass
//!   runs: the LM head's bucket after the head, each layer's BitLinear weights (one
//!   contiguous range of the flat buffer) right after that layer's backward, and the
//!   no-decay tail (embedding, norms) at the end. The all-reduces run on a second stream
//!   ordered by events, so they overlap the remaining layers' backward.
//! * ZeRO-1: the flat buffers are padded to `chunk * world`; AdamW moments exist only for
//!   this rank's chunk. The optimizer step reduce-scatters the gradients, clips with the
//!   global norm (shard sums of squares all-reduced), updates its chunk and all-gathers the
//!   weights. Moments memory drops from `8 N` to `8 N / world` bytes; the gradient traffic is
//!   the same as DDP's (reduce-scatter + all-gather = one all-reduce), but not overlapped.
//!
//! Every wait on the device goes through `NcclComm::wait`, which aborts the communicator
//! when a peer dies or stalls past the timeout, so a failed rank never hangs the others.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use tritter_kernels_cuda::KernelError;

use super::{alloc, GpuTrainModel};
use crate::train::nccl::DataParallel;
use crate::{Result, TritterError};

/// The engine's data-parallel state.
pub(super) struct DpState {
    pub(super) dp: DataParallel,
    /// Where the overlapped all-reduces run.
    comm_stream: Arc<CudaStream>,
    /// ZeRO-1: elements per rank of the padded flat buffers; 0 without ZeRO-1.
    pub(super) chunk: usize,
    /// Each layer's gradient range (its BitLinear weights), by layer index.
    layer_buckets: Vec<Range<usize>>,
    /// The untied LM head's range.
    head_bucket: Option<Range<usize>>,
    /// The no-decay tail (embedding, norms).
    tail_bucket: Range<usize>,
    /// The step's gradients were summed already (by `forward_backward_final`).
    pub(super) reduced: bool,
}

/// A bucket of the overlapped all-reduce.
#[derive(Debug, Clone, Copy)]
pub(super) enum Bucket {
    Head,
    Layer(usize),
    Tail,
}

impl GpuTrainModel {
    /// Makes this engine rank `dp.rank()` of a data-parallel group: rank 0's weights are
    /// broadcast to every rank (so ranks agree even if they were initialized differently),
    /// and with ZeRO-1 the moments are cut down to this rank's shard. Call it on every rank
    /// before the first step; `load_optimizer` afterwards loads each rank's part of the
    /// moments (every rank loads the same checkpoint: the rendezvous compared the step and
    /// data cursor).
    pub fn enable_data_parallel(&mut self, dp: DataParallel) -> Result<()> {
        if self.dp.is_some() {
            return Err(TritterError::InvalidArgument {
                what: "enable_data_parallel",
                actual: "a second call".into(),
                expected: "one data-parallel group per engine".into(),
            });
        }
        let g = self.gpu.clone();
        let s = g.stream();
        let n = self.layout.len();
        let (rank, world) = (dp.rank(), dp.world_size());
        let (layer_buckets, head_bucket, tail_bucket) = self.buckets()?;
        dp.comm.broadcast_from_rank0(&mut self.params, 0..n, s)?;
        let chunk = if dp.zero1 { n.div_ceil(world) } else { 0 };
        if dp.zero1 {
            let padded = chunk * world;
            let mut params = alloc::<f32>(&g, padded, "the shadow weights")?;
            s.memcpy_dtod(&self.params.slice(0..n), &mut params.slice_mut(0..n))
                .map_err(KernelError::driver("padding the shadow weights"))?;
            self.params = params;
            self.grads = alloc(&g, padded, "the gradients")?;
            let own = (rank * chunk).min(n)..((rank + 1) * chunk).min(n);
            let shard = |full: &CudaSlice<f32>, what: &str| -> Result<CudaSlice<f32>> {
                let mut part = alloc::<f32>(&g, chunk.max(1), what)?;
                if !own.is_empty() {
                    s.memcpy_dtod(&full.slice(own.clone()), &mut part.slice_mut(0..own.len()))
                        .map_err(KernelError::driver("sharding the AdamW moments"))?;
                }
                Ok(part)
            };
            self.m = shard(&self.m, "the AdamW first-moment shard")?;
            self.v = shard(&self.v, "the AdamW second-moment shard")?;
            self.opt_range = own;
        }
        // The overlapped all-reduces of DDP run here (ZeRO-1 communicates on the compute
        // stream).
        let comm_stream = if dp.zero1 {
            s.clone()
        } else {
            g.context()
                .new_stream()
                .map_err(KernelError::driver("creating the all-reduce stream"))?
        };
        dp.comm
            .wait(s, &dp.group, "broadcasting rank 0's weights")?;
        // Known complete, so this cannot hang; it returns the replaced buffers' memory to
        // the device before `prepare` measures what is free.
        s.synchronize()
            .map_err(KernelError::driver("releasing the replaced buffers"))?;
        self.dp = Some(DpState {
            dp,
            comm_stream,
            chunk,
            layer_buckets,
            head_bucket,
            tail_bucket,
            reduced: false,
        });
        self.refresh_derived()
    }

    /// The data-parallel group this engine belongs to, if any.
    pub fn data_parallel(&self) -> Option<&DataParallel> {
        self.dp.as_ref().map(|d| &d.dp)
    }

    /// Refuses `what` on an engine that left its ZeRO-1 group (it holds one moment shard).
    pub(super) fn check_unsharded(&self, what: &'static str) -> Result<()> {
        if self.dp.is_none() && self.opt_range != (0..self.layout.len()) {
            return Err(TritterError::InvalidArgument {
                what,
                actual: format!(
                    "an engine holding AdamW moments {:?} of {} after leaving its ZeRO-1 group",
                    self.opt_range,
                    self.layout.len()
                ),
                expected: "an engine in its group, or one that was never sharded".into(),
            });
        }
        Ok(())
    }

    /// The gradient buckets of the overlapped all-reduce, checked to tile the flat buffer.
    #[allow(clippy::type_complexity)]
    fn buckets(&self) -> Result<(Vec<Range<usize>>, Option<Range<usize>>, Range<usize>)> {
        let l = &self.layout;
        let mut layers = Vec::with_capacity(self.cfg.num_layers);
        for i in 0..self.cfg.num_layers {
            let p = format!("layers.{i}");
            let start = l.get(&format!("{p}.attn.q_proj.weight"))?.offset;
            let end = l.get(&format!("{p}.mlp.down_proj.weight"))?.range().end;
            layers.push(start..end);
        }
        let head = (!self.cfg.tie_embeddings)
            .then(|| l.get("lm_head.weight").map(|s| s.range()))
            .transpose()?;
        let tail = l.decay_len()..l.len();
        let mut at = 0;
        for r in layers
            .iter()
            .chain(head.iter())
            .chain(std::iter::once(&tail))
        {
            if r.start != at {
                return Err(TritterError::InvalidArgument {
                    what: "gradient buckets",
                    actual: format!("a bucket starting at {} after {at}", r.start),
                    expected: "layers, head and tail tiling the flat buffer".into(),
                });
            }
            at = r.end;
        }
        Ok((layers, head, tail))
    }

    /// In the step's last micro-batch: queues the all-reduce of `bucket` on the
    /// communication stream once the compute stream has produced it.
    pub(super) fn bucket_ready(&mut self, bucket: Bucket) -> Result<()> {
        let Some(d) = self.dp.as_mut() else {
            return Ok(());
        };
        let range = match bucket {
            Bucket::Head => match &d.head_bucket {
                Some(r) => r.clone(),
                None => return Ok(()),
            },
            Bucket::Layer(i) => d.layer_buckets[i].clone(),
            Bucket::Tail => d.tail_bucket.clone(),
        };
        let ev = self
            .gpu
            .stream()
            .record_event(None)
            .map_err(KernelError::driver("recording a gradient-bucket event"))?;
        d.comm_stream.wait(&ev).map_err(KernelError::driver(
            "ordering an all-reduce after the backward",
        ))?;
        d.dp.comm
            .all_reduce_sum(&mut self.grads, range, &d.comm_stream)?;
        if matches!(bucket, Bucket::Tail) {
            // The last bucket: the compute stream waits for every all-reduce.
            let done = d
                .comm_stream
                .record_event(None)
                .map_err(KernelError::driver("recording the all-reduce end"))?;
            self.gpu.stream().wait(&done).map_err(KernelError::driver(
                "ordering the update after the all-reduce",
            ))?;
            d.reduced = true;
        }
        Ok(())
    }

    /// Whether the step's last micro-batch overlaps its gradient all-reduce with the
    /// backward pass (DDP; ZeRO-1 reduce-scatters in the optimizer step instead).
    pub(super) fn overlaps_reduce(&self) -> bool {
        self.dp.as_ref().is_some_and(|d| !d.dp.zero1)
    }

    /// At the optimizer step: sums the gradients over ranks unless the backward pass did
    /// (DDP: all-reduce; ZeRO-1: reduce-scatter, after which this rank's chunk is summed).
    pub(super) fn reduce_grads(&mut self) -> Result<()> {
        let n = self.layout.len();
        let Some(d) = self.dp.as_mut() else {
            return Ok(());
        };
        if std::mem::take(&mut d.reduced) {
            return Ok(());
        }
        let s = self.gpu.stream();
        if d.dp.zero1 {
            d.dp.comm.reduce_scatter_sum(&mut self.grads, d.chunk, s)
        } else {
            d.dp.comm.all_reduce_sum(&mut self.grads, 0..n, s)
        }
    }

    /// ZeRO-1, before clipping: sums the shards' squared-gradient partial sums into the
    /// global one.
    pub(super) fn zero1_norm_sum(&mut self) -> Result<()> {
        if let Some(d) = self.dp.as_ref().filter(|d| d.dp.zero1) {
            d.dp.comm
                .all_reduce_sum(&mut self.norm_sq, 0..1, self.gpu.stream())?;
        }
        Ok(())
    }

    /// ZeRO-1: all-gathers the updated weight chunks.
    pub(super) fn zero1_gather_params(&mut self) -> Result<()> {
        if let Some(d) = self.dp.as_ref().filter(|d| d.dp.zero1) {
            d.dp.comm
                .all_gather(&mut self.params, d.chunk, self.gpu.stream())?;
        }
        Ok(())
    }

    /// Sums the loss over ranks (each holds its rows' NLL over the global target count).
    pub(super) fn reduce_loss(&mut self) -> Result<()> {
        if let Some(d) = self.dp.as_ref() {
            d.dp.comm
                .all_reduce_sum(&mut self.loss, 0..1, self.gpu.stream())?;
        }
        Ok(())
    }

    /// Dropping an engine that is still in a group (an error path: the normal end takes the
    /// group out first) aborts the communicator before the buffers go, so queued collectives
    /// neither block the teardown nor touch freed memory.
    pub(super) fn abort_group(&self) {
        if let Some(d) = &self.dp {
            // Links first: the peers must learn of this rank's end even if the abort waits.
            d.dp.group.close();
            d.dp.comm.abort();
        }
    }

    /// Ends this engine's part in its group normally: waits for the queued work (watching
    /// the peers), then destroys the communicator and says goodbye on the links. Call it on
    /// every rank at the same point (after the same last collective). An engine that used
    /// ZeRO-1 keeps refusing steps afterwards (it holds one shard of the moments).
    pub fn finish_data_parallel(&mut self) -> Result<()> {
        self.settle("the last step before leaving the group")?;
        self.dp.take().map_or(Ok(()), |d| d.dp.finish())
    }

    /// Waits for the work queued so far when in a data-parallel group, watching the peers: a
    /// dead rank or one stuck past the timeout is an error (the communicator is aborted),
    /// never a hang. Alone: returns at once (read-backs synchronize by themselves).
    pub fn settle(&self, what: &str) -> Result<()> {
        match &self.dp {
            Some(d) => d.dp.comm.wait(self.gpu.stream(), &d.dp.group, what),
            None => Ok(()),
        }
    }

    /// The full AdamW moment buffer `buf` (`self.m` or `self.v`) on the host, gathered from
    /// every rank's shard under ZeRO-1 (a collective: every rank must call it).
    pub(super) fn full_moments(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        let n = self.layout.len();
        let s = self.gpu.stream();
        let Some(d) = self.dp.as_ref().filter(|d| d.dp.zero1) else {
            self.check_unsharded("reading the AdamW moments")?;
            self.settle("reading the AdamW moments")?;
            let mut all = s
                .clone_dtoh(buf)
                .map_err(KernelError::driver("reading the AdamW moments"))?;
            all.truncate(n);
            return Ok(all);
        };
        let world = d.dp.world_size();
        let mut full = alloc::<f32>(&self.gpu, d.chunk * world, "gathered AdamW moments")?;
        let own = self.opt_range.clone();
        if !own.is_empty() {
            s.memcpy_dtod(&buf.slice(0..own.len()), &mut full.slice_mut(own))
                .map_err(KernelError::driver("staging the moment shard"))?;
        }
        d.dp.comm.all_gather(&mut full, d.chunk, s)?;
        self.settle("gathering the AdamW moments")?;
        let mut all = s
            .clone_dtoh(&full)
            .map_err(KernelError::driver("reading the AdamW moments"))?;
        all.truncate(n);
        Ok(all)
    }
}
