//! Grouping blobs by device: for each short name, its blob on every device.

use crate::error::{Error, Result};
use crate::graph::{BlobRef, Device};

/// One logical blob (a parameter, a gradient, …) and its copy on every device,
/// in device order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The name without the device scope (`fc1_w`).
    pub name: String,
    /// The blob on each device (`cpu_0/fc1_w`, `cpu_1/fc1_w`, …).
    pub blobs: Vec<BlobRef>,
}

/// Groups `blobs` by device. Every device must hold exactly one blob of each name,
/// in its own namescope, in the same order as the first device; anything else is
/// an error naming the blob.
pub fn group_by_device(devices: &[Device], blobs: &[BlobRef], what: &str) -> Result<Vec<Group>> {
    let scopes: Vec<String> = devices.iter().map(|d| d.namescope()).collect();
    let mut per_device: Vec<Vec<&BlobRef>> = vec![Vec::new(); devices.len()];
    for b in blobs {
        let d = b
            .first_scope()
            .and_then(|s| scopes.iter().position(|x| x == s))
            .ok_or_else(|| {
                Error::Config(format!(
                    "{what} `{b}` is not in the namescope of any device ({})",
                    scopes
                        .iter()
                        .map(|s| format!("{s}/"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        if per_device[d].iter().any(|x| x.short_name() == b.short_name()) {
            return Err(Error::Config(format!(
                "{what} `{b}` is defined twice on {}",
                devices[d]
            )));
        }
        per_device[d].push(b);
    }
    let master = &per_device[0];
    for (d, list) in per_device.iter().enumerate().skip(1) {
        for (i, b) in master.iter().enumerate() {
            match list.get(i) {
                Some(x) if x.short_name() == b.short_name() => {}
                Some(x) if list.iter().any(|y| y.short_name() == b.short_name()) => {
                    return Err(Error::Config(format!(
                        "{what} `{}` comes in a different order on {} (where `{x}` is at its place) than on {}",
                        b.short_name(),
                        devices[d],
                        devices[0]
                    )))
                }
                _ => {
                    return Err(Error::Config(format!(
                        "{what} `{}` exists on {} but not on {}",
                        b.short_name(),
                        devices[0],
                        devices[d]
                    )))
                }
            }
        }
        if let Some(extra) = list.get(master.len()) {
            return Err(Error::Config(format!(
                "{what} `{}` exists on {} but not on {}",
                extra.short_name(),
                devices[d],
                devices[0]
            )));
        }
    }
    Ok(master
        .iter()
        .enumerate()
        .map(|(i, b)| Group {
            name: b.short_name().to_owned(),
            blobs: per_device.iter().map(|l| l[i].clone()).collect(),
        })
        .collect())
}
