//! Optimisers and learning-rate schedules against their formulas: each update op
//! over several steps against a float64 reference, each schedule at several
//! iterations, and the optimisers inside a data-parallel trainer.

mod common;

use common::{cycling_source, mlp_forward, random};
use dpm::model::{Adagrad, Adam, LrPolicy, RmsProp};
use dpm::prelude::*;

fn close(a: &[f32], b: &[f64], what: &str) {
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            (f64::from(x) - y).abs() <= 1e-5 * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.data::<f32>().unwrap().iter().map(|&v| v.into()).collect()
}

/// Runs `op` (updating `state` in place) for 5 steps with fresh gradients, and
/// `reference` on float64 copies; compares every state blob after each step.
fn against_reference(
    op: impl Fn(&mut Net),
    state: &[&str],
    grad: &str,
    lr: f32,
    reference: impl Fn(&mut [Vec<f64>], &[f64], f64, i64),
) {
    let ws = Workspace::new();
    let n = 7;
    let mut refs: Vec<Vec<f64>> = Vec::new();
    for (k, s) in state.iter().enumerate() {
        // Parameters anywhere; accumulators start at 0 like the optimisers' own.
        let t = if k == 0 {
            random(&[n], 90, -1.0, 1.0, 0.0)
        } else {
            Tensor::zeros::<f32>([n])
        };
        refs.push(f64s(&t));
        ws.feed(s, t);
    }
    ws.feed("lr", Tensor::scalar(lr));
    let mut net = Net::new("update");
    op(&mut net);
    for step in 0..5i64 {
        let g = random(&[n], 100 + step as u64, -1.0, 1.0, 0.0);
        let gd = f64s(&g);
        ws.feed(grad, g);
        ws.feed("ITER", Tensor::scalar(step));
        ws.run_net_once(net.proto()).unwrap();
        reference(&mut refs, &gd, f64::from(lr), step);
        for (s, r) in state.iter().zip(&refs) {
            close(
                ws.fetch(s).unwrap().data::<f32>().unwrap(),
                r,
                &format!("{s} after step {step}"),
            );
        }
    }
}

