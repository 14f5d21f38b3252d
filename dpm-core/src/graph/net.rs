//! The [`Net`] builder: appends operators to a `NetDef` under the current scopes.

use super::{ArgValue, BlobRef, Device, Scope};
use crate::proto::{Argument, NetDef, OperatorDef};

/// Something that names a blob: a `&str`/`String` is relative to the current name
/// scope, a [`BlobRef`] is absolute.
pub trait IntoBlob {
    /// The full name, resolved in `scope`.
    fn into_blob(self, scope: &Scope) -> BlobRef;
}

impl IntoBlob for &str {
    fn into_blob(self, scope: &Scope) -> BlobRef {
        scope.blob(self)
    }
}
impl IntoBlob for String {
    fn into_blob(self, scope: &Scope) -> BlobRef {
        scope.blob(&self)
    }
}
impl IntoBlob for &String {
    fn into_blob(self, scope: &Scope) -> BlobRef {
        scope.blob(self)
    }
}
impl IntoBlob for BlobRef {
    fn into_blob(self, _: &Scope) -> BlobRef {
        self
    }
}
impl IntoBlob for &BlobRef {
    fn into_blob(self, _: &Scope) -> BlobRef {
        self.clone()
    }
}

/// A net under construction, with its own name and device scopes.
#[derive(Clone, Debug, Default)]
pub struct Net {
    def: NetDef,
    scope: Scope,
}

impl Net {
    /// An empty net called `name`.
    pub fn new(name: &str) -> Self {
        Net {
            def: NetDef {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            scope: Scope::default(),
        }
    }

    /// Continues building an existing net.
    pub fn from_proto(def: NetDef) -> Self {
        Net {
            def,
            scope: Scope::default(),
        }
    }

    /// The net as built so far.
    pub fn proto(&self) -> &NetDef {
        &self.def
    }

    /// The net, mutably: for passes that rewrite it.
    pub fn proto_mut(&mut self) -> &mut NetDef {
        &mut self.def
    }

    /// The finished `NetDef`.
    pub fn into_proto(self) -> NetDef {
        self.def
    }

    /// The ops added so far.
    pub fn ops(&self) -> &[OperatorDef] {
        &self.def.op
    }

    /// The current scope.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The current scope, mutably (to push and pop by hand).
    pub fn scope_mut(&mut self) -> &mut Scope {
        &mut self.scope
    }

    /// The full name of `name` in the current name scope.
    pub fn blob(&self, name: &str) -> BlobRef {
        self.scope.blob(name)
    }

    /// Runs `f` inside name scope `name`.
    pub fn name_scope<R>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> R) -> R {
        self.scope.push_name(name);
        let r = f(self);
        self.scope.pop_name();
        r
    }

    /// Runs `f` with ops placed on `device`.
    pub fn device_scope<R>(&mut self, device: Device, f: impl FnOnce(&mut Self) -> R) -> R {
        self.scope.push_device(device);
        let r = f(self);
        self.scope.pop_device();
        r
    }

    /// Starts an operator of type `op_type`.
    pub fn op(&mut self, op_type: &str) -> OpBuilder<'_> {
        let device_option = self.scope.device().map(Device::to_proto);
        OpBuilder {
            net: self,
            op: OperatorDef {
                r#type: Some(op_type.to_owned()),
                device_option,
                ..Default::default()
            },
        }
    }

    /// Appends a finished operator as is.
    pub fn push(&mut self, op: OperatorDef) {
        self.def.op.push(op);
    }

    /// Selects the executor: `"simple"` or `"dag"`.
    pub fn set_type(&mut self, net_type: &str) -> &mut Self {
        self.def.r#type = Some(net_type.to_owned());
        self
    }

    /// Sets the DAG executor's worker count.
    pub fn set_num_workers(&mut self, n: usize) -> &mut Self {
        self.def.num_workers = Some(n as i32);
        self
    }

    /// Sets (or replaces) a net-level argument.
    pub fn set_arg(&mut self, name: &str, value: impl Into<ArgValue>) -> &mut Self {
        let a = value.into().to_proto(name);
        set_argument(&mut self.def.arg, a);
        self
    }

    /// Declares a blob the net reads but does not create.
    pub fn add_external_input(&mut self, blob: impl IntoBlob) -> BlobRef {
        let b = blob.into_blob(&self.scope);
        if !self.def.external_input.iter().any(|x| x == b.name()) {
            self.def.external_input.push(b.name().to_owned());
        }
        b
    }

    /// Declares a blob the net produces for its caller.
    pub fn add_external_output(&mut self, blob: impl IntoBlob) -> BlobRef {
        let b = blob.into_blob(&self.scope);
        if !self.def.external_output.iter().any(|x| x == b.name()) {
            self.def.external_output.push(b.name().to_owned());
        }
        b
    }

    /// Declares as external inputs every blob an op reads before any op of the
    /// net writes it (parameters, fed data, state), in the order first read, as
    /// a Caffe2 runtime expects them listed.
    pub fn declare_external_inputs(&mut self) {
        let mut written = std::collections::HashSet::new();
        let mut reads = Vec::new();
        for op in &self.def.op {
            for i in &op.input {
                if !written.contains(i.as_str()) && !reads.contains(i) {
                    reads.push(i.clone());
                }
            }
            written.extend(op.output.iter().map(String::as_str));
        }
        for r in reads {
            if !self.def.external_input.contains(&r) {
                self.def.external_input.push(r);
            }
        }
    }
}

