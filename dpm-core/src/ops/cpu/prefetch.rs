//! Software prefetch: data asked for before a loop reaches it, where the
//! hardware prefetcher cannot see it coming.
//!
//! The hardware prefetcher follows a stream within a 4 KiB page and ramps up
//! again at the next one, and a 32×32 plane of f32 is one page. So a kernel
//! that visits planes out of memory order (a batch norm gradient's channel
//! image after image), or reads the next block of images only after computing
//! on this one (a convolution), waits on memory at every plane. In a training
//! step its inputs were written long before and come from L3 or memory: the
//! same convolutions took 15–25% longer in ResNet-20's step than alone with
//! warm caches. These helpers ask for the lines early, into L2.
//!
//! A prefetch is a hint: it reads nothing the program sees and cannot fault,
//! whatever the address, so the helpers take plain addresses (a blob that an
//! output holds in place included) and never change a result.

/// Bytes per cache line.
const LINE: usize = 64;

/// The most lines an [`Ahead`] asks for in one step: more at once fill the
/// core's miss buffers and stall the step (a 1×1 stride-2 gradient, whose dW
/// makes two tile calls an image, measured 18% slower asking for an image in
/// two bursts). Where the steps are too few, the rest is left to the
/// hardware.
const MAX_BURST: usize = 32;

/// Asks for the line holding byte address `at`, into L2.
#[inline]
fn line(at: usize) {
    // SAFETY: SSE is part of x86-64, and a prefetch reads nothing the program
    // sees and cannot fault, whatever the address.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(at as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// The first line's address and the end of the `len` floats from `start`
/// (an empty span for no floats, wherever `start` lies in its line).
fn span(start: *const f32, len: usize) -> (usize, usize) {
    let at = start as usize;
    let first = if len == 0 { at } else { at / LINE * LINE };
    (first, at + len * size_of::<f32>())
}

/// The address of every line the `len` floats from `start` touch.
fn addresses(start: *const f32, len: usize) -> impl Iterator<Item = usize> {
    let (at, end) = span(start, len);
    (at..end).step_by(LINE)
}

/// Asks for every line of the `len` floats from `start`, into L2.
#[inline]
pub fn lines(start: *const f32, len: usize) {
    addresses(start, len).for_each(line);
}

/// The lines of a slice, asked for a few per [`Ahead::step`], spread evenly
/// over a known number of steps (at most [`MAX_BURST`] a step): a
/// convolution's next block of images arrives while the tiles of this one
/// compute, with no burst of requests that would stall a step.
pub struct Ahead {
    at: usize,
    end: usize,
    per_step: usize,
}

impl Ahead {
    /// `data`'s lines over `steps` steps.
    pub fn new(data: &[f32], steps: usize) -> Ahead {
        let (at, end) = span(data.as_ptr(), data.len());
        Ahead {
            at,
            end,
            per_step: (end - at).div_ceil(LINE).div_ceil(steps.max(1)).min(MAX_BURST),
        }
    }

    /// Asks for the next lines (none once all are asked for).
    #[inline]
    pub fn step(&mut self) {
        for _ in 0..self.per_step {
            if self.at >= self.end {
                return;
            }
            line(self.at);
            self.at += LINE;
        }
    }

    /// Lines not yet asked for.
    #[cfg(test)]
    fn left(&self) -> usize {
        self.end.saturating_sub(self.at).div_ceil(LINE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_every_line_a_run_of_floats_touches() {
        let data = vec![0.0f32; 64];
        let base = data.as_ptr() as usize;
        for (from, len) in [
            (0, 0),
            (0, 1),
            (0, 16),
            (0, 17),
            (1, 15),
            (1, 16),
            (15, 2),
            (3, 40),
        ] {
            let start = data[from..].as_ptr();
            let got: Vec<usize> = addresses(start, len).collect();
            let want: Vec<usize> = if len == 0 {
                Vec::new()
            } else {
                let first = (base + 4 * from) / LINE;
                let last = (base + 4 * (from + len) - 1) / LINE;
                (first..=last).map(|l| l * LINE).collect()
            };
            assert_eq!(got, want, "{len} floats from {from}");
        }
    }

    #[test]
    fn ahead_spreads_the_lines_evenly_and_asks_for_all_unless_steps_are_too_few() {
        let data = vec![0.0f32; 1001];
        // From an aligned start and from one 4 bytes into a line: 63 or 64 lines.
        for slice in [&data[..1000], &data[1..]] {
            let want = (slice.as_ptr() as usize % LINE + size_of_val(slice)).div_ceil(LINE);
            for steps in [1, 2, 3, 7, 63, 64, 200] {
                let mut ahead = Ahead::new(slice, steps);
                assert_eq!(ahead.left(), want, "{steps}");
                let share = want.div_ceil(steps).min(MAX_BURST);
                for i in 0..steps {
                    let before = ahead.left();
                    ahead.step();
                    // Never more than an even share, nor a burst.
                    assert_eq!(before - ahead.left(), share.min(before), "{steps}: step {i}");
                }
                assert_eq!(
                    ahead.left(),
                    want.saturating_sub(steps * MAX_BURST),
                    "{steps} steps"
                );
            }
        }
        let mut none = Ahead::new(&[], 5);
        none.step();
        assert_eq!(none.left(), 0);
    }
}
