//! Where each tap of the window finds its inputs.
//!
//! With stride `s`, output pixel `(oy, ox)` and kernel tap `(ki, kj)` read padded
//! input `(s·oy + ki, s·ox + kj)`: element `(oy + ki / s, ox + kj / s)` of the
//! *phase* `(ki mod s, kj mod s)`, the sub-plane of every `s`-th row and column.
//! Within a zero-padded phase plane, consecutive output pixels read consecutive
//! elements for every tap, so a strided convolution is a sum of stride-1
//! correlations, one per phase, and no column matrix is needed:
//! - [`InputPlanes`] lays out an image that way for the forward pass and dW;
//! - [`GradPlanes`] pads dY so that each phase of dX is again a stride-1
//!   correlation, of dY with the taps of that phase, flipped ([`DxPhase`]).
//!
//! Two layouts are the data itself: a 1×1 window with stride 2 across and no
//! padding reads every second pixel of the image ([`InputPlanes::reads_image`],
//! segments of step 2), and a dY with no padding around it is its own padded
//! layout ([`GradPlanes::is_dy`]).
//!
//! Buffers are written only where data goes: their zero padding is written once,
//! when the caller sizes them, and survives reuse with the same geometry.

use std::ops::Range;

use super::tiles::{gather_rows, interleave, scatter_even, split_even_odd, Isa, Segments, Taps, LANES};
use super::window::Window;

/// The `i` with `stride·i + phase − pad ∈ [0, len)`, capped at `limit`, as `lo..hi`.
fn span(phase: usize, pad: usize, stride: usize, len: usize, limit: usize) -> (usize, usize) {
    let lo = pad.saturating_sub(phase).div_ceil(stride).min(limit);
    let hi = (pad + len).saturating_sub(phase).div_ceil(stride).min(limit);
    (lo, hi.max(lo))
}

/// For each row `r < rows`: `dst[r·pitch + j] = src[r·src_pitch + stride·j]`
/// for `j < n`.
#[allow(clippy::too_many_arguments)]
fn gather(
    isa: Isa,
    src: &[f32],
    src_pitch: usize,
    rows: usize,
    dst: &mut [f32],
    n: usize,
    pitch: usize,
    stride: usize,
) {
    match stride {
        1 => return gather_rows::<1>(isa, src, src_pitch, rows, dst, n, pitch),
        2 => return gather_rows::<2>(isa, src, src_pitch, rows, dst, n, pitch),
        _ => {}
    }
    for r in 0..rows {
        let (src, dst) = (&src[r * src_pitch..], &mut dst[r * pitch..][..n]);
        for (j, d) in dst.iter_mut().enumerate() {
            *d = src[stride * j];
        }
    }
}

/// `dst[stride·j] = src[j]`, leaving the elements between untouched.
fn scatter(isa: Isa, dst: &mut [f32], src: &[f32], stride: usize) {
    match stride {
        1 => dst[..src.len()].copy_from_slice(src),
        2 => scatter_even(isa, dst, src),
        s => {
            let dst = &mut dst[..s * src.len().saturating_sub(1) + 1];
            for (j, &v) in src.iter().enumerate() {
                dst[s * j] = v;
            }
        }
    }
}

/// Two disjoint ranges of `buf`, mutably.
fn pair_mut(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&mut [f32], &mut [f32]) {
    if a.start <= b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.len()])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&mut hi[..a.len()], &mut lo[b])
    }
}

/// One image of `c` channels as the zero-padded phase planes the window reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputPlanes {
    win: Window,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    /// Phase plane size.
    hq: usize,
    wq: usize,
    /// The phases some tap reads, in slot order.
    phases: Vec<(usize, usize)>,
    /// Whether the tiles read the image itself, every second pixel of a row: a
    /// 1×1 window with stride 2 across and no padding (ResNet's shortcuts),
    /// where a layout would be one more pass over the input for nothing.
    reads_image: bool,
}

impl InputPlanes {
    /// The layout of a `c × h × w` image under `win`, whose output must be non-empty.
    pub fn new(win: &Window, c: usize, h: usize, w: usize) -> InputPlanes {
        let (oh, ow) = win.output(h, w).expect("window checked by the caller");
        let ((kh, kw), (sh, sw)) = (win.kernel, win.stride);
        let mut phases = Vec::new();
        for ki in 0..kh {
            for kj in 0..kw {
                if !phases.contains(&(ki % sh, kj % sw)) {
                    phases.push((ki % sh, kj % sw));
                }
            }
        }
        // The tiles load `2·LANES` inputs for each segment of a row: the last
        // row's must not leave its channel.
        let last_row = sh * (oh - 1) * w + 2 * ((ow - 1) / LANES * LANES);
        let reads_image =
            win.kernel == (1, 1) && win.pad == (0, 0, 0, 0) && sw == 2 && last_row + 2 * LANES <= h * w;
        InputPlanes {
            win: *win,
            c,
            h,
            w,
            oh,
            ow,
            hq: oh + (kh - 1) / sh,
            wq: ow + (kw - 1) / sw,
            phases,
            reads_image,
        }
    }

