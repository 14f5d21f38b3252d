//! Name and device scopes. Ops added inside a name scope get names prefixed with
//! it; ops added inside a device scope run on that device. Scopes nest.

use super::{BlobRef, Device};

/// Separator between name scopes, as in Caffe2.
pub const SEPARATOR: &str = "/";

/// The current name prefix and device of a builder.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    names: Vec<String>,
    devices: Vec<Device>,
}

impl Scope {
    /// Enters a name scope.
    pub fn push_name(&mut self, name: &str) {
        self.names.push(name.trim_end_matches(SEPARATOR).to_owned());
    }

    /// Leaves the innermost name scope.
    pub fn pop_name(&mut self) {
        self.names.pop();
    }

    /// Enters a device scope.
    pub fn push_device(&mut self, device: Device) {
        self.devices.push(device);
    }

    /// Leaves the innermost device scope.
    pub fn pop_device(&mut self) {
        self.devices.pop();
    }

    /// The innermost device, if any.
    pub fn device(&self) -> Option<Device> {
        self.devices.last().copied()
    }

    /// The name prefix, with trailing separator (`""` or `cpu_0/`).
    pub fn prefix(&self) -> String {
        let mut p = String::new();
        for n in &self.names {
            p.push_str(n);
            p.push_str(SEPARATOR);
        }
        p
    }

    /// The full name of `name` in this scope.
    pub fn blob(&self, name: &str) -> BlobRef {
        BlobRef::new(format!("{}{name}", self.prefix()))
    }
}
