//! The sliding-window geometry of convolution and pooling, parsed from Caffe2's
//! argument spellings.

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::proto::OperatorDef;

/// Window geometry shared by convolution and pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Kernel height and width.
    pub kernel: (usize, usize),
    /// Strides.
    pub stride: (usize, usize),
    /// Padding: top, left, bottom, right.
    pub pad: (usize, usize, usize, usize),
}

impl Window {
    /// Reads `kernel`/`kernel_h`/`kernel_w`, `stride`…, `pad`/`pad_t`/`pad_l`/`pad_b`/`pad_r`
    /// as Caffe2 spells them. `kernel_required = false` allows a missing kernel
    /// (global pooling).
    pub fn parse(op: &OperatorDef, kernel_required: bool) -> Result<Window> {
        let a = Args(&op.arg);
        let pair = |name: &str, h: &str, w: &str, default: usize| -> Result<(usize, usize)> {
            let both = a.usize(name, default)?;
            Ok((a.usize(h, both)?, a.usize(w, both)?))
        };
        let kernel = pair("kernel", "kernel_h", "kernel_w", 0)?;
        if kernel_required && (kernel.0 == 0 || kernel.1 == 0) {
            return Err(Error::arg("kernel", "required, ≥ 1"));
        }
        let stride = pair("stride", "stride_h", "stride_w", 1)?;
        if stride.0 == 0 || stride.1 == 0 {
            return Err(Error::arg("stride", "must be ≥ 1"));
        }
        let p = a.usize("pad", 0)?;
        let pad = (
            a.usize("pad_t", p)?,
            a.usize("pad_l", p)?,
            a.usize("pad_b", p)?,
            a.usize("pad_r", p)?,
        );
        for unsupported in ["dilation", "dilation_h", "dilation_w"] {
            if a.int(unsupported, 1)? != 1 {
                return Err(Error::arg(unsupported, "dilated windows are not supported"));
            }
        }
        if a.string("order", "NCHW")? != "NCHW" {
            return Err(Error::arg("order", "only NCHW is supported"));
        }
        Ok(Window { kernel, stride, pad })
    }

    /// Output height and width for an `h × w` input, or `None` if the window does not fit.
    /// Sizes that overflow count as not fitting.
    pub fn output(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let (kh, kw) = self.kernel;
        let (ph, pw) = self.padded(h, w)?;
        (ph >= kh && pw >= kw).then(|| ((ph - kh) / self.stride.0 + 1, (pw - kw) / self.stride.1 + 1))
    }

    /// The input's height and width with the padding, if they fit in `usize`.
    pub fn padded(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        Some((
            h.checked_add(self.pad.0)?.checked_add(self.pad.2)?,
            w.checked_add(self.pad.1)?.checked_add(self.pad.3)?,
        ))
    }

    /// Whether the window is 1×1 with stride 1 and no padding: the input itself
    /// is the column matrix.
    pub fn is_pointwise(&self) -> bool {
        self.kernel == (1, 1) && self.stride == (1, 1) && self.pad == (0, 0, 0, 0)
    }
}
