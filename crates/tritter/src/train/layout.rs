//! The GPU training engine's parameter layout and allocation plan (DESIGN.md section 5,
//! llm.c style): every parameter is a range of one flat f32 buffer (shadow weights), mirrored
//! by equally laid out gradient and AdamW moment buffers, so zeroing the gradients, the global
//! norm and the AdamW update are one launch each over contiguous memory instead of one per
//! tensor. The plan counts every device buffer the engine allocates, by class, before any
//! allocation, so `tritter info --train` and the engine's out-of-memory check print the same
//! numbers.
//!
//! Layout (offsets in f32 elements), decaying parameters first so weight decay is one
//! contiguous range:
//! * per layer `i`: `q_proj`, `k_proj`, `v_proj` (adjacent: one stacked `(Hq D + 2 Hkv D, H)`
//!   matrix for the fused q/k/v GEMM and its one weight-gradient GEMM), `o_proj`,
//!   `gate_proj`, `up_proj` (adjacent: one `(2 I, H)` matrix), `down_proj`;
//! * `lm_head` when untied;
//! * then, without decay: `embed_tokens`, per layer `attn_norm`, `mlp_norm`, `q_norm`,
//!   `k_norm`, and the final `norm`.

use crate::config::TritterConfig;
use crate::model::{fnv1a, SeededRng, FNV_OFFSET};
use crate::{Result, TritterError};

/// One parameter of the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSlot {
    /// Checkpoint name (the reference model's `VarMap` name, e.g. `layers.0.attn.q_proj.weight`).
    pub name: String,
    /// Shape, row-major.
    pub dims: Vec<usize>,
    /// First element in the flat buffers.
    pub offset: usize,
    /// Whether AdamW applies weight decay ([`decays`](super::decays)).
    pub decay: bool,
}

impl ParamSlot {
    /// Elements.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// True for a zero-sized parameter (never produced by a valid config).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element range in the flat buffers.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// The flat parameter table of a config (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    slots: Vec<ParamSlot>,
    decay_len: usize,
    total: usize,
}

impl ParamLayout {
    /// The layout of `config`. Configs the engine cannot train (a latent projection) are
    /// refused by [`check_trainable`], not here: the table describes any config.
    pub fn new(config: &TritterConfig) -> Result<Self> {
        config.validate()?;
        let (h, i, d) = (
            config.hidden_size,
            config.intermediate_size,
            config.head_dim(),
        );
        let (q, kv, v) = (config.num_heads * d, config.kv_dim(), config.vocab_size);
        let mut slots: Vec<ParamSlot> = Vec::new();
        let push = |slots: &mut Vec<ParamSlot>, name: String, dims: Vec<usize>, decay: bool| {
            let offset = offset_of(slots);
            slots.push(ParamSlot {
                name,
                dims,
                offset,
                decay,
            });
        };
        for l in 0..config.num_layers {
            let p = format!("layers.{l}");
            push(
                &mut slots,
                format!("{p}.attn.q_proj.weight"),
                vec![q, h],
                true,
            );
            push(
                &mut slots,
                format!("{p}.attn.k_proj.weight"),
                vec![kv, h],
                true,
            );
            push(
                &mut slots,
                format!("{p}.attn.v_proj.weight"),
                vec![kv, h],
                true,
            );
            push(
                &mut slots,
                format!("{p}.attn.o_proj.weight"),
                vec![h, q],
                true,
            );
            push(
                &mut slots,
                format!("{p}.mlp.gate_proj.weight"),
                vec![i, h],
                true,
            );
            push(
                &mut slots,
                format!("{p}.mlp.up_proj.weight"),
                vec![i, h],
                true,
            );
            push(
                &mut slots,
                format!("{p}.mlp.down_proj.weight"),
                vec![h, i],
                true,
            );
        }
        if !config.tie_embeddings {
            push(&mut slots, "lm_head.weight".into(), vec![v, h], true);
        }
        let decay_len = offset_of(&slots);
        push(&mut slots, "embed_tokens.weight".into(), vec![v, h], false);
        for l in 0..config.num_layers {
            let p = format!("layers.{l}");
            push(&mut slots, format!("{p}.attn_norm.weight"), vec![h], false);
            push(&mut slots, format!("{p}.mlp_norm.weight"), vec![h], false);
            push(
                &mut slots,
                format!("{p}.attn.q_norm.weight"),
                vec![d],
                false,
            );
            push(
                &mut slots,
                format!("{p}.attn.k_norm.weight"),
                vec![d],
                false,
            );
        }
        push(&mut slots, "norm.weight".into(), vec![h], false);
        let total = offset_of(&slots);
        Ok(ParamLayout {
            slots,
            decay_len,
            total,
        })
    }

