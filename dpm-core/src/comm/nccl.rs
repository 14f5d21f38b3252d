//! NCCL collectives for the CUDA replicas of one process, under Caffe2's op
//! types `NCCLAllreduce` and `NCCLBroadcast` (in place over one blob per GPU,
//! tensor-major like the CPU collectives).
//!
//! One communicator per GPU for each set of GPUs, made once per process
//! (`ncclCommInitAll`); across the processes of an MPI job (engine `MPI`), one
//! communicator over every GPU of the job (see `world_comms`). Waits on a GPU
//! with communicators are watched (`wait_watched`): a peer that died is an
//! error on every process within `DPM_NCCL_TIMEOUT`, never a wait without end. An op launches one NCCL call per GPU inside one group,
//! each on its GPU's communication stream after an event of the compute stream
//! (so the gradient is complete); every buffer it writes then carries an event
//! of the communication stream, which the next kernel using the buffer makes the
//! compute stream wait for (`CudaStorage::settle`). So the update of a
//! parameter waits for its own all-reduce only, and the backward pass of
//! earlier layers runs on meanwhile; the control-input chain fixes the order in
//! which every GPU issues the collectives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cudarc::nccl::{result as nccl, sys};

use super::local::{allreduce_spec, broadcast_spec, AllreduceSpec, BroadcastSpec};
use crate::cuda::{gpu, CudaStorage, Gpu};
use crate::error::{Error, Result};
use crate::graph::Device;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;
use crate::tensor::DataType;

/// The communicators of one set of GPUs, rank i on GPU `ordinals[i]`.
struct Comms {
    comms: Vec<sys::ncclComm_t>,
}

// SAFETY: a communicator is used by one op at a time (the map's entry is
// taken under the op's group call, and every collective of a net is chained).
unsafe impl Send for Comms {}
unsafe impl Sync for Comms {}

fn nccl_error(devices: &str, doing: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda {
        library: "NCCL",
        device: devices.to_owned(),
        message: format!("{doing}: {e:?}"),
    }
}

