//! Optimisers: builders that append the parameter update to the train net.

use super::ModelHelper;
use crate::error::{Error, Result};
use crate::graph::{BlobRef, Device};
use crate::proto::TensorDataType;

pub use crate::ops::cpu::LrPolicy;

/// Stochastic gradient descent with optional momentum, Nesterov momentum, weight
/// decay and a step learning-rate schedule.
///
/// [`Sgd::build`] updates the parameters of the current name scope that have a
/// gradient, so one call per device scope gives each replica its own update.
#[derive(Clone, Debug, PartialEq)]
pub struct Sgd {
    lr: f32,
    momentum: f32,
    nesterov: bool,
    weight_decay: f32,
    skip_exempt: bool,
    policy: LrPolicy,
}

impl Sgd {
    /// Plain SGD at learning rate `lr`.
    pub fn new(lr: f32) -> Self {
        Sgd {
            lr,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            skip_exempt: false,
            policy: LrPolicy::Fixed,
        }
    }

    /// Whether weight decay skips biases and batch-norm parameters (the common
    /// practice; Caffe2 decays everything, the default here too).
    pub fn skip_decay_on_biases_and_norms(mut self, on: bool) -> Self {
        self.skip_exempt = on;
        self
    }

    /// Momentum coefficient (0 = none).
    pub fn momentum(mut self, momentum: f32) -> Self {
        self.momentum = momentum;
        self
    }

    /// Nesterov momentum.
    pub fn nesterov(mut self, on: bool) -> Self {
        self.nesterov = on;
        self
    }

    /// L2 weight decay, added to each gradient as `weight_decay · param`.
    pub fn weight_decay(mut self, wd: f32) -> Self {
        self.weight_decay = wd;
        self
    }

    /// Multiplies the learning rate by `gamma` every `stepsize` iterations.
    pub fn step_schedule(mut self, stepsize: u64, gamma: f32) -> Self {
        self.policy = LrPolicy::Step { stepsize, gamma };
        self
    }

    /// Any learning-rate schedule (see [`LrPolicy`]).
    pub fn lr_policy(mut self, policy: LrPolicy) -> Self {
        self.policy = policy;
        self
    }

    fn check(&self) -> Result<()> {
        let bad = |what: &str, v: f32| {
            Err(Error::Config(format!(
                "SGD {what} must be finite and ≥ 0, got {v}"
            )))
        };
        for (what, v) in [
            ("learning rate", self.lr),
            ("momentum", self.momentum),
            ("weight decay", self.weight_decay),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(what, v);
            }
        }
        check_policy(&self.policy)
    }

    /// Appends the iteration counter, the learning rate and the update of every
    /// parameter of the current scope that has a gradient.
    pub fn build(&self, model: &mut ModelHelper) -> Result<()> {
        self.check()?;
        let params = params_with_gradients(model)?;
        // The counter, the learning rate and the scalar weights live on the host,
        // as in Caffe2: GPU kernels read them as launch arguments, with no copy.
        let (lr, one, wd) = model.device_scope(Device::Cpu(0), |model| self.build_scalars(model));
        if self.momentum > 0.0 {
            for (p, g) in params {
                let m = model
                    .init_net_mut()
                    .op("ConstantFill")
                    .input(&p)
                    .output(p.with_suffix("_momentum"))
                    .arg("value", 0.0f32)
                    .build_one();
                model.add_optimizer_state(m.clone());
                // Caffe2's MomentumSGDUpdate has no decay argument.
                add_l2_decay(model, one.as_ref().zip(wd.as_ref()), &p, &g, self.skip_exempt);
                let lr = lr_for(model, &p, &lr);
                model
                    .net_mut()
                    .op("MomentumSGDUpdate")
                    .inputs([&g, &m, &lr, &p])
                    .outputs([&g, &m, &p])
                    .arg("momentum", self.momentum)
                    .arg("nesterov", self.nesterov)
                    .build();
            }
        } else {
            let one = one.expect("plain SGD makes ONE");
            for (p, g) in params {
                add_l2_decay(model, wd.as_ref().map(|wd| (&one, wd)), &p, &g, self.skip_exempt);
                let lr = lr_for(model, &p, &lr);
                model
                    .net_mut()
                    .op("WeightedSum")
                    .inputs([&p, &one, &g, &lr])
                    .output(&p)
                    .build();
            }
        }
        Ok(())
    }

    /// `ITER`, its increment and the learning rate; for plain SGD also the
    /// constant weights `ONE` and `WD`.
    fn build_scalars(&self, model: &mut ModelHelper) -> (BlobRef, Option<BlobRef>, Option<BlobRef>) {
        // Plain SGD adds −lr·grad with WeightedSum; momentum SGD subtracts lr·m.
        let signed_lr = if self.momentum > 0.0 { self.lr } else { -self.lr };
        let lr = counter_and_lr(model, signed_lr, &self.policy);

        if self.momentum > 0.0 && self.weight_decay == 0.0 {
            return (lr, None, None);
        }
        let one = scalar_const(model, "ONE", 1.0);
        let wd = (self.weight_decay > 0.0).then(|| scalar_const(model, "WD", self.weight_decay));
        (lr, Some(one), wd)
    }
}

