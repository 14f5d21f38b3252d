//! dpm-core: the engine of dpm.
//!
//! Graphs are Caffe2-compatible protobuf messages ([`proto`]) built with the
//! [`graph::Net`] builder, differentiated by [`autodiff`], and run on a
//! [`exec::Workspace`] by kernels from the [`ops`] registry. [`model::ModelHelper`]
//! assembles layers, parameters and optimisers.
//!
//! ```
//! use dpm_core::prelude::*;
//!
//! let mut net = Net::new("demo");
//! net.op("ConstantFill").output("x").arg("shape", vec![2i64, 3]).arg("value", 1.5f32).build();
//! net.op("Scale").input("x").output("y").arg("scale", 2.0f32).build();
//! let ws = Workspace::new();
//! ws.run_net_once(net.proto())?;
//! assert_eq!(ws.fetch("y")?.data::<f32>().unwrap(), &[3.0; 6]);
//! # Ok::<(), dpm_core::Error>(())
//! ```
#![warn(missing_docs)]

pub mod autodiff;
pub mod checkpoint;
pub mod comm;
pub mod cuda;
pub mod data;
pub mod deploy;
pub use deploy::Predictor;
pub mod error;
pub mod exec;
pub mod graph;
pub mod model;
pub mod ops;
pub mod parallel;
pub mod proto;
pub mod tensor;

pub use error::{Error, Result};

/// The names most programs need.
pub mod prelude {
    pub use crate::error::{Error, Result};
    pub use crate::exec::Workspace;
    pub use crate::graph::{BlobRef, Device, DeviceType, Net};
    pub use crate::model::{Adagrad, Adam, ConvSpec, Init, LrPolicy, ModelHelper, RmsProp, Sgd};
    pub use crate::parallel::{Blob, DeviceModel, Losses, Parallelize, Rendezvous, Trainer};
    pub use crate::proto::{NetDef, OperatorDef, TensorProto, TensorProtos, Wire};
    pub use crate::tensor::{DataType, Shape, Tensor};
}
