//! Adjacent ops run as one kernel that makes fewer passes over memory.
//!
//! The net a user built, serialises and exports is untouched: only the plan
//! the executor compiles from it runs the fused kernels. A fused kernel writes
//! every blob the pair writes, with the same bits (or leaves a blob unwritten
//! where a later op overwrites it unread), so nothing a user can fetch once
//! the net has run changes. On CPU devices:
//!
//! - `SpatialBN → Relu` (the relu reading the batch norm's output, and waiting
//!   on nothing else) becomes `SpatialBN+Relu`: `relu(Y)` is written plane by
//!   plane with Y, while Y is in cache, instead of in a second pass over Y.
//! - `Sum → Relu` (or `Add → Relu`: a residual connection) becomes `Sum+Relu`:
//!   the sum and its relu are written block by block in one pass, instead of
//!   copying the first input to the output, adding the others to it, and
//!   reading the result again for the relu.
//! - `SpatialBN → Sum → Relu`, the batch norm's output a term of a two-term
//!   sum (a residual block's end, cuDNN's "BN-add-relu"), becomes
//!   `SpatialBN+Sum+Relu` in the sum's place: the sum and its relu are
//!   written plane by plane with the batch norm's output, instead of being
//!   read back for the sum.
//! - `ReluGradient → SpatialBNGradient` (the latter reading the former's dY)
//!   becomes `ReluGradient+SpatialBNGradient`: each plane of dY is masked and then summed
//!   while in cache, instead of being written in one pass and read in another.
//!   The batch norm gradient may write its dX over the relu's dR (shared
//!   gradient memory, as in a chain of conv → batch norm → relu layers): the
//!   fused kernel reads each plane of dR before it writes dX's. Where a later
//!   op overwrites dY's blob before anyone reads it (shared gradient memory
//!   again), dY is not written at all: no one could see it.
//! - `Sum → ReluGradient → SpatialBNGradient`, the two-term sum making the
//!   relu's dR (a residual block's input gradient: the shortcut's plus the
//!   block's) and its blob overwritten unread later, becomes
//!   `Sum+ReluGradient+SpatialBNGradient`: the terms are added a plane at a
//!   time inside the pair's kernel and the sum is never written. Its terms
//!   may be the blobs dY and dX are written over (shared gradient memory
//!   does that): each plane of them is read first.
//!
//! - `WeightedSum → MomentumSGDUpdate` (the L2 decay `g ← g + wd·p` that
//!   Caffe2's optimizers add before the update, on the same gradient and
//!   parameter) becomes `WeightedSum+MomentumSGDUpdate` in the update's place:
//!   one pass and one op per parameter instead of two, which small nets, whose
//!   steps are mostly the cost of running ops, feel most.
//!
//! A net's `dpm_fuse` argument set to 0 turns this off.

use crate::graph::{Args, Device};
use crate::proto::{NetDef, OperatorDef};

