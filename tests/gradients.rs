//! Every differentiable op's gradient against central finite differences.

mod common;

use common::{gradcheck, op_net, random};
use dpm::prelude::*;

#[test]
fn fc_with_bias() {
    let n = op_net("FC", &["x", "w", "b"], &["y"], &[]);
    let feeds = [
        ("x", random(&[4, 5], 1, -1.0, 1.0, 0.0)),
        ("w", random(&[3, 5], 2, -1.0, 1.0, 0.0)),
        ("b", random(&[3], 3, -1.0, 1.0, 0.0)),
    ];
    gradcheck(&n, &feeds, &["y"], &["x", "w", "b"]);
}

#[test]
fn fc_without_bias_and_4d_input() {
    let n = op_net("FC", &["x", "w"], &["y"], &[]);
    let feeds = [
        ("x", random(&[2, 2, 3, 2], 4, -1.0, 1.0, 0.0)),
        ("w", random(&[4, 12], 5, -1.0, 1.0, 0.0)),
    ];
    gradcheck(&n, &feeds, &["y"], &["x", "w"]);
}

#[test]
fn relu() {
    let n = op_net("Relu", &["x"], &["y"], &[]);
    gradcheck(&n, &[("x", random(&[3, 7], 6, -1.0, 1.0, 0.05))], &["y"], &["x"]);
}

#[test]
fn sum_and_add() {
    let n = op_net("Sum", &["a", "b", "c"], &["y"], &[]);
    let feeds = [
        ("a", random(&[2, 3], 7, -1.0, 1.0, 0.0)),
        ("b", random(&[2, 3], 8, -1.0, 1.0, 0.0)),
        ("c", random(&[2, 3], 9, -1.0, 1.0, 0.0)),
    ];
    gradcheck(&n, &feeds, &["y"], &["a", "b", "c"]);
    let n = op_net("Add", &["a", "b"], &["y"], &[]);
    gradcheck(&n, &feeds[..2], &["y"], &["a", "b"]);
}

#[test]
fn scale_and_copy() {
    let mut n = Net::new("Scale");
    n.op("Scale").input("x").output("y").arg("scale", -2.5f32).build();
    gradcheck(&n, &[("x", random(&[5], 10, -1.0, 1.0, 0.0))], &["y"], &["x"]);
    let n = op_net("Copy", &["x"], &["y"], &[]);
    gradcheck(&n, &[("x", random(&[5], 11, -1.0, 1.0, 0.0))], &["y"], &["x"]);
}

#[test]
fn softmax_with_loss() {
    let n = op_net("SoftmaxWithLoss", &["x", "label"], &["p", "loss"], &[]);
    let label = Tensor::from_vec([4], vec![0i32, 2, 1, 2]).unwrap();
    gradcheck(
        &n,
        &[("x", random(&[4, 3], 12, -2.0, 2.0, 0.0)), ("label", label)],
        &["loss"],
        &["x"],
    );
}

#[test]
fn a_blob_used_twice_accumulates_its_gradient() {
    // y = relu(x) + x·s: x's gradient is the sum of two contributions.
    let mut n = Net::new("reuse");
    n.op("Relu").input("x").output("r").build();
    n.op("Scale").input("x").output("s").arg("scale", 3.0f32).build();
    n.op("Sum").inputs(["r", "s"]).output("y").build();
    n.op("FC").inputs(["y", "w"]).output("z").build();
    let feeds = [
        ("x", random(&[2, 4], 13, -1.0, 1.0, 0.05)),
        ("w", random(&[3, 4], 14, -1.0, 1.0, 0.0)),
    ];
    gradcheck(&n, &feeds, &["z"], &["x", "w"]);
}