/// The parameters of the current scope that have a gradient, with it.
fn params_with_gradients(model: &ModelHelper) -> Result<Vec<(BlobRef, BlobRef)>> {
    let params: Vec<(BlobRef, BlobRef)> = model
        .params_in_scope()
        .into_iter()
        .filter_map(|p| model.param_to_grad().get(&p).map(|g| (p.clone(), g.clone())))
        .collect();
    if params.is_empty() {
        return Err(Error::Config(format!(
            "no parameter with a gradient in scope `{}`: call add_gradient_ops first",
            model.net().scope().prefix()
        )));
    }
    for (name, &m) in model.lr_multipliers() {
        if !params.iter().any(|(p, _)| p.short_name() == name) {
            return Err(Error::Config(format!(
                "a learning-rate multiplier is set for `{name}`, but no parameter with a gradient has that name"
            )));
        }
        if !m.is_finite() || m < 0.0 {
            return Err(Error::Config(format!(
                "the learning-rate multiplier of `{name}` must be finite and ≥ 0, got {m}"
            )));
        }
    }
    Ok(params)
}

/// The learning rate of `p`: `lr`, or `lr` scaled by `p`'s multiplier (one
/// `Scale` on the host per multiplier, shared by the parameters that have it).
fn lr_for(model: &mut ModelHelper, p: &BlobRef, lr: &BlobRef) -> BlobRef {
    let m = model.lr_multiplier(p);
    if m == 1.0 {
        return lr.clone();
    }
    let name = format!("{}_x{m}", lr.name());
    let scaled = BlobRef::new(&name);
    let exists = model.net().ops().iter().any(|o| o.output.contains(&name));
    if !exists {
        model.device_scope(Device::Cpu(0), |model| {
            model
                .net_mut()
                .op("Scale")
                .input(lr)
                .output(&scaled)
                .arg("scale", m)
                .build();
        });
    }
    scaled
}

/// Optimiser state shaped like `p`, zero at the start, checkpointed and
/// broadcast like momentum.
fn state_like(model: &mut ModelHelper, p: &BlobRef, suffix: &str) -> BlobRef {
    let s = model
        .init_net_mut()
        .op("ConstantFill")
        .input(p)
        .output(p.with_suffix(suffix))
        .arg("value", 0.0f32)
        .build_one();
    model.add_optimizer_state(s.clone());
    s
}

/// The shared part of every optimiser: the learning rate, its schedule, and the
/// checks of both.
fn check_rate(name: &str, lr: f32, policy: &LrPolicy, others: &[(&str, f32)]) -> Result<()> {
    for (what, v) in [("learning rate", lr)].iter().chain(others) {
        if !v.is_finite() || *v < 0.0 {
            return Err(Error::Config(format!(
                "{name} {what} must be finite and ≥ 0, got {v}"
            )));
        }
    }
    check_policy(policy)
}

