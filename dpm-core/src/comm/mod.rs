//! Collectives: how replicas agree on gradients and parameters.
//!
//! The parallel layer only emits collective *ops* (`Allreduce`, `Broadcast`) over
//! the blobs of every device; this module provides their kernels. `local` does it
//! in shared memory for CPU replicas in one process; NCCL (GPUs) and MPI (hosts)
//! kernels register under the same op types for their device types.

pub mod local;

use crate::graph::DeviceType;
use crate::ops::Registry;

/// Op types that move data between devices: exempt from the namescope analysis.
pub fn is_collective(op_type: &str) -> bool {
    matches!(op_type, "Allreduce" | "Broadcast" | "Copy")
}

/// Registers the in-process collectives for CPU devices.
pub fn register(r: &mut Registry) {
    r.register("Allreduce", DeviceType::Cpu, local::Allreduce::create);
    r.register("Broadcast", DeviceType::Cpu, local::Broadcast::create);
}
