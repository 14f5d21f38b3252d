//! Device memory of one tensor: an untyped allocation plus its element type.

use std::sync::Arc;

use cudarc::driver::result as drv;
use cudarc::driver::sys::CUresult;
use cudarc::driver::CudaStream;

use super::gpu::Gpu;
use crate::error::{Error, Result};
use crate::graph::Device;
use crate::tensor::{CpuStorage, DataType, HostVec, Shape, Storage, Tensor};

/// Elements in one GPU's memory. Dropping it frees the memory in stream order,
/// so work already enqueued that reads it is unaffected.
pub struct CudaStorage {
    gpu: Arc<Gpu>,
    ptr: u64,
    /// Room, in elements of `dtype`.
    capacity: usize,
    dtype: DataType,
    /// The elements as they came from the host, while nothing on the device has
    /// written them since (integer tensors of up to [`MIRROR_MAX`] elements:
    /// labels, indices). Kernels that check labels on the host read this instead
    /// of copying back, which would make the host wait for the device mid-step.
    mirror: Option<Arc<CpuStorage>>,
    /// Set by work on another stream of the GPU (an upload on the copy stream,
    /// an NCCL collective on the communication stream): the compute stream must
    /// wait for it before the elements are used ([`CudaStorage::settle`]).
    ready: std::sync::Mutex<Option<Arc<cudarc::driver::CudaEvent>>>,
}

/// Most elements an uploaded integer tensor keeps a host mirror of.
const MIRROR_MAX: usize = 1 << 20;

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaStorage({:?} × {} on {})",
            self.dtype,
            self.capacity,
            self.device()
        )
    }
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        // Errors here mean the context is already broken; the next call reports it.
        if self.gpu.bind().is_ok() {
            // Freed in the compute stream's order: after an unfinished upload.
            let _ = self.settle();
            let _ = unsafe { drv::free_async(self.ptr, self.gpu.stream.cu_stream()) };
        }
    }
}

impl Clone for CudaStorage {
    /// A device-to-device copy. Panics if the device cannot allocate it; use
    /// [`Tensor::try_clone`] to get an error instead.
    fn clone(&self) -> Self {
        self.try_clone(self.capacity)
            .unwrap_or_else(|e| panic!("cloning a device tensor: {e}"))
    }
}

impl CudaStorage {
    /// Room for `len` elements of `dtype` on `gpu`, contents unspecified.
    pub(crate) fn alloc(gpu: &Arc<Gpu>, dtype: DataType, len: usize) -> Result<CudaStorage> {
        Self::alloc_on(gpu, &gpu.stream, dtype, len)
    }

