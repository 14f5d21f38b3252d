//! The simple and DAG executors: same results, the order and parallelism each
//! promises, Caffe2's first-iteration rule, control dependencies, and clean
//! failure. No assertion reads a clock: concurrency is observed by ops that wait
//! for each other, and watchdogs only turn a hang into a failure.

mod common;

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use common::{blobs_dataset, mlp};
use dpm::graph::Args;
use dpm::ops::{Kernel, OpContext, Registry};
use dpm::prelude::*;

fn train(net_type: &str, workers: usize, steps: usize) -> Workspace {
    let (x, y) = blobs_dataset(128, 8, 4, 1.0, 11);
    let model = mlp(8, 16, 4, Sgd::new(0.1).momentum(0.9));
    let mut net = model.net().proto().clone();
    net.r#type = Some(net_type.into());
    net.num_workers = Some(workers as i32);
    let ws = Workspace::new();
    ws.run_net_once(model.init_net().proto()).unwrap();
    ws.feed("data", x);
    ws.feed("label", y);
    ws.create_net(&net).unwrap();
    for _ in 0..steps {
        ws.run_net("mlp").unwrap();
    }
    ws
}

#[test]
fn simple_and_dag_are_bitwise_identical() {
    let a = train("simple", 1, 20);
    for name in ["fc1_w", "fc2_b_momentum", "ITER", "loss", "fc1_w_grad"] {
        assert!(a.blob_names().iter().any(|b| b == name), "no {name}");
    }
    for workers in [1, 4] {
        let b = train("dag", workers, 20);
        assert_eq!(a.blob_names(), b.blob_names());
        for name in a.blob_names() {
            let (x, y) = (a.fetch(&name).unwrap(), b.fetch(&name).unwrap());
            assert!(x.bitwise_eq(&y), "blob {name} differs with {workers} workers");
        }
    }
}

/// Runs `f` on another thread and fails the test if it has not returned within
/// a minute: a hang becomes a failure, and no bound on speed is asserted.
fn within_a_minute<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the executor hung (no result within 60 s)")
}

/// Runs `net` once in a new workspace, under the watchdog.
fn run_watched(net: Net) -> Workspace {
    within_a_minute(move || {
        let ws = Workspace::new();
        ws.run_net_once(net.proto()).unwrap();
        ws
    })
}

// --- The probe: an op that records when it runs and can wait for company. ---

/// What the probes of one test (`tag`) did.
#[derive(Default)]
struct Journal {
    /// `(probe id, started?)` in the order events happened.
    events: Vec<(i64, bool)>,
    /// Probes running now.
    running: Vec<i64>,
    /// The most probes ever running at once.
    peak: usize,
    /// Probes that were running while `meet` or more probes were.
    met: Vec<i64>,
    /// The thread each probe ran on.
    threads: HashMap<i64, std::thread::ThreadId>,
}

fn journals() -> &'static (Mutex<HashMap<String, Journal>>, Condvar) {
    static J: OnceLock<(Mutex<HashMap<String, Journal>>, Condvar)> = OnceLock::new();
    J.get_or_init(Default::default)
}

fn journal<R>(tag: &str, f: impl FnOnce(&Journal) -> R) -> R {
    let map = journals().0.lock().unwrap();
    f(map.get(tag).expect("no probe of this tag ran"))
}

/// `Probe([wait_ms]) → (met)`. Args: `tag`, `id`, `meet` (wait until this many
/// probes of the tag run at once, at most `wait_ms` from the optional input,
/// default 20 s), `sleep_ms`, `fail`. Writes 1.0 if it met that many, else 0.0.
struct Probe {
    tag: String,
    id: i64,
    meet: usize,
    sleep_ms: u64,
    fail: bool,
}

impl Probe {
    fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let a = Args(&op.arg);
        Ok(Box::new(Probe {
            tag: a.string("tag", "")?,
            id: a.int("id", 0)?,
            meet: a.usize("meet", 0)?,
            sleep_ms: a.usize("sleep_ms", 0)? as u64,
            fail: a.int("fail", 0)? != 0,
        }))
    }
}

