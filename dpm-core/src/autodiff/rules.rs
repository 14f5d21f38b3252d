//! Every gradient rule, in one place. A rule sees the forward op, the gradients
//! of its outputs, which inputs need a gradient, and the name proposed for each
//! input's gradient; it returns the ops to append and, per input, the blob that
//! holds its gradient (the proposed name, or an existing blob it aliases).

use crate::error::{Error, Result};
use crate::ops::{Differentiability, OpSchema, Registry};
use crate::proto::{Argument, OperatorDef};

/// What a gradient rule sees: the forward op, the gradients of its outputs,
/// which inputs need a gradient, and the name proposed for each input's gradient.
pub struct GradientContext<'a> {
    pub(super) op: &'a OperatorDef,
    pub(super) g_out: &'a [Option<String>],
    pub(super) need: &'a [bool],
    pub(super) gi: &'a [String],
}

/// What a gradient rule returns: the ops to append, and per input the blob that
/// holds its gradient (the proposed name, an existing blob it aliases, or `None`).
pub struct GradientOps {
    /// Gradient ops, in order; dpm puts them on the forward op's device.
    pub ops: Vec<OperatorDef>,
    /// Per input of the forward op, the blob holding its gradient.
    pub g_in: Vec<Option<String>>,
}

/// A gradient rule: the backward of one op type (see [`crate::ops::OpSchema::gradient`]).
pub type GradientRule = fn(&GradientContext<'_>) -> Result<GradientOps>;

type GradCtx<'a> = GradientContext<'a>;
type GradOps = GradientOps;

/// Registers every built-in gradient rule, and the ops through which no gradient
/// flows. One line per op type.
pub(crate) fn register(r: &mut Registry) {
    for (op, rule) in [
        ("FC", fc as GradientRule),
        ("Conv", conv),
        ("SpatialBN", spatial_bn),
        ("MaxPool", max_pool),
        ("AveragePool", average_pool),
        ("Flatten", reshape),
        ("Reshape", reshape),
        ("Relu", relu),
        ("Sum", pass_through),
        ("Add", pass_through),
        ("Copy", pass_through),
        ("Scale", scale),
        ("SoftmaxWithLoss", softmax_with_loss),
        ("Sigmoid", from_output),
        ("Tanh", from_output),
        ("Softmax", from_output),
        ("Mul", binary),
        ("Sub", binary),
        ("Div", binary),
        ("Dropout", dropout),
        ("MatMul", matmul),
        ("BatchMatMul", matmul),
        ("Transpose", transpose),
        ("SquaredL2Distance", binary_loss),
        ("L1Distance", binary_loss),
        ("LabelCrossEntropy", label_cross_entropy),
        ("AveragedLoss", averaged_loss),
        ("Concat", concat),
        ("Split", split),
        ("LayerNorm", layer_norm),
        ("Gather", gather),
    ] {
        r.add(OpSchema::new(op).gradient(rule));
    }
    r.add(OpSchema::new("SpatialBN").non_differentiable_outputs(&[1, 2, 3, 4]));
    r.add(OpSchema::new("Dropout").non_differentiable_outputs(&[1]));
    r.add(OpSchema::new("Concat").non_differentiable_outputs(&[1]));
    r.add(OpSchema::new("LayerNorm").non_differentiable_outputs(&[1, 2]));
    for op in [
        "ConstantFill",
        "GivenTensorFill",
        "GivenTensorIntFill",
        "GivenTensorInt64Fill",
        "GivenTensorBoolFill",
        "GaussianFill",
        "UniformFill",
        "XavierFill",
        "MSRAFill",
        "Accuracy",
        "StopGradient",
        "Iter",
        "LearningRate",
        "MomentumSGDUpdate",
        "Adam",
        "RmsProp",
        "Adagrad",
    ] {
        r.add(OpSchema::new(op).not_differentiable());
    }
}

/// Whether gradients flow through `op_type` (unregistered types: yes).
pub fn is_differentiable(op_type: &str) -> bool {
    !matches!(
        Registry::global()
            .schema(op_type)
            .map(OpSchema::differentiability),
        Some(Differentiability::None)
    )
}

/// Outputs of an otherwise differentiable op that carry no gradient (statistics).
pub fn non_differentiable_outputs(op_type: &str) -> Vec<usize> {
    Registry::global()
        .schema(op_type)
        .map(|s| s.nondifferentiable_outputs().to_vec())
        .unwrap_or_default()
}

pub(super) fn rule(op_type: &str) -> Option<GradientRule> {
    match Registry::global().schema(op_type)?.differentiability() {
        Differentiability::Rule(r) => Some(r),
        _ => None,
    }
}

impl GradientContext<'_> {
    /// The forward op.
    pub fn forward_op(&self) -> &OperatorDef {
        self.op
    }

    /// Whether input `i` needs a gradient.
    pub fn needs(&self, i: usize) -> bool {
        self.need.get(i).copied().unwrap_or(false)
    }

    /// The name proposed for input `i`'s gradient.
    pub fn gradient_name(&self, i: usize) -> String {
        self.gi[i].clone()
    }

    /// The forward op's input `i`.
    pub fn input(&self, i: usize) -> String {
        self.op.input[i].clone()
    }

    /// The forward op's output `o`.
    pub fn output(&self, o: usize) -> String {
        self.op.output[o].clone()
    }

    /// The gradient of output `o`, required by the rule.
    pub fn g_out(&self, o: usize) -> Result<String> {
        self.g_out.get(o).cloned().flatten().ok_or_else(|| {
            Error::Autodiff(format!(
                "`{}` needs the gradient of its output #{o}",
                self.op.op_type()
            ))
        })
    }

    /// The forward op's arguments called one of `names` (to pass on).
    pub fn args(&self, names: &[&str]) -> Vec<Argument> {
        self.op
            .arg
            .iter()
            .filter(|a| names.contains(&a.name.as_deref().unwrap_or("")))
            .cloned()
            .collect()
    }

    /// A gradient op of type `op_type`.
    pub fn op(
        &self,
        op_type: &str,
        inputs: Vec<String>,
        outputs: Vec<String>,
        args: Vec<Argument>,
    ) -> OperatorDef {
        OperatorDef {
            r#type: Some(op_type.to_owned()),
            input: inputs,
            output: outputs,
            arg: args,
            ..Default::default()
        }
    }

    /// The proposed names where needed, `None` elsewhere.
    pub fn g_in_needed(&self) -> Vec<Option<String>> {
        self.gi
            .iter()
            .zip(self.need)
            .map(|(g, &n)| n.then(|| g.clone()))
            .collect()
    }

    /// A rule's result of one op writing the proposed gradient names.
    pub fn one(&self, op: OperatorDef) -> GradOps {
        GradOps {
            ops: vec![op],
            g_in: self.g_in_needed(),
        }
    }
}

