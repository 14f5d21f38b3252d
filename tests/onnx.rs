//! ONNX export: the exported model passes onnx's full checker and onnxruntime
//! computes what dpm computes (scores within 1e-4, the same predictions), for a
//! trained CNN and for a Caffe2 predictor using every op the converter knows.
//!
//! onnxruntime comes from a Python virtual environment in the target folder,
//! made by `scripts/onnx-venv.sh` on first use (CI makes it first and sets
//! `DPM_REQUIRE_ONNXRUNTIME=1`, so a missing runtime fails there instead of
//! skipping).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use dpm::deploy::onnx::proto::{DimValue, ModelProto};
use dpm::deploy::{onnx, Predictor};
use dpm::prelude::*;
use dpm::proto::{NetDef, Wire};

/// The Python that has onnxruntime and onnx, made on first use; `None` (the
/// test then says it skipped) only where it cannot be made and CI did not ask
/// for it.
fn onnx_python() -> Option<&'static Path> {
    static PY: OnceLock<Option<PathBuf>> = OnceLock::new();
    PY.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
        let dir = target.join("onnx-venv");
        let made = Command::new("bash")
            .arg(root.join("scripts/onnx-venv.sh"))
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        let required = std::env::var("DPM_REQUIRE_ONNXRUNTIME").is_ok_and(|v| v == "1");
        match (made, required) {
            (true, _) => Some(dir.join("bin/python")),
            (false, true) => panic!("DPM_REQUIRE_ONNXRUNTIME=1 but scripts/onnx-venv.sh could not install onnxruntime"),
            (false, false) => {
                eprintln!("SKIPPED: onnxruntime could not be installed (scripts/onnx-venv.sh); the ONNX runtime checks did not run");
                None
            }
        }
    })
    .as_deref()
}

fn dtype_name(t: &Tensor) -> &'static str {
    match t.dtype() {
        DataType::F32 => "float32",
        DataType::I32 => "int32",
        DataType::I64 => "int64",
    }
}

fn raw(t: &Tensor) -> Vec<u8> {
    match t.dtype() {
        DataType::F32 => t
            .data::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DataType::I32 => t
            .data::<i32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DataType::I64 => t
            .data::<i64>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    }
}

/// Runs `model` in onnxruntime on `inputs`; its outputs in order, as f32.
fn onnxruntime(py: &Path, model: &Path, inputs: &[(&str, Tensor)]) -> Vec<Tensor> {
    let dir = model.parent().unwrap();
    let mut cmd = Command::new(py);
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/onnxruntime_run.py"))
        .arg(model)
        .arg(dir.join("out"));
    for (name, t) in inputs {
        let file = dir.join(format!("in_{name}.bin"));
        std::fs::write(&file, raw(t)).unwrap();
        let dims: Vec<String> = t.dims().iter().map(ToString::to_string).collect();
        cmd.arg(format!(
            "{name}={}:{}:{}",
            file.display(),
            dtype_name(t),
            dims.join(",")
        ));
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "onnxruntime failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (0..)
        .map_while(|k| {
            let bytes = std::fs::read(dir.join(format!("out.{k}"))).ok()?;
            let shape = std::fs::read_to_string(dir.join(format!("out.{k}.shape"))).unwrap();
            let dims: Vec<usize> = shape
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|d| d.parse().unwrap())
                .collect();
            let v = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            Some(Tensor::from_vec(dims, v).unwrap())
        })
        .collect()
}

/// Largest |a − b| over the elements, after checking the shapes agree.
fn max_diff(name: &str, a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "{name}: shapes differ");
    let (a, b) = (a.data::<f32>().unwrap(), b.data::<f32>().unwrap());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dpm-onnx-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn dims_of(v: &dpm::deploy::onnx::proto::ValueInfoProto) -> Vec<String> {
    let t = v.r#type.as_ref().unwrap().tensor_type.as_ref().unwrap();
    t.shape
        .as_ref()
        .unwrap()
        .dim
        .iter()
        .map(|d| match d.value.as_ref().unwrap() {
            DimValue::DimValue(n) => n.to_string(),
            DimValue::DimParam(p) => p.clone(),
        })
        .collect()
}

