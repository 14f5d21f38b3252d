//! cuDNN: the handle of one GPU, descriptors, and the calls the convolution,
//! batch-norm and pooling kernels make. Convolution algorithms are measured once
//! per shape (as PyTorch's `cudnn.benchmark`) and cached; one workspace per GPU
//! is grown as needed and reused by every call.

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::Arc;

use cudarc::cudnn::sys;
use cudarc::driver::result as drv;
use cudarc::driver::CudaStream;

use super::gpu::Gpu;
use crate::error::{Error, Result};

/// Most workspace one convolution algorithm may ask for: faster ones needing more
/// are passed over rather than taking memory the activations need.
const MAX_WORKSPACE: usize = 1 << 30;

fn check(status: sys::cudnnStatus_t, doing: &str) -> Result<(), String> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Ok(());
    }
    let text = unsafe { CStr::from_ptr(sys::cudnnGetErrorString(status)) };
    Err(format!("{doing}: {} ({status:?})", text.to_string_lossy()))
}

/// The shape of one 2-D convolution, NCHW.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConvShape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub m: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub pad: (usize, usize),
    pub groups: usize,
    pub oh: usize,
    pub ow: usize,
    /// Only algorithms that give the same bits every run (Caffe2's
    /// `deterministic` argument of `Conv`).
    pub deterministic: bool,
}

#[derive(Clone, Copy)]
struct Algo<A> {
    algo: A,
    workspace: usize,
}

#[derive(Clone, Copy)]
struct ConvAlgos {
    fwd: Option<Algo<sys::cudnnConvolutionFwdAlgo_t>>,
    data: Option<Algo<sys::cudnnConvolutionBwdDataAlgo_t>>,
    filter: Option<Algo<sys::cudnnConvolutionBwdFilterAlgo_t>>,
}

/// The cuDNN state of one GPU.
pub(crate) struct Dnn {
    handle: sys::cudnnHandle_t,
    stream: Arc<CudaStream>,
    workspace: (u64, usize),
    algos: HashMap<ConvShape, ConvAlgos>,
}

// SAFETY: the handle is used under the GPU's mutex only.
unsafe impl Send for Dnn {}

impl Drop for Dnn {
    fn drop(&mut self) {
        unsafe {
            if self.workspace.1 > 0 {
                let _ = drv::free_async(self.workspace.0, self.stream.cu_stream());
            }
            sys::cudnnDestroy(self.handle);
        }
    }
}

macro_rules! descriptor {
    ($name:ident, $raw:ty, $create:ident, $destroy:ident) => {
        /// An owned cuDNN descriptor.
        pub(crate) struct $name($raw);
        impl $name {
            fn create() -> Result<Self, String> {
                let mut d = std::ptr::null_mut();
                check(unsafe { sys::$create(&mut d) }, stringify!($create))?;
                Ok($name(d))
            }
        }
        impl Drop for $name {
            fn drop(&mut self) {
                unsafe { sys::$destroy(self.0) };
            }
        }
    };
}
descriptor!(
    TensorDesc,
    sys::cudnnTensorDescriptor_t,
    cudnnCreateTensorDescriptor,
    cudnnDestroyTensorDescriptor
);
descriptor!(
    FilterDesc,
    sys::cudnnFilterDescriptor_t,
    cudnnCreateFilterDescriptor,
    cudnnDestroyFilterDescriptor
);
descriptor!(
    ConvDesc,
    sys::cudnnConvolutionDescriptor_t,
    cudnnCreateConvolutionDescriptor,
    cudnnDestroyConvolutionDescriptor
);
descriptor!(
    PoolDesc,
    sys::cudnnPoolingDescriptor_t,
    cudnnCreatePoolingDescriptor,
    cudnnDestroyPoolingDescriptor
);

fn int(v: usize) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

impl TensorDesc {
    /// A dense NCHW f32 tensor.
    pub(crate) fn nchw(n: usize, c: usize, h: usize, w: usize) -> Result<Self, String> {
        let d = TensorDesc::create()?;
        check(
            unsafe {
                sys::cudnnSetTensor4dDescriptor(
                    d.0,
                    sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                    int(n),
                    int(c),
                    int(h),
                    int(w),
                )
            },
            "describing a tensor",
        )?;
        Ok(d)
    }
}

