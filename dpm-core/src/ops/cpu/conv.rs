//! `Conv` and `ConvGradient` (NCHW): im2col into a scratch buffer kept by the
//! kernel between calls, then one GEMM per image and group. 1×1 convolutions with
//! stride 1 and no padding skip im2col: the image already is the column matrix.

use std::sync::Mutex;

use super::gemm::{sgemm, Mat};
use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;
use crate::tensor::{Shape, Tensor};

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
    pub fn output(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let (kh, kw) = self.kernel;
        let (ph, pw) = (h + self.pad.0 + self.pad.2, w + self.pad.1 + self.pad.3);
        (ph >= kh && pw >= kw).then(|| ((ph - kh) / self.stride.0 + 1, (pw - kw) / self.stride.1 + 1))
    }

    /// Whether im2col would be the identity (1×1, stride 1, no padding).
    fn is_pointwise(&self) -> bool {
        self.kernel == (1, 1) && self.stride == (1, 1) && self.pad == (0, 0, 0, 0)
    }
}

/// `a = q·s + r` with `0 ≤ r < s`.
fn div_floor(a: isize, s: usize) -> (isize, usize) {
    let q = a.div_euclid(s as isize);
    (q, (a - q * s as isize) as usize)
}

/// Phase `(a, b)` of a plane for strides `(sh, sw)`: the elements at rows
/// `a, a + sh, …` and columns `b, b + sw, …`, as a dense `ph × pw` plane.
fn phase_dims(h: usize, w: usize, (sh, sw): (usize, usize), a: usize, b: usize) -> (usize, usize) {
    (
        (h.saturating_sub(a)).div_ceil(sh),
        (w.saturating_sub(b)).div_ceil(sw),
    )
}

/// Writes phase `(a, b)` of `plane` into `out` (dense, `phase_dims` in size).
fn extract_phase(
    plane: &[f32],
    h: usize,
    w: usize,
    st: (usize, usize),
    (a, b): (usize, usize),
    out: &mut [f32],
) {
    let pw = phase_dims(h, w, st, a, b).1;
    for (row, y) in out.chunks_exact_mut(pw.max(1)).zip((a..h).step_by(st.0)) {
        let src = &plane[y * w + b..(y + 1) * w];
        match st.1 {
            1 => row.copy_from_slice(&src[..pw]),
            2 => strided_copy::<2>(row, src),
            s => row
                .iter_mut()
                .zip(src.iter().step_by(s))
                .for_each(|(d, &v)| *d = v),
        }
    }
}

/// `dst[i] = src[S·i]`, with the bounds check hoisted so the loop vectorises.
#[inline(always)]
fn strided_copy<const S: usize>(dst: &mut [f32], src: &[f32]) {
    if dst.is_empty() {
        return;
    }
    let src = &src[..S * (dst.len() - 1) + 1];
    for (i, d) in dst.iter_mut().enumerate() {
        *d = src[S * i];
    }
}

/// Scatters phase `(a, b)` back into `plane` (the inverse of [`extract_phase`]).
fn insert_phase(
    phase: &[f32],
    h: usize,
    w: usize,
    st: (usize, usize),
    (a, b): (usize, usize),
    plane: &mut [f32],
) {
    let pw = phase_dims(h, w, st, a, b).1;
    for (row, y) in phase.chunks_exact(pw.max(1)).zip((a..h).step_by(st.0)) {
        for (d, &v) in plane[y * w + b..(y + 1) * w].iter_mut().step_by(st.1).zip(row) {
            *d = v;
        }
    }
}

/// The phases a `kh × kw` window with padding `(pt, pl)` reads, in row-major order.
fn used_phases(win: &Window) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for ki in 0..win.kernel.0 {
        for kj in 0..win.kernel.1 {
            let a = div_floor(ki as isize - win.pad.0 as isize, win.stride.0).1;
            let b = div_floor(kj as isize - win.pad.1 as isize, win.stride.1).1;
            if !v.contains(&(a, b)) {
                v.push((a, b));
            }
        }
    }
    v
}

