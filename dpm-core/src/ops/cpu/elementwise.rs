//! Elementwise ops: `Relu`, `Sum`, `Add`, `Scale`, `Copy`, `WeightedSum`,
//! `StopGradient`, and the gradient `ReluGradient`.

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

/// Checks input `i` has the same shape as input 0.
/// Checks input `i` has `shape` (the CUDA kernels use it too).
pub(crate) fn same_shape(ctx: &OpContext<'_>, i: usize, shape: &crate::tensor::Shape) -> Result<()> {
    let t = ctx.input(i)?;
    if t.shape() != shape {
        return Err(Error::shape(ctx.input_name(i), shape.to_string(), t.shape()));
    }
    Ok(())
}

/// `Relu(X) → max(X, 0)`.
pub struct Relu;

impl Kernel for Relu {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(1..=1)?;
        let (x, xd) = ctx.input_f32(0)?;
        let y = ctx.resize_output::<f32>(0, x.shape())?;
        for (y, &x) in y.iter_mut().zip(xd) {
            *y = relu(x);
        }
        Ok(())
    }
}

/// `max(x, 0)`, NaN propagating (f32::max would turn it into 0 and hide it).
/// Shared with the fused batch norm, which must give the same bits.
#[inline(always)]
pub(crate) fn relu(x: f32) -> f32 {
    if x > 0.0 || x.is_nan() {
        x
    } else {
        0.0
    }
}

/// `dy · [y > 0]`, the gradient of [`relu`] given its output `y`.
#[inline(always)]
pub(crate) fn relu_grad(y: f32, dy: f32) -> f32 {
    if y > 0.0 {
        dy
    } else {
        0.0
    }
}

/// `ReluGradient(Y, dY) → dX = dY · [Y > 0]`.
pub struct ReluGradient;

impl Kernel for ReluGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(1..=1)?;
        let (y, yd) = ctx.input_f32(0)?;
        same_shape(ctx, 1, y.shape())?;
        let (_, dyd) = ctx.input_f32(1)?;
        let dx = ctx.resize_output::<f32>(0, y.shape())?;
        for ((dx, &y), &dy) in dx.iter_mut().zip(yd).zip(dyd) {
            *dx = relu_grad(y, dy);
        }
        Ok(())
    }
}

/// `Sum(X0, X1, …) → Y`, all of one shape (also `Add(A, B)`). Accumulates into
/// output 0 in place when Y is X0, so gradient accumulation allocates nothing;
/// otherwise writes `X0 + X1` in one pass, then adds the rest.
pub struct Sum {
    arity: std::ops::RangeInclusive<usize>,
}

/// The inputs `Sum` (one or more) or `Add` (exactly two of one shape) takes.
pub(crate) fn sum_arity(op: &OperatorDef) -> Result<std::ops::RangeInclusive<usize>> {
    if op.op_type() != "Add" {
        return Ok(1..=usize::MAX);
    }
    if Args(&op.arg).int("broadcast", 0)? != 0 {
        return Err(Error::arg(
            "broadcast",
            "broadcasting Add is not supported; give both inputs one shape",
        ));
    }
    Ok(2..=2)
}

impl Sum {
    /// `Sum` (one or more inputs) or `Add` (two).
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Sum {
            arity: sum_arity(op)?,
        }))
    }
}

impl Kernel for Sum {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0)]
    }

    fn reads_in_place_source(&self) -> bool {
        true
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(self.arity.clone())?;
        ctx.expect_outputs(1..=1)?;
        // X0 is its own blob (Y = X0 + X1 + …, written in one pass) or already
        // in Y (accumulated into in place).
        let first = ctx.in_place_input(0);
        let shape = first.map_or_else(|| ctx.output(0).shape().clone(), |x| x.shape().clone());
        let others = (1..ctx.num_inputs())
            .map(|i| {
                same_shape(ctx, i, &shape)?;
                ctx.input_data::<f32>(i)
            })
            .collect::<Result<crate::ops::OpList<_>>>()?;
        let mut rest = &others[..];
        let y = match first {
            Some(_) => {
                let x0 = ctx.input_data::<f32>(0)?;
                let y = ctx.resize_output::<f32>(0, shape)?;
                match others.split_first() {
                    Some((x1, more)) => {
                        for ((y, &a), &b) in y.iter_mut().zip(x0).zip(*x1) {
                            *y = a + b;
                        }
                        rest = more;
                    }
                    None => y.copy_from_slice(x0),
                }
                y
            }
            None => ctx.output_data::<f32>(0)?,
        };
        for x in rest {
            for (y, x) in y.iter_mut().zip(*x) {
                *y += x;
            }
        }
        Ok(())
    }
}

/// `Sum` (or `Add`) and the `Relu` of its result in one pass (the executor's
/// `Sum+Relu`, see `exec::fuse`): `Y = X0 + X1 + …` and `R = relu(Y)`, both
/// written while a block of Y is in cache. Y is summed in `Sum`'s order, so
/// both outputs have the bits of the pair run apart, which also copied X0
/// into Y before adding to it.
pub struct SumRelu;