#[test]
fn a_trained_cnn_exported_to_onnx_predicts_the_same_in_onnxruntime() {
    let t = common::trained_small_cnn();
    let dir = scratch("cnn");
    let path = dir.join("model.onnx");
    t.export_onnx(&path).unwrap();

    let model: ModelProto = onnx::read_model(&path).unwrap();
    assert_eq!(model.ir_version, 8);
    assert!(model
        .opset_import
        .iter()
        .any(|o| o.domain.is_empty() && o.version >= 17));
    let g = model.graph.as_ref().unwrap();
    let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(
        ops,
        [
            "Conv",
            "BatchNormalization",
            "Relu",
            "Identity",
            "MaxPool",
            "GlobalAveragePool",
            "Flatten",
            "Gemm",
            "Softmax"
        ]
    );
    let inits: Vec<&str> = g.initializer.iter().map(|i| i.name.as_str()).collect();
    for p in [
        "c1_w", "c1_b", "bn1_s", "bn1_b", "bn1_rm", "bn1_riv", "fc_w", "fc_b",
    ] {
        assert!(inits.contains(&p), "{p} not in {inits:?}");
    }
    assert_eq!(g.input.len(), 1);
    assert_eq!(
        (g.input[0].name.as_str(), dims_of(&g.input[0])),
        ("data", vec!["N".into(), "3".into(), "8".into(), "8".into()])
    );
    assert_eq!(
        (g.output[0].name.as_str(), dims_of(&g.output[0])),
        ("loss_softmax", vec!["N".into(), "3".into()])
    );
    // The initializers hold the trained parameters.
    let fc_w = g.initializer.iter().find(|i| i.name == "fc_w").unwrap();
    let want = t.fetch("fc_w", Device::cpu(0)).unwrap();
    let got: Vec<f32> = fc_w
        .raw_data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(got, want.data::<f32>().unwrap());

    let Some(py) = onnx_python() else { return };
    let held_out = common::cnn_batch(99, 8);
    t.run_test(held_out.clone()).unwrap();
    let want = t.fetch("loss_softmax", Device::cpu(0)).unwrap();
    let got = onnxruntime(py, &path, &[("data", held_out[0].1.clone())]);
    let d = max_diff("loss_softmax", &got[0], &want);
    assert!(d < 1e-4, "onnxruntime's scores differ from dpm's by {d}");
    let argmax = |t: &Tensor| -> Vec<usize> {
        t.data::<f32>()
            .unwrap()
            .chunks(3)
            .map(|r| (0..3).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap())
            .collect()
    };
    assert_eq!(argmax(&got[0]), argmax(&want));
    std::fs::remove_dir_all(dir).ok();
}