#[test]
fn an_op_without_gradient_on_the_path_is_named() {
    let mut n = Net::new("bad");
    n.op("FC").inputs(["x", "w"]).output("y").build();
    n.op("WeightedSum").inputs(["y", "one"]).output("z").build();
    n.op("SoftmaxWithLoss")
        .inputs(["z", "label"])
        .outputs(["p", "loss"])
        .build();
    let err =
        dpm::autodiff::add_gradient_ops(&mut n, &[BlobRef::new("loss")], &[BlobRef::new("w")]).unwrap_err();
    match err {
        Error::NoGradient { index, op_type, .. } => {
            assert_eq!((index, op_type.as_str()), (1, "WeightedSum"));
        }
        e => panic!("unexpected error {e}"),
    }
}

#[test]
fn ops_off_the_path_need_no_gradient() {
    // Accuracy reads the logits but does not lead to the loss.
    let mut n = Net::new("ok");
    n.op("FC").inputs(["x", "w"]).output("y").build();
    n.op("Accuracy").inputs(["y", "label"]).output("acc").build();
    n.op("SoftmaxWithLoss")
        .inputs(["y", "label"])
        .outputs(["p", "loss"])
        .build();
    let g = dpm::autodiff::add_gradient_ops(&mut n, &[BlobRef::new("loss")], &[BlobRef::new("w")]).unwrap();
    assert_eq!(g.get(&BlobRef::new("w")).map(BlobRef::name), Some("w_grad"));
}

#[test]
fn no_gradient_is_computed_for_what_does_not_depend_on_a_parameter() {
    // Preprocessing of the data (a differentiable Scale) leads to the loss but
    // depends on no parameter: no gradient of the data or of its scaled copy.
    let mut n = Net::new("data");
    n.op("Scale").input("x").output("xs").arg("scale", 0.5f32).build();
    n.op("FC").inputs(["xs", "w"]).output("y").build();
    n.op("SoftmaxWithLoss")
        .inputs(["y", "label"])
        .outputs(["p", "loss"])
        .build();
    dpm::autodiff::add_gradient_ops(&mut n, &[BlobRef::new("loss")], &[BlobRef::new("w")]).unwrap();
    let written: Vec<&String> = n.ops().iter().flat_map(|o| &o.output).collect();
    assert!(written.iter().any(|b| *b == "w_grad"));
    for b in ["x_grad", "xs_grad"] {
        assert!(!written.iter().any(|w| *w == b), "{b} computed: {written:?}");
    }
}

#[test]
fn a_blob_used_three_times_by_one_op_gets_every_contribution() {
    // y = x + x + x in one Sum: three gradient contributions, summed.
    let mut n = Net::new("thrice");
    n.op("Sum").inputs(["x", "x", "x"]).output("y").build();
    n.op("FC").inputs(["y", "w"]).output("z").build();
    let feeds = [
        ("x", random(&[2, 4], 15, -1.0, 1.0, 0.0)),
        ("w", random(&[3, 4], 16, -1.0, 1.0, 0.0)),
    ];
    gradcheck(&n, &feeds, &["z"], &["x", "w"]);
}

#[test]
fn gradient_ops_keep_the_engine_of_their_forward_op() {
    // As in Caffe2: a Conv asked to run as IM2COL gets an IM2COL gradient.
    let mut n = Net::new("engine");
    n.op("Conv")
        .inputs(["x", "w"])
        .output("y")
        .arg("kernel", 3)
        .engine("IM2COL")
        .build();
    n.op("SoftmaxWithLoss")
        .inputs(["y", "label"])
        .outputs(["p", "loss"])
        .build();
    dpm::autodiff::add_gradient_ops(&mut n, &[BlobRef::new("loss")], &[BlobRef::new("w")]).unwrap();
    let grad = n.ops().iter().find(|op| op.op_type() == "ConvGradient").unwrap();
    assert_eq!(grad.engine.as_deref(), Some("IM2COL"));
}

