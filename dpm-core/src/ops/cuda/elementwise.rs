//! Elementwise CUDA kernels: `Relu` and its gradient, `Sum`/`Add`, `Scale`,
//! `WeightedSum`, `MomentumSGDUpdate`. Same arguments, in-place pairs and checks
//! as their CPU twins in `ops/cpu`.

use super::{in_place, input, op_gpu, output};
use crate::cuda::args;
use crate::error::{Error, Result};
use crate::ops::cpu::elementwise::{self as cpu, same_shape};
use crate::ops::cpu::optim::Momentum;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

/// `Relu(X) → max(X, 0)`.
pub struct Relu;

impl Kernel for Relu {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(1..=1)?;
        let gpu = op_gpu(ctx)?;
        let (x, xp) = input(ctx, 0, &gpu)?;
        let n = x.numel();
        let yp = output(ctx, 0, &gpu, x.shape().clone())?;
        gpu.launch_elementwise("relu", n, args![xp, yp])
    }
}

/// `ReluGradient(Y, dY) → dX`.
pub struct ReluGradient;

impl Kernel for ReluGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(1..=1)?;
        let gpu = op_gpu(ctx)?;
        let (y, yp) = input(ctx, 0, &gpu)?;
        same_shape(ctx, 1, y.shape())?;
        let (_, dyp) = input(ctx, 1, &gpu)?;
        let dxp = output(ctx, 0, &gpu, y.shape().clone())?;
        gpu.launch_elementwise("relu_grad", y.numel(), args![yp, dyp, dxp])
    }
}

/// `Sum(X0, X1, …) → X0 + X1 + …` and `Add(A, B)`; in place on input 0.
pub struct Sum {
    arity: std::ops::RangeInclusive<usize>,
}

impl Sum {
    /// `Sum` (one or more inputs) or `Add` (two).
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Sum {
            arity: crate::ops::cpu::elementwise::sum_arity(op)?,
        }))
    }
}

impl Kernel for Sum {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(self.arity.clone())?;
        ctx.expect_outputs(1..=1)?;
        let gpu = op_gpu(ctx)?;
        let (shape, yp) = in_place(ctx, 0, &gpu)?;
        let mut others = Vec::with_capacity(ctx.num_inputs());
        for i in 1..ctx.num_inputs() {
            same_shape(ctx, i, &shape)?;
            others.push(input(ctx, i, &gpu)?.1);
        }
        for xp in others {
            gpu.launch_elementwise("add_into", shape.numel(), args![yp, xp])?;
        }
        Ok(())
    }
}

/// `Scale(X) → scale · X`, in place; `require_scalar` as on the CPU.
pub struct Scale(cpu::Scale);

impl Scale {
    /// Parses `scale` and `require_scalar`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Scale(cpu::Scale::parse(op)?)))
    }
}

impl Kernel for Scale {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let scale = self.0.checked_factor(ctx)?;
        let gpu = op_gpu(ctx)?;
        let (shape, yp) = in_place(ctx, 0, &gpu)?;
        if scale == 1.0 {
            return Ok(());
        }
        gpu.launch_elementwise("scale_in_place", shape.numel(), args![yp, scale])
    }
}

/// `WeightedSum(X0, w0, X1, w1, …) → Σ wᵢ·Xᵢ`, in place on X0; the weights are
/// one-element tensors, read on the host (where the optimiser keeps them).
pub struct WeightedSum;

impl Kernel for WeightedSum {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let n = cpu::weighted_sum_arity(ctx)?;
        let gpu = op_gpu(ctx)?;
        let w0 = ctx.input_scalar(1)?;
        let mut terms = Vec::with_capacity(n / 2);
        let (shape, yp) = in_place(ctx, 0, &gpu)?;
        for p in 1..n / 2 {
            same_shape(ctx, 2 * p, &shape)?;
            terms.push((input(ctx, 2 * p, &gpu)?.1, ctx.input_scalar(2 * p + 1)?));
        }
        if w0 != 1.0 {
            gpu.launch_elementwise("scale_in_place", shape.numel(), args![yp, w0])?;
        }
        for (xp, w) in terms {
            gpu.launch_elementwise("axpy", shape.numel(), args![yp, xp, w])?;
        }
        Ok(())
    }
}

/// `MomentumSGDUpdate(grad, moment, lr, param) → (grad, moment, param)`, in place.
pub struct MomentumSgdUpdate(Momentum);

impl MomentumSgdUpdate {
    /// Parses `momentum`, `nesterov`, `weight_decay`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(MomentumSgdUpdate(Momentum::parse(op)?)))
    }
}

impl Kernel for MomentumSgdUpdate {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0), (1, 1), (3, 2)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(4..=4)?;
        ctx.expect_outputs(3..=3)?;
        let gpu = op_gpu(ctx)?;
        let lr = ctx.input_scalar(2)?;
        let (ps, pp) = in_place(ctx, 2, &gpu)?;
        let (gs, gp) = in_place(ctx, 0, &gpu)?;
        let (ms, mp) = in_place(ctx, 1, &gpu)?;
        for (o, s) in [(0, &gs), (1, &ms)] {
            if s.numel() != ps.numel() {
                return Err(Error::shape(ctx.output_name(o), ps.to_string(), s));
            }
        }
        let Momentum {
            momentum,
            nesterov,
            weight_decay,
        } = self.0;
        let nesterov = i32::from(nesterov);
        gpu.launch_elementwise(
            "momentum_sgd",
            ps.numel(),
            args![gp, mp, pp, lr, momentum, weight_decay, nesterov],
        )
    }
}