/// `dst[oy][ox] = src[oy + qy][ox + qx]`, zero outside `src` (`dst` is `oh × ow`,
/// `src` is `ph × pw`). With `ow == pw` the valid part is one contiguous copy.
fn shifted_copy(src: &[f32], (ph, pw): (usize, usize), (qy, qx): (isize, isize), dst: &mut [f32], ow: usize) {
    let oh = dst.len() / ow.max(1);
    let clamp = |v: isize, hi: usize| v.clamp(0, hi as isize) as usize;
    let (y0, y1) = (clamp(-qy, oh), clamp(ph as isize - qy, oh));
    let (x0, x1) = (clamp(-qx, ow), clamp(pw as isize - qx, ow));
    if y1 <= y0 || x1 <= x0 {
        dst.fill(0.0);
        return;
    }
    dst[..y0 * ow].fill(0.0);
    dst[y1 * ow..].fill(0.0);
    if ow == pw {
        let off = qy * pw as isize + qx;
        let (lo, hi) = (y0 * ow + x0, (y1 - 1) * ow + x1);
        let s0 = (lo as isize + off) as usize;
        dst[lo..hi].copy_from_slice(&src[s0..s0 + (hi - lo)]);
        // The contiguous copy wrapped across rows at the borders: zero those columns.
        zero_columns(&mut dst[y0 * ow..y1 * ow], ow, x0, x1);
    } else {
        for oy in y0..y1 {
            let row = &mut dst[oy * ow..(oy + 1) * ow];
            let sy = (oy as isize + qy) as usize;
            let sx = (x0 as isize + qx) as usize;
            row[x0..x1].copy_from_slice(&src[sy * pw + sx..sy * pw + sx + (x1 - x0)]);
        }
        zero_columns(&mut dst[y0 * ow..y1 * ow], ow, x0, x1);
    }
}

/// Zeroes columns `..x0` and `x1..` of `rows` (rows of `ow`). Column by column:
/// per-row slices of one or two elements would each become a `memset` call.
fn zero_columns(rows: &mut [f32], ow: usize, x0: usize, x1: usize) {
    for x in (0..x0).chain(x1..ow) {
        for v in rows[x..].iter_mut().step_by(ow) {
            *v = 0.0;
        }
    }
}

/// `dst[oy + qy][ox + qx] += src[oy][ox]` where inside `dst`: the adjoint of
/// [`shifted_copy`]. `src` is scratch: with `ow == pw` its out-of-range columns
/// are zeroed so that the valid part is one contiguous add.
fn shifted_add(
    src: &mut [f32],
    ow: usize,
    (qy, qx): (isize, isize),
    dst: &mut [f32],
    (ph, pw): (usize, usize),
) {
    let oh = src.len() / ow.max(1);
    let clamp = |v: isize, hi: usize| v.clamp(0, hi as isize) as usize;
    let (y0, y1) = (clamp(-qy, oh), clamp(ph as isize - qy, oh));
    let (x0, x1) = (clamp(-qx, ow), clamp(pw as isize - qx, ow));
    if x1 <= x0 || y1 <= y0 {
        return;
    }
    if ow == pw {
        zero_columns(&mut src[y0 * ow..y1 * ow], ow, x0, x1);
        let off = qy * pw as isize + qx;
        let (lo, hi) = (y0 * ow + x0, (y1 - 1) * ow + x1);
        let d0 = (lo as isize + off) as usize;
        for (d, &v) in dst[d0..d0 + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
            *d += v;
        }
        return;
    }
    for oy in y0..y1 {
        let sy = (oy as isize + qy) as usize;
        let sx = (x0 as isize + qx) as usize;
        let d = &mut dst[sy * pw + sx..sy * pw + sx + (x1 - x0)];
        for (d, &v) in d.iter_mut().zip(&src[oy * ow + x0..oy * ow + x1]) {
            *d += v;
        }
    }
}

