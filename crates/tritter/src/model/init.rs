//! Seeded, order-independent parameter initialization into a `candle_nn::VarMap`.
//!
//! candle's CPU RNG cannot be seeded, so the reference model draws its own numbers: every
//! parameter gets a SplitMix64 stream seeded by `hash(name) ^ seed`, which makes a model a
//! pure function of `(config, seed)` whatever order the layers are built in.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use crate::{Result, TritterError};

/// SplitMix64: a tiny, fast, seedable generator (Steele et al. 2014), good enough for
/// weight init and test data; not for cryptography.
#[derive(Debug, Clone)]
pub struct SeededRng {
    state: u64,
}

impl SeededRng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SeededRng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in `0..n` (`n >= 1`; slight modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `n` normal values with standard deviation `std`, as f32.
    pub fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }
}

/// FNV-1a 64-bit hash: stable across Rust versions (unlike `DefaultHasher`).
pub(crate) fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// The FNV-1a offset basis.
pub(crate) const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;

/// How new parameters are filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum InitMode {
    /// Seeded normal init (norm weights 1, pad row 0).
    Seeded(u64),
    /// Zeros (norm weights 1): the cheap shell a checkpoint is loaded into.
    Zeros,
}

/// Creates named parameters (`candle_core::Var`s) in a `VarMap`; `pp` descends into a
/// sub-module's name scope, as `candle_nn::VarBuilder` does.
#[derive(Clone)]
pub struct ParamBuilder<'a> {
    varmap: &'a VarMap,
    prefix: String,
    dtype: DType,
    device: Device,
    mode: InitMode,
}

impl<'a> ParamBuilder<'a> {
    /// A builder with seeded normal init.
    pub fn new(varmap: &'a VarMap, dtype: DType, device: &Device, seed: u64) -> Self {
        Self::with_mode(varmap, dtype, device, InitMode::Seeded(seed))
    }

    pub(crate) fn with_mode(
        varmap: &'a VarMap,
        dtype: DType,
        device: &Device,
        mode: InitMode,
    ) -> Self {
        ParamBuilder {
            varmap,
            prefix: String::new(),
            dtype,
            device: device.clone(),
            mode,
        }
    }

    /// The builder of sub-module `name` (parameters named `prefix.name.*`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let mut b = self.clone();
        b.prefix = self.path(&name.to_string());
        b
    }

    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The parameters' device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A parameter `name` of `shape` drawn from N(0, std²) (zeros in `Zeros` mode).
    pub fn normal(&self, name: &str, shape: &[usize], std: f64) -> Result<Tensor> {
        self.normal_with_zero_rows(name, shape, std, &[])
    }

    /// As [`normal`](Self::normal), with the given rows (first-dim indices) set to zero.
    pub fn normal_with_zero_rows(
        &self,
        name: &str,
        shape: &[usize],
        std: f64,
        zero_rows: &[usize],
    ) -> Result<Tensor> {
        let n = shape.iter().product();
        let path = self.path(name);
        let mut values = match self.mode {
            InitMode::Seeded(seed) => {
                SeededRng::new(fnv1a(path.as_bytes(), FNV_OFFSET) ^ seed).normal_vec(n, std)
            }
            InitMode::Zeros => vec![0.0; n],
        };
        let row_len: usize = shape.iter().skip(1).product();
        for &r in zero_rows {
            if let Some(row) = values.get_mut(r * row_len..(r + 1) * row_len) {
                row.fill(0.0);
            }
        }
        self.insert(path, values, shape)
    }

    /// A square parameter `name` `(n, n)` initialized to the identity (zeros in `Zeros`
    /// mode, which a checkpoint load overwrites).
    pub fn identity(&self, name: &str, n: usize) -> Result<Tensor> {
        let mut values = vec![0.0f32; n * n];
        if let InitMode::Seeded(_) = self.mode {
            for i in 0..n {
                values[i * n + i] = 1.0;
            }
        }
        self.insert(self.path(name), values, &[n, n])
    }

    /// A parameter `name` of `shape` filled with `value`.
    pub fn constant(&self, name: &str, shape: &[usize], value: f32) -> Result<Tensor> {
        let n = shape.iter().product();
        self.insert(self.path(name), vec![value; n], shape)
    }

    fn insert(&self, path: String, values: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        let tensor = var.as_tensor().clone();
        let mut data = self
            .varmap
            .data()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if data.contains_key(&path) {
            return Err(TritterError::InvalidConfig {
                field: "parameter name",
                actual: path,
                expected: "a name used once per model".into(),
            });
        }
        data.insert(path, var);
        Ok(tensor)
    }
}