    /// This layout, written out even where the tiles could read the image in
    /// place.
    pub fn laid_out(self) -> InputPlanes {
        InputPlanes {
            reads_image: false,
            ..self
        }
    }

    /// Whether [`correlate`](super::tiles::correlate) tiles reading the image in
    /// place would run slower than from a layout: with rows whose segments
    /// leave more than a quarter of their lanes idle (a layout's runs cross
    /// rows: 1×1 stride 2, 32→64 channels on 18×18 images, 9 outputs a row,
    /// 113 µs a batch of 32 in place, 105 laid out), or with channels a
    /// multiple of 4 KiB apart, which share L1 sets: a tile's 16 or more of
    /// them overflow its ways, and every panel of weights reloads them (32×32
    /// images: 98 µs in place, 76 laid out; on 28×28 and 30×30 images in
    /// place is the faster by 23–31%).
    pub fn tiles_prefer_layout(&self) -> bool {
        let lanes = self.ow.div_ceil(LANES) * LANES;
        4 * self.ow < 3 * lanes || (self.h * self.w * 4).is_multiple_of(4096)
    }

    /// Whether the tiles read the images themselves (at step 2, see
    /// [`Segments::reset`]) instead of a layout [`Self::fill`] writes: the
    /// offsets of [`Self::taps`] and [`Self::segments`] are then into `x`.
    pub fn reads_image(&self) -> bool {
        self.reads_image
    }

    /// Elements per channel.
    pub fn channel_len(&self) -> usize {
        if self.reads_image {
            return self.h * self.w;
        }
        self.phases.len() * self.hq * self.wq
    }

    /// Elements per image.
    pub fn image_len(&self) -> usize {
        self.c * self.channel_len()
    }

    /// Writes the valid part of consecutive images `x` (`c × h × w` each) into
    /// `out`, [`Self::image_len`] apart; the padding must already be zero.
    pub fn fill(&self, isa: Isa, x: &[f32], out: &mut [f32]) {
        debug_assert!(!self.reads_image, "no layout to fill");
        let ((sh, sw), (pt, pl)) = (self.win.stride, (self.win.pad.0, self.win.pad.1));
        let plane = self.hq * self.wq;
        let slot = |a: usize, b: usize| self.phases.iter().position(|&p| p == (a, b));
        // Channels of consecutive images follow one another in both layouts.
        for (ci, x) in x.chunks_exact(self.h * self.w).enumerate() {
            let out = &mut out[ci * self.phases.len() * plane..][..self.phases.len() * plane];
            for (s, &(a, b)) in self.phases.iter().enumerate() {
                // With stride 2, a row's even and odd columns go to two phases
                // at once, when both are laid out.
                let partner = if sw == 2 { slot(a, 1 - b) } else { None };
                if partner.is_some() && b != pl % 2 {
                    continue; // written with its partner
                }
                let (i0, i1) = span(a, pt, sh, self.h, self.hq);
                let (j0, j1) = span(b, pl, sw, self.w, self.wq);
                if i0 == i1 {
                    continue;
                }
                let first = &x[(sh * i0 + a - pt) * self.w..];
                if let Some(o) = partner {
                    let (k0, k1) = span(1 - b, pl, sw, self.w, self.wq);
                    let at = |slot: usize, j: usize| slot * plane + i0 * self.wq + j;
                    let (even, odd) = pair_mut(out, at(s, j0)..(s + 1) * plane, at(o, k0)..(o + 1) * plane);
                    let pitch = (sh * self.w, self.wq);
                    split_even_odd(
                        isa,
                        first,
                        pitch.0,
                        i1 - i0,
                        (even, j1 - j0),
                        (odd, k1 - k0),
                        pitch.1,
                    );
                    continue;
                }
                let first = &x[(sh * i0 + a - pt) * self.w + sw * j0 + b - pl..];
                let dst = &mut out[s * plane + i0 * self.wq + j0..(s + 1) * plane];
                gather(isa, first, sh * self.w, i1 - i0, dst, j1 - j0, self.wq, sw);
            }
        }
    }