/// Adam (Kingma & Ba), and with decoupled weight decay AdamW (Loshchilov &
/// Hutter): Caffe2's `Adam` op per parameter, two moments each.
#[derive(Clone, Debug, PartialEq)]
pub struct Adam {
    lr: f32,
    betas: (f32, f32),
    epsilon: f32,
    weight_decay: f32,
    decoupled: bool,
    skip_exempt: bool,
    policy: LrPolicy,
}

impl Adam {
    /// Adam at learning rate `lr` (β = 0.9, 0.999; ε = 1e-8; no weight decay).
    pub fn new(lr: f32) -> Self {
        Adam {
            lr,
            betas: (0.9, 0.999),
            epsilon: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
            skip_exempt: false,
            policy: LrPolicy::Fixed,
        }
    }

    /// Whether weight decay skips biases and batch-norm parameters.
    pub fn skip_decay_on_biases_and_norms(mut self, on: bool) -> Self {
        self.skip_exempt = on;
        self
    }

    /// AdamW: Adam whose weight decay shrinks the parameters directly
    /// (`p ← p − lr·wd·p`) instead of adding to the gradient.
    pub fn adamw(lr: f32, weight_decay: f32) -> Self {
        Adam {
            weight_decay,
            decoupled: true,
            ..Adam::new(lr)
        }
    }

    /// The moments' decay rates β₁, β₂.
    pub fn betas(mut self, beta1: f32, beta2: f32) -> Self {
        self.betas = (beta1, beta2);
        self
    }

    /// ε in the denominator.
    pub fn epsilon(mut self, eps: f32) -> Self {
        self.epsilon = eps;
        self
    }

    /// L2 weight decay added to the gradient (coupled; see [`Adam::adamw`]).
    pub fn weight_decay(mut self, wd: f32) -> Self {
        self.weight_decay = wd;
        self
    }

    /// The learning-rate schedule.
    pub fn lr_policy(mut self, policy: LrPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Appends the update of every parameter of the current scope with a gradient.
    pub fn build(&self, model: &mut ModelHelper) -> Result<()> {
        let (b1, b2) = self.betas;
        check_rate(
            "Adam",
            self.lr,
            &self.policy,
            &[("epsilon", self.epsilon), ("weight decay", self.weight_decay)],
        )?;
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
            return Err(Error::Config(format!(
                "Adam betas must be in [0, 1), got ({b1}, {b2})"
            )));
        }
        let params = params_with_gradients(model)?;
        // L2 decay as Caffe2 adds it (a WeightedSum into the gradient); AdamW's
        // decoupled decay has no Caffe2 form and stays an argument of dpm's Adam.
        let l2 = self.weight_decay > 0.0 && !self.decoupled;
        let (iter, lr, consts) = model.device_scope(Device::Cpu(0), |m| {
            let lr = counter_and_lr(m, -self.lr, &self.policy);
            let consts = l2.then(|| {
                (
                    scalar_const(m, "ONE", 1.0),
                    scalar_const(m, "WD", self.weight_decay),
                )
            });
            (m.blob("ITER"), lr, consts)
        });
        for (p, g) in params {
            let m1 = state_like(model, &p, "_first_moment");
            let m2 = state_like(model, &p, "_second_moment");
            add_l2_decay(
                model,
                consts.as_ref().map(|(o, w)| (o, w)),
                &p,
                &g,
                self.skip_exempt,
            );
            let plr = lr_for(model, &p, &lr);
            let decoupled_wd = decay(model, &p, self.weight_decay, self.skip_exempt);
            let mut op = model
                .net_mut()
                .op("Adam")
                .inputs([&p, &m1, &m2, &g, &plr, &iter])
                .outputs([&p, &m1, &m2])
                .arg("beta1", b1)
                .arg("beta2", b2)
                .arg("epsilon", self.epsilon);
            if self.decoupled && decoupled_wd > 0.0 {
                op = op.arg("weight_decay", decoupled_wd).arg("decoupled", 1i64);
            }
            op.build();
        }
        Ok(())
    }
}