impl Kernel for Probe {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let wait_ms = match ctx.num_inputs() {
            0 => 20_000.0,
            _ => ctx.input_scalar(0)?,
        };
        let (lock, cv) = journals();
        let mut map = lock.lock().unwrap();
        let j = map.entry(self.tag.clone()).or_default();
        j.events.push((self.id, true));
        j.threads.insert(self.id, std::thread::current().id());
        j.running.push(self.id);
        j.peak = j.peak.max(j.running.len());
        if self.meet > 0 && j.running.len() >= self.meet {
            let running = j.running.clone();
            j.met.extend(running);
            cv.notify_all();
        }
        let met = if self.meet > 0 {
            let deadline = Duration::from_millis(wait_ms as u64);
            let (m, _) = cv
                .wait_timeout_while(map, deadline, |m| !m[&self.tag].met.contains(&self.id))
                .unwrap();
            map = m;
            map[&self.tag].met.contains(&self.id)
        } else {
            false
        };
        drop(map);
        std::thread::sleep(Duration::from_millis(self.sleep_ms));
        let mut map = lock.lock().unwrap();
        let j = map.get_mut(&self.tag).unwrap();
        j.running.retain(|&r| r != self.id);
        j.events.push((self.id, false));
        drop(map);
        if self.fail {
            return Err(Error::value(ctx.output_name(0), "injected failure"));
        }
        *ctx.output(0) = Tensor::scalar(if met { 1.0f32 } else { 0.0 });
        Ok(())
    }
}

fn register_probe() {
    Registry::register_global("TestProbe", DeviceType::Cpu, Probe::create);
}

/// Adds probe `id` of `tag` writing `p<id>`.
fn probe<'n>(net: &'n mut Net, tag: &str, id: i64) -> dpm::graph::OpBuilder<'n> {
    net.op("TestProbe")
        .output(format!("p{id}").as_str())
        .arg("tag", tag)
        .arg("id", id)
}

fn met(ws: &Workspace, id: i64) -> bool {
    ws.fetch(format!("p{id}")).unwrap().data::<f32>().unwrap()[0] == 1.0
}

fn starts(tag: &str) -> Vec<i64> {
    journal(tag, |j| j.events.iter().filter(|e| e.1).map(|e| e.0).collect())
}

#[test]
fn simple_runs_ops_in_program_order_on_the_calling_thread() {
    register_probe();
    let mut net = Net::new("order");
    // Independent ops, listed in a scrambled order: the simple executor keeps it.
    let ids = [3i64, 0, 7, 1, 5, 2, 6, 4];
    for &id in &ids {
        probe(&mut net, "order", id).arg("sleep_ms", 1i64).build();
    }
    let ws = Workspace::new();
    ws.run_net_once(net.proto()).unwrap();
    assert_eq!(starts("order"), ids);
    assert_eq!(journal("order", |j| j.peak), 1, "simple ran ops at once");
}

#[test]
fn dag_runs_each_op_after_the_ops_it_reads_from() {
    register_probe();
    // A diamond repeated: p1, p2 read p0; p3 reads p1 and p2; with 4 workers.
    let mut net = Net::new("deps");
    net.set_type("dag").set_num_workers(4);
    probe(&mut net, "deps", 0).arg("sleep_ms", 5i64).build();
    probe(&mut net, "deps", 1).input("p0").build();
    probe(&mut net, "deps", 2).input("p0").build();
    probe(&mut net, "deps", 3).inputs(["p1", "p2"]).build();
    let ws = Workspace::new();
    within_a_minute(move || ws.run_net_once(net.proto()).unwrap());
    let events = journal("deps", |j| j.events.clone());
    let at = |id: i64, start: bool| events.iter().position(|&e| e == (id, start)).unwrap();
    for (before, after) in [(0, 1), (0, 2), (1, 3), (2, 3)] {
        assert!(
            at(before, false) < at(after, true),
            "p{after} started before p{before} ended: {events:?}"
        );
    }
}

