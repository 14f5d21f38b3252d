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
    /// and the lists `kernels`, `strides`, `pads` (t, l, b, r), as Caffe2 spells them. `kernel_required = false` allows a missing kernel
    /// (global pooling).
    pub fn parse(op: &OperatorDef, kernel_required: bool) -> Result<Window> {
        let a = Args(&op.arg);
        let pair = |name: &str, h: &str, w: &str, default: usize| -> Result<(usize, usize)> {
            let both = a.usize(name, default)?;
            Ok((a.usize(h, both)?, a.usize(w, both)?))
        };
        // The n-d list forms (`kernels`, `strides`, `pads`, `dilations`) as Caffe2's
        // conv_pool_op_base reads them; they win over the scalar forms.
        let list = |name: &str, len: usize| -> Result<Option<Vec<usize>>> {
            let Some(v) = a.ints(name) else { return Ok(None) };
            if v.len() != len || v.iter().any(|&x| x < 0) {
                return Err(Error::arg(
                    name,
                    format!("expected {len} values ≥ 0 for a 2-D window, got {v:?}"),
                ));
            }
            Ok(Some(v.iter().map(|&x| x as usize).collect()))
        };
        let kernel = match list("kernels", 2)? {
            Some(k) => (k[0], k[1]),
            None => pair("kernel", "kernel_h", "kernel_w", 0)?,
        };
        if kernel_required && (kernel.0 == 0 || kernel.1 == 0) {
            return Err(Error::arg("kernel", "required, ≥ 1"));
        }
        let stride = match list("strides", 2)? {
            Some(st) => (st[0], st[1]),
            None => pair("stride", "stride_h", "stride_w", 1)?,
        };
        if stride.0 == 0 || stride.1 == 0 {
            return Err(Error::arg("stride", "must be ≥ 1"));
        }
        let p = a.usize("pad", 0)?;
        let pad = match list("pads", 4)? {
            Some(v) => (v[0], v[1], v[2], v[3]),
            None => (
                a.usize("pad_t", p)?,
                a.usize("pad_l", p)?,
                a.usize("pad_b", p)?,
                a.usize("pad_r", p)?,
            ),
        };
        if list("dilations", 2)?.is_some_and(|d| d != [1, 1]) {
            return Err(Error::arg("dilations", "dilated windows are not supported"));
        }
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