    /// Every parameter, in buffer order.
    pub fn slots(&self) -> &[ParamSlot] {
        &self.slots
    }

    /// The slot named `name`.
    pub fn get(&self, name: &str) -> Result<&ParamSlot> {
        self.slots.iter().find(|s| s.name == name).ok_or_else(|| {
            TritterError::config(
                "parameter name",
                name,
                "a parameter of this config's layout (ParamLayout::slots lists them)",
            )
        })
    }

    /// Elements of the decaying prefix (`0..decay_len` gets weight decay).
    pub fn decay_len(&self) -> usize {
        self.decay_len
    }

    /// Elements of the whole buffer (the parameter count).
    pub fn len(&self) -> usize {
        self.total
    }

    /// True when the layout holds no parameter (never for a valid config).
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// The reference model's initial weights in the flat layout: exactly what
/// [`TritterModel::new`](crate::TritterModel::new)`(config, F32, cpu, seed)` draws (each
/// parameter from its own seeded stream: linears and embeddings N(0, initializer_range²),
/// the `<pad>` embedding row zero, norms one), without building the candle model. Parameters
/// are drawn in parallel (rayon), so a 3B preset initializes in seconds.
pub fn init_params(config: &TritterConfig, layout: &ParamLayout, seed: u64) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; layout.len()];
    let mut rest = out.as_mut_slice();
    let mut parts = Vec::with_capacity(layout.slots().len());
    for s in layout.slots() {
        let (head, tail) = rest.split_at_mut(s.len());
        parts.push((s, head));
        rest = tail;
    }
    let std = config.initializer_range;
    parts.into_par_iter().for_each(|(s, dst)| {
        if s.dims.len() == 1 {
            dst.fill(1.0);
            return;
        }
        let mut rng = SeededRng::new(fnv1a(s.name.as_bytes(), FNV_OFFSET) ^ seed);
        dst.copy_from_slice(&rng.normal_vec(s.len(), std));
        if s.name == "embed_tokens.weight" {
            dst[..s.dims[1]].fill(0.0); // <pad> (id 0) embeds to zeros
        }
    });
    out
}

fn offset_of(slots: &[ParamSlot]) -> usize {
    slots.last().map_or(0, |s| s.offset + s.len())
}

/// What the GPU engine trains: the plain language-model objective on the BitLinear model.
/// Refused (with the field and the fix): a latent projection (a parameter the LM objective
/// never touches), dropout, head dims without attention kernels, unquantized BitLinear.
pub fn check_trainable(config: &TritterConfig) -> Result<()> {
    config.validate()?;
    let refuse = |field: &'static str, actual: String, expected: &str| {
        Err(TritterError::config(
            field,
            actual,
            format!("{expected} for the GPU training engine (train this config on the CPU)"),
        ))
    };
    if config.latent_projection {
        return refuse("latent_projection", "true".into(), "false");
    }
    if config.dropout != 0.0 {
        return refuse("dropout", config.dropout.to_string(), "0");
    }
    if !config.quantize_bitlinear {
        return refuse("quantize_bitlinear", "false".into(), "true");
    }
    let d = config.head_dim();
    if !flash_attn_sm120::SUPPORTED_HEAD_DIMS.contains(&d) {
        return refuse(
            "head_dim (hidden_size / num_heads)",
            d.to_string(),
            "64 or 128 (the attention kernels' head dims)",
        );
    }
    Ok(())
}

/// Which kernels run the BitLinear products of a training step: the forward `Y = A8(X) ·
/// (Wq gamma)ᵀ` and the input gradient `dX = dY · (Wq gamma)` (the weight gradient
/// `dW = dYᵀ · deq(A8(X))` always runs on cuBLAS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum LinearPath {
    /// ternary-gemm on the 2-bit weights: the W2A8 GEMM (int8 `mma.sync`) forward and the
    /// transposed product (bf16 `mma.sync`) for dX; no memory beyond the packed weights. The
    /// path of sm_120, which has no `wgmma` (cuBLAS runs `mma.sync` there too, and int8
    /// `mma.sync` has twice the bf16 rate).
    #[default]
    Ternary,
    /// The ternary GEMM forward, dX through cuBLAS bf16 on a dequantized copy of every
    /// BitLinear weight (refreshed by the re-quantization launch: 2 bytes per linear weight).
    CublasDx,
    /// Forward and dX through cuBLAS bf16 on the dequantized copies, with the activations
    /// fake-quantized to bf16 `deq(A8(X))` (the operand the weight gradient uses too); the
    /// GEMM-layout A8 buffers and f32 projection outputs are not allocated. On Hopper cuBLAS's
    /// `wgmma` outruns any `mma.sync` kernel (ternary-gemm README: the W2A8 GEMM reaches 0.76x
    /// cuBLAS bf16, the transposed product 0.42x).
    Cublas,
}

