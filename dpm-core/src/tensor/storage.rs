//! Where a tensor's elements live. The only enum in dpm that dispatches on the
//! device type: graph building, autodiff and the parallel layer never see it.

use super::flat::FlatSlice;
use super::{DataType, HostVec};
use crate::graph::{Device, DeviceType};

/// A tensor's elements on some device.
#[derive(Debug)]
pub enum Storage {
    /// Host memory.
    Cpu(CpuStorage),
    /// Host `f32` elements in an allocation shared with other tensors: a
    /// gradient packed into its bucket's flat buffer (see `tensor::flat`).
    Flat(FlatSlice),
    /// Memory of one CUDA device.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaStorage),
}

/// Host-memory elements of each supported type, aligned to cache lines.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum CpuStorage {
    F32(HostVec<f32>),
    I32(HostVec<i32>),
    I64(HostVec<i64>),
}

impl Clone for Storage {
    /// A copy of the elements; a [`Storage::Flat`] slice's copy is storage of
    /// its own (a slice of a shared buffer is never shared further).
    fn clone(&self) -> Storage {
        match self {
            Storage::Cpu(s) => Storage::Cpu(s.clone()),
            Storage::Flat(s) => Storage::Cpu(CpuStorage::F32(HostVec::from(s.as_slice()))),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Storage::Cuda(s.clone()),
        }
    }
}

impl PartialEq for Storage {
    /// Host storage compares by value; device storage only equals itself (its
    /// elements are not read without an explicit copy).
    fn eq(&self, other: &Storage) -> bool {
        match (self, other) {
            (Storage::Cpu(a), Storage::Cpu(b)) => a == b,
            (Storage::Flat(a), Storage::Flat(b)) => a.as_slice() == b.as_slice(),
            (Storage::Flat(a), Storage::Cpu(CpuStorage::F32(b)))
            | (Storage::Cpu(CpuStorage::F32(b)), Storage::Flat(a)) => a.as_slice() == &b[..],
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => a.same_buffer(b),
            _ => false,
        }
    }
}

impl Storage {
    /// Element type.
    pub fn dtype(&self) -> DataType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Flat(_) => DataType::F32,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.dtype(),
        }
    }

    /// Device type.
    pub fn device_type(&self) -> DeviceType {
        self.device().device_type()
    }

    /// The device holding the elements (host memory is `cpu:0`).
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) | Storage::Flat(_) => Device::Cpu(0),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.device(),
        }
    }

    /// Elements the allocation has room for.
    pub(crate) fn capacity(&self) -> usize {
        match self {
            Storage::Cpu(CpuStorage::F32(v)) => v.capacity(),
            Storage::Cpu(CpuStorage::I32(v)) => v.capacity(),
            Storage::Cpu(CpuStorage::I64(v)) => v.capacity(),
            Storage::Flat(s) => s.len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.capacity(),
        }
    }
}

impl CpuStorage {
    /// Element type.
    pub fn dtype(&self) -> DataType {
        match self {
            CpuStorage::F32(_) => DataType::F32,
            CpuStorage::I32(_) => DataType::I32,
            CpuStorage::I64(_) => DataType::I64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::I32(v) => v.len(),
            CpuStorage::I64(v) => v.len(),
        }
    }

    /// A copy of elements `range`.
    pub(crate) fn slice_copy(&self, range: std::ops::Range<usize>) -> CpuStorage {
        match self {
            CpuStorage::F32(v) => CpuStorage::F32(HostVec::from(&v[range])),
            CpuStorage::I32(v) => CpuStorage::I32(HostVec::from(&v[range])),
            CpuStorage::I64(v) => CpuStorage::I64(HostVec::from(&v[range])),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn copy_from(&mut self, src: &CpuStorage) {
        self.copy_range_from(src, 0..src.len());
    }

    /// Makes `self` elements `range` of `src`, in `self`'s allocation when the
    /// element types match.
    pub(crate) fn copy_range_from(&mut self, src: &CpuStorage, range: std::ops::Range<usize>) {
        fn copy<T: Copy>(dst: &mut HostVec<T>, src: &[T]) {
            dst.clear();
            dst.extend_from_slice(src);
        }
        match (self, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => copy(d, &s[range]),
            (CpuStorage::I32(d), CpuStorage::I32(s)) => copy(d, &s[range]),
            (CpuStorage::I64(d), CpuStorage::I64(s)) => copy(d, &s[range]),
            (d, s) => *d = s.slice_copy(range),
        }
    }

    pub(crate) fn bitwise_eq(&self, other: &CpuStorage) -> bool {
        match (self, other) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
            (CpuStorage::I32(a), CpuStorage::I32(b)) => a == b,
            (CpuStorage::I64(a), CpuStorage::I64(b)) => a == b,
            _ => false,
        }
    }
}
