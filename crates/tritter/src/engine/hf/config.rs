//! [`HfBitnetConfig`]: the `config.json` of a Hugging Face BitNet b1.58 checkpoint
//! (transformers' `BitNetConfig`, `model_type: "bitnet"`), checked key by key, and its
//! mapping onto the engine's [`TritterConfig`].
//!
//! Keys that set tensor shapes are required (`vocab_size`, `hidden_size`,
//! `intermediate_size`, `num_hidden_layers`, `num_attention_heads`): transformers would fill a
//! missing one with the 2B4T default and then fail on the weights, so a clear error here is
//! kinder. The others default as `BitNetConfig.__init__` does. Everything the engine does not
//! compute is refused with the key, its value and what would be accepted.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::{AttentionMode, Modality, TritterConfig, MIN_VOCAB_SIZE};
use crate::{Result, TritterError};

/// The model config of a Hugging Face checkpoint directory.
pub const HF_CONFIG_FILE: &str = "config.json";
/// Generation defaults of a Hugging Face checkpoint directory (optional; its
/// `eos_token_id` adds stop tokens).
pub const HF_GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// `rms_norm_eps` of `BitNetConfig` when the key is absent.
const DEFAULT_RMS_NORM_EPS: f64 = 1e-5;
/// `rope_theta` of `BitNetConfig` when the key is absent.
const DEFAULT_ROPE_THETA: f64 = 500_000.0;
/// `max_position_embeddings` of `BitNetConfig` when the key is absent.
const DEFAULT_MAX_POSITIONS: usize = 2048;
/// `initializer_range` of `BitNetConfig` when the key is absent (unused at inference).
const DEFAULT_INITIALIZER_RANGE: f64 = 0.02;

/// How the checkpoint says its linear layers are quantized (`quantization_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfQuantization {
    /// No `quantization_config`. transformers would then run the linears unquantized in
    /// bf16; the importer still quantizes them (W1.58A8 is what a BitNet b1.58 checkpoint
    /// is trained for), which is the one documented difference from such a transformers
    /// forward.
    Absent,
    /// `{"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode":
    /// "online"}` (microsoft/bitnet-b1.58-2B-4T-bf16): bf16 master weights, quantized on
    /// every forward by transformers' `AutoBitLinear` (absmean weights per tensor, absmax
    /// int8 activations per token) — what the importer reproduces.
    Online,
}

/// The `config.json` of a Hugging Face BitNet b1.58 checkpoint, checked: every field here
/// is supported by the engine (see [`HfBitnetConfig::from_json`] for what is refused).
#[derive(Debug, Clone, PartialEq)]
pub struct HfBitnetConfig {
    /// Vocabulary size `V` (rows of the embedding and of the LM head).
    pub vocab_size: usize,
    /// Model width `H`.
    pub hidden_size: usize,
    /// MLP width `I` (gate/up `(I, H)`, down `(H, I)`, `ffn_sub_norm` `(I,)`).
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads `Hq`.
    pub num_attention_heads: usize,
    /// Key/value heads `Hkv` (GQA; `null` or absent means `Hq`).
    pub num_key_value_heads: usize,
    /// Per-head width `D = H / Hq` (a `head_dim` key must equal it).
    pub head_dim: usize,
    /// Largest position + 1 the engine accepts.
    pub max_position_embeddings: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base (`rope_theta`, or `rope_parameters.rope_theta` of newer transformers).
    pub rope_theta: f64,
    /// The LM head is the embedding table (`lm_head.weight` absent or ignored).
    pub tie_word_embeddings: bool,
    /// Init std (carried into the engine config; unused at inference).
    pub initializer_range: f64,
    /// `bos_token_id`, if any.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (an int or a list), the default stop tokens of generation.
    pub eos_token_ids: Vec<u32>,
    /// `pad_token_id`, if any (an ordinary row of the embedding table at inference).
    pub pad_token_id: Option<u32>,
    /// What `quantization_config` says.
    pub quantization: HfQuantization,
    /// The whole JSON object as read (written back as `hf_config.json` by an export).
    pub raw: Map<String, Value>,
}

