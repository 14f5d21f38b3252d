//! A timeline of the ops a workspace ran ([`Workspace::start_trace`] …
//! [`Workspace::take_trace`]), written in the Chrome trace event format (JSON,
//! opens in Perfetto or `chrome://tracing`), with the figure data-parallel
//! training lives by: how much of the all-reduce time the backward pass hides.
//!
//! [`Workspace::start_trace`]: super::Workspace::start_trace
//! [`Workspace::take_trace`]: super::Workspace::take_trace

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::error::Result;
use crate::graph::Device;
use crate::proto::OperatorDef;

/// One op run.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceEvent {
    /// Op type.
    pub op_type: String,
    /// The op's name, if it has one.
    pub name: String,
    /// Its index in its net.
    pub index: usize,
    /// Where it ran.
    pub device: Device,
    /// When it started, from the start of the trace (device time mapped onto
    /// the host's clock for GPU ops).
    pub start: Duration,
    /// How long it took (device time for GPU ops).
    pub duration: Duration,
    /// Its input blobs.
    pub inputs: Vec<String>,
    /// Its output blobs.
    pub outputs: Vec<String>,
    /// A collective (moves data between replicas or hosts).
    pub collective: bool,
    /// Part of the backward pass (a gradient op).
    pub backward: bool,
}

impl TraceEvent {
    pub(crate) fn new(
        def: &OperatorDef,
        index: usize,
        device: Device,
        start: Duration,
        duration: Duration,
    ) -> Self {
        // A CPU DeviceOption carries no ordinal: the replica is in the names.
        let replica = || {
            let blob = def.output.first().or(def.input.first())?;
            let n = blob.split_once('/')?.0.strip_prefix("cpu_")?;
            n.parse().ok().map(Device::cpu)
        };
        let device = match device {
            Device::Cpu(_) => replica().unwrap_or(device),
            gpu => gpu,
        };
        TraceEvent {
            op_type: def.op_type().to_owned(),
            name: def.name.clone().unwrap_or_default(),
            index,
            device,
            start,
            duration,
            inputs: def.input.clone(),
            outputs: def.output.clone(),
            collective: crate::comm::is_collective(def.op_type()),
            backward: def.is_gradient_op == Some(true),
        }
    }

    fn end(&self) -> Duration {
        self.start + self.duration
    }

    /// An all-reduce (in-process, MPI or NCCL).
    pub fn is_allreduce(&self) -> bool {
        matches!(self.op_type.as_str(), "Allreduce" | "NCCLAllreduce")
    }
}

/// One run of a net (a training step runs the train net once).
#[derive(Clone, Debug, PartialEq)]
pub struct NetRun {
    /// The net's name.
    pub name: String,
    /// When the run started, from the start of the trace.
    pub start: Duration,
    /// How long it took, until its devices were synchronised.
    pub duration: Duration,
}

/// The ops recorded between [`Workspace::start_trace`](super::Workspace::start_trace)
/// and [`Workspace::take_trace`](super::Workspace::take_trace), in start order.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Every op run.
    pub events: Vec<TraceEvent>,
    /// Every net run.
    pub nets: Vec<NetRun>,
    /// The training steps the trace covers (1 for a trace of plain net runs).
    pub steps: usize,
}

/// How the all-reduces of a trace fared against the backward pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Overlap {
    /// Time during which some all-reduce ran, per step.
    pub allreduce_per_step: Duration,
    /// The share of that time during which a backward op also ran (0 to 1).
    pub hidden: f64,
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "all-reduce {:.2} ms per step, of which {:.0}% hidden behind backward",
            1e3 * self.allreduce_per_step.as_secs_f64(),
            100.0 * self.hidden
        )
    }
}

