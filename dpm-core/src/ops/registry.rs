//! The op registry: for each op type, its [`OpSchema`] — kernels per device type
//! (and engine), gradient rule, which outputs carry no gradient, arity. The
//! built-in ops register theirs at start-up (`cpu::register`, `cuda::register`,
//! `comm::register`, `autodiff::rules::register`); a crate outside dpm adds an op
//! with one [`Registry::register_op`].

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::{OnceLock, RwLock, RwLockReadGuard};

use super::Kernel;
use crate::autodiff::GradientRule;
use crate::error::{Error, Result};
use crate::graph::DeviceType;
use crate::proto::OperatorDef;

/// Builds a kernel from an op definition, checking its arguments and arity.
pub type KernelFactory = fn(&OperatorDef) -> Result<Box<dyn Kernel>>;

/// Whether gradients flow through an op, and how.
#[derive(Clone, Copy, Debug, Default)]
pub enum Differentiability {
    /// Gradients flow, but no rule is known: autodiff through it is an error.
    #[default]
    Unknown,
    /// Gradients flow through this rule.
    Rule(GradientRule),
    /// No output carries a gradient (fills, metrics, counters, updates).
    None,
}

/// Everything dpm knows about one op type.
#[derive(Clone, Debug)]
pub struct OpSchema {
    op_type: &'static str,
    kernels: HashMap<(DeviceType, Option<&'static str>), KernelFactory>,
    gradient: Differentiability,
    non_differentiable_outputs: Vec<usize>,
    inputs: RangeInclusive<usize>,
    outputs: RangeInclusive<usize>,
}

impl OpSchema {
    /// An op type with no kernel, no gradient rule, and any arity.
    pub fn new(op_type: &'static str) -> Self {
        OpSchema {
            op_type,
            kernels: HashMap::new(),
            gradient: Differentiability::Unknown,
            non_differentiable_outputs: Vec::new(),
            inputs: 0..=usize::MAX,
            outputs: 0..=usize::MAX,
        }
    }

    /// The kernel for `device`.
    pub fn kernel(mut self, device: DeviceType, factory: KernelFactory) -> Self {
        self.kernels.insert((device, None), factory);
        self
    }

    /// The kernel for `device` when the op names `engine` (Caffe2's
    /// `OperatorDef.engine`), e.g. the MPI all-reduce.
    pub fn engine_kernel(mut self, device: DeviceType, engine: &'static str, factory: KernelFactory) -> Self {
        self.kernels.insert((device, Some(engine)), factory);
        self
    }

    /// How gradients flow through the op.
    pub fn gradient(mut self, rule: GradientRule) -> Self {
        self.gradient = Differentiability::Rule(rule);
        self
    }

    /// No output carries a gradient.
    pub fn not_differentiable(mut self) -> Self {
        self.gradient = Differentiability::None;
        self
    }

    /// Outputs that carry no gradient although the op is differentiable
    /// (statistics, say).
    pub fn non_differentiable_outputs(mut self, outputs: &[usize]) -> Self {
        self.non_differentiable_outputs = outputs.to_vec();
        self
    }

    /// The numbers of inputs and outputs an op of this type may have; checked
    /// when a net is created.
    pub fn arity(mut self, inputs: RangeInclusive<usize>, outputs: RangeInclusive<usize>) -> Self {
        self.inputs = inputs;
        self.outputs = outputs;
        self
    }

    /// The op type.
    pub fn op_type(&self) -> &'static str {
        self.op_type
    }

    /// How gradients flow through the op.
    pub fn differentiability(&self) -> Differentiability {
        self.gradient
    }

    /// The outputs that carry no gradient.
    pub fn nondifferentiable_outputs(&self) -> &[usize] {
        &self.non_differentiable_outputs
    }

    /// Folds `other`'s parts into this schema (later registrations win).
    fn merge(&mut self, other: OpSchema) {
        self.kernels.extend(other.kernels);
        if !matches!(other.gradient, Differentiability::Unknown) {
            self.gradient = other.gradient;
        }
        if !other.non_differentiable_outputs.is_empty() {
            self.non_differentiable_outputs = other.non_differentiable_outputs;
        }
        if other.inputs != (0..=usize::MAX) || other.outputs != (0..=usize::MAX) {
            self.inputs = other.inputs;
            self.outputs = other.outputs;
        }
    }
}

/// All ops dpm knows, by op type.
#[derive(Default)]
pub struct Registry {
    schemas: HashMap<&'static str, OpSchema>,
}

