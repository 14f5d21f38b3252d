//! [`ModelHelper`]: an init net and a train net, with the bookkeeping Caffe2's
//! `ModelHelper` did (ordered parameters, computed parameters, parameter →
//! gradient), layer helpers (`layers.rs`) and optimisers (`optimizer.rs`).

mod layers;
mod optimizer;

pub use layers::ConvSpec;
pub use optimizer::{Adagrad, Adam, LrPolicy, RmsProp, Sgd};

use crate::autodiff::{self, GradientMap};
use crate::error::{Error, Result};
use crate::graph::{BlobRef, Device, Net};
use crate::tensor::Shape;

/// How a parameter is initialised in the init net.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Every element the same.
    Constant(f32),
    /// Normal(mean, std).
    Gaussian {
        /// Mean.
        mean: f32,
        /// Standard deviation.
        std: f32,
    },
    /// Uniform(±√(3 / fan_in)).
    Xavier,
    /// Normal(0, √(2 / fan_out)), for layers followed by ReLU.
    Msra,
}

/// A model under construction: what to initialise, what to run each step, and
/// which blobs are parameters.
#[derive(Clone, Debug)]
pub struct ModelHelper {
    name: String,
    init_net: Net,
    net: Net,
    params: Vec<BlobRef>,
    computed_params: Vec<BlobRef>,
    optimizer_state: Vec<BlobRef>,
    param_to_grad: GradientMap,
    seed: u64,
    init_params: bool,
    is_test: bool,
    /// Parameters weight decay leaves alone when an optimiser is asked to
    /// (biases, batch-norm scales and shifts).
    decay_exempt: Vec<BlobRef>,
    /// Learning-rate multipliers by parameter name relative to the device scope.
    lr_multipliers: std::collections::BTreeMap<String, f32>,
    /// Convolutions added get `deterministic: 1`.
    deterministic: bool,
    /// Blob names refused inside a replica (see `relative_name_error`), reported
    /// by `Parallelize::build`.
    bad_names: NameLog,
    /// Per-sample shapes of inputs declared with `input_with_shape`, by full
    /// name: what a summary or an export feeds when no batch has been seen.
    input_shapes: std::collections::BTreeMap<String, crate::tensor::Shape>,
}

/// Names a builder gave that break the device-scope rule, with the reason.
#[derive(Debug, Default)]
struct NameLog(std::sync::Mutex<Vec<(String, String)>>);

impl Clone for NameLog {
    fn clone(&self) -> Self {
        NameLog(std::sync::Mutex::new(
            self.0.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        ))
    }
}

impl ModelHelper {
    /// An empty model; its nets are `<name>_init` and `<name>`.
    pub fn new(name: &str) -> Self {
        ModelHelper {
            name: name.to_owned(),
            init_net: Net::new(&format!("{name}_init")),
            net: Net::new(name),
            params: Vec::new(),
            computed_params: Vec::new(),
            optimizer_state: Vec::new(),
            param_to_grad: GradientMap::default(),
            seed: 0,
            init_params: true,
            is_test: false,
            bad_names: NameLog::default(),
            input_shapes: Default::default(),
            decay_exempt: Vec::new(),
            lr_multipliers: Default::default(),
            deterministic: false,
        }
    }

    /// Notes the per-sample shape of input `blob` (a full name).
    pub fn note_input_shape(&mut self, blob: &str, shape: crate::tensor::Shape) {
        self.input_shapes.insert(blob.to_owned(), shape);
    }

    /// The per-sample shape noted for input `blob` (a full name), if any.
    pub fn input_shape(&self, blob: &str) -> Option<&crate::tensor::Shape> {
        self.input_shapes.get(blob)
    }

    /// Scales the learning rate of parameter `name` (relative to the device
    /// scope, e.g. `"fc1_w"`: every replica's copy) by `multiplier`, for every
    /// optimiser (Caffe2's `lr_mult`); 0 freezes it. A name that no parameter has
    /// is an error when the optimiser is built.
    pub fn set_lr_multiplier(&mut self, name: &str, multiplier: f32) -> &mut Self {
        self.lr_multipliers.insert(name.to_owned(), multiplier);
        self
    }

