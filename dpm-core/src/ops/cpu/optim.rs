//! Training-loop ops: `Iter` and the parameter updates (`LearningRate` is in `lr.rs`).

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

use super::isa::{vectorized, Isa};

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
        let (g, m, p) = update_outputs(ctx, false)?;
        momentum_update(Isa::best(), g, m, p, lr, self.0);
        Ok(())
    }
}

impl Momentum {
    /// One element's update from gradient `g`: moves `m` and `p`, returns the
    /// step (what `MomentumSGDUpdate` leaves in its gradient output).
    #[inline(always)]
    fn step(&self, g: f32, lr: f32, m: &mut f32, p: &mut f32) -> f32 {
        let mu = self.momentum;
        let grad = g + self.weight_decay * *p;
        let m_old = *m;
        *m = mu * m_old + lr * grad;
        let step = if self.nesterov {
            (1.0 + mu) * *m - mu * m_old
        } else {
            *m
        };
        *p -= step;
        step
    }
}

/// `WeightedSum(grad, w0, param, wd) → grad` then `MomentumSGDUpdate(grad,
/// moment, lr, param) → (grad, moment, param)`, in one pass (the executor's
/// `WeightedSum+MomentumSGDUpdate`, see `exec::fuse`): the L2 decay as Caffe2's
/// optimizers add it and the update. Inputs `(grad, w0, param, wd, moment,
/// lr)`, outputs `(grad, moment, param)`; every element goes through the same
/// float operations, in the same order, as the two ops apart.
pub struct DecayMomentumSgdUpdate(Momentum);

impl DecayMomentumSgdUpdate {
    /// Parses the update's arguments, as [`MomentumSgdUpdate::create`].
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(DecayMomentumSgdUpdate(Momentum::parse(op)?)))
    }
}

impl Kernel for DecayMomentumSgdUpdate {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0), (4, 1), (2, 2)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(6..=6)?;
        ctx.expect_outputs(3..=3)?;
        // The decay's checks first, then the update's: the errors the two ops
        // would give apart.
        let (w0, wd, lr) = (ctx.input_scalar(1)?, ctx.input_scalar(3)?, ctx.input_scalar(5)?);
        let (g, m, p) = update_outputs(ctx, true)?;
        decay_momentum_update(Isa::best(), g, m, p, (w0, wd), lr, self.0);
        Ok(())
    }
}

vectorized! {
    /// `MomentumSGDUpdate` over every element.
    fn momentum_update(g: &mut [f32], m: &mut [f32], p: &mut [f32], lr: f32, k: Momentum) {
        for ((g, m), p) in g.iter_mut().zip(m.iter_mut()).zip(p.iter_mut()) {
            *g = k.step(*g, lr, m, p);
        }
    }

    /// `WeightedSum(g, w0, p, wd)` then `MomentumSGDUpdate` over every element.
    fn decay_momentum_update(
        g: &mut [f32],
        m: &mut [f32],
        p: &mut [f32],
        decay: (f32, f32),
        lr: f32,
        k: Momentum,
    ) {
        let (w0, wd) = decay;
        for ((g, m), p) in g.iter_mut().zip(m.iter_mut()).zip(p.iter_mut()) {
            // WeightedSum's `y = x0; y *= w0 (unless 1); y += wd·x1`.
            let mut decayed = *g;
            if w0 != 1.0 {
                decayed *= w0;
            }
            decayed += wd * *p;
            *g = k.step(decayed, lr, m, p);
        }
    }
}

/// A momentum update's outputs `(grad, moment, param)` as f32s, each as many
/// as the parameter's (with `decayed`, the gradient also shaped as the
/// parameter, as the decay before the update requires): the errors the ops
/// apart give, before anything is written.
fn update_outputs<'t>(
    ctx: &'t mut OpContext<'_>,
    decayed: bool,
) -> Result<(&'t mut [f32], &'t mut [f32], &'t mut [f32])> {
    let names = &ctx.def().output;
    let outs = ctx.outputs();
    if decayed && outs[2].shape() != outs[0].shape() {
        return Err(Error::shape(
            &names[2],
            outs[0].shape().to_string(),
            outs[2].shape(),
        ));
    }
    let n = outs[2].numel();
    for (o, t) in outs.iter().enumerate() {
        if t.numel() != n {
            return Err(Error::shape(&names[o], outs[2].shape().to_string(), t.shape()));
        }
    }
    let [g, m, p] = outs else {
        unreachable!("arity checked")
    };
    Ok((
        f32_mut(g, &names[0])?,
        f32_mut(m, &names[1])?,
        f32_mut(p, &names[2])?,
    ))
}

fn f32_mut<'t>(t: &'t mut crate::tensor::Tensor, name: &str) -> Result<&'t mut [f32]> {
    let got = t.dtype();
    t.data_mut::<f32>().ok().ok_or_else(|| Error::DataTypeMismatch {
        blob: name.to_owned(),
        expected: crate::tensor::DataType::F32,
        got,
    })
}

