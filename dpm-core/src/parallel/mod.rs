//! The data-parallel layer: [`Parallelize`] turns one model description into a
//! synchronous data-parallel trainer, with every behaviour of Caffe2's
//! `data_parallel_model`.
//!
//! `build()` does, in order:
//! 1. per device `d`: under `DeviceScope(d)` and `NameScope("cpu_d")`, the input
//!    builder and the forward builder: replica `d`;
//! 2. a `Scale(1 / (devices × shards))` on every loss the forward builder returned;
//! 3. autodiff for all replicas at once;
//! 4. params, gradients and computed params grouped by device ([`group_by_device`]);
//! 5. one `Allreduce` per gradient bucket (per gradient, as in Caffe2, with
//!    [`Parallelize::bucket_bytes`] 0 and by default for GPUs), last layer
//!    first, each chained to the previous by `control_input` so every device
//!    issues them in the same order;
//! 6. the update builder per device; computed params broadcast from the master
//!    device; the initial parameter sync in the init net; the namescope analysis;
//! 7. optionally, gradient blobs with disjoint lifetimes share buffers.

mod analysis;
mod device_model;
mod group;
mod layers;
mod memory;
mod summary;
mod sync_bn;
mod trainer;

pub use analysis::{check_namescopes, infer_blob_devices};
pub use device_model::{Blob, ConvBuilder, DeviceModel, IntoLosses, IntoUnit, Losses};
pub use group::{group_by_device, Group};
pub use memory::share_gradient_blobs;
pub use summary::{LayerSummary, ModelSummary};
pub use trainer::{FiniteCheck, InputSource, ParamsLoad, Trainer};

use std::collections::{HashMap, HashSet};

use crate::comm::collective_type;
use crate::error::{Error, Result};
use crate::graph::{is_device_scope, BlobRef, Device};
use crate::model::{ModelHelper, Sgd};
use crate::proto::NetDef;

/// Adds a replica's input ops (readers, preprocessing) in its scope.
pub trait InputBuilder {
    /// Called once per device, inside that device's scopes.
    fn build(&self, model: &mut ModelHelper, device: Device) -> Result<()>;
}

/// Adds a replica's forward pass and returns its (unscaled) losses.
pub trait ForwardBuilder {
    /// Called once per device, inside that device's scopes.
    fn build(&self, model: &mut ModelHelper, device: Device) -> Result<Vec<BlobRef>>;
}

/// Adds a replica's parameter update (weight decay, momentum, the step).
pub trait UpdateBuilder {
    /// Called once per device, inside that device's scopes.
    fn build(&self, model: &mut ModelHelper, device: Device) -> Result<()>;
}

impl<F: Fn(&mut ModelHelper) -> Result<()>> InputBuilder for F {
    fn build(&self, model: &mut ModelHelper, _: Device) -> Result<()> {
        self(model)
    }
}

impl<F: Fn(&mut ModelHelper) -> Result<Vec<BlobRef>>> ForwardBuilder for F {
    fn build(&self, model: &mut ModelHelper, _: Device) -> Result<Vec<BlobRef>> {
        self(model)
    }
}

impl<F: Fn(&mut ModelHelper) -> Result<()>> UpdateBuilder for F {
    fn build(&self, model: &mut ModelHelper, _: Device) -> Result<()> {
        self(model)
    }
}

macro_rules! optimizer_updates {
    ($($t:ty),*) => {$(
        impl UpdateBuilder for $t {
            fn build(&self, model: &mut ModelHelper, _: Device) -> Result<()> {
                <$t>::build(self, model)
            }
        }
    )*};
}
optimizer_updates!(
    Sgd,
    crate::model::Adam,
    crate::model::RmsProp,
    crate::model::Adagrad
);

/// How hosts find each other for multi-host training (Caffe2's `rendezvous`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendezvous {
    /// This host's index.
    pub shard_id: usize,
    /// Number of hosts.
    pub num_shards: usize,
    /// Collective engine across hosts: `"MPI"` (feature `mpi`).
    pub engine: String,
}

impl Rendezvous {
    /// This process's rank and the job's size, from MPI (`mpirun -np N`).
    #[cfg(feature = "mpi")]
    pub fn from_mpi() -> Result<Rendezvous> {
        let w = crate::comm::mpi::world()?;
        Ok(Rendezvous {
            shard_id: w.rank(),
            num_shards: w.size(),
            engine: "MPI".into(),
        })
    }