    /// The learning-rate multipliers set, by parameter name.
    pub fn lr_multipliers(&self) -> &std::collections::BTreeMap<String, f32> {
        &self.lr_multipliers
    }

    /// The learning-rate multiplier of `param` (1 unless set).
    pub fn lr_multiplier(&self, param: &BlobRef) -> f32 {
        self.lr_multipliers
            .get(param.short_name())
            .copied()
            .unwrap_or(1.0)
    }

    /// Makes every convolution added from now on deterministic (Caffe2's
    /// `deterministic` argument): on a GPU only cuDNN algorithms that give the
    /// same bits on every run, so that a rerun, or a run resumed from a
    /// checkpoint, reproduces the original to the bit. Some shapes are slower.
    /// CPU kernels are deterministic either way.
    pub fn set_deterministic(&mut self, on: bool) -> &mut Self {
        self.deterministic = on;
        self
    }

    /// Whether convolutions are added deterministic.
    pub fn is_deterministic(&self) -> bool {
        self.deterministic
    }

    /// Marks `param` as one that weight decay skips when the optimiser is built
    /// with `skip_decay_on_biases_and_norms(true)` (the layers mark their biases
    /// and batch-norm parameters).
    pub fn exempt_from_weight_decay(&mut self, param: &BlobRef) {
        if !self.decay_exempt.contains(param) {
            self.decay_exempt.push(param.clone());
        }
    }

    /// Whether `param` is marked by [`ModelHelper::exempt_from_weight_decay`].
    pub fn is_exempt_from_weight_decay(&self, param: &BlobRef) -> bool {
        self.decay_exempt.contains(param)
    }

    /// A model for evaluation: layers run in inference mode (batch norm uses its
    /// running statistics) and parameters are not initialised, since they are
    /// shared with a training model in the same workspace (Caffe2's
    /// `init_params=False`).
    pub fn new_test(name: &str) -> Self {
        let mut m = Self::new(name);
        m.init_params = false;
        m.is_test = true;
        m
    }

    /// Whether layers are built in inference mode.
    pub fn is_test(&self) -> bool {
        self.is_test
    }

    /// Sets the seed of every random initialiser added from now on.
    pub fn set_seed(&mut self, seed: u64) -> &mut Self {
        self.seed = seed;
        self
    }

    /// The seed of random initialisers (and dropout masks).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The net that initialises parameters, run once.
    pub fn init_net(&self) -> &Net {
        &self.init_net
    }

    /// The init net, mutably.
    pub fn init_net_mut(&mut self) -> &mut Net {
        &mut self.init_net
    }

    /// The net run every step.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// The train net, mutably.
    pub fn net_mut(&mut self) -> &mut Net {
        &mut self.net
    }

    /// Trainable parameters, in creation order.
    pub fn params(&self) -> &[BlobRef] {
        &self.params
    }

    /// Parameters in the current name scope (what a per-device update builder updates).
    pub fn params_in_scope(&self) -> Vec<BlobRef> {
        let prefix = self.net.scope().prefix();
        self.params
            .iter()
            .filter(|p| p.name().starts_with(&prefix))
            .cloned()
            .collect()
    }

    /// Blobs computed by the net but kept across steps (running statistics).
    pub fn computed_params(&self) -> &[BlobRef] {
        &self.computed_params
    }

    /// Optimiser state (momenta, iteration counters): saved in checkpoints.
    pub fn optimizer_state(&self) -> &[BlobRef] {
        &self.optimizer_state
    }

    /// Gradients of the parameters, once [`ModelHelper::add_gradient_ops`] ran.
    pub fn param_to_grad(&self) -> &GradientMap {
        &self.param_to_grad
    }

    /// The full name of `name` in the current name scope.
    pub fn blob(&self, name: &str) -> BlobRef {
        if self.net.scope().in_replica() {
            if let Some(why) = crate::graph::relative_name_error(name) {
                self.bad_names
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((name.to_owned(), why));
            }
        }
        self.net.blob(name)
    }