/// Typed access to the keys of one JSON object, with errors naming the file and key.
struct Keys<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
    prefix: &'static str,
}

impl Keys<'_> {
    fn err(&self, key: &str, actual: impl ToString, expected: impl ToString) -> TritterError {
        TritterError::HfConfig {
            path: self.path.to_path_buf(),
            key: format!("{}{key}", self.prefix),
            actual: actual.to_string(),
            expected: expected.to_string(),
        }
    }

    /// The value of `key`, `None` when absent or `null`.
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .map(Some)
                .ok_or_else(|| self.err(key, v, "a positive integer")),
        }
    }

    fn usize_required(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| {
            self.err(
                key,
                "missing",
                "a positive integer (it sets tensor shapes, so it is not defaulted)",
            )
        })
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| self.err(key, v, "a finite number > 0")),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, v, "true or false")),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, v, "a string")),
        }
    }

    fn token_id_opt(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(key, v, "a token id (integer)")),
        }
    }

    /// An id or a list of ids (as `eos_token_id` may be).
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = |v: &Value| self.err(key, v, "a token id or a list of token ids");
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| bad(i))
                })
                .collect(),
            Some(v) => Ok(vec![v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(v))?]),
        }
    }
}

/// Parses a JSON object, or names the file and the JSON error.
fn json_object(text: &str, path: &Path) -> Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(other) => Err(TritterError::HfConfig {
            path: path.to_path_buf(),
            key: "(top level)".into(),
            actual: format!("a JSON {}", json_kind(&other)),
            expected: "a JSON object".into(),
        }),
        Err(source) => Err(TritterError::ConfigJson {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl HfBitnetConfig {
    /// Parses and checks a `config.json` (`path` names the file in errors).
    ///
    /// Refused, each with a [`TritterError::HfConfig`] naming the key: a `model_type`
    /// other than `"bitnet"` (or none); a missing shape key; `hidden_act` other than
    /// `relu2` (squared ReLU); `attention_bias: true`; a `head_dim` other than
    /// `hidden_size / num_attention_heads`; `rope_scaling` or `rope_parameters` of a type
    /// other than `default`; `partial_rotary_factor` other than 1; a `quantization_config`
    /// other than BitNet online (`offline` packed weights, `use_rms_norm: true`, other
    /// `modules_to_not_convert` than `lm_head`); head counts that do not divide (`H % Hq`,
    /// `Hq % Hkv`), an odd head dim; a vocabulary below [`MIN_VOCAB_SIZE`] (the engine's
    /// config rule).
    pub fn from_json(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let raw = json_object(text, path)?;
        let k = Keys {
            path,
            obj: &raw,
            prefix: "",
        };
        match k.str_opt("model_type")? {
            Some("bitnet") => {}
            other => return Err(k.err(
                "model_type",
                other.map_or("missing".to_string(), |t| format!("{t:?}")),
                "\"bitnet\" (transformers' BitNetConfig, e.g. microsoft/bitnet-b1.58-2B-4T-bf16)",
            )),
        }
        let vocab_size = k.usize_required("vocab_size")?;
        let hidden_size = k.usize_required("hidden_size")?;
        let intermediate_size = k.usize_required("intermediate_size")?;
        let num_hidden_layers = k.usize_required("num_hidden_layers")?;
        let num_attention_heads = k.usize_required("num_attention_heads")?;
        let num_key_value_heads = k
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);

        let act = k.str_opt("hidden_act")?.unwrap_or("relu2");
        if act != "relu2" {
            return Err(k.err(
                "hidden_act",
                format!("{act:?}"),
                "\"relu2\": the engine's MLP is the squared-ReLU GLU",
            ));
        }
        if k.bool_or("attention_bias", false)? {
            return Err(k.err(
                "attention_bias",
                true,
                "false: the engine's q/k/v/o projections have no bias",
            ));
        }
        if hidden_size % num_attention_heads != 0 {
            return Err(k.err(
                "num_attention_heads",
                num_attention_heads,
                format!("a divisor of hidden_size {hidden_size}"),
            ));
        }
        let head_dim = hidden_size / num_attention_heads;
        if let Some(d) = k.usize_opt("head_dim")? {
            if d != head_dim {
                return Err(k.err(
                    "head_dim",
                    d,
                    format!(
                        "hidden_size / num_attention_heads = {head_dim}: the engine's q and o projections are (hidden_size, hidden_size)"
                    ),
                ));
            }
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(k.err(
                "num_key_value_heads",
                num_key_value_heads,
                format!("a divisor of num_attention_heads {num_attention_heads} (GQA groups)"),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(k.err(
                "head_dim",
                head_dim,
                "an even number: RoPE rotates pairs of dimensions",
            ));
        }
        if vocab_size < MIN_VOCAB_SIZE {
            return Err(k.err(
                "vocab_size",
                vocab_size,
                format!("at least {MIN_VOCAB_SIZE} (the engine's config reserves that many ids)"),
            ));
        }

        let mut rope_theta = k.f64_or("rope_theta", DEFAULT_ROPE_THETA)?;
        if let Some(scaling) = k.get("rope_scaling") {
            check_default_rope(&k, "rope_scaling", scaling)?;
        }
        if let Some(params) = k.get("rope_parameters") {
            check_default_rope(&k, "rope_parameters", params)?;
            if let Some(theta) = params.get("rope_theta").filter(|v| !v.is_null()) {
                rope_theta = theta
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| k.err("rope_parameters.rope_theta", theta, "a number"))?;
            }
        }
        if rope_theta <= 1.0 {
            return Err(k.err(
                "rope_theta",
                rope_theta,
                "a base > 1 (frequencies rope_theta^(-2i/D) must decrease)",
            ));
        }
        if let Some(f) = k.get("partial_rotary_factor") {
            if f.as_f64() != Some(1.0) {
                return Err(k.err(
                    "partial_rotary_factor",
                    f,
                    "1 (or absent): the engine rotates the whole head",
                ));
            }
        }
        let quantization = match k.get("quantization_config") {
            None => HfQuantization::Absent,
            Some(q) => check_quantization(path, q)?,
        };
        Ok(HfBitnetConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: k
                .usize_opt("max_position_embeddings")?
                .unwrap_or(DEFAULT_MAX_POSITIONS),
            rms_norm_eps: k.f64_or("rms_norm_eps", DEFAULT_RMS_NORM_EPS)?,
            rope_theta,
            tie_word_embeddings: k.bool_or("tie_word_embeddings", false)?,
            initializer_range: k.f64_or("initializer_range", DEFAULT_INITIALIZER_RANGE)?,
            bos_token_id: k.token_id_opt("bos_token_id")?,
            eos_token_ids: k.token_ids("eos_token_id")?,
            pad_token_id: k.token_id_opt("pad_token_id")?,
            quantization,
            raw,
        })
    }

    /// Reads and checks `dir/config.json`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join(HF_CONFIG_FILE);
        Self::load_file(&path)
    }

    /// Reads and checks a config file (e.g. the `hf_config.json` of an export).
    pub fn load_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TritterError::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// The JSON object as read, pretty-printed.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.raw).expect("a JSON object serializes")
    }

    /// The engine config: the shapes, `norm_eps = rms_norm_eps`, `rope_theta`, tied head,
    /// causal attention without window or sinks, f32 KV cache by default (`int4_kv_cache:
    /// false`; pick a cache format per run), text modality, quantized BitLinears. Validated.
    pub fn to_tritter_config(&self) -> Result<TritterConfig> {
        let cfg = TritterConfig {
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
            vocab_size: self.vocab_size,
            rope_theta: self.rope_theta,
            norm_eps: self.rms_norm_eps,
            attention_mode: AttentionMode::Causal,
            sliding_window: None,
            attention_sinks: 0,
            int4_kv_cache: false,
            gradient_checkpointing: false,
            modalities: vec![Modality::Text],
            dropout: 0.0,
            initializer_range: self.initializer_range,
            tie_embeddings: self.tie_word_embeddings,
            quantize_bitlinear: true,
            latent_projection: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Accepts `null`, or an object whose `rope_type` (or legacy `type`) is `default`.
fn check_default_rope(k: &Keys<'_>, key: &str, v: &Value) -> Result<()> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str);
    if v.is_object() && kind.is_none_or(|t| t == "default") {
        return Ok(());
    }
    Err(k.err(
        key,
        v,
        "null or {\"rope_type\": \"default\"}: the engine runs plain RoPE (no linear, dynamic, yarn or llama3 scaling)",
    ))
}

/// Checks a `quantization_config` object: BitNet, online, no input RMSNorm, only `lm_head`
/// left unquantized.
fn check_quantization(path: &Path, q: &Value) -> Result<HfQuantization> {
    let Some(obj) = q.as_object() else {
        return Err(TritterError::HfConfig {
            path: path.to_path_buf(),
            key: "quantization_config".into(),
            actual: q.to_string(),
            expected: "an object".into(),
        });
    };
    let k = Keys {
        path,
        obj,
        prefix: "quantization_config.",
    };
    let method = k.str_opt("quant_method")?;
    if method != Some("bitnet") {
        return Err(k.err(
            "quant_method",
            method.map_or("missing".into(), |m| format!("{m:?}")),
            "\"bitnet\"",
        ));
    }
    let mode = k.str_opt("quantization_mode")?.unwrap_or("offline");
    if mode != "online" {
        return Err(k.err(
            "quantization_mode",
            format!("{mode:?}"),
            "\"online\": bf16 master weights quantized on the fly (microsoft/bitnet-b1.58-2B-4T-bf16); the offline release stores packed uint8 weights, which this importer does not read",
        ));
    }
    if let Some(class) = k.str_opt("linear_class")? {
        if class != "autobitlinear" {
            return Err(k.err(
                "linear_class",
                format!("{class:?}"),
                "\"autobitlinear\" (the class transformers uses for online quantization)",
            ));
        }
    }
    if k.bool_or("use_rms_norm", false)? {
        return Err(k.err(
            "use_rms_norm",
            true,
            "false: the engine has no weightless RMSNorm before each BitLinear",
        ));
    }
    if let Some(list) = k.get("modules_to_not_convert") {
        let names: Option<Vec<&str>> = list
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect());
        if names.is_none_or(|n| n.iter().any(|m| *m != "lm_head")) {
            return Err(k.err(
                "modules_to_not_convert",
                list,
                "null or [\"lm_head\"]: every q/k/v/o/gate/up/down projection runs ternary on the engine",
            ));
        }
    }
    Ok(HfQuantization::Online)
}

/// A JSON object as read (`generation_config.json`).
pub(crate) type JsonObject = Map<String, Value>;

/// The stop tokens of a checkpoint directory: `eos_token_id` of `config` and, when the
/// directory has one, of `generation_config.json` (an instruct model adds its end-of-turn
/// id there), deduplicated in order. Returns them with the raw generation config.
pub(crate) fn stop_tokens(
    config: &HfBitnetConfig,
    dir: &Path,
) -> Result<(Vec<u32>, Option<JsonObject>)> {
    let mut ids = config.eos_token_ids.clone();
    let path: PathBuf = dir.join(HF_GENERATION_CONFIG_FILE);
    let generation = if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|e| TritterError::io(&path, e))?;
        let obj = json_object(&text, &path)?;
        let extra = Keys {
            path: &path,
            obj: &obj,
            prefix: "",
        }
        .token_ids("eos_token_id")?;
        for id in extra {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Some(obj)
    } else {
        None
    };
    Ok((ids, generation))
}