    /// The engine collectives carry: none within one process.
    fn collective_engine(r: Option<&Rendezvous>) -> Option<&str> {
        r.filter(|r| r.num_shards > 1).map(|r| r.engine.as_str())
    }
}

/// What happens to computed params (running statistics) after each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComputedParams {
    /// Left as each device computed them.
    Keep,
    /// Copied from the master device to the others (Caffe2's default).
    Broadcast,
    /// Averaged over devices.
    Average,
}

/// Builder of a data-parallel trainer.
pub struct Parallelize {
    model: ModelHelper,
    devices: Vec<Device>,
    input_builder: Option<Box<dyn InputBuilder>>,
    source: Option<Box<dyn InputSource>>,
    forward: Option<Box<dyn ForwardBuilder>>,
    update: Option<Box<dyn UpdateBuilder>>,
    rendezvous: Option<Rendezvous>,
    net_type: String,
    num_workers: Option<usize>,
    computed_params: ComputedParams,
    optimize_gradient_memory: bool,
    kernel_threads: Option<usize>,
    bucket_bytes: Option<usize>,
    accumulate: usize,
    sync_bn: bool,
    one_device_collectives: bool,
    fuse_ops: bool,
}

/// Bytes of gradients all-reduced together across hosts, at most (see
/// [`Parallelize::bucket_bytes`]): fewer, larger messages cost less latency.
pub const DEFAULT_BUCKET_BYTES: usize = 1 << 20;

/// Bytes of gradients all-reduced together on CPU devices of one process, at
/// most. In-process buckets save per-op overhead only, and a large one starts
/// late (when its last gradient is done) and runs on one worker while the
/// others wait: a 3-layer MLP with 37 KiB of gradients on 2 CPU devices took
/// 42–43 µs a step with 256 KiB buckets (all in one), 37–39 with 16 KiB, as
/// on one device; ResNet-20 measured the same either way, ResNet-56 4% slower
/// with 1 MiB (README, Performance).
pub const DEFAULT_LOCAL_BUCKET_BYTES: usize = 16 << 10;

impl Parallelize {
    /// Starts from `model`; its existing parameters are not data-parallel.
    pub fn new(model: ModelHelper) -> Self {
        Parallelize {
            model,
            devices: Vec::new(),
            input_builder: None,
            source: None,
            forward: None,
            update: None,
            rendezvous: None,
            net_type: "dag".into(),
            num_workers: None,
            computed_params: ComputedParams::Broadcast,
            optimize_gradient_memory: false,
            kernel_threads: None,
            bucket_bytes: None,
            accumulate: 1,
            sync_bn: false,
            one_device_collectives: false,
            fuse_ops: true,
        }
    }

    /// Synchronous batch norm (Caffe2's `combine_spatial_bn`, PyTorch's
    /// `SyncBatchNorm`): every training `SpatialBN` normalises with the
    /// statistics of the global batch over all devices, and its scale and bias
    /// gradients are the global batch's, so N devices train like one device with
    /// the whole batch. Costs two small all-reduces per batch norm forward and
    /// two backward. Within one process (several devices of one host).
    pub fn sync_batch_norm(mut self, on: bool) -> Self {
        self.sync_bn = on;
        self
    }

    /// Gradient accumulation (PyTorch's `no_sync`, Horovod's
    /// `backward_passes_per_step`): each step runs forward and backward on `k`
    /// batches from the input source, sums their gradients, and all-reduces and
    /// updates once: k batches of B train like one of k·B (without batch norm,
    /// whose statistics are per micro-batch). Losses are scaled by 1/(devices ×
    /// hosts × k).
    pub fn gradient_accumulation(mut self, k: usize) -> Self {
        self.accumulate = k;
        self
    }

    /// The devices to replicate over; the first is the master.
    pub fn devices(mut self, devices: impl IntoIterator<Item = Device>) -> Self {
        self.devices = devices.into_iter().collect();
        self
    }

    /// Adds input ops per device (readers inside the graph).
    pub fn input_builder(mut self, f: impl InputBuilder + 'static) -> Self {
        self.input_builder = Some(Box::new(f));
        self
    }

