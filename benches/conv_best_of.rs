//! The ratios of `benches/conv.rs`, measured the way a noisy machine allows:
//! each convolution and its raw GEMM alternate in one process, and each keeps
//! its best of 30 runs, in 3 rounds (the last is printed). For the 1×1
//! stride-2 windows, a last line adds the time of copying the input rows the
//! window reads, and nothing else: the forward pass cannot move those bytes
//! faster, where the GEMM reuses one operand from L1.
//! `cargo bench --bench conv_best_of [-- SHAPE-FILTER]`.
//!
//! `COLD_MIB=800` writes that many MiB of other data before every run, so
//! that each op finds its operands in memory, as in a training step, where
//! they were written long before (on the VMs of sittings 19 and 20, ResNet-20's
//! convolutions ran 15–25% slower in the step than here warm, and as slow
//! with 800 MiB flushed). It takes minutes.

use std::hint::black_box;
use std::time::Instant;

use dpm::ops::cpu::gemm::set_threads;

mod common;

use common::{Case, BATCH, SHAPES};

/// Best wall time of `reps` runs of `f`, in seconds, each after writing
/// `cold` (if any) over.
fn best(reps: usize, cold: &mut Option<Vec<u8>>, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|rep| {
            if let Some(junk) = cold.as_mut() {
                junk.fill(rep as u8);
                black_box(junk);
            }
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

/// Every `stride`-th row (of `side` elements) of `x`, copied whole into
/// `out`, packed: the least memory traffic of a forward pass that reads those
/// rows from memory (for a 1×1 stride-2 window that doubles the channels, as
/// many bytes written as its output has).
fn copy_rows(x: &[f32], side: usize, stride: usize, out: &mut [f32]) {
    for (row, dst) in black_box(x)
        .chunks_exact(side)
        .step_by(stride)
        .zip(out.chunks_exact_mut(side))
    {
        dst.copy_from_slice(row);
    }
    black_box(out);
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
    let mut cold = std::env::var("COLD_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map(|mib| vec![0u8; mib << 20]);
    let mut floors = Vec::new();
    for shape in SHAPES.into_iter().filter(|s| s.0.contains(&filter)) {
        let mut case = Case::new(shape);
        // A strided 1×1 window reads only the rows its stride picks: what
        // copying them alone costs bounds its forward pass from below.
        let floor = shape.3 == 1 && shape.4 > 1;
        let (cin, stride, side) = (shape.1, shape.4, shape.5);
        let x = vec![1.0f32; BATCH * cin * side * side];
        let mut rows = vec![0.0f32; if floor { x.len() / stride } else { 0 }];
        let mut t = [0.0; 5];
        for _ in 0..3 {
            t = [
                best(30, &mut cold, || case.forward()),
                best(30, &mut cold, || case.gemm_forward()),
                best(30, &mut cold, || case.backward()),
                best(30, &mut cold, || case.gemm_backward()),
                if floor {
                    best(30, &mut cold, || copy_rows(&x, side, stride, &mut rows))
                } else {
                    0.0
                },
            ];
        }
        if floor {
            floors.push((shape.0, t[4], t[0], t[1]));
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
    for (name, copy, conv, gemm) in floors {
        println!(
            "{name}: its input's rows copied alone {:.0} µs, the forward {:.0} µs, the GEMM {:.0} µs \
             (the copy at {:.0}% of the GEMM's speed)",
            copy * 1e6,
            conv * 1e6,
            gemm * 1e6,
            100.0 * gemm / copy
        );
    }
}
