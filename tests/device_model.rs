//! `DeviceModel`, the per-device builder API: names, per-sample shapes, the ops
//! and arguments each helper adds, and the errors for what cannot be built.

mod common;

use dpm::parallel::{DeviceModel, IntoLosses};
use dpm::prelude::*;

/// The op of `m`'s train net that writes `output`.
fn writer<'a>(m: &'a ModelHelper, output: &str) -> &'a OperatorDef {
    m.net()
        .ops()
        .iter()
        .find(|o| o.output.iter().any(|b| b == output))
        .unwrap_or_else(|| panic!("no op writes {output}"))
}

fn int_arg(op: &OperatorDef, name: &str) -> Option<i64> {
    op.find_arg(name).and_then(|a| a.i)
}

#[test]
fn layers_name_their_blobs_and_track_per_sample_shapes() {
    let mut model = ModelHelper::new("m");
    let shapes = DeviceModel::scope(&mut model, Device::cpu(1), |m| {
        assert_eq!(m.device(), Device::cpu(1));
        assert!(!m.is_test());
        let x = m.input_with_shape("data", [3, 9, 11]);
        assert_eq!(m.name(x).name(), "cpu_1/data");
        let c = m.conv("c1", x, 8, 3).stride(2).pad(1).build().unwrap();
        let b = m.spatial_bn("bn", c).unwrap();
        let r = m.relu(b).unwrap();
        let p = m.max_pool(r, 3, 2, 1).unwrap();
        let g = m.conv("c2", p, 4, 1).groups(2).no_bias().build().unwrap();
        let s = m.add("sum", g, g).unwrap();
        let gap = m.global_average_pool(s).unwrap();
        let f = m.fc("fc", gap, 5).unwrap();
        let label = m.input("label");
        let (prob, loss) = m.softmax_with_loss("loss", f, label).unwrap();
        // A wider pooling window with more padding keeps the side: (5 + 4 − 5) + 1.
        let q = m.max_pool(b, 5, 1, 2).unwrap();
        assert_eq!(m.sample_shape(q).unwrap().dims(), [8, 5, 6]);
        let acc = m.accuracy("acc", prob, label);
        let all = [x, c, b, r, p, g, s, gap, f, prob, loss, acc];
        all.map(|b| {
            (
                m.name(b).name().to_owned(),
                m.sample_shape(b).map(|s| s.dims().to_vec()),
            )
        })
    });
    let want: [(&str, Option<Vec<usize>>); 12] = [
        ("cpu_1/data", Some(vec![3, 9, 11])),
        ("cpu_1/c1", Some(vec![8, 5, 6])),
        ("cpu_1/bn", Some(vec![8, 5, 6])),
        ("cpu_1/bn_relu", Some(vec![8, 5, 6])),
        ("cpu_1/bn_relu_maxpool", Some(vec![8, 3, 3])),
        ("cpu_1/c2", Some(vec![4, 3, 3])),
        ("cpu_1/sum", Some(vec![4, 3, 3])),
        ("cpu_1/sum_gap", Some(vec![4, 1, 1])),
        ("cpu_1/fc", Some(vec![5])),
        ("cpu_1/loss_softmax", Some(vec![5])),
        ("cpu_1/loss", Some(vec![])),
        ("cpu_1/acc", Some(vec![])),
    ];
    for ((name, shape), (want_name, want_shape)) in shapes.iter().zip(&want) {
        assert_eq!((name.as_str(), shape), (*want_name, want_shape));
    }
    // The ops carry the options: stride, pad, groups, bias or not, pooling window.
    let c1 = writer(&model, "cpu_1/c1");
    assert_eq!(c1.input, ["cpu_1/data", "cpu_1/c1_w", "cpu_1/c1_b"]);
    assert_eq!(
        (int_arg(c1, "stride"), int_arg(c1, "pad"), int_arg(c1, "kernel")),
        (Some(2), Some(1), Some(3))
    );
    let c2 = writer(&model, "cpu_1/c2");
    assert_eq!(c2.input, ["cpu_1/bn_relu_maxpool", "cpu_1/c2_w"], "no bias");
    assert_eq!(int_arg(c2, "group"), Some(2));
    let pool = writer(&model, "cpu_1/bn_relu_maxpool");
    assert_eq!(pool.op_type(), "MaxPool");
    assert_eq!(
        (
            int_arg(pool, "kernel"),
            int_arg(pool, "stride"),
            int_arg(pool, "pad")
        ),
        (Some(3), Some(2), Some(1))
    );
    let bn = writer(&model, "cpu_1/bn");
    assert_eq!(bn.find_arg("momentum").and_then(|a| a.f), Some(0.9));
    assert_eq!(bn.find_arg("epsilon").and_then(|a| a.f), Some(1e-5));
    assert_eq!(writer(&model, "cpu_1/sum").input, ["cpu_1/c2", "cpu_1/c2"]);
    assert_eq!(writer(&model, "cpu_1/sum_gap").op_type(), "AveragePool");
    // Parameters are sized from the shapes: fc reads 4·1·1 inputs.
    let fc_w = model
        .init_net()
        .ops()
        .iter()
        .find(|o| o.output == ["cpu_1/fc_w"])
        .unwrap();
    assert_eq!(fc_w.find_arg("shape").unwrap().ints, [5, 4]);
    let c2_w = model
        .init_net()
        .ops()
        .iter()
        .find(|o| o.output == ["cpu_1/c2_w"])
        .unwrap();
    assert_eq!(
        c2_w.find_arg("shape").unwrap().ints,
        [4, 4, 1, 1],
        "8 channels in 2 groups"
    );
}

