//! `Conv` and `ConvGradient` (NCHW) as direct convolutions.
//!
//! No column matrix is built. Each image is laid out once as zero-padded phase
//! planes (`layout.rs`), in which every tap of the window reads a contiguous run of
//! input for a run of output pixels; register tiles ([`tiles`]) then multiply the
//! weights straight out of that layout. The forward pass and dX are correlations
//! (dX one per phase of the stride, over the padded dY with the flipped taps); dW
//! is an outer product, summed over pixels, of the laid-out input and dY
//! transposed to pixel-major rows (on AVX-512, for 16 output channels or fewer,
//! a product of dY as it is and the layout, pixels across the lanes, which
//! uses the registers better with so few channels). This is what the best CPU kernels do for the
//! small channel counts of ResNets, where im2col's copy costs as much as the
//! product.
//!
//! A 1×1 stride-2 window (ResNet's shortcuts) needs no layout at all: its tiles
//! read every second pixel of the image itself, and dX's read dY in place (see
//! `layout.rs` for when), which leaves only the products and dX's interleaving.
//!
//! 1×1 stride-1 convolutions and very narrow outputs go to im2col + GEMM instead
//! (`im2col.rs`; outputs under 6 pixels wide), as does any `Conv` whose `engine` is
//! `IM2COL`.
//!
//! Images are processed in small blocks whose layout stays near the core, and split across
//! [`threads`] workers when a kernel may use several cores. Every buffer lives in
//! the kernel and is reused by the next call.

mod im2col;
mod layout;
mod tiles;
mod window;

use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use layout::{DxPhase, GradPlanes, InputPlanes};
use tiles::{
    correlate, has_lanes_dw, lanes_images, pack_panels, transpose_into, weight_grad, weight_grad_lanes, Isa,
    Pairs, Segments, Taps, LANES,
};
pub use window::Window;

use super::gemm::threads;
use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;
use crate::tensor::{HostVec, Shape, Tensor};

/// Output widths below this leave too many lanes of a pixel tile idle: such
/// convolutions go to im2col + GEMM, which vectorises over channels instead.
const MIN_DIRECT_WIDTH: usize = 6;

/// Which implementation runs a convolution. Caffe2's `engine` field picks one
/// (`DIRECT` or `IM2COL`); any other engine, or none, lets dpm choose: direct,
/// except for 1×1 stride-1 unpadded convolutions (a GEMM on the image itself)
/// and outputs narrower than [`MIN_DIRECT_WIDTH`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Auto,
    Direct,
    Im2col,
}

impl Engine {
    fn parse(op: &OperatorDef) -> Engine {
        match op.engine.as_deref().map(str::to_ascii_uppercase).as_deref() {
            Some("DIRECT") => Engine::Direct,
            Some("IM2COL") => Engine::Im2col,
            _ => Engine::Auto,
        }
    }

    fn direct(self, win: &Window, d: &Dims) -> bool {
        match self {
            Engine::Direct => true,
            Engine::Im2col => false,
            Engine::Auto => !win.is_pointwise() && d.ow >= MIN_DIRECT_WIDTH,
        }
    }
}

/// Bytes of laid-out input per block of images. Small blocks keep a block's
/// layout near the core between its passes (one 32- or 16-pixel ResNet image
/// per block): in ResNet-20's step, 64 KiB beat the 256 KiB (half of an older
/// machine's L2) used before by about 2%, one device or two, though the two
/// measure the same on warm caches.
const BLOCK_BYTES: usize = 64 << 10;

/// Checked dimensions of a convolution.
pub(crate) struct Dims {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) m: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    pub(crate) groups: usize,
}

impl Dims {
    /// Input channels, output channels and weights per output channel, per group.
    fn per_group(&self, win: &Window) -> (usize, usize, usize) {
        let cg = self.c / self.groups;
        (cg, self.m / self.groups, cg * win.kernel.0 * win.kernel.1)
    }
}