/// `FC(X, W[, b])` → `FCGradient(X, W, dY) → (dW, db[, dX])`.
fn fc(c: &GradCtx<'_>) -> Result<GradOps> {
    let dy = c.g_out(0)?;
    let db = if c.op.input.len() > 2 {
        c.gi[2].clone()
    } else {
        format!("{dy}_fc_db_unused")
    };
    let mut outs = vec![c.gi[1].clone(), db];
    if c.need[0] {
        outs.push(c.gi[0].clone());
    }
    let op = c.op(
        "FCGradient",
        vec![c.input(0), c.input(1), dy],
        outs,
        c.args(&["axis"]),
    );
    Ok(c.one(op))
}

/// `Relu(X) → Y` → `ReluGradient(Y, dY) → dX`.
fn relu(c: &GradCtx<'_>) -> Result<GradOps> {
    let op = c.op(
        "ReluGradient",
        vec![c.output(0), c.g_out(0)?],
        vec![c.gi[0].clone()],
        vec![],
    );
    Ok(c.one(op))
}

/// `Sum`, `Add`, `Copy`: every input's gradient is the output's gradient, shared.
fn pass_through(c: &GradCtx<'_>) -> Result<GradOps> {
    let dy = c.g_out(0)?;
    Ok(GradOps {
        ops: vec![],
        g_in: c.need.iter().map(|&n| n.then(|| dy.clone())).collect(),
    })
}

/// `Scale(X) → s·X` → `Scale(dY) → s·dY`.
fn scale(c: &GradCtx<'_>) -> Result<GradOps> {
    let op = c.op(
        "Scale",
        vec![c.g_out(0)?],
        vec![c.gi[0].clone()],
        c.args(&["scale"]),
    );
    Ok(c.one(op))
}

