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
