//! Forward and backward of every distinct convolution of ResNet-20 on CIFAR
//! (batch 32), beside raw GEMMs of the same M×N×K from the `gemm` crate (which
//! dpm's FC layers use; convolutions run dpm's own direct kernels). Throughput
//! is in FLOP/s (criterion prints it as elem/s). One thread.
//! `cargo bench --bench conv && python3 benches/conv_ratios.py`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dpm::ops::cpu::gemm::set_threads;

mod common;

use common::{Case, SHAPES};

fn bench(c: &mut Criterion) {
    set_threads(1);
    let mut group = c.benchmark_group("cpu_conv");
    group.sample_size(15);
    for shape in SHAPES {
        let name = shape.0;
        let mut case = Case::new(shape);
        group.throughput(Throughput::Elements(case.flops));
        group.bench_function(BenchmarkId::new("forward", name), |b| b.iter(|| case.forward()));
        group.bench_function(BenchmarkId::new("gemm_forward", name), |b| {
            b.iter(|| case.gemm_forward())
        });
        // Backward computes dW and dX: twice the forward FLOPs.
        group.throughput(Throughput::Elements(2 * case.flops));
        group.bench_function(BenchmarkId::new("backward", name), |b| b.iter(|| case.backward()));
        group.bench_function(BenchmarkId::new("gemm_backward", name), |b| {
            b.iter(|| case.gemm_backward())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