#[test]
fn layers_that_cannot_be_built_say_why() {
    let mut model = ModelHelper::new("m");
    DeviceModel::scope(&mut model, Device::cpu(0), |m| {
        let unknown = m.input("data");
        let e = m.fc("fc", unknown, 3).unwrap_err().to_string();
        assert!(e.contains("cpu_0/data") && e.contains("input_with_shape"), "{e}");
        assert!(m.conv("c", unknown, 3, 3).build().is_err());
        assert!(m.spatial_bn("bn", unknown).is_err());
        assert!(m.global_average_pool(unknown).is_err());
        let flat = m.input_with_shape("flat", [12]);
        let e = m.conv("c", flat, 3, 3).build().unwrap_err().to_string();
        assert!(e.contains("[C, H, W]"), "{e}");
        assert!(m
            .max_pool(flat, 2, 2, 0)
            .unwrap_err()
            .to_string()
            .contains("[C, H, W]"));
        let small = m.input_with_shape("small", [1, 2, 2]);
        let e = m.conv("c", small, 3, 5).pad(1).build().unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
        assert!(m.conv("c", small, 3, 1).stride(0).build().is_err());
        // Either side too small is enough.
        for shape in [[1, 2, 9], [1, 9, 2]] {
            let x = m.input_with_shape("wide", shape);
            let e = m.conv("c", x, 3, 5).pad(1).build().unwrap_err().to_string();
            assert!(e.contains("does not fit"), "{shape:?}: {e}");
        }
        // A window that just fits with its padding is fine.
        let fits = m.conv("fits", small, 3, 4).pad(1).build().unwrap();
        assert_eq!(m.sample_shape(fits).unwrap().dims(), [3, 1, 1]);
        let other = m.input_with_shape("other", [1, 3, 3]);
        let e = m.add("sum", small, other).unwrap_err().to_string();
        assert!(e.contains("sum") && e.contains("differ"), "{e}");
        // Adding a blob of unknown shape takes the known one.
        let s = m.add("sum2", unknown, small).unwrap();
        assert_eq!(m.sample_shape(s).unwrap().dims(), [1, 2, 2]);
        let r = m.relu(unknown).unwrap();
        assert!(m.sample_shape(r).is_none());
    });
}

