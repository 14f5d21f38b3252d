//! A net compiled for a workspace: kernels built, blobs resolved to cells, locks
//! ordered, dependencies computed. Built once, run many times.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::profile::Profile;
use super::tune::Choice;
use super::{NetKind, Workspace};
use crate::error::{Error, Result};
use crate::graph::{Args, Device};
use crate::ops::{Kernel, OpContext, OpList, Registry};
use crate::proto::{NetDef, OperatorDef};
use crate::tensor::Tensor;

/// One blob's storage; `None` until something writes it.
pub(crate) type BlobCell = Arc<RwLock<Option<Tensor>>>;

/// Where a kernel's input comes from at run time.
enum InputSrc {
    /// A read lock (the blob is not written by the op).
    Read(usize),
    /// A copy of a blob the op also writes (in place without declaring it).
    Clone(usize),
    /// Moved into output `out` by a declared in-place pair; `from` is the source
    /// lock when the two names differ and the value has to be copied over.
    InPlace { out: usize, from: Option<usize> },
}

/// One op, ready to run.
pub(crate) struct Step {
    index: usize,
    device: Device,
    /// The replica the op belongs to (`N` of its outputs' `cpu_N/` or `gpu_N/`
    /// scope), whose worker the `dag` executor prefers; `None` for collectives
    /// and unscoped ops, which any worker takes.
    pub(super) lane: Option<usize>,
    def: OperatorDef,
    kernel: Box<dyn Kernel>,
    /// Unique blobs the op touches, sorted by name; `true` = write.
    locks: Vec<(BlobCell, bool)>,
    inputs: Vec<InputSrc>,
    /// Lock index of each output.
    outputs: Vec<usize>,
    /// What the op saves in an atomic step; `None` if it writes no guarded blob.
    saves: Option<Saves>,
}

/// The atomic-step guard, with `(lock, slot)` of each guarded blob an op
/// writes (see `snapshot.rs`).
struct Saves {
    snap: Arc<super::Snapshot>,
    slots: OpList<(usize, usize)>,
}

enum Guard<'a> {
    R(RwLockReadGuard<'a, Option<Tensor>>),
    W(RwLockWriteGuard<'a, Option<Tensor>>),
}

impl Guard<'_> {
    fn get(&self) -> Option<&Tensor> {
        match self {
            Guard::R(g) => g.as_ref(),
            Guard::W(g) => g.as_ref(),
        }
    }
}

