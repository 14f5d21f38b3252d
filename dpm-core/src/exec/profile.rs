//! Time per op type, as Caffe2's `prof_dag` net reported it: switched on with
//! [`Workspace::set_profiling`](super::Workspace::set_profiling), read with
//! [`Workspace::op_times`](super::Workspace::op_times); and a timeline of every
//! op run ([`Workspace::start_trace`](super::Workspace::start_trace), read as a
//! [`Trace`](super::trace::Trace)).
//!
//! A CPU op's time is its wall time. A GPU op's time is its device time, from
//! CUDA events recorded on its stream before and after its work; GPU ops enqueue
//! one at a time while profiling, so that no other op's work falls between an
//! op's two events. The events are read when the net's run has synchronised.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::trace::{NetRun, TraceEvent};
use crate::error::Result;
use crate::graph::Device;
use crate::proto::OperatorDef;

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

/// The running totals of a workspace, and its timeline while tracing.
#[derive(Default)]
pub(crate) struct Profile {
    by_type: Mutex<HashMap<String, OpTime>>,
    /// Whether op times go into `by_type`.
    totals: std::sync::atomic::AtomicBool,
    /// The timeline being recorded, if any.
    trace: Mutex<Option<Recording>>,
    /// Held by a GPU op while it enqueues its work between its two events.
    #[cfg(feature = "cuda")]
    gpu_turn: Mutex<()>,
    /// GPU ops whose events have not been read yet.
    #[cfg(feature = "cuda")]
    pending: Mutex<Vec<PendingGpuOp>>,
}

/// A timeline being recorded: when it began, and the ops so far.
struct Recording {
    origin: Instant,
    events: Vec<TraceEvent>,
    nets: Vec<NetRun>,
    /// Per GPU: an event that had completed at host time `origin + offset`,
    /// so device times map onto the host's clock.
    #[cfg(feature = "cuda")]
    gpu_clocks: HashMap<u32, (cudarc::driver::CudaEvent, Duration)>,
}

#[cfg(feature = "cuda")]
struct PendingGpuOp {
    op_type: String,
    host: Duration,
    start: cudarc::driver::CudaEvent,
    end: cudarc::driver::CudaEvent,
    /// The trace event to complete with the device times, when tracing.
    traced: Option<TraceEvent>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Profile {
    /// Switches the per-type totals on or off.
    pub(crate) fn set_totals(&self, on: bool) {
        self.totals.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether anything is being recorded (totals or a trace).
    pub(crate) fn active(&self) -> bool {
        self.totals.load(std::sync::atomic::Ordering::Relaxed) || lock(&self.trace).is_some()
    }

    /// Starts a new timeline, dropping one in progress.
    pub(crate) fn start_trace(&self) {
        *lock(&self.trace) = Some(Recording {
            origin: Instant::now(),
            events: Vec::new(),
            nets: Vec::new(),
            #[cfg(feature = "cuda")]
            gpu_clocks: HashMap::new(),
        });
    }

    /// Ends the timeline and returns its op and net runs, in start order.
    pub(crate) fn take_trace(&self) -> (Vec<TraceEvent>, Vec<NetRun>) {
        let (mut events, mut nets) = lock(&self.trace)
            .take()
            .map(|r| (r.events, r.nets))
            .unwrap_or_default();
        events.sort_by_key(|e| e.start);
        nets.sort_by_key(|n| n.start);
        (events, nets)
    }

    /// Records that net `name` ran from `start` until now, when tracing.
    pub(crate) fn net_ran(&self, name: &str, start: Instant) {
        if let Some(r) = lock(&self.trace).as_mut() {
            r.nets.push(NetRun {
                name: name.to_owned(),
                start: start.saturating_duration_since(r.origin),
                duration: start.elapsed(),
            });
        }
    }

    /// Runs `op` (op #`index` of its net, defined by `def`, on `device`) and
    /// accounts for its time.
    pub(crate) fn time<T>(
        &self,
        def: &OperatorDef,
        index: usize,
        device: Device,
        op: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let origin = lock(&self.trace).as_ref().map(|r| r.origin);
        let event =
            |start: Duration, duration: Duration| TraceEvent::new(def, index, device, start, duration);
        match device {
            Device::Cpu(_) => {
                let start = Instant::now();
                let out = op()?;
                let took = start.elapsed();
                self.add(def.op_type(), took, took);
                if let (Some(origin), Some(r)) = (origin, lock(&self.trace).as_mut()) {
                    r.events.push(event(start.duration_since(origin), took));
                }
                Ok(out)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let gpu = crate::cuda::gpu(n)?;
                if origin.is_some() {
                    self.gpu_clock(n, &gpu)?;
                }
                let _turn = lock(&self.gpu_turn);
                let start = gpu.timing_event()?;
                let host = Instant::now();
                let out = op()?;
                let host = host.elapsed();
                let end = gpu.timing_event()?;
                lock(&self.pending).push(PendingGpuOp {
                    op_type: def.op_type().to_owned(),
                    host,
                    start,
                    end,
                    traced: origin.map(|_| event(Duration::ZERO, Duration::ZERO)),
                });
                Ok(out)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => op(),
        }
    }

    /// Makes sure GPU `n` has a reference event on the trace's clock: one
    /// recorded and waited for, whose completion the host saw at once.
    #[cfg(feature = "cuda")]
    fn gpu_clock(&self, n: u32, gpu: &crate::cuda::Gpu) -> Result<()> {
        let mut t = lock(&self.trace);
        let Some(r) = t.as_mut() else { return Ok(()) };
        if !r.gpu_clocks.contains_key(&n) {
            let e = gpu.timing_event()?;
            e.synchronize().map_err(|err| {
                crate::error::Error::Config(format!("cuda:{n}: waiting for a timing event: {err}"))
            })?;
            r.gpu_clocks.insert(n, (e, r.origin.elapsed()));
        }
        Ok(())
    }

    /// Reads the events of GPU ops; called once their devices are synchronised.
    pub(crate) fn settle(&self) {
        #[cfg(feature = "cuda")]
        for p in lock(&self.pending).drain(..) {
            let Ok(ms) = p.start.elapsed_ms(&p.end) else {
                continue;
            };
            let took = Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3);
            self.add(&p.op_type, took, p.host);
            let Some(mut ev) = p.traced else { continue };
            let mut trace = lock(&self.trace);
            let Some(r) = trace.as_mut() else { continue };
            let Device::Cuda(n) = ev.device else { continue };
            if let Some((clock, at)) = r.gpu_clocks.get(&n) {
                if let Ok(since) = clock.elapsed_ms(&p.start) {
                    ev.start = *at + Duration::from_secs_f64(f64::from(since.max(0.0)) / 1e3);
                    ev.duration = took;
                    r.events.push(ev);
                }
            }
        }
    }

    fn add(&self, op_type: &str, took: Duration, host: Duration) {
        if !self.totals.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
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
