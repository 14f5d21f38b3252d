//! Elementwise ops: `Relu`, `Sum`, `Add`, `Scale`, `Copy`, `WeightedSum`,
//! `StopGradient`, and the gradient `ReluGradient`.

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

use super::isa::{vectorized, Isa};

vectorized! {
    /// `y = relu(x)`.
    pub(crate) fn relu_into(y: &mut [f32], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = relu(x);
        }
    }

    /// `dx = relu_grad(y, dy)`.
    fn relu_grad_into(dx: &mut [f32], y: &[f32], dy: &[f32]) {
        for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
            *dx = relu_grad(y, dy);
        }
    }

    /// `y = a + b`.
    pub(crate) fn add(y: &mut [f32], a: &[f32], b: &[f32]) {
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = a + b;
        }
    }

    /// `y += x`.
    fn add_into(y: &mut [f32], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += x;
        }
    }

    /// `y = a + b` and `r = relu(y)`.
    fn add_relu(y: &mut [f32], r: &mut [f32], a: &[f32], b: &[f32]) {
        for (((y, r), &a), &b) in y.iter_mut().zip(r.iter_mut()).zip(a).zip(b) {
            *y = a + b;
            *r = relu(*y);
        }
    }

    /// `y *= s`.
    fn scale(y: &mut [f32], s: f32) {
        for y in y.iter_mut() {
            *y *= s;
        }
    }

    /// `y += w·x`.
    fn add_scaled(y: &mut [f32], w: f32, x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += w * x;
        }
    }
}

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
        relu_into(Isa::best(), y, xd);
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
        relu_grad_into(Isa::best(), dx, yd, dyd);
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
        let isa = Isa::best();
        let mut rest = &others[..];
        let y = match first {
            Some(_) => {
                let x0 = ctx.input_data::<f32>(0)?;
                let y = ctx.resize_output::<f32>(0, shape)?;
                match others.split_first() {
                    Some((x1, more)) => {
                        add(isa, y, x0, x1);
                        rest = more;
                    }
                    None => y.copy_from_slice(x0),
                }
                y
            }
            None => ctx.output_data::<f32>(0)?,
        };
        for x in rest {
            add_into(isa, y, x);
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
        let isa = Isa::best();
        if let [x1] = others[..] {
            add_relu(isa, y, r, first, x1);
            return Ok(());
        }
        for (k, (yb, rb)) in y.chunks_mut(SUM_BLOCK).zip(r.chunks_mut(SUM_BLOCK)).enumerate() {
            let at = k * SUM_BLOCK;
            yb.copy_from_slice(&first[at..at + yb.len()]);
            for x in &others {
                add_into(isa, yb, &x[at..]);
            }
            relu_into(isa, rb, yb);
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
        scale(Isa::best(), ctx.output_data::<f32>(0)?, s);
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
        let isa = Isa::best();
        if w0 != 1.0 {
            scale(isa, y, w0);
        }
        for (x, w) in terms {
            add_scaled(isa, y, w, x);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::isa::testing::{portable, same_bits, same_bits_into, values, Writes, LENGTHS};

    #[test]
    fn every_instruction_set_gives_the_portable_bits() {
        for n in LENGTHS {
            let (a, b) = (values(n, 1), values(n, 2));
            let cases: [(&str, Writes<'_>); 5] = [
                ("relu", &|isa, y| relu_into(isa, y, &a)),
                ("relu gradient", &|isa, y| relu_grad_into(isa, y, &a, &b)),
                ("add", &|isa, y| add(isa, y, &a, &b)),
                ("add into", &|isa, y| add_into(isa, y, &a)),
                ("scale", &|isa, y| scale(isa, y, -0.75)),
            ];
            for (what, f) in cases {
                same_bits_into(what, n, f);
            }
            same_bits_into("add scaled", n, &|isa, y| add_scaled(isa, y, 0.3, &a));
            let both = |isa: Isa| {
                let (mut y, mut r) = (values(n, 3), values(n, 4));
                add_relu(isa, &mut y, &mut r, &a, &b);
                y.extend(r);
                y
            };
            same_bits("add and relu", &both(portable()), both);
        }
    }

    #[test]
    fn the_elementwise_functions_compute_what_they_say() {
        // The portable variant against the formulas (NaN kept by relu, not by
        // its gradient's mask).
        let (a, b) = ([1.0f32, -2.0, f32::NAN, 0.0], [0.5f32, 4.0, 1.0, -3.0]);
        let mut y = [9.0f32; 4];
        relu_into(portable(), &mut y, &a);
        assert_eq!(y[..2], [1.0, 0.0]);
        assert!(y[2].is_nan() && y[3] == 0.0);
        relu_grad_into(portable(), &mut y, &a, &b);
        assert_eq!(y, [0.5, 0.0, 0.0, 0.0]);
        add(portable(), &mut y, &[1.0, 2.0, 3.0, 4.0], &b);
        assert_eq!(y, [1.5, 6.0, 4.0, 1.0]);
        add_into(portable(), &mut y, &b);
        assert_eq!(y, [2.0, 10.0, 5.0, -2.0]);
        scale(portable(), &mut y, 0.5);
        assert_eq!(y, [1.0, 5.0, 2.5, -1.0]);
        add_scaled(portable(), &mut y, 2.0, &b);
        assert_eq!(y, [2.0, 13.0, 4.5, -7.0]);
        let mut r = [9.0f32; 4];
        add_relu(
            portable(),
            &mut y,
            &mut r,
            &[1.0, -1.0, 0.0, 2.0],
            &[1.0, -1.0, -0.0, -3.0],
        );
        assert_eq!((y, r), ([2.0, -2.0, 0.0, -1.0], [2.0, 0.0, 0.0, 0.0]));
    }
}
