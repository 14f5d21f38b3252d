//! ONNX export of a Caffe2-style predictor (opset [`proto::OPSET`]): the
//! trained parameters become initializers, each Caffe2 op one or a few ONNX
//! nodes that compute the same thing (checked against onnxruntime by
//! `tests/onnx.rs`).
//!
//! The converter runs the predictor once on a batch of one and once on a batch
//! of two, so it knows every blob's shape (Caffe2's ops coerce to 2-D at an
//! axis where ONNX's act on one axis, and the legacy broadcasting aligns at an
//! axis where ONNX aligns the trailing dims), and which output dims grow with
//! the batch (named `N` in the model's signature).
//!
//! To add an op: one arm in [`Converter::op`].

pub mod proto;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use proto::{
    AttributeProto, AttributeType, DimValue, Dimension, ElemType, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto,
};

use super::Predictor;
use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::cpu::conv::Window;
use crate::parallel::Trainer;
use crate::proto::{NetDef, OperatorDef, Wire};
use crate::tensor::{DataType, Tensor};

impl Trainer {
    /// The trained model ([`Trainer::export_predictor`]) as an ONNX model, its
    /// inputs shaped as the master replica's last batch (or as declared with
    /// `input_with_shape`), the batch dim named `N`.
    pub fn export_onnx_model(&self) -> Result<ModelProto> {
        let (init, predict) = self.export_predictor()?;
        let samples = self.predictor_inputs(&init, &predict)?;
        let samples: Vec<(&str, &Tensor)> = samples.iter().map(|(n, t)| (n.as_str(), t)).collect();
        from_predictor(&init, &predict, &samples)
    }

    /// Writes [`Trainer::export_onnx_model`] to `path`, atomically.
    pub fn export_onnx(&self, path: impl AsRef<Path>) -> Result<()> {
        let model = self.export_onnx_model()?;
        crate::checkpoint::write_atomically(path.as_ref(), &model.to_bytes())
    }
}

/// Converts a Caffe2 predictor (`init` of fills, `predict` forward-only) to
/// ONNX. `inputs` gives, for each input the caller feeds, a batch of any size
/// whose per-sample shape and type the model's signature takes (the values
/// are not used).
pub fn from_predictor(init: &NetDef, predict: &NetDef, inputs: &[(&str, &Tensor)]) -> Result<ModelProto> {
    // Shapes at batch 1 and 2: the dims that differ are the batch's.
    let run = |batch: usize| -> Result<Predictor> {
        let p = Predictor::new(init, predict)?;
        let fed: Vec<(&str, Tensor)> = inputs
            .iter()
            .map(|(n, t)| (*n, super::zeros_like(t, batch)))
            .collect();
        p.run(&fed)
            .map_err(|e| Error::Config(format!("ONNX export: the predictor does not run: {e}")))?;
        Ok(p)
    };
    let (one, two) = (run(1)?, run(2)?);
    let mut cx = Converter::new(&one, init, predict)?;
    for (i, op) in predict.op.iter().enumerate() {
        cx.op(i, op)
            .map_err(|e| Error::Config(format!("ONNX export of op #{i} ({}): {e}", op.op_type())))?;
    }
    let mut graph = GraphProto {
        name: predict.net_name().to_owned(),
        doc_string: "exported by dpm".into(),
        ..GraphProto::default()
    };
    for (name, t) in inputs {
        let dims: Vec<Option<usize>> = std::iter::once(None)
            .chain(t.dims()[1..].iter().map(|&d| Some(d)))
            .collect();
        graph.input.push(value_info(name, t.dtype(), &dims));
    }
    for out in &predict.external_output {
        let (a, b) = (one.workspace().fetch(out)?, two.workspace().fetch(out)?);
        let dims: Vec<Option<usize>> = a
            .dims()
            .iter()
            .zip(b.dims())
            .map(|(&x, &y)| (x == y).then_some(x))
            .collect();
        let value = cx.value(out)?;
        if value != *out {
            cx.node("Identity", [value], [out], vec![]);
        }
        graph.output.push(value_info(out, a.dtype(), &dims));
    }
    graph.node = cx.nodes;
    graph.initializer = cx.initializers;
    Ok(ModelProto {
        ir_version: proto::IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: proto::OPSET,
        }],
        producer_name: "dpm".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..ModelProto::default()
    })
}

