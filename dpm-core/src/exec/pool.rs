//! Worker threads kept between runs of a `dag` net.
//!
//! Starting threads for every run costs tens of µs, and waking a sleeping one
//! several µs: more than a whole op of a small net. A net's pool therefore
//! keeps its threads, and an idle one spins for a short while ([`SPIN`])
//! before it sleeps, so that the runs of a training loop, and the hand-offs
//! within a run, find their workers awake. The waits yield the core while they
//! spin, so a machine with more threads than cores still makes progress.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    /// The last job posted: called only by workers that saw `epoch` move
    /// past the run before it, so a stale pointer is never called.
    job: Option<JobRef>,
    shutdown: bool,
}

/// The handshake of a run: the caller posts the job and bumps `epoch`; each
/// helper counts itself out of `remaining`. The locks are taken only to read
/// the job and around sleeping, not to finish a run: each cache line handed
/// between cores costs a small net's run about a tenth of a µs.
struct Control {
    slot: Mutex<Slot>,
    /// Bumped when a job (or the shutdown) is posted: what spinning workers watch.
    epoch: Line<AtomicU64>,
    /// Workers yet to finish the current job: what the spinning caller watches.
    remaining: Line<AtomicUsize>,
    /// Workers asleep on `wake` (counted under `slot`).
    sleepers: AtomicUsize,
    /// Whether the caller of `run` sleeps on `done` (set under `slot`).
    caller_asleep: AtomicBool,
    /// The CPU the caller posted the current job from (see [`leave_cpu`]).
    caller_cpu: AtomicUsize,
    wake: Condvar,
    done: Condvar,
}

/// A value on cache lines of its own: a thread spinning on one line does not
/// slow the writes to another.
#[repr(align(128))]
struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    // Sleeping and waking pair up as in Dekker's algorithm: the sleeper
    // counts itself (SeqCst) under the lock and then checks; the waker
    // publishes (SeqCst) and then checks for sleepers, and takes the lock to
    // notify. One of the two sees the other.

    fn worker(&self, w: usize) {
        let mut seen = 0;
        loop {
            if !spin_until(|| self.epoch.load(Ordering::Acquire) != seen) {
                let mut slot = self.lock();
                self.sleepers.fetch_add(1, Ordering::SeqCst);
                while self.epoch.load(Ordering::SeqCst) == seen {
                    slot = self.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
                }
                self.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
            let (job, shutdown) = {
                let slot = self.lock();
                seen = self.epoch.load(Ordering::Acquire);
                (slot.job, slot.shutdown)
            };
            if shutdown {
                return;
            }
            let cpu = self.caller_cpu.load(Ordering::Relaxed);
            if cpu != NO_CPU && current_cpu() == Some(cpu) {
                leave_cpu(cpu);
            }
            if let Some(JobRef(job)) = job {
                // SAFETY: `run` posted this pointer and waits until `remaining`
                // is 0, which this worker signals only after its last use.
                // The job catches its own panics; this catch keeps the count
                // right should one escape.
                let _ = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(w) }));
            }
            if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1 && self.caller_asleep.load(Ordering::SeqCst)
            {
                drop(self.lock());
                self.done.notify_one();
            }
        }
    }
}

/// No CPU known.
const NO_CPU: usize = usize::MAX;