/// RMSProp: Caffe2's `RmsProp` op, then `param += grad` (the op leaves the step
/// in the gradient's blob).
#[derive(Clone, Debug, PartialEq)]
pub struct RmsProp {
    lr: f32,
    decay: f32,
    momentum: f32,
    epsilon: f32,
    policy: LrPolicy,
}

impl RmsProp {
    /// RMSProp at learning rate `lr` (decay 0.9, no momentum, ε = 1e-5).
    pub fn new(lr: f32) -> Self {
        RmsProp {
            lr,
            decay: 0.9,
            momentum: 0.0,
            epsilon: 1e-5,
            policy: LrPolicy::Fixed,
        }
    }

    /// Decay of the running mean of squared gradients.
    pub fn decay(mut self, decay: f32) -> Self {
        self.decay = decay;
        self
    }

    /// Momentum of the step.
    pub fn momentum(mut self, momentum: f32) -> Self {
        self.momentum = momentum;
        self
    }

    /// ε under the square root.
    pub fn epsilon(mut self, eps: f32) -> Self {
        self.epsilon = eps;
        self
    }

    /// The learning-rate schedule.
    pub fn lr_policy(mut self, policy: LrPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Appends the update of every parameter of the current scope with a gradient.
    pub fn build(&self, model: &mut ModelHelper) -> Result<()> {
        check_rate(
            "RMSProp",
            self.lr,
            &self.policy,
            &[
                ("decay", self.decay),
                ("momentum", self.momentum),
                ("epsilon", self.epsilon),
            ],
        )?;
        let params = params_with_gradients(model)?;
        let (lr, one) = model.device_scope(Device::Cpu(0), |m| {
            (
                counter_and_lr(m, -self.lr, &self.policy),
                scalar_const(m, "ONE", 1.0),
            )
        });
        for (p, g) in params {
            let ms = state_like(model, &p, "_mean_squares");
            let mom = state_like(model, &p, "_momentum");
            let plr = lr_for(model, &p, &lr);
            model
                .net_mut()
                .op("RmsProp")
                .inputs([&g, &ms, &mom, &plr])
                .outputs([&g, &ms, &mom])
                .arg("decay", self.decay)
                .arg("momentum", self.momentum)
                .arg("epsilon", self.epsilon)
                .build();
            model
                .net_mut()
                .op("WeightedSum")
                .inputs([&p, &one, &g, &one])
                .output(&p)
                .build();
        }
        Ok(())
    }
}

/// Adagrad: Caffe2's `Adagrad` op per parameter, one accumulator each.
#[derive(Clone, Debug, PartialEq)]
pub struct Adagrad {
    lr: f32,
    epsilon: f32,
    decay: f32,
    policy: LrPolicy,
}

impl Adagrad {
    /// Adagrad at learning rate `lr` (ε = 1e-5, no decay of the accumulator).
    pub fn new(lr: f32) -> Self {
        Adagrad {
            lr,
            epsilon: 1e-5,
            decay: 1.0,
            policy: LrPolicy::Fixed,
        }
    }

    /// ε in the denominator.
    pub fn epsilon(mut self, eps: f32) -> Self {
        self.epsilon = eps;
        self
    }

    /// Decay of the squared-gradient accumulator (1: none).
    pub fn decay(mut self, decay: f32) -> Self {
        self.decay = decay;
        self
    }

