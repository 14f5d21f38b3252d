//! A synthetic image classification set that a network can learn: each class has
//! a template (coloured blobs and an oriented grating) and each image is its
//! class's template, shifted, rescaled in brightness and covered in noise.

use super::Dataset;
use crate::ops::cpu::rng::Rng;

/// Generator of synthetic images; the class templates depend on `seed` only, so
/// training and held-out sets made with different sample seeds share them.
#[derive(Clone, Debug)]
pub struct Synthetic {
    classes: usize,
    size: usize,
    templates: Vec<Vec<f32>>,
}

impl Synthetic {
    /// Templates for `classes` classes of `3 × size × size` images.
    pub fn new(classes: usize, size: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x05EE_D0FC_1A55);
        let templates = (0..classes)
            .map(|k| {
                let mut t = vec![0.0f32; 3 * size * size];
                let s = size as f64;
                // Three coloured Gaussian blobs.
                let blobs: Vec<(f64, f64, f64, [f64; 3])> = (0..3)
                    .map(|_| {
                        let c = [rng.uniform(), rng.uniform(), rng.uniform()];
                        (
                            rng.uniform() * s,
                            rng.uniform() * s,
                            (0.1 + 0.2 * rng.uniform()) * s,
                            c,
                        )
                    })
                    .collect();
                // A grating whose orientation and frequency identify the class.
                let theta = std::f64::consts::PI * k as f64 / classes as f64;
                let freq = (2.0 + (k % 3) as f64) * std::f64::consts::TAU / s;
                for y in 0..size {
                    for x in 0..size {
                        let (fy, fx) = (y as f64, x as f64);
                        let g = 0.5 + 0.5 * (freq * (fx * theta.cos() + fy * theta.sin())).sin();
                        for ch in 0..3 {
                            let mut v = 0.35 * g;
                            for (cy, cx, r, col) in &blobs {
                                let d2 = (fy - cy).powi(2) + (fx - cx).powi(2);
                                v += 0.65 * col[ch] * (-d2 / (2.0 * r * r)).exp();
                            }
                            t[(ch * size + y) * size + x] = v as f32;
                        }
                    }
                }
                t
            })
            .collect();
        Synthetic {
            classes,
            size,
            templates,
        }
    }

    /// `n` images, classes in turn, drawn with `sample_seed`.
    pub fn generate(&self, n: usize, sample_seed: u64) -> Dataset {
        let s = self.size;
        let mut rng = Rng::new(sample_seed.wrapping_mul(0x9E37_79B9) ^ 0xDA7A);
        let mut ds = Dataset {
            pixels: Vec::with_capacity(n * 3 * s * s),
            labels: Vec::with_capacity(n),
            shape: [3, s, s],
            classes: self.classes,
        };
        for i in 0..n {
            let k = i % self.classes;
            let t = &self.templates[k];
            let shift = (s / 8).max(1) as i64;
            let dy = (rng.next_u64() % (2 * shift as u64 + 1)) as i64 - shift;
            let dx = (rng.next_u64() % (2 * shift as u64 + 1)) as i64 - shift;
            let gain = 0.75 + 0.5 * rng.uniform() as f32;
            for ch in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        let sy = (y as i64 + dy).clamp(0, s as i64 - 1) as usize;
                        let sx = (x as i64 + dx).clamp(0, s as i64 - 1) as usize;
                        let v = gain * t[(ch * s + sy) * s + sx] + 0.25 * rng.normal() as f32;
                        ds.pixels.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
                    }
                }
            }
            ds.labels.push(k as u8);
        }
        ds
    }
}
