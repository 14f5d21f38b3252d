//! `MatMul(A, B) → op(A)·op(B)` for matrices (`trans_a`, `trans_b`),
//! `BatchMatMul` the same for each matrix of a batch (equal leading dimensions), and
//! `Transpose(X) → X` with its dimensions permuted by `axes` (default: reversed).
//! Both differentiate into themselves.

use super::gemm::{sgemm, Mat};
use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

/// `MatMul`, or `BatchMatMul` when `batched`.
pub struct MatMul {
    trans_a: bool,
    trans_b: bool,
    batched: bool,
}

impl MatMul {
    /// Parses `trans_a`, `trans_b`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Self::parse(op, false)
    }

    /// `BatchMatMul`: parses `trans_a`, `trans_b`; `broadcast` (batches of
    /// different shapes) is refused.
    pub fn create_batched(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        if Args(&op.arg).int("broadcast", 0)? != 0 {
            return Err(Error::arg(
                "broadcast",
                "BatchMatMul with broadcast is not supported: give A and B the same batch dimensions",
            ));
        }
        Self::parse(op, true)
    }

    fn parse(op: &OperatorDef, batched: bool) -> Result<Box<dyn Kernel>> {
        let a = Args(&op.arg);
        Ok(Box::new(MatMul {
            trans_a: a.int("trans_a", 0)? != 0,
            trans_b: a.int("trans_b", 0)? != 0,
            batched,
        }))
    }
}

impl Kernel for MatMul {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(1..=1)?;
        let (a, ad) = ctx.input_f32(0)?;
        let (b, bd) = ctx.input_f32(1)?;
        let (da, db) = (a.dims(), b.dims());
        let rank = if self.batched { da.len().max(2) } else { 2 };
        if da.len() != rank || db.len() != rank || (self.batched && da[..rank - 2] != db[..rank - 2]) {
            let want = if self.batched {
                format!("a batch of matrices like `{}` ({})", ctx.input_name(0), a.shape())
            } else {
                "a matrix".into()
            };
            let (bad, shape) = if da.len() != rank {
                (0, a.shape())
            } else {
                (1, b.shape())
            };
            return Err(Error::shape(ctx.input_name(bad), want, shape));
        }
        let lead = &da[..rank - 2];
        let batch: usize = lead.iter().product();
        let (ar, ac, br, bc) = (da[rank - 2], da[rank - 1], db[rank - 2], db[rank - 1]);
        let (m, k) = if self.trans_a { (ac, ar) } else { (ar, ac) };
        let (kb, n) = if self.trans_b { (bc, br) } else { (br, bc) };
        if k != kb {
            return Err(Error::shape(
                ctx.input_name(1),
                format!("{k} rows (after trans_b)"),
                b.shape(),
            ));
        }
        let mat = |d, t| if t { Mat::t(d) } else { Mat::n(d) };
        let mut out = lead.to_vec();
        out.extend([m, n]);
        let c = ctx.resize_output::<f32>(0, out)?;
        if m * n == 0 {
            return Ok(());
        }
        for (i, c) in c.chunks_exact_mut(m * n).enumerate().take(batch) {
            let (a, b) = (&ad[i * ar * ac..][..ar * ac], &bd[i * br * bc..][..br * bc]);
            sgemm(m, n, k, mat(a, self.trans_a), mat(b, self.trans_b), 0.0, c);
        }
        Ok(())
    }
}

/// `Transpose`.
pub struct Transpose {
    axes: Option<Vec<usize>>,
}

impl Transpose {
    /// Parses `axes`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let axes = match Args(&op.arg).ints("axes") {
            None => None,
            Some(a) => Some(
                a.iter()
                    .map(|&v| {
                        usize::try_from(v).map_err(|_| Error::arg("axes", format!("negative axis {v}")))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        Ok(Box::new(Transpose { axes }))
    }
}

impl Kernel for Transpose {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(1..=1)?;
        let (x, xd) = ctx.input_f32(0)?;
        let dims = x.dims().to_vec();
        let r = dims.len();
        let axes = self.axes.clone().unwrap_or_else(|| (0..r).rev().collect());
        let mut seen = vec![false; r];
        if axes.len() != r
            || axes
                .iter()
                .any(|&a| a >= r || std::mem::replace(&mut seen[a], true))
        {
            return Err(Error::arg(
                "axes",
                format!("{axes:?} is not a permutation of the {r} dimensions"),
            ));
        }
        let out_dims: Vec<usize> = axes.iter().map(|&a| dims[a]).collect();
        // Strides of the input, read in the output's order.
        let mut stride = vec![1usize; r];
        for i in (0..r.saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * dims[i + 1];
        }
        let in_stride: Vec<usize> = axes.iter().map(|&a| stride[a]).collect();
        let y = ctx.resize_output::<f32>(0, out_dims.clone())?;
        let mut idx = vec![0usize; r];
        for v in y.iter_mut() {
            *v = xd[idx.iter().zip(&in_stride).map(|(i, s)| i * s).sum::<usize>()];
            for d in (0..r).rev() {
                idx[d] += 1;
                if idx[d] < out_dims[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(())
    }
}
