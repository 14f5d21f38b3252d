//! Conversion between [`Tensor`] and Caffe2's [`TensorProto`].

use super::{CpuStorage, DataType, HostVec, Shape, Storage, Tensor};
use crate::error::{Error, Result};
use crate::proto::{TensorDataType, TensorProto};

impl Tensor {
    /// Serialises to a `TensorProto` called `name`. A device tensor is copied to
    /// the host first (and this panics if the device fails that copy; call
    /// [`Tensor::to_host`] first to get the error instead).
    pub fn to_proto(&self, name: &str) -> TensorProto {
        if !matches!(self.storage, Storage::Cpu(_)) {
            let host = self
                .to_host()
                .unwrap_or_else(|e| panic!("serialising `{name}`: {e}"));
            return host.to_proto(name);
        }
        let mut p = TensorProto {
            dims: self.dims().iter().map(|&d| d as i64).collect(),
            name: Some(name.to_owned()),
            ..Default::default()
        };
        #[allow(irrefutable_let_patterns)] // refutable with the `cuda` feature
        let Storage::Cpu(s) = &self.storage
        else {
            unreachable!("other storage was copied to the host above")
        };
        match s {
            CpuStorage::F32(v) => {
                p.data_type = Some(TensorDataType::Float as i32);
                p.float_data = v.to_vec();
            }
            CpuStorage::I32(v) => {
                p.data_type = Some(TensorDataType::Int32 as i32);
                p.int32_data = v.to_vec();
            }
            CpuStorage::I64(v) => {
                p.data_type = Some(TensorDataType::Int64 as i32);
                p.int64_data = v.to_vec();
            }
        }
        p
    }

    /// Parses a `TensorProto`, checking that its data agree with its dims.
    pub fn from_proto(p: &TensorProto) -> Result<Tensor> {
        let name = p.name.clone().unwrap_or_default();
        let mut dims = Vec::with_capacity(p.dims.len());
        for &d in &p.dims {
            if d < 0 {
                return Err(Error::value(name, format!("negative dimension {d}")));
            }
            dims.push(d as usize);
        }
        let shape = Shape::from(dims);
        // proto2 default of data_type is FLOAT.
        let dtype = p.data_type.unwrap_or(TensorDataType::Float as i32);
        let bad_len =
            |len: usize| Error::value(name.clone(), format!("{len} elements do not fill shape {shape}"));
        let t = match TensorDataType::try_from(dtype) {
            Ok(TensorDataType::Float) => {
                Tensor::from_host_vec(shape.clone(), HostVec::from(&p.float_data[..]))
                    .ok_or_else(|| bad_len(p.float_data.len()))?
            }
            Ok(TensorDataType::Int32) => {
                Tensor::from_host_vec(shape.clone(), HostVec::from(&p.int32_data[..]))
                    .ok_or_else(|| bad_len(p.int32_data.len()))?
            }
            Ok(TensorDataType::Int64) => {
                Tensor::from_host_vec(shape.clone(), HostVec::from(&p.int64_data[..]))
                    .ok_or_else(|| bad_len(p.int64_data.len()))?
            }
            _ => {
                return Err(Error::value(
                    name,
                    format!("tensor data type {dtype} is not supported (FLOAT, INT32, INT64 are)"),
                ))
            }
        };
        Ok(t)
    }
}

impl DataType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DataType::F32 | DataType::I32 => 4,
            DataType::I64 => 8,
        }
    }
}