/// The CPU this thread runs on, where the OS says.
fn current_cpu() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: no arguments, no memory touched; -1 on failure.
        let cpu = unsafe { libc::sched_getcpu() };
        usize::try_from(cpu).ok()
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Moves this thread off `cpu`, which the job's caller runs on, if it may
/// run elsewhere. A helper woken by the caller is often put on the caller's
/// CPU (the scheduler's wake-affine placement), and the balancer may take
/// milliseconds to part them: meanwhile the two take turns on one core, and a
/// small net's run takes 4× as long (24 µs instead of 6 for the README's MLP
/// on 2 devices, measured). Excluding `cpu` from this thread's CPUs moves it
/// at once; the CPUs it was allowed are then restored, so a user's or a
/// launcher's pinning stands.
fn leave_cpu(cpu: usize) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `cpu_set_t` is plain data (all zeros is the empty set);
        // the calls read or write exactly one set of `size_of` bytes, for
        // this thread (pid 0); CPU_* index below CPU_SETSIZE, checked.
        unsafe {
            let mut allowed: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            if cpu >= libc::CPU_SETSIZE as usize
                || libc::sched_getaffinity(0, size, &mut allowed) != 0
                || libc::CPU_COUNT(&allowed) < 2
                || !libc::CPU_ISSET(cpu, &allowed)
            {
                return;
            }
            let mut elsewhere = allowed;
            libc::CPU_CLR(cpu, &mut elsewhere);
            if libc::sched_setaffinity(0, size, &elsewhere) == 0 {
                libc::sched_setaffinity(0, size, &allowed);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
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
                shutdown: false,
            }),
            epoch: Line(AtomicU64::new(0)),
            remaining: Line(AtomicUsize::new(0)),
            sleepers: AtomicUsize::new(0),
            caller_asleep: AtomicBool::new(false),
            caller_cpu: AtomicUsize::new(NO_CPU),
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
        c.lock().job = Some(JobRef(erased));
        c.caller_cpu
            .store(current_cpu().unwrap_or(NO_CPU), Ordering::Relaxed);
        c.remaining.store(self.threads.len(), Ordering::SeqCst);
        c.epoch.fetch_add(1, Ordering::SeqCst);
        if c.sleepers.load(Ordering::SeqCst) > 0 {
            drop(c.lock());
            c.wake.notify_all();
        }
        struct Wait<'a>(&'a Control);
        impl Drop for Wait<'_> {
            fn drop(&mut self) {
                let c = self.0;
                if !spin_until(|| c.remaining.load(Ordering::Acquire) == 0) {
                    let mut slot = c.lock();
                    c.caller_asleep.store(true, Ordering::SeqCst);
                    while c.remaining.load(Ordering::SeqCst) != 0 {
                        slot = c.done.wait(slot).unwrap_or_else(|e| e.into_inner());
                    }
                    c.caller_asleep.store(false, Ordering::SeqCst);
                }
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
            self.control.epoch.fetch_add(1, Ordering::SeqCst);
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
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut asleep: Option<Instant> = None;
            while asleep.is_none_or(|t| t.elapsed() < Duration::from_millis(5)) {
                let sleepers = pool.control.sleepers.load(Ordering::SeqCst);
                assert!(sleepers <= 2, "{sleepers} sleepers among 2 workers");
                if sleepers == 2 {
                    asleep.get_or_insert_with(Instant::now);
                }
                assert!(Instant::now() < deadline, "idle workers never slept");
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

    /// This thread's CPU set, and the CPUs in it.
    #[cfg(target_os = "linux")]
    fn affinity() -> (libc::cpu_set_t, Vec<usize>) {
        // SAFETY: as in `leave_cpu`: plain data, one set of `size_of` bytes,
        // indices below CPU_SETSIZE.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            assert_eq!(libc::sched_getaffinity(0, size, &mut set), 0);
            let cpus = (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect();
            (set, cpus)
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_helper_on_the_callers_cpu_moves_and_keeps_the_cpus_it_may_use() {
        let (set, before) = affinity();
        let here = current_cpu().expect("Linux says where a thread runs");
        assert!(before.contains(&here));
        leave_cpu(here);
        assert_eq!(affinity().1, before, "the thread's CPUs changed");
        // A sandbox may forbid setting affinity (then threads stay where the
        // OS puts them, and nothing here can move them).
        // SAFETY: sets this thread's CPUs to the set it already has.
        let settable =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } == 0;
        if before.len() >= 2 && settable {
            assert_ne!(current_cpu(), Some(here), "still on the caller's CPU");
        }
    }
}