/// A Caffe2-style predictor using every op the converter knows, in the forms
/// where Caffe2 and ONNX differ (list arguments, legacy broadcast at an axis,
/// softmax over a coerced 2-D view, FC of a 4-D input, pooling that excludes
/// padding, an in-place op).
fn zoo() -> (NetDef, NetDef) {
    let mut init = Net::new("zoo_init");
    let fill = |init: &mut Net, name: &str, shape: &[usize], seed: u64, lo: f32, hi: f32| {
        let t = common::random(shape, seed, lo, hi, 0.0);
        init.op("GivenTensorFill")
            .output(name)
            .arg("shape", shape.iter().map(|&d| d as i64).collect::<Vec<_>>())
            .arg("values", t.data::<f32>().unwrap().to_vec())
            .build();
    };
    fill(&mut init, "w1", &[4, 3, 3, 3], 1, -0.5, 0.5);
    fill(&mut init, "b1", &[4], 2, -0.1, 0.1);
    fill(&mut init, "s", &[4], 3, 0.5, 1.5);
    fill(&mut init, "bb", &[4], 4, -0.2, 0.2);
    fill(&mut init, "rm", &[4], 5, -0.3, 0.3);
    fill(&mut init, "rv", &[4], 6, 0.5, 2.0);
    fill(&mut init, "chan", &[4], 7, 0.5, 1.5);
    fill(&mut init, "fw", &[6, 4 * 4 * 4], 8, -0.2, 0.2);
    fill(&mut init, "fb", &[6], 9, -0.1, 0.1);
    fill(&mut init, "m", &[3, 5], 10, -1.0, 1.0);
    fill(&mut init, "table", &[7, 3], 11, -1.0, 1.0);
    fill(&mut init, "wg", &[4, 2, 1, 1], 12, -1.0, 1.0);
    fill(&mut init, "rowv", &[4], 13, 0.5, 1.5);

    let mut p = Net::new("zoo_predict");
    let c = "c".to_string();
    // Conv with list arguments and asymmetric padding: 8×8 → 4×4.
    p.op("Conv")
        .inputs(["data", "w1", "b1"])
        .output(&c)
        .arg("kernels", vec![3i64, 3])
        .arg("strides", vec![2i64, 2])
        .arg("pads", vec![1i64, 1, 0, 0])
        .arg("order", "NCHW")
        .build();
    p.op("SpatialBN")
        .inputs([&c, "s", "bb", "rm", "rv"])
        .output("bn")
        .arg("is_test", 1i64)
        .arg("epsilon", 1e-3f32)
        .build();
    p.op("Relu").input("bn").output("bn").build(); // in place
    p.op("Mul")
        .inputs(["bn", "chan"])
        .output("scaled")
        .arg("broadcast", 1i64)
        .arg("axis", 1i64)
        .build();
    p.op("AveragePool")
        .input("scaled")
        .output("avg")
        .arg("kernel", 3i64)
        .arg("stride", 1i64)
        .arg("pad", 1i64)
        .build();
    p.op("MaxPool")
        .input("scaled")
        .output("mx")
        .arg("kernel", 3i64)
        .arg("stride", 1i64)
        .arg("pad", 1i64)
        .build();
    p.op("Sub").inputs(["avg", "mx"]).output("d").build();
    p.op("Sigmoid").input("d").output("sg").build();
    p.op("FC").inputs(["sg", "fw", "fb"]).output("f").build();
    p.op("Tanh").input("f").output("th").build();
    p.op("Scale")
        .input("th")
        .output("th2")
        .arg("scale", 2.5f32)
        .build();
    p.op("Split")
        .input("th2")
        .outputs(["h1", "h2"])
        .arg("split", vec![3i64, 3])
        .arg("axis", 1i64)
        .build();
    p.op("Div").inputs(["h1", "h2"]).output("q").build();
    p.op("Tanh").input("q").output("q2").build();
    p.op("MatMul").inputs(["q2", "m"]).output("mm").build();
    p.op("Concat")
        .inputs(["mm", "h2"])
        .outputs(["cat", "cat_info"])
        .arg("axis", 1i64)
        .build();
    p.op("Reshape")
        .input("cat")
        .outputs(["r", "r_old"])
        .arg("shape", vec![0i64, 2, -1])
        .build();
    p.op("LayerNorm")
        .input("r")
        .outputs(["ln", "ln_mean", "ln_std"])
        .arg("axis", 1i64)
        .build();
    p.op("Transpose")
        .input("ln")
        .output("tr")
        .arg("axes", vec![0i64, 2, 1])
        .build();
    p.op("BatchMatMul")
        .inputs(["tr", "tr"])
        .output("bmm")
        .arg("trans_b", 1i64)
        .build();
    p.op("Gather").inputs(["table", "ids"]).output("emb").build();
    p.op("Flatten").input("emb").output("embf").build();
    p.op("Add").inputs(["embf", "embf"]).output("emb2").build();
    p.op("Sum")
        .inputs(["emb2", "embf", "embf"])
        .output("emb3")
        .build();
    p.op("Softmax")
        .input("bmm")
        .output("prob")
        .arg("axis", 1i64)
        .build();
    p.op("Dropout")
        .input("emb3")
        .output("emb_out")
        .arg("is_test", 1i64)
        .build();
    // A grouped 1×1 convolution, a Copy, a one-input Sum, a broadcast at the
    // trailing dim (no axis), and blobs named as the converter's own helper
    // values would be (`sg_2d`, `sg_2d_1`), so its fresh names must skip them.
    p.op("Conv")
        .inputs(["scaled", "wg"])
        .output("gc")
        .arg("kernel", 1i64)
        .arg("group", 2i64)
        .build();
    p.op("Copy").input("gc").output("gcc").build();
    p.op("Sum").input("gcc").output("s1").build();
    p.op("Mul")
        .inputs(["s1", "rowv"])
        .output("extra")
        .arg("broadcast", 1i64)
        .build();
    p.op("Relu").input("sg").output("sg_2d").build();
    p.op("Relu").input("sg").output("sg_2d_1").build();
    let mut predict = p.into_proto();
    let mut init = init.into_proto();
    init.external_output = init.op.iter().map(|o| o.output[0].clone()).collect();
    predict.external_input = ["data", "ids"]
        .iter()
        .map(|s| s.to_string())
        .chain(init.external_output.clone())
        .collect();
    predict.external_output = vec!["prob".into(), "emb_out".into(), "extra".into()];
    (init, predict)
}

fn zoo_inputs(n: usize) -> Vec<(&'static str, Tensor)> {
    let ids: Vec<i32> = (0..n * 2).map(|i| (i * 5 % 7) as i32).collect();
    vec![
        ("data", common::random(&[n, 3, 8, 8], 42, -1.0, 1.0, 0.0)),
        ("ids", Tensor::from_vec([n, 2], ids).unwrap()),
    ]
}

