//! Where a tensor's elements live. The only enum in dpm that dispatches on the
//! device type: a CUDA variant slots in here without touching graph, autodiff or
//! the parallel layer.

use super::DataType;
use crate::graph::DeviceType;

/// A tensor's elements on some device.
#[derive(Clone, Debug, PartialEq)]
pub enum Storage {
    /// Host memory.
    Cpu(CpuStorage),
}

/// Host-memory elements of each supported type.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum CpuStorage {
    F32(Vec<f32>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

impl Storage {
    /// Element type.
    pub fn dtype(&self) -> DataType {
        match self {
            Storage::Cpu(s) => s.dtype(),
        }
    }

    /// Device type.
    pub fn device_type(&self) -> DeviceType {
        match self {
            Storage::Cpu(_) => DeviceType::Cpu,
        }
    }

    /// Elements the allocation has room for.
    pub(crate) fn capacity(&self) -> usize {
        match self {
            Storage::Cpu(CpuStorage::F32(v)) => v.capacity(),
            Storage::Cpu(CpuStorage::I32(v)) => v.capacity(),
            Storage::Cpu(CpuStorage::I64(v)) => v.capacity(),
        }
    }

    pub(crate) fn bitwise_eq(&self, other: &Storage) -> bool {
        match (self, other) {
            (Storage::Cpu(a), Storage::Cpu(b)) => a.bitwise_eq(b),
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

    pub(crate) fn copy_from(&mut self, src: &CpuStorage) {
        fn copy<T: Copy>(dst: &mut Vec<T>, src: &[T]) {
            dst.clear();
            dst.extend_from_slice(src);
        }
        match (self, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => copy(d, s),
            (CpuStorage::I32(d), CpuStorage::I32(s)) => copy(d, s),
            (CpuStorage::I64(d), CpuStorage::I64(s)) => copy(d, s),
            (d, s) => *d = s.clone(),
        }
    }

    fn bitwise_eq(&self, other: &CpuStorage) -> bool {
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
