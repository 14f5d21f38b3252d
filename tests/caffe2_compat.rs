//! What a Caffe2 runtime reads the same way: integer fills in the int field,
//! `order` on every image op, the external input and output lists, and the
//! list forms of the window arguments.

mod common;

use std::collections::HashSet;

use common::{cycling_source, op_net, random};
use dpm::prelude::*;

#[dpm::data_parallel]
fn small_cnn(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [3, 8, 8]);
    let label = m.input("label");
    let c = m.conv("c1", data, 4, 3).pad(1).build()?;
    let b = m.spatial_bn("bn1", c)?;
    let r = m.relu(b)?;
    let p = m.max_pool(r, 2, 2, 0)?;
    let g = m.global_average_pool(p)?;
    let logits = m.fc("fc", g, 3)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

fn nets() -> (NetDef, NetDef) {
    Parallelize::new(ModelHelper::new("cnn"))
        .devices([Device::cpu(0), Device::cpu(1)])
        .forward(small_cnn)
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
