//! What a Caffe2 runtime reads the same way: integer fills in the int field,
//! `order` on every image op, the external input and output lists, and the
//! list forms of the window arguments, random ops seeded through the
//! DeviceOption.

mod common;

use std::collections::HashSet;

use common::{cycling_source, op_net, random};
use dpm::prelude::*;

fn nets() -> (NetDef, NetDef) {
    Parallelize::new(ModelHelper::new("cnn"))
        .devices([Device::cpu(0), Device::cpu(1)])
        .forward(common::small_cnn)
        .update(Sgd::new(0.1).momentum(0.9))
        .build_nets()
        .unwrap()
}

#[test]
fn integer_fills_write_the_int_field_and_image_ops_say_nchw() {
    let (init, net) = nets();
    let iter = init.op.iter().find(|o| o.output[0].ends_with("ITER")).unwrap();
    let value = iter.find_arg("value").unwrap();
    assert_eq!((value.i, value.f), (Some(0), None));
    for o in net
        .op
        .iter()
        .filter(|o| matches!(o.op_type(), "Conv" | "MaxPool" | "AveragePool" | "SpatialBN"))
    {
        assert_eq!(
            o.find_arg("order").and_then(|a| a.s.clone()),
            Some(b"NCHW".to_vec()),
            "{}",
            o.op_type()
        );
    }
    // A ConstantFill of INT64 reads an exact int value (beyond f32's 2^24).
    let ws = Workspace::new();
    let mut n = Net::new("fill");
    n.op("ConstantFill")
        .output("big")
        .arg("shape", vec![1i64])
        .arg("dtype", 10i64)
        .arg("value", (1i64 << 40) + 1)
        .build();
    ws.run_net_once(n.proto()).unwrap();
    assert_eq!(
        ws.fetch("big").unwrap().data::<i64>().unwrap(),
        [(1i64 << 40) + 1]
    );
}

#[test]
fn nets_list_their_external_inputs_and_outputs() {
    let (init, net) = nets();
    let made: HashSet<&str> = init.external_output.iter().map(String::as_str).collect();
    for o in init.op.iter().flat_map(|o| &o.output) {
        assert!(made.contains(o.as_str()), "init net output {o} not listed");
    }
    assert!(!net.external_input.is_empty());
    for i in &net.external_input {
        let fed = i.ends_with("/data") || i.ends_with("/label");
        assert!(
            fed || made.contains(i.as_str()),
            "train net reads {i}, which nothing makes"
        );
    }
    for needed in [
        "cpu_0/c1_w",
        "cpu_1/fc_b",
        "cpu_0/data",
        "cpu_1/label",
        "cpu_0/ITER",
        "cpu_0/bn1_rm",
    ] {
        assert!(
            net.external_input.iter().any(|i| i == needed),
            "{needed} missing from {:?}",
            net.external_input
        );
    }
    assert_eq!(net.external_output, ["cpu_0/loss", "cpu_1/loss"]);
    // Nothing the net writes first is listed as an input.
    let mut written = HashSet::new();
    for op in &net.op {
        for i in &op.input {
            if written.contains(i) {
                continue;
            }
            assert!(
                net.external_input.contains(i),
                "{i} read before written but not listed"
            );
        }
        written.extend(op.output.iter().cloned());
    }
    // And the bytes keep the lists.
    let back: NetDef = prost::Message::decode(prost::Message::encode_to_vec(&net).as_slice()).unwrap();
    assert_eq!(back.external_input, net.external_input);
}

#[test]
fn window_lists_mean_what_the_scalar_forms_mean() {
    let x = random(&[2, 3, 7, 6], 1, -1.0, 1.0, 0.0);
    let w = random(&[4, 3, 3, 3], 2, -1.0, 1.0, 0.0);
    let run = |args: &[(&str, i64)], lists: &[(&str, Vec<i64>)]| -> Result<Tensor> {
        let mut n = Net::new("conv");
        let mut op = n.op("Conv").inputs(["x", "w"]).output("y");
        for (k, v) in args {
            op = op.arg(k, *v);
        }
        for (k, v) in lists {
            op = op.arg(k, v.clone());
        }
        op.build();
        let ws = Workspace::new();
        ws.feed("x", x.clone());
        ws.feed("w", w.clone());
        ws.run_net_once(n.proto())?;
        ws.fetch("y")
    };
    let scalar = run(
        &[
            ("kernel", 3),
            ("stride", 2),
            ("pad_t", 1),
            ("pad_l", 0),
            ("pad_b", 2),
            ("pad_r", 1),
        ],
        &[],
    )
    .unwrap();
    let lists = run(
        &[],
        &[
            ("kernels", vec![3, 3]),
            ("strides", vec![2, 2]),
            ("pads", vec![1, 0, 2, 1]),
        ],
    )
    .unwrap();
    assert_eq!(scalar.dims(), [2, 4, 4, 3]);
    assert!(scalar.bitwise_eq(&lists));
    // `kernel` plus a `pads` list: the list counts (the output size shows it).
    let mixed = run(&[("kernel", 3), ("stride", 2)], &[("pads", vec![1, 0, 2, 1])]).unwrap();
    assert!(mixed.bitwise_eq(&scalar));
    let e = run(&[], &[("kernels", vec![3, 3, 3])]).unwrap_err().to_string();
    assert!(e.contains("kernels"), "{e}");
    let e = run(&[("kernel", 3)], &[("dilations", vec![2, 2])])
        .unwrap_err()
        .to_string();
    assert!(e.contains("dilat"), "{e}");
    let _ = (op_net, cycling_source);
}