/// The checked dimensions of a convolution, from the shapes alone (CUDA uses it too).
pub(crate) fn dims(ctx: &OpContext<'_>, win: &Window, groups: usize) -> Result<Dims> {
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
    // No channel in or out: nothing to convolve (the kernels assume both).
    if c == 0 {
        return Err(Error::shape(
            ctx.input_name(0),
            "[N, C, H, W] with C ≥ 1",
            x.shape(),
        ));
    }
    if m == 0 {
        return Err(Error::shape(
            ctx.input_name(1),
            "[M, C/group, kh, kw] with M ≥ 1",
            wt.shape(),
        ));
    }
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
    // The engines lay out padded input planes and column matrices: their sizes
    // must be addressable (a stride as large as the padding keeps the output
    // small while the padded planes overflow).
    const LIMIT: usize = isize::MAX as usize / 16;
    let padded = win
        .padded(h, w)
        .and_then(|(ph, pw)| ph.checked_mul(pw)?.checked_mul(c)?.checked_mul(n));
    let columns = (c / groups)
        .checked_mul(win.kernel.0)
        .and_then(|x| x.checked_mul(win.kernel.1)?.checked_mul(oh)?.checked_mul(ow));
    // A stride past the padded input gives one window per axis; the direct
    // engine lays out one plane per stride phase, so such strides are refused.
    if let Some((ph, pw)) = win.padded(h, w) {
        if win.stride.0 > ph || win.stride.1 > pw {
            return Err(Error::arg(
                "stride",
                format!("{:?} exceeds the padded input {ph}×{pw}", win.stride),
            ));
        }
    }
    if !matches!((padded, columns), (Some(p), Some(q)) if p <= LIMIT && q <= LIMIT) {
        return Err(Error::shape(
            ctx.input_name(0),
            format!("a size whose padded planes ({:?} padding) fit in memory", win.pad),
            x.shape(),
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

/// The `group` argument, checked.
pub(crate) fn groups(op: &OperatorDef) -> Result<usize> {
    let g = Args(&op.arg).usize("group", 1)?;
    if g == 0 {
        return Err(Error::arg("group", "must be ≥ 1"));
    }
    Ok(g)
}

/// A buffer whose zero padding was written for layout `key`.
struct Padded<K> {
    data: HostVec<f32>,
    key: Option<(K, usize)>,
}

impl<K> Default for Padded<K> {
    fn default() -> Self {
        Padded {
            data: HostVec::new(),
            key: None,
        }
    }
}

impl<K: Clone + PartialEq> Padded<K> {
    /// `len` elements laid out as `key`: zeroed unless they already were.
    fn get(&mut self, key: &K, len: usize) -> &mut [f32] {
        if self.key.as_ref().is_none_or(|(k, l)| k != key || *l != len) {
            self.data.clear();
            self.data.resize(len, 0.0);
            self.key = Some((key.clone(), len));
        }
        &mut self.data
    }
}

/// What one worker reuses across calls.
#[derive(Default)]
struct Worker {
    planes: Padded<InputPlanes>,
    grad: Padded<GradPlanes>,
    /// The phases of dX for a block, before they are interleaved (strided convs).
    dense: HostVec<f32>,
    segs: Segments,
    /// dY of a block, one group at a time, transposed to pixel-major rows
    /// (padded with zeros to whole vectors).
    dyt: Padded<(usize, usize)>,
    /// This worker's share of dWᵀ: per group, `k × mgp`.
    dwt: HostVec<f32>,
    /// The segments of a pass's images paired, and this worker's share of dW
    /// with the pixels still spread across 16 lanes (per group, `mg × k ×
    /// 16`), where [`weight_grad_lanes`] computes dW.
    pairs: Pairs,
    /// Images whose segments `pairs` holds (0: none yet).
    pairs_images: usize,
    dw_lanes: HostVec<f32>,
}

/// A kernel's buffers: per-call weight panels and taps, and the workers'.
#[derive(Default)]
struct State {
    workers: Vec<Worker>,
    packed: HostVec<f32>,
    taps: Taps,
    dx_taps: Vec<Taps>,
    /// The column matrix of im2col.
    col: HostVec<f32>,
}

fn lock(state: &Mutex<State>, workers: usize) -> MutexGuard<'_, State> {
    let mut g = state.lock().unwrap_or_else(|e| e.into_inner());
    if g.workers.len() < workers {
        g.workers.resize_with(workers, Worker::default);
    }
    g
}

/// Images per block for `bytes` of layout per image.
fn block_images(bytes: usize, n: usize) -> usize {
    (BLOCK_BYTES / bytes.max(1)).clamp(1, n.max(1))
}

/// What the tiles read for `images` (a block of at most `nb`) of the batch `x`
/// (`image` elements each) under `lay`: where it reads in place, the images
/// themselves, from the block's first to the end of `x` (the tiles' vector
/// loads may run past the block); otherwise their phase planes, written into
/// `planes`.
fn laid_out<'a>(
    isa: Isa,
    lay: &InputPlanes,
    planes: &'a mut Padded<InputPlanes>,
    (x, image): (&'a [f32], usize),
    images: Range<usize>,
    nb: usize,
) -> &'a [f32] {
    if lay.reads_image() {
        return &x[images.start * image..];
    }
    let planes = planes.get(lay, nb * lay.image_len() + LANES);
    lay.fill(isa, &x[images.start * image..images.end * image], planes);
    planes
}

/// Part `i` of `n` near-equal parts of `data`.
fn part(data: &[f32], i: usize, n: usize) -> &[f32] {
    let n = n.max(1);
    &data[data.len() * i / n..data.len() * (i + 1) / n]
}

/// Runs `f(images, worker, out)` on `workers` contiguous ranges of `n` images in
/// parallel, `out` being the range's part of `out` (`per_image` elements each).
fn for_ranges<F>(n: usize, workers: &mut [Worker], out: &mut [f32], per_image: usize, f: F)
where
    F: Fn(Range<usize>, &mut Worker, &mut [f32]) + Sync,
{
    let t = workers.len();
    let mut parts = Vec::with_capacity(t);
    let mut rest = out;
    for i in 0..t {
        let range = n * i / t..n * (i + 1) / t;
        let (part, tail) = rest.split_at_mut(range.len() * per_image);
        parts.push((range, part));
        rest = tail;
    }
    if t == 1 {
        let (range, part) = parts.pop().expect("one part");
        return f(range, &mut workers[0], part);
    }
    use rayon::prelude::*;
    parts
        .into_par_iter()
        .zip(workers.par_iter_mut())
        .for_each(|((range, part), w)| f(range, w, part));
}

/// Packs each group's `mg × k` weights into panels, groups one after another.
fn pack_groups(w: &[f32], groups: usize, mg: usize, k: usize, packed: &mut HostVec<f32>) {
    packed.clear();
    for wg in w.chunks_exact(mg * k).take(groups) {
        pack_panels(mg, k, |r, kk| wg[r * k + kk], packed);
    }
}

/// `Conv(X, W[, b]) → Y`.
pub struct Conv {
    win: Window,
    groups: usize,
    engine: Engine,
    isa: Isa,
    state: Mutex<State>,
}

/// `ConvGradient(X, W, dY) → (dW[, db][, dX])`; `no_bias = 1` means there is no db.
pub struct ConvGradient {
    win: Window,
    groups: usize,
    bias: bool,
    engine: Engine,
    isa: Isa,
    state: Mutex<State>,
}

impl Conv {
    /// Parses the window and `group`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Conv {
            win: Window::parse(op, true)?,
            groups: groups(op)?,
            engine: Engine::parse(op),
            isa: Isa::best(),
            state: Mutex::default(),
        }))
    }

    fn forward(&self, d: &Dims, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
        if !self.engine.direct(&self.win, d) {
            let mut state = lock(&self.state, 1);
            return im2col::forward(&self.win, d, (x, w, bias), y, &mut state.col);
        }
        let mut lay = InputPlanes::new(&self.win, d.c, d.h, d.w);
        if lay.tiles_prefer_layout() {
            lay = lay.laid_out();
        }
        let (cg, mg, k) = d.per_group(&self.win);
        let (x_image, y_image, ohw) = (d.c * d.h * d.w, d.m * d.oh * d.ow, d.oh * d.ow);
        let nb = block_images(lay.image_len() * 4, d.n);
        // Read once: another thread may change the setting meanwhile.
        let t = threads().clamp(1, d.n.max(1));
        let mut state = lock(&self.state, t);
        let State {
            workers,
            packed,
            taps,
            ..
        } = &mut *state;
        pack_groups(w, d.groups, mg, k, packed);
        lay.taps(cg, taps);
        let (packed, taps, isa) = (&*packed, &*taps, self.isa);
        let workers = &mut workers[..t];
        for_ranges(d.n, workers, y, y_image, |images, s, y| {
            for b0 in images.clone().step_by(nb) {
                let count = nb.min(images.end - b0);
                let planes = laid_out(isa, &lay, &mut s.planes, (x, x_image), b0..b0 + count, nb);
                lay.segments(count, y_image, &mut s.segs);
                let yb = &mut y[(b0 - images.start) * y_image..][..count * y_image];
                // The next block's images, fetched while this one computes
                // (unless the tiles read the image itself: every second row).
                let next = (b0 + count)..(b0 + count + nb).min(images.end);
                let next = if lay.reads_image() {
                    &[][..]
                } else {
                    &x[next.start * x_image..next.end * x_image]
                };
                for gi in 0..d.groups {
                    correlate(
                        isa,
                        &packed[gi * mg * k..],
                        mg,
                        taps,
                        &planes[gi * cg * lay.channel_len()..],
                        &s.segs,
                        bias.map(|b| &b[gi * mg..]),
                        &mut yb[gi * mg * ohw..],
                        ohw,
                        part(next, gi, d.groups),
                    );
                }
            }
        });
    }
}

