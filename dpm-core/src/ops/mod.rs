//! Operators: the [`Kernel`] trait, the per-op [`OpContext`], and the [`Registry`]
//! mapping `(op type, device type)` to a kernel.
//!
//! To add an op: write its kernel in `cpu/` (and `cuda/`), add one line to
//! `cpu::register` (and `cuda::register`), and, if it is differentiable, one
//! gradient rule in `autodiff::rules`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod registry;

pub use registry::{Differentiability, KernelFactory, OpSchema, Registry};

use crate::error::{Error, Result};
use crate::graph::{Args, Device};
use crate::proto::OperatorDef;
use crate::tensor::{DataType, Element, Tensor};

/// A compiled operator: arguments parsed and checked once, run many times.
pub trait Kernel: Send + Sync {
    /// Computes the outputs from the inputs.
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()>;

    /// `(input, output)` pairs updated in place: before [`Kernel::run`], the executor
    /// makes output `o` hold the value of input `i` (for free when both name the same
    /// blob), and the kernel reads it from the output.
    fn in_place(&self) -> &[(usize, usize)] {
        &[]
    }

    /// Whether, for an in-place pair whose two blobs differ, the kernel reads
    /// the input itself ([`OpContext::in_place_input`]) instead of having the
    /// executor copy it into the output first: one pass fewer over memory
    /// (`Sum` writes `X0 + X1` straight into Y).
    fn reads_in_place_source(&self) -> bool {
        false
    }
}

/// A per-op list (inputs, outputs, locks) that needs no allocation for up to
/// 8 entries: the executor builds several for every op it runs, and on small
/// nets their allocations were a measurable part of a step.
pub(crate) type OpList<T> = smallvec::SmallVec<[T; 8]>;

/// What one run of a kernel sees: the op's definition, its input tensors and its
/// output tensors. Errors from the accessors name the blob.
pub struct OpContext<'a> {
    def: &'a OperatorDef,
    inputs: OpList<Option<&'a Tensor>>,
    outputs: OpList<&'a mut Tensor>,
    device: Device,
    threads: usize,
}

impl<'a> OpContext<'a> {
    /// A context over the given tensors. Inputs that are `None` were moved to an
    /// output by [`Kernel::in_place`].
    /// The op runs on `cpu:0` with one kernel thread; see [`OpContext::on`].
    pub fn new(def: &'a OperatorDef, inputs: Vec<Option<&'a Tensor>>, outputs: Vec<&'a mut Tensor>) -> Self {
        Self::from_lists(def, OpList::from_vec(inputs), OpList::from_vec(outputs))
    }

    /// [`OpContext::new`] over lists that stay on the stack for a usual op.
    pub(crate) fn from_lists(
        def: &'a OperatorDef,
        inputs: OpList<Option<&'a Tensor>>,
        outputs: OpList<&'a mut Tensor>,
    ) -> Self {
        OpContext {
            def,
            inputs,
            outputs,
            device: Device::Cpu(0),
            threads: 1,
        }
    }

    /// The same context, for an op running on `device` whose CPU kernel may use
    /// `threads` threads.
    pub fn on(mut self, device: Device, threads: usize) -> Self {
        self.device = device;
        self.threads = threads.max(1);
        self
    }

