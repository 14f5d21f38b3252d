//! Worker threads kept between runs of a `dag` net.
//!
//! Starting threads for every run costs tens of µs, and waking a sleeping one
//! several µs: more than a whole op of a small net. A net's pool therefore
//! keeps its threads, and an idle one spins for a short while ([`SPIN`])
//! before it sleeps, so that the runs of a training loop, and the hand-offs
//! within a run, find their workers awake. The waits yield the core while they
//! spin, so a machine with more threads than cores still makes progress.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker (between runs, or waiting for a ready op) stays
/// awake before it sleeps.
pub(super) const SPIN: Duration = Duration::from_micros(50);

/// Spins (then yields) until `ready()` or [`SPIN`] has passed; whether
/// `ready()` held.
pub(super) fn spin_until(mut ready: impl FnMut() -> bool) -> bool {
    for _ in 0..64 {
        if ready() {
            return true;
        }
        std::hint::spin_loop();
    }
    let start = Instant::now();
    while start.elapsed() < SPIN {
        if ready() {
            return true;
        }
        // Another thread may need this core (more threads than cores).
        std::thread::yield_now();
    }
    ready()
}

/// The job of the current run, with its lifetime erased (see [`Pool::run`]).
#[derive(Clone, Copy)]
struct JobRef(*const (dyn Fn(usize) + Sync));

// SAFETY: the pointee is `Sync`, so calling it from another thread is sound;
// `Pool::run` keeps it alive while any worker may use the pointer.
unsafe impl Send for JobRef {}

struct Slot {
    job: Option<JobRef>,
    /// Workers asleep on `Control::wake`.
    sleepers: usize,
    /// Whether the caller of `run` sleeps on `Control::done`.
    caller_asleep: bool,
    shutdown: bool,
}

struct Control {
    slot: Mutex<Slot>,
    /// Bumped when a job (or the shutdown) is posted: what spinning workers watch.
    epoch: AtomicU64,
    /// Workers yet to finish the current job.
    remaining: AtomicUsize,
    wake: Condvar,
    done: Condvar,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn worker(&self, w: usize) {
        let mut seen = 0;
        loop {
            if !spin_until(|| self.epoch.load(Ordering::Acquire) != seen) {
                let mut slot = self.lock();
                while self.epoch.load(Ordering::Acquire) == seen {
                    slot.sleepers += 1;
                    slot = self.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
                    slot.sleepers -= 1;
                }
            }
            let (job, shutdown) = {
                let slot = self.lock();
                seen = self.epoch.load(Ordering::Acquire);
                (slot.job, slot.shutdown)
            };
            if shutdown {
                return;
            }
            if let Some(JobRef(job)) = job {
                // SAFETY: `run` posted this pointer and waits until `remaining`
                // is 0, which this worker signals only after its last use.
                // The job catches its own panics; this catch keeps the count
                // right should one escape.
                let _ = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(w) }));
            }
            if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                // Taking the lock orders this after the caller's last check:
                // it is asleep (and told) or will see `remaining == 0`.
                if self.lock().caller_asleep {
                    self.done.notify_one();
                }
            }
        }
    }
}

/// Threads that run a job together with the calling thread, kept between jobs.
pub(super) struct Pool {
    control: Arc<Control>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// A pool of up to `helpers` threads besides the caller (fewer if the OS
    /// refuses to start more), named after `net`.
    pub(super) fn new(net: &str, helpers: usize) -> Pool {
        let control = Arc::new(Control {
            slot: Mutex::new(Slot {
                job: None,
                sleepers: 0,
                caller_asleep: false,
                shutdown: false,
            }),
            epoch: AtomicU64::new(0),
            remaining: AtomicUsize::new(0),
            wake: Condvar::new(),
            done: Condvar::new(),
        });
        let threads = (1..=helpers)
            .map_while(|w| {
                let c = Arc::clone(&control);
                std::thread::Builder::new()
                    // A NUL byte (legal in a net's name) would make spawn panic.
                    .name(format!("dpm-{}-{w}", net.replace('\0', "?")))
                    .spawn(move || c.worker(w))
                    .ok()
            })
            .collect();
        Pool { control, threads }
    }

    /// Workers of a job: the helper threads and the caller.
    pub(super) fn workers(&self) -> usize {
        self.threads.len() + 1
    }

