//! Images as patch codes of a learned k-means codebook.
//!
//! An RGB image whose sides are non-zero multiples of the patch size `p` is cut into a
//! `rows x cols` grid of `p x p` patches (raster order). Each patch is a vector of
//! `3 p^2` values in `0..=255`, ordered (y, x, channel), and is replaced by the index of its
//! nearest centroid (squared L2). Decoding pastes the centroids back and rounds to `u8`.
//!
//! The codebook is trained by [`ImageCodebook::train`] (k-means++ then Lloyd, seeded, bit
//! reproducible) and stored as safetensors: one `F32` tensor `centroids` of shape
//! `[num_codes, 3 p^2]` and the metadata `format = "tritter-image-codebook"`, `version = "1"`,
//! `patch_size`, `channels = "3"`.

use std::collections::HashMap;
use std::path::Path;

use image::{DynamicImage, RgbImage};
use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::error::{Result, TokenizerError};
use super::io::write_atomic;
use super::kmeans::{kmeans, nearest, SplitMix64};

/// Patch side used by the presets (8x8 RGB patches, 192 values each).
pub const DEFAULT_PATCH_SIZE: u32 = 8;
/// Largest accepted patch side.
pub const MAX_PATCH_SIZE: u32 = 64;
/// Largest patch grid side: rows and columns are written as two big-endian byte tokens each.
pub const MAX_GRID_SIDE: u32 = u16::MAX as u32;
/// Colour channels of a patch (RGB).
pub const CHANNELS: usize = 3;
/// `format` metadata value of codebook files.
pub const CODEBOOK_FORMAT: &str = "tritter-image-codebook";
/// `version` metadata value of codebook files.
pub const CODEBOOK_VERSION: &str = "1";
const CENTROIDS: &str = "centroids";

/// Settings of [`ImageCodebook::train`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KMeansConfig {
    /// Codebook size `k` (at most the layout's image range; 8192 for the 65536 vocab).
    pub num_codes: usize,
    /// Most Lloyd iterations (stops earlier when assignments no longer change).
    pub iterations: usize,
    /// Seed of the k-means++ draws and of the patch subsample.
    pub seed: u64,
    /// Train on at most this many patches, drawn without replacement with `seed`
    /// (k-means costs `O(patches * k * 3 p^2)` per iteration); `None` uses all.
    pub max_patches: Option<usize>,
}

impl KMeansConfig {
    /// `num_codes` codes, 25 iterations, seed 0, all patches.
    pub fn new(num_codes: usize) -> Self {
        Self {
            num_codes,
            iterations: 25,
            seed: 0,
            max_patches: None,
        }
    }
}

/// Patch codes of one image: `rows * cols` codebook indices in raster order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchCodes {
    /// Patch rows (image height / patch size).
    pub rows: u32,
    /// Patch columns (image width / patch size).
    pub cols: u32,
    /// Codebook index of each patch, row-major; length `rows * cols`.
    pub codes: Vec<u32>,
}

/// Checks that a `width x height` image tiles into `patch`-sided patches and returns the
/// grid as `(cols, rows)`.
pub fn patch_grid(width: u32, height: u32, patch: u32) -> Result<(u32, u32)> {
    check_patch_size(patch)?;
    if width == 0 || height == 0 || width % patch != 0 || height % patch != 0 {
        return Err(TokenizerError::ImageSize {
            width,
            height,
            patch,
        });
    }
    let (cols, rows) = (width / patch, height / patch);
    if cols > MAX_GRID_SIDE || rows > MAX_GRID_SIDE {
        return Err(TokenizerError::ImageTooLarge {
            width,
            height,
            cols,
            rows,
            max: MAX_GRID_SIDE,
        });
    }
    Ok((cols, rows))
}

fn check_patch_size(patch: u32) -> Result<()> {
    if patch == 0 || patch > MAX_PATCH_SIZE {
        return Err(TokenizerError::InvalidPatchSize {
            patch,
            max: MAX_PATCH_SIZE,
        });
    }
    Ok(())
}

/// Decodes PNG or JPEG bytes (format sniffed from the content) into 8-bit RGB.
pub fn load_image(bytes: &[u8]) -> Result<RgbImage> {
    let image = image::load_from_memory(bytes).map_err(TokenizerError::ImageDecode)?;
    Ok(image.into_rgb8())
}

/// Resizes to `width x height` (Catmull-Rom) after checking that the target tiles into
/// `patch`-sided patches; use it to bring arbitrary images to a tokenizable size.
pub fn resize_for_patches(
    image: &DynamicImage,
    width: u32,
    height: u32,
    patch: u32,
) -> Result<RgbImage> {
    patch_grid(width, height, patch)?;
    Ok(image
        .resize_exact(width, height, image::imageops::FilterType::CatmullRom)
        .into_rgb8())
}

