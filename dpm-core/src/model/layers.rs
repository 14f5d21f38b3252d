//! Layer helpers, after Caffe2's `brew`: each adds its parameters (with their
//! initialisers) and its ops, in the current scope, and returns its output.

use super::{Init, ModelHelper};
use crate::error::Result;
use crate::graph::BlobRef;

impl ModelHelper {
    /// Fully connected layer `name`: `input` (viewed as batch × `dim_in`) times a
    /// `dim_out × dim_in` weight `<name>_w` (Xavier) plus bias `<name>_b` (zeros).
    pub fn fc(&mut self, name: &str, input: &BlobRef, dim_in: usize, dim_out: usize) -> Result<BlobRef> {
        let w = self.create_param(&format!("{name}_w"), [dim_out, dim_in], Init::Xavier)?;
        let b = self.create_param(&format!("{name}_b"), [dim_out], Init::Constant(0.0))?;
        Ok(self
            .net_mut()
            .op("FC")
            .inputs([input, &w, &b])
            .output(name)
            .build_one())
    }

    /// `max(input, 0)` into `output`.
    pub fn relu(&mut self, input: &BlobRef, output: &str) -> BlobRef {
        self.net_mut().op("Relu").input(input).output(output).build_one()
    }

    /// Softmax and mean cross-entropy of `logits` against integer `label`s:
    /// returns `(softmax, loss)`, named `<name>_softmax` and `<name>`.
    pub fn softmax_with_loss(&mut self, logits: &BlobRef, label: &BlobRef, name: &str) -> (BlobRef, BlobRef) {
        let outs = self
            .net_mut()
            .op("SoftmaxWithLoss")
            .inputs([logits, label])
            .output(format!("{name}_softmax"))
            .output(name)
            .build();
        (outs[0].clone(), outs[1].clone())
    }

    /// Top-1 accuracy of `scores` against `label`, into `output`.
    pub fn accuracy(&mut self, scores: &BlobRef, label: &BlobRef, output: &str) -> BlobRef {
        self.net_mut()
            .op("Accuracy")
            .inputs([scores, label])
            .output(output)
            .build_one()
    }
}
