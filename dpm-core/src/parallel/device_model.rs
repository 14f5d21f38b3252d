//! [`DeviceModel`]: the per-device view of a model that `#[data_parallel]`
//! functions build with, and [`Blob`], a handle branded with its device's scope.
//!
//! The brand is an invariant lifetime `'d` that only exists inside one call of a
//! builder (`for<'d> FnOnce(&mut DeviceModel<'d>)`): a `Blob<'d>` made while
//! building one device cannot be passed to another device's model, nor kept after
//! the build, so mixing namescopes is a compile error rather than Caffe2's
//! run-time exception.
//!
//! ```compile_fail
//! use dpm_core::parallel::{Blob, DeviceModel};
//! // Two devices' models have two distinct brands: this does not compile.
//! fn mix<'a, 'b>(a: &mut DeviceModel<'a>, b: &mut DeviceModel<'b>) {
//!     let x: Blob<'a> = a.input("data");
//!     b.relu(x).unwrap();
//! }
//! ```

use std::marker::PhantomData;

use crate::error::{Error, Result};
use crate::graph::{BlobRef, Device};
use crate::model::{ConvSpec, ModelHelper};
use crate::tensor::Shape;

/// Invariant in `'d`: neither shorter nor longer brands convert.
type Brand<'d> = PhantomData<fn(&'d ()) -> &'d ()>;

/// A blob of one device's replica. `Copy`, cheap, and only usable with the
/// [`DeviceModel`] that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blob<'d> {
    id: usize,
    brand: Brand<'d>,
}

/// The losses a forward function returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Losses<'d>(Vec<Blob<'d>>);

impl<'d> From<Blob<'d>> for Losses<'d> {
    fn from(b: Blob<'d>) -> Self {
        Losses(vec![b])
    }
}

impl<'d> From<Vec<Blob<'d>>> for Losses<'d> {
    fn from(v: Vec<Blob<'d>>) -> Self {
        Losses(v)
    }
}

impl<'d, const N: usize> From<[Blob<'d>; N]> for Losses<'d> {
    fn from(v: [Blob<'d>; N]) -> Self {
        Losses(v.to_vec())
    }
}

/// One device's replica under construction: the model helper inside the device's
/// scopes, plus the per-sample shape of each blob where known.
pub struct DeviceModel<'d> {
    model: &'d mut ModelHelper,
    device: Device,
    blobs: Vec<(BlobRef, Option<Shape>)>,
    brand: Brand<'d>,
}