/// The elements of every output, which must all hold `n` f32s (in-place updates).
fn outputs_f32<'t>(
    outs: &'t mut [&mut crate::tensor::Tensor],
    names: &[String],
) -> Result<Vec<&'t mut [f32]>> {
    let n = outs.first().map_or(0, |t| t.numel());
    outs.iter_mut()
        .zip(names)
        .map(|(t, name)| {
            if t.numel() != n {
                return Err(Error::shape(name, format!("{n} elements"), t.shape()));
            }
            f32_mut(t, name)
        })
        .collect()
}

/// `Adam(param, moment_1, moment_2, grad, lr, iter) → (param, moment_1, moment_2)`,
/// in place, as Caffe2's (`lr` negative for descent): with `t = iter + 1`,
/// `m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; p ← p + lr·√(1−β₂ᵗ)/(1−β₁ᵗ)·m/(√v + ε)`.
/// dpm's `weight_decay` adds `wd·p` to the gradient, or with `decoupled = 1`
/// (AdamW) moves `p ← p + lr·wd·p` instead.
pub struct Adam {
    beta1: f32,
    beta2: f32,
    epsilon: f32,
    weight_decay: f32,
    decoupled: bool,
}

impl Adam {
    /// Parses `beta1`, `beta2`, `epsilon`, `weight_decay`, `decoupled`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let a = Args(&op.arg);
        Ok(Box::new(Adam {
            beta1: a.float("beta1", 0.9)?,
            beta2: a.float("beta2", 0.999)?,
            epsilon: a.float("epsilon", 1e-5)?,
            weight_decay: a.float("weight_decay", 0.0)?,
            decoupled: a.int("decoupled", 0)? != 0,
        }))
    }
}

/// The int64 iteration of input `i`.
fn iteration(ctx: &OpContext<'_>, i: usize) -> Result<i64> {
    match ctx.input_data::<i64>(i)? {
        [v] => Ok(*v),
        _ => Err(Error::value(
            ctx.input_name(i),
            "the iteration counter must hold one int64",
        )),
    }
}

impl Kernel for Adam {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0), (1, 1), (2, 2)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(6..=6)?;
        ctx.expect_outputs(3..=3)?;
        let lr = ctx.input_scalar(4)?;
        let t = (iteration(ctx, 5)? + 1) as i32;
        let (gt, g) = ctx.input_f32(3)?;
        let n = ctx.output(0).numel();
        if g.len() != n {
            return Err(Error::shape(
                ctx.input_name(3),
                format!("{n} elements"),
                gt.shape(),
            ));
        }
        let names = ctx.def().output.clone();
        let [p, m, v] = &mut outputs_f32(ctx.outputs(), &names)?[..] else {
            unreachable!("arity checked")
        };
        let correction = (1.0 - self.beta2.powi(t)).sqrt() / (1.0 - self.beta1.powi(t));
        adam_update(Isa::best(), p, m, v, g, (lr, correction), self);
        Ok(())
    }
}

/// `RmsProp(grad, mean_squares, mom, lr) → (grad, mean_squares, mom)`, in place,
/// as Caffe2's: `ms ← ms + (1−decay)(g² − ms); mom ← μ·mom + lr·g/√(ε + ms);
/// grad ← mom` (then `param ← param + grad`, `lr` negative for descent).
pub struct RmsProp {
    decay: f32,
    momentum: f32,
    epsilon: f32,
}

impl RmsProp {
    /// Parses `decay`, `momentum`, `epsilon`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let a = Args(&op.arg);
        Ok(Box::new(RmsProp {
            decay: a.float("decay", 0.9)?,
            momentum: a.float("momentum", 0.0)?,
            epsilon: a.float("epsilon", 1e-5)?,
        }))
    }
}

impl Kernel for RmsProp {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0), (1, 1), (2, 2)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(4..=4)?;
        ctx.expect_outputs(3..=3)?;
        let lr = ctx.input_scalar(3)?;
        let names = ctx.def().output.clone();
        let [g, ms, mom] = &mut outputs_f32(ctx.outputs(), &names)?[..] else {
            unreachable!("arity checked")
        };
        rms_prop_update(Isa::best(), g, ms, mom, lr, self);
        Ok(())
    }
}

/// `Adagrad(param, moment, grad, lr) → (param, moment)`, in place, as Caffe2's:
/// `m ← decay·m + g²; p ← p + lr·g/(√m + ε)` (`lr` negative for descent).
pub struct Adagrad {
    epsilon: f32,
    decay: f32,
}

impl Adagrad {
    /// Parses `epsilon`, `decay`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let a = Args(&op.arg);
        Ok(Box::new(Adagrad {
            epsilon: a.float("epsilon", 1e-5)?,
            decay: a.float("decay", 1.0)?,
        }))
    }
}

