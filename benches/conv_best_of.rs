//! The ratios of `benches/conv.rs`, measured the way a noisy machine allows:
//! each convolution and its raw GEMM alternate in one process, and each keeps
//! its best of 30 runs, in 3 rounds (the last is printed).
//! `cargo bench --bench conv_best_of [-- SHAPE-FILTER]`.

use std::time::Instant;

use dpm::ops::cpu::gemm::set_threads;

mod common;

use common::{Case, SHAPES};

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
    for shape in SHAPES.into_iter().filter(|s| s.0.contains(&filter)) {
        let mut case = Case::new(shape);
        let mut t = [0.0; 4];
        for _ in 0..3 {
            t = [
                best(30, || case.forward()),
                best(30, || case.gemm_forward()),
                best(30, || case.backward()),
                best(30, || case.gemm_backward()),
            ];
        }
        let (fwd, bwd) = (case.flops as f64 / 1e9, 2.0 * case.flops as f64 / 1e9);
        println!(
            "{:24} {:7.1} {:6.1} {:5.0}% {:7.1} {:6.1} {:5.0}%",
            shape.0,
            fwd / t[0],
            fwd / t[1],
            100.0 * t[1] / t[0],
            bwd / t[2],
            bwd / t[3],
            100.0 * t[3] / t[2]
        );
    }
}