#[test]
fn dag_runs_independent_ops_at_the_same_time() {
    register_probe();
    let mut net = Net::new("parallel");
    net.set_type("dag").set_num_workers(4);
    // Each waits (up to 20 s) until all three run at once: only a parallel
    // executor lets them meet.
    for id in 0..3 {
        probe(&mut net, "parallel", id).arg("meet", 3i64).build();
    }
    let ws = run_watched(net);
    for id in 0..3 {
        assert!(met(&ws, id), "p{id} ran alone: the dag executor is sequential");
    }
}

#[test]
fn first_iter_only_one_worker_runs_the_first_run_alone_then_in_parallel() {
    register_probe();
    let mut net = Net::new("first_iter");
    net.set_type("dag")
        .set_num_workers(4)
        .set_arg("first_iter_only_one_worker", 1i64);
    for id in 0..2 {
        probe(&mut net, "first_iter", id)
            .input("wait_ms")
            .arg("meet", 2i64)
            .build();
    }
    let ws = std::sync::Arc::new(Workspace::new());
    ws.create_net(net.proto()).unwrap();
    // First run: one worker, so the probes cannot meet however long they wait.
    ws.feed("wait_ms", Tensor::scalar(300.0f32));
    let w = ws.clone();
    within_a_minute(move || w.run_net("first_iter").unwrap());
    assert_eq!(
        journal("first_iter", |j| j.peak),
        1,
        "first run used several workers"
    );
    assert!(!met(&ws, 0) && !met(&ws, 1));
    // Later runs: all workers.
    ws.feed("wait_ms", Tensor::scalar(20_000.0f32));
    let w = ws.clone();
    within_a_minute(move || w.run_net("first_iter").unwrap());
    assert!(
        met(&ws, 0) && met(&ws, 1),
        "second run did not run ops in parallel"
    );
    // Without the argument, the first run is parallel already.
    let mut net = Net::new("first_iter_off");
    net.set_type("dag").set_num_workers(4);
    for id in 10..12 {
        probe(&mut net, "first_iter_off", id).arg("meet", 2i64).build();
    }
    let ws = run_watched(net);
    assert!(met(&ws, 10) && met(&ws, 11));
}

#[test]
fn control_inputs_order_otherwise_independent_ops() {
    register_probe();
    let mut net = Net::new("ctl");
    net.set_type("dag").set_num_workers(4);
    // p0 and p1 share no blob; p1 waits for p0 only through its control input.
    // Both try to meet: if p1 could start early, they would.
    probe(&mut net, "ctl", 0)
        .input("wait_ms")
        .arg("meet", 2i64)
        .build();
    probe(&mut net, "ctl", 1)
        .input("wait_ms")
        .arg("meet", 2i64)
        .control_input("p0")
        .build();
    let ws = Workspace::new();
    ws.feed("wait_ms", Tensor::scalar(300.0f32));
    let ws = within_a_minute(move || {
        ws.run_net_once(net.proto()).unwrap();
        ws
    });
    assert!(!met(&ws, 0) && !met(&ws, 1), "p1 ran while p0 was running");
    assert_eq!(
        journal("ctl", |j| j.events.clone()),
        [(0, true), (0, false), (1, true), (1, false)]
    );
    // A control input nothing writes is an error before anything runs.
    let mut bad = Net::new("bad");
    bad.op("ConstantFill")
        .output("b")
        .arg("shape", vec![1i64])
        .control_input("nowhere")
        .build();
    let err = Workspace::new().create_net(bad.proto()).unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
}

