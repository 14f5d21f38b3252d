//! `Mul`, `Sub`, `Div` with Caffe2's (legacy) broadcasting: with `broadcast = 1`,
//! B's shape must equal a contiguous run of A's dimensions starting at `axis`
//! (default: the trailing ones), and B is repeated over the rest. Their
//! gradient: `XGradient(dY, A, B) → (dA, dB)`, dB summed over the repeats.

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

/// Which operation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arith {
    Mul,
    Sub,
    Div,
}

/// The broadcast arguments, parsed once.
#[derive(Clone, Copy)]
pub(crate) struct Bcast {
    on: bool,
    axis: Option<usize>,
}

impl Bcast {
    fn parse(op: &OperatorDef) -> Result<Bcast> {
        let a = Args(&op.arg);
        let axis = a.int("axis", -1)?;
        Ok(Bcast {
            on: a.int("broadcast", 0)? != 0,
            axis: usize::try_from(axis).ok(),
        })
    }

    /// (outer, B's elements, inner) with A viewed as `[outer, |B|, inner]`.
    fn layout(self, ctx: &OpContext<'_>, a: usize, b: usize) -> Result<(usize, usize, usize)> {
        let (at, bt) = (ctx.input(a)?, ctx.input(b)?);
        if !self.on {
            if at.shape() != bt.shape() {
                return Err(Error::shape(
                    ctx.input_name(b),
                    format!("{} (or broadcast = 1)", at.shape()),
                    bt.shape(),
                ));
            }
            return Ok((1, at.numel(), 1));
        }
        let (ad, bd) = (at.dims(), bt.dims());
        let axis = self.axis.unwrap_or(ad.len().saturating_sub(bd.len()));
        if axis + bd.len() > ad.len() || ad[axis..axis + bd.len()] != *bd {
            return Err(Error::shape(
                ctx.input_name(b),
                format!("the dimensions of {} from axis {axis}", at.shape()),
                bt.shape(),
            ));
        }
        let outer = ad[..axis].iter().product();
        let inner = ad[axis + bd.len()..].iter().product();
        Ok((outer, bt.numel(), inner))
    }
}

/// `Mul(A, B)`, `Sub(A, B)`, `Div(A, B) → C`, shaped like A.
pub struct Binary {
    pub(crate) op: Arith,
    pub(crate) bcast: Bcast,
}

/// `MulGradient(dC, A, B)`, … `→ (dA, dB)`.
pub struct BinaryGradient {
    pub(crate) op: Arith,
    pub(crate) bcast: Bcast,
}

impl Binary {
    /// Parses `broadcast` and `axis`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Binary {
            op: arith(op.op_type()),
            bcast: Bcast::parse(op)?,
        }))
    }
}

impl BinaryGradient {
    /// Parses `broadcast` and `axis`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(BinaryGradient {
            op: arith(op.op_type().trim_end_matches("Gradient")),
            bcast: Bcast::parse(op)?,
        }))
    }
}

fn arith(op_type: &str) -> Arith {
    match op_type {
        "Mul" => Arith::Mul,
        "Sub" => Arith::Sub,
        _ => Arith::Div,
    }
}

impl Kernel for Binary {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=2)?;
        ctx.expect_outputs(1..=1)?;
        let (outer, nb, inner) = self.bcast.layout(ctx, 0, 1)?;
        let (a, ad) = ctx.input_f32(0)?;
        let (_, bd) = ctx.input_f32(1)?;
        let c = ctx.resize_output::<f32>(0, a.shape())?;
        for o in 0..outer {
            for (j, &b) in bd.iter().enumerate().take(nb) {
                let at = (o * nb + j) * inner;
                for (c, &a) in c[at..at + inner].iter_mut().zip(&ad[at..at + inner]) {
                    *c = match self.op {
                        Arith::Mul => a * b,
                        Arith::Sub => a - b,
                        Arith::Div => a / b,
                    };
                }
            }
        }
        Ok(())
    }
}

impl Kernel for BinaryGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(3..=3)?;
        ctx.expect_outputs(2..=2)?;
        let (outer, nb, inner) = self.bcast.layout(ctx, 1, 2)?;
        let (dc, dcd) = ctx.input_f32(0)?;
        let (a, ad) = ctx.input_f32(1)?;
        let (b, bd) = ctx.input_f32(2)?;
        if dc.shape() != a.shape() {
            return Err(Error::shape(ctx.input_name(0), a.shape().to_string(), dc.shape()));
        }
        let names = &ctx.def().output;
        let outs = ctx.outputs();
        let (first, rest) = outs.split_first_mut().expect("arity checked");
        let da = first
            .resize::<f32>(a.shape())
            .map_err(|e| e.with_blob(&names[0]))?;
        let mut db = vec![0.0f64; nb];
        for o in 0..outer {
            for j in 0..nb {
                let at = (o * nb + j) * inner;
                let bj = bd[j];
                for k in at..at + inner {
                    let g = dcd[k];
                    let (ga, gb) = match self.op {
                        Arith::Mul => (g * bj, g * ad[k]),
                        Arith::Sub => (g, -g),
                        Arith::Div => (g / bj, -g * ad[k] / (bj * bj)),
                    };
                    da[k] = ga;
                    db[j] += f64::from(gb);
                }
            }
        }
        let dbt = rest[0]
            .resize::<f32>(b.shape())
            .map_err(|e| e.with_blob(&names[1]))?;
        for (d, s) in dbt.iter_mut().zip(db) {
            *d = s as f32;
        }
        Ok(())
    }
}
