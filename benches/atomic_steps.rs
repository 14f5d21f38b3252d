//! The cost of all-or-nothing steps: ResNet-20 training steps (2 CPU devices ×
//! 32 images of 32×32, 1 kernel thread each) with `Trainer::set_atomic_steps`
//! on and off, in alternating rounds; prints the median step time of each and
//! their ratio. `cargo bench --bench atomic_steps [-- ROUNDS STEPS]`.

#[path = "../examples/resnet.rs"]
#[allow(dead_code)]
mod resnet;

use std::time::Instant;

use dpm::ops::cpu::rng::Rng;
use dpm::prelude::*;

const BATCH: usize = 32;

fn trainer(atomic: bool) -> Result<Trainer> {
    let cfg = resnet::ResNetConfig {
        depth: 20,
        classes: 10,
        image: [3, 32, 32],
    };
    let mut rng = Rng::new(1);
    let x: Vec<f32> = (0..2 * BATCH * 3 * 32 * 32)
        .map(|_| rng.normal() as f32)
        .collect();
    let y: Vec<i32> = (0..2 * BATCH).map(|i| (i % 10) as i32).collect();
    let batch = vec![
        (
            "data".to_owned(),
            Tensor::from_vec([2 * BATCH, 3, 32, 32], x).unwrap(),
        ),
        ("label".to_owned(), Tensor::from_vec([2 * BATCH], y).unwrap()),
    ];
    let mut t = Parallelize::new(ModelHelper::new("resnet"))
        .devices([Device::cpu(0), Device::cpu(1)])
        .input(move || Ok(batch.clone()))
        .forward(resnet::resnet(cfg))
        .update(Sgd::new(0.1).momentum(0.9).weight_decay(1e-4))
        .kernel_threads(1)
        .build()?;
    t.run_init()?;
    t.set_atomic_steps(atomic);
    t.run(2)?; // warm-up
    Ok(t)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (rounds, steps) = (
        args.first().copied().unwrap_or(5),
        args.get(1).copied().unwrap_or(10),
    );
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        for atomic in if r % 2 == 0 { [true, false] } else { [false, true] } {
            let mut t = trainer(atomic)?;
            let start = Instant::now();
            t.run(steps)?;
            let per_step = start.elapsed().as_secs_f64() / steps as f64;
            if atomic { &mut on } else { &mut off }.push(per_step);
        }
    }
    let (a, b) = (median(on), median(off));
    println!(
        "ResNet-20, 2 CPU devices × {BATCH}: {:.1} ms per step with atomic steps, {:.1} ms without: {:.3}× ({rounds} rounds of {steps} steps)",
        1e3 * a,
        1e3 * b,
        a / b
    );
    Ok(())
}