/// Writes the column matrix of one image (`c` channels of `h × w`) into `col`
/// (`c·kh·kw` rows of `oh·ow`).
///
/// Each row of `col` is a shifted window of one *phase* of the input plane (for
/// stride 1, the plane itself), so rows are built from contiguous copies.
pub fn im2col(x: &[f32], c: usize, h: usize, w: usize, win: &Window, col: &mut [f32]) {
    let (kh, kw) = win.kernel;
    let st = win.stride;
    let (oh, ow) = win.output(h, w).expect("checked by the caller");
    let (pt, pl) = (win.pad.0 as isize, win.pad.1 as isize);
    let strided = st != (1, 1);
    let used = if strided { used_phases(win) } else { Vec::new() };
    let mut phases = vec![0.0f32; if strided { h * w } else { 0 }];
    let mut rows = col.chunks_exact_mut(oh * ow);
    for ci in 0..c {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for &(a, b) in &used {
            let off = phase_offset(h, w, st, a, b);
            extract_phase(plane, h, w, st, (a, b), &mut phases[off..]);
        }
        for ki in 0..kh {
            let (qy, a) = div_floor(ki as isize - pt, st.0);
            for kj in 0..kw {
                let (qx, b) = div_floor(kj as isize - pl, st.1);
                let row = rows.next().expect("col has c·kh·kw rows");
                let (src, dims) = if strided {
                    (
                        &phases[phase_offset(h, w, st, a, b)..],
                        phase_dims(h, w, st, a, b),
                    )
                } else {
                    (plane, (h, w))
                };
                shifted_copy(src, dims, (qy, qx), row, ow);
            }
        }
    }
}

/// Where phase `(a, b)` starts in the buffer [`split_phases`] fills.
fn phase_offset(h: usize, w: usize, st: (usize, usize), a: usize, b: usize) -> usize {
    let mut off = 0;
    for pa in 0..st.0 {
        for pb in 0..st.1 {
            if (pa, pb) == (a, b) {
                return off;
            }
            let (ph, pw) = phase_dims(h, w, st, pa, pb);
            off += ph * pw;
        }
    }
    off
}

/// Adds the column matrix `col` back into one image's gradient `dx` (the adjoint
/// of [`im2col`]). `col` is used as scratch.
pub fn col2im(col: &mut [f32], c: usize, h: usize, w: usize, win: &Window, dx: &mut [f32]) {
    let (kh, kw) = win.kernel;
    let st = win.stride;
    let (oh, ow) = win.output(h, w).expect("checked by the caller");
    let (pt, pl) = (win.pad.0 as isize, win.pad.1 as isize);
    let strided = st != (1, 1);
    let used = if strided { used_phases(win) } else { Vec::new() };
    let mut phases = vec![0.0f32; if strided { h * w } else { 0 }];
    let mut rows = col.chunks_exact_mut(oh * ow);
    for ci in 0..c {
        let plane = &mut dx[ci * h * w..(ci + 1) * h * w];
        if strided {
            phases.fill(0.0);
        }
        for ki in 0..kh {
            let (qy, a) = div_floor(ki as isize - pt, st.0);
            for kj in 0..kw {
                let (qx, b) = div_floor(kj as isize - pl, st.1);
                let row = rows.next().expect("col has c·kh·kw rows");
                if strided {
                    let off = phase_offset(h, w, st, a, b);
                    shifted_add(row, ow, (qy, qx), &mut phases[off..], phase_dims(h, w, st, a, b));
                } else {
                    shifted_add(row, ow, (qy, qx), plane, (h, w));
                }
            }
        }
        // The plane starts at zero (the caller zeroes dx); phases the window never
        // reads keep their zeros.
        for &(a, b) in &used {
            let off = phase_offset(h, w, st, a, b);
            insert_phase(&phases[off..], h, w, st, (a, b), plane);
        }
    }
}

/// Checked dimensions of a convolution.
struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    m: usize,
    oh: usize,
    ow: usize,
    groups: usize,
}

impl Dims {
    fn col_rows(&self, win: &Window) -> usize {
        self.c / self.groups * win.kernel.0 * win.kernel.1
    }
}