/// `failing` first, then a chain of `chain` probes that do not depend on it.
fn failing_then_chain(tag: &str, kind: &str, workers: usize, chain: i64) -> Net {
    let mut net = Net::new(tag);
    net.set_type(kind).set_num_workers(workers);
    probe(&mut net, tag, -1).arg("fail", 1i64).build();
    let mut b = probe(&mut net, tag, 0).arg("sleep_ms", 20i64);
    for id in 1..chain {
        b.build();
        b = probe(&mut net, tag, id)
            .arg("sleep_ms", 20i64)
            .control_input(format!("p{}", id - 1).as_str());
    }
    b.build();
    net
}

#[test]
fn the_first_error_stops_new_work() {
    register_probe();
    // Simple: nothing after the failing op runs.
    let ws = Workspace::new();
    let err = ws
        .run_net_once(failing_then_chain("stop_simple", "simple", 1, 10).proto())
        .unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(starts("stop_simple"), [-1]);
    // DAG, one worker: the failing op is first in line; nothing else starts.
    let net = failing_then_chain("stop_dag1", "dag", 1, 10);
    within_a_minute(move || Workspace::new().run_net_once(net.proto()).unwrap_err());
    assert_eq!(starts("stop_dag1"), [-1]);
    // DAG, four workers: the chain is under way when the failure lands; it
    // stops there instead of running its 40 links.
    let net = failing_then_chain("stop_dag4", "dag", 4, 40);
    within_a_minute(move || Workspace::new().run_net_once(net.proto()).unwrap_err());
    let ran = starts("stop_dag4").len();
    assert!(ran < 40, "{ran} ops started after the failure");
}

// --- Replicas: each on its worker, meeting where the net makes them. ---

/// Adds probe `id` of `tag` writing `cpu_<replica>/p<id>` (`p<id>` for an op
/// of no replica, as a collective is), reading `inputs`.
fn replica_probe<'n>(
    net: &'n mut Net,
    tag: &str,
    replica: Option<usize>,
    id: i64,
    inputs: &[&str],
) -> dpm::graph::OpBuilder<'n> {
    let out = match replica {
        Some(r) => format!("cpu_{r}/p{id}"),
        None => format!("p{id}"),
    };
    net.op("TestProbe")
        .inputs(inputs.iter().copied())
        .output(out.as_str())
        .arg("tag", tag)
        .arg("id", id)
}

fn replica_net(tag: &str) -> Net {
    let mut net = Net::new(tag);
    net.set_type("dag").set_num_workers(2);
    net
}

#[test]
fn replicas_run_at_once_each_on_one_thread_and_wait_for_a_collective() {
    register_probe();
    // Two replicas of a chain of 3 (ids r*10 + k); their first ops meet; an
    // op of no replica reads both chains' ends; each replica's last op reads
    // it. Three runs, so that any run could have moved a replica's op.
    let mut net = replica_net("lanes");
    for r in 0..2 {
        for k in 0..3 {
            let id = r * 10 + k;
            let prev = format!("cpu_{r}/p{}", id - 1);
            let inputs: &[&str] = if k == 0 { &[] } else { &[prev.as_str()] };
            let mut b = replica_probe(&mut net, "lanes", Some(r as usize), id, inputs);
            if k == 0 {
                b = b.arg("meet", 2i64);
            }
            b.build();
        }
    }
    replica_probe(&mut net, "lanes", None, 100, &["cpu_0/p2", "cpu_1/p12"]).build();
    replica_probe(&mut net, "lanes", Some(0), 3, &["p100"]).build();
    replica_probe(&mut net, "lanes", Some(1), 13, &["p100"]).build();
    let ws = std::sync::Arc::new(Workspace::new());
    ws.create_net(net.proto()).unwrap();
    for _ in 0..3 {
        let w = ws.clone();
        within_a_minute(move || w.run_net("lanes").unwrap());
        let value = |name: &str| ws.fetch(name).unwrap().data::<f32>().unwrap()[0];
        assert_eq!(
            (value("cpu_0/p0"), value("cpu_1/p10")),
            (1.0, 1.0),
            "the replicas ran one after the other"
        );
        let (events, threads) = journal("lanes", |j| (j.events.clone(), j.threads.clone()));
        let at = |id: i64, start: bool| events.iter().rposition(|&e| e == (id, start)).unwrap();
        for (before, after) in [(2, 100), (12, 100), (100, 3), (100, 13)] {
            assert!(
                at(before, false) < at(after, true),
                "p{after} started before p{before} ended"
            );
        }
        for r in [0, 10] {
            let t = threads[&r];
            assert!(
                (r..r + 4).all(|id| threads[&id] == t),
                "replica {} moved between threads",
                r / 10
            );
        }
        assert_ne!(threads[&0], threads[&10], "both replicas ran on one thread");
    }
}

