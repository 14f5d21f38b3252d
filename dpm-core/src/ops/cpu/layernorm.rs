//! `LayerNorm(X) → (Y, mean, std)`: each row (the dimensions from `axis`,
//! default 1) normalised to mean 0 and variance 1, `std = √(var + epsilon)`, as
//! Caffe2's; and `Gather(DATA, INDICES) → DATA[INDICES]` along the first
//! dimension (an embedding lookup). Gradients: `LayerNormGradient(dY, Y, mean,
//! std, X) → dX`, `GatherGradient(DATA, INDICES, dY) → dDATA` (dense).

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

/// `LayerNorm` and its gradient.
pub struct LayerNorm {
    axis: usize,
    epsilon: f32,
    gradient: bool,
}

impl LayerNorm {
    /// Parses `axis` and `epsilon`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let a = Args(&op.arg);
        let epsilon = a.float("epsilon", 1e-5)?;
        if epsilon <= 0.0 {
            return Err(Error::arg("epsilon", "must be > 0"));
        }
        Ok(Box::new(LayerNorm {
            axis: a.usize("axis", 1)?,
            epsilon,
            gradient: op.op_type() == "LayerNormGradient",
        }))
    }

    fn forward(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(3..=3)?;
        let (x, xd) = ctx.input_f32(0)?;
        if self.axis > x.shape().rank() {
            return Err(Error::arg(
                "axis",
                format!("{} exceeds the rank of {}", self.axis, x.shape()),
            ));
        }
        let (n, d) = x.shape().split_at(self.axis);
        let mut stats = Vec::with_capacity(n);
        for row in xd.chunks_exact(d.max(1)) {
            let m = row.iter().map(|&v| f64::from(v)).sum::<f64>() / d.max(1) as f64;
            let var = row.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / d.max(1) as f64;
            stats.push((m, (var + f64::from(self.epsilon)).sqrt()));
        }
        let y = ctx.resize_output::<f32>(0, x.shape())?;
        for (yr, (xr, &(m, s))) in y
            .chunks_exact_mut(d.max(1))
            .zip(xd.chunks_exact(d.max(1)).zip(&stats))
        {
            for (y, &x) in yr.iter_mut().zip(xr) {
                *y = ((f64::from(x) - m) / s) as f32;
            }
        }
        let stat_dims: Vec<usize> = x.dims()[..self.axis].to_vec();
        let means: Vec<f32> = stats.iter().map(|s| s.0 as f32).collect();
        let stds: Vec<f32> = stats.iter().map(|s| s.1 as f32).collect();
        ctx.resize_output::<f32>(1, stat_dims.clone())?
            .copy_from_slice(&means);
        ctx.resize_output::<f32>(2, stat_dims)?.copy_from_slice(&stds);
        Ok(())
    }

    fn backward(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(5..=5)?;
        ctx.expect_outputs(1..=1)?;
        let (dy, dyd) = ctx.input_f32(0)?;
        let (_, yd) = ctx.input_f32(1)?;
        let (_, sd) = ctx.input_f32(3)?;
        let (x, _) = ctx.input_f32(4)?;
        if dy.shape() != x.shape() {
            return Err(Error::shape(ctx.input_name(0), x.shape().to_string(), dy.shape()));
        }
        let (n, d) = x.shape().split_at(self.axis.min(x.shape().rank()));
        if sd.len() != n {
            return Err(Error::shape(
                ctx.input_name(3),
                format!("{n} elements"),
                ctx.input(3)?.shape(),
            ));
        }
        let dx = ctx.resize_output::<f32>(0, x.shape())?;
        for (r, ((dr, gr), yr)) in dx
            .chunks_exact_mut(d.max(1))
            .zip(dyd.chunks_exact(d.max(1)))
            .zip(yd.chunks_exact(d.max(1)))
            .enumerate()
        {
            let k = d.max(1) as f64;
            let mg = gr.iter().map(|&g| f64::from(g)).sum::<f64>() / k;
            let mgy = gr
                .iter()
                .zip(yr)
                .map(|(&g, &y)| f64::from(g) * f64::from(y))
                .sum::<f64>()
                / k;
            let s = f64::from(sd[r]);
            for ((o, &g), &y) in dr.iter_mut().zip(gr).zip(yr) {
                *o = ((f64::from(g) - mg - f64::from(y) * mgy) / s) as f32;
            }
        }
        Ok(())
    }
}

impl Kernel for LayerNorm {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        if self.gradient {
            self.backward(ctx)
        } else {
            self.forward(ctx)
        }
    }
}

/// `Gather` and its (dense) gradient.
pub struct Gather {
    gradient: bool,
}

impl Gather {
    /// `Gather` or `GatherGradient`, by op type.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Gather {
            gradient: op.op_type() == "GatherGradient",
        }))
    }
}

impl Kernel for Gather {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(if self.gradient { 3..=3 } else { 2..=2 })?;
        ctx.expect_outputs(1..=1)?;
        let (data, dd) = ctx.input_f32(0)?;
        let Some((&rows, _)) = data.dims().split_first() else {
            return Err(Error::shape(ctx.input_name(0), "[N, …]", data.shape()));
        };
        let width = data.numel() / rows.max(1);
        let idx = ctx.input_labels(1)?;
        if let Some(&bad) = idx.iter().find(|&&i| i >= rows) {
            return Err(Error::value(
                ctx.input_name(1),
                format!("index {bad} is not below {rows} rows"),
            ));
        }
        if self.gradient {
            let (dy, dyd) = ctx.input_f32(2)?;
            if dy.numel() != idx.len() * width {
                return Err(Error::shape(
                    ctx.input_name(2),
                    format!("{}×{width} elements", idx.len()),
                    dy.shape(),
                ));
            }
            let dx = ctx.resize_output::<f32>(0, data.shape())?;
            dx.fill(0.0);
            for (k, &i) in idx.iter().enumerate() {
                for (o, &g) in dx[i * width..(i + 1) * width]
                    .iter_mut()
                    .zip(&dyd[k * width..(k + 1) * width])
                {
                    *o += g;
                }
            }
            return Ok(());
        }
        let mut dims = ctx.input(1)?.dims().to_vec();
        dims.extend_from_slice(&data.dims()[1..]);
        let y = ctx.resize_output::<f32>(0, dims)?;
        for (k, &i) in idx.iter().enumerate() {
            y[k * width..(k + 1) * width].copy_from_slice(&dd[i * width..(i + 1) * width]);
        }
        Ok(())
    }
}
