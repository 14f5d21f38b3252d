//! The data-parallel layer: equivalence with one big batch, identical replicas,
//! checkpoints, gradient memory, and errors for bad input.

mod common;

use common::{cycling_source, mlp_forward};
use dpm::parallel::{ComputedParams, Parallelize, Rendezvous};
use dpm::prelude::*;

fn cpus(n: u32) -> Vec<Device> {
    (0..n).map(Device::cpu).collect()
}

fn trainer(devices: u32, batch_per_device: usize, start: usize) -> Parallelize {
    Parallelize::new(ModelHelper::new("mlp"))
        .devices(cpus(devices))
        .input(cycling_source(devices as usize * batch_per_device, start))
        .forward(mlp_forward)
        .update(Sgd::new(0.1).momentum(0.9).weight_decay(1e-4))
}

fn params(t: &Trainer, device: Device) -> Vec<(String, Tensor)> {
    t.param_groups()
        .iter()
        .map(|g| (g.name.clone(), t.fetch(&g.name, device).unwrap()))
        .collect()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.data::<f32>().unwrap(), b.data::<f32>().unwrap());
    let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0.0, f32::max)
}

#[test]
fn n_devices_match_one_device_with_the_whole_batch() {
    let batch = 6;
    for n in 1..=4u32 {
        let mut single = trainer(1, n as usize * batch, 0).build().unwrap();
        let mut multi = trainer(n, batch, 0).build().unwrap();
        single.run_init().unwrap();
        multi.run_init().unwrap();
        single.run(10).unwrap();
        multi.run(10).unwrap();
        for ((name, a), (_, b)) in params(&single, Device::cpu(0))
            .iter()
            .zip(params(&multi, Device::cpu(0)))
        {
            let d = max_rel_diff(a, &b);
            assert!(d < 1e-4, "{n} devices: {name} differs by {d:e}");
        }
        let (l1, ln) = (single.loss().unwrap(), multi.loss().unwrap());
        assert!((l1 - ln).abs() < 1e-4 * l1.abs().max(1.0), "loss {l1} vs {ln}");
    }
}

#[test]
fn replicas_stay_bitwise_identical_and_runs_are_reproducible() {
    let run = || {
        let mut t = trainer(3, 4, 0).build().unwrap();
        t.run_init().unwrap();
        let mut history = Vec::new();
        for _ in 0..6 {
            t.step().unwrap();
            let master = params(&t, Device::cpu(0));
            for d in 1..3 {
                for ((name, a), (_, b)) in master.iter().zip(params(&t, Device::cpu(d))) {
                    assert!(a.bitwise_eq(&b), "{name} differs on cpu:{d}");
                }
            }
            history.push(master);
        }
        history
    };
    let (a, b) = (run(), run());
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert!(x.1.bitwise_eq(&y.1), "{} differs between runs", x.0);
    }
}

