//! Host `f32` buffers shared by several tensors: the flat gradient buckets.
//!
//! A bucket's all-reduce packs the gradients it reduces, on each device, into
//! one allocation ([`pack`]); each gradient blob keeps its tensor, now a
//! [`FlatSlice`] of that allocation, and the ops that produce the gradient
//! write into it from then on (a resize to the same element count keeps the
//! slice). The next all-reduce finds the bucket's tensors end to end
//! ([`contiguous`]) and reduces them as one buffer: one pass, no copies.
//!
//! Soundness rests on one invariant: the slices of an allocation are disjoint
//! and each lives in exactly one tensor. [`pack`] is the only place that makes
//! them, and cloning a tensor copies a slice's elements into storage of its own
//! (see `Storage::clone`), so whoever holds `&mut` to a tensor holds the only
//! access to its slice's elements.

use std::any::TypeId;
use std::ptr::NonNull;
use std::sync::Arc;

use super::{Element, HostVec, Storage, Tensor};

/// One allocation of `f32`, freed when its last slice goes.
struct Buffer {
    /// The elements, reached only through this pointer, taken once from
    /// `memory` (aligned to cache lines like other host tensors).
    ptr: NonNull<f32>,
    len: usize,
    /// Owns the elements and frees them when the buffer goes.
    _memory: HostVec<f32>,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: the buffer is plain memory; all access goes through `FlatSlice`s,
// which are disjoint and uniquely owned (the module's invariant), so sending
// or sharing the `Arc` between threads never lets two threads reach one element.
unsafe impl Send for Buffer {}
// SAFETY: as for `Send`: `&Buffer` gives no access to the elements by itself.
unsafe impl Sync for Buffer {}

// Buffers made minus buffers freed on this thread, for the test that each is
// freed with its last slice.
#[cfg(test)]
thread_local!(static LIVE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) });

impl Buffer {
    fn zeroed(len: usize) -> Buffer {
        #[cfg(test)]
        LIVE.with(|l| l.set(l.get() + 1));
        let mut memory = HostVec::<f32>::zeroed(len);
        let ptr = NonNull::new(memory.as_mut_ptr()).expect("slice pointers are not null");
        Buffer {
            ptr,
            len,
            _memory: memory,
        }
    }
}

#[cfg(test)]
impl Drop for Buffer {
    fn drop(&mut self) {
        LIVE.with(|l| l.set(l.get() - 1));
    }
}

/// Elements `offset .. offset + len` of an allocation other tensors share.
#[derive(Debug)]
pub struct FlatSlice {
    buf: Arc<Buffer>,
    offset: usize,
    len: usize,
}

impl FlatSlice {
    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The elements.
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `offset + len <= buf.len` (built so by `pack`); the range
        // belongs to this slice alone (module invariant) and `&self` keeps
        // `&mut` access to it away for the returned lifetime.
        unsafe { std::slice::from_raw_parts(self.buf.ptr.as_ptr().add(self.offset), self.len) }
    }

    /// The elements, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.buf.ptr.as_ptr().add(self.offset), self.len) }
    }

    /// The elements as `T`, when `T` is `f32`.
    pub(crate) fn typed<T: Element>(&self) -> Option<&[T]> {
        (TypeId::of::<T>() == TypeId::of::<f32>()).then(|| {
            // SAFETY: `T` is `f32` (same type id), so the cast changes nothing.
            unsafe { std::slice::from_raw_parts(self.as_slice().as_ptr().cast::<T>(), self.len) }
        })
    }

    /// The elements as `T`, mutably, when `T` is `f32`.
    pub(crate) fn typed_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        (TypeId::of::<T>() == TypeId::of::<f32>()).then(|| {
            let s = self.as_mut_slice();
            // SAFETY: `T` is `f32` (same type id), so the cast changes nothing.
            unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<T>(), s.len()) }
        })
    }
}

/// Whether `t` is a slice of a shared allocation (a packed gradient).
#[cfg(test)]
fn is_packed(t: &Tensor) -> bool {
    matches!(t.storage, Storage::Flat(_))
}

/// The elements of `tensors` as one slice, if they lie end to end in one
/// allocation in this order and each tensor spans its whole slice; `None`
/// otherwise (not packed yet, or a producer replaced a tensor's storage).
pub(crate) fn contiguous<'t>(tensors: &'t mut [&mut Tensor]) -> Option<&'t mut [f32]> {
    let mut first: Option<(&Arc<Buffer>, usize)> = None;
    let mut end = 0;
    for t in tensors.iter() {
        let Storage::Flat(s) = &t.storage else {
            return None;
        };
        if t.numel() != s.len {
            return None;
        }
        match first {
            None => first = Some((&s.buf, s.offset)),
            Some((buf, _)) if !Arc::ptr_eq(buf, &s.buf) || s.offset != end => return None,
            Some(_) => {}
        }
        end = s.offset + s.len;
    }
    let (buf, start) = first?;
    let ptr = buf.ptr.as_ptr();
    // SAFETY: `start..end` lies within the allocation (each slice does, and
    // they are adjacent); it is exactly the union of the slices of `tensors`,
    // which no other tensor shares (module invariant), and `&'t mut` to every
    // one of them keeps all other access away for `'t`.
    Some(unsafe { std::slice::from_raw_parts_mut(ptr.add(start), end - start) })
}

