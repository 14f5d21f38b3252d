//! NCCL collectives for the CUDA replicas of one process, under Caffe2's op
//! types `NCCLAllreduce` and `NCCLBroadcast` (in place over one blob per GPU,
//! tensor-major like the CPU collectives).
//!
//! One communicator per GPU for each set of GPUs, made once per process
//! (`ncclCommInitAll`). An op launches one NCCL call per GPU inside one group,
//! each on its GPU's communication stream after an event of the compute stream
//! (so the gradient is complete); every buffer it writes then carries an event
//! of the communication stream, which the next kernel using the buffer makes the
//! compute stream wait for (`CudaStorage::settle`). So the update of a
//! parameter waits for its own all-reduce only, and the backward pass of
//! earlier layers runs on meanwhile; the control-input chain fixes the order in
//! which every GPU issues the collectives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nccl::{result as nccl, sys};

use super::local::{broadcast_spec, devices_per_tensor, in_place_pairs, BroadcastSpec};
use crate::cuda::{gpu, CudaStorage, Gpu};
use crate::error::{Error, Result};
use crate::graph::{Args, Device};
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

/// The communicators of `ordinals` (distinct GPUs), made on first use.
fn comms(ordinals: &[u32]) -> Result<Arc<Comms>> {
    static ALL: OnceLock<Mutex<HashMap<Vec<u32>, Arc<Comms>>>> = OnceLock::new();
    let mut all = ALL
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
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
            return Err(Error::Config(
                "libnccl could not be loaded; install NCCL 2 (e.g. the PyPI wheel nvidia-nccl-cu13) \
                 and put its folder on LD_LIBRARY_PATH"
                    .into(),
            ));
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
    mut launch: impl FnMut(&mut OpContext<'_>, usize, usize, sys::ncclComm_t, sys::cudaStream_t) -> Result<()>,
) -> Result<()> {
    let gpus = gpus_of(ctx, devices)?;
    let ordinals: Vec<u32> = gpus.iter().map(|g| g.ordinal()).collect();
    let comms = comms(&ordinals)?;
    let names = ordinals
        .iter()
        .map(|&n| Device::Cuda(n).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    for g in &gpus {
        g.bind()?;
        let ready = g
            .stream
            .record_event(None)
            .map_err(|e| g.error("recording an event", e))?;
        g.comm_stream
            .wait(&ready)
            .map_err(|e| g.error("ordering the collective", e))?;
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
    for (rank, g) in gpus.iter().enumerate() {
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
    }
    Ok(())
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
    pairs: Vec<(usize, usize)>,
    devices: usize,
    average: bool,
}

impl Allreduce {
    /// Checks the op is in place over one blob per GPU (per tensor).
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Allreduce {
            pairs: in_place_pairs(op)?,
            devices: devices_per_tensor(op)?,
            average: Args(&op.arg).int("average", 0)? != 0,
        }))
    }
}

impl Kernel for Allreduce {
    fn in_place(&self) -> &[(usize, usize)] {
        &self.pairs
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let devices = self.devices;
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
        let op = if self.average {
            sys::ncclRedOp_t::ncclAvg
        } else {
            sys::ncclRedOp_t::ncclSum
        };
        collective(ctx, devices, |ctx, o, rank, comm, stream| {
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
pub struct Broadcast(BroadcastSpec);

impl Broadcast {
    /// Checks the op is in place and `root` names one of its GPUs.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Broadcast(broadcast_spec(op)?)))
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
        collective(ctx, devices, |ctx, o, rank, comm, stream| {
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
    r.register("NCCLAllreduce", crate::graph::DeviceType::Cuda, Allreduce::create);
    r.register("NCCLBroadcast", crate::graph::DeviceType::Cuda, Broadcast::create);
}