impl FilterDesc {
    fn new(m: usize, c: usize, kh: usize, kw: usize) -> Result<Self, String> {
        let d = FilterDesc::create()?;
        check(
            unsafe {
                sys::cudnnSetFilter4dDescriptor(
                    d.0,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                    sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                    int(m),
                    int(c),
                    int(kh),
                    int(kw),
                )
            },
            "describing a filter",
        )?;
        Ok(d)
    }
}

/// The descriptors of one convolution.
struct ConvDescs {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
}

impl ConvDescs {
    fn new(s: &ConvShape) -> Result<Self, String> {
        let conv = ConvDesc::create()?;
        check(
            unsafe {
                sys::cudnnSetConvolution2dDescriptor(
                    conv.0,
                    int(s.pad.0),
                    int(s.pad.1),
                    int(s.stride.0),
                    int(s.stride.1),
                    1,
                    1,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                )
            },
            "describing a convolution",
        )?;
        check(
            unsafe { sys::cudnnSetConvolutionGroupCount(conv.0, int(s.groups)) },
            "setting the group count",
        )?;
        // Strict FP32 (no TF32), as PyTorch with allow_tf32 = False: the CPU and
        // GPU replicas then agree to rounding. Kept for the algorithms measured
        // too, whatever math type a measurement reports (PyTorch does the same).
        set_math(&conv, sys::cudnnMathType_t::CUDNN_FMA_MATH)?;
        Ok(ConvDescs {
            x: TensorDesc::nchw(s.n, s.c, s.h, s.w)?,
            w: FilterDesc::new(s.m, s.c / s.groups, s.kernel.0, s.kernel.1)?,
            y: TensorDesc::nchw(s.n, s.m, s.oh, s.ow)?,
            conv,
        })
    }
}

fn set_math(conv: &ConvDesc, math: sys::cudnnMathType_t) -> Result<(), String> {
    check(
        unsafe { sys::cudnnSetConvolutionMathType(conv.0, math) },
        "setting the math type",
    )
}

/// The fastest algorithm that succeeded and fits [`MAX_WORKSPACE`]; with
/// `deterministic`, the fastest of those that give the same bits every run (some
/// backward algorithms add with atomics, in an order that changes from run to
/// run), if there is one.
macro_rules! best {
    ($perf:expr, $count:expr, $deterministic:expr) => {{
        let usable: Vec<_> = $perf[..$count as usize]
            .iter()
            .filter(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= MAX_WORKSPACE)
            .collect();
        usable
            .iter()
            .find(|p| !$deterministic || p.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC)
            .or(usable.first())
            .map(|p| Algo {
                algo: p.algo,
                workspace: p.memory,
            })
    }};
}

fn p(ptr: u64) -> *const c_void {
    ptr as *const c_void
}

fn pm(ptr: u64) -> *mut c_void {
    ptr as *mut c_void
}

const ONE: f32 = 1.0;
const ZERO: f32 = 0.0;

fn one() -> *const c_void {
    (&ONE as *const f32).cast()
}

fn zero() -> *const c_void {
    (&ZERO as *const f32).cast()
}

/// How a pooling window combines its elements.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum PoolMode {
    /// The maximum; the gradient goes to the maximum's position.
    Max,
    /// The mean over the window clipped to the image (padding not counted).
    Average,
}

/// A 2-D pooling: window, stride and symmetric padding.
pub(crate) struct PoolShape {
    pub mode: PoolMode,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub pad: (usize, usize),
    pub oh: usize,
    pub ow: usize,
}

impl Dnn {
    pub(crate) fn new(gpu: &Gpu) -> Result<Dnn> {
        if !unsafe { sys::is_culib_present() } {
            return Err(gpu.lib_error(
                "cuDNN",
                "libcudnn could not be loaded; install cuDNN 9 or add its folder to LD_LIBRARY_PATH",
            ));
        }
        gpu.bind()?;
        let mut handle = std::ptr::null_mut();
        let e = |m: String| gpu.lib_error("cuDNN", m);
        check(unsafe { sys::cudnnCreate(&mut handle) }, "creating the handle").map_err(e)?;
        let dnn = Dnn {
            handle,
            stream: gpu.stream.clone(),
            workspace: (0, 0),
            algos: HashMap::new(),
        };
        check(
            unsafe { sys::cudnnSetStream(handle, gpu.stream.cu_stream() as _) },
            "setting the stream",
        )
        .map_err(e)?;
        Ok(dnn)
    }