    /// One shared source of whole batches; each device is fed its slice.
    pub fn input(mut self, source: impl InputSource + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The forward pass, returning the losses.
    pub fn forward(mut self, f: impl ForwardBuilder + 'static) -> Self {
        self.forward = Some(Box::new(f));
        self
    }

    /// The parameter update; without one the model is forward-only (inference).
    pub fn update(mut self, f: impl UpdateBuilder + 'static) -> Self {
        self.update = Some(Box::new(f));
        self
    }

    /// Whether the executor may run adjacent ops as one fused kernel (default
    /// on): batch norm with the relu after it, and their gradients, with the
    /// same bits and every blob still written (see `exec::fuse`). Off, each op
    /// runs alone, as in Caffe2 (the net's `dpm_fuse` argument is 0).
    pub fn fuse_ops(mut self, on: bool) -> Self {
        self.fuse_ops = on;
        self
    }

    /// Emits the collectives even for one device on one host (a world of one):
    /// the data-parallel path, run where there is one device, such as NCCL on
    /// a one-GPU machine. The results equal those without it.
    pub fn collectives_on_one_device(mut self, on: bool) -> Self {
        self.one_device_collectives = on;
        self
    }

    /// Multi-host settings: `num_shards` processes, each with these devices
    /// (`Rendezvous::from_mpi()` under `mpirun`, feature `mpi`).
    pub fn rendezvous(mut self, r: Rendezvous) -> Self {
        self.rendezvous = Some(r);
        self
    }

    /// Executor of the train net: `"dag"` (default) or `"simple"`.
    pub fn net_type(mut self, t: &str) -> Self {
        self.net_type = t.to_owned();
        self
    }

    /// Worker threads of the DAG executor (default: 4 per device).
    pub fn num_workers(mut self, n: usize) -> Self {
        self.num_workers = Some(n);
        self
    }

    /// Whether computed params are broadcast from the master after each step
    /// (default true).
    pub fn broadcast_computed_params(mut self, on: bool) -> Self {
        self.computed_params = if on {
            ComputedParams::Broadcast
        } else {
            ComputedParams::Keep
        };
        self
    }

    /// What to do with computed params after each step.
    pub fn computed_params(mut self, mode: ComputedParams) -> Self {
        self.computed_params = mode;
        self
    }

    /// Lets gradient blobs with disjoint lifetimes share storage.
    pub fn optimize_gradient_memory(mut self, on: bool) -> Self {
        self.optimize_gradient_memory = on;
        self
    }

    /// Gradient buckets: consecutive gradients (in the order they complete,
    /// last layer first) of up to this many bytes in all are all-reduced by
    /// one op (a larger gradient goes alone); `0` gives each gradient its own
    /// all-reduce, Caffe2's form of the net.
    ///
    /// On CPU devices a bucket's gradients live end to end in one flat buffer
    /// per device: its first all-reduce moves them there, the ops computing
    /// them write into it from then on, and each all-reduce is one pass over
    /// one buffer. Across hosts a bucket is one message. Fewer, larger buckets
    /// cost less per-op and per-message overhead; smaller ones start sooner,
    /// while more of the backward pass remains to hide them.
    ///
    /// Default: [`DEFAULT_BUCKET_BYTES`] across hosts,
    /// [`DEFAULT_LOCAL_BUCKET_BYTES`] on CPU devices of one process, one
    /// all-reduce per gradient for GPUs of one process (Caffe2's
    /// `NCCLAllreduce` form; a bucket there is one NCCL group call).
    pub fn bucket_bytes(mut self, bytes: usize) -> Self {
        self.bucket_bytes = Some(bytes);
        self
    }

    /// Threads each CPU kernel may use (default: cores / devices, at least 1).
    pub fn kernel_threads(mut self, n: usize) -> Self {
        self.kernel_threads = Some(n);
        self
    }

    fn check_devices(&self, probe: bool) -> Result<()> {
        if self.devices.is_empty() {
            return Err(Error::Config(
                "no devices: call .devices([...]) with at least one".into(),
            ));
        }
        for (i, d) in self.devices.iter().enumerate() {
            if self.devices[..i].contains(d) {
                return Err(Error::Config(format!("device {d} is listed twice")));
            }
            if let (Device::Cuda(n), true) = (d, probe) {
                crate::cuda::check_device(*n)?;
            }
        }
        let gpus = self
            .devices
            .iter()
            .filter(|d| matches!(d, Device::Cuda(_)))
            .count();
        if gpus > 0 && gpus < self.devices.len() {
            return Err(Error::Config(
                "devices mix CPU and CUDA replicas; use one kind (their gradients are reduced by one backend)".into(),
            ));
        }
        if let Some(r) = &self.rendezvous {
            if r.num_shards == 0 || r.shard_id >= r.num_shards {
                return Err(Error::Config(format!(
                    "rendezvous shard_id {} must be below num_shards {}",
                    r.shard_id, r.num_shards
                )));
            }
            if r.num_shards > 1 {
                if r.engine != "MPI" {
                    return Err(Error::Config(format!(
                        "rendezvous engine `{}` is unknown; dpm reduces across hosts with MPI (engine \"MPI\")",
                        r.engine
                    )));
                }
                if !cfg!(feature = "mpi") {
                    return Err(Error::Config(format!(
                        "{} shards need MPI, but this build has no MPI support: rebuild with `--features mpi`",
                        r.num_shards
                    )));
                }
            }
        }
        if !matches!(self.net_type.as_str(), "dag" | "simple") {
            return Err(Error::Config(format!(
                "net type `{}` is unknown; use dag or simple",
                self.net_type
            )));
        }
        Ok(())
    }

    /// Builds the per-device graphs and returns the trainer.
    pub fn build(self) -> Result<Trainer> {
        self.check_devices(true)?;
        self.assemble()
    }

    /// The init net and train net that [`Parallelize::build`] would make, built
    /// without touching any device (no GPU or driver needed): to inspect them,
    /// or to check a multi-GPU configuration on a machine without those GPUs.
    pub fn build_nets(self) -> Result<(NetDef, NetDef)> {
        self.check_devices(false)?;
        let t = self.assemble()?;
        Ok((
            t.model().init_net().proto().clone(),
            t.model().net().proto().clone(),
        ))
    }

    fn assemble(self) -> Result<Trainer> {
        let Parallelize {
            mut model,
            devices,
            input_builder,
            source,
            forward,
            update,
            rendezvous,
            net_type,
            num_workers,
            computed_params,
            optimize_gradient_memory,
            kernel_threads,
            bucket_bytes,
            accumulate,
            sync_bn,
            one_device_collectives,
            fuse_ops,
        } = self;
        if sync_bn && num_shards_of(rendezvous.as_ref()) > 1 {
            return Err(Error::Config(
                "sync_batch_norm works within one process: with several hosts, each host's devices would need their collectives in the one cross-host order, which is not done yet".into(),
            ));
        }
        if accumulate == 0 {
            return Err(Error::Config("gradient_accumulation(k) needs k ≥ 1".into()));
        }
        let forward =
            forward.ok_or_else(|| Error::Config("no forward builder: call .forward(...)".into()))?;
        let num_shards = rendezvous.as_ref().map_or(1, |r| r.num_shards);
        let non_dp_params = model.params().len();
        let non_dp_state = model.optimizer_state().len();

        // 1. Replicas.
        let mut losses: Vec<Vec<BlobRef>> = Vec::with_capacity(devices.len());
        for &d in &devices {
            let l = in_scope(&mut model, d, |m| {
                if let Some(ib) = &input_builder {
                    ib.build(m, d)?;
                }
                forward.build(m, d)
            })?;
            if update.is_some() && l.is_empty() {
                return Err(Error::Config(format!(
                    "the forward builder returned no loss on {d}"
                )));
            }
            losses.push(l);
        }
        let param_groups = group_by_device(&devices, &model.params()[non_dp_params..], "parameter")?;
        let computed_groups = group_by_device(&devices, model.computed_params(), "computed parameter")?;

        let mut grad_groups = Vec::new();
        let mut state_groups = Vec::new();
        // Where the train net's forward and backward passes end (and the
        // collectives and updates begin): the split of gradient accumulation.
        let mut backward_end = 0;
        if let Some(update) = &update {
            // 2. Loss scaling.
            let scale = 1.0 / (devices.len() * num_shards * accumulate) as f32;
            let mut scaled = Vec::new();
            for (&d, ls) in devices.iter().zip(&losses) {
                for l in ls {
                    let s = in_scope(&mut model, d, |m| {
                        Ok(m.net_mut()
                            .op("Scale")
                            .input(l)
                            .output(l.with_suffix("_scaled"))
                            .arg("scale", scale)
                            .arg("require_scalar", 1i64)
                            .build_one())
                    })?;
                    scaled.push(s);
                }
            }
            // 3. Autodiff.
            model.add_gradient_ops(&scaled)?;
            if sync_bn {
                sync_bn::synchronize_batch_norm(model.net_mut().proto_mut(), &devices)?;
            }
            backward_end = model.net().proto().op.len();
            // 4. Gradients grouped, in the order they complete (last layer first).
            let dp_params: HashSet<&BlobRef> = param_groups.iter().flat_map(|g| &g.blobs).collect();
            let ready_order: Vec<BlobRef> = model
                .param_to_grad()
                .iter()
                .filter(|(p, _)| dp_params.contains(p))
                .map(|(_, g)| g.clone())
                .collect();
            for g in &param_groups {
                if model.param_to_grad().get(&g.blobs[0]).is_none() {
                    return Err(Error::Config(format!(
                        "parameter `{}` has no gradient: it does not lead to any loss",
                        g.name
                    )));
                }
            }
            grad_groups = group_by_device(&devices, &ready_order, "gradient")?;
            if grad_groups.is_empty() {
                return Err(Error::Config(
                    "the forward pass creates no parameter: there is nothing to train (an fc, conv or \
                     other layer with weights makes one)"
                        .into(),
                ));
            }
            // 5. Computed params, then the chained all-reduces.
            let engine = Rendezvous::collective_engine(rendezvous.as_ref());
            let sizes = blob_sizes(&model);
            if devices.len() > 1 || engine.is_some() || one_device_collectives {
                let chained =
                    add_computed_param_sync(&mut model, &devices, engine, &computed_groups, computed_params);
                let gpus = devices.iter().any(|d| matches!(d, Device::Cuda(_)));
                let cap = match (bucket_bytes, engine) {
                    (Some(b), _) => b,
                    (None, Some(_)) => DEFAULT_BUCKET_BYTES,
                    (None, None) if gpus => 0,
                    (None, None) => DEFAULT_LOCAL_BUCKET_BYTES,
                };
                let buckets = buckets(&grad_groups, &sizes, cap);
                add_allreduces(&mut model, &devices, engine, &buckets, chained);
            }
            // 6. Updates.
            for &d in &devices {
                in_scope(&mut model, d, |m| update.build(m, d))?;
            }
            state_groups = group_by_device(
                &devices,
                &model.optimizer_state()[non_dp_state..],
                "optimizer state",
            )?;
        }
        analysis::check_namescopes(model.net().proto(), &devices)?;
        analysis::check_namescopes(model.init_net().proto(), &devices)?;

        // Initial sync: every replica starts from the master's parameters.
        let sync_groups: Vec<Group> = param_groups.iter().chain(&computed_groups).cloned().collect();
        let engine = Rendezvous::collective_engine(rendezvous.as_ref());
        if devices.len() > 1 || engine.is_some() || one_device_collectives {
            for g in bundles(&sync_groups, engine) {
                collective(
                    model.init_net_mut().op(&collective_type("Broadcast", devices[0])),
                    devices[0],
                    engine,
                )
                .tensors(g)
                .build();
            }
        }

        // Caffe2 runtimes read what a net needs and gives from these lists.
        model.net_mut().declare_external_inputs();
        for l in losses.iter().flatten() {
            model.net_mut().add_external_output(l);
        }
        let init_outputs: Vec<String> = model
            .init_net()
            .proto()
            .op
            .iter()
            .flat_map(|o| o.output.clone())
            .collect();
        for o in init_outputs {
            model.init_net_mut().add_external_output(BlobRef::new(&o));
        }
        // Kernel threads per op: the cores shared among the devices.
        let kernel_threads = kernel_threads.unwrap_or((crate::exec::cores() / devices.len()).max(1));
        let net = model.net_mut();
        net.set_type(&net_type);
        net.set_num_workers(
            num_workers.unwrap_or_else(|| default_workers(&devices, kernel_threads, rendezvous.as_ref())),
        );
        net.set_arg("first_iter_only_one_worker", 1i64);
        if !fuse_ops {
            net.set_arg("dpm_fuse", 0i64);
        }
        let mut gradient_blobs: Vec<String> = Vec::new();
        if update.is_some() {
            let keep: HashSet<String> = grad_groups
                .iter()
                .flat_map(|g| g.blobs.iter().map(|b| b.name().to_owned()))
                .collect();
            if optimize_gradient_memory {
                for d in &devices {
                    share_gradient_blobs(model.net_mut().proto_mut(), &d.namescope(), &keep);
                }
            }
            gradient_blobs = gradient_outputs(model.net().proto());
        }
        Ok(Trainer::new(trainer::Parts {
            rendezvous,
            model,
            devices,
            source,
            losses,
            param_groups,
            computed_groups,
            grad_groups,
            state_groups,
            gradient_blobs,
            kernel_threads,
            training: update.is_some(),
            accumulate,
            backward_end,
        }))
    }
}

fn num_shards_of(r: Option<&Rendezvous>) -> usize {
    r.map_or(1, |r| r.num_shards)
}

/// Runs `f` inside device `d`'s device scope and name scope; a blob name it gave
/// that breaks the device-scope rule (one `#[data_parallel]` could not see at
/// compile time) is an error naming it.
fn in_scope<R>(
    model: &mut ModelHelper,
    d: Device,
    f: impl FnOnce(&mut ModelHelper) -> Result<R>,
) -> Result<R> {
    let before = (model.init_net().proto().op.len(), model.net().proto().op.len());
    let r = model.device_scope(d, |m| m.name_scope(&d.namescope(), f));
    if let Some((name, why)) = model.take_bad_name() {
        return Err(Error::Config(format!("blob name `{name}` (building {d}): {why}")));
    }
    // Ops added while building `d` (through any API, raw `Net` ops included)
    // touch `d`'s blobs and unscoped ones only.
    for (net, from) in [
        (model.init_net().proto(), before.0),
        (model.net().proto(), before.1),
    ] {
        for (i, op) in net.op.iter().enumerate().skip(from) {
            if crate::comm::is_collective(op.op_type()) {
                continue;
            }
            let foreign = op.input.iter().chain(&op.output).find(|b| {
                BlobRef::new(b.as_str())
                    .first_scope()
                    .is_some_and(|s| s != d.namescope() && is_device_scope(s))
            });
            if let Some(b) = foreign {
                return Err(Error::Config(format!(
                    "op #{i} `{}` of net `{}`, built for {d}, touches `{b}`: a replica's builder may \
                     touch only its own blobs (only Copy and collectives cross devices)",
                    op.op_type(),
                    net.net_name()
                )));
            }
        }
    }
    r
}

/// One `Allreduce` per bucket of gradient groups, in the given order, each
/// waiting (through `control_input`) for the previous one: all devices issue
/// them in one order, and the first can start while the backward pass of
/// earlier layers still runs.
///
/// `previous`: a collective the first all-reduce must follow (across hosts,
/// every collective of the net is in one chain; see `add_computed_param_sync`).
fn add_allreduces(
    model: &mut ModelHelper,
    devices: &[Device],
    engine: Option<&str>,
    buckets: &[&[Group]],
    mut previous: Option<BlobRef>,
) {
    for b in buckets {
        let mut op = collective(
            model.net_mut().op(&collective_type("Allreduce", devices[0])),
            devices[0],
            engine,
        )
        .tensors(b);
        if let Some(p) = &previous {
            op = op.control_input(p);
        }
        op.build();
        previous = Some(b[0].blobs[0].clone());
    }
}

/// The sync of computed params after each step. Across hosts they travel in one
/// op, which the all-reduces follow (the returned blob): one communication
/// thread per process serves collectives in arrival order, so every rank must
/// issue all of them in one order.
fn add_computed_param_sync(
    model: &mut ModelHelper,
    devices: &[Device],
    engine: Option<&str>,
    groups: &[Group],
    mode: ComputedParams,
) -> Option<BlobRef> {
    let mut last = None;
    for g in bundles(groups, engine) {
        let op = match mode {
            ComputedParams::Keep => continue,
            ComputedParams::Broadcast => model.net_mut().op(&collective_type("Broadcast", devices[0])),
            ComputedParams::Average => model
                .net_mut()
                .op(&collective_type("Allreduce", devices[0]))
                .arg("average", 1i64),
        };
        collective(op, devices[0], engine).tensors(g).build();
        last = engine.map(|_| g[0].blobs[0].clone());
    }
    last
}

/// Workers of the train net's `dag` executor: Caffe2's `devices × 4` for GPU
/// replicas (whose ops mostly wait on their devices) and across hosts (where
/// collectives wait on peers); for CPU replicas in one process, as many as the
/// cores hold with `kernel_threads` threads per op, and at least one per
/// device: more only take turns (ResNet-20 on 2 CPU devices, 2 cores: 8%
/// faster with 2 workers than with 8).
fn default_workers(devices: &[Device], kernel_threads: usize, r: Option<&Rendezvous>) -> usize {
    let gpus = devices.iter().any(|d| matches!(d, Device::Cuda(_)));
    if gpus || num_shards_of(r) > 1 {
        return devices.len() * 4;
    }
    (crate::exec::cores() / kernel_threads.max(1)).max(devices.len())
}

/// Each group alone within a process; all of them in one op across hosts.
pub(super) fn bundles<'g>(groups: &'g [Group], engine: Option<&str>) -> Vec<&'g [Group]> {
    match engine {
        _ if groups.is_empty() => Vec::new(),
        Some(_) => vec![groups],
        None => groups.iter().map(std::slice::from_ref).collect(),
    }
}

