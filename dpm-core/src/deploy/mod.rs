//! Deploying a trained model: as Caffe2 deploys one (an `init_net` of
//! `GivenTensorFill` ops and a forward-only `predict_net`,
//! [`Trainer::export_predictor`](crate::parallel::Trainer::export_predictor),
//! [`Trainer::export_caffe2`](crate::parallel::Trainer::export_caffe2)), run
//! here by a [`Predictor`]; or as an ONNX model for onnxruntime and the tools
//! around it ([`onnx`],
//! [`Trainer::export_onnx`](crate::parallel::Trainer::export_onnx)).

mod caffe2;
pub mod onnx;
mod predictor;

pub use predictor::Predictor;

use crate::tensor::{DataType, Tensor};

/// A host tensor of zeros shaped as `t` with `batch` rows.
pub(crate) fn zeros_like(t: &Tensor, batch: usize) -> Tensor {
    let dims: Vec<usize> = std::iter::once(batch)
        .chain(t.dims().iter().skip(1).copied())
        .collect();
    match t.dtype() {
        DataType::F32 => Tensor::zeros::<f32>(dims),
        DataType::I32 => Tensor::zeros::<i32>(dims),
        DataType::I64 => Tensor::zeros::<i64>(dims),
    }
}
