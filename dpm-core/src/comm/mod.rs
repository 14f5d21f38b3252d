//! Collectives: how replicas agree on gradients and parameters.
//!
//! The parallel layer only emits collective *ops* (`Allreduce`, `Broadcast`) over
//! the blobs of every device; this module provides their kernels. `local` does it
//! in shared memory for CPU replicas in one process; NCCL (GPUs) and MPI (hosts)
//! kernels register under the same op types for their device types.

pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;

use crate::graph::DeviceType;
use crate::ops::Registry;

/// Whether this process was started by an MPI launcher with more than one
/// process (`mpirun -np N`, `srun`): read from the launcher's environment, so
/// nothing is initialised to find out.
pub fn mpi_launched() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .filter_map(|v| v.trim().parse::<usize>().ok())
        .any(|n| n > 1)
}

/// Finalises MPI if this process started it (a process that exits without it
/// makes `mpirun` report the job failed); nothing otherwise.
pub fn finalize() {
    #[cfg(feature = "mpi")]
    if let Some(w) = mpi::started() {
        w.finalize();
    }
}

/// Op types that move data between devices: exempt from the namescope analysis.
pub fn is_collective(op_type: &str) -> bool {
    matches!(
        op_type,
        "Allreduce" | "Broadcast" | "Copy" | "NCCLAllreduce" | "NCCLBroadcast"
    )
}

/// The op type of a collective over replicas whose master is `master`: Caffe2's
/// `NCCLAllreduce` / `NCCLBroadcast` for CUDA replicas, dpm's in-process
/// `Allreduce` / `Broadcast` for CPU ones.
pub fn collective_type(base: &str, master: crate::graph::Device) -> String {
    match master {
        crate::graph::Device::Cuda(_) => format!("NCCL{base}"),
        crate::graph::Device::Cpu(_) => base.to_owned(),
    }
}

/// Registers the in-process collectives for CPU devices.
pub fn register(r: &mut Registry) {
    r.register("Allreduce", DeviceType::Cpu, local::Allreduce::create);
    r.register("Broadcast", DeviceType::Cpu, local::Broadcast::create);
    #[cfg(feature = "mpi")]
    mpi::register(r);
    #[cfg(feature = "cuda")]
    nccl::register(r);
}