#[test]
fn every_convertible_caffe2_op_computes_the_same_in_onnxruntime() {
    let (init, predict) = zoo();
    let inputs = zoo_inputs(3);
    let samples: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (*n, t)).collect();
    let model = onnx::from_predictor(&init, &predict, &samples).unwrap();
    let g = model.graph.as_ref().unwrap();
    let ops: std::collections::HashSet<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
    for o in [
        "Conv",
        "BatchNormalization",
        "Relu",
        "Unsqueeze",
        "Mul",
        "AveragePool",
        "MaxPool",
        "Sub",
        "Sigmoid",
        "Flatten",
        "Gemm",
        "Tanh",
        "Split",
        "Div",
        "Concat",
        "Reshape",
        "LayerNormalization",
        "Transpose",
        "MatMul",
        "Gather",
        "Add",
        "Sum",
        "Softmax",
        "Shape",
        "Identity",
    ] {
        assert!(ops.contains(o), "no {o} in {ops:?}");
    }
    // Each value is written once (the in-place Relu got a fresh name).
    let mut written = std::collections::HashSet::new();
    assert!(g
        .node
        .iter()
        .flat_map(|n| &n.output)
        .all(|o| written.insert(o.clone())));
    assert_eq!(dims_of(&g.output[0]), ["N", "4", "4"]);
    assert_eq!(dims_of(&g.output[1]), ["N", "6"]);
    assert_eq!(dims_of(&g.output[2]), ["N", "4", "4", "4"]);
    // The helper value for the FC's 2-D view skipped the names taken.
    assert!(g
        .node
        .iter()
        .any(|n| n.op_type == "Flatten" && n.output[0] == "sg_2d_2"));
    // Metadata a reader shows: the producer, and a name on every node.
    assert_eq!(
        (model.producer_name.as_str(), model.producer_version.as_str()),
        ("dpm", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(g.doc_string, "exported by dpm");
    let mut names = std::collections::HashSet::new();
    assert!(g
        .node
        .iter()
        .all(|n| !n.name.is_empty() && names.insert(n.name.clone())));

    let want = Predictor::new(&init, &predict).unwrap().run(&inputs).unwrap();
    let Some(py) = onnx_python() else { return };
    let dir = scratch("zoo");
    let path = dir.join("zoo.onnx");
    std::fs::write(&path, model.to_bytes()).unwrap();
    let got = onnxruntime(py, &path, &inputs);
    assert_eq!(got.len(), 3);
    for ((name, w), g) in want.iter().zip(&got) {
        let d = max_diff(name, g, w);
        assert!(d < 1e-4, "{name}: onnxruntime differs from dpm by {d}");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn what_onnx_cannot_express_is_a_clear_error() {
    let (init, mut predict) = zoo();
    let inputs = zoo_inputs(2);
    let samples: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (*n, t)).collect();
    // Batch norm in training mode.
    let bn = predict
        .op
        .iter_mut()
        .find(|o| o.op_type() == "SpatialBN")
        .unwrap();
    bn.arg.retain(|a| a.name.as_deref() != Some("is_test"));
    bn.output.extend(["rm2", "rv2", "sm", "siv"].map(String::from));
    let e = onnx::from_predictor(&init, &predict, &samples)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("SpatialBN in training mode") && e.contains("op #1"),
        "{e}"
    );
    // An op with no conversion names itself.
    let (init, mut predict) = zoo();
    predict.op.push(predict.op[0].clone());
    let last = predict.op.last_mut().unwrap();
    last.r#type = Some("SquaredL2Distance".into());
    last.input = vec!["f".into(), "f".into()];
    last.output = vec!["dist".into()];
    let e = onnx::from_predictor(&init, &predict, &samples)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no ONNX conversion for Caffe2 op `SquaredL2Distance`"),
        "{e}"
    );
    // Dropout in training mode.
    let (init, mut predict) = zoo();
    let drop = predict.op.iter_mut().find(|o| o.op_type() == "Dropout").unwrap();
    drop.arg.retain(|a| a.name.as_deref() != Some("is_test"));
    let e = onnx::from_predictor(&init, &predict, &samples)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Dropout in training mode"), "{e}");
    // A net that does not run is refused before converting.
    let (init, mut predict) = zoo();
    predict.op[0].input[1] = "missing_w".into();
    let e = onnx::from_predictor(&init, &predict, &samples)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not run") && e.contains("missing_w"), "{e}");
    // A trainer that has not run a step takes the input's declared shape.
    let mut model = ModelHelper::new("fresh");
    model.set_seed(1);
    let mut t = Parallelize::new(model)
        .devices([Device::cpu(0)])
        .input(|| Ok(common::cnn_batch(1, 4)))
        .forward(common::small_cnn)
        .update(Sgd::new(0.1))
        .build()
        .unwrap();
    t.run_init().unwrap();
    let m = t.export_onnx_model().unwrap();
    assert_eq!(dims_of(&m.graph.unwrap().input[0]), ["N", "3", "8", "8"]);
}