    /// Room for `len` elements, allocated in `stream`'s order.
    fn alloc_on(gpu: &Arc<Gpu>, stream: &CudaStream, dtype: DataType, len: usize) -> Result<CudaStorage> {
        gpu.bind()?;
        // Never zero bytes: a null pointer would be indistinguishable from "none".
        let bytes = (len * dtype.size()).max(4);
        let ptr = unsafe { drv::malloc_async(stream.cu_stream(), bytes) }.map_err(|e| {
            if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                Error::OutOfDeviceMemory {
                    device: gpu.device().to_string(),
                    bytes,
                    free: gpu.memory().map_or(0, |(free, _)| free),
                }
            } else {
                gpu.error(&format!("allocating {bytes} bytes"), e)
            }
        })?;
        Ok(CudaStorage {
            gpu: gpu.clone(),
            ptr,
            capacity: len,
            dtype,
            mirror: None,
            ready: Default::default(),
        })
    }

    /// Element type.
    pub fn dtype(&self) -> DataType {
        self.dtype
    }

    /// The device, `cuda:N`.
    pub fn device(&self) -> Device {
        self.gpu.device()
    }

    /// The GPU holding the elements.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Elements the allocation has room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The device address, for kernels and library calls.
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    pub(crate) fn same_buffer(&self, other: &CudaStorage) -> bool {
        self.ptr == other.ptr && self.device() == other.device()
    }

    /// Copies host elements into new device memory on `gpu`.
    pub(crate) fn upload(gpu: &Arc<Gpu>, src: &CpuStorage) -> Result<CudaStorage> {
        let mut s = CudaStorage::alloc(gpu, src.dtype(), src.len())?;
        if src.dtype() != DataType::F32 && src.len() <= MIRROR_MAX {
            s.mirror = Some(Arc::new(src.clone()));
        }
        let stream = gpu.stream.cu_stream();
        // Pageable host memory: the driver stages the elements before returning,
        // so the source may change right after.
        let r = unsafe {
            match src {
                CpuStorage::F32(v) => drv::memcpy_htod_async(s.ptr, v, stream),
                CpuStorage::I32(v) => drv::memcpy_htod_async(s.ptr, v, stream),
                CpuStorage::I64(v) => drv::memcpy_htod_async(s.ptr, v, stream),
            }
        };
        r.map_err(|e| gpu.error("copying to the device", e))?;
        Ok(s)
    }

    /// Copies elements `range` of `src` into new memory of `gpu` on its copy
    /// stream, so that the copy overlaps the compute stream's work;
    /// [`CudaStorage::settle`] orders it before later work.
    pub(crate) fn upload_ahead(
        gpu: &Arc<Gpu>,
        src: &CpuStorage,
        range: std::ops::Range<usize>,
    ) -> Result<CudaStorage> {
        let mut s = Self::alloc_on(gpu, &gpu.copy_stream, src.dtype(), range.len())?;
        let copy = gpu.copy_stream.cu_stream();
        let r = unsafe {
            match src {
                CpuStorage::F32(v) => drv::memcpy_htod_async(s.ptr, &v[range.clone()], copy),
                CpuStorage::I32(v) => drv::memcpy_htod_async(s.ptr, &v[range.clone()], copy),
                CpuStorage::I64(v) => drv::memcpy_htod_async(s.ptr, &v[range.clone()], copy),
            }
        };
        r.map_err(|e| gpu.error("copying to the device", e))?;
        if src.dtype() != DataType::F32 && range.len() <= MIRROR_MAX {
            s.mirror = Some(Arc::new(src.slice_copy(range)));
        }
        let done = gpu
            .copy_stream
            .record_event(None)
            .map_err(|e| gpu.error("recording the end of an upload", e))?;
        s.set_ready(Arc::new(done));
        Ok(s)
    }

    /// Marks the elements as being written by work on another stream, which
    /// `done` follows.
    pub(crate) fn set_ready(&self, done: Arc<cudarc::driver::CudaEvent>) {
        *self.ready.lock().unwrap_or_else(|e| e.into_inner()) = Some(done);
    }

    /// Makes the compute stream wait for work on another stream that writes
    /// these elements (an upload made ahead, a collective), if any is pending.
    pub(crate) fn settle(&self) -> Result<()> {
        let pending = self.ready.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(done) = pending {
            self.gpu
                .stream
                .wait(&done)
                .map_err(|e| self.gpu.error("waiting for work on another stream", e))?;
        }
        Ok(())
    }

    /// The first `len` elements, copied to the host (after the work enqueued
    /// before it has finished).
    pub(crate) fn download(&self, len: usize) -> Result<CpuStorage> {
        let len = len.min(self.capacity);
        if let Some(m) = self.mirror.as_deref().filter(|m| m.len() == len) {
            return Ok(m.clone());
        }
        self.gpu.bind()?;
        self.settle()?;
        let stream = self.gpu.stream.cu_stream();
        fn get<T: Default + Copy>(
            ptr: u64,
            len: usize,
            stream: cudarc::driver::sys::CUstream,
        ) -> Result<HostVec<T>, cudarc::driver::DriverError> {
            let mut v = HostVec::from_elem(T::default(), len);
            if len > 0 {
                unsafe { drv::memcpy_dtoh_async(&mut v, ptr, stream) }?;
            }
            Ok(v)
        }
        let r = match self.dtype {
            DataType::F32 => get(self.ptr, len, stream).map(CpuStorage::F32),
            DataType::I32 => get(self.ptr, len, stream).map(CpuStorage::I32),
            DataType::I64 => get(self.ptr, len, stream).map(CpuStorage::I64),
        };
        let host = r.map_err(|e| self.gpu.error("copying to the host", e))?;
        // A copy to pageable memory returns when done; the sync surfaces errors of
        // earlier work instead of handing back values it never wrote.
        self.gpu.synchronize()?;
        Ok(host)
    }

    /// A copy of the first `len` elements in new memory on the same device.
    pub(crate) fn try_clone(&self, len: usize) -> Result<CudaStorage> {
        let mut s = CudaStorage::alloc(&self.gpu, self.dtype, len)?;
        s.copy_from(self, len)?;
        Ok(s)
    }

    /// Makes `self` hold the first `len` elements of `src` (same device), growing
    /// the allocation if needed.
    pub(crate) fn copy_from(&mut self, src: &CudaStorage, len: usize) -> Result<()> {
        if self.dtype != src.dtype || self.capacity < len {
            *self = CudaStorage::alloc(&src.gpu, src.dtype, len)?;
        }
        let bytes = len * src.dtype.size();
        src.settle()?;
        self.settle()?;
        if bytes > 0 && self.ptr != src.ptr {
            self.gpu.bind()?;
            unsafe { drv::memcpy_dtod_async(self.ptr, src.ptr, bytes, self.gpu.stream.cu_stream()) }
                .map_err(|e| self.gpu.error("copying on the device", e))?;
        }
        self.mirror = src.mirror.clone().filter(|m| m.len() == len);
        Ok(())
    }
}

impl Tensor {
    /// The device storage, if the tensor lives on `gpu`.
    pub(crate) fn cuda_on(&self, gpu: &Gpu) -> Option<&CudaStorage> {
        match &self.storage {
            Storage::Cuda(s) if s.device() == gpu.device() => Some(s),
            _ => None,
        }
    }

    /// The device storage, if the tensor lives on `gpu`, for a kernel to write:
    /// its host mirror is dropped.
    pub(crate) fn cuda_on_mut(&mut self, gpu: &Gpu) -> Option<&mut CudaStorage> {
        match &mut self.storage {
            Storage::Cuda(s) if s.device() == gpu.device() => {
                s.mirror = None;
                Some(s)
            }
            _ => None,
        }
    }

    /// Makes this tensor `shape` of `dtype` on `gpu`, reusing its device memory
    /// when it is there and large enough; returns the device address. The
    /// contents are unspecified: the kernel must write every element.
    pub(crate) fn resize_on(
        &mut self,
        gpu: &Arc<Gpu>,
        dtype: DataType,
        shape: impl Into<Shape>,
    ) -> Result<u64> {
        let shape = shape.into();
        let n = shape.numel();
        let reuse = matches!(&self.storage, Storage::Cuda(s)
            if s.device() == gpu.device() && s.dtype() == dtype && s.capacity() >= n);
        if !reuse {
            self.storage = Storage::Cuda(CudaStorage::alloc(gpu, dtype, n)?);
        } else if let Storage::Cuda(s) = &mut self.storage {
            // Written after anything another stream still does with it.
            s.settle()?;
            s.mirror = None;
        }
        self.shape = shape;
        match &self.storage {
            Storage::Cuda(s) => Ok(s.ptr()),
            Storage::Cpu(_) | Storage::Flat(_) => unreachable!("storage was just put on the device"),
        }
    }
}