fn dims(ctx: &OpContext<'_>, win: &Window, groups: usize) -> Result<Dims> {
    let x = ctx.input(0)?;
    let wt = ctx.input(1)?;
    let &[n, c, h, w] = x.dims() else {
        return Err(Error::shape(ctx.input_name(0), "[N, C, H, W]", x.shape()));
    };
    let (oh, ow) = win.output(h, w).ok_or_else(|| {
        Error::shape(
            ctx.input_name(0),
            format!("at least the {:?} kernel (with padding)", win.kernel),
            x.shape(),
        )
    })?;
    let m = wt.dims().first().copied().unwrap_or(0);
    let expect = [m, c / groups.max(1), win.kernel.0, win.kernel.1];
    if c % groups != 0 || m % groups != 0 || wt.dims() != expect {
        return Err(Error::shape(
            ctx.input_name(1),
            format!(
                "[M, C/group, kh, kw] = [M, {}, {}, {}] with M and C={c} divisible by group={groups}",
                c / groups.max(1),
                win.kernel.0,
                win.kernel.1
            ),
            wt.shape(),
        ));
    }
    Ok(Dims {
        n,
        c,
        h,
        w,
        m,
        oh,
        ow,
        groups,
    })
}

fn scratch(buf: &Mutex<Vec<f32>>, len: usize) -> std::sync::MutexGuard<'_, Vec<f32>> {
    let mut g = buf.lock().unwrap_or_else(|e| e.into_inner());
    if g.len() < len {
        g.resize(len, 0.0);
    }
    g
}

/// `Conv(X, W[, b]) → Y`.
pub struct Conv {
    win: Window,
    groups: usize,
    col: Mutex<Vec<f32>>,
}

/// `ConvGradient(X, W, dY) → (dW[, db][, dX])`; `no_bias = 1` means there is no db.
pub struct ConvGradient {
    win: Window,
    groups: usize,
    bias: bool,
    col: Mutex<Vec<f32>>,
}

fn groups(op: &OperatorDef) -> Result<usize> {
    let g = Args(&op.arg).usize("group", 1)?;
    if g == 0 {
        return Err(Error::arg("group", "must be ≥ 1"));
    }
    Ok(g)
}

impl Conv {
    /// Parses the window and `group`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Conv {
            win: Window::parse(op, true)?,
            groups: groups(op)?,
            col: Mutex::default(),
        }))
    }
}

impl ConvGradient {
    /// Parses the window, `group` and `no_bias`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(ConvGradient {
            win: Window::parse(op, true)?,
            groups: groups(op)?,
            bias: Args(&op.arg).int("no_bias", 0)? == 0,
            col: Mutex::default(),
        }))
    }
}

impl Kernel for Conv {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=3)?;
        ctx.expect_outputs(1..=1)?;
        let d = dims(ctx, &self.win, self.groups)?;
        let (_, xd) = ctx.input_f32(0)?;
        let (_, wd) = ctx.input_f32(1)?;
        let bias = if ctx.num_inputs() == 3 {
            let (b, bd) = ctx.input_f32(2)?;
            if b.numel() != d.m {
                return Err(Error::shape(ctx.input_name(2), format!("[{}]", d.m), b.shape()));
            }
            Some(bd)
        } else {
            None
        };
        let (g, cg, mg) = (d.groups, d.c / d.groups, d.m / d.groups);
        let (k, ohw, hw) = (d.col_rows(&self.win), d.oh * d.ow, d.h * d.w);
        let pointwise = self.win.is_pointwise();
        let mut col = scratch(&self.col, if pointwise { 0 } else { k * ohw });
        let y = ctx.output(0).resize::<f32>(Shape::from([d.n, d.m, d.oh, d.ow]));
        for n in 0..d.n {
            for gi in 0..g {
                let x = &xd[(n * d.c + gi * cg) * hw..(n * d.c + (gi + 1) * cg) * hw];
                let cols: &[f32] = if pointwise {
                    x
                } else {
                    im2col(x, cg, d.h, d.w, &self.win, &mut col[..k * ohw]);
                    &col[..k * ohw]
                };
                let out = &mut y[(n * d.m + gi * mg) * ohw..(n * d.m + (gi + 1) * mg) * ohw];
                let beta = match bias {
                    Some(b) => {
                        for (row, &bv) in out.chunks_exact_mut(ohw).zip(&b[gi * mg..(gi + 1) * mg]) {
                            row.fill(bv);
                        }
                        1.0
                    }
                    None => 0.0,
                };
                sgemm(
                    mg,
                    ohw,
                    k,
                    Mat::n(&wd[gi * mg * k..(gi + 1) * mg * k]),
                    Mat::n(cols),
                    beta,
                    out,
                );
            }
        }
        Ok(())
    }
}

