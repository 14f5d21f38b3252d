//! Synchronous batch norm (Caffe2's `combine_spatial_bn`, PyTorch's
//! `SyncBatchNorm`): every replica normalises with the statistics of the whole
//! global batch, and its scale and bias gradients are those of the whole batch.
//!
//! A rewrite of the train net after autodiff. The replicas' ops are first
//! interleaved (op i of every device, then op i + 1, …: the replicas are built
//! by one function, so their op lists match), so that one collective can stand
//! between the ops of all devices. Then before each training `SpatialBN`, every
//! device's `ChannelStats` (Σx, Σx²) is all-reduced and the op takes the sums
//! (`num_batches` = devices); before each `SpatialBNGradient`, every device's
//! `ChannelBackpropStats` (Σ dY·x̂, Σ dY) is all-reduced likewise.

use crate::error::{Error, Result};
use crate::graph::{Device, Net};
use crate::proto::{NetDef, OperatorDef};

/// Rewrites `net` (a train net after autodiff, before the gradient all-reduces)
/// for synchronous batch norm over `devices` of one process.
pub(super) fn synchronize_batch_norm(net: &mut NetDef, devices: &[Device]) -> Result<()> {
    if devices.len() < 2 {
        return Ok(());
    }
    let per_device = split_by_device(&net.op, devices)?;
    let len = per_device[0].len();
    let mut out: Vec<OperatorDef> = Vec::with_capacity(net.op.len() + 8 * len);
    for i in 0..len {
        let ops: Vec<&OperatorDef> = per_device.iter().map(|d| d[i]).collect();
        if let Some(o) = ops.iter().find(|o| o.op_type() != ops[0].op_type()) {
            return Err(Error::Config(format!(
                "sync batch norm needs identical replicas, but op {i} is {} on one device and {} on another",
                ops[0].op_type(),
                o.op_type()
            )));
        }
        let n = devices.len() as i64;
        match ops[0].op_type() {
            "SpatialBN" if ops[0].output.len() == 5 => {
                // Σx and Σx² of each device, all-reduced, then read by each BN.
                let stats = |o: &OperatorDef| {
                    [
                        format!("{}_sync_sum", o.output[0]),
                        format!("{}_sync_sumsq", o.output[0]),
                    ]
                };
                out.extend(collect_stats(
                    devices,
                    &ops,
                    "ChannelStats",
                    |o| vec![o.input[0].clone()],
                    stats,
                ));
                out.extend(reading_stats(&ops, stats, n));
            }
            "SpatialBNGradient" if !is_test(ops[0]) => {
                let stats = |o: &OperatorDef| {
                    [
                        format!("{}_sync_dscale", o.output[0]),
                        format!("{}_sync_dbias", o.output[0]),
                    ]
                };
                // ChannelBackpropStats(X, mean, inv_std, dY) from SpatialBNGradient(X, scale, dY, mean, inv_std).
                let inputs = |o: &OperatorDef| {
                    vec![
                        o.input[0].clone(),
                        o.input[3].clone(),
                        o.input[4].clone(),
                        o.input[2].clone(),
                    ]
                };
                out.extend(collect_stats(
                    devices,
                    &ops,
                    "ChannelBackpropStats",
                    inputs,
                    stats,
                ));
                out.extend(reading_stats(&ops, stats, n));
            }
            _ => out.extend(ops.into_iter().cloned()),
        }
    }
    net.op = out;
    Ok(())
}

/// Each device's `op_type(inputs(op)) → stats(op)`, then one in-place
/// `Allreduce` per statistic over the devices (on the first device, as every
/// collective).
fn collect_stats(
    devices: &[Device],
    ops: &[&OperatorDef],
    op_type: &str,
    inputs: impl Fn(&OperatorDef) -> Vec<String>,
    stats: impl Fn(&OperatorDef) -> [String; 2],
) -> Vec<OperatorDef> {
    let mut scratch = Net::new("sync_bn");
    for (o, &d) in ops.iter().zip(devices) {
        let mut op = scratch
            .op(op_type)
            .inputs(inputs(o).iter().map(String::as_str))
            .outputs(stats(o).iter().map(String::as_str))
            .device(d);
        if o.is_gradient_op == Some(true) {
            op = op.gradient_op();
        }
        op.build();
    }
    for k in 0..2 {
        let blobs: Vec<String> = ops.iter().map(|o| stats(o)[k].clone()).collect();
        let mut op = scratch
            .op(&crate::comm::collective_type("Allreduce", devices[0]))
            .inputs(blobs.iter().map(String::as_str))
            .outputs(blobs.iter().map(String::as_str))
            .device(devices[0]);
        if ops[0].is_gradient_op == Some(true) {
            op = op.gradient_op();
        }
        op.build();
    }
    scratch.into_proto().op
}

fn is_test(op: &OperatorDef) -> bool {
    crate::graph::Args(&op.arg).int("is_test", 0).unwrap_or(0) != 0
}

/// Each device's op, reading its all-reduced `stats` over `n` batches.
fn reading_stats(
    ops: &[&OperatorDef],
    stats: impl Fn(&OperatorDef) -> [String; 2],
    n: i64,
) -> Vec<OperatorDef> {
    ops.iter()
        .map(|o| {
            let mut o = (*o).clone();
            o.input.extend(stats(&o));
            set_int(&mut o, "num_batches", n);
            o
        })
        .collect()
}

fn set_int(op: &mut OperatorDef, name: &str, v: i64) {
    op.arg.retain(|a| a.name.as_deref() != Some(name));
    op.arg.push(crate::graph::ArgValue::Int(v).to_proto(name));
}

/// Each device's ops in net order, by the replica scope of their outputs.
fn split_by_device<'n>(ops: &'n [OperatorDef], devices: &[Device]) -> Result<Vec<Vec<&'n OperatorDef>>> {
    let scopes: Vec<String> = devices.iter().map(|d| format!("{}/", d.namescope())).collect();
    let mut per: Vec<Vec<&OperatorDef>> = vec![Vec::new(); devices.len()];
    for (i, op) in ops.iter().enumerate() {
        let blobs = || op.output.iter().chain(&op.input);
        let owner = scopes
            .iter()
            .position(|s| blobs().all(|b| b.starts_with(s.as_str())));
        match owner {
            Some(d) => per[d].push(op),
            None => {
                return Err(Error::Config(format!(
                    "sync batch norm: op #{i} ({}) is not within one replica",
                    op.op_type()
                )))
            }
        }
    }
    if per.iter().any(|p| p.len() != per[0].len()) {
        return Err(Error::Config(
            "sync batch norm needs identical replicas, but they have different numbers of ops".into(),
        ));
    }
    Ok(per)
}