impl<'d> DeviceModel<'d> {
    /// Runs `f` on `device`'s view of `model`, inside the device's scopes. The
    /// higher-ranked `'d` is what brands the blobs `f` creates.
    pub fn scope<R>(
        model: &mut ModelHelper,
        device: Device,
        f: impl for<'x> FnOnce(&mut DeviceModel<'x>) -> R,
    ) -> R {
        model.device_scope(device, |m| {
            m.name_scope(&device.namescope(), |m| {
                let mut dm = DeviceModel {
                    model: m,
                    device,
                    blobs: Vec::new(),
                    brand: PhantomData,
                };
                f(&mut dm)
            })
        })
    }

    /// Like [`DeviceModel::scope`], for a model helper already inside the device's
    /// scopes (what `Parallelize` hands its builders).
    pub fn within<R>(
        model: &mut ModelHelper,
        device: Device,
        f: impl for<'x> FnOnce(&mut DeviceModel<'x>) -> R,
    ) -> R {
        let mut dm = DeviceModel {
            model,
            device,
            blobs: Vec::new(),
            brand: PhantomData,
        };
        f(&mut dm)
    }

    pub(super) fn push_blob(&mut self, name: BlobRef, shape: Option<Shape>) -> Blob<'d> {
        self.blobs.push((name, shape));
        Blob {
            id: self.blobs.len() - 1,
            brand: PhantomData,
        }
    }

    /// The device this replica runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The full name of a blob (`cpu_0/fc1`).
    pub fn name(&self, b: Blob<'d>) -> &BlobRef {
        &self.blobs[b.id].0
    }

    /// The per-sample shape of a blob (without the batch dimension), if known.
    pub fn sample_shape(&self, b: Blob<'d>) -> Option<&Shape> {
        self.blobs[b.id].1.as_ref()
    }

    /// The underlying model helper, in this device's scopes: for ops the
    /// `DeviceModel` has no helper for. Names given to it as strings are relative to
    /// the device scope; [`DeviceModel::adopt`] turns its outputs into blobs.
    pub fn model(&mut self) -> &mut ModelHelper {
        self.model
    }

    /// A blob for an output made through [`DeviceModel::model`].
    pub fn adopt(&mut self, name: BlobRef, sample_shape: Option<Shape>) -> Blob<'d> {
        self.push_blob(name, sample_shape)
    }

    /// An input blob fed from outside (data, labels), of unknown shape.
    pub fn input(&mut self, name: &str) -> Blob<'d> {
        let b = self.model.blob(name);
        self.push_blob(b, None)
    }

    /// An input blob whose per-sample shape is `shape` (e.g. `[3, 32, 32]`), so
    /// that layers can size their parameters from it.
    pub fn input_with_shape(&mut self, name: &str, shape: impl Into<Shape>) -> Blob<'d> {
        let b = self.model.blob(name);
        let shape = shape.into();
        self.model.note_input_shape(b.as_ref(), shape.clone());
        self.push_blob(b, Some(shape))
    }

    pub(super) fn known_shape(&self, b: Blob<'d>, layer: &str) -> Result<Shape> {
        self.sample_shape(b).cloned().ok_or_else(|| {
            Error::Config(format!(
                "{layer}: the per-sample shape of `{}` is unknown; declare it with input_with_shape",
                self.name(b)
            ))
        })
    }

    /// Fully connected layer `name` with `dim_out` outputs; its input size comes from
    /// `x`'s per-sample shape.
    pub fn fc(&mut self, name: &str, x: Blob<'d>, dim_out: usize) -> Result<Blob<'d>> {
        let dim_in = self.known_shape(x, name)?.numel();
        let input = self.name(x).clone();
        let y = self.model.fc(name, &input, dim_in, dim_out)?;
        Ok(self.push_blob(y, Some(Shape::from([dim_out]))))
    }

    /// Convolution `name` with `dim_out` channels and a `kernel × kernel` window;
    /// set stride, padding, groups, bias on the returned builder.
    pub fn conv<'m>(
        &'m mut self,
        name: &str,
        x: Blob<'d>,
        dim_out: usize,
        kernel: usize,
    ) -> ConvBuilder<'m, 'd> {
        // dim_in is filled in by build(), from x's shape.
        let spec = ConvSpec::new(0, dim_out, kernel);
        ConvBuilder {
            m: self,
            name: name.to_owned(),
            x,
            spec,
        }
    }

    /// Spatial batch normalisation `name` (momentum 0.9, epsilon 1e-5); inference
    /// mode in a test model.
    pub fn spatial_bn(&mut self, name: &str, x: Blob<'d>) -> Result<Blob<'d>> {
        let shape = self.known_shape(x, name)?;
        let c = shape.dims().first().copied().unwrap_or(0);
        let input = self.name(x).clone();
        let y = self.model.spatial_bn(name, &input, c, 0.9, 1e-5)?;
        Ok(self.push_blob(y, Some(shape)))
    }

    /// Max pooling over `kernel × kernel` windows, into `<x>_maxpool` (or
    /// `<x>_maxpool_1`, … if taken).
    pub fn max_pool(&mut self, x: Blob<'d>, kernel: usize, stride: usize, pad: usize) -> Result<Blob<'d>> {
        let base = format!("{}_maxpool", self.name(x).short_name());
        let out = self.fresh_name(&base);
        self.max_pool_named(&out, x, kernel, stride, pad)
    }

    /// Max pooling over `kernel × kernel` windows, into `name`.
    pub fn max_pool_named(
        &mut self,
        name: &str,
        x: Blob<'d>,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Blob<'d>> {
        let shape = self.known_shape(x, "max_pool")?;
        let &[c, h, w] = shape.dims() else {
            return Err(Error::Config(format!(
                "max_pool: `{}` is not [C, H, W] per sample",
                self.name(x)
            )));
        };
        let input = self.name(x).clone();
        let y = self.model.max_pool(&input, name, kernel, stride, pad);
        let side = |n: usize| (n + 2 * pad).saturating_sub(kernel) / stride.max(1) + 1;
        Ok(self.push_blob(y, Some(Shape::from([c, side(h), side(w)]))))
    }

    /// Average over each channel's whole plane, into `<x>_gap`: `[C, H, W] → [C, 1, 1]`.
    pub fn global_average_pool(&mut self, x: Blob<'d>) -> Result<Blob<'d>> {
        let shape = self.known_shape(x, "global_average_pool")?;
        let input = self.name(x).clone();
        let out = self.fresh_name(&format!("{}_gap", input.short_name()));
        let y = self.model.global_average_pool(&input, &out);
        Ok(self.push_blob(y, Some(Shape::from([shape.dims()[0], 1, 1]))))
    }

    /// `a + b` (same shapes), into `name`: residual connections.
    pub fn add(&mut self, name: &str, a: Blob<'d>, b: Blob<'d>) -> Result<Blob<'d>> {
        let (sa, sb) = (self.sample_shape(a).cloned(), self.sample_shape(b).cloned());
        if let (Some(x), Some(y)) = (&sa, &sb) {
            if x != y {
                return Err(Error::Config(format!("add `{name}`: shapes {x} and {y} differ")));
            }
        }
        let (na, nb) = (self.name(a).clone(), self.name(b).clone());
        let y = self.model.add(&na, &nb, name);
        Ok(self.push_blob(y, sa.or(sb)))
    }

    /// A one-input op `op_type` of `x` into `name`, shaped like `x`.
    fn unary(
        &mut self,
        op_type: &str,
        name: &str,
        x: Blob<'d>,
        args: &[(&str, crate::graph::ArgValue)],
    ) -> Blob<'d> {
        let input = self.name(x).clone();
        let out = self.model.blob(name);
        let mut op = self.model.net_mut().op(op_type).input(&input).output(&out);
        for (k, v) in args {
            op = op.arg(k, v.clone());
        }
        op.build();
        let shape = self.blobs[x.id].1.clone();
        self.push_blob(out, shape)
    }

    /// `1/(1 + e^−x)` into `name`.
    pub fn sigmoid(&mut self, name: &str, x: Blob<'d>) -> Blob<'d> {
        self.unary("Sigmoid", name, x, &[])
    }

    /// `tanh x` into `name`.
    pub fn tanh(&mut self, name: &str, x: Blob<'d>) -> Blob<'d> {
        self.unary("Tanh", name, x, &[])
    }

    /// Softmax over each sample's values into `name` (no loss).
    pub fn softmax(&mut self, name: &str, x: Blob<'d>) -> Blob<'d> {
        self.unary("Softmax", name, x, &[])
    }

    /// Dropout of `x` with drop probability `ratio` into `name` (its mask into
    /// `<name>_mask`); the identity in a test model. Each replica draws its own
    /// mask from the model's seed.
    pub fn dropout(&mut self, name: &str, x: Blob<'d>, ratio: f32) -> Result<Blob<'d>> {
        if !(0.0..1.0).contains(&ratio) {
            return Err(Error::Config(format!(
                "dropout `{name}`: ratio {ratio} is not in [0, 1)"
            )));
        }
        let input = self.name(x).clone();
        let (out, mask) = (self.model.blob(name), self.model.blob(&format!("{name}_mask")));
        let seed = self.model.seed();
        let is_test = i64::from(self.model.is_test());
        self.model
            .net_mut()
            .op("Dropout")
            .input(&input)
            .outputs([&out, &mask])
            .arg("ratio", ratio)
            .arg("is_test", is_test)
            .random_seed(seed)
            .build();
        let shape = self.blobs[x.id].1.clone();
        Ok(self.push_blob(out, shape))
    }

    /// `a ⊙ b` (`Mul`), `a − b` (`Sub`) or `a / b` (`Div`), per `op_type`, into
    /// `name`; `b` may be broadcast over `a` as Caffe2 does (its shape a run of
    /// `a`'s trailing per-sample dimensions).
    pub fn arith(&mut self, op_type: &str, name: &str, a: Blob<'d>, b: Blob<'d>) -> Result<Blob<'d>> {
        if !matches!(op_type, "Mul" | "Sub" | "Div") {
            return Err(Error::Config(format!(
                "arith `{name}`: `{op_type}` is not Mul, Sub or Div"
            )));
        }
        let (sa, sb) = (self.sample_shape(a).cloned(), self.sample_shape(b).cloned());
        let (na, nb) = (self.name(a).clone(), self.name(b).clone());
        let out = self.model.blob(name);
        let mut op = self.model.net_mut().op(op_type).inputs([&na, &nb]).output(&out);
        if sa != sb {
            op = op.arg("broadcast", 1i64);
        }
        op.build();
        Ok(self.push_blob(out, sa))
    }

    /// `base`, or `base_1`, `base_2`, … if this replica already has a blob of that
    /// name: the names the helpers invent never collide.
    pub(super) fn fresh_name(&self, base: &str) -> String {
        let taken = |n: &str| {
            let full = self.model.blob(n);
            self.blobs.iter().any(|(b, _)| *b == full)
        };
        if !taken(base) {
            return base.to_owned();
        }
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !taken(n))
            .expect("an unused name")
    }

    /// Whether this replica is built for inference (a test model).
    pub fn is_test(&self) -> bool {
        self.model.is_test()
    }

    /// `max(x, 0)`, into `<x>_relu`.
    ///
    /// Called twice on one blob, the second output is `<x>_relu_1`, and so on:
    /// invented names never collide (see [`DeviceModel::relu_named`]).
    pub fn relu(&mut self, x: Blob<'d>) -> Result<Blob<'d>> {
        let input = self.name(x).clone();
        let out = self.fresh_name(&format!("{}_relu", input.short_name()));
        self.relu_named(&out, x)
    }

    /// `max(x, 0)`, into `name`.
    pub fn relu_named(&mut self, name: &str, x: Blob<'d>) -> Result<Blob<'d>> {
        let input = self.name(x).clone();
        let y = self.model.relu(&input, name);
        let shape = self.blobs[x.id].1.clone();
        Ok(self.push_blob(y, shape))
    }

    /// Softmax cross-entropy loss `name` of `logits` against integer `label`s;
    /// returns `(softmax, loss)`.
    pub fn softmax_with_loss(
        &mut self,
        name: &str,
        logits: Blob<'d>,
        label: Blob<'d>,
    ) -> Result<(Blob<'d>, Blob<'d>)> {
        let (l, y) = (self.name(logits).clone(), self.name(label).clone());
        let shape = self.blobs[logits.id].1.clone();
        let (p, loss) = self.model.softmax_with_loss(&l, &y, name);
        Ok((
            self.push_blob(p, shape),
            self.push_blob(loss, Some(Shape::from([]))),
        ))
    }

    /// Top-1 accuracy of `scores` against `label`, into `name`.
    pub fn accuracy(&mut self, name: &str, scores: Blob<'d>, label: Blob<'d>) -> Blob<'d> {
        let (s, y) = (self.name(scores).clone(), self.name(label).clone());
        let a = self.model.accuracy(&s, &y, name);
        self.push_blob(a, Some(Shape::from([])))
    }
}

/// A convolution being added by [`DeviceModel::conv`]; [`ConvBuilder::build`]
/// adds it. Its options are those of [`ConvSpec`].
#[must_use = "the convolution is only added by .build()"]
pub struct ConvBuilder<'m, 'd> {
    m: &'m mut DeviceModel<'d>,
    name: String,
    x: Blob<'d>,
    spec: ConvSpec,
}

impl<'d> ConvBuilder<'_, 'd> {
    /// Stride (default 1).
    pub fn stride(mut self, s: usize) -> Self {
        self.spec = self.spec.stride(s);
        self
    }

    /// Padding on every side (default 0).
    pub fn pad(mut self, p: usize) -> Self {
        self.spec = self.spec.pad(p);
        self
    }

    /// Channel groups (default 1).
    pub fn groups(mut self, g: usize) -> Self {
        self.spec = self.spec.groups(g);
        self
    }

    /// No bias (as before batch norm).
    pub fn no_bias(mut self) -> Self {
        self.spec = self.spec.no_bias();
        self
    }

    /// Adds the layer; its input size comes from `x`'s per-sample shape `[C, H, W]`.
    pub fn build(self) -> Result<Blob<'d>> {
        let shape = self.m.known_shape(self.x, &self.name)?;
        let &[c, h, w] = shape.dims() else {
            return Err(Error::Config(format!(
                "conv `{}`: input `{}` is not [C, H, W] per sample but {shape}",
                self.name,
                self.m.name(self.x)
            )));
        };
        let (k, s, p) = (self.spec.kernel, self.spec.stride, self.spec.pad);
        if h + 2 * p < k || w + 2 * p < k || s == 0 {
            return Err(Error::Config(format!(
                "conv `{}`: a {k}×{k} window (stride {s}, pad {p}) does not fit {shape}",
                self.name
            )));
        }
        let spec = ConvSpec {
            dim_in: c,
            ..self.spec
        };
        let input = self.m.name(self.x).clone();
        let y = self.m.model.conv(&self.name, &input, spec)?;
        let out = Shape::from([spec.dim_out, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1]);
        Ok(self.m.push_blob(y, Some(out)))
    }
}

/// What a forward function may return: [`Losses`], one [`Blob`], a `Vec` of blobs,
/// or a `Result` of any of them (also through a type alias).
#[diagnostic::on_unimplemented(
    message = "a forward function returns its losses: `{Self}` is not Result<Losses<'_>>, Losses<'_>, Blob<'_>, Vec<Blob<'_>> or a Result of one",
    label = "the losses a #[data_parallel] forward function returns"
)]
pub trait IntoLosses<'d> {
    /// The losses' full names.
    fn into_losses(self, m: &DeviceModel<'d>) -> Result<Vec<BlobRef>>;
}