    /// A workspace of at least `bytes`, grown (in stream order) when too small.
    fn workspace(&mut self, gpu: &Gpu, bytes: usize) -> Result<u64> {
        if bytes > self.workspace.1 {
            let stream = self.stream.cu_stream();
            if self.workspace.1 > 0 {
                let _ = unsafe { drv::free_async(self.workspace.0, stream) };
                self.workspace = (0, 0);
            }
            let ptr = unsafe { drv::malloc_async(stream, bytes) }.map_err(|_| Error::OutOfDeviceMemory {
                device: gpu.device().to_string(),
                bytes,
                free: gpu.memory().map_or(0, |(f, _)| f),
            })?;
            self.workspace = (ptr, bytes);
        }
        Ok(self.workspace.0)
    }

    fn algos(&mut self, s: &ConvShape, d: &ConvDescs) -> Result<ConvAlgos, String> {
        if let Some(a) = self.algos.get(s) {
            return Ok(*a);
        }
        const N: usize = 8;
        let mut count = 0;
        let mut fwd: [sys::cudnnConvolutionFwdAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
        check(
            unsafe {
                sys::cudnnFindConvolutionForwardAlgorithm(
                    self.handle,
                    d.x.0,
                    d.w.0,
                    d.conv.0,
                    d.y.0,
                    N as i32,
                    &mut count,
                    fwd.as_mut_ptr(),
                )
            },
            "timing forward algorithms",
        )?;
        let fwd = best!(fwd, count, s.deterministic);
        let mut data: [sys::cudnnConvolutionBwdDataAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
        check(
            unsafe {
                sys::cudnnFindConvolutionBackwardDataAlgorithm(
                    self.handle,
                    d.w.0,
                    d.y.0,
                    d.conv.0,
                    d.x.0,
                    N as i32,
                    &mut count,
                    data.as_mut_ptr(),
                )
            },
            "timing backward-data algorithms",
        )?;
        let data = best!(data, count, s.deterministic);
        let mut filter: [sys::cudnnConvolutionBwdFilterAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
        check(
            unsafe {
                sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                    self.handle,
                    d.x.0,
                    d.y.0,
                    d.conv.0,
                    d.w.0,
                    N as i32,
                    &mut count,
                    filter.as_mut_ptr(),
                )
            },
            "timing backward-filter algorithms",
        )?;
        let filter = best!(filter, count, s.deterministic);
        let a = ConvAlgos { fwd, data, filter };
        self.algos.insert(*s, a);
        Ok(a)
    }

    /// `y = conv(x, w)`.
    pub(crate) fn conv_forward(&mut self, gpu: &Gpu, s: &ConvShape, x: u64, w: u64, y: u64) -> Result<()> {
        let e = |m: String| gpu.lib_error("cuDNN", m);
        let d = ConvDescs::new(s).map_err(e)?;
        let a = self
            .algos(s, &d)
            .map_err(e)?
            .fwd
            .ok_or_else(|| e(format!("no forward algorithm for {s:?}")))?;
        let ws = self.workspace(gpu, a.workspace)?;
        check(
            unsafe {
                sys::cudnnConvolutionForward(
                    self.handle,
                    one(),
                    d.x.0,
                    p(x),
                    d.w.0,
                    p(w),
                    d.conv.0,
                    a.algo,
                    pm(ws),
                    a.workspace,
                    zero(),
                    d.y.0,
                    pm(y),
                )
            },
            "convolution forward",
        )
        .map_err(e)
    }

    /// `dw = ∂/∂w` (overwritten) and, if asked, `dx = ∂/∂x` (overwritten).
    pub(crate) fn conv_backward(
        &mut self,
        gpu: &Gpu,
        s: &ConvShape,
        (x, w, dy): (u64, u64, u64),
        dw: u64,
        dx: Option<u64>,
    ) -> Result<()> {
        let e = |m: String| gpu.lib_error("cuDNN", m);
        let d = ConvDescs::new(s).map_err(e)?;
        let algos = self.algos(s, &d).map_err(e)?;
        let f = algos
            .filter
            .ok_or_else(|| e(format!("no backward-filter algorithm for {s:?}")))?;
        let ws = self.workspace(gpu, f.workspace)?;
        check(
            unsafe {
                sys::cudnnConvolutionBackwardFilter(
                    self.handle,
                    one(),
                    d.x.0,
                    p(x),
                    d.y.0,
                    p(dy),
                    d.conv.0,
                    f.algo,
                    pm(ws),
                    f.workspace,
                    zero(),
                    d.w.0,
                    pm(dw),
                )
            },
            "convolution backward (filter)",
        )
        .map_err(e)?;
        if let Some(dx) = dx {
            let b = algos
                .data
                .ok_or_else(|| e(format!("no backward-data algorithm for {s:?}")))?;
            let ws = self.workspace(gpu, b.workspace)?;
            check(
                unsafe {
                    sys::cudnnConvolutionBackwardData(
                        self.handle,
                        one(),
                        d.w.0,
                        p(w),
                        d.y.0,
                        p(dy),
                        d.conv.0,
                        b.algo,
                        pm(ws),
                        b.workspace,
                        zero(),
                        d.x.0,
                        pm(dx),
                    )
                },
                "convolution backward (data)",
            )
            .map_err(e)?;
        }
        Ok(())
    }

    /// `y += b` per channel of NCHW `y`.
    pub(crate) fn add_bias(
        &mut self,
        gpu: &Gpu,
        (n, m, h, w): (usize, usize, usize, usize),
        b: u64,
        y: u64,
    ) -> Result<()> {
        let e = |m: String| gpu.lib_error("cuDNN", m);
        let bd = TensorDesc::nchw(1, m, 1, 1).map_err(e)?;
        let yd = TensorDesc::nchw(n, m, h, w).map_err(e)?;
        check(
            unsafe { sys::cudnnAddTensor(self.handle, one(), bd.0, p(b), one(), yd.0, pm(y)) },
            "adding the bias",
        )
        .map_err(e)
    }

    /// `db = Σ dy` over N, H, W per channel.
    pub(crate) fn bias_grad(
        &mut self,
        gpu: &Gpu,
        (n, m, h, w): (usize, usize, usize, usize),
        dy: u64,
        db: u64,
    ) -> Result<()> {
        let e = |m: String| gpu.lib_error("cuDNN", m);
        let bd = TensorDesc::nchw(1, m, 1, 1).map_err(e)?;
        let yd = TensorDesc::nchw(n, m, h, w).map_err(e)?;
        check(
            unsafe {
                sys::cudnnConvolutionBackwardBias(self.handle, one(), yd.0, p(dy), zero(), bd.0, pm(db))
            },
            "bias gradient",
        )
        .map_err(e)
    }

    /// Batch norm in training: `y`, and the batch mean and 1/√(var + ε) saved for
    /// the gradient. Running statistics are not touched here.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn bn_train(
        &mut self,
        gpu: &Gpu,
        (n, c, h, w): (usize, usize, usize, usize),
        (x, scale, bias): (u64, u64, u64),
        eps: f64,
        y: u64,
        saved_mean: u64,
        saved_inv_std: u64,
    ) -> Result<()> {
        let e = |m: String| gpu.lib_error("cuDNN", m);
        let xd = TensorDesc::nchw(n, c, h, w).map_err(e)?;
        let sd = TensorDesc::nchw(1, c, 1, 1).map_err(e)?;
        check(
            unsafe {
                sys::cudnnBatchNormalizationForwardTraining(
                    self.handle,
                    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                    one(),
                    zero(),
                    xd.0,
                    p(x),
                    xd.0,
                    pm(y),
                    sd.0,
                    p(scale),
                    p(bias),
                    0.0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    eps,
                    pm(saved_mean),
                    pm(saved_inv_std),
                )
            },
            "batch norm forward (training)",
        )
        .map_err(e)
    }

    /// Batch norm at inference, on given mean and variance.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn bn_infer(
        &mut self,
        gpu: &Gpu,
        (n, c, h, w): (usize, usize, usize, usize),
        (x, scale, bias, mean, var): (u64, u64, u64, u64, u64),
        eps: f64,
        y: u64,
    ) -> Result<()> {
        let e = |m: String| gpu.lib_error("cuDNN", m);
        let xd = TensorDesc::nchw(n, c, h, w).map_err(e)?;
        let sd = TensorDesc::nchw(1, c, 1, 1).map_err(e)?;
        check(
            unsafe {
                sys::cudnnBatchNormalizationForwardInference(
                    self.handle,
                    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                    one(),
                    zero(),
                    xd.0,
                    p(x),
                    xd.0,
                    pm(y),
                    sd.0,
                    p(scale),
                    p(bias),
                    p(mean),
                    p(var),
                    eps,
                )
            },
            "batch norm forward (inference)",
        )
        .map_err(e)
    }

