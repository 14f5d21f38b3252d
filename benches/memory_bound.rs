//! The memory-bound CPU kernels (batch norm and its fusions, sums, updates:
//! `vectorized!` in `ops/cpu/isa.rs`) under each instruction set the machine
//! has, on ResNet-20's first-stage tensors ([32, 16, 32, 32], 2 MiB each).
//! Each op runs over 8 sets of blobs in turn, so its inputs come from L3 (as
//! in a training step, where a layer's tensors were written long before).
//! The instruction set is chosen once a process, so each is measured in a
//! child process (`DPM_ISA`), the sets alternating round by round.
//! `cargo bench --bench memory_bound [-- ROUNDS]`: medians of ROUNDS (default
//! 5) rounds, in µs an op.

use std::process::Command;
use std::time::Instant;

use dpm::ops::cpu::isa::Isa;
use dpm::ops::cpu::rng::Rng;
use dpm::prelude::*;

const SHAPE: [usize; 4] = [32, 16, 32, 32];
const SETS: usize = 8;
const ITERS: usize = 30;

/// (name, op type, inputs, outputs) with `{}` for the set's number.
const CASES: [(&str, &str, &[&str], &[&str]); 7] = [
    (
        "batch norm + relu",
        "SpatialBN+Relu",
        &["x{}", "s{}", "b{}", "rm{}", "rv{}"],
        &["y{}", "rm{}", "rv{}", "sm{}", "siv{}", "r{}"],
    ),
    (
        "batch norm + sum + relu",
        "SpatialBN+Sum+Relu",
        &["x{}", "s{}", "b{}", "rm{}", "rv{}", "o{}"],
        &["y{}", "rm{}", "rv{}", "sm{}", "siv{}", "sum{}", "r{}"],
    ),
    (
        "relu + bn gradient",
        "ReluGradient+SpatialBNGradient",
        &["x{}", "s{}", "dr{}", "sm{}", "siv{}", "r{}"],
        &["dr{}", "ds{}", "db{}", "dy{}"],
    ),
    (
        "  dY unwritten",
        "ReluGradient+SpatialBNGradient",
        &["x{}", "s{}", "dr{}", "sm{}", "siv{}", "r{}"],
        &["dr{}", "ds{}", "db{}"],
    ),
    (
        "  with the residual sum",
        "Sum+ReluGradient+SpatialBNGradient",
        &["x{}", "s{}", "dr{}", "sm{}", "siv{}", "r{}", "o{}"],
        &["o{}", "ds{}", "db{}", "dr{}"],
    ),
    ("sum + relu", "Sum+Relu", &["x{}", "o{}"], &["sum{}", "r{}"]),
    (
        "momentum update",
        "MomentumSGDUpdate",
        &["dr{}", "o{}", "lr", "x{}"],
        &["dr{}", "o{}", "x{}"],
    ),
];

fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    let v = (0..n).map(|_| rng.uniform() as f32 - 0.5).collect();
    Tensor::from_vec(shape.to_vec(), v).unwrap()
}

/// Runs case `k` in this process: µs an op.
fn child(k: usize) -> f64 {
    let (_, op, inputs, outputs) = CASES[k];
    let ws = Workspace::new();
    let mut rng = Rng::new(1);
    let mut net = Net::new("memory_bound");
    net.set_arg("dpm_fuse", 0i64);
    ws.feed("lr", Tensor::from_vec([1], vec![-0.01f32]).unwrap());
    for set in 0..SETS {
        let name = |b: &str| b.replace("{}", &set.to_string());
        for b in ["x", "o", "dr", "r"] {
            ws.feed(name(&format!("{b}{{}}")), random(&SHAPE, &mut rng));
        }
        for b in ["s", "b", "sm", "rm"] {
            ws.feed(name(&format!("{b}{{}}")), random(&[SHAPE[1]], &mut rng));
        }
        for b in ["siv", "rv"] {
            ws.feed(
                name(&format!("{b}{{}}")),
                Tensor::from_vec([SHAPE[1]], vec![1.0f32; SHAPE[1]]).unwrap(),
            );
        }
        net.op(op)
            .inputs(inputs.iter().map(|b| name(b)))
            .outputs(outputs.iter().map(|b| name(b)))
            .build();
    }
    let mut def = net.into_proto();
    def.r#type = Some("simple".into());
    ws.create_net(&def).unwrap();
    let name = def.name.clone().unwrap_or_default();
    for _ in 0..3 {
        ws.run_net(&name).unwrap();
    }
    let t = Instant::now();
    for _ in 0..ITERS {
        ws.run_net(&name).unwrap();
    }
    t.elapsed().as_secs_f64() * 1e6 / (ITERS * SETS) as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if let Ok(k) = std::env::var("DPM_MEMORY_BOUND_CASE") {
        println!("{}", child(k.parse().unwrap()));
        return;
    }
    let rounds: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    // The instruction sets this machine has, by the names `DPM_ISA` takes.
    let isas = &["portable", "avx2", "avx512"][..Isa::supported().len()];
    let exe = std::env::current_exe().unwrap();
    print!("{:26}", "µs an op, medians");
    for isa in isas {
        print!(" {isa:>9}");
    }
    println!("  (best / portable)");
    for (k, case) in CASES.iter().enumerate() {
        let mut times = vec![Vec::new(); isas.len()];
        for _ in 0..rounds {
            for (i, isa) in isas.iter().enumerate() {
                let out = Command::new(&exe)
                    .env("DPM_MEMORY_BOUND_CASE", k.to_string())
                    .env("DPM_ISA", isa)
                    .output()
                    .unwrap();
                let us: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
                times[i].push(us);
            }
        }
        let med: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        print!("{:26}", case.0);
        for m in &med {
            print!(" {m:9.0}");
        }
        println!("  {:.2}×", med[0] / med[med.len() - 1]);
    }
}