/// Elements per block: the partial sums of a block stay in L1 across inputs.
const SUM_BLOCK: usize = 2048;

impl Kernel for SumRelu {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=usize::MAX)?;
        ctx.expect_outputs(2..=2)?;
        let (x0, first) = ctx.input_f32(0)?;
        let shape = x0.shape().clone();
        let others = (1..ctx.num_inputs())
            .map(|i| {
                same_shape(ctx, i, &shape)?;
                ctx.input_data::<f32>(i)
            })
            .collect::<Result<crate::ops::OpList<_>>>()?;
        let names = &ctx.def().output;
        let [y, r] = ctx.outputs() else {
            unreachable!("two outputs checked above")
        };
        let y = y
            .resize::<f32>(shape.clone())
            .map_err(|e| e.with_blob(&names[0]))?;
        let r = r.resize::<f32>(shape).map_err(|e| e.with_blob(&names[1]))?;
        if let [x1] = others[..] {
            for (((y, r), &a), &b) in y.iter_mut().zip(r.iter_mut()).zip(first).zip(x1) {
                *y = a + b;
                *r = relu(*y);
            }
            return Ok(());
        }
        for (k, (yb, rb)) in y.chunks_mut(SUM_BLOCK).zip(r.chunks_mut(SUM_BLOCK)).enumerate() {
            let at = k * SUM_BLOCK;
            yb.copy_from_slice(&first[at..at + yb.len()]);
            for x in &others {
                for (y, &x) in yb.iter_mut().zip(&x[at..]) {
                    *y += x;
                }
            }
            for (r, &y) in rb.iter_mut().zip(&*yb) {
                *r = relu(y);
            }
        }
        Ok(())
    }
}

/// `Scale(X) → scale · X`. With `require_scalar = 1` (set on the loss scaling the
/// parallel layer injects), X must hold exactly one element.
pub struct Scale {
    scale: f32,
    require_scalar: bool,
}

impl Scale {
    /// Parses `scale` and `require_scalar`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Scale::parse(op)?))
    }

    pub(crate) fn parse(op: &OperatorDef) -> Result<Scale> {
        Ok(Scale {
            scale: Args(&op.arg).float("scale", 1.0)?,
            require_scalar: Args(&op.arg).int("require_scalar", 0)? != 0,
        })
    }

    /// The factor, after checking output 0 (which holds X) is a scalar if it must be.
    pub(crate) fn checked_factor(&self, ctx: &mut OpContext<'_>) -> Result<f32> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(1..=1)?;
        if self.require_scalar && ctx.output(0).numel() != 1 {
            let got = ctx.output(0).shape().clone();
            return Err(Error::shape(
                ctx.input_name(0),
                "a scalar loss (one element)",
                &got,
            ));
        }
        Ok(self.scale)
    }
}

impl Kernel for Scale {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let s = self.checked_factor(ctx)?;
        ctx.output_data::<f32>(0)?.iter_mut().for_each(|x| *x *= s);
        Ok(())
    }
}

/// `Copy(X) → X` (any element type); `StopGradient` is the same kernel, with no
/// gradient rule.
pub struct Copy;

impl Kernel for Copy {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(1..=1)
    }
}

/// Checks `WeightedSum`'s (X, w) pairs and single output; returns the input count.
pub(crate) fn weighted_sum_arity(ctx: &OpContext<'_>) -> Result<usize> {
    let n = ctx.num_inputs();
    if n == 0 || !n.is_multiple_of(2) {
        return Err(Error::Arity {
            what: "inputs",
            expected: "an even number (X0, w0, X1, w1, …)".into(),
            got: n,
        });
    }
    ctx.expect_outputs(1..=1)?;
    Ok(n)
}

/// `WeightedSum(X0, w0, X1, w1, …) → Σ wᵢ·Xᵢ`, weights one-element tensors; in
/// place on X0 (the SGD step `param = 1·param + (−lr)·grad`).
pub struct WeightedSum;

impl Kernel for WeightedSum {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let n = weighted_sum_arity(ctx)?;
        let shape = ctx.output(0).shape().clone();
        let w0 = ctx.input_scalar(1)?;
        let terms = (1..n / 2)
            .map(|p| {
                same_shape(ctx, 2 * p, &shape)?;
                Ok((ctx.input_data::<f32>(2 * p)?, ctx.input_scalar(2 * p + 1)?))
            })
            .collect::<Result<crate::ops::OpList<_>>>()?;
        let y = ctx.output_data::<f32>(0)?;
        if w0 != 1.0 {
            y.iter_mut().for_each(|v| *v *= w0);
        }
        for (x, w) in terms {
            for (y, x) in y.iter_mut().zip(x) {
                *y += w * x;
            }
        }
        Ok(())
    }
}
