//! Training across processes with MPI (feature `mpi`), under `mpirun
//! --allow-run-as-root --oversubscribe -np N` on one machine. Each test re-runs
//! this test binary under `mpirun` (the `mpi_child` test does the rank's work
//! when `DPM_MPI_SCENARIO` is set) and checks what the ranks wrote, how `mpirun`
//! ended, and that it ended well within a watchdog: no case may hang.
#![cfg(feature = "mpi")]

#[path = "../examples/resnet.rs"]
#[allow(dead_code)]
mod resnet;

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{cycling_source, mlp_forward};
use dpm::prelude::*;

/// What a finished `mpirun` left: exit success, stderr, seconds taken.
struct Job {
    ok: bool,
    stderr: String,
    secs: f64,
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dpm-mpi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `scenario` on `np` ranks; each rank writes `dir/rank{r}.txt`. The
/// watchdog kills a job that outlives `limit` and fails the test.
fn mpirun(np: usize, scenario: &str, dir: &Path, env: &[(&str, &str)], limit: Duration) -> Job {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string()])
        .arg(&exe)
        .args(["--exact", "mpi_child", "--nocapture", "--test-threads", "1"])
        .env("DPM_MPI_SCENARIO", scenario)
        .env("DPM_MPI_DIR", dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!("mpirun could not start ({e}): install Open MPI (apt-get install openmpi-bin libopenmpi-dev)")
    });
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Job {
                ok: status.success(),
                stderr: reader.join().unwrap(),
                secs: start.elapsed().as_secs_f64(),
            };
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{scenario}` on {np} ranks hung past {limit:?}; stderr:\n{}",
                reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `key value…` lines each rank wrote.
fn results(dir: &Path, np: usize) -> Vec<BTreeMap<String, Vec<String>>> {
    (0..np)
        .map(|r| {
            let text = std::fs::read_to_string(dir.join(format!("rank{r}.txt")))
                .unwrap_or_else(|e| panic!("rank {r} wrote no results: {e}"));
            text.lines()
                .filter_map(|l| {
                    let mut w = l.split_whitespace().map(str::to_owned);
                    Some((w.next()?, w.collect()))
                })
                .collect()
        })
        .collect()
}

fn bits(t: &Tensor) -> String {
    let h = t
        .data::<f32>()
        .unwrap()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
            (h ^ u64::from(v.to_bits())).wrapping_mul(0x100_0000_01b3)
        });
    format!("{h:016x}")
}

fn mlp_trainer(devices: u32, ranks: usize, batch: usize, start: usize, hidden_twice: bool) -> Parallelize {
    let mut p = Parallelize::new(ModelHelper::new("mlp"))
        .devices((0..devices).map(Device::cpu))
        .input(cycling_source(batch, start))
        .update(Sgd::new(0.1).momentum(0.9).weight_decay(1e-4));
    p = if hidden_twice {
        p.forward(|m: &mut ModelHelper| {
            let data = m.blob("data");
            let label = m.blob("label");
            let h = m.fc("fc1", &data, 8, 32)?;
            let h = m.relu(&h, "fc1_relu");
            let logits = m.fc("fc2", &h, 32, 4)?;
            let (_, loss) = m.softmax_with_loss(&logits, &label, "loss");
            Ok(vec![loss])
        })
    } else {
        p.forward(mlp_forward)
    };
    if ranks > 1 {
        p = p.rendezvous(Rendezvous::from_mpi().unwrap());
    }
    p
}

fn env_usize(k: &str, default: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One rank's part of a scenario (run by `mpirun`, see [`mpirun`]).
#[test]
fn mpi_child() {
    let Ok(scenario) = std::env::var("DPM_MPI_SCENARIO") else {
        return;
    };
    let dir = PathBuf::from(std::env::var("DPM_MPI_DIR").unwrap());
    let world = dpm::comm::mpi::world().unwrap();
    let (rank, size) = (world.rank(), world.size());
    let mut out = String::new();
    let result: Result<()> = (|| {
        match scenario.as_str() {
            "mlp" | "different" | "mixed" | "indivisible" | "die" | "hang" => {
                let devices = env_usize("DEVICES", 1) as u32 + u32::from(scenario == "mixed" && rank == 1);
                let batch = env_usize("BATCH", 12);
                let steps = env_usize("STEPS", 6);
                let different = scenario == "different" && rank == 1;
                let mut t = mlp_trainer(devices, size, batch, 0, different).build()?;
                t.run_init()?;
                for step in 0..steps {
                    if scenario == "die" && rank == 1 && step == 3 {
                        let _ = Command::new("kill")
                            .args(["-9", &std::process::id().to_string()])
                            .status();
                    }
                    if scenario == "hang" && rank == 1 && step == 2 {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                    t.step()?;
                    out += &format!("loss{step} {}\n", t.loss()?);
                }
                for d in t.devices().to_vec() {
                    for g in t.param_groups() {
                        let v = t.fetch(&g.name, d)?;
                        let vals: Vec<String> =
                            v.data::<f32>().unwrap().iter().map(|x| x.to_string()).collect();
                        out += &format!("{}@{d} {}\n", g.name, vals.join(" "));
                    }
                }
            }
            "resnet8" => {
                let cfg = resnet::ResNetConfig {
                    depth: 8,
                    classes: 10,
                    image: [3, 16, 16],
                };
                let data = dpm::data::Synthetic::new(10, 16, 1).generate(64, 2);
                let mut step = 0usize;
                let source = move || {
                    let ids: Vec<usize> = (0..16).map(|i| (step * 16 + i) % 64).collect();
                    step += 1;
                    Ok(dpm::data::batch_tensors(&data, &ids, None))
                };
                let mut t = Parallelize::new(ModelHelper::new("resnet"))
                    .devices([Device::cpu(0), Device::cpu(1)])
                    .input(source)
                    .forward(resnet::resnet(cfg))
                    .update(Sgd::new(0.1).momentum(0.9).weight_decay(1e-4))
                    .rendezvous(Rendezvous::from_mpi()?)
                    .build()?;
                t.run_init()?;
                t.run(5)?;
                for d in t.devices().to_vec() {
                    for g in t.param_groups().iter().chain(t.computed_param_groups()) {
                        out += &format!("{}@{d} {}\n", g.name, bits(&t.fetch(&g.name, d)?));
                    }
                }
            }
            "resume" => {
                // Phase 0: 6 uninterrupted steps. Phase 1: 3 steps, save. Phase 2: load, 3 steps.
                let phase = env_usize("PHASE", 0);
                let ckpt = dir.join("ckpt.safetensors");
                let start = if phase == 2 { 3 } else { 0 };
                let mut t = mlp_trainer(1, size, 8, start, false).build()?;
                t.run_init()?;
                if phase == 2 {
                    t.load(&ckpt)?;
                }
                t.run(if phase == 0 { 6 } else { 3 })?;
                if phase == 1 {
                    t.save(&ckpt)?;
                }
                for g in t.param_groups() {
                    out += &format!("{} {}\n", g.name, bits(&t.fetch(&g.name, Device::cpu(0))?));
                }
            }
            other => panic!("unknown scenario {other}"),
        }
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("rank {rank}: error: {e}");
        // Leave without MPI_Finalize: mpirun then ends the other ranks.
        std::process::exit(1);
    }
    std::fs::write(dir.join(format!("rank{rank}.txt")), out).unwrap();
    dpm::comm::finalize();
}

fn floats(v: &[String]) -> Vec<f32> {
    v.iter().map(|s| s.parse().unwrap()).collect()
}

/// Losses and parameters of the MLP trained in this process on `devices` CPU
/// devices, as the ranks report them.
fn in_process_mlp(devices: u32, batch: usize, steps: usize) -> BTreeMap<String, Vec<f32>> {
    let mut t = mlp_trainer(devices, 1, batch, 0, false).build().unwrap();
    t.run_init().unwrap();
    let mut m = BTreeMap::new();
    for step in 0..steps {
        t.step().unwrap();
        m.insert(format!("loss{step}"), vec![t.loss().unwrap()]);
    }
    for g in t.param_groups() {
        let v = t.fetch(&g.name, Device::cpu(0)).unwrap();
        m.insert(format!("{}@cpu:0", g.name), v.data::<f32>().unwrap().to_vec());
    }
    m
}

fn assert_close(what: &str, a: &[f32], b: &[f32], rtol: f32) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= rtol * scale, "{what}: {x} vs {y}");
    }
}

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn ranks_match_devices_and_one_device_with_the_whole_batch() {
    // Summation order differs (across ranks, across devices, within one batch):
    // equal to 1e-5 of each tensor's largest element.
    let steps = 6;
    let one = in_process_mlp(1, 12, steps);
    let two_devices = in_process_mlp(2, 12, steps);
    for (np, devices) in [(2, 1), (3, 1), (2, 2)] {
        let dir = scratch(&format!("mlp{np}x{devices}"));
        let d = devices.to_string();
        let job = mpirun(np, "mlp", &dir, &[("DEVICES", &d), ("BATCH", "12")], LIMIT);
        assert!(job.ok, "{np} ranks × {devices}: {}", job.stderr);
        let res = results(&dir, np);
        for (key, want) in &one {
            for (r, got) in res.iter().enumerate() {
                assert_close(
                    &format!("{key} on rank {r} of {np}"),
                    &floats(&got[key]),
                    want,
                    1e-5,
                );
            }
            assert_close(&format!("{key}, 2 devices"), &two_devices[key], want, 1e-5);
        }
        // Every replica of every rank holds the same bits.
        for (key, v) in &res[0] {
            for (r, other) in res.iter().enumerate() {
                assert_eq!(&other[key], v, "`{key}` differs between rank 0 and rank {r}");
            }
        }
    }
}

#[test]
fn resnet8_on_two_ranks_of_two_devices_keeps_all_four_replicas_identical() {
    let dir = scratch("resnet8");
    let job = mpirun(2, "resnet8", &dir, &[], LIMIT);
    assert!(job.ok, "{}", job.stderr);
    let res = results(&dir, 2);
    let mut per_param: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for r in &res {
        for (key, v) in r {
            let name = key.split('@').next().unwrap().to_owned();
            per_param.entry(name).or_default().push(&v[0]);
        }
    }
    assert!(per_param.len() >= 10, "{per_param:?}");
    for (name, hashes) in per_param {
        assert_eq!(hashes.len(), 4, "`{name}`: one per replica");
        assert!(
            hashes.iter().all(|h| *h == hashes[0]),
            "`{name}` differs between replicas: {hashes:?}"
        );
    }
}

#[test]
fn a_checkpoint_saved_by_rank_0_resumes_bitwise_on_two_ranks() {
    let dir = scratch("resume");
    for phase in ["0", "1"] {
        let job = mpirun(2, "resume", &dir, &[("PHASE", phase)], LIMIT);
        assert!(job.ok, "phase {phase}: {}", job.stderr);
        if phase == "0" {
            std::fs::rename(dir.join("rank0.txt"), dir.join("full.txt")).unwrap();
        }
    }
    assert!(dir.join("ckpt.safetensors").exists());
    let job = mpirun(2, "resume", &dir, &[("PHASE", "2")], LIMIT);
    assert!(job.ok, "resume: {}", job.stderr);
    let full = std::fs::read_to_string(dir.join("full.txt")).unwrap();
    for r in 0..2 {
        let resumed = std::fs::read_to_string(dir.join(format!("rank{r}.txt"))).unwrap();
        assert_eq!(resumed, full, "rank {r} after resuming");
    }
}

#[test]
fn a_killed_rank_ends_the_job_with_an_error() {
    let dir = scratch("die");
    // mpirun ends the job when a rank dies; the 10 s deadline is the fallback.
    let job = mpirun(
        2,
        "die",
        &dir,
        &[("STEPS", "1000"), ("DPM_MPI_TIMEOUT", "10")],
        Duration::from_secs(60),
    );
    assert!(!job.ok, "the job must fail");
    assert!(job.secs < 30.0, "took {:.1} s", job.secs);
}

#[test]
fn a_rank_that_stops_answering_is_an_error_on_the_others_within_the_timeout() {
    let dir = scratch("hang");
    let job = mpirun(
        2,
        "hang",
        &dir,
        &[("DPM_MPI_TIMEOUT", "3")],
        Duration::from_secs(60),
    );
    assert!(!job.ok, "the job must fail");
    assert!(job.stderr.contains("waited 3 s for its peers"), "{}", job.stderr);
    assert!(job.secs < 30.0, "took {:.1} s", job.secs);
}

#[test]
fn ranks_with_different_nets_are_an_error_naming_the_collective() {
    let dir = scratch("different");
    let job = mpirun(2, "different", &dir, &[], LIMIT);
    assert!(!job.ok, "the job must fail");
    assert!(
        job.stderr
            .contains("the ranks built different nets: collective #"),
        "{}",
        job.stderr
    );
}

#[test]
fn ranks_with_different_devices_are_an_error_too() {
    let dir = scratch("mixed");
    let job = mpirun(2, "mixed", &dir, &[], LIMIT);
    assert!(!job.ok, "the job must fail");
    assert!(
        job.stderr.contains("the ranks built different nets"),
        "{}",
        job.stderr
    );
}

#[test]
fn a_batch_the_ranks_cannot_split_is_an_error_on_every_rank() {
    let dir = scratch("indivisible");
    let job = mpirun(2, "indivisible", &dir, &[("BATCH", "5")], LIMIT);
    assert!(!job.ok, "the job must fail");
    assert!(job.stderr.contains("divisible"), "{}", job.stderr);
}
