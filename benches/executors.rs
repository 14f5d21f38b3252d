//! Executor overhead on small nets: the README's MLP (8 → 16 → 4, batch 32)
//! and a 3-layer MLP on 64 features (batch 64), on 1 and 2 CPU devices, with
//! the `dag` executor (the default) and `simple`, in alternating rounds;
//! prints the median time per step of each configuration and the ratios.
//! `cargo bench --bench executors [-- ROUNDS STEPS]`; with `PROFILE=1`, the
//! step time of the README MLP on 1 and 2 devices against the time in its ops;
//! with `ATOMIC=0`, without atomic steps (what saving the state costs); with
//! `FUSE=0`, without fused kernels (`exec::fuse`).
//! It also prints, before and after, the round trip of a cache line between
//! two threads: on a shared VM it moves between phases (tens of ns, or
//! hundreds), and every hand-off of a 2-device step pays it.

use std::time::Instant;

use dpm::ops::cpu::rng::Rng;
use dpm::prelude::*;

#[dpm::data_parallel]
fn readme_mlp(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [8]);
    let label = m.input("label");
    let h = m.fc("fc1", data, 16)?;
    let h = m.relu(h)?;
    let logits = m.fc("fc2", h, 4)?;
    let (softmax, loss) = m.softmax_with_loss("loss", logits, label)?;
    m.accuracy("accuracy", softmax, label);
    Ok(loss.into())
}

#[dpm::data_parallel]
fn mlp64(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [64]);
    let label = m.input("label");
    let h = m.fc("fc1", data, 64)?;
    let h = m.relu(h)?;
    let h = m.fc("fc2", h, 64)?;
    let h = m.relu(h)?;
    let logits = m.fc("fc3", h, 10)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

fn batch(n: usize, features: usize, classes: usize) -> Vec<(String, Tensor)> {
    let mut rng = Rng::new(3);
    let x: Vec<f32> = (0..n * features).map(|_| rng.normal() as f32).collect();
    let y: Vec<i32> = (0..n).map(|i| (i % classes) as i32).collect();
    vec![
        ("data".into(), Tensor::from_vec([n, features], x).unwrap()),
        ("label".into(), Tensor::from_vec([n], y).unwrap()),
    ]
}

fn trainer(model: usize, devices: usize, net_type: Option<&str>) -> Result<Trainer> {
    let (n, f, c) = if model == 0 { (32, 8, 4) } else { (64, 64, 10) };
    let b = batch(n, f, c);
    let mut p = Parallelize::new(ModelHelper::new("mlp"))
        .devices((0..devices as u32).map(Device::cpu))
        .input(move || Ok(b.clone()))
        .update(Sgd::new(0.1).momentum(0.9).weight_decay(1e-4));
    p = if model == 0 {
        p.forward(readme_mlp)
    } else {
        p.forward(mlp64)
    };
    if let Some(t) = net_type {
        p = p.net_type(t);
    }
    p = p.fuse_ops(std::env::var("FUSE").map_or(true, |v| v != "0"));
    let mut t = p.build()?;
    t.set_atomic_steps(std::env::var("ATOMIC").map_or(true, |v| v != "0"));
    t.run_init()?;
    t.run(5)?;
    Ok(t)
}

/// Median ns for a value to go to another thread and back.
fn round_trip_ns() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    let ball = std::sync::Arc::new(AtomicU64::new(0));
    let other = ball.clone();
    let n = 20_000u64;
    let echo = std::thread::spawn(move || {
        for i in 0..n {
            while other.load(Ordering::Acquire) != 2 * i + 1 {
                std::hint::spin_loop();
            }
            other.store(2 * i + 2, Ordering::Release);
        }
    });
    let mut rounds = Vec::new();
    for k in 0..n / 1000 {
        let start = Instant::now();
        for i in k * 1000..(k + 1) * 1000 {
            ball.store(2 * i + 1, Ordering::Release);
            while ball.load(Ordering::Acquire) != 2 * i + 2 {
                std::hint::spin_loop();
            }
        }
        rounds.push(start.elapsed().as_secs_f64() * 1e9 / 1000.0);
    }
    echo.join().expect("the echo thread");
    median(rounds)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    if std::env::var("PROFILE").is_ok() {
        for d in [1usize, 2] {
            let mut t = trainer(0, d, Some("simple"))?;
            t.workspace().set_profiling(true);
            let start = Instant::now();
            t.run(1000)?;
            let wall = start.elapsed().as_secs_f64() / 1000.0;
            let ops: f64 = t
                .workspace()
                .op_times()
                .iter()
                .map(|(_, o)| o.total.as_secs_f64())
                .sum::<f64>()
                / 1000.0;
            println!("devices {d}: step {:.1} µs, ops {:.1} µs", wall * 1e6, ops * 1e6);
            for (k, o) in t.workspace().op_times().iter().take(8) {
                println!(
                    "   {k:<28} {:>8.2} µs x{}",
                    o.total.as_secs_f64() * 1e6 / 1000.0,
                    o.runs / 1000
                );
            }
        }
        return Ok(());
    }
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (rounds, steps) = (
        args.first().copied().unwrap_or(5),
        args.get(1).copied().unwrap_or(1000),
    );
    let configs: Vec<(usize, usize, Option<&str>)> = [0, 1]
        .into_iter()
        .flat_map(|m| {
            [1, 2]
                .into_iter()
                .flat_map(move |d| [None, Some("dag"), Some("simple")].map(|t| (m, d, t)))
        })
        .collect();
    let mut trainers: Vec<Trainer> = configs
        .iter()
        .map(|&(m, d, t)| trainer(m, d, t))
        .collect::<Result<_>>()?;
    println!("cross-thread round trip before: {:.0} ns", round_trip_ns());
    let mut times = vec![Vec::new(); configs.len()];
    for _ in 0..rounds {
        for (i, t) in trainers.iter_mut().enumerate() {
            // Untimed steps first: the trainer before it in the round left
            // the caches and the CPUs to another net, and its pool asleep.
            t.run(steps / 10 + 1)?;
            let start = Instant::now();
            t.run(steps)?;
            times[i].push(start.elapsed().as_secs_f64() / steps as f64);
        }
    }
    let med: Vec<f64> = times.into_iter().map(median).collect();
    println!("cross-thread round trip after: {:.0} ns", round_trip_ns());
    println!(
        "{:<12} {:>7} {:>12} {:>12} {:>12} {:>10}",
        "model", "devices", "default µs", "dag µs", "simple µs", "default/best"
    );
    for (k, chunk) in configs.chunks(3).enumerate() {
        let (m, d, _) = chunk[0];
        let (def, dag, simple) = (med[3 * k], med[3 * k + 1], med[3 * k + 2]);
        println!(
            "{:<12} {:>7} {:>12.1} {:>12.1} {:>12.1} {:>10.2}",
            if m == 0 { "README MLP" } else { "MLP 64×3" },
            d,
            1e6 * def,
            1e6 * dag,
            1e6 * simple,
            def / dag.min(simple)
        );
    }
    Ok(())
}
