//! The in-process all-reduce against two passes over the same bytes, with the
//! same number of threads: a copy of N buffers into N others, and a rewrite of
//! the N buffers in place (each element read and written back, scaled by 1).
//!
//! All three read each byte once and write it once; the copy writes to memory it
//! did not read, the other two write back what they just read. Comparing them
//! says where the all-reduce's time goes. `cargo bench --bench allreduce`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dpm::comm::local::allreduce_in_place;

/// Copies `src[i]` into `dst[i]` for every buffer, split across threads like the
/// all-reduce.
fn parallel_copy(src: &[Vec<f32>], dst: &mut [Vec<f32>]) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(src.len().max(2));
    let len = src[0].len();
    let per = len.div_ceil(threads);
    std::thread::scope(|s| {
        let mut jobs: Vec<Vec<(&[f32], &mut [f32])>> = (0..threads).map(|_| Vec::new()).collect();
        for (a, b) in src.iter().zip(dst.iter_mut()) {
            for (t, (x, y)) in a.chunks(per).zip(b.chunks_mut(per)).enumerate() {
                jobs[t].push((x, y));
            }
        }
        for job in jobs {
            s.spawn(move || {
                for (x, y) in job {
                    y.copy_from_slice(x);
                }
            });
        }
    });
}

/// Reads every element of every buffer and writes it back (times `scale`),
/// split across threads like the copy.
fn parallel_rewrite(bufs: &mut [Vec<f32>], scale: f32) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(bufs.len().max(2));
    let per = bufs[0].len().div_ceil(threads);
    std::thread::scope(|s| {
        let mut jobs: Vec<Vec<&mut [f32]>> = (0..threads).map(|_| Vec::new()).collect();
        for b in bufs.iter_mut() {
            for (t, x) in b.chunks_mut(per).enumerate() {
                jobs[t].push(x);
            }
        }
        for job in jobs {
            s.spawn(move || {
                for x in job {
                    x.iter_mut().for_each(|v| *v *= scale);
                }
            });
        }
    });
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_allreduce");
    group.sample_size(20);
    for devices in [2usize, 4] {
        for mb in [1usize, 64] {
            let len = mb * (1 << 20) / 4;
            let label = format!("{devices}dev_{mb}MB");
            group.throughput(Throughput::Bytes((devices * len * 4) as u64));
            let mut bufs: Vec<Vec<f32>> = (0..devices).map(|d| vec![d as f32 * 0.5; len]).collect();
            group.bench_function(BenchmarkId::new("allreduce", &label), |b| {
                b.iter(|| {
                    let mut views: Vec<&mut [f32]> = bufs.iter_mut().map(|v| v.as_mut_slice()).collect();
                    allreduce_in_place(black_box(&mut views), 0.5);
                })
            });
            let src: Vec<Vec<f32>> = (0..devices).map(|d| vec![d as f32; len]).collect();
            let mut dst: Vec<Vec<f32>> = (0..devices).map(|_| vec![0.0; len]).collect();
            group.bench_function(BenchmarkId::new("copy", &label), |b| {
                b.iter(|| parallel_copy(black_box(&src), black_box(&mut dst)))
            });
            group.bench_function(BenchmarkId::new("rewrite", &label), |b| {
                b.iter(|| parallel_rewrite(black_box(&mut dst), black_box(1.0)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
