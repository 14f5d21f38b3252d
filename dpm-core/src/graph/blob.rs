//! Blob references: full names of blobs in a workspace.

use std::fmt;

use super::scope::SEPARATOR;

/// The full name of a blob (`cpu_0/fc1_w`). Strings given to op builders are
/// relative to the current name scope; a `BlobRef` is already absolute.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobRef(String);

impl BlobRef {
    /// A reference to the blob with this full name.
    pub fn new(full_name: impl Into<String>) -> Self {
        BlobRef(full_name.into())
    }

    /// The full name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The name without its first scope (`cpu_0/fc1_w` → `fc1_w`), as Caffe2's
    /// data_parallel_model names a parameter across devices.
    pub fn short_name(&self) -> &str {
        match self.0.find(SEPARATOR) {
            Some(i) => &self.0[i + SEPARATOR.len()..],
            None => &self.0,
        }
    }

    /// The first scope of the name (`cpu_0/fc1_w` → `cpu_0`), if any.
    pub fn first_scope(&self) -> Option<&str> {
        self.0.find(SEPARATOR).map(|i| &self.0[..i])
    }

    /// The conventional name of this blob's gradient.
    pub fn grad(&self) -> BlobRef {
        BlobRef(format!("{}_grad", self.0))
    }

    /// A blob named `self` plus `suffix`.
    pub fn with_suffix(&self, suffix: &str) -> BlobRef {
        BlobRef(format!("{}{suffix}", self.0))
    }
}

impl fmt::Debug for BlobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for BlobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for BlobRef {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<BlobRef> for String {
    fn from(b: BlobRef) -> String {
        b.0
    }
}