/// `SoftmaxWithLoss(X, label) → (P, loss)` →
/// `SoftmaxWithLossGradient(X, label, P, dLoss) → dX`.
fn softmax_with_loss(c: &GradCtx<'_>) -> Result<GradOps> {
    if c.g_out[0].is_some() {
        return Err(Error::Autodiff(format!(
            "the softmax output `{}` of SoftmaxWithLoss is used on the way to a loss; \
             only its loss output can be differentiated",
            c.output(0)
        )));
    }
    let op = c.op(
        "SoftmaxWithLossGradient",
        vec![c.input(0), c.input(1), c.output(0), c.g_out(1)?],
        vec![c.gi[0].clone()],
        vec![],
    );
    Ok(GradOps {
        ops: vec![op],
        g_in: vec![c.need[0].then(|| c.gi[0].clone()), None],
    })
}

/// `Conv(X, W[, b])` → `ConvGradient(X, W, dY) → (dW[, db][, dX])`.
fn conv(c: &GradCtx<'_>) -> Result<GradOps> {
    let bias = c.op.input.len() > 2;
    let mut outs = vec![c.gi[1].clone()];
    if bias {
        outs.push(c.gi[2].clone());
    }
    if c.need[0] {
        outs.push(c.gi[0].clone());
    }
    let mut args = c.op.arg.clone();
    args.retain(|a| a.name.as_deref() != Some("no_bias"));
    args.push(crate::graph::ArgValue::Int((!bias).into()).to_proto("no_bias"));
    let op = c.op(
        "ConvGradient",
        vec![c.input(0), c.input(1), c.g_out(0)?],
        outs,
        args,
    );
    Ok(c.one(op))
}

/// `SpatialBN(X, scale, bias, rm, rv) → (Y, rm, rv, saved_mean, saved_inv_std)` →
/// `SpatialBNGradient(X, scale, dY, saved_mean, saved_inv_std) → (dX, dscale, dbias)`;
/// in inference mode the running statistics stand in for the saved ones.
fn spatial_bn(c: &GradCtx<'_>) -> Result<GradOps> {
    let is_test = c.op.output.len() == 1;
    let (mean, stat) = if is_test {
        (c.input(3), c.input(4))
    } else {
        (c.output(3), c.output(4))
    };
    let dx = if c.need[0] {
        c.gi[0].clone()
    } else {
        format!("{}_unused", c.gi[0])
    };
    let op = c.op(
        "SpatialBNGradient",
        vec![c.input(0), c.input(1), c.g_out(0)?, mean, stat],
        vec![dx, c.gi[1].clone(), c.gi[2].clone()],
        c.args(&["is_test", "epsilon", "order"]),
    );
    let mut g_in = c.g_in_needed();
    g_in.truncate(3);
    Ok(GradOps { ops: vec![op], g_in })
}

fn pool(c: &GradCtx<'_>, grad_type: &str) -> Result<GradOps> {
    let op = c.op(
        grad_type,
        vec![c.input(0), c.output(0), c.g_out(0)?],
        vec![c.gi[0].clone()],
        c.op.arg.clone(),
    );
    Ok(c.one(op))
}

/// `MaxPool(X) → Y` → `MaxPoolGradient(X, Y, dY) → dX`.
fn max_pool(c: &GradCtx<'_>) -> Result<GradOps> {
    pool(c, "MaxPoolGradient")
}

/// `AveragePool(X) → Y` → `AveragePoolGradient(X, Y, dY) → dX`.
fn average_pool(c: &GradCtx<'_>) -> Result<GradOps> {
    pool(c, "AveragePoolGradient")
}

/// `Flatten`/`Reshape(X) → Y` → `ResizeLike(dY, X) → dX` (Caffe2's Flatten gradient).
fn reshape(c: &GradCtx<'_>) -> Result<GradOps> {
    let op = c.op(
        "ResizeLike",
        vec![c.g_out(0)?, c.input(0)],
        vec![c.gi[0].clone()],
        vec![],
    );
    Ok(c.one(op))
}