#[test]
fn a_collective_waiting_for_another_replica_does_not_hold_up_its_workers_replica() {
    register_probe();
    // Replica 1's p10 waits until replica 0's p1 runs beside it. The op of no
    // replica, p100, waits for p10 and comes before p1 in replica 0's worker's
    // order (both at depth 1, p100 first in the net): that worker must run p1
    // while p100 cannot run, or p10 and p1 never meet.
    let mut net = replica_net("lookahead");
    // Not a probe, so that it is no company for p10; its value is how long
    // p1, which reads it, waits for company (ms).
    net.op("ConstantFill")
        .output("cpu_0/p0")
        .arg("shape", vec![1i64])
        .arg("value", 20_000.0f32)
        .build();
    replica_probe(&mut net, "lookahead", Some(1), 10, &[])
        .arg("meet", 2i64)
        .build();
    replica_probe(&mut net, "lookahead", None, 100, &["cpu_1/p10"]).build();
    replica_probe(&mut net, "lookahead", Some(0), 1, &["cpu_0/p0"])
        .arg("meet", 2i64)
        .build();
    let ws = run_watched(net);
    let value = |name: &str| ws.fetch(name).unwrap().data::<f32>().unwrap()[0];
    assert_eq!(value("cpu_1/p10"), 1.0, "p10 and p1 did not meet");
    assert_eq!(value("cpu_0/p1"), 1.0);
}

#[test]
fn a_failing_replica_ends_the_run_for_the_replica_waiting_on_it() {
    register_probe();
    // Replica 1 fails after 50 ms, while replica 0 waits for it at a
    // collective; replica 0's ops after the collective never start.
    let mut net = replica_net("lane_fail");
    replica_probe(&mut net, "lane_fail", Some(0), 0, &[]).build();
    replica_probe(&mut net, "lane_fail", Some(1), 10, &[])
        .arg("sleep_ms", 50i64)
        .arg("fail", 1i64)
        .build();
    replica_probe(&mut net, "lane_fail", None, 100, &["cpu_0/p0", "cpu_1/p10"]).build();
    replica_probe(&mut net, "lane_fail", Some(0), 1, &["p100"]).build();
    let err = within_a_minute(move || Workspace::new().run_net_once(net.proto()).unwrap_err());
    assert!(err.to_string().contains("injected failure"), "{err}");
    let mut ran = starts("lane_fail");
    ran.sort_unstable();
    assert_eq!(ran, [0, 10]);
}

// --- Failures: errors, not hangs or panics. ---

/// A wide net: many independent slow branches, one of which fails.
fn wide_net(failing: &str) -> Net {
    let mut net = Net::new("wide");
    net.set_type("dag").set_num_workers(4);
    net.op("ConstantFill")
        .output("x")
        .arg("shape", vec![64i64, 64])
        .arg("value", 0.01f32)
        .build();
    net.op("ConstantFill")
        .output("w")
        .arg("shape", vec![64i64, 64])
        .arg("value", 0.01f32)
        .build();
    for i in 0..16 {
        let mut prev = "x".to_owned();
        for j in 0..20 {
            let out = format!("b{i}_{j}");
            net.op("FC")
                .inputs([prev.as_str(), "w"])
                .output(out.as_str())
                .build();
            prev = out;
        }
    }
    net.op(failing).inputs(["x", "w"]).output("boom").build();
    net
}