fn lock<T>(m: &'static OnceLock<Mutex<T>>) -> MutexGuard<'static, T>
where
    T: Default,
{
    m.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Every communicator of the process, by the GPUs it spans.
static ALL: OnceLock<Mutex<HashMap<Vec<u32>, Arc<Comms>>>> = OnceLock::new();

/// Why the communicators were aborted, once they have been: later collectives
/// fail at once with it rather than wait on peers that are gone.
static ABORTED: OnceLock<Mutex<Option<String>>> = OnceLock::new();

/// A collective enqueued and not yet seen finished: when its inputs were ready
/// (`started`, on the communication stream) and when it ended (`done`).
struct InFlight {
    what: String,
    started: cudarc::driver::CudaEvent,
    done: Arc<cudarc::driver::CudaEvent>,
    /// When the watchdog first saw `started` complete.
    running_since: Option<Instant>,
}

// SAFETY: CUDA events are used from any thread of the process; the list is
// behind a mutex.
unsafe impl Send for InFlight {}

static IN_FLIGHT: OnceLock<Mutex<Vec<InFlight>>> = OnceLock::new();

/// How long one collective may run once its inputs are ready:
/// `DPM_NCCL_TIMEOUT` seconds, 60 by default.
fn timeout() -> Duration {
    std::env::var("DPM_NCCL_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .map_or(Duration::from_secs(60), Duration::from_secs_f64)
}

/// Whether any communicator exists (then waits on GPUs are watched).
pub(crate) fn active() -> bool {
    !lock(&ALL).is_empty()
}

/// Aborts every communicator (which ends their kernels on this process and
/// makes the peers' collectives fail), remembers `why`, and returns it as the
/// error of every process's step.
fn abort_all(why: String) -> Error {
    let comms: Vec<Arc<Comms>> = lock(&ALL).drain().map(|(_, c)| c).collect();
    for c in comms {
        for &comm in &c.comms {
            // SAFETY: the communicator is live (it leaves the map here, once).
            let _ = unsafe { nccl::comm_abort(comm) };
        }
    }
    lock(&IN_FLIGHT).clear();
    *lock(&ABORTED) = Some(why.clone());
    Error::Cuda {
        library: "NCCL",
        device: "every GPU of this process".into(),
        message: why,
    }
}

/// Waits until every event of `ends` has completed, watching the collectives
/// in flight: a communicator's asynchronous error (a peer that died, a network
/// failure) or a collective running past [`timeout`] aborts the communicators
/// and is an error, so no process waits without end.
pub(crate) fn wait_watched(device: &str, ends: &[cudarc::driver::CudaEvent]) -> Result<()> {
    let limit = timeout();
    let mut pause = Duration::from_micros(20);
    loop {
        let mut all_done = true;
        for e in ends {
            match e.try_is_complete() {
                Ok(true) => {}
                Ok(false) => all_done = false,
                Err(err) => {
                    return Err(Error::Cuda {
                        library: "CUDA",
                        device: device.to_owned(),
                        message: format!("finishing the enqueued work: {err}"),
                    })
                }
            }
        }
        if all_done {
            lock(&IN_FLIGHT).retain(|f| !f.done.is_complete());
            return Ok(());
        }
        let failed = lock(&ALL)
            .values()
            .flat_map(|c| c.comms.clone())
            .find_map(|comm| {
                let mut state = sys::ncclResult_t::ncclSuccess;
                // SAFETY: a live communicator (the map holds it) and a valid out-pointer.
                let _ = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
                (!matches!(
                    state,
                    sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
                ))
                .then_some(state)
            });
        if let Some(state) = failed {
            return Err(abort_all(format!(
                "a collective failed ({state:?}): a peer process or GPU failed, or the network did; the communicators are aborted"
            )));
        }
        let now = Instant::now();
        let mut hung = None;
        for f in lock(&IN_FLIGHT).iter_mut() {
            if f.done.is_complete() {
                continue;
            }
            match f.running_since {
                None if f.started.is_complete() => f.running_since = Some(now),
                Some(t) if now - t > limit => hung = Some(f.what.clone()),
                _ => {}
            }
        }
        if let Some(what) = hung {
            return Err(abort_all(format!(
                "{what} did not finish within {:.0} s of its inputs being ready (DPM_NCCL_TIMEOUT): a peer died or hangs; the communicators are aborted",
                limit.as_secs_f64()
            )));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(2));
    }
}

/// The communicators of `ordinals` (distinct GPUs), made on first use.
fn comms(ordinals: &[u32]) -> Result<Arc<Comms>> {
    if let Some(why) = lock(&ABORTED).clone() {
        return Err(Error::Cuda {
            library: "NCCL",
            device: "every GPU of this process".into(),
            message: format!("the communicators were aborted earlier ({why}); start a new process"),
        });
    }
    let mut all = lock(&ALL);
    if let Some(c) = all.get(ordinals) {
        return Ok(c.clone());
    }
    let names = ordinals
        .iter()
        .map(|&n| Device::Cuda(n).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let made = crate::cuda::guarded(|| {
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Config(NO_NCCL.into()));
        }
        let mut comms = vec![std::ptr::null_mut(); ordinals.len()];
        let list: Vec<i32> = ordinals.iter().map(|&n| n as i32).collect();
        unsafe { nccl::comm_init_all(comms.as_mut_ptr(), list.len() as i32, list.as_ptr()) }
            .map_err(|e| nccl_error(&names, "creating the communicators", e))?;
        Ok(Comms { comms })
    })
    .map_err(|m| Error::Cuda {
        library: "NCCL",
        device: names.clone(),
        message: m,
    })?;
    let c = Arc::new(made);
    all.insert(ordinals.to_vec(), c.clone());
    Ok(c)
}

/// The communicator spanning every GPU of every process of the MPI job (engine
/// `MPI`): global rank `shard × local GPUs + i` on local GPU `ordinals[i]`.
///
/// One communicator over all GPUs of all hosts, rather than a reduction within
/// each host and another across hosts: NCCL builds its rings and trees over
/// the whole topology itself (NVLink within a host, the network between
/// hosts), and one call per gradient keeps the chained order simple. Rank 0
/// makes the unique id and sends its 128 bytes over MPI; before that the ranks
/// compare their NCCL versions, so a mismatch is an error on every rank, not a
/// hang inside NCCL.
#[cfg(feature = "mpi")]
fn world_comms(ordinals: &[u32]) -> Result<Arc<Comms>> {
    let mut key = vec![u32::MAX];
    key.extend_from_slice(ordinals);
    if let Some(c) = lock(&ALL).get(&key) {
        return Ok(c.clone());
    }
    if let Some(why) = lock(&ABORTED).clone() {
        return Err(Error::Cuda {
            library: "NCCL",
            device: "every GPU of this process".into(),
            message: format!("the communicators were aborted earlier ({why}); start a new job"),
        });
    }
    let names = ordinals
        .iter()
        .map(|&n| Device::Cuda(n).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let w = crate::comm::mpi::world()?;
    let version = crate::cuda::guarded(|| {
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Config(NO_NCCL.into()));
        }
        nccl::get_nccl_version().map_err(|e| nccl_error(&names, "reading the NCCL version", e))
    })
    .map_err(|m| Error::Cuda {
        library: "NCCL",
        device: names.clone(),
        message: m,
    })?;
    let all = w.gather(
        vec![version as u64, ordinals.len() as u64],
        "comparing the ranks' NCCL",
    )?;
    let per_rank: Vec<(u64, u64)> = all.chunks(2).map(|c| (c[0], c[1])).collect();
    if let Some(r) = per_rank.iter().position(|&(v, _)| v != per_rank[0].0) {
        return Err(Error::Config(format!(
            "NCCL versions differ between ranks: rank 0 has {}, rank {r} has {}; install one NCCL on every host",
            version_text(per_rank[0].0),
            version_text(per_rank[r].0)
        )));
    }
    if let Some(r) = per_rank.iter().position(|&(_, g)| g != per_rank[0].1) {
        return Err(Error::Config(format!(
            "rank 0 trains on {} GPU(s), rank {r} on {}: give every rank the same --devices",
            per_rank[0].1, per_rank[r].1
        )));
    }
    let mut id = [0i64; 16];
    if w.rank() == 0 {
        let made = nccl::get_uniqueid().map_err(|e| nccl_error(&names, "making the unique id", e))?;
        for (k, chunk) in made.internal.chunks(8).enumerate() {
            let bytes: Vec<u8> = chunk.iter().map(|&c| c as u8).collect();
            id[k] = i64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]));
        }
    }
    let got = w.broadcast(
        vec![crate::tensor::CpuStorage::I64(id[..].into())],
        "sending the NCCL unique id",
    )?;
    let Some(crate::tensor::CpuStorage::I64(words)) = got.into_iter().next() else {
        return Err(Error::Config("the NCCL unique id did not arrive".into()));
    };
    let mut unique = sys::ncclUniqueId { internal: [0; 128] };
    for (k, word) in words.iter().enumerate().take(16) {
        for (j, b) in word.to_le_bytes().iter().enumerate() {
            unique.internal[k * 8 + j] = *b as std::ffi::c_char;
        }
    }
    let local = ordinals.len();
    let nranks = (w.size() * local) as i32;
    let mut comms = vec![std::ptr::null_mut(); local];
    nccl::group_start().map_err(|e| nccl_error(&names, "starting a group", e))?;
    let mut result = Ok(());
    for (i, &ord) in ordinals.iter().enumerate() {
        result = gpu(ord).and_then(|g| g.bind()).and_then(|()| {
            let rank = (w.rank() * local + i) as i32;
            // SAFETY: a valid out-pointer; the id came from rank 0.
            unsafe { nccl::comm_init_rank(&mut comms[i], nranks, unique, rank) }
                .map(|_| ())
                .map_err(|e| nccl_error(&names, "joining the job's communicator", e))
        });
        if result.is_err() {
            break;
        }
    }
    let ended = nccl::group_end().map_err(|e| nccl_error(&names, "joining the job's communicator", e));
    result.and(ended)?;
    let c = Arc::new(Comms { comms });
    lock(&ALL).insert(key, c.clone());
    Ok(c)
}