#[test]
fn losses_come_in_every_form_a_forward_function_may_return() {
    let mut model = ModelHelper::new("m");
    DeviceModel::scope(&mut model, Device::cpu(2), |m| {
        let a = m.input("a");
        let b = m.input("b");
        let names = |v: Vec<BlobRef>| v.iter().map(|b| b.name().to_owned()).collect::<Vec<_>>();
        assert_eq!(names(a.into_losses(m).unwrap()), ["cpu_2/a"]);
        assert_eq!(names(vec![a, b].into_losses(m).unwrap()), ["cpu_2/a", "cpu_2/b"]);
        assert_eq!(
            names(Losses::from([b, a]).into_losses(m).unwrap()),
            ["cpu_2/b", "cpu_2/a"]
        );
        let ok: Result<Blob<'_>> = Ok(b);
        assert_eq!(names(ok.into_losses(m).unwrap()), ["cpu_2/b"]);
        let err: Result<Blob<'_>> = Err(Error::Config("boom".into()));
        assert!(err.into_losses(m).is_err());
        // Ops added through the model helper become blobs with `adopt`.
        let x = m.name(a).clone();
        let y = m.model().relu(&x, "custom");
        let y = m.adopt(y, Some(Shape::from([7])));
        assert_eq!(
            (m.name(y).name(), m.sample_shape(y).map(|s| s.dims().to_vec())),
            ("cpu_2/custom", Some(vec![7]))
        );
    });
    // A test model builds inference ops.
    let mut test = ModelHelper::new_test("t");
    DeviceModel::scope(&mut test, Device::cpu(0), |m| {
        assert!(m.is_test());
        let x = m.input_with_shape("x", [2, 4, 4]);
        m.spatial_bn("bn", x).unwrap();
    });
    let bn = writer(&test, "cpu_0/bn");
    assert_eq!((int_arg(bn, "is_test"), bn.output.len()), (Some(1), 1));
}

/// The layers beyond ResNet, through `DeviceModel`: an MLP with tanh, dropout,
/// a broadcast scale and sigmoid trains on two devices.
#[data_parallel]
fn wide_mlp(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [8]);
    let label = m.input("label");
    let h = m.fc("fc1", data, 16)?;
    let h = m.tanh("fc1_tanh", h);
    let h = m.dropout("drop", h, 0.1)?;
    let h = m.fc("fc2", h, 8)?;
    let h = m.sigmoid("fc2_sigmoid", h);
    let h = m.arith("Mul", "gated", h, data)?;
    let logits = m.fc("fc3", h, 4)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

#[test]
fn tanh_dropout_sigmoid_and_mul_layers_train_data_parallel() {
    let mut t = Parallelize::new(ModelHelper::new("wide"))
        .devices([Device::cpu(0), Device::cpu(1)])
        .input(common::cycling_source(16, 0))
        .forward(wide_mlp)
        .update(Sgd::new(0.1).momentum(0.9))
        .build()
        .unwrap();
    t.run_init().unwrap();
    t.step().unwrap();
    let first = t.loss().unwrap();
    t.run(60).unwrap();
    let last = t.loss().unwrap();
    assert!(last < 0.7 * first, "loss {first} → {last}");
    // Each replica draws its own dropout mask; the parameters stay identical.
    for g in t.param_groups() {
        let a = t.fetch(&g.name, Device::cpu(0)).unwrap();
        assert!(
            a.bitwise_eq(&t.fetch(&g.name, Device::cpu(1)).unwrap()),
            "`{}`",
            g.name
        );
    }
}