    /// Runs `job(w)` for every worker `w` (0 on the calling thread) and returns
    /// once all have returned. `&mut`: one job at a time.
    pub(super) fn run(&mut self, job: &(dyn Fn(usize) + Sync)) {
        let c = &*self.control;
        // SAFETY (of the workers' use of this pointer): `Wait` below does not
        // let this function return or unwind before every helper has counted
        // itself out of `remaining`, after its last use of the job.
        let erased: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(job) };
        {
            let mut slot = c.lock();
            slot.job = Some(JobRef(erased));
            c.remaining.store(self.threads.len(), Ordering::Release);
            c.epoch.fetch_add(1, Ordering::AcqRel);
            if slot.sleepers > 0 {
                c.wake.notify_all();
            }
        }
        struct Wait<'a>(&'a Control);
        impl Drop for Wait<'_> {
            fn drop(&mut self) {
                let c = self.0;
                if !spin_until(|| c.remaining.load(Ordering::Acquire) == 0) {
                    let mut slot = c.lock();
                    while c.remaining.load(Ordering::Acquire) != 0 {
                        slot.caller_asleep = true;
                        slot = c.done.wait(slot).unwrap_or_else(|e| e.into_inner());
                    }
                    slot.caller_asleep = false;
                }
                c.lock().job = None;
            }
        }
        let _wait = Wait(c);
        job(0);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        {
            let mut slot = self.control.lock();
            slot.shutdown = true;
            self.control.epoch.fetch_add(1, Ordering::AcqRel);
            self.control.wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_runs_each_job_once_and_run_waits_for_them() {
        let mut pool = Pool::new("t", 3);
        assert_eq!(pool.workers(), 4);
        let hits: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
        for round in 1..=200 {
            // Slow helpers now and then: run must still wait for them.
            let job = |w: usize| {
                if round % 50 == 0 && w > 0 {
                    std::thread::sleep(SPIN * 4);
                }
                hits[w].fetch_add(1, Ordering::Relaxed);
            };
            pool.run(&job);
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == round));
        }
    }

    #[test]
    fn idle_workers_sleep_and_wake_for_the_next_job() {
        let mut pool = Pool::new("t", 2);
        let n = AtomicUsize::new(0);
        let job = |_: usize| {
            n.fetch_add(1, Ordering::Relaxed);
        };
        for round in 1..=3 {
            pool.run(&job);
            // They stop spinning soon after SPIN (a busy machine may delay
            // that); the count of sleepers never exceeds the workers, also
            // for a while after both sleep.
            let start = Instant::now();
            let mut asleep: Option<Instant> = None;
            while asleep.is_none_or(|t| t.elapsed() < Duration::from_millis(5)) {
                let sleepers = pool.control.lock().sleepers;
                assert!(sleepers <= 2, "{sleepers} sleepers among 2 workers");
                if sleepers == 2 {
                    asleep.get_or_insert_with(Instant::now);
                }
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "idle workers never slept"
                );
                std::thread::sleep(SPIN);
            }
            assert_eq!(n.load(Ordering::Relaxed), 3 * round);
        }
    }

    #[test]
    fn spinning_keeps_looking_past_the_first_spins_and_gives_up_after_spin() {
        // Ready on the 66th look: past the 64 busy spins, in the yielding
        // phase. However slow the machine, the look after the last yield
        // still comes, so this holds without a clock.
        let mut looks = 0;
        assert!(spin_until(|| {
            looks += 1;
            looks == 66
        }));
        assert_eq!(looks, 66);
        // Never ready: it gives up, and not before SPIN.
        let t = Instant::now();
        assert!(!spin_until(|| false));
        assert!(t.elapsed() >= SPIN);
    }

    #[test]
    fn dropping_the_pool_ends_its_threads() {
        let pool = Pool::new("t", 3);
        let control = Arc::downgrade(&pool.control);
        drop(pool);
        // Each thread held the control block until it returned.
        assert!(control.upgrade().is_none(), "a worker thread outlived its pool");
    }

    #[test]
    fn a_panicking_job_neither_hangs_the_caller_nor_kills_the_pool() {
        let mut pool = Pool::new("t", 2);
        let n = AtomicUsize::new(0);
        let bad = |w: usize| {
            if w == 1 {
                panic!("worker 1 fails");
            }
            n.fetch_add(1, Ordering::Relaxed);
        };
        pool.run(&bad);
        let good = |_: usize| {
            n.fetch_add(1, Ordering::Relaxed);
        };
        pool.run(&good);
        assert_eq!(n.load(Ordering::Relaxed), 2 + 3);
    }
}