/// NCCL's version number (e.g. 22105) as `2.21.5`.
#[cfg(feature = "mpi")]
fn version_text(v: u64) -> String {
    format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
}

const NO_NCCL: &str = "libnccl could not be loaded; install NCCL 2 (e.g. the PyPI wheel nvidia-nccl-cu13) \
                       and put its folder on LD_LIBRARY_PATH";

/// The GPUs of an op's first tensor, checked distinct, and each tensor's
/// blobs on those GPUs in that order.
fn gpus_of(ctx: &mut OpContext<'_>, devices: usize) -> Result<Vec<Arc<Gpu>>> {
    let mut ordinals = Vec::with_capacity(devices);
    let n = ctx.num_outputs();
    for o in 0..n {
        let name = ctx.output_name(o).to_owned();
        let t = ctx.output(o);
        let ord = match t.device() {
            Device::Cuda(g) => g,
            d => {
                return Err(Error::value(
                    &name,
                    format!("is on {d}; NCCL collectives reduce GPU buffers (copy it with to_device)"),
                ))
            }
        };
        if o < devices {
            if ordinals.contains(&ord) {
                return Err(Error::Config(format!(
                    "two replicas on cuda:{ord}: NCCL needs one replica per GPU"
                )));
            }
            ordinals.push(ord);
        } else if ordinals[o % devices] != ord {
            return Err(Error::value(
                &name,
                format!("is on cuda:{ord}, not cuda:{}", ordinals[o % devices]),
            ));
        }
    }
    ordinals.iter().map(|&g| gpu(g)).collect()
}

