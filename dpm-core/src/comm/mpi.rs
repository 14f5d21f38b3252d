//! Collectives across processes (hosts) on MPI, through the `mpi` crate over the
//! system's MPI (Open MPI): the `Allreduce` and `Broadcast` kernels of engine
//! `MPI`, and the process-wide sums behind `Trainer::loss`.
//!
//! **One thread makes every MPI call.** MPI is initialised at
//! `MPI_THREAD_FUNNELED` on a communication thread, and kernels (which run on the
//! executor's workers) hand it their buffers and wait. Why: Open MPI builds
//! often lack (or slow down under) `MPI_THREAD_MULTIPLE`, and one thread issues
//! the collectives in exactly the order the ops reach it, which the net's
//! control-input chain makes the same on every rank. A worker waiting on the
//! thread blocks only itself: the other workers carry on with the backward pass,
//! so the all-reduce of the last layers overlaps the gradients of the first.
//!
//! **No wait without end.** The thread drives non-blocking MPI calls and polls
//! them against a deadline ([`timeout`], `DPM_MPI_TIMEOUT` seconds, default 30):
//! a peer that died or diverged makes every other rank abort the job with an
//! error naming the collective, rather than wait forever.
//!
//! **The same bits everywhere.** A cross-rank sum is a reduce to rank 0 followed
//! by a broadcast of rank 0's result, so every rank holds identical values
//! whatever order MPI sums in (an all-reduce may round differently per rank);
//! with two ranks one all-reduce does it, `a + b` being `b + a` exactly.

use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::request::{Request, Scope};
use mpi::traits::*;

use super::local::{
    allreduce_spec, broadcast_local, broadcast_spec, reduce_local, AllreduceSpec, BroadcastSpec,
};
use crate::error::{Error, Result};
use crate::ops::{Kernel, OpContext, Registry};
use crate::proto::OperatorDef;
use crate::tensor::{CpuStorage, HostVec, Storage, Tensor};

/// Registers the `MPI`-engine collectives for CPU devices.
pub fn register(r: &mut Registry) {
    use crate::graph::DeviceType::Cpu;
    r.register_engine("Allreduce", Cpu, "MPI", MpiAllreduce::create);
    r.register_engine("Broadcast", Cpu, "MPI", MpiBroadcast::create);
}

/// How long a collective may wait for its peers before the job is aborted.
pub fn timeout() -> Duration {
    let secs = std::env::var("DPM_MPI_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(30.0);
    Duration::from_secs_f64(secs)
}

/// A job for the communication thread.
enum Job {
    /// Sum across ranks (reduce to rank 0, broadcast back).
    Sum(CpuStorage, SyncSender<Result<CpuStorage>>),
    /// Rank 0's values to every rank, tensor by tensor.
    Broadcast(Vec<CpuStorage>, SyncSender<Result<Vec<CpuStorage>>>),
    /// Every rank's `u64`s, concatenated in rank order.
    Gather(Vec<u64>, SyncSender<Result<Vec<u64>>>),
    /// Waits for every rank.
    Barrier(SyncSender<Result<()>>),
    /// `MPI_Finalize`, then the thread ends.
    Finalize(SyncSender<()>),
}

/// This process's place in the MPI job, and its communication thread.
pub struct World {
    rank: usize,
    size: usize,
    jobs: Mutex<Option<Sender<(Job, String)>>>,
    busy: Mutex<Duration>,
}

static WORLD: OnceLock<std::result::Result<World, String>> = OnceLock::new();

/// The MPI world, initialised (on its own thread) on first use.
pub fn world() -> Result<&'static World> {
    WORLD
        .get_or_init(start)
        .as_ref()
        .map_err(|e| Error::Config(format!("MPI could not start: {e}")))
}

/// The MPI world if this process has started it.
pub fn started() -> Option<&'static World> {
    WORLD.get().and_then(|w| w.as_ref().ok())
}

fn start() -> std::result::Result<World, String> {
    let (tx, rx) = channel::<(Job, String)>();
    let (ready_tx, ready_rx) = sync_channel(1);
    std::thread::Builder::new()
        .name("dpm-mpi".into())
        .spawn(move || serve(rx, ready_tx))
        .map_err(|e| format!("spawning the communication thread: {e}"))?;
    let (rank, size) = ready_rx
        .recv()
        .map_err(|_| "the communication thread ended during initialisation".to_owned())??;
    Ok(World {
        rank,
        size,
        jobs: Mutex::new(Some(tx)),
        busy: Mutex::new(Duration::ZERO),
    })
}

type Ready = SyncSender<std::result::Result<(usize, usize), String>>;

