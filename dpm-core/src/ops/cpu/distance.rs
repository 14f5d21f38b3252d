//! Per-row losses: `SquaredL2Distance(X, Y) → ½‖x − y‖²`, `L1Distance(X, Y) →
//! ‖x − y‖₁` (rows: the first dimension), and `LabelCrossEntropy(X, label) →
//! −log x[label]` of probabilities; with their gradients
//! `XGradient(X, Y, dD) → (dX, dY)` and `LabelCrossEntropyGradient(X, label, dY) → dX`.

use crate::error::{Error, Result};
use crate::ops::{Kernel, OpContext};

/// Which distance.
#[derive(Clone, Copy)]
pub(crate) enum Norm {
    L2,
    L1,
}

/// `SquaredL2Distance` or `L1Distance`.
pub struct Distance(pub(crate) Norm);

/// Their gradients.
pub struct DistanceGradient(pub(crate) Norm);

/// (rows, columns) of input 0, checking input 1 has its shape.
fn rows(ctx: &OpContext<'_>) -> Result<(usize, usize)> {
    let (x, y) = (ctx.input(0)?, ctx.input(1)?);
    if x.shape() != y.shape() {
        return Err(Error::shape(ctx.input_name(1), x.shape().to_string(), y.shape()));
    }
    Ok(x.shape().split_at(1))
}

impl Kernel for Distance {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(1..=1)?;
        let (n, d) = rows(ctx)?;
        let (_, xd) = ctx.input_f32(0)?;
        let (_, yd) = ctx.input_f32(1)?;
        let out = ctx.resize_output::<f32>(0, [n])?;
        for (o, (xr, yr)) in out
            .iter_mut()
            .zip(xd.chunks_exact(d.max(1)).zip(yd.chunks_exact(d.max(1))))
        {
            *o = match self.0 {
                Norm::L2 => 0.5 * xr.iter().zip(yr).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(),
                Norm::L1 => xr.iter().zip(yr).map(|(a, b)| (a - b).abs()).sum(),
            };
        }
        Ok(())
    }
}

impl Kernel for DistanceGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(3..=3)?;
        ctx.expect_outputs(2..=2)?;
        let (n, d) = rows(ctx)?;
        let (x, xd) = ctx.input_f32(0)?;
        let (_, yd) = ctx.input_f32(1)?;
        let (g, gd) = ctx.input_f32(2)?;
        if g.numel() != n {
            return Err(Error::shape(ctx.input_name(2), format!("[{n}]"), g.shape()));
        }
        let mut dx = vec![0.0f32; xd.len()];
        for (r, ((dr, xr), yr)) in dx
            .chunks_exact_mut(d.max(1))
            .zip(xd.chunks_exact(d.max(1)))
            .zip(yd.chunks_exact(d.max(1)))
            .enumerate()
        {
            for ((o, a), b) in dr.iter_mut().zip(xr).zip(yr) {
                *o = gd[r]
                    * match self.0 {
                        Norm::L2 => a - b,
                        Norm::L1 => (a - b).signum() * f32::from(a != b),
                    };
            }
        }
        ctx.resize_output::<f32>(1, x.shape())?
            .iter_mut()
            .zip(&dx)
            .for_each(|(o, v)| *o = -v);
        ctx.resize_output::<f32>(0, x.shape())?.copy_from_slice(&dx);
        Ok(())
    }
}

/// `LabelCrossEntropy`.
pub struct LabelCrossEntropy;

/// `LabelCrossEntropyGradient`.
pub struct LabelCrossEntropyGradient;

fn labels(ctx: &OpContext<'_>) -> Result<(usize, usize, Vec<usize>)> {
    let x = ctx.input(0)?;
    let (n, d) = x.shape().split_at(1);
    let l = ctx.input_labels(1)?;
    if l.len() != n {
        return Err(Error::shape(
            ctx.input_name(1),
            format!("[{n}]"),
            ctx.input(1)?.shape(),
        ));
    }
    if let Some(&bad) = l.iter().find(|&&v| v >= d) {
        return Err(Error::value(
            ctx.input_name(1),
            format!("label {bad} is not below the number of classes {d}"),
        ));
    }
    Ok((n, d, l))
}

impl Kernel for LabelCrossEntropy {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(1..=1)?;
        let (n, d, l) = labels(ctx)?;
        let (_, xd) = ctx.input_f32(0)?;
        let out = ctx.resize_output::<f32>(0, [n])?;
        for (r, o) in out.iter_mut().enumerate() {
            *o = -xd[r * d + l[r]].max(f32::MIN_POSITIVE).ln();
        }
        Ok(())
    }
}

impl Kernel for LabelCrossEntropyGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(3..=3)?;
        ctx.expect_outputs(1..=1)?;
        let (n, d, l) = labels(ctx)?;
        let (x, xd) = ctx.input_f32(0)?;
        let (g, gd) = ctx.input_f32(2)?;
        if g.numel() != n {
            return Err(Error::shape(ctx.input_name(2), format!("[{n}]"), g.shape()));
        }
        let dx = ctx.resize_output::<f32>(0, x.shape())?;
        dx.fill(0.0);
        for r in 0..n {
            dx[r * d + l[r]] = -gd[r] / xd[r * d + l[r]].max(f32::MIN_POSITIVE);
        }
        Ok(())
    }
}

/// `AveragedLoss(X) → mean of X` (a scalar): per-row losses into the one
/// number a loss is. Its gradient `AveragedLossGradient(X, dY) → dX` is
/// `dY / numel(X)` everywhere.
pub struct AveragedLoss;

/// `AveragedLossGradient`.
pub struct AveragedLossGradient;

impl Kernel for AveragedLoss {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(1..=1)?;
        let (_, xd) = ctx.input_f32(0)?;
        // In f64, then rounded once: the mean of many rows stays exact to f32.
        let mean = if xd.is_empty() {
            0.0
        } else {
            (xd.iter().map(|&v| f64::from(v)).sum::<f64>() / xd.len() as f64) as f32
        };
        ctx.resize_output::<f32>(0, [])?[0] = mean;
        Ok(())
    }
}

impl Kernel for AveragedLossGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(1..=1)?;
        let dy = ctx.input_scalar(1)?;
        let x = ctx.input(0)?.shape().clone();
        let n = x.numel().max(1) as f32;
        ctx.resize_output::<f32>(0, x)?.fill(dy / n);
        Ok(())
    }
}
