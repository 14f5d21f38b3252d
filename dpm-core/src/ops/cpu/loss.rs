//! Classification losses and metrics: `SoftmaxWithLoss`, its gradient, `Accuracy`.

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;
use crate::tensor::Shape;

/// Logits as an N×D matrix plus N labels, each checked to be < D.
fn logits_and_labels<'a>(ctx: &OpContext<'a>, x: usize, label: usize) -> Result<(usize, usize, Vec<usize>)> {
    let t = ctx.input(x)?;
    if t.shape().rank() < 1 {
        return Err(Error::shape(ctx.input_name(x), "[N, D]", t.shape()));
    }
    let (n, d) = t.shape().split_at(1);
    let labels = ctx.input_labels(label)?;
    if labels.len() != n {
        return Err(Error::shape(
            ctx.input_name(label),
            format!("[{n}] (one label per row of `{}`)", ctx.input_name(x)),
            ctx.input(label)?.shape(),
        ));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= d) {
        return Err(Error::value(
            ctx.input_name(label),
            format!("label {bad} is not below the number of classes {d}"),
        ));
    }
    Ok((n, d, labels))
}

/// `SoftmaxWithLoss(X, label) → (P, loss)`: row softmax and mean cross-entropy.
pub struct SoftmaxWithLoss;

impl Kernel for SoftmaxWithLoss {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(2..=2)?;
        let (n, d, labels) = logits_and_labels(ctx, 0, 1)?;
        let (x, xd) = ctx.input_f32(0)?;
        let names = &ctx.def().output;
        let outs = ctx.outputs();
        let p = outs[0]
            .resize::<f32>(Shape::from([n, d]))
            .map_err(|e| e.with_blob(&names[0]))?;
        let _ = x;
        let mut total = 0.0f64;
        for ((row, prow), &l) in xd.chunks_exact(d).zip(p.chunks_exact_mut(d)).zip(&labels) {
            let (max, sum) = super::activation::softmax_row(row, prow);
            // log-softmax directly, so a confident wrong answer gives a large finite loss.
            total += f64::from(sum.ln() - (row[l] - max));
        }
        let loss = if n > 0 { total / n as f64 } else { 0.0 };
        outs[1]
            .resize::<f32>(Shape::from([]))
            .map_err(|e| e.with_blob(&names[1]))?[0] = loss as f32;
        Ok(())
    }
}

/// `SoftmaxWithLossGradient(X, label, P, dLoss) → dX = (P − onehot(label)) · dLoss / N`.
pub struct SoftmaxWithLossGradient;

impl Kernel for SoftmaxWithLossGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(4..=4)?;
        ctx.expect_outputs(1..=1)?;
        let (n, d, labels) = logits_and_labels(ctx, 2, 1)?;
        let (x, _) = ctx.input_f32(0)?;
        let (_, pd) = ctx.input_f32(2)?;
        let g = ctx.input_scalar(3)?;
        let scale = if n > 0 { g / n as f32 } else { 0.0 };
        let dx = ctx.resize_output::<f32>(0, x.shape())?;
        for ((drow, prow), &l) in dx.chunks_exact_mut(d).zip(pd.chunks_exact(d)).zip(&labels) {
            for (dx, &p) in drow.iter_mut().zip(prow) {
                *dx = p * scale;
            }
            drow[l] -= scale;
        }
        Ok(())
    }
}

/// `Accuracy(P, label) → fraction of rows whose label is among the top_k scores`.
pub struct Accuracy {
    top_k: usize,
}

impl Accuracy {
    /// Parses `top_k` (default 1).
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let top_k = Args(&op.arg).usize("top_k", 1)?;
        if top_k == 0 {
            return Err(Error::arg("top_k", "must be ≥ 1"));
        }
        Ok(Box::new(Accuracy { top_k }))
    }
}

impl Kernel for Accuracy {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(1..=1)?;
        let (n, d, labels) = logits_and_labels(ctx, 0, 1)?;
        let (_, pd) = ctx.input_f32(0)?;
        let correct = pd
            .chunks_exact(d.max(1))
            .zip(&labels)
            .filter(|(row, &l)| {
                // Ties count against the label, as in Caffe2; a row with a NaN
                // score has no ranking and counts as wrong.
                !row.iter().any(|v| v.is_nan()) && row.iter().filter(|&&v| v > row[l]).count() < self.top_k
            })
            .count();
        let acc = if n > 0 { correct as f32 / n as f32 } else { 0.0 };
        ctx.resize_output::<f32>(0, Shape::from([]))?[0] = acc;
        Ok(())
    }
}