/// Elements of each parameter (and its gradient), from the fills of the init net.
fn blob_sizes(model: &ModelHelper) -> HashMap<String, usize> {
    let mut sizes = HashMap::new();
    for op in &model.init_net().proto().op {
        if let (Some(out), Some(dims)) = (op.output.first(), crate::graph::Args(&op.arg).ints("shape")) {
            sizes.insert(out.clone(), dims.iter().map(|&d| d.max(0) as usize).product());
        }
    }
    for (p, g) in model.param_to_grad().iter() {
        if let Some(&n) = sizes.get(p.name()) {
            sizes.insert(g.name().to_owned(), n);
        }
    }
    sizes
}

/// Consecutive gradient groups of at most `cap` bytes together (a group of
/// unknown or larger size alone).
fn buckets<'g>(groups: &'g [Group], sizes: &HashMap<String, usize>, cap: usize) -> Vec<&'g [Group]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, g) in groups.iter().enumerate() {
        let b = sizes.get(g.blobs[0].name()).map_or(usize::MAX, |n| n * 4);
        if i > start && bytes.saturating_add(b) > cap {
            out.push(&groups[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(b);
    }
    if start < groups.len() {
        out.push(&groups[start..]);
    }
    out
}

/// A collective op on the master device, tagged with the cross-host engine (as
/// Caffe2 tags its ops) when there is more than one host.
pub(crate) fn collective<'n>(
    op: crate::graph::OpBuilder<'n>,
    master: Device,
    engine: Option<&str>,
) -> Collective<'n> {
    let op = op.device(master);
    Collective(match engine {
        Some(e) => op.engine(e),
        None => op,
    })
}

/// A collective being built: its tensors, one blob per device each.
pub(crate) struct Collective<'n>(crate::graph::OpBuilder<'n>);

impl<'n> Collective<'n> {
    /// In place over `groups`, tensor-major; `num_tensors` when more than one.
    pub(crate) fn tensors(self, groups: &[Group]) -> crate::graph::OpBuilder<'n> {
        let blobs: Vec<&BlobRef> = groups.iter().flat_map(|g| &g.blobs).collect();
        let op = self
            .0
            .inputs(blobs.iter().copied())
            .outputs(blobs.iter().copied());
        if groups.len() > 1 {
            op.arg("num_tensors", groups.len() as i64)
        } else {
            op
        }
    }
}

/// Every blob written by a gradient op: what `optimize_gradient_memory` shrinks.
fn gradient_outputs(net: &NetDef) -> Vec<String> {
    let mut v: Vec<String> = net
        .op
        .iter()
        .filter(|op| op.is_gradient_op == Some(true))
        .flat_map(|op| op.output.iter().cloned())
        .collect();
    v.sort();
    v.dedup();
    v
}