#[test]
fn random_ops_are_seeded_through_the_device_option_as_caffe2_seeds_them() {
    let mut model = ModelHelper::new("cnn");
    model.set_seed(1234);
    let (init, net) = Parallelize::new(model)
        .devices([Device::cpu(0), Device::cpu(1)])
        .forward(common::small_cnn)
        .update(Sgd::new(0.1))
        .build_nets()
        .unwrap();
    let random: Vec<&OperatorDef> = init
        .op
        .iter()
        .chain(&net.op)
        .filter(|o| {
            matches!(
                o.op_type(),
                "GaussianFill" | "XavierFill" | "MSRAFill" | "UniformFill" | "Dropout"
            )
        })
        .collect();
    assert!(random.iter().any(|o| o.op_type() == "Dropout"));
    assert!(random.iter().any(|o| o.op_type().ends_with("Fill")));
    for o in random {
        assert!(
            o.find_arg("seed").is_none(),
            "{} carries a seed argument Caffe2 ignores",
            o.op_type()
        );
        assert_eq!(
            o.device_option.as_ref().and_then(|d| d.random_seed),
            Some(1234),
            "{}",
            o.op_type()
        );
    }
    // The DeviceOption's seed is what the kernels use: another seed, other values.
    let fill = |seed: u32| {
        let mut n = Net::new("fill");
        n.op("XavierFill").output("w").arg("shape", vec![4i64, 4]).build();
        n.proto_mut().op[0].device_option = Some(dpm::proto::DeviceOption {
            random_seed: Some(seed),
            ..Device::cpu(0).to_proto()
        });
        let ws = Workspace::new();
        ws.run_net_once(n.proto()).unwrap();
        ws.fetch("w").unwrap()
    };
    assert!(fill(7).bitwise_eq(&fill(7)));
    assert!(!fill(7).bitwise_eq(&fill(8)));
}

#[test]
fn adam_weight_decay_is_caffe2s_weighted_sum_and_adamw_keeps_its_argument() {
    let build = |opt: Adam| {
        Parallelize::new(ModelHelper::new("cnn"))
            .devices([Device::cpu(0)])
            .forward(common::small_cnn)
            .update(opt)
            .build_nets()
            .unwrap()
            .1
    };
    let l2 = build(Adam::new(0.01).weight_decay(0.01));
    let adams: Vec<usize> = (0..l2.op.len())
        .filter(|&i| l2.op[i].op_type() == "Adam")
        .collect();
    assert!(!adams.is_empty());
    for &i in &adams {
        let adam = &l2.op[i];
        assert!(adam.find_arg("weight_decay").is_none() && adam.find_arg("decoupled").is_none());
        // The gradient it reads was decayed just before: g ← 1·g + WD·p.
        let g = &adam.input[3];
        let ws = l2.op[..i]
            .iter()
            .rev()
            .find(|o| o.output.first() == Some(g))
            .unwrap();
        assert_eq!(ws.op_type(), "WeightedSum");
        assert_eq!(
            (ws.input[0].as_str(), ws.input[2].as_str()),
            (g.as_str(), adam.input[0].as_str())
        );
        assert!(ws.input[3].ends_with("WD"));
    }
    let adamw = build(Adam::adamw(0.01, 0.01));
    assert!(adamw
        .op
        .iter()
        .all(|o| o.op_type() != "WeightedSum" || !o.input[3].ends_with("WD")));
    let decoupled = adamw.op.iter().filter(|o| o.op_type() == "Adam");
    for o in decoupled {
        assert_eq!(o.find_arg("decoupled").and_then(|a| a.i), Some(1));
    }
}

