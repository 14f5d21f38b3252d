//! Reverse-mode automatic differentiation over nets.
//!
//! [`add_gradient_ops`] walks the forward ops backwards and, for each op between a
//! parameter and a loss, appends the ops its gradient rule (`rules.rs`) produces.
//! A blob used by several ops gets one gradient contribution per use, summed into
//! `<blob>_grad` as soon as each arrives.

pub(crate) mod rules;

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::graph::{BlobRef, Net};
use crate::proto::OperatorDef;

pub use rules::{is_differentiable, GradientContext, GradientOps, GradientRule};

/// Parameter → gradient blob, in the order the gradients are complete during the
/// backward pass (the last layer's first).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GradientMap {
    entries: Vec<(BlobRef, BlobRef)>,
}

impl GradientMap {
    /// The gradient of `param`, if it has one.
    pub fn get(&self, param: &BlobRef) -> Option<&BlobRef> {
        self.entries.iter().find(|(p, _)| p == param).map(|(_, g)| g)
    }

    /// `(param, gradient)` pairs in the order the gradients become complete.
    pub fn iter(&self) -> impl Iterator<Item = (&BlobRef, &BlobRef)> {
        self.entries.iter().map(|(p, g)| (p, g))
    }

    /// Number of parameters with a gradient.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no parameter has a gradient.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Appends gradient ops for `losses` (each seeded with a gradient of 1.0) and
/// returns the gradients of the blobs in `wrt` (usually the parameters).
///
/// Errors: an op between a `wrt` blob and a loss with no gradient rule; a blob on
/// that path written by more than one op.
pub fn add_gradient_ops(net: &mut Net, losses: &[BlobRef], wrt: &[BlobRef]) -> Result<GradientMap> {
    let mut seeds = Vec::with_capacity(losses.len());
    for loss in losses {
        let producer = net
            .ops()
            .iter()
            .rev()
            .find(|op| op.output.iter().any(|o| o == loss.name()))
            .ok_or_else(|| Error::Autodiff(format!("loss `{loss}` is not produced by any op of the net")))?;
        let mut fill = gradient_op("ConstantFill", [loss.name()], [loss.grad().name()], producer);
        fill.is_gradient_op = None;
        fill.arg
            .push(crate::graph::ArgValue::Float(1.0).to_proto("value"));
        net.push(fill);
        seeds.push((loss.clone(), loss.grad()));
    }
    add_gradient_ops_seeded(net, &seeds, wrt)
}

/// Like [`add_gradient_ops`], with each `(blob, gradient)` seed's gradient blob
/// supplied by the caller instead of a fill of ones.
pub fn add_gradient_ops_seeded(
    net: &mut Net,
    seeds: &[(BlobRef, BlobRef)],
    wrt: &[BlobRef],
) -> Result<GradientMap> {
    let forward: Vec<OperatorDef> = net.ops().to_vec();
    let path = on_path(&forward, seeds, wrt)?;
    let mut grad_of: HashMap<String, String> = seeds
        .iter()
        .map(|(b, g)| (b.name().to_owned(), g.name().to_owned()))
        .collect();
    let mut splits = 0usize;
    let mut completed_at: HashMap<String, usize> = HashMap::new();
    for (index, op) in forward.iter().enumerate().rev() {
        if !path.ops.contains(&index) {
            continue;
        }
        let g_out: Vec<Option<String>> = op.output.iter().map(|o| grad_of.get(o).cloned()).collect();
        if g_out.iter().all(Option::is_none) {
            continue;
        }
        let need: Vec<bool> = op
            .input
            .iter()
            .map(|i| path.requires.contains(i.as_str()))
            .collect();
        let mut proposed = Vec::with_capacity(op.input.len());
        for (k, x) in op.input.iter().enumerate() {
            let taken = grad_of.contains_key(x) || op.input[..k].contains(x);
            proposed.push(if taken {
                splits += 1;
                format!("{x}_grad_autosplit_{splits}")
            } else {
                format!("{x}_grad")
            });
        }
        let rule = rules::rule(op.op_type()).ok_or_else(|| Error::NoGradient {
            index,
            op_type: op.op_type().to_owned(),
            output: op.output.first().cloned().unwrap_or_default(),
        })?;
        let made = rule(&rules::GradientContext {
            op,
            g_out: &g_out,
            need: &need,
            gi: &proposed,
        })
        .map_err(|e| Error::Op {
            index,
            op_type: op.op_type().to_owned(),
            name: op.name.clone().unwrap_or_default(),
            source: Box::new(e),
        })?;
        for mut g in made.ops {
            // As in Caffe2, a gradient op runs on its forward op's device and engine.
            g.device_option = op.device_option.clone();
            g.engine = op.engine.clone();
            g.is_gradient_op = Some(true);
            net.push(g);
        }
        for (k, g) in made.g_in.into_iter().enumerate() {
            let (Some(g), true) = (g, need[k]) else { continue };
            let x = &op.input[k];
            let total = match grad_of.get(x) {
                Some(cur) => {
                    let target = format!("{x}_grad");
                    net.push(gradient_op(
                        "Sum",
                        [cur.as_str(), g.as_str()],
                        [target.as_str()],
                        op,
                    ));
                    target
                }
                None => g,
            };
            grad_of.insert(x.clone(), total);
            completed_at.insert(x.clone(), net.ops().len());
        }
    }
    let mut entries: Vec<(usize, BlobRef, BlobRef)> = wrt
        .iter()
        .filter_map(|p| {
            let g = grad_of.get(p.name())?;
            Some((completed_at[p.name()], p.clone(), BlobRef::new(g.clone())))
        })
        .collect();
    entries.sort_by_key(|(at, _, _)| *at);
    Ok(GradientMap {
        entries: entries.into_iter().map(|(_, p, g)| (p, g)).collect(),
    })
}

/// Which ops lie between the `wrt` blobs and the seeded blobs.
struct Path<'a> {
    /// Blobs that depend on a `wrt` blob through differentiable ops.
    requires: HashSet<&'a str>,
    /// Indices of ops that carry gradient from a seed to a `wrt` blob.
    ops: HashSet<usize>,
}