    /// The device the op runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Threads a CPU kernel may use for this op (set per workspace; see
    /// [`crate::exec::Workspace::set_kernel_threads`]).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The op's definition.
    pub fn def(&self) -> &'a OperatorDef {
        self.def
    }

    /// The op's arguments.
    pub fn args(&self) -> Args<'a> {
        Args(&self.def.arg)
    }

    /// The input tensors (for a kernel that delegates to another).
    #[cfg(feature = "cuda")]
    pub(crate) fn input_refs(&self) -> Vec<Option<&'a Tensor>> {
        self.inputs.to_vec()
    }

    /// Number of inputs.
    pub fn num_inputs(&self) -> usize {
        self.inputs.len()
    }

    /// Number of outputs.
    pub fn num_outputs(&self) -> usize {
        self.outputs.len()
    }

    /// Name of input `i`.
    pub fn input_name(&self, i: usize) -> &'a str {
        &self.def.input[i]
    }

    /// Name of output `o`.
    pub fn output_name(&self, o: usize) -> &'a str {
        &self.def.output[o]
    }

    /// Input `i`.
    pub fn input(&self, i: usize) -> Result<&'a Tensor> {
        self.inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| Error::MissingBlob {
                name: self.def.input.get(i).cloned().unwrap_or_default(),
            })
    }

    /// Input `i` of an in-place pair (see [`Kernel::reads_in_place_source`]):
    /// `Some` when it is a blob of its own, for the kernel to read; `None` when
    /// its value is already in the output (the two names are one blob).
    pub fn in_place_input(&self, i: usize) -> Option<&'a Tensor> {
        self.inputs.get(i).copied().flatten()
    }

    /// The elements of input `i`, which must be of type `T`.
    pub fn input_data<T: Element>(&self, i: usize) -> Result<&'a [T]> {
        let t = self.input(i)?;
        t.data::<T>().map_err(|e| e.for_blob(self.input_name(i)))
    }

    /// Input `i` as `(tensor, f32 elements)`.
    pub fn input_f32(&self, i: usize) -> Result<(&'a Tensor, &'a [f32])> {
        Ok((self.input(i)?, self.input_data::<f32>(i)?))
    }

    /// Input `i` in host memory: itself, or a copy of a device tensor (which
    /// waits for the device).
    pub fn input_on_host(&self, i: usize) -> Result<std::borrow::Cow<'a, Tensor>> {
        let t = self.input(i)?;
        Ok(if t.is_on_host() {
            std::borrow::Cow::Borrowed(t)
        } else {
            std::borrow::Cow::Owned(t.to_host()?)
        })
    }

    /// A one-element f32 input (a learning rate, a weight), read on the host.
    pub fn input_scalar(&self, i: usize) -> Result<f32> {
        let t = self.input_on_host(i)?;
        let d = t.data::<f32>().map_err(|e| e.for_blob(self.input_name(i)))?;
        match d {
            [x] => Ok(*x),
            _ => Err(Error::shape(
                self.input_name(i),
                "one element",
                self.input(i)?.shape(),
            )),
        }
    }

    /// Integer labels of input `i` (i32 or i64), as indices. Labels on a device
    /// are copied to the host first (which waits for the device).
    pub fn input_labels(&self, i: usize) -> Result<Vec<usize>> {
        let t = self.input_on_host(i)?;
        let name = self.input_name(i);
        let bad = |v: i64| Error::value(name, format!("label {v} is negative"));
        match t.dtype() {
            DataType::I32 => t
                .data::<i32>()
                .unwrap_or_default()
                .iter()
                .map(|&v| usize::try_from(v).map_err(|_| bad(v.into())))
                .collect(),
            DataType::I64 => t
                .data::<i64>()
                .unwrap_or_default()
                .iter()
                .map(|&v| usize::try_from(v).map_err(|_| bad(v)))
                .collect(),
            got => Err(Error::DataTypeMismatch {
                blob: name.to_owned(),
                expected: DataType::I32,
                got,
            }),
        }
    }

    /// Output `o`.
    pub fn output(&mut self, o: usize) -> &mut Tensor {
        self.outputs[o]
    }

    /// All outputs at once, for kernels that write several.
    pub fn outputs(&mut self) -> &mut [&'a mut Tensor] {
        &mut self.outputs
    }

    /// Output `o` made `shape` of type `T` in host memory, for writing (see
    /// [`Tensor::resize`]); an allocation failure names the blob.
    pub fn resize_output<T: Element>(
        &mut self,
        o: usize,
        shape: impl Into<crate::tensor::Shape>,
    ) -> Result<&mut [T]> {
        let name = self.def.output[o].as_str();
        self.outputs[o].resize::<T>(shape).map_err(|e| e.with_blob(name))
    }

    /// The elements of output `o`, which must already be of type `T` (in-place ops).
    pub fn output_data<T: Element>(&mut self, o: usize) -> Result<&mut [T]> {
        let name = self.def.output[o].clone();
        let t = &mut *self.outputs[o];
        t.data_mut::<T>().map_err(|e| e.for_blob(name))
    }

    /// Checks the number of inputs is in `range`.
    pub fn expect_inputs(&self, range: std::ops::RangeInclusive<usize>) -> Result<()> {
        check_arity("inputs", self.inputs.len(), range)
    }

    /// Checks the number of outputs is in `range`.
    pub fn expect_outputs(&self, range: std::ops::RangeInclusive<usize>) -> Result<()> {
        check_arity("outputs", self.outputs.len(), range)
    }
}

/// Checks a count against an inclusive range, with an error saying what is allowed.
pub fn check_arity(what: &'static str, got: usize, range: std::ops::RangeInclusive<usize>) -> Result<()> {
    if range.contains(&got) {
        return Ok(());
    }
    let expected = if range.start() == range.end() {
        range.start().to_string()
    } else if *range.end() == usize::MAX {
        format!("at least {}", range.start())
    } else {
        format!("{} to {}", range.start(), range.end())
    };
    Err(Error::Arity { what, expected, got })
}