#[data_parallel]
fn relu_twice(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [8]);
    let label = m.input("label");
    let h = m.fc("fc1", data, 8)?;
    let a = m.relu(h)?;
    let b = m.relu(h)?;
    let named = m.relu_named("mine", h)?;
    assert_eq!(
        [
            m.name(a).short_name(),
            m.name(b).short_name(),
            m.name(named).short_name()
        ],
        ["fc1_relu", "fc1_relu_1", "mine"]
    );
    let s = m.add("both", a, b)?;
    let logits = m.fc("fc2", s, 4)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

#[test]
fn invented_names_never_collide() {
    let mut t = Parallelize::new(ModelHelper::new("twice"))
        .devices([Device::cpu(0)])
        .input(common::cycling_source(8, 0))
        .forward(relu_twice)
        .update(Sgd::new(0.1))
        .build()
        .unwrap();
    t.run_init().unwrap();
    t.run(2).unwrap();
}

/// Split, Concat, LayerNorm, Softmax, LabelCrossEntropy and AveragedLoss, all
/// through `DeviceModel` helpers.
#[data_parallel]
fn split_join_norm(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [8]);
    let label = m.input("label");
    let h = m.fc("fc1", data, 12)?;
    let parts = m.split("parts", h, 0, &[5, 7])?;
    let joined = m.concat("joined", &[parts[1], parts[0]], 0)?;
    assert_eq!(m.sample_shape(joined), Some(&Shape::from([12])));
    let n = m.layer_norm("ln", joined, 1e-5)?;
    let h = m.tanh("ln_tanh", n);
    let logits = m.fc("fc2", h, 4)?;
    let p = m.softmax("p", logits);
    let xent = m.label_cross_entropy("xent", p, label);
    Ok(m.averaged_loss("loss", xent).into())
}

fn split_join_norm_trainer(devices: &[Device], batch: usize) -> Trainer {
    let mut t = Parallelize::new(ModelHelper::new("sjn"))
        .devices(devices.to_vec())
        .input(common::cycling_source(batch, 0))
        .forward(split_join_norm)
        .update(Sgd::new(0.2).momentum(0.9))
        .build()
        .unwrap();
    t.run_init().unwrap();
    t
}

#[test]
fn split_concat_layer_norm_and_averaged_loss_train_and_match_one_big_batch() {
    let mut two = split_join_norm_trainer(&[Device::cpu(0), Device::cpu(1)], 16);
    let mut one = split_join_norm_trainer(&[Device::cpu(0)], 16);
    two.step().unwrap();
    let first = two.loss().unwrap();
    one.step().unwrap();
    two.run(40).unwrap();
    one.run(40).unwrap();
    let last = two.loss().unwrap();
    assert!(last < 0.7 * first, "loss {first} → {last}");
    for g in two.param_groups() {
        let (a, b) = (
            two.fetch(&g.name, Device::cpu(1)).unwrap(),
            one.fetch(&g.name, Device::cpu(0)).unwrap(),
        );
        let (a, b) = (a.data::<f32>().unwrap(), b.data::<f32>().unwrap());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= 1e-4 * scale,
            "`{}`: 2 × 8 differs from 1 × 16 by {worst}",
            g.name
        );
    }
}

