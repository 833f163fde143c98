//! `tritter`: train, evaluate and sample the Tritter BitNet b1.58 model on the CPU, inspect
//! presets and memory budgets, and tokenize files. Run `tritter --help` for examples.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use tritter::data::{
    corpus, load_documents, split_documents, Document, MalformedPolicy, PackedDataset,
    SourceOptions,
};
use tritter::engine::hf::{compare_logits, HfBitnet, HfTokenizer, ReferenceLogits};
use tritter::engine::{
    bench_engine, generate_batch, generate_stream, CpuEngine, Engine, GenerationRequest,
    InferenceCheckpoint, KvCacheFormat, KvCacheOptions, Manifest, MANIFEST_FILE,
};
use tritter::generate::{generate, SamplingOptions};
use tritter::paradigm::curriculum::{Curriculum, ReasoningTrainer};
use tritter::paradigm::experiment::{
    evaluate_corpus, evaluate_task, EvalMode, EvalOptions, EvalReport, HELD_OUT_SEED,
};
use tritter::paradigm::task::TaskKind;
use tritter::paradigm::{EmbeddingLossKind, EmbeddingObjective, LatentMarkers, Objective};
use tritter::tokenizer::{BpeVocab, Modality, MultimodalTokenizer, Segment, VocabLayout};
use tritter::train::dist::DistEnv;
use tritter::train::{
    device_from_name, evaluate, latest_checkpoint, model_checkpoint_dir, EvalMetrics, Progress,
    StepMetrics, TrainOptions, Trainer, TrainerState,
};
use tritter::{MemoryEstimate, Result, TritterConfig, TritterError, TritterModel};

const EXAMPLES: &str = "\
Examples:
  tritter train                                  # test preset on the built-in corpus (CPU, minutes)
  tritter train --data ./my-code --steps 2000 --out runs/code
  tritter train --data data.jsonl --text-field content --malformed fail
  tritter train --data shard-000.parquet --preset 100m --seq-len 512 --grad-accum 4
  tritter train --resume runs/test               # continue from runs/test/checkpoints/latest
  tritter train --embedding-loss cosine --embedding-weight 0.5 --transition-start 200 --transition-steps 400
  tritter eval --checkpoint runs/test --mode all
  tritter train --task arith --difficulty 3 --latent-stages 3 --steps 1500   # Coconut curriculum
  tritter eval --checkpoint runs/arith-latent/model --task arith --mode all
  tritter export --checkpoint runs/test --out runs/test/inference
  tritter generate --checkpoint runs/test/inference --prompt 'fn main() {' --temperature 0.7 --top-p 0.9
  tritter generate --checkpoint runs/test --prompt 'fn ' --prompt 'let ' --kv-cache int4
  tritter generate --checkpoint runs/test --prompt 'fn main() {' --latent-steps 4   # reference loop
  tritter generate --hf models/bitnet-b1.58-2B-4T-bf16 --prompt 'The capital of France is' --temperature 0
  tritter export --hf models/bitnet-b1.58-2B-4T-bf16 --out models/bitnet-2b4t-tritter
  tritter eval-hf --hf models/tiny-bitnet --reference logits.json   # max abs logit diff, top-1 agreement
  tritter info --context 131072
  tritter info --train --preset 500m --batch 8 --seq-len 2048   # GPU training memory plan
  tritter bench-train --preset 500m --batch 8 --seq-len 2048     # GPU training tokens/s and MFU
  tritter tokenize --file src/lib.rs --modality code";

/// Train, evaluate and sample Tritter (BitNet b1.58) models on the CPU.
#[derive(Parser, Debug)]
#[command(name = "tritter", version, about, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Presets, parameter counts and the memory budget at a context length.
    #[command(after_help = "Example:\n  tritter info --context 131072 --batch 1")]
    Info(InfoArgs),
    /// Train a model (the built-in corpus when --data is not given).
    #[command(after_help = EXAMPLES)]
    Train(Box<TrainArgs>),
    /// Validation loss and perplexity of a checkpoint.
    #[command(
        after_help = "Examples:\n  tritter eval --checkpoint runs/test\n  tritter eval --checkpoint runs/test/checkpoints/step-00000400 --data held-out.jsonl"
    )]
    Eval(EvalArgs),
    /// Sample continuations of prompts on the CPU inference engine (streamed to stdout).
    #[command(
        after_help = "Examples:\n  tritter generate --checkpoint runs/test --prompt 'pub fn ' --max-tokens 200 --top-k 40\n  tritter generate --checkpoint runs/test/inference --prompt 'fn ' --prompt 'impl ' --top-p 0.9 --stop $'\\n\\n'\n  tritter generate --checkpoint runs/test --prompt 'fn ' --reference --latent-steps 2"
    )]
    Generate(GenerateArgs),
    /// Export a trained checkpoint, or import a Hugging Face BitNet b1.58 checkpoint, to an
    /// inference checkpoint (packed ternary weights).
    #[command(
        after_help = "Examples:\n  tritter export --checkpoint runs/test --out runs/test/inference\n  tritter export --hf models/bitnet-b1.58-2B-4T-bf16 --out models/bitnet-2b4t-tritter"
    )]
    Export(ExportArgs),
    /// Logits of a Hugging Face BitNet model on the engine, compared with a peer's
    /// (benches/peers/hf_bitnet_reference.py logits): max abs difference, top-1 agreement.
    #[command(
        name = "eval-hf",
        after_help = "Examples:\n  tritter eval-hf --hf models/tiny-bitnet --reference logits.json\n  tritter eval-hf --hf models/tiny-bitnet --ids 1,2,3 --reference logits.npy --out ours.json"
    )]
    EvalHf(EvalHfArgs),
    /// Prefill and decode throughput of the inference engine (CPU or GPU) at batch sizes,
    /// on a preset with random weights or a checkpoint, with peak device memory.
    #[command(
        after_help = "Examples:\n  tritter bench                                  # test preset, CPU\n  tritter bench --preset 7b --device cuda --batch 1,8,32 --prompt-len 512\n  tritter bench --preset 7b --device cuda --batch 1 --pool-tokens 131072   # memory at 128K context\n  tritter bench --checkpoint runs/test/inference --batch 1,4"
    )]
    Bench(BenchArgs),
    /// Time the GPU training engine (tokens/s, MFU, device memory) on random batches.
    #[command(
        after_help = "Examples:\n  tritter bench-train --preset 500m --batch 8 --seq-len 2048\n  tritter bench-train --preset 3b --batch 4 --seq-len 4096 --recompute"
    )]
    BenchTrain(BenchTrainArgs),
    /// Print the token ids of a text or file.
    #[command(
        after_help = "Examples:\n  tritter tokenize --text 'hello'\n  tritter tokenize --file src/main.rs --modality code --tokenizer tokenizer.json"
    )]
    Tokenize(TokenizeArgs),
}

#[derive(Args, Debug)]
struct InfoArgs {
    /// Context length of the KV-cache budget.
    #[arg(long, default_value_t = 131_072)]
    context: usize,
    /// Sequences of the budget.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Print the full estimate of this preset only.
    #[arg(long)]
    preset: Option<String>,
    /// Print the GPU training engine's allocation plan (bytes per buffer class) for
    /// --preset (default test) at micro-batches of --batch x --seq-len.
    #[arg(long)]
    train: bool,
    /// Tokens per training sequence (with --train).
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Plan with layer recomputation (with --train).
    #[arg(long)]
    recompute: bool,
    /// Plan for this BitLinear product path (with --train; the engine picks cuBLAS on Hopper,
    /// ternary elsewhere).
    #[arg(long, value_enum, default_value_t = LinearArg::Ternary)]
    linear: LinearArg,
    /// Plan one rank of data-parallel training over this many GPUs (with --train).
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    /// With --gpus: the AdamW moments sharded across the GPUs (ZeRO-1).
    #[arg(long)]
    zero1: bool,
}

#[derive(Args, Debug)]
struct BenchTrainArgs {
    /// Preset trained from its seeded initialization.
    #[arg(long, default_value = "500m")]
    preset: String,
    /// A model config file instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Sequences per micro-batch (one micro-batch per optimizer step).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Recompute each layer's activations in the backward pass.
    #[arg(long)]
    recompute: bool,
    /// Untimed steps first (CUDA module loading, cuBLAS heuristics).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Dense bf16 peak of the device for the MFU (TFLOP/s; H100/H200 are known: 989).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Then time two more steps phase by phase (CUDA events) and print where a step's time
    /// goes.
    #[arg(long)]
    profile: bool,
    /// BitLinear products: ternary-gemm for the forward and dX, cuBLAS for dX only
    /// (`cublas-dx`), or cuBLAS for both (`cublas`); the cuBLAS paths keep bf16 weight copies
    /// (2 bytes per linear weight). Default: the device's faster one (cuBLAS on Hopper).
    #[arg(long, value_enum)]
    linear: Option<LinearArg>,
    #[command(flatten)]
    parallel: ParallelArgs,
}

/// Data-parallel training over the GPUs of this host (NCCL, issue 13).
#[derive(Args, Debug, Clone, Copy)]
struct ParallelArgs {
    /// GPUs to train on: starts one process per GPU (ranks 0..N on devices 0..N) and sums
    /// gradients with NCCL; --batch-size is per GPU. torchrun-style launches (RANK,
    /// WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK set by the launcher) need no --gpus.
    /// libnccl: TRITTER_NCCL_LIB or libnccl.so.2 on the loader path.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    /// Shard the AdamW moments across the GPUs (ZeRO-1): 8 bytes per parameter become
    /// 8 / N; the same result as plain data parallelism.
    #[arg(long)]
    zero1: bool,
}