#[test]
fn the_gradient_map_lists_parameters_in_completion_order() {
    // x → fc1 (w1, b1) → relu → fc2 (w2, b2) → loss; `u` is a parameter off the path.
    let mut net = Net::new("n");
    net.device_scope(Device::cuda(0), |n| {
        n.op("FC").inputs(["x", "w1", "b1"]).output("h").build();
        n.op("Relu").input("h").output("r").build();
    });
    net.device_scope(Device::cuda(1), |n| {
        n.op("FC").inputs(["r", "w2", "b2"]).output("loss").build();
    });
    let wrt: Vec<BlobRef> = ["w1", "b1", "w2", "b2", "u"].map(BlobRef::new).into();
    let grads = dpm::autodiff::add_gradient_ops(&mut net, &[BlobRef::new("loss")], &wrt).unwrap();
    assert_eq!((grads.len(), grads.is_empty()), (4, false));
    let order: Vec<&str> = grads.iter().map(|(p, _)| p.name()).collect();
    assert_eq!(
        order,
        ["w2", "b2", "w1", "b1"],
        "the last layer's gradients complete first"
    );
    assert_eq!(grads.get(&BlobRef::new("w1")).map(BlobRef::name), Some("w1_grad"));
    assert!(grads.get(&BlobRef::new("u")).is_none());
    // The seed of 1.0 runs on the loss's device, like every gradient op on its
    // forward op's device.
    let seed = net.ops().iter().find(|o| o.output == ["loss_grad"]).unwrap();
    assert_eq!(seed.op_type(), "ConstantFill");
    assert_eq!(seed.device_option, Some(Device::cuda(1).to_proto()));
    assert_eq!(seed.find_arg("value").and_then(|a| a.f), Some(1.0));
    for op in net.ops().iter().filter(|o| o.is_gradient_op == Some(true)) {
        let forward_device = if op.output.iter().any(|o| o == "w2_grad" || o == "r_grad") {
            Device::cuda(1)
        } else {
            Device::cuda(0)
        };
        assert_eq!(op.device_option, Some(forward_device.to_proto()), "{op:?}");
    }
    // Nothing to differentiate: an empty map.
    let mut plain = Net::new("p");
    plain.op("Relu").input("a").output("b").build();
    let none =
        dpm::autodiff::add_gradient_ops(&mut plain, &[BlobRef::new("b")], &[BlobRef::new("w")]).unwrap();
    assert_eq!((none.len(), none.is_empty()), (0, true));
    // A loss nothing produces is an error that names it.
    let err = dpm::autodiff::add_gradient_ops(&mut plain, &[BlobRef::new("nowhere")], &[]).unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
}

#[test]
fn a_blob_on_the_path_must_have_one_writer() {
    let loss_of = |n: &mut Net, y: &str| {
        n.op("SoftmaxWithLoss")
            .inputs([y, "label"])
            .outputs(["p", "loss"])
            .build();
    };
    let autodiff =
        |mut n: Net| dpm::autodiff::add_gradient_ops(&mut n, &[BlobRef::new("loss")], &[BlobRef::new("w")]);
    // Written in place (relu of y into y) between w and the loss.
    let mut n = Net::new("in_place");
    n.op("FC").inputs(["x", "w"]).output("y").build();
    n.op("Relu").input("y").output("y").build();
    loss_of(&mut n, "y");
    let err = autodiff(n).unwrap_err().to_string();
    assert!(err.contains("`y`") && err.contains("more than one op"), "{err}");
    // Written by two different ops.
    let mut n = Net::new("twice");
    n.op("FC").inputs(["x", "w"]).output("y").build();
    n.op("FC").inputs(["x", "w"]).output("y").build();
    loss_of(&mut n, "y");
    let err = autodiff(n).unwrap_err().to_string();
    assert!(err.contains("`y`") && err.contains("more than one op"), "{err}");
    // Off the path (data preprocessed in place before the first layer) is fine.
    let mut n = Net::new("preprocess");
    n.op("Scale").input("x").output("x").arg("scale", 0.5f32).build();
    n.op("FC").inputs(["x", "w"]).output("y").build();
    loss_of(&mut n, "y");
    let grads = autodiff(n).unwrap();
    assert_eq!(grads.get(&BlobRef::new("w")).map(BlobRef::name), Some("w_grad"));
}

