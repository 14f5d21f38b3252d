//! `FC` (fully connected) and its gradient, on GEMM.

use super::gemm::{sgemm, Mat};
use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;
use crate::tensor::Shape;

/// `FC(X, W, b) → Y = X·Wᵀ + b`; X is viewed as a matrix split at `axis`, W is N×K.
pub struct Fc {
    axis: usize,
}

/// `FCGradient(X, W, dY) → (dW, db[, dX])`.
pub struct FcGradient {
    axis: usize,
}

impl Fc {
    /// Parses the arguments.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Fc { axis: axis(op)? }))
    }
}

impl FcGradient {
    /// Parses the arguments.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(FcGradient { axis: axis(op)? }))
    }
}

/// Checks X, W (and b) agree, from their shapes alone (the CUDA kernels use it
/// too); returns (M, K, N).
pub(crate) fn dims(ctx: &OpContext<'_>, axis: usize, with_bias: bool) -> Result<(usize, usize, usize)> {
    let x = ctx.input(0)?;
    let w = ctx.input(1)?;
    if axis > x.shape().rank() {
        return Err(Error::arg(
            "axis",
            format!("{axis} exceeds the rank of `{}` {}", ctx.input_name(0), x.shape()),
        ));
    }
    let (m, k) = x.shape().split_at(axis);
    let (n, wk) = w.shape().split_at(1);
    if w.shape().rank() < 2 || wk != k {
        return Err(Error::shape(
            ctx.input_name(1),
            format!("[N, {k}] to match input {}", x.shape()),
            w.shape(),
        ));
    }
    if with_bias {
        let b = ctx.input(2)?;
        if b.numel() != n {
            return Err(Error::shape(ctx.input_name(2), format!("[{n}]"), b.shape()));
        }
    }
    Ok((m, k, n))
}

/// The `axis` argument.
pub(crate) fn axis(op: &OperatorDef) -> Result<usize> {
    Args(&op.arg).usize("axis", 1)
}

impl Kernel for Fc {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=3)?;
        ctx.expect_outputs(1..=1)?;
        let with_bias = ctx.num_inputs() == 3;
        let (m, k, n) = dims(ctx, self.axis, with_bias)?;
        let (x, xd) = ctx.input_f32(0)?;
        let (_, wd) = ctx.input_f32(1)?;
        let mut out_dims = x.dims()[..self.axis].to_vec();
        out_dims.push(n);
        let bias = if with_bias {
            Some(ctx.input_f32(2)?.1)
        } else {
            None
        };
        let y = ctx.resize_output::<f32>(0, Shape::from(out_dims))?;
        let beta = match bias {
            Some(b) => {
                for row in y.chunks_exact_mut(n) {
                    row.copy_from_slice(b);
                }
                1.0
            }
            None => 0.0,
        };
        sgemm(m, n, k, Mat::n(xd), Mat::t(wd), beta, y);
        Ok(())
    }
}

impl Kernel for FcGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(3..=3)?;
        ctx.expect_outputs(2..=3)?;
        let (m, k, n) = dims(ctx, self.axis, false)?;
        let (x, xd) = ctx.input_f32(0)?;
        let (w, wd) = ctx.input_f32(1)?;
        let (dy, dyd) = ctx.input_f32(2)?;
        if dy.numel() != m * n {
            return Err(Error::shape(
                ctx.input_name(2),
                format!("{m}×{n} elements"),
                dy.shape(),
            ));
        }
        let names = &ctx.def().output;
        let outs = ctx.outputs();
        // dW = dYᵀ·X  (N×K)
        sgemm(
            n,
            k,
            m,
            Mat::t(dyd),
            Mat::n(xd),
            0.0,
            outs[0]
                .resize::<f32>(w.shape())
                .map_err(|e| e.with_blob(&names[0]))?,
        );
        // db = column sums of dY
        let db = outs[1].resize::<f32>([n]).map_err(|e| e.with_blob(&names[1]))?;
        db.fill(0.0);
        for row in dyd.chunks_exact(n) {
            for (d, g) in db.iter_mut().zip(row) {
                *d += g;
            }
        }
        if outs.len() == 3 {
            // dX = dY·W  (M×K)
            sgemm(
                m,
                k,
                n,
                Mat::n(dyd),
                Mat::n(wd),
                0.0,
                outs[2]
                    .resize::<f32>(x.shape())
                    .map_err(|e| e.with_blob(&names[2]))?,
            );
        }
        Ok(())
    }
}