fn elem_type(d: DataType) -> ElemType {
    match d {
        DataType::F32 => ElemType::Float,
        DataType::I32 => ElemType::Int32,
        DataType::I64 => ElemType::Int64,
    }
}

/// A typed value; `None` dims are the batch (`N`).
fn value_info(name: &str, dtype: DataType, dims: &[Option<usize>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(d) => DimValue::DimValue(*d as i64),
                None => DimValue::DimParam("N".into()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: elem_type(dtype) as i32,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}

/// A constant tensor named `name`.
fn tensor_proto(name: &str, t: &Tensor) -> Result<TensorProto> {
    let t = t.to_host()?;
    let mut raw = Vec::with_capacity(t.numel() * 8);
    match t.dtype() {
        DataType::F32 => t.data::<f32>()?.iter().for_each(|v| raw.extend(v.to_le_bytes())),
        DataType::I32 => t.data::<i32>()?.iter().for_each(|v| raw.extend(v.to_le_bytes())),
        DataType::I64 => t.data::<i64>()?.iter().for_each(|v| raw.extend(v.to_le_bytes())),
    }
    Ok(TensorProto {
        name: name.to_owned(),
        dims: t.dims().iter().map(|&d| d as i64).collect(),
        data_type: elem_type(t.dtype()) as i32,
        raw_data: raw,
        ..TensorProto::default()
    })
}

/// An attribute; `From` picks its type.
struct Attr(AttributeProto);

impl Attr {
    fn int(name: &str, v: i64) -> Attr {
        Attr(AttributeProto {
            name: name.into(),
            r#type: AttributeType::Int as i32,
            i: v,
            ..AttributeProto::default()
        })
    }
    fn float(name: &str, v: f32) -> Attr {
        Attr(AttributeProto {
            name: name.into(),
            r#type: AttributeType::Float as i32,
            f: v,
            ..AttributeProto::default()
        })
    }
    fn ints(name: &str, v: Vec<i64>) -> Attr {
        Attr(AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: v,
            ..AttributeProto::default()
        })
    }
}

/// The graph being built: nodes, initializers, and the ONNX value holding
/// each Caffe2 blob now (ONNX writes each value once; Caffe2 may write a blob
/// in place, and then its later versions get fresh names).
struct Converter<'a> {
    shapes: &'a Predictor,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    current: HashMap<String, String>,
    taken: HashSet<String>,
    writes_left: HashMap<String, usize>,
    graph_inputs: HashSet<String>,
}

