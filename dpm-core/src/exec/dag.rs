//! The DAG executor: ops run as soon as the ops they depend on are done, on a
//! pool of scoped worker threads. The first error stops new work; the pool is
//! joined before returning, so no worker outlives a failed run.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::plan::Plan;
use super::profile::Profile;
use crate::error::Result;

struct State {
    ready: VecDeque<usize>,
    done: usize,
    error: Option<crate::error::Error>,
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

    fn worker(&self) {
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
                        if let Some(i) = st.ready.pop_front() {
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
                    // Keep the first ready op for this thread: no hand-off, no wake-up.
                    if next.is_none() {
                        next = Some(d);
                    } else {
                        st.ready.push_back(d);
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
    let ready: VecDeque<usize> = (0..n).filter(|&i| plan.num_deps[i] == 0).collect();
    let shared = Shared {
        plan,
        threads,
        profile,
        pending: plan.num_deps.iter().map(|&d| AtomicUsize::new(d)).collect(),
        state: Mutex::new(State {
            ready,
            done: 0,
            error: None,
        }),
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
                .spawn_scoped(s, move || shared.worker())
                .map(|_| ())
                .unwrap_or_else(|_| shared.worker());
        }
        shared.worker();
    });
    match shared.state.into_inner().unwrap_or_else(|e| e.into_inner()).error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
