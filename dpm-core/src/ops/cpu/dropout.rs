//! `Dropout(X) → (Y, mask)` and its gradient. In training each element is kept
//! with probability `1 − ratio` and scaled by `1/(1 − ratio)`; with `is_test = 1`
//! Y = X. The mask is drawn from the op's `seed` argument, the full name of its
//! output (`cpu_1/drop`: every replica draws its own, and a seed reproduces a
//! run) and the number of runs so far (so each step draws anew).

use std::sync::atomic::{AtomicU64, Ordering};

use super::rng::{stable_hash, Rng};
use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

/// `Dropout`.
pub struct Dropout {
    ratio: f32,
    is_test: bool,
    seed: u64,
    runs: AtomicU64,
}

impl Dropout {
    /// Parses `ratio` (default 0.5), `is_test`, and the seed: Caffe2's
    /// `DeviceOption.random_seed`, or a `seed` argument.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let a = Args(&op.arg);
        let ratio = a.float("ratio", 0.5)?;
        if !(0.0..1.0).contains(&ratio) {
            return Err(Error::arg("ratio", format!("must be in [0, 1), got {ratio}")));
        }
        Ok(Box::new(Dropout {
            ratio,
            is_test: a.int("is_test", 0)? != 0,
            seed: a.int("seed", super::rng::op_seed(op))? as u64,
            runs: AtomicU64::new(0),
        }))
    }
}

impl Kernel for Dropout {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(1..=2)?;
        let (x, xd) = ctx.input_f32(0)?;
        let keep = 1.0 - self.ratio;
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        let mut rng =
            Rng::new(self.seed ^ stable_hash(ctx.output_name(0)) ^ run.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mask: Vec<f32> = if self.is_test {
            vec![1.0; xd.len()]
        } else {
            (0..xd.len())
                .map(|_| {
                    if rng.uniform() < f64::from(keep) {
                        1.0 / keep
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let y = ctx.resize_output::<f32>(0, x.shape())?;
        for ((y, &x), &m) in y.iter_mut().zip(xd).zip(&mask) {
            *y = x * m;
        }
        if ctx.num_outputs() == 2 {
            ctx.resize_output::<f32>(1, x.shape())?.copy_from_slice(&mask);
        }
        Ok(())
    }
}

/// `DropoutGradient(dY, mask) → dX = dY ⊙ mask` (the mask holds the scale).
pub struct DropoutGradient;

impl Kernel for DropoutGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(1..=1)?;
        let (dy, dyd) = ctx.input_f32(0)?;
        let (m, md) = ctx.input_f32(1)?;
        if m.shape() != dy.shape() {
            return Err(Error::shape(ctx.input_name(1), dy.shape().to_string(), m.shape()));
        }
        let dx = ctx.resize_output::<f32>(0, dy.shape())?;
        for ((d, &g), &m) in dx.iter_mut().zip(dyd).zip(md) {
            *d = g * m;
        }
        Ok(())
    }
}
