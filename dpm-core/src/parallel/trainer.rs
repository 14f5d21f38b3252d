//! The trainer `Parallelize::build` returns: runs the init net and the train
//! steps, feeds each device its slice of the batch, saves and loads checkpoints.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::{analysis, Group};
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::exec::Workspace;
use crate::graph::{BlobRef, Device, Net};
use crate::model::ModelHelper;
use crate::proto::NetDef;
use crate::tensor::Tensor;

/// A source of whole batches shared by all devices: each call returns
/// `(short blob name, tensor)` pairs whose first dimension is the global batch,
/// which the trainer splits evenly across devices.
pub trait InputSource {
    /// The next global batch.
    fn next_batch(&mut self) -> Result<Vec<(String, Tensor)>>;
}

impl<F: FnMut() -> Result<Vec<(String, Tensor)>>> InputSource for F {
    fn next_batch(&mut self) -> Result<Vec<(String, Tensor)>> {
        self()
    }
}

pub(super) struct Parts {
    pub rendezvous: Option<super::Rendezvous>,
    pub model: ModelHelper,
    pub devices: Vec<Device>,
    pub source: Option<Box<dyn InputSource>>,
    pub losses: Vec<Vec<BlobRef>>,
    pub param_groups: Vec<Group>,
    pub computed_groups: Vec<Group>,
    pub grad_groups: Vec<Group>,
    pub state_groups: Vec<Group>,
    pub gradient_blobs: Vec<String>,
    pub kernel_threads: usize,
    pub training: bool,
    /// Batches per step (gradient accumulation).
    pub accumulate: usize,
    /// Ops of the train net up to the end of the backward pass.
    pub backward_end: usize,
}

/// A data-parallel model ready to run: owns the model, its workspace and the
/// input source.
pub struct Trainer {
    p: Parts,
    test: Option<TestNet>,
    ws: Workspace,
    sync_net: NetDef,
    initialized: bool,
    blob_devices: HashMap<String, Device>,
    atomic: bool,
    finite: FiniteCheck,
    /// The batches of a failed step, fed again by the next.
    pending: Option<Vec<Vec<(String, Tensor)>>>,
    /// The next step's batches, drawn and sent to the devices while the
    /// current step computed.
    ahead: Option<Result<Ahead>>,
    /// With gradient accumulation: the nets of one micro-batch, of summing its
    /// gradients, and of the all-reduce and update (see `accumulation_nets`).
    accumulation: Vec<NetDef>,
    /// Each input's blob on each device, resolved by the first feed (see
    /// `feed_batch`).
    input_cells: std::sync::Mutex<Vec<(String, Vec<crate::exec::BlobCell>)>>,
}

/// What [`Trainer::step`] checks is finite after each step; a non-finite value
/// fails the step (and, with atomic steps, undoes it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FiniteCheck {
    /// Nothing (the default).
    #[default]
    Off,
    /// The loss.
    Loss,
    /// The loss and every gradient of the master device.
    LossAndGradients,
}

/// Batches smaller than this are split on the stepping thread, not ahead.
const PREFETCH_MIN_BYTES: usize = 256 << 10;

impl Trainer {
    pub(super) fn new(p: Parts) -> Trainer {
        let mut sync = Net::new(&format!("{}_sync", p.model.name()));
        let engine = super::Rendezvous::collective_engine(p.rendezvous.as_ref());
        if p.devices.len() > 1 || engine.is_some() {
            let groups: Vec<Group> = p
                .param_groups
                .iter()
                .chain(&p.computed_groups)
                .chain(&p.state_groups)
                .cloned()
                .collect();
            for g in super::bundles(&groups, engine) {
                super::collective(
                    sync.op(&crate::comm::collective_type("Broadcast", p.devices[0])),
                    p.devices[0],
                    engine,
                )
                .tensors(g)
                .build();
            }
        }
        let blob_devices =
            analysis::infer_blob_devices([p.model.init_net().proto(), p.model.net().proto()], &p.devices);
        Trainer {
            p,
            test: None,
            ws: Workspace::new(),
            sync_net: sync.into_proto(),
            initialized: false,
            blob_devices,
            atomic: true,
            finite: FiniteCheck::Off,
            pending: None,
            ahead: None,
            accumulation: Vec::new(),
            input_cells: Default::default(),
        }
    }