struct Explode;
impl Kernel for Explode {
    fn run(&self, _: &mut OpContext<'_>) -> Result<()> {
        panic!("injected kernel panic")
    }
}

#[test]
fn failing_op_under_dag_returns_err_and_names_it() {
    // An FC whose weights are missing: fails at run time.
    let mut net = wide_net("FC");
    net.proto_mut().op.last_mut().unwrap().input = vec!["x".into(), "b0_0_missing".into()];
    let ws = std::sync::Arc::new(Workspace::new());
    ws.create_net(net.proto()).unwrap();
    let w = ws.clone();
    let err = within_a_minute(move || w.run_net("wide").unwrap_err());
    let msg = err.to_string();
    assert!(
        msg.contains("op #322 `FC`") && msg.contains("b0_0_missing"),
        "{msg}"
    );
    // No worker is left holding anything: the workspace is usable at once.
    ws.feed("b0_0_missing", Tensor::zeros::<f32>([64, 64]));
    let w = ws.clone();
    within_a_minute(move || w.run_net("wide").unwrap());
}

#[test]
fn panicking_kernel_under_dag_becomes_an_error() {
    Registry::register_global("TestExplode", DeviceType::Cpu, |_| Ok(Box::new(Explode)));
    let ws = std::sync::Arc::new(Workspace::new());
    ws.create_net(wide_net("TestExplode").proto()).unwrap();
    let w = ws.clone();
    let err = within_a_minute(move || w.run_net("wide").unwrap_err());
    assert!(
        matches!(err.root(), Error::KernelPanic(m) if m.contains("injected")),
        "{err}"
    );
    // Runs again (and fails again) rather than deadlocking on a poisoned blob.
    let w = ws.clone();
    assert!(within_a_minute(move || w.run_net("wide").is_err()));
}
#[test]
fn malformed_nets_are_rejected_before_running() {
    let ws = Workspace::new();
    let mut n = Net::new("n");
    n.op("NoSuchOp").output("y").build();
    assert!(matches!(
        ws.create_net(n.proto()).unwrap_err().root(),
        Error::UnknownOp { .. }
    ));
    let mut n = Net::new("n");
    n.op("LearningRate")
        .input("ITER")
        .output("lr")
        .arg("policy", "cosmic")
        .arg("base_lr", 0.1f32)
        .build();
    assert!(ws
        .create_net(n.proto())
        .unwrap_err()
        .to_string()
        .contains("cosmic"));
    let mut n = Net::new("n");
    n.set_type("async_everything");
    assert!(ws.create_net(n.proto()).is_err());
    assert!(ws.run_net("never_created").is_err());
    // A missing input is named.
    let mut n = Net::new("n");
    n.op("Relu").input("ghost").output("y").build();
    let err = ws.run_net_once(n.proto()).unwrap_err();
    assert!(matches!(err.root(), Error::MissingBlob { name } if name == "ghost"));
}