impl Step {
    fn new(index: usize, def: &OperatorDef, net: &NetDef, ws: &Workspace) -> Result<Step> {
        let device = def
            .device_option
            .as_ref()
            .or(net.device_option.as_ref())
            .map(Device::from_proto)
            .transpose()?
            .unwrap_or(Device::Cpu(0));
        // A missing driver, GPU or feature is reported here, before anything runs.
        if let Device::Cuda(n) = device {
            crate::cuda::check_device(n)?;
        }
        let kernel = Registry::global().create(def, device.device_type())?;
        for (i, o) in kernel.in_place() {
            if *i >= def.input.len() || *o >= def.output.len() {
                return Err(Error::Arity {
                    what: "inputs/outputs",
                    expected: format!("enough for in-place pair (input {i}, output {o})"),
                    got: def.input.len().min(def.output.len()),
                });
            }
        }
        for (j, out) in def.output.iter().enumerate() {
            if def.output[..j].contains(out) {
                return Err(Error::value(out, "written twice by one op"));
            }
        }
        let mut names: Vec<(&str, bool)> = def.output.iter().map(|n| (n.as_str(), true)).collect();
        for n in &def.input {
            if !names.iter().any(|(m, _)| m == n) {
                names.push((n, false));
            }
        }
        names.sort_unstable();
        let lock_of = |n: &str| names.iter().position(|(m, _)| *m == n).expect("name was added");
        let inputs = def
            .input
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let l = lock_of(name);
                match kernel.in_place().iter().find(|(ii, _)| *ii == i) {
                    Some(&(_, o)) if def.output[o] == *name => InputSrc::InPlace { out: o, from: None },
                    // The kernel reads a source of its own itself.
                    Some(_) if kernel.reads_in_place_source() && !names[l].1 => InputSrc::Read(l),
                    Some(&(_, o)) => InputSrc::InPlace {
                        out: o,
                        from: Some(l),
                    },
                    None if names[l].1 => InputSrc::Clone(l),
                    None => InputSrc::Read(l),
                }
            })
            .collect();
        let outputs = def.output.iter().map(|n| lock_of(n)).collect();
        let locks: Vec<(BlobCell, bool)> = names.iter().map(|(n, w)| (ws.cell(n), *w)).collect();
        let saves = ws.snapshot().and_then(|snap| {
            let slots: OpList<(usize, usize)> = (locks.iter().enumerate())
                .filter(|(_, (_, w))| *w)
                .filter_map(|(l, (c, _))| Some((l, snap.slot_of(c)?)))
                .collect();
            (!slots.is_empty()).then_some(Saves { snap, slots })
        });
        Ok(Step {
            index,
            device,
            lane: replica_lane(def),
            def: def.clone(),
            kernel,
            locks,
            inputs,
            outputs,
            saves,
        })
    }

    fn missing(&self, i: usize) -> Error {
        Error::MissingBlob {
            name: self.def.input[i].clone(),
        }
    }

    /// Runs the kernel with the op's blobs locked. Errors are not yet wrapped.
    fn execute(&self, threads: usize) -> Result<()> {
        // Locks are taken in name order, so two ops can never wait on each other.
        let mut guards: OpList<Guard<'_>> = self
            .locks
            .iter()
            .map(|(c, w)| match w {
                true => Guard::W(c.write().unwrap_or_else(|e| e.into_inner())),
                false => Guard::R(c.read().unwrap_or_else(|e| e.into_inner())),
            })
            .collect();
        // In an atomic step, what the op is about to change is saved first.
        if let Some(s) = &self.saves {
            for &(l, slot) in &s.slots {
                s.snap.save(slot, guards[l].get())?;
            }
        }
        // Values that must be read from blobs the op is about to overwrite.
        let mut clones: OpList<Option<Tensor>> = OpList::new();
        for (i, src) in self.inputs.iter().enumerate() {
            let copy_of = match src {
                InputSrc::Clone(l) => Some(*l),
                InputSrc::InPlace { from: Some(l), .. } if self.locks[*l].1 => Some(*l),
                InputSrc::InPlace { out, from: None } => {
                    guards[self.outputs[*out]].get().ok_or_else(|| self.missing(i))?;
                    None
                }
                _ => None,
            };
            clones.push(match copy_of {
                Some(l) => Some(guards[l].get().ok_or_else(|| self.missing(i))?.try_clone()?),
                None => None,
            });
        }
        // Every input is there before any output is created: an op that cannot
        // run leaves no empty blob behind.
        for (i, src) in self.inputs.iter().enumerate() {
            if let InputSrc::Read(l) | InputSrc::InPlace { from: Some(l), .. } = src {
                if clones[i].is_none() && guards[*l].get().is_none() {
                    return Err(self.missing(i));
                }
            }
        }
        let mut shared: OpList<Option<&Tensor>> = OpList::new();
        let mut excl: OpList<Option<&mut Tensor>> = OpList::new();
        for g in guards.iter_mut() {
            match g {
                Guard::R(g) => {
                    shared.push(g.as_ref());
                    excl.push(None);
                }
                Guard::W(g) => {
                    shared.push(None);
                    excl.push(Some(g.get_or_insert_with(Tensor::default)));
                }
            }
        }
        let mut outputs: OpList<&mut Tensor> = self
            .outputs
            .iter()
            .map(|&l| excl[l].take().expect("each output has its own write lock"))
            .collect();
        let mut inputs: OpList<Option<&Tensor>> = OpList::new();
        for (i, src) in self.inputs.iter().enumerate() {
            inputs.push(match src {
                InputSrc::Read(l) => Some(shared[*l].ok_or_else(|| self.missing(i))?),
                InputSrc::Clone(_) => clones[i].as_ref(),
                InputSrc::InPlace { out, from } => {
                    if let Some(l) = from {
                        let src = clones[i].as_ref().or(shared[*l]).ok_or_else(|| self.missing(i))?;
                        outputs[*out].copy_from(src)?;
                    }
                    None
                }
            });
        }
        let mut ctx = OpContext::from_lists(&self.def, inputs, outputs).on(self.device, threads);
        crate::ops::cpu::gemm::with_threads(threads, || self.kernel.run(&mut ctx))
    }

    /// Runs the op, turning errors and panics into an [`Error::Op`] that names it;
    /// timed into `profile` when there is one.
    pub(crate) fn run(&self, threads: usize, profile: Option<&Profile>) -> Result<()> {
        let execute = || match profile {
            Some(p) => p.time(&self.def, self.index, self.device, || self.execute(threads)),
            None => self.execute(threads),
        };
        let result = match catch_unwind(AssertUnwindSafe(execute)) {
            Ok(r) => r,
            Err(payload) => Err(Error::KernelPanic(panic_message(payload.as_ref()))),
        };
        result.map_err(|e| Error::Op {
            index: self.index,
            op_type: self.def.op_type().to_owned(),
            name: self.def.name.clone().unwrap_or_default(),
            source: Box::new(e),
        })
    }
}

