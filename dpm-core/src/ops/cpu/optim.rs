//! Training-loop ops: `Iter`, `LearningRate`, `MomentumSGDUpdate`.

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

/// `Iter(ITER) → ITER + 1`, an int64 `[1]` counter updated in place.
pub struct Iter;

impl Kernel for Iter {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(1..=1)?;
        let name = ctx.output_name(0);
        let it = ctx.output_data::<i64>(0)?;
        match it {
            [v] => {
                *v += 1;
                Ok(())
            }
            _ => Err(Error::value(name, "the iteration counter must hold one int64")),
        }
    }
}

/// How the learning rate changes with the iteration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrPolicy {
    /// Constant.
    Fixed,
    /// Multiplied by `gamma` every `stepsize` iterations.
    Step {
        /// Iterations between decays.
        stepsize: u64,
        /// Decay factor.
        gamma: f32,
    },
}

impl LrPolicy {
    /// The multiplier at iteration `iter`.
    pub fn multiplier(self, iter: i64) -> f32 {
        match self {
            LrPolicy::Fixed => 1.0,
            LrPolicy::Step { stepsize, gamma } => gamma.powi((iter.max(0) as u64 / stepsize) as i32),
        }
    }
}

/// `LearningRate(ITER) → [base_lr · policy(ITER)]`.
pub struct LearningRate {
    base_lr: f32,
    policy: LrPolicy,
}

impl LearningRate {
    /// Parses `base_lr`, `policy` (`fixed` | `step`), `stepsize`, `gamma`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let args = Args(&op.arg);
        let base_lr = args.float("base_lr", f32::NAN)?;
        if base_lr.is_nan() {
            return Err(Error::arg("base_lr", "required"));
        }
        let policy = match args.string("policy", "fixed")?.as_str() {
            "fixed" => LrPolicy::Fixed,
            "step" => {
                let stepsize = args.int("stepsize", 0)?;
                if stepsize <= 0 {
                    return Err(Error::arg("stepsize", "the step policy needs stepsize ≥ 1"));
                }
                LrPolicy::Step {
                    stepsize: stepsize as u64,
                    gamma: args.float("gamma", 1.0)?,
                }
            }
            other => {
                return Err(Error::arg(
                    "policy",
                    format!("`{other}` is not a policy; use fixed or step"),
                ))
            }
        };
        Ok(Box::new(LearningRate { base_lr, policy }))
    }
}

impl Kernel for LearningRate {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(1..=1)?;
        let iter = match ctx.input_data::<i64>(0)? {
            [v] => *v,
            _ => {
                return Err(Error::value(
                    ctx.input_name(0),
                    "the iteration counter must hold one int64",
                ))
            }
        };
        ctx.resize_output::<f32>(0, [1])?[0] = self.base_lr * self.policy.multiplier(iter);
        Ok(())
    }
}

/// `MomentumSGDUpdate(grad, moment, lr, param) → (grad, moment, param)`, in place:
/// `g ← g + wd·p; m ← μ·m + lr·g; p ← p − m` (Nesterov: `p ← p − ((1+μ)·m − μ·m_old)`).
pub struct MomentumSgdUpdate(Momentum);

/// The arguments of `MomentumSGDUpdate` (shared with its CUDA kernel).
#[derive(Clone, Copy)]
pub(crate) struct Momentum {
    pub momentum: f32,
    pub nesterov: bool,
    pub weight_decay: f32,
}

impl Momentum {
    pub(crate) fn parse(op: &OperatorDef) -> Result<Momentum> {
        let args = Args(&op.arg);
        Ok(Momentum {
            momentum: args.float("momentum", 0.0)?,
            nesterov: args.int("nesterov", 0)? != 0,
            weight_decay: args.float("weight_decay", 0.0)?,
        })
    }
}

impl MomentumSgdUpdate {
    /// Parses `momentum`, `nesterov`, `weight_decay`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(MomentumSgdUpdate(Momentum::parse(op)?)))
    }
}

impl Kernel for MomentumSgdUpdate {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0), (1, 1), (3, 2)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(4..=4)?;
        ctx.expect_outputs(3..=3)?;
        let lr = ctx.input_scalar(2)?;
        let names: Vec<String> = (0..3).map(|o| ctx.output_name(o).to_owned()).collect();
        let outs = ctx.outputs();
        let n = outs[2].numel();
        for (o, t) in outs.iter().enumerate() {
            if t.numel() != n {
                return Err(Error::shape(&names[o], outs[2].shape().to_string(), t.shape()));
            }
        }
        let [g, m, p] = outs else {
            unreachable!("arity checked")
        };
        let (g, m, p) = (
            f32_mut(g, &names[0])?,
            f32_mut(m, &names[1])?,
            f32_mut(p, &names[2])?,
        );
        let (mu, wd) = (self.0.momentum, self.0.weight_decay);
        for ((g, m), p) in g.iter_mut().zip(m.iter_mut()).zip(p.iter_mut()) {
            let grad = *g + wd * *p;
            let m_old = *m;
            *m = mu * m_old + lr * grad;
            let step = if self.0.nesterov {
                (1.0 + mu) * *m - mu * m_old
            } else {
                *m
            };
            *g = step;
            *p -= step;
        }
        Ok(())
    }
}

fn f32_mut<'t>(t: &'t mut crate::tensor::Tensor, name: &str) -> Result<&'t mut [f32]> {
    let got = t.dtype();
    t.data_mut::<f32>().ok().ok_or_else(|| Error::DataTypeMismatch {
        blob: name.to_owned(),
        expected: crate::tensor::DataType::F32,
        got,
    })
}