#[test]
fn every_op_autodiff_adds_is_marked_as_a_gradient_op() {
    // x feeds two ops, so its gradient contributions are summed by an added Sum.
    let mut n = Net::new("marks");
    n.op("Relu").input("x").output("r").build();
    n.op("Sum").inputs(["r", "x"]).output("y").build();
    n.op("FC").inputs(["y", "w"]).output("loss").build();
    let forward = n.ops().len();
    dpm::autodiff::add_gradient_ops(&mut n, &[BlobRef::new("loss")], &[BlobRef::new("x")]).unwrap();
    let added = &n.ops()[forward..];
    assert_eq!(added[0].op_type(), "ConstantFill", "the seed comes first");
    assert_eq!(added[0].is_gradient_op, None, "the seed is a fill, as in Caffe2");
    assert!(added[1..].iter().any(|o| o.op_type() == "Sum"));
    for op in &added[1..] {
        assert_eq!(op.is_gradient_op, Some(true), "{op:?}");
    }
    assert!(n.ops()[..forward].iter().all(|o| o.is_gradient_op.is_none()));
}

#[test]
fn stop_gradient_cuts_the_backward_pass() {
    // w1 → h → StopGradient → FC(w2) → loss: only w2 gets a gradient.
    let mut n = Net::new("stop");
    n.op("FC").inputs(["x", "w1"]).output("h").build();
    n.op("StopGradient").input("h").output("hs").build();
    n.op("FC").inputs(["hs", "w2"]).output("y").build();
    n.op("SoftmaxWithLoss")
        .inputs(["y", "label"])
        .outputs(["p", "loss"])
        .build();
    let wrt = [BlobRef::new("w1"), BlobRef::new("w2")];
    let g = dpm::autodiff::add_gradient_ops(&mut n, &[BlobRef::new("loss")], &wrt).unwrap();
    assert!(g.get(&wrt[0]).is_none());
    assert_eq!(g.get(&wrt[1]).map(BlobRef::name), Some("w2_grad"));
    assert!(!n
        .ops()
        .iter()
        .any(|o| o.output.iter().any(|b| b == "hs_grad" || b == "h_grad")));
}

#[test]
fn one_op_using_an_accumulated_blob_twice_keeps_both_contributions_apart() {
    // x already has a gradient (from relu) when FC(x, x) adds two more, one as
    // data and one as weights, at the same time: each needs its own blob.
    let mut n = Net::new("twice_in_one_op");
    n.op("FC").inputs(["x", "x"]).output("y").build();
    n.op("Relu").input("x").output("r").build();
    n.op("Sum").inputs(["y", "r"]).output("s").build();
    n.op("FC").inputs(["s", "w"]).output("z").build();
    let feeds = [
        ("x", random(&[4, 4], 17, -1.0, 1.0, 0.05)),
        ("w", random(&[3, 4], 18, -1.0, 1.0, 0.0)),
    ];
    gradcheck(&n, &feeds, &["z"], &["x", "w"]);
}

