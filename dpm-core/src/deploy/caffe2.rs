//! Caffe2's predictor export ([`Trainer::export_predictor`], Caffe2's
//! `ExtractPredictorNet`): a forward-only `predict_net` with no device
//! prefixes, no loss and no accuracy, batch norm and dropout in inference mode,
//! ending in the softmax (or the scores); and an `init_net` of
//! `GivenTensorFill` ops holding the trained parameters and running statistics.

use std::collections::HashSet;
use std::path::Path;

use crate::error::{Error, Result};
use crate::graph::ArgValue;
use crate::parallel::Trainer;
use crate::proto::{NetDef, OperatorDef, Wire};
use crate::tensor::{DataType, Tensor};

impl Trainer {
    /// The trained model as a Caffe2 predictor: `(init_net, predict_net)`, from
    /// the master replica's forward pass and its current parameters.
    /// `predict_net` reads the model's inputs other than the labels
    /// (`external_input`: those, then the parameters) and gives
    /// `external_output`: the probabilities of each `SoftmaxWithLoss` (now a
    /// `Softmax`), or, without one, the scores a loss read.
    pub fn export_predictor(&self) -> Result<(NetDef, NetDef)> {
        let master = self.devices()[0];
        let prefix = format!("{}/", master.namescope());
        let train = self.model().net().proto();
        let predict = forward_only(train, &prefix, self.model().name())?;
        let mut init = NetDef {
            name: Some(format!("{}_init", self.model().name())),
            ..NetDef::default()
        };
        // The predict net's external inputs are what no op of it writes:
        // parameters (filled by the init net) and what the caller feeds.
        let mut inputs = Vec::new();
        for blob in predict.external_input.iter() {
            let full = format!("{prefix}{blob}");
            match self.workspace().fetch(&full) {
                Ok(t) if !is_fed(self, &full) => init.op.push(given_fill(blob, &t)?),
                _ => inputs.push(blob.clone()),
            }
        }
        init.external_output = init.op.iter().map(|o| o.output[0].clone()).collect();
        let mut predict = predict;
        // Caffe2 lists the inputs a caller feeds first, then the parameters.
        let params = init.external_output.clone();
        predict.external_input = inputs.into_iter().chain(params).collect();
        Ok((init, predict))
    }

    /// For each input the predictor's caller feeds, a batch whose per-sample
    /// shape is the input's: the master replica's last batch, or one zero
    /// sample of the shape declared with `input_with_shape`.
    pub(crate) fn predictor_inputs(&self, init: &NetDef, predict: &NetDef) -> Result<Vec<(String, Tensor)>> {
        let master = self.devices()[0];
        let params: HashSet<&String> = init.external_output.iter().collect();
        let mut out = Vec::new();
        for name in predict.external_input.iter().filter(|i| !params.contains(i)) {
            let full = format!("{}/{name}", master.namescope());
            let t = match self.workspace().fetch(&full) {
                Ok(t) => t.to_host()?,
                Err(_) => match self.model().input_shape(&full) {
                    Some(s) => {
                        let dims: Vec<usize> = std::iter::once(1).chain(s.dims().iter().copied()).collect();
                        Tensor::zeros::<f32>(dims)
                    }
                    None => {
                        return Err(Error::Config(format!(
                            "no `{name}` on {master} to tell the input's shape: run a step (or feed one batch) first, or declare it with input_with_shape"
                        )))
                    }
                },
            };
            out.push((name.clone(), t));
        }
        Ok(out)
    }

    /// Writes [`Trainer::export_predictor`]'s nets as `init_net.pb` and
    /// `predict_net.pb` in `dir` (created if needed), each file atomically.
    pub fn export_caffe2(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let (init, predict) = self.export_predictor()?;
        crate::checkpoint::write_atomically(&dir.join("init_net.pb"), &init.to_bytes())?;
        crate::checkpoint::write_atomically(&dir.join("predict_net.pb"), &predict.to_bytes())
    }
}

/// Whether `blob` is one the trainer feeds each step (an input, not a parameter).
fn is_fed(t: &Trainer, blob: &str) -> bool {
    let short = blob.rsplit('/').next().unwrap_or(blob);
    !t.param_groups()
        .iter()
        .chain(t.computed_param_groups())
        .any(|g| g.name == short)
}

