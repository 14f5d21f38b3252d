//! One GPU: its context, its stream, its library handles and its loaded kernels.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};

use super::dnn::Dnn;
use crate::error::{Error, Result};
use crate::graph::Device;

/// The library's panic message, when it panicked instead of returning an error
/// (cudarc panics when a shared library or one of its symbols is missing).
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "the library panicked".into())
}

/// Runs a library call that may panic (missing library or symbol) as a `Result`.
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(p) => Err(panic_text(p.as_ref())),
    }
}

/// Loads the driver once and counts the devices.
pub(crate) fn driver() -> Result<usize> {
    static PROBE: OnceLock<Result<usize, String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            // Probe the library before any call: cudarc panics if it is absent.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err("the library could not be loaded; install the NVIDIA driver, \
                            or train on cpu devices"
                    .into());
            }
            match catch_unwind(CudaContext::device_count) {
                Ok(Ok(n)) => Ok(n.max(0) as usize),
                Ok(Err(e)) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => Ok(0),
                Ok(Err(e)) => Err(format!("the driver failed to start: {e}")),
                Err(p) => Err(panic_text(p.as_ref())),
            }
        })
        .clone()
        .map_err(Error::NoCudaDriver)
}

/// A started GPU. Obtained with [`gpu`]; shared by every tensor and kernel on it.
pub struct Gpu {
    ordinal: u32,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    /// Uploads made ahead of their use (the next batch, while a step computes):
    /// each ends with an event the compute stream waits on before reading.
    pub(crate) copy_stream: Arc<CudaStream>,
    /// NCCL collectives: they overlap the compute stream's work, each after an
    /// event of it and each leaving an event on the buffers it writes.
    pub(crate) comm_stream: Arc<CudaStream>,
    blas: Mutex<Option<CudaBlas>>,
    dnn: Mutex<Option<Dnn>>,
    module: Mutex<Option<Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

/// The GPU `cuda:ordinal`, started on first use (context, stream).
pub fn gpu(ordinal: u32) -> Result<Arc<Gpu>> {
    static GPUS: OnceLock<Mutex<HashMap<u32, Arc<Gpu>>>> = OnceLock::new();
    let mut gpus = GPUS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(g) = gpus.get(&ordinal) {
        return Ok(g.clone());
    }
    let count = driver()?;
    if ordinal as usize >= count {
        return Err(Error::NoSuchDevice {
            device: Device::Cuda(ordinal).to_string(),
            count,
        });
    }
    let device = Device::Cuda(ordinal).to_string();
    let started = guarded(|| {
        let ctx = CudaContext::new(ordinal as usize)
            .map_err(|e| driver_error(&device, "starting the context", e))?;
        // One stream per device orders all work on it: per-buffer events (cudarc's
        // default) would only add a record and a wait to every call.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_error(&device, "creating a stream", e))?;
        let copy_stream = ctx
            .new_stream()
            .map_err(|e| driver_error(&device, "creating a copy stream", e))?;
        let comm_stream = ctx
            .new_stream()
            .map_err(|e| driver_error(&device, "creating a communication stream", e))?;
        Ok(Gpu {
            ordinal,
            ctx,
            stream,
            copy_stream,
            comm_stream,
            blas: Mutex::default(),
            dnn: Mutex::default(),
            module: Mutex::default(),
            functions: Mutex::default(),
        })
    })
    .map_err(|message| Error::Cuda {
        library: "CUDA driver",
        device: device.clone(),
        message,
    })?;
    let g = Arc::new(started);
    gpus.insert(ordinal, g.clone());
    Ok(g)
}

/// A driver error as dpm reports it; out-of-memory gets its own variant.
pub(crate) fn driver_error(device: &str, doing: &str, e: DriverError) -> Error {
    Error::Cuda {
        library: "CUDA driver",
        device: device.to_owned(),
        message: format!("{doing}: {e}"),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Gpu {
    /// The device, `cuda:N`.
    pub fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    /// The ordinal N of `cuda:N`.
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// The device's name, as the driver reports it.
    pub fn name(&self) -> Result<String> {
        self.ctx
            .name()
            .map_err(|e| driver_error(&self.device().to_string(), "reading the name", e))
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.bind()?;
        self.ctx
            .mem_get_info()
            .map_err(|e| driver_error(&self.device().to_string(), "reading free memory", e))
    }

    /// Makes this device's context current on the calling thread (each executor
    /// worker is a fresh thread).
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error(&self.device().to_string(), "binding the context", e))
    }

    /// A driver error on this device.
    pub(crate) fn error(&self, doing: &str, e: DriverError) -> Error {
        driver_error(&self.device().to_string(), doing, e)
    }

    /// An error of `library` on this device.
    pub(crate) fn lib_error(&self, library: &'static str, message: impl Into<String>) -> Error {
        Error::Cuda {
            library,
            device: self.device().to_string(),
            message: message.into(),
        }
    }

    /// Waits for all work enqueued on the device; reports errors it raised.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // With NCCL communicators, a wait that a dead peer could make endless is
        // watched instead (timeout, asynchronous errors, abort).
        if crate::comm::nccl::active() {
            let ends = [&self.stream, &self.comm_stream].map(|s| {
                s.record_event(None)
                    .map_err(|e| self.error("recording an event", e))
            });
            let [a, b] = ends;
            return crate::comm::nccl::wait_watched(&self.device().to_string(), &[a?, b?]);
        }
        self.stream
            .synchronize()
            .and_then(|()| self.comm_stream.synchronize())
            .map_err(|e| self.error("finishing the enqueued work", e))
    }