/// A model using every layer helper that the small CNN does not.
#[dpm::data_parallel]
fn wide(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let x = m.input_with_shape("x", [6]);
    let ids = m.input_with_shape("ids", [2]);
    let y = m.input("y");
    let label = m.input("label");
    let e = m.embedding("emb", ids, 10, 3)?;
    let ef = m.flatten(e);
    let c = m.concat("cat", &[x, ef], 0)?;
    let h = m.fc("fc1", c, 8)?;
    let h = m.layer_norm("ln", h, 1e-5)?;
    let h = m.tanh("t", h);
    let h = m.sigmoid("s", h);
    let parts = m.split("sp", h, 0, &[4, 4])?;
    let prod = m.arith("Mul", "mul", parts[0], parts[1])?;
    let d = m.dropout("drop", prod, 0.1)?;
    let o = m.fc("fc2", d, 3)?;
    let p = m.softmax("sm", o);
    let xe = m.label_cross_entropy("xe", p, label);
    let l1 = m.averaged_loss("l1", xe);
    let r = m.fc("reg", d, 2)?;
    let sq = m.squared_l2_distance("sq", r, y);
    let l2 = m.averaged_loss("l2", sq);
    Ok(vec![l1, l2].into())
}

/// Every op type dpm emits is one of Caffe2's (checked against its operator
/// schemas: arity, argument names) or one of dpm's own few, which the README
/// names; a new op type fails here until it is checked and listed.
#[test]
fn every_op_type_dpm_emits_is_caffe2s_or_named_as_dpms_own() {
    const CAFFE2: &[&str] = &[
        "Accuracy",
        "Adagrad",
        "Adam",
        "AveragePool",
        "AveragePoolGradient",
        "AveragedLoss",
        "AveragedLossGradient",
        "ChannelBackpropStats",
        "ChannelStats",
        "Concat",
        "ConstantFill",
        "Conv",
        "ConvGradient",
        "Dropout",
        "DropoutGradient",
        "FC",
        "FCGradient",
        "Flatten",
        "Gather",
        "GaussianFill",
        "Iter",
        "LabelCrossEntropy",
        "LabelCrossEntropyGradient",
        "LayerNorm",
        "LayerNormGradient",
        "LearningRate",
        "MSRAFill",
        "MaxPool",
        "MaxPoolGradient",
        "MomentumSGDUpdate",
        "Mul",
        "MulGradient",
        "Relu",
        "ReluGradient",
        "ResizeLike",
        "RmsProp",
        "Scale",
        "Sigmoid",
        "SigmoidGradient",
        "Softmax",
        "SoftmaxGradient",
        "SoftmaxWithLoss",
        "SoftmaxWithLossGradient",
        "SpatialBN",
        "SpatialBNGradient",
        "Split",
        "SquaredL2Distance",
        "SquaredL2DistanceGradient",
        "Sum",
        "Tanh",
        "TanhGradient",
        "WeightedSum",
        "XavierFill",
    ];
    // dpm's own: the in-process collectives and the dense embedding gradient
    // (Caffe2's Gather gradient is a sparse slice, not an op).
    const DPM: &[&str] = &["Allreduce", "Broadcast", "GatherGradient"];
    let two = [Device::cpu(0), Device::cpu(1)];
    let mut nets = vec![
        Parallelize::new(ModelHelper::new("c"))
            .devices(two)
            .forward(common::small_cnn)
            .sync_batch_norm(true)
            .update(Sgd::new(0.1).momentum(0.9).weight_decay(1e-4))
            .build_nets()
            .unwrap(),
        Parallelize::new(ModelHelper::new("c"))
            .devices(two)
            .forward(common::small_cnn)
            .update(Sgd::new(0.1).weight_decay(1e-4))
            .build_nets()
            .unwrap(),
        Parallelize::new(ModelHelper::new("w"))
            .devices(two)
            .forward(wide)
            .update(Adam::new(0.1).weight_decay(1e-4))
            .build_nets()
            .unwrap(),
        Parallelize::new(ModelHelper::new("w"))
            .devices(two)
            .forward(wide)
            .update(RmsProp::new(0.1))
            .build_nets()
            .unwrap(),
        Parallelize::new(ModelHelper::new("w"))
            .devices(two)
            .forward(wide)
            .update(Adagrad::new(0.1))
            .build_nets()
            .unwrap(),
    ];
    let mut seen = HashSet::new();
    for (init, net) in nets.drain(..) {
        for o in init.op.iter().chain(&net.op) {
            let t = o.op_type();
            assert!(
                CAFFE2.contains(&t) || DPM.contains(&t),
                "`{t}` is neither a checked Caffe2 op nor one of dpm's own"
            );
            seen.insert(t.to_owned());
            // Gradient ops carry the forward op's arguments, as Caffe2's
            // gradient makers copy them.
            if t == "DropoutGradient" {
                assert!(o.find_arg("ratio").is_some() && o.find_arg("is_test").is_some());
            }
        }
    }
    // The list is what the nets use, not a superset that could hide a rename.
    for t in CAFFE2.iter().chain(DPM) {
        assert!(seen.contains(*t), "`{t}` is listed but no net emits it");
    }
}
