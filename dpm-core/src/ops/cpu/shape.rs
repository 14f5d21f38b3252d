//! Shape ops: `Flatten`, `Reshape`, and `ResizeLike` (their gradient).

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;
use crate::tensor::Shape;

/// The new shape of a reshaping op, given the input's.
enum Target {
    /// `[N, rest]`.
    Flatten,
    /// Caffe2's `shape` argument: `0` copies the input's dim, one `-1` is inferred.
    Dims(Vec<i64>),
    /// The shape of input 1.
    Like,
}

/// `Flatten(X) → [N, ∏ rest]`, `Reshape(X) → shape`, `ResizeLike(X, Ref) → X with Ref's shape`.
pub struct Reshape(Target);

impl Reshape {
    /// `Flatten`.
    pub fn flatten(_: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Reshape(Target::Flatten)))
    }

    /// `Reshape` with a `shape` argument.
    pub fn reshape(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let dims = Args(&op.arg)
            .ints("shape")
            .ok_or_else(|| Error::arg("shape", "required"))?;
        if dims.iter().filter(|&&d| d == -1).count() > 1 || dims.iter().any(|&d| d < -1) {
            return Err(Error::arg("shape", "dims are ≥ 0, with at most one -1"));
        }
        Ok(Box::new(Reshape(Target::Dims(dims.to_vec()))))
    }

    /// `ResizeLike`.
    pub fn like(_: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Reshape(Target::Like)))
    }
}

impl Kernel for Reshape {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(if matches!(self.0, Target::Like) {
            2..=2
        } else {
            1..=1
        })?;
        // Caffe2's Reshape also gives the old shape (int64), for its gradient.
        let with_old = matches!(self.0, Target::Dims(_));
        ctx.expect_outputs(if with_old { 1..=2 } else { 1..=1 })?;
        let old = ctx.output(0).shape().clone();
        let numel = old.numel();
        let new: Shape = match &self.0 {
            Target::Flatten => {
                let n = old.dims().first().copied().unwrap_or(1);
                Shape::from([n, numel.checked_div(n).unwrap_or(0)])
            }
            Target::Like => ctx.input(1)?.shape().clone(),
            Target::Dims(d) => {
                let mut dims: Vec<usize> = Vec::with_capacity(d.len());
                for (i, &v) in d.iter().enumerate() {
                    dims.push(match v {
                        0 => *old.dims().get(i).ok_or_else(|| {
                            Error::arg("shape", format!("0 at {i} copies a dim {old} lacks"))
                        })?,
                        -1 => 1,
                        v => v as usize,
                    });
                }
                if let Some(i) = d.iter().position(|&v| v == -1) {
                    let known = dims
                        .iter()
                        .try_fold(1usize, |n, &d| n.checked_mul(d))
                        .unwrap_or(0);
                    if known == 0 || !numel.is_multiple_of(known) {
                        return Err(Error::shape(
                            ctx.input_name(0),
                            format!("a size divisible into {d:?}"),
                            &old,
                        ));
                    }
                    dims[i] = numel / known;
                }
                Shape::from(dims)
            }
        };
        let name = ctx.input_name(0);
        if !ctx.output(0).reshape(new.clone()) {
            return Err(Error::shape(
                name,
                format!("{} elements to become {new}", new.numel()),
                &old,
            ));
        }
        if ctx.num_outputs() == 2 {
            let dims: Vec<i64> = old.dims().iter().map(|&d| d as i64).collect();
            ctx.resize_output::<i64>(1, [dims.len()])?.copy_from_slice(&dims);
        }
        Ok(())
    }
}
