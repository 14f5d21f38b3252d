//! Fills: `ConstantFill` and the seeded random initialisers.
//!
//! A random fill's stream is seeded by its `seed` argument (or the device option's
//! `random_seed`) combined with the *short* name of the output blob, so replica
//! `cpu_1/fc_w` starts equal to `cpu_0/fc_w` and a seed reproduces a run exactly.

use super::rng::{stable_hash, Rng};
use crate::error::{Error, Result};
use crate::graph::{Args, BlobRef};
use crate::ops::{Kernel, OpContext};
use crate::proto::{OperatorDef, TensorDataType};
use crate::tensor::Shape;

fn shape_arg(op: &OperatorDef) -> Result<Option<Shape>> {
    let Some(dims) = Args(&op.arg).ints("shape") else {
        return Ok(None);
    };
    let dims = dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| Error::arg("shape", format!("negative dim {d}"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(Shape::from(dims)))
}

/// The output shape: the `shape` argument, else the shape of the first input.
fn fill_shape(shape: &Option<Shape>, ctx: &OpContext<'_>) -> Result<Shape> {
    match shape {
        Some(s) => Ok(s.clone()),
        None if ctx.num_inputs() > 0 => Ok(ctx.input(0)?.shape().clone()),
        None => Err(Error::arg(
            "shape",
            "a fill needs a `shape` argument or an input to copy the shape of",
        )),
    }
}

/// `ConstantFill`: every element = `value`, of type `dtype` (FLOAT, INT32, INT64).
/// As in Caffe2, an integer `value` is read from the argument's int field (a
/// float one is accepted too).
pub struct ConstantFill {
    shape: Option<Shape>,
    value: f32,
    int_value: i64,
    dtype: TensorDataType,
}

impl ConstantFill {
    /// Parses the arguments.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let args = Args(&op.arg);
        let dtype = args.int("dtype", TensorDataType::Float as i64)?;
        let dtype = match TensorDataType::try_from(dtype as i32) {
            Ok(t @ (TensorDataType::Float | TensorDataType::Int32 | TensorDataType::Int64)) => t,
            _ => {
                return Err(Error::arg(
                    "dtype",
                    format!("{dtype} is not FLOAT (1), INT32 (2) or INT64 (10)"),
                ))
            }
        };
        let value = args.float("value", 0.0)?;
        let int_value = match op.arg.iter().find(|a| a.name.as_deref() == Some("value")) {
            Some(a) => a.i.unwrap_or(value as i64),
            None => 0,
        };
        Ok(Box::new(ConstantFill {
            shape: shape_arg(op)?,
            value,
            int_value,
            dtype,
        }))
    }
}

impl Kernel for ConstantFill {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(0..=1)?;
        ctx.expect_outputs(1..=1)?;
        let shape = fill_shape(&self.shape, ctx)?;
        match self.dtype {
            TensorDataType::Int32 => ctx.resize_output::<i32>(0, shape)?.fill(self.int_value as i32),
            TensorDataType::Int64 => ctx.resize_output::<i64>(0, shape)?.fill(self.int_value),
            _ => ctx.resize_output::<f32>(0, shape)?.fill(self.value),
        }
        Ok(())
    }
}

/// The distribution of a random fill.
#[derive(Clone, Copy, Debug)]
pub enum Distribution {
    /// `GaussianFill`: normal(mean, std).
    Gaussian {
        /// Mean.
        mean: f32,
        /// Standard deviation.
        std: f32,
    },
    /// `UniformFill`: uniform(min, max).
    Uniform {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// `XavierFill`: uniform(±√(3 / fan_in)), fan_in = numel / dim 0.
    Xavier,
    /// `MSRAFill`: normal(0, √(2 / fan_out)), fan_out = numel / dim 1.
    Msra,
}

/// A seeded random fill.
pub struct RandomFill {
    shape: Option<Shape>,
    dist: Distribution,
    seed: u64,
}

impl RandomFill {
    fn create(op: &OperatorDef, dist: Distribution) -> Result<Box<dyn Kernel>> {
        let args = Args(&op.arg);
        let seed = args.int("seed", super::rng::op_seed(op))? as u64;
        Ok(Box::new(RandomFill {
            shape: shape_arg(op)?,
            dist,
            seed,
        }))
    }

    /// `GaussianFill`.
    pub fn gaussian(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let args = Args(&op.arg);
        let (mean, std) = (args.float("mean", 0.0)?, args.float("std", 1.0)?);
        if std < 0.0 {
            return Err(Error::arg("std", format!("must be ≥ 0, got {std}")));
        }
        Self::create(op, Distribution::Gaussian { mean, std })
    }