/// `N` of the `cpu_N`/`gpu_N` scope of `op`'s first output, unless `op` is a
/// collective (whose blobs span the replicas).
fn replica_lane(op: &OperatorDef) -> Option<usize> {
    if crate::comm::is_collective(op.op_type()) {
        return None;
    }
    let scope = crate::graph::BlobRef::new(op.output.first()?.as_str())
        .first_scope()?
        .to_owned();
    if !crate::graph::is_device_scope(&scope) {
        return None;
    }
    scope.rsplit('_').next()?.parse().ok()
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}

/// A compiled net.
pub(crate) struct Plan {
    pub(super) name: String,
    pub(super) kind: NetKind,
    pub(super) first_iter_only_one_worker: bool,
    pub(super) steps: Vec<Step>,
    /// CUDA devices the net's ops run on: synchronised at the end of each run.
    gpus: Vec<u32>,
    /// Ops that wait on each op.
    pub(super) dependents: Vec<Vec<usize>>,
    /// Replicas with ops of their own (1 + the largest `Step::lane`).
    pub(super) lanes: usize,
    /// How many ops each op waits on.
    pub(super) num_deps: Vec<usize>,
    /// The workers worth starting: no more than `num_workers`, nor than the
    /// ops that can run at once (the widest level of the dependency graph),
    /// nor, with a fixed schedule, than the replicas.
    useful_workers: usize,
    runs: AtomicU64,
    /// The `dag` executor's worker threads, started by the first run that
    /// uses them (asleep while the net runs inline).
    pool: std::sync::Mutex<Option<super::pool::Pool>>,
    /// For a net of CPU replicas (two or more lanes, no op that waits on
    /// another process), the fixed order its workers run it in (`lanes.rs`)
    /// while its ops are short; `None`, or long ops: the queue of `dag.rs`.
    schedule: Option<super::lanes::Schedule>,
    /// Whether a `dag` net runs on its pool or inline (`tune.rs`).
    /// `dpm_executor_autotune = 0` keeps the pool on every run, for nets whose
    /// ops wait on each other running at the same time.
    tuner: super::tune::Tuner,
}

