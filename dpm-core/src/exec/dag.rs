//! The DAG executor: ops run as soon as the ops they depend on are done, on the
//! net's pool of worker threads (`pool.rs`: kept between runs, awake for a
//! while when idle). The first error stops new work; every worker has left
//! the run before it returns, failed or not.
//!
//! Each worker prefers the ops of "its" replicas (lane `l` belongs to worker
//! `l mod workers`), takes collectives and unscoped ops next, and the other
//! replicas' ops only when none of those is ready. With one worker per replica,
//! as CPU replicas get by default (whose nets come here when their ops are
//! long; short ones go to `lanes.rs`), each replica's chain of ops then stays on one
//! thread, and a worker never runs another replica's op while its own replica
//! has one ready: the replicas advance together, and neither waits at the
//! all-reduces for the other to catch up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::plan::Plan;
use super::pool::{spin_until, Pool};
use super::profile::Profile;
use crate::error::Result;

struct State {
    /// Ready ops of each lane (`Step::lane`), then (last) those of none.
    ready: Vec<VecDeque<usize>>,
    done: usize,
    error: Option<crate::error::Error>,
    /// Workers asleep on `Shared::wake`.
    sleepers: usize,
}

impl State {
    fn push(&mut self, plan: &Plan, i: usize) {
        let shared = self.ready.len() - 1;
        self.ready[plan.steps[i].lane.unwrap_or(shared)].push_back(i);
    }

    fn queued(&self) -> usize {
        self.ready.iter().map(VecDeque::len).sum()
    }

    /// Worker `w`'s next op: its own lanes' first, then the shared ones, then
    /// any other lane's.
    fn pop(&mut self, w: usize, workers: usize) -> Option<usize> {
        let shared = self.ready.len() - 1;
        (w..shared)
            .step_by(workers)
            .chain([shared])
            .chain(0..shared)
            .find_map(|l| self.ready[l].pop_front())
    }
}

struct Shared<'p> {
    plan: &'p Plan,
    threads: usize,
    profile: Option<&'p Profile>,
    pending: Vec<AtomicUsize>,
    state: Mutex<State>,
    signals: Signals,
    wake: Condvar,
}

/// What an idle worker spins on before it sleeps on `Shared::wake`: the ops
/// queued in `State::ready`, and whether the run is over (all done or
/// failed). On a cache line of their own, so that the spinning does not slow
/// the working threads' locking of `Shared::state`.
#[repr(align(128))]
struct Signals {
    queued: AtomicUsize,
    over: AtomicBool,
}

impl Signals {
    /// Stored only when it changes: each store takes the line from spinners.
    fn set_queued(&self, n: usize) {
        if self.queued.load(Ordering::Relaxed) != n {
            self.queued.store(n, Ordering::Release);
        }
    }
}

impl Shared<'_> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether worker `w` keeps op `i` for itself rather than queueing it.
    fn mine(&self, w: usize, workers: usize, i: usize) -> bool {
        self.plan.steps[i].lane.is_none_or(|l| l % workers == w)
    }

    /// Wakes a sleeping worker, if any, after ops were queued or the run ended.
    fn publish(&self, st: &State) {
        let queued = st.queued();
        self.signals.set_queued(queued);
        if st.error.is_some() || st.done == self.plan.steps.len() {
            self.signals.over.store(true, Ordering::Release);
            if st.sleepers > 0 {
                self.wake.notify_all();
            }
        } else if st.sleepers > 0 && queued > 0 {
            self.wake.notify_one();
        }
    }

    /// The next op for worker `w`; `None` when the run is over.
    fn next(&self, w: usize, workers: usize) -> Option<usize> {
        let n = self.plan.steps.len();
        loop {
            let mut st = self.lock();
            if st.error.is_some() || st.done == n {
                return None;
            }
            if let Some(i) = st.pop(w, workers) {
                self.signals.set_queued(st.queued());
                return Some(i);
            }
            drop(st);
            let sig = &self.signals;
            let busy = || sig.queued.load(Ordering::Acquire) > 0 || sig.over.load(Ordering::Acquire);
            if !spin_until(busy) {
                let mut st = self.lock();
                while st.queued() == 0 && st.error.is_none() && st.done < n {
                    st.sleepers += 1;
                    st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                    st.sleepers -= 1;
                }
            }
        }
    }

    fn worker(&self, w: usize, workers: usize) {
        let mut next: Option<usize> = None;
        loop {
            let Some(idx) = next.take().or_else(|| self.next(w, workers)) else {
                return;
            };
            let result = self.plan.steps[idx].run(self.threads, self.profile);
            let mut st = self.lock();
            if let Err(e) = result {
                st.error.get_or_insert(e);
                self.publish(&st);
                return;
            }
            st.done += 1;
            for &d in &self.plan.dependents[idx] {
                if self.pending[d].fetch_sub(1, Ordering::AcqRel) == 1 {
                    // Keep the first ready op of this worker's for itself: no
                    // hand-off, no wake-up.
                    if next.is_none() && self.mine(w, workers, d) {
                        next = Some(d);
                    } else {
                        st.push(self.plan, d);
                    }
                }
            }
            self.publish(&st);
            if st.error.is_some() {
                return;
            }
        }
    }
}

/// Runs `plan` on `pool`'s workers.
pub(super) fn run(plan: &Plan, pool: &mut Pool, threads: usize, profile: Option<&Profile>) -> Result<()> {
    let n = plan.steps.len();
    if n == 0 {
        return Ok(());
    }
    let mut state = State {
        ready: vec![VecDeque::new(); plan.lanes + 1],
        done: 0,
        error: None,
        sleepers: 0,
    };
    for i in (0..n).filter(|&i| plan.num_deps[i] == 0) {
        state.push(plan, i);
    }
    let shared = Shared {
        plan,
        threads,
        profile,
        pending: plan.num_deps.iter().map(|&d| AtomicUsize::new(d)).collect(),
        signals: Signals {
            queued: AtomicUsize::new(state.queued()),
            over: AtomicBool::new(false),
        },
        state: Mutex::new(state),
        wake: Condvar::new(),
    };
    let workers = pool.workers();
    pool.run(&|w| shared.worker(w, workers));
    match shared.state.into_inner().unwrap_or_else(|e| e.into_inner()).error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(lanes: usize, queued: &[(usize, usize)]) -> State {
        let mut s = State {
            ready: vec![VecDeque::new(); lanes + 1],
            done: 0,
            error: None,
            sleepers: 0,
        };
        for &(lane, op) in queued {
            s.ready[lane].push_back(op);
        }
        s
    }

    #[test]
    fn a_worker_takes_its_replicas_ops_then_shared_ones_then_the_others() {
        // Lanes 0 and 1 (ops 10, 11 and 20), shared (op 30), two workers.
        let mut s = state(2, &[(0, 10), (0, 11), (1, 20), (2, 30)]);
        assert_eq!(s.pop(1, 2), Some(20));
        assert_eq!(s.pop(1, 2), Some(30));
        assert_eq!(s.pop(1, 2), Some(10), "an idle worker takes another lane's op");
        assert_eq!(s.pop(0, 2), Some(11));
        assert_eq!(s.pop(0, 2), None);
        // Four lanes on two workers: worker 1 owns lanes 1 and 3.
        let mut s = state(4, &[(0, 1), (2, 2), (3, 3), (4, 4)]);
        assert_eq!(s.pop(1, 2), Some(3));
        assert_eq!(s.pop(1, 2), Some(4));
        assert_eq!(s.pop(0, 2), Some(1));
        assert_eq!(s.pop(0, 2), Some(2));
    }
}