    /// `UniformFill`.
    pub fn uniform(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let args = Args(&op.arg);
        let (min, max) = (args.float("min", 0.0)?, args.float("max", 1.0)?);
        if min > max {
            return Err(Error::arg("min", format!("{min} exceeds max {max}")));
        }
        Self::create(op, Distribution::Uniform { min, max })
    }

    /// `XavierFill`.
    pub fn xavier(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Self::create(op, Distribution::Xavier)
    }

    /// `MSRAFill`.
    pub fn msra(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Self::create(op, Distribution::Msra)
    }
}

impl Kernel for RandomFill {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(0..=1)?;
        ctx.expect_outputs(1..=1)?;
        let shape = fill_shape(&self.shape, ctx)?;
        let name = BlobRef::new(ctx.output_name(0));
        let mut rng = Rng::new(self.seed.wrapping_mul(0x100_0000_01B3) ^ stable_hash(name.short_name()));
        let numel = shape.numel();
        let fan = |axis: usize| -> Result<f64> {
            match shape.dims().get(axis) {
                Some(&d) if d > 0 && numel > 0 => Ok((numel / d) as f64),
                _ => Err(Error::shape(
                    name.name(),
                    format!("a shape with a nonzero dim {axis}"),
                    &shape,
                )),
            }
        };
        let (lo, hi, gaussian) = match self.dist {
            Distribution::Gaussian { mean, std } => (f64::from(mean), f64::from(std), true),
            Distribution::Uniform { min, max } => (f64::from(min), f64::from(max), false),
            Distribution::Xavier => {
                let s = (3.0 / fan(0)?).sqrt();
                (-s, s, false)
            }
            Distribution::Msra => (0.0, (2.0 / fan(1)?).sqrt(), true),
        };
        let out = ctx.resize_output::<f32>(0, shape.clone())?;
        for x in out.iter_mut() {
            *x = if gaussian {
                (lo + hi * rng.normal()) as f32
            } else {
                (lo + (hi - lo) * rng.uniform()) as f32
            };
        }
        Ok(())
    }
}

/// `GivenTensorFill` (f32 `values`), `GivenTensorIntFill` (int32),
/// `GivenTensorInt64Fill` and `GivenTensorBoolFill` (int32 0/1: dpm has no bool
/// tensors): a tensor of `shape` holding exactly `values`, as in a Caffe2
/// model's `init_net.pb`.
pub struct GivenTensorFill {
    shape: Shape,
    values: Given,
}

enum Given {
    F32(Vec<f32>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

impl GivenTensorFill {
    /// Parses `shape` and `values` (floats for `GivenTensorFill`, ints otherwise).
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let shape = shape_arg(op)?.ok_or_else(|| Error::arg("shape", "required"))?;
        let a = op.arg.iter().find(|a| a.name.as_deref() == Some("values"));
        let (floats, ints) = a.map_or((&[][..], &[][..]), |a| (&a.floats[..], &a.ints[..]));
        let values = match op.op_type() {
            "GivenTensorFill" => Given::F32(floats.to_vec()),
            "GivenTensorInt64Fill" => Given::I64(ints.to_vec()),
            "GivenTensorBoolFill" => Given::I32(ints.iter().map(|&v| i32::from(v != 0)).collect()),
            _ => Given::I32(
                ints.iter()
                    .map(|&v| {
                        i32::try_from(v).map_err(|_| Error::arg("values", format!("{v} is not an int32")))
                    })
                    .collect::<Result<_>>()?,
            ),
        };
        let n = match &values {
            Given::F32(v) => v.len(),
            Given::I32(v) => v.len(),
            Given::I64(v) => v.len(),
        };
        if Some(n) != shape.checked_numel() {
            return Err(Error::arg("values", format!("{n} values for shape {shape}")));
        }
        Ok(Box::new(GivenTensorFill { shape, values }))
    }
}

impl Kernel for GivenTensorFill {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(0..=0)?;
        ctx.expect_outputs(1..=1)?;
        let s = self.shape.clone();
        match &self.values {
            Given::F32(v) => ctx.resize_output::<f32>(0, s)?.copy_from_slice(v),
            Given::I32(v) => ctx.resize_output::<i32>(0, s)?.copy_from_slice(v),
            Given::I64(v) => ctx.resize_output::<i64>(0, s)?.copy_from_slice(v),
        }
        Ok(())
    }
}
