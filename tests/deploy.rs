//! Deploying: a trained model exported as Caffe2's init_net / predict_net pair
//! (no device prefixes, no loss, inference-mode batch norm, GivenTensorFill
//! parameters) runs in a fresh `Predictor` and gives the test net's scores; a
//! checkpoint serves as the parameters too.

mod common;

use dpm::deploy::Predictor;
use dpm::prelude::*;

#[test]
fn an_exported_predictor_gives_the_test_nets_scores() {
    let t = common::trained_small_cnn();
    let dir = std::env::temp_dir().join(format!("dpm-deploy-{}", std::process::id()));
    t.export_caffe2(&dir).unwrap();
    let (init, predict) = t.export_predictor().unwrap();
    // The predict net: no prefixes, no loss or accuracy, inference mode, ends in Softmax.
    for op in &predict.op {
        assert!(
            op.input.iter().chain(&op.output).all(|b| !b.contains('/')),
            "{op:?}"
        );
        assert!(
            !matches!(
                op.op_type(),
                "SoftmaxWithLoss" | "Accuracy" | "Allreduce" | "Scale"
            ),
            "{}",
            op.op_type()
        );
        if matches!(op.op_type(), "SpatialBN" | "Dropout") {
            assert_eq!(op.find_arg("is_test").and_then(|a| a.i), Some(1));
            assert_eq!(op.output.len(), 1);
        }
        assert!(op.device_option.is_none());
    }
    assert_eq!(predict.op.last().unwrap().op_type(), "Softmax");
    assert_eq!(predict.external_output, ["loss_softmax"]);
    assert_eq!(predict.external_input[0], "data");
    assert!(!predict.external_input.iter().any(|i| i == "label"));
    assert_eq!(
        (init.name.as_deref(), predict.name.as_deref()),
        (Some("cnn_init"), Some("cnn_predict"))
    );
    assert_eq!(predict.r#type.as_deref(), Some("simple"));
    // The caller's input, then each parameter once.
    assert_eq!(predict.external_input.len(), 1 + init.op.len());
    // The init net: one GivenTensorFill per parameter and running statistic.
    assert!(init.op.iter().all(|o| o.op_type() == "GivenTensorFill"));
    let filled: Vec<&str> = init.op.iter().map(|o| o.output[0].as_str()).collect();
    for p in [
        "c1_w", "c1_b", "bn1_s", "bn1_b", "bn1_rm", "bn1_riv", "fc_w", "fc_b",
    ] {
        assert!(filled.contains(&p), "{p} not in {filled:?}");
    }
    assert_eq!(predict.external_input[1..], init.external_output[..]);
    // From the files, in a fresh predictor: the test net's scores, to the bit.
    let p = Predictor::load(dir.join("init_net.pb"), dir.join("predict_net.pb")).unwrap();
    let held_out = common::cnn_batch(99, 8);
    t.run_test(held_out.clone()).unwrap();
    let want = t.fetch("loss_softmax", Device::cpu(0)).unwrap();
    let got = p.run(&[("data", held_out[0].1.clone())]).unwrap();
    assert_eq!(got[0].0, "loss_softmax");
    assert_eq!(p.net().external_output, ["loss_softmax"]);
    assert!(
        got[0].1.bitwise_eq(&want),
        "exported scores differ from the test net's"
    );
    // A checkpoint holds the same parameters (ITER and momenta are not needed).
    let ck = dir.join("ckpt.safetensors");
    t.save(&ck).unwrap();
    let q = Predictor::from_checkpoint(&predict, &ck).unwrap();
    assert!(q.run(&[("data", held_out[0].1.clone())]).unwrap()[0]
        .1
        .bitwise_eq(&want));
    // A predict net reading a parameter the checkpoint lacks is an error naming it.
    let mut bad = predict.clone();
    bad.external_input.push("nope_w".into());
    bad.op[0].input.push("nope_w".into());
    let e = Predictor::from_checkpoint(&bad, &ck).err().unwrap().to_string();
    assert!(e.contains("nope_w"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn caffe2_style_given_tensor_fills_load_every_type() {
    let mut init = Net::new("init");
    init.op("GivenTensorFill")
        .output("f")
        .arg("shape", vec![2i64, 2])
        .arg("values", vec![1.0f32, 2.0, 3.0, 4.0])
        .build();
    init.op("GivenTensorIntFill")
        .output("i")
        .arg("shape", vec![3i64])
        .arg("values", vec![1i64, -2, 3])
        .build();
    init.op("GivenTensorInt64Fill")
        .output("l")
        .arg("shape", vec![1i64])
        .arg("values", vec![1i64 << 40])
        .build();
    init.op("GivenTensorBoolFill")
        .output("b")
        .arg("shape", vec![2i64])
        .arg("values", vec![0i64, 5])
        .build();
    let ws = Workspace::new();
    ws.run_net_once(init.proto()).unwrap();
    assert_eq!(
        ws.fetch("f").unwrap().data::<f32>().unwrap(),
        [1.0, 2.0, 3.0, 4.0]
    );
    assert_eq!(ws.fetch("i").unwrap().data::<i32>().unwrap(), [1, -2, 3]);
    assert_eq!(ws.fetch("l").unwrap().data::<i64>().unwrap(), [1i64 << 40]);
    assert_eq!(ws.fetch("b").unwrap().data::<i32>().unwrap(), [0, 1]);
    let mut bad = Net::new("bad");
    bad.op("GivenTensorFill")
        .output("f")
        .arg("shape", vec![3i64])
        .arg("values", vec![1.0f32])
        .build();
    let e = ws.run_net_once(bad.proto()).unwrap_err().to_string();
    assert!(e.contains("1 values for shape"), "{e}");
}

/// A Caffe2 model-zoo style pair, written as Caffe2 writes one (fills with
/// `shape`/`values`, a predict net naming its external inputs and outputs),
/// runs in a `Predictor` and gives what a hand computation gives.
#[test]
fn a_caffe2_style_pair_computes_what_a_hand_computation_gives() {
    let (w1, b1) = ([0.5f32, -1.0, 0.25, 2.0, 1.5, -0.5], [0.1f32, -0.2]); // 2×3
    let (w2, b2) = ([1.0f32, -1.0, 0.5, 2.0, -0.5, 0.0], [0.0f32, 0.3, -0.3]); // 3×2
    let mut init = Net::new("zoo_init");
    for (name, shape, values) in [
        ("w1", vec![2i64, 3], w1.to_vec()),
        ("b1", vec![2], b1.to_vec()),
        ("w2", vec![3, 2], w2.to_vec()),
        ("b2", vec![3], b2.to_vec()),
    ] {
        init.op("GivenTensorFill")
            .output(name)
            .arg("shape", shape)
            .arg("values", values)
            .build();
    }
    let mut predict = Net::new("zoo_predict");
    predict.op("FC").inputs(["data", "w1", "b1"]).output("h").build();
    predict.op("Relu").input("h").output("h").build(); // in place, as zoo models do
    predict.op("FC").inputs(["h", "w2", "b2"]).output("z").build();
    predict.op("Softmax").input("z").output("prob").build();
    let mut predict = predict.into_proto();
    predict.external_input = ["data", "w1", "b1", "w2", "b2"].map(String::from).to_vec();
    predict.external_output = vec!["prob".into()];
    let p = Predictor::new(init.proto(), &predict).unwrap();
    let x = [1.0f32, 2.0, -1.0, -0.5, 0.0, 3.0];
    let got = p
        .run(&[("data", Tensor::from_vec([2, 3], x.to_vec()).unwrap())])
        .unwrap();
    let got = got[0].1.data::<f32>().unwrap().to_vec();
    for (r, row) in x.chunks(3).enumerate() {
        let h: Vec<f64> = (0..2)
            .map(|j| {
                let v = f64::from(b1[j])
                    + (0..3)
                        .map(|k| f64::from(row[k]) * f64::from(w1[j * 3 + k]))
                        .sum::<f64>();
                v.max(0.0)
            })
            .collect();
        let z: Vec<f64> = (0..3)
            .map(|j| f64::from(b2[j]) + (0..2).map(|k| h[k] * f64::from(w2[j * 2 + k])).sum::<f64>())
            .collect();
        let m = z.iter().copied().fold(f64::MIN, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        for j in 0..3 {
            let want = e[j] / s;
            assert!(
                (f64::from(got[r * 3 + j]) - want).abs() < 1e-6,
                "row {r} class {j}: {} vs {want}",
                got[r * 3 + j]
            );
        }
    }
}

#[dpm::data_parallel]
fn cnn_with_head(m: &mut DeviceModel<'_>, head: &str, classes: usize) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [3, 8, 8]);
    let label = m.input("label");
    let c = m.conv("c1", data, 4, 3).pad(1).build()?;
    let b = m.spatial_bn("bn1", c)?;
    let r = m.relu(b)?;
    let g = m.global_average_pool(r)?;
    let logits = m.fc(head, g, classes)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

fn fresh(head: &'static str, classes: usize) -> Trainer {
    let mut model = ModelHelper::new("tuned");
    model.set_seed(9);
    let mut t = Parallelize::new(model)
        .devices([Device::cpu(0), Device::cpu(1)])
        .input(|| Ok(common::cnn_batch(1, 8)))
        .forward(cnn_with_head(head.into(), classes))
        .update(Sgd::new(0.1).momentum(0.9))
        .build()
        .unwrap();
    t.run_init().unwrap();
    t
}

#[test]
fn load_params_takes_the_shared_layers_of_another_models_checkpoint() {
    let trained = common::trained_small_cnn();
    let dir = std::env::temp_dir().join(format!("dpm-load-params-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = dir.join("backbone.safetensors");
    trained.save(&ck).unwrap();

    let mut t = fresh("head", 5);
    let head_before = t.fetch("head_w", Device::cpu(0)).unwrap();
    let report = t.load_params(&ck).unwrap();
    let mut loaded = report.loaded.clone();
    loaded.sort();
    assert_eq!(loaded, ["bn1_b", "bn1_riv", "bn1_rm", "bn1_s", "c1_b", "c1_w"]);
    assert_eq!(report.missing, ["head_w", "head_b"]);
    assert!(report.unused.iter().any(|u| u == "fc_w") && report.unused.iter().any(|u| u == "ITER"));
    for d in [Device::cpu(0), Device::cpu(1)] {
        for p in ["c1_w", "bn1_rm"] {
            let want = trained.fetch(p, Device::cpu(0)).unwrap();
            assert!(t.fetch(p, d).unwrap().bitwise_eq(&want), "{p} on {d}");
        }
        assert!(t.fetch("head_w", d).unwrap().bitwise_eq(&head_before));
    }
    // Training state is the new model's own: it trains from step 0.
    assert_eq!(
        t.fetch("ITER", Device::cpu(0)).unwrap().data::<i64>().unwrap(),
        [0]
    );
    t.run(1).unwrap();

    // A shared name of another shape is an error, and nothing changes.
    let mut wrong = fresh("fc", 5);
    let c1_before = wrong.fetch("c1_w", Device::cpu(0)).unwrap();
    let e = wrong.load_params(&ck).unwrap_err().to_string();
    assert!(e.contains("fc_w") && e.contains("the model's is"), "{e}");
    assert!(wrong
        .fetch("c1_w", Device::cpu(0))
        .unwrap()
        .bitwise_eq(&c1_before));
    std::fs::remove_dir_all(dir).ok();
}

#[dpm::data_parallel]
fn regression(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let x = m.input_with_shape("x", [5]);
    let target = m.input("target");
    let h = m.fc("h", x, 8)?;
    let h = m.relu(h)?;
    let y = m.fc("y", h, 2)?;
    let d = m.squared_l2_distance("dist", y, target);
    Ok(m.averaged_loss("loss", d).into())
}

/// A model whose loss is not a softmax: the predictor ends in what the loss
/// compared with the target, and needs no target.
#[test]
fn a_regression_predictor_gives_the_prediction_without_the_target() {
    let batch = || {
        let x = common::random(&[8, 5], 3, -1.0, 1.0, 0.0);
        let t = common::random(&[8, 2], 4, -1.0, 1.0, 0.0);
        Ok(vec![("x".to_string(), x), ("target".to_string(), t)])
    };
    let mut t = Parallelize::new(ModelHelper::new("reg"))
        .devices([Device::cpu(0), Device::cpu(1)])
        .input(batch)
        .forward(regression)
        .update(Sgd::new(0.05))
        .build()
        .unwrap();
    t.run_init().unwrap();
    t.run(2).unwrap();
    let (init, predict) = t.export_predictor().unwrap();
    assert_eq!(predict.external_output, ["y"]);
    assert_eq!(predict.external_input[0], "x");
    assert!(!predict.external_input.iter().any(|i| i == "target"));
    assert!(predict
        .op
        .iter()
        .all(|o| !matches!(o.op_type(), "SquaredL2Distance" | "AveragedLoss")));
    let x = common::random(&[3, 5], 9, -1.0, 1.0, 0.0);
    let got = Predictor::new(&init, &predict)
        .unwrap()
        .run(&[("x", x.clone())])
        .unwrap();
    // By hand from the trained parameters: relu(x·hᵀ + b)·yᵀ + b.
    let p = |n: &str| {
        t.fetch(n, Device::cpu(0))
            .unwrap()
            .data::<f32>()
            .unwrap()
            .to_vec()
    };
    let (hw, hb, yw, yb) = (p("h_w"), p("h_b"), p("y_w"), p("y_b"));
    let xs = x.data::<f32>().unwrap();
    let out = got[0].1.data::<f32>().unwrap();
    for r in 0..3 {
        let h: Vec<f32> = (0..8)
            .map(|j| (hb[j] + (0..5).map(|k| xs[r * 5 + k] * hw[j * 5 + k]).sum::<f32>()).max(0.0))
            .collect();
        for j in 0..2 {
            let want = yb[j] + (0..8).map(|k| h[k] * yw[j * 8 + k]).sum::<f32>();
            assert!(
                (out[r * 2 + j] - want).abs() < 1e-5,
                "{} vs {want}",
                out[r * 2 + j]
            );
        }
    }
}