pub(crate) fn set_argument(args: &mut Vec<Argument>, a: Argument) {
    match args.iter_mut().find(|x| x.name == a.name) {
        Some(x) => *x = a,
        None => args.push(a),
    }
}

/// One operator being added to a [`Net`]; [`OpBuilder::build`] appends it.
#[must_use = "an op is only added to the net by .build()"]
pub struct OpBuilder<'n> {
    net: &'n mut Net,
    op: OperatorDef,
}

impl OpBuilder<'_> {
    /// Adds an input.
    pub fn input(mut self, blob: impl IntoBlob) -> Self {
        let b = blob.into_blob(&self.net.scope);
        self.op.input.push(b.into());
        self
    }

    /// Adds several inputs.
    pub fn inputs<B: IntoBlob>(mut self, blobs: impl IntoIterator<Item = B>) -> Self {
        for b in blobs {
            self = self.input(b);
        }
        self
    }

    /// Adds an output.
    pub fn output(mut self, blob: impl IntoBlob) -> Self {
        let b = blob.into_blob(&self.net.scope);
        self.op.output.push(b.into());
        self
    }

    /// Adds several outputs.
    pub fn outputs<B: IntoBlob>(mut self, blobs: impl IntoIterator<Item = B>) -> Self {
        for b in blobs {
            self = self.output(b);
        }
        self
    }

    /// Sets an argument.
    pub fn arg(mut self, name: &str, value: impl Into<ArgValue>) -> Self {
        set_argument(&mut self.op.arg, value.into().to_proto(name));
        self
    }

    /// Sets arguments given as protos (replacing any of the same names).
    pub fn raw_args(mut self, args: impl IntoIterator<Item = crate::proto::Argument>) -> Self {
        for a in args {
            set_argument(&mut self.op.arg, a);
        }
        self
    }

    /// Orders this op after the writer of `blob` without reading it.
    pub fn control_input(mut self, blob: impl IntoBlob) -> Self {
        let b = blob.into_blob(&self.net.scope);
        self.op.control_input.push(b.into());
        self
    }

    /// Prefers a kernel implementation.
    pub fn engine(mut self, engine: &str) -> Self {
        self.op.engine = Some(engine.to_owned());
        self
    }

    /// Places the op on `device`, whatever the device scope says.
    pub fn device(mut self, device: Device) -> Self {
        self.op.device_option = Some(device.to_proto());
        self
    }

    /// Seeds the op's random numbers as Caffe2 does: `DeviceOption.random_seed`
    /// (a 32-bit field; a wider seed is folded into it). Call after
    /// [`OpBuilder::device`], which replaces the whole option.
    pub fn random_seed(mut self, seed: u64) -> Self {
        let folded = (seed ^ (seed >> 32)) as u32;
        self.op
            .device_option
            .get_or_insert_with(|| Device::cpu(0).to_proto())
            .random_seed = Some(folded);
        self
    }

    /// Names the op (shown in errors).
    pub fn name(mut self, name: &str) -> Self {
        self.op.name = Some(name.to_owned());
        self
    }

    /// Marks the op as created by autodiff.
    pub fn gradient_op(mut self) -> Self {
        self.op.is_gradient_op = Some(true);
        self
    }

    /// Appends the op to the net and returns its outputs.
    pub fn build(self) -> Vec<BlobRef> {
        let outs = self.op.output.iter().map(BlobRef::new).collect();
        self.net.def.op.push(self.op);
        outs
    }

    /// Appends the op and returns its first output (the op must have one).
    pub fn build_one(self) -> BlobRef {
        let first = self.op.output.first().map(BlobRef::new);
        self.net.def.op.push(self.op);
        first.expect("build_one on an op without outputs")
    }
}