#[test]
fn ops_read_the_blobs_they_overwrite_before_writing_them() {
    // `Scale(x) → x`, not declared in place: x is read, then replaced.
    let ws = Workspace::new();
    ws.feed("x", Tensor::from_vec([3], vec![1.0f32, 2.0, 3.0]).unwrap());
    let mut net = Net::new("scale");
    net.op("Scale")
        .input("x")
        .output("x")
        .arg("scale", 2.0f32)
        .build();
    ws.run_net_once(net.proto()).unwrap();
    assert_eq!(ws.fetch("x").unwrap().data::<f32>().unwrap(), [2.0, 4.0, 6.0]);
    // `Relu(v) → v` from a kernel that does not declare in-place pairs: the
    // executor hands it a copy of v to read.
    ws.feed("v", Tensor::from_vec([3], vec![-1.0f32, 2.0, -3.0]).unwrap());
    let mut net = Net::new("relu");
    net.op("Relu").input("v").output("v").build();
    ws.run_net_once(net.proto()).unwrap();
    assert_eq!(ws.fetch("v").unwrap().data::<f32>().unwrap(), [0.0, 2.0, 0.0]);
    // An in-place pair whose input is also written under another output name:
    // MomentumSGDUpdate(g, m, lr, p) → (m, g, p) must give what (g, m, p) gives,
    // with the first two outputs swapped.
    let run = |outputs: [&str; 3]| {
        let ws = Workspace::new();
        ws.feed("g", Tensor::from_vec([2], vec![1.0f32, 2.0]).unwrap());
        ws.feed("m", Tensor::from_vec([2], vec![0.5f32, -0.5]).unwrap());
        ws.feed("lr", Tensor::from_vec([1], vec![0.1f32]).unwrap());
        ws.feed("p", Tensor::from_vec([2], vec![3.0f32, 4.0]).unwrap());
        let mut net = Net::new("sgd");
        net.op("MomentumSGDUpdate")
            .inputs(["g", "m", "lr", "p"])
            .outputs(outputs)
            .arg("momentum", 0.9f32)
            .build();
        ws.run_net_once(net.proto()).unwrap();
        ["g", "m", "p"].map(|b| ws.fetch(b).unwrap())
    };
    let [g, m, p] = run(["g", "m", "p"]);
    let [g2, m2, p2] = run(["m", "g", "p"]);
    assert!(g.bitwise_eq(&m2) && m.bitwise_eq(&g2) && p.bitwise_eq(&p2));
    assert!(!p.bitwise_eq(&Tensor::from_vec([2], vec![3.0f32, 4.0]).unwrap()));
    // A missing blob is named whichever way the op reads it: read-only, read
    // and overwritten, or updated in place.
    let ws = Workspace::new();
    for op in ["Scale", "Relu"] {
        let mut net = Net::new("missing");
        net.op(op).input("y").output("y").build();
        let err = ws.run_net_once(net.proto()).unwrap_err();
        assert!(
            matches!(err.root(), Error::MissingBlob { name } if name == "y"),
            "{op}: {err}"
        );
    }
    let mut net = Net::new("missing_in_place");
    net.op("Allreduce")
        .inputs(["cpu_0/z", "cpu_1/z"])
        .outputs(["cpu_0/z", "cpu_1/z"])
        .build();
    let err = ws.run_net_once(net.proto()).unwrap_err();
    assert!(
        matches!(err.root(), Error::MissingBlob { name } if name == "cpu_0/z"),
        "{err}"
    );
    assert!(!ws.has_blob("cpu_1/z"));
}

#[test]
fn the_workspace_lists_and_finds_its_blobs() {
    let ws = Workspace::new();
    assert!(ws.blob_names().is_empty() && !ws.has_blob("a"));
    ws.feed("b", Tensor::scalar(2.0f32));
    ws.feed("a", Tensor::scalar(1.0f32));
    assert_eq!(ws.blob_names(), ["a", "b"]);
    assert!(ws.has_blob("a") && ws.has_blob("b") && !ws.has_blob("c"));
    assert_eq!(ws.with_blob("b", |t| t.data::<f32>().unwrap()[0]).unwrap(), 2.0);
    assert!(matches!(ws.fetch("c"), Err(Error::MissingBlob { name }) if name == "c"));
    // A net that failed before writing its output leaves no blob behind.
    let mut n = Net::new("n");
    n.op("Relu").input("ghost").output("y").build();
    assert!(ws.run_net_once(n.proto()).is_err());
    assert!(!ws.has_blob("y") && ws.blob_names() == ["a", "b"]);
}

/// Writes, as `[ctx.threads(), threads()]`, what the kernel was told it may use.
struct ThreadsSeen;

impl Kernel for ThreadsSeen {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let seen = [ctx.threads() as f32, dpm::ops::cpu::threads() as f32];
        ctx.resize_output::<f32>(0, [2])?.copy_from_slice(&seen);
        Ok(())
    }
}

