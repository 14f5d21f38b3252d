//! Tensors: a [`Shape`] plus typed [`Storage`].
//!
//! `Storage` is the one place that knows where the bytes live. Graph building,
//! autodiff and the parallel layer only ever see names; kernels see tensors.

pub(crate) mod flat;
mod host;
mod proto;
mod shape;
mod storage;

pub use flat::FlatSlice;
pub use host::{HostVec, ReserveError, ALIGN};
pub use shape::Shape;
pub use storage::{CpuStorage, Storage};

/// Why a tensor's elements cannot be borrowed as a host slice of some type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostAccessError {
    /// The elements are of another type.
    #[error("elements are {got:?}, not {expected:?}")]
    DataType {
        /// The type asked for.
        expected: DataType,
        /// The type held.
        got: DataType,
    },
    /// The elements live in a device's memory.
    #[error("elements live on {0}, not in host memory; copy them with to_host() first")]
    NotOnHost(Device),
}

impl HostAccessError {
    /// The error as dpm reports it for blob `blob`.
    pub fn for_blob(self, blob: impl Into<String>) -> Error {
        match self {
            HostAccessError::DataType { expected, got } => Error::DataTypeMismatch {
                blob: blob.into(),
                expected,
                got,
            },
            HostAccessError::NotOnHost(d) => Error::NotOnHost {
                blob: blob.into(),
                device: d.to_string(),
            },
        }
    }
}

impl From<HostAccessError> for Error {
    fn from(e: HostAccessError) -> Error {
        e.for_blob("(tensor)")
    }
}

use crate::error::{Error, Result};
use crate::graph::{Device, DeviceType};

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    /// 32-bit float: activations, parameters, gradients.
    F32,
    /// 32-bit integer: class labels.
    I32,
    /// 64-bit integer: labels, the iteration counter.
    I64,
}

/// Element types a tensor can hold, with their storage accessors.
pub trait Element: Copy + Default + Send + Sync + 'static {
    /// The matching [`DataType`].
    const DTYPE: DataType;
    /// The elements, if `storage` holds this type.
    fn slice(storage: &CpuStorage) -> Option<&[Self]>;
    /// The elements, mutably, if `storage` holds this type.
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut HostVec<Self>>;
    /// Wraps elements into storage.
    fn wrap(v: HostVec<Self>) -> CpuStorage;
    /// `len` zeros.
    fn zeros(len: usize) -> HostVec<Self>;
}