fn serve(rx: Receiver<(Job, String)>, ready: Ready) {
    let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
        let _ = ready.send(Err("MPI was already initialised in this process".into()));
        return;
    };
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let _ = ready.send(Ok((rank, size)));
    let limit = timeout();
    while let Ok((job, what)) = rx.recv() {
        match job {
            Job::Sum(data, reply) => {
                let _ = reply.send(sum(&world, data, &what, limit));
            }
            Job::Broadcast(data, reply) => {
                let r = data
                    .into_iter()
                    .map(|d| broadcast(&world, d, &what, limit))
                    .collect();
                let _ = reply.send(r);
            }
            Job::Gather(values, reply) => {
                let mut all = vec![0u64; values.len() * size];
                mpi::request::scope(|s| {
                    let req = world.immediate_all_gather_into(s, &values[..], &mut all[..]);
                    wait(&world, req, &what, limit);
                });
                let _ = reply.send(Ok(all));
            }
            Job::Barrier(reply) => {
                wait(&world, world.immediate_barrier(), &what, limit);
                let _ = reply.send(Ok(()));
            }
            Job::Finalize(reply) => {
                drop(universe);
                let _ = reply.send(());
                return;
            }
        }
    }
}

/// Polls `req` until it completes; past the deadline, reports the collective and
/// aborts the whole job (a blocked peer cannot be cancelled any other way).
fn wait<'a, D: ?Sized, S: Scope<'a>>(
    world: &impl Communicator,
    mut req: Request<'a, D, S>,
    what: &str,
    limit: Duration,
) {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        match req.test() {
            Ok(_) => return,
            Err(r) => req = r,
        }
        if start.elapsed() > limit {
            eprintln!(
                "error: rank {} waited {:.0} s for its peers in {what}: a rank died, hangs, or runs a \
                 different net; aborting the job (DPM_MPI_TIMEOUT sets the limit)",
                world.rank(),
                limit.as_secs_f64()
            );
            world.abort(3);
        }
        // Spin briefly (collectives are often quick), then yield the core to
        // the compute threads.
        spins += 1;
        if spins > 200 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

macro_rules! on_storage {
    ($data:expr, |$v:ident| $body:expr) => {
        match $data {
            CpuStorage::F32($v) => CpuStorage::F32($body),
            CpuStorage::I32($v) => CpuStorage::I32($body),
            CpuStorage::I64($v) => CpuStorage::I64($body),
        }
    };
}

fn sum(world: &impl Communicator, data: CpuStorage, what: &str, limit: Duration) -> Result<CpuStorage> {
    let root = world.process_at_rank(0);
    Ok(on_storage!(data, |v| {
        let mut total = v.clone();
        if world.size() == 2 {
            // a + b = b + a exactly: one all-reduce gives both ranks the same bits.
            mpi::request::scope(|s| {
                let req = world.immediate_all_reduce_into(s, &v[..], &mut total[..], SystemOperation::sum());
                wait(world, req, what, limit);
            });
        } else {
            mpi::request::scope(|s| {
                let req = if world.rank() == 0 {
                    root.immediate_reduce_into_root(s, &v[..], &mut total[..], SystemOperation::sum())
                } else {
                    root.immediate_reduce_into(s, &v[..], SystemOperation::sum())
                };
                wait(world, req, what, limit);
            });
            mpi::request::scope(|s| {
                let req = root.immediate_broadcast_into(s, &mut total[..]);
                wait(world, req, what, limit);
            });
        }
        total
    }))
}

fn broadcast(world: &impl Communicator, data: CpuStorage, what: &str, limit: Duration) -> Result<CpuStorage> {
    let root = world.process_at_rank(0);
    Ok(on_storage!(data, |v| {
        let mut v = v;
        mpi::request::scope(|s| {
            let req = root.immediate_broadcast_into(s, &mut v[..]);
            wait(world, req, what, limit);
        });
        v
    }))
}

impl World {
    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Time the communication thread has spent in collectives so far.
    pub fn busy(&self) -> Duration {
        *self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn call<T>(&self, what: String, job: impl FnOnce(SyncSender<Result<T>>) -> Job) -> Result<T> {
        let (tx, rx) = sync_channel(1);
        let start = Instant::now();
        {
            let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let sender = jobs
                .as_ref()
                .ok_or_else(|| Error::Config("MPI was finalised".into()))?;
            sender
                .send((job(tx), what.clone()))
                .map_err(|_| Error::Config(format!("{what}: the MPI thread has ended")))?;
        }
        let r = rx
            .recv()
            .map_err(|_| Error::Config(format!("{what}: the MPI thread has ended")))?;
        *self.busy.lock().unwrap_or_else(|e| e.into_inner()) += start.elapsed();
        r
    }

    /// The element-wise sum over ranks of `data` (the same bits on every rank).
    pub fn sum(&self, data: CpuStorage, what: impl Into<String>) -> Result<CpuStorage> {
        self.call(what.into(), |tx| Job::Sum(data, tx))
    }

    /// Rank 0's `data`, on every rank.
    pub fn broadcast(&self, data: Vec<CpuStorage>, what: impl Into<String>) -> Result<Vec<CpuStorage>> {
        self.call(what.into(), |tx| Job::Broadcast(data, tx))
    }

    /// Every rank's `values` (all of one length), concatenated in rank order.
    pub fn gather(&self, values: Vec<u64>, what: impl Into<String>) -> Result<Vec<u64>> {
        self.call(what.into(), |tx| Job::Gather(values, tx))
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self, what: impl Into<String>) -> Result<()> {
        self.call(what.into(), Job::Barrier)
    }

    /// Finalises MPI (call once, at the end of a successful run: a process that
    /// exits without it makes `mpirun` report the job as failed).
    pub fn finalize(&self) {
        let sender = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(sender) = sender {
            let (tx, rx) = sync_channel(1);
            if sender.send((Job::Finalize(tx), "finalize".into())).is_ok() {
                let _ = rx.recv();
            }
        }
    }
}

/// The blob names of an op, for error messages.
fn describe(ctx: &OpContext<'_>) -> String {
    format!("{} of `{}`", ctx.def().op_type(), ctx.output_name(0))
}

fn host_storage(t: &Tensor, name: &str) -> Result<CpuStorage> {
    match &t.storage {
        Storage::Cpu(s) => Ok(s.clone()),
        Storage::Flat(s) => Ok(CpuStorage::F32(s.as_slice().into())),
        #[allow(unreachable_patterns)]
        _ => Err(Error::NotOnHost {
            blob: name.to_owned(),
            device: t.device().to_string(),
        }),
    }
}

/// `Allreduce` across every replica of every rank: the in-process sum of this
/// rank's replicas, then the sum across ranks (all of the op's tensors in one
/// message), written back to every replica (divided by all replicas with
/// `average = 1`).
pub struct MpiAllreduce(AllreduceSpec);

impl MpiAllreduce {
    /// Checks the op is in place over one blob per local device (per tensor).
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(MpiAllreduce(allreduce_spec(op)?)))
    }
}

