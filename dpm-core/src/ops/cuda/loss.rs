//! `SoftmaxWithLoss`, its gradient, and `Accuracy`. Labels are checked on the
//! host against the number of classes (as on the CPU) before any kernel reads them.

use cudarc::driver::LaunchConfig;

use super::{input, labels, op_gpu, output};
use crate::cuda::args;
use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

/// (rows N, classes D) of logits input `x`.
fn rows_and_classes(ctx: &OpContext<'_>, x: usize) -> Result<(usize, usize)> {
    let t = ctx.input(x)?;
    if t.shape().rank() < 1 {
        return Err(Error::shape(ctx.input_name(x), "[N, D]", t.shape()));
    }
    Ok(t.shape().split_at(1))
}

fn one_block() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `SoftmaxWithLoss(X, label) → (P, loss)`: the mean cross-entropy over rows.
pub struct SoftmaxWithLoss;

impl Kernel for SoftmaxWithLoss {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(2..=2)?;
        let gpu = op_gpu(ctx)?;
        let (n, d) = rows_and_classes(ctx, 0)?;
        let (_, xp) = input(ctx, 0, &gpu)?;
        let l = labels(ctx, 1, n, d, &gpu)?;
        let pp = output(ctx, 0, &gpu, [n, d])?;
        let lossp = output(ctx, 1, &gpu, [0usize; 0])?;
        let row_loss = crate::cuda::CudaStorage::alloc(&gpu, crate::tensor::DataType::F32, n)?;
        if n > 0 {
            let blocks = n.min(65_535) as u32;
            gpu.launch(
                "softmax_xent",
                LaunchConfig {
                    grid_dim: (blocks, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
                args![(n as u64)],
                args![xp, l.ptr(), pp, row_loss.ptr(), (d as u64)],
            )?;
        }
        let inv = if n > 0 { 1.0 / n as f32 } else { 0.0 };
        gpu.launch(
            "scaled_sum",
            one_block(),
            args![(n as u64)],
            args![row_loss.ptr(), lossp, inv],
        )
    }
}

/// `SoftmaxWithLossGradient(X, label, P, dloss) → dX`.
pub struct SoftmaxWithLossGradient;

impl Kernel for SoftmaxWithLossGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(4..=4)?;
        ctx.expect_outputs(1..=1)?;
        let gpu = op_gpu(ctx)?;
        let (n, d) = rows_and_classes(ctx, 2)?;
        let (x, _) = input(ctx, 0, &gpu)?;
        let (_, pp) = input(ctx, 2, &gpu)?;
        let (g, gp) = input(ctx, 3, &gpu)?;
        if g.numel() != 1 {
            return Err(Error::shape(ctx.input_name(3), "one element", g.shape()));
        }
        let l = labels(ctx, 1, n, d, &gpu)?;
        let dxp = output(ctx, 0, &gpu, x.shape().clone())?;
        if n == 0 {
            return Ok(());
        }
        gpu.launch_elementwise(
            "softmax_xent_grad",
            n * d,
            args![pp, l.ptr(), gp, dxp, (d as u64), (n as u64)],
        )
    }
}

/// `Accuracy(X, label) → share of rows whose label is among the top_k scores`.
pub struct Accuracy {
    top_k: i32,
}

impl Accuracy {
    /// Parses `top_k`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let top_k = Args(&op.arg).usize("top_k", 1)?;
        if top_k == 0 {
            return Err(Error::arg("top_k", "must be ≥ 1"));
        }
        Ok(Box::new(Accuracy {
            top_k: i32::try_from(top_k).unwrap_or(i32::MAX),
        }))
    }
}

impl Kernel for Accuracy {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(1..=1)?;
        let gpu = op_gpu(ctx)?;
        let (n, d) = rows_and_classes(ctx, 0)?;
        let (_, xp) = input(ctx, 0, &gpu)?;
        let l = labels(ctx, 1, n, d, &gpu)?;
        let outp = output(ctx, 0, &gpu, [0usize; 0])?;
        gpu.launch(
            "accuracy",
            one_block(),
            args![(n as u64)],
            args![xp, l.ptr(), outp, (d as u64), self.top_k],
        )
    }
}
