//! dpm: synchronous data-parallel training of neural networks in Rust, with
//! graphs wire-compatible with Caffe2's `NetDef`.
//!
//! This crate re-exports the engine ([`dpm_core`]) and the procedural macros
//! ([`dpm_macros`]). Start from the [`prelude`].
//!
//! ```
//! use dpm::prelude::*;
//!
//! // y = relu(x · wᵀ + b) for one row, built and run by hand.
//! let mut model = ModelHelper::new("tiny");
//! let x = model.blob("x");
//! let y = model.fc("fc", &x, 3, 2)?;
//! let ws = Workspace::new();
//! ws.run_net_once(model.init_net().proto())?;
//! ws.feed("x", Tensor::from_vec([1, 3], vec![1.0f32, 2.0, 3.0]).unwrap());
//! ws.run_net_once(model.net().proto())?;
//! assert_eq!(ws.fetch(&y)?.dims(), &[1, 2]);
//! # Ok::<(), dpm::Error>(())
//! ```
#![warn(missing_docs)]

pub use dpm_core::*;
pub use dpm_macros::data_parallel;

/// The names most programs need.
pub mod prelude {
    pub use dpm_core::prelude::*;
    pub use dpm_macros::data_parallel;
}
