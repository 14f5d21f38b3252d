//! Whether a `dag` net runs on its pool or inline (all ops in net order on the
//! calling thread), decided by timing both.
//!
//! A small net can lose more to hand-offs between threads than it gains from
//! them, and which way it goes depends on the machine's state as much as on
//! the net: on a virtual machine whose second core is busy elsewhere, a pool's
//! hand-offs cost several times what they cost on an idle one. So the choice is
//! measured, and measured again [`WINDOW`] runs after each decision; while
//! the decisions agree, the gap doubles up to [`MAX_WINDOW`] runs, as each
//! measurement costs the runs it makes the slower way. Both ways give the same
//! bits.

use std::sync::Mutex;
use std::time::Duration;

/// Runs before the first measurement (the first allocate and warm up).
const START: u64 = 2;
/// A block, runs in a row measured one way, has at least this many runs and
/// lasts at least [`BLOCK_TIME`]: the first pool runs after inline ones find
/// their workers asleep, and waking them is not what later runs pay.
const BLOCK: u64 = 3;
const BLOCK_TIME: Duration = Duration::from_micros(500);
/// Blocks of each way at most per measurement (they alternate, pool first).
const BLOCKS: u64 = 2;
/// Runs from a decision to the next measurement, when the last two decisions
/// differed (or after the first)...
pub(super) const WINDOW: u64 = 512;
/// ... and at most, after decisions that agreed: a choice made while the
/// machine was in a bad phase (the VM's cores slow to hand a line over) is
/// looked at again within a few thousand runs.
pub(super) const MAX_WINDOW: u64 = 4 * WINDOW;
/// Pool runs whose ops take this long each (time × workers / ops) make
/// hand-offs (µs) irrelevant: the pool is kept without timing inline runs,
/// which for such a net would each cost up to `workers` times a pool run.
const LONG_OPS: Duration = Duration::from_micros(100);

/// How to run a net's run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Choice {
    Inline,
    Pool,
    /// Measure this run (inline or not) and [`Tuner::record`] its time.
    Measure {
        inline: bool,
    },
}

#[derive(Default)]
struct State {
    /// The run the next measurement starts at (once `decided`).
    next: u64,
    /// Runs from the last decision to `next`.
    window: u64,
    /// The last run chosen for.
    run: u64,
    /// The decision before the current measurement's, if any.
    last: Option<bool>,
    inline: Vec<Duration>,
    pool: Vec<Duration>,
    /// Blocks finished in this measurement (even: pool's turn).
    blocks: u64,
    /// Runs and time of the current block.
    block_runs: u64,
    block_time: Duration,
    /// Whether this window's measurement has decided.
    decided: bool,
    inline_wins: bool,
}

/// The choice for one net; `enabled = false` keeps the pool on every run.
pub(super) struct Tuner {
    enabled: bool,
    /// Ops per worker of the net: a run's time over this is its time per op.
    ops_per_worker: f64,
    /// Whether a measurement found the ops long (see [`LONG_OPS`]).
    long_ops: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
}