impl Registry {
    /// The built-in ops.
    pub fn builtin() -> Registry {
        let mut r = Registry::default();
        super::cpu::register(&mut r);
        #[cfg(feature = "cuda")]
        super::cuda::register(&mut r);
        crate::comm::register(&mut r);
        crate::autodiff::rules::register(&mut r);
        r
    }

    fn global_lock() -> &'static RwLock<Registry> {
        static GLOBAL: OnceLock<RwLock<Registry>> = OnceLock::new();
        GLOBAL.get_or_init(|| RwLock::new(Registry::builtin()))
    }

    /// The registry every net is compiled against: the built-in ops plus any
    /// added with [`Registry::register_op`] or [`Registry::register_global`].
    pub fn global() -> RwLockReadGuard<'static, Registry> {
        Self::global_lock().read().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an op for every workspace and every autodiff: how a crate outside dpm
    /// brings an op with its kernels and gradient rule (see the `custom_op`
    /// example). Parts of an existing schema it leaves unset are kept.
    pub fn register_op(schema: OpSchema) {
        Self::global_lock()
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .add(schema);
    }

    /// Adds (or replaces) one kernel for every workspace.
    pub fn register_global(op_type: &'static str, device: DeviceType, factory: KernelFactory) {
        Self::register_op(OpSchema::new(op_type).kernel(device, factory));
    }

    /// Adds `schema`, merged into any schema of its op type.
    pub fn add(&mut self, schema: OpSchema) {
        match self.schemas.get_mut(schema.op_type) {
            Some(s) => s.merge(schema),
            None => {
                self.schemas.insert(schema.op_type, schema);
            }
        }
    }

    /// Registers `factory` for `op_type` on `device`.
    pub fn register(&mut self, op_type: &'static str, device: DeviceType, factory: KernelFactory) {
        self.add(OpSchema::new(op_type).kernel(device, factory));
    }

    /// Registers `factory` for `op_type` on `device` when the op names `engine`.
    pub fn register_engine(
        &mut self,
        op_type: &'static str,
        device: DeviceType,
        engine: &'static str,
        factory: KernelFactory,
    ) {
        self.add(OpSchema::new(op_type).engine_kernel(device, engine, factory));
    }

    /// The schema of `op_type`, if registered.
    pub fn schema(&self, op_type: &str) -> Option<&OpSchema> {
        self.schemas.get(op_type)
    }

    /// Whether a kernel exists.
    pub fn has(&self, op_type: &str, device: DeviceType) -> bool {
        self.factory(op_type, device, None).is_some()
    }

    fn factory(&self, op_type: &str, device: DeviceType, engine: Option<&str>) -> Option<KernelFactory> {
        let s = self.schemas.get(op_type)?;
        s.kernels
            .iter()
            .find(|((d, e), _)| *d == device && e.as_deref() == engine)
            .map(|(_, f)| *f)
    }

    /// Builds the kernel of `op` for `device`, after checking its arity against
    /// the schema. An op naming an engine gets that engine's kernel. Without one,
    /// compute ops fall back to the default kernel (as in Caffe2), but
    /// collectives are an error: a reduction over fewer processes than asked
    /// would be silently wrong.
    pub fn create(&self, op: &OperatorDef, device: DeviceType) -> Result<Box<dyn Kernel>> {
        let op_type = op.op_type();
        if let Some(s) = self.schemas.get(op_type) {
            super::check_arity("inputs", op.input.len(), s.inputs.clone())?;
            super::check_arity("outputs", op.output.len(), s.outputs.clone())?;
        }
        if let Some(engine) = op.engine.as_deref().filter(|e| !e.is_empty()) {
            if let Some(f) = self.factory(op_type, device, Some(engine)) {
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
        match self.factory(op_type, device, None) {
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

    /// The op types with a kernel for `device`, sorted.
    pub fn op_types(&self, device: DeviceType) -> Vec<&'static str> {
        let mut v: Vec<_> = self
            .schemas
            .values()
            .filter(|s| s.kernels.keys().any(|(d, _)| *d == device))
            .map(|s| s.op_type)
            .collect();
        v.sort_unstable();
        v
    }

    /// The op types with a gradient rule, sorted.
    pub fn differentiable_ops(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self
            .schemas
            .values()
            .filter(|s| matches!(s.gradient, Differentiability::Rule(_)))
            .map(|s| s.op_type)
            .collect();
        v.sort_unstable();
        v
    }
}
