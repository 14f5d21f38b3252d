//! Row-major single-precision matrix products on the `gemm` crate, which picks the
//! widest SIMD the processor has (AVX2/FMA, AVX-512) at run time.

use std::cell::Cell;

thread_local! {
    /// Threads the kernel running on this thread may use. The executor sets it
    /// from the op context ([`crate::ops::OpContext::threads`]) around each kernel,
    /// so two workspaces with different settings never see each other's.
    static THREADS: Cell<usize> = const { Cell::new(1) };
}

/// Sets how many threads CPU kernels called directly on this thread may use (the
/// executor sets it per op from the workspace's setting). The default, 1, suits
/// data parallelism across as many CPU devices as cores.
pub fn set_threads(n: usize) {
    THREADS.with(|t| t.set(n.max(1)));
}

/// Threads the CPU kernel running on this thread may use.
pub fn threads() -> usize {
    THREADS.with(Cell::get)
}

/// Runs `f` with [`threads`] set to `n`, restoring the previous value after.
pub(crate) fn with_threads<R>(n: usize, f: impl FnOnce() -> R) -> R {
    let old = THREADS.with(|t| t.replace(n.max(1)));
    let r = f();
    THREADS.with(|t| t.set(old));
    r
}

/// A row-major matrix operand: `data` holds `rows × cols` elements, or the transpose
/// (`cols × rows`) when `trans` is set.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Whether `data` stores the transpose.
    pub trans: bool,
}

impl<'a> Mat<'a> {
    /// `data` as stored.
    pub fn n(data: &'a [f32]) -> Self {
        Mat { data, trans: false }
    }

    /// The transpose of `data`.
    pub fn t(data: &'a [f32]) -> Self {
        Mat { data, trans: true }
    }
}

/// `c = beta·c + a·b` with `a` m×k, `b` k×n, `c` m×n, all row-major. With
/// `beta == 0` the old contents of `c` are ignored (they may be garbage or NaN).
pub fn sgemm(m: usize, n: usize, k: usize, a: Mat<'_>, b: Mat<'_>, beta: f32, c: &mut [f32]) {
    // Checked products: a wrapped size must not pass for a small one.
    let fits = |len: usize, x: usize, y: usize| x.checked_mul(y).is_some_and(|p| len >= p);
    assert!(fits(c.len(), m, n), "gemm: c too small");
    assert!(fits(a.data.len(), m, k), "gemm: a too small");
    assert!(fits(b.data.len(), k, n), "gemm: b too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if beta == 0.0 {
            c[..m * n].fill(0.0);
        } else {
            c[..m * n].iter_mut().for_each(|x| *x *= beta);
        }
        return;
    }
    // (row stride, column stride) of each operand.
    let (a_rs, a_cs) = if a.trans { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if b.trans { (1, k as isize) } else { (n as isize, 1) };
    let t = threads();
    let par = if t > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(t)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index the strides can reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            beta,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `a·b` in f64, straight from the definition.
    fn reference(m: usize, n: usize, k: usize, a: Mat<'_>, b: Mat<'_>) -> Vec<f64> {
        let at = |x: &Mat<'_>, rows: usize, cols: usize, r: usize, c: usize| {
            f64::from(if x.trans {
                x.data[c * rows + r]
            } else {
                x.data[r * cols + c]
            })
        };
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| at(&a, m, k, i, p) * at(&b, k, n, p, j)).sum();
            }
        }
        c
    }

    #[test]
    fn small_and_blocked_products_match_the_definition_for_every_layout() {
        let mut rng = crate::ops::cpu::rng::Rng::new(7);
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 2),
            (16, 16, 4),
            (4, 16, 16),
            (7, 9, 17),
            (32, 10, 64),
            (16, 32, 32),
            (40, 33, 21),
        ] {
            for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
                for beta in [0.0f32, 1.0, 0.5] {
                    let mut draw = |len: usize| (0..len).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
                    let (ad, bd, c0) = (draw(m * k), draw(k * n), draw(m * n));
                    let (a, b) = (Mat { data: &ad, trans: at }, Mat { data: &bd, trans: bt });
                    let mut c = c0.clone();
                    sgemm(m, n, k, a, b, beta, &mut c);
                    let want = reference(m, n, k, a, b);
                    for ((got, want), old) in c.iter().zip(&want).zip(&c0) {
                        let want = want + f64::from(beta) * f64::from(*old);
                        let tol = 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt();
                        assert!(
                            (f64::from(*got) - want).abs() <= tol,
                            "{m}×{n}×{k} a{at} b{bt} beta {beta}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn beta_zero_ignores_garbage_in_c() {
        let (a, b) = ([1.0f32, 2.0], [3.0f32, 4.0]);
        for at in [false, true] {
            let mut c = [f32::NAN];
            sgemm(1, 1, 2, Mat { data: &a, trans: at }, Mat::n(&b), 0.0, &mut c);
            assert_eq!(c, [11.0]);
        }
    }
}
