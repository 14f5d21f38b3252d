//! [`Trainer::summary`]: the table PyTorch users get from torchinfo — each
//! layer of the forward pass with its output shape, parameters and FLOPs per
//! sample, and the totals.
//!
//! The shapes come from running the model's predictor
//! ([`Trainer::export_predictor`]) once on one sample, so they are what the
//! kernels compute, not a separate shape inference that could disagree.

use std::collections::HashSet;
use std::fmt;

use super::Trainer;
use crate::deploy::Predictor;
use crate::error::Result;
use crate::tensor::Tensor;

/// One op of the forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSummary {
    /// The op's first output (the layer's name in the helpers' naming).
    pub name: String,
    /// Op type (`Conv`, `FC`, …).
    pub op_type: String,
    /// Shape of that output for one sample (without the batch dimension).
    pub output_shape: Vec<usize>,
    /// Parameters the op reads first (shared ones count once), with shapes.
    pub params: Vec<(String, Vec<usize>)>,
    /// Their elements.
    pub param_count: usize,
    /// Floating-point operations per sample: 2 × the multiply-accumulates of
    /// `Conv`, `FC`, `MatMul` and `BatchMatMul`; 0 for other ops.
    pub flops: u64,
}

/// A model at a glance ([`Trainer::summary`]); `Display` prints the table.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSummary {
    /// The model's name.
    pub model: String,
    /// The inputs a caller feeds, with their per-sample shapes.
    pub inputs: Vec<(String, Vec<usize>)>,
    /// Every op of the forward pass (inference form), in order.
    pub layers: Vec<LayerSummary>,
    /// Elements of the parameters the optimiser updates.
    pub trainable: usize,
    /// Elements of the other parameters (batch-norm running statistics).
    pub non_trainable: usize,
    /// Forward FLOPs per sample, summed over the layers.
    pub flops_per_sample: u64,
}

impl Trainer {
    /// The model's layers, parameter counts, output shapes and FLOPs per
    /// sample, from the master replica (its current parameters); the inputs'
    /// shapes are the last batch's, or those declared with
    /// `DeviceModel::input_with_shape`.
    ///
    /// ```no_run
    /// # fn f(trainer: &dpm_core::parallel::Trainer) -> dpm_core::Result<()> {
    /// println!("{}", trainer.summary()?);
    /// # Ok(()) }
    /// ```
    pub fn summary(&self) -> Result<ModelSummary> {
        let (init, predict) = self.export_predictor()?;
        let inputs = self.predictor_inputs(&init, &predict)?;
        let one: Vec<(&str, Tensor)> = inputs
            .iter()
            .map(|(n, t)| (n.as_str(), crate::deploy::zeros_like(t, 1)))
            .collect();
        let p = Predictor::new(&init, &predict)?;
        p.run(&one)?;
        let ws = p.workspace();
        let params: HashSet<&String> = init.external_output.iter().collect();
        let trained: HashSet<&str> = self.param_groups().iter().map(|g| g.name.as_str()).collect();
        let mut seen = HashSet::new();
        let mut s = ModelSummary {
            model: self.model().name().to_owned(),
            inputs: one
                .iter()
                .map(|(n, t)| (n.to_string(), t.dims()[1..].to_vec()))
                .collect(),
            layers: Vec::new(),
            trainable: 0,
            non_trainable: 0,
            flops_per_sample: 0,
        };
        for op in &predict.op {
            let Some(out) = op.output.first() else { continue };
            let y = ws.fetch(out)?;
            let mut layer = LayerSummary {
                name: out.clone(),
                op_type: op.op_type().to_owned(),
                output_shape: y.dims().get(1..).unwrap_or_default().to_vec(),
                params: Vec::new(),
                param_count: 0,
                flops: 0,
            };
            for i in op.input.iter().filter(|i| params.contains(i)) {
                if !seen.insert(i.clone()) {
                    continue;
                }
                let t = ws.fetch(i)?;
                layer.param_count += t.numel();
                if trained.contains(i.as_str()) {
                    s.trainable += t.numel();
                } else {
                    s.non_trainable += t.numel();
                }
                layer.params.push((i.clone(), t.dims().to_vec()));
            }
            let numel = |b: &String| ws.fetch(b).map(|t| t.numel() as u64).unwrap_or(0);
            let dims = |b: &String| ws.fetch(b).map(|t| t.dims().to_vec()).unwrap_or_default();
            layer.flops = match op.op_type() {
                // Each output element: one multiply-accumulate per weight of its filter.
                "Conv" => {
                    let w = dims(&op.input[1]);
                    let per_out: u64 = w.iter().skip(1).map(|&d| d as u64).product();
                    2 * y.numel() as u64 * per_out
                }
                // One sample: one multiply-accumulate per weight.
                "FC" => 2 * numel(&op.input[1]),
                // Each output element: the inner dimension's worth.
                "MatMul" | "BatchMatMul" => {
                    let a = dims(&op.input[0]);
                    let trans = op.find_arg("trans_a").and_then(|a| a.i).unwrap_or(0) != 0;
                    let r = a.len();
                    let k = if r < 2 {
                        1
                    } else if trans {
                        a[r - 2]
                    } else {
                        a[r - 1]
                    };
                    2 * y.numel() as u64 * k as u64
                }
                _ => 0,
            };
            s.flops_per_sample += layer.flops;
            s.layers.push(layer);
        }
        Ok(s)
    }
}

/// `1234567` → `1.23 M`.
fn si(v: u64) -> String {
    match v {
        0..1_000 => v.to_string(),
        1_000..1_000_000 => format!("{:.2} K", v as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2} M", v as f64 / 1e6),
        _ => format!("{:.2} G", v as f64 / 1e9),
    }
}

fn shape(d: &[usize]) -> String {
    let v: Vec<String> = d.iter().map(ToString::to_string).collect();
    format!("[{}]", v.join(", "))
}

fn grouped(v: usize) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.layers.iter().map(|l| l.name.len()).max().unwrap_or(5).max(5);
        writeln!(f, "{}", self.model)?;
        writeln!(
            f,
            "{:<w$}  {:<18}  {:<16}  {:>10}  {:>10}",
            "Layer", "Type", "Output / sample", "Params", "FLOPs"
        )?;
        writeln!(f, "{}", "─".repeat(w + 62))?;
        for l in &self.layers {
            let params = if l.param_count > 0 {
                grouped(l.param_count)
            } else {
                String::new()
            };
            let flops = if l.flops > 0 { si(l.flops) } else { String::new() };
            let line = format!(
                "{:<w$}  {:<18}  {:<16}  {params:>10}  {flops:>10}",
                l.name,
                l.op_type,
                shape(&l.output_shape)
            );
            writeln!(f, "{}", line.trim_end())?;
        }
        writeln!(f, "{}", "─".repeat(w + 62))?;
        let inputs: Vec<String> = self
            .inputs
            .iter()
            .map(|(n, d)| format!("{n} {}", shape(d)))
            .collect();
        writeln!(f, "Inputs per sample: {}", inputs.join(", "))?;
        let total = self.trainable + self.non_trainable;
        writeln!(
            f,
            "Parameters: {} ({:.2} MiB as f32): {} trained, {} running statistics",
            grouped(total),
            total as f64 * 4.0 / (1 << 20) as f64,
            grouped(self.trainable),
            grouped(self.non_trainable)
        )?;
        write!(
            f,
            "FLOPs per sample, forward: {} (Conv, FC, MatMul); a training step costs about 3× that",
            si(self.flops_per_sample)
        )
    }
}
