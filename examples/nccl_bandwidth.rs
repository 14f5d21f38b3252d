//! NCCL all-reduce bandwidth through dpm's `NCCLAllreduce` op, as nccl-tests
//! reports it: one in-place all-reduce of a 64 MiB f32 buffer on each local GPU,
//! timed over repeated net runs (each ends with the GPUs synchronised).
//!
//! ```sh
//! cargo run --release --features cuda --example nccl_bandwidth -- [MiB] [runs]
//! ```
//!
//! `algbw` = bytes / time; `busbw` = algbw · 2(n − 1)/n, the ring's traffic per
//! link. With one GPU n − 1 = 0: the run measures NCCL's fixed cost only.

use std::time::Instant;

use dpm::prelude::*;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let runs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20);
    let gpus = dpm::cuda::device_count()?;
    if gpus == 0 {
        return Err(Error::Config("no CUDA device on this machine".into()));
    }
    let n = mib * (1 << 20) / 4;
    let ws = Workspace::new();
    let mut net = Net::new("allreduce");
    let blobs: Vec<String> = (0..gpus).map(|g| format!("gpu_{g}/x")).collect();
    for (g, b) in blobs.iter().enumerate() {
        let x = Tensor::from_vec([n], vec![1.0f32; n]).unwrap_or_else(|| Tensor::zeros::<f32>([n]));
        ws.feed(b, x.to_device(Device::cuda(g as u32))?);
    }
    net.op("NCCLAllreduce")
        .inputs(&blobs)
        .outputs(&blobs)
        .device(Device::cuda(0))
        .build();
    ws.create_net(net.proto())?;
    ws.run_net("allreduce")?; // communicators, warm-up
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        ws.run_net("allreduce")?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let bytes = (n * 4) as f64;
    let algbw = bytes / median / 1e9;
    let busbw = algbw * 2.0 * (gpus as f64 - 1.0) / gpus as f64;
    println!(
        "NCCLAllreduce of {mib} MiB on {gpus} GPU(s): median {:.3} ms over {runs} runs, algbw {algbw:.1} GB/s, busbw {busbw:.1} GB/s",
        1e3 * median
    );
    Ok(())
}
