//! The one error type of dpm. Variants carry the names a user needs to find the
//! problem (op index and type, blob, shapes) rather than formatted strings.

use crate::tensor::{DataType, Shape};

/// Result alias used throughout dpm.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while building, serialising or running a net.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A blob was read before anything wrote it.
    #[error("blob `{name}` does not exist in the workspace")]
    MissingBlob {
        /// The blob's full name.
        name: String,
    },
    /// Tensor shapes do not agree.
    #[error("shape mismatch for `{blob}`: expected {expected}, got {got}")]
    ShapeMismatch {
        /// The blob whose shape is wrong.
        blob: String,
        /// What the op needed, in words or as a shape.
        expected: String,
        /// The shape it got.
        got: Shape,
    },
    /// A tensor has a different element type than the op needs.
    #[error("blob `{blob}` has element type {got:?}, expected {expected:?}")]
    DataTypeMismatch {
        /// The blob whose type is wrong.
        blob: String,
        /// The type the op needed.
        expected: DataType,
        /// The type it got.
        got: DataType,
    },
    /// An operator argument is missing or has a bad value.
    #[error("argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument's name.
        name: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The op has the wrong number of inputs or outputs.
    #[error("{what}: expected {expected}, got {got}")]
    Arity {
        /// "inputs" or "outputs".
        what: &'static str,
        /// Allowed count, in words.
        expected: String,
        /// The count it got.
        got: usize,
    },
    /// A value is outside what the op accepts (e.g. a label ≥ number of classes).
    #[error("blob `{blob}`: {reason}")]
    InvalidValue {
        /// The blob holding the value.
        blob: String,
        /// What is wrong.
        reason: String,
    },
    /// No kernel is registered for this op type on this device type.
    #[error("no kernel for op type `{op_type}` on {device}")]
    UnknownOp {
        /// The op type.
        op_type: String,
        /// The device type, in words.
        device: String,
    },
    /// An op on the path from a parameter to a loss has no gradient rule.
    #[error("op #{index} `{op_type}` (output `{output}`) lies between a parameter and a loss but has no gradient rule")]
    NoGradient {
        /// Index of the op in its net.
        index: usize,
        /// The op type.
        op_type: String,
        /// Its first output.
        output: String,
    },
    /// The forward graph cannot be differentiated as written.
    #[error("cannot differentiate: {0}")]
    Autodiff(String),
    /// An operator failed while running; `source` says why.
    #[error("op #{index} `{op_type}`{} failed: {source}", name_suffix(.name))]
    Op {
        /// Index of the op in its net.
        index: usize,
        /// The op type.
        op_type: String,
        /// The op's name, if it has one.
        name: String,
        /// The underlying error.
        #[source]
        source: Box<Error>,
    },
    /// A kernel panicked; the executor caught it.
    #[error("kernel panicked: {0}")]
    KernelPanic(String),
    /// A net is malformed (e.g. an unknown net type, a control input nobody writes).
    #[error("invalid net `{net}`: {reason}")]
    InvalidNet {
        /// The net's name.
        net: String,
        /// What is wrong.
        reason: String,
    },
    /// A model or parallel configuration is inconsistent.
    #[error("{0}")]
    Config(String),
    /// Protobuf bytes could not be decoded.
    #[error("cannot decode {what}: {source}")]
    Decode {
        /// Which message was being decoded.
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: prost::DecodeError,
    },
    /// A checkpoint file is unreadable or inconsistent.
    #[error("checkpoint `{path}`: {reason}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A data file or directory is missing, truncated or malformed.
    #[error("data `{path}`: {reason}")]
    Data {
        /// The file or directory.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The CUDA backend was asked for, but dpm was built without the `cuda` feature.
    #[error("{0} needs CUDA, but this build has no CUDA support: rebuild with `--features cuda`")]
    NotCompiledWithCuda(String),
    /// The CUDA driver library could not be loaded or initialised.
    #[error("no CUDA driver found (libcuda.so): {0}")]
    NoCudaDriver(String),
    /// A CUDA device was named that this machine does not have.
    #[error("device {device} does not exist: this machine has {count} CUDA device(s){}", gpu_list(*.count))]
    NoSuchDevice {
        /// The device asked for.
        device: String,
        /// How many CUDA devices the driver reports.
        count: usize,
    },
    /// A CUDA library (driver, cuBLAS, cuDNN, NVRTC) reported an error.
    #[error("{library} on {device}: {message}")]
    Cuda {
        /// Which library failed: `CUDA driver`, `cuBLAS`, `cuDNN`, `NVRTC`.
        library: &'static str,
        /// The device, e.g. `cuda:0`.
        device: String,
        /// The library's message, with what dpm was doing.
        message: String,
    },
    /// A device allocation failed.
    #[error("out of memory on {device}: {bytes} bytes requested, {free} free; use a smaller batch or fewer replicas per GPU")]
    OutOfDeviceMemory {
        /// The device.
        device: String,
        /// The size of the allocation that failed.
        bytes: usize,
        /// Free device memory at the time, as the driver reports it.
        free: usize,
    },
    /// A value checked after a step is NaN or infinite (see `FiniteCheck`).
    #[error("{what} is not finite: the step failed (and, with atomic steps, changed nothing); lower the learning rate or check the inputs")]
    NonFinite {
        /// What held the value.
        what: String,
    },
    /// Host memory for a tensor could not be allocated (or its size overflows).
    #[error("cannot allocate {} for blob `{blob}` in host memory", bytes_text(*.bytes))]
    Allocation {
        /// The blob (empty until the op that failed names it).
        blob: String,
        /// Bytes asked for; `usize::MAX` when the size itself overflows.
        bytes: usize,
    },
    /// A tensor's elements were asked for in host memory, but they live on a device.
    #[error("blob `{blob}` lives on {device}, not in host memory; copy it with `to_host()` first")]
    NotOnHost {
        /// The blob.
        blob: String,
        /// Where it lives.
        device: String,
    },
    /// An I/O error, with the path involved.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn bytes_text(bytes: usize) -> String {
    if bytes == usize::MAX {
        "more bytes than an address space holds".into()
    } else {
        format!("{bytes} bytes")
    }
}

fn gpu_list(count: usize) -> String {
    match count {
        0 => String::new(),
        1 => " (cuda:0)".into(),
        n => format!(" (cuda:0 to cuda:{})", n - 1),
    }
}

fn name_suffix(name: &str) -> String {
    if name.is_empty() {
        String::new()
    } else {
        format!(" ({name})")
    }
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn arg(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::InvalidValue`].
    pub fn value(blob: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidValue {
            blob: blob.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::ShapeMismatch`].
    pub fn shape(blob: impl Into<String>, expected: impl Into<String>, got: &Shape) -> Self {
        Error::ShapeMismatch {
            blob: blob.into(),
            expected: expected.into(),
            got: got.clone(),
        }
    }

    /// This error, naming `blob` if it is an allocation failure that names none yet.
    pub fn with_blob(self, name: &str) -> Error {
        match self {
            Error::Allocation { blob, bytes } if blob.is_empty() => Error::Allocation {
                blob: name.to_owned(),
                bytes,
            },
            e => e,
        }
    }

    /// The innermost error, below any [`Error::Op`] wrappers.
    pub fn root(&self) -> &Error {
        match self {
            Error::Op { source, .. } => source.root(),
            e => e,
        }
    }
}