impl Kernel for MpiAllreduce {
    fn in_place(&self) -> &[(usize, usize)] {
        &self.0.pairs
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let world = world()?;
        let what = describe(ctx);
        reduce_local(ctx, &self.0, 1.0)?;
        // Device 0's sums, end to end: one message however many tensors.
        let d = self.0.devices;
        let mut local = HostVec::new();
        for o in (0..ctx.num_outputs()).step_by(d) {
            let name = ctx.output_name(o).to_owned();
            local.extend_from_slice(ctx.output(o).data::<f32>().map_err(|e| e.for_blob(name))?);
        }
        let CpuStorage::F32(mut total) = world.sum(CpuStorage::F32(local), what)? else {
            unreachable!("a sum keeps the element type")
        };
        if self.0.average {
            let replicas = (d * world.size()) as f32;
            total.iter_mut().for_each(|v| *v /= replicas);
        }
        let mut at = 0;
        let names: Vec<String> = (0..ctx.num_outputs())
            .map(|o| ctx.output_name(o).to_owned())
            .collect();
        for (group, names) in ctx.outputs().chunks_mut(d).zip(names.chunks(d)) {
            let len = group[0].numel();
            for (t, name) in group.iter_mut().zip(names) {
                t.data_mut::<f32>()
                    .map_err(|e| e.for_blob(name))?
                    .copy_from_slice(&total[at..at + len]);
            }
            at += len;
        }
        Ok(())
    }
}

/// `Broadcast` from the root replica of rank 0 to every replica of every rank
/// (all of the op's tensors in one hand-off to the communication thread).
pub struct MpiBroadcast(BroadcastSpec);

impl MpiBroadcast {
    /// Checks the op is in place and `root` names one of its devices.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(MpiBroadcast(broadcast_spec(op)?)))
    }
}

impl Kernel for MpiBroadcast {
    fn in_place(&self) -> &[(usize, usize)] {
        &self.0.pairs
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let world = world()?;
        let what = describe(ctx);
        let BroadcastSpec { devices, root, .. } = self.0;
        let roots: Vec<usize> = (root..ctx.num_outputs()).step_by(devices).collect();
        let mut data = Vec::with_capacity(roots.len());
        for &o in &roots {
            let name = ctx.output_name(o).to_owned();
            data.push(host_storage(ctx.output(o), &name)?);
        }
        let got = world.broadcast(data, what.clone())?;
        for (&o, g) in roots.iter().zip(got) {
            let len = ctx.output(o).numel();
            if g.len() != len {
                return Err(Error::value(
                    ctx.output_name(o),
                    format!("{what}: rank 0 sent {} elements, this rank holds {len}", g.len()),
                ));
            }
            ctx.output(o).storage = Storage::Cpu(g);
        }
        broadcast_local(ctx, devices, root)
    }
}