/// Moves `tensors` (host `f32` tensors) into one new allocation, end to end in
/// this order, keeping their shapes and elements; anything else is left as it
/// is and the call returns `false`.
pub(crate) fn pack(tensors: &mut [&mut Tensor]) -> bool {
    if tensors.iter().any(|t| t.data::<f32>().is_err()) {
        return false;
    }
    let total: usize = tensors.iter().map(|t| t.numel()).sum();
    let buf = Arc::new(Buffer::zeroed(total));
    let mut offset = 0;
    for t in tensors.iter_mut() {
        let len = t.numel();
        let mut s = FlatSlice {
            buf: Arc::clone(&buf),
            offset,
            len,
        };
        s.as_mut_slice()
            .copy_from_slice(t.data::<f32>().expect("checked host f32 above"));
        t.storage = Storage::Flat(s);
        offset += len;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_vec([v.len()], v.to_vec()).unwrap()
    }

    #[test]
    fn packed_tensors_keep_their_values_and_read_as_one_slice() {
        let (mut a, mut b) = (t(&[1.0, 2.0]), t(&[3.0, 4.0, 5.0]));
        assert!(contiguous(&mut [&mut a, &mut b]).is_none());
        assert!(pack(&mut [&mut a, &mut b]));
        assert_eq!(a.data::<f32>().unwrap(), [1.0, 2.0]);
        assert_eq!(b.data::<f32>().unwrap(), [3.0, 4.0, 5.0]);
        let mut both = [&mut a, &mut b];
        let all = contiguous(&mut both).unwrap();
        assert_eq!(all, [1.0, 2.0, 3.0, 4.0, 5.0]);
        all[2] = 30.0;
        assert_eq!(b.data::<f32>().unwrap()[0], 30.0);
        // Out of order, or only a part that is not the start: still one range
        // only when adjacent and in order.
        assert!(contiguous(&mut [&mut b, &mut a]).is_none());
        assert_eq!(contiguous(&mut [&mut b]).unwrap(), [30.0, 4.0, 5.0]);
    }

    #[test]
    fn writes_through_a_resize_of_the_same_size_land_in_the_buffer() {
        let (mut a, mut b) = (t(&[1.0, 2.0]), t(&[3.0]));
        pack(&mut [&mut a, &mut b]);
        a.resize::<f32>([1, 2]).unwrap().copy_from_slice(&[7.0, 8.0]);
        assert!(is_packed(&a));
        assert_eq!(contiguous(&mut [&mut a, &mut b]).unwrap(), [7.0, 8.0, 3.0]);
        // Another size leaves the buffer: the pair is no longer one slice.
        a.resize::<f32>([3]).unwrap().fill(0.0);
        assert!(!is_packed(&a));
        assert!(contiguous(&mut [&mut a, &mut b]).is_none());
        assert_eq!(b.data::<f32>().unwrap(), [3.0]);
    }

    #[test]
    fn a_clone_owns_its_elements() {
        let (mut a, mut b) = (t(&[1.0]), t(&[2.0]));
        pack(&mut [&mut a, &mut b]);
        let mut c = a.clone();
        assert!(!is_packed(&c));
        c.data_mut::<f32>().unwrap()[0] = 9.0;
        assert_eq!(a.data::<f32>().unwrap(), [1.0]);
        assert_eq!(c, t(&[9.0]));
        assert_eq!(a, t(&[1.0]));
        let mut d = t(&[5.0]);
        a.copy_from(&d).unwrap();
        assert!(is_packed(&a), "a copy of the same size stays in the buffer");
        assert_eq!(contiguous(&mut [&mut a, &mut b]).unwrap(), [5.0, 2.0]);
        d.data_mut::<f32>().unwrap()[0] = 6.0;
        assert_eq!(a.data::<f32>().unwrap(), [5.0]);
    }

    #[test]
    fn a_buffer_is_freed_with_its_last_slice() {
        let live = || LIVE.with(std::cell::Cell::get);
        let before = live();
        let (mut a, mut b) = (t(&[1.0]), t(&[2.0]));
        pack(&mut [&mut a, &mut b]);
        assert_eq!(live(), before + 1);
        drop(a);
        assert_eq!(live(), before + 1, "b's slice keeps the buffer");
        drop(b);
        assert_eq!(live(), before, "the buffer outlived its slices");
    }

    #[test]
    fn only_host_f32_tensors_pack() {
        let mut a = t(&[1.0]);
        let mut l = Tensor::from_vec([1], vec![1i32]).unwrap();
        assert!(!pack(&mut [&mut a, &mut l]));
        assert!(!is_packed(&a));
        assert!(l.data::<i32>().is_ok());
    }
}
