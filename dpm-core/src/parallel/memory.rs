//! `optimize_gradient_memory`: gradient blobs whose lifetimes in the net do not
//! overlap share one buffer (Caffe2 memonger's `share_grad_blobs`).
//!
//! Renaming is enough: the executor derives dependencies from names, so a blob
//! written into a shared buffer waits until the previous occupant's last reader
//! is done.

use std::collections::{HashMap, HashSet};

use crate::proto::NetDef;

/// Renames the intermediate gradient blobs of `namescope` (outputs of gradient ops
/// not in `keep`) so that blobs with disjoint lifetimes share a name
/// `<namescope>/__shared_grad_<k>`. Returns the number of buffers used.
pub fn share_gradient_blobs(net: &mut NetDef, namescope: &str, keep: &HashSet<String>) -> usize {
    let prefix = format!("{namescope}/");
    // First and last op index touching each candidate: an intermediate gradient is
    // first touched by the gradient op that writes it, and never outside this window.
    let mut first_touch: HashMap<&str, usize> = HashMap::new();
    let mut life: HashMap<String, (usize, usize)> = HashMap::new();
    for (i, op) in net.op.iter().enumerate() {
        for b in op.input.iter().chain(&op.output).chain(&op.control_input) {
            first_touch.entry(b.as_str()).or_insert(i);
        }
        if op.is_gradient_op == Some(true) {
            for o in &op.output {
                if o.starts_with(&prefix) && !keep.contains(o) && first_touch[o.as_str()] == i {
                    life.entry(o.clone()).or_insert((i, i));
                }
            }
        }
        for b in op.input.iter().chain(&op.output).chain(&op.control_input) {
            if let Some(l) = life.get_mut(b) {
                l.1 = i;
            }
        }
    }
    let mut order: Vec<(String, (usize, usize))> = life.into_iter().collect();
    order.sort_by(|a, b| (a.1 .0, &a.0).cmp(&(b.1 .0, &b.0)));
    let mut buffers: Vec<usize> = Vec::new(); // last use of each buffer's current occupant
    let mut rename: HashMap<String, String> = HashMap::new();
    for (blob, (start, end)) in order {
        let k = match buffers.iter().position(|&last| last < start) {
            Some(k) => k,
            None => {
                buffers.push(0);
                buffers.len() - 1
            }
        };
        buffers[k] = end;
        rename.insert(blob, format!("{prefix}__shared_grad_{k}"));
    }
    for op in &mut net.op {
        for b in op
            .input
            .iter_mut()
            .chain(op.output.iter_mut())
            .chain(op.control_input.iter_mut())
        {
            if let Some(n) = rename.get(b) {
                *b = n.clone();
            }
        }
    }
    buffers.len()
}