    /// Gradient accumulation's nets, from the train net: `micro` (forward and
    /// backward), `start` (`g_accum ← g`), `add` (`g_accum += g`), `finish`
    /// (`g ← g_accum`) and `apply` (collectives and updates).
    fn accumulation_nets(&self) -> Vec<NetDef> {
        let train = self.p.model.net().proto();
        let part = |suffix: &str, ops: &[crate::proto::OperatorDef]| {
            let mut n = train.clone();
            n.name = Some(format!("{}_{suffix}", train.net_name()));
            n.op = ops.to_vec();
            n
        };
        let grads: Vec<BlobRef> = self.p.grad_groups.iter().flat_map(|g| g.blobs.clone()).collect();
        let device = |g: &BlobRef| self.blob_device(g.name()).unwrap_or(self.p.devices[0]);
        let copy_net = |suffix: &str, from_accum: bool| {
            let mut n = Net::new(&format!("{}_{suffix}", train.net_name()));
            for g in &grads {
                let acc = g.with_suffix("_accum");
                let (src, dst) = if from_accum { (&acc, g) } else { (g, &acc) };
                n.op("Copy").input(src).output(dst).device(device(g)).build();
            }
            n.into_proto()
        };
        let mut add = Net::new(&format!("{}_accum_add", train.net_name()));
        for g in &grads {
            let acc = g.with_suffix("_accum");
            add.op("Sum")
                .inputs([&acc, g])
                .output(&acc)
                .device(device(g))
                .build();
        }
        vec![
            part("micro", &train.op[..self.p.backward_end]),
            copy_net("accum_start", false),
            add.into_proto(),
            copy_net("accum_finish", true),
            part("apply", &train.op[self.p.backward_end..]),
        ]
    }

    /// Whether a failed step is undone (default on): during each step the
    /// parameters, momenta, computed params and `ITER` of every device are
    /// copied aside (each by the op about to change it, just before), and a
    /// step that fails anywhere (any op, any device, a non-finite check) puts
    /// them back and keeps its batch for the next `step()`, which therefore
    /// computes exactly what the failed one would have. Off, a step costs one
    /// copy of that state less, and a failed step may leave replicas
    /// half-updated. Across ranks, a failed step ends the job.
    pub fn set_atomic_steps(&mut self, on: bool) {
        self.atomic = on;
    }

    /// What each step checks is finite (see [`FiniteCheck`]).
    pub fn set_finite_check(&mut self, check: FiniteCheck) {
        self.finite = check;
    }

    /// Every blob a step may change that outlives it: parameters, computed params
    /// and optimiser state, on every device.
    fn state_blobs(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .p
            .model
            .params()
            .iter()
            .map(|b| b.name().to_owned())
            .collect();
        for g in self
            .p
            .param_groups
            .iter()
            .chain(&self.p.computed_groups)
            .chain(&self.p.state_groups)
        {
            v.extend(g.blobs.iter().map(|b| b.name().to_owned()));
        }
        v.sort();
        v.dedup();
        v
    }