/// A `GivenTensor*Fill` writing `t` into `name`.
fn given_fill(name: &str, t: &Tensor) -> Result<OperatorDef> {
    let t = t.to_host()?;
    let shape: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
    let (op_type, values) = match t.dtype() {
        DataType::F32 => (
            "GivenTensorFill",
            ArgValue::Floats(t.data::<f32>().unwrap_or_default().to_vec()),
        ),
        DataType::I32 => (
            "GivenTensorIntFill",
            ArgValue::Ints(
                t.data::<i32>()
                    .unwrap_or_default()
                    .iter()
                    .map(|&v| v.into())
                    .collect(),
            ),
        ),
        DataType::I64 => (
            "GivenTensorInt64Fill",
            ArgValue::Ints(t.data::<i64>().unwrap_or_default().to_vec()),
        ),
    };
    Ok(OperatorDef {
        r#type: Some(op_type.into()),
        output: vec![name.to_owned()],
        arg: vec![ArgValue::Ints(shape).to_proto("shape"), values.to_proto("values")],
        ..OperatorDef::default()
    })
}

/// The master replica's forward pass of `train` for inference, names without
/// `prefix`.
fn forward_only(train: &NetDef, prefix: &str, model: &str) -> Result<NetDef> {
    let strip = |b: &str| b.strip_prefix(prefix).unwrap_or(b).to_owned();
    let mine = |o: &OperatorDef| !o.output.is_empty() && o.output.iter().all(|b| b.starts_with(prefix));
    let end = train
        .op
        .iter()
        .position(|o| o.is_gradient_op == Some(true))
        .unwrap_or(train.op.len());
    let forward: Vec<&OperatorDef> = train.op[..end]
        .iter()
        // The loss scaling and other loss-side ops fall away below: nothing the
        // outputs need reads them.
        .filter(|o| mine(o))
        .collect();
    // Blobs that depend on the labels, and what the model predicts.
    let mut tainted: HashSet<String> = forward
        .iter()
        .filter(|o| {
            matches!(
                o.op_type(),
                "SoftmaxWithLoss" | "Accuracy" | "LabelCrossEntropy" | "SquaredL2Distance" | "L1Distance"
            )
        })
        .filter_map(|o| o.input.get(1).cloned())
        .collect();
    let mut kept: Vec<OperatorDef> = Vec::new();
    let mut outputs: Vec<String> = Vec::new();
    for o in forward {
        let mut op = o.clone();
        if op.op_type() == "SoftmaxWithLoss" {
            // The probabilities, without the loss.
            op.r#type = Some("Softmax".into());
            op.input.truncate(1);
            op.output.truncate(1);
            op.arg.retain(|a| a.name.as_deref() == Some("axis"));
            outputs.push(op.output[0].clone());
        } else if op.input.iter().any(|b| tainted.contains(b)) {
            if outputs.is_empty() && op.op_type() != "Accuracy" {
                if let Some(scores) = op.input.iter().find(|b| !tainted.contains(*b)) {
                    outputs.push(scores.clone());
                }
            }
            tainted.extend(op.output.iter().cloned());
            continue;
        }
        match op.op_type() {
            "SpatialBN" => {
                op.output.truncate(1);
                op.input.truncate(5);
                set_arg(&mut op, "is_test", ArgValue::Int(1));
                op.arg.retain(|a| a.name.as_deref() != Some("num_batches"));
            }
            "Dropout" => {
                op.output.truncate(1);
                set_arg(&mut op, "is_test", ArgValue::Int(1));
            }
            _ => {}
        }
        kept.push(op);
    }
    if outputs.is_empty() {
        return Err(Error::Config(
            "export_predictor: the forward pass has no SoftmaxWithLoss or other loss to tell its output"
                .into(),
        ));
    }
    // Only what the outputs need.
    let mut needed: HashSet<String> = outputs.iter().cloned().collect();
    let mut live = vec![false; kept.len()];
    for (i, op) in kept.iter().enumerate().rev() {
        if op.output.iter().any(|b| needed.contains(b)) {
            live[i] = true;
            needed.extend(op.input.iter().cloned());
        }
    }
    let mut net = NetDef {
        name: Some(format!("{model}_predict")),
        r#type: Some("simple".into()),
        ..NetDef::default()
    };
    for (op, _) in kept.into_iter().zip(live).filter(|(_, l)| *l) {
        let mut op = op;
        op.input = op.input.iter().map(|b| strip(b)).collect();
        op.output = op.output.iter().map(|b| strip(b)).collect();
        op.device_option = None;
        op.control_input.clear();
        op.engine = None;
        op.is_gradient_op = None;
        net.op.push(op);
    }
    let mut written = HashSet::new();
    for op in &net.op {
        for i in &op.input {
            if !written.contains(i) && !net.external_input.contains(i) {
                net.external_input.push(i.clone());
            }
        }
        written.extend(op.output.iter().cloned());
    }
    net.external_output = outputs.iter().map(|b| strip(b)).collect();
    Ok(net)
}

fn set_arg(op: &mut OperatorDef, name: &str, v: ArgValue) {
    op.arg.retain(|a| a.name.as_deref() != Some(name));
    op.arg.push(v.to_proto(name));
}
