//! The `dag` executor's form for data-parallel nets of CPU replicas: each
//! worker runs its replicas' ops (lane `l` is worker `l mod workers`'s) and
//! its share of the collectives, in an order fixed when the net is compiled,
//! and waits only for the ops of other workers that it needs (the
//! collectives and their inputs). No queue and no lock is shared per op.
//!
//! The queue of `dag.rs` hands every ready op through one lock, and an idle
//! worker takes another replica's op when its own has none: for ops of a
//! fraction of a µs (a small MLP) the hand-offs and the stolen ops, whose data
//! then crosses cores, cost more than the ops. Here a replica's chain of ops
//! stays on one thread, and the workers meet only where the net makes them.
//!
//! A worker runs the first op of its list whose dependencies are done, not
//! only the next one: a collective still waiting for another replica does not
//! hold up the rest of its replica's backward pass.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use smallvec::SmallVec;

use super::plan::Plan;
use super::pool::{spin_until, Pool};
use super::profile::Profile;
use crate::error::{Error, Result};

/// Which worker runs each op, in which order: fixed per net.
pub(super) struct Schedule {
    /// Each worker's ops, in the order it prefers them.
    order: Vec<Vec<usize>>,
    /// The worker of each op, and its place in that worker's list.
    place: Vec<(usize, usize)>,
    /// The ops each op waits on.
    deps: Vec<Vec<usize>>,
    /// Ops that another worker waits on: they publish that they are done.
    published: Vec<bool>,
    /// The run that last finished each published op (see [`run`]'s `stamp`).
    done: Vec<AtomicU64>,
}

impl Schedule {
    /// The schedule of a net whose op `i` waits on `deps[i]` and belongs to
    /// replica `lanes[i]` (`None`: a collective or unscoped op), for
    /// `workers` workers (at least 1). Replica `l` goes to worker
    /// `l mod workers`; the other ops go round the workers in net order.
    /// Each worker's list is ordered by the op's level (the longest chain of
    /// dependencies before it; then by net order): a topological order that
    /// puts a gradient's all-reduce right after the gradient, not after the
    /// whole backward pass where the net lists it.
    pub(super) fn new(deps: Vec<Vec<usize>>, lanes: &[Option<usize>], workers: usize) -> Schedule {
        let workers = workers.max(1);
        let mut level = vec![0usize; deps.len()];
        for (i, ds) in deps.iter().enumerate() {
            level[i] = ds.iter().map(|&d| level[d] + 1).max().unwrap_or(0);
        }
        let mut shared = 0;
        let worker_of: Vec<usize> = lanes
            .iter()
            .map(|l| match l {
                Some(l) => l % workers,
                None => {
                    shared += 1;
                    (shared - 1) % workers
                }
            })
            .collect();
        let mut order = vec![Vec::new(); workers];
        for (i, &w) in worker_of.iter().enumerate() {
            order[w].push(i);
        }
        for list in &mut order {
            list.sort_by_key(|&i| (level[i], i));
        }
        let mut place = vec![(0, 0); deps.len()];
        for (w, list) in order.iter().enumerate() {
            for (k, &i) in list.iter().enumerate() {
                place[i] = (w, k);
            }
        }
        let mut published = vec![false; deps.len()];
        for (i, ds) in deps.iter().enumerate() {
            for &d in ds {
                if worker_of[d] != worker_of[i] {
                    published[d] = true;
                }
            }
        }
        Schedule {
            order,
            place,
            done: (0..deps.len()).map(|_| AtomicU64::new(0)).collect(),
            deps,
            published,
        }
    }
}

impl Schedule {
    /// The workers it is for.
    pub(super) fn workers(&self) -> usize {
        self.order.len()
    }
}

/// What the workers of one run share: how far the others got, and the first
/// error.
struct Shared<'p> {
    plan: &'p Plan,
    sched: &'p Schedule,
    threads: usize,
    profile: Option<&'p Profile>,
    /// This run's mark in `Schedule::done`.
    stamp: u64,
    progress: Progress,
    error: Mutex<Option<Error>>,
}

/// How far a run got, for workers waiting on each other: a count bumped by
/// every published op and by a failure. A waiting worker spins on it, then
/// sleeps until it moves.
struct Progress {
    hot: Hot,
    /// Workers asleep on `wake` (counted under `sleep`).
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

/// What waiting workers spin on, on a cache line of its own.
#[repr(align(128))]
struct Hot {
    count: AtomicU64,
    failed: AtomicBool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            hot: Hot {
                count: AtomicU64::new(0),
                failed: AtomicBool::new(false),
            },
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// The count now, to wait past.
    fn now(&self) -> u64 {
        self.hot.count.load(Ordering::Acquire)
    }

    fn failed(&self) -> bool {
        self.hot.failed.load(Ordering::Acquire)
    }

    /// Tells waiting workers that something they may wait for happened.
    fn bump(&self) {
        self.hot.count.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            // Taken so that a worker between its check and its sleep gets the
            // notification (it checks with the lock held).
            drop(self.sleep.lock().unwrap_or_else(|e| e.into_inner()));
            self.wake.notify_all();
        }
    }

    /// Marks the run failed, which ends every wait.
    fn fail(&self) {
        self.hot.failed.store(true, Ordering::SeqCst);
        self.bump();
    }

