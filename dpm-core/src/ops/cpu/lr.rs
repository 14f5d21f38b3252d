//! `LearningRate(ITER) → [base_lr · multiplier(ITER)]` and its policies, with
//! Caffe2's policy and argument names: `fixed`; `step` (`stepsize`, `gamma`);
//! `multistep` (`stepsizes`, `gamma`); `exp` (`gamma`); `inv` (`gamma`, `power`);
//! `poly` (`power`, `max_iter`); `cosine` (`period`, `min_ratio`, `restarts`);
//! `linearWarmup` (`start_multiplier`, `num_iter`); and `composite`
//! (`sub_policy_num_iters`, then each sub-policy's arguments prefixed
//! `sub_policy_{i}_`, its iterations counted from its own start).

use crate::error::{Error, Result};
use crate::graph::{ArgValue, Args};
use crate::ops::{Kernel, OpContext};
use crate::proto::{Argument, OperatorDef};

/// How the learning rate changes with the iteration.
#[derive(Clone, Debug, PartialEq)]
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
    /// Multiplied by `gamma` at each of `steps` (ascending iterations).
    MultiStep {
        /// Iterations at which the rate decays.
        steps: Vec<u64>,
        /// Decay factor.
        gamma: f32,
    },
    /// `gamma^iter`.
    Exp {
        /// Decay per iteration.
        gamma: f32,
    },
    /// `(1 + gamma·iter)^(−power)`.
    Inv {
        /// Scale of the iteration.
        gamma: f32,
        /// Exponent.
        power: f32,
    },
    /// `(1 − iter/max_iter)^power`, 0 from `max_iter` on.
    Poly {
        /// Exponent.
        power: f32,
        /// Iteration where the rate reaches 0.
        max_iter: u64,
    },
    /// Half a cosine from 1 down to `min_ratio` over `period` iterations, then
    /// `min_ratio` (or, with `restarts`, again from 1).
    Cosine {
        /// Iterations of one descent.
        period: u64,
        /// The multiplier at the bottom.
        min_ratio: f32,
        /// Whether to start over after each period.
        restarts: bool,
    },
    /// Linearly from `start` up to 1 over `iters` iterations, then 1.
    LinearWarmup {
        /// The multiplier at iteration 0.
        start: f32,
        /// Iterations of the ramp.
        iters: u64,
    },
    /// Policies in turn, each for its number of iterations (0: the rest), each
    /// counting iterations from its own start: warm-up, then a cosine, say.
    Composite(Vec<(u64, LrPolicy)>),
}

impl LrPolicy {
    /// The multiplier at iteration `iter`.
    pub fn multiplier(&self, iter: i64) -> f32 {
        let it = iter.max(0) as u64;
        match self {
            LrPolicy::Fixed => 1.0,
            LrPolicy::Step { stepsize, gamma } => {
                gamma.powi((it / stepsize.max(&1)).min(i32::MAX as u64) as i32)
            }
            LrPolicy::MultiStep { steps, gamma } => {
                gamma.powi(steps.iter().filter(|&&s| it >= s).count() as i32)
            }
            LrPolicy::Exp { gamma } => (f64::from(*gamma).powf(it as f64)) as f32,
            LrPolicy::Inv { gamma, power } => {
                (1.0 + f64::from(*gamma) * it as f64).powf(-f64::from(*power)) as f32
            }
            LrPolicy::Poly { power, max_iter } => {
                let left = 1.0 - (it as f64 / (*max_iter).max(1) as f64).min(1.0);
                left.powf(f64::from(*power)) as f32
            }
            LrPolicy::Cosine {
                period,
                min_ratio,
                restarts,
            } => {
                let p = (*period).max(1);
                let t = if *restarts { it % p } else { it.min(p) };
                let c = 0.5 * (1.0 + (std::f64::consts::PI * t as f64 / p as f64).cos());
                (f64::from(*min_ratio) + (1.0 - f64::from(*min_ratio)) * c) as f32
            }
            LrPolicy::LinearWarmup { start, iters } => {
                if it >= *iters {
                    1.0
                } else {
                    start + (1.0 - start) * it as f32 / (*iters).max(1) as f32
                }
            }
            LrPolicy::Composite(parts) => {
                let mut from = 0u64;
                for (n, p) in parts {
                    if *n == 0 || it < from + n {
                        return p.multiplier((it - from) as i64);
                    }
                    from += n;
                }
                parts
                    .last()
                    .map_or(1.0, |(n, p)| p.multiplier((*n).max(1) as i64))
            }
        }
    }

