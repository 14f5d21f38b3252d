//! CUDA kernels, one file per family, and their registration. Each reads and
//! writes device memory of its op's GPU and only enqueues work (see
//! [`crate::cuda`]); shapes are checked on the host before anything is enqueued.
//!
//! Libraries do the heavy lifting: cuBLAS for `FC`, cuDNN for convolution,
//! batch norm and pooling; the small kernels are dpm's own CUDA C
//! (`cuda/kernels.cu`). Random fills draw on the host with the CPU generator and
//! copy, so a CUDA replica starts from exactly the CPU replica's parameters.

mod conv;
mod elementwise;
mod host;
mod linear;
mod loss;
mod norm;

use std::sync::Arc;

use super::{OpContext, Registry};
use crate::cuda::{gpu, CudaStorage, Gpu};
use crate::error::{Error, Result};
use crate::graph::{Device, DeviceType};
use crate::tensor::{DataType, Shape, Tensor};

/// Registers every CUDA kernel. One line per op type.
pub fn register(r: &mut Registry) {
    use DeviceType::Cuda;
    r.register("ConstantFill", Cuda, host::uploaded);
    for op in [
        "GivenTensorFill",
        "GivenTensorIntFill",
        "GivenTensorInt64Fill",
        "GivenTensorBoolFill",
    ] {
        r.register(op, Cuda, host::uploaded);
    }
    r.register("GaussianFill", Cuda, host::uploaded);
    r.register("UniformFill", Cuda, host::uploaded);
    r.register("XavierFill", Cuda, host::uploaded);
    r.register("MSRAFill", Cuda, host::uploaded);
    r.register("Iter", Cuda, host::on_host);
    r.register("LearningRate", Cuda, host::on_host);
    r.register("Copy", Cuda, host::on_host);
    r.register("StopGradient", Cuda, host::on_host);
    r.register("Flatten", Cuda, host::on_host);
    r.register("Reshape", Cuda, host::on_host);
    r.register("ResizeLike", Cuda, host::on_host);
    r.register("FC", Cuda, linear::Fc::create);
    r.register("FCGradient", Cuda, linear::FcGradient::create);
    r.register("Relu", Cuda, |_| Ok(Box::new(elementwise::Relu)));
    r.register("ReluGradient", Cuda, |_| Ok(Box::new(elementwise::ReluGradient)));
    r.register("Sum", Cuda, elementwise::Sum::create);
    r.register("Add", Cuda, elementwise::Sum::create);
    r.register("Scale", Cuda, elementwise::Scale::create);
    r.register("WeightedSum", Cuda, |_| Ok(Box::new(elementwise::WeightedSum)));
    r.register("MomentumSGDUpdate", Cuda, elementwise::MomentumSgdUpdate::create);
    r.register("SoftmaxWithLoss", Cuda, |_| Ok(Box::new(loss::SoftmaxWithLoss)));
    r.register("SoftmaxWithLossGradient", Cuda, |_| {
        Ok(Box::new(loss::SoftmaxWithLossGradient))
    });
    r.register("Accuracy", Cuda, loss::Accuracy::create);
    r.register("Conv", Cuda, conv::Conv::create);
    r.register("ConvGradient", Cuda, conv::ConvGradient::create);
    r.register("MaxPool", Cuda, conv::Pooling::max);
    r.register("MaxPoolGradient", Cuda, conv::PoolingGradient::max);
    r.register("AveragePool", Cuda, conv::Pooling::average);
    r.register("AveragePoolGradient", Cuda, conv::PoolingGradient::average);
    r.register("SpatialBN", Cuda, norm::SpatialBn::create);
    r.register("SpatialBNGradient", Cuda, norm::SpatialBnGradient::create);
}

/// The GPU the op runs on, bound to the calling thread.
fn op_gpu(ctx: &OpContext<'_>) -> Result<Arc<Gpu>> {
    match ctx.device() {
        Device::Cuda(n) => {
            let g = gpu(n)?;
            g.bind()?;
            Ok(g)
        }
        d => Err(Error::Config(format!("a CUDA kernel was asked to run on {d}"))),
    }
}

/// The error for a tensor that is not where a CUDA op needs it.
fn misplaced(name: &str, t: &Tensor, gpu: &Gpu) -> Error {
    Error::value(
        name,
        format!(
            "lives on {}, but the op runs on {}; feed it with Trainer::feed or Tensor::to_device",
            t.device(),
            gpu.device()
        ),
    )
}

/// Input `i`, an f32 tensor on `gpu`, and its device address.
fn input<'a>(ctx: &OpContext<'a>, i: usize, gpu: &Gpu) -> Result<(&'a Tensor, u64)> {
    let t = ctx.input(i)?;
    let name = ctx.input_name(i);
    if t.dtype() != DataType::F32 {
        return Err(Error::DataTypeMismatch {
            blob: name.to_owned(),
            expected: DataType::F32,
            got: t.dtype(),
        });
    }
    let s = t.cuda_on(gpu).ok_or_else(|| misplaced(name, t, gpu))?;
    s.settle()?;
    Ok((t, s.ptr()))
}

/// Output `o` made `shape` (f32) on `gpu`; its device address.
fn output(ctx: &mut OpContext<'_>, o: usize, gpu: &Arc<Gpu>, shape: impl Into<Shape>) -> Result<u64> {
    ctx.output(o).resize_on(gpu, DataType::F32, shape)
}

/// Output `o`, which already holds its input's value (an in-place pair), on `gpu`.
fn in_place(ctx: &mut OpContext<'_>, o: usize, gpu: &Gpu) -> Result<(Shape, u64)> {
    let name = ctx.output_name(o).to_owned();
    let t = ctx.output(o);
    if t.dtype() != DataType::F32 {
        return Err(Error::DataTypeMismatch {
            blob: name,
            expected: DataType::F32,
            got: t.dtype(),
        });
    }
    let shape = t.shape().clone();
    if t.cuda_on(gpu).is_none() {
        return Err(misplaced(&name, t, gpu));
    }
    let s = t.cuda_on_mut(gpu).expect("checked above");
    s.settle()?;
    Ok((shape, s.ptr()))
}

/// Integer labels of input `label`, checked against `classes` on the host (as the
/// CPU kernel does: a bad label is an error, never a silent read out of bounds)
/// and put on `gpu` as i32. Labels fed from the host are read from the mirror
/// their upload kept; others are copied back, which waits for the device.
fn labels(
    ctx: &OpContext<'_>,
    label: usize,
    rows: usize,
    classes: usize,
    gpu: &Arc<Gpu>,
) -> Result<CudaStorage> {
    let l = ctx.input_labels(label)?;
    let name = ctx.input_name(label);
    if l.len() != rows {
        return Err(Error::shape(
            name,
            format!("[{rows}] (one label per row)"),
            ctx.input(label)?.shape(),
        ));
    }
    if let Some(&bad) = l.iter().find(|&&v| v >= classes) {
        return Err(Error::value(
            name,
            format!("label {bad} is not below the number of classes {classes}"),
        ));
    }
    let v: crate::tensor::HostVec<i32> = l.iter().map(|&v| v as i32).collect();
    CudaStorage::upload(gpu, &crate::tensor::CpuStorage::I32(v))
}
