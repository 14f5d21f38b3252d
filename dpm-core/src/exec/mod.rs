//! Running nets: the [`Workspace`] of named blobs, and the two executors.
//!
//! A net is compiled once into a plan (adjacent ops fused where a fused kernel
//! saves passes over memory, `fuse.rs`; kernels built, blobs resolved,
//! dependencies computed; `plan.rs`), then run many times by the `simple` executor (ops in order,
//! on the calling thread) or the `dag` executor (ops as soon as their data and
//! control dependencies are done, on a pool of worker threads kept between
//! runs, `pool.rs`: through a shared queue, `dag.rs`, or, for data-parallel
//! nets of short ops, in a fixed order per replica, `lanes.rs`; or inline
//! when that is faster, `tune.rs`). A trainer's atomic steps save the
//! state blobs an op is about to change, as the op runs (`snapshot.rs`).

mod dag;
mod fuse;
mod lanes;
mod plan;
mod pool;
mod profile;
mod snapshot;
pub mod trace;
mod tune;
mod workspace;

pub(crate) use plan::BlobCell;
pub use profile::OpTime;
pub(crate) use snapshot::Snapshot;
pub use trace::{Overlap, Trace, TraceEvent};
pub use workspace::Workspace;

/// The cores this process may use, read once: `available_parallelism` reads
/// the cgroup files on every call (tens of µs), too slow for each op or run.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Which executor runs a net, from `NetDef.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetKind {
    /// In program order, on the calling thread.
    Simple,
    /// By dependencies, on `num_workers` threads.
    Dag,
}
