//! Host memory for tensors: a growable array whose first element starts a
//! cache line.
//!
//! `Vec` aligns to the element (4 bytes for `f32`), and the allocator places
//! large blocks 16 bytes into a page, so every 64-byte vector load of a
//! kernel straddled two cache lines and which L1 sets a tensor's rows used
//! depended on where it landed: the 1×1 stride-2 shortcut convolution, which
//! reads the image in place, measured 11 µs of 54 slower with its input 16
//! bytes into a line than at its start. [`HostVec`] aligns every allocation to
//! [`ALIGN`] bytes, so a tensor's rows sit the same way on every run.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`HostVec`] allocation, in bytes: a cache line, and one
/// AVX-512 vector.
pub const ALIGN: usize = 64;

/// A growable array of plain elements in memory aligned to [`ALIGN`] bytes:
/// the elements of a host tensor. It dereferences to a slice; the rest of its
/// interface is the part of `Vec`'s that tensors use.
///
/// ```
/// use dpm_core::tensor::{HostVec, ALIGN};
///
/// let mut v = HostVec::from(vec![1.0f32, 2.0]);
/// v.extend_from_slice(&[3.0]);
/// assert_eq!(&v[..], &[1.0, 2.0, 3.0]);
/// assert!((v.as_ptr() as usize).is_multiple_of(ALIGN));
/// ```
pub struct HostVec<T: Copy> {
    ptr: NonNull<T>,
    len: usize,
    cap: usize,
}

// SAFETY: a `HostVec` owns its elements like a `Vec` does; sending it sends
// them, and `&HostVec` gives only shared access.
unsafe impl<T: Copy + Send> Send for HostVec<T> {}
// SAFETY: as for `Send`.
unsafe impl<T: Copy + Sync> Sync for HostVec<T> {}

// Allocations made minus allocations freed on this thread, for the test that
// every one is freed.
#[cfg(test)]
thread_local!(static LIVE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) });

/// Counts an allocation made (`1`) or freed (`-1`) in tests.
fn count(_delta: isize) {
    #[cfg(test)]
    LIVE.with(|l| l.set(l.get() + _delta));
}

/// The allocator refused memory, or the size would overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReserveError;

impl fmt::Display for ReserveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("memory allocation failed")
    }
}

impl std::error::Error for ReserveError {}

impl<T: Copy> HostVec<T> {
    /// An empty array; allocates nothing.
    pub const fn new() -> Self {
        assert!(size_of::<T>() > 0, "HostVec holds sized elements");
        HostVec {
            ptr: NonNull::dangling(),
            len: 0,
            cap: 0,
        }
    }

    /// `len` copies of `value`.
    pub fn from_elem(value: T, len: usize) -> Self {
        let mut v = HostVec::new();
        v.resize(len, value);
        v
    }

    fn layout(cap: usize) -> Option<Layout> {
        let bytes = cap.checked_mul(size_of::<T>())?;
        Layout::from_size_align(bytes, ALIGN.max(align_of::<T>())).ok()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements the allocation has room for.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        self
    }

