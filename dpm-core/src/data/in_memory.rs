//! [`InMemory`]: a batch source over samples held in memory (f32 features or u8
//! images) with their labels: shuffled per epoch from a seed, normalised per
//! channel, the last short batch dropped or padded. The batch of step `t`
//! depends only on the configuration and `t`, so a run resumed at step `t`
//! (with [`InMemory::start_at`]) sees exactly the batches it would have.

use crate::error::{Error, Result};
use crate::ops::cpu::rng::Rng;
use crate::parallel::InputSource;
use crate::tensor::{Shape, Tensor};

/// The samples' values.
#[derive(Clone, Debug)]
enum Values {
    F32(Vec<f32>),
    /// Bytes, read as `byte / 255`.
    U8(Vec<u8>),
}

/// What happens to the samples an epoch has left over, fewer than a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LastBatch {
    /// Left out of this epoch (PyTorch's `drop_last=True`); every batch is
    /// whole, and an epoch has `⌊n / batch⌋` steps.
    #[default]
    Drop,
    /// Completed with samples from the start of the epoch's order, so that every
    /// sample is seen each epoch and every batch is whole (a data-parallel batch
    /// must split evenly over the devices); `⌈n / batch⌉` steps.
    Pad,
}

/// A [`InputSource`] over samples in memory. Feeds blobs `data` (`[batch, …sample
/// shape]`, f32) and `label` (`[batch]`, i32) unless renamed.
///
/// ```
/// use dpm_core::data::{InMemory, LastBatch};
/// use dpm_core::parallel::InputSource;
/// // Ten 2-feature samples, labels 0/1; batches of 4, reshuffled each epoch.
/// let x: Vec<f32> = (0..20).map(|i| i as f32).collect();
/// let y: Vec<i32> = (0..10).map(|i| i % 2).collect();
/// let mut src = InMemory::from_f32(x, [2], y)?.batch_size(4).shuffle(7).last_batch(LastBatch::Pad);
/// assert_eq!(src.steps_per_epoch(), 3);
/// let batch = src.next_batch()?;
/// assert_eq!(batch[0].1.dims(), [4, 2]);
/// # Ok::<(), dpm_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct InMemory {
    values: Values,
    sample: Shape,
    labels: Vec<i32>,
    batch: usize,
    seed: Option<u64>,
    mean_std: Option<(Vec<f32>, Vec<f32>)>,
    last: LastBatch,
    names: (String, String),
    step: u64,
    /// The permutation of the epoch last used.
    order: Option<(u64, Vec<usize>)>,
}

impl InMemory {
    /// Samples of `sample_shape` f32 values each, one after another, and their labels.
    pub fn from_f32(features: Vec<f32>, sample_shape: impl Into<Shape>, labels: Vec<i32>) -> Result<Self> {
        let sample = sample_shape.into();
        check_sizes(features.len(), &sample, labels.len())?;
        Ok(Self::new(Values::F32(features), sample, labels))
    }

    /// Samples of `sample_shape` bytes each (images, `[C, H, W]`), read as
    /// `byte / 255` before normalisation, and their labels.
    pub fn from_u8(pixels: Vec<u8>, sample_shape: impl Into<Shape>, labels: Vec<i32>) -> Result<Self> {
        let sample = sample_shape.into();
        check_sizes(pixels.len(), &sample, labels.len())?;
        Ok(Self::new(Values::U8(pixels), sample, labels))
    }

    fn new(values: Values, sample: Shape, labels: Vec<i32>) -> Self {
        InMemory {
            values,
            sample,
            labels,
            batch: 32,
            seed: None,
            mean_std: None,
            last: LastBatch::Drop,
            names: ("data".into(), "label".into()),
            step: 0,
            order: None,
        }
    }

    /// Samples per step over all devices and hosts (default 32).
    pub fn batch_size(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }

    /// Draws each epoch in a new order, from `seed` and the epoch's number
    /// (default: the stored order every epoch).
    pub fn shuffle(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Normalises each channel (the first dimension of a sample):
    /// `(x − mean[c]) / std[c]`. One value each applies to every channel.
    pub fn normalize(mut self, mean: &[f32], std: &[f32]) -> Self {
        self.mean_std = Some((mean.to_vec(), std.to_vec()));
        self
    }

    /// What the last short batch of an epoch becomes (default: dropped).
    pub fn last_batch(mut self, last: LastBatch) -> Self {
        self.last = last;
        self
    }

    /// The blobs fed (default `data` and `label`).
    pub fn names(mut self, data: &str, label: &str) -> Self {
        self.names = (data.to_owned(), label.to_owned());
        self
    }

    /// Starts at step `step` (to resume: the batches continue as if steps
    /// `0..step` had been drawn).
    pub fn start_at(mut self, step: u64) -> Self {
        self.step = step;
        self
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Steps in one epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        let (n, b) = (self.len() as u64, self.batch.max(1) as u64);
        match self.last {
            LastBatch::Drop => n / b,
            LastBatch::Pad => n.div_ceil(b),
        }
    }

    /// The sample positions of step `step`'s batch.
    pub fn indices(&mut self, step: u64) -> Result<Vec<usize>> {
        self.check()?;
        let per_epoch = self.steps_per_epoch();
        let (epoch, within) = (step / per_epoch, (step % per_epoch) as usize);
        let n = self.len();
        let seed = self.seed;
        if self.order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut p: Vec<usize> = (0..n).collect();
            if let Some(seed) = seed {
                let mut rng = Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x1A_5EED);
                for i in (1..n).rev() {
                    p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
            }
            self.order = Some((epoch, p));
        }
        let order = &self.order.as_ref().expect("set above").1;
        Ok((0..self.batch)
            .map(|j| order[(within * self.batch + j) % n])
            .collect())
    }

    /// The batch tensors of `indices`.
    pub fn gather(&self, indices: &[usize]) -> Result<Vec<(String, Tensor)>> {
        self.check()?;
        let per = self.sample.numel();
        let channels = self.sample.dims().first().copied().unwrap_or(1).max(1);
        let plane = per / channels;
        let mut data = Vec::with_capacity(indices.len() * per);
        for &i in indices {
            let at = i * per..(i + 1) * per;
            match &self.values {
                Values::F32(v) => data.extend_from_slice(&v[at]),
                Values::U8(v) => data.extend(v[at].iter().map(|&b| f32::from(b) / 255.0)),
            }
        }
        if let Some((mean, std)) = &self.mean_std {
            let pick = |v: &[f32], c: usize| if v.len() == 1 { v[0] } else { v[c] };
            for sample in data.chunks_exact_mut(per.max(1)) {
                for (c, ch) in sample.chunks_mut(plane.max(1)).enumerate() {
                    let (m, s) = (pick(mean, c), pick(std, c));
                    ch.iter_mut().for_each(|x| *x = (*x - m) / s);
                }
            }
        }
        let mut dims = vec![indices.len()];
        dims.extend_from_slice(self.sample.dims());
        let labels = indices.iter().map(|&i| self.labels[i]).collect();
        Ok(vec![
            (
                self.names.0.clone(),
                Tensor::from_vec(dims, data).expect("sized above"),
            ),
            (
                self.names.1.clone(),
                Tensor::from_vec([indices.len()], labels).expect("sized above"),
            ),
        ])
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("in-memory data: {m}")));
        if self.batch == 0 {
            return bad("the batch size must be at least 1".into());
        }
        if self.steps_per_epoch() == 0 {
            return bad(format!(
                "{} samples make no whole batch of {}: use a smaller batch or LastBatch::Pad",
                self.len(),
                self.batch
            ));
        }
        if let Some((mean, std)) = &self.mean_std {
            let c = self.sample.dims().first().copied().unwrap_or(1);
            for (what, v) in [("mean", mean), ("std", std)] {
                if v.len() != 1 && v.len() != c {
                    return bad(format!("{} {what} values for {c} channels", v.len()));
                }
            }
            if std.iter().any(|s| s.is_nan() || *s <= 0.0) || mean.iter().any(|m| !m.is_finite()) {
                return bad(format!(
                    "normalisation needs finite means and std > 0, got {mean:?} and {std:?}"
                ));
            }
        }
        Ok(())
    }
}

fn check_sizes(values: usize, sample: &Shape, labels: usize) -> Result<()> {
    let per = sample.checked_numel().filter(|&p| p > 0);
    match per {
        Some(p) if values == p * labels => Ok(()),
        _ => Err(Error::Config(format!(
            "in-memory data: {values} values do not make {labels} samples of shape {sample}"
        ))),
    }
}

impl InputSource for InMemory {
    fn next_batch(&mut self) -> Result<Vec<(String, Tensor)>> {
        let idx = self.indices(self.step)?;
        let batch = self.gather(&idx)?;
        self.step += 1;
        Ok(batch)
    }
}