impl<'d> IntoLosses<'d> for Losses<'d> {
    /// A loss whose per-sample shape is known must be one number.
    fn into_losses(self, m: &DeviceModel<'d>) -> Result<Vec<BlobRef>> {
        self.0
            .into_iter()
            .map(|b| match m.sample_shape(b) {
                Some(s) if s.numel() != 1 => Err(Error::Config(format!(
                    "the loss `{}` is not a scalar: its per-sample shape is {s} (a loss is one number per batch; \
                     return what softmax_with_loss gives, say)",
                    m.name(b)
                ))),
                _ => Ok(m.name(b).clone()),
            })
            .collect()
    }
}

impl<'d> IntoLosses<'d> for Blob<'d> {
    fn into_losses(self, m: &DeviceModel<'d>) -> Result<Vec<BlobRef>> {
        Losses::from(self).into_losses(m)
    }
}

impl<'d> IntoLosses<'d> for Vec<Blob<'d>> {
    fn into_losses(self, m: &DeviceModel<'d>) -> Result<Vec<BlobRef>> {
        Losses::from(self).into_losses(m)
    }
}

impl<'d, T: IntoLosses<'d>> IntoLosses<'d> for Result<T> {
    fn into_losses(self, m: &DeviceModel<'d>) -> Result<Vec<BlobRef>> {
        self?.into_losses(m)
    }
}

/// What an input or update function may return: `()` or `Result<()>`.
#[diagnostic::on_unimplemented(
    message = "an input or update function returns `()` or `Result<()>`, not `{Self}`",
    label = "what the #[data_parallel] function returns"
)]
pub trait IntoUnit {
    /// As a `Result`.
    fn into_unit(self) -> Result<()>;
}

impl IntoUnit for () {
    fn into_unit(self) -> Result<()> {
        Ok(())
    }
}

impl IntoUnit for Result<()> {
    fn into_unit(self) -> Result<()> {
        self
    }
}
