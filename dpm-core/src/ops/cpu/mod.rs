//! CPU kernels, one file (or, for convolution, one folder) per family, and their
//! registration.

mod activation;
mod arith;
mod concat;
pub mod conv;
mod distance;
mod dropout;
pub(crate) mod elementwise;
mod fill;
pub mod gemm;
pub mod isa;
mod layernorm;
pub(crate) mod linear;
mod loss;
mod lr;
mod matmul;
pub(crate) mod norm;
pub(crate) mod optim;
pub(crate) mod pool;
mod prefetch;
pub mod rng;
mod shape;

pub use fill::Distribution;
pub use gemm::{set_threads, threads};
pub use lr::LrPolicy;

use super::Registry;
use crate::graph::DeviceType;

/// Registers every CPU kernel. One line per op type.
pub fn register(r: &mut Registry) {
    use DeviceType::Cpu;
    r.register("ConstantFill", Cpu, fill::ConstantFill::create);
    for op in [
        "GivenTensorFill",
        "GivenTensorIntFill",
        "GivenTensorInt64Fill",
        "GivenTensorBoolFill",
    ] {
        r.register(op, Cpu, fill::GivenTensorFill::create);
    }
    r.register("GaussianFill", Cpu, fill::RandomFill::gaussian);
    r.register("UniformFill", Cpu, fill::RandomFill::uniform);
    r.register("XavierFill", Cpu, fill::RandomFill::xavier);
    r.register("MSRAFill", Cpu, fill::RandomFill::msra);
    r.register("FC", Cpu, linear::Fc::create);
    r.register("FCGradient", Cpu, linear::FcGradient::create);
    r.register("Relu", Cpu, |_| Ok(Box::new(elementwise::Relu)));
    r.register("ReluGradient", Cpu, |_| Ok(Box::new(elementwise::ReluGradient)));
    r.register("Sum", Cpu, elementwise::Sum::create);
    r.register("Add", Cpu, elementwise::Sum::create);
    r.register("Scale", Cpu, elementwise::Scale::create);
    r.register("Copy", Cpu, |_| Ok(Box::new(elementwise::Copy)));
    r.register("StopGradient", Cpu, |_| Ok(Box::new(elementwise::Copy)));
    r.register("WeightedSum", Cpu, |_| Ok(Box::new(elementwise::WeightedSum)));
    r.register("SoftmaxWithLoss", Cpu, |_| Ok(Box::new(loss::SoftmaxWithLoss)));
    r.register("SoftmaxWithLossGradient", Cpu, |_| {
        Ok(Box::new(loss::SoftmaxWithLossGradient))
    });
    r.register("Accuracy", Cpu, loss::Accuracy::create);
    r.register("Iter", Cpu, |_| Ok(Box::new(optim::Iter)));
    r.register("LearningRate", Cpu, lr::LearningRate::create);
    r.register("MomentumSGDUpdate", Cpu, optim::MomentumSgdUpdate::create);
    r.register(
        "WeightedSum+MomentumSGDUpdate",
        Cpu,
        optim::DecayMomentumSgdUpdate::create,
    );
    r.register("Adam", Cpu, optim::Adam::create);
    r.register("RmsProp", Cpu, optim::RmsProp::create);
    r.register("Adagrad", Cpu, optim::Adagrad::create);
    r.register("Conv", Cpu, conv::Conv::create);
    r.register("ConvGradient", Cpu, conv::ConvGradient::create);
    r.register("SpatialBN", Cpu, norm::SpatialBn::create);
    r.register("SpatialBNGradient", Cpu, norm::SpatialBnGradient::create);
    // What the executor runs in place of an adjacent pair (exec::fuse).
    r.register("SpatialBN+Relu", Cpu, norm::SpatialBn::create_fused);
    r.register("SpatialBN+Sum+Relu", Cpu, norm::SpatialBn::create_residual);
    r.register("Sum+Relu", Cpu, |_| Ok(Box::new(elementwise::SumRelu)));
    r.register(
        "ReluGradient+SpatialBNGradient",
        Cpu,
        norm::SpatialBnGradient::create_fused,
    );
    r.register(
        "Sum+ReluGradient+SpatialBNGradient",
        Cpu,
        norm::SpatialBnGradient::create_residual,
    );
    r.register("ChannelStats", Cpu, |_| Ok(Box::new(norm::ChannelStats)));
    r.register("ChannelBackpropStats", Cpu, |_| {
        Ok(Box::new(norm::ChannelBackpropStats))
    });
    r.register("MaxPool", Cpu, pool::Pooling::max);
    r.register("MaxPoolGradient", Cpu, pool::PoolingGradient::max);
    r.register("AveragePool", Cpu, pool::Pooling::average);
    r.register("AveragePoolGradient", Cpu, pool::PoolingGradient::average);
    r.register("Sigmoid", Cpu, |_| {
        Ok(Box::new(activation::Pointwise(activation::Act::Sigmoid)))
    });
    r.register("SigmoidGradient", Cpu, |_| {
        Ok(Box::new(activation::PointwiseGradient(activation::Act::Sigmoid)))
    });
    r.register("Tanh", Cpu, |_| {
        Ok(Box::new(activation::Pointwise(activation::Act::Tanh)))
    });
    r.register("TanhGradient", Cpu, |_| {
        Ok(Box::new(activation::PointwiseGradient(activation::Act::Tanh)))
    });
    r.register("Softmax", Cpu, activation::Softmax::create);
    r.register("SoftmaxGradient", Cpu, activation::SoftmaxGradient::create);
    for op in ["Mul", "Sub", "Div"] {
        r.register(op, Cpu, arith::Binary::create);
    }
    for op in ["MulGradient", "SubGradient", "DivGradient"] {
        r.register(op, Cpu, arith::BinaryGradient::create);
    }
    r.register("SquaredL2Distance", Cpu, |_| {
        Ok(Box::new(distance::Distance(distance::Norm::L2)))
    });
    r.register("SquaredL2DistanceGradient", Cpu, |_| {
        Ok(Box::new(distance::DistanceGradient(distance::Norm::L2)))
    });
    r.register("L1Distance", Cpu, |_| {
        Ok(Box::new(distance::Distance(distance::Norm::L1)))
    });
    r.register("L1DistanceGradient", Cpu, |_| {
        Ok(Box::new(distance::DistanceGradient(distance::Norm::L1)))
    });
    r.register("LabelCrossEntropy", Cpu, |_| {
        Ok(Box::new(distance::LabelCrossEntropy))
    });
    r.register("LabelCrossEntropyGradient", Cpu, |_| {
        Ok(Box::new(distance::LabelCrossEntropyGradient))
    });
    r.register("AveragedLoss", Cpu, |_| Ok(Box::new(distance::AveragedLoss)));
    r.register("AveragedLossGradient", Cpu, |_| {
        Ok(Box::new(distance::AveragedLossGradient))
    });
    r.register("LayerNorm", Cpu, layernorm::LayerNorm::create);
    r.register("LayerNormGradient", Cpu, layernorm::LayerNorm::create);
    r.register("Gather", Cpu, layernorm::Gather::create);
    r.register("GatherGradient", Cpu, layernorm::Gather::create);
    r.register("Concat", Cpu, concat::Concat::create);
    r.register("Split", Cpu, concat::Split::create);
    r.register("Dropout", Cpu, dropout::Dropout::create);
    r.register("DropoutGradient", Cpu, |_| Ok(Box::new(dropout::DropoutGradient)));
    r.register("MatMul", Cpu, matmul::MatMul::create);
    r.register("BatchMatMul", Cpu, matmul::MatMul::create_batched);
    r.register("Transpose", Cpu, matmul::Transpose::create);
    r.register("Flatten", Cpu, shape::Reshape::flatten);
    r.register("Reshape", Cpu, shape::Reshape::reshape);
    r.register("ResizeLike", Cpu, shape::Reshape::like);
}