impl Plan {
    pub(crate) fn new(net: &NetDef, ws: &Workspace) -> Result<Plan> {
        let name = net.net_name().to_owned();
        let invalid = |reason: String| Error::InvalidNet {
            net: name.clone(),
            reason,
        };
        let kind = match net.r#type.as_deref().unwrap_or("simple") {
            "" | "simple" => NetKind::Simple,
            "dag" | "async_dag" | "prof_dag" => NetKind::Dag,
            other => {
                return Err(invalid(format!(
                    "net type `{other}` is unknown; use simple or dag"
                )))
            }
        };
        let workers = match net.num_workers {
            Some(n) if n >= 1 => n as usize,
            Some(n) => return Err(invalid(format!("num_workers must be ≥ 1, got {n}"))),
            None => crate::exec::cores(),
        };
        let first_iter_only_one_worker = Args(&net.arg).int("first_iter_only_one_worker", 0)? != 0;
        let deps = dependencies(&net.op).map_err(invalid)?;
        let (ops, index) = super::fuse::fuse(net, &deps);
        let steps = ops
            .iter()
            .zip(index)
            .map(|(op, i)| {
                Step::new(i, op, net, ws).map_err(|e| Error::Op {
                    index: i,
                    op_type: op.op_type().to_owned(),
                    name: op.name.clone().unwrap_or_default(),
                    source: Box::new(e),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // The fused ops' own dependencies (a fused op waits on what both did).
        let deps = if ops.len() == net.op.len() {
            deps
        } else {
            dependencies(&ops).map_err(invalid)?
        };
        let mut gpus: Vec<u32> = steps
            .iter()
            .filter_map(|s| match s.device {
                Device::Cuda(n) => Some(n),
                Device::Cpu(_) => None,
            })
            .collect();
        gpus.sort_unstable();
        gpus.dedup();
        let mut dependents = vec![Vec::new(); steps.len()];
        for (j, ds) in deps.iter().enumerate() {
            for &i in ds {
                dependents[i].push(j);
            }
        }
        let width = width(&deps);
        let lanes = steps.iter().filter_map(|s| s.lane).max().map_or(0, |l| l + 1);
        // Replicas that may wait on another process (an engine's collective,
        // a GPU's stream) keep the queue, whose idle workers take other work.
        let local_cpu = steps
            .iter()
            .all(|s| matches!(s.device, Device::Cpu(_)) && s.def.engine.as_deref().unwrap_or("").is_empty());
        let parallel = workers.min(width).max(1);
        let schedule = (lanes >= 2 && local_cpu && parallel >= 2).then(|| {
            let lane_of: Vec<Option<usize>> = steps.iter().map(|s| s.lane).collect();
            super::lanes::Schedule::new(deps.clone(), &lane_of, parallel.min(lanes))
        });
        let useful = schedule.as_ref().map_or(parallel, |s| s.workers());
        let tuner = super::tune::Tuner::new(
            Args(&net.arg).int("dpm_executor_autotune", 1)? != 0,
            steps.len(),
            useful,
        );
        Ok(Plan {
            name,
            kind,
            first_iter_only_one_worker,
            steps,
            gpus,
            dependents,
            lanes,
            num_deps: deps.iter().map(Vec::len).collect(),
            useful_workers: useful,
            schedule,
            runs: AtomicU64::new(0),
            pool: Default::default(),
            tuner,
        })
    }

    /// Runs every op; CPU kernels may use `threads` threads each; each op's time
    /// goes into `profile` when there is one. Work enqueued on CUDA devices has
    /// finished when this returns, failed or not.
    pub(crate) fn run(&self, threads: usize, profile: Option<&Profile>) -> Result<()> {
        let started = std::time::Instant::now();
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        let first = run == 0;
        let result = match self.kind {
            NetKind::Simple => self.steps.iter().try_for_each(|s| s.run(threads, profile)),
            NetKind::Dag => {
                let workers = if first && self.first_iter_only_one_worker {
                    1
                } else {
                    self.useful_workers
                };
                let inline = || self.steps.iter().try_for_each(|s| s.run(threads, profile));
                // Another thread running this net holds the pool: run inline.
                let pool = || match self.pool.try_lock() {
                    Ok(mut p) => {
                        let p = p.get_or_insert_with(|| super::pool::Pool::new(&self.name, workers - 1));
                        match &self.schedule {
                            Some(s) if !self.tuner.long_ops() => {
                                super::lanes::run(self, s, p, threads, profile, run + 1)
                            }
                            _ => super::dag::run(self, p, threads, profile),
                        }
                    }
                    Err(_) => inline(),
                };
                // One worker runs the ops in net order (a topological order):
                // no pool, no hand-offs.
                if workers == 1 {
                    inline()
                } else {
                    match self.tuner.choose(run) {
                        Choice::Inline => inline(),
                        Choice::Pool => pool(),
                        Choice::Measure { inline: yes } => {
                            let t = std::time::Instant::now();
                            let r = if yes { inline() } else { pool() };
                            self.tuner.record(yes, t.elapsed());
                            r
                        }
                    }
                }
            }
        };
        let synced = self.synchronize();
        if let Some(p) = profile {
            p.settle();
            p.net_ran(&self.name, started);
        }
        result.and(synced)
    }

    #[cfg(feature = "cuda")]
    fn synchronize(&self) -> Result<()> {
        self.gpus
            .iter()
            .try_for_each(|&n| crate::cuda::gpu(n)?.synchronize())
    }

    #[cfg(not(feature = "cuda"))]
    fn synchronize(&self) -> Result<()> {
        debug_assert!(
            self.gpus.is_empty(),
            "no CUDA op can be created without the feature"
        );
        Ok(())
    }
}

/// The largest level of the dependency graph: level(i) = 1 + the largest level
/// of the ops `i` waits on (which come earlier in the net).
fn width(deps: &[Vec<usize>]) -> usize {
    let mut level = vec![0usize; deps.len()];
    let mut count: Vec<usize> = Vec::new();
    for (i, ds) in deps.iter().enumerate() {
        level[i] = ds.iter().map(|&d| level[d] + 1).max().unwrap_or(0);
        if count.len() <= level[i] {
            count.resize(level[i] + 1, 0);
        }
        count[level[i]] += 1;
    }
    count.into_iter().max().unwrap_or(1).max(1)
}

/// For each op, the earlier ops it must wait for: the last writer of each blob it
/// reads (or names as a control input), and, for each blob it writes, the last
/// writer and every reader since (so nothing is overwritten while in use).
pub(super) fn dependencies(ops: &[OperatorDef]) -> std::result::Result<Vec<Vec<usize>>, String> {
    let mut last_writer: HashMap<&str, usize> = HashMap::new();
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut deps = Vec::with_capacity(ops.len());
    for (j, op) in ops.iter().enumerate() {
        let mut d: Vec<usize> = Vec::new();
        for b in &op.input {
            d.extend(last_writer.get(b.as_str()));
        }
        for b in &op.control_input {
            match last_writer.get(b.as_str()) {
                Some(&w) => d.push(w),
                None => {
                    return Err(format!(
                        "op #{j} `{}` has control input `{b}`, which no earlier op writes",
                        op.op_type()
                    ))
                }
            }
        }
        for b in &op.output {
            d.extend(last_writer.get(b.as_str()));
            d.extend(readers.get(b.as_str()).into_iter().flatten());
        }
        d.sort_unstable();
        d.dedup();
        d.retain(|&i| i != j);
        for b in &op.input {
            readers.entry(b).or_default().push(j);
        }
        for b in &op.output {
            last_writer.insert(b, j);
            readers.remove(b.as_str());
        }
        deps.push(d);
    }
    Ok(deps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(ty: &str, output: &str) -> OperatorDef {
        OperatorDef {
            r#type: Some(ty.into()),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    #[test]
    fn an_ops_lane_is_the_replica_of_its_output() {
        assert_eq!(replica_lane(&op("FC", "cpu_1/fc")), Some(1));
        assert_eq!(replica_lane(&op("Conv", "gpu_12/c1")), Some(12));
        assert_eq!(replica_lane(&op("Allreduce", "cpu_0/fc_w_grad")), None);
        assert_eq!(replica_lane(&op("Iter", "ITER")), None);
        assert_eq!(replica_lane(&op("FC", "model/fc")), None);
    }
}