/// Peak signal-to-noise ratio in dB of `decoded` against `reference` (peak 255, all
/// channels); `f64::INFINITY` for identical images. Errors on different sizes.
pub fn psnr(reference: &RgbImage, decoded: &RgbImage) -> Result<f64> {
    if reference.dimensions() != decoded.dimensions() {
        return Err(TokenizerError::MetricShape(format!(
            "reference is {}x{} but decoded is {}x{}",
            reference.width(),
            reference.height(),
            decoded.width(),
            decoded.height()
        )));
    }
    let n = reference.as_raw().len().max(1) as f64;
    let sse: f64 = reference
        .as_raw()
        .iter()
        .zip(decoded.as_raw())
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    Ok(if sse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / (sse / n)).log10()
    })
}

/// Appends the patches of `image` (validated grid) to `out`, raster order, (y, x, c) within.
fn extract_patches(image: &RgbImage, patch: u32, out: &mut Vec<f32>) -> Result<(u32, u32)> {
    let (cols, rows) = patch_grid(image.width(), image.height(), patch)?;
    let p = patch as usize;
    let row_len = image.width() as usize * CHANNELS;
    let raw = image.as_raw();
    out.reserve(raw.len());
    for r in 0..rows as usize {
        for c in 0..cols as usize {
            for y in 0..p {
                let start = (r * p + y) * row_len + c * p * CHANNELS;
                out.extend(
                    raw[start..start + p * CHANNELS]
                        .iter()
                        .map(|&v| f32::from(v)),
                );
            }
        }
    }
    Ok((cols, rows))
}

/// A k-means codebook of `p x p` RGB patches (see the module docs for the file format).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageCodebook {
    patch_size: u32,
    /// `[num_codes, 3 p^2]`, row-major, pixel scale `0..=255`.
    centroids: Vec<f32>,
}

impl ImageCodebook {
    /// Learns a codebook from the patches of `images` (each a non-zero multiple of
    /// `patch_size` per side). Deterministic for given images and config.
    pub fn train(images: &[RgbImage], patch_size: u32, config: &KMeansConfig) -> Result<Self> {
        check_patch_size(patch_size)?;
        let dim = Self::dim_of(patch_size);
        let mut data = Vec::new();
        for image in images {
            extract_patches(image, patch_size, &mut data)?;
        }
        let n = data.len() / dim;
        let mut rng = SplitMix64::new(config.seed ^ 0x5EED_CAFE_F00D_D00D);
        if let Some(max) = config.max_patches.filter(|&m| m < n) {
            // Partial Fisher-Yates: the first `max` rows become a uniform sample.
            for i in 0..max {
                let j = i + rng.below(n - i);
                for d in 0..dim {
                    data.swap(i * dim + d, j * dim + d);
                }
            }
            data.truncate(max * dim);
        }
        let n = data.len() / dim;
        if config.num_codes == 0 || config.num_codes > n {
            return Err(TokenizerError::KMeans(format!(
                "num_codes = {} but there are {n} training patches; expected 1 <= num_codes <= patches",
                config.num_codes
            )));
        }
        if u32::try_from(config.num_codes).is_err() {
            return Err(TokenizerError::KMeans(format!(
                "num_codes = {} does not fit u32 token codes",
                config.num_codes
            )));
        }
        let centroids = kmeans(&data, dim, config.num_codes, config.iterations, config.seed);
        Ok(Self {
            patch_size,
            centroids,
        })
    }

    /// A codebook from explicit centroids (`[num_codes, 3 p^2]` row-major, finite values).
    pub fn from_centroids(patch_size: u32, centroids: Vec<f32>) -> Result<Self> {
        check_patch_size(patch_size)?;
        let dim = Self::dim_of(patch_size);
        if centroids.is_empty() || centroids.len() % dim != 0 {
            return Err(TokenizerError::Codebook(format!(
                "{} centroid values is not a non-zero multiple of the patch dimension {dim} (3 x {patch_size}^2)",
                centroids.len()
            )));
        }
        if let Some(i) = centroids.iter().position(|v| !v.is_finite()) {
            return Err(TokenizerError::Codebook(format!(
                "centroid value {} at index {i} is not finite",
                centroids[i]
            )));
        }
        Ok(Self {
            patch_size,
            centroids,
        })
    }

    fn dim_of(patch_size: u32) -> usize {
        CHANNELS * (patch_size as usize).pow(2)
    }

    /// Patch side in pixels.
    pub fn patch_size(&self) -> u32 {
        self.patch_size
    }

    /// Values per patch, `3 p^2`.
    pub fn patch_dim(&self) -> usize {
        Self::dim_of(self.patch_size)
    }

    /// Number of codes `k`.
    pub fn num_codes(&self) -> usize {
        self.centroids.len() / self.patch_dim()
    }