macro_rules! element {
    ($t:ty, $variant:ident) => {
        impl Element for $t {
            const DTYPE: DataType = DataType::$variant;
            fn slice(storage: &CpuStorage) -> Option<&[Self]> {
                match storage {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(storage: &mut CpuStorage) -> Option<&mut HostVec<Self>> {
                match storage {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: HostVec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn zeros(len: usize) -> HostVec<Self> {
                HostVec::<$t>::zeroed(len)
            }
        }
    };
}
element!(f32, F32);
element!(i32, I32);
element!(i64, I64);

/// An n-dimensional array on one device.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub(crate) shape: Shape,
    pub(crate) storage: Storage,
}

impl Default for Tensor {
    fn default() -> Self {
        Tensor::zeros::<f32>(Shape::from([0]))
    }
}

impl Tensor {
    /// A tensor of `shape` filled with zeros, in host memory.
    pub fn zeros<T: Element>(shape: impl Into<Shape>) -> Self {
        let shape = shape.into();
        let v = T::zeros(shape.numel());
        Tensor {
            shape,
            storage: Storage::Cpu(T::wrap(v)),
        }
    }

    /// A host tensor from its elements in row-major order; `None` if the count
    /// is wrong. The elements are copied into memory aligned to cache lines
    /// (see [`HostVec`]); [`Tensor::from_host_vec`] takes them as they are.
    pub fn from_vec<T: Element>(shape: impl Into<Shape>, data: Vec<T>) -> Option<Self> {
        Tensor::from_host_vec(shape, HostVec::from(data))
    }

    /// A host tensor owning `data`, its elements in row-major order; `None`
    /// if the count is wrong.
    pub fn from_host_vec<T: Element>(shape: impl Into<Shape>, data: HostVec<T>) -> Option<Self> {
        let shape = shape.into();
        (shape.numel() == data.len()).then(|| Tensor {
            shape,
            storage: Storage::Cpu(T::wrap(data)),
        })
    }

    /// A one-element host tensor of shape `[1]`, as Caffe2 stores scalars.
    pub fn scalar<T: Element>(value: T) -> Self {
        Tensor {
            shape: Shape::from([1]),
            storage: Storage::Cpu(T::wrap(HostVec::from_elem(value, 1))),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// Element type.
    pub fn dtype(&self) -> DataType {
        self.storage.dtype()
    }

    /// Device type of the storage.
    pub fn device_type(&self) -> DeviceType {
        self.storage.device_type()
    }

    /// The device holding the elements; host memory is `cpu:0`.
    pub fn device(&self) -> Device {
        self.storage.device()
    }

    /// Whether the elements are in host memory.
    pub fn is_on_host(&self) -> bool {
        matches!(self.storage, Storage::Cpu(_) | Storage::Flat(_))
    }

    /// Bytes held by the elements.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype().size()
    }

    /// Bytes of the allocation behind the elements: at least [`Tensor::nbytes`],
    /// more when the tensor was larger before (a resize keeps its allocation).
    pub fn allocated_bytes(&self) -> usize {
        self.storage.capacity() * self.dtype().size()
    }

    /// The storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The elements, if they are of type `T` and in host memory; otherwise why not.
    pub fn data<T: Element>(&self) -> Result<&[T], HostAccessError> {
        match &self.storage {
            Storage::Cpu(s) => {
                T::slice(s)
                    .map(|v| &v[..self.numel().min(v.len())])
                    .ok_or(HostAccessError::DataType {
                        expected: T::DTYPE,
                        got: s.dtype(),
                    })
            }
            Storage::Flat(s) => s.typed::<T>().ok_or(HostAccessError::DataType {
                expected: T::DTYPE,
                got: DataType::F32,
            }),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Err(HostAccessError::NotOnHost(s.device())),
        }
    }

    /// The elements, mutably, if they are of type `T` and in host memory.
    pub fn data_mut<T: Element>(&mut self) -> Result<&mut [T], HostAccessError> {
        let n = self.numel();
        match &mut self.storage {
            Storage::Cpu(s) => {
                let got = s.dtype();
                T::slice_mut(s)
                    .map(|v| {
                        let n = n.min(v.len());
                        &mut v[..n]
                    })
                    .ok_or(HostAccessError::DataType {
                        expected: T::DTYPE,
                        got,
                    })
            }
            Storage::Flat(s) => s.typed_mut::<T>().ok_or(HostAccessError::DataType {
                expected: T::DTYPE,
                got: DataType::F32,
            }),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Err(HostAccessError::NotOnHost(s.device())),
        }
    }

    /// Makes this tensor `shape` of element type `T` in host memory and returns its
    /// elements for writing. The allocation is reused when it is large enough; the
    /// contents are unspecified, so a kernel must overwrite every element. A size
    /// that overflows or that the allocator refuses is [`Error::Allocation`] (which
    /// [`OpContext::resize_output`](crate::ops::OpContext::resize_output) names),
    /// and leaves the tensor as it was.
    pub fn resize<T: Element>(&mut self, shape: impl Into<Shape>) -> Result<&mut [T]> {
        let shape = shape.into();
        let size = std::mem::size_of::<T>();
        let bytes = shape
            .checked_numel()
            .and_then(|n| n.checked_mul(size))
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or(Error::Allocation {
                blob: String::new(),
                bytes: usize::MAX,
            })?;
        let n = bytes / size;
        // A packed gradient stays in its bucket while its size holds.
        if let Storage::Flat(f) = &self.storage {
            if f.len() == n && T::DTYPE == DataType::F32 {
                self.shape = shape;
                let Storage::Flat(f) = &mut self.storage else {
                    unreachable!("matched just above")
                };
                return Ok(f.typed_mut::<T>().expect("an f32 slice"));
            }
        }
        let refused = || Error::Allocation {
            blob: String::new(),
            bytes,
        };
        let reused = match &mut self.storage {
            Storage::Cpu(s) => match T::slice_mut(s) {
                // Exactly what is needed: a buffer shared by blobs of growing sizes
                // (optimize_gradient_memory) must not double its allocation each time.
                Some(v) => {
                    v.try_reserve_exact(n.saturating_sub(v.len()))
                        .map_err(|_| refused())?;
                    true
                }
                None => false,
            },
            Storage::Flat(_) => false,
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => false,
        };
        if !reused {
            let mut v: HostVec<T> = HostVec::new();
            v.try_reserve_exact(n).map_err(|_| refused())?;
            self.storage = Storage::Cpu(T::wrap(v));
        }
        self.shape = shape;
        #[allow(irrefutable_let_patterns)] // refutable with the `cuda` feature
        let Storage::Cpu(s) = &mut self.storage
        else {
            unreachable!("storage was just set to host memory")
        };
        let v = T::slice_mut(s).expect("storage type was just set");
        v.resize(n, T::default());
        Ok(v.as_mut_slice())
    }

    /// Changes the shape without touching the elements; `false` if the element count differs.
    pub fn reshape(&mut self, shape: impl Into<Shape>) -> bool {
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return false;
        }
        self.shape = shape;
        true
    }

    /// Copies `other` into `self`, on `other`'s device, reusing `self`'s allocation
    /// where it can. Fails only on a device error (out of memory, a broken context).
    pub fn copy_from(&mut self, other: &Tensor) -> Result<()> {
        match (&mut self.storage, &other.storage) {
            (Storage::Cpu(dst), Storage::Cpu(src)) => dst.copy_from(src),
            // Into a packed gradient's slice when it fits, so that it stays packed.
            (Storage::Flat(dst), _) if dst.len() == other.numel() && other.data::<f32>().is_ok() => {
                let src = other.data::<f32>().expect("checked just above");
                dst.as_mut_slice().copy_from_slice(src);
            }
            (Storage::Flat(_), _) | (_, Storage::Flat(_)) => *self = other.to_host()?,
            #[cfg(feature = "cuda")]
            (Storage::Cuda(dst), Storage::Cuda(src)) if dst.device() == src.device() => {
                dst.copy_from(src, other.numel())?
            }
            #[cfg(feature = "cuda")]
            _ => *self = other.try_clone()?,
        }
        self.shape = other.shape.clone();
        Ok(())
    }

    /// A copy on the same device. Unlike `clone()`, a failed device allocation is
    /// an error rather than a panic.
    pub fn try_clone(&self) -> Result<Tensor> {
        match &self.storage {
            Storage::Cpu(_) | Storage::Flat(_) => Ok(self.clone()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Ok(Tensor {
                shape: self.shape.clone(),
                storage: Storage::Cuda(s.try_clone(self.numel())?),
            }),
        }
    }

    /// A copy in host memory (a plain copy if already there).
    pub fn to_host(&self) -> Result<Tensor> {
        match &self.storage {
            Storage::Cpu(_) | Storage::Flat(_) => Ok(self.clone()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Ok(Tensor {
                shape: self.shape.clone(),
                storage: Storage::Cpu(s.download(self.numel())?),
            }),
        }
    }

    /// A copy on `device`: host memory for `cpu:N`, that GPU's memory for `cuda:N`.
    /// Without the `cuda` feature, a CUDA device is an error saying so.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu(_) => self.to_host(),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let gpu = crate::cuda::gpu(n)?;
                match &self.storage {
                    Storage::Cuda(s) if s.device() == device => self.try_clone(),
                    Storage::Cuda(_) | Storage::Flat(_) => self.to_host()?.to_device(device),
                    Storage::Cpu(s) => Ok(Tensor {
                        shape: self.shape.clone(),
                        storage: Storage::Cuda(crate::cuda::CudaStorage::upload(&gpu, s)?),
                    }),
                }
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::NotCompiledWithCuda(format!("device {device}"))),
        }
    }

    /// Rows `first .. first + count` of the first dimension (a device's part of
    /// a batch), on `device`. A GPU gets them through its copy stream, so that
    /// the copy overlaps the computation running meanwhile; such a tensor must
    /// be [settled](Tensor::settle) before a net reads it. `first + count` must
    /// not pass the first dimension.
    pub(crate) fn rows_to_device(&self, first: usize, count: usize, device: Device) -> Result<Tensor> {
        let (shape, range) = self.rows(first, count);
        match (&self.storage, device) {
            #[cfg(feature = "cuda")]
            (Storage::Cpu(s), Device::Cuda(n)) => Ok(Tensor {
                shape,
                storage: Storage::Cuda(crate::cuda::CudaStorage::upload_ahead(
                    &crate::cuda::gpu(n)?,
                    s,
                    range,
                )?),
            }),
            (Storage::Cpu(s), Device::Cpu(_)) => Ok(Tensor {
                shape,
                storage: Storage::Cpu(s.slice_copy(range)),
            }),
            _ => self.to_host()?.rows_to_device(first, count, device),
        }
    }

    /// The shape of rows `first..first + count` along the first axis, and
    /// their elements' range.
    fn rows(&self, first: usize, count: usize) -> (Shape, std::ops::Range<usize>) {
        let mut dims = self.dims().to_vec();
        let per_row = self.numel() / dims.first().copied().unwrap_or(1).max(1);
        if let Some(d) = dims.first_mut() {
            *d = count;
        }
        (Shape::from(dims), first * per_row..(first + count) * per_row)
    }

    /// Makes `self` rows `first..first + count` of `src` on the host, in
    /// `self`'s allocation when both are host tensors: a CPU replica's part of
    /// each batch, fed without allocating every step.
    pub(crate) fn assign_rows(&mut self, src: &Tensor, first: usize, count: usize) -> Result<()> {
        match (&mut self.storage, &src.storage) {
            (Storage::Cpu(dst), Storage::Cpu(s)) => {
                let (shape, range) = src.rows(first, count);
                dst.copy_range_from(s, range);
                self.shape = shape;
            }
            _ => *self = src.rows_to_device(first, count, Device::Cpu(0))?,
        }
        Ok(())
    }

    /// Orders an upload made by [`Tensor::rows_to_device`] before any later
    /// work on its GPU (nothing to do otherwise).
    pub(crate) fn settle(&mut self) -> Result<()> {
        match &mut self.storage {
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.settle(),
            _ => Ok(()),
        }
    }

    /// Bitwise equality of shape, type and elements (NaNs compare by bits); device
    /// tensors are compared through host copies.
    pub fn bitwise_eq(&self, other: &Tensor) -> bool {
        if self.shape != other.shape || self.dtype() != other.dtype() {
            return false;
        }
        match (self.to_host(), other.to_host()) {
            (
                Ok(Tensor {
                    storage: Storage::Cpu(a),
                    ..
                }),
                Ok(Tensor {
                    storage: Storage::Cpu(b),
                    ..
                }),
            ) => a.bitwise_eq(&b),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assign_rows_copies_the_rows_into_the_tensors_own_memory() {
        let src = Tensor::from_vec([4, 2], (0..8).map(|v| v as f32).collect()).unwrap();
        let mut dst = Tensor::zeros::<f32>([2, 2]);
        let before = dst.data::<f32>().unwrap().as_ptr();
        dst.assign_rows(&src, 2, 2).unwrap();
        assert_eq!(dst.dims(), [2, 2]);
        assert_eq!(dst.data::<f32>().unwrap(), [4.0, 5.0, 6.0, 7.0]);
        assert_eq!(dst.data::<f32>().unwrap().as_ptr(), before, "it allocated");
        // Another shape or element type: the result is still those rows.
        dst.assign_rows(&src, 1, 3).unwrap();
        assert_eq!(dst.dims(), [3, 2]);
        assert_eq!(dst.data::<f32>().unwrap(), [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        let labels = Tensor::from_vec([4], vec![7i32, 8, 9, 10]).unwrap();
        dst.assign_rows(&labels, 3, 1).unwrap();
        assert_eq!(dst.dtype(), DataType::I32);
        assert_eq!(dst.data::<i32>().unwrap(), [10]);
    }
}