/// Runs `launch(tensor, rank, comm, stream)` for every blob in one NCCL group on
/// the communication streams, ordered after the compute streams' work, and marks
/// every blob with the end of it.
fn collective(
    ctx: &mut OpContext<'_>,
    devices: usize,
    world: bool,
    mut launch: impl FnMut(&mut OpContext<'_>, usize, usize, sys::ncclComm_t, sys::cudaStream_t) -> Result<()>,
) -> Result<()> {
    let gpus = gpus_of(ctx, devices)?;
    let ordinals: Vec<u32> = gpus.iter().map(|g| g.ordinal()).collect();
    let comms = if world {
        world_comms_of(&ordinals)?
    } else {
        comms(&ordinals)?
    };
    let names = ordinals
        .iter()
        .map(|&n| Device::Cuda(n).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut started = Vec::with_capacity(gpus.len());
    for g in &gpus {
        g.bind()?;
        let ready = g
            .stream
            .record_event(None)
            .map_err(|e| g.error("recording an event", e))?;
        g.comm_stream
            .wait(&ready)
            .map_err(|e| g.error("ordering the collective", e))?;
        started.push(
            g.comm_stream
                .record_event(None)
                .map_err(|e| g.error("recording an event", e))?,
        );
    }
    nccl::group_start().map_err(|e| nccl_error(&names, "starting a group", e))?;
    let mut result = Ok(());
    for o in 0..ctx.num_outputs() {
        let rank = o % devices;
        let stream = gpus[rank].comm_stream.cu_stream() as sys::cudaStream_t;
        result = launch(ctx, o, rank, comms.comms[rank], stream);
        if result.is_err() {
            break;
        }
    }
    let ended = nccl::group_end().map_err(|e| nccl_error(&names, "launching the collective", e));
    result.and(ended)?;
    let what = format!("{} `{}` on {names}", ctx.def().op_type(), ctx.output_name(0));
    for ((rank, g), started) in gpus.iter().enumerate().zip(started) {
        let done = Arc::new(
            g.comm_stream
                .record_event(None)
                .map_err(|e| g.error("recording the end of a collective", e))?,
        );
        for o in (rank..ctx.num_outputs()).step_by(devices) {
            if let Some(s) = ctx.output(o).cuda_on(g) {
                s.set_ready(done.clone());
            }
        }
        lock(&IN_FLIGHT).push(InFlight {
            what: what.clone(),
            started,
            done,
            running_since: None,
        });
    }
    Ok(())
}

/// The job-wide communicator (engine `MPI`), in builds that have MPI.
fn world_comms_of(ordinals: &[u32]) -> Result<Arc<Comms>> {
    #[cfg(feature = "mpi")]
    return world_comms(ordinals);
    #[cfg(not(feature = "mpi"))]
    {
        let _ = ordinals;
        Err(Error::Config(
            "NCCL across processes (engine MPI) needs MPI: rebuild with `--features mpi`".into(),
        ))
    }
}

fn storage<'t>(ctx: &'t mut OpContext<'_>, o: usize, g: &Gpu) -> Result<&'t CudaStorage> {
    let name = ctx.output_name(o).to_owned();
    let t = ctx.output(o);
    t.cuda_on(g)
        .ok_or_else(|| Error::value(&name, format!("is not on {}", g.device())))
}

fn nccl_type(t: DataType) -> sys::ncclDataType_t {
    match t {
        DataType::F32 => sys::ncclDataType_t::ncclFloat32,
        DataType::I32 => sys::ncclDataType_t::ncclInt32,
        DataType::I64 => sys::ncclDataType_t::ncclInt64,
    }
}

/// `NCCLAllreduce(x_0, …) → (x_0, …)`: sum over the GPUs (mean with `average`).
pub struct Allreduce {
    spec: AllreduceSpec,
    /// Over every GPU of the MPI job (engine `MPI`), not only this process's.
    world: bool,
}

impl Allreduce {
    /// Checks the op is in place over one blob per GPU (per tensor).
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Allreduce {
            spec: allreduce_spec(op)?,
            world: op.engine.as_deref() == Some("MPI"),
        }))
    }
}