/// `Sigmoid`, `Tanh`, `Softmax`: `XGradient(Y, dY) → dX`, from the output.
fn from_output(c: &GradCtx<'_>) -> Result<GradOps> {
    let op = c.op(
        &format!("{}Gradient", c.op.op_type()),
        vec![c.output(0), c.g_out(0)?],
        vec![c.gi[0].clone()],
        c.args(&["axis"]),
    );
    Ok(c.one(op))
}

/// `Mul`, `Sub`, `Div(A, B) → C` → `XGradient(dC, A, B) → (dA, dB)`.
fn binary(c: &GradCtx<'_>) -> Result<GradOps> {
    let outs = (0..2)
        .map(|i| {
            if c.need[i] {
                c.gi[i].clone()
            } else {
                format!("{}_unused", c.gi[i])
            }
        })
        .collect();
    let op = c.op(
        &format!("{}Gradient", c.op.op_type()),
        vec![c.g_out(0)?, c.input(0), c.input(1)],
        outs,
        c.args(&["broadcast", "axis"]),
    );
    Ok(c.one(op))
}

/// `Dropout(X) → (Y, mask)` → `DropoutGradient(dY, mask) → dX`.
fn dropout(c: &GradCtx<'_>) -> Result<GradOps> {
    if c.op.output.len() < 2 {
        return Err(Error::Autodiff(
            "Dropout needs its mask output to be differentiated: give it two outputs".into(),
        ));
    }
    let op = c.op(
        "DropoutGradient",
        vec![c.g_out(0)?, c.output(1)],
        vec![c.gi[0].clone()],
        // Caffe2's DropoutGradient reads the forward op's arguments.
        c.args(&["ratio", "is_test"]),
    );
    Ok(c.one(op))
}

/// `MatMul(A, B) → C`: `dA = dC·op(B)ᵀ` and `dB = op(A)ᵀ·dC`, as MatMuls (with the
/// transposes each needs so dA and dB come out in A's and B's layouts).
fn matmul(c: &GradCtx<'_>) -> Result<GradOps> {
    let a = crate::graph::Args(&c.op.arg);
    let (ta, tb) = (a.int("trans_a", 0)? != 0, a.int("trans_b", 0)? != 0);
    let dc = c.g_out(0)?;
    let mm = |x: String, y: String, out: String, t1: bool, t2: bool| {
        // The same per matrix of a batch: BatchMatMul differentiates into itself.
        let mut op = c.op(c.op.op_type(), vec![x, y], vec![out], vec![]);
        op.arg
            .push(crate::graph::ArgValue::Int(i64::from(t1)).to_proto("trans_a"));
        op.arg
            .push(crate::graph::ArgValue::Int(i64::from(t2)).to_proto("trans_b"));
        op
    };
    let mut ops = Vec::new();
    if c.need[0] {
        // A = op⁻¹: C = A·B ⇒ dA = dC·Bᵀ; with trans_a, dA = (dC·op(B)ᵀ)ᵀ = op(B)·dCᵀ.
        ops.push(if ta {
            mm(c.input(1), dc.clone(), c.gi[0].clone(), tb, true)
        } else {
            mm(dc.clone(), c.input(1), c.gi[0].clone(), false, !tb)
        });
    }
    if c.need[1] {
        // dB = op(A)ᵀ·dC; with trans_b, dB = dCᵀ·op(A).
        ops.push(if tb {
            mm(dc.clone(), c.input(0), c.gi[1].clone(), true, ta)
        } else {
            mm(c.input(0), dc.clone(), c.gi[1].clone(), !ta, false)
        });
    }
    Ok(GradOps {
        ops,
        g_in: c.g_in_needed(),
    })
}

/// `Transpose(X; axes) → Y` → `Transpose(dY; axes⁻¹) → dX`.
fn transpose(c: &GradCtx<'_>) -> Result<GradOps> {
    let mut op = c.op("Transpose", vec![c.g_out(0)?], vec![c.gi[0].clone()], vec![]);
    if let Some(axes) = crate::graph::Args(&c.op.arg).ints("axes") {
        let mut inverse = vec![0i64; axes.len()];
        for (i, &a) in axes.iter().enumerate() {
            let a = usize::try_from(a)
                .ok()
                .filter(|&a| a < axes.len())
                .ok_or_else(|| Error::Autodiff(format!("Transpose axes {axes:?} are not a permutation")))?;
            inverse[a] = i as i64;
        }
        op.arg
            .push(crate::graph::ArgValue::Ints(inverse).to_proto("axes"));
    }
    Ok(c.one(op))
}

