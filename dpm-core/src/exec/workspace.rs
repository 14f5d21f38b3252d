//! The workspace: named blobs, and nets compiled against them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::plan::{BlobCell, Plan};
use super::profile::{OpTime, Profile};
use super::snapshot::Snapshot;
use crate::error::{Error, Result};
use crate::proto::NetDef;
use crate::tensor::Tensor;

/// Named blobs plus the nets created in it (Caffe2's `Workspace`). Blobs are shared
/// by every net of the workspace: the init net writes the parameters the train
/// net reads.
pub struct Workspace {
    blobs: RwLock<HashMap<String, BlobCell>>,
    nets: Mutex<HashMap<String, Arc<Plan>>>,
    kernel_threads: AtomicUsize,
    profile: Profile,
    /// The blobs atomic steps guard (see [`Workspace::guard`]).
    snapshot: RwLock<Option<Arc<Snapshot>>>,
}

impl Default for Workspace {
    fn default() -> Self {
        Workspace {
            blobs: RwLock::default(),
            nets: Mutex::default(),
            kernel_threads: AtomicUsize::new(1),
            profile: Profile::default(),
            snapshot: RwLock::default(),
        }
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl Workspace {
    /// An empty workspace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets how many threads each CPU kernel of this workspace's nets may use
    /// (default 1: data parallelism over CPU devices already fills the cores).
    pub fn set_kernel_threads(&self, n: usize) {
        self.kernel_threads.store(n.max(1), Ordering::Relaxed);
    }

    /// Threads each CPU kernel of this workspace's nets may use.
    pub fn kernel_threads(&self) -> usize {
        self.kernel_threads.load(Ordering::Relaxed)
    }

    /// Switches per-op timing on or off for every net run in this workspace (the
    /// `prof_dag` of Caffe2). While on, each op's wall time is added to its op
    /// type's total, and an op on a GPU is waited for so that its time is the
    /// device's: GPU work no longer overlaps, so profiled runs are slower.
    ///
    /// ```
    /// # use dpm_core::prelude::*;
    /// let ws = Workspace::new();
    /// let mut net = Net::new("n");
    /// net.op("ConstantFill").output("x").arg("shape", vec![2i64, 3]).arg("value", 1.0f32).build();
    /// net.op("Relu").input("x").output("y").build();
    /// ws.set_profiling(true);
    /// ws.run_net_once(net.proto())?;
    /// let times = ws.op_times();
    /// assert_eq!(times.len(), 2);
    /// assert!(times.iter().all(|(_, t)| t.runs == 1));
    /// # Ok::<(), dpm_core::Error>(())
    /// ```
    pub fn set_profiling(&self, on: bool) {
        self.profile.set_totals(on);
    }

    /// Starts recording a timeline of every op the workspace's nets run (a
    /// trace in progress is dropped). GPU ops are then waited for one by one,
    /// as when profiling.
    pub fn start_trace(&self) {
        self.profile.start_trace();
    }

    /// Stops recording and returns the timeline since [`Workspace::start_trace`]
    /// (empty if none was started), covering `steps` training steps.
    ///
    /// ```
    /// # use dpm_core::prelude::*;
    /// let ws = Workspace::new();
    /// let mut net = Net::new("n");
    /// net.op("ConstantFill").output("x").arg("shape", vec![2i64]).arg("value", 1.0f32).build();
    /// net.op("Relu").input("x").output("y").build();
    /// ws.start_trace();
    /// ws.run_net_once(net.proto())?;
    /// let trace = ws.take_trace(1);
    /// assert_eq!(trace.events.len(), 2);
    /// assert!(trace.to_chrome_json().contains("\"Relu\""));
    /// # Ok::<(), dpm_core::Error>(())
    /// ```
    pub fn take_trace(&self, steps: usize) -> super::trace::Trace {
        let (events, nets) = self.profile.take_trace();
        super::trace::Trace { events, nets, steps }
    }

    /// Time per op type over the profiled runs so far, the costliest first.
    pub fn op_times(&self) -> Vec<(String, OpTime)> {
        self.profile.snapshot()
    }

    /// Forgets the times gathered so far (profiling stays as it is).
    pub fn reset_op_times(&self) {
        self.profile.clear();
    }

    fn profile(&self) -> Option<&Profile> {
        self.profile.active().then_some(&self.profile)
    }

    /// Guards blobs `names` for atomic steps (the first call decides; later
    /// ones keep it): the nets created from now on save each of them before
    /// an op changes it during a guarded step (see [`Snapshot`]).
    pub(crate) fn guard(&self, names: &[String]) {
        write(&self.snapshot)
            .get_or_insert_with(|| Arc::new(Snapshot::new(names.iter().map(|n| self.cell(n)).collect())));
    }

    /// The guard of [`Workspace::guard`], if any: for the nets being compiled,
    /// and to begin, end and undo steps with.
    pub(crate) fn snapshot(&self) -> Option<Arc<Snapshot>> {
        read(&self.snapshot).clone()
    }

    /// The cell of `name`, created empty if absent.
    pub(crate) fn cell(&self, name: &str) -> BlobCell {
        if let Some(c) = read(&self.blobs).get(name) {
            return c.clone();
        }
        write(&self.blobs).entry(name.to_owned()).or_default().clone()
    }

    /// Sets blob `name` to `tensor`, on whatever device `tensor` is (see
    /// [`Tensor::to_device`]).
    pub fn feed(&self, name: impl AsRef<str>, tensor: Tensor) {
        let cell = self.cell(name.as_ref());
        *write(&cell) = Some(tensor);
    }

    /// Runs `f` on blob `name` without copying it.
    pub fn with_blob<R>(&self, name: impl AsRef<str>, f: impl FnOnce(&Tensor) -> R) -> Result<R> {
        let name = name.as_ref();
        let cell = read(&self.blobs).get(name).cloned();
        let missing = || Error::MissingBlob {
            name: name.to_owned(),
        };
        let cell = cell.ok_or_else(missing)?;
        let guard = read(&cell);
        guard.as_ref().map(f).ok_or_else(missing)
    }

    /// A copy of blob `name` in host memory, wherever the blob lives.
    pub fn fetch(&self, name: impl AsRef<str>) -> Result<Tensor> {
        self.with_blob(name, Tensor::to_host)?
    }

    /// The device blob `name` lives on.
    pub fn blob_device(&self, name: impl AsRef<str>) -> Result<crate::graph::Device> {
        self.with_blob(name, Tensor::device)
    }

    /// Whether blob `name` holds a tensor.
    pub fn has_blob(&self, name: impl AsRef<str>) -> bool {
        self.with_blob(name, |_| ()).is_ok()
    }

    /// Names of the blobs holding tensors, sorted.
    pub fn blob_names(&self) -> Vec<String> {
        let blobs = read(&self.blobs);
        let mut v: Vec<_> = blobs
            .iter()
            .filter(|(_, c)| read(c).is_some())
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// Compiles `net` and keeps it under its name, replacing any net of that name.
    /// Errors here (unknown op, bad argument, malformed dependencies) come before
    /// anything runs.
    pub fn create_net(&self, net: &NetDef) -> Result<()> {
        let plan = Arc::new(Plan::new(net, self)?);
        self.nets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(net.net_name().to_owned(), plan);
        Ok(())
    }

    /// Runs the net created as `name`.
    pub fn run_net(&self, name: &str) -> Result<()> {
        let plan = self
            .nets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Error::InvalidNet {
                net: name.to_owned(),
                reason: "no net of this name was created in the workspace".into(),
            })?;
        plan.run(self.kernel_threads(), self.profile())
    }

    /// Compiles and runs `net` once, without keeping it.
    pub fn run_net_once(&self, net: &NetDef) -> Result<()> {
        Plan::new(net, self)?.run(self.kernel_threads(), self.profile())
    }
}