/// One finite-difference case per differentiable op type: (net, feeds, outputs,
/// blobs whose gradient is checked).
type Case = (
    Net,
    Vec<(&'static str, Tensor)>,
    Vec<&'static str>,
    Vec<&'static str>,
);

fn case(op: &str) -> Option<Case> {
    let r = |shape: &[usize], seed| random(shape, seed, -1.0, 1.0, 0.05);
    Some(match op {
        "FC" => (
            op_net("FC", &["x", "w", "b"], &["y"], &[]),
            vec![
                ("x", r(&[3, 4], 101)),
                ("w", r(&[2, 4], 102)),
                ("b", r(&[2], 103)),
            ],
            vec!["y"],
            vec!["x", "w", "b"],
        ),
        "Conv" => (
            op_net(
                "Conv",
                &["x", "w", "b"],
                &["y"],
                &[("kernel", 3), ("pad", 1), ("stride", 2)],
            ),
            vec![
                ("x", r(&[2, 2, 5, 5], 104)),
                ("w", r(&[3, 2, 3, 3], 105)),
                ("b", r(&[3], 106)),
            ],
            vec!["y"],
            vec!["x", "w", "b"],
        ),
        "SpatialBN" => (
            op_net(
                "SpatialBN",
                &["x", "s", "b", "rm", "rv"],
                &["y", "rm", "rv", "sm", "siv"],
                &[],
            ),
            vec![
                ("x", r(&[4, 2, 3, 3], 107)),
                ("s", r(&[2], 108)),
                ("b", r(&[2], 109)),
                ("rm", Tensor::zeros::<f32>([2])),
                ("rv", Tensor::from_vec([2], vec![1.0f32, 1.0]).unwrap()),
            ],
            vec!["y"],
            vec!["x", "s", "b"],
        ),
        "MaxPool" | "AveragePool" => {
            // Values 0.1 apart in a shuffled order: no window has two within the
            // finite-difference step of each other (a kink of the max).
            let n = 2 * 2 * 4 * 4;
            let v: Vec<f32> = (0..n).map(|i| ((i * 37) % n) as f32 * 0.1 - 1.6).collect();
            (
                op_net(op, &["x"], &["y"], &[("kernel", 2), ("stride", 2)]),
                vec![("x", Tensor::from_vec([2, 2, 4, 4], v).unwrap())],
                vec!["y"],
                vec!["x"],
            )
        }
        "Flatten" => (
            op_net("Flatten", &["x"], &["y"], &[]),
            vec![("x", r(&[2, 3, 2], 111))],
            vec!["y"],
            vec!["x"],
        ),
        "Reshape" => {
            let mut n = Net::new("reshape");
            n.op("Reshape")
                .input("x")
                .output("y")
                .arg("shape", vec![3i64, -1])
                .build();
            (n, vec![("x", r(&[2, 3, 2], 112))], vec!["y"], vec!["x"])
        }
        "Relu" => (
            op_net("Relu", &["x"], &["y"], &[]),
            vec![("x", r(&[3, 5], 113))],
            vec!["y"],
            vec!["x"],
        ),
        "Sum" | "Add" => (
            op_net(op, &["a", "b"], &["y"], &[]),
            vec![("a", r(&[4], 114)), ("b", r(&[4], 115))],
            vec!["y"],
            vec!["a", "b"],
        ),
        "Copy" => (
            op_net("Copy", &["x"], &["y"], &[]),
            vec![("x", r(&[4], 116))],
            vec!["y"],
            vec!["x"],
        ),
        "Scale" => {
            let mut n = Net::new("scale");
            n.op("Scale").input("x").output("y").arg("scale", -1.5f32).build();
            (n, vec![("x", r(&[4], 117))], vec!["y"], vec!["x"])
        }
        "SoftmaxWithLoss" => (
            op_net("SoftmaxWithLoss", &["x", "label"], &["p", "loss"], &[]),
            vec![
                ("x", random(&[4, 3], 118, -2.0, 2.0, 0.0)),
                ("label", Tensor::from_vec([4], vec![0i32, 2, 1, 2]).unwrap()),
            ],
            vec!["loss"],
            vec!["x"],
        ),
        "Sigmoid" | "Tanh" => (
            op_net(op, &["x"], &["y"], &[]),
            vec![("x", r(&[3, 4], 119))],
            vec!["y"],
            vec!["x"],
        ),
        "Softmax" => (
            op_net("Softmax", &["x"], &["y"], &[]),
            vec![("x", r(&[3, 5], 120))],
            vec!["y"],
            vec!["x"],
        ),
        "Mul" | "Sub" | "Div" => {
            // Caffe2 broadcasting: B over A's middle dimension.
            let b = if op == "Div" {
                random(&[3], 122, 0.5, 2.0, 0.0)
            } else {
                r(&[3], 122)
            };
            (
                op_net(op, &["a", "b"], &["y"], &[("broadcast", 1), ("axis", 1)]),
                vec![("a", r(&[2, 3, 2], 121)), ("b", b)],
                vec!["y"],
                vec!["a", "b"],
            )
        }
        "Dropout" => {
            // Ratio 0 keeps the mask fixed across the finite differences.
            let mut n = Net::new("dropout");
            n.op("Dropout")
                .input("x")
                .outputs(["y", "mask"])
                .arg("ratio", 0.0f32)
                .build();
            (n, vec![("x", r(&[3, 4], 123))], vec!["y"], vec!["x"])
        }
        "MatMul" => (
            op_net("MatMul", &["a", "b"], &["y"], &[("trans_a", 1), ("trans_b", 1)]),
            vec![("a", r(&[4, 3], 124)), ("b", r(&[2, 4], 125))],
            vec!["y"],
            vec!["a", "b"],
        ),
        "AveragedLoss" => (
            op_net("AveragedLoss", &["x"], &["y"], &[]),
            vec![("x", r(&[3, 4], 138))],
            vec!["y"],
            vec!["x"],
        ),
        "BatchMatMul" => (
            op_net(
                "BatchMatMul",
                &["a", "b"],
                &["y"],
                &[("trans_a", 1), ("trans_b", 0)],
            ),
            vec![("a", r(&[2, 3, 4, 3], 132)), ("b", r(&[2, 3, 4, 2], 133))],
            vec!["y"],
            vec!["a", "b"],
        ),
        "Transpose" => {
            let mut n = Net::new("transpose");
            n.op("Transpose")
                .input("x")
                .output("y")
                .arg("axes", vec![1i64, 2, 0])
                .build();
            (n, vec![("x", r(&[2, 3, 4], 126))], vec!["y"], vec!["x"])
        }
        "SquaredL2Distance" | "L1Distance" => {
            // x − y kept away from 0, where |·| has its kink.
            let x = r(&[3, 4], 127);
            let y: Vec<f32> = x
                .data::<f32>()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, v)| v + if i % 2 == 0 { 0.3 } else { -0.4 })
                .collect();
            (
                op_net(op, &["x", "y"], &["d"], &[]),
                vec![("x", x), ("y", Tensor::from_vec([3, 4], y).unwrap())],
                vec!["d"],
                vec!["x", "y"],
            )
        }
        "LabelCrossEntropy" => (
            op_net("LabelCrossEntropy", &["p", "label"], &["xent"], &[]),
            vec![
                ("p", random(&[3, 4], 128, 0.2, 1.0, 0.0)),
                ("label", Tensor::from_vec([3], vec![1i32, 3, 0]).unwrap()),
            ],
            vec!["xent"],
            vec!["p"],
        ),
        "Concat" => (
            op_net("Concat", &["a", "b"], &["y", "info"], &[("axis", 1)]),
            vec![("a", r(&[2, 3, 2], 129)), ("b", r(&[2, 1, 2], 132))],
            vec!["y"],
            vec!["a", "b"],
        ),
        "Split" => {
            let mut n = Net::new("split");
            n.op("Split")
                .input("x")
                .outputs(["y0", "y1"])
                .arg("axis", 1i64)
                .arg("split", vec![1i64, 3])
                .build();
            (n, vec![("x", r(&[2, 4, 2], 133))], vec!["y0", "y1"], vec!["x"])
        }
        "LayerNorm" => (
            op_net("LayerNorm", &["x"], &["y", "mean", "std"], &[]),
            vec![("x", r(&[3, 5], 134))],
            vec!["y"],
            vec!["x"],
        ),
        "Gather" => (
            op_net("Gather", &["data", "idx"], &["y"], &[]),
            vec![
                ("data", r(&[5, 3], 135)),
                ("idx", Tensor::from_vec([4], vec![4i32, 0, 4, 2]).unwrap()),
            ],
            vec!["y"],
            vec!["data"],
        ),
        _ => return None,
    })
}

