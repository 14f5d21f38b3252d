//! Fused execution of batch norm and relu (`exec::fuse`): the executor runs
//! `SpatialBN → Relu` and `ReluGradient → SpatialBNGradient` as one kernel
//! each, and every blob a user can fetch holds the same bits as when the ops
//! run apart.

mod common;

use common::{cnn_batch, small_cnn_parallelize, trained_small_cnn};
use dpm::prelude::*;
use dpm::proto::NetDef;

/// `net` with the `dpm_fuse` argument set to `on`.
fn fusing(net: &NetDef, on: bool) -> NetDef {
    let mut n = Net::from_proto(net.clone());
    n.set_arg("dpm_fuse", i64::from(on));
    n.into_proto()
}

/// Every blob of `a`, bitwise equal in `b`.
fn same_blobs(a: &Workspace, b: &Workspace) {
    let names = a.blob_names();
    assert_eq!(names, b.blob_names());
    for n in &names {
        let (x, y) = (a.fetch(n).unwrap(), b.fetch(n).unwrap());
        assert!(x.bitwise_eq(&y), "blob `{n}` differs");
    }
}

fn op_types(ws: &Workspace) -> Vec<String> {
    ws.op_times().into_iter().map(|(t, _)| t).collect()
}

#[test]
fn training_with_fused_batch_norm_and_relu_gives_the_same_bits() {
    // small_cnn on 2 CPU devices, 4 steps, with each executor.
    for net_type in ["dag", "simple"] {
        let run = |fuse: bool| {
            let mut t = small_cnn_parallelize(net_type, 5).fuse_ops(fuse).build().unwrap();
            t.run_init().unwrap();
            t.workspace().set_profiling(true);
            t.run(4).unwrap();
            t
        };
        let (fused, apart) = (run(true), run(false));
        same_blobs(fused.workspace(), apart.workspace());
        let (f, a) = (op_types(fused.workspace()), op_types(apart.workspace()));
        for t in ["SpatialBN+Relu", "ReluGradient+SpatialBNGradient"] {
            assert!(
                f.iter().any(|x| x == t) && !a.iter().any(|x| x == t),
                "{t}: {f:?}"
            );
        }
        for t in ["Relu", "ReluGradient"] {
            assert!(
                !f.iter().any(|x| x == t) && a.iter().any(|x| x == t),
                "{t}: {f:?}"
            );
        }
    }
}

#[test]
fn inference_with_fused_batch_norm_and_relu_gives_the_same_bits() {
    // The exported predictor: batch norm in inference mode, then relu.
    let t = trained_small_cnn();
    let (init, predict) = t.export_predictor().unwrap();
    let run = |fuse: bool| {
        let ws = Workspace::new();
        ws.set_profiling(true);
        ws.run_net_once(&init).unwrap();
        let (_, x) = cnn_batch(9, 6).remove(0);
        ws.feed("data", x);
        ws.run_net_once(&fusing(&predict, fuse)).unwrap();
        ws
    };
    let (fused, apart) = (run(true), run(false));
    same_blobs(&fused, &apart);
    assert!(op_types(&fused).iter().any(|x| x == "SpatialBN+Relu"));
    assert!(op_types(&apart).iter().any(|x| x == "Relu"));
}

#[test]
fn a_failing_fused_op_is_named_by_its_place_in_the_users_net() {
    // A scale of the wrong size: the error names the batch norm's index in
    // the net as built, though the fused op ran in its place.
    let mut net = Net::new("bad");
    net.op("SpatialBN")
        .inputs(["x", "s", "b", "m", "v"])
        .output("y")
        .arg("is_test", 1i64)
        .build();
    net.op("Relu").input("y").output("r").build();
    let ws = Workspace::new();
    ws.feed("x", Tensor::from_vec([1, 2, 1, 1], vec![1.0f32, -1.0]).unwrap());
    ws.feed("s", Tensor::from_vec([3], vec![1.0f32; 3]).unwrap());
    for b in ["b", "m", "v"] {
        ws.feed(b, Tensor::from_vec([2], vec![0.5f32; 2]).unwrap());
    }
    let e = ws.run_net_once(net.proto()).unwrap_err().to_string();
    assert!(e.contains("op #0 `SpatialBN+Relu`") && e.contains("`s`"), "{e}");
    ws.feed("s", Tensor::from_vec([2], vec![1.0f32; 2]).unwrap());
    ws.run_net_once(net.proto()).unwrap();
    let r = ws.fetch("r").unwrap();
    let y = ws.fetch("y").unwrap();
    assert_eq!(r.data::<f32>().unwrap()[1], 0.0);
    assert!(
        y.data::<f32>().unwrap()[1] < 0.0,
        "Y keeps the values before the relu"
    );
}
