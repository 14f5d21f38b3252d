//! Convolution and pooling on cuDNN, forward and gradient. Arguments are parsed
//! by the CPU kernels' parsers, so both devices accept exactly the same nets.

use super::{input, op_gpu, output};
use crate::cuda::{ConvShape, Gpu, PoolMode, PoolShape};
use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::cpu::conv::{self as cpu_conv, Window};
use crate::ops::cpu::pool::{Mode, Pool};
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

/// cuDNN's 2-D descriptors pad symmetrically.
fn symmetric_pad(win: &Window, blob: &str) -> Result<(usize, usize)> {
    let (t, l, b, r) = win.pad;
    if t != b || l != r {
        return Err(Error::value(
            blob,
            format!("padding (top {t}, left {l}, bottom {b}, right {r}) must be symmetric on CUDA devices"),
        ));
    }
    Ok((t, l))
}

fn conv_shape(ctx: &OpContext<'_>, win: &Window, groups: usize, deterministic: bool) -> Result<ConvShape> {
    let d = cpu_conv::dims(ctx, win, groups)?;
    Ok(ConvShape {
        n: d.n,
        c: d.c,
        h: d.h,
        w: d.w,
        m: d.m,
        kernel: win.kernel,
        stride: win.stride,
        pad: symmetric_pad(win, ctx.input_name(0))?,
        groups: d.groups,
        oh: d.oh,
        ow: d.ow,
        deterministic,
    })
}

/// `Conv(X, W[, b]) → Y`, NCHW.
pub struct Conv {
    win: Window,
    groups: usize,
    deterministic: bool,
}

/// `ConvGradient(X, W, dY) → (dW[, db][, dX])`.
pub struct ConvGradient {
    win: Window,
    groups: usize,
    bias: bool,
    deterministic: bool,
}

impl Conv {
    /// Parses the window, `group` and `deterministic`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Conv {
            win: Window::parse(op, true)?,
            groups: cpu_conv::groups(op)?,
            deterministic: deterministic(op)?,
        }))
    }
}

impl ConvGradient {
    /// Parses the window, `group`, `no_bias` and `deterministic`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(ConvGradient {
            win: Window::parse(op, true)?,
            groups: cpu_conv::groups(op)?,
            bias: Args(&op.arg).int("no_bias", 0)? == 0,
            deterministic: deterministic(op)?,
        }))
    }
}

/// Caffe2's `deterministic` argument: only cuDNN algorithms that give the same
/// bits on every run (slower for some shapes). Off by default, as in Caffe2 and
/// PyTorch; [`ModelHelper::set_deterministic`](crate::model::ModelHelper::set_deterministic)
/// sets it on every convolution of a model.
fn deterministic(op: &OperatorDef) -> Result<bool> {
    Ok(Args(&op.arg).int("deterministic", 0)? != 0)
}

fn with_dnn<R>(gpu: &Gpu, f: impl FnOnce(&mut crate::cuda::Dnn) -> Result<R>) -> Result<R> {
    let mut dnn = gpu.dnn()?;
    f(dnn.as_mut().expect("created by dnn()"))
}

impl Kernel for Conv {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=3)?;
        ctx.expect_outputs(1..=1)?;
        let gpu = op_gpu(ctx)?;
        let s = conv_shape(ctx, &self.win, self.groups, self.deterministic)?;
        let (_, xp) = input(ctx, 0, &gpu)?;
        let (_, wp) = input(ctx, 1, &gpu)?;
        let bp = if ctx.num_inputs() == 3 {
            let (b, bp) = input(ctx, 2, &gpu)?;
            if b.numel() != s.m {
                return Err(Error::shape(ctx.input_name(2), format!("[{}]", s.m), b.shape()));
            }
            Some(bp)
        } else {
            None
        };
        let yp = output(ctx, 0, &gpu, [s.n, s.m, s.oh, s.ow])?;
        if s.n * s.m * s.oh * s.ow == 0 {
            return Ok(());
        }
        with_dnn(&gpu, |dnn| {
            dnn.conv_forward(&gpu, &s, xp, wp, yp)?;
            match bp {
                Some(bp) => dnn.add_bias(&gpu, (s.n, s.m, s.oh, s.ow), bp, yp),
                None => Ok(()),
            }
        })
    }
}

