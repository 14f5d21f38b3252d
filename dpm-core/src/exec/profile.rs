//! Time per op type, as Caffe2's `prof_dag` net reported it: switched on with
//! [`Workspace::set_profiling`](super::Workspace::set_profiling), read with
//! [`Workspace::op_times`](super::Workspace::op_times).
//!
//! A CPU op's time is its wall time. A GPU op's time is its device time, from
//! CUDA events recorded on its stream before and after its work; GPU ops enqueue
//! one at a time while profiling, so that no other op's work falls between an
//! op's two events. The events are read when the net's run has synchronised.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::graph::Device;

/// What the ops of one type cost over the profiled runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpTime {
    /// How many times an op of this type ran.
    pub runs: u64,
    /// Their time, summed: wall time on a CPU, device time on a GPU.
    pub total: Duration,
    /// The host's part, summed: the whole op on a CPU; for a GPU op, the time
    /// its kernel took to check its arguments and enqueue its work. When a GPU
    /// op's host time exceeds its device time, the device waits on the host.
    pub host: Duration,
}

/// The running totals of a workspace.
#[derive(Default)]
pub(crate) struct Profile {
    by_type: Mutex<HashMap<String, OpTime>>,
    /// Held by a GPU op while it enqueues its work between its two events.
    #[cfg(feature = "cuda")]
    gpu_turn: Mutex<()>,
    /// GPU ops whose events have not been read yet.
    #[cfg(feature = "cuda")]
    pending: Mutex<Vec<PendingGpuOp>>,
}

#[cfg(feature = "cuda")]
type PendingGpuOp = (
    String,
    Duration,
    cudarc::driver::CudaEvent,
    cudarc::driver::CudaEvent,
);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Profile {
    /// Runs `op` (of type `op_type`, on `device`) and accounts for its time.
    pub(crate) fn time<T>(&self, op_type: &str, device: Device, op: impl FnOnce() -> Result<T>) -> Result<T> {
        match device {
            Device::Cpu(_) => {
                let start = Instant::now();
                let out = op()?;
                let took = start.elapsed();
                self.add(op_type, took, took);
                Ok(out)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let gpu = crate::cuda::gpu(n)?;
                let _turn = lock(&self.gpu_turn);
                let start = gpu.timing_event()?;
                let host = Instant::now();
                let out = op()?;
                let host = host.elapsed();
                let end = gpu.timing_event()?;
                lock(&self.pending).push((op_type.to_owned(), host, start, end));
                Ok(out)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => op(),
        }
    }

    /// Reads the events of GPU ops; called once their devices are synchronised.
    pub(crate) fn settle(&self) {
        #[cfg(feature = "cuda")]
        for (op_type, host, start, end) in lock(&self.pending).drain(..) {
            if let Ok(ms) = start.elapsed_ms(&end) {
                self.add(
                    &op_type,
                    Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3),
                    host,
                );
            }
        }
    }

    fn add(&self, op_type: &str, took: Duration, host: Duration) {
        let mut m = lock(&self.by_type);
        let t = m.entry(op_type.to_owned()).or_default();
        t.runs += 1;
        t.total += took;
        t.host += host;
    }

    /// The totals, the most expensive op type first.
    pub(crate) fn snapshot(&self) -> Vec<(String, OpTime)> {
        let m = lock(&self.by_type);
        let mut v: Vec<_> = m.iter().map(|(k, t)| (k.clone(), *t)).collect();
        v.sort_by(|a, b| b.1.total.cmp(&a.1.total).then_with(|| a.0.cmp(&b.0)));
        v
    }

    pub(crate) fn clear(&self) {
        lock(&self.by_type).clear();
    }
}
