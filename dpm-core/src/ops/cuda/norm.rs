//! `SpatialBN` and its gradient on cuDNN (spatial mode). The running statistics
//! are updated by dpm's own kernel, as the CPU kernel does (unbiased variance).

use super::{in_place, input, op_gpu, output};
use crate::cuda::args;
use crate::error::{Error, Result};
use crate::ops::cpu::norm::{self as cpu_norm, Params};
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

/// (N, C, H·W, 1): input 0 as cuDNN's 4-D NCHW, checked as on the CPU.
fn dims(ctx: &OpContext<'_>, per_channel: &[usize]) -> Result<(usize, usize, usize, usize)> {
    let (n, c, hw) = cpu_norm::dims(ctx, per_channel)?;
    Ok((n, c, hw, 1))
}

/// `SpatialBN`: training `(X, scale, bias, rm, rv) → (Y, rm, rv, mean, inv_std)`,
/// inference `(X, scale, bias, mean, var) → Y`.
pub struct SpatialBn {
    p: Params,
    pairs: Vec<(usize, usize)>,
}

impl SpatialBn {
    /// Parses `is_test`, `epsilon`, `momentum`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let p = Params::parse(op)?;
        let pairs = if p.is_test { vec![] } else { vec![(3, 1), (4, 2)] };
        Ok(Box::new(SpatialBn { p, pairs }))
    }
}

impl Kernel for SpatialBn {
    fn in_place(&self) -> &[(usize, usize)] {
        &self.pairs
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(5..=5)?;
        ctx.expect_outputs(if self.p.is_test { 1..=1 } else { 5..=5 })?;
        let gpu = op_gpu(ctx)?;
        let per_channel: &[usize] = if self.p.is_test { &[1, 2, 3, 4] } else { &[1, 2] };
        let shape4 = dims(ctx, per_channel)?;
        let (n, c, hw, _) = shape4;
        let (x, xp) = input(ctx, 0, &gpu)?;
        let (_, sp) = input(ctx, 1, &gpu)?;
        let (_, bp) = input(ctx, 2, &gpu)?;
        let eps = f64::from(self.p.epsilon);
        if self.p.is_test {
            let (_, mp) = input(ctx, 3, &gpu)?;
            let (_, vp) = input(ctx, 4, &gpu)?;
            let yp = output(ctx, 0, &gpu, x.shape().clone())?;
            if n * c * hw == 0 {
                return Ok(());
            }
            let mut dnn = gpu.dnn()?;
            return dnn.as_mut().expect("created by dnn()").bn_infer(
                &gpu,
                shape4,
                (xp, sp, bp, mp, vp),
                eps,
                yp,
            );
        }
        if n * hw == 0 {
            return Err(Error::shape(ctx.input_name(0), "a non-empty batch", x.shape()));
        }
        let (rms, rmp) = in_place(ctx, 1, &gpu)?;
        let (rvs, rvp) = in_place(ctx, 2, &gpu)?;
        for (o, s) in [(1, &rms), (2, &rvs)] {
            if s.numel() != c {
                return Err(Error::value(
                    ctx.output_name(o),
                    format!("running statistic must hold {c} values"),
                ));
            }
        }
        let yp = output(ctx, 0, &gpu, x.shape().clone())?;
        let meanp = output(ctx, 3, &gpu, [c])?;
        let invp = output(ctx, 4, &gpu, [c])?;
        {
            let mut dnn = gpu.dnn()?;
            dnn.as_mut().expect("created by dnn()").bn_train(
                &gpu,
                shape4,
                (xp, sp, bp),
                eps,
                yp,
                meanp,
                invp,
            )?;
        }
        let count = (n * hw) as f64;
        let unbias = if count > 1.0 { count / (count - 1.0) } else { 1.0 };
        gpu.launch_elementwise(
            "bn_running",
            c,
            args![rmp, rvp, meanp, invp, self.p.momentum, self.p.epsilon, unbias],
        )
    }
}

/// `SpatialBNGradient(X, scale, dY, saved_mean, saved_inv_std) → (dX, dscale, dbias)`.
pub struct SpatialBnGradient {
    p: Params,
}

impl SpatialBnGradient {
    /// Parses `is_test`, `epsilon`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let p = Params::parse(op)?;
        if p.is_test {
            return Err(Error::arg(
                "is_test",
                "the gradient of batch norm on running statistics has no CUDA kernel yet; \
                 train with is_test = 0 or on CPU devices",
            ));
        }
        Ok(Box::new(SpatialBnGradient { p }))
    }
}

impl Kernel for SpatialBnGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(5..=5)?;
        ctx.expect_outputs(3..=3)?;
        let gpu = op_gpu(ctx)?;
        let shape4 = dims(ctx, &[1, 3, 4])?;
        let (n, c, hw, _) = shape4;
        let (x, xp) = input(ctx, 0, &gpu)?;
        let (_, sp) = input(ctx, 1, &gpu)?;
        let (dy, dyp) = input(ctx, 2, &gpu)?;
        if dy.shape() != x.shape() {
            return Err(Error::shape(ctx.input_name(2), x.shape().to_string(), dy.shape()));
        }
        let (_, mp) = input(ctx, 3, &gpu)?;
        let (_, ip) = input(ctx, 4, &gpu)?;
        let dxp = output(ctx, 0, &gpu, x.shape().clone())?;
        let dsp = output(ctx, 1, &gpu, [c])?;
        let dbp = output(ctx, 2, &gpu, [c])?;
        if n * hw == 0 {
            return Err(Error::shape(ctx.input_name(0), "a non-empty batch", x.shape()));
        }
        let mut dnn = gpu.dnn()?;
        dnn.as_mut().expect("created by dnn()").bn_backward(
            &gpu,
            shape4,
            (xp, sp, dyp, mp, ip),
            f64::from(self.p.epsilon),
            (dxp, dsp, dbp),
        )
    }
}
