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
            policy: LrPolicy::Fixed,
        }
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
        if let LrPolicy::Step { stepsize: 0, .. } = self.policy {
            return Err(Error::Config("SGD step schedule needs stepsize ≥ 1".into()));
        }
        Ok(())
    }

    /// Appends the iteration counter, the learning rate and the update of every
    /// parameter of the current scope that has a gradient.
    pub fn build(&self, model: &mut ModelHelper) -> Result<()> {
        self.check()?;
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
                model
                    .net_mut()
                    .op("MomentumSGDUpdate")
                    .inputs([&g, &m, &lr, &p])
                    .outputs([&g, &m, &p])
                    .arg("momentum", self.momentum)
                    .arg("nesterov", self.nesterov)
                    .arg("weight_decay", self.weight_decay)
                    .build();
            }
        } else {
            let one = one.expect("plain SGD makes ONE");
            for (p, g) in params {
                if let Some(wd) = &wd {
                    model
                        .net_mut()
                        .op("WeightedSum")
                        .inputs([&g, &one, &p, wd])
                        .output(&g)
                        .build();
                }
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
        let iter = model
            .init_net_mut()
            .op("ConstantFill")
            .output("ITER")
            .arg("shape", vec![1i64])
            .arg("value", 0.0f32)
            .arg("dtype", TensorDataType::Int64 as i64)
            .build_one();
        model.add_optimizer_state(iter.clone());
        let (base_lr, policy) = match self.policy {
            LrPolicy::Fixed => ("fixed", None),
            LrPolicy::Step { stepsize, gamma } => ("step", Some((stepsize, gamma))),
        };
        // Plain SGD adds −lr·grad with WeightedSum; momentum SGD subtracts lr·m.
        let signed_lr = if self.momentum > 0.0 { self.lr } else { -self.lr };
        let mut lr_op = model
            .net_mut()
            .op("LearningRate")
            .input(&iter)
            .output("lr")
            .arg("base_lr", signed_lr)
            .arg("policy", base_lr);
        if let Some((stepsize, gamma)) = policy {
            lr_op = lr_op.arg("stepsize", stepsize as i64).arg("gamma", gamma);
        }
        let lr = lr_op.build_one();
        model.net_mut().op("Iter").input(&iter).output(&iter).build();
        if self.momentum > 0.0 {
            return (lr, None, None);
        }
        let one = scalar_const(model, "ONE", 1.0);
        let wd = (self.weight_decay > 0.0).then(|| scalar_const(model, "WD", self.weight_decay));
        (lr, Some(one), wd)
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