impl Tuner {
    /// The tuner of a net of `ops` ops for a pool of `workers` workers.
    pub(super) fn new(enabled: bool, ops: usize, workers: usize) -> Tuner {
        Tuner {
            enabled,
            ops_per_worker: ops as f64 / workers.max(1) as f64,
            long_ops: Default::default(),
            state: Mutex::new(State {
                // Until the first measurement decides, the pool.
                decided: true,
                next: START,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How to run run number `run` (from 0) of the net.
    pub(super) fn choose(&self, run: u64) -> Choice {
        if !self.enabled || run < START {
            return Choice::Pool;
        }
        let mut s = self.lock();
        s.run = s.run.max(run);
        if s.decided && run >= s.next {
            // A new measurement (it times both ways, whatever the last chose).
            let last = (s.next > START).then_some(s.inline_wins);
            *s = State {
                window: s.window,
                run: s.run,
                last,
                ..State::default()
            };
        }
        match (s.decided, s.inline_wins) {
            (true, true) => Choice::Inline,
            (true, false) => Choice::Pool,
            (false, _) => Choice::Measure {
                inline: s.blocks % 2 == 1,
            },
        }
    }

    /// Whether the last measurement found ops so long that hand-offs between
    /// threads cost nothing next to them (then the pool's queue, which
    /// balances the workers as they go, beats a fixed order).
    pub(super) fn long_ops(&self) -> bool {
        self.long_ops.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The time a measured run took.
    pub(super) fn record(&self, inline: bool, took: Duration) {
        let mut s = self.lock();
        // A run measured for a block that has ended (runs from two threads).
        if s.decided || inline != (s.blocks % 2 == 1) {
            return;
        }
        if inline {
            s.inline.push(took)
        } else {
            s.pool.push(took)
        }
        s.block_runs += 1;
        s.block_time += took;
        if s.block_runs < BLOCK || s.block_time < BLOCK_TIME {
            return;
        }
        s.blocks += 1;
        (s.block_runs, s.block_time) = (0, Duration::ZERO);
        let median = |v: &[Duration]| {
            let mut v = v.to_vec();
            v.sort();
            v[v.len() / 2].as_secs_f64()
        };
        let p = median(&s.pool);
        let decision = if s.blocks == 1 {
            // The pool's first block: long ops keep it.
            let long = p / self.ops_per_worker.max(1.0) >= LONG_OPS.as_secs_f64();
            self.long_ops.store(long, std::sync::atomic::Ordering::Relaxed);
            long.then_some(false)
        } else if s.blocks.is_multiple_of(2) {
            let i = median(&s.inline);
            // A clear difference (1.5×) decides after one block of each.
            let clear = i > 1.5 * p || p > 1.5 * i;
            (clear || s.blocks == 2 * BLOCKS).then_some(i < p)
        } else {
            None
        };
        if let Some(inline_wins) = decision {
            s.decided = true;
            s.inline_wins = inline_wins;
            s.window = match s.last {
                Some(last) if last == inline_wins => (2 * s.window).min(MAX_WINDOW),
                _ => WINDOW,
            };
            s.next = s.run + 1 + s.window;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `t` over `runs`, a measured run taking `us(inline)` µs; the
    /// choices made.
    fn drive_with(t: &Tuner, runs: std::ops::Range<u64>, mut us: impl FnMut(bool) -> u64) -> Vec<Choice> {
        runs.map(|r| {
            let c = t.choose(r);
            if let Choice::Measure { inline } = c {
                t.record(inline, Duration::from_micros(us(inline)));
            }
            c
        })
        .collect()
    }

    /// [`drive_with`] inline runs taking `inline` µs, pool runs `pool` µs.
    fn drive(t: &Tuner, runs: std::ops::Range<u64>, inline: u64, pool: u64) -> Vec<Choice> {
        drive_with(t, runs, |i| if i { inline } else { pool })
    }

    fn count(c: &[Choice], x: Choice) -> usize {
        c.iter().filter(|&&y| y == x).count()
    }

    #[test]
    fn a_clear_winner_is_chosen_after_one_block_of_each() {
        let t = Tuner::new(true, 10, 2);
        let c = drive(&t, 0..200, 50, 200);
        assert_eq!(&c[..2], [Choice::Pool; 2], "warm-up runs use the pool");
        // Blocks last 500 µs: 3 pool runs (600 µs), then 10 inline ones.
        assert_eq!(&c[2..5], [Choice::Measure { inline: false }; 3]);
        assert_eq!(&c[5..15], [Choice::Measure { inline: true }; 10]);
        assert!(c[15..].iter().all(|&c| c == Choice::Inline), "{c:?}");
        let t = Tuner::new(true, 10, 2);
        let c = drive(&t, 0..200, 200, 50);
        assert_eq!(count(&c, Choice::Measure { inline: true }), 3);
        assert!(c[15..].iter().all(|&c| c == Choice::Pool));
    }

    #[test]
    fn short_runs_are_measured_in_blocks_long_enough_to_warm_up() {
        // 10 µs runs: 50 a block; a close call takes two blocks of each.
        let t = Tuner::new(true, 10, 2);
        let c = drive(&t, 0..400, 11, 10);
        assert_eq!(count(&c, Choice::Measure { inline: false }), 100);
        assert_eq!(count(&c, Choice::Measure { inline: true }), 92);
        assert!(c[250..].iter().all(|&c| c == Choice::Pool));
    }

    #[test]
    fn slow_first_runs_of_a_block_do_not_decide() {
        // Each pool block starts with 3 runs at 5× (its workers waking up).
        let t = Tuner::new(true, 10, 2);
        let mut since_inline = 0;
        let c = drive_with(&t, 0..400, |inline| {
            if inline {
                since_inline = 0;
                12
            } else {
                since_inline += 1;
                if since_inline <= 3 {
                    50
                } else {
                    10
                }
            }
        });
        assert!(c[300..].iter().all(|&c| c == Choice::Pool), "{c:?}");
    }

    #[test]
    fn a_few_lucky_runs_do_not_decide() {
        // The pool usually takes 30 µs and now and then 5; inline 20: the
        // medians, not the best runs, decide.
        let t = Tuner::new(true, 10, 2);
        let mut k = 0;
        let c = drive_with(&t, 0..400, |inline| {
            k += 1;
            match inline {
                true => 20,
                false if k % 4 == 0 => 5,
                false => 30,
            }
        });
        assert!(c[200..].iter().all(|&c| c == Choice::Inline), "{c:?}");
    }

    #[test]
    fn times_of_runs_from_another_thread_that_ended_their_block_are_ignored() {
        // Another thread's inline run, recorded while the pool's block is
        // being timed (and after the choice), must not count.
        let t = Tuner::new(true, 10, 2);
        let c: Vec<Choice> = (0..400)
            .map(|r| {
                let c = t.choose(r);
                if let Choice::Measure { inline } = c {
                    t.record(inline, Duration::from_micros(if inline { 50 } else { 10 }));
                    if !inline {
                        t.record(true, Duration::from_micros(1));
                    }
                } else {
                    t.record(true, Duration::from_micros(1));
                }
                c
            })
            .collect();
        assert!(c[100..].iter().all(|&c| c == Choice::Pool), "{c:?}");
    }

    /// `(first run, runs)` of each measurement in `c` (runs from 0).
    fn measurements(c: &[Choice]) -> Vec<(usize, usize)> {
        let mut m: Vec<(usize, usize)> = Vec::new();
        for (r, x) in c.iter().enumerate() {
            if let Choice::Measure { .. } = x {
                match m.last_mut() {
                    Some((first, n)) if *first + *n == r => *n += 1,
                    _ => m.push((r, 1)),
                }
            }
        }
        m
    }

    /// Runs between the end of each measurement and the start of the next.
    fn gaps(m: &[(usize, usize)]) -> Vec<usize> {
        m.windows(2).map(|w| w[1].0 - (w[0].0 + w[0].1)).collect()
    }

    #[test]
    fn the_choice_is_measured_again_and_less_often_while_it_holds() {
        let t = Tuner::new(true, 10, 2);
        let c = drive(&t, 0..20_000, 50, 200);
        let m = measurements(&c);
        assert_eq!(m[0].0, START as usize);
        let w = WINDOW as usize;
        assert_eq!(gaps(&m)[..6], [w, 2 * w, 4 * w, 4 * w, 4 * w, 4 * w]);
        assert!(c[m[0].0 + m[0].1..].iter().all(|&x| x != Choice::Pool));
        // The machine changes: the pool wins from the fourth measurement on.
        // That one sees it, and the next comes a window later again.
        let t = Tuner::new(true, 10, 2);
        let flip = {
            let c = drive(&t, 0..20_000, 50, 200);
            measurements(&c)[3].0 as u64
        };
        let t = Tuner::new(true, 10, 2);
        let mut c = drive(&t, 0..flip, 50, 200);
        c.extend(drive(&t, flip..20_000, 200, 50));
        let m = measurements(&c);
        assert_eq!(m[3].0 as u64, flip);
        assert_eq!(gaps(&m)[..5], [w, 2 * w, 4 * w, w, 2 * w]);
        assert_eq!(c[flip as usize - 1], Choice::Inline);
        assert!(c[m[3].0 + m[3].1..m[4].0].iter().all(|&x| x == Choice::Pool));
    }

    #[test]
    fn a_net_of_long_ops_keeps_the_pool_without_timing_inline_runs() {
        // 10 ops on 2 workers, 1 ms a run: 200 µs per op.
        let t = Tuner::new(true, 10, 2);
        assert!(!t.long_ops(), "unknown until measured");
        let c = drive(&t, 0..2000, 1000, 1000);
        assert_eq!(
            count(&c, Choice::Measure { inline: true }) + count(&c, Choice::Inline),
            0
        );
        assert!(t.long_ops());
        // 40 µs per op: measured.
        let t = Tuner::new(true, 10, 2);
        let c = drive(&t, 0..40, 150, 200);
        assert_eq!(c[5], Choice::Measure { inline: true });
        assert_eq!(c[39], Choice::Inline);
        assert!(!t.long_ops());
    }

    #[test]
    fn without_tuning_every_run_uses_the_pool() {
        let t = Tuner::new(false, 10, 2);
        assert!(drive(&t, 0..3000, 1, 100).iter().all(|&c| c == Choice::Pool));
    }
}
