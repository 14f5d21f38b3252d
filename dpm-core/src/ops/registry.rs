//! The kernel registry: `(op type, device type)` → factory.

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock, RwLockReadGuard};

use super::Kernel;
use crate::error::{Error, Result};
use crate::graph::DeviceType;
use crate::proto::OperatorDef;

/// Builds a kernel from an op definition, checking its arguments and arity.
pub type KernelFactory = fn(&OperatorDef) -> Result<Box<dyn Kernel>>;

/// All kernels dpm knows, keyed by op type and device type.
#[derive(Default)]
pub struct Registry {
    kernels: HashMap<DeviceType, HashMap<&'static str, KernelFactory>>,
    /// Kernels for one engine (Caffe2's `OperatorDef.engine`), e.g. the MPI
    /// all-reduce: `(device, op type, engine)`.
    engines: HashMap<(DeviceType, &'static str, &'static str), KernelFactory>,
}

impl Registry {
    fn global_lock() -> &'static RwLock<Registry> {
        static GLOBAL: OnceLock<RwLock<Registry>> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            let mut r = Registry::default();
            super::cpu::register(&mut r);
            #[cfg(feature = "cuda")]
            super::cuda::register(&mut r);
            crate::comm::register(&mut r);
            RwLock::new(r)
        })
    }

    /// The registry every net is compiled against: the built-in kernels plus any
    /// added with [`Registry::register_global`].
    pub fn global() -> RwLockReadGuard<'static, Registry> {
        Self::global_lock().read().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or replaces) a kernel for every workspace: how a user brings a custom op.
    pub fn register_global(op_type: &'static str, device: DeviceType, factory: KernelFactory) {
        Self::global_lock()
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .register(op_type, device, factory);
    }

    /// Registers `factory` for `op_type` on `device`.
    pub fn register(&mut self, op_type: &'static str, device: DeviceType, factory: KernelFactory) {
        self.kernels.entry(device).or_default().insert(op_type, factory);
    }

    /// Registers `factory` for `op_type` on `device` when the op names `engine`.
    pub fn register_engine(
        &mut self,
        op_type: &'static str,
        device: DeviceType,
        engine: &'static str,
        factory: KernelFactory,
    ) {
        self.engines.insert((device, op_type, engine), factory);
    }

    /// Whether a kernel exists.
    pub fn has(&self, op_type: &str, device: DeviceType) -> bool {
        self.factory(op_type, device).is_some()
    }

    /// Builds the kernel of `op` for `device`.
    /// An op naming an engine gets that engine's kernel. Without one, compute ops
    /// fall back to the default kernel (as in Caffe2), but collectives are an
    /// error: a reduction over fewer processes than asked would be silently wrong.
    pub fn create(&self, op: &OperatorDef, device: DeviceType) -> Result<Box<dyn Kernel>> {
        let op_type = op.op_type();
        if let Some(engine) = op.engine.as_deref().filter(|e| !e.is_empty()) {
            let key = (device, op_type, engine);
            if let Some((_, f)) = self.engines.iter().find(|(k, _)| **k == key) {
                return f(op);
            }
            if crate::comm::is_collective(op_type) {
                return Err(Error::UnknownOp {
                    op_type: format!("{op_type} with engine {engine}"),
                    device: format!(
                        "{device}{}",
                        if engine == "MPI" {
                            " (this build has no MPI support: rebuild with `--features mpi`)"
                        } else {
                            ""
                        }
                    ),
                });
            }
        }
        match self.factory(op_type, device) {
            Some(f) => f(op),
            #[cfg(not(feature = "cuda"))]
            None if device == DeviceType::Cuda => Err(Error::NotCompiledWithCuda(format!(
                "op `{op_type}` on a CUDA device"
            ))),
            None => Err(Error::UnknownOp {
                op_type: op_type.to_owned(),
                device: device.to_string(),
            }),
        }
    }

    fn factory(&self, op_type: &str, device: DeviceType) -> Option<KernelFactory> {
        self.kernels.get(&device)?.get(op_type).copied()
    }

    /// The op types registered for `device`, sorted.
    pub fn op_types(&self, device: DeviceType) -> Vec<&'static str> {
        let mut v: Vec<_> = self
            .kernels
            .get(&device)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }
}