    /// Batch-norm gradient (training mode): `dx`, `dscale`, `dbias`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn bn_backward(
        &mut self,
        gpu: &Gpu,
        (n, c, h, w): (usize, usize, usize, usize),
        (x, scale, dy, saved_mean, saved_inv_std): (u64, u64, u64, u64, u64),
        eps: f64,
        (dx, dscale, dbias): (u64, u64, u64),
    ) -> Result<()> {
        let e = |m: String| gpu.lib_error("cuDNN", m);
        let xd = TensorDesc::nchw(n, c, h, w).map_err(e)?;
        let sd = TensorDesc::nchw(1, c, 1, 1).map_err(e)?;
        check(
            unsafe {
                sys::cudnnBatchNormalizationBackward(
                    self.handle,
                    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                    one(),
                    zero(),
                    one(),
                    zero(),
                    xd.0,
                    p(x),
                    xd.0,
                    p(dy),
                    xd.0,
                    pm(dx),
                    sd.0,
                    p(scale),
                    pm(dscale),
                    pm(dbias),
                    eps,
                    p(saved_mean),
                    p(saved_inv_std),
                )
            },
            "batch norm backward",
        )
        .map_err(e)
    }

    fn pool_descs(s: &PoolShape) -> Result<(PoolDesc, TensorDesc, TensorDesc), String> {
        let pd = PoolDesc::create()?;
        let mode = match s.mode {
            PoolMode::Max => sys::cudnnPoolingMode_t::CUDNN_POOLING_MAX_DETERMINISTIC,
            PoolMode::Average => sys::cudnnPoolingMode_t::CUDNN_POOLING_AVERAGE_COUNT_EXCLUDE_PADDING,
        };
        check(
            unsafe {
                sys::cudnnSetPooling2dDescriptor(
                    pd.0,
                    mode,
                    sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                    int(s.kernel.0),
                    int(s.kernel.1),
                    int(s.pad.0),
                    int(s.pad.1),
                    int(s.stride.0),
                    int(s.stride.1),
                )
            },
            "describing a pooling",
        )?;
        Ok((
            pd,
            TensorDesc::nchw(s.n, s.c, s.h, s.w)?,
            TensorDesc::nchw(s.n, s.c, s.oh, s.ow)?,
        ))
    }

    /// `y = pool(x)`.
    pub(crate) fn pool_forward(&mut self, gpu: &Gpu, s: &PoolShape, x: u64, y: u64) -> Result<()> {
        let e = |m: String| gpu.lib_error("cuDNN", m);
        let (pd, xd, yd) = Self::pool_descs(s).map_err(e)?;
        check(
            unsafe { sys::cudnnPoolingForward(self.handle, pd.0, one(), xd.0, p(x), zero(), yd.0, pm(y)) },
            "pooling forward",
        )
        .map_err(e)
    }

    /// `dx` of a pooling, from `x`, `y` and `dy`.
    pub(crate) fn pool_backward(
        &mut self,
        gpu: &Gpu,
        s: &PoolShape,
        (x, y, dy): (u64, u64, u64),
        dx: u64,
    ) -> Result<()> {
        let e = |m: String| gpu.lib_error("cuDNN", m);
        let (pd, xd, yd) = Self::pool_descs(s).map_err(e)?;
        check(
            unsafe {
                sys::cudnnPoolingBackward(
                    self.handle,
                    pd.0,
                    one(),
                    yd.0,
                    p(y),
                    yd.0,
                    p(dy),
                    xd.0,
                    p(x),
                    zero(),
                    xd.0,
                    pm(dx),
                )
            },
            "pooling backward",
        )
        .map_err(e)
    }
}
