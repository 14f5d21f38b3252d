//! The timeline of a training step: a valid Chrome trace with every op of
//! every step, compute rows for every device, a row of collectives, and the
//! all-reduce overlap figure (zero where the executor cannot overlap).

mod common;

use std::collections::HashMap;

use dpm::exec::Trace;
use dpm::prelude::*;

fn trainer(net_type: &str) -> Trainer {
    let mut t = common::small_cnn_trainer(net_type, 3);
    t.run(2).unwrap(); // warm-up
    t
}

fn chrome(trace: &Trace) -> serde_json::Value {
    serde_json::from_str(&trace.to_chrome_json()).expect("the trace is valid JSON")
}

#[test]
fn a_traced_step_shows_every_op_on_its_device_and_the_collectives_apart() {
    let mut t = trainer("dag");
    let dir = std::env::temp_dir().join(format!("dpm-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("trace.json");
    let overlap = t.trace(&path, 3).unwrap();
    assert!((0.0..=1.0).contains(&overlap.hidden));
    assert!(!overlap.allreduce_per_step.is_zero());
    assert!(overlap.to_string().starts_with("all-reduce "), "{overlap}");

    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    // Process names: one per device's compute, one for the collectives.
    let names: HashMap<u64, String> = events
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "process_name")
        .map(|e| {
            (
                e["pid"].as_u64().unwrap(),
                e["args"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut rows: Vec<&str> = names.values().map(String::as_str).collect();
    rows.sort();
    assert_eq!(rows, ["collectives", "cpu:0 compute", "cpu:1 compute", "nets"]);
    // The net runs: the training net once per step.
    let train_name = t.model().net().proto().name.clone().unwrap();
    let net_runs = events
        .iter()
        .filter(|e| e["cat"] == "net" && e["name"] == train_name.as_str())
        .count();
    assert_eq!(net_runs, 3);
    let slices: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["cat"] != "net")
        .collect();
    // Every op of the training net ran once per traced step, each slice on the
    // row of its device (or of the collectives).
    let train = t.model().net().proto();
    let mut runs: HashMap<(String, Vec<String>), usize> = HashMap::new();
    for e in &slices {
        let args = &e["args"];
        let outputs: Vec<String> = args["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap().to_owned())
            .collect();
        *runs
            .entry((args["op"].as_str().unwrap().to_owned(), outputs))
            .or_default() += 1;
        let row = &names[&e["pid"].as_u64().unwrap()];
        let device = args["device"].as_str().unwrap();
        if e["cat"] == "communication" {
            assert_eq!(row, "collectives");
        } else {
            assert_eq!(*row, format!("{device} compute"));
        }
        assert!(e["dur"].as_f64().unwrap() >= 0.0 && e["ts"].as_f64().unwrap() >= 0.0);
    }
    // (Batch norm and relu run fused: the fused op writes both ops' outputs.)
    let fused = ["SpatialBN+Relu", "ReluGradient+SpatialBNGradient"];
    for op in &train.op {
        let ran: usize = runs
            .iter()
            .filter(|((ty, outs), _)| {
                (ty == op.op_type() || fused.contains(&ty.as_str()))
                    && op.output.iter().all(|o| outs.contains(o))
            })
            .map(|(_, n)| n)
            .sum();
        assert_eq!(ran, 3, "{} {:?}", op.op_type(), op.output);
    }
    assert!(runs.keys().any(|(ty, _)| ty == "SpatialBN+Relu"));
    // Both devices ran backward ops; the gradients were all-reduced.
    for d in ["cpu:0", "cpu:1"] {
        assert!(slices
            .iter()
            .any(|e| e["cat"] == "backward" && e["args"]["device"] == d));
    }
    assert!(slices.iter().any(|e| e["args"]["op"] == "Allreduce"));
    // No two slices of one row overlap.
    let mut by_row: HashMap<(u64, u64), Vec<(f64, f64)>> = HashMap::new();
    for e in &slices {
        let (ts, dur) = (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap());
        by_row
            .entry((e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap()))
            .or_default()
            .push((ts, ts + dur));
    }
    for iv in by_row.values_mut() {
        iv.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            iv.windows(2).all(|w| w[0].1 <= w[1].0 + 1e-6),
            "overlapping slices on one row"
        );
    }
    assert_eq!(v["otherData"]["steps"], 3);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn the_simple_executor_hides_no_all_reduce_time() {
    // One op at a time: no all-reduce can run beside a backward op.
    let mut t = trainer("simple");
    let trace = t.trace_steps(2).unwrap();
    let o = trace.overlap();
    assert!(!o.allreduce_per_step.is_zero());
    assert_eq!(o.hidden, 0.0);
    // After the trace, nothing more is recorded.
    t.step().unwrap();
    assert!(t.workspace().take_trace(1).events.is_empty());
    assert!(chrome(&trace)["traceEvents"].as_array().unwrap().len() > train_ops(&t));
}

fn train_ops(t: &Trainer) -> usize {
    t.model().net().proto().op.len()
}
