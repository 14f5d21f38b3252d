//! Tensors: a [`Shape`] plus typed [`Storage`].
//!
//! `Storage` is the one place that knows where the bytes live. Graph building,
//! autodiff and the parallel layer only ever see names; kernels see tensors.

mod proto;
mod shape;
mod storage;

pub use shape::Shape;
pub use storage::{CpuStorage, Storage};

use crate::graph::DeviceType;

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
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut Vec<Self>>;
    /// Wraps a vector into storage.
    fn wrap(v: Vec<Self>) -> CpuStorage;
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
            fn slice_mut(storage: &mut CpuStorage) -> Option<&mut Vec<Self>> {
                match storage {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
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
    shape: Shape,
    storage: Storage,
}

impl Default for Tensor {
    fn default() -> Self {
        Tensor::zeros::<f32>(Shape::from([0]))
    }
}

impl Tensor {
    /// A tensor of `shape` filled with zeros.
    pub fn zeros<T: Element>(shape: impl Into<Shape>) -> Self {
        let shape = shape.into();
        let v = vec![T::default(); shape.numel()];
        Tensor {
            shape,
            storage: Storage::Cpu(T::wrap(v)),
        }
    }

    /// A tensor from its elements in row-major order; `None` if the count is wrong.
    pub fn from_vec<T: Element>(shape: impl Into<Shape>, data: Vec<T>) -> Option<Self> {
        let shape = shape.into();
        (shape.numel() == data.len()).then(|| Tensor {
            shape,
            storage: Storage::Cpu(T::wrap(data)),
        })
    }

    /// A one-element tensor of shape `[1]`, as Caffe2 stores scalars.
    pub fn scalar<T: Element>(value: T) -> Self {
        Tensor {
            shape: Shape::from([1]),
            storage: Storage::Cpu(T::wrap(vec![value])),
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

    /// The elements, if they are of type `T` and in host memory.
    pub fn data<T: Element>(&self) -> Option<&[T]> {
        match &self.storage {
            Storage::Cpu(s) => T::slice(s),
        }
    }

    /// The elements, mutably, if they are of type `T` and in host memory.
    pub fn data_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        match &mut self.storage {
            Storage::Cpu(s) => T::slice_mut(s).map(|v| v.as_mut_slice()),
        }
    }

    /// Makes this tensor `shape` of element type `T` and returns its elements for
    /// writing. The allocation is reused when it is large enough; the contents are
    /// unspecified, so a kernel must overwrite every element.
    pub fn resize<T: Element>(&mut self, shape: impl Into<Shape>) -> &mut [T] {
        let shape = shape.into();
        let n = shape.numel();
        self.shape = shape;
        let Storage::Cpu(s) = &mut self.storage;
        if T::slice_mut(s).is_none() {
            *s = T::wrap(Vec::new());
        }
        let v = T::slice_mut(s).expect("storage type was just set");
        // Exactly what is needed: a buffer shared by blobs of growing sizes
        // (optimize_gradient_memory) must not double its allocation each time.
        v.reserve_exact(n.saturating_sub(v.len()));
        v.resize(n, T::default());
        v.as_mut_slice()
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

    /// Copies `other` into `self`, reusing `self`'s allocation.
    pub fn copy_from(&mut self, other: &Tensor) {
        self.shape = other.shape.clone();
        match (&mut self.storage, &other.storage) {
            (Storage::Cpu(dst), Storage::Cpu(src)) => dst.copy_from(src),
        }
    }

    /// Bitwise equality of shape, type and elements (NaNs compare by bits).
    pub fn bitwise_eq(&self, other: &Tensor) -> bool {
        self.shape == other.shape && self.storage.bitwise_eq(&other.storage)
    }
}