#[test]
fn matmul_gradients_in_every_layout_and_dropout_masks() {
    for (ta, tb) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        let (a, b) = (
            if ta == 1 { [4, 3] } else { [3, 4] },
            if tb == 1 { [2, 4] } else { [4, 2] },
        );
        let n = op_net("MatMul", &["a", "b"], &["y"], &[("trans_a", ta), ("trans_b", tb)]);
        let feeds = [
            ("a", random(&a, 130, -1.0, 1.0, 0.0)),
            ("b", random(&b, 131, -1.0, 1.0, 0.0)),
        ];
        gradcheck(&n, &feeds, &["y"], &["a", "b"]);
    }
    // BatchMatMul is MatMul on each matrix of the batch, to the bit, in every layout.
    for (ta, tb) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        let (ad, bd) = (
            if ta == 1 { [4, 3] } else { [3, 4] },
            if tb == 1 { [2, 4] } else { [4, 2] },
        );
        let a = random(&[2, 3, ad[0], ad[1]], 134, -1.0, 1.0, 0.0);
        let b = random(&[2, 3, bd[0], bd[1]], 135, -1.0, 1.0, 0.0);
        let ws = Workspace::new();
        ws.feed("a", a.clone());
        ws.feed("b", b.clone());
        let args = [("trans_a", ta), ("trans_b", tb)];
        ws.run_net_once(op_net("BatchMatMul", &["a", "b"], &["y"], &args).proto())
            .unwrap();
        let y = ws.fetch("y").unwrap();
        assert_eq!(y.dims(), [2, 3, 3, 2]);
        for i in 0..6 {
            let slice = |t: &Tensor, d: [usize; 2]| {
                let v = t.data::<f32>().unwrap()[i * d[0] * d[1]..][..d[0] * d[1]].to_vec();
                Tensor::from_vec(d.to_vec(), v).unwrap()
            };
            let one = Workspace::new();
            one.feed("a", slice(&a, ad));
            one.feed("b", slice(&b, bd));
            one.run_net_once(op_net("MatMul", &["a", "b"], &["y"], &args).proto())
                .unwrap();
            assert!(
                one.fetch("y").unwrap().bitwise_eq(&slice(&y, [3, 2])),
                "matrix {i}, layout {ta}{tb}"
            );
        }
    }
    // Batches that differ, and broadcast, are clear errors.
    let ws = Workspace::new();
    ws.feed("a", random(&[2, 3, 4], 136, -1.0, 1.0, 0.0));
    ws.feed("b", random(&[3, 4, 2], 137, -1.0, 1.0, 0.0));
    let e = ws
        .run_net_once(op_net("BatchMatMul", &["a", "b"], &["y"], &[]).proto())
        .unwrap_err();
    assert!(e.to_string().contains("`b`"), "{e}");
    let e = ws
        .run_net_once(op_net("BatchMatMul", &["a", "b"], &["y"], &[("broadcast", 1)]).proto())
        .unwrap_err();
    assert!(e.to_string().contains("broadcast"), "{e}");
    // Dropout keeps about 1 − ratio of the elements, scaled by 1/(1 − ratio),
    // draws a new mask each run, and its gradient is the mask.
    let mut n = Net::new("dropout");
    n.op("Dropout")
        .input("x")
        .outputs(["y", "mask"])
        .arg("ratio", 0.25f32)
        .arg("seed", 5i64)
        .build();
    let ws = Workspace::new();
    ws.feed("x", Tensor::from_vec([4000], vec![1.0f32; 4000]).unwrap());
    ws.create_net(n.proto()).unwrap();
    ws.run_net("dropout").unwrap();
    let first = ws.fetch("y").unwrap();
    let kept = first.data::<f32>().unwrap().iter().filter(|&&v| v != 0.0).count();
    assert!((2800..3200).contains(&kept), "kept {kept} of 4000");
    assert!(first
        .data::<f32>()
        .unwrap()
        .iter()
        .all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    ws.run_net("dropout").unwrap();
    assert!(!ws.fetch("y").unwrap().bitwise_eq(&first), "the same mask twice");
}

#[test]
fn every_registered_differentiable_op_passes_a_finite_difference_check() {
    let ops = dpm::ops::Registry::global().differentiable_ops();
    assert!(ops.len() >= 13, "{ops:?}");
    for op in ops {
        let (net, feeds, outputs, wrt) = case(op).unwrap_or_else(|| {
            panic!("`{op}` has a gradient rule but no finite-difference case here: add one")
        });
        gradcheck(&net, &feeds, &outputs, &wrt);
    }
}