    /// The taps of `cg` channels, `(channel, ki, kj)` in weight order, as offsets
    /// into a channel-major run of images laid out by [`Self::fill`].
    pub fn taps(&self, cg: usize, taps: &mut Taps) {
        let ((kh, kw), (sh, sw)) = (self.win.kernel, self.win.stride);
        taps.clear();
        if self.reads_image {
            (0..cg).for_each(|ci| taps.push(ci * self.h * self.w));
            return;
        }
        let plane = self.hq * self.wq;
        for ci in 0..cg {
            for ki in 0..kh {
                for kj in 0..kw {
                    let slot = self.phases.iter().position(|&p| p == (ki % sh, kj % sw));
                    let slot = slot.expect("every tap's phase is laid out");
                    taps.push((ci * self.phases.len() + slot) * plane + (ki / sh) * self.wq + kj / sw);
                }
            }
        }
    }

    /// The output pixels of `images` consecutive images, whose outputs are
    /// `out_image` elements apart.
    pub fn segments(&self, images: usize, out_image: usize, segs: &mut Segments) {
        if self.reads_image {
            segs.reset(2);
            let rows = self.win.stride.0 * self.w;
            for img in 0..images {
                for oy in 0..self.oh {
                    segs.push_run(
                        img * self.image_len() + oy * rows,
                        img * out_image + oy * self.ow,
                        self.ow,
                    );
                }
            }
            return;
        }
        segs.clear();
        for img in 0..images {
            let (src, dst) = (img * self.image_len(), img * out_image);
            if self.wq == self.ow {
                // Rows are contiguous in both: one run crosses them.
                segs.push_run(src, dst, self.oh * self.ow);
                continue;
            }
            for oy in 0..self.oh {
                segs.push_run(src + oy * self.wq, dst + oy * self.ow, self.ow);
            }
        }
    }
}

/// The output gradient of one image, `m` channels zero-padded so that every
/// phase of dX reads it as a stride-1 correlation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GradPlanes {
    win: Window,
    m: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    /// Leading padding: the largest `ki / sh` and `kj / sw`.
    ty: usize,
    tx: usize,
    hd: usize,
    wd: usize,
}

/// One phase `(a, b)` of dX: the input pixels `(sh·i + a − pt, sw·j + b − pl)` for
/// `i` in `rows`, `j` in `cols`, and the taps that reach them.
pub struct DxPhase {
    /// Input rows of this phase, in phase coordinates.
    pub rows: (usize, usize),
    /// Input columns of this phase, in phase coordinates.
    pub cols: (usize, usize),
    /// The phase itself.
    pub phase: (usize, usize),
    /// `(ki, kj, offset)`: kernel taps of this phase and where, relative to the
    /// pixel, they read dY.
    pub kernel_taps: Vec<(usize, usize, usize)>,
}

impl DxPhase {
    /// Pixels per channel in this phase.
    pub fn plane(&self) -> usize {
        (self.rows.1 - self.rows.0) * (self.cols.1 - self.cols.0)
    }
}

impl GradPlanes {
    /// The layout for dY of a conv over `h × w` inputs with `m` output channels.
    pub fn new(win: &Window, m: usize, h: usize, w: usize) -> GradPlanes {
        let (oh, ow) = win.output(h, w).expect("window checked by the caller");
        let ((kh, kw), (sh, sw)) = (win.kernel, win.stride);
        let (ty, tx) = ((kh - 1) / sh, (kw - 1) / sw);
        // Rows up to the last input row's phase index plus `ty` are read.
        let hd = ty + oh.max((win.pad.0 + h).div_ceil(sh));
        let wd = tx + ow.max((win.pad.1 + w).div_ceil(sw));
        GradPlanes {
            win: *win,
            m,
            h,
            w,
            oh,
            ow,
            ty,
            tx,
            hd,
            wd,
        }
    }

    /// Whether dY itself is this layout, so that the tiles may read it in
    /// place: no padding around it (a window no larger than its stride, like
    /// 1×1 stride 2, and none around the input) and whole vectors per row, so
    /// that no tile reads past the end of dY.
    pub fn is_dy(&self) -> bool {
        (self.ty, self.tx) == (0, 0)
            && (self.hd, self.wd) == (self.oh, self.ow)
            && self.win.pad == (0, 0, 0, 0)
            && self.ow.is_multiple_of(LANES)
    }