/// The ops to run, each with the index (in `net`) of the op it stands for in
/// errors and profiles: a fused op has the index of the op whose place it takes.
/// `deps`: each op's dependencies (see `plan::dependencies`).
pub(super) fn fuse(net: &NetDef, deps: &[Vec<usize>]) -> (Vec<OperatorDef>, Vec<usize>) {
    let ops = &net.op;
    if Args(&net.arg).int("dpm_fuse", 1).unwrap_or(1) == 0 {
        return (ops.clone(), (0..ops.len()).collect());
    }
    // replaced[i]: the fused op that runs at i; absorbed[j]: op j runs inside
    // another. (Neither can be an op the loop fuses from: those are batch
    // norms, sums, relu gradients and weighted sums, and a sum absorbed by a
    // relu gradient after it was passed over first.)
    let mut replaced: Vec<Option<OperatorDef>> = vec![None; ops.len()];
    let mut absorbed = vec![false; ops.len()];
    for i in 0..ops.len() {
        if !on_cpu(net, &ops[i]) {
            continue;
        }
        match ops[i].op_type() {
            "SpatialBN" | "Sum" | "Add" => {
                if ops[i].op_type() != "SpatialBN" && !sum_out_of_place(&ops[i]) {
                    continue;
                }
                if let Some(j) = absorbable_relu(net, deps, &absorbed, i) {
                    let mut f = ops[i].clone();
                    let fused = match ops[i].op_type() {
                        "SpatialBN" => "SpatialBN+Relu",
                        _ => "Sum+Relu",
                    };
                    f.r#type = Some(fused.into());
                    f.output.push(ops[j].output[0].clone());
                    if fused == "Sum+Relu" {
                        if let Some((b, other)) = batch_norm_into_sum(net, &absorbed, &replaced, i) {
                            f = batch_norm_sum_relu(&ops[b], other, &f);
                            absorbed[b] = true;
                        }
                    }
                    replaced[i] = Some(f);
                    absorbed[j] = true;
                }
            }
            "ReluGradient" => {
                if let Some(k) = relu_bn_gradient(net, &absorbed, &replaced, i) {
                    let mut f = ops[k].clone();
                    f.r#type = Some("ReluGradient+SpatialBNGradient".into());
                    f.input[2] = ops[i].input[1].clone();
                    f.input.push(ops[i].input[0].clone());
                    // dY is kept unless no one could see it: then the
                    // kernel makes it a plane at a time and never writes it.
                    let dy = &ops[i].output[0];
                    if !overwritten_unseen(net, k, dy) {
                        f.output.push(dy.clone());
                    }
                    // dR a residual gradient sum no one else sees: its terms
                    // instead, added a plane at a time.
                    if let Some(q) = residual_gradient_sum(net, &absorbed, &replaced, i, k) {
                        f.r#type = Some("Sum+ReluGradient+SpatialBNGradient".into());
                        f.input[2] = ops[q].input[0].clone();
                        f.input.push(ops[q].input[1].clone());
                        absorbed[q] = true;
                    }
                    replaced[k] = Some(f);
                    absorbed[i] = true;
                }
            }
            "WeightedSum" => {
                if let Some(j) = decay_then_momentum(net, &absorbed, &replaced, i) {
                    let (decay, update) = (&ops[i], &ops[j]);
                    let mut f = update.clone();
                    f.r#type = Some("WeightedSum+MomentumSGDUpdate".into());
                    f.input = decay.input.clone();
                    f.input.extend([update.input[1].clone(), update.input[2].clone()]);
                    f.control_input = both_controls(decay, update);
                    replaced[j] = Some(f);
                    absorbed[i] = true;
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::with_capacity(ops.len());
    let mut index = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        if absorbed[i] {
            continue;
        }
        out.push(replaced[i].take().unwrap_or_else(|| op.clone()));
        index.push(i);
    }
    (out, index)
}

/// Whether `op` runs on a CPU device (CUDA ops have their own libraries' kernels).
fn on_cpu(net: &NetDef, op: &OperatorDef) -> bool {
    let d = op.device_option.as_ref().or(net.device_option.as_ref());
    d.is_none_or(|d| matches!(Device::from_proto(d), Ok(Device::Cpu(_))))
}

/// Whether `Sum`/`Add` op `op` is one the unfused kernel accepts (so that
/// errors stay the unfused op's) and writes a blob none of its inputs names
/// (an in-place sum, a gradient accumulation, gains nothing from fusion).
fn sum_out_of_place(op: &OperatorDef) -> bool {
    let accepted = crate::ops::cpu::elementwise::sum_arity(op).is_ok_and(|a| a.contains(&op.input.len()));
    accepted && op.output.len() == 1 && !op.input.contains(&op.output[0])
}

/// The `Relu` that op `i` (a batch norm or a sum) can absorb: it reads only
/// op `i`'s first output, waits on no other op (so nothing between them
/// touches its output) and writes a blob of its own.
fn absorbable_relu(net: &NetDef, deps: &[Vec<usize>], absorbed: &[bool], i: usize) -> Option<usize> {
    let (op, y) = (&net.op[i], net.op[i].output.first()?);
    let j = (i + 1..net.op.len()).find(|&j| net.op[j].input.contains(y))?;
    let relu = &net.op[j];
    let fits = relu.op_type() == "Relu"
        && !absorbed[j]
        && relu.input == [y.clone()]
        && relu.output.len() == 1
        && relu.control_input.is_empty()
        && deps[j] == [i]
        && relu.device_option == op.device_option
        && !op.output.contains(&relu.output[0])
        && !op.input.contains(&relu.output[0]);
    fits.then_some(j)
}

/// The `SpatialBN` whose output Y is a term of two-term sum op `i`, and
/// which may run in the sum's place: Y is not one of its inputs, no op between
/// reads what it writes or writes what it touches, and the sum's other term
/// is not one of its outputs. With it, the other term's index in the sum.
fn batch_norm_into_sum(
    net: &NetDef,
    absorbed: &[bool],
    replaced: &[Option<OperatorDef>],
    i: usize,
) -> Option<(usize, usize)> {
    let sum = &net.op[i];
    if sum.input.len() != 2 || sum.input[0] == sum.input[1] {
        return None;
    }
    (0..2).find_map(|slot| {
        let (y, other) = (&sum.input[slot], &sum.input[1 - slot]);
        let b = (0..i).rev().find(|&k| net.op[k].output.contains(y))?;
        let bn = &net.op[b];
        let touches = |blob: &String| bn.input.contains(blob) || bn.output.contains(blob);
        let fits = bn.op_type() == "SpatialBN"
            && !absorbed[b]
            && replaced[b].is_none()
            && bn.output.first() == Some(y)
            && !bn.input.contains(y)
            && !bn.output.contains(other)
            && bn.device_option == sum.device_option
            && net.op[b + 1..i].iter().all(|op| {
                !op.output.iter().any(touches)
                    && !op.input.iter().any(|x| bn.output.contains(x))
                    && !op.control_input.iter().any(|x| bn.output.contains(x))
            });
        fits.then_some((b, 1 - slot))
    })
}

/// `SpatialBN+Sum+Relu` in the place of `sum_relu` (a fused `Sum+Relu`):
/// the batch norm's inputs and the sum's other term (its input `other`), the
/// batch norm's outputs and the sum's and relu's. Addition commutes: which
/// term Y was does not matter to the bits.
fn batch_norm_sum_relu(bn: &OperatorDef, other: usize, sum_relu: &OperatorDef) -> OperatorDef {
    let mut f = sum_relu.clone();
    f.r#type = Some("SpatialBN+Sum+Relu".into());
    f.input = bn.input.clone();
    f.input.push(sum_relu.input[other].clone());
    f.output = bn.output.clone();
    f.output.extend(sum_relu.output.iter().cloned());
    f.arg = bn.arg.clone();
    f.control_input = both_controls(bn, sum_relu);
    f
}

/// The control inputs of `first` and then those of `then` it lacks: what a
/// fused op of the two waits on.
fn both_controls(first: &OperatorDef, then: &OperatorDef) -> Vec<String> {
    let mut control = first.control_input.clone();
    control.extend(
        then.control_input
            .iter()
            .filter(|c| !first.control_input.contains(c))
            .cloned(),
    );
    control
}

/// The `SpatialBNGradient` that can absorb `ReluGradient` op `j`: the next op
/// reading its dY, as its dY; the ops between touch none of the relu's blobs
/// (so it may run later), and the pair's blobs are distinct, except that dX
/// may be written over dR.
fn relu_bn_gradient(
    net: &NetDef,
    absorbed: &[bool],
    replaced: &[Option<OperatorDef>],
    j: usize,
) -> Option<usize> {
    let rg = &net.op[j];
    if rg.input.len() != 2 || rg.output.len() != 1 || !rg.control_input.is_empty() {
        return None;
    }
    // (An in-place relu gradient, dY = R or dR, fails the last check below:
    // the batch norm gradient would read R or dR.)
    let (r, dr, dy) = (&rg.input[0], &rg.input[1], &rg.output[0]);
    let ours = |b: &String| b == r || b == dr || b == dy;
    let k = next_reader(net, j, dy, ours)?;
    let op = &net.op[k];
    let fits = op.op_type() == "SpatialBNGradient"
        && !absorbed[k]
        && replaced[k].is_none()
        && op.input.get(2) == Some(dy)
        && op.input.iter().filter(|b| *b == dy).count() == 1
        && !op.input.iter().any(|b| b == r || b == dr)
        // dX may take dR's blob (shared gradient memory): the fused kernel
        // reads all of dR before it writes dX.
        && !op.output.iter().enumerate().any(|(o, b)| ours(b) && !(o == 0 && b == dr))
        && op.device_option == rg.device_option;
    fits.then_some(k)
}

/// Whether what op `k` leaves in `blob` is never seen: `blob` is no output of
/// the net, and the first op after `k` that names it writes it without
/// reading it or waiting on it (as shared gradient memory reuses a gradient's
/// blob for another). Every kernel writes all of an output it does not read.
fn overwritten_unseen(net: &NetDef, k: usize, blob: &String) -> bool {
    if net.external_output.contains(blob) {
        return false;
    }
    for op in &net.op[k + 1..] {
        if op.input.contains(blob) || op.control_input.contains(blob) {
            return false;
        }
        if op.output.contains(blob) {
            return true;
        }
    }
    false
}

/// The two-term `Sum` (or `Add`) that writes the dR of relu gradient op `j`,
/// which fuses with batch norm gradient op `k`, and which can run inside
/// them: nothing else reads its output, which is overwritten unread after
/// `k`; no op between it and `k` writes its blobs; its terms are distinct
/// blobs that the pair reads nowhere else and writes only as dX or dY (a
/// residual block's gradient, under shared gradient memory, is summed from
/// the blobs these two then write).
fn residual_gradient_sum(
    net: &NetDef,
    absorbed: &[bool],
    replaced: &[Option<OperatorDef>],
    j: usize,
    k: usize,
) -> Option<usize> {
    let (rg, bg) = (&net.op[j], &net.op[k]);
    let dr = &rg.input[1];
    let q = (0..j).rev().find(|&q| net.op[q].output.contains(dr))?;
    let sum = &net.op[q];
    let [a, b] = &sum.input[..] else {
        return None;
    };
    // (No op between the sum and the relu gradient writes dR: the sum is its
    // last writer; none between the pair does: `relu_bn_gradient`.)
    let term = |x: &String| x == a || x == b;
    let fits = matches!(sum.op_type(), "Sum" | "Add")
        && crate::ops::cpu::elementwise::sum_arity(sum).is_ok_and(|r| r.contains(&2))
        && !absorbed[q]
        && replaced[q].is_none()
        && sum.output == [dr.clone()]
        && a != b
        && sum.control_input.is_empty()
        && sum.device_option == rg.device_option
        && ![a, b].contains(&&rg.input[0])
        && !bg.input.iter().enumerate().any(|(n, x)| n != 2 && term(x))
        && !bg.output[1..].iter().any(term)
        && (q + 1..k).filter(|&m| m != j).all(|m| {
            let op = &net.op[m];
            !op.output.iter().any(term) && !op.input.contains(dr) && !op.control_input.contains(dr)
        })
        && overwritten_unseen(net, k, dr);
    fits.then_some(q)
}

/// The `MomentumSGDUpdate` that can absorb `WeightedSum` op `i`, the L2 decay
/// `g ← w0·g + wd·p` that Caffe2's optimizers put before it: the next op
/// reading `g`, updating `g`, its moment and `p` in place; the ops between
/// read none of the decay's outputs and write none of its blobs (so it may
/// run later), and the blobs are distinct.
fn decay_then_momentum(
    net: &NetDef,
    absorbed: &[bool],
    replaced: &[Option<OperatorDef>],
    i: usize,
) -> Option<usize> {
    let ws = &net.op[i];
    let [g, w0, p, wd] = &ws.input[..] else {
        return None;
    };
    if ws.output != [g.clone()] || [w0, p, wd].contains(&g) || [w0, wd].contains(&p) {
        return None;
    }
    let ours = |b: &String| [g, w0, p, wd].contains(&b);
    let k = next_reader(net, i, g, ours)?;
    let op = &net.op[k];
    let [ug, m, lr, up] = &op.input[..] else {
        return None;
    };
    let fits = op.op_type() == "MomentumSGDUpdate"
        && !absorbed[k]
        && replaced[k].is_none()
        && ug == g
        && up == p
        && op.output == [g.clone(), m.clone(), p.clone()]
        && !ours(m)
        && !ours(lr)
        && m != lr
        && op.device_option == ws.device_option;
    fits.then_some(k)
}

/// The first op after op `i` that reads `blob`, where no op between writes a
/// blob that `ours` names (`blob` among them): the op that a fused kernel of
/// op `i` and it may replace, running `i`'s work later without anyone seeing.
fn next_reader(net: &NetDef, i: usize, blob: &String, ours: impl Fn(&String) -> bool) -> Option<usize> {
    for k in i + 1..net.op.len() {
        let op = &net.op[k];
        if op.input.contains(blob) {
            return Some(k);
        }
        if op.output.iter().any(&ours) {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Net;

    fn net(build: impl FnOnce(&mut Net)) -> NetDef {
        let mut n = Net::new("n");
        build(&mut n);
        n.into_proto()
    }

    fn run(net: &NetDef) -> (Vec<String>, Vec<usize>) {
        let deps = super::super::plan::dependencies(&net.op).unwrap();
        let (ops, index) = fuse(net, &deps);
        (ops.iter().map(|o| o.op_type().to_owned()).collect(), index)
    }

    fn bn(n: &mut Net, x: &str, y: &str) {
        n.op("SpatialBN")
            .inputs([x, "s", "b", "m", "v"])
            .output(y)
            .arg("is_test", 1i64)
            .build();
    }

    #[test]
    fn batch_norm_then_relu_fuse_in_the_batch_norms_place() {
        let n = net(|n| {
            bn(n, "x", "y");
            n.op("Copy").input("x").output("c").build();
            n.op("Relu").input("y").output("r").build();
        });
        assert_eq!(
            run(&n),
            (vec!["SpatialBN+Relu".into(), "Copy".into()], vec![0, 1])
        );
        let deps = super::super::plan::dependencies(&n.op).unwrap();
        let (ops, _) = fuse(&n, &deps);
        assert_eq!(ops[0].output, ["y", "r"]);
        assert_eq!(ops[0].input, n.op[0].input);
    }

    #[test]
    fn a_relu_that_must_wait_for_another_op_or_writes_in_place_stays_apart() {
        // The relu's output is read by an op between: the relu must wait for it.
        let n = net(|n| {
            bn(n, "x", "y");
            n.op("Copy").input("r").output("c").build();
            n.op("Relu").input("y").output("r").build();
        });
        assert_eq!(run(&n).0, ["SpatialBN", "Copy", "Relu"]);
        // In place.
        let n = net(|n| {
            bn(n, "x", "y");
            n.op("Relu").input("y").output("y").build();
        });
        assert_eq!(run(&n).0, ["SpatialBN", "Relu"]);
        // Another op reads Y first.
        let n = net(|n| {
            bn(n, "x", "y");
            n.op("Copy").input("y").output("c").build();
            n.op("Relu").input("y").output("r").build();
        });
        assert_eq!(run(&n).0, ["SpatialBN", "Copy", "Relu"]);
        // On a GPU, or with fusion off.
        let mut n = net(|n| {
            bn(n, "x", "y");
            n.op("Relu").input("y").output("r").build();
        });
        n.op[1].device_option = Some(Device::Cuda(0).to_proto());
        n.op[0].device_option = Some(Device::Cuda(0).to_proto());
        assert_eq!(run(&n).0, ["SpatialBN", "Relu"]);
        let mut m = Net::from_proto(n);
        m.set_arg("dpm_fuse", 0i64);
        let mut n = m.into_proto();
        n.op.iter_mut().for_each(|o| o.device_option = None);
        assert_eq!(run(&n).0, ["SpatialBN", "Relu"]);
    }

    #[test]
    fn a_sum_then_relu_fuse_in_the_sums_place_unless_the_sum_is_in_place() {
        for ty in ["Sum", "Add"] {
            let n = net(|n| {
                n.op(ty).inputs(["a", "b"]).output("s").build();
                n.op("Relu").input("s").output("r").build();
            });
            let deps = super::super::plan::dependencies(&n.op).unwrap();
            let (ops, index) = fuse(&n, &deps);
            assert_eq!(index, [0]);
            assert_eq!(ops[0].op_type(), "Sum+Relu");
            assert_eq!(
                (&ops[0].input[..], &ops[0].output[..]),
                (
                    &["a".to_string(), "b".into()][..],
                    &["s".to_string(), "r".into()][..]
                )
            );
        }
        let three = net(|n| {
            n.op("Sum").inputs(["a", "b", "c"]).output("s").build();
            n.op("Relu").input("s").output("r").build();
        });
        assert_eq!(run(&three).0, ["Sum+Relu"]);
        // Accumulating in place (a gradient sum), an `Add` its kernel would
        // reject (three inputs, broadcasting): the ops run apart, and the
        // rejection names the `Add`.
        let in_place = net(|n| {
            n.op("Sum").inputs(["a", "b"]).output("a").build();
            n.op("Relu").input("a").output("r").build();
        });
        let add3 = net(|n| {
            n.op("Add").inputs(["a", "b", "c"]).output("s").build();
            n.op("Relu").input("s").output("r").build();
        });
        let broadcast = net(|n| {
            n.op("Add")
                .inputs(["a", "b"])
                .output("s")
                .arg("broadcast", 1i64)
                .build();
            n.op("Relu").input("s").output("r").build();
        });
        for n in [in_place, add3, broadcast] {
            assert_eq!(run(&n).0.last().map(String::as_str), Some("Relu"));
            assert_eq!(run(&n).0.len(), 2);
        }
    }

    fn grads(n: &mut Net, between: impl FnOnce(&mut Net)) {
        n.op("ReluGradient").inputs(["r", "dr"]).output("dy").build();
        between(n);
        n.op("SpatialBNGradient")
            .inputs(["x", "s", "dy", "sm", "siv"])
            .outputs(["dx", "ds", "db"])
            .build();
    }

    #[test]
    fn relu_gradient_then_batch_norm_gradient_fuse_in_the_latters_place() {
        let n = net(|n| {
            grads(n, |n| {
                n.op("Copy").input("r").output("c").build();
            })
        });
        let deps = super::super::plan::dependencies(&n.op).unwrap();
        let (ops, index) = fuse(&n, &deps);
        assert_eq!(index, [1, 2]);
        assert_eq!(ops[0].op_type(), "Copy");
        assert_eq!(ops[1].op_type(), "ReluGradient+SpatialBNGradient");
        assert_eq!(ops[1].input, ["x", "s", "dr", "sm", "siv", "r"]);
        assert_eq!(ops[1].output, ["dx", "ds", "db", "dy"]);
    }

    /// A training batch norm of `x` into `y`, `between`, then `Sum(terms)` and
    /// a relu of the sum.
    fn bn_sum(between: impl FnOnce(&mut Net), terms: &[&str]) -> NetDef {
        net(|n| {
            n.op("SpatialBN")
                .inputs(["x", "s", "b", "rm", "riv"])
                .outputs(["y", "rm", "riv", "sm", "siv"])
                .build();
            between(n);
            n.op("Sum").inputs(terms.iter().copied()).output("sum").build();
            n.op("Relu").input("sum").output("r").build();
        })
    }

    #[test]
    fn a_batch_norm_into_a_sum_and_its_relu_fuse_in_the_sums_place() {
        for terms in [["y", "o"], ["o", "y"]] {
            let n = bn_sum(|n| drop(n.op("Copy").input("q").output("c").build()), &terms);
            let deps = super::super::plan::dependencies(&n.op).unwrap();
            let (ops, index) = fuse(&n, &deps);
            assert_eq!(index, [1, 2]);
            assert_eq!(ops[1].op_type(), "SpatialBN+Sum+Relu");
            assert_eq!(ops[1].input, ["x", "s", "b", "rm", "riv", "o"]);
            assert_eq!(ops[1].output, ["y", "rm", "riv", "sm", "siv", "sum", "r"]);
        }
    }

    #[test]
    fn a_batch_norm_whose_blobs_are_used_before_the_sum_stays_apart() {
        let apart = ["SpatialBN", "Copy", "Sum+Relu"];
        // An op between reads its saved mean, or its output; writes its input,
        // or its running mean.
        for (from, to) in [("sm", "c"), ("y", "c"), ("q", "x"), ("q", "rm")] {
            let n = bn_sum(|n| drop(n.op("Copy").input(from).output(to).build()), &["y", "o"]);
            assert_eq!(run(&n).0, apart, "{from} → {to}");
        }
        // The other term is one of its outputs; Y twice; three terms.
        for terms in [&["y", "sm"][..], &["y", "y"], &["y", "o", "p"]] {
            let n = bn_sum(|_| {}, terms);
            assert_eq!(run(&n).0, ["SpatialBN", "Sum+Relu"], "{terms:?}");
        }
    }

    #[test]
    fn a_batch_norm_gradient_may_write_dx_over_dr_but_no_other_output() {
        let pair = |outputs: [&str; 3]| {
            net(|n| {
                n.op("ReluGradient").inputs(["r", "dr"]).output("dy").build();
                n.op("SpatialBNGradient")
                    .inputs(["x", "s", "dy", "sm", "siv"])
                    .outputs(outputs)
                    .build();
            })
        };
        let (ops, _) = fuse(&pair(["dr", "ds", "db"]), &[vec![], vec![0]]);
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].input, ["x", "s", "dr", "sm", "siv", "r"]);
        assert_eq!(ops[0].output, ["dr", "ds", "db", "dy"]);
        for outputs in [
            ["dx", "dr", "db"],
            ["dx", "ds", "dr"],
            ["r", "ds", "db"],
            ["dy", "ds", "db"],
        ] {
            assert_eq!(
                run(&pair(outputs)).0,
                ["ReluGradient", "SpatialBNGradient"],
                "{outputs:?}"
            );
        }
    }

    #[test]
    fn a_fused_gradient_leaves_dy_unwritten_only_where_no_one_could_see_it() {
        // The relu and batch norm gradients, then `after`; `external`: dY is
        // one of the net's outputs.
        let fused_outputs = |after: &dyn Fn(&mut Net), external: bool| {
            let mut n = net(|n| {
                n.op("ReluGradient").inputs(["r", "dr"]).output("dy").build();
                n.op("SpatialBNGradient")
                    .inputs(["x", "s", "dy", "sm", "siv"])
                    .outputs(["dr", "ds", "db"])
                    .build();
                after(n);
            });
            if external {
                n.external_output.push("dy".into());
            }
            let (ops, _) = fuse(&n, &super::super::plan::dependencies(&n.op).unwrap());
            assert_eq!(ops[0].op_type(), "ReluGradient+SpatialBNGradient");
            ops[0].output.clone()
        };
        let kept = ["dr", "ds", "db", "dy"];
        // Overwritten (as shared gradient memory reuses it), after an op that
        // touches other blobs: never seen.
        let overwrite = |n: &mut Net| {
            n.op("Copy").input("x").output("c").build();
            n.op("Copy").input("dr").output("dy").build();
        };
        assert_eq!(fused_outputs(&overwrite, false), ["dr", "ds", "db"]);
        // Seen: an output of the net, read (or waited on) before it is
        // overwritten, overwritten by an op that also reads it, never
        // overwritten.
        assert_eq!(fused_outputs(&overwrite, true), kept);
        let read_first = |n: &mut Net| {
            n.op("Copy").input("dy").output("c").build();
            n.op("Copy").input("dr").output("dy").build();
        };
        assert_eq!(fused_outputs(&read_first, false), kept);
        let waited_on = |n: &mut Net| {
            n.op("Copy").input("x").output("c").control_input("dy").build();
            n.op("Copy").input("dr").output("dy").build();
        };
        assert_eq!(fused_outputs(&waited_on, false), kept);
        let accumulated = |n: &mut Net| {
            n.op("Sum").inputs(["dy", "dr"]).output("dy").build();
        };
        assert_eq!(fused_outputs(&accumulated, false), kept);
        assert_eq!(fused_outputs(&|_: &mut Net| {}, false), kept);
    }

    #[test]
    fn a_residual_gradient_sum_joins_the_relu_and_batch_norm_gradients_only_where_unseen() {
        // Sum(a, b) → s, the relu gradient of s writing dY over a, the batch
        // norm gradient dX over b, `between` after the sum, `after` after the
        // batch norm gradient.
        let bn_grad = |inputs: [&'static str; 5], outputs: [&'static str; 3]| {
            move |between: &dyn Fn(&mut Net), after: &dyn Fn(&mut Net)| {
                net(|n| {
                    n.op("Sum").inputs(["a", "b"]).output("s").build();
                    between(n);
                    n.op("ReluGradient").inputs(["r", "s"]).output("a").build();
                    n.op("SpatialBNGradient").inputs(inputs).outputs(outputs).build();
                    after(n);
                })
            }
        };
        let fused_with = |inputs: [&'static str; 5],
                          outputs: [&'static str; 3],
                          between: &dyn Fn(&mut Net),
                          after: &dyn Fn(&mut Net)| {
            let n = bn_grad(inputs, outputs)(between, after);
            let (ops, _) = fuse(&n, &super::super::plan::dependencies(&n.op).unwrap());
            ops.iter()
                .map(|o| (o.op_type().to_owned(), o.input.clone(), o.output.clone()))
                .collect::<Vec<_>>()
        };
        let fused = |between: &dyn Fn(&mut Net), after: &dyn Fn(&mut Net)| {
            fused_with(["x", "sc", "a", "sm", "siv"], ["b", "ds", "db"], between, after)
        };
        let nothing = |_: &mut Net| {};
        let overwrite_s = |n: &mut Net| drop(n.op("Copy").input("x").output("s").build());
        let ops = fused(&nothing, &overwrite_s);
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert_eq!(ops[0].0, "Sum+ReluGradient+SpatialBNGradient");
        assert_eq!(ops[0].1, ["x", "sc", "a", "sm", "siv", "r", "b"]);
        assert_eq!(ops[0].2, ["b", "ds", "db", "a"]);
        // An accumulation in place (`Sum(s, b) → s`, as shared gradient
        // memory makes some): s's old value is the first term.
        let n = net(|n| {
            n.op("Sum").inputs(["s", "b"]).output("s").build();
            n.op("ReluGradient").inputs(["r", "s"]).output("a").build();
            n.op("SpatialBNGradient")
                .inputs(["x", "sc", "a", "sm", "siv"])
                .outputs(["b", "ds", "db"])
                .build();
            overwrite_s(n);
        });
        let (ops, _) = fuse(&n, &super::super::plan::dependencies(&n.op).unwrap());
        assert_eq!(ops[0].op_type(), "Sum+ReluGradient+SpatialBNGradient");
        assert_eq!(ops[0].input, ["x", "sc", "s", "sm", "siv", "r", "b"]);
        // The sum stays apart: its output read after, or never overwritten,
        // or read, or a term written, between it and the pair.
        let read_s = |n: &mut Net| {
            n.op("Copy").input("s").output("c").build();
            overwrite_s(n);
        };
        let write_a = |n: &mut Net| drop(n.op("Copy").input("x").output("a").build());
        let write_b = |n: &mut Net| drop(n.op("Copy").input("x").output("b").build());
        let read_s_between = |n: &mut Net| drop(n.op("Copy").input("s").output("c").build());
        let wait_s_between =
            |n: &mut Net| drop(n.op("Copy").input("x").output("c").control_input("s").build());
        let stays = |ops: Vec<(String, Vec<String>, Vec<String>)>| {
            assert!(ops.iter().any(|o| o.0 == "Sum"), "{ops:?}");
            assert!(
                ops.iter().any(|o| o.0 == "ReluGradient+SpatialBNGradient"),
                "{ops:?}"
            );
        };
        for (between, after) in [
            (&nothing as &dyn Fn(&mut Net), &read_s as &dyn Fn(&mut Net)),
            (&nothing, &nothing),
            (&read_s_between, &overwrite_s),
            (&wait_s_between, &overwrite_s),
            (&write_a, &overwrite_s),
            (&write_b, &overwrite_s),
        ] {
            stays(fused(between, after));
        }
        // Or the batch norm gradient reads a term as another input, or
        // writes one as dscale or dbias. (Reading or writing dY, the
        // other term, elsewhere already keeps the relu gradient apart.)
        for (inputs, outputs) in [
            (["b", "sc", "a", "sm", "siv"], ["c", "ds", "db"]),
            (["x", "b", "a", "sm", "siv"], ["c", "ds", "db"]),
            (["x", "sc", "a", "sm", "siv"], ["c", "b", "db"]),
            (["x", "sc", "a", "sm", "siv"], ["c", "ds", "b"]),
        ] {
            stays(fused_with(inputs, outputs, &nothing, &overwrite_s));
        }
    }

    #[test]
    fn an_in_place_batch_norm_fuses_with_its_relu() {
        let n = net(|n| {
            bn(n, "x", "x");
            n.op("Relu").input("x").output("r").build();
        });
        assert_eq!(run(&n).0, ["SpatialBN+Relu"]);
    }

    #[test]
    fn odd_relu_gradients_stay_apart() {
        // In place, with a control input, or read again by the batch norm
        // gradient as another input.
        let in_place = net(|n| {
            n.op("ReluGradient").inputs(["r", "dr"]).output("dr").build();
            n.op("SpatialBNGradient")
                .inputs(["x", "s", "dr", "sm", "siv"])
                .outputs(["dx", "ds", "db"])
                .build();
        });
        let control = net(|n| {
            n.op("Copy").input("q").output("c").build();
            n.op("ReluGradient")
                .inputs(["r", "dr"])
                .output("dy")
                .control_input("c")
                .build();
            n.op("SpatialBNGradient")
                .inputs(["x", "s", "dy", "sm", "siv"])
                .outputs(["dx", "ds", "db"])
                .build();
        });
        let rereads = net(|n| {
            n.op("ReluGradient").inputs(["r", "dr"]).output("dy").build();
            n.op("SpatialBNGradient")
                .inputs(["r", "s", "dy", "sm", "siv"])
                .outputs(["dx", "ds", "db"])
                .build();
        });
        assert_eq!(run(&in_place).0, ["ReluGradient", "SpatialBNGradient"]);
        assert_eq!(run(&control).0, ["Copy", "ReluGradient", "SpatialBNGradient"]);
        assert_eq!(run(&rereads).0, ["ReluGradient", "SpatialBNGradient"]);
    }

    #[test]
    fn a_relu_gradient_whose_blobs_change_before_the_batch_norm_gradient_stays_apart() {
        for (reads, writes) in [("dy", "c"), ("q", "dr"), ("q", "r"), ("q", "dy")] {
            let n = net(|n| {
                grads(n, |n| {
                    n.op("Copy").input(reads).output(writes).build();
                })
            });
            assert_eq!(
                run(&n).0,
                ["ReluGradient", "Copy", "SpatialBNGradient"],
                "an op between reading {reads} and writing {writes}"
            );
        }
    }

    fn decay_and_update(n: &mut Net, between: impl FnOnce(&mut Net)) {
        n.op("WeightedSum")
            .inputs(["g", "ONE", "p", "WD"])
            .output("g")
            .build();
        between(n);
        n.op("MomentumSGDUpdate")
            .inputs(["g", "m", "lr", "p"])
            .outputs(["g", "m", "p"])
            .arg("momentum", 0.9f32)
            .build();
    }

    #[test]
    fn weight_decay_then_momentum_update_fuse_in_the_updates_place() {
        let n = net(|n| {
            decay_and_update(n, |n| {
                n.op("Copy").input("p").output("c").build();
            })
        });
        let deps = super::super::plan::dependencies(&n.op).unwrap();
        let (ops, index) = fuse(&n, &deps);
        assert_eq!(index, [1, 2]);
        assert_eq!(ops[1].op_type(), "WeightedSum+MomentumSGDUpdate");
        assert_eq!(ops[1].input, ["g", "ONE", "p", "WD", "m", "lr"]);
        assert_eq!(ops[1].output, ["g", "m", "p"]);
        assert_eq!(ops[1].arg, n.op[2].arg, "the update's arguments");
        // Control inputs of both stay.
        let mut n = net(|n| {
            n.op("Copy").input("q").output("c1").build();
            n.op("Copy").input("q").output("c2").build();
            decay_and_update(n, |_| {})
        });
        n.op[2].control_input = vec!["c1".into()];
        n.op[3].control_input = vec!["c2".into(), "c1".into()];
        let deps = super::super::plan::dependencies(&n.op).unwrap();
        let (ops, _) = fuse(&n, &deps);
        assert_eq!(ops[2].control_input, ["c1", "c2"]);
    }

    #[test]
    fn a_decay_whose_blobs_are_touched_before_the_update_or_that_is_not_l2_stays_apart() {
        // Between them: an op reads the decayed gradient, or writes a blob of the decay.
        for (reads, writes) in [("g", "c"), ("q", "p"), ("q", "WD"), ("q", "ONE"), ("q", "g")] {
            let n = net(|n| {
                decay_and_update(n, |n| {
                    n.op("Copy").input(reads).output(writes).build();
                })
            });
            assert_eq!(
                run(&n).0,
                ["WeightedSum", "Copy", "MomentumSGDUpdate"],
                "an op between reading {reads} and writing {writes}"
            );
        }
        let apart = ["WeightedSum", "MomentumSGDUpdate"];
        // A decay with `ws` inputs writing `ws_out`, then an update with
        // inputs `upd` and outputs `upd_out`.
        let pair = |ws: &[&str], ws_out: &str, upd: [&str; 4], upd_out: [&str; 3]| {
            net(|n| {
                n.op("WeightedSum")
                    .inputs(ws.iter().copied())
                    .output(ws_out)
                    .build();
                n.op("MomentumSGDUpdate").inputs(upd).outputs(upd_out).build();
            })
        };
        let decay = ["g", "ONE", "p", "WD"];
        let update = ["g", "m", "lr", "p"];
        let cases = [
            // A weighted sum of three terms, or one not in place.
            (
                "three terms",
                pair(&["g", "ONE", "p", "WD", "p", "WD"], "g", update, ["g", "m", "p"]),
            ),
            (
                "out of place",
                pair(&decay, "h", ["h", "m", "lr", "p"], ["h", "m", "p"]),
            ),
            // The update is of another parameter, or not in place.
            (
                "another parameter",
                pair(&decay, "g", ["g", "m", "lr", "p2"], ["g", "m", "p2"]),
            ),
            ("update out of place", pair(&decay, "g", update, ["g2", "m", "p"])),
            // The moment is one of the decay's blobs.
            (
                "shared moment",
                pair(&decay, "g", ["g", "WD", "lr", "p"], ["g", "WD", "p"]),
            ),
            // The decay writes another blob: the update reads the gradient
            // before decay, which the fused kernel would decay.
            (
                "decay into another blob",
                pair(&decay, "h", update, ["g", "m", "p"]),
            ),
            // The gradient or the parameter doubles as another input of the decay.
            (
                "gradient is the parameter",
                pair(
                    &["g", "ONE", "g", "WD"],
                    "g",
                    ["g", "m", "lr", "g"],
                    ["g", "m", "g"],
                ),
            ),
            (
                "parameter is a weight",
                pair(&["g", "p", "p", "WD"], "g", update, ["g", "m", "p"]),
            ),
        ];
        for (what, n) in cases {
            assert_eq!(run(&n).0, apart, "{what}");
        }
        // On a GPU, or with fusion off.
        let mut n = net(|n| decay_and_update(n, |_| {}));
        for op in &mut n.op {
            op.device_option = Some(Device::Cuda(0).to_proto());
        }
        assert_eq!(run(&n).0, apart);
        let mut m = Net::from_proto(net(|n| decay_and_update(n, |_| {})));
        m.set_arg("dpm_fuse", 0i64);
        assert_eq!(run(&m.into_proto()).0, apart);
    }
}
