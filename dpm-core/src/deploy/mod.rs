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