    /// Elements per channel.
    pub fn channel_len(&self) -> usize {
        self.hd * self.wd
    }

    /// Elements per image.
    pub fn image_len(&self) -> usize {
        self.m * self.channel_len()
    }

    /// Writes consecutive images `dy` (`m × oh × ow` each) into `out`,
    /// [`Self::image_len`] apart; the padding must already be zero.
    pub fn fill(&self, isa: Isa, dy: &[f32], out: &mut [f32]) {
        let plane = self.hd * self.wd;
        for (mi, dy) in dy.chunks_exact(self.oh * self.ow).enumerate() {
            let at = mi * plane + self.ty * self.wd + self.tx;
            gather_rows::<1>(isa, dy, self.ow, self.oh, &mut out[at..], self.ow, self.wd);
        }
    }

    /// Every phase of the input, with the taps that reach it.
    pub fn phases(&self) -> Vec<DxPhase> {
        let ((kh, kw), (sh, sw)) = (self.win.kernel, self.win.stride);
        let (pt, pl) = (self.win.pad.0, self.win.pad.1);
        let mut out = Vec::new();
        for a in 0..sh {
            for b in 0..sw {
                let mut kernel_taps = Vec::new();
                for ki in (a..kh).step_by(sh) {
                    for kj in (b..kw).step_by(sw) {
                        // dX(i, j) += W · dY(i − ki/sh, j − kj/sw), stored at
                        // (i − ki/sh + ty, j − kj/sw + tx).
                        let off = (self.ty - ki / sh) * self.wd + self.tx - kj / sw;
                        kernel_taps.push((ki, kj, off));
                    }
                }
                out.push(DxPhase {
                    rows: span(a, pt, sh, self.h, usize::MAX),
                    cols: span(b, pl, sw, self.w, usize::MAX),
                    phase: (a, b),
                    kernel_taps,
                });
            }
        }
        out
    }

    /// The taps of phase `p` over `mg` output channels, channel-major.
    pub fn taps(&self, p: &DxPhase, mg: usize, taps: &mut Taps) {
        taps.clear();
        for mi in 0..mg {
            for &(_, _, off) in &p.kernel_taps {
                taps.push(mi * self.hd * self.wd + off);
            }
        }
    }

    /// The pixels of phase `p` for `images` consecutive images, written densely
    /// (`p.plane()` per channel) with images `out_image` elements apart.
    pub fn segments(&self, p: &DxPhase, images: usize, out_image: usize, segs: &mut Segments) {
        segs.clear();
        let width = p.cols.1 - p.cols.0;
        for img in 0..images {
            for (r, i) in (p.rows.0..p.rows.1).enumerate() {
                segs.push_run(
                    img * self.image_len() + i * self.wd + p.cols.0,
                    img * out_image + r * width,
                    width,
                );
            }
        }
    }

