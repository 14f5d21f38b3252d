//! `Concat(X0, X1, …) → (Y, split_info)` along `axis` (default 1; the other
//! dimensions must agree), `split_info` holding each input's size on that axis
//! (int32), as Caffe2's; and `Split(X[, split_info]) → (Y0, Y1, …)` by the
//! `split` argument or the `split_info` input. Each is the other's gradient.

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

fn axis(op: &OperatorDef) -> Result<usize> {
    Args(&op.arg).usize("axis", 1)
}

/// (outer, inner) around `axis` of `dims`.
fn around(dims: &[usize], axis: usize) -> (usize, usize) {
    (dims[..axis].iter().product(), dims[axis + 1..].iter().product())
}

/// `Concat`.
pub struct Concat {
    axis: usize,
}

impl Concat {
    /// Parses `axis`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Concat { axis: axis(op)? }))
    }
}

impl Kernel for Concat {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=usize::MAX)?;
        ctx.expect_outputs(1..=2)?;
        let first = ctx.input(0)?;
        let dims = first.dims().to_vec();
        if self.axis >= dims.len() {
            return Err(Error::arg(
                "axis",
                format!("{} is not below the rank of {}", self.axis, first.shape()),
            ));
        }
        let mut sizes = Vec::with_capacity(ctx.num_inputs());
        for i in 0..ctx.num_inputs() {
            let t = ctx.input(i)?;
            let d = t.dims();
            let agree = d.len() == dims.len()
                && d.iter()
                    .zip(&dims)
                    .enumerate()
                    .all(|(k, (a, b))| k == self.axis || a == b);
            if !agree {
                return Err(Error::shape(
                    ctx.input_name(i),
                    format!("{} except on axis {}", first.shape(), self.axis),
                    t.shape(),
                ));
            }
            sizes.push(d[self.axis]);
        }
        let (outer, inner) = around(&dims, self.axis);
        let total: usize = sizes.iter().sum();
        let mut out_dims = dims.clone();
        out_dims[self.axis] = total;
        let parts: Vec<&[f32]> = (0..ctx.num_inputs())
            .map(|i| ctx.input_data::<f32>(i))
            .collect::<Result<_>>()?;
        let y = ctx.resize_output::<f32>(0, out_dims)?;
        let mut at = 0;
        for o in 0..outer {
            for (p, &s) in parts.iter().zip(&sizes) {
                let n = s * inner;
                y[at..at + n].copy_from_slice(&p[o * n..(o + 1) * n]);
                at += n;
            }
        }
        if ctx.num_outputs() == 2 {
            let info: Vec<i32> = sizes.iter().map(|&s| s as i32).collect();
            ctx.resize_output::<i32>(1, [info.len()])?.copy_from_slice(&info);
        }
        Ok(())
    }
}

/// `Split`.
pub struct Split {
    axis: usize,
    split: Option<Vec<usize>>,
}

impl Split {
    /// Parses `axis` and `split`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let split = match Args(&op.arg).ints("split") {
            None => None,
            Some(v) => Some(
                v.iter()
                    .map(|&s| {
                        usize::try_from(s).map_err(|_| Error::arg("split", format!("negative size {s}")))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        Ok(Box::new(Split {
            axis: axis(op)?,
            split,
        }))
    }
}

impl Kernel for Split {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=2)?;
        let (x, xd) = ctx.input_f32(0)?;
        let dims = x.dims().to_vec();
        if self.axis >= dims.len() {
            return Err(Error::arg(
                "axis",
                format!("{} is not below the rank of {}", self.axis, x.shape()),
            ));
        }
        let sizes: Vec<usize> = match (&self.split, ctx.num_inputs()) {
            (Some(s), _) => s.clone(),
            (None, 2) => ctx
                .input_data::<i32>(1)?
                .iter()
                .map(|&s| s.max(0) as usize)
                .collect(),
            (None, _) => {
                let n = ctx.num_outputs();
                if n == 0 || dims[self.axis] % n != 0 {
                    return Err(Error::shape(
                        ctx.input_name(0),
                        format!("axis {} divisible into {n} equal parts", self.axis),
                        x.shape(),
                    ));
                }
                vec![dims[self.axis] / n; n]
            }
        };
        if sizes.len() != ctx.num_outputs() || sizes.iter().sum::<usize>() != dims[self.axis] {
            return Err(Error::value(
                ctx.output_name(0),
                format!(
                    "split sizes {sizes:?} do not cover axis {} of {} with {} outputs",
                    self.axis,
                    x.shape(),
                    ctx.num_outputs()
                ),
            ));
        }
        let (outer, inner) = around(&dims, self.axis);
        let row = dims[self.axis] * inner;
        let mut offset = 0;
        for (k, &s) in sizes.iter().enumerate() {
            let mut d = dims.clone();
            d[self.axis] = s;
            let y = ctx.resize_output::<f32>(k, d)?;
            let n = s * inner;
            for o in 0..outer {
                y[o * n..(o + 1) * n].copy_from_slice(&xd[o * row + offset..o * row + offset + n]);
            }
            offset += n;
        }
        Ok(())
    }
}