/// The union of intervals, merged and sorted.
fn union(mut iv: Vec<(Duration, Duration)>) -> Vec<(Duration, Duration)> {
    iv.sort();
    let mut out: Vec<(Duration, Duration)> = Vec::with_capacity(iv.len());
    for (s, e) in iv {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn total(iv: &[(Duration, Duration)]) -> Duration {
    iv.iter().map(|(s, e)| *e - *s).sum()
}

/// How much of the (merged, sorted) intervals `a` and `b` share.
fn intersection(a: &[(Duration, Duration)], b: &[(Duration, Duration)]) -> Duration {
    let (mut i, mut j, mut sum) = (0, 0, Duration::ZERO);
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            sum += e - s;
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    sum
}

impl Trace {
    /// The all-reduce time per step and how much of it overlapped the
    /// backward pass (on any device): the figure that says whether the
    /// reverse-order all-reduce does its job.
    pub fn overlap(&self) -> Overlap {
        let span = |pred: &dyn Fn(&TraceEvent) -> bool| {
            union(
                self.events
                    .iter()
                    .filter(|e| pred(e))
                    .map(|e| (e.start, e.end()))
                    .collect(),
            )
        };
        let reduce = span(&|e| e.is_allreduce());
        let backward = span(&|e| e.backward && !e.collective);
        let busy = total(&reduce);
        Overlap {
            allreduce_per_step: busy / self.steps.max(1) as u32,
            hidden: if busy.is_zero() {
                0.0
            } else {
                intersection(&reduce, &backward).as_secs_f64() / busy.as_secs_f64()
            },
        }
    }

    /// The trace in the Chrome trace event format: one process per device
    /// with its compute ops, one for the collectives; concurrent ops of one
    /// device (the DAG executor's workers) on lanes of their own, so that no
    /// two slices of a row overlap.
    pub fn to_chrome_json(&self) -> String {
        let mut devices: Vec<Device> = self
            .events
            .iter()
            .filter(|e| !e.collective)
            .map(|e| e.device)
            .collect();
        devices.sort_by_key(|d| (matches!(d, Device::Cuda(_)), d.to_string()));
        devices.dedup();
        let collectives_pid = devices.len();
        let pid_of = |e: &TraceEvent| {
            if e.collective {
                collectives_pid
            } else {
                devices.iter().position(|d| *d == e.device).unwrap_or(0)
            }
        };
        // Greedy lanes per process: the first whose last slice has ended.
        let mut lanes: BTreeMap<usize, Vec<Duration>> = BTreeMap::new();
        let mut lane = |pid: usize, start: Duration, end: Duration| {
            let ends = lanes.entry(pid).or_default();
            let l = ends.iter().position(|&e| e <= start).unwrap_or_else(|| {
                ends.push(Duration::ZERO);
                ends.len() - 1
            });
            ends[l] = end;
            l
        };
        let mut out = Vec::with_capacity(self.events.len() + 16);
        for e in &self.events {
            let pid = pid_of(e);
            let lane = lane(pid, e.start, e.end());
            let label = if e.name.is_empty() {
                e.op_type.clone()
            } else {
                format!("{} {}", e.op_type, e.name)
            };
            out.push(json!({
                "name": label,
                "cat": if e.collective { "communication" } else if e.backward { "backward" } else { "compute" },
                "ph": "X",
                "ts": e.start.as_secs_f64() * 1e6,
                "dur": e.duration.as_secs_f64() * 1e6,
                "pid": pid,
                "tid": lane,
                "args": {
                    "op": e.op_type,
                    "index": e.index,
                    "device": e.device.to_string(),
                    "inputs": e.inputs,
                    "outputs": e.outputs,
                },
            }));
        }
        // The net runs on a row of their own, below the ops.
        let nets_pid = collectives_pid + 1;
        for n in &self.nets {
            let lane = lane(nets_pid, n.start, n.start + n.duration);
            out.push(json!({
                "name": n.name,
                "cat": "net",
                "ph": "X",
                "ts": n.start.as_secs_f64() * 1e6,
                "dur": n.duration.as_secs_f64() * 1e6,
                "pid": nets_pid,
                "tid": lane,
            }));
        }
        for (pid, ends) in &lanes {
            let pname = match devices.get(*pid) {
                Some(d) => format!("{d} compute"),
                None if *pid == collectives_pid => "collectives".to_owned(),
                None => "nets".to_owned(),
            };
            out.push(json!({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": pname}}));
            out.push(
                json!({"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}}),
            );
            for lane in 0..ends.len() {
                let tname = if lane == 0 {
                    pname.clone()
                } else {
                    format!("{pname} ({})", lane + 1)
                };
                out.push(json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": lane, "args": {"name": tname}}));
            }
        }
        let overlap = self.overlap();
        let doc = json!({
            "traceEvents": out,
            "displayTimeUnit": "ms",
            "otherData": {
                "steps": self.steps,
                "allreduce_ms_per_step": 1e3 * overlap.allreduce_per_step.as_secs_f64(),
                "allreduce_hidden_fraction": overlap.hidden,
            },
        });
        format!("{doc}\n")
    }

    /// Writes [`Trace::to_chrome_json`] to `path`, atomically.
    pub fn write_chrome(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::checkpoint::write_atomically(path.as_ref(), self.to_chrome_json().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(op: &str, start_ms: u64, dur_ms: u64, backward: bool) -> TraceEvent {
        let def = OperatorDef {
            r#type: Some(op.into()),
            is_gradient_op: backward.then_some(true),
            ..OperatorDef::default()
        };
        let ms = Duration::from_millis;
        TraceEvent::new(&def, 0, Device::cpu(0), ms(start_ms), ms(dur_ms))
    }

    #[test]
    fn overlap_counts_the_all_reduce_time_a_backward_op_shares() {
        let t = Trace {
            events: vec![
                ev("ConvGradient", 0, 10, true),
                ev("Allreduce", 5, 10, false), // 5 of 10 ms under ConvGradient
                ev("Allreduce", 12, 4, false), // merges with the first: 5..16
                ev("FCGradient", 14, 1, true), // 1 more ms hidden
                ev("Relu", 20, 5, false),
                ev("Allreduce", 30, 4, false), // under nothing
            ],
            nets: Vec::new(),
            steps: 2,
        };
        let o = t.overlap();
        assert_eq!(o.allreduce_per_step, Duration::from_micros(7500));
        assert!((o.hidden - 6.0 / 15.0).abs() < 1e-12, "{}", o.hidden);
    }

    #[test]
    fn concurrent_ops_of_a_device_go_on_separate_lanes() {
        let t = Trace {
            events: vec![
                ev("Conv", 0, 10, false),
                ev("Relu", 2, 3, false),
                ev("FC", 6, 2, false),
                ev("Allreduce", 1, 1, false),
            ],
            nets: Vec::new(),
            steps: 1,
        };
        let v: serde_json::Value = serde_json::from_str(&t.to_chrome_json()).unwrap();
        let slices: Vec<(u64, u64, String)> = v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ph"] == "X")
            .map(|e| {
                (
                    e["pid"].as_u64().unwrap(),
                    e["tid"].as_u64().unwrap(),
                    e["name"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            slices,
            [
                (0, 0, "Conv".into()),
                (0, 1, "Relu".into()),
                (0, 1, "FC".into()),
                (1, 0, "Allreduce".into())
            ]
        );
    }
}
