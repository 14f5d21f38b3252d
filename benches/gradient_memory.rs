//! Peak gradient memory of one training step, with and without
//! `optimize_gradient_memory`, on the example's ResNet-20 and ResNet-50
//! (2 CPU devices × 32 images of 32×32). `cargo bench --bench gradient_memory`.
//!
//! The step runs op by op (simple executor order) and the bytes allocated by
//! gradient blobs are read after every op; the largest reading is the peak.

#[path = "../examples/resnet.rs"]
#[allow(dead_code)]
mod resnet;

use dpm::ops::cpu::rng::Rng;
use dpm::prelude::*;

const BATCH: usize = 32;

/// (peak over the step, bytes allocated at its end, gradient blobs' last sizes).
fn measure(depth: usize, share: bool) -> Result<(usize, usize, usize)> {
    let cfg = resnet::ResNetConfig {
        depth,
        classes: 10,
        image: [3, 32, 32],
    };
    let devices = [Device::cpu(0), Device::cpu(1)];
    let mut t = Parallelize::new(ModelHelper::new("resnet"))
        .devices(devices)
        .forward(resnet::resnet(cfg))
        .update(Sgd::new(0.1).momentum(0.9))
        .net_type("simple")
        .optimize_gradient_memory(share)
        .build()?;
    t.run_init()?;
    let mut rng = Rng::new(1);
    for d in devices {
        let x: Vec<f32> = (0..BATCH * 3 * 32 * 32).map(|_| rng.normal() as f32).collect();
        let y: Vec<i32> = (0..BATCH).map(|i| (i % 10) as i32).collect();
        t.feed("data", d, Tensor::from_vec([BATCH, 3, 32, 32], x).unwrap())?;
        t.feed("label", d, Tensor::from_vec([BATCH], y).unwrap())?;
    }
    let net = t.model().net().proto().clone();
    let mut peak = 0;
    for (i, op) in net.op.iter().enumerate() {
        // Alone in its net, an op's control inputs name nothing; program order
        // already honours them.
        let mut op = op.clone();
        op.control_input.clear();
        let one = NetDef {
            name: Some(format!("op{i}")),
            op: vec![op],
            ..Default::default()
        };
        t.workspace().run_net_once(&one)?;
        peak = peak.max(t.gradient_bytes());
    }
    let last: usize = t
        .workspace()
        .blob_names()
        .iter()
        .filter(|n| n.contains("_grad") || n.contains("__shared_grad_"))
        .map(|n| t.workspace().fetch(n).map_or(0, |b| b.nbytes()))
        .sum();
    Ok((peak, t.gradient_bytes(), last))
}

fn main() -> Result<()> {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!("peak gradient memory of one step, 2 devices × {BATCH} images of 32×32 (both devices)");
    for depth in [20, 50] {
        let (plain, plain_end, _) = measure(depth, false)?;
        let (shared, shared_end, shared_last) = measure(depth, true)?;
        println!(
            "ResNet-{depth}: {:.1} MiB without sharing, {:.1} MiB with ({:.0}% saved); \
             at the step's end {:.1} / {:.1} MiB allocated; shared buffers' last occupants {:.1} MiB",
            mib(plain),
            mib(shared),
            100.0 * (1.0 - shared as f64 / plain as f64),
            mib(plain_end),
            mib(shared_end),
            mib(shared_last)
        );
    }
    Ok(())
}