    /// An event recorded now on the device's stream, with timing (for the
    /// profiler: the time between two is the device's work between them).
    pub(crate) fn timing_event(&self) -> Result<cudarc::driver::CudaEvent> {
        self.bind()?;
        self.stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| self.error("recording a timing event", e))
    }

    /// The cuBLAS handle (created on first use), bound to the device's stream.
    pub(crate) fn blas(&self) -> Result<MutexGuard<'_, Option<CudaBlas>>> {
        let mut b = lock(&self.blas);
        if b.is_none() {
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err(self.lib_error(
                    "cuBLAS",
                    "libcublas could not be loaded; install cuBLAS (CUDA 13) or add its folder to LD_LIBRARY_PATH",
                ));
            }
            let stream = self.stream.clone();
            let handle = guarded(|| {
                CudaBlas::new(stream)
                    .map_err(|e| self.lib_error("cuBLAS", format!("creating the handle: {e}")))
            })
            .map_err(|m| self.lib_error("cuBLAS", m))?;
            *b = Some(handle);
        }
        Ok(b)
    }

    /// The cuDNN handle and its caches (created on first use).
    pub(crate) fn dnn(&self) -> Result<MutexGuard<'_, Option<Dnn>>> {
        let mut d = lock(&self.dnn);
        if d.is_none() {
            let dnn = guarded(|| Dnn::new(self)).map_err(|m| self.lib_error("cuDNN", m))?;
            *d = Some(dnn);
        }
        Ok(d)
    }

    /// Kernel `name` of [`super::kernels::SOURCE`], compiled (once per process) for
    /// this device's architecture and loaded (once per device).
    pub(crate) fn function(&self, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = lock(&self.functions).get(name) {
            return Ok(f.clone());
        }
        let module = {
            let mut m = lock(&self.module);
            match &*m {
                Some(module) => module.clone(),
                None => {
                    let (major, minor) = self
                        .ctx
                        .compute_capability()
                        .map_err(|e| self.error("reading the compute capability", e))?;
                    let ptx = super::kernels::ptx(major, minor).map_err(|m| self.lib_error("NVRTC", m))?;
                    let module = guarded(|| {
                        self.ctx
                            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                            .map_err(|e| self.error("loading the kernels", e))
                    })
                    .map_err(|m| self.lib_error("CUDA driver", m))?;
                    *m = Some(module.clone());
                    module
                }
            }
        };
        let f = module
            .load_function(name)
            .map_err(|e| self.error(&format!("finding kernel `{name}`"), e))?;
        lock(&self.functions).insert(name, f.clone());
        Ok(f)
    }

    /// Launches `name` over `n` elements (one thread each, grid-stride) with the
    /// given arguments, which the kernel takes after its element count.
    pub(crate) fn launch_elementwise(
        &self,
        name: &'static str,
        n: usize,
        args: &[&dyn KernelArg],
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let blocks = n.div_ceil(256).min(65_535 * 8) as u32;
        self.launch(
            name,
            LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[&(n as u64)],
            args,
        )
    }

    /// Launches `name` with `cfg`; its arguments are `head` then `args`.
    pub(crate) fn launch(
        &self,
        name: &'static str,
        cfg: LaunchConfig,
        head: &[&dyn KernelArg],
        args: &[&dyn KernelArg],
    ) -> Result<()> {
        self.bind()?;
        let f = self.function(name)?;
        let mut b = self.stream.launch_builder(&f);
        for a in head.iter().chain(args) {
            a.push(&mut b);
        }
        // SAFETY: every kernel of kernels.cu takes exactly the arguments its Rust
        // caller passes (pointers checked against the tensors' sizes).
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| self.error(&format!("launching `{name}`"), e))
    }
}

/// A value a kernel takes: device pointers (`u64`), sizes, scalars.
#[doc(hidden)]
pub trait KernelArg {
    /// Appends the value to a launch.
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}

macro_rules! kernel_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
                b.arg(self);
            }
        }
    )*};
}
kernel_arg!(u64, i32, u32, f32, f64);
