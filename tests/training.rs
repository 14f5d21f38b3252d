//! End-to-end training through the model helper and the SGD builder.

mod common;

use common::{blobs_dataset, mlp};
use dpm::prelude::*;

fn scalar(ws: &Workspace, name: &str) -> f32 {
    ws.fetch(name).unwrap().data::<f32>().unwrap()[0]
}

#[test]
fn two_layer_mlp_learns_a_synthetic_classification_set() {
    let (x, y) = blobs_dataset(512, 8, 4, 1.0, 7);
    let model = mlp(8, 32, 4, Sgd::new(0.1).momentum(0.9).weight_decay(1e-4));
    let ws = Workspace::new();
    ws.run_net_once(model.init_net().proto()).unwrap();
    ws.feed("data", x);
    ws.feed("label", y);
    ws.create_net(model.net().proto()).unwrap();
    ws.run_net("mlp").unwrap();
    let first_loss = scalar(&ws, "loss");
    for _ in 0..150 {
        ws.run_net("mlp").unwrap();
    }
    let (loss, acc) = (scalar(&ws, "loss"), scalar(&ws, "accuracy"));
    assert!(loss < first_loss / 4.0, "loss {first_loss} → {loss}");
    assert!(acc > 0.95, "training accuracy {acc}");
    let iter = ws.fetch("ITER").unwrap();
    assert_eq!(iter.data::<i64>().unwrap(), &[151]);
}

#[test]
fn plain_sgd_with_step_schedule_also_learns() {
    let (x, y) = blobs_dataset(256, 4, 3, 0.5, 3);
    let model = mlp(4, 16, 3, Sgd::new(0.5).weight_decay(1e-4).step_schedule(100, 0.5));
    let ws = Workspace::new();
    ws.run_net_once(model.init_net().proto()).unwrap();
    ws.feed("data", x);
    ws.feed("label", y);
    ws.create_net(model.net().proto()).unwrap();
    for _ in 0..150 {
        ws.run_net("mlp").unwrap();
    }
    assert!(scalar(&ws, "accuracy") > 0.95);
    // After 150 steps the rate has halved once: -0.5 · 0.5.
    assert_eq!(scalar(&ws, "lr"), -0.25);
}

#[test]
fn same_seed_same_parameters_other_seed_other_parameters() {
    let init = |seed| {
        let mut m = ModelHelper::new("m");
        m.set_seed(seed);
        let x = m.blob("x");
        m.fc("fc", &x, 4, 3).unwrap();
        let ws = Workspace::new();
        ws.run_net_once(m.init_net().proto()).unwrap();
        ws.fetch("fc_w").unwrap()
    };
    assert!(init(1).bitwise_eq(&init(1)));
    assert!(!init(1).bitwise_eq(&init(2)));
}