impl Kernel for ConvGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(3..=3)?;
        let with_dx = ctx.num_outputs() == 2 + usize::from(self.bias);
        ctx.expect_outputs((1 + usize::from(self.bias))..=(2 + usize::from(self.bias)))?;
        let d = dims(ctx, &self.win, self.groups)?;
        let (x, xd) = ctx.input_f32(0)?;
        let (w, wd) = ctx.input_f32(1)?;
        let (dy, dyd) = ctx.input_f32(2)?;
        if dy.dims() != [d.n, d.m, d.oh, d.ow] {
            return Err(Error::shape(
                ctx.input_name(2),
                format!("[{}, {}, {}, {}]", d.n, d.m, d.oh, d.ow),
                dy.shape(),
            ));
        }
        let (g, cg, mg) = (d.groups, d.c / d.groups, d.m / d.groups);
        let (k, ohw, hw) = (d.col_rows(&self.win), d.oh * d.ow, d.h * d.w);
        let pointwise = self.win.is_pointwise();
        let mut col = scratch(&self.col, if pointwise { 0 } else { k * ohw });
        let outs = ctx.outputs();
        let (dw_t, rest) = outs.split_first_mut().expect("≥ 1 output");
        let dw = dw_t.resize::<f32>(w.shape());
        let mut rest = rest.iter_mut();
        if self.bias {
            let db = rest.next().expect("arity checked").resize::<f32>([d.m]);
            db.fill(0.0);
            for plane in dyd.chunks_exact(ohw).enumerate() {
                db[plane.0 % d.m] += plane.1.iter().sum::<f32>();
            }
        }
        let mut dx: Option<&mut [f32]> = if with_dx {
            let t: &mut Tensor = rest.next().expect("arity checked");
            let s = t.resize::<f32>(x.shape());
            if !pointwise {
                s.fill(0.0);
            }
            Some(s)
        } else {
            None
        };
        for n in 0..d.n {
            for gi in 0..g {
                let xs = &xd[(n * d.c + gi * cg) * hw..(n * d.c + (gi + 1) * cg) * hw];
                let dys = &dyd[(n * d.m + gi * mg) * ohw..(n * d.m + (gi + 1) * mg) * ohw];
                let wg = &wd[gi * mg * k..(gi + 1) * mg * k];
                let dwg = &mut dw[gi * mg * k..(gi + 1) * mg * k];
                let beta = if n == 0 { 0.0 } else { 1.0 };
                // dW_g += dY_g · colᵀ
                if pointwise {
                    sgemm(mg, k, ohw, Mat::n(dys), Mat::t(xs), beta, dwg);
                } else {
                    im2col(xs, cg, d.h, d.w, &self.win, &mut col[..k * ohw]);
                    sgemm(mg, k, ohw, Mat::n(dys), Mat::t(&col[..k * ohw]), beta, dwg);
                }
                // dX_g = col2im(W_gᵀ · dY_g)
                if let Some(dx) = dx.as_deref_mut() {
                    let dxs = &mut dx[(n * d.c + gi * cg) * hw..(n * d.c + (gi + 1) * cg) * hw];
                    if pointwise {
                        sgemm(k, ohw, mg, Mat::t(wg), Mat::n(dys), 0.0, dxs);
                    } else {
                        sgemm(k, ohw, mg, Mat::t(wg), Mat::n(dys), 0.0, &mut col[..k * ohw]);
                        col2im(&mut col[..k * ohw], cg, d.h, d.w, &self.win, dxs);
                    }
                }
            }
        }
        Ok(())
    }
}