impl Kernel for Adagrad {
    fn in_place(&self) -> &[(usize, usize)] {
        &[(0, 0), (1, 1)]
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(4..=4)?;
        ctx.expect_outputs(2..=2)?;
        let lr = ctx.input_scalar(3)?;
        let (gt, g) = ctx.input_f32(2)?;
        let n = ctx.output(0).numel();
        if g.len() != n {
            return Err(Error::shape(
                ctx.input_name(2),
                format!("{n} elements"),
                gt.shape(),
            ));
        }
        let names = ctx.def().output.clone();
        let [p, m] = &mut outputs_f32(ctx.outputs(), &names)?[..] else {
            unreachable!("arity checked")
        };
        adagrad_update(Isa::best(), p, m, g, lr, self);
        Ok(())
    }
}

vectorized! {
    /// `Adam` over every element; `step`: the learning rate and the bias
    /// correction of this iteration.
    fn adam_update(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], step: (f32, f32), k: &Adam) {
        let (lr, correction) = step;
        let (b1, b2, wd) = (k.beta1, k.beta2, k.weight_decay);
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = if k.decoupled { g } else { g + wd * *p };
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            if k.decoupled {
                *p += lr * wd * *p;
            }
            *p += lr * correction * *m / (v.sqrt() + k.epsilon);
        }
    }

    /// `RmsProp` over every element.
    fn rms_prop_update(g: &mut [f32], ms: &mut [f32], mom: &mut [f32], lr: f32, k: &RmsProp) {
        for ((g, ms), mom) in g.iter_mut().zip(ms.iter_mut()).zip(mom.iter_mut()) {
            *ms += (1.0 - k.decay) * (*g * *g - *ms);
            *mom = k.momentum * *mom + lr * *g / (k.epsilon + *ms).sqrt();
            *g = *mom;
        }
    }

    /// `Adagrad` over every element.
    fn adagrad_update(p: &mut [f32], m: &mut [f32], g: &[f32], lr: f32, k: &Adagrad) {
        for ((p, m), &g) in p.iter_mut().zip(m.iter_mut()).zip(g) {
            *m = k.decay * *m + g * g;
            *p += lr * g / (m.sqrt() + k.epsilon);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::isa::testing::{portable, same_bits, values, LENGTHS};

    #[test]
    fn every_instruction_set_gives_the_portable_bits() {
        for n in LENGTHS {
            for nesterov in [false, true] {
                let k = Momentum {
                    momentum: 0.9,
                    nesterov,
                    weight_decay: 1e-4,
                };
                for decay in [None, Some((1.0, 3e-4)), Some((0.5, 3e-4))] {
                    let run = |isa: Isa| {
                        let (mut g, mut m, mut p) = (values(n, 1), values(n, 2), values(n, 3));
                        match decay {
                            None => momentum_update(isa, &mut g, &mut m, &mut p, -0.1, k),
                            Some(d) => decay_momentum_update(isa, &mut g, &mut m, &mut p, d, -0.1, k),
                        }
                        [g, m, p].concat()
                    };
                    same_bits("momentum update", &run(portable()), run);
                }
            }
            for decoupled in [false, true] {
                let k = Adam {
                    beta1: 0.9,
                    beta2: 0.999,
                    epsilon: 1e-8,
                    weight_decay: 1e-2,
                    decoupled,
                };
                let run = |isa: Isa| {
                    let (mut p, mut m, mut v) = (values(n, 1), values(n, 2), values(n, 3));
                    // Second moments are never negative.
                    v.iter_mut().for_each(|x| *x = x.abs());
                    adam_update(isa, &mut p, &mut m, &mut v, &values(n, 4), (-1e-3, 0.3), &k);
                    [p, m, v].concat()
                };
                same_bits("adam", &run(portable()), run);
            }
            let k = RmsProp {
                decay: 0.9,
                momentum: 0.5,
                epsilon: 1e-5,
            };
            let run = |isa: Isa| {
                let (mut g, mut ms, mut mom) = (values(n, 1), values(n, 2), values(n, 3));
                ms.iter_mut().for_each(|x| *x = x.abs());
                rms_prop_update(isa, &mut g, &mut ms, &mut mom, -0.01, &k);
                [g, ms, mom].concat()
            };
            same_bits("rmsprop", &run(portable()), run);
            let k = Adagrad {
                epsilon: 1e-5,
                decay: 0.95,
            };
            let run = |isa: Isa| {
                let (mut p, mut m) = (values(n, 1), values(n, 2));
                m.iter_mut().for_each(|x| *x = x.abs());
                adagrad_update(isa, &mut p, &mut m, &values(n, 3), -0.01, &k);
                [p, m].concat()
            };
            same_bits("adagrad", &run(portable()), run);
        }
    }
}