impl Kernel for ConvGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(3..=3)?;
        let with_dx = ctx.num_outputs() == 2 + usize::from(self.bias);
        ctx.expect_outputs((1 + usize::from(self.bias))..=(2 + usize::from(self.bias)))?;
        let gpu = op_gpu(ctx)?;
        let s = conv_shape(ctx, &self.win, self.groups, self.deterministic)?;
        let (x, xp) = input(ctx, 0, &gpu)?;
        let (w, wp) = input(ctx, 1, &gpu)?;
        let (dy, dyp) = input(ctx, 2, &gpu)?;
        if dy.dims() != [s.n, s.m, s.oh, s.ow] {
            return Err(Error::shape(
                ctx.input_name(2),
                format!("[{}, {}, {}, {}]", s.n, s.m, s.oh, s.ow),
                dy.shape(),
            ));
        }
        let dwp = output(ctx, 0, &gpu, w.shape().clone())?;
        let dbp = if self.bias {
            Some(output(ctx, 1, &gpu, [s.m])?)
        } else {
            None
        };
        let dxp = if with_dx {
            Some(output(ctx, 1 + usize::from(self.bias), &gpu, x.shape().clone())?)
        } else {
            None
        };
        with_dnn(&gpu, |dnn| {
            if let Some(dbp) = dbp {
                dnn.bias_grad(&gpu, (s.n, s.m, s.oh, s.ow), dyp, dbp)?;
            }
            dnn.conv_backward(&gpu, &s, (xp, wp, dyp), dwp, dxp)
        })
    }
}

/// `MaxPool(X) → Y` and `AveragePool(X) → Y` (padding not counted in the mean).
pub struct Pooling(Pool);

/// `MaxPoolGradient(X, Y, dY) → dX` and `AveragePoolGradient(X, Y, dY) → dX`.
pub struct PoolingGradient(Pool);

impl Pooling {
    /// `MaxPool`.
    pub fn max(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Pooling(Pool::parse(op, Mode::Max)?)))
    }

    /// `AveragePool`.
    pub fn average(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Pooling(Pool::parse(op, Mode::Average)?)))
    }
}

impl PoolingGradient {
    /// `MaxPoolGradient`.
    pub fn max(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(PoolingGradient(Pool::parse(op, Mode::Max)?)))
    }

    /// `AveragePoolGradient`.
    pub fn average(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(PoolingGradient(Pool::parse(op, Mode::Average)?)))
    }
}

fn pool_shape(ctx: &OpContext<'_>, p: &Pool) -> Result<PoolShape> {
    let (_, h, w, win, oh, ow) = p.dims(ctx)?;
    let x = ctx.input(0)?;
    Ok(PoolShape {
        mode: match p.mode {
            Mode::Max => PoolMode::Max,
            Mode::Average => PoolMode::Average,
        },
        n: x.dims()[0],
        c: x.dims()[1],
        h,
        w,
        kernel: win.kernel,
        stride: win.stride,
        pad: symmetric_pad(&win, ctx.input_name(0))?,
        oh,
        ow,
    })
}

impl Kernel for Pooling {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(1..=1)?;
        let gpu = op_gpu(ctx)?;
        let s = pool_shape(ctx, &self.0)?;
        let (_, xp) = input(ctx, 0, &gpu)?;
        let yp = output(ctx, 0, &gpu, [s.n, s.c, s.oh, s.ow])?;
        if s.n * s.c == 0 {
            return Ok(());
        }
        with_dnn(&gpu, |dnn| dnn.pool_forward(&gpu, &s, xp, yp))
    }
}

impl Kernel for PoolingGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(3..=3)?;
        ctx.expect_outputs(1..=1)?;
        let gpu = op_gpu(ctx)?;
        let s = pool_shape(ctx, &self.0)?;
        let (x, xp) = input(ctx, 0, &gpu)?;
        let (y, yp) = input(ctx, 1, &gpu)?;
        let (dy, dyp) = input(ctx, 2, &gpu)?;
        let expect = [s.n, s.c, s.oh, s.ow];
        for (i, t) in [(1, y), (2, dy)] {
            if t.dims() != expect {
                return Err(Error::shape(ctx.input_name(i), format!("{expect:?}"), t.shape()));
            }
        }
        let dxp = output(ctx, 0, &gpu, x.shape().clone())?;
        if s.n * s.c == 0 {
            return Ok(());
        }
        with_dnn(&gpu, |dnn| dnn.pool_backward(&gpu, &s, (xp, yp, dyp), dxp))
    }
}