impl Kernel for Allreduce {
    fn in_place(&self) -> &[(usize, usize)] {
        &self.spec.pairs
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let devices = self.spec.devices;
        for o in 0..ctx.num_outputs() {
            let (first, t) = (ctx.output(o - o % devices).shape().clone(), ctx.output(o));
            if t.shape() != &first || t.dtype() != DataType::F32 {
                let name = ctx.output_name(o).to_owned();
                return Err(Error::shape(
                    &name,
                    format!("{first} (f32), as on the first GPU"),
                    ctx.output(o).shape(),
                ));
            }
        }
        let gpus = gpus_of(ctx, devices)?;
        let op = if self.spec.average {
            sys::ncclRedOp_t::ncclAvg
        } else {
            sys::ncclRedOp_t::ncclSum
        };
        collective(ctx, devices, self.world, |ctx, o, rank, comm, stream| {
            let g = &gpus[rank];
            let n = ctx.output(o).numel();
            let ptr = storage(ctx, o, g)?.ptr() as *mut std::ffi::c_void;
            unsafe { nccl::all_reduce(ptr, ptr, n, nccl_type(DataType::F32), op, comm, stream) }
                .map(|_| ())
                .map_err(|e| nccl_error(&g.device().to_string(), "all-reduce", e))
        })
    }
}

/// `NCCLBroadcast(x_0, …) → (x_0, …)`: every blob becomes the `root` GPU's.
/// With engine `MPI`, from the root GPU of rank 0 to every GPU of the job.
pub struct Broadcast(BroadcastSpec, bool);

impl Broadcast {
    /// Checks the op is in place and `root` names one of its GPUs.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Broadcast(
            broadcast_spec(op)?,
            op.engine.as_deref() == Some("MPI"),
        )))
    }
}

impl Kernel for Broadcast {
    fn in_place(&self) -> &[(usize, usize)] {
        &self.0.pairs
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let (devices, root) = (self.0.devices, self.0.root);
        let gpus = gpus_of(ctx, devices)?;
        // Every blob shaped like its root first (the init net's blobs are).
        for o in 0..ctx.num_outputs() {
            let r = o - o % devices + root;
            let (shape, dtype) = (ctx.output(r).shape().clone(), ctx.output(r).dtype());
            if o != r {
                let g = gpus[o % devices].clone();
                ctx.output(o).resize_on(&g, dtype, shape)?;
            }
        }
        // Across the job the root is rank 0's GPU `root`: global rank `root`.
        collective(ctx, devices, self.1, |ctx, o, rank, comm, stream| {
            let g = &gpus[rank];
            let t = ctx.output(o);
            let (n, dtype) = (t.numel(), t.dtype());
            let ptr = storage(ctx, o, g)?.ptr() as *mut std::ffi::c_void;
            unsafe { nccl::broadcast(ptr, ptr, n, nccl_type(dtype), root as i32, comm, stream) }
                .map(|_| ())
                .map_err(|e| nccl_error(&g.device().to_string(), "broadcast", e))
        })
    }
}

/// Registers the NCCL collectives for CUDA devices.
pub fn register(r: &mut crate::ops::Registry) {
    use crate::graph::DeviceType::Cuda;
    r.register("NCCLAllreduce", Cuda, Allreduce::create);
    r.register("NCCLBroadcast", Cuda, Broadcast::create);
    // Across the processes of an MPI job: one communicator over all their GPUs.
    #[cfg(feature = "mpi")]
    {
        r.register_engine("NCCLAllreduce", Cuda, "MPI", Allreduce::create);
        r.register_engine("NCCLBroadcast", Cuda, "MPI", Broadcast::create);
    }
}