impl ParallelArgs {
    /// The group this process is a rank of (from the environment), or `None` alone; with
    /// `--gpus N > 1` and no group yet, starts the N ranks and waits for them
    /// (`Err(Ok(()))`: the launcher is done, the caller returns).
    fn join(&self, on_gpu: bool) -> std::result::Result<Option<DistEnv>, Result<()>> {
        let env = DistEnv::from_env().map_err(Err)?;
        if self.gpus == 0 {
            return Err(Err(option_err("gpus", 0, "expected >= 1")));
        }
        if (self.gpus > 1 || env.as_ref().is_some_and(|e| e.world_size > 1)) && !on_gpu {
            return Err(Err(option_err(
                "gpus",
                self.gpus,
                "data-parallel training with --device cuda",
            )));
        }
        match env {
            None if self.gpus > 1 => {
                let run = || -> Result<()> {
                    let exe = std::env::current_exe().map_err(|e| TritterError::Distributed {
                        rank: 0,
                        detail: format!("locating this executable to start the ranks: {e}"),
                    })?;
                    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
                    eprintln!("starting {} ranks (one per GPU)", self.gpus);
                    tritter::train::dist::launch_local(
                        &exe,
                        &args,
                        self.gpus,
                        tritter::train::dist::env_timeout()?,
                    )
                };
                Err(run())
            }
            Some(e) if self.gpus > 1 && e.world_size != self.gpus => Err(Err(option_err(
                "gpus",
                self.gpus,
                format!("WORLD_SIZE {} of the launch environment", e.world_size),
            ))),
            Some(e) if e.world_size > 1 => Ok(Some(e)),
            _ => Ok(None),
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LinearArg {
    Ternary,
    CublasDx,
    Cublas,
}

impl LinearArg {
    fn path(self) -> tritter::train::LinearPath {
        match self {
            LinearArg::Ternary => tritter::train::LinearPath::Ternary,
            LinearArg::CublasDx => tritter::train::LinearPath::CublasDx,
            LinearArg::Cublas => tritter::train::LinearPath::Cublas,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Malformed {
    Skip,
    Fail,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EmbeddingLossArg {
    Mse,
    Cosine,
}

impl From<EmbeddingLossArg> for EmbeddingLossKind {
    fn from(k: EmbeddingLossArg) -> Self {
        match k {
            EmbeddingLossArg::Mse => EmbeddingLossKind::Mse,
            EmbeddingLossArg::Cosine => EmbeddingLossKind::Cosine,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModalityArg {
    Text,
    Code,
}

impl From<ModalityArg> for Modality {
    fn from(m: ModalityArg) -> Self {
        match m {
            ModalityArg::Text => Modality::Text,
            ModalityArg::Code => Modality::Code,
        }
    }
}

/// Where training/eval data comes from and how it is tokenized.
#[derive(Args, Debug, Clone)]
struct DataArgs {
    /// A directory of text/code files, a .jsonl, a .parquet or a text file (default: the
    /// built-in corpus of this project's Rust and CUDA sources).
    #[arg(long)]
    data: Option<PathBuf>,
    /// JSON field / parquet column holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Malformed JSONL lines / parquet rows: skip (counted) or fail.
    #[arg(long, value_enum, default_value_t = Malformed::Skip)]
    malformed: Malformed,
    /// Modality prefix of JSONL/parquet records and single files.
    #[arg(long, value_enum, default_value_t = ModalityArg::Text)]
    modality: ModalityArg,
    /// Fraction of --data held out for validation (the built-in corpus has its own split).
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// A BPE tokenizer.json trained by the tritter tokenizer (default: bytes).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Model preset (test, 100m, 500m, 1b, 3b, 7b).
    #[arg(long, default_value = "test")]
    preset: String,
    /// A config.json instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory: metrics.jsonl and checkpoints/.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Resume from a checkpoint (a step-* directory or a run directory).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Optimizer steps of the whole run.
    #[arg(long, default_value_t = TrainOptions::default().steps)]
    steps: u64,
    /// Stop after this step (the schedule still spans --steps); resume later.
    #[arg(long)]
    stop_after: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = TrainOptions::default().batch_size)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = TrainOptions::default().seq_len)]
    seq_len: usize,
    /// Micro-batches per step.
    #[arg(long, default_value_t = TrainOptions::default().grad_accum)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = TrainOptions::default().lr)]
    lr: f64,
    /// Warmup steps.
    #[arg(long, default_value_t = TrainOptions::default().warmup_steps)]
    warmup: u64,
    /// Final learning rate as a fraction of --lr.
    #[arg(long, default_value_t = TrainOptions::default().min_lr_ratio)]
    min_lr_ratio: f64,
    /// AdamW weight decay of the linear layers (norms and embeddings get none).
    #[arg(long, default_value_t = TrainOptions::default().adamw.weight_decay)]
    weight_decay: f64,
    /// Global gradient-norm clip (0: off).
    #[arg(long, default_value_t = TrainOptions::default().grad_clip)]
    grad_clip: f64,
    /// Validate every N steps (0: before and after only).
    #[arg(long, default_value_t = TrainOptions::default().eval_every)]
    eval_every: u64,
    /// Validation batches per evaluation (0: all).
    #[arg(long, default_value_t = TrainOptions::default().eval_batches)]
    eval_batches: usize,
    /// Checkpoint every N steps (0: at the end only).
    #[arg(long, default_value_t = TrainOptions::default().checkpoint_every)]
    checkpoint_every: u64,
    /// Seed of init and data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Let packed documents attend to each other.
    #[arg(long)]
    no_document_mask: bool,
    /// Recompute layer activations in the backward pass (less memory, ~1.3x time).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// cpu, or cuda (the GPU training engine; the plain cross-entropy objective, head dims
    /// 64/128; checkpoints move between the two unchanged).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Add an embedding-prediction loss (predicted next embedding vs the detached embedding
    /// of the next token): mse or cosine.
    #[arg(long, value_enum)]
    embedding_loss: Option<EmbeddingLossArg>,
    /// Weight of the embedding loss in the target mix (default 1; needs --embedding-loss).
    #[arg(long)]
    embedding_weight: Option<f64>,
    /// Weight of the cross-entropy in the target mix.
    #[arg(long, default_value_t = 1.0)]
    ce_weight: f64,
    /// Step at which the weights start moving from CE only to the target mix.
    #[arg(long, default_value_t = 0)]
    transition_start: u64,
    /// Steps of the linear transition to the target mix (0: switch at --transition-start).
    #[arg(long, default_value_t = 0)]
    transition_steps: u64,
    /// Train on a synthetic reasoning task instead of text: arith (arithmetic chains) or
    /// reach (graph reachability); the model is saved to <out>/model.
    #[arg(long)]
    task: Option<String>,
    /// Task difficulty (arith: steps, reach: hops of the planted path).
    #[arg(long, default_value_t = 3)]
    difficulty: usize,
    /// Training examples generated for --task (seeded by --seed).
    #[arg(long, default_value_t = 4000)]
    task_examples: usize,
    /// Last stage of the Coconut curriculum for --task: stage s replaces the first s
    /// reasoning steps with continuous thoughts (0: plain chain of thought).
    #[arg(long, default_value_t = 0)]
    latent_stages: usize,
    /// Continuous thoughts per replaced reasoning step.
    #[arg(long, default_value_t = 1)]
    thoughts_per_step: usize,
    /// Optimizer steps per curriculum stage (default: --steps spread over the stages).
    #[arg(long)]
    stage_steps: Option<u64>,
    /// Tokens of the sample printed after training (0: none).
    #[arg(long, default_value_t = 200)]
    sample_tokens: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    parallel: ParallelArgs,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// Checkpoint (a step-* directory, a run directory, or a model checkpoint directory).
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Tokens per sequence (default: the checkpoint's training value, else 128).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Batches to evaluate (0: all).
    #[arg(long, default_value_t = 0)]
    max_batches: usize,
    /// How the next token is read: token (logits), embedding (the predicted embedding
    /// rounded to the nearest token), latent (continuous thoughts in place of the reasoning
    /// steps; needs --task), or all (every mode that applies).
    #[arg(long, default_value = "token")]
    mode: String,
    /// Evaluate on a synthetic reasoning task (arith, reach) instead of text.
    #[arg(long)]
    task: Option<String>,
    /// Task difficulty (arith: steps, reach: hops).
    #[arg(long, default_value_t = 3)]
    difficulty: usize,
    /// Held-out task examples.
    #[arg(long, default_value_t = 200)]
    examples: usize,
    /// Seed of the held-out examples (training uses --seed, 0 by default).
    #[arg(long, default_value_t = HELD_OUT_SEED)]
    task_seed: u64,
    /// Latent mode: continuous thoughts per reasoning step (as trained).
    #[arg(long, default_value_t = 1)]
    thoughts_per_step: usize,
    /// Embedding mode: rounder confidence below which the logits decide (0: never).
    #[arg(long, default_value_t = 0.0)]
    rounder_threshold: f32,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum KvCacheArg {
    /// INT4 when the config sets int4_kv_cache, else f32.
    Auto,
    F32,
    F16,
    Int4,
}

impl KvCacheArg {
    /// The format this asks for (`default` for auto).
    fn format(self, default: KvCacheFormat) -> KvCacheFormat {
        match self {
            KvCacheArg::Auto => default,
            KvCacheArg::F32 => KvCacheFormat::F32,
            KvCacheArg::F16 => KvCacheFormat::F16,
            KvCacheArg::Int4 => KvCacheFormat::Int4,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Preset run with seeded random weights (ignored with --checkpoint).
    #[arg(long, default_value = "test")]
    preset: String,
    /// Layers of the preset instead of its own count (quick runs of a big preset's shapes).
    #[arg(long)]
    layers: Option<usize>,
    /// An inference checkpoint (or a training checkpoint, exported in memory) instead of a
    /// preset.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Engine device (as for generate).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32])]
    batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// KV cache format (auto: the config's; f16 instead of f32 on the GPU).
    #[arg(long, value_enum, default_value_t = KvCacheArg::Auto)]
    kv_cache: KvCacheArg,
    /// Size the page pool for this many tokens (e.g. 131072 for the memory of a 128K
    /// context) instead of what the runs need.
    #[arg(long)]
    pool_tokens: Option<usize>,
    /// Seed of the random weights and prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// GPU engine: after the timed runs, time every phase of the decode steps with CUDA
    /// events (graphs off) and print where a step's time goes.
    #[arg(long)]
    profile: bool,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("model").required(true).args(["checkpoint", "hf"])))]
struct GenerateArgs {
    /// Checkpoint: an inference checkpoint (from `tritter export`), or a training checkpoint
    /// (a step-* directory, a run directory, or a model checkpoint directory), exported in
    /// memory.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// A Hugging Face BitNet b1.58 checkpoint directory (config.json, safetensors,
    /// tokenizer.json), imported in memory, or a directory from `tritter export --hf`.
    /// Prompts go through its own tokenizer; its eos ids stop generation.
    #[arg(long)]
    hf: Option<PathBuf>,
    /// A prompt; repeat for several prompts, generated together with continuous batching.
    #[arg(long = "prompt", conflicts_with = "prompt_ids")]
    prompts: Vec<String>,
    /// A prompt as comma-separated token ids (no tokenizer involved; output printed as ids
    /// when the model has no tokenizer).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Vec<u32>,
    /// Modality prefix of the prompts.
    #[arg(long, value_enum, default_value_t = ModalityArg::Code)]
    modality: ModalityArg,
    /// New tokens at most.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Top-k (0: all tokens).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Top-p nucleus in (0, 1] (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Repetition penalty (1: off; > 1 discourages tokens already in the context).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Sampler seed (prompt i of several uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A stop string (encoded with the tokenizer, without the modality prefix); repeatable.
    #[arg(long)]
    stop: Vec<String>,
    /// A stop token id; repeatable.
    #[arg(long)]
    stop_token: Vec<u32>,
    /// KV cache format of the engine.
    #[arg(long, value_enum, default_value_t = KvCacheArg::Auto)]
    kv_cache: KvCacheArg,
    /// Engine device: auto (the GPU engine when this binary has CUDA, a GPU is present and
    /// the model fits its kernels, else the CPU), cpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Sequences decoded at once (continuous batching).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Run the candle reference loop (re-runs the model for every token; needed for
    /// --latent-steps) instead of the engine. Needs a training checkpoint.
    #[arg(long)]
    reference: bool,
    /// Continuous-thought steps after the prompt (<bot>, N thoughts, <eot>) before sampling;
    /// implies --reference.
    #[arg(long, default_value_t = 0)]
    latent_steps: usize,
    /// A BPE tokenizer.json (default: bytes).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("source").required(true).args(["checkpoint", "hf"])))]
struct ExportArgs {
    /// Training checkpoint: a step-* directory, a run directory, or a model checkpoint
    /// directory.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// A Hugging Face BitNet b1.58 checkpoint directory: imported (linears quantized as
    /// transformers' online BitLinear does), written with hf_config.json, tokenizer.json and
    /// generation_config.json beside it (`generate --hf <out>` reads them).
    #[arg(long)]
    hf: Option<PathBuf>,
    /// Output directory of the inference checkpoint (created; files are replaced
    /// atomically).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct EvalHfArgs {
    /// Hugging Face BitNet checkpoint directory (or a `tritter export --hf` directory).
    #[arg(long)]
    hf: PathBuf,
    /// Token ids, comma separated (default: the `ids` of a .json reference).
    #[arg(long, value_delimiter = ',')]
    ids: Vec<u32>,
    /// Text to encode with the model's tokenizer.json instead of --ids.
    #[arg(long, conflicts_with = "ids")]
    prompt: Option<String>,
    /// Reference logits (L, V) to compare with: .json ({"ids", "logits"}) or .npy.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Write the engine's logits here (.json with the ids, or .npy).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct TokenizeArgs {
    /// Text to tokenize.
    #[arg(long, conflicts_with = "file")]
    text: Option<String>,
    /// File to tokenize.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Modality prefix.
    #[arg(long, value_enum, default_value_t = ModalityArg::Text)]
    modality: ModalityArg,
    /// A BPE tokenizer.json (default: bytes).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Vocabulary size of the layout.
    #[arg(long, default_value_t = 65_536)]
    vocab_size: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(a) => info(&a),
        Command::Train(a) => train(&a),
        Command::Eval(a) => eval(&a),
        Command::Generate(a) => generate_cmd(&a),
        Command::Export(a) => export_cmd(&a),
        Command::EvalHf(a) => eval_hf(&a),
        Command::Tokenize(a) => tokenize(&a),
        Command::Bench(a) => bench_cmd(&a),
        Command::BenchTrain(a) => bench_train_cmd(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The inference engine a command runs on.
enum AnyEngine {
    Cpu(Box<CpuEngine>),
    #[cfg(feature = "cuda")]
    Gpu(Box<tritter::engine::GpuEngine>),
}

/// Runs `$body` with `$v` bound to the engine inside an [`AnyEngine`] (each arm
/// monomorphizes the generic code for its engine).
macro_rules! on_engine {
    ($engine:expr, |$v:ident| $body:expr) => {
        match &$engine {
            AnyEngine::Cpu(cpu) => {
                let $v: &CpuEngine = cpu;
                $body
            }
            #[cfg(feature = "cuda")]
            AnyEngine::Gpu(gpu) => {
                let $v: &tritter::engine::GpuEngine = gpu;
                $body
            }
        }
    };
}

impl AnyEngine {
    /// The engine for `device`: `auto` takes the GPU when this binary has CUDA, a driver and
    /// device are present and the model fits the GPU kernels (saying why not otherwise), else
    /// the CPU.
    fn new(device: DeviceArg, ckpt: InferenceCheckpoint) -> Result<Self> {
        match device {
            DeviceArg::Cpu => Ok(AnyEngine::Cpu(Box::new(CpuEngine::new(ckpt)?))),
            DeviceArg::Cuda => Self::gpu(&ckpt),
            DeviceArg::Auto => {
                if cfg!(feature = "cuda") && gpu_present() {
                    match Self::gpu(&ckpt) {
                        Ok(e) => return Ok(e),
                        Err(e) => eprintln!("GPU engine not used ({e}); running on the CPU"),
                    }
                }
                Ok(AnyEngine::Cpu(Box::new(CpuEngine::new(ckpt)?)))
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn gpu(ckpt: &InferenceCheckpoint) -> Result<Self> {
        let gpu = tritter_kernels_cuda::Gpu::new(0)?;
        Ok(AnyEngine::Gpu(Box::new(tritter::engine::GpuEngine::new(
            &gpu, ckpt,
        )?)))
    }

    #[cfg(not(feature = "cuda"))]
    fn gpu(_: &InferenceCheckpoint) -> Result<Self> {
        Err(tritter_kernels_cuda::KernelError::CudaFeatureOff.into())
    }

    fn is_gpu(&self) -> bool {
        !matches!(self, AnyEngine::Cpu(_))
    }

    fn config(&self) -> &TritterConfig {
        on_engine!(self, |e| e.config())
    }

    /// `(device name, bytes of weights on it)`.
    fn describe(&self) -> (String, usize) {
        match self {
            AnyEngine::Cpu(e) => {
                let w = e
                    .checkpoint()
                    .layers
                    .iter()
                    .flat_map(|l| l.ternary())
                    .map(|m| m.packed_bytes())
                    .sum();
                ("CPU".into(), w)
            }
            #[cfg(feature = "cuda")]
            AnyEngine::Gpu(e) => (e.gpu().info().name.clone(), e.weight_bytes()),
        }
    }

    /// The launch settings a GPU bench figure depends on (PDL, small-kernel PDL), for the
    /// report header; empty on the CPU.
    fn launch_notes(&self) -> String {
        match self {
            AnyEngine::Cpu(_) => String::new(),
            #[cfg(feature = "cuda")]
            AnyEngine::Gpu(e) => {
                let on = |b: bool| if b { "on" } else { "off" };
                format!(
                    ", PDL {} (small kernels {})",
                    on(tritter_kernels_cuda::pdl_enabled()),
                    on(e.small_kernel_pdl())
                )
            }
        }
    }

    /// Device memory in use (total - free), for the GPU engine.
    fn memory_in_use(&self) -> Option<u64> {
        match self {
            AnyEngine::Cpu(_) => None,
            #[cfg(feature = "cuda")]
            AnyEngine::Gpu(e) => e
                .gpu()
                .context()
                .mem_get_info()
                .ok()
                .map(|(free, total)| (total - free) as u64),
        }
    }
}

#[cfg(feature = "cuda")]
fn gpu_present() -> bool {
    tritter_kernels_cuda::driver_available()
}

#[cfg(not(feature = "cuda"))]
fn gpu_present() -> bool {
    false
}

/// `tritter bench`: [`bench_engine`] at every batch size, one table.
fn bench_cmd(a: &BenchArgs) -> Result<()> {
    let load = Instant::now();
    let (ckpt, source) = match &a.checkpoint {
        Some(p) => (InferenceCheckpoint::open(p)?, p.display().to_string()),
        None => {
            let mut cfg = load_config(&a.preset, None)?;
            if let Some(l) = a.layers {
                cfg.num_layers = l;
            }
            let what = match a.layers {
                Some(l) => format!("preset {} with {l} layers, random weights", a.preset),
                None => format!("preset {}, random weights", a.preset),
            };
            (InferenceCheckpoint::random(&cfg, a.seed)?, what)
        }
    };
    let engine = AnyEngine::new(a.device, ckpt)?;
    let cfg = engine.config().clone();
    let (device, weight_bytes) = engine.describe();
    let max_b = a.batch.iter().copied().max().unwrap_or(1);
    let mut options = KvCacheOptions::for_config(&cfg);
    options.format = a.kv_cache.format(options.format);
    if engine.is_gpu() && options.format == KvCacheFormat::F32 {
        options.format = KvCacheFormat::F16;
    }
    options.max_sequences = max_b;
    options.max_prefill_chunk = a.prompt_len.max(1);
    if options.format != KvCacheFormat::F32 {
        let per_seq = a.prompt_len + a.decode_steps + 2 * options.page_size + 16;
        options.pool_tokens = Some(a.pool_tokens.unwrap_or(max_b * per_seq));
    }
    eprintln!(
        "bench: {source} on {device}{}: {:.3}B parameters, {} layers, {:.3} GB of weights, KV cache {:?}{}, loaded in {:.1} s",
        engine.launch_notes(),
        cfg.param_count() as f64 / 1e9,
        cfg.num_layers,
        weight_bytes as f64 / 1e9,
        options.format,
        options.pool_tokens.map_or(String::new(), |t| format!(" (pool of {t} tokens)")),
        load.elapsed().as_secs_f64()
    );
    println!(
        "| batch | prompt | prefill tok/s | decode step | decode tok/s | peak device memory |"
    );
    println!("|---|---|---|---|---|---|");
    for &b in &a.batch {
        let r = on_engine!(&engine, |e| bench_engine(
            e,
            &options,
            b,
            a.prompt_len,
            a.decode_steps,
            a.seed,
            || engine.memory_in_use()
        ))?;
        println!(
            "| {} | {} | {:.0} | {:.3} ms | {:.1} | {} |",
            r.batch,
            r.prompt_len,
            r.prefill_tokens_per_s,
            r.decode_step_s * 1e3,
            r.decode_tokens_per_s,
            r.peak_memory_bytes
                .map_or("-".into(), |m| format!("{:.2} GB", m as f64 / 1e9))
        );
        println!(
            "RESULT bench device={device:?} batch={} prompt={} prefill_tok_s={:.1} decode_step_ms={:.4} decode_tok_s={:.2} peak_bytes={}",
            r.batch,
            r.prompt_len,
            r.prefill_tokens_per_s,
            r.decode_step_s * 1e3,
            r.decode_tokens_per_s,
            r.peak_memory_bytes.unwrap_or(0)
        );
        #[cfg(feature = "cuda")]
        if let (true, AnyEngine::Gpu(e)) = (a.profile, &engine) {
            profile_decode(e, &options, b, a)?;
        }
    }
    Ok(())
}

/// `--device cuda`: the trainer's state onto the GPU engine; in a data-parallel group
/// (`dist`) onto GPU `LOCAL_RANK` as one rank of it.
fn move_to_gpu(
    trainer: &mut Trainer,
    dist: Option<&DistEnv>,
    zero1: bool,
    stop_after: Option<u64>,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let gpu = tritter_kernels_cuda::Gpu::new(dist.map_or(0, |e| e.local_rank))?;
        match dist {
            Some(env) => {
                // Ranks must also agree on where the run stops (one leaving early would look
                // like a failure to the others).
                let fp = trainer.fingerprint() ^ stop_after.unwrap_or(u64::MAX).rotate_left(17);
                let dp = tritter::train::DataParallel::connect(&gpu, env, fp, zero1)?;
                trainer.use_gpu_data_parallel(&gpu, dp)?;
                if env.rank == 0 {
                    println!(
                        "training on {} x {} (GPU engine, data parallel over NCCL{})",
                        env.world_size,
                        gpu.info().name,
                        if zero1 { ", ZeRO-1" } else { "" }
                    );
                }
            }
            None => {
                trainer.use_gpu(&gpu)?;
                println!("training on {} (GPU engine)", gpu.info().name);
            }
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (trainer, dist, zero1, stop_after);
        Err(tritter_kernels_cuda::KernelError::CudaFeatureOff.into())
    }
}

/// `tritter bench-train`: the GPU training engine's speed on random batches.
fn bench_train_cmd(a: &BenchTrainArgs) -> Result<()> {
    let cfg = load_config(&a.preset, a.config.as_deref())?;
    let dist = match a.parallel.join(true) {
        Ok(d) => d,
        Err(launched) => return launched,
    };
    #[cfg(feature = "cuda")]
    {
        let gpu = tritter_kernels_cuda::Gpu::new(dist.as_ref().map_or(0, |e| e.local_rank))?;
        let dp = match &dist {
            Some(env) => {
                let fp = tritter::train::dist::fingerprint(format!("{a:?}").as_bytes());
                Some(tritter::train::DataParallel::connect(
                    &gpu,
                    env,
                    fp,
                    a.parallel.zero1,
                )?)
            }
            None => None,
        };
        let lead = dist.as_ref().is_none_or(|e| e.rank == 0);
        if lead {
            eprintln!(
                "bench-train: {} ({:.3}B parameters) on {}, micro-batch {} x {}, recompute {}",
                a.config
                    .as_ref()
                    .map_or(a.preset.clone(), |p| p.display().to_string()),
                cfg.param_count() as f64 / 1e9,
                gpu.info().name,
                a.batch,
                a.seq_len,
                a.recompute
            );
        }
        let r = tritter::train::bench_train(
            &gpu,
            &cfg,
            a.batch,
            a.seq_len,
            a.recompute,
            a.warmup,
            a.steps,
            a.peak_tflops,
            a.profile,
            a.linear.map(LinearArg::path),
            dp,
        )?;
        if !lead {
            return Ok(());
        }
        println!(
            "RESULT impl=tritter-gpu preset={} gpus={}{} batch={} seq={} recompute={} linear={:?} tokens_per_s={:.0} mfu={} peak_gb={:.2} step_ms={:.1} params={} loss={:.3}",
            a.preset,
            r.gpus,
            if a.parallel.zero1 { " zero1" } else { "" },
            a.batch,
            a.seq_len,
            a.recompute,
            r.linear,
            r.tokens_per_s,
            r.mfu.map_or("n/a".into(), |m| format!("{m:.3}")),
            r.device_bytes as f64 / 1e9,
            r.step_ms,
            r.params,
            r.loss
        );
        if !r.profile.is_empty() {
            let total: f64 = r.profile.iter().map(|p| p.1).sum();
            println!("profile (ms per step, {total:.1} ms in all):");
            for (phase, ms) in &r.profile {
                println!("  {phase:<40} {ms:>9.2} ms  {:>5.1}%", 100.0 * ms / total);
            }
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (cfg, dist);
        Err(tritter_kernels_cuda::KernelError::CudaFeatureOff.into())
    }
}

/// `tritter bench --profile`: `b` sequences prefilled with `prompt_len` tokens, then
/// `decode_steps` decode steps with every phase timed by CUDA events; prints ms per step.
#[cfg(feature = "cuda")]
fn profile_decode(
    e: &tritter::engine::GpuEngine,
    options: &KvCacheOptions,
    b: usize,
    a: &BenchArgs,
) -> Result<()> {
    use tritter::engine::{EngineCache, LogitsFor, StepInput};
    let cfg = e.config();
    let mut cache = e.new_cache(options)?;
    let seqs: Vec<_> = (0..b).map(|_| cache.add_sequence()).collect();
    let prompt: Vec<u32> = (0..a.prompt_len)
        .map(|i| 8 + (i as u32 * 7919) % (cfg.vocab_size as u32 - 8))
        .collect();
    let step = |cache: &mut tritter::engine::GpuCache, toks: &[u32]| {
        let inputs: Vec<StepInput<'_>> = seqs
            .iter()
            .map(|&seq| StepInput {
                seq,
                tokens: toks,
                logits: LogitsFor::Last,
            })
            .collect();
        e.step(cache, &inputs)
    };
    step(&mut cache, &prompt)?;
    let _ = e.take_profile();
    e.set_profiling(true);
    let res = (0..a.decode_steps).try_for_each(|i| step(&mut cache, &[8 + i as u32]).map(|_| ()));
    e.set_profiling(false);
    res?;
    let prof = e.take_profile();
    let steps = prof
        .iter()
        .find(|p| p.0 == "steps")
        .map_or(1, |p| p.2.max(1)) as f64;
    let total: f64 = prof.iter().map(|p| p.1).sum();
    println!("decode step profile, batch {b} (CUDA events, graphs off, {steps} steps):");
    for (phase, ms, _) in prof.iter().filter(|p| p.0 != "steps") {
        println!(
            "  {phase:<24} {:>8.3} ms/step  {:>5.1}%",
            ms / steps,
            100.0 * ms / total.max(1e-12)
        );
    }
    println!("  {:<24} {:>8.3} ms/step", "total", total / steps);
    for s in seqs {
        cache.free(s)?;
    }
    Ok(())
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

fn info(a: &InfoArgs) -> Result<()> {
    if a.train {
        let cfg = TritterConfig::preset(a.preset.as_deref().unwrap_or("test"))?;
        tritter::train::check_trainable(&cfg)?;
        print!(
            "{}",
            tritter::train::TrainPlan::new(&cfg, a.batch, a.seq_len, a.recompute)?
                .with_linear_path(&cfg, a.linear.path())
                .with_data_parallel(a.gpus.max(1), a.zero1)
        );
        return Ok(());
    }
    if let Some(name) = &a.preset {
        let cfg = TritterConfig::preset(name)?;
        print!("{}", MemoryEstimate::new(&cfg, a.context, a.batch)?);
        return Ok(());
    }
    println!(
        "Presets (memory at context {} tokens, batch {}; GB = 1e9 bytes)",
        a.context, a.batch
    );
    println!(
        "{:<6} {:>6} {:>6} {:>8} {:>10} {:>12} {:>12} {:>11} {:>11} {:>10}",
        "preset",
        "hidden",
        "layers",
        "heads/kv",
        "params",
        "ternary GB",
        "bf16 GB",
        "INT4 KV GB",
        "fp16 KV GB",
        "total GB"
    );
    for name in ["test", "100m", "500m", "1b", "3b", "7b"] {
        let cfg = TritterConfig::preset(name)?;
        let context = a.context.min(cfg.max_position_embeddings);
        let m = MemoryEstimate::new(&cfg, context, a.batch)?;
        println!(
            "{:<6} {:>6} {:>6} {:>8} {:>9.1}M {:>12.3} {:>12.3} {:>11.3} {:>11.3} {:>10.3}",
            name,
            cfg.hidden_size,
            cfg.num_layers,
            format!("{}/{}", cfg.num_heads, cfg.num_kv_heads),
            cfg.param_count() as f64 / 1e6,
            gb(m.ternary_weight_bytes()),
            gb(cfg.param_count() * 2),
            gb(m.kv_bytes(tritter::KvFormat::Int4, false)),
            gb(m.kv_bytes(tritter::KvFormat::Fp16, false)),
            gb(m.inference_total_bytes()),
        );
    }
    println!("(test preset capped at its max_position_embeddings; `tritter info --preset 7b` prints the full breakdown)");
    Ok(())
}

/// The model config of `preset`/`config`.
fn load_config(preset: &str, config: Option<&Path>) -> Result<TritterConfig> {
    match config {
        Some(p) => TritterConfig::load(p),
        None => TritterConfig::preset(preset),
    }
}

fn make_tokenizer(vocab_size: usize, bpe: Option<&Path>) -> Result<MultimodalTokenizer> {
    let layout = VocabLayout::new(vocab_size)?;
    let tok = MultimodalTokenizer::new(layout.clone());
    Ok(match bpe {
        Some(p) => tok.with_bpe(BpeVocab::load(p, &layout)?)?,
        None => tok,
    })
}

/// (train, validation) documents of `--data`, or the built-in corpus.
fn documents(d: &DataArgs, seed: u64) -> Result<(Vec<Document>, Vec<Document>, String)> {
    match &d.data {
        None => {
            let (train, val) = corpus::builtin_documents();
            let desc = format!(
                "built-in corpus: {} files, {:.0} KiB ({} train / {} validation files)",
                train.len() + val.len(),
                corpus::total_bytes() as f64 / 1024.0,
                train.len(),
                val.len()
            );
            Ok((train, val, desc))
        }
        Some(path) => {
            let options = SourceOptions {
                text_field: d.text_field.clone(),
                malformed: match d.malformed {
                    Malformed::Skip => MalformedPolicy::Skip,
                    Malformed::Fail => MalformedPolicy::Fail,
                },
                record_modality: d.modality.into(),
            };
            let (docs, report) = load_documents(path, &options)?;
            let desc = format!(
                "{}: {} files, {} documents, {} malformed records skipped, {} other files skipped",
                path.display(),
                report.files,
                report.documents,
                report.malformed,
                report.skipped
            );
            let (train, val) = split_documents(docs, d.val_fraction, seed)?;
            Ok((train, val, desc))
        }
    }
}

fn pack(
    docs: &[Document],
    tok: &MultimodalTokenizer,
    seq_len: usize,
    what: &str,
) -> Result<Option<PackedDataset>> {
    if docs.is_empty() {
        return Ok(None);
    }
    match PackedDataset::from_documents(docs, tok, seq_len) {
        Ok(d) => Ok(Some(d)),
        Err(TritterError::EmptyDataset { detail, .. }) => Err(TritterError::EmptyDataset {
            what: what.into(),
            detail,
        }),
        Err(e) => Err(e),
    }
}

struct Bar {
    bar: ProgressBar,
    quiet: bool,
}

impl Progress for Bar {
    fn on_step(&mut self, m: &StepMetrics, until: u64) {
        self.bar.set_length(until);
        self.bar.set_position(m.step);
        self.bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            m.loss,
            m.lr,
            m.tokens as f64 / m.seconds.max(1e-9)
        ));
    }
    fn on_eval(&mut self, step: u64, v: &EvalMetrics) {
        let line = format!(
            "step {step:>6}: val loss {:.4} (ppl {:.2}, {} tokens)",
            v.loss, v.perplexity, v.tokens
        );
        if self.quiet {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

fn train(a: &TrainArgs) -> Result<()> {
    let dev_name = a.device.to_ascii_lowercase();
    let on_gpu = dev_name == "gpu" || dev_name.starts_with("cuda");
    let dist = match a.parallel.join(on_gpu) {
        Ok(d) => d,
        Err(launched) => return launched,
    };
    // Rank 0 of a data-parallel group (or a lone process) prints, evaluates and samples.
    let lead = dist.as_ref().is_none_or(|e| e.rank == 0);
    // The GPU engine keeps its host copy (checkpoints, evaluation, sampling) on the CPU.
    let device = if on_gpu {
        candle_core::Device::Cpu
    } else {
        device_from_name(&a.device)?
    };
    let resume_dir = a.resume.as_deref().map(latest_checkpoint).transpose()?;
    let mut config = match &resume_dir {
        Some(dir) => TritterConfig::load(dir.join(tritter::checkpoint::CONFIG_FILE))?,
        None => load_config(&a.preset, a.config.as_deref())?,
    };
    if a.gradient_checkpointing {
        config.gradient_checkpointing = true;
    }
    let state = resume_dir.as_deref().map(TrainerState::load).transpose()?;
    let options = match &state {
        Some(s) => s.options.clone(),
        None => {
            let mut o = TrainOptions {
                steps: a.steps,
                batch_size: a.batch_size,
                seq_len: a.seq_len,
                grad_accum: a.grad_accum,
                lr: a.lr,
                min_lr_ratio: a.min_lr_ratio,
                warmup_steps: a.warmup,
                grad_clip: a.grad_clip,
                eval_every: a.eval_every,
                eval_batches: a.eval_batches,
                checkpoint_every: a.checkpoint_every,
                seed: a.seed,
                document_mask: !a.no_document_mask,
                objective: objective(a)?,
                ..TrainOptions::default()
            };
            o.adamw.weight_decay = a.weight_decay;
            o
        }
    };
    options.validate(&config)?;
    if let Some(task) = &a.task {
        if on_gpu {
            return Err(TritterError::DeviceUnavailable {
                device: a.device.clone(),
                detail:
                    "the reasoning-task curriculum (--task) trains on the CPU; drop --device cuda"
                        .into(),
            });
        }
        return train_task(a, task.parse()?, &config, options, &device);
    }
    let tok = make_tokenizer(config.vocab_size, a.data.tokenizer.as_deref())?;
    let (train_docs, val_docs, desc) = documents(&a.data, options.seed)?;
    if lead {
        println!("data: {desc}");
    }
    let train_set =
        pack(&train_docs, &tok, options.seq_len, "training split")?.ok_or_else(|| {
            TritterError::EmptyDataset {
                what: "training split".into(),
                detail: "no documents".into(),
            }
        })?;
    let val_set = pack(&val_docs, &tok, options.seq_len, "validation split")?;
    if lead {
        println!(
        "packed: {} train sequences of {} tokens ({} tokens, unigram entropy {:.3} nats), {} validation sequences",
        train_set.len(),
        options.seq_len,
        train_set.num_tokens(),
        train_set.unigram_entropy(),
        val_set.as_ref().map_or(0, PackedDataset::len)
        );
    }
    let mut trainer = match &resume_dir {
        Some(dir) => {
            let steps = (a.steps != TrainOptions::default().steps).then_some(a.steps);
            let t = Trainer::resume(dir, &config, train_set, val_set, steps, &device)?;
            if lead {
                println!("resumed from {} at step {}", dir.display(), t.step());
            }
            t
        }
        None => Trainer::new(&config, options, train_set, val_set, &device)?,
    };
    if on_gpu {
        move_to_gpu(&mut trainer, dist.as_ref(), a.parallel.zero1, a.stop_after)?;
    }
    let out = a
        .out
        .clone()
        .or_else(|| {
            resume_dir
                .as_ref()
                .and_then(|d| d.parent()?.parent().map(Path::to_path_buf))
        })
        .unwrap_or_else(|| PathBuf::from("runs").join(&a.preset));
    if resume_dir.is_none() && lead {
        // A fresh run starts a fresh metrics log.
        let _ = std::fs::remove_file(out.join("metrics.jsonl"));
    }
    let world = trainer.world_size();
    if lead {
        println!(
            "model: {:.3}M parameters ({}), {} steps x {} x {}{} x {} tokens, lr {:.1e}, run dir {}",
            config.param_count() as f64 / 1e6,
            a.config
                .as_ref()
                .map_or(a.preset.clone(), |p| p.display().to_string()),
            trainer.options().steps,
            trainer.options().grad_accum,
            trainer.options().batch_size,
            if world > 1 {
                format!(" x {world} GPUs")
            } else {
                String::new()
            },
            trainer.options().seq_len,
            trainer.options().lr,
            out.display()
        );
    }
    let bar = if a.quiet || !lead {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(trainer.options().steps);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed_precise}, ETA {eta}]",
            )
            .expect("a valid template"),
        );
        b
    };
    let mut progress = Bar {
        bar,
        quiet: a.quiet || !lead,
    };
    let until = a.stop_after.unwrap_or(u64::MAX);
    let summary = trainer.run(until, Some(&out), &mut progress)?;
    trainer.finish_data_parallel()?;
    progress.bar.finish_and_clear();
    if !lead {
        return Ok(());
    }
    let tokens: usize = summary.steps as usize
        * world
        * trainer.options().batch_size
        * trainer.options().grad_accum
        * trainer.options().seq_len;
    println!(
        "trained {} steps in {:.1} s ({:.0} tokens/s)",
        summary.steps,
        summary.seconds,
        tokens as f64 / summary.seconds.max(1e-9)
    );
    if let (Some(b), Some(e)) = (summary.val_before, summary.val_after) {
        println!(
            "validation loss: {:.4} -> {:.4} nats/token (perplexity {:.2} -> {:.2})",
            b.loss, e.loss, b.perplexity, e.perplexity
        );
    }
    if let Some(c) = &summary.last_checkpoint {
        println!("checkpoint: {}", c.display());
    }
    if a.sample_tokens > 0 {
        let prompt = "pub fn ";
        let mut ids = tok.encode_code(prompt)?;
        let new = generate(
            trainer.model(),
            &ids,
            &SamplingOptions {
                max_new_tokens: a.sample_tokens,
                temperature: 0.7,
                vocab_limit: Some(sample_limit(&tok)),
                text_only: true,
                ..SamplingOptions::default()
            },
        )?;
        ids.extend(new);
        println!(
            "sample (prompt {prompt:?}, temperature 0.7, top-k 40):\n{}",
            render(&tok, &ids)?
        );
    }
    Ok(())
}

/// `tritter train --task`: the Coconut curriculum on generated reasoning examples; saves
/// the final model to `<out>/model` and prints its held-out task accuracy.
fn train_task(
    a: &TrainArgs,
    kind: TaskKind,
    config: &TritterConfig,
    options: TrainOptions,
    device: &candle_core::Device,
) -> Result<()> {
    if let Some(r) = &a.resume {
        return Err(TritterError::InvalidTrainOption {
            field: "--resume",
            actual: r.display().to_string(),
            expected: "no --resume with --task (a reasoning run saves its final model only)".into(),
        });
    }
    let examples = kind.generate(a.task_examples, options.seed, a.difficulty)?;
    let stages = a.latent_stages as u64 + 1;
    let curriculum = Curriculum {
        thoughts_per_step: a.thoughts_per_step,
        steps_per_stage: a.stage_steps.unwrap_or(options.steps.div_ceil(stages)),
        max_stage: a.latent_stages,
    };
    let steps = options.steps.min(a.stop_after.unwrap_or(u64::MAX));
    let mut trainer = ReasoningTrainer::new(config, options, curriculum, examples, device)?;
    let run = if a.latent_stages > 0 { "latent" } else { "cot" };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("{kind}-{run}")));
    println!(
        "task {kind} (difficulty {}): {} examples, curriculum stages 0..={} x {} steps, {} thought(s) per step; model {:.3}M parameters, {steps} steps x {} sequences, lr {:.1e}",
        a.difficulty,
        a.task_examples,
        curriculum.max_stage,
        curriculum.steps_per_stage,
        curriculum.thoughts_per_step,
        config.param_count() as f64 / 1e6,
        trainer.options().batch_size,
        trainer.options().lr,
    );
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(steps)
    };
    let start = std::time::Instant::now();
    for _ in 0..steps {
        let m = trainer.train_step()?;
        bar.inc(1);
        bar.set_message(format!("stage {} loss {:.3}", m.stage, m.metrics.loss));
        if m.metrics.step % 100 == 0 || m.metrics.step == steps {
            bar.suspend(|| {
                println!(
                    "step {:>5} stage {} loss {:.4} (ce {:.4}{})",
                    m.metrics.step,
                    m.stage,
                    m.metrics.loss,
                    m.metrics.ce_loss,
                    m.metrics
                        .embedding_loss
                        .map_or(String::new(), |e| format!(", embedding {e:.4}"))
                )
            });
        }
    }
    bar.finish_and_clear();
    println!(
        "trained {steps} steps in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let dir = out.join("model");
    trainer.model().save(&dir)?;
    println!("model: {}", dir.display());
    let held_out = kind.generate(100, HELD_OUT_SEED, a.difficulty)?;
    let mode = if a.latent_stages > 0 {
        EvalMode::Latent
    } else {
        EvalMode::Token
    };
    let report = evaluate_task(
        trainer.model(),
        kind,
        &held_out,
        &EvalOptions {
            mode,
            thoughts_per_step: a.thoughts_per_step,
            ..EvalOptions::default()
        },
        trainer.options().batch_size,
    )?;
    print_report(&report);
    Ok(())
}

/// One line of an evaluation report.
fn print_report(r: &EvalReport) {
    let task = r
        .task
        .map_or(String::new(), |t| format!(", task accuracy {t}"));
    let fallbacks = if r.mode == EvalMode::Embedding {
        format!(", fell back to logits {}", r.fallbacks)
    } else {
        String::new()
    };
    println!(
        "mode {:<9} next-token accuracy {}{task}{fallbacks}",
        r.mode, r.next_token
    );
}

/// The training objective of the `--embedding-loss`, `--embedding-weight`, `--ce-weight`
/// and `--transition-*` flags (validated with the other options).
fn objective(a: &TrainArgs) -> Result<Objective> {
    let embedding = match (a.embedding_loss, a.embedding_weight) {
        (Some(kind), w) => Some(EmbeddingObjective {
            kind: kind.into(),
            weight: w.unwrap_or(1.0),
        }),
        (None, Some(w)) => {
            return Err(TritterError::InvalidTrainOption {
                field: "--embedding-weight",
                actual: w.to_string(),
                expected: "expected it together with --embedding-loss mse|cosine".into(),
            })
        }
        (None, None) => None,
    };
    Ok(Objective {
        ce_weight: a.ce_weight,
        embedding,
        transition_start: a.transition_start,
        transition_steps: a.transition_steps,
    })
}

/// One past the largest id `tok` can decode as text: the BPE range's end with a BPE
/// vocabulary, the byte range's end without.
fn sample_limit(tok: &MultimodalTokenizer) -> u32 {
    match tok.bpe() {
        Some(b) => b.bpe_end(),
        None => tok.layout().byte_range().end,
    }
}

/// Human-readable text of `ids` (text/code segments as lossy UTF-8, specials by name).
fn render(tok: &MultimodalTokenizer, ids: &[u32]) -> Result<String> {
    let mut s = String::new();
    for seg in tok.decode(ids)? {
        match seg {
            Segment::Text(b) | Segment::Code(b) => s.push_str(&String::from_utf8_lossy(&b)),
            Segment::Special(t) => s.push_str(t.as_str()),
            Segment::Latent(m) => s.push_str(m.as_str()),
            Segment::Image(_) => s.push_str("<image segment>"),
            Segment::Audio { .. } => s.push_str("<audio segment>"),
        }
    }
    Ok(s)
}

/// The model checkpoint directory and, for training checkpoints, their state.
fn open_checkpoint(path: &Path) -> Result<(TritterModel, Option<TrainerState>)> {
    let dir = model_checkpoint_dir(path)?;
    let model = TritterModel::load(&dir, &candle_core::Device::Cpu)?;
    let state = dir
        .join(tritter::train::TRAINER_STATE_FILE)
        .is_file()
        .then(|| TrainerState::load(&dir))
        .transpose()?;
    Ok((model, state))
}

fn eval(a: &EvalArgs) -> Result<()> {
    let modes = eval_modes(&a.mode, a.task.is_some())?;
    let (model, state) = open_checkpoint(&a.checkpoint)?;
    if let Some(task) = &a.task {
        return eval_task(a, &model, task.parse()?, &modes);
    }
    let seq_len = a
        .seq_len
        .or(state.as_ref().map(|s| s.options.seq_len))
        .unwrap_or(TrainOptions::default().seq_len);
    let seed = state.as_ref().map_or(0, |s| s.options.seed);
    let doc_mask = state.as_ref().is_none_or(|s| s.options.document_mask);
    let tok = make_tokenizer(model.config().vocab_size, a.data.tokenizer.as_deref())?;
    let (_, val_docs, desc) = documents(&a.data, seed)?;
    let docs = if a.data.data.is_some() && a.data.val_fraction == 0.0 {
        documents(&a.data, seed)?.0
    } else {
        val_docs
    };
    println!("data: {desc} (evaluating the validation split)");
    let set = pack(&docs, &tok, seq_len, "evaluation data")?.ok_or_else(|| TritterError::EmptyDataset {
        what: "evaluation data".into(),
        detail: "the validation split has no documents; pass --val-fraction 0 to evaluate all of --data".into(),
    })?;
    match evaluate(&model, &set, a.batch_size, a.max_batches, doc_mask)? {
        Some(m) => println!(
            "loss {:.4} nats/token, perplexity {:.2}, {} tokens",
            m.loss, m.perplexity, m.tokens
        ),
        None => println!("no targets to evaluate"),
    }
    for mode in modes.into_iter().filter(|&m| m != EvalMode::Latent) {
        let options = EvalOptions {
            mode,
            rounder_threshold: a.rounder_threshold,
            ..EvalOptions::default()
        };
        let report = evaluate_corpus(
            &model,
            &set,
            &options,
            a.batch_size,
            a.max_batches,
            doc_mask,
        )?;
        print_report(&report);
    }
    Ok(())
}

/// The modes of `--mode` (`all`: every mode that applies, latent only with a task).
fn eval_modes(mode: &str, task: bool) -> Result<Vec<EvalMode>> {
    if mode.eq_ignore_ascii_case("all") {
        return Ok(EvalMode::ALL
            .into_iter()
            .filter(|&m| task || m != EvalMode::Latent)
            .collect());
    }
    let m: EvalMode = mode.parse()?;
    if m == EvalMode::Latent && !task {
        return Err(TritterError::InvalidTrainOption {
            field: "--mode",
            actual: "latent".into(),
            expected: "--task arith|reach with --mode latent (free text has no reasoning steps to think through)".into(),
        });
    }
    Ok(vec![m])
}

/// `tritter eval --task`: next-token and task accuracy on held-out generated examples.
fn eval_task(a: &EvalArgs, model: &TritterModel, kind: TaskKind, modes: &[EvalMode]) -> Result<()> {
    let examples = kind.generate(a.examples, a.task_seed, a.difficulty)?;
    println!(
        "task {kind} (difficulty {}): {} held-out examples (seed {})",
        a.difficulty, a.examples, a.task_seed
    );
    for &mode in modes {
        let options = EvalOptions {
            mode,
            thoughts_per_step: a.thoughts_per_step,
            rounder_threshold: a.rounder_threshold,
            ..EvalOptions::default()
        };
        print_report(&evaluate_task(
            model,
            kind,
            &examples,
            &options,
            a.batch_size,
        )?);
    }
    Ok(())
}

fn generate_cmd(a: &GenerateArgs) -> Result<()> {
    if let Some(dir) = &a.hf {
        return generate_hf(a, dir);
    }
    let checkpoint = a
        .checkpoint
        .as_deref()
        .ok_or_else(|| option_err("--checkpoint", "absent", "--checkpoint <dir> or --hf <dir>"))?;
    if a.reference || a.latent_steps > 0 {
        return generate_reference(a, checkpoint);
    }
    let load = Instant::now();
    let engine = AnyEngine::new(a.device, InferenceCheckpoint::open(checkpoint)?)?;
    let tok = make_tokenizer(engine.config().vocab_size, a.tokenizer.as_deref())?;
    let prompts = encode_prompts(a, &tok)?;
    let stop_sequences = encode_stops(a, &tok)?;
    let options = SamplingOptions {
        max_new_tokens: a.max_tokens,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        stop_tokens: &a.stop_token,
        stop_sequences: &stop_sequences,
        ..sampling_options(a, &tok)
    };
    let codec = Codec::Tritter(tok);
    run_generation(a, &engine, &codec, &prompts, &options, checkpoint, load)
}

/// `tritter generate --hf`: a Hugging Face BitNet checkpoint with its own tokenizer and
/// stop ids, on the engine.
fn generate_hf(a: &GenerateArgs, dir: &Path) -> Result<()> {
    if a.reference || a.latent_steps > 0 {
        return Err(option_err(
            "--reference / --latent-steps",
            "given with --hf",
            "neither: they run the candle Tritter model, an imported model runs on the engine only",
        ));
    }
    if a.tokenizer.is_some() {
        return Err(option_err(
            "--tokenizer",
            "given with --hf",
            "no --tokenizer: an imported model uses the tokenizer.json of its directory",
        ));
    }
    let load = Instant::now();
    let hf = HfBitnet::open(dir)?;
    let prompts: Vec<Vec<u32>> = if !a.prompt_ids.is_empty() {
        vec![a.prompt_ids.clone()]
    } else {
        let tok = hf_tokenizer(&hf, dir, "--prompt")?;
        let texts = if a.prompts.is_empty() {
            vec![String::new()]
        } else {
            a.prompts.clone()
        };
        texts
            .iter()
            .map(|p| tok.encode(p, true))
            .collect::<Result<_>>()?
    };
    let stop_sequences = if a.stop.is_empty() {
        Vec::new()
    } else {
        let tok = hf_tokenizer(&hf, dir, "--stop")?;
        a.stop
            .iter()
            .map(|s| tok.encode(s, false))
            .collect::<Result<Vec<_>>>()?
    };
    let mut stop_tokens = hf.stop_token_ids.clone();
    stop_tokens.extend(&a.stop_token);
    let options = SamplingOptions {
        max_new_tokens: a.max_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        seed: a.seed,
        // The model's own eos ids stop it (stop_tokens); Tritter's <eos> id means nothing here.
        stop_at_eos: false,
        vocab_limit: None,
        text_only: false,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        stop_tokens: &stop_tokens,
        stop_sequences: &stop_sequences,
        ..SamplingOptions::default()
    };
    let codec = Codec::Hf(hf.tokenizer);
    let engine = AnyEngine::new(a.device, hf.checkpoint)?;
    run_generation(a, &engine, &codec, &prompts, &options, dir, load)
}

/// The tokenizer of an imported model, or an error naming the flag that needs it.
fn hf_tokenizer<'a>(hf: &'a HfBitnet, dir: &Path, flag: &'static str) -> Result<&'a HfTokenizer> {
    hf.tokenizer.as_ref().ok_or_else(|| {
        option_err(
            flag,
            format!("text, but {} has no tokenizer.json", dir.display()),
            "--prompt-ids / --stop-token with token ids, or a tokenizer.json in the model directory",
        )
    })
}

/// How generated ids become text: Tritter's multimodal tokenizer, an imported model's
/// tokenizer.json, or the ids themselves.
enum Codec {
    Tritter(MultimodalTokenizer),
    Hf(Option<HfTokenizer>),
}

impl Codec {
    fn render(&self, ids: &[u32]) -> Result<String> {
        match self {
            Codec::Tritter(tok) => render(tok, ids),
            Codec::Hf(Some(tok)) => tok.decode(ids, false),
            Codec::Hf(None) => Ok(ids.iter().map(|i| format!("{i} ")).collect()),
        }
    }
}

/// Where an engine's weights came from, when loading began, and whether it is the GPU engine.
#[derive(Clone, Copy)]
struct Loaded<'a> {
    source: &'a Path,
    load: Instant,
    gpu: bool,
}

/// Runs the engine on `prompts` (one streamed to stdout, several batched) and prints the
/// timings to stderr.
fn run_generation(
    a: &GenerateArgs,
    engine: &AnyEngine,
    codec: &Codec,
    prompts: &[Vec<u32>],
    options: &SamplingOptions<'_>,
    source: &Path,
    load: Instant,
) -> Result<()> {
    let gpu = engine.is_gpu();
    on_engine!(engine, |e| generate_on(
        a,
        e,
        codec,
        prompts,
        options,
        Loaded { source, load, gpu }
    ))
}

/// [`run_generation`] on one engine.
fn generate_on<E: Engine>(
    a: &GenerateArgs,
    engine: &E,
    codec: &Codec,
    prompts: &[Vec<u32>],
    options: &SamplingOptions<'_>,
    loaded: Loaded<'_>,
) -> Result<()> {
    let Loaded { source, load, gpu } = loaded;
    let cfg = engine.config().clone();
    let options = *options;
    let mut cache = KvCacheOptions::for_config(&cfg);
    cache.max_sequences = a.batch.max(1);
    cache.format = a.kv_cache.format(cache.format);
    if gpu {
        // The GPU engine runs a new sequence's whole prompt in one round (flash attention);
        // its cache is paged (f16 where the CPU default would be f32).
        cache.max_prefill_chunk = prompts.iter().map(Vec::len).max().unwrap_or(1).max(1);
        if cache.format == KvCacheFormat::F32 {
            cache.format = KvCacheFormat::F16;
        }
    }
    if cfg.sliding_window.is_none() && cache.format != KvCacheFormat::F32 {
        // Without a window the default pool holds max_position_embeddings tokens per
        // sequence; these requests need at most their prompt plus max_tokens.
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + a.max_tokens;
        let per_seq = longest.min(cfg.max_position_embeddings) + 2 * cache.page_size;
        cache.pool_tokens = Some(cache.max_sequences.min(prompts.len()) * per_seq);
    }
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    eprintln!(
        "{} engine: {} ({:.3}M parameters, {} layers), KV cache {:?}, loaded in {:.2} s",
        if gpu { "GPU" } else { "CPU" },
        source.display(),
        cfg.param_count() as f64 / 1e6,
        cfg.num_layers,
        cache.format,
        load.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    let (generated, first) = if let [prompt] = prompts {
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "{}", codec.render(prompt)?);
        let _ = out.flush();
        let mut printer = StreamPrinter::default();
        let mut first = None;
        let g = generate_stream(engine, prompt, &options, &cache, |t| {
            first.get_or_insert_with(|| start.elapsed().as_secs_f64());
            printer.push(codec, t, &mut out);
            ControlFlow::Continue(())
        })?;
        printer.finish(codec, &mut out);
        let _ = writeln!(out);
        eprintln!("[finished: {:?}]", g.finish);
        (g.tokens.len(), first)
    } else {
        let requests: Vec<GenerationRequest<'_>> = prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| GenerationRequest {
                prompt,
                options: SamplingOptions {
                    seed: a.seed.wrapping_add(i as u64),
                    ..options
                },
            })
            .collect();
        let gens = generate_batch(engine, &requests, &cache, |_| ControlFlow::Continue(()))?;
        for (i, (prompt, g)) in prompts.iter().zip(&gens).enumerate() {
            println!("--- prompt {i} ({:?}) ---", g.finish);
            println!("{}{}", codec.render(prompt)?, codec.render(&g.tokens)?);
        }
        (gens.iter().map(|g| g.tokens.len()).sum(), None)
    };
    let secs = start.elapsed().as_secs_f64();
    match first {
        Some(f) if generated > 1 => eprintln!(
            "{generated} tokens in {secs:.2} s: prefill of {prompt_tokens} prompt tokens + first token {f:.3} s, then {:.1} tokens/s",
            (generated - 1) as f64 / (secs - f).max(1e-9)
        ),
        _ => eprintln!(
            "{generated} tokens from {} prompts ({prompt_tokens} prompt tokens) in {secs:.2} s: {:.1} generated tokens/s",
            prompts.len(),
            generated as f64 / secs.max(1e-9)
        ),
    }
    Ok(())
}

/// The options every generation path shares (temperature, top-k, seed, text-only ids).
fn sampling_options<'a>(a: &GenerateArgs, tok: &MultimodalTokenizer) -> SamplingOptions<'a> {
    SamplingOptions {
        max_new_tokens: a.max_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        seed: a.seed,
        stop_at_eos: true,
        vocab_limit: Some(sample_limit(tok)),
        text_only: true,
        latent_steps: a.latent_steps,
        ..SamplingOptions::default()
    }
}

/// The prompts as token ids: `--prompt-ids` as given, else each `--prompt` with its
/// modality prefix (one empty prompt when none is given: just the prefix).
/// `--stop` strings as token sequences (without the leading `<bos>` that `encode_text` adds).
fn encode_stops(a: &GenerateArgs, tok: &MultimodalTokenizer) -> Result<Vec<Vec<u32>>> {
    a.stop
        .iter()
        .map(|s| Ok(tok.encode_text(s)?[1..].to_vec()))
        .collect()
}

fn encode_prompts(a: &GenerateArgs, tok: &MultimodalTokenizer) -> Result<Vec<Vec<u32>>> {
    if !a.prompt_ids.is_empty() {
        return Ok(vec![a.prompt_ids.clone()]);
    }
    let empty = [String::new()];
    let prompts = if a.prompts.is_empty() {
        &empty[..]
    } else {
        &a.prompts[..]
    };
    prompts
        .iter()
        .map(|p| match a.modality {
            ModalityArg::Code => Ok(tok.encode_code(p)?),
            ModalityArg::Text => Ok(tok.encode_text(p)?),
        })
        .collect()
}

/// Prints generated tokens as text as they come: renders everything generated so far and
/// writes the new suffix, holding back a trailing replacement character (an incomplete
/// UTF-8 sequence that the next byte token may complete).
#[derive(Default)]
struct StreamPrinter {
    ids: Vec<u32>,
    printed: usize,
}

impl StreamPrinter {
    fn push(&mut self, codec: &Codec, id: u32, out: &mut impl Write) {
        self.ids.push(id);
        if let Ok(text) = codec.render(&self.ids) {
            let text = text.trim_end_matches('\u{FFFD}');
            self.write_from(text, out);
        }
    }

    fn finish(&mut self, codec: &Codec, out: &mut impl Write) {
        if let Ok(text) = codec.render(&self.ids) {
            self.write_from(&text, out);
        }
    }

    fn write_from(&mut self, text: &str, out: &mut impl Write) {
        if let Some(new) = text.get(self.printed..).filter(|n| !n.is_empty()) {
            let _ = out.write_all(new.as_bytes());
            let _ = out.flush();
            self.printed = text.len();
        }
    }
}

/// `tritter generate --reference`: the candle reference loop (one prompt, supports
/// continuous thoughts).
fn generate_reference(a: &GenerateArgs, checkpoint: &Path) -> Result<()> {
    if checkpoint.join(MANIFEST_FILE).is_file() {
        return Err(TritterError::InvalidTrainOption {
            field: "--reference",
            actual: checkpoint.display().to_string(),
            expected: "expected a training checkpoint: the reference loop runs the candle model on the shadow weights, which an inference checkpoint does not hold".into(),
        });
    }
    let (model, _) = open_checkpoint(checkpoint)?;
    let tok = make_tokenizer(model.config().vocab_size, a.tokenizer.as_deref())?;
    let prompts = encode_prompts(a, &tok)?;
    let stop_sequences = encode_stops(a, &tok)?;
    let options = SamplingOptions {
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        stop_tokens: &a.stop_token,
        stop_sequences: &stop_sequences,
        ..sampling_options(a, &tok)
    };
    for (i, ids) in prompts.iter().enumerate() {
        let options = SamplingOptions {
            seed: a.seed.wrapping_add(i as u64),
            ..options
        };
        let new = generate(&model, ids, &options)?;
        if a.latent_steps == 0 {
            println!("{}{}", render(&tok, ids)?, render(&tok, &new)?);
        } else {
            let m = LatentMarkers::from_config(model.config())?;
            let thoughts = format!("[{} continuous thoughts]", a.latent_steps);
            println!(
                "{}{}{thoughts}{}{}",
                render(&tok, ids)?,
                render(&tok, &[m.bot])?,
                render(&tok, &[m.eot])?,
                render(&tok, &new)?
            );
        }
    }
    Ok(())
}

/// Bytes of file `name` in a manifest (0 when absent).
fn manifest_bytes(manifest: &Manifest, name: &str) -> u64 {
    manifest
        .files
        .iter()
        .find(|f| f.name == name)
        .map_or(0, |f| f.bytes)
}

/// `tritter export`: a training checkpoint, or a Hugging Face BitNet checkpoint, to an
/// inference checkpoint directory.
fn export_cmd(a: &ExportArgs) -> Result<()> {
    let start = Instant::now();
    let (manifest, what) = match (&a.hf, &a.checkpoint) {
        (Some(dir), _) => {
            let hf = HfBitnet::import(dir)?;
            let imported = start.elapsed().as_secs_f64();
            let manifest = hf.save(&a.out)?;
            let what = format!(
                "imported Hugging Face BitNet {} ({:.1}M parameters, {} layers, tokenizer.json {}) in {imported:.2} s, wrote",
                dir.display(),
                hf.checkpoint.config.param_count() as f64 / 1e6,
                hf.checkpoint.config.num_layers,
                if hf.tokenizer.is_some() { "copied" } else { "absent" },
            );
            (manifest, what)
        }
        (None, Some(checkpoint)) => {
            let ckpt = InferenceCheckpoint::from_trained_checkpoint(checkpoint)?;
            let manifest = ckpt.save(&a.out)?;
            let what = format!(
                "exported {} (step {})",
                ckpt.source.checkpoint.as_deref().unwrap_or("?"),
                ckpt.source
                    .step
                    .map_or_else(|| "unknown".to_string(), |s| s.to_string()),
            );
            (manifest, what)
        }
        (None, None) => {
            return Err(option_err(
                "--checkpoint",
                "absent",
                "--checkpoint <dir> or --hf <dir>",
            ))
        }
    };
    println!(
        "{what} to {} in {:.2} s: {} tensors; {} = {:.3} MB packed ternary, {} = {:.3} MB bf16",
        a.out.display(),
        start.elapsed().as_secs_f64(),
        manifest.tensors.len(),
        tritter::engine::TERNARY_FILE,
        manifest_bytes(&manifest, tritter::engine::TERNARY_FILE) as f64 / 1e6,
        tritter::engine::DENSE_FILE,
        manifest_bytes(&manifest, tritter::engine::DENSE_FILE) as f64 / 1e6,
    );
    Ok(())
}

/// `tritter eval-hf`: the engine's logits of an imported model for some ids, written
/// and/or compared with a peer's.
fn eval_hf(a: &EvalHfArgs) -> Result<()> {
    let load = Instant::now();
    let hf = HfBitnet::open(&a.hf)?;
    let reference = a
        .reference
        .as_ref()
        .map(ReferenceLogits::load)
        .transpose()?;
    let ids: Vec<u32> = if !a.ids.is_empty() {
        a.ids.clone()
    } else if let Some(p) = &a.prompt {
        hf_tokenizer(&hf, &a.hf, "--prompt")?.encode(p, true)?
    } else if let Some(ids) = reference.as_ref().and_then(|r| r.ids.clone()) {
        ids
    } else {
        return Err(option_err(
            "--ids",
            "absent",
            "--ids 1,2,3, --prompt <text>, or a .json --reference that records its ids",
        ));
    };
    let v = hf.config.vocab_size;
    let engine = CpuEngine::new(hf.checkpoint)?;
    let loaded = load.elapsed().as_secs_f64();
    let start = Instant::now();
    let ours = engine.forward_full(&ids)?;
    println!(
        "engine: {} ({} layers, vocab {v}) loaded in {loaded:.2} s; logits of {} positions in {:.3} s",
        a.hf.display(),
        engine.config().num_layers,
        ids.len(),
        start.elapsed().as_secs_f64()
    );
    if let Some(out) = &a.out {
        let mut ours = ReferenceLogits::new(ids.clone(), v, ours.clone())?;
        ours.meta.insert("impl".into(), "tritter-cpu-engine".into());
        ours.save(out)?;
        println!("wrote {}", out.display());
    }
    let (Some(r), Some(path)) = (reference, &a.reference) else {
        return Ok(());
    };
    if let Some(rids) = &r.ids {
        if *rids != ids {
            return Err(option_err(
                "--ids",
                format!("{ids:?}"),
                format!("the ids {} was computed for: {rids:?}", path.display()),
            ));
        }
    }
    if r.vocab_size != v || r.positions != ids.len() {
        return Err(TritterError::ShapeMismatch {
            what: format!("reference logits {}", path.display()),
            actual: vec![r.positions, r.vocab_size],
            expected: format!(
                "({}, {v}): one row per id, one column per vocabulary entry",
                ids.len()
            ),
        });
    }
    let c = compare_logits(&ours, &r.logits, v)?;
    let describe = |k: &str| r.meta.get(k).map_or("?".to_string(), |x| x.to_string());
    println!(
        "reference: {} (impl {}, dtype {})",
        path.display(),
        describe("impl"),
        describe("dtype")
    );
    println!("{c}");
    println!(
        "RESULT positions={} vocab={v} max_abs_diff={:.6e} mean_abs_diff={:.6e} reference_scale={:.4} top1_agree={}/{}",
        c.positions, c.max_abs_diff, c.mean_abs_diff, c.reference_scale, c.top1_agree, c.positions
    );
    Ok(())
}

fn tokenize(a: &TokenizeArgs) -> Result<()> {
    let bytes = match (&a.text, &a.file) {
        (Some(t), _) => t.as_bytes().to_vec(),
        (None, Some(p)) => std::fs::read(p).map_err(|e| TritterError::Data {
            path: p.clone(),
            detail: format!("cannot read it ({e})"),
        })?,
        (None, None) => {
            return Err(TritterError::InvalidTrainOption {
                field: "tokenize input",
                actual: "nothing".into(),
                expected: "pass --text or --file".into(),
            })
        }
    };
    let tok = make_tokenizer(a.vocab_size, a.tokenizer.as_deref())?;
    let ids = match a.modality {
        ModalityArg::Code => tok.encode_code(&bytes)?,
        ModalityArg::Text => tok.encode_text(&bytes)?,
    };
    println!(
        "{} bytes -> {} tokens ({:.3} bytes/token)",
        bytes.len(),
        ids.len(),
        bytes.len() as f64 / ids.len() as f64
    );
    println!("{ids:?}");
    Ok(())
}

/// An `InvalidTrainOption` error (a bad combination of CLI flags) with formatted values.
fn option_err(field: &'static str, actual: impl ToString, expected: impl ToString) -> TritterError {
    TritterError::InvalidTrainOption {
        field,
        actual: actual.to_string(),
        expected: expected.to_string(),
    }
}
