//! The ratios of `benches/conv.rs`, measured the way a noisy machine allows:
//! each convolution and its raw GEMM alternate in one process, and each keeps
//! its best of 30 runs, in 3 rounds (the last is printed).
//! `cargo bench --bench conv_best_of [-- SHAPE-FILTER]`.

use std::time::Instant;

use dpm::ops::cpu::gemm::{set_threads, sgemm, Mat};
use dpm::prelude::*;

mod common;

use common::{BATCH, SHAPES};

/// Best wall time of `reps` runs of `f`, in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    set_threads(1);
    // `cargo bench` passes `--bench`; any other argument filters shapes.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_default();
    println!(
        "{:24} {:>7} {:>6} {:>6} {:>7} {:>6} {:>6}",
        "shape", "fwd", "gemm", "ratio", "bwd", "gemm", "ratio"
    );
    let mut rng = dpm::ops::cpu::rng::Rng::new(1);
    let mut fill = |shape: &[usize]| {
        let v = (0..shape.iter().product())
            .map(|_| rng.uniform() as f32 - 0.5)
            .collect();
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    };
    for (name, cin, cout, k, s, side) in SHAPES.into_iter().filter(|s| s.0.contains(&filter)) {
        let pad = k / 2;
        let out = (side + 2 * pad - k) / s + 1;
        let (m, n, kk) = (cout, out * out, cin * k * k);
        let flops = (2 * BATCH * m * n * kk) as f64;
        let ws = Workspace::new();
        ws.feed("x", fill(&[BATCH, cin, side, side]));
        ws.feed("w", fill(&[cout, cin, k, k]));
        ws.feed("dy", fill(&[BATCH, cout, out, out]));
        let mut fwd = Net::new("fwd");
        let op = fwd.op("Conv").inputs(["x", "w"]).output("y");
        op.arg("kernel", k).arg("stride", s).arg("pad", pad).build();
        let mut bwd = Net::new("bwd");
        let op = bwd
            .op("ConvGradient")
            .inputs(["x", "w", "dy"])
            .outputs(["dw", "dx"]);
        op.arg("kernel", k)
            .arg("stride", s)
            .arg("pad", pad)
            .arg("no_bias", 1i64)
            .build();
        ws.create_net(fwd.proto()).unwrap();
        ws.create_net(bwd.proto()).unwrap();
        let (a, b, dy) = (fill(&[m, kk]), fill(&[kk, n]), fill(&[m, n]));
        let (a, b, dy) = (
            a.data::<f32>().unwrap(),
            b.data::<f32>().unwrap(),
            dy.data::<f32>().unwrap(),
        );
        let (mut c, mut dw, mut dcol) = (vec![0.0; m * n], vec![0.0; m * kk], vec![0.0; kk * n]);
        let mut times = [0.0; 4];
        for _ in 0..3 {
            times = [
                best(30, || ws.run_net("fwd").unwrap()),
                best(30, || {
                    (0..BATCH).for_each(|_| sgemm(m, n, kk, Mat::n(a), Mat::n(b), 0.0, &mut c))
                }),
                best(30, || ws.run_net("bwd").unwrap()),
                best(30, || {
                    for i in 0..BATCH {
                        sgemm(
                            m,
                            kk,
                            n,
                            Mat::n(dy),
                            Mat::t(b),
                            if i == 0 { 0.0 } else { 1.0 },
                            &mut dw,
                        );
                        sgemm(kk, n, m, Mat::t(a), Mat::n(dy), 0.0, &mut dcol);
                    }
                }),
            ];
        }
        let g = |t: f64, f: f64| f / t / 1e9;
        println!(
            "{name:24} {:7.1} {:6.1} {:5.0}% {:7.1} {:6.1} {:5.0}%",
            g(times[0], flops),
            g(times[1], flops),
            100.0 * times[1] / times[0],
            g(times[2], 2.0 * flops),
            g(times[3], 2.0 * flops),
            100.0 * times[3] / times[2]
        );
    }
}