#[test]
fn image_sequence_and_loss_helpers_add_caffe2_ops_with_per_sample_shapes() {
    let mut model = ModelHelper::new("m");
    DeviceModel::scope(&mut model, Device::cpu(0), |m| {
        let img = m.input_with_shape("img", [3, 8, 8]);
        let bn = m.spatial_bn_with("bn", img, 0.99, 1e-3).unwrap();
        let pooled = m.average_pool(bn, 3, 2, 1).unwrap();
        assert_eq!(m.sample_shape(pooled), Some(&Shape::from([3, 4, 4])));
        let flat = m.flatten(pooled);
        assert_eq!(m.sample_shape(flat), Some(&Shape::from([48])));
        let seq = m.input_with_shape("seq", [4, 6]);
        let t = m.transpose("seq_t", seq, &[1, 0]).unwrap();
        assert_eq!(m.sample_shape(t), Some(&Shape::from([6, 4])));
        let att = m.batch_matmul("att", seq, seq, false, true).unwrap();
        assert_eq!(m.sample_shape(att), Some(&Shape::from([4, 4])));
        let ids = m.input_with_shape("ids", [5]);
        let e = m.embedding("emb", ids, 100, 16).unwrap();
        assert_eq!(m.sample_shape(e), Some(&Shape::from([5, 16])));
        let target = m.input_with_shape("target", [48]);
        for (name, b) in [
            ("l2", m.squared_l2_distance("l2", flat, target)),
            ("l1", m.l1_distance("l1", flat, target)),
        ] {
            assert_eq!(m.sample_shape(b), Some(&Shape::from([])), "{name}");
        }
        // What cannot be built says why.
        let bad = [
            m.transpose("x", seq, &[0, 0]).unwrap_err().to_string(),
            m.batch_matmul("y", seq, seq, false, false)
                .unwrap_err()
                .to_string(),
            m.split("z", seq, 1, &[2, 2]).unwrap_err().to_string(),
            m.concat("w", &[seq, t], 0).unwrap_err().to_string(),
            m.average_pool(seq, 2, 2, 0).unwrap_err().to_string(),
            m.spatial_bn_with("v", img, 1.5, 1e-5).unwrap_err().to_string(),
        ];
        for (e, want) in bad.iter().zip([
            "permutation",
            "do not multiply",
            "add up",
            "differ",
            "[C, H, W]",
            "momentum",
        ]) {
            assert!(e.contains(want), "{e}");
        }
    });
    let op = |out: &str| writer(&model, out);
    let bn = op("cpu_0/bn");
    assert_eq!(bn.find_arg("momentum").and_then(|a| a.f), Some(0.99));
    assert_eq!(bn.find_arg("epsilon").and_then(|a| a.f), Some(1e-3));
    let pool = op("cpu_0/bn_avgpool");
    assert_eq!(
        (
            pool.op_type(),
            int_arg(pool, "kernel"),
            int_arg(pool, "stride"),
            int_arg(pool, "pad")
        ),
        ("AveragePool", Some(3), Some(2), Some(1))
    );
    assert_eq!(op("cpu_0/bn_avgpool_flat").op_type(), "Flatten");
    assert_eq!(
        op("cpu_0/seq_t").find_arg("axes").map(|a| a.ints.clone()),
        Some(vec![0, 2, 1])
    );
    let att = op("cpu_0/att");
    assert_eq!((att.op_type(), int_arg(att, "trans_b")), ("BatchMatMul", Some(1)));
    let emb = op("cpu_0/emb");
    assert_eq!(
        (emb.op_type(), emb.input.clone()),
        ("Gather", vec!["cpu_0/emb_w".to_owned(), "cpu_0/ids".to_owned()])
    );
    assert!(model.params().iter().any(|p| p.name() == "cpu_0/emb_w"));
    assert_eq!(op("cpu_0/l2").op_type(), "SquaredL2Distance");
    assert_eq!(op("cpu_0/l1").op_type(), "L1Distance");
}

#[test]
fn max_pool_names_never_collide_and_can_be_given() {
    let mut model = ModelHelper::new("m");
    DeviceModel::scope(&mut model, Device::cpu(0), |m| {
        let img = m.input_with_shape("img", [2, 8, 8]);
        let a = m.max_pool(img, 2, 2, 0).unwrap();
        let b = m.max_pool(img, 2, 2, 0).unwrap();
        let c = m.max_pool_named("pooled", img, 3, 1, 1).unwrap();
        let names = [a, b, c].map(|x| m.name(x).short_name().to_owned());
        assert_eq!(names, ["img_maxpool", "img_maxpool_1", "pooled"]);
        assert_eq!(m.sample_shape(c), Some(&Shape::from([2, 8, 8])));
    });
}
