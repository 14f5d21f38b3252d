//! The batch loader: one reader shared by all devices. A background thread
//! prepares the next batches (shuffle, optional random crop and flip, normalise)
//! while the trainer computes. The batch of step `t` depends only on the seed and
//! `t`, so a run resumed at step `t` sees exactly the batches it would have.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::Dataset;
use crate::error::{Error, Result};
use crate::ops::cpu::rng::Rng;
use crate::parallel::InputSource;
use crate::tensor::Tensor;

/// Per-channel mean and standard deviation used to normalise pixels (CIFAR-10's).
const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
const STD: [f32; 3] = [0.2470, 0.2435, 0.2616];

/// How the loader draws batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Images per step, over all devices.
    pub batch: usize,
    /// Seed of the shuffling and augmentation.
    pub seed: u64,
    /// Random crop (4-pixel padding) and horizontal flip.
    pub augment: bool,
    /// The first step to produce (non-zero when resuming).
    pub start_step: u64,
    /// Batches prepared ahead.
    pub prefetch: usize,
}

/// Normalised image tensors `[n, C, H, W]` and labels `[n]` for `indices`, with
/// the per-image augmentation drawn from `rng` when `augment` is set.
pub fn batch_tensors(ds: &Dataset, indices: &[usize], augment: Option<&mut Rng>) -> Vec<(String, Tensor)> {
    let [c, h, w] = ds.shape;
    let mut data = vec![0.0f32; indices.len() * c * h * w];
    let mut labels = Vec::with_capacity(indices.len());
    let mut rng = augment;
    for (out, &i) in data.chunks_exact_mut(c * h * w).zip(indices) {
        let img = ds.image(i);
        let (dy, dx, flip) = match rng.as_deref_mut() {
            Some(r) => (
                (r.next_u64() % 9) as i64 - 4,
                (r.next_u64() % 9) as i64 - 4,
                r.next_u64() & 1 == 1,
            ),
            None => (0, 0, false),
        };
        for ch in 0..c {
            let (m, s) = (MEAN[ch % 3], STD[ch % 3]);
            for y in 0..h {
                let sy = y as i64 + dy;
                for x in 0..w {
                    let xx = if flip { w - 1 - x } else { x };
                    let sx = xx as i64 + dx;
                    let v = if sy < 0 || sx < 0 || sy >= h as i64 || sx >= w as i64 {
                        0.0 // zero padding, as torchvision's RandomCrop(padding=4)
                    } else {
                        f32::from(img[(ch * h + sy as usize) * w + sx as usize]) / 255.0
                    };
                    out[(ch * h + y) * w + x] = (v - m) / s;
                }
            }
        }
        labels.push(i32::from(ds.labels[i]));
    }
    let n = indices.len();
    vec![
        (
            "data".to_owned(),
            Tensor::from_vec([n, c, h, w], data).expect("sized above"),
        ),
        (
            "label".to_owned(),
            Tensor::from_vec([n], labels).expect("sized above"),
        ),
    ]
}

/// The dataset positions of step `step`'s batch: epochs are seeded shuffles of
/// the whole set, concatenated.
struct Schedule {
    n: usize,
    seed: u64,
    epoch: Option<(u64, Vec<usize>)>,
}

impl Schedule {
    fn permutation(&mut self, epoch: u64) -> &[usize] {
        if self.epoch.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut p: Vec<usize> = (0..self.n).collect();
            let mut rng = Rng::new(self.seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
            for i in (1..self.n).rev() {
                p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            self.epoch = Some((epoch, p));
        }
        &self.epoch.as_ref().expect("set above").1
    }

    fn indices(&mut self, step: u64, batch: usize) -> Vec<usize> {
        let n = self.n as u64;
        (0..batch as u64)
            .map(|j| {
                let pos = step * batch as u64 + j;
                self.permutation(pos / n)[(pos % n) as usize]
            })
            .collect()
    }
}

/// A prefetching batch source for [`crate::parallel::Trainer`].
pub struct Loader {
    rx: Receiver<Vec<(String, Tensor)>>,
    worker: Option<JoinHandle<()>>,
}

impl Loader {
    /// Starts the prefetch thread over `ds`.
    pub fn new(ds: Arc<Dataset>, cfg: LoaderConfig) -> Result<Loader> {
        if ds.is_empty() || cfg.batch == 0 {
            return Err(Error::Config(
                "the loader needs a non-empty dataset and a batch of at least one image".into(),
            ));
        }
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let worker = std::thread::Builder::new()
            .name("dpm-loader".into())
            .spawn(move || {
                let mut sched = Schedule {
                    n: ds.len(),
                    seed: cfg.seed,
                    epoch: None,
                };
                for step in cfg.start_step.. {
                    let idx = sched.indices(step, cfg.batch);
                    let mut rng = Rng::new(cfg.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA116);
                    let batch = batch_tensors(&ds, &idx, cfg.augment.then_some(&mut rng));
                    if tx.send(batch).is_err() {
                        return; // the trainer is gone
                    }
                }
            })
            .map_err(|e| Error::Config(format!("cannot start the loader thread: {e}")))?;
        Ok(Loader {
            rx,
            worker: Some(worker),
        })
    }
}

impl InputSource for Loader {
    fn next_batch(&mut self) -> Result<Vec<(String, Tensor)>> {
        self.rx
            .recv()
            .map_err(|_| Error::Config("the data loader thread stopped".into()))
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel makes the thread's next send fail; then join it.
        let (_, dead) = sync_channel(1);
        drop(std::mem::replace(&mut self.rx, dead));
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