    /// The elements, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        self
    }

    /// Makes room for at least `additional` more elements, allocating exactly
    /// that many when it must grow; on failure the array is unchanged.
    pub fn try_reserve_exact(&mut self, additional: usize) -> Result<(), ReserveError> {
        let need = self.len.checked_add(additional).ok_or(ReserveError)?;
        if need <= self.cap {
            return Ok(());
        }
        let new = Self::layout(need).ok_or(ReserveError)?;
        let ptr = if self.cap == 0 {
            // SAFETY: `new` has a non-zero size (`need > cap ≥ 0` elements of
            // a sized type).
            unsafe { alloc::alloc(new) }
        } else {
            let old = Self::layout(self.cap).expect("the current layout was valid when made");
            // SAFETY: `ptr` was allocated with `old` (same alignment), and
            // `new.size()` is non-zero and did not overflow `isize`.
            unsafe { alloc::realloc(self.ptr.as_ptr().cast(), old, new.size()) }
        };
        self.ptr = NonNull::new(ptr.cast()).ok_or(ReserveError)?;
        if self.cap == 0 {
            count(1);
        }
        self.cap = need;
        Ok(())
    }

    /// As [`Self::try_reserve_exact`], aborting like `Vec` when memory runs out.
    pub fn reserve_exact(&mut self, additional: usize) {
        if self.try_reserve_exact(additional).is_err() {
            match Self::layout(self.len.saturating_add(additional)) {
                Some(layout) => alloc::handle_alloc_error(layout),
                None => panic!("HostVec: capacity overflow"),
            }
        }
    }

    /// Makes the length `len`, filling new elements with `value`.
    pub fn resize(&mut self, len: usize, value: T) {
        if len > self.len {
            self.reserve_exact(len - self.len);
            // SAFETY: the capacity is at least `len`; the new elements are
            // written before the length covers them.
            unsafe {
                let spare = std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(self.len), len - self.len);
                spare.fill(value);
            }
        }
        self.len = len;
    }

    /// Appends `x`, doubling the capacity when it is full.
    pub fn push(&mut self, x: T) {
        if self.len == self.cap {
            self.reserve_exact(self.cap.max(4));
        }
        // SAFETY: the capacity exceeds the length.
        unsafe { self.ptr.as_ptr().add(self.len).write(x) };
        self.len += 1;
    }

    /// Removes every element, keeping the allocation.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends copies of `src`.
    pub fn extend_from_slice(&mut self, src: &[T]) {
        self.reserve_exact(src.len());
        // SAFETY: the capacity covers `len + src.len()`, and `src` cannot
        // overlap the spare capacity (it is borrowed while `self` is mutably).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(self.len), src.len());
        }
        self.len += src.len();
    }
}

macro_rules! zeroed {
    ($($t:ty),*) => {$(
        impl HostVec<$t> {
            /// `len` zeros, from memory the allocator hands out zeroed (large
            /// blocks cost no writes until they are used).
            pub fn zeroed(len: usize) -> Self {
                let mut v = HostVec::new();
                if len == 0 {
                    return v;
                }
                let layout = Self::layout(len).unwrap_or_else(|| panic!("HostVec: capacity overflow"));
                // SAFETY: a non-zero size; all-zero bytes are the value 0 of
                // this type.
                let ptr = unsafe { alloc::alloc_zeroed(layout) };
                v.ptr = NonNull::new(ptr.cast()).unwrap_or_else(|| alloc::handle_alloc_error(layout));
                count(1);
                v.len = len;
                v.cap = len;
                v
            }
        }
    )*};
}
zeroed!(f32, i32, i64);

impl<T: Copy> Drop for HostVec<T> {
    fn drop(&mut self) {
        if self.cap > 0 {
            let layout = Self::layout(self.cap).expect("the layout was valid when allocated");
            // SAFETY: allocated with this layout, freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr().cast(), layout) };
            count(-1);
        }
    }
}