    /// Writes the `images × c × h × w` input gradient `dx` from its phases,
    /// stored densely one after another (`images · c · p.plane()` each, in the
    /// order of [`Self::phases`]; those without taps are not read).
    pub fn assemble(
        &self,
        isa: Isa,
        phases: &[DxPhase],
        dense: &[f32],
        images: usize,
        c: usize,
        dx: &mut [f32],
    ) {
        let ((sh, sw), (pt, pl)) = (self.win.stride, (self.win.pad.0, self.win.pad.1));
        let mut at = Vec::with_capacity(phases.len());
        let mut off = 0;
        for p in phases {
            at.push(off);
            off += images * c * p.plane();
        }
        let row = |p: usize, img: usize, ci: usize, i: usize| {
            let (ph, width) = (&phases[p], phases[p].cols.1 - phases[p].cols.0);
            &dense[at[p] + (img * c + ci) * ph.plane() + (i - ph.rows.0) * width..][..width]
        };
        let empty = |p: &DxPhase| p.kernel_taps.is_empty();
        if (sh, sw) == (2, 2) {
            // The rows of one parity of dX interleave the rows of two phases
            // (zeros for a phase no tap reaches, as in a 1×1 stride-2
            // convolution): every element is written once, no read-modify-write,
            // a plane's rows of one parity in one call.
            let zeros = vec![0.0; self.w.div_ceil(2)];
            for (n, dx) in dx.chunks_exact_mut(self.h * self.w).take(images * c).enumerate() {
                let (img, ci) = (n / c, n % c);
                for a in 0..2 {
                    let (even, odd) = (2 * a + pl % 2, 2 * a + (pl + 1) % 2);
                    let (i0, i1) = phases[even].rows;
                    if i0 == i1 {
                        continue;
                    }
                    let dst = &mut dx[(2 * i0 + a - pt) * self.w..];
                    let half = |p: usize| {
                        if empty(&phases[p]) {
                            (&zeros[..], 0)
                        } else {
                            // The phase's plane for this channel, from its first row.
                            let plane =
                                &dense[at[p] + (img * c + ci) * phases[p].plane()..][..phases[p].plane()];
                            (plane, phases[p].cols.1 - phases[p].cols.0)
                        }
                    };
                    if empty(&phases[even]) && empty(&phases[odd]) {
                        for r in 0..i1 - i0 {
                            dst[2 * r * self.w..][..self.w].fill(0.0);
                        }
                    } else {
                        interleave(isa, half(even), half(odd), i1 - i0, dst, self.w, 2 * self.w);
                    }
                }
            }
            return;
        }
        // Phases no tap reaches (a stride beyond the kernel) stay zero.
        if phases.iter().any(empty) {
            dx[..images * c * self.h * self.w].fill(0.0);
        }
        for (pi, p) in phases.iter().enumerate() {
            let ((a, b), width) = (p.phase, p.cols.1 - p.cols.0);
            if width == 0 || empty(p) {
                continue;
            }
            let x0 = sw * p.cols.0 + b - pl;
            for (n, dx) in dx.chunks_exact_mut(self.h * self.w).take(images * c).enumerate() {
                for i in p.rows.0..p.rows.1 {
                    scatter(
                        isa,
                        &mut dx[(sh * i + a - pt) * self.w + x0..],
                        row(pi, n / c, n % c, i),
                        sw,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn win(k: usize, stride: (usize, usize), p: usize) -> Window {
        Window {
            kernel: (k, k),
            stride,
            pad: (p, p, p, p),
        }
    }

    /// Which windows the tiles read in place, and where the forward's tiles
    /// still take a layout (the results do not depend on it, the speed does).
    #[test]
    fn shortcuts_read_in_place_where_it_is_safe_and_pays() {
        let shortcut = win(1, (2, 2), 0);
        let lay = |h: usize, w: usize| InputPlanes::new(&shortcut, 16, h, w);
        // 16×16: channels 1 KiB apart, whole segments.
        assert!(lay(16, 16).reads_image() && !lay(16, 16).tiles_prefer_layout());
        assert_eq!(lay(16, 16).channel_len(), 256);
        assert_eq!(lay(16, 16).image_len(), 16 * 256);
        // 28×28: 14 outputs a row, 8 + 6, in place; 24×24: 12, 8 + 4, a
        // quarter of the lanes idle exactly, in place.
        assert!(lay(28, 28).reads_image() && !lay(28, 28).tiles_prefer_layout());
        assert!(!lay(24, 24).tiles_prefer_layout());
        // 32×32: channels 4 KiB apart; 18×18: 9 outputs a row, 8 + 1.
        assert!(lay(32, 32).reads_image() && lay(32, 32).tiles_prefer_layout());
        assert!(lay(18, 18).reads_image() && lay(18, 18).tiles_prefer_layout());
        // Laid out on request, the offsets are the layout's again.
        let planes = lay(32, 32).laid_out();
        assert!(!planes.reads_image());
        assert_eq!(planes.channel_len(), 16 * 16);
        // 15×15: the last row's vector loads would leave the channel.
        assert!(!lay(15, 15).reads_image());
        // Padding, a wider window or stride 1 across: a layout.
        assert!(!InputPlanes::new(&win(1, (2, 2), 1), 16, 16, 16).reads_image());
        assert!(!InputPlanes::new(&win(3, (2, 2), 1), 16, 16, 16).reads_image());
        assert!(!InputPlanes::new(&win(1, (2, 1), 0), 16, 16, 16).reads_image());
        // Stride 2 across only: rows one apart.
        assert!(InputPlanes::new(&win(1, (1, 2), 0), 16, 8, 32).reads_image());
    }

    #[test]
    fn dy_is_its_own_layout_only_without_padding_and_with_whole_segments() {
        let grad = |k: usize, p: usize, side: usize| GradPlanes::new(&win(k, (2, 2), p), 8, side, side);
        assert!(grad(1, 0, 32).is_dy());
        assert_eq!(grad(1, 0, 32).channel_len(), 256);
        assert!(
            !grad(1, 0, 28).is_dy(),
            "14 outputs a row: the last segment reads past dY"
        );
        assert!(!grad(1, 1, 32).is_dy());
        assert!(!grad(3, 1, 32).is_dy());
    }
}