    /// Centroids, `[num_codes, 3 p^2]` row-major, pixel scale.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// Nearest-centroid code of every patch of `image`.
    pub fn encode(&self, image: &RgbImage) -> Result<PatchCodes> {
        let dim = self.patch_dim();
        let mut data = Vec::new();
        let (cols, rows) = extract_patches(image, self.patch_size, &mut data)?;
        let codes = data
            .par_chunks_exact(dim)
            .map(|patch| nearest(&self.centroids, dim, patch).0 as u32)
            .collect();
        Ok(PatchCodes { rows, cols, codes })
    }

    /// Pixels of a patch grid: each code's centroid, rounded and clamped to `0..=255`.
    /// Errors on a code count other than `rows * cols` or a code >= `num_codes`.
    pub fn decode(&self, codes: &PatchCodes) -> Result<RgbImage> {
        let p = self.patch_size;
        let (width, height) = (codes.cols * p, codes.rows * p);
        patch_grid(width, height, p)?;
        let expected = codes.rows as usize * codes.cols as usize;
        if codes.codes.len() != expected {
            return Err(TokenizerError::Codebook(format!(
                "{} codes for a {}x{} patch grid; expected {expected}",
                codes.codes.len(),
                codes.cols,
                codes.rows
            )));
        }
        if let Some(&bad) = codes
            .codes
            .iter()
            .find(|&&c| c as usize >= self.num_codes())
        {
            return Err(TokenizerError::Codebook(format!(
                "code {bad} >= codebook size {}",
                self.num_codes()
            )));
        }
        let (p, dim) = (p as usize, self.patch_dim());
        let row_len = width as usize * CHANNELS;
        let mut raw = vec![0u8; row_len * height as usize];
        for (i, &code) in codes.codes.iter().enumerate() {
            let (r, c) = (i / codes.cols as usize, i % codes.cols as usize);
            let centre = &self.centroids[code as usize * dim..(code as usize + 1) * dim];
            for (y, line) in centre.chunks_exact(p * CHANNELS).enumerate() {
                let start = (r * p + y) * row_len + c * p * CHANNELS;
                for (dst, &v) in raw[start..start + p * CHANNELS].iter_mut().zip(line) {
                    *dst = v.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        RgbImage::from_raw(width, height, raw).ok_or_else(|| {
            TokenizerError::Codebook(format!("internal: {width}x{height} buffer size mismatch"))
        })
    }

    /// The codebook as safetensors bytes (module docs).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let bytes: Vec<u8> = self
            .centroids
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = TensorView::new(Dtype::F32, vec![self.num_codes(), self.patch_dim()], &bytes)
            .map_err(TokenizerError::Safetensors)?;
        let metadata = HashMap::from([
            ("format".to_owned(), CODEBOOK_FORMAT.to_owned()),
            ("version".to_owned(), CODEBOOK_VERSION.to_owned()),
            ("patch_size".to_owned(), self.patch_size.to_string()),
            ("channels".to_owned(), CHANNELS.to_string()),
        ]);
        safetensors::serialize([(CENTROIDS, view)], Some(metadata))
            .map_err(TokenizerError::Safetensors)
    }

    /// Parses and validates codebook safetensors bytes (format tag, version, shape, values).
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        let bad = |m: String| TokenizerError::Codebook(m);
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(TokenizerError::Safetensors)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |key: &str| meta.get(key).map(String::as_str);
        if get("format") != Some(CODEBOOK_FORMAT) {
            return Err(bad(format!(
                "metadata format is {:?}; expected {CODEBOOK_FORMAT:?}",
                get("format")
            )));
        }
        if get("version") != Some(CODEBOOK_VERSION) {
            return Err(bad(format!(
                "metadata version is {:?}; this build reads version {CODEBOOK_VERSION:?}",
                get("version")
            )));
        }
        if get("channels") != Some("3") {
            return Err(bad(format!(
                "metadata channels is {:?}; expected \"3\" (RGB)",
                get("channels")
            )));
        }
        let patch_size: u32 = get("patch_size")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                bad(format!(
                    "metadata patch_size is {:?}; expected an integer",
                    get("patch_size")
                ))
            })?;
        check_patch_size(patch_size)?;
        let tensors = SafeTensors::deserialize(bytes).map_err(TokenizerError::Safetensors)?;
        let view = tensors
            .tensor(CENTROIDS)
            .map_err(TokenizerError::Safetensors)?;
        let dim = Self::dim_of(patch_size);
        if view.dtype() != Dtype::F32 || view.shape().len() != 2 || view.shape()[1] != dim {
            return Err(bad(format!(
                "tensor {CENTROIDS} is {:?} {:?}; expected F32 [num_codes, {dim}]",
                view.dtype(),
                view.shape()
            )));
        }
        let centroids = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Self::from_centroids(patch_size, centroids)
    }

    /// Writes the codebook to a safetensors file atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        write_atomic(path.as_ref(), &self.to_safetensors()?)
    }

    /// Reads and validates a codebook safetensors file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })?;
        Self::from_safetensors(&bytes)
    }
}
