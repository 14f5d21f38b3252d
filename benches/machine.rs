//! What the machine itself allows two devices on two cores: how multiply-adds
//! in registers, streams that fit in the shared L3, and streams from DRAM
//! scale from one thread to two running at once. Weak scaling of a training
//! step (one device per core) cannot beat the scaling of the resources its
//! step spends its time in: on a VM whose two cores share one memory channel
//! the DRAM-bound part of a step gains little from the second core however
//! the framework schedules it.
//! `cargo bench --bench machine [-- ROUNDS]`: medians of ROUNDS (default 5)
//! alternating rounds.

use std::time::Instant;

/// Independent accumulators: enough to keep every FMA pipe busy.
const ACC: usize = 12;

/// `n` rounds of multiply-adds on `ACC` accumulators; FLOPs (portable code,
/// for CPUs without AVX2: the ratio is what matters, not the peak).
fn fma_portable(n: u64) -> u64 {
    let mut a = [1.0f32; ACC];
    for _ in 0..n {
        for x in a.iter_mut() {
            *x = *x * 0.999_999 + 1e-7;
        }
    }
    std::hint::black_box(a);
    n * (ACC * 2) as u64
}

/// `unsafe fn $name(n) -> FLOPs`: `n` rounds of `$lanes`-lane multiply-adds
/// on `ACC` accumulators, compiled for `$features` (the caller must have
/// detected them).
macro_rules! fma_kernel {
    ($name:ident, $features:literal, $lanes:literal, $set1:ident, $fmadd:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(n: u64) -> u64 {
            use std::arch::x86_64::*;
            let (m, c) = ($set1(0.999_999), $set1(1e-7));
            let mut a = [$set1(1.0); ACC];
            for _ in 0..n {
                for x in a.iter_mut() {
                    *x = $fmadd(*x, m, c);
                }
            }
            std::hint::black_box(a);
            n * (ACC * $lanes * 2) as u64
        }
    };
}
fma_kernel!(fma_avx512, "avx512f", 16, _mm512_set1_ps, _mm512_fmadd_ps);
fma_kernel!(fma_avx2, "avx2,fma", 8, _mm256_set1_ps, _mm256_fmadd_ps);

/// Multiply-adds with the widest vectors the CPU has; FLOPs done.
fn fma(n: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: detected just above.
            return unsafe { fma_avx512(n) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: detected just above.
            return unsafe { fma_avx2(n) };
        }
    }
    fma_portable(n)
}

/// Reads `src` and writes `dst` `reps` times (a scaled copy, as a layer's
/// elementwise op does); bytes moved.
fn stream(src: &[f32], dst: &mut [f32], reps: usize) -> u64 {
    for r in 0..reps {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s * 1.0001 + r as f32;
        }
        std::hint::black_box(&mut *dst);
    }
    (reps * (src.len() + dst.len()) * 4) as u64
}

/// Throughput (units per second) of `job` on `threads` threads at once: the
/// total over the time of the slowest.
fn together(threads: usize, job: impl Fn() -> Box<dyn FnOnce() -> u64 + Send> + Sync) -> f64 {
    let jobs: Vec<_> = (0..threads).map(|_| job()).collect();
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|j| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let t = Instant::now();
                    let units = j();
                    (units, t.elapsed().as_secs_f64())
                })
            })
            .collect();
        let results: Vec<(u64, f64)> = handles
            .into_iter()
            .map(|h| h.join().expect("a bench thread"))
            .collect();
        let total: u64 = results.iter().map(|r| r.0).sum();
        let slowest = results.iter().map(|r| r.1).fold(0.0, f64::max);
        total as f64 / slowest
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a number is the count of rounds.
    let rounds = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5usize)
        .max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("{cores} cores available; medians of {rounds} rounds, 1 thread then 2 at once");
    if cores < 2 {
        println!("(one core: the 2-thread figures share it)");
    }
    // (name, unit, job): per-thread buffers are made before the clock starts.
    type Job = Box<dyn FnOnce() -> u64 + Send>;
    let buffers = |mib: usize, reps: usize| -> Job {
        let n = mib * 1024 * 1024 / 8;
        let (src, mut dst) = (vec![1.0f32; n], vec![0.0f32; n]);
        stream(&src, &mut dst, 1); // first touch outside the clock
        Box::new(move || stream(&src, &mut dst, reps))
    };
    let cases: [(&str, &str, &(dyn Fn() -> Job + Sync)); 3] = [
        ("multiply-adds in registers", "GFLOP/s", &|| {
            Box::new(|| fma(20_000_000))
        }),
        ("streams of 4 MiB (L2/L3)", "GB/s", &|| buffers(4, 400)),
        ("streams of 128 MiB (DRAM)", "GB/s", &|| buffers(128, 12)),
    ];
    println!("{:28} {:>9} {:>9} {:>8}", "", "1 thread", "2 threads", "scaling");
    for (name, unit, job) in cases {
        let (mut one, mut two) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            one.push(together(1, job) / 1e9);
            two.push(together(2, job) / 1e9);
        }
        let (one, two) = (median(one), median(two));
        println!(
            "{name:28} {one:>9.1} {two:>9.1} {:>7.0}%  ({unit})",
            100.0 * two / (2.0 * one)
        );
    }
}
