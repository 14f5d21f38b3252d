//! `MaxPool`, `AveragePool` (NCHW, optionally global) and their gradients.
//! Average pooling divides by the number of input elements under the window
//! (padding is not counted).

use super::conv::Window;
use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;
use crate::tensor::Shape;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Max,
    Average,
}

/// Pooling geometry: a fixed window, or the whole plane (`global_pooling = 1`).
#[derive(Clone, Copy)]
pub(crate) struct Pool {
    pub(crate) mode: Mode,
    win: Window,
    global: bool,
}

impl Pool {
    pub(crate) fn parse(op: &OperatorDef, mode: Mode) -> Result<Pool> {
        let global = Args(&op.arg).int("global_pooling", 0)? != 0;
        let win = Window::parse(op, !global)?;
        let (k, p) = (win.kernel, win.pad);
        // As Caffe2 enforces: a window that is all padding pools nothing.
        if !global && (p.0.max(p.2) >= k.0 || p.1.max(p.3) >= k.1) {
            return Err(Error::arg(
                "pad",
                format!("padding {p:?} must be smaller than the pooling window {k:?}"),
            ));
        }
        Ok(Pool { mode, win, global })
    }

    fn window(&self, h: usize, w: usize) -> Window {
        if self.global {
            Window {
                kernel: (h, w),
                stride: (1, 1),
                pad: (0, 0, 0, 0),
            }
        } else {
            self.win
        }
    }

    /// (N·C planes, H, W, window, OH, OW) of input 0.
    pub(crate) fn dims(&self, ctx: &OpContext<'_>) -> Result<(usize, usize, usize, Window, usize, usize)> {
        let x = ctx.input(0)?;
        let &[n, c, h, w] = x.dims() else {
            return Err(Error::shape(ctx.input_name(0), "[N, C, H, W]", x.shape()));
        };
        let win = self.window(h, w);
        let (oh, ow) = win.output(h, w).filter(|_| h > 0 && w > 0).ok_or_else(|| {
            Error::shape(
                ctx.input_name(0),
                format!("planes at least {:?}", win.kernel),
                x.shape(),
            )
        })?;
        Ok((n * c, h, w, win, oh, ow))
    }

    /// Calls `f(oy, ox, y0..y1, x0..x1)` for every output position, with the window
    /// clipped to the plane.
    fn for_each_window(
        &self,
        win: &Window,
        h: usize,
        w: usize,
        oh: usize,
        ow: usize,
        mut f: impl FnMut(usize, (usize, usize), (usize, usize)),
    ) {
        for oy in 0..oh {
            let ys = (oy * win.stride.0) as isize - win.pad.0 as isize;
            let (y0, y1) = (ys.max(0) as usize, ((ys + win.kernel.0 as isize) as usize).min(h));
            for ox in 0..ow {
                let xs = (ox * win.stride.1) as isize - win.pad.1 as isize;
                let (x0, x1) = (xs.max(0) as usize, ((xs + win.kernel.1 as isize) as usize).min(w));
                f(oy * ow + ox, (y0, y1), (x0, x1));
            }
        }
    }
}

/// `MaxPool(X) → Y` and `AveragePool(X) → Y`.
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

impl Kernel for Pooling {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(1..=1)?;
        let p = &self.0;
        let (planes, h, w, win, oh, ow) = p.dims(ctx)?;
        let (x, xd) = ctx.input_f32(0)?;
        let y = ctx.resize_output::<f32>(0, Shape::from([x.dims()[0], x.dims()[1], oh, ow]))?;
        for (yp, xp) in y
            .chunks_exact_mut(oh * ow)
            .zip(xd.chunks_exact(h * w))
            .take(planes)
        {
            p.for_each_window(&win, h, w, oh, ow, |o, (y0, y1), (x0, x1)| {
                let rows = (y0..y1).map(|iy| &xp[iy * w + x0..iy * w + x1]);
                yp[o] = match p.mode {
                    Mode::Max => rows.flatten().copied().fold(f32::NEG_INFINITY, f32::max),
                    Mode::Average => {
                        let n = ((y1 - y0) * (x1 - x0)).max(1) as f32;
                        rows.flatten().sum::<f32>() / n
                    }
                };
            });
        }
        Ok(())
    }
}

impl Kernel for PoolingGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(3..=3)?;
        ctx.expect_outputs(1..=1)?;
        let p = &self.0;
        let (planes, h, w, win, oh, ow) = p.dims(ctx)?;
        let (x, xd) = ctx.input_f32(0)?;
        let (_, yd) = ctx.input_f32(1)?;
        let (dy, dyd) = ctx.input_f32(2)?;
        if dy.numel() != planes * oh * ow || yd.len() != dy.numel() {
            return Err(Error::shape(
                ctx.input_name(2),
                format!("{planes}×{oh}×{ow} elements"),
                dy.shape(),
            ));
        }
        let dx = ctx.resize_output::<f32>(0, x.shape())?;
        dx.fill(0.0);
        for (((dxp, xp), yp), gp) in dx
            .chunks_exact_mut(h * w)
            .zip(xd.chunks_exact(h * w))
            .zip(yd.chunks_exact(oh * ow))
            .zip(dyd.chunks_exact(oh * ow))
        {
            p.for_each_window(&win, h, w, oh, ow, |o, (y0, y1), (x0, x1)| match p.mode {
                Mode::Max => {
                    // The first element equal to the maximum takes the gradient.
                    'found: for iy in y0..y1 {
                        for ix in x0..x1 {
                            if xp[iy * w + ix] == yp[o] {
                                dxp[iy * w + ix] += gp[o];
                                break 'found;
                            }
                        }
                    }
                }
                Mode::Average => {
                    let g = gp[o] / ((y1 - y0) * (x1 - x0)).max(1) as f32;
                    for iy in y0..y1 {
                        dxp[iy * w + x0..iy * w + x1].iter_mut().for_each(|d| *d += g);
                    }
                }
            });
        }
        Ok(())
    }
}