#[test]
fn resuming_from_a_checkpoint_matches_an_uninterrupted_run() {
    let dir = std::env::temp_dir().join(format!("dpm-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mlp.safetensors");
    let mut straight = trainer(2, 4, 0).build().unwrap();
    straight.run_init().unwrap();
    straight.run(10).unwrap();

    let mut first = trainer(2, 4, 0).build().unwrap();
    first.run_init().unwrap();
    first.run(5).unwrap();
    first.save(&path).unwrap();
    drop(first);
    let mut resumed = trainer(2, 4, 5).build().unwrap();
    resumed.load(&path).unwrap();
    resumed.run(5).unwrap();
    for d in cpus(2) {
        for ((name, a), (_, b)) in params(&straight, d).iter().zip(params(&resumed, d)) {
            assert!(a.bitwise_eq(&b), "{name} on {d} differs after resume");
        }
    }
    assert_eq!(
        resumed
            .fetch("ITER", Device::cpu(1))
            .unwrap()
            .data::<i64>()
            .unwrap(),
        &[10]
    );

    // Corrupted and truncated files are clear errors and leave the trainer as it was.
    let bytes = std::fs::read(&path).unwrap();
    let before = params(&resumed, Device::cpu(0));
    for (i, bad) in [
        bytes[..bytes.len() / 2].to_vec(),
        vec![0xff; 64],
        bytes[..4].to_vec(),
    ]
    .iter()
    .enumerate()
    {
        let p = dir.join(format!("bad{i}.safetensors"));
        std::fs::write(&p, bad).unwrap();
        let err = resumed.load(&p).unwrap_err();
        assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    }
    assert!(resumed.load(dir.join("absent.safetensors")).is_err());
    // A checkpoint of another model is refused by name.
    let mut other = Parallelize::new(ModelHelper::new("other"))
        .devices(cpus(1))
        .forward(|m: &mut ModelHelper| {
            let x = m.blob("data");
            let y = m.fc("other_fc", &x, 8, 2)?;
            let label = m.blob("label");
            Ok(vec![m.softmax_with_loss(&y, &label, "loss").1])
        })
        .update(Sgd::new(0.1))
        .build()
        .unwrap();
    other.run_init().unwrap();
    let err = other.load(&path).unwrap_err().to_string();
    assert!(err.contains("other_fc"), "{err}");
    for ((n, a), (_, b)) in before.iter().zip(params(&resumed, Device::cpu(0))) {
        assert!(a.bitwise_eq(&b), "{n} changed by a failed load");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gradient_memory_sharing_keeps_results_and_lowers_the_peak() {
    let run = |share: bool| {
        let mut t = trainer(2, 16, 0).optimize_gradient_memory(share).build().unwrap();
        t.run_init().unwrap();
        t.run(5).unwrap();
        (params(&t, Device::cpu(0)), t.gradient_bytes())
    };
    let (plain, plain_bytes) = run(false);
    let (shared, shared_bytes) = run(true);
    for ((name, a), (_, b)) in plain.iter().zip(&shared) {
        assert!(a.bitwise_eq(b), "{name} differs with gradient sharing");
    }
    assert!(
        shared_bytes < plain_bytes,
        "gradient bytes {plain_bytes} → {shared_bytes}"
    );
    eprintln!("gradient bytes: {plain_bytes} → {shared_bytes}");
}

#[test]
fn allreduces_run_last_layer_first_chained_by_control_inputs() {
    // Caffe2's form: one all-reduce per gradient.
    let t = trainer(2, 4, 0).bucket_bytes(0).build().unwrap();
    let ops: Vec<_> = t
        .model()
        .net()
        .ops()
        .iter()
        .filter(|o| o.op_type() == "Allreduce")
        .collect();
    let order: Vec<&str> = ops.iter().map(|o| o.input[0].as_str()).collect();
    assert_eq!(
        order,
        [
            "cpu_0/fc2_w_grad",
            "cpu_0/fc2_b_grad",
            "cpu_0/fc1_w_grad",
            "cpu_0/fc1_b_grad"
        ]
    );
    assert!(ops[0].control_input.is_empty());
    for w in ops.windows(2) {
        assert_eq!(w[1].control_input, [w[0].input[0].clone()]);
    }
    assert_eq!(ops[0].input, ["cpu_0/fc2_w_grad", "cpu_1/fc2_w_grad"]);
    // The loss is scaled by 1 / devices before differentiation.
    let scale = t
        .model()
        .net()
        .ops()
        .iter()
        .find(|o| o.op_type() == "Scale")
        .unwrap();
    assert_eq!(scale.find_arg("scale").unwrap().f, Some(0.5));
    assert_eq!(t.blob_device("cpu_1/fc1_w"), Some(Device::cpu(1)));
    let net = t.model().net().proto();
    assert_eq!(net.r#type.as_deref(), Some("dag"));
}

#[test]
fn computed_params_are_broadcast_averaged_or_kept() {
    for n in [2u32, 3] {
        for mode in [
            ComputedParams::Broadcast,
            ComputedParams::Average,
            ComputedParams::Keep,
        ] {
            let mut t = trainer(n, 4, 0)
                .forward(|m: &mut ModelHelper| {
                    let losses = mlp_forward(m)?;
                    // Like a running statistic: initialised once, recomputed every step.
                    m.init_net_mut()
                        .op("ConstantFill")
                        .output("loss_stat")
                        .arg("shape", Vec::<i64>::new())
                        .build();
                    let stat = m
                        .net_mut()
                        .op("Copy")
                        .input(&losses[0])
                        .output("loss_stat")
                        .build_one();
                    m.add_computed_param(stat);
                    Ok(losses)
                })
                .computed_params(mode)
                .build()
                .unwrap();
            t.run_init().unwrap();
            t.step().unwrap();
            let scalar =
                |name: &str, d: u32| t.fetch(name, Device::cpu(d)).unwrap().data::<f32>().unwrap()[0];
            let losses: Vec<f32> = (0..n).map(|d| scalar("loss", d)).collect();
            let mean = losses.iter().sum::<f32>() / n as f32;
            for d in 0..n {
                let (s, want) = (
                    scalar("loss_stat", d),
                    match mode {
                        ComputedParams::Broadcast => losses[0],
                        ComputedParams::Average => mean,
                        ComputedParams::Keep => losses[d as usize],
                    },
                );
                assert!(
                    (s - want).abs() < 1e-6,
                    "{n} devices, {mode:?}: cpu_{d} holds {s}, not {want}"
                );
            }
        }
    }
}

#[test]
fn one_device_needs_no_collectives() {
    let t = trainer(1, 4, 0).build().unwrap();
    let nets = [t.model().net().ops(), t.model().init_net().ops()];
    for op in nets.iter().flat_map(|ops| ops.iter()) {
        assert!(!matches!(op.op_type(), "Allreduce" | "Broadcast"), "{op:?}");
    }
}

#[test]
fn forward_only_models_run_without_gradients() {
    let mut t = Parallelize::new(ModelHelper::new("infer"))
        .devices(cpus(2))
        .input(cycling_source(8, 0))
        .forward(mlp_forward)
        .build()
        .unwrap();
    t.run_init().unwrap();
    t.step().unwrap();
    assert!(!t.is_training());
    assert!(t
        .model()
        .net()
        .ops()
        .iter()
        .all(|o| o.is_gradient_op != Some(true)));
    assert!(t.loss().unwrap() > 0.0);
    // Replicas start from the master's parameters.
    for g in t.param_groups() {
        assert!(t
            .fetch(&g.name, Device::cpu(0))
            .unwrap()
            .bitwise_eq(&t.fetch(&g.name, Device::cpu(1)).unwrap()));
    }
}

fn build_err(p: Parallelize) -> String {
    match p.build() {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_configurations_are_clear_errors() {
    let base = || {
        Parallelize::new(ModelHelper::new("m"))
            .forward(mlp_forward)
            .update(Sgd::new(0.1))
    };
    assert!(build_err(base()).contains("no devices"));
    assert!(build_err(base().devices([Device::cpu(0), Device::cpu(0)])).contains("twice"));
    assert!(build_err(base().devices([Device::cuda(0)])).contains("cuda"));
    assert!(build_err(base().devices(cpus(1)).net_type("fancy")).contains("fancy"));
    let r = Rendezvous {
        shard_id: 0,
        num_shards: 2,
        engine: "GLOO".into(),
    };
    assert!(build_err(base().devices(cpus(1)).rendezvous(r)).contains("engine `GLOO` is unknown"));
    // Several MPI shards: built by `tests/mpi.rs` with the feature; without it,
    // the remedy.
    if !cfg!(feature = "mpi") {
        let two = Rendezvous {
            shard_id: 0,
            num_shards: 2,
            engine: "MPI".into(),
        };
        let e = build_err(base().devices(cpus(1)).rendezvous(two));
        assert!(e.contains("rebuild with `--features mpi`"), "{e}");
    }
    let shards = |shard_id, num_shards| Rendezvous {
        shard_id,
        num_shards,
        engine: "MPI".into(),
    };
    for (id, n) in [(2, 2), (0, 0), (1, 1)] {
        assert!(build_err(base().devices(cpus(1)).rendezvous(shards(id, n))).contains("below"));
    }
    // One shard is one host: it builds.
    assert!(base().devices(cpus(1)).rendezvous(shards(0, 1)).build().is_ok());
    let no_loss = base().devices(cpus(2)).forward(|_: &mut ModelHelper| Ok(vec![]));
    assert!(build_err(no_loss).contains("no loss"));
    // A parameter only device 1 has.
    let uneven = base().devices(cpus(2)).forward(|m: &mut ModelHelper| {
        let losses = mlp_forward(m)?;
        if m.net().scope().prefix() == "cpu_1/" {
            m.create_param("extra", [1], Init::Constant(0.0))?;
        }
        Ok(losses)
    });
    let e = build_err(uneven);
    assert!(e.contains("extra") && e.contains("cpu:1"), "{e}");
    // A parameter only the master has is missing elsewhere, not out of order,
    // also when others follow it.
    let master_only = base().devices(cpus(2)).forward(|m: &mut ModelHelper| {
        if m.net().scope().prefix() == "cpu_0/" {
            m.create_param("extra", [1], Init::Constant(0.0))?;
        }
        mlp_forward(m)
    });
    let e = build_err(master_only);
    assert!(e.contains("`extra` exists on cpu:0 but not on cpu:1"), "{e}");
    // Parameters created in a different order.
    let shuffled = base().devices(cpus(2)).forward(|m: &mut ModelHelper| {
        let data = m.blob("data");
        let (a, b) = if m.net().scope().prefix() == "cpu_0/" {
            ("a", "b")
        } else {
            ("b", "a")
        };
        let x = m.fc(a, &data, 8, 8)?;
        let y = m.fc(b, &x, 8, 4)?;
        let label = m.blob("label");
        Ok(vec![m.softmax_with_loss(&y, &label, "loss").1])
    });
    assert!(build_err(shuffled).contains("different order"));
    // Reaching into another device's namescope.
    let crossing = base().devices(cpus(2)).forward(|m: &mut ModelHelper| {
        let foreign = BlobRef::new("cpu_0/data");
        let x = m.fc("fc", &foreign, 8, 4)?;
        let label = m.blob("label");
        Ok(vec![m.softmax_with_loss(&x, &label, "loss").1])
    });
    let e = build_err(crossing);
    assert!(e.contains("cpu_0/data") && e.contains("cross devices"), "{e}");
}

#[test]
fn run_time_failures_are_errors_not_hangs() {
    // A non-scalar loss.
    let mut t = Parallelize::new(ModelHelper::new("m"))
        .devices(cpus(2))
        .input(cycling_source(8, 0))
        .forward(|m: &mut ModelHelper| {
            let data = m.blob("data");
            Ok(vec![m.fc("fc", &data, 8, 3)?])
        })
        .update(Sgd::new(0.1))
        .build()
        .unwrap();
    t.run_init().unwrap();
    let e = t.step().unwrap_err().to_string();
    assert!(e.contains("scalar loss"), "{e}");
    // An op failing on one device only, mid-step: a label out of range on cpu:1.
    let mut t = trainer(2, 4, 0).build().unwrap();
    t.run_init().unwrap();
    t.step().unwrap();
    let mut source = cycling_source(8, 1);
    let batch = source().unwrap();
    for (name, tensor) in &batch {
        for (d, range) in [(0u32, 0..4usize), (1, 4..8)] {
            let mut part = if name == "data" {
                Tensor::from_vec(
                    [4, 8],
                    tensor.data::<f32>().unwrap()[range.start * 8..range.end * 8].to_vec(),
                )
                .unwrap()
            } else {
                Tensor::from_vec([4], tensor.data::<i32>().unwrap()[range].to_vec()).unwrap()
            };
            if name == "label" && d == 1 {
                part.data_mut::<i32>().unwrap()[2] = 99;
            }
            t.feed(name, Device::cpu(d), part).unwrap();
        }
    }
    let ws = t.workspace();
    let e = ws.run_net("mlp").unwrap_err().to_string();
    assert!(e.contains("cpu_1/label") && e.contains("99"), "{e}");
    // Batches that do not split evenly.
    let mut t = Parallelize::new(ModelHelper::new("m"))
        .devices(cpus(3))
        .input(cycling_source(8, 0))
        .forward(mlp_forward)
        .update(Sgd::new(0.1))
        .build()
        .unwrap();
    t.run_init().unwrap();
    assert!(t.step().unwrap_err().to_string().contains("divisible"));
    let mut fresh = trainer(1, 4, 0).build().unwrap();
    assert!(fresh.step().unwrap_err().to_string().contains("run_init"));
}

#[test]
fn the_init_net_broadcasts_the_masters_parameters_to_every_replica() {
    // Replicas 1 and 2 overwrite their own fc1_w and running statistic after
    // the regular fills, so they start different unless the init net syncs them.
    let t = Parallelize::new(ModelHelper::new("mlp"))
        .devices(cpus(3))
        .input(cycling_source(12, 0))
        .forward(|m: &mut ModelHelper| {
            let losses = mlp_forward(m)?;
            let stat = m.create_computed_param("stat", [2], 0.5);
            m.net_mut().op("Copy").input(&stat).output(&stat).build();
            let prefix = m.net().scope().prefix().to_owned();
            if prefix != "cpu_0/" {
                let value = if prefix == "cpu_1/" { 7.0f32 } else { -3.0 };
                for (blob, shape) in [("fc1_w", vec![16i64, 8]), ("stat", vec![2])] {
                    m.init_net_mut()
                        .op("ConstantFill")
                        .output(blob)
                        .arg("shape", shape)
                        .arg("value", value)
                        .build();
                }
            }
            Ok(losses)
        })
        .update(Sgd::new(0.1))
        .build()
        .unwrap();
    let mut t = t;
    t.run_init().unwrap();
    let computed: Vec<&str> = t
        .computed_param_groups()
        .iter()
        .map(|g| g.name.as_str())
        .collect();
    assert_eq!(computed, ["stat"]);
    let master_w = t.fetch("fc1_w", Device::cpu(0)).unwrap();
    assert!(master_w
        .data::<f32>()
        .unwrap()
        .iter()
        .any(|&x| x != 7.0 && x != -3.0));
    for d in 1..3 {
        for g in t.param_groups().iter().chain(t.computed_param_groups()) {
            let (a, b) = (
                t.fetch(&g.name, Device::cpu(0)).unwrap(),
                t.fetch(&g.name, Device::cpu(d)).unwrap(),
            );
            assert!(a.bitwise_eq(&b), "{} on cpu:{d} is not the master's", g.name);
        }
    }
    // The sync is the init net's last ops: one Broadcast from the master per
    // parameter and computed parameter.
    let init = t.model().init_net().ops();
    let groups = t.param_groups().len() + t.computed_param_groups().len();
    let tail = &init[init.len() - groups..];
    assert!(tail.iter().all(|o| o.op_type() == "Broadcast"
        && o.input.len() == 3
        && o.input[0].starts_with("cpu_0/")
        && o.device_option == Some(Device::cpu(0).to_proto())));
}

#[test]
fn every_replica_is_built_in_its_own_name_and_device_scope() {
    let t = trainer(3, 2, 0).build().unwrap();
    let mut per_device = [0usize; 3];
    for (i, op) in t.model().net().ops().iter().enumerate() {
        if matches!(op.op_type(), "Allreduce" | "Broadcast") {
            // One blob per device for each tensor (several in a bucket).
            assert!(!op.input.is_empty() && op.input.len() % 3 == 0, "op #{i}");
            for (j, b) in op.input.iter().enumerate() {
                assert!(b.starts_with(&format!("cpu_{}/", j % 3)), "op #{i} reads {b}");
            }
            continue;
        }
        // Caffe2's DeviceOption has no CPU index: a CPU replica's ops say CPU, and
        // its namescope says which one.
        let device = op.device_option.as_ref().map(|d| Device::from_proto(d).unwrap());
        assert!(
            matches!(device, Some(Device::Cpu(_))),
            "op #{i} `{}`: {device:?}",
            op.op_type()
        );
        let first = op.input.iter().chain(&op.output).next().unwrap();
        let d: usize = first[4..first.find('/').unwrap()].parse().unwrap();
        let prefix = format!("cpu_{d}/");
        for b in op.input.iter().chain(&op.output) {
            assert!(b.starts_with(&prefix), "op #{i} of cpu:{d} touches `{b}`");
        }
        per_device[d] += 1;
    }
    // Every replica got the same ops.
    assert!(
        per_device[0] > 0 && per_device.iter().all(|&n| n == per_device[0]),
        "{per_device:?}"
    );
}

#[test]
fn losses_are_scaled_by_one_over_devices_and_reported_as_the_mean() {
    for n in [1u32, 3, 4] {
        let mut t = trainer(n, 2, 0).build().unwrap();
        let scales: Vec<f32> = t
            .model()
            .net()
            .ops()
            .iter()
            .filter(|o| o.op_type() == "Scale" && o.is_gradient_op != Some(true))
            .map(|o| o.find_arg("scale").unwrap().f.unwrap())
            .collect();
        assert_eq!(scales, vec![1.0 / n as f32; n as usize]);
        t.run_init().unwrap();
        t.step().unwrap();
        let per_device: Vec<f32> = cpus(n)
            .into_iter()
            .map(|d| t.fetch("loss", d).unwrap().data::<f32>().unwrap()[0])
            .collect();
        let mean = per_device.iter().map(|&x| f64::from(x)).sum::<f64>() / f64::from(n);
        assert!(
            (f64::from(t.loss().unwrap()) - mean).abs() < 1e-6,
            "{per_device:?}"
        );
        let acc = t.mean_scalar("accuracy").unwrap();
        let accs: Vec<f32> = cpus(n)
            .into_iter()
            .map(|d| t.fetch("accuracy", d).unwrap().data::<f32>().unwrap()[0])
            .collect();
        assert!((acc - accs.iter().sum::<f32>() / n as f32).abs() < 1e-6);
    }
}

#[test]
fn the_train_net_carries_caffe2s_executor_settings() {
    // CPU replicas: as many workers as the cores hold at one kernel thread per
    // op here, at least one per device; GPU replicas: Caffe2's devices × 4.
    let t = trainer(3, 2, 0).build().unwrap();
    let net = t.model().net().proto();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / 3).max(1);
    let want = (cores / threads).max(3) as i32;
    assert_eq!(
        (net.r#type.as_deref(), net.num_workers),
        (Some("dag"), Some(want))
    );
    let (_, gpu_net) = Parallelize::new(ModelHelper::new("mlp"))
        .devices([Device::cuda(0), Device::cuda(1), Device::cuda(2)])
        .forward(mlp_forward)
        .update(Sgd::new(0.1))
        .build_nets()
        .unwrap();
    assert_eq!(gpu_net.num_workers, Some(12));
    assert_eq!(
        net.find_arg("first_iter_only_one_worker").and_then(|a| a.i),
        Some(1)
    );
    let t = trainer(2, 2, 0)
        .net_type("simple")
        .num_workers(5)
        .build()
        .unwrap();
    let net = t.model().net().proto();
    assert_eq!(
        (net.r#type.as_deref(), net.num_workers),
        (Some("simple"), Some(5))
    );
}

#[test]
fn the_trainer_splits_every_input_type_and_takes_a_new_source() {
    let mut t = trainer(2, 2, 0).build().unwrap();
    assert_eq!(t.devices(), cpus(2));
    t.run_init().unwrap();
    // A source with an extra i64 and f32 blob: each device gets its rows.
    t.set_input(|| -> Result<Vec<(String, Tensor)>> {
        let mut batch = cycling_source(4, 0)()?;
        batch.push((
            "ids".into(),
            Tensor::from_vec([4, 2], (0..8i64).collect()).unwrap(),
        ));
        batch.push((
            "w".into(),
            Tensor::from_vec([4], vec![0.5f32, 1.5, 2.5, 3.5]).unwrap(),
        ));
        Ok(batch)
    });
    t.step().unwrap();
    assert_eq!(
        t.fetch("ids", Device::cpu(0)).unwrap().data::<i64>().unwrap(),
        [0, 1, 2, 3]
    );
    assert_eq!(
        t.fetch("ids", Device::cpu(1)).unwrap().data::<i64>().unwrap(),
        [4, 5, 6, 7]
    );
    assert_eq!(
        t.fetch("w", Device::cpu(1)).unwrap().data::<f32>().unwrap(),
        [2.5, 3.5]
    );
    assert_eq!(t.fetch("label", Device::cpu(1)).unwrap().dims(), [2]);
    // A blob without a batch dimension cannot be split.
    let rank0 = || Tensor::from_vec(Vec::<usize>::new(), vec![1.0f32]).unwrap();
    t.set_input(move || Ok(vec![("s".to_owned(), rank0())]));
    let e = t.step().unwrap_err().to_string();
    assert!(e.contains("batch dimension"), "{e}");
    // The gradients, in all-reduce order, one blob per device.
    let grads: Vec<&str> = t.grad_groups().iter().map(|g| g.name.as_str()).collect();
    assert_eq!(grads, ["fc2_w_grad", "fc2_b_grad", "fc1_w_grad", "fc1_b_grad"]);
    assert_eq!(t.grad_groups()[0].blobs[1].name(), "cpu_1/fc2_w_grad");
    assert_eq!(t.blob_device("cpu_0/fc2_w_grad"), Some(Device::cpu(0)));
    assert_eq!(t.blob_device("nowhere"), None);
}

#[test]
fn kernel_threads_default_to_the_cores_each_device_gets() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for n in [1u32, 2, 3] {
        let t = trainer(n, 2, 0).build().unwrap();
        assert_eq!(t.kernel_threads(), (cores / n as usize).max(1));
    }
    let mut t = trainer(2, 2, 0).kernel_threads(3).build().unwrap();
    assert_eq!(t.kernel_threads(), 3);
    // The setting reaches the kernels through the trainer's workspace.
    t.run_init().unwrap();
    assert_eq!(t.workspace().kernel_threads(), 3);
}

#[test]
fn blob_devices_come_from_namescopes_then_from_the_ops_that_touch_them() {
    use dpm::parallel::{check_namescopes, infer_blob_devices};
    let mut net = Net::new("n");
    net.device_scope(Device::cuda(1), |n| {
        n.op("Relu").input("gpu_1/x").output("gpu_1/y").build();
        // Unscoped blobs take the device of the op touching them.
        n.op("Relu").input("shared_in").output("shared_out").build();
    });
    let devices = [Device::cuda(0), Device::cuda(1)];
    let map = infer_blob_devices([net.proto()], &devices);
    for (blob, d) in [
        ("gpu_1/x", 1),
        ("gpu_1/y", 1),
        ("shared_in", 1),
        ("shared_out", 1),
    ] {
        assert_eq!(map.get(blob), Some(&Device::cuda(d)), "{blob}");
    }
    assert_eq!(map.len(), 4);
    check_namescopes(net.proto(), &devices).unwrap();
    // A GPU op reaching into another GPU's namescope is refused, even alone.
    let mut bad = Net::new("bad");
    bad.device_scope(Device::cuda(1), |n| {
        n.op("Relu").input("gpu_0/x").output("z").build();
    });
    let e = check_namescopes(bad.proto(), &devices).unwrap_err().to_string();
    assert!(e.contains("runs on cuda:1") && e.contains("gpu_0/x"), "{e}");
    // Collectives and copies may cross.
    let mut ok = Net::new("ok");
    ok.op("Copy").input("gpu_0/x").output("gpu_1/x").build();
    ok.op("Allreduce")
        .inputs(["gpu_0/g", "gpu_1/g"])
        .outputs(["gpu_0/g", "gpu_1/g"])
        .build();
    check_namescopes(ok.proto(), &devices).unwrap();
}

#[test]
fn gradient_sharing_renames_disjoint_lifetimes_onto_few_buffers() {
    use dpm::parallel::share_gradient_blobs;
    use std::collections::HashSet;
    // a_grad is last read by op 1; b_grad is first written by op 2: they can share.
    // c_grad is written while b_grad is still to be read: it needs its own buffer.
    let mut net = Net::new("g");
    let grad = |n: &mut Net, ins: &[&str], out: &str| {
        n.op("Relu")
            .inputs(ins.iter().copied())
            .output(out)
            .gradient_op()
            .build();
    };
    net.name_scope("cpu_0", |n| {
        grad(n, &["x"], "a_grad");
        grad(n, &["a_grad"], "w_grad");
        grad(n, &["w_grad"], "b_grad");
        grad(n, &["b_grad"], "c_grad");
        grad(n, &["b_grad", "c_grad"], "v_grad");
        // e_grad is written by the op that reads v_grad for the last time: it
        // must not land in v_grad's buffer (the op would copy its input first).
        grad(n, &["v_grad"], "e_grad");
    });
    let mut def = net.proto().clone();
    let keep: HashSet<String> = ["cpu_0/w_grad"].map(String::from).into();
    assert_eq!(share_gradient_blobs(&mut def, "cpu_0", &keep), 3);
    let outs: Vec<&str> = def.op.iter().map(|o| o.output[0].as_str()).collect();
    assert_eq!(
        outs,
        [
            "cpu_0/__shared_grad_0",
            "cpu_0/w_grad",
            "cpu_0/__shared_grad_0",
            "cpu_0/__shared_grad_1",
            "cpu_0/__shared_grad_2",
            "cpu_0/__shared_grad_0"
        ]
    );
    assert_eq!(
        def.op[4].input,
        ["cpu_0/__shared_grad_0", "cpu_0/__shared_grad_1"]
    );
    // Another device's blobs, and forward ops, are left alone.
    let mut other = net.proto().clone();
    assert_eq!(share_gradient_blobs(&mut other, "cpu_1", &keep), 0);
    assert_eq!(&other, net.proto());
}

#[test]
fn input_and_update_builders_can_be_plain_closures() {
    // The input builder puts a reader in each replica: here fills that make a
    // fixed batch of 4 rows per device, the labels as int32.
    let mut t = Parallelize::new(ModelHelper::new("closures"))
        .devices(cpus(2))
        .input_builder(|m: &mut ModelHelper| {
            m.net_mut()
                .op("GaussianFill")
                .output("data")
                .arg("shape", vec![4i64, 8])
                .arg("seed", 3i64)
                .build();
            m.net_mut()
                .op("ConstantFill")
                .output("label")
                .arg("shape", vec![4i64])
                .arg("value", 1.0f32)
                .arg("dtype", dpm::proto::TensorDataType::Int32 as i64)
                .build();
            Ok(())
        })
        .forward(mlp_forward)
        .update(|m: &mut ModelHelper| Sgd::new(0.5).build(m))
        .build()
        .unwrap();
    for d in 0..2 {
        let data = t
            .model()
            .net()
            .ops()
            .iter()
            .find(|o| o.output == [format!("cpu_{d}/data")]);
        assert_eq!(data.map(|o| o.op_type()), Some("GaussianFill"));
    }
    t.run_init().unwrap();
    let before = params(&t, Device::cpu(0));
    t.run(5).unwrap();
    let after = params(&t, Device::cpu(0));
    assert!(
        before.iter().zip(&after).any(|((_, a), (_, b))| !a.bitwise_eq(b)),
        "nothing was updated"
    );
    for ((name, a), (_, b)) in after.iter().zip(params(&t, Device::cpu(1))) {
        assert!(a.bitwise_eq(&b), "{name} differs between replicas");
    }
    // Label 1 everywhere: the loss falls.
    assert!(t.loss().unwrap() < 0.5, "loss {}", t.loss().unwrap());
}

#[test]
fn a_trainer_that_was_not_initialised_says_so() {
    let t = trainer(2, 2, 0).build().unwrap();
    assert!(t.is_training());
    let path = std::env::temp_dir().join(format!("dpm-uninit-{}.safetensors", std::process::id()));
    for e in [
        t.save(&path).unwrap_err(),
        t.finalize_after_checkpoint().unwrap_err(),
    ] {
        assert!(e.to_string().contains("run_init"), "{e}");
    }
    assert!(!path.exists());
    let mut t = t;
    t.run_init().unwrap();
    t.step().unwrap();
    // A metric must be an f32 scalar.
    let e = t.mean_scalar("label").unwrap_err().to_string();
    assert!(e.contains("cpu_0/label") && e.contains("f32"), "{e}");
}

#[test]
fn gradient_accumulation_of_k_batches_equals_one_batch_k_times_larger() {
    // 2 devices × (2 micro-batches of 8) ≡ 2 devices × one batch of 16 (no batch
    // norm): equal up to the order of the sums.
    let build = |batch: usize, k: usize| {
        let mut t = Parallelize::new(ModelHelper::new("mlp"))
            .devices(cpus(2))
            .input(cycling_source(batch, 0))
            .forward(mlp_forward)
            .update(Sgd::new(0.1).momentum(0.9).weight_decay(1e-4))
            .gradient_accumulation(k)
            .build()
            .unwrap();
        t.run_init().unwrap();
        t
    };
    let (mut acc, mut big) = (build(8, 2), build(16, 1));
    for _ in 0..4 {
        acc.step().unwrap();
        big.step().unwrap();
    }
    for ((name, a), (_, b)) in params(&acc, Device::cpu(0))
        .iter()
        .zip(params(&big, Device::cpu(0)).iter())
    {
        let d = max_rel_diff(a, b);
        assert!(d < 1e-5, "`{name}`: {d:e}");
    }
    // One update per step: ITER counts steps, not micro-batches.
    let it = acc.fetch("ITER", Device::cpu(0)).unwrap();
    assert_eq!(it.data::<i64>().unwrap(), &[4]);
    assert!(Parallelize::new(ModelHelper::new("m"))
        .devices(cpus(1))
        .forward(mlp_forward)
        .update(Sgd::new(0.1))
        .gradient_accumulation(0)
        .build()
        .is_err());
}

/// A conv → batch norm → relu → pool → fc model for the sync-BN equivalence.
#[dpm::data_parallel]
fn conv_bn(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [3, 6, 6]);
    let label = m.input("label");
    let c = m.conv("c1", data, 4, 3).pad(1).no_bias().build()?;
    let b = m.spatial_bn("bn1", c)?;
    let r = m.relu(b)?;
    let c2 = m.conv("c2", r, 4, 3).pad(1).no_bias().build()?;
    let b2 = m.spatial_bn("bn2", c2)?;
    let r2 = m.relu(b2)?;
    let p = m.global_average_pool(r2)?;
    let logits = m.fc("fc", p, 3)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

/// 16 random images of 3×6×6 per step, cycling through three batches.
fn conv_bn_source() -> impl FnMut() -> Result<Vec<(String, Tensor)>> + 'static {
    let mut step = 0u64;
    move || {
        step += 1;
        let x = common::random(&[16, 3, 6, 6], 100 + step % 3, -1.0, 2.0, 0.0);
        let y: Vec<i32> = (0..16).map(|i| (i * 7 + step as i32) % 3).collect();
        Ok(vec![
            ("data".to_owned(), x),
            ("label".to_owned(), Tensor::from_vec([16], y).unwrap()),
        ])
    }
}

fn conv_bn_trainer(devices: &[Device], sync: bool, net_type: &str) -> Trainer {
    let mut model = ModelHelper::new("cbn");
    model.set_seed(3);
    let mut t = Parallelize::new(model)
        .devices(devices.to_vec())
        .input(conv_bn_source())
        .forward(conv_bn)
        .update(Sgd::new(0.1).momentum(0.9))
        .sync_batch_norm(sync)
        .net_type(net_type)
        .build()
        .unwrap();
    t.run_init().unwrap();
    t
}

/// Largest |a − b| over the tensor, against its largest |b|.
fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.data::<f32>().unwrap(), b.data::<f32>().unwrap());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn sync_batch_norm_makes_n_devices_train_like_one_device_with_the_whole_batch() {
    let mut one = conv_bn_trainer(&[Device::cpu(0)], false, "dag");
    one.run(5).unwrap();
    let devices = [Device::cpu(0), Device::cpu(1)];
    for net_type in ["dag", "simple"] {
        let mut synced = conv_bn_trainer(&devices, true, net_type);
        let mut local = conv_bn_trainer(&devices, false, net_type);
        synced.run(5).unwrap();
        local.run(5).unwrap();
        let mut local_off = 0f32;
        for g in one.param_groups().iter().chain(one.computed_param_groups()) {
            let want = one.fetch(&g.name, Device::cpu(0)).unwrap();
            for d in devices {
                let e = max_rel(&synced.fetch(&g.name, d).unwrap(), &want);
                assert!(
                    e <= 1e-4,
                    "{net_type}: `{}` on {d} is {e:.1e} off one device with the whole batch",
                    g.name
                );
            }
            local_off = local_off.max(max_rel(&local.fetch(&g.name, Device::cpu(0)).unwrap(), &want));
        }
        // Without it, each device normalises its own half: visibly different.
        assert!(
            local_off > 1e-3,
            "{net_type}: per-device batch norm matched too ({local_off:.1e})"
        );
        // The net holds the statistics ops and their all-reduces, two of each per batch norm and direction.
        let ops = synced.model().net().proto().op.clone();
        let count = |t: &str| ops.iter().filter(|o| o.op_type() == t).count();
        assert_eq!(
            (count("ChannelStats"), count("ChannelBackpropStats")),
            (4, 2 * 2 - 2 + 2)
        );
    }
}

/// The MLP on `[cuda:0, cuda:1]`, to build nets from without a GPU.
fn two_gpu_mlp() -> Parallelize {
    Parallelize::new(ModelHelper::new("mlp"))
        .devices([Device::cuda(0), Device::cuda(1)])
        .forward(mlp_forward)
        .update(Sgd::new(0.1).momentum(0.9))
}

/// Several GPUs, checked on any machine: the nets for `[cuda:0, cuda:1]` built
/// without touching a device hold one `NCCLAllreduce` per gradient, last layer
/// first, chained by `control_input`, on GPU 0's DeviceOption, over `gpu_0/…` and
/// `gpu_1/…`; the init net broadcasts with `NCCLBroadcast`; the bytes round-trip.
#[test]
fn multi_gpu_nets_use_nccl_ops_in_reverse_order_chained_by_control_inputs() {
    let (init, net) = two_gpu_mlp().build_nets().unwrap();
    let ops: Vec<_> = net
        .op
        .iter()
        .filter(|o| o.op_type().contains("Allreduce"))
        .collect();
    assert!(ops.iter().all(|o| o.op_type() == "NCCLAllreduce"));
    let order: Vec<&str> = ops.iter().map(|o| o.input[0].as_str()).collect();
    assert_eq!(
        order,
        [
            "gpu_0/fc2_w_grad",
            "gpu_0/fc2_b_grad",
            "gpu_0/fc1_w_grad",
            "gpu_0/fc1_b_grad"
        ]
    );
    assert_eq!(ops[0].input, ["gpu_0/fc2_w_grad", "gpu_1/fc2_w_grad"]);
    assert_eq!(ops[0].output, ops[0].input);
    assert!(ops[0].control_input.is_empty());
    for w in ops.windows(2) {
        assert_eq!(w[1].control_input, [w[0].input[0].clone()]);
    }
    for o in &ops {
        let d = o.device_option.as_ref().unwrap();
        assert_eq!((d.device_type, d.cuda_gpu_id), (Some(1), Some(0)), "{o:?}");
    }
    // Every other op of a replica runs on that replica's GPU, but the host
    // counters and learning rate (on the CPU, as in Caffe2).
    let mut on_gpu1 = 0;
    for o in net
        .op
        .iter()
        .filter(|o| o.output.iter().all(|b| b.starts_with("gpu_1/")) && !o.op_type().starts_with("NCCL"))
    {
        let d = o.device_option.as_ref().unwrap();
        if d.device_type == Some(1) {
            assert_eq!(d.cuda_gpu_id, Some(1), "{}", o.op_type());
            on_gpu1 += 1;
        } else {
            assert!(
                matches!(o.op_type(), "Iter" | "LearningRate" | "ConstantFill"),
                "{} on the host",
                o.op_type()
            );
        }
    }
    assert!(on_gpu1 > 10);
    let bcast: Vec<_> = init
        .op
        .iter()
        .filter(|o| o.op_type() == "NCCLBroadcast")
        .collect();
    assert!(!bcast.is_empty());
    assert!(bcast
        .iter()
        .all(|o| o.input.iter().any(|b| b.starts_with("gpu_0/"))
            && o.input.iter().any(|b| b.starts_with("gpu_1/"))));
    assert!(!net
        .op
        .iter()
        .chain(&init.op)
        .any(|o| matches!(o.op_type(), "Allreduce" | "Broadcast")));
    for n in [&init, &net] {
        let bytes = prost::Message::encode_to_vec(n);
        let back: NetDef = prost::Message::decode(bytes.as_slice()).unwrap();
        assert_eq!(&back, n);
    }
}

#[test]
fn gpu_gradient_buckets_are_one_nccl_op_each_when_asked_for() {
    // By default one NCCLAllreduce per gradient (above); with bucket_bytes,
    // one per bucket, its tensors device-major within each tensor, chained.
    let (_, net) = two_gpu_mlp().bucket_bytes(576).build_nets().unwrap();
    let ops: Vec<_> = net.op.iter().filter(|o| o.op_type() == "NCCLAllreduce").collect();
    assert_eq!(ops.len(), 2);
    assert_eq!(
        ops[0].input,
        [
            "gpu_0/fc2_w_grad",
            "gpu_1/fc2_w_grad",
            "gpu_0/fc2_b_grad",
            "gpu_1/fc2_b_grad"
        ]
    );
    let tensors = |o: &dpm::proto::OperatorDef| {
        o.arg
            .iter()
            .find(|a| a.name.as_deref() == Some("num_tensors"))
            .and_then(|a| a.i)
    };
    assert_eq!(tensors(ops[0]), Some(2));
    assert_eq!(ops[1].input[0], "gpu_0/fc1_w_grad");
    assert_eq!(ops[1].control_input, [ops[0].input[0].clone()]);
}

#[test]
fn two_replicas_on_one_gpu_are_refused_before_any_device_is_touched() {
    let e = Parallelize::new(ModelHelper::new("mlp"))
        .devices([Device::cuda(0), Device::cuda(0)])
        .forward(mlp_forward)
        .update(Sgd::new(0.1))
        .build_nets()
        .unwrap_err()
        .to_string();
    assert!(e.contains("cuda:0 is listed twice"), "{e}");
}

/// Across the hosts of an MPI job, CUDA replicas reduce with NCCL over one
/// communicator spanning the job: the same op types, tagged with engine `MPI`,
/// gradients in buckets in one chain that all ranks issue in one order.
#[cfg(feature = "mpi")]
#[test]
fn cross_host_gpu_nets_use_nccl_with_engine_mpi_in_one_chain() {
    let (init, net) = Parallelize::new(ModelHelper::new("mlp"))
        .devices([Device::cuda(0), Device::cuda(1)])
        .rendezvous(Rendezvous {
            shard_id: 1,
            num_shards: 2,
            engine: "MPI".into(),
        })
        .forward(mlp_forward)
        .update(Sgd::new(0.1).momentum(0.9))
        .build_nets()
        .unwrap();
    let colls: Vec<_> = net
        .op
        .iter()
        .filter(|o| o.op_type().starts_with("NCCL"))
        .collect();
    assert!(!colls.is_empty());
    for o in &colls {
        assert_eq!(o.engine.as_deref(), Some("MPI"), "{}", o.op_type());
        assert!(
            o.input.iter().any(|b| b.starts_with("gpu_0/"))
                && o.input.iter().any(|b| b.starts_with("gpu_1/"))
        );
    }
    // One chain: every collective after the first waits for the previous one.
    for w in colls.windows(2) {
        assert_eq!(w[1].control_input.len(), 1, "{}", w[1].op_type());
    }
    assert!(net
        .op
        .iter()
        .chain(&init.op)
        .all(|o| !matches!(o.op_type(), "Allreduce" | "Broadcast")));
    let b = init.op.iter().find(|o| o.op_type() == "NCCLBroadcast").unwrap();
    assert_eq!(b.engine.as_deref(), Some("MPI"));
}

/// The data-parallel path on one device (a world of one) trains exactly as the
/// plain run: the collectives are there, and change nothing.
#[test]
fn collectives_on_one_device_change_nothing() {
    let run = |on: bool| {
        let mut model = ModelHelper::new("mlp");
        model.set_seed(2);
        let mut t = Parallelize::new(model)
            .devices([Device::cpu(0)])
            .input(cycling_source(8, 3))
            .forward(mlp_forward)
            .update(Sgd::new(0.1).momentum(0.9))
            .collectives_on_one_device(on)
            .build()
            .unwrap();
        t.run_init().unwrap();
        t.run(3).unwrap();
        t
    };
    let (plain, forced) = (run(false), run(true));
    let count = |t: &Trainer, ty: &str| {
        t.model()
            .net()
            .proto()
            .op
            .iter()
            .filter(|o| o.op_type() == ty)
            .count()
    };
    assert_eq!(count(&plain, "Allreduce"), 0);
    let reduced: usize = forced
        .model()
        .net()
        .proto()
        .op
        .iter()
        .filter(|o| o.op_type() == "Allreduce")
        .map(|o| o.input.len())
        .sum();
    assert_eq!(reduced, forced.grad_groups().len());
    assert!(forced
        .model()
        .init_net()
        .proto()
        .op
        .iter()
        .any(|o| o.op_type() == "Broadcast"));
    for g in plain.param_groups() {
        let (a, b) = (
            plain.fetch(&g.name, Device::cpu(0)).unwrap(),
            forced.fetch(&g.name, Device::cpu(0)).unwrap(),
        );
        assert!(a.bitwise_eq(&b), "{}", g.name);
    }
}

/// Start address and length in bytes of each gradient of `device`, in the
/// order they complete.
fn gradient_spans(t: &Trainer, device: Device) -> Vec<(usize, usize, bool)> {
    t.grad_groups()
        .iter()
        .map(|g| {
            let name = format!("{}/{}", device.namescope(), g.name);
            t.workspace()
                .with_blob(&name, |x| {
                    let d = x.data::<f32>().unwrap();
                    (
                        d.as_ptr() as usize,
                        std::mem::size_of_val(d),
                        matches!(x.storage(), dpm::tensor::Storage::Flat(_)),
                    )
                })
                .unwrap()
        })
        .collect()
}

#[test]
fn gradient_buckets_train_bitwise_like_one_allreduce_per_gradient() {
    for devices in [2, 3] {
        let run = |bytes: usize| {
            let mut model = ModelHelper::new("mlp");
            model.set_seed(4);
            let mut t = Parallelize::new(model)
                .devices(cpus(devices))
                .input(cycling_source(devices as usize * 4, 1))
                .forward(mlp_forward)
                .update(Sgd::new(0.1).momentum(0.9).weight_decay(1e-4))
                .bucket_bytes(bytes)
                .build()
                .unwrap();
            t.run_init().unwrap();
            t.run(6).unwrap();
            t
        };
        let per_gradient = run(0);
        // fc2's gradients are 4·16·4 + 4·4 bytes, fc1's 16·8·4 + 16·4: 576
        // bytes make two buckets, one per layer; 1 MiB one bucket of all four.
        for (bytes, ops) in [(576, 2), (1 << 20, 1)] {
            let bucketed = run(bytes);
            let allreduces: Vec<_> = bucketed
                .model()
                .net()
                .ops()
                .iter()
                .filter(|o| o.op_type() == "Allreduce")
                .cloned()
                .collect();
            assert_eq!(allreduces.len(), ops, "{bytes}-byte buckets");
            let order: Vec<&str> = allreduces
                .iter()
                .flat_map(|o| o.input.iter().step_by(devices as usize))
                .map(String::as_str)
                .collect();
            assert_eq!(
                order,
                [
                    "cpu_0/fc2_w_grad",
                    "cpu_0/fc2_b_grad",
                    "cpu_0/fc1_w_grad",
                    "cpu_0/fc1_b_grad"
                ]
            );
            for w in allreduces.windows(2) {
                assert_eq!(w[1].control_input, [w[0].input[0].clone()]);
            }
            for d in cpus(devices) {
                for ((n, a), (_, b)) in params(&per_gradient, d).iter().zip(params(&bucketed, d)) {
                    assert!(a.bitwise_eq(&b), "{n} on {d}, {bytes}-byte buckets");
                }
            }
            // Zero-copy: the backward pass wrote each gradient into its
            // bucket's flat buffer, where the gradients lie end to end.
            for d in cpus(devices) {
                let spans = gradient_spans(&bucketed, d);
                assert!(spans.iter().all(|s| s.2), "{d}: {spans:?}");
                let bucket = 4 / ops;
                for b in spans.chunks(bucket) {
                    for w in b.windows(2) {
                        assert_eq!(w[0].0 + w[0].1, w[1].0, "{d}, {bytes}-byte buckets");
                    }
                }
            }
        }
        assert!(gradient_spans(&per_gradient, Device::cpu(0)).iter().all(|s| !s.2));
    }
}

/// The default bucket on CPU devices is small enough that a net whose
/// gradients exceed it reduces its last layer's gradients without waiting
/// for its first layer's: its all-reduces start during the backward pass and
/// go to the workers in turn (one bucket of all of them, the former 256 KiB
/// default here, put a small MLP's 2-device step 12% behind one device's).
#[test]
fn the_default_cpu_bucket_lets_all_reduces_start_before_the_backward_pass_ends() {
    let forward = |m: &mut ModelHelper| -> Result<Vec<BlobRef>> {
        let (data, label) = (m.blob("data"), m.blob("label"));
        let h = m.fc("fc1", &data, 64, 64)?;
        let h = m.relu(&h, "fc1_relu");
        let logits = m.fc("fc2", &h, 64, 10)?;
        let (_, loss) = m.softmax_with_loss(&logits, &label, "loss");
        Ok(vec![loss])
    };
    let (_, net) = Parallelize::new(ModelHelper::new("mlp"))
        .devices(cpus(2))
        .forward(forward)
        .update(Sgd::new(0.1).momentum(0.9))
        .build_nets()
        .unwrap();
    let buckets: Vec<Vec<&str>> = net
        .op
        .iter()
        .filter(|o| o.op_type() == "Allreduce")
        .map(|o| o.input.iter().step_by(2).map(String::as_str).collect())
        .collect();
    // fc1's weight gradient alone is 64·64·4 bytes, the default bucket.
    assert!(buckets.len() >= 2, "{buckets:?}");
    assert_eq!(buckets[0][..2], ["cpu_0/fc2_w_grad", "cpu_0/fc2_b_grad"]);
    assert!(!buckets[0].iter().any(|g| g.contains("fc1")), "{buckets:?}");
}

/// A model with nothing to train (its loss straight from the data) is refused
/// with an error that says so, on one device or several, never a panic.
#[test]
fn a_model_without_parameters_is_refused_with_a_clear_error() {
    let forward = |m: &mut ModelHelper| -> Result<Vec<BlobRef>> {
        let (data, label) = (m.blob("data"), m.blob("label"));
        let (_, loss) = m.softmax_with_loss(&data, &label, "loss");
        Ok(vec![loss])
    };
    for devices in [1, 2] {
        let e = build_err(
            Parallelize::new(ModelHelper::new("none"))
                .devices(cpus(devices))
                .input(cycling_source(8, 0))
                .forward(forward)
                .update(Sgd::new(0.1)),
        );
        assert!(e.contains("creates no parameter"), "{devices} devices: {e}");
    }
}

#[test]
fn gradient_buckets_hold_for_convolutions_batch_norm_and_accumulation() {
    // Conv, batch-norm and FC gradients written into flat buffers, 2 devices,
    // with and without gradient accumulation: the same bits as per-gradient
    // all-reduces.
    let run = |bytes: usize, accumulate: usize| {
        let mut model = ModelHelper::new("cbn");
        model.set_seed(3);
        let mut t = Parallelize::new(model)
            .devices(cpus(2))
            .input(conv_bn_source())
            .forward(conv_bn)
            .update(Sgd::new(0.1).momentum(0.9))
            .gradient_accumulation(accumulate)
            .bucket_bytes(bytes)
            .build()
            .unwrap();
        t.run_init().unwrap();
        t.run(4).unwrap();
        t
    };
    for k in [1, 2] {
        let (a, b) = (run(0, k), run(1 << 20, k));
        for d in cpus(2) {
            for ((n, x), (_, y)) in params(&a, d).iter().zip(params(&b, d)) {
                assert!(x.bitwise_eq(&y), "{n} on {d}, accumulation {k}");
            }
            let spans = gradient_spans(&b, d);
            assert!(spans.iter().all(|s| s.2), "{d}, accumulation {k}: {spans:?}");
        }
    }
}