    /// The learning-rate schedule.
    pub fn lr_policy(mut self, policy: LrPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Appends the update of every parameter of the current scope with a gradient.
    pub fn build(&self, model: &mut ModelHelper) -> Result<()> {
        check_rate(
            "Adagrad",
            self.lr,
            &self.policy,
            &[("epsilon", self.epsilon), ("decay", self.decay)],
        )?;
        let params = params_with_gradients(model)?;
        let lr = model.device_scope(Device::Cpu(0), |m| counter_and_lr(m, -self.lr, &self.policy));
        for (p, g) in params {
            let acc = state_like(model, &p, "_moment");
            let plr = lr_for(model, &p, &lr);
            model
                .net_mut()
                .op("Adagrad")
                .inputs([&p, &acc, &g, &plr])
                .outputs([&p, &acc])
                .arg("epsilon", self.epsilon)
                .arg("decay", self.decay)
                .build();
        }
        Ok(())
    }
}

/// Weight decay as Caffe2's optimizers add it: `g ← 1·g + wd·p` (a
/// `WeightedSum` with the constants `(ONE, WD)`) before the update; none where
/// there is no decay, nor for biases and norms when they are skipped.
fn add_l2_decay(
    model: &mut ModelHelper,
    consts: Option<(&BlobRef, &BlobRef)>,
    p: &BlobRef,
    g: &BlobRef,
    skip_exempt: bool,
) {
    let Some((one, wd)) = consts else { return };
    if skip_exempt && model.is_exempt_from_weight_decay(p) {
        return;
    }
    model
        .net_mut()
        .op("WeightedSum")
        .inputs([g, one, p, wd])
        .output(g)
        .build();
}

/// The weight decay of `p`: none for biases and norms when they are skipped.
fn decay(model: &ModelHelper, p: &BlobRef, wd: f32, skip_exempt: bool) -> f32 {
    if skip_exempt && model.is_exempt_from_weight_decay(p) {
        0.0
    } else {
        wd
    }
}

/// `ITER` (0 in the init net, +1 by an `Iter` op at the start of each step) and
/// the learning rate `lr` = `base_lr · policy(ITER)`, in the current (host)
/// scope: every optimizer's. As in Caffe2, the first step reads `ITER` = 1
/// (and Adam's `t = ITER + 1` is 2).
fn counter_and_lr(model: &mut ModelHelper, base_lr: f32, policy: &LrPolicy) -> BlobRef {
    let iter = model
        .init_net_mut()
        .op("ConstantFill")
        .output("ITER")
        .arg("shape", vec![1i64])
        .arg("value", 0i64)
        .arg("dtype", TensorDataType::Int64 as i64)
        .build_one();
    model.add_optimizer_state(iter.clone());
    // As Caffe2's optimizers: `Iter` first, so this step's rate (and Adam's
    // bias correction) reads the incremented count, 1 at the first step.
    model.net_mut().op("Iter").input(&iter).output(&iter).build();
    let lr = model
        .net_mut()
        .op("LearningRate")
        .input(&iter)
        .output("lr")
        .arg("base_lr", base_lr)
        .raw_args(policy.to_args(""))
        .build_one();
    lr
}

/// A schedule that cannot run is a build error, not a run-time one.
fn check_policy(p: &LrPolicy) -> Result<()> {
    let bad = |why: &str| Err(Error::Config(format!("learning-rate policy {p:?}: {why}")));
    match p {
        LrPolicy::Step { stepsize: 0, .. } => bad("needs stepsize ≥ 1"),
        LrPolicy::Poly { max_iter: 0, .. } => bad("needs max_iter ≥ 1"),
        LrPolicy::Cosine { period: 0, .. } => bad("needs period ≥ 1"),
        LrPolicy::LinearWarmup { iters: 0, .. } => bad("needs num_iter ≥ 1"),
        LrPolicy::MultiStep { steps, .. } if steps.is_empty() || steps.windows(2).any(|w| w[0] > w[1]) => {
            bad("needs ascending steps")
        }
        LrPolicy::Composite(parts) if parts.is_empty() => bad("needs at least one sub-policy"),
        LrPolicy::Composite(parts) => parts.iter().try_for_each(|(_, q)| check_policy(q)),
        _ => Ok(()),
    }
}

fn scalar_const(model: &mut ModelHelper, name: &str, value: f32) -> BlobRef {
    model
        .init_net_mut()
        .op("ConstantFill")
        .output(name)
        .arg("shape", vec![1i64])
        .arg("value", value)
        .build_one()
}