    /// Parses the policy named by argument `{prefix}policy` (default `fixed`).
    pub fn parse(op: &OperatorDef, prefix: &str) -> Result<LrPolicy> {
        let a = Args(&op.arg);
        let name = |n: &str| format!("{prefix}{n}");
        let int = |n: &str, d: i64| a.int(&name(n), d);
        let float = |n: &str, d: f32| a.float(&name(n), d);
        let positive = |n: &str| -> Result<u64> {
            let v = int(n, 0)?;
            if v <= 0 {
                return Err(Error::arg(name(n), format!("must be ≥ 1, got {v}")));
            }
            Ok(v as u64)
        };
        Ok(match a.string(&name("policy"), "fixed")?.as_str() {
            "fixed" => LrPolicy::Fixed,
            "step" => LrPolicy::Step {
                stepsize: positive("stepsize")?,
                gamma: float("gamma", 1.0)?,
            },
            "multistep" => {
                let steps = a.ints(&name("stepsizes")).unwrap_or(&[]);
                if steps.is_empty() || steps.iter().any(|&s| s < 0) || steps.windows(2).any(|w| w[0] > w[1]) {
                    return Err(Error::arg(name("stepsizes"), "the multistep policy needs ascending iterations ≥ 0"));
                }
                LrPolicy::MultiStep {
                    steps: steps.iter().map(|&s| s as u64).collect(),
                    gamma: float("gamma", 1.0)?,
                }
            }
            "exp" => LrPolicy::Exp {
                gamma: float("gamma", 1.0)?,
            },
            "inv" => LrPolicy::Inv {
                gamma: float("gamma", 0.0)?,
                power: float("power", 1.0)?,
            },
            "poly" => LrPolicy::Poly {
                power: float("power", 1.0)?,
                max_iter: positive("max_iter")?,
            },
            "cosine" => LrPolicy::Cosine {
                period: positive("period")?,
                min_ratio: float("min_ratio", 0.0)?,
                restarts: int("restarts", 0)? != 0,
            },
            "linearWarmup" => LrPolicy::LinearWarmup {
                start: float("start_multiplier", 0.0)?,
                iters: positive("num_iter")?,
            },
            "composite" if prefix.is_empty() => {
                let iters = a.ints("sub_policy_num_iters").unwrap_or(&[]);
                if iters.is_empty() || iters.iter().any(|&n| n < 0) {
                    return Err(Error::arg("sub_policy_num_iters", "the composite policy needs one count ≥ 0 per sub-policy"));
                }
                let parts = iters
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| Ok((n as u64, LrPolicy::parse(op, &format!("sub_policy_{i}_"))?)))
                    .collect::<Result<Vec<_>>>()?;
                LrPolicy::Composite(parts)
            }
            other => {
                return Err(Error::arg(
                    name("policy"),
                    format!(
                        "`{other}` is not a policy; use fixed, step, multistep, exp, inv, poly, cosine, linearWarmup or composite"
                    ),
                ))
            }
        })
    }

    /// The arguments that make [`LrPolicy::parse`] give this policy back.
    pub fn to_args(&self, prefix: &str) -> Vec<Argument> {
        let arg = |n: &str, v: ArgValue| v.to_proto(&format!("{prefix}{n}"));
        let policy = |p: &str| arg("policy", ArgValue::from(p));
        match self {
            LrPolicy::Fixed => vec![policy("fixed")],
            LrPolicy::Step { stepsize, gamma } => vec![
                policy("step"),
                arg("stepsize", ArgValue::from(*stepsize as i64)),
                arg("gamma", ArgValue::from(*gamma)),
            ],
            LrPolicy::MultiStep { steps, gamma } => vec![
                policy("multistep"),
                arg(
                    "stepsizes",
                    ArgValue::from(steps.iter().map(|&s| s as i64).collect::<Vec<_>>()),
                ),
                arg("gamma", ArgValue::from(*gamma)),
            ],
            LrPolicy::Exp { gamma } => vec![policy("exp"), arg("gamma", ArgValue::from(*gamma))],
            LrPolicy::Inv { gamma, power } => vec![
                policy("inv"),
                arg("gamma", ArgValue::from(*gamma)),
                arg("power", ArgValue::from(*power)),
            ],
            LrPolicy::Poly { power, max_iter } => vec![
                policy("poly"),
                arg("power", ArgValue::from(*power)),
                arg("max_iter", ArgValue::from(*max_iter as i64)),
            ],
            LrPolicy::Cosine {
                period,
                min_ratio,
                restarts,
            } => vec![
                policy("cosine"),
                arg("period", ArgValue::from(*period as i64)),
                arg("min_ratio", ArgValue::from(*min_ratio)),
                arg("restarts", ArgValue::from(i64::from(*restarts))),
            ],
            LrPolicy::LinearWarmup { start, iters } => vec![
                policy("linearWarmup"),
                arg("start_multiplier", ArgValue::from(*start)),
                arg("num_iter", ArgValue::from(*iters as i64)),
            ],
            LrPolicy::Composite(parts) => {
                let mut v = vec![
                    policy("composite"),
                    arg(
                        "sub_policy_num_iters",
                        ArgValue::from(parts.iter().map(|(n, _)| *n as i64).collect::<Vec<_>>()),
                    ),
                ];
                for (i, (_, p)) in parts.iter().enumerate() {
                    v.extend(p.to_args(&format!("sub_policy_{i}_")));
                }
                v
            }
        }
    }
}

/// `LearningRate(ITER) → [base_lr · policy(ITER)]`.
pub struct LearningRate {
    base_lr: f32,
    policy: LrPolicy,
}

impl LearningRate {
    /// Parses `base_lr` and the policy.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let base_lr = Args(&op.arg).float("base_lr", f32::NAN)?;
        if base_lr.is_nan() {
            return Err(Error::arg("base_lr", "required"));
        }
        Ok(Box::new(LearningRate {
            base_lr,
            policy: LrPolicy::parse(op, "")?,
        }))
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