    /// The finite check after a step that ran.
    fn check_finite(&self) -> Result<()> {
        if self.finite == FiniteCheck::Off {
            return Ok(());
        }
        let loss = self.loss()?;
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                what: format!("the loss ({loss})"),
            });
        }
        if self.finite == FiniteCheck::LossAndGradients {
            for g in &self.p.grad_groups {
                let blob = &g.blobs[0];
                let t = self.ws.fetch(blob)?;
                if let Ok(d) = t.data::<f32>() {
                    if let Some(v) = d.iter().find(|v| !v.is_finite()) {
                        return Err(Error::NonFinite {
                            what: format!("gradient `{blob}` (holds {v})"),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs the init net (parameters, optimiser state, initial sync from the
    /// master device) and compiles the train net.
    pub fn run_init(&mut self) -> Result<()> {
        self.ws.set_kernel_threads(self.p.kernel_threads);
        if self.num_shards() > 1 {
            self.check_same_collectives()?;
        }
        self.ws.run_net_once(self.p.model.init_net().proto())?;
        // The state blobs are guarded before the nets are compiled: an op
        // saves what it changes of them (see `exec::Snapshot`).
        self.ws.guard(&self.state_blobs());
        self.ws.create_net(self.p.model.net().proto())?;
        self.ws.create_net(&self.sync_net)?;
        if self.p.accumulate > 1 {
            self.accumulation = self.accumulation_nets();
            for n in &self.accumulation {
                self.ws.create_net(n)?;
            }
        }
        self.initialized = true;
        Ok(())
    }

    fn ensure_init(&self) -> Result<()> {
        if self.initialized {
            Ok(())
        } else {
            Err(Error::Config("call run_init() before running the trainer".into()))
        }
    }

    /// Feeds the next batch (if there is an input source) and runs one step.
    ///
    /// The batches of the next step are drawn from the source before this step
    /// runs, then split and copied to the devices (to GPUs on a copy stream)
    /// while it computes, so that a step does not wait for its input.
    pub fn step(&mut self) -> Result<()> {
        self.ensure_init()?;
        let k = self.p.accumulate;
        // A failed step's batches first, then those drawn ahead, then new ones.
        let (batches, mut parts) = if let Some(b) = self.pending.take() {
            (b, None)
        } else if let Some(ahead) = self.ahead.take() {
            let a = ahead?;
            (a.host, Some(a.parts))
        } else if let Some(src) = self.p.source.as_mut() {
            (
                (0..k).map(|_| src.next_batch()).collect::<Result<Vec<_>>>()?,
                None,
            )
        } else {
            (Vec::new(), None)
        };
        // The next batches are drawn here (sources need not be `Send`), then
        // split and sent to the devices by a helper thread while this step runs
        // — when that pays: for GPUs (uploads) or batches of 256 KiB and more.
        // Starting a thread costs tens of µs, more than splitting a small batch.
        let bytes: usize = batches.iter().flatten().map(|(_, t)| t.numel() * 4).sum();
        let gpus = self.p.devices.iter().any(|d| matches!(d, Device::Cuda(_)));
        let prefetch = self.ahead.is_none() && (gpus || bytes >= PREFETCH_MIN_BYTES);
        let next_host = match self.p.source.as_mut() {
            Some(src) if prefetch => Some((0..k).map(|_| src.next_batch()).collect::<Result<Vec<_>>>()),
            _ => None,
        };
        let split = (self.p.devices.clone(), self.shard_id(), self.num_shards());
        let guard = self.ws.snapshot().filter(|_| self.atomic);
        if let Some(g) = &guard {
            g.begin();
        }
        let ran = std::thread::scope(|scope| {
            let next = next_host.map(|host| {
                scope.spawn(move || -> Result<Ahead> {
                    let host = host?;
                    let parts = host
                        .iter()
                        .map(|b| split_to_devices(b, &split.0, split.1, split.2))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(Ahead { host, parts })
                })
            });
            let ran = self
                .run_batches(&batches, parts.as_mut())
                .and_then(|()| self.check_finite());
            if let Some(h) = next {
                self.ahead = Some(
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Config("the input source panicked".into()))),
                );
            }
            ran
        });
        let restored = match (&ran, &guard) {
            (Err(_), Some(g)) => g.restore(),
            _ => Ok(()),
        };
        if let Some(g) = &guard {
            g.end();
        }
        if let Err(e) = ran {
            restored?;
            if guard.is_some() {
                self.pending = Some(batches).filter(|b| !b.is_empty());
            }
            return Err(e);
        }
        Ok(())
    }

    /// One step over `batches` (one per micro-batch; none without a source),
    /// fed from `parts` (each micro-batch already split and on its devices)
    /// when given.
    fn run_batches(
        &self,
        batches: &[Vec<(String, Tensor)>],
        mut parts: Option<&mut Vec<DeviceParts>>,
    ) -> Result<()> {
        let mut feed = |i: usize| -> Result<()> {
            match parts.as_deref_mut().and_then(|p| p.get_mut(i)) {
                Some(p) => self.feed_parts(std::mem::take(p)),
                None => batches.get(i).map_or(Ok(()), |b| self.feed_batch(b)),
            }
        };
        if self.accumulation.is_empty() {
            feed(0)?;
            return self.ws.run_net(self.p.model.net().proto().net_name());
        }
        let [micro, start, add, finish, apply] = &self.accumulation[..] else {
            unreachable!("five accumulation nets")
        };
        for i in 0..self.p.accumulate {
            feed(i)?;
            self.ws.run_net(micro.net_name())?;
            self.ws
                .run_net(if i == 0 { start.net_name() } else { add.net_name() })?;
        }
        self.ws.run_net(finish.net_name())?;
        self.ws.run_net(apply.net_name())
    }

    /// Feeds this rank's slices of a global batch: every rank draws the same
    /// batch, and rank r's devices get parts r·n … r·n + n − 1.
    /// CPU replicas' slices are copied into the blobs they replace, through
    /// blob handles looked up once: a small batch's step then spends no time
    /// allocating, freeing or hashing names (per device, per input).
    fn feed_batch(&self, batch: &[(String, Tensor)]) -> Result<()> {
        let devices = &self.p.devices;
        if devices.iter().any(|d| matches!(d, Device::Cuda(_))) {
            let parts = split_to_devices(batch, devices, self.shard_id(), self.num_shards())?;
            return self.feed_parts(parts);
        }
        let n = devices.len();
        let first_part = self.shard_id() * n;
        let mut cells = self.input_cells.lock().unwrap_or_else(|e| e.into_inner());
        for (name, t) in batch {
            let per = rows_per_device(name, t, n * self.num_shards())?;
            let k = match cells.iter().position(|(m, _)| m == name) {
                Some(k) => k,
                None => {
                    let blobs = devices
                        .iter()
                        .map(|d| self.ws.cell(&format!("{}/{name}", d.namescope())))
                        .collect();
                    cells.push((name.clone(), blobs));
                    cells.len() - 1
                }
            };
            for (i, cell) in cells[k].1.iter().enumerate() {
                let mut blob = cell.write().unwrap_or_else(|e| e.into_inner());
                let first = (first_part + i) * per;
                match blob.as_mut() {
                    Some(b) => b.assign_rows(t, first, per)?,
                    None => *blob = Some(t.rows_to_device(first, per, devices[i])?),
                }
            }
        }
        Ok(())
    }

    /// Feeds parts made by [`split_to_devices`], after their uploads.
    fn feed_parts(&self, parts: DeviceParts) -> Result<()> {
        for (name, d, mut t) in parts {
            t.settle()?;
            self.ws.feed(format!("{}/{name}", d.namescope()), t);
        }
        Ok(())
    }

    /// Replaces the input source (e.g. after [`Trainer::load`], with a loader that
    /// starts at the restored iteration).
    pub fn set_input(&mut self, source: impl InputSource + 'static) {
        self.p.source = Some(Box::new(source));
        self.ahead = None;
    }

    /// Runs `iterations` steps.
    pub fn run(&mut self, iterations: usize) -> Result<()> {
        (0..iterations).try_for_each(|_| self.step())
    }

    /// Runs `steps` training steps while recording every op of this process
    /// (the workspace's [`Trace`](crate::exec::Trace)), and returns the
    /// timeline. Trace steps after a warm-up: the first runs allocate memory
    /// and pick algorithms. On a GPU, ops are waited for one by one while
    /// tracing, so a traced step is slower than an untraced one.
    pub fn trace_steps(&mut self, steps: usize) -> Result<crate::exec::Trace> {
        self.ws.start_trace();
        let ran = self.run(steps);
        let trace = self.ws.take_trace(steps);
        ran.map(|()| trace)
    }

    /// [`Trainer::trace_steps`], written to `path` as a Chrome trace (JSON, for
    /// Perfetto or `chrome://tracing`): one row per device for its compute
    /// ops, one for the collectives. Returns how much of the all-reduce time
    /// the backward pass hid.
    ///
    /// ```no_run
    /// # fn f(trainer: &mut dpm_core::parallel::Trainer) -> dpm_core::Result<()> {
    /// trainer.run(10)?; // warm-up
    /// let overlap = trainer.trace("step.json", 3)?;
    /// println!("{overlap}"); // all-reduce 1.20 ms per step, of which 85% hidden behind backward
    /// # Ok(()) }
    /// ```
    pub fn trace(&mut self, path: impl AsRef<std::path::Path>, steps: usize) -> Result<crate::exec::Overlap> {
        let trace = self.trace_steps(steps)?;
        trace.write_chrome(path)?;
        Ok(trace.overlap())
    }

    /// Feeds `tensor` to blob `name` of `device` (e.g. inputs without a source),
    /// copying it into the device's memory for a CUDA replica.
    pub fn feed(&self, name: &str, device: Device, tensor: Tensor) -> Result<()> {
        let tensor = match device {
            Device::Cuda(_) => tensor.to_device(device)?,
            Device::Cpu(_) => tensor,
        };
        self.ws.feed(format!("{}/{name}", device.namescope()), tensor);
        Ok(())
    }

    /// A copy in host memory of blob `name` (short name) of `device`'s replica.
    pub fn fetch(&self, name: &str, device: Device) -> Result<Tensor> {
        self.ws.fetch(format!("{}/{name}", device.namescope()))
    }

    /// The mean over devices (of every rank) of each device's total loss, as the
    /// forward builder returned it (unscaled).
    pub fn loss(&self) -> Result<f32> {
        let mut total = 0.0f64;
        for ls in &self.p.losses {
            for l in ls {
                // Read in place: a host copy only for a GPU's loss.
                let first = |t: &Tensor| t.data::<f32>().ok().and_then(|d| d.first().copied());
                let v = self.ws.with_blob(l, |t| match t.is_on_host() {
                    true => Ok(first(t)),
                    false => t.to_host().map(|h| first(&h)),
                })??;
                total += f64::from(v.unwrap_or(f32::NAN));
            }
        }
        self.mean_over_ranks(total / self.p.devices.len() as f64, "the loss")
    }

    /// The mean over ranks of each rank's `value` (itself with one rank).
    fn mean_over_ranks(&self, value: f64, what: &str) -> Result<f32> {
        if self.num_shards() == 1 {
            return Ok(value as f32);
        }
        #[cfg(feature = "mpi")]
        {
            // The bits travel exactly; every rank sums them in rank order.
            let all = crate::comm::mpi::world()?.gather(vec![value.to_bits()], what)?;
            let sum: f64 = all.iter().map(|&b| f64::from_bits(b)).sum();
            Ok((sum / self.num_shards() as f64) as f32)
        }
        #[cfg(not(feature = "mpi"))]
        {
            let _ = what;
            unreachable!("several shards are refused without the mpi feature")
        }
    }

    /// Checks every rank built the same nets, before any collective runs: a rank
    /// with another net would otherwise wait in a collective its peers never
    /// issue, or exchange buffers of other sizes.
    fn check_same_collectives(&self) -> Result<()> {
        let sigs = analysis::collective_signatures(&[
            self.p.model.init_net().proto(),
            self.p.model.net().proto(),
            &self.sync_net,
        ]);
        #[cfg(feature = "mpi")]
        {
            let w = crate::comm::mpi::world()?;
            let counts = w.gather(vec![sigs.len() as u64], "comparing the ranks' nets")?;
            let longest = counts.iter().copied().max().unwrap_or(0) as usize;
            let mut mine: Vec<u64> = sigs.iter().map(|(_, h)| *h).collect();
            mine.resize(longest, 0);
            let all = w.gather(mine, "comparing the ranks' nets")?;
            for k in 0..longest {
                let ranks: Vec<u64> = all.chunks(longest).map(|r| r[k]).collect();
                if let Some(other) = ranks.iter().position(|&h| h != ranks[0]) {
                    let here = sigs
                        .get(k)
                        .map_or("nothing (its nets end earlier)", |(d, _)| d.as_str());
                    return Err(Error::Config(format!(
                        "the ranks built different nets: collective #{k} differs between rank 0 and rank {other} \
                         (rank {} has {here}); every rank must run the same model with the same --devices",
                        self.shard_id()
                    )));
                }
            }
        }
        #[cfg(not(feature = "mpi"))]
        let _ = sigs;
        Ok(())
    }

    /// This process's shard (rank), 0 without a rendezvous.
    pub fn shard_id(&self) -> usize {
        self.p.rendezvous.as_ref().map_or(0, |r| r.shard_id)
    }

    /// Number of shards (processes), 1 without a rendezvous.
    pub fn num_shards(&self) -> usize {
        self.p.rendezvous.as_ref().map_or(1, |r| r.num_shards)
    }

    /// The learning rate of the last step (from the optimiser's `lr` blob; its
    /// magnitude, whatever sign the update op wants).
    pub fn lr(&self) -> Result<f32> {
        let t = self.fetch("lr", self.p.devices[0])?;
        let v = t
            .data::<f32>()
            .ok()
            .and_then(|d| d.first().copied())
            .ok_or_else(|| {
                Error::value("lr", "the learning rate must be one f32 (is there an optimiser?)")
            })?;
        Ok(v.abs())
    }

    /// The mean over devices of a scalar blob (accuracy, a metric).
    pub fn mean_scalar(&self, name: &str) -> Result<f32> {
        let mut total = 0.0f64;
        for &d in &self.p.devices {
            let t = self.fetch(name, d)?;
            let v = t
                .data::<f32>()
                .ok()
                .and_then(|x| x.first().copied())
                .ok_or_else(|| Error::value(format!("{}/{name}", d.namescope()), "expected an f32 scalar"))?;
            total += f64::from(v);
        }
        self.mean_over_ranks(total / self.p.devices.len() as f64, name)
    }

    /// The devices, master first.
    pub fn devices(&self) -> &[Device] {
        &self.p.devices
    }

    /// The model, with all replicas built.
    pub fn model(&self) -> &ModelHelper {
        &self.p.model
    }

    /// The workspace holding every device's blobs.
    pub fn workspace(&self) -> &Workspace {
        &self.ws
    }

    /// Data-parallel parameters, grouped by device.
    pub fn param_groups(&self) -> &[Group] {
        &self.p.param_groups
    }

    /// Gradients, grouped by device, in all-reduce order.
    pub fn grad_groups(&self) -> &[Group] {
        &self.p.grad_groups
    }

    /// Computed params (running statistics), grouped by device.
    pub fn computed_param_groups(&self) -> &[Group] {
        &self.p.computed_groups
    }

    /// The device a blob lives on, inferred from namescopes and the ops touching it.
    pub fn blob_device(&self, name: &str) -> Option<Device> {
        self.blob_devices.get(name).copied()
    }

    /// Bytes allocated now by gradient blobs (distinct buffers): what
    /// `optimize_gradient_memory` lowers. Blobs are never freed and a resize keeps
    /// its allocation, so after a step this is the step's peak, not the sum of
    /// what each shared buffer holds last.
    pub fn gradient_bytes(&self) -> usize {
        self.p
            .gradient_blobs
            .iter()
            .filter_map(|b| self.ws.with_blob(b, Tensor::allocated_bytes).ok())
            .sum()
    }

    /// What a checkpoint holds: (key, blob on the master device).
    fn checkpoint_entries(&self) -> Vec<(String, BlobRef)> {
        let dp: HashSet<&BlobRef> = self.p.param_groups.iter().flat_map(|g| &g.blobs).collect();
        let non_dp = self
            .p
            .model
            .params()
            .iter()
            .filter(|p| !dp.contains(p))
            .map(|p| (p.name().to_owned(), p.clone()));
        let grouped = self
            .p
            .param_groups
            .iter()
            .chain(&self.p.computed_groups)
            .chain(&self.p.state_groups)
            .map(|g| (g.name.clone(), g.blobs[0].clone()));
        non_dp.chain(grouped).collect()
    }

    /// Saves the master device's parameters, computed params and optimiser state
    /// (momenta, `ITER`) to `path`, atomically. Across ranks (whose replicas are
    /// identical) rank 0 writes, and every rank returns once the file is there.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.ensure_init()?;
        if self.num_shards() > 1 {
            let written = if self.shard_id() == 0 {
                self.save_here(path.as_ref())
            } else {
                Ok(())
            };
            #[cfg(feature = "mpi")]
            crate::comm::mpi::world()?.barrier("saving a checkpoint")?;
            return written;
        }
        self.save_here(path.as_ref())
    }

    fn save_here(&self, path: &Path) -> Result<()> {
        let tensors = self
            .checkpoint_entries()
            .into_iter()
            .map(|(k, b)| Ok((k, self.ws.fetch(&b)?)))
            .collect::<Result<Vec<_>>>()?;
        let meta = HashMap::from([("model".to_owned(), self.p.model.name().to_owned())]);
        checkpoint::save(path, &tensors, meta)
    }

    /// Loads a checkpoint written by [`Trainer::save`] into the master device, then
    /// [`Trainer::finalize_after_checkpoint`]. Every blob must be present with the
    /// shape the model expects; nothing is changed if any is not.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        if !self.initialized {
            self.run_init()?;
        }
        let path = path.as_ref();
        let mut by_name: HashMap<String, Tensor> = checkpoint::load(path)?.tensors.into_iter().collect();
        let bad = |reason: String| Error::Checkpoint {
            path: path.display().to_string(),
            reason,
        };
        let mut staged = Vec::new();
        for (key, blob) in self.checkpoint_entries() {
            let t = by_name
                .remove(&key)
                .ok_or_else(|| bad(format!("has no `{key}`, which the model needs")))?;
            self.check_loadable(&key, &blob, &t).map_err(bad)?;
            if let Ok(d) = t.data::<i64>() {
                if let Some(v) = d
                    .iter()
                    .find(|&&v| v < 0)
                    .filter(|_| blob.name().ends_with("ITER"))
                {
                    return Err(bad(format!(
                        "`{key}` is {v}: an iteration count is never negative"
                    )));
                }
            }
            staged.push((blob, t));
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(bad(format!("holds `{extra}`, which the model does not have")));
        }
        self.install(staged)
    }

    /// Loads the parameters and computed params (batch-norm statistics) this
    /// model shares by name with a checkpoint of any model (a backbone to
    /// fine-tune, say) into every replica; the optimiser state and `ITER` stay
    /// as they are (a checkpoint needs neither). A parameter the checkpoint
    /// lacks keeps its value and is listed in the report, as are the
    /// checkpoint's tensors the model does not use; a shared name whose shape
    /// or type differs is an error, and then nothing changes.
    pub fn load_params(&mut self, path: impl AsRef<Path>) -> Result<ParamsLoad> {
        if !self.initialized {
            self.run_init()?;
        }
        let path = path.as_ref();
        let mut by_name: HashMap<String, Tensor> = checkpoint::load(path)?.tensors.into_iter().collect();
        let state: HashSet<&str> = self.p.state_groups.iter().map(|g| g.name.as_str()).collect();
        let mut report = ParamsLoad::default();
        let mut staged = Vec::new();
        for (key, blob) in self.checkpoint_entries() {
            if state.contains(key.as_str()) {
                continue;
            }
            let Some(t) = by_name.remove(&key) else {
                report.missing.push(key);
                continue;
            };
            self.check_loadable(&key, &blob, &t)
                .map_err(|reason| Error::Checkpoint {
                    path: path.display().to_string(),
                    reason,
                })?;
            report.loaded.push(key);
            staged.push((blob, t));
        }
        report.unused = by_name.into_keys().collect();
        report.unused.sort();
        self.install(staged)?;
        Ok(report)
    }

    /// Whether checkpoint tensor `key` can replace `blob`: the same shape and
    /// type, and finite.
    fn check_loadable(&self, key: &str, blob: &BlobRef, t: &Tensor) -> std::result::Result<(), String> {
        let current = self.ws.fetch(blob).map_err(|e| e.to_string())?;
        if t.shape() != current.shape() || t.dtype() != current.dtype() {
            return Err(format!(
                "`{key}` is {:?} {}, the model's is {:?} {}",
                t.dtype(),
                t.shape(),
                current.dtype(),
                current.shape()
            ));
        }
        if let Ok(d) = t.data::<f32>() {
            if let Some(v) = d.iter().find(|v| !v.is_finite()) {
                return Err(format!("`{key}` holds {v}: a checkpoint of a diverged run"));
            }
        }
        Ok(())
    }

    /// Writes checked tensors into the master replica, then copies them to the
    /// others. Uploads first: a device that cannot take the values leaves
    /// every blob as it was.
    fn install(&self, staged: Vec<(BlobRef, Tensor)>) -> Result<()> {
        let staged = staged
            .into_iter()
            .map(|(blob, t)| match self.ws.blob_device(&blob)? {
                d @ Device::Cuda(_) => Ok((blob, t.to_device(d)?)),
                Device::Cpu(_) => Ok((blob, t)),
            })
            .collect::<Result<Vec<_>>>()?;
        for (blob, t) in staged {
            self.ws.feed(&blob, t);
        }
        self.finalize_after_checkpoint()
    }

    /// Copies the master device's parameters, computed params and optimiser state
    /// to every other device (after loading blobs into the master by hand).
    pub fn finalize_after_checkpoint(&self) -> Result<()> {
        self.ensure_init()?;
        self.ws.run_net(self.sync_net.net_name())
    }

    /// Threads each CPU kernel of this trainer may use.
    pub fn kernel_threads(&self) -> usize {
        self.p.kernel_threads
    }

    /// Whether the trainer updates parameters (false: forward-only).
    pub fn is_training(&self) -> bool {
        self.p.training
    }
}

/// An inference net on the master device sharing the trainer's parameters.
struct TestNet {
    model: ModelHelper,
    outputs: Vec<BlobRef>,
}

impl Trainer {
    /// Builds an inference net of `forward` for the master device in this
    /// trainer's workspace: batch norm on running statistics, no gradients, no
    /// updates, the trained parameters read in place (Caffe2's test model with
    /// `init_params=False`). Run it with [`Trainer::run_test`].
    pub fn add_test_net(&mut self, forward: impl super::ForwardBuilder) -> Result<()> {
        let master = self.p.devices[0];
        let mut model = ModelHelper::new_test(&format!("{}_test", self.p.model.name()));
        let outputs = model.device_scope(master, |m| {
            m.name_scope(&master.namescope(), |m| forward.build(m, master))
        })?;
        for p in model.params() {
            if !self.p.model.params().contains(p) {
                return Err(Error::Config(format!(
                    "the test net uses parameter `{p}`, which the trained model does not have"
                )));
            }
        }
        self.ws.create_net(model.net().proto())?;
        self.test = Some(TestNet { model, outputs });
        Ok(())
    }

    /// Feeds `batch` (short names → tensors) to the master device and runs the test
    /// net; read results with [`Trainer::fetch`] on the master device.
    pub fn run_test(&self, batch: Vec<(String, Tensor)>) -> Result<()> {
        self.ensure_init()?;
        let test = self
            .test
            .as_ref()
            .ok_or_else(|| Error::Config("no test net: call add_test_net first".into()))?;
        let master = self.p.devices[0];
        for (name, t) in batch {
            self.feed(&name, master, t)?;
        }
        self.ws.run_net(test.model.net().proto().net_name())
    }

    /// The outputs (losses) the test net's forward builder returned.
    pub fn test_outputs(&self) -> &[BlobRef] {
        self.test.as_ref().map_or(&[], |t| &t.outputs)
    }
}

/// One micro-batch as fed: (blob, device, that device's part).
type DeviceParts = Vec<(String, Device, Tensor)>;

/// A step's batches drawn ahead: as the source gave them (kept to feed again
/// if the step fails) and split onto the devices.
struct Ahead {
    host: Vec<Vec<(String, Tensor)>>,
    parts: Vec<DeviceParts>,
}

/// This rank's parts of a global batch: each tensor split along its first
/// dimension into devices × shards equal parts, rank r's devices getting parts
/// r·n … r·n + n − 1, each copied to its device (to a GPU through its copy
/// stream: settle before use).
fn split_to_devices(
    batch: &[(String, Tensor)],
    devices: &[Device],
    shard: usize,
    shards: usize,
) -> Result<DeviceParts> {
    let n = devices.len();
    let mut out = Vec::with_capacity(batch.len() * n);
    for (name, t) in batch {
        let per = rows_per_device(name, t, n * shards)?;
        for (i, &d) in devices.iter().enumerate() {
            out.push((name.clone(), d, t.rows_to_device((shard * n + i) * per, per, d)?));
        }
    }
    Ok(out)
}

/// Rows of input `name` each of `total` devices gets.
fn rows_per_device(name: &str, t: &Tensor, total: usize) -> Result<usize> {
    let Some(&rows) = t.dims().first() else {
        return Err(Error::shape(name, "a batch dimension", t.shape()));
    };
    if rows % total != 0 {
        return Err(Error::shape(
            name,
            format!("a batch divisible by the {total} devices"),
            t.shape(),
        ));
    }
    Ok(rows / total)
}

/// What [`Trainer::load_params`] did, by parameter name (without a device
/// prefix).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParamsLoad {
    /// Parameters and computed params taken from the checkpoint.
    pub loaded: Vec<String>,
    /// The model's parameters the checkpoint lacks (they kept their values).
    pub missing: Vec<String>,
    /// The checkpoint's tensors the model has no parameter for (its optimiser
    /// state, `ITER`, or another model's layers).
    pub unused: Vec<String>,
}