impl<T: Copy> Deref for HostVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` elements from `ptr` are initialised (dangling but
        // aligned when `len` is 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> DerefMut for HostVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for `deref`, and `&mut self` is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> Default for HostVec<T> {
    fn default() -> Self {
        HostVec::new()
    }
}

impl<T: Copy> Clone for HostVec<T> {
    /// A copy with capacity for exactly its elements.
    fn clone(&self) -> Self {
        HostVec::from(&self[..])
    }
}

impl<T: Copy + PartialEq> PartialEq for HostVec<T> {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl<T: Copy + fmt::Debug> fmt::Debug for HostVec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self[..], f)
    }
}

impl<T: Copy> From<&[T]> for HostVec<T> {
    fn from(src: &[T]) -> Self {
        let mut v = HostVec::new();
        v.extend_from_slice(src);
        v
    }
}

impl<T: Copy> From<Vec<T>> for HostVec<T> {
    /// Copies the elements into an aligned allocation (a `Vec`'s cannot be
    /// kept: it must be freed with the alignment it was allocated with).
    fn from(src: Vec<T>) -> Self {
        HostVec::from(&src[..])
    }
}

impl<'a, T: Copy> IntoIterator for &'a HostVec<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'a, T: Copy> IntoIterator for &'a mut HostVec<T> {
    type Item = &'a mut T;
    type IntoIter = std::slice::IterMut<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

impl<T: Copy> Extend<T> for HostVec<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        let iter = iter.into_iter();
        self.reserve_exact(iter.size_hint().0);
        for x in iter {
            self.push(x);
        }
    }
}

impl<T: Copy> FromIterator<T> for HostVec<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut v = HostVec::new();
        v.extend(iter);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aligned<T: Copy>(v: &HostVec<T>) -> bool {
        (v.as_ptr() as usize).is_multiple_of(ALIGN)
    }

    #[test]
    fn every_allocation_starts_a_cache_line() {
        // Sizes that `Vec` places 16 bytes into a page or a line.
        for n in [1, 3, 17, 1000, 300_000] {
            let z = HostVec::<f32>::zeroed(n);
            assert!(aligned(&z) && z.iter().all(|&x| x == 0.0), "zeroed({n})");
            let mut g = HostVec::<i64>::new();
            g.resize(n, 7);
            assert!(aligned(&g) && g.iter().all(|&x| x == 7));
            // Growing moves the elements and keeps the alignment.
            g.extend_from_slice(&[1, 2, 3]);
            assert!(aligned(&g));
            assert_eq!((g.len(), &g[n..]), (n + 3, &[1, 2, 3][..]));
            let c = g.clone();
            assert!(aligned(&c) && c == g);
        }
    }

    #[test]
    fn it_behaves_as_vec_does() {
        let mut v = HostVec::from(vec![1i32, 2, 3]);
        assert!(!v.is_empty() && v.capacity() == 3);
        v.resize(5, 9);
        // Growing allocates exactly what is asked, as `Vec::reserve_exact`.
        assert_eq!((&v[..], v.capacity()), (&[1, 2, 3, 9, 9][..], 5));
        v.resize(2, 0);
        assert_eq!(&v[..], &[1, 2]);
        v.clear();
        assert!(v.is_empty() && v.capacity() == 5);
        v.extend_from_slice(&[4, 5]);
        v.as_mut_slice()[0] = 6;
        assert_eq!(v.as_slice(), &[6, 5]);
        for x in &mut v {
            *x += 1;
        }
        assert_eq!((&v).into_iter().sum::<i32>(), 13);
        assert!(v != HostVec::from(&[7, 5][..]) && v == HostVec::from(&[7, 6][..]));
        // Pushes past the capacity double it.
        let mut p = HostVec::new();
        let caps: Vec<usize> = (0..9)
            .map(|i| {
                p.push(i);
                p.capacity()
            })
            .collect();
        assert_eq!(caps, [4, 4, 4, 4, 8, 8, 8, 8, 16]);
        // An iterator that cannot say its length grows by pushes.
        let w: HostVec<i32> = (0..100).filter(|x| x % 3 == 0).collect();
        assert_eq!(w.to_vec(), (0..100).filter(|x| x % 3 == 0).collect::<Vec<_>>());
        assert_eq!(format!("{:?}", HostVec::from(&[1.5f32][..])), "[1.5]");
        assert_eq!(HostVec::<f32>::new(), HostVec::default());
    }

    #[test]
    fn a_refused_reservation_changes_nothing() {
        let mut v = HostVec::from(&[1.0f32, 2.0][..]);
        assert_eq!(v.try_reserve_exact(usize::MAX), Err(ReserveError));
        assert_eq!(v.try_reserve_exact(isize::MAX as usize / 2), Err(ReserveError));
        assert_eq!((&v[..], v.capacity()), (&[1.0, 2.0][..], 2));
        assert_eq!(ReserveError.to_string(), "memory allocation failed");
    }

    #[test]
    fn every_allocation_is_freed() {
        let live = || LIVE.with(|l| l.get());
        let before = live();
        {
            let mut a = HostVec::<f32>::zeroed(1000);
            a.extend_from_slice(&[1.0; 100]); // a reallocation
            let b = a.clone();
            let mut c: HostVec<i64> = HostVec::new();
            c.resize(10, 3);
            assert_eq!(live(), before + 3);
            drop((a, b));
            assert_eq!(live(), before + 1);
        }
        assert_eq!(live(), before);
    }
}
