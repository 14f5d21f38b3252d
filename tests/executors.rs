//! The simple and DAG executors: same results, and clean failure.

mod common;

use std::time::{Duration, Instant};

use common::{blobs_dataset, mlp};
use dpm::ops::{Kernel, OpContext, Registry};
use dpm::prelude::*;

fn train(net_type: &str, workers: usize, steps: usize) -> Workspace {
    let (x, y) = blobs_dataset(128, 8, 4, 1.0, 11);
    let model = mlp(8, 16, 4, Sgd::new(0.1).momentum(0.9));
    let mut net = model.net().proto().clone();
    net.r#type = Some(net_type.into());
    net.num_workers = Some(workers as i32);
    let ws = Workspace::new();
    ws.run_net_once(model.init_net().proto()).unwrap();
    ws.feed("data", x);
    ws.feed("label", y);
    ws.create_net(&net).unwrap();
    for _ in 0..steps {
        ws.run_net("mlp").unwrap();
    }
    ws
}

#[test]
fn simple_and_dag_are_bitwise_identical() {
    let a = train("simple", 1, 20);
    for workers in [1, 4] {
        let b = train("dag", workers, 20);
        assert_eq!(a.blob_names(), b.blob_names());
        for name in a.blob_names() {
            let (x, y) = (a.fetch(&name).unwrap(), b.fetch(&name).unwrap());
            assert!(x.bitwise_eq(&y), "blob {name} differs with {workers} workers");
        }
    }
}

/// A wide net: many independent slow branches, one of which fails.
fn wide_net(failing: &str) -> Net {
    let mut net = Net::new("wide");
    net.set_type("dag").set_num_workers(4);
    net.op("ConstantFill")
        .output("x")
        .arg("shape", vec![64i64, 64])
        .arg("value", 0.01f32)
        .build();
    net.op("ConstantFill")
        .output("w")
        .arg("shape", vec![64i64, 64])
        .arg("value", 0.01f32)
        .build();
    for i in 0..16 {
        let mut prev = "x".to_owned();
        for j in 0..20 {
            let out = format!("b{i}_{j}");
            net.op("FC")
                .inputs([prev.as_str(), "w"])
                .output(out.as_str())
                .build();
            prev = out;
        }
    }
    net.op(failing).inputs(["x", "w"]).output("boom").build();
    net
}

struct Explode;
impl Kernel for Explode {
    fn run(&self, _: &mut OpContext<'_>) -> Result<()> {
        panic!("injected kernel panic")
    }
}

#[test]
fn failing_op_under_dag_returns_err_promptly_and_names_it() {
    // An FC with x as weights of the wrong shape: fails at run time.
    let mut net = wide_net("FC");
    net.proto_mut().op.last_mut().unwrap().input = vec!["x".into(), "b0_0_missing".into()];
    let ws = Workspace::new();
    ws.create_net(net.proto()).unwrap();
    let t = Instant::now();
    let err = ws.run_net("wide").unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());
    let msg = err.to_string();
    assert!(
        msg.contains("op #322 `FC`") && msg.contains("b0_0_missing"),
        "{msg}"
    );
    // No worker is left holding anything: the workspace is usable at once.
    ws.feed("b0_0_missing", Tensor::zeros::<f32>([64, 64]));
    ws.run_net("wide").unwrap();
}

#[test]
fn panicking_kernel_under_dag_becomes_an_error() {
    Registry::register_global("TestExplode", DeviceType::Cpu, |_| Ok(Box::new(Explode)));
    let ws = Workspace::new();
    ws.create_net(wide_net("TestExplode").proto()).unwrap();
    let t = Instant::now();
    let err = ws.run_net("wide").unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(
        matches!(err.root(), Error::KernelPanic(m) if m.contains("injected")),
        "{err}"
    );
    // Runs again (and fails again) rather than deadlocking on a poisoned blob.
    assert!(ws.run_net("wide").is_err());
}

#[test]
fn control_inputs_order_independent_ops() {
    let mut net = Net::new("ctl");
    net.set_type("dag").set_num_workers(4);
    net.op("ConstantFill")
        .output("a")
        .arg("shape", vec![1i64])
        .arg("value", 1.0f32)
        .build();
    net.op("ConstantFill")
        .output("b")
        .arg("shape", vec![1i64])
        .arg("value", 2.0f32)
        .control_input("a")
        .build();
    let ws = Workspace::new();
    ws.run_net_once(net.proto()).unwrap();
    assert!(ws.has_blob("b"));
    let mut bad = Net::new("bad");
    bad.op("ConstantFill")
        .output("b")
        .arg("shape", vec![1i64])
        .control_input("nowhere")
        .build();
    let err = ws.create_net(bad.proto()).unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
}

#[test]
fn malformed_nets_are_rejected_before_running() {
    let ws = Workspace::new();
    let mut n = Net::new("n");
    n.op("NoSuchOp").output("y").build();
    assert!(matches!(
        ws.create_net(n.proto()).unwrap_err().root(),
        Error::UnknownOp { .. }
    ));
    let mut n = Net::new("n");
    n.op("LearningRate")
        .input("ITER")
        .output("lr")
        .arg("policy", "cosine")
        .arg("base_lr", 0.1f32)
        .build();
    assert!(ws
        .create_net(n.proto())
        .unwrap_err()
        .to_string()
        .contains("cosine"));
    let mut n = Net::new("n");
    n.set_type("async_everything");
    assert!(ws.create_net(n.proto()).is_err());
    assert!(ws.run_net("never_created").is_err());
    // A missing input is named.
    let mut n = Net::new("n");
    n.op("Relu").input("ghost").output("y").build();
    let err = ws.run_net_once(n.proto()).unwrap_err();
    assert!(matches!(err.root(), Error::MissingBlob { name } if name == "ghost"));
}