fn on_path<'a>(
    ops: &'a [OperatorDef],
    seeds: &'a [(BlobRef, BlobRef)],
    wrt: &'a [BlobRef],
) -> Result<Path<'a>> {
    let mut requires: HashSet<&str> = wrt.iter().map(BlobRef::name).collect();
    for op in ops {
        if is_differentiable(op.op_type()) && op.input.iter().any(|i| requires.contains(i.as_str())) {
            let skip = rules::non_differentiable_outputs(op.op_type());
            let carrying = op.output.iter().enumerate().filter(|(i, _)| !skip.contains(i));
            requires.extend(carrying.map(|(_, o)| o.as_str()));
        }
    }
    let mut contributes: HashSet<&str> = seeds.iter().map(|(b, _)| b.name()).collect();
    let mut path = HashSet::new();
    for (i, op) in ops.iter().enumerate().rev() {
        let carries = op
            .output
            .iter()
            .any(|o| contributes.contains(o.as_str()) && requires.contains(o.as_str()));
        if carries {
            path.insert(i);
            contributes.extend(op.input.iter().map(String::as_str));
        }
    }
    let mut writers: HashMap<&str, usize> = HashMap::new();
    for op in ops {
        for o in &op.output {
            *writers.entry(o).or_default() += 1;
        }
    }
    for &i in &path {
        let skip = rules::non_differentiable_outputs(ops[i].op_type());
        for (_, o) in ops[i]
            .output
            .iter()
            .enumerate()
            .filter(|(k, _)| !skip.contains(k))
        {
            if writers[o.as_str()] > 1 || ops[i].input.contains(o) {
                return Err(Error::Autodiff(format!(
                    "blob `{o}` lies between a parameter and a loss but is written by more than one op \
                     (op #{i} `{}` writes it in place); give each op on that path a fresh output",
                    ops[i].op_type()
                )));
            }
        }
    }
    Ok(Path { requires, ops: path })
}

/// A gradient op on the device of `forward`.
fn gradient_op<'s>(
    op_type: &str,
    inputs: impl IntoIterator<Item = &'s str>,
    outputs: impl IntoIterator<Item = &'s str>,
    forward: &OperatorDef,
) -> OperatorDef {
    OperatorDef {
        r#type: Some(op_type.to_owned()),
        input: inputs.into_iter().map(str::to_owned).collect(),
        output: outputs.into_iter().map(str::to_owned).collect(),
        device_option: forward.device_option.clone(),
        is_gradient_op: Some(true),
        ..Default::default()
    }
}
