use half::{bf16, f16};

/// A floating-point element the crate reads, for weights and activations: f32, bf16, f16.
///
/// Everything is widened to f32 exactly before any arithmetic, so results do not depend on
/// the storage type beyond its own rounding.
pub trait Element: Copy + Send + Sync + 'static {
    /// Name used in messages and benchmark labels.
    const NAME: &'static str;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bf16";
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl Element for f16 {
    const NAME: &'static str = "f16";
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
