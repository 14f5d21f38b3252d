//! The convolutions the direct kernels do not suit, as im2col + GEMM:
//! - 1×1 with stride 1 and no padding, where the image already is the column
//!   matrix and the GEMM runs on it in place (wide 1×1 layers, such as
//!   ResNet-50's bottlenecks, are what a GEMM library's cache blocking is for);
//! - outputs narrower than most of a vector (a 2×2 map would fill 2 of 8 lanes
//!   of a pixel tile), where the GEMM vectorises over output channels instead.
//!
//! im2col writes the column matrix of one image and group into scratch (kept by
//! the kernel), building strided windows from phase planes with contiguous
//! copies; col2im is its adjoint.

use super::{Dims, Window};
use crate::ops::cpu::gemm::{sgemm, Mat};
use crate::tensor::HostVec;

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
fn im2col(x: &[f32], c: usize, h: usize, w: usize, win: &Window, col: &mut [f32]) {
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

/// Where phase `(a, b)` starts in the buffer of phases [`im2col`] fills.
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
fn col2im(col: &mut [f32], c: usize, h: usize, w: usize, win: &Window, dx: &mut [f32]) {
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

/// Rows of the column matrix of one group.
fn col_rows(d: &Dims, win: &Window) -> usize {
    d.c / d.groups * win.kernel.0 * win.kernel.1
}

/// `y = W · col(x) (+ b)` per image and group. `col` is scratch.
pub(super) fn forward(
    win: &Window,
    d: &Dims,
    (x, w, bias): (&[f32], &[f32], Option<&[f32]>),
    y: &mut [f32],
    col: &mut HostVec<f32>,
) {
    let (g, cg, mg) = (d.groups, d.c / d.groups, d.m / d.groups);
    let (k, ohw, hw) = (col_rows(d, win), d.oh * d.ow, d.h * d.w);
    let pointwise = win.is_pointwise();
    col.resize(if pointwise { 0 } else { k * ohw }, 0.0);
    for n in 0..d.n {
        for gi in 0..g {
            let x = &x[(n * d.c + gi * cg) * hw..(n * d.c + (gi + 1) * cg) * hw];
            let cols: &[f32] = if pointwise {
                x
            } else {
                im2col(x, cg, d.h, d.w, win, col);
                col
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
                Mat::n(&w[gi * mg * k..(gi + 1) * mg * k]),
                Mat::n(cols),
                beta,
                out,
            );
        }
    }
}

/// `dW = Σ_images dY · col(x)ᵀ` and `dX = col2im(Wᵀ · dY)`, both overwritten.
/// `col` is scratch.
pub(super) fn backward(
    win: &Window,
    d: &Dims,
    (x, w, dy): (&[f32], &[f32], &[f32]),
    dw: &mut [f32],
    mut dx: Option<&mut [f32]>,
    col: &mut HostVec<f32>,
) {
    let (g, cg, mg) = (d.groups, d.c / d.groups, d.m / d.groups);
    let (k, ohw, hw) = (col_rows(d, win), d.oh * d.ow, d.h * d.w);
    let pointwise = win.is_pointwise();
    col.resize(if pointwise { 0 } else { k * ohw }, 0.0);
    if d.n == 0 {
        dw.fill(0.0);
    }
    if let Some(dx) = dx.as_deref_mut() {
        if !pointwise {
            dx.fill(0.0);
        }
    }
    for n in 0..d.n {
        for gi in 0..g {
            let xs = &x[(n * d.c + gi * cg) * hw..(n * d.c + (gi + 1) * cg) * hw];
            let dys = &dy[(n * d.m + gi * mg) * ohw..(n * d.m + (gi + 1) * mg) * ohw];
            let wg = &w[gi * mg * k..(gi + 1) * mg * k];
            let dwg = &mut dw[gi * mg * k..(gi + 1) * mg * k];
            let beta = if n == 0 { 0.0 } else { 1.0 };
            // dW_g += dY_g · colᵀ
            if pointwise {
                sgemm(mg, k, ohw, Mat::n(dys), Mat::t(xs), beta, dwg);
            } else {
                im2col(xs, cg, d.h, d.w, win, col);
                sgemm(mg, k, ohw, Mat::n(dys), Mat::t(col), beta, dwg);
            }
            // dX_g = col2im(W_gᵀ · dY_g)
            if let Some(dx) = dx.as_deref_mut() {
                let dxs = &mut dx[(n * d.c + gi * cg) * hw..(n * d.c + (gi + 1) * cg) * hw];
                if pointwise {
                    sgemm(k, ohw, mg, Mat::t(wg), Mat::n(dys), 0.0, dxs);
                } else {
                    sgemm(k, ohw, mg, Mat::t(wg), Mat::n(dys), 0.0, col);
                    col2im(col, cg, d.h, d.w, win, dxs);
                }
            }
        }
    }
}