impl<'a> Converter<'a> {
    fn new(shapes: &'a Predictor, init: &NetDef, predict: &NetDef) -> Result<Converter<'a>> {
        let mut cx = Converter {
            shapes,
            nodes: Vec::new(),
            initializers: Vec::new(),
            current: HashMap::new(),
            taken: HashSet::new(),
            writes_left: HashMap::new(),
            graph_inputs: predict.external_input.iter().cloned().collect(),
        };
        let params: HashSet<&String> = init.op.iter().flat_map(|o| &o.output).collect();
        for name in &predict.external_input {
            if params.contains(name) {
                let t = shapes.workspace().fetch(name)?;
                cx.initializers.push(tensor_proto(name, &t)?);
            }
            cx.current.insert(name.clone(), name.clone());
            cx.taken.insert(name.clone());
        }
        for b in predict.op.iter().flat_map(|o| &o.output) {
            *cx.writes_left.entry(b.clone()).or_default() += 1;
            cx.taken.insert(b.clone());
        }
        Ok(cx)
    }

    /// The ONNX value holding `blob` now.
    fn value(&self, blob: &str) -> Result<String> {
        self.current
            .get(blob)
            .cloned()
            .ok_or_else(|| Error::Config(format!("`{blob}` is read before any op writes it")))
    }

    /// A name no blob or value has, from `hint`.
    fn fresh(&mut self, hint: &str) -> String {
        let mut name = hint.to_owned();
        let mut k = 1;
        while self.taken.contains(&name) {
            name = format!("{hint}_{k}");
            k += 1;
        }
        self.taken.insert(name.clone());
        name
    }

    /// The value an op writing `blob` writes: the blob's own name on its last
    /// write, a fresh one before.
    fn define(&mut self, blob: &str) -> String {
        let left = self.writes_left.entry(blob.to_owned()).or_insert(1);
        *left = left.saturating_sub(1);
        let last = *left == 0 && !self.graph_inputs.contains(blob);
        let v = if last {
            blob.to_owned()
        } else {
            self.fresh(&format!("{blob}__v"))
        };
        self.current.insert(blob.to_owned(), v.clone());
        v
    }

    fn node<I, O>(&mut self, op_type: &str, input: I, output: O, attrs: Vec<Attr>)
    where
        I: IntoIterator<Item: Into<String>>,
        O: IntoIterator<Item: Into<String>>,
    {
        self.nodes.push(NodeProto {
            name: format!("{op_type}_{}", self.nodes.len()),
            op_type: op_type.into(),
            input: input.into_iter().map(Into::into).collect(),
            output: output.into_iter().map(Into::into).collect(),
            attribute: attrs.into_iter().map(|a| a.0).collect(),
            ..NodeProto::default()
        });
    }

    /// An initializer holding `t`, named from `hint`.
    fn constant(&mut self, hint: &str, t: &Tensor) -> Result<String> {
        let name = self.fresh(hint);
        self.initializers.push(tensor_proto(&name, t)?);
        Ok(name)
    }

    fn int64s(&mut self, hint: &str, v: &[i64]) -> Result<String> {
        let t =
            Tensor::from_vec([v.len()], v.to_vec()).ok_or_else(|| Error::Config("bad constant".into()))?;
        self.constant(hint, &t)
    }

    /// `blob`'s shape when the predictor ran on one sample.
    fn shape(&self, blob: &str) -> Result<Vec<usize>> {
        Ok(self.shapes.workspace().fetch(blob)?.dims().to_vec())
    }

    /// One Caffe2 op as ONNX nodes.
    fn op(&mut self, i: usize, op: &OperatorDef) -> Result<()> {
        let a = Args(&op.arg);
        let inputs: Vec<String> = op.input.iter().map(|b| self.value(b)).collect::<Result<_>>()?;
        let x = inputs.first().cloned().unwrap_or_default();
        let out0 = op.output.first().cloned().unwrap_or_default();
        let t = op.op_type();
        let need_test = |what: &str| -> Result<()> {
            if a.int("is_test", 0)? == 0 {
                return Err(Error::Config(format!(
                    "{what} in training mode: export the predictor (Trainer::export_predictor), whose {what} runs with is_test = 1"
                )));
            }
            Ok(())
        };
        match t {
            "Conv" | "MaxPool" | "AveragePool" => {
                let global = a.int("global_pooling", 0)? != 0;
                if global {
                    let y = self.define(&out0);
                    let g = if t == "MaxPool" { "GlobalMaxPool" } else { "GlobalAveragePool" };
                    self.node(g, &inputs[..1], [y], vec![]);
                    return Ok(());
                }
                let w = Window::parse(op, true)?;
                let p = w.pad;
                let mut attrs = vec![
                    Attr::ints("kernel_shape", vec![w.kernel.0 as i64, w.kernel.1 as i64]),
                    Attr::ints("strides", vec![w.stride.0 as i64, w.stride.1 as i64]),
                    Attr::ints("pads", vec![p.0 as i64, p.1 as i64, p.2 as i64, p.3 as i64]),
                ];
                match t {
                    "Conv" => {
                        attrs.push(Attr::int("group", a.int("group", 1)?));
                        attrs.push(Attr::ints("dilations", vec![1, 1]));
                    }
                    // dpm and Caffe2 average over the window's unpadded part.
                    "AveragePool" => attrs.push(Attr::int("count_include_pad", 0)),
                    _ => {}
                }
                let n = if t == "Conv" { inputs.len() } else { 1 };
                let y = self.define(&out0);
                self.node(t, &inputs[..n], [y], attrs);
            }
            "SpatialBN" => {
                need_test("SpatialBN")?;
                if inputs.len() < 5 {
                    return Err(Error::Config("SpatialBN needs X, scale, bias, mean, var".into()));
                }
                let y = self.define(&out0);
                let eps = a.float("epsilon", 1e-5)?;
                self.node("BatchNormalization", &inputs[..5], [y], vec![Attr::float("epsilon", eps)]);
            }
            "Relu" | "Sigmoid" | "Tanh" => {
                let y = self.define(&out0);
                self.node(t, &inputs[..1], [y], vec![]);
            }
            "Copy" | "Dropout" => {
                if t == "Dropout" {
                    need_test("Dropout")?;
                }
                let y = self.define(&out0);
                self.node("Identity", &inputs[..1], [y], vec![]);
            }
            "Softmax" => {
                // Caffe2 takes the softmax of each row of X coerced to 2-D at
                // `axis`; ONNX's runs along one axis.
                let axis = a.usize("axis", 1)?;
                let rank = self.shape(&op.input[0])?.len();
                if axis + 1 == rank {
                    let y = self.define(&out0);
                    self.node("Softmax", [x], [y], vec![Attr::int("axis", axis as i64)]);
                } else {
                    let flat = self.fresh(&format!("{out0}_2d"));
                    let soft = self.fresh(&format!("{out0}_2d_softmax"));
                    let shape = self.fresh(&format!("{out0}_shape"));
                    self.node("Flatten", [x.clone()], [flat.clone()], vec![Attr::int("axis", axis as i64)]);
                    self.node("Softmax", [flat], [soft.clone()], vec![Attr::int("axis", 1)]);
                    self.node("Shape", [x], [shape.clone()], vec![]);
                    let y = self.define(&out0);
                    self.node("Reshape", [soft, shape], [y], vec![]);
                }
            }
            "FC" => {
                // Y = X·Wᵀ + b with X coerced to 2-D at axis 1.
                if a.usize("axis", 1)? != 1 || a.usize("axis_w", 1)? != 1 {
                    return Err(Error::Config("FC with axis or axis_w other than 1 has no conversion".into()));
                }
                let mut xs = inputs.clone();
                if self.shape(&op.input[0])?.len() != 2 {
                    let flat = self.fresh(&format!("{}_2d", op.input[0]));
                    self.node("Flatten", [x], [flat.clone()], vec![Attr::int("axis", 1)]);
                    xs[0] = flat;
                }
                let y = self.define(&out0);
                self.node("Gemm", &xs, [y], vec![Attr::int("transB", 1)]);
            }
            "Sum" | "Add" => {
                let y = self.define(&out0);
                let onnx = match inputs.len() {
                    1 => "Identity",
                    2 => "Add",
                    _ => "Sum",
                };
                self.node(onnx, &inputs, [y], vec![]);
            }
            "Mul" | "Sub" | "Div" => {
                // Caffe2's legacy broadcast aligns B at `axis` of A; ONNX aligns
                // the trailing dims, so B gets trailing 1s.
                let mut b = inputs.get(1).cloned().unwrap_or_default();
                if a.int("broadcast", 0)? != 0 {
                    let (ra, rb) = (self.shape(&op.input[0])?.len(), self.shape(&op.input[1])?.len());
                    let axis = match a.int("axis", -1)? {
                        -1 => ra.saturating_sub(rb),
                        v => v as usize,
                    };
                    let trailing = ra.saturating_sub(axis + rb);
                    if trailing > 0 {
                        let axes: Vec<i64> = (rb..rb + trailing).map(|d| d as i64).collect();
                        let axes = self.int64s(&format!("{out0}_axes"), &axes)?;
                        let u = self.fresh(&format!("{}_aligned", op.input[1]));
                        self.node("Unsqueeze", [b, axes], [u.clone()], vec![]);
                        b = u;
                    }
                }
                let y = self.define(&out0);
                self.node(t, [x, b], [y], vec![]);
            }
            "Scale" => {
                let s = Tensor::from_vec([], vec![a.float("scale", 1.0)?]).unwrap_or_else(|| Tensor::zeros::<f32>([]));
                let c = self.constant(&format!("{out0}_scale"), &s)?;
                let y = self.define(&out0);
                self.node("Mul", [x, c], [y], vec![]);
            }
            "Flatten" => {
                let y = self.define(&out0);
                self.node("Flatten", [x], [y], vec![Attr::int("axis", a.int("axis", 1)?)]);
            }
            "Reshape" => {
                let dims = a
                    .ints("shape")
                    .ok_or_else(|| Error::Config("Reshape with its shape in a second input has no conversion".into()))?
                    .to_vec();
                let s = self.int64s(&format!("{out0}_shape"), &dims)?;
                let y = self.define(&out0);
                self.node("Reshape", [x, s], [y], vec![]);
            }
            "ResizeLike" => {
                let s = self.fresh(&format!("{out0}_shape"));
                self.node("Shape", &inputs[1..2], [s.clone()], vec![]);
                let y = self.define(&out0);
                self.node("Reshape", [x, s], [y], vec![]);
            }
            "Concat" => {
                if a.int("add_axis", 0)? != 0 {
                    return Err(Error::Config("Concat with add_axis has no conversion".into()));
                }
                let y = self.define(&out0);
                self.node("Concat", &inputs, [y], vec![Attr::int("axis", a.int("axis", 1)?)]);
            }
            "Split" => {
                let mut ins = vec![x];
                if let Some(sizes) = a.ints("split") {
                    let sizes = sizes.to_vec();
                    ins.push(self.int64s(&format!("{out0}_split"), &sizes)?);
                }
                let ys: Vec<String> = op.output.iter().map(|o| self.define(o)).collect();
                self.node("Split", &ins, &ys, vec![Attr::int("axis", a.int("axis", 1)?)]);
            }
            "Transpose" => {
                let attrs = a.ints("axes").map(|v| vec![Attr::ints("perm", v.to_vec())]).unwrap_or_default();
                let y = self.define(&out0);
                self.node("Transpose", [x], [y], attrs);
            }
            "MatMul" => {
                let (ra, rb) = (self.shape(&op.input[0])?.len(), self.shape(&op.input[1])?.len());
                if ra != 2 || rb != 2 {
                    return Err(Error::Config("MatMul of inputs other than matrices has no conversion".into()));
                }
                let attrs = vec![Attr::int("transA", a.int("trans_a", 0)?), Attr::int("transB", a.int("trans_b", 0)?)];
                let y = self.define(&out0);
                self.node("Gemm", &inputs[..2], [y], attrs);
            }
            "BatchMatMul" => {
                let mut ab = Vec::new();
                for (k, flag) in [(0, "trans_a"), (1, "trans_b")] {
                    if a.int(flag, 0)? == 0 {
                        ab.push(inputs[k].clone());
                        continue;
                    }
                    let r = self.shape(&op.input[k])?.len() as i64;
                    let mut perm: Vec<i64> = (0..r).collect();
                    perm.swap(r as usize - 1, r as usize - 2);
                    let tr = self.fresh(&format!("{}_t", op.input[k]));
                    self.node("Transpose", &inputs[k..=k], [tr.clone()], vec![Attr::ints("perm", perm)]);
                    ab.push(tr);
                }
                let y = self.define(&out0);
                self.node("MatMul", &ab, [y], vec![]);
            }
            "LayerNorm" => {
                let axis = a.usize("axis", 1)?;
                if axis == 0 {
                    return Err(Error::Config("LayerNorm over the batch (axis 0) has no conversion".into()));
                }
                let feat: Vec<usize> = self.shape(&op.input[0])?[axis..].to_vec();
                let n: usize = feat.iter().product();
                let ones = Tensor::from_vec(feat, vec![1.0f32; n]).unwrap_or_else(|| Tensor::zeros::<f32>([]));
                let scale = self.constant(&format!("{out0}_ones"), &ones)?;
                let y = self.define(&out0);
                let attrs = vec![Attr::int("axis", axis as i64), Attr::float("epsilon", a.float("epsilon", 1e-5)?)];
                self.node("LayerNormalization", [x, scale], [y], attrs);
            }
            "Gather" => {
                let y = self.define(&out0);
                self.node("Gather", &inputs[..2], [y], vec![Attr::int("axis", 0)]);
            }
            other => {
                return Err(Error::Config(format!(
                    "no ONNX conversion for Caffe2 op `{other}` (op #{i}); deploy with the Caffe2 predictor (Trainer::export_caffe2) instead"
                )))
            }
        }
        Ok(())
    }
}

/// Reads an ONNX model file (for checks and tools).
pub fn read_model(path: impl AsRef<Path>) -> Result<ModelProto> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    ModelProto::from_bytes(&bytes)
}