    /// Waits until the count moves past `seen` or the run failed.
    fn wait(&self, seen: u64) {
        let h = &self.hot;
        let moved = || h.count.load(Ordering::Acquire) != seen || h.failed.load(Ordering::Acquire);
        if spin_until(moved) {
            return;
        }
        let mut g = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        while h.count.load(Ordering::SeqCst) == seen && !h.failed.load(Ordering::SeqCst) {
            g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared<'_> {
    fn fail(&self, e: Error) {
        self.error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e);
        self.progress.fail();
    }

    fn worker(&self, w: usize) {
        let Some(list) = self.sched.order.get(w) else {
            return;
        };
        // Which of this worker's ops ran in this run, as bits.
        let mut ran: SmallVec<[u64; 8]> = SmallVec::from_elem(0, list.len().div_ceil(64));
        let has_run = |ran: &[u64], k: usize| ran[k / 64] >> (k % 64) & 1 == 1;
        let sched = self.sched;
        let ready = |ran: &[u64], i: usize| {
            sched.deps[i].iter().all(|&d| match sched.place[d] {
                (dw, k) if dw == w => has_run(ran, k),
                _ => sched.done[d].load(Ordering::Acquire) == self.stamp,
            })
        };
        // The first op not run yet: those before it all ran.
        let mut first = 0;
        while first < list.len() {
            let seen = self.progress.now();
            if self.progress.failed() {
                return;
            }
            let Some(k) = (first..list.len()).find(|&k| !has_run(&ran, k) && ready(&ran, list[k])) else {
                self.progress.wait(seen);
                continue;
            };
            let i = list[k];
            if let Err(e) = self.plan.steps[i].run(self.threads, self.profile) {
                self.fail(e);
                return;
            }
            ran[k / 64] |= 1 << (k % 64);
            if sched.published[i] {
                sched.done[i].store(self.stamp, Ordering::Release);
                self.progress.bump();
            }
            while first < list.len() && has_run(&ran, first) {
                first += 1;
            }
        }
    }
}

/// Runs `plan` by `sched` on `pool`'s workers; `stamp` is unique to this run
/// of the plan and never 0.
pub(super) fn run(
    plan: &Plan,
    sched: &Schedule,
    pool: &mut Pool,
    threads: usize,
    profile: Option<&Profile>,
    stamp: u64,
) -> Result<()> {
    debug_assert!(stamp != 0, "0 is what `done` starts at");
    let shared = Shared {
        plan,
        sched,
        threads,
        profile,
        stamp,
        progress: Progress::new(),
        error: Mutex::new(None),
    };
    pool.run(&|w| shared.worker(w));
    match shared.error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_stay_on_their_worker_and_collectives_follow_their_inputs() {
        // Two replicas of a chain a -> b -> c, then a collective over both b's
        // (listed last, as the trainer emits them) and updates on each side.
        //   0: a0  1: b0  2: c0  3: a1  4: b1  5: c1  6: AR(1, 4)  7: u0(6)  8: u1(6)
        let deps = vec![
            vec![],
            vec![0],
            vec![1],
            vec![],
            vec![3],
            vec![4],
            vec![1, 4],
            vec![6],
            vec![6],
        ];
        let lanes = [
            Some(0),
            Some(0),
            Some(0),
            Some(1),
            Some(1),
            Some(1),
            None,
            Some(0),
            Some(1),
        ];
        let s = Schedule::new(deps, &lanes, 2);
        // The all-reduce comes right after b (same level as c), before u0.
        assert_eq!(s.order, vec![vec![0, 1, 2, 6, 7], vec![3, 4, 5, 8]]);
        assert_eq!(s.place[8], (1, 3));
        // b1 and the all-reduce are what another worker waits on.
        let published: Vec<usize> = (0..9).filter(|&i| s.published[i]).collect();
        assert_eq!(published, vec![4, 6]);
        // Four replicas on two workers: worker 1 owns replicas 1 and 3.
        let s = Schedule::new(vec![vec![]; 4], &[Some(0), Some(1), Some(2), Some(3)], 2);
        assert_eq!(s.order, vec![vec![0, 2], vec![1, 3]]);
    }

    #[test]
    fn a_waiter_returns_once_progress_moves_and_sleeps_until_then() {
        use std::time::{Duration, Instant};
        let p = Progress::new();
        p.bump();
        p.wait(0); // moved already: returns at once
        for end in [Progress::bump, Progress::fail] {
            std::thread::scope(|s| {
                let seen = p.now();
                let p = &p;
                let waiter = s.spawn(move || p.wait(seen));
                // It sleeps once it has spun for SPIN (later on a busy machine).
                let deadline = Instant::now() + Duration::from_secs(60);
                while p.sleepers.load(Ordering::SeqCst) == 0 {
                    assert!(Instant::now() < deadline, "the waiter never slept");
                    std::thread::sleep(super::super::pool::SPIN);
                }
                assert!(!waiter.is_finished(), "it returned before the count moved");
                end(p);
                waiter.join().expect("the waiter");
            });
            assert_eq!(p.sleepers.load(Ordering::SeqCst), 0);
        }
        assert!(p.failed());
    }
}