#[test]
fn each_workspace_gives_its_kernels_its_own_thread_count() {
    Registry::register_global("TestThreadsSeen", DeviceType::Cpu, |_| Ok(Box::new(ThreadsSeen)));
    let mut net = Net::new("threads");
    net.op("TestThreadsSeen").output("seen").build();
    let net = net.into_proto();
    let (three, default) = (Workspace::new(), Workspace::new());
    three.set_kernel_threads(3);
    assert_eq!((three.kernel_threads(), default.kernel_threads()), (3, 1));
    // Interleaved on one thread: no setting leaks from one workspace to the other.
    for _ in 0..2 {
        three.run_net_once(&net).unwrap();
        default.run_net_once(&net).unwrap();
        assert_eq!(three.fetch("seen").unwrap().data::<f32>().unwrap(), &[3.0, 3.0]);
        assert_eq!(default.fetch("seen").unwrap().data::<f32>().unwrap(), &[1.0, 1.0]);
    }
    // The kernel's setting is scoped to it.
    assert_eq!(dpm::ops::cpu::threads(), 1);
}

#[test]
fn host_access_says_whether_the_type_or_the_place_is_wrong() {
    use dpm::tensor::HostAccessError;
    let t = Tensor::zeros::<f32>([2]);
    assert_eq!(t.data::<f32>().unwrap(), &[0.0, 0.0]);
    assert_eq!(
        t.data::<i64>().unwrap_err(),
        HostAccessError::DataType {
            expected: DataType::I64,
            got: DataType::F32
        }
    );
    assert!(t.is_on_host() && t.device() == Device::cpu(0));
    // Through an op: the error names the blob.
    let mut net = Net::new("typed");
    net.op("Relu").input("labels").output("y").build();
    let ws = Workspace::new();
    ws.feed("labels", Tensor::zeros::<i32>([3]));
    let e = ws.run_net_once(net.proto()).unwrap_err();
    assert!(
        matches!(e.root(), Error::DataTypeMismatch { blob, .. } if blob == "labels"),
        "{e:?}"
    );
}

/// `set_profiling` (Caffe2's `prof_dag`): while on, every op of every run is
/// counted under its type, on both executors; off, nothing is; the results are
/// the same bits either way.
#[test]
fn profiling_counts_every_op_by_type_and_changes_no_result() {
    for net_type in ["simple", "dag"] {
        let plain = train(net_type, 4, 3);
        let (x, y) = blobs_dataset(128, 8, 4, 1.0, 11);
        let model = mlp(8, 16, 4, Sgd::new(0.1).momentum(0.9));
        let mut net = model.net().proto().clone();
        net.r#type = Some(net_type.into());
        net.num_workers = Some(4);
        let ws = Workspace::new();
        ws.run_net_once(model.init_net().proto()).unwrap();
        ws.feed("data", x);
        ws.feed("label", y);
        ws.create_net(&net).unwrap();
        ws.run_net("mlp").unwrap();
        assert!(ws.op_times().is_empty(), "profiling is off by default");
        ws.set_profiling(true);
        ws.run_net("mlp").unwrap();
        ws.run_net("mlp").unwrap();
        ws.set_profiling(false);
        let mut expected: HashMap<String, u64> = HashMap::new();
        for op in &net.op {
            *expected.entry(op.op_type().to_owned()).or_default() += 2;
        }
        let times = ws.op_times();
        let got: HashMap<String, u64> = times.iter().map(|(k, t)| (k.clone(), t.runs)).collect();
        assert_eq!(got, expected, "{net_type}");
        assert!(
            times.windows(2).all(|w| w[0].1.total >= w[1].1.total),
            "costliest first"
        );
        assert!(
            times.iter().all(|(_, t)| t.host == t.total),
            "CPU ops: host time is their time"
        );
        for name in plain.blob_names() {
            let (a, b) = (plain.fetch(&name).unwrap(), ws.fetch(&name).unwrap());
            assert!(a.bitwise_eq(&b), "{net_type}: profiling changed `{name}`");
        }
        ws.reset_op_times();
        assert!(ws.op_times().is_empty());
    }
}
