//! `Sigmoid`, `Tanh` and `Softmax` (no loss), with their gradients, which read
//! the forward output: `XGradient(Y, dY) → dX`.

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

/// Which pointwise activation.
#[derive(Clone, Copy)]
pub(crate) enum Act {
    Sigmoid,
    Tanh,
}

/// `Sigmoid(X) → 1/(1 + e^−X)` or `Tanh(X) → tanh X`.
pub struct Pointwise(pub(crate) Act);

/// `SigmoidGradient(Y, dY) → dY·Y(1 − Y)`, `TanhGradient(Y, dY) → dY(1 − Y²)`.
pub struct PointwiseGradient(pub(crate) Act);

impl Kernel for Pointwise {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(1..=1)?;
        let (x, xd) = ctx.input_f32(0)?;
        let y = ctx.resize_output::<f32>(0, x.shape())?;
        for (y, &x) in y.iter_mut().zip(xd) {
            *y = match self.0 {
                Act::Sigmoid => 1.0 / (1.0 + (-x).exp()),
                Act::Tanh => x.tanh(),
            };
        }
        Ok(())
    }
}

impl Kernel for PointwiseGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(1..=1)?;
        let (y, yd) = ctx.input_f32(0)?;
        let (dy, dyd) = ctx.input_f32(1)?;
        if dy.shape() != y.shape() {
            return Err(Error::shape(ctx.input_name(1), y.shape().to_string(), dy.shape()));
        }
        let dx = ctx.resize_output::<f32>(0, y.shape())?;
        for ((d, &y), &g) in dx.iter_mut().zip(yd).zip(dyd) {
            *d = match self.0 {
                Act::Sigmoid => g * y * (1.0 - y),
                Act::Tanh => g * (1.0 - y * y),
            };
        }
        Ok(())
    }
}

/// (rows, columns) of input 0 split at `axis`.
fn rows(ctx: &OpContext<'_>, axis: usize) -> Result<(usize, usize)> {
    let x = ctx.input(0)?;
    if axis > x.shape().rank() {
        return Err(Error::arg(
            "axis",
            format!("{axis} exceeds the rank of {}", x.shape()),
        ));
    }
    Ok(x.shape().split_at(axis))
}

/// `Softmax(X) → exp(X − max)/Σ` over the dimensions from `axis` (default 1).
pub struct Softmax {
    pub(crate) axis: usize,
}

/// `SoftmaxGradient(Y, dY) → Y ⊙ (dY − Σ dY⊙Y)` per row.
pub struct SoftmaxGradient {
    pub(crate) axis: usize,
}

impl Softmax {
    /// Parses `axis`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Softmax {
            axis: Args(&op.arg).usize("axis", 1)?,
        }))
    }
}

impl SoftmaxGradient {
    /// Parses `axis`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(SoftmaxGradient {
            axis: Args(&op.arg).usize("axis", 1)?,
        }))
    }
}

impl Kernel for Softmax {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(1..=1)?;
        let (_, d) = rows(ctx, self.axis)?;
        let (x, xd) = ctx.input_f32(0)?;
        let y = ctx.resize_output::<f32>(0, x.shape())?;
        for (yr, xr) in y.chunks_exact_mut(d.max(1)).zip(xd.chunks_exact(d.max(1))) {
            softmax_row(xr, yr);
        }
        Ok(())
    }
}

/// `y = softmax(x)` for one row; returns `(max x, Σ exp(x − max))` for the
/// log-softmax. `Softmax` and `SoftmaxWithLoss` share it, so a predictor's
/// probabilities have the training net's bits.
pub(crate) fn softmax_row(x: &[f32], y: &mut [f32]) -> (f32, f32) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (y, &x) in y.iter_mut().zip(x) {
        *y = (x - max).exp();
        sum += *y;
    }
    let inv = 1.0 / sum;
    y.iter_mut().for_each(|y| *y *= inv);
    (max, sum)
}

impl Kernel for SoftmaxGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(1..=1)?;
        let (_, d) = rows(ctx, self.axis)?;
        let (y, yd) = ctx.input_f32(0)?;
        let (dy, dyd) = ctx.input_f32(1)?;
        if dy.shape() != y.shape() {
            return Err(Error::shape(ctx.input_name(1), y.shape().to_string(), dy.shape()));
        }
        let dx = ctx.resize_output::<f32>(0, y.shape())?;
        for ((dr, yr), gr) in dx
            .chunks_exact_mut(d.max(1))
            .zip(yd.chunks_exact(d.max(1)))
            .zip(dyd.chunks_exact(d.max(1)))
        {
            let dot: f32 = yr.iter().zip(gr).map(|(y, g)| y * g).sum();
            for ((d, &y), &g) in dr.iter_mut().zip(yr).zip(gr) {
                *d = y * (g - dot);
            }
        }
        Ok(())
    }
}