impl ConvGradient {
    /// Parses the window, `group` and `no_bias`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(ConvGradient {
            win: Window::parse(op, true)?,
            groups: groups(op)?,
            bias: Args(&op.arg).int("no_bias", 0)? == 0,
            engine: Engine::parse(op),
            isa: Isa::best(),
            state: Mutex::default(),
        }))
    }

    /// dW (overwritten) and, if asked, dX (overwritten).
    fn backward(&self, d: &Dims, x: &[f32], w: &[f32], dy: &[f32], dw: &mut [f32], dx: Option<&mut [f32]>) {
        if !self.engine.direct(&self.win, d) {
            let mut state = lock(&self.state, 1);
            return im2col::backward(&self.win, d, (x, w, dy), dw, dx, &mut state.col);
        }
        // dW's tiles read each input once per pass: in place, whatever the width.
        let lay = InputPlanes::new(&self.win, d.c, d.h, d.w);
        let grad = GradPlanes::new(&self.win, d.m, d.h, d.w);
        let (cg, mg, k) = d.per_group(&self.win);
        let (kh, kw) = self.win.kernel;
        let (x_image, y_image, ohw) = (d.c * d.h * d.w, d.m * d.oh * d.ow, d.oh * d.ow);
        let with_dx = dx.is_some();
        let phases: Vec<DxPhase> = if with_dx { grad.phases() } else { Vec::new() };
        let strided = self.win.stride != (1, 1);
        let nb = block_images(lay.image_len() * 4, d.n);
        let t = threads().clamp(1, d.n.max(1));
        let mut state = lock(&self.state, t);
        let State {
            workers,
            packed,
            taps,
            dx_taps,
            ..
        } = &mut *state;
        lay.taps(cg, taps);
        // dX weights: for phase p and group g, rows are input channels and columns
        // (output channel, tap of p), starting at `offsets[p]`.
        packed.clear();
        let mut offsets = Vec::with_capacity(phases.len());
        dx_taps.resize_with(phases.len(), Taps::default);
        // Where column (output channel, tap of p) of input channel 0 is in W:
        // computed once per column, not per element (a division and a
        // remainder per weight cost about 1% of a ResNet-20 step).
        let mut col_at = Vec::new();
        for (p, dx_taps) in phases.iter().zip(dx_taps.iter_mut()) {
            offsets.push(packed.len());
            let nt = p.kernel_taps.len();
            for gi in 0..d.groups {
                col_at.clear();
                for mi in 0..mg {
                    for &(ki, kj, _) in &p.kernel_taps {
                        col_at.push(((gi * mg + mi) * cg * kh + ki) * kw + kj);
                    }
                }
                pack_panels(cg, mg * nt, |c, col| w[col_at[col] + c * kh * kw], packed);
            }
            grad.taps(p, mg, dx_taps);
        }
        let (packed, taps, dx_taps, isa) = (&*packed, &*taps, &*dx_taps, self.isa);
        let workers = &mut workers[..t];
        let (dx, dx_image) = match dx {
            Some(dx) => (dx, x_image),
            None => (&mut [][..], 0),
        };
        let mgp = mg.next_multiple_of(LANES);
        // dW with pixels across the lanes where the processor has the tile
        // (it reads consecutive inputs: not a 1×1 stride-2 window's image).
        let lanes = has_lanes_dw(isa) && mg <= 2 * LANES && !lay.reads_image();
        let lane_k = k * 2 * LANES;
        for_ranges(d.n, workers, dx, dx_image, |images, s, dx| {
            s.dwt.clear();
            s.dwt.resize(d.groups * k * mgp, 0.0);
            if lanes {
                s.dw_lanes.clear();
                s.dw_lanes.resize(d.groups * mg * lane_k, 0.0);
                s.pairs_images = 0;
            }
            for b0 in images.clone().step_by(nb) {
                let count = nb.min(images.end - b0);
                let dyb = &dy[b0 * y_image..(b0 + count) * y_image];
                // The next block's images and dY, fetched while this one
                // computes: its input during dW (unless read in place, as
                // in the forward pass), its dY during dX.
                let next = (b0 + count)..(b0 + count + nb).min(images.end);
                let (next_x, next_dy) = (
                    if lay.reads_image() {
                        &[][..]
                    } else {
                        &x[next.start * x_image..next.end * x_image]
                    },
                    &dy[next.start * y_image..next.end * y_image],
                );
                // dW += dY · (the window's inputs)ᵀ
                let planes = laid_out(isa, &lay, &mut s.planes, (x, x_image), b0..b0 + count, nb);
                if lanes {
                    // A few images per tile pass, their pixels one run of
                    // pairs (dY's pixel `p` of image `i` at `i·y_image + p`).
                    let per_pass = lanes_images(ohw);
                    let calls = count.div_ceil(per_pass) * d.groups;
                    for i0 in (0..count).step_by(per_pass) {
                        let n = per_pass.min(count - i0);
                        if s.pairs_images != n {
                            lay.segments(n, y_image, &mut s.segs);
                            s.pairs.build(&s.segs);
                            s.pairs_images = n;
                        }
                        for gi in 0..d.groups {
                            weight_grad_lanes(
                                isa,
                                &dyb[i0 * y_image + gi * mg * ohw..],
                                (mg, ohw),
                                taps,
                                &planes[i0 * lay.image_len() + gi * cg * lay.channel_len()..],
                                &s.pairs,
                                &mut s.dw_lanes[gi * mg * lane_k..],
                                part(next_x, (i0 / per_pass) * d.groups + gi, calls),
                            );
                        }
                    }
                } else {
                    // Pixel `p` of image `i` is row `i·ohw + p` of dYᵀ.
                    lay.segments(count, ohw, &mut s.segs);
                    let dyt = s.dyt.get(&(mg, mgp), nb * ohw * mgp);
                    for gi in 0..d.groups {
                        transpose_into(isa, &dyb[gi * mg * ohw..], (count, mg, ohw), y_image, dyt, mgp);
                        weight_grad(
                            isa,
                            dyt,
                            mgp,
                            taps,
                            &planes[gi * cg * lay.channel_len()..],
                            &s.segs,
                            &mut s.dwt[gi * k * mgp..(gi + 1) * k * mgp],
                            part(next_x, gi, d.groups),
                        );
                    }
                }
                if !with_dx {
                    continue;
                }
                // dX: per phase, the padded dY correlated with that phase's taps.
                let dxb = &mut dx[(b0 - images.start) * x_image..][..count * x_image];
                let gp: &[f32] = if grad.is_dy() {
                    &dy[b0 * y_image..]
                } else {
                    let gp = s.grad.get(&grad, nb * grad.image_len() + LANES);
                    grad.fill(isa, dyb, gp);
                    gp
                };
                // Stride 1 has one phase, dX itself; otherwise the phases go
                // one after another into `s.dense` and are interleaved after.
                if strided {
                    s.dense.resize(count * x_image, 0.0);
                }
                let mut at = 0;
                let calls = dx_taps.iter().filter(|t| !t.is_empty()).count() * d.groups;
                let mut call = 0;
                for ((p, ptaps), &off) in phases.iter().zip(dx_taps).zip(&offsets) {
                    let plane = p.plane();
                    let out_image = if strided { d.c * plane } else { x_image };
                    let dense = if strided {
                        at += count * out_image;
                        &mut s.dense[at - count * out_image..at]
                    } else {
                        &mut dxb[..]
                    };
                    if ptaps.is_empty() || plane == 0 {
                        continue;
                    }
                    grad.segments(p, count, out_image, &mut s.segs);
                    for gi in 0..d.groups {
                        correlate(
                            isa,
                            &packed[off + gi * cg * mg * p.kernel_taps.len()..],
                            cg,
                            ptaps,
                            &gp[gi * mg * grad.channel_len()..],
                            &s.segs,
                            None,
                            &mut dense[gi * cg * plane..],
                            plane,
                            part(next_dy, call, calls),
                        );
                        call += 1;
                    }
                }
                if strided {
                    grad.assemble(isa, &phases, &s.dense, count, d.c, dxb);
                }
            }
            if lanes {
                // The lanes of each (row, tap), summed in order into dWᵀ.
                for (gm, row) in s.dw_lanes.chunks_exact(lane_k).enumerate() {
                    let (gi, m) = (gm / mg, gm % mg);
                    for (kk, v) in row.chunks_exact(2 * LANES).enumerate() {
                        s.dwt[(gi * k + kk) * mgp + m] = v.iter().sum();
                    }
                }
            }
        });
        // dW[g][m][kk] = Σ over workers of dWᵀ[g][kk][m], in worker order
        // (a row of dW at a time: no division per element).
        for (row, dw_row) in dw.chunks_exact_mut(k.max(1)).enumerate() {
            let (gi, m) = (row / mg, row % mg);
            for (kk, v) in dw_row.iter_mut().enumerate() {
                let at = (gi * k + kk) * mgp + m;
                *v = workers.iter().map(|wk| wk.dwt[at]).sum();
            }
        }
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
        let y = ctx.resize_output::<f32>(0, Shape::from([d.n, d.m, d.oh, d.ow]))?;
        self.forward(&d, xd, wd, bias, y);
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
        let ohw = d.oh * d.ow;
        let names = &ctx.def().output;
        let named = |e: Error, o: usize| e.with_blob(&names[o]);
        let outs = ctx.outputs();
        let (dw_t, rest) = outs.split_first_mut().expect("≥ 1 output");
        let dw = dw_t.resize::<f32>(w.shape()).map_err(|e| named(e, 0))?;
        let mut rest = rest.iter_mut();
        if self.bias {
            let db = rest
                .next()
                .expect("arity checked")
                .resize::<f32>([d.m])
                .map_err(|e| named(e, 1))?;
            db.fill(0.0);
            for (i, plane) in dyd.chunks_exact(ohw.max(1)).enumerate() {
                db[i % d.m] += plane.iter().sum::<f32>();
            }
        }
        let dx = if with_dx {
            let t: &mut Tensor = rest.next().expect("arity checked");
            Some(
                t.resize::<f32>(x.shape())
                    .map_err(|e| named(e, names.len() - 1))?,
            )
        } else {
            None
        };
        self.backward(&d, xd, wd, dyd, dw, dx);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_a_slice_once_in_order_and_evenly() {
        let data: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        for len in [0, 1, 5, 64, 1000] {
            for n in [1, 2, 3, 7, 64] {
                let parts: Vec<&[f32]> = (0..n).map(|i| part(&data[..len], i, n)).collect();
                let joined: Vec<f32> = parts.concat();
                assert_eq!(joined, &data[..len], "{len} in {n}");
                let sizes = parts.iter().map(|p| p.len());
                let (lo, hi) = (sizes.clone().min().unwrap(), sizes.max().unwrap());
                assert!(hi - lo <= 1, "{len} in {n}: parts of {lo} to {hi}");
            }
        }
        // No parts asked for: one part, the whole.
        assert_eq!(part(&data, 0, 0), &data[..]);
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::ops::cpu::rng::Rng::new(seed);
        (0..n).map(|_| rng.uniform() as f32 - 0.5).collect()
    }

    /// Plain loops: `(y, dW, dX)` of a grouped, strided, padded convolution.
    /// Written as the definition reads, indices and all.
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    fn reference(
        d: &Dims,
        k: usize,
        s: usize,
        p: usize,
        x: &[f32],
        wt: &[f32],
        bias: &[f32],
        dy: &[f32],
    ) -> [Vec<f32>; 3] {
        let (cg, mg) = (d.c / d.groups, d.m / d.groups);
        let mut y = vec![0.0f32; d.n * d.m * d.oh * d.ow];
        let mut dw = vec![0.0f32; wt.len()];
        let mut dx = vec![0.0f32; x.len()];
        for n in 0..d.n {
            for m in 0..d.m {
                let g = m / mg;
                for oy in 0..d.oh {
                    for ox in 0..d.ow {
                        let at = ((n * d.m + m) * d.oh + oy) * d.ow + ox;
                        let mut acc = bias[m];
                        for ci in 0..cg {
                            let c = g * cg + ci;
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) = (
                                        (oy * s + ky) as isize - p as isize,
                                        (ox * s + kx) as isize - p as isize,
                                    );
                                    if iy < 0 || ix < 0 || iy >= d.h as isize || ix >= d.w as isize {
                                        continue;
                                    }
                                    let xi = ((n * d.c + c) * d.h + iy as usize) * d.w + ix as usize;
                                    let wi = ((m * cg + ci) * k + ky) * k + kx;
                                    acc += wt[wi] * x[xi];
                                    dw[wi] += dy[at] * x[xi];
                                    dx[xi] += dy[at] * wt[wi];
                                }
                            }
                        }
                        y[at] = acc;
                    }
                }
            }
        }
        [y, dw, dx]
    }

    /// Both tile implementations (the portable one and, where the processor has
    /// it, AVX2+FMA), through the whole kernel (layouts, phases, groups, partial
    /// segments), against plain loops: on a processor without AVX2 this still
    /// checks the portable kernels rather than comparing them with themselves.
    #[test]
    fn both_tile_implementations_match_plain_loops() {
        // (n, c, h, w, m, kernel, stride, pad, groups)
        let cases = [
            (2, 3, 11, 13, 7, 3, 2, 1, 1),
            (3, 4, 9, 17, 10, 3, 1, 1, 2),
            (2, 5, 8, 8, 6, 1, 2, 0, 1),
            // 1×1 stride 2 with odd sides and padding: dX rows and columns
            // that no tap reaches must come out zero.
            (2, 3, 7, 9, 4, 1, 2, 0, 1),
            (1, 3, 7, 9, 4, 1, 2, 1, 1),
            // 2×2 stride 2: every phase has exactly one tap.
            (2, 3, 8, 10, 5, 2, 2, 0, 1),
            // 16 output channels on 16×16 images: AVX-512's lane tiles of dW
            // run passes of 6 images (the last of 2) whose pairs load whole.
            (8, 3, 16, 16, 16, 3, 1, 1, 1),
            // Images whose layout outgrows a block: one image per block.
            (3, 16, 40, 40, 8, 3, 1, 1, 1),
        ];
        for (n, c, h, w, m, k, s, p, g) in cases {
            let win = Window {
                kernel: (k, k),
                stride: (s, s),
                pad: (p, p, p, p),
            };
            let (oh, ow) = win.output(h, w).unwrap();
            let d = Dims {
                n,
                c,
                h,
                w,
                m,
                oh,
                ow,
                groups: g,
            };
            let x = random(n * c * h * w, 1);
            let wt = random(m * c / g * k * k, 2);
            let dy = random(n * m * oh * ow, 3);
            let bias = random(m, 4);
            let run = |isa: Isa| {
                let conv = Conv {
                    win,
                    groups: g,
                    engine: Engine::Direct,
                    isa,
                    state: Mutex::default(),
                };
                let grad = ConvGradient {
                    win,
                    groups: g,
                    bias: false,
                    engine: Engine::Direct,
                    isa,
                    state: Mutex::default(),
                };
                // Garbage in the outputs: each element must be overwritten.
                let mut y = vec![f32::NAN; dy.len()];
                conv.forward(&d, &x, &wt, Some(&bias), &mut y);
                let (mut dw, mut dx) = (vec![f32::NAN; wt.len()], vec![f32::NAN; x.len()]);
                grad.backward(&d, &x, &wt, &dy, &mut dw, Some(&mut dx));
                [y, dw, dx]
            };
            let want = reference(&d, k, s, p, &x, &wt, &bias, &dy);
            for isa in Isa::supported() {
                let got = run(isa);
                for (what, (a, b)) in ["y", "dw", "dx"].iter().zip(got.iter().zip(&want)) {
                    assert_eq!(a.len(), b.len());
                    for (i, (u, v)) in a.iter().zip(b).enumerate() {
                        assert!(
                            (u - v).abs() <= 1e-4 * (1.0 + v.abs()),
                            "{isa:?} {what}[{i}]: {u} vs {v}"
                        );
                    }
                }
            }
        }
    }
}
