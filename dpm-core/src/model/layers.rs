//! Layer helpers, after Caffe2's `brew`: each adds its parameters (with their
//! initialisers) and its ops, in the current scope, and returns its output.

use super::{Init, ModelHelper};
use crate::error::{Error, Result};
use crate::graph::BlobRef;

/// A convolution layer's shape and options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvSpec {
    /// Input channels.
    pub dim_in: usize,
    /// Output channels.
    pub dim_out: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding on every side.
    pub pad: usize,
    /// Channel groups.
    pub groups: usize,
    /// Whether the layer has a bias.
    pub bias: bool,
    /// Weight initialiser.
    pub init: Init,
}

impl ConvSpec {
    /// `dim_in → dim_out` channels with a `kernel × kernel` window, stride 1, no
    /// padding, a bias, MSRA initialisation.
    pub fn new(dim_in: usize, dim_out: usize, kernel: usize) -> Self {
        ConvSpec {
            dim_in,
            dim_out,
            kernel,
            stride: 1,
            pad: 0,
            groups: 1,
            bias: true,
            init: Init::Msra,
        }
    }

    /// Sets the stride.
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = s;
        self
    }

    /// Sets the padding.
    pub fn pad(mut self, p: usize) -> Self {
        self.pad = p;
        self
    }

    /// Sets the number of groups.
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }

    /// Drops the bias (as before batch norm).
    pub fn no_bias(mut self) -> Self {
        self.bias = false;
        self
    }

    /// Sets the weight initialiser.
    pub fn init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }
}

impl ModelHelper {
    /// Fully connected layer `name`: `input` (viewed as batch × `dim_in`) times a
    /// `dim_out × dim_in` weight `<name>_w` (Xavier) plus bias `<name>_b` (zeros).
    pub fn fc(&mut self, name: &str, input: &BlobRef, dim_in: usize, dim_out: usize) -> Result<BlobRef> {
        let w = self.create_param(&format!("{name}_w"), [dim_out, dim_in], Init::Xavier)?;
        let b = self.create_param(&format!("{name}_b"), [dim_out], Init::Constant(0.0))?;
        self.exempt_from_weight_decay(&b);
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

impl ModelHelper {
    /// Convolution layer `name` (NCHW): weight `<name>_w` of
    /// `[dim_out, dim_in/groups, k, k]`, optional bias `<name>_b`.
    pub fn conv(&mut self, name: &str, input: &BlobRef, spec: ConvSpec) -> Result<BlobRef> {
        let ConvSpec {
            dim_in,
            dim_out,
            kernel,
            stride,
            pad,
            groups,
            bias,
            init,
        } = spec;
        if groups == 0 || dim_in % groups != 0 || dim_out % groups != 0 || kernel == 0 || stride == 0 {
            return Err(Error::Config(format!(
                "conv `{name}`: {dim_in} → {dim_out} channels in {groups} groups, kernel {kernel}, stride {stride} is not a valid convolution"
            )));
        }
        let w = self.create_param(
            &format!("{name}_w"),
            [dim_out, dim_in / groups, kernel, kernel],
            init,
        )?;
        let mut inputs = vec![input.clone(), w];
        if bias {
            let b = self.create_param(&format!("{name}_b"), [dim_out], Init::Constant(0.0))?;
            self.exempt_from_weight_decay(&b);
            inputs.push(b);
        }
        let deterministic = self.is_deterministic();
        let mut op = self
            .net_mut()
            .op("Conv")
            .inputs(&inputs)
            .output(name)
            .arg("kernel", kernel)
            .arg("stride", stride)
            .arg("pad", pad)
            .arg("group", groups)
            .arg("order", "NCHW");
        if deterministic {
            op = op.arg("deterministic", 1i64);
        }
        Ok(op.build_one())
    }

    /// Spatial batch normalisation `name` over `channels`: scale `<name>_s`, bias
    /// `<name>_b`, running mean `<name>_rm` and variance `<name>_riv` (computed
    /// params). In a test model it uses the running statistics.
    pub fn spatial_bn(
        &mut self,
        name: &str,
        input: &BlobRef,
        channels: usize,
        momentum: f32,
        epsilon: f32,
    ) -> Result<BlobRef> {
        let s = self.create_param(&format!("{name}_s"), [channels], Init::Constant(1.0))?;
        let b = self.create_param(&format!("{name}_b"), [channels], Init::Constant(0.0))?;
        self.exempt_from_weight_decay(&s);
        self.exempt_from_weight_decay(&b);
        let rm = self.create_computed_param(&format!("{name}_rm"), [channels], 0.0);
        let rv = self.create_computed_param(&format!("{name}_riv"), [channels], 1.0);
        let is_test = self.is_test();
        let op = self
            .net_mut()
            .op("SpatialBN")
            .inputs([input, &s, &b, &rm, &rv])
            .output(name)
            .arg("epsilon", epsilon)
            .arg("momentum", momentum)
            .arg("is_test", is_test)
            .arg("order", "NCHW");
        let op = if is_test {
            op
        } else {
            op.outputs([&rm, &rv])
                .output(format!("{name}_sm"))
                .output(format!("{name}_siv"))
        };
        Ok(op.build()[0].clone())
    }

    /// Max pooling with a `kernel × kernel` window into `output`.
    pub fn max_pool(
        &mut self,
        input: &BlobRef,
        output: &str,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> BlobRef {
        self.net_mut()
            .op("MaxPool")
            .input(input)
            .output(output)
            .arg("kernel", kernel)
            .arg("stride", stride)
            .arg("pad", pad)
            .arg("order", "NCHW")
            .build_one()
    }

    /// Average pooling with a `kernel × kernel` window into `output`.
    pub fn average_pool(&mut self, input: &BlobRef, output: &str, kernel: usize, stride: usize) -> BlobRef {
        self.net_mut()
            .op("AveragePool")
            .input(input)
            .output(output)
            .arg("kernel", kernel)
            .arg("stride", stride)
            .arg("order", "NCHW")
            .build_one()
    }

    /// Average over each whole plane: `[N, C, H, W] → [N, C, 1, 1]`.
    pub fn global_average_pool(&mut self, input: &BlobRef, output: &str) -> BlobRef {
        self.net_mut()
            .op("AveragePool")
            .input(input)
            .output(output)
            .arg("global_pooling", 1i64)
            .arg("order", "NCHW")
            .build_one()
    }

    /// Elementwise `a + b` into `output` (residual connections).
    pub fn add(&mut self, a: &BlobRef, b: &BlobRef, output: &str) -> BlobRef {
        self.net_mut().op("Sum").inputs([a, b]).output(output).build_one()
    }

    /// `[N, …] → [N, ∏ …]` into `output`.
    pub fn flatten(&mut self, input: &BlobRef, output: &str) -> BlobRef {
        self.net_mut()
            .op("Flatten")
            .input(input)
            .output(output)
            .build_one()
    }
}
