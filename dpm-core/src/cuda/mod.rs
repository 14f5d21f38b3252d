//! CUDA devices: discovery, one context and stream per GPU, device memory, and
//! the CUDA C kernels compiled at run time.
//!
//! With the `cuda` feature, dpm loads the CUDA libraries (driver, cuBLAS, cuDNN,
//! NVRTC) when a CUDA device is first used, so a build needs no toolkit and a
//! machine without a GPU gets an [`Error`] rather than a crash. Without the
//! feature, every CUDA request is [`Error::NotCompiledWithCuda`].
//!
//! Execution model: each GPU has one stream. A CUDA kernel enqueues its work and
//! returns; ops of one device therefore run in the order they were enqueued, which
//! the executors keep consistent with the net's dependencies. A net's run ends by
//! synchronising every GPU it used, so errors the device reports late still fail
//! the run that caused them.

#[cfg(not(feature = "cuda"))]
use crate::error::Error;
use crate::error::Result;

/// The arguments of a kernel launch, after the element count: `args![x, y, n]`.
#[cfg(feature = "cuda")]
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$(&$a as &dyn $crate::cuda::KernelArg),*] };
}
#[cfg(feature = "cuda")]
pub(crate) use args;

#[cfg(feature = "cuda")]
mod dnn;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
pub mod kernels;
#[cfg(feature = "cuda")]
mod storage;

#[cfg(feature = "cuda")]
pub(crate) use dnn::{ConvShape, Dnn, PoolMode, PoolShape};
#[cfg(feature = "cuda")]
pub(crate) use gpu::guarded;
#[cfg(feature = "cuda")]
pub use gpu::{gpu, Gpu, KernelArg};
#[cfg(feature = "cuda")]
pub use storage::CudaStorage;

/// Number of CUDA devices this machine has.
///
/// Errors: [`Error::NotCompiledWithCuda`] without the `cuda` feature;
/// [`Error::NoCudaDriver`] when the driver library cannot be loaded or started.
pub fn device_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        gpu::driver()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(Error::NotCompiledWithCuda("counting CUDA devices".into()))
    }
}

/// Whether at least one CUDA device can be used.
pub fn is_available() -> bool {
    device_count().is_ok_and(|n| n > 0)
}

/// Checks that `cuda:ordinal` can be used, starting its context if needed.
pub fn check_device(ordinal: u32) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        gpu::gpu(ordinal).map(|_| ())
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(Error::NotCompiledWithCuda(format!("device cuda:{ordinal}")))
    }
}
