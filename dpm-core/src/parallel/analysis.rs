//! Which device each blob lives on, and the check that no op reaches into
//! another device's namescope (Caffe2's `_InferBlobDevice` / `_AnalyzeOperators`).

use std::collections::HashMap;

use crate::comm::is_collective;
use crate::error::{Error, Result};
use crate::graph::{BlobRef, Device};
use crate::proto::NetDef;

/// The device whose namescope `blob` is in, if any.
fn scope_device(blob: &str, devices: &[Device]) -> Option<Device> {
    let scope = BlobRef::new(blob).first_scope().map(str::to_owned)?;
    devices.iter().copied().find(|d| d.namescope() == scope)
}

/// Maps every blob the nets touch to a device: its namescope's device, or else
/// the device of the op that last touched it.
pub fn infer_blob_devices<'a>(
    nets: impl IntoIterator<Item = &'a NetDef>,
    devices: &[Device],
) -> HashMap<String, Device> {
    let mut map = HashMap::new();
    for net in nets {
        for op in &net.op {
            let op_device = op.device_option.as_ref().and_then(|d| Device::from_proto(d).ok());
            for b in op.input.iter().chain(&op.output) {
                if let Some(d) = scope_device(b, devices).or(op_device) {
                    map.insert(b.clone(), d);
                }
            }
        }
    }
    map
}

/// Checks that every op other than copies and collectives touches the blobs of
/// one device only, and, for GPU ops, that this is the op's own GPU.
pub fn check_namescopes(net: &NetDef, devices: &[Device]) -> Result<()> {
    for (i, op) in net.op.iter().enumerate() {
        if is_collective(op.op_type()) {
            continue;
        }
        let own = op
            .device_option
            .as_ref()
            .and_then(|d| Device::from_proto(d).ok())
            .filter(|d| matches!(d, Device::Cuda(_)));
        let mut seen: Option<(Device, &str)> = own.map(|d| (d, ""));
        for b in op.input.iter().chain(&op.output) {
            let Some(d) = scope_device(b, devices) else {
                continue;
            };
            match seen {
                None => seen = Some((d, b)),
                Some((s, first)) if s != d => {
                    let on = if first.is_empty() {
                        format!("runs on {s}")
                    } else {
                        format!("touches `{first}` of {s}")
                    };
                    return Err(Error::Config(format!(
                        "op #{i} `{}` {on} but also touches `{b}` of {d}; only Copy and collectives may cross devices",
                        op.op_type()
                    )));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Each collective of `nets`, in issue order, described (type, blobs, and the
/// shapes the init net gives them) and hashed; the last entry stands for every
/// other op. Ranks compare these before their first collective.
pub(crate) fn collective_signatures(nets: &[&NetDef]) -> Vec<(String, u64)> {
    use crate::ops::cpu::rng::stable_hash;
    let mut shapes: HashMap<&str, String> = HashMap::new();
    for net in nets {
        for op in &net.op {
            if let (Some(out), Some(dims)) = (op.output.first(), crate::graph::Args(&op.arg).ints("shape")) {
                shapes.insert(out, format!("{dims:?}"));
            }
        }
    }
    let mut sigs = Vec::new();
    let mut rest = String::new();
    for net in nets {
        for op in &net.op {
            if is_collective(op.op_type()) && op.op_type() != "Copy" {
                let blobs: Vec<String> = op
                    .input
                    .iter()
                    .map(|b| format!("{b}{}", shapes.get(b.as_str()).map_or("", String::as_str)))
                    .collect();
                let d = format!(
                    "{} of net `{}` over {}",
                    op.op_type(),
                    net.net_name(),
                    blobs.join(", ")
                );
                let h = stable_hash(&d);
                sigs.push((d, h));
            } else {
                rest.push_str(&format!("{op:?}"));
            }
        }
    }
    let d = "the same nets apart from collectives (an op, argument or shape differs)".to_owned();
    sigs.push((d, stable_hash(&rest)));
    sigs
}
