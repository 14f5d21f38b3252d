//! Name and device scopes. Ops added inside a name scope get names prefixed with
//! it; ops added inside a device scope run on that device. Scopes nest.

use super::{BlobRef, Device};

/// Separator between name scopes, as in Caffe2.
pub const SEPARATOR: &str = "/";

/// Why `name` cannot be a blob name relative to a device scope, if it cannot:
/// the rule (and the words) of `#[data_parallel]`'s compile-time check, applied
/// at build time to names the macro cannot see (built with `format!`, held in
/// variables). Nested scopes come from `name_scope`, never from a name.
pub fn relative_name_error(name: &str) -> Option<String> {
    if name.contains(SEPARATOR) {
        return Some(
            "blob names are relative to the device scope and cannot contain the namescope separator `/`; \
             dpm adds `cpu_N/` or `gpu_N/` for each device"
                .into(),
        );
    }
    device_prefix(name).map(|p| {
        format!(
            "`{p}` names one device, but blob names are relative to the device scope: \
             this function is built once per device"
        )
    })
}

/// Whether `name` is a device's name scope, `cpu_N` or `gpu_N`.
pub fn is_device_scope(name: &str) -> bool {
    device_prefix(name) == Some(name)
}

/// `cpu_N` or `gpu_N` at a word start of `s`, if any.
fn device_prefix(s: &str) -> Option<&str> {
    let bytes = s.as_bytes();
    (0..s.len()).find_map(|start| {
        let at_word_start =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let rest = s.get(start..)?;
        if !at_word_start || !(rest.starts_with("cpu_") || rest.starts_with("gpu_")) {
            return None;
        }
        let digits = rest[4..].bytes().take_while(u8::is_ascii_digit).count();
        let end = 4 + digits;
        let after_ok = rest
            .as_bytes()
            .get(end)
            .is_none_or(|c| !c.is_ascii_alphanumeric());
        (digits > 0 && after_ok).then(|| &rest[..end])
    })
}

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

    /// Whether a replica is being built: a name scope is a device's (`cpu_N`).
    pub fn in_replica(&self) -> bool {
        self.names.iter().any(|n| is_device_scope(n))
    }

    /// The full name of `name` in this scope.
    pub fn blob(&self, name: &str) -> BlobRef {
        BlobRef::new(format!("{}{name}", self.prefix()))
    }
}
