//! Every gradient rule, in one place. A rule sees the forward op, the gradients
//! of its outputs, which inputs need a gradient, and the name proposed for each
//! input's gradient; it returns the ops to append and, per input, the blob that
//! holds its gradient (the proposed name, or an existing blob it aliases).

use crate::error::{Error, Result};
use crate::proto::{Argument, OperatorDef};

pub(super) struct GradCtx<'a> {
    pub op: &'a OperatorDef,
    pub g_out: &'a [Option<String>],
    pub need: &'a [bool],
    pub gi: &'a [String],
}

pub(super) struct GradOps {
    pub ops: Vec<OperatorDef>,
    pub g_in: Vec<Option<String>>,
}

type Rule = fn(&GradCtx<'_>) -> Result<GradOps>;

/// Ops whose outputs never carry gradient: fills, metrics, counters, updates.
pub fn is_differentiable(op_type: &str) -> bool {
    !matches!(
        op_type,
        "ConstantFill"
            | "GaussianFill"
            | "UniformFill"
            | "XavierFill"
            | "MSRAFill"
            | "Accuracy"
            | "StopGradient"
            | "Iter"
            | "LearningRate"
            | "MomentumSGDUpdate"
    )
}

/// Outputs of an otherwise differentiable op that carry no gradient (statistics).
pub fn non_differentiable_outputs(op_type: &str) -> &'static [usize] {
    match op_type {
        "SpatialBN" => &[1, 2, 3, 4],
        _ => &[],
    }
}

pub(super) fn rule(op_type: &str) -> Option<Rule> {
    Some(match op_type {
        "FC" => fc,
        "Conv" => conv,
        "SpatialBN" => spatial_bn,
        "MaxPool" => max_pool,
        "AveragePool" => average_pool,
        "Flatten" | "Reshape" => reshape,
        "Relu" => relu,
        "Sum" | "Add" | "Copy" => pass_through,
        "Scale" => scale,
        "SoftmaxWithLoss" => softmax_with_loss,
        _ => return None,
    })
}

impl GradCtx<'_> {
    fn input(&self, i: usize) -> String {
        self.op.input[i].clone()
    }

    fn output(&self, o: usize) -> String {
        self.op.output[o].clone()
    }

    /// The gradient of output `o`, required by the rule.
    fn g_out(&self, o: usize) -> Result<String> {
        self.g_out.get(o).cloned().flatten().ok_or_else(|| {
            Error::Autodiff(format!(
                "`{}` needs the gradient of its output #{o}",
                self.op.op_type()
            ))
        })
    }

    fn args(&self, names: &[&str]) -> Vec<Argument> {
        self.op
            .arg
            .iter()
            .filter(|a| names.contains(&a.name.as_deref().unwrap_or("")))
            .cloned()
            .collect()
    }

    /// A gradient op writing the proposed names of `inputs_needed` (and scratch for
    /// gradients nobody asked for).
    fn op(
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
    fn g_in_needed(&self) -> Vec<Option<String>> {
        self.gi
            .iter()
            .zip(self.need)
            .map(|(g, &n)| n.then(|| g.clone()))
            .collect()
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
    Ok(GradOps {
        ops: vec![op],
        g_in: c.g_in_needed(),
    })
}

/// `Relu(X) → Y` → `ReluGradient(Y, dY) → dX`.
fn relu(c: &GradCtx<'_>) -> Result<GradOps> {
    let op = c.op(
        "ReluGradient",
        vec![c.output(0), c.g_out(0)?],
        vec![c.gi[0].clone()],
        vec![],
    );
    Ok(GradOps {
        ops: vec![op],
        g_in: c.g_in_needed(),
    })
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
    Ok(GradOps {
        ops: vec![op],
        g_in: c.g_in_needed(),
    })
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
    Ok(GradOps {
        ops: vec![op],
        g_in: c.g_in_needed(),
    })
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
    Ok(GradOps {
        ops: vec![op],
        g_in: c.g_in_needed(),
    })
}

/// `MaxPool(X) → Y` → `MaxPoolGradient(X, Y, dY) → dX`.
fn max_pool(c: &GradCtx<'_>) -> Result<GradOps> {
    pool(c, "MaxPoolGradient")
}

/// `AveragePool(X) → Y` → `AveragePoolGradient(X, Y, dY) → dX`.
fn average_pool(c: &GradCtx<'_>) -> Result<GradOps> {
    pool(c, "AveragePoolGradient")
}

/// `Flatten`/`Reshape(X) → Y` → `ReshapeLike(dY, X) → dX`.
fn reshape(c: &GradCtx<'_>) -> Result<GradOps> {
    let op = c.op(
        "ReshapeLike",
        vec![c.g_out(0)?, c.input(0)],
        vec![c.gi[0].clone()],
        vec![],
    );
    Ok(GradOps {
        ops: vec![op],
        g_in: c.g_in_needed(),
    })
}