    /// The first name refused since the last call (name, reason), clearing them.
    pub(crate) fn take_bad_name(&self) -> Option<(String, String)> {
        let mut log = self.bad_names.0.lock().unwrap_or_else(|e| e.into_inner());
        let first = log.first().cloned();
        log.clear();
        first
    }

    /// Runs `f` with both nets inside name scope `name`.
    pub fn name_scope<R>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> R) -> R {
        self.init_net.scope_mut().push_name(name);
        self.net.scope_mut().push_name(name);
        let r = f(self);
        self.init_net.scope_mut().pop_name();
        self.net.scope_mut().pop_name();
        r
    }

    /// Runs `f` with both nets' ops placed on `device`.
    pub fn device_scope<R>(&mut self, device: Device, f: impl FnOnce(&mut Self) -> R) -> R {
        self.init_net.scope_mut().push_device(device);
        self.net.scope_mut().push_device(device);
        let r = f(self);
        self.init_net.scope_mut().pop_device();
        self.net.scope_mut().pop_device();
        r
    }

    /// Creates parameter `name` (in the current scope) of `shape`, initialised by
    /// `init` in the init net.
    pub fn create_param(&mut self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<BlobRef> {
        let blob = self.blob(name);
        if self.params.contains(&blob) {
            return Err(Error::Config(format!("parameter `{blob}` already exists")));
        }
        let shape: Vec<i64> = shape.into().dims().iter().map(|&d| d as i64).collect();
        if !self.init_params {
            self.params.push(blob.clone());
            return Ok(blob);
        }
        // Random fills are seeded through the DeviceOption, as Caffe2 seeds
        // them (it ignores a `seed` argument).
        let seed = self.seed;
        let op = match init {
            Init::Constant(v) => self.init_net.op("ConstantFill").arg("value", v),
            Init::Gaussian { mean, std } => self
                .init_net
                .op("GaussianFill")
                .arg("mean", mean)
                .arg("std", std)
                .random_seed(seed),
            Init::Xavier => self.init_net.op("XavierFill").random_seed(seed),
            Init::Msra => self.init_net.op("MSRAFill").random_seed(seed),
        };
        op.output(&blob).arg("shape", shape).build();
        self.params.push(blob.clone());
        Ok(blob)
    }

    /// Creates a computed param (a blob the net updates itself, such as a running
    /// mean) filled with `value`, and registers it.
    pub fn create_computed_param(&mut self, name: &str, shape: impl Into<Shape>, value: f32) -> BlobRef {
        let blob = self.blob(name);
        if self.init_params {
            let shape: Vec<i64> = shape.into().dims().iter().map(|&d| d as i64).collect();
            self.init_net
                .op("ConstantFill")
                .output(&blob)
                .arg("shape", shape)
                .arg("value", value)
                .build();
        }
        self.add_computed_param(blob.clone());
        blob
    }

    /// Registers a blob the net computes and keeps across steps (e.g. running mean).
    pub fn add_computed_param(&mut self, blob: BlobRef) {
        if !self.computed_params.contains(&blob) {
            self.computed_params.push(blob);
        }
    }

    /// Registers optimiser state, saved in checkpoints with the parameters.
    pub fn add_optimizer_state(&mut self, blob: BlobRef) {
        if !self.optimizer_state.contains(&blob) {
            self.optimizer_state.push(blob);
        }
    }

    /// Differentiates the train net from `losses` with respect to every parameter.
    pub fn add_gradient_ops(&mut self, losses: &[BlobRef]) -> Result<&GradientMap> {
        let params = self.params.clone();
        self.param_to_grad = autodiff::add_gradient_ops(&mut self.net, losses, &params)?;
        Ok(&self.param_to_grad)
    }

    /// Replaces the gradient map (for layers that differentiate themselves).
    pub fn set_param_to_grad(&mut self, map: GradientMap) {
        self.param_to_grad = map;
    }
}
