//! dpm: synchronous data-parallel training of neural networks in Rust, with
//! graphs wire-compatible with Caffe2's `NetDef`.
//!
//! Write the forward pass once, for one device, as a `#[data_parallel]` function;
//! [`Parallelize`](parallel::Parallelize) replicates it on every device, scales
//! the losses, derives the backward pass, all-reduces the gradients (last layer
//! first, overlapping the rest of the backward pass) and updates every replica.
//!
//! ```
//! use dpm::prelude::*;
//!
//! #[data_parallel]
//! fn forward(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
//!     let x = m.input_with_shape("data", [4]);
//!     let label = m.input("label");
//!     let h = m.fc("fc1", x, 8)?;
//!     let h = m.relu(h)?;
//!     let logits = m.fc("fc2", h, 2)?;
//!     let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
//!     Ok(loss.into())
//! }
//!
//! // A global batch of 8 rows: class 1 when the features are positive.
//! let batch = || -> Result<Vec<(String, Tensor)>> {
//!     let data: Vec<f32> = (0..32).map(|i| if (i / 4) % 2 == 0 { 1.0 } else { -1.0 }).collect();
//!     let label: Vec<i32> = (0..8).map(|r| i32::from(r % 2 == 0)).collect();
//!     Ok(vec![
//!         ("data".into(), Tensor::from_vec([8, 4], data).unwrap()),
//!         ("label".into(), Tensor::from_vec([8], label).unwrap()),
//!     ])
//! };
//! let mut trainer = Parallelize::new(ModelHelper::new("demo"))
//!     .devices([Device::cpu(0), Device::cpu(1)]) // each device gets 4 rows
//!     .input(batch)
//!     .forward(forward)
//!     .update(Sgd::new(0.5))
//!     .build()?;
//! trainer.run_init()?;
//! trainer.run(20)?;
//! assert!(trainer.loss()? < 0.1);
//! // The replicas hold bitwise-identical parameters.
//! let w0 = trainer.fetch("fc1_w", Device::cpu(0))?;
//! assert!(w0.bitwise_eq(&trainer.fetch("fc1_w", Device::cpu(1))?));
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
