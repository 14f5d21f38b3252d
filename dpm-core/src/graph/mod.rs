//! Building graphs: devices, blob names, name and device scopes, and the [`Net`]
//! builder that emits Caffe2-compatible [`NetDef`](crate::proto::NetDef)s.

mod args;
mod blob;
mod device;
mod net;
mod scope;

pub use args::{ArgValue, Args};
pub use blob::BlobRef;
pub use device::{Device, DeviceType};
pub use net::{Net, OpBuilder};
pub use scope::{is_device_scope, relative_name_error, Scope, SEPARATOR};