#[test]
fn adam_and_adamw_follow_their_formulas() {
    for (wd, decoupled) in [(0.0f32, 0i64), (0.01, 0), (0.01, 1)] {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        against_reference(
            |n| {
                n.op("Adam")
                    .inputs(["p", "m", "v", "g", "lr", "ITER"])
                    .outputs(["p", "m", "v"])
                    .arg("beta1", b1 as f32)
                    .arg("beta2", b2 as f32)
                    .arg("epsilon", eps as f32)
                    .arg("weight_decay", wd)
                    .arg("decoupled", decoupled)
                    .build();
            },
            &["p", "m", "v"],
            "g",
            -0.01,
            |s, g, lr, iter| {
                let t = (iter + 1) as i32;
                let corr = (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
                let wd = f64::from(wd);
                for i in 0..g.len() {
                    let gi = if decoupled == 1 { g[i] } else { g[i] + wd * s[0][i] };
                    s[1][i] = b1 * s[1][i] + (1.0 - b1) * gi;
                    s[2][i] = b2 * s[2][i] + (1.0 - b2) * gi * gi;
                    if decoupled == 1 {
                        s[0][i] += lr * wd * s[0][i];
                    }
                    s[0][i] += lr * corr * s[1][i] / (s[2][i].sqrt() + eps);
                }
            },
        );
    }
}

#[test]
fn rmsprop_and_adagrad_follow_their_formulas() {
    let (decay, mu, eps) = (0.9f64, 0.5f64, 1e-5f64);
    against_reference(
        |n| {
            n.op("RmsProp")
                .inputs(["g", "ms", "mom", "lr"])
                .outputs(["g", "ms", "mom"])
                .arg("decay", decay as f32)
                .arg("momentum", mu as f32)
                .arg("epsilon", eps as f32)
                .build();
        },
        &["ms_unused", "ms", "mom"],
        "g",
        -0.01,
        |s, g, lr, _| {
            for i in 0..g.len() {
                s[1][i] += (1.0 - decay) * (g[i] * g[i] - s[1][i]);
                s[2][i] = mu * s[2][i] + lr * g[i] / (eps + s[1][i]).sqrt();
            }
        },
    );
    against_reference(
        |n| {
            n.op("Adagrad")
                .inputs(["p", "acc", "g", "lr"])
                .outputs(["p", "acc"])
                .arg("epsilon", eps as f32)
                .arg("decay", 0.95f32)
                .build();
        },
        &["p", "acc"],
        "g",
        -0.1,
        |s, g, lr, _| {
            for i in 0..g.len() {
                s[1][i] = 0.95 * s[1][i] + g[i] * g[i];
                s[0][i] += lr * g[i] / (s[1][i].sqrt() + eps);
            }
        },
    );
}

#[test]
fn every_schedule_follows_its_formula_and_round_trips_through_its_arguments() {
    use std::f64::consts::PI;
    type Formula = Box<dyn Fn(f64) -> f64>;
    let cases: Vec<(LrPolicy, Formula)> = vec![
        (LrPolicy::Fixed, Box::new(|_| 1.0)),
        (
            LrPolicy::Step {
                stepsize: 3,
                gamma: 0.5,
            },
            Box::new(|i| 0.5f64.powi((i / 3.0).floor() as i32)),
        ),
        (
            LrPolicy::MultiStep {
                steps: vec![2, 5],
                gamma: 0.1,
            },
            Box::new(|i| 0.1f64.powi((i >= 2.0) as i32 + (i >= 5.0) as i32)),
        ),
        (LrPolicy::Exp { gamma: 0.9 }, Box::new(|i| 0.9f64.powf(i))),
        (
            LrPolicy::Inv {
                gamma: 0.1,
                power: 0.75,
            },
            Box::new(|i| (1.0 + 0.1 * i).powf(-0.75)),
        ),
        (
            LrPolicy::Poly {
                power: 2.0,
                max_iter: 8,
            },
            Box::new(|i| (1.0 - (i / 8.0).min(1.0)).powi(2)),
        ),
        (
            LrPolicy::Cosine {
                period: 4,
                min_ratio: 0.1,
                restarts: true,
            },
            Box::new(|i| 0.1 + 0.9 * 0.5 * (1.0 + (PI * (i % 4.0) / 4.0).cos())),
        ),
        (
            LrPolicy::LinearWarmup { start: 0.2, iters: 4 },
            Box::new(|i| if i >= 4.0 { 1.0 } else { 0.2 + 0.8 * i / 4.0 }),
        ),
        (
            LrPolicy::Composite(vec![
                (3, LrPolicy::LinearWarmup { start: 0.0, iters: 3 }),
                (
                    0,
                    LrPolicy::Cosine {
                        period: 5,
                        min_ratio: 0.0,
                        restarts: false,
                    },
                ),
            ]),
            Box::new(|i| {
                if i < 3.0 {
                    i / 3.0
                } else {
                    let t = (i - 3.0).min(5.0);
                    0.5 * (1.0 + (PI * t / 5.0).cos())
                }
            }),
        ),
    ];
    for (policy, formula) in cases {
        let mut net = Net::new("lr");
        net.op("LearningRate")
            .input("ITER")
            .output("lr")
            .arg("base_lr", 0.5f32)
            .raw_args(policy.to_args(""))
            .build();
        let ws = Workspace::new();
        for iter in 0..12i64 {
            ws.feed("ITER", Tensor::scalar(iter));
            ws.run_net_once(net.proto()).unwrap();
            let got = ws.fetch("lr").unwrap().data::<f32>().unwrap()[0];
            let want = 0.5 * formula(iter as f64);
            assert!(
                (f64::from(got) - want).abs() < 1e-6,
                "{policy:?} at {iter}: {got} vs {want}"
            );
        }
        let parsed = LrPolicy::parse(&net.proto().op[0], "").unwrap();
        assert_eq!(parsed, policy);
    }
}

fn trainer(update: impl dpm::parallel::UpdateBuilder + 'static) -> Trainer {
    let mut t = Parallelize::new(ModelHelper::new("mlp"))
        .devices([Device::cpu(0), Device::cpu(1)])
        .input(cycling_source(16, 0))
        .forward(mlp_forward)
        .update(update)
        .build()
        .unwrap();
    t.run_init().unwrap();
    t
}

#[test]
fn each_optimiser_trains_keeps_replicas_identical_and_checkpoints_its_state() {
    let warmup = LrPolicy::Composite(vec![
        (5, LrPolicy::LinearWarmup { start: 0.1, iters: 5 }),
        (
            0,
            LrPolicy::Cosine {
                period: 40,
                min_ratio: 0.1,
                restarts: false,
            },
        ),
    ]);
    let cases: Vec<(&str, Trainer, &[&str])> = vec![
        (
            "Adam",
            trainer(Adam::new(0.01).lr_policy(warmup.clone())),
            &["_first_moment", "_second_moment"],
        ),
        (
            "AdamW",
            trainer(Adam::adamw(0.01, 0.01)),
            &["_first_moment", "_second_moment"],
        ),
        (
            "RMSProp",
            trainer(RmsProp::new(0.01).momentum(0.5)),
            &["_mean_squares", "_momentum"],
        ),
        ("Adagrad", trainer(Adagrad::new(0.1)), &["_moment"]),
    ];
    let dir = std::env::temp_dir().join(format!("dpm-opt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, mut t, suffixes) in cases {
        t.step().unwrap();
        let first = t.loss().unwrap();
        t.run(40).unwrap();
        let last = t.loss().unwrap();
        assert!(last < 0.7 * first, "{name}: loss {first} → {last}");
        for g in t.param_groups() {
            let a = t.fetch(&g.name, Device::cpu(0)).unwrap();
            assert!(
                a.bitwise_eq(&t.fetch(&g.name, Device::cpu(1)).unwrap()),
                "{name}: `{}` differs",
                g.name
            );
        }
        let path = dir.join(format!("{name}.safetensors"));
        t.save(&path).unwrap();
        let keys: Vec<String> = dpm::checkpoint::load(&path)
            .unwrap()
            .tensors
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for s in suffixes {
            assert!(
                keys.contains(&format!("fc1_w{s}")),
                "{name}: no fc1_w{s} in {keys:?}"
            );
        }
        assert!(t.lr().unwrap() > 0.0);
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn the_trainer_reports_the_scheduled_learning_rate() {
    let policy = LrPolicy::Step {
        stepsize: 2,
        gamma: 0.5,
    };
    let mut t = trainer(Sgd::new(0.4).momentum(0.9).lr_policy(policy.clone()));
    for step in 0..5 {
        t.step().unwrap();
        // As in Caffe2, `Iter` runs first: step k (from 0) reads ITER = k + 1.
        let want = 0.4 * policy.multiplier(step + 1);
        assert!(
            (t.lr().unwrap() - want).abs() < 1e-7,
            "step {step}: {} vs {want}",
            t.lr().unwrap()
        );
    }
}

#[test]
fn weight_decay_can_skip_biases_and_norms() {
    // The net says which parameters decay: the weights, and with the option not
    // the biases (batch-norm parameters are marked the same way by spatial_bn).
    // Decay is Caffe2's `WeightedSum(grad, ONE, param, WD) → grad` before the
    // update (MomentumSGDUpdate itself carries none).
    let decays = |sgd: Sgd| -> Vec<String> {
        let t = trainer(sgd);
        let ops = &t.model().net().proto().op;
        assert!(ops
            .iter()
            .filter(|o| o.op_type() == "MomentumSGDUpdate")
            .all(|o| o.find_arg("weight_decay").is_none()));
        ops.iter()
            .filter(|o| {
                o.op_type() == "WeightedSum"
                    && o.output[0].starts_with("cpu_0/")
                    && o.output[0].ends_with("_grad")
            })
            .map(|o| {
                assert_eq!(o.input[0], o.output[0]);
                assert!(o.input[3].ends_with("WD"), "{o:?}");
                o.input[2].clone()
            })
            .collect()
    };
    let all = decays(Sgd::new(0.1).momentum(0.9).weight_decay(0.01));
    assert_eq!(all, ["cpu_0/fc1_w", "cpu_0/fc1_b", "cpu_0/fc2_w", "cpu_0/fc2_b"]);
    let skip = decays(
        Sgd::new(0.1)
            .momentum(0.9)
            .weight_decay(0.01)
            .skip_decay_on_biases_and_norms(true),
    );
    assert_eq!(skip, ["cpu_0/fc1_w", "cpu_0/fc2_w"]);
    assert!(decays(Sgd::new(0.1).momentum(0.9)).is_empty());
    // The same holds for Adam, and the skipped biases train as without decay.
    let mut a = trainer(
        Adam::new(0.01)
            .weight_decay(0.5)
            .skip_decay_on_biases_and_norms(true),
    );
    let mut b = trainer(Adam::new(0.01).weight_decay(0.5));
    a.run(3).unwrap();
    b.run(3).unwrap();
    let bias = |t: &Trainer| t.fetch("fc1_b", Device::cpu(0)).unwrap();
    assert!(!bias(&a).bitwise_eq(&bias(&b)), "the option changed nothing");
}

fn trainer_with(model: ModelHelper, update: impl dpm::parallel::UpdateBuilder + 'static) -> Result<Trainer> {
    let mut t = Parallelize::new(model)
        .devices([Device::cpu(0), Device::cpu(1)])
        .input(cycling_source(16, 0))
        .forward(mlp_forward)
        .update(update)
        .build()?;
    t.run_init()?;
    Ok(t)
}

/// Per-parameter learning-rate multipliers (Caffe2's `lr_mult`): the first
/// momentum-SGD step moves a parameter by lr·m·g, so its update is m times the
/// update without the multiplier; 0 freezes a parameter under every optimiser;
/// the others train as without multipliers; a name no parameter has is an error.
#[test]
fn learning_rate_multipliers_scale_each_parameters_update() {
    let mut plain = trainer(Sgd::new(0.1).momentum(0.9));
    let mut model = ModelHelper::new("mlp");
    model
        .set_lr_multiplier("fc2_w", 0.25)
        .set_lr_multiplier("fc1_b", 0.0);
    let mut scaled = trainer_with(model.clone(), Sgd::new(0.1).momentum(0.9)).unwrap();
    let before = |t: &Trainer, n: &str| t.fetch(n, Device::cpu(1)).unwrap();
    let w0 = before(&plain, "fc2_w");
    let b0 = before(&plain, "fc1_b");
    plain.step().unwrap();
    scaled.step().unwrap();
    let delta = |t: &Trainer, n: &str, x0: &Tensor| -> Vec<f32> {
        let x = t.fetch(n, Device::cpu(1)).unwrap();
        x.data::<f32>()
            .unwrap()
            .iter()
            .zip(x0.data::<f32>().unwrap())
            .map(|(a, b)| a - b)
            .collect()
    };
    let (dp, ds) = (delta(&plain, "fc2_w", &w0), delta(&scaled, "fc2_w", &w0));
    assert!(dp.iter().any(|v| *v != 0.0));
    // Updates are differences of parameters: exact to a few of their ulps.
    let ulp = w0.data::<f32>().unwrap().iter().fold(0f32, |m, v| m.max(v.abs())) * f32::EPSILON;
    for (p, s) in dp.iter().zip(&ds) {
        assert!((0.25 * p - s).abs() <= 4.0 * ulp, "{s} is not a quarter of {p}");
    }
    assert!(
        before(&scaled, "fc1_b").bitwise_eq(&b0),
        "a 0 multiplier froze nothing"
    );
    // Parameters without a multiplier took the same first step.
    assert!(before(&scaled, "fc1_w").bitwise_eq(&before(&plain, "fc1_w")));
    // Every optimiser honours it, on every replica.
    let mut frozen = ModelHelper::new("mlp");
    frozen.set_lr_multiplier("fc1_w", 0.0);
    for opt in 0..3 {
        let mut t = match opt {
            0 => trainer_with(frozen.clone(), Adam::new(0.01)),
            1 => trainer_with(frozen.clone(), RmsProp::new(0.01)),
            _ => trainer_with(frozen.clone(), Adagrad::new(0.1)),
        }
        .unwrap();
        let w = t.fetch("fc1_w", Device::cpu(0)).unwrap();
        t.run(3).unwrap();
        for d in [Device::cpu(0), Device::cpu(1)] {
            assert!(
                t.fetch("fc1_w", d).unwrap().bitwise_eq(&w),
                "optimiser {opt}, {d}"
            );
        }
        assert!(!t
            .fetch("fc2_w", Device::cpu(0))
            .unwrap()
            .bitwise_eq(&before(&plain, "fc2_w")));
    }
    let mut typo = ModelHelper::new("mlp");
    typo.set_lr_multiplier("fc9_w", 0.5);
    let e = trainer_with(typo, Sgd::new(0.1))
        .err()
        .expect("an unknown name is an error")
        .to_string();
    assert!(e.contains("`fc9_w`"), "{e}");
}