/// `SquaredL2Distance` / `L1Distance(X, Y) → D` → `XGradient(X, Y, dD) → (dX, dY)`.
fn binary_loss(c: &GradCtx<'_>) -> Result<GradOps> {
    let outs = (0..2)
        .map(|i| {
            if c.need[i] {
                c.gi[i].clone()
            } else {
                format!("{}_unused", c.gi[i])
            }
        })
        .collect();
    let op = c.op(
        &format!("{}Gradient", c.op.op_type()),
        vec![c.input(0), c.input(1), c.g_out(0)?],
        outs,
        vec![],
    );
    Ok(c.one(op))
}

/// `LabelCrossEntropy(X, label) → Y` → `LabelCrossEntropyGradient(X, label, dY) → dX`.
fn label_cross_entropy(c: &GradCtx<'_>) -> Result<GradOps> {
    let op = c.op(
        "LabelCrossEntropyGradient",
        vec![c.input(0), c.input(1), c.g_out(0)?],
        vec![c.gi[0].clone()],
        vec![],
    );
    Ok(c.one(op))
}

/// `AveragedLoss(X) → Y` → `AveragedLossGradient(X, dY) → dX`.
fn averaged_loss(c: &GradCtx<'_>) -> Result<GradOps> {
    let op = c.op(
        "AveragedLossGradient",
        vec![c.input(0), c.g_out(0)?],
        vec![c.gi[0].clone()],
        vec![],
    );
    Ok(c.one(op))
}

/// `Concat(X0, …) → (Y, split_info)` → `Split(dY, split_info) → (dX0, …)`.
fn concat(c: &GradCtx<'_>) -> Result<GradOps> {
    if c.op.output.len() < 2 {
        return Err(Error::Autodiff(
            "Concat needs its split_info output to be differentiated: give it two outputs".into(),
        ));
    }
    let outs = (0..c.op.input.len())
        .map(|i| {
            if c.need[i] {
                c.gi[i].clone()
            } else {
                format!("{}_unused", c.gi[i])
            }
        })
        .collect();
    let op = c.op("Split", vec![c.g_out(0)?, c.output(1)], outs, c.args(&["axis"]));
    Ok(c.one(op))
}

/// `Split(X) → (Y0, …)` → `Concat(dY0, …) → dX` (every output needs a gradient).
fn split(c: &GradCtx<'_>) -> Result<GradOps> {
    let dys = (0..c.op.output.len())
        .map(|o| c.g_out(o))
        .collect::<Result<Vec<_>>>()?;
    let info = format!("{}_split_info", c.gi[0]);
    let op = c.op("Concat", dys, vec![c.gi[0].clone(), info], c.args(&["axis"]));
    let mut g_in = c.g_in_needed();
    g_in.truncate(1);
    g_in.resize(c.op.input.len(), None);
    Ok(GradOps { ops: vec![op], g_in })
}

/// `LayerNorm(X) → (Y, mean, std)` → `LayerNormGradient(dY, Y, mean, std, X) → dX`.
fn layer_norm(c: &GradCtx<'_>) -> Result<GradOps> {
    let op = c.op(
        "LayerNormGradient",
        vec![c.g_out(0)?, c.output(0), c.output(1), c.output(2), c.input(0)],
        vec![c.gi[0].clone()],
        c.args(&["axis", "epsilon"]),
    );
    Ok(c.one(op))
}

/// `Gather(DATA, INDICES) → Y` → `GatherGradient(DATA, INDICES, dY) → dDATA`, dense.
fn gather(c: &GradCtx<'_>) -> Result<GradOps> {
    let op = c.op(
        "GatherGradient",
        vec![c.input(0), c.input(1), c.g_out(0)?],
        vec![c.gi[0].clone()],
        vec![],
    );
    let mut g_in = c.g_in_needed();
    g_in.truncate(1);
    g_in.resize(c.op.input.len(), None);
    Ok(GradOps { ops: vec![op], g_in })
}
