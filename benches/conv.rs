//! Forward and backward of every distinct convolution of ResNet-20 on CIFAR
//! (batch 32), beside raw GEMMs of the same M×N×K from the `gemm` crate (which
//! dpm's FC layers use; convolutions run dpm's own direct kernels). Throughput
//! is in FLOP/s (criterion prints it as elem/s). One thread.
//! `cargo bench --bench conv && python3 benches/conv_ratios.py`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dpm::ops::cpu::gemm::{set_threads, sgemm, Mat};
use dpm::prelude::*;

mod common;

use common::{BATCH, SHAPES};

fn bench(c: &mut Criterion) {
    set_threads(1);
    let mut group = c.benchmark_group("cpu_conv");
    group.sample_size(15);
    for (name, cin, cout, k, s, side) in SHAPES {
        let pad = k / 2;
        let out = (side + 2 * pad - k) / s + 1;
        let (m, n, kk) = (cout, out * out, cin * k * k);
        let flops = (2 * BATCH * m * n * kk) as u64;

        let ws = Workspace::new();
        let mut rng = dpm::ops::cpu::rng::Rng::new(1);
        let mut fill = |shape: &[usize]| {
            let v = (0..shape.iter().product())
                .map(|_| rng.uniform() as f32 - 0.5)
                .collect();
            Tensor::from_vec(shape.to_vec(), v).unwrap()
        };
        ws.feed("x", fill(&[BATCH, cin, side, side]));
        ws.feed("w", fill(&[cout, cin, k, k]));
        ws.feed("dy", fill(&[BATCH, cout, out, out]));
        let mut fwd = Net::new("fwd");
        fwd.op("Conv")
            .inputs(["x", "w"])
            .output("y")
            .arg("kernel", k)
            .arg("stride", s)
            .arg("pad", pad)
            .build();
        let mut bwd = Net::new("bwd");
        bwd.op("ConvGradient")
            .inputs(["x", "w", "dy"])
            .outputs(["dw", "dx"])
            .arg("kernel", k)
            .arg("stride", s)
            .arg("pad", pad)
            .arg("no_bias", 1i64)
            .build();
        ws.create_net(fwd.proto()).unwrap();
        ws.create_net(bwd.proto()).unwrap();

        group.throughput(Throughput::Elements(flops));
        group.bench_function(BenchmarkId::new("forward", name), |b| {
            b.iter(|| ws.run_net("fwd").unwrap())
        });
        let a = fill(&[m, kk]);
        let bm = fill(&[kk, n]);
        let mut cm = vec![0.0f32; m * n];
        let (ad, bd) = (a.data::<f32>().unwrap(), bm.data::<f32>().unwrap());
        group.bench_function(BenchmarkId::new("gemm_forward", name), |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    sgemm(m, n, kk, Mat::n(black_box(ad)), Mat::n(bd), 0.0, &mut cm);
                }
            })
        });

        // Backward computes dW and dX: twice the forward FLOPs.
        group.throughput(Throughput::Elements(2 * flops));
        group.bench_function(BenchmarkId::new("backward", name), |b| {
            b.iter(|| ws.run_net("bwd").unwrap())
        });
        let dyb = fill(&[m, n]);
        let colb = fill(&[kk, n]);
        let mut dw = vec![0.0f32; m * kk];
        let mut dcol = vec![0.0f32; kk * n];
        let (dyd, cold) = (dyb.data::<f32>().unwrap(), colb.data::<f32>().unwrap());
        group.bench_function(BenchmarkId::new("gemm_backward", name), |b| {
            b.iter(|| {
                for i in 0..BATCH {
                    sgemm(
                        m,
                        kk,
                        n,
                        Mat::n(black_box(dyd)),
                        Mat::t(cold),
                        if i == 0 { 0.0 } else { 1.0 },
                        &mut dw,
                    );
                    sgemm(kk, n, m, Mat::t(ad), Mat::n(dyd), 0.0, &mut dcol);
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