impl LinearPath {
    /// The faster path of a device of compute capability `(major, minor)`, measured: on
    /// Hopper (9.x) cuBLAS for both products (500M preset on the H100: crates/tritter
    /// README, "Training engine (GPU)"); elsewhere (sm_120 has no `wgmma`) ternary-gemm,
    /// which needs no weight copies.
    pub fn for_compute_capability((major, _): (u32, u32)) -> Self {
        if major == 9 {
            LinearPath::Cublas
        } else {
            LinearPath::Ternary
        }
    }

    /// Whether the path keeps bf16 copies of the BitLinear weights.
    pub fn keeps_copies(self) -> bool {
        self != LinearPath::Ternary
    }

    /// Whether the forward runs the ternary GEMM (A8 codes in the GEMM layout, f32 outputs).
    pub fn ternary_forward(self) -> bool {
        self != LinearPath::Cublas
    }
}

/// Device bytes of one training configuration, by buffer class: what the engine allocates,
/// computed before allocating (the engine refuses a plan larger than the free memory, with
/// this table in the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainPlan {
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Whether layers are recomputed in the backward pass (one layer's activations kept).
    pub recompute: bool,
    /// Parameters.
    pub params: usize,
    /// Bytes by class, in print order.
    pub classes: Vec<(&'static str, u64)>,
}

/// Rows of the LM-head / cross-entropy chunk: bf16 logits `(rows, V)`, overwritten in place by
/// their gradient, stay under 256 MiB (2048 rows at V = 65536), never a full `(B L, V)`
/// tensor. Fewer chunks mean fewer f32 read-modify-writes of the `(V, H)` head gradient.
pub fn logits_chunk_rows(tokens: usize, vocab: usize) -> usize {
    ((256usize << 20) / (2 * vocab.max(1))).clamp(1, tokens.max(1))
}

/// Bytes of one layer's saved activations for `t` tokens (the engine's `LayerActs`): raw
/// q/k/v bf16, attention output bf16 and its logsumexp, o_proj output f32 and its norm's
/// rms, the residual after attention f32, gate/up output bf16, the down projection's
/// dequantized A8 input bf16, down output f32 and its norm's rms. The layer input is kept apart (every layer's, also under recomputation).
pub fn layer_act_bytes(config: &TritterConfig, t: usize) -> u64 {
    let (h, i) = (config.hidden_size as u64, config.intermediate_size as u64);
    let (q, kv) = (
        (config.num_heads * config.head_dim()) as u64,
        config.kv_dim() as u64,
    );
    let t = t as u64;
    t * (2 * (q + 2 * kv) + 2 * q + 4 * config.num_heads as u64 + 12 * h + 6 * i + 8)
}

/// Bytes of the engine's per-shape scratch (`Acts` beyond the saved activations) for `t`
/// tokens of sequences of `seq_len`.
fn scratch_bytes(config: &TritterConfig, t: usize, seq_len: usize) -> u64 {
    let (h, i, d) = (
        config.hidden_size as u64,
        config.intermediate_size as u64,
        config.head_dim() as u64,
    );
    let (hq, q, kv) = (
        config.num_heads as u64,
        config.num_heads as u64 * config.head_dim() as u64,
        config.kv_dim() as u64,
    );
    let qkv = q + 2 * kv;
    let wide = h.max(i).max(q);
    let v = config.vocab_size as u64;
    let chunk = logits_chunk_rows(t, config.vocab_size) as u64;
    let t = t as u64;
    ternary_forward_scratch(config, t as usize)
        + t * (2 * wide + 2 * h + 4 * i + 2 * qkv) // bf16 operands of the gradient products
        + t * (4 * h + 4 * h + 4 * wide) // residual and branch gradients, transposed-GEMM output
        + t * (2 * kv + 2 * q) // prologue keys, attention output gradient
        + t * (2 * q + 4 * kv) // dq, dk, dv
        + t * (4 * q + 4 * hq + 2 * q + 2 * kv + 4 * kv) // attention backward workspace
        + chunk * v * 2 // bf16 logits chunk (its gradient in place)
        + seq_len as u64 * d * 4 // RoPE table
        + t * 12 // ids, targets, loss mask
}

/// The part of [`scratch_bytes`] only the ternary forward uses: the A8 activations in the
/// GEMM layout (codes, sums, scales, flags) of the hidden and intermediate widths and the
/// f32 q/k/v and gate/up GEMM outputs.
fn ternary_forward_scratch(config: &TritterConfig, t: usize) -> u64 {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let qkv = (config.num_heads * config.head_dim() + 2 * config.kv_dim()) as u64;
    let kp = |c: usize| ternary_gemm::gemv_padded_cols(c) as u64;
    let t = t as u64;
    t * (kp(h) + 12 + kp(i) + 12) + t * (4 * qkv + 8 * i as u64)
}

impl TrainPlan {
    /// The plan for micro-batches of `batch` x `seq_len` tokens.
    pub fn new(
        config: &TritterConfig,
        batch: usize,
        seq_len: usize,
        recompute: bool,
    ) -> Result<Self> {
        let layout = ParamLayout::new(config)?;
        if batch == 0 || seq_len == 0 || seq_len > config.max_position_embeddings {
            return Err(TritterError::ShapeMismatch {
                what: "training micro-batch (batch, seq_len)".into(),
                actual: vec![batch, seq_len],
                expected: format!(
                    "batch >= 1 and 1 <= seq_len <= {}",
                    config.max_position_embeddings
                ),
            });
        }
        let n = layout.len() as u64;
        let (h, i, v) = (
            config.hidden_size as u64,
            config.intermediate_size as u64,
            config.vocab_size as u64,
        );
        let q = (config.num_heads * config.head_dim()) as u64;
        let qkv = q + 2 * config.kv_dim() as u64;
        let t = (batch * seq_len) as u64;
        let layers = config.num_layers as u64;
        let ternary: u64 = [
            (qkv as usize, h as usize),
            (h as usize, q as usize),
            (2 * i as usize, h as usize),
            (h as usize, i as usize),
        ]
        .iter()
        .map(|&(r, c)| (ternary_gemm::tiled_len(r, c) * 4 + r * 4) as u64)
        .sum::<u64>()
            * layers;
        let head_rows = if config.tie_embeddings { 1 } else { 2 };
        let slots = if recompute { 1 } else { layers };
        let scratch = scratch_bytes(config, t as usize, seq_len);
        let classes = vec![
            ("shadow weights f32", 4 * n),
            ("gradients f32", 4 * n),
            ("AdamW moments f32", 8 * n),
            ("packed ternary + scales", ternary),
            (
                "bf16 copies (embedding/LM head, QK-Norm)",
                head_rows * 2 * v * h + layers * 4 * config.head_dim() as u64,
            ),
            (
                "saved activations",
                // + every layer input, the final norm's output, rms and bf16 copy
                slots * layer_act_bytes(config, t as usize)
                    + (layers + 1) * t * 4 * h
                    + t * (6 * h + 4),
            ),
            ("scratch", scratch),
        ];
        Ok(TrainPlan {
            batch,
            seq_len,
            recompute,
            params: layout.len(),
            classes,
        })
    }

    /// The plan (made for [`LinearPath::Ternary`]) for another path: the bf16 weight copies
    /// (2 bytes per BitLinear weight) as a state class of their own, and without the ternary
    /// forward's scratch on [`LinearPath::Cublas`].
    pub fn with_linear_path(mut self, config: &TritterConfig, path: LinearPath) -> Self {
        if !path.ternary_forward() {
            let t = self.batch * self.seq_len;
            if let Some(c) = self.classes.iter_mut().find(|c| c.0 == "scratch") {
                c.1 -= ternary_forward_scratch(config, t);
            }
        }
        if path.keeps_copies() {
            let (h, i) = (config.hidden_size as u64, config.intermediate_size as u64);
            let q = (config.num_heads * config.head_dim()) as u64;
            let kv = config.kv_dim() as u64;
            let per_layer = (q + 2 * kv) * h + h * q + 3 * i * h;
            self.classes.insert(
                5,
                (
                    "bf16 BitLinear copies (cuBLAS products)",
                    2 * per_layer * config.num_layers as u64,
                ),
            );
        }
        self
    }

    /// The plan of one rank of a data-parallel group of `world` GPUs: with `zero1` the flat
    /// buffers are padded to a multiple of `world` and the AdamW moments hold one
    /// `ceil(N / world)` shard (8 bytes per parameter become 8 / world); plain data
    /// parallelism keeps every class as it is (each rank holds the whole state).
    pub fn with_data_parallel(mut self, world: usize, zero1: bool) -> Self {
        if zero1 && world > 1 {
            let chunk = self.params.div_ceil(world) as u64;
            let padded = chunk * world as u64;
            for c in self.classes.iter_mut() {
                match c.0 {
                    "shadow weights f32" | "gradients f32" => c.1 = 4 * padded,
                    "AdamW moments f32" => *c = ("AdamW moments f32 (ZeRO-1 shard)", 8 * chunk),
                    _ => {}
                }
            }
        }
        self
    }

    /// Bytes of the model's training state (everything but activations and scratch): what
    /// the engine allocates when it is created, before any micro-batch shape is known.
    pub fn state_bytes(&self) -> u64 {
        self.classes
            .iter()
            .filter(|c| c.0 != "saved activations" && c.0 != "scratch")
            .map(|c| c.1)
            .sum()
    }

    /// All bytes.
    pub fn total_bytes(&self) -> u64 {
        self.classes.iter().map(|c| c.1).sum()
    }
}

impl std::fmt::Display for TrainPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "GPU training plan: {} parameters, micro-batch {} x {} tokens, recompute {}",
            self.params, self.batch, self.seq_len, self.recompute
        )?;
        for (name, bytes) in &self.classes {
            writeln!(f, "  {name:<42} {:>10.3} GB", *bytes as f64 / 1e9)?;
        }
        writeln!(
            f,
            "  {:<42} {:>10.3} GB",
            "total",
            self.total_bytes() as f64 / 1e9
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flat layout covers exactly the reference model's parameters (count and names),
    /// with decaying parameters first and no gaps.
    #[test]
    fn layout_matches_reference_parameters() {
        for tie in [true, false] {
            let mut cfg = TritterConfig::preset("test").unwrap();
            cfg.tie_embeddings = tie;
            let layout = ParamLayout::new(&cfg).unwrap();
            assert_eq!(layout.len() as u64, cfg.param_count());
            let model = crate::TritterModel::new(
                &cfg,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
                1,
            )
            .unwrap();
            let vars = model.varmap().data().lock().unwrap();
            assert_eq!(vars.len(), layout.slots().len());
            let mut end = 0;
            for s in layout.slots() {
                let var = vars
                    .get(&s.name)
                    .unwrap_or_else(|| panic!("{} missing", s.name));
                assert_eq!(var.dims(), s.dims.as_slice(), "{}", s.name);
                assert_eq!(s.offset, end, "{} follows the previous slot", s.name);
                assert_eq!(
                    s.decay,
                    super::super::decays(&s.name, &s.dims),
                    "{}",
                    s.name
                );
                assert_eq!(s.decay, s.offset < layout.decay_len(), "{}", s.name);
                end = s.range().end;
            }
            assert_eq!(end, layout.len());
        }
    }

    /// `init_params` reproduces the reference model's seeded initialization value for value
    /// (tied and untied heads).
    #[test]
    fn init_params_equals_reference_init() {
        for tie in [true, false] {
            let mut cfg = TritterConfig::preset("test").unwrap();
            cfg.tie_embeddings = tie;
            let layout = ParamLayout::new(&cfg).unwrap();
            let flat = init_params(&cfg, &layout, 42);
            let model = crate::TritterModel::new(
                &cfg,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
                42,
            )
            .unwrap();
            let vars = model.varmap().data().lock().unwrap();
            for s in layout.slots() {
                let want = vars[&s.name]
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert_eq!(&flat[s.range()], want.as_slice(), "{}", s.name);
            }
        }
    }

    /// The plan's optimizer classes are exact multiples of the parameter count, activations
    /// grow linearly with the batch, and recomputation keeps one layer's activations.
    #[test]
    fn plan_scales_with_batch_and_recompute() {
        let cfg = TritterConfig::preset("500m").unwrap();
        let (b, l) = (4, 2048);
        let p = TrainPlan::new(&cfg, b, l, false).unwrap();
        let n = cfg.param_count();
        let class = |p: &TrainPlan, name: &str| p.classes.iter().find(|c| c.0 == name).unwrap().1;
        assert_eq!(class(&p, "shadow weights f32"), 4 * n);
        assert_eq!(class(&p, "AdamW moments f32"), 8 * n);
        let p2 = TrainPlan::new(&cfg, 2 * b, l, false).unwrap();
        let acts = |p: &TrainPlan| class(p, "saved activations");
        assert_eq!(acts(&p2), 2 * acts(&p));
        let r = TrainPlan::new(&cfg, b, l, true).unwrap();
        let per_layer = layer_act_bytes(&cfg, b * l);
        assert_eq!(acts(&p) - acts(&r), (cfg.num_layers as u64 - 1) * per_layer);
        assert!(p.to_string().contains("total"));
        assert!(TrainPlan::new(&cfg, 0, l, false).is_err());
    }

    /// ZeRO-1 divides the moments by the world size (rounded up per rank) and pads the
    /// weight and gradient buffers by less than one parameter per rank; plain data
    /// parallelism and a world of one change nothing.
    #[test]
    fn plan_under_zero1_shards_the_moments() {
        let cfg = TritterConfig::preset("500m").unwrap();
        let p = TrainPlan::new(&cfg, 4, 2048, false).unwrap();
        assert_eq!(p.clone().with_data_parallel(2, false), p);
        assert_eq!(p.clone().with_data_parallel(1, true), p);
        let n = cfg.param_count();
        for world in [2u64, 3, 8] {
            let z = p.clone().with_data_parallel(world as usize, true);
            let class = |name: &str| z.classes.iter().find(|c| c.0 == name).unwrap().1;
            assert_eq!(
                class("AdamW moments f32 (ZeRO-1 shard)"),
                8 * n.div_ceil(world)
            );
            let w = class("shadow weights f32");
            assert!(w >= 4 * n && w < 4 * (n + world), "{w}");
            assert_eq!(
                z.total_bytes() + 8 * n - 8 * n.div_ceil(world) - 2 * (w - 4 * n),
                p.total_bytes()
            );
        }
    }

    /// The cuBLAS paths add exactly 2 bytes per BitLinear weight, counted as training state;
    /// the cuBLAS forward drops the ternary forward's scratch; the ternary path adds
    /// nothing; Hopper picks cuBLAS, sm_120 ternary.
    #[test]
    fn cublas_copies_are_two_bytes_per_linear_weight() {
        let cfg = TritterConfig::preset("1b").unwrap();
        let (b, l) = (2, 256);
        let base = TrainPlan::new(&cfg, b, l, false).unwrap();
        let with = base.clone().with_linear_path(&cfg, LinearPath::CublasDx);
        let linear = cfg.param_breakdown().linear;
        assert_eq!(with.total_bytes() - base.total_bytes(), 2 * linear);
        assert_eq!(with.state_bytes() - base.state_bytes(), 2 * linear);
        let full = base.clone().with_linear_path(&cfg, LinearPath::Cublas);
        assert_eq!(full.state_bytes(), with.state_bytes());
        let saved = with.total_bytes() - full.total_bytes();
        let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
        let t = (b * l) as u64;
        // At least the f32 gate/up output and the int8 codes of both widths.
        assert!(saved >= t * (8 * i + h + i), "{saved}");
        let scratch = base.classes.iter().find(|c| c.0 == "scratch").unwrap().1;
        assert!(saved < scratch, "{saved} of {scratch}");
        assert_eq!(
            base.clone().with_linear_path(&cfg, LinearPath::Ternary),
            base
        );
        assert_eq!(
            LinearPath::for_compute_capability((9, 0)),
            LinearPath::Cublas
        );
        assert_eq!(
            LinearPath::for_compute_capability((12, 0)),
            LinearPath::Ternary
        );
    }

    /// Configs the engine cannot train are refused naming the field.
    #[test]
    fn untrainable_configs_are_refused() {
        let cfg = TritterConfig::preset("test").unwrap();
        let err = check_trainable(&cfg).unwrap_err().to_string();
        assert!(err.contains("head_dim"), "{err}");
        let mut ok = TritterConfig::preset("500m").unwrap();
        check_trainable(&ok).unwrap();
        ok.latent_projection = true;
        assert!(check_trainable(&ok)
            .unwrap_err()
            .to_string()
            .contains("latent_projection"));
    }
}
