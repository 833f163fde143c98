//! Deterministic k-means (k-means++ seeding, Lloyd iterations) over rows of `f32`, used to
//! learn the image patch codebook.
//!
//! Determinism: the random stream is an in-crate SplitMix64 (stable across dependency
//! upgrades, unlike `rand`'s `StdRng`); the parallel parts (rayon) only compute per-row
//! values, every reduction runs sequentially in row order, so the result is bit-identical
//! for any thread count. Cost: `O(n k d)` for seeding and per iteration.

use rayon::prelude::*;

/// SplitMix64: a tiny, well-mixed, reproducible generator (Steele et al., 2014).
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n > 0); the modulo bias is below 2^-40 for the sizes used here.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Index and squared distance of the centroid nearest to `row` (lowest index on ties).
pub(crate) fn nearest(centroids: &[f32], dim: usize, row: &[f32]) -> (usize, f32) {
    centroids
        .chunks_exact(dim)
        .enumerate()
        .fold((0, f32::INFINITY), |best, (i, c)| {
            let d = sq_dist(c, row);
            if d < best.1 {
                (i, d)
            } else {
                best
            }
        })
}

/// k-means over `data` (`n` rows of `dim` values, row-major); returns `k * dim` centroids.
/// Callers guarantee `dim > 0`, `1 <= k <= n` and finite data.
pub(crate) fn kmeans(data: &[f32], dim: usize, k: usize, iterations: usize, seed: u64) -> Vec<f32> {
    let n = data.len() / dim;
    let rows = |i: usize| &data[i * dim..(i + 1) * dim];
    let mut rng = SplitMix64::new(seed);

    // k-means++ (Arthur & Vassilvitskii 2007): each new centre drawn with probability
    // proportional to the squared distance to the nearest centre chosen so far.
    let mut centroids = Vec::with_capacity(k * dim);
    centroids.extend_from_slice(rows(rng.below(n)));
    let mut d2: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| sq_dist(rows(i), &centroids[..dim]))
        .collect();
    for _ in 1..k {
        let total: f64 = d2.iter().map(|&d| f64::from(d)).sum();
        let pick = if total > 0.0 {
            let target = rng.next_f64() * total;
            let mut acc = 0.0;
            d2.iter()
                .position(|&d| {
                    acc += f64::from(d);
                    acc > target
                })
                .unwrap_or(n - 1)
        } else {
            // Fewer distinct rows than k: duplicate centres, harmless (never nearest first).
            rng.below(n)
        };
        let start = centroids.len();
        centroids.extend_from_slice(rows(pick));
        let newest = &centroids[start..];
        d2.par_iter_mut()
            .enumerate()
            .for_each(|(i, d)| *d = d.min(sq_dist(rows(i), newest)));
    }

    // Lloyd iterations until assignments stop changing.
    let mut assign = vec![usize::MAX; n];
    for _ in 0..iterations {
        let next: Vec<(usize, f32)> = (0..n)
            .into_par_iter()
            .map(|i| nearest(&centroids, dim, rows(i)))
            .collect();
        let changed = next.iter().zip(&assign).any(|(a, &b)| a.0 != b);
        for (a, &(c, _)) in assign.iter_mut().zip(&next) {
            *a = c;
        }
        if !changed {
            break;
        }
        let mut sums = vec![0f64; k * dim];
        let mut counts = vec![0usize; k];
        for (i, &c) in assign.iter().enumerate() {
            counts[c] += 1;
            for (s, &x) in sums[c * dim..(c + 1) * dim].iter_mut().zip(rows(i)) {
                *s += f64::from(x);
            }
        }
        // Empty clusters take the row farthest from its centroid (each row used once).
        let mut far: Vec<usize> = (0..n).collect();
        far.sort_by(|&a, &b| next[b].1.total_cmp(&next[a].1).then(a.cmp(&b)));
        let mut far = far.into_iter();
        for c in 0..k {
            let centre = &mut centroids[c * dim..(c + 1) * dim];
            if counts[c] > 0 {
                let inv = 1.0 / counts[c] as f64;
                for (x, s) in centre.iter_mut().zip(&sums[c * dim..(c + 1) * dim]) {
                    *x = (s * inv) as f32;
                }
            } else if let Some(r) = far.next() {
                centre.copy_from_slice(rows(r));
            }
        }
    }
    centroids
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Well-separated clusters are found exactly, and the result does not depend on the seed's run.
    #[test]
    fn kmeans_recovers_separated_clusters_deterministically() {
        let centres = [[0.0f32, 0.0], [10.0, 0.0], [0.0, 10.0]];
        let mut rng = SplitMix64::new(7);
        let mut data = Vec::new();
        for i in 0..300 {
            let c = centres[i % 3];
            data.push(c[0] + (rng.next_f64() as f32 - 0.5) * 0.1);
            data.push(c[1] + (rng.next_f64() as f32 - 0.5) * 0.1);
        }
        let a = kmeans(&data, 2, 3, 20, 1);
        assert_eq!(a, kmeans(&data, 2, 3, 20, 1));
        for c in centres {
            let (_, d) = nearest(&a, 2, &c);
            assert!(d < 1e-3, "centre {c:?} not recovered: {a:?}");
        }
    }
}
