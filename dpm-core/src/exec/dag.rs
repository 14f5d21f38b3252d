//! The DAG executor: ops run as soon as the ops they depend on are done, on a
//! pool of scoped worker threads. The first error stops new work; the pool is
//! joined before returning, so no worker outlives a failed run.
//!
//! Each worker prefers the ops of "its" replicas (lane `l` belongs to worker
//! `l mod workers`), takes collectives and unscoped ops next, and the other
//! replicas' ops only when none of those is ready. With one worker per replica,
//! as CPU replicas get by default, each replica's chain of ops then stays on one
//! thread, and a worker never runs another replica's op while its own replica
//! has one ready: the replicas advance together, and neither waits at the
//! all-reduces for the other to catch up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::plan::Plan;
use super::profile::Profile;
use crate::error::Result;

struct State {
    /// Ready ops of each lane (`Step::lane`), then (last) those of none.
    ready: Vec<VecDeque<usize>>,
    done: usize,
    error: Option<crate::error::Error>,
}

impl State {
    fn push(&mut self, plan: &Plan, i: usize) {
        let shared = self.ready.len() - 1;
        self.ready[plan.steps[i].lane.unwrap_or(shared)].push_back(i);
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
    wake: Condvar,
}

impl Shared<'_> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether worker `w` keeps op `i` for itself rather than queueing it.
    fn mine(&self, w: usize, workers: usize, i: usize) -> bool {
        self.plan.steps[i].lane.is_none_or(|l| l % workers == w)
    }

    fn worker(&self, w: usize, workers: usize) {
        let n = self.plan.steps.len();
        let mut next: Option<usize> = None;
        loop {
            let idx = match next.take() {
                Some(i) => i,
                None => {
                    let mut st = self.lock();
                    loop {
                        if st.error.is_some() || st.done == n {
                            return;
                        }
                        if let Some(i) = st.pop(w, workers) {
                            break i;
                        }
                        st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                }
            };
            let result = self.plan.steps[idx].run(self.threads, self.profile);
            let mut st = self.lock();
            if let Err(e) = result {
                st.error.get_or_insert(e);
                self.wake.notify_all();
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
                        self.wake.notify_one();
                    }
                }
            }
            if st.done == n {
                self.wake.notify_all();
            }
            if st.error.is_some() {
                return;
            }
        }
    }
}

pub(super) fn run(plan: &Plan, workers: usize, threads: usize, profile: Option<&Profile>) -> Result<()> {
    let n = plan.steps.len();
    if n == 0 {
        return Ok(());
    }
    let mut state = State {
        ready: vec![VecDeque::new(); plan.lanes + 1],
        done: 0,
        error: None,
    };
    for i in (0..n).filter(|&i| plan.num_deps[i] == 0) {
        state.push(plan, i);
    }
    let shared = Shared {
        plan,
        threads,
        profile,
        pending: plan.num_deps.iter().map(|&d| AtomicUsize::new(d)).collect(),
        state: Mutex::new(state),
        wake: Condvar::new(),
    };
    let workers = workers.clamp(1, n);
    std::thread::scope(|s| {
        // The calling thread is worker 0: one thread fewer to start per run.
        for i in 1..workers {
            let shared = &shared;
            std::thread::Builder::new()
                // A NUL byte (legal in a net's name) would make spawn panic.
                .name(format!("dpm-{}-{i}", plan.name.replace('\0', "?")))
                .spawn_scoped(s, move || shared.worker(i, workers))
                .map(|_| ())
                .unwrap_or_else(|_| shared.worker(i, workers));
        }
        shared.worker(0, workers);
    });
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
