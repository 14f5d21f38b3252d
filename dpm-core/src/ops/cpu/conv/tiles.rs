//! Register tiles of direct convolution: the only code here that touches SIMD.
//!
//! Two tile shapes cover the three products of a convolution:
//! - [`correlate`]: [`MR`] rows × [`SR`] segments of up to [`LANES`] pixels, reducing
//!   over taps. The forward pass (rows are output channels) and dX (rows are input
//!   channels, reading the padded output gradient).
//! - [`weight_grad`]: [`WK`] taps × [`WV`] vectors of output channels, reducing
//!   over pixels: dW, from dY transposed to pixel-major.
//! - [`weight_grad_lanes`] (AVX-512 only): dW for 16 output channels or fewer,
//!   where one vector of channels leaves [`weight_grad`] a broadcast load per
//!   multiply-add: rows of dY × taps, pixels across the lanes, read from dY as
//!   it is; the lanes are summed once a batch.
//!
//! A *tap* is one (channel, kernel row, kernel column) of the window, stored as
//! the offset of its first element in the source buffer; a [`Segment`] is a run of
//! output pixels whose inputs sit at consecutive addresses for every tap. So no
//! column matrix is ever written: tiles read the (padded) image directly.
//!
//! The first two have an AVX2+FMA version and an AVX-512 one, chosen at run
//! time ([`Isa`]), and a portable one, all with the same summation order per
//! lane, so every variant gives the same bits; dW through the third sums in
//! another order, so on AVX-512 a narrow convolution's dW differs from the
//! other variants' in its last bits (the tests compare each with plain loops).

pub use crate::ops::cpu::isa::Isa;
use crate::ops::cpu::isa::Kind;
use crate::ops::cpu::prefetch::Ahead;
use crate::tensor::HostVec;

/// Pixels per segment: one 256-bit vector of f32.
pub const LANES: usize = 8;
/// Rows (channels) per [`correlate`] tile.
pub const MR: usize = 6;
/// Segments per [`correlate`] tile. `MR × SR` = 12 accumulators hide the FMA
/// latency; with `SR` source vectors and one broadcast weight that is 15 of the
/// 16 vector registers (one more and the compiler spills an accumulator).
pub const SR: usize = 2;
/// Vectors of output channels per [`weight_grad`] tile.
pub const WV: usize = 2;
/// Taps per [`weight_grad`] tile: `WK × WV` = 12 accumulators, like [`correlate`],
/// plus `WV` dY vectors and one broadcast input.
pub const WK: usize = 6;

/// Output pixels `dst..dst + len` whose inputs, for each tap `t`, are
/// `src + t + step·l` (`l < len`) of the source buffer, `step` being that of
/// their [`Segments`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Segment {
    /// Offset of the run in the source buffer (before adding the tap).
    pub src: usize,
    /// Offset of the run in the output (or, for dW, in the output gradient).
    pub dst: usize,
    /// Pixels in the run, `1..=LANES`.
    pub len: usize,
}

/// A list of segments with the bounds the tiles check once per call.
pub struct Segments {
    list: Vec<Segment>,
    /// Distance in the source between consecutive pixels of a segment: 1, or 2
    /// where a 1×1 stride-2 window reads the image itself (no layout).
    step: usize,
    /// One past the last source element a pixel reads (before adding the tap).
    src_end: usize,
    /// One past the last source element a whole vector load reads: tiles load
    /// `step · LANES` elements per segment, whatever its length.
    reach: usize,
    dst_end: usize,
}

impl Default for Segments {
    fn default() -> Segments {
        Segments {
            list: Vec::new(),
            step: 1,
            src_end: 0,
            reach: 0,
            dst_end: 0,
        }
    }
}

impl Segments {
    /// Empties the list, keeping its allocation; runs to come read consecutive
    /// inputs.
    pub fn clear(&mut self) {
        self.reset(1);
    }

    /// Empties the list, keeping its allocation; runs to come read every
    /// `step`-th input (1 or 2: the tiles have loads for those two).
    pub fn reset(&mut self, step: usize) {
        assert!(step == 1 || step == 2, "segments: step {step} is not 1 or 2");
        self.list.clear();
        self.step = step;
        self.src_end = 0;
        self.reach = 0;
        self.dst_end = 0;
    }

    /// Appends the runs `src, src + step, …` (`n` pixels) to `dst..dst + n`, cut
    /// into segments.
    pub fn push_run(&mut self, src: usize, dst: usize, n: usize) {
        for o in (0..n).step_by(LANES) {
            let len = LANES.min(n - o);
            self.list.push(Segment {
                src: src + self.step * o,
                dst: dst + o,
                len,
            });
        }
        if n > 0 {
            // The last segment starts at pixel `(n − 1)` rounded down to a
            // whole number of segments.
            let last = src + self.step * ((n - 1) / LANES * LANES);
            self.src_end = self.src_end.max(src + self.step * (n - 1) + 1);
            self.reach = self.reach.max(last + self.step * LANES);
            self.dst_end = self.dst_end.max(dst + n);
        }
    }

    /// Whether there are no segments.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// Tap offsets and their maximum.
#[derive(Default)]
pub struct Taps {
    offsets: Vec<usize>,
    max: usize,
}

impl Taps {
    /// Empties the list, keeping its allocation.
    pub fn clear(&mut self) {
        self.offsets.clear();
        self.max = 0;
    }

    /// Appends one tap.
    pub fn push(&mut self, offset: usize) {
        self.offsets.push(offset);
        self.max = self.max.max(offset);
    }

    /// Number of taps (the reduction length of [`correlate`]).
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether there are no taps.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }
}

/// For each row `r < rows`: `dst[r·pitch + t] = src[r·src_pitch + S·t]` for
/// `t < n`, in one pass over the rows: `S = 1` copies a layout's rows (8 to 32
/// floats: vector moves in line, where a `copy_from_slice` per row is a call
/// into the C library's `memcpy`), `S = 2` takes the even phase of a stride-2
/// plane. Vectors may read on up to the end of `src`.
pub fn gather_rows<const S: usize>(
    isa: Isa,
    src: &[f32],
    src_pitch: usize,
    rows: usize,
    dst: &mut [f32],
    n: usize,
    pitch: usize,
) {
    if rows == 0 || n == 0 {
        return;
    }
    let last = (rows - 1) * src_pitch;
    assert!(src.len() > last + S * (n - 1), "gather: source too short");
    assert!(
        dst.len() >= (rows - 1) * pitch + n,
        "gather: destination too short"
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // Whole vectors of output, whose `S·8` inputs lie within `src` on the
        // last row too.
        done = ((src.len() - last) / (S * LANES)).min(n / LANES) * LANES;
        // SAFETY: the asserts above and the choice of `done` bound every row.
        unsafe {
            avx2::gather_rows::<S>(
                src.as_ptr(),
                src_pitch,
                rows,
                dst.as_mut_ptr(),
                pitch,
                done / LANES,
            )
        };
    }
    let _ = isa;
    for r in 0..rows {
        for t in done..n {
            dst[r * pitch + t] = src[r * src_pitch + S * t];
        }
    }
}

/// `dst[2j] = src[j]`, leaving the odd elements of `dst` as they are (vectors
/// rewrite them with their own values, up to the end of `dst`).
pub fn scatter_even(isa: Isa, dst: &mut [f32], src: &[f32]) {
    assert!(dst.len() >= (2 * src.len()).saturating_sub(1));
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        done = (dst.len() / 16).min(src.len() / LANES) * LANES;
        // SAFETY: blocks `..done` read `src[..done]` and touch `dst[..2·done]`.
        unsafe { avx2::scatter_even(dst.as_mut_ptr(), src.as_ptr(), done / LANES) };
    }
    let _ = isa;
    for j in done..src.len() {
        dst[2 * j] = src[j];
    }
}

/// `(first row, rows)` of each panel: `rows` split as evenly as [`MR`]-row panels
/// allow (32 rows: 6, 6, 5, 5, 5, 5), so no panel is left with too few
/// accumulators to hide the FMA latency.
pub fn panels(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = rows.div_ceil(MR);
    (0..n).map(move |i| (rows * i / n, rows * (i + 1) / n - rows * i / n))
}

/// For each row `r < rows`, with `src_r = src[r·src_pitch..]`:
/// `even[r·pitch + t] = src_r[2t]` for `t < ne` and `odd[r·pitch + t] =
/// src_r[2t + 1]` for `t < no`: rows split into their two column phases in one
/// pass. Vectors may read on up to the end of `src`.
#[allow(clippy::too_many_arguments)]
pub fn split_even_odd(
    isa: Isa,
    src: &[f32],
    src_pitch: usize,
    rows: usize,
    (even, ne): (&mut [f32], usize),
    (odd, no): (&mut [f32], usize),
    pitch: usize,
) {
    if rows == 0 {
        return;
    }
    let last = (rows - 1) * src_pitch;
    assert!(
        src.len() >= last + (2 * ne).max(2 * no + 1) - 1,
        "split: source too short"
    );
    assert!(even.len() >= (rows - 1) * pitch + ne && odd.len() >= (rows - 1) * pitch + no);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // Whole blocks of 16 inputs, within `src` on the last row too.
        done = ((src.len() - last) / 16).min(ne / LANES).min(no / LANES) * LANES;
        // SAFETY: the asserts above and the choice of `done` bound every row.
        unsafe {
            avx2::split_even_odd(
                src.as_ptr(),
                src_pitch,
                rows,
                even.as_mut_ptr(),
                odd.as_mut_ptr(),
                pitch,
                done / LANES,
            )
        };
    }
    let _ = isa;
    for r in 0..rows {
        let src = &src[r * src_pitch..];
        for t in done..ne {
            even[r * pitch + t] = src[2 * t];
        }
        for t in done..no {
            odd[r * pitch + t] = src[2 * t + 1];
        }
    }
}

/// For each row `r < rows` and `x < n`: `dst[r·pitch + x]` is `even[r·ep + x/2]`
/// for even `x`, `odd[r·op + x/2]` for odd `x`: the inverse of
/// [`split_even_odd`]. A pitch of 0 gives every row the same source row (a row
/// of zeros, say).
pub fn interleave(
    isa: Isa,
    (even, ep): (&[f32], usize),
    (odd, op): (&[f32], usize),
    rows: usize,
    dst: &mut [f32],
    n: usize,
    pitch: usize,
) {
    if rows == 0 || n == 0 {
        return;
    }
    assert!(
        even.len() >= (rows - 1) * ep + n.div_ceil(2),
        "interleave: even too short"
    );
    assert!(odd.len() >= (rows - 1) * op + n / 2, "interleave: odd too short");
    assert!(
        dst.len() >= (rows - 1) * pitch + n,
        "interleave: destination too short"
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        done = n / 16 * LANES;
        // SAFETY: per row, blocks `..done` read `..done` of both sources and
        // write `..2·done` of `dst`, all bounded by the asserts.
        unsafe {
            avx2::interleave(
                (even.as_ptr(), ep),
                (odd.as_ptr(), op),
                rows,
                dst.as_mut_ptr(),
                pitch,
                done / LANES,
            )
        };
    }
    let _ = isa;
    for r in 0..rows {
        for x in 2 * done..n {
            dst[r * pitch + x] = if x % 2 == 0 {
                even[r * ep + x / 2]
            } else {
                odd[r * op + x / 2]
            };
        }
    }
}

/// Appends `rows × k` values `at(r, k)` to `out`, packed into [`panels`],
/// `k`-major within a panel, as [`correlate`] reads them.
pub fn pack_panels(rows: usize, k: usize, at: impl Fn(usize, usize) -> f32, out: &mut HostVec<f32>) {
    out.reserve_exact(rows * k);
    for (r0, mr) in panels(rows) {
        for kk in 0..k {
            out.extend((r0..r0 + mr).map(|r| at(r, kk)));
        }
    }
}

/// `out[r·pitch + s.dst + l] = init[r] + Σ_k a[r][k] · src[taps[k] + s.src + step·l]`
/// for every row `r < rows` (`a` packed by [`pack_panels`]), segment `s` of
/// `segs` and lane `l < s.len`. `init` defaults to zeros.
///
/// Pixel tiles are the outer loop, so the source data of one tile stays in L1
/// while every panel of `a` streams past it.
///
/// `ahead` (often empty) is data the caller reads next: its cache lines are
/// pulled toward the core a few at a time between tiles ([`Ahead`]: the next
/// block's input, fetched while this block computes).
///
/// # Panics
/// If a read or write would leave `src` or `out`: `src` must hold whole
/// vectors (`step · LANES` elements) from every segment's start past the last tap.
#[allow(clippy::too_many_arguments)]
pub fn correlate(
    isa: Isa,
    a: &[f32],
    rows: usize,
    taps: &Taps,
    src: &[f32],
    segs: &Segments,
    init: Option<&[f32]>,
    out: &mut [f32],
    pitch: usize,
    ahead: &[f32],
) {
    let k = taps.len();
    if rows == 0 || segs.is_empty() {
        return;
    }
    assert!(a.len() >= rows * k, "correlate: packed weights too short");
    assert!(init.is_none_or(|b| b.len() >= rows));
    assert!(taps.max + segs.reach <= src.len(), "correlate: source too short");
    assert!(
        (rows - 1) * pitch + segs.dst_end <= out.len(),
        "correlate: output too short"
    );
    type Step =
        unsafe fn(Isa, &[f32], usize, &Taps, *const f32, &Segments, Option<&[f32]>, *mut f32, usize, &[f32]);
    let run: Step = match segs.step {
        2 => correlate_step::<2>,
        _ => correlate_step::<1>,
    };
    // SAFETY: the asserts above bound every read and write.
    unsafe {
        run(
            isa,
            a,
            rows,
            taps,
            src.as_ptr(),
            segs,
            init,
            out.as_mut_ptr(),
            pitch,
            ahead,
        )
    }
}

/// [`correlate`] with its bounds checked, for segments of step `P`.
///
/// # Safety
/// `src` and `out` must hold every element [`correlate`]'s asserts bound.
#[allow(clippy::too_many_arguments)]
unsafe fn correlate_step<const P: usize>(
    isa: Isa,
    a: &[f32],
    rows: usize,
    taps: &Taps,
    src: *const f32,
    segs: &Segments,
    init: Option<&[f32]>,
    out: *mut f32,
    pitch: usize,
    ahead: &[f32],
) {
    let k = taps.len();
    let tiles = if isa.kind() == Kind::Avx512 {
        let whole = segs.list.len() / (2 * Z512);
        whole + (segs.list.len() - whole * 2 * Z512).div_ceil(SR)
    } else {
        segs.list.len().div_ceil(SR)
    };
    let mut ahead = Ahead::new(ahead, tiles * rows.div_ceil(MR));
    // With AVX-512, tiles of 2·Z512 segments (two per 512-bit vector); the
    // segments left over go through the AVX2 tiles below.
    let mut list = &segs.list[..];
    #[cfg(target_arch = "x86_64")]
    if isa.kind() == Kind::Avx512 {
        let whole = list.len() / (2 * Z512) * (2 * Z512);
        for tile in list[..whole].chunks_exact(2 * Z512) {
            // Pairs that continue one run of the source (rows of 16 outputs or
            // more) load as one vector: the same elements, without the insert
            // that would share the FMAs' port.
            let joined = P == 1 && tile.chunks_exact(2).all(|p| p[1].src == p[0].src + LANES);
            // Pairs of whole segments end to end in the output store as one
            // vector each, with no branch (which would spill the accumulators).
            let whole = tile
                .chunks_exact(2)
                .all(|p| p[0].len == LANES && p[1].len == LANES && p[1].dst == p[0].dst + LANES);
            for (r0, mr) in panels(rows) {
                ahead.step();
                let panel = a[r0 * k..].as_ptr();
                let init = init.map(|b| &b[r0..r0 + mr]);
                // SAFETY: the caller's bounds cover every tap, segment and row
                // (a joined load reads exactly the pair's elements, a whole
                // store writes exactly them), and `Kind::Avx512` exists only
                // where detection found AVX-512F, AVX2 and FMA.
                unsafe {
                    let out = out.add(r0 * pitch);
                    let (taps, tile) = (&taps.offsets, tile);
                    match (joined, whole) {
                        (true, true) => by_rows!(
                            mr,
                            [1, true, true],
                            avx512::correlate(panel, taps, src, tile, init, out, pitch)
                        ),
                        (true, false) => by_rows!(
                            mr,
                            [1, true, false],
                            avx512::correlate(panel, taps, src, tile, init, out, pitch)
                        ),
                        (false, true) => by_rows!(
                            mr,
                            [P, false, true],
                            avx512::correlate(panel, taps, src, tile, init, out, pitch)
                        ),
                        (false, false) => by_rows!(
                            mr,
                            [P, false, false],
                            avx512::correlate(panel, taps, src, tile, init, out, pitch)
                        ),
                    }
                }
            }
        }
        list = &list[whole..];
    }
    for tile in list.chunks(SR) {
        for (r0, mr) in panels(rows) {
            ahead.step();
            let panel = a[r0 * k..].as_ptr();
            let init = init.map(|b| &b[r0..r0 + mr]);
            // SAFETY: the caller's bounds cover every tap, segment and row.
            unsafe {
                let out = out.add(r0 * pitch);
                match isa.kind() {
                    #[cfg(target_arch = "x86_64")]
                    Kind::Avx2Fma | Kind::Avx512 => {
                        by_rows_segs!(
                            mr,
                            tile.len(),
                            P,
                            avx2::correlate(panel, &taps.offsets, src, tile, init, out, pitch)
                        )
                    }
                    _ => by_rows_segs!(
                        mr,
                        tile.len(),
                        P,
                        portable::correlate(panel, &taps.offsets, src, tile, init, out, pitch)
                    ),
                }
            }
        }
    }
}

/// Segments per pass of the [`weight_grad`] tiles: the inputs of one block of
/// taps over a pass stay in L1 while every block of channels reads them.
pub const DW_CHUNK: usize = 32;

/// `out[j·cols + m] += Σ_s Σ_{l < s.len} src[taps[j] + s.src + step·l] · dyt[(s.dst + l)·cols + m]`
/// for every tap `j` and column `m < cols` (a multiple of [`LANES`]).
///
/// `dyt` is dY transposed, one row of `cols` output channels per pixel, so a
/// tile is an outer product: each pixel's input, broadcast, times its row of dY,
/// with no horizontal sums. Like a GEMM whose reduction runs over pixels, passes
/// of [`DW_CHUNK`] segments sweep every (tap block, channel block) tile.
///
/// # Panics
/// If a read or write would leave `dyt`, `src` or `out`.
#[allow(clippy::too_many_arguments)]
pub fn weight_grad(
    isa: Isa,
    dyt: &[f32],
    cols: usize,
    taps: &Taps,
    src: &[f32],
    segs: &Segments,
    out: &mut [f32],
    ahead: &[f32],
) {
    let k = taps.len();
    if cols == 0 || k == 0 || segs.is_empty() {
        return;
    }
    assert!(
        cols.is_multiple_of(LANES),
        "weight_grad: columns must be whole vectors"
    );
    assert!(segs.dst_end * cols <= dyt.len(), "weight_grad: dYᵀ too short");
    assert!(
        taps.max + segs.src_end <= src.len(),
        "weight_grad: source too short"
    );
    assert!(k * cols <= out.len(), "weight_grad: output too short");
    let (dyt, src, outp) = (dyt.as_ptr(), src.as_ptr(), out.as_mut_ptr());
    let taps_per = if isa.kind() == Kind::Avx512 { WK512 } else { WK };
    let mut ahead = Ahead::new(ahead, segs.list.len().div_ceil(DW_CHUNK) * k.div_ceil(taps_per));
    #[cfg(target_arch = "x86_64")]
    if isa.kind() == Kind::Avx512 {
        for pass in segs.list.chunks(DW_CHUNK) {
            for j0 in (0..k).step_by(WK512) {
                ahead.step();
                let taps = &taps.offsets[j0..k.min(j0 + WK512)];
                let mut m0 = 0;
                // SAFETY (all three calls): the asserts above bound every tap,
                // segment, pixel row and output element, and `Kind::Avx512`
                // exists only where detection found AVX-512F, AVX2 and FMA.
                while m0 + 2 * LANES <= cols {
                    let vecs = WV512.min((cols - m0) / (2 * LANES));
                    unsafe {
                        let (dyt, out) = (dyt.add(m0), outp.add(j0 * cols + m0));
                        if segs.step == 2 {
                            by_vecs_taps512!(
                                vecs,
                                taps.len(),
                                [2],
                                avx512::weight_grad(dyt, cols, taps, src, pass, out)
                            );
                        } else {
                            by_vecs_taps512!(
                                vecs,
                                taps.len(),
                                [1],
                                avx512::weight_grad(dyt, cols, taps, src, pass, out)
                            );
                        }
                    }
                    m0 += vecs * 2 * LANES;
                }
                // A last block of 8 channels: the AVX2 tile.
                if m0 < cols {
                    for (i, taps) in taps.chunks(WK).enumerate() {
                        unsafe {
                            let (dyt, out) = (dyt.add(m0), outp.add((j0 + i * WK) * cols + m0));
                            by_rows_taps!(
                                1,
                                taps.len(),
                                avx2::weight_grad(dyt, cols, taps, src, segs.step, pass, out)
                            );
                        }
                    }
                }
            }
        }
        return;
    }
    for pass in segs.list.chunks(DW_CHUNK) {
        for j0 in (0..k).step_by(WK) {
            ahead.step();
            let taps = &taps.offsets[j0..k.min(j0 + WK)];
            for m0 in (0..cols).step_by(WV * LANES) {
                let vecs = WV.min((cols - m0) / LANES);
                // SAFETY: the asserts above bound every tap, segment, pixel row and
                // output element.
                unsafe {
                    let (dyt, out) = (dyt.add(m0), outp.add(j0 * cols + m0));
                    match isa.kind() {
                        #[cfg(target_arch = "x86_64")]
                        Kind::Avx2Fma | Kind::Avx512 => {
                            by_rows_taps!(
                                vecs,
                                taps.len(),
                                avx2::weight_grad(dyt, cols, taps, src, segs.step, pass, out)
                            )
                        }
                        _ => by_rows_taps!(
                            vecs,
                            taps.len(),
                            portable::weight_grad(dyt, cols, taps, src, segs.step, pass, out)
                        ),
                    }
                }
            }
        }
    }
}

/// Rows of dY per [`weight_grad_lanes`] tile.
const LM: usize = 4;
/// Taps per [`weight_grad_lanes`] tile: `LM × LK` = 24 accumulators, plus `LM`
/// dY vectors and one input vector, 29 of the 32 registers.
const LK: usize = 6;

/// Two segments of one image as the 16 lanes of a 512-bit vector: pixels
/// `dst[h]..` of dY and inputs `src[h]..` (step 1) in half `h`, `mask` the lanes
/// that hold a pixel. `joined`: each half follows the other in memory, in
/// dY (bit 0) and in the source (bit 1), so one load reads both.
#[derive(Clone, Copy, Debug)]
pub struct Pair {
    src: [usize; 2],
    dst: [usize; 2],
    mask: u16,
    joined: u8,
}

/// The segments of one image paired for [`weight_grad_lanes`], with the bounds
/// it checks once per call.
#[derive(Default)]
pub struct Pairs {
    list: Vec<Pair>,
    /// One past the last source element a pixel reads (before adding the tap).
    src_end: usize,
    /// One past the last pixel of dY.
    dst_end: usize,
    /// Every pair is two whole segments, one after the other in dY and in
    /// the source: plain vector loads.
    whole: bool,
}

impl Pairs {
    /// Pairs consecutive segments of `segs` (of step 1: the caller checks).
    pub fn build(&mut self, segs: &Segments) {
        assert_eq!(segs.step, 1, "pairs: segments must read consecutive inputs");
        self.list.clear();
        self.src_end = segs.src_end;
        self.dst_end = segs.dst_end;
        for two in segs.list.chunks(2) {
            let lo = two[0];
            // An odd segment out pairs with nothing: its upper lanes stay clear.
            let hi = two.get(1).copied().unwrap_or(Segment { len: 0, ..lo });
            let full = lo.len == LANES;
            self.list.push(Pair {
                src: [lo.src, hi.src],
                dst: [lo.dst, hi.dst],
                mask: (((1u32 << lo.len) - 1) | (((1u32 << hi.len) - 1) << LANES)) as u16,
                joined: u8::from(full && hi.dst == lo.dst + LANES)
                    | u8::from(full && hi.src == lo.src + LANES) << 1,
            });
        }
        self.whole = self.list.iter().all(|p| p.mask == u16::MAX && p.joined == 3);
    }
}

/// Bytes of dY one [`weight_grad_lanes`] pass keeps in L1 for its `LM` rows.
const LANES_DY_BYTES: usize = 24 << 10;

/// Images of `pixels` output pixels each per [`weight_grad_lanes`] pass: as
/// many as keep the tile's rows of dY in L1, so that small images do not pay
/// a pass's set-up per handful of pixels.
pub fn lanes_images(pixels: usize) -> usize {
    (LANES_DY_BYTES / (LM * pixels.max(1) * size_of::<f32>())).max(1)
}

/// Whether [`weight_grad_lanes`] runs on `isa` (it needs 512-bit masked loads).
pub fn has_lanes_dw(isa: Isa) -> bool {
    isa.kind() == Kind::Avx512
}

/// `part[(r·k + j)·16 + l] += Σ_pairs dy[r·ch + pixel] · src[taps[j] + input]`
/// for each row `r < rows` of dY (`ch` apart), each of the `k` taps and each
/// lane `l`, the pixels of one image (`pairs`) spread across the lanes: dW with
/// pixels, not channels, in the vector. Each input vector then serves `LM`
/// rows and each dY vector `LK` taps, where [`weight_grad`] loads a broadcast
/// input per multiply-add when there are 16 channels or fewer; and dY is read
/// as it is, not transposed. The lanes are summed by the caller, once a batch.
///
/// # Panics
/// If `isa` has no such tile ([`has_lanes_dw`]) or a read or write would
/// leave `dy`, `src` or `part`.
#[allow(clippy::too_many_arguments)]
pub fn weight_grad_lanes(
    isa: Isa,
    dy: &[f32],
    (rows, ch): (usize, usize),
    taps: &Taps,
    src: &[f32],
    pairs: &Pairs,
    part: &mut [f32],
    ahead: &[f32],
) {
    let k = taps.len();
    if rows == 0 || k == 0 || pairs.list.is_empty() {
        return;
    }
    assert!(has_lanes_dw(isa), "weight_grad_lanes: needs AVX-512");
    assert!(
        (rows - 1) * ch + pairs.dst_end <= dy.len(),
        "weight_grad_lanes: dY too short"
    );
    assert!(
        taps.max + pairs.src_end <= src.len(),
        "weight_grad_lanes: source too short"
    );
    assert!(
        rows * k * 2 * LANES <= part.len(),
        "weight_grad_lanes: output too short"
    );
    let mut ahead = Ahead::new(ahead, rows.div_ceil(LM) * k.div_ceil(LK));
    #[cfg(target_arch = "x86_64")]
    for r0 in (0..rows).step_by(LM) {
        for j0 in (0..k).step_by(LK) {
            ahead.step();
            let taps = &taps.offsets[j0..k.min(j0 + LK)];
            // SAFETY: the asserts above bound every row, tap and pair (the
            // loads are masked to the pixels of each half), and
            // `Kind::Avx512` exists only where detection found AVX-512F.
            unsafe {
                let (dy, out) = (
                    dy.as_ptr().add(r0 * ch),
                    part.as_mut_ptr().add((r0 * k + j0) * 2 * LANES),
                );
                let args = (dy, ch, taps, src.as_ptr(), &pairs.list[..], out, k * 2 * LANES);
                if pairs.whole {
                    by_rows_taps_lanes!(
                        LM.min(rows - r0),
                        taps.len(),
                        [true],
                        avx512::weight_grad_lanes(args)
                    );
                } else {
                    by_rows_taps_lanes!(
                        LM.min(rows - r0),
                        taps.len(),
                        [false],
                        avx512::weight_grad_lanes(args)
                    );
                }
            }
        }
    }
}

/// Writes `dyt[(img·pixels + p)·cols + m] = dy[img·dy_image + m·pixels + p]` for
/// `m < rows`: dY transposed to pixel-major rows of `cols ≥ rows` (the rest of
/// each row is left as it is: zero it once). 8×8 blocks go through registers.
pub fn transpose_into(
    isa: Isa,
    dy: &[f32],
    (images, rows, pixels): (usize, usize, usize),
    dy_image: usize,
    dyt: &mut [f32],
    cols: usize,
) {
    assert!(rows <= cols);
    for img in 0..images {
        let dy = &dy[img * dy_image..][..rows * pixels];
        let dyt = &mut dyt[img * pixels * cols..(img + 1) * pixels * cols];
        let (mut rows_done, mut pixels_done) = (0, 0);
        #[cfg(target_arch = "x86_64")]
        if isa.avx2() {
            (rows_done, pixels_done) = (rows / LANES * LANES, pixels / LANES * LANES);
            // SAFETY: the blocks stay inside `dy` (`rows × pixels`) and `dyt`
            // (`pixels × cols`).
            unsafe {
                avx2::transpose(
                    dy.as_ptr(),
                    pixels,
                    rows_done / LANES,
                    pixels_done / LANES,
                    dyt.as_mut_ptr(),
                    cols,
                )
            };
        }
        let _ = isa;
        for m in 0..rows {
            let from = if m < rows_done { pixels_done } else { 0 };
            for p in from..pixels {
                dyt[p * cols + m] = dy[m * pixels + p];
            }
        }
    }
}

/// Calls `f::<rows, segs, step>(args)` for a runtime [`correlate`] tile shape.
macro_rules! by_rows_segs {
    ($rows:expr, $segs:expr, $p:ident, $($f:ident)::+ ($($arg:expr),* $(,)?)) => {
        match ($rows, $segs) {
            (1, 1) => $($f)::+::<1, 1, $p>($($arg),*),
            (1, _) => $($f)::+::<1, 2, $p>($($arg),*),
            (2, 1) => $($f)::+::<2, 1, $p>($($arg),*),
            (2, _) => $($f)::+::<2, 2, $p>($($arg),*),
            (3, 1) => $($f)::+::<3, 1, $p>($($arg),*),
            (3, _) => $($f)::+::<3, 2, $p>($($arg),*),
            (4, 1) => $($f)::+::<4, 1, $p>($($arg),*),
            (4, _) => $($f)::+::<4, 2, $p>($($arg),*),
            (5, 1) => $($f)::+::<5, 1, $p>($($arg),*),
            (5, _) => $($f)::+::<5, 2, $p>($($arg),*),
            (_, 1) => $($f)::+::<6, 1, $p>($($arg),*),
            (_, _) => $($f)::+::<6, 2, $p>($($arg),*),
        }
    };
}
use by_rows_segs;

/// Calls `f::<rows, G...>(args)` for a runtime panel height (1 to [`MR`]) and
/// the other const generics `G`.
macro_rules! by_rows {
    ($rows:expr, [$($g:tt),+], $($f:ident)::+ ($($arg:expr),* $(,)?)) => {
        match $rows {
            1 => $($f)::+::<1, $($g),+>($($arg),*),
            2 => $($f)::+::<2, $($g),+>($($arg),*),
            3 => $($f)::+::<3, $($g),+>($($arg),*),
            4 => $($f)::+::<4, $($g),+>($($arg),*),
            5 => $($f)::+::<5, $($g),+>($($arg),*),
            _ => $($f)::+::<6, $($g),+>($($arg),*),
        }
    };
}
#[cfg(target_arch = "x86_64")]
use by_rows;

/// 512-bit vectors per AVX-512 [`correlate`] tile: `MR × Z512` = 24
/// accumulators, `Z512` source vectors and one broadcast weight use 29 of the 32
/// registers.
const Z512: usize = 4;

/// 512-bit vectors of output channels per AVX-512 [`weight_grad`] tile.
const WV512: usize = 2;
/// Taps per AVX-512 [`weight_grad`] tile: `WK512 × WV512` = 24 accumulators,
/// plus `WV512` dY vectors and one broadcast input.
const WK512: usize = 12;

/// Calls `f::<vectors, taps, G...>(args)` for a runtime AVX-512 [`weight_grad`] tile
/// shape (1 to [`WV512`] vectors, 1 to [`WK512`] taps).
macro_rules! by_vecs_taps512 {
    ($vecs:expr, $taps:expr, [$($g:tt),*], $($f:ident)::+ ($($arg:expr),* $(,)?)) => {
        match ($vecs, $taps) {
            (1, 1) => $($f)::+::<1, 1, $($g),*>($($arg),*),
            (1, 2) => $($f)::+::<1, 2, $($g),*>($($arg),*),
            (1, 3) => $($f)::+::<1, 3, $($g),*>($($arg),*),
            (1, 4) => $($f)::+::<1, 4, $($g),*>($($arg),*),
            (1, 5) => $($f)::+::<1, 5, $($g),*>($($arg),*),
            (1, 6) => $($f)::+::<1, 6, $($g),*>($($arg),*),
            (1, 7) => $($f)::+::<1, 7, $($g),*>($($arg),*),
            (1, 8) => $($f)::+::<1, 8, $($g),*>($($arg),*),
            (1, 9) => $($f)::+::<1, 9, $($g),*>($($arg),*),
            (1, 10) => $($f)::+::<1, 10, $($g),*>($($arg),*),
            (1, 11) => $($f)::+::<1, 11, $($g),*>($($arg),*),
            (1, _) => $($f)::+::<1, 12, $($g),*>($($arg),*),
            (_, 1) => $($f)::+::<2, 1, $($g),*>($($arg),*),
            (_, 2) => $($f)::+::<2, 2, $($g),*>($($arg),*),
            (_, 3) => $($f)::+::<2, 3, $($g),*>($($arg),*),
            (_, 4) => $($f)::+::<2, 4, $($g),*>($($arg),*),
            (_, 5) => $($f)::+::<2, 5, $($g),*>($($arg),*),
            (_, 6) => $($f)::+::<2, 6, $($g),*>($($arg),*),
            (_, 7) => $($f)::+::<2, 7, $($g),*>($($arg),*),
            (_, 8) => $($f)::+::<2, 8, $($g),*>($($arg),*),
            (_, 9) => $($f)::+::<2, 9, $($g),*>($($arg),*),
            (_, 10) => $($f)::+::<2, 10, $($g),*>($($arg),*),
            (_, 11) => $($f)::+::<2, 11, $($g),*>($($arg),*),
            (_, _) => $($f)::+::<2, 12, $($g),*>($($arg),*),
        }
    };
}
#[cfg(target_arch = "x86_64")]
use by_vecs_taps512;

/// Calls `f::<rows, taps>(args)` for a runtime [`weight_grad_lanes`] tile shape
/// (1 to [`LM`] rows, 1 to [`LK`] taps).
macro_rules! by_rows_taps_lanes {
    ($rows:expr, $taps:expr, [$($g:tt),*], $($f:ident)::+ ($($arg:expr),* $(,)?)) => {
        match ($rows, $taps) {
            (1, 1) => $($f)::+::<1, 1, $($g),*>($($arg),*),
            (1, 2) => $($f)::+::<1, 2, $($g),*>($($arg),*),
            (1, 3) => $($f)::+::<1, 3, $($g),*>($($arg),*),
            (1, 4) => $($f)::+::<1, 4, $($g),*>($($arg),*),
            (1, 5) => $($f)::+::<1, 5, $($g),*>($($arg),*),
            (1, _) => $($f)::+::<1, 6, $($g),*>($($arg),*),
            (2, 1) => $($f)::+::<2, 1, $($g),*>($($arg),*),
            (2, 2) => $($f)::+::<2, 2, $($g),*>($($arg),*),
            (2, 3) => $($f)::+::<2, 3, $($g),*>($($arg),*),
            (2, 4) => $($f)::+::<2, 4, $($g),*>($($arg),*),
            (2, 5) => $($f)::+::<2, 5, $($g),*>($($arg),*),
            (2, _) => $($f)::+::<2, 6, $($g),*>($($arg),*),
            (3, 1) => $($f)::+::<3, 1, $($g),*>($($arg),*),
            (3, 2) => $($f)::+::<3, 2, $($g),*>($($arg),*),
            (3, 3) => $($f)::+::<3, 3, $($g),*>($($arg),*),
            (3, 4) => $($f)::+::<3, 4, $($g),*>($($arg),*),
            (3, 5) => $($f)::+::<3, 5, $($g),*>($($arg),*),
            (3, _) => $($f)::+::<3, 6, $($g),*>($($arg),*),
            (_, 1) => $($f)::+::<4, 1, $($g),*>($($arg),*),
            (_, 2) => $($f)::+::<4, 2, $($g),*>($($arg),*),
            (_, 3) => $($f)::+::<4, 3, $($g),*>($($arg),*),
            (_, 4) => $($f)::+::<4, 4, $($g),*>($($arg),*),
            (_, 5) => $($f)::+::<4, 5, $($g),*>($($arg),*),
            (_, _) => $($f)::+::<4, 6, $($g),*>($($arg),*),
        }
    };
}
#[cfg(target_arch = "x86_64")]
use by_rows_taps_lanes;

/// Calls `f::<vectors, taps>(args)` for a runtime [`weight_grad`] tile shape.
macro_rules! by_rows_taps {
    ($rows:expr, $taps:expr, $($f:ident)::+ ($($arg:expr),* $(,)?)) => {
        match ($rows, $taps) {
            (1, 1) => $($f)::+::<1, 1>($($arg),*),
            (1, 2) => $($f)::+::<1, 2>($($arg),*),
            (1, 3) => $($f)::+::<1, 3>($($arg),*),
            (1, 4) => $($f)::+::<1, 4>($($arg),*),
            (1, 5) => $($f)::+::<1, 5>($($arg),*),
            (1, _) => $($f)::+::<1, 6>($($arg),*),
            (_, 1) => $($f)::+::<2, 1>($($arg),*),
            (_, 2) => $($f)::+::<2, 2>($($arg),*),
            (_, 3) => $($f)::+::<2, 3>($($arg),*),
            (_, 4) => $($f)::+::<2, 4>($($arg),*),
            (_, 5) => $($f)::+::<2, 5>($($arg),*),
            (_, _) => $($f)::+::<2, 6>($($arg),*),
        }
    };
}
use by_rows_taps;

// Both tile sets below trust their caller for bounds.

// Register tiles index their accumulators by (row, column) on purpose: the loops
// have constant bounds and unroll into straight-line code.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::{Segment, LANES};
    use std::arch::x86_64::*;

    /// Lanes `..len` set.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn mask(len: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(len as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// `blocks` blocks of 16 inputs per row split into 8 even and 8 odd outputs.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn split_even_odd(
        src: *const f32,
        src_pitch: usize,
        rows: usize,
        even: *mut f32,
        odd: *mut f32,
        pitch: usize,
        blocks: usize,
    ) {
        // The odd ones as `evens` takes the even ones: [a1 a3 b1 b3 | a5 a7 b5 b7],
        // then the middle 64-bit lanes swapped.
        let odds = |a: __m256, b: __m256| {
            let v = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
        };
        for r in 0..rows {
            let (src, even, odd) =
                unsafe { (src.add(r * src_pitch), even.add(r * pitch), odd.add(r * pitch)) };
            for i in 0..blocks {
                let (a, b) = unsafe {
                    (
                        _mm256_loadu_ps(src.add(16 * i)),
                        _mm256_loadu_ps(src.add(16 * i + 8)),
                    )
                };
                unsafe {
                    _mm256_storeu_ps(even.add(8 * i), evens(a, b));
                    _mm256_storeu_ps(odd.add(8 * i), odds(a, b));
                }
            }
        }
    }

    /// `row_blocks × col_blocks` 8×8 blocks of the row-major `src` (rows
    /// `src_pitch` apart) written transposed into `dst` (rows `dst_pitch` apart).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn transpose(
        src: *const f32,
        src_pitch: usize,
        row_blocks: usize,
        col_blocks: usize,
        dst: *mut f32,
        dst_pitch: usize,
    ) {
        for rb in 0..row_blocks {
            for cb in 0..col_blocks {
                let s = unsafe { src.add(8 * rb * src_pitch + 8 * cb) };
                let mut r = [_mm256_setzero_ps(); 8];
                for i in 0..8 {
                    r[i] = unsafe { _mm256_loadu_ps(s.add(i * src_pitch)) };
                }
                let t = [
                    _mm256_unpacklo_ps(r[0], r[1]),
                    _mm256_unpackhi_ps(r[0], r[1]),
                    _mm256_unpacklo_ps(r[2], r[3]),
                    _mm256_unpackhi_ps(r[2], r[3]),
                    _mm256_unpacklo_ps(r[4], r[5]),
                    _mm256_unpackhi_ps(r[4], r[5]),
                    _mm256_unpacklo_ps(r[6], r[7]),
                    _mm256_unpackhi_ps(r[6], r[7]),
                ];
                let u = [
                    _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                    _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                    _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                    _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                    _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                    _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                    _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                    _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
                ];
                let d = unsafe { dst.add(8 * cb * dst_pitch + 8 * rb) };
                for i in 0..4 {
                    unsafe {
                        _mm256_storeu_ps(
                            d.add(i * dst_pitch),
                            _mm256_permute2f128_ps::<0x20>(u[i], u[i + 4]),
                        );
                        _mm256_storeu_ps(
                            d.add((i + 4) * dst_pitch),
                            _mm256_permute2f128_ps::<0x31>(u[i], u[i + 4]),
                        );
                    }
                }
            }
        }
    }

    /// `blocks` blocks of 8 even and 8 odd inputs interleaved into 16 outputs,
    /// per row.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn interleave(
        (even, ep): (*const f32, usize),
        (odd, op): (*const f32, usize),
        rows: usize,
        dst: *mut f32,
        pitch: usize,
        blocks: usize,
    ) {
        for r in 0..rows {
            let (even, odd, dst) = unsafe { (even.add(r * ep), odd.add(r * op), dst.add(r * pitch)) };
            for i in 0..blocks {
                let (e, o) = unsafe { (_mm256_loadu_ps(even.add(8 * i)), _mm256_loadu_ps(odd.add(8 * i))) };
                // [e0 o0 e1 o1 | e4 o4 e5 o5] and [e2 o2 e3 o3 | e6 o6 e7 o7].
                let (lo, hi) = (_mm256_unpacklo_ps(e, o), _mm256_unpackhi_ps(e, o));
                unsafe {
                    _mm256_storeu_ps(dst.add(16 * i), _mm256_permute2f128_ps::<0x20>(lo, hi));
                    _mm256_storeu_ps(dst.add(16 * i + 8), _mm256_permute2f128_ps::<0x31>(lo, hi));
                }
            }
        }
    }

    /// [`super::gather_rows`] over `blocks` vectors of output per row.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gather_rows<const S: usize>(
        src: *const f32,
        src_pitch: usize,
        rows: usize,
        dst: *mut f32,
        pitch: usize,
        blocks: usize,
    ) {
        for r in 0..rows {
            let (src, dst) = unsafe { (src.add(r * src_pitch), dst.add(r * pitch)) };
            for i in 0..blocks {
                unsafe { _mm256_storeu_ps(dst.add(LANES * i), load::<S>(src.add(S * LANES * i))) };
            }
        }
    }

    /// The even elements of `a` then `b`: `[a0 a2 a4 a6 b0 b2 b4 b6]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn evens(a: __m256, b: __m256) -> __m256 {
        // [a0 a2 b0 b2 | a4 a6 b4 b6], then the middle 64-bit lanes swapped.
        let v = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
        _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
    }

    /// The 8 inputs of a segment of step `P` (1 or 2) starting at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load<const P: usize>(p: *const f32) -> __m256 {
        unsafe {
            if P == 1 {
                _mm256_loadu_ps(p)
            } else {
                evens(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(LANES)))
            }
        }
    }

    /// `blocks` blocks of 8 inputs `dst[2j] = src[j]`, odd elements kept.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scatter_even(dst: *mut f32, src: *const f32, blocks: usize) {
        let lo_idx = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        let hi_idx = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
        for i in 0..blocks {
            let v = unsafe { _mm256_loadu_ps(src.add(8 * i)) };
            let (d0, d1) = unsafe { (dst.add(16 * i), dst.add(16 * i + 8)) };
            let lo = _mm256_blend_ps::<0b1010_1010>(_mm256_permutevar8x32_ps(v, lo_idx), unsafe {
                _mm256_loadu_ps(d0)
            });
            let hi = _mm256_blend_ps::<0b1010_1010>(_mm256_permutevar8x32_ps(v, hi_idx), unsafe {
                _mm256_loadu_ps(d1)
            });
            unsafe {
                _mm256_storeu_ps(d0, lo);
                _mm256_storeu_ps(d1, hi);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn correlate<const M: usize, const S: usize, const P: usize>(
        a: *const f32,
        taps: &[usize],
        src: *const f32,
        segs: &[Segment],
        init: Option<&[f32]>,
        out: *mut f32,
        pitch: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); S]; M];
        if let Some(b) = init {
            for r in 0..M {
                acc[r] = [_mm256_set1_ps(b[r]); S];
            }
        }
        let mut base = [src; S];
        for s in 0..S {
            base[s] = unsafe { src.add(segs[s].src) };
        }
        let mut a = a;
        for &t in taps {
            let mut b = [_mm256_setzero_ps(); S];
            for s in 0..S {
                b[s] = unsafe { load::<P>(base[s].add(t)) };
            }
            for r in 0..M {
                let av = _mm256_set1_ps(unsafe { *a.add(r) });
                for s in 0..S {
                    acc[r][s] = _mm256_fmadd_ps(av, b[s], acc[r][s]);
                }
            }
            a = unsafe { a.add(M) };
        }
        for s in 0..S {
            let dst = unsafe { out.add(segs[s].dst) };
            if segs[s].len == LANES {
                for r in 0..M {
                    unsafe { _mm256_storeu_ps(dst.add(r * pitch), acc[r][s]) };
                }
            } else {
                let m = mask(segs[s].len);
                for r in 0..M {
                    unsafe { _mm256_maskstore_ps(dst.add(r * pitch), m, acc[r][s]) };
                }
            }
        }
    }

    /// One pass over `segs` of a `K`-tap × `V`-vector tile of dWᵀ, added to `out`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weight_grad<const V: usize, const K: usize>(
        dyt: *const f32,
        cols: usize,
        taps: &[usize],
        src: *const f32,
        step: usize,
        segs: &[Segment],
        out: *mut f32,
    ) {
        let mut acc = [[_mm256_setzero_ps(); V]; K];
        let mut base = [src; K];
        for j in 0..K {
            base[j] = unsafe { src.add(taps[j]) };
        }
        for seg in segs {
            let d = unsafe { dyt.add(seg.dst * cols) };
            for l in 0..seg.len {
                let mut dv = [_mm256_setzero_ps(); V];
                for v in 0..V {
                    dv[v] = unsafe { _mm256_loadu_ps(d.add(l * cols + v * LANES)) };
                }
                for j in 0..K {
                    let x = _mm256_set1_ps(unsafe { *base[j].add(seg.src + step * l) });
                    for v in 0..V {
                        acc[j][v] = _mm256_fmadd_ps(x, dv[v], acc[j][v]);
                    }
                }
            }
        }
        for j in 0..K {
            for v in 0..V {
                let o = unsafe { out.add(j * cols + v * LANES) };
                unsafe { _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[j][v])) };
            }
        }
    }
}

#[allow(clippy::needless_range_loop)]
mod portable {
    use super::{Segment, LANES};

    pub unsafe fn correlate<const M: usize, const S: usize, const P: usize>(
        a: *const f32,
        taps: &[usize],
        src: *const f32,
        segs: &[Segment],
        init: Option<&[f32]>,
        out: *mut f32,
        pitch: usize,
    ) {
        let mut acc = [[[0.0f32; LANES]; S]; M];
        if let Some(b) = init {
            for r in 0..M {
                acc[r] = [[b[r]; LANES]; S];
            }
        }
        for (k, &t) in taps.iter().enumerate() {
            for s in 0..S {
                let b = unsafe { std::slice::from_raw_parts(src.add(segs[s].src + t), P * LANES) };
                for r in 0..M {
                    let av = unsafe { *a.add(k * M + r) };
                    for l in 0..LANES {
                        acc[r][s][l] += av * b[P * l];
                    }
                }
            }
        }
        for s in 0..S {
            for r in 0..M {
                let dst = unsafe { out.add(segs[s].dst + r * pitch) };
                for l in 0..segs[s].len {
                    unsafe { *dst.add(l) = acc[r][s][l] };
                }
            }
        }
    }

    pub unsafe fn weight_grad<const V: usize, const K: usize>(
        dyt: *const f32,
        cols: usize,
        taps: &[usize],
        src: *const f32,
        step: usize,
        segs: &[Segment],
        out: *mut f32,
    ) {
        let mut acc = [[[0.0f32; LANES]; V]; K];
        for seg in segs {
            for l in 0..seg.len {
                let d = unsafe { std::slice::from_raw_parts(dyt.add((seg.dst + l) * cols), V * LANES) };
                for j in 0..K {
                    let x = unsafe { *src.add(taps[j] + seg.src + step * l) };
                    for v in 0..V {
                        for i in 0..LANES {
                            acc[j][v][i] += x * d[v * LANES + i];
                        }
                    }
                }
            }
        }
        for j in 0..K {
            for v in 0..V {
                for i in 0..LANES {
                    unsafe { *out.add(j * cols + v * LANES + i) += acc[j][v][i] };
                }
            }
        }
    }
}

/// The tiles on 512-bit vectors: forward/dX with each vector holding two
/// 8-pixel segments (the segment layout is the AVX2 one; each half loads and
/// stores on its own), and dW with 16 output channels per vector.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::{Pair, Segment, LANES, Z512};
    use std::arch::x86_64::*;

    /// One pass over `segs` of step `P` of a `K`-tap × `V`-vector (16 channels
    /// each) tile of dWᵀ, added to `out`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn weight_grad<const V: usize, const K: usize, const P: usize>(
        dyt: *const f32,
        cols: usize,
        taps: &[usize],
        src: *const f32,
        segs: &[Segment],
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; K];
        let mut base = [src; K];
        for j in 0..K {
            base[j] = unsafe { src.add(taps[j]) };
        }
        // Pixel `l` of a segment whose dY rows start at `d` and inputs at `x`.
        let mut pixel = |d: *const f32, x: usize, l: usize| {
            let mut dv = [_mm512_setzero_ps(); V];
            for v in 0..V {
                dv[v] = unsafe { _mm512_loadu_ps(d.add(l * cols + v * 2 * LANES)) };
            }
            for j in 0..K {
                let x = _mm512_set1_ps(unsafe { *base[j].add(x + P * l) });
                for v in 0..V {
                    acc[j][v] = _mm512_fmadd_ps(x, dv[v], acc[j][v]);
                }
            }
        };
        for seg in segs {
            let d = unsafe { dyt.add(seg.dst * cols) };
            if V == 1 && seg.len == LANES {
                // A whole segment in straight-line code: each input is a
                // tap's base plus a constant, with no loop to count (one
                // vector of channels: 6–8% faster; with two, the compiler
                // hoists the segment's dY loads, spills, and runs 2.5× slower).
                for l in 0..LANES {
                    pixel(d, seg.src, l);
                }
            } else {
                for l in 0..seg.len {
                    pixel(d, seg.src, l);
                }
            }
        }
        for j in 0..K {
            for v in 0..V {
                let o = unsafe { out.add(j * cols + v * 2 * LANES) };
                unsafe { _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[j][v])) };
            }
        }
    }

    /// One pass over one image's `pairs` of an `R`-row × `K`-tap tile of dW
    /// with pixels across the lanes (see `weight_grad_lanes`), added to `out`
    /// (rows `pitch` apart, taps a vector apart).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn weight_grad_lanes<const R: usize, const K: usize, const W: bool>(
        (dy, ch, taps, src, pairs, out, pitch): (
            *const f32,
            usize,
            &[usize],
            *const f32,
            &[Pair],
            *mut f32,
            usize,
        ),
    ) {
        let mut acc = [[_mm512_setzero_ps(); K]; R];
        let mut base = [src; K];
        for j in 0..K {
            base[j] = src.wrapping_add(taps[j]);
        }
        for p in pairs {
            let mut dv = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let row = dy.wrapping_add(r * ch);
                dv[r] = if W {
                    unsafe { _mm512_loadu_ps(row.add(p.dst[0])) }
                } else {
                    unsafe { load_halves(row, p.dst, p.mask, p.joined & 1 != 0) }
                };
            }
            for j in 0..K {
                let x = if W {
                    unsafe { _mm512_loadu_ps(base[j].add(p.src[0])) }
                } else {
                    unsafe { load_halves(base[j], p.src, p.mask, p.joined & 2 != 0) }
                };
                for r in 0..R {
                    acc[r][j] = _mm512_fmadd_ps(dv[r], x, acc[r][j]);
                }
            }
        }
        for r in 0..R {
            for j in 0..K {
                let o = unsafe { out.add(r * pitch + j * 2 * LANES) };
                unsafe { _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[r][j])) };
            }
        }
    }

    /// Lanes `mask` of `base + at[0]..` (low half) and `base + at[1]..` (high
    /// half), the others zero; `joined`: `at[1]` is `at[0] + LANES`, one load.
    /// Masked-off lanes are never read (AVX-512 suppresses their faults), so
    /// only the pixels of each half need to be in bounds.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn load_halves(base: *const f32, at: [usize; 2], mask: u16, joined: bool) -> __m512 {
        if joined {
            return unsafe { _mm512_maskz_loadu_ps(mask, base.wrapping_add(at[0])) };
        }
        let lo = unsafe { _mm512_maskz_loadu_ps(mask & 0xff, base.wrapping_add(at[0])) };
        // Lane `LANES + l` of the high half is element `at[1] + l`.
        unsafe { _mm512_mask_loadu_ps(lo, mask & 0xff00, base.wrapping_add(at[1]).wrapping_sub(LANES)) }
    }

    /// The inputs of two segments of step `P` (1 or 2) starting at `lo` and
    /// `hi`, as one vector; `J`: `hi` is `lo + LANES` (step 1), one load.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn load_pair<const P: usize, const J: bool>(lo: *const f32, hi: *const f32) -> __m512 {
        if J {
            debug_assert!(P == 1 && hi == lo.wrapping_add(LANES));
            return unsafe { _mm512_loadu_ps(lo) };
        }
        if P == 2 {
            // Every second element of 16 from each: one two-source permute.
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let (lo, hi) = unsafe { (_mm512_loadu_ps(lo), _mm512_loadu_ps(hi)) };
            return _mm512_permutex2var_ps(lo, even, hi);
        }
        let (lo, hi) = unsafe { (_mm256_loadu_ps(lo), _mm256_loadu_ps(hi)) };
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
            _mm256_castps_pd(hi),
        ))
    }

    /// Lanes `..len` set.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn mask(len: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(len as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// Writes 8 lanes, or the first `len` of them.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn store(dst: *mut f32, v: __m256, len: usize) {
        unsafe {
            if len == LANES {
                _mm256_storeu_ps(dst, v)
            } else {
                _mm256_maskstore_ps(dst, mask(len), v)
            }
        }
    }

    /// `M` rows × `2·Z512` segments (exactly), as [`super::correlate`] says;
    /// `J`: each pair of segments is one run of the source ([`load_pair`]); `W`:
    /// each pair is two whole segments end to end in the output.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn correlate<const M: usize, const P: usize, const J: bool, const W: bool>(
        a: *const f32,
        taps: &[usize],
        src: *const f32,
        segs: &[Segment],
        init: Option<&[f32]>,
        out: *mut f32,
        pitch: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); Z512]; M];
        if let Some(b) = init {
            for r in 0..M {
                acc[r] = [_mm512_set1_ps(b[r]); Z512];
            }
        }
        let mut base = [src; 2 * Z512];
        for s in 0..2 * Z512 {
            base[s] = unsafe { src.add(segs[s].src) };
        }
        let mut a = a;
        for &t in taps {
            let mut b = [_mm512_setzero_ps(); Z512];
            for z in 0..Z512 {
                b[z] = unsafe { load_pair::<P, J>(base[2 * z].add(t), base[2 * z + 1].add(t)) };
            }
            for r in 0..M {
                let av = _mm512_set1_ps(unsafe { *a.add(r) });
                for z in 0..Z512 {
                    acc[r][z] = _mm512_fmadd_ps(av, b[z], acc[r][z]);
                }
            }
            a = unsafe { a.add(M) };
        }
        if W {
            for z in 0..Z512 {
                let dst = segs[2 * z].dst;
                for r in 0..M {
                    unsafe { _mm512_storeu_ps(out.add(dst + r * pitch), acc[r][z]) };
                }
            }
            return;
        }
        for z in 0..Z512 {
            let (lo, hi) = (&segs[2 * z], &segs[2 * z + 1]);
            for r in 0..M {
                let v = acc[r][z];
                let (vlo, vhi) = (
                    _mm512_castps512_ps256(v),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
                );
                unsafe {
                    store(out.add(lo.dst + r * pitch), vlo, lo.len);
                    store(out.add(hi.dst + r * pitch), vhi, hi.len);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn row_copies_match_plain_loops() {
        for isa in Isa::supported() {
            // No rows: nothing read or written.
            let mut dst = [f32::NAN; 4];
            gather_rows::<1>(isa, &[], 5, 0, &mut dst, 4, 4);
            assert!(dst.iter().all(|v| v.is_nan()));
            for n in [1, 7, 8, 9, 16, 17, 40, 72] {
                let (rows, src_pitch, pitch) = (3, n + 3, n + 2);
                let src = random(2 * src_pitch + n, n as u32);
                let mut dst = vec![f32::NAN; 2 * pitch + n + 1];
                gather_rows::<1>(isa, &src, src_pitch, rows, &mut dst, n, pitch);
                for (i, &d) in dst.iter().enumerate() {
                    let (r, t) = (i / pitch, i % pitch);
                    if t < n && r < rows {
                        assert_eq!(d, src[r * src_pitch + t], "{isa:?} copy {n} at {i}");
                    } else {
                        assert!(d.is_nan(), "{isa:?} copy {n} wrote {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn gathers_refuse_a_short_source() {
        for isa in Isa::supported() {
            let mut dst = vec![0.0; 2 * 12 + 9];
            // Three rows of 9 outputs, 20 apart: the last reads up to S·8.
            for (s, need) in [(1, 2 * 20 + 9), (2, 2 * 20 + 17)] {
                let src = vec![1.0; need];
                let run = |src: &[f32], dst: &mut [f32]| match s {
                    1 => gather_rows::<1>(isa, src, 20, 3, dst, 9, 12),
                    _ => gather_rows::<2>(isa, src, 20, 3, dst, 9, 12),
                };
                run(&src, &mut dst);
                let short = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&src[..need - 1], &mut dst.clone())
                }));
                let message = short.expect_err("a short source must be refused");
                let message = message
                    .downcast_ref::<&str>()
                    .map(|m| m.to_string())
                    .or_else(|| message.downcast_ref::<String>().cloned());
                assert_eq!(
                    message.as_deref(),
                    Some("gather: source too short"),
                    "{isa:?} step {s}: refused by the check, not by a read past the end"
                );
            }
        }
    }

    #[test]
    fn even_gather_and_scatter_match_plain_loops() {
        for isa in Isa::supported() {
            for n in [0, 1, 7, 8, 9, 16, 17, 40] {
                // Three rows: 2n + 3 apart, 2n + 1 long.
                let (rows, src_pitch, pitch) = (3, 2 * n + 3, n + 2);
                let src = random(2 * src_pitch + 2 * n + 1, n as u32);
                let mut dst = vec![0.0; 2 * pitch + n];
                gather_rows::<2>(isa, &src, src_pitch, rows, &mut dst, n, pitch);
                for r in 0..rows {
                    assert!(
                        (0..n).all(|j| dst[r * pitch + j] == src[r * src_pitch + 2 * j]),
                        "{isa:?} gather {n}, row {r}"
                    );
                }
                let dst = &dst[..n];
                let src = &src[..2 * n + 1];
                let mut back = random(2 * n + 1, 99);
                let keep = back.clone();
                scatter_even(isa, &mut back, dst);
                for (i, (&b, &k)) in back.iter().zip(&keep).enumerate() {
                    let want = if i % 2 == 0 && i / 2 < n { src[i] } else { k };
                    assert_eq!(b, want, "{isa:?} scatter {n} at {i}");
                }
            }
        }
    }

    #[test]
    fn even_odd_split_and_interleave_match_plain_loops() {
        for isa in Isa::supported() {
            for n in [0usize, 1, 2, 15, 16, 17, 33, 40] {
                let (ne, no, rows, pitch) = (n.div_ceil(2), n / 2, 3, n / 2 + 5);
                let src = random(2 * n + n.max(1), n as u32);
                let (mut even, mut odd) = (vec![0.0; 2 * pitch + ne], vec![0.0; 2 * pitch + no]);
                split_even_odd(isa, &src, n, rows, (&mut even, ne), (&mut odd, no), pitch);
                for r in 0..rows {
                    let row = &src[r * n..];
                    assert!(
                        (0..ne).all(|t| even[r * pitch + t] == row[2 * t]),
                        "{isa:?} even {n}"
                    );
                    assert!(
                        (0..no).all(|t| odd[r * pitch + t] == row[2 * t + 1]),
                        "{isa:?} odd {n}"
                    );
                }
                // Back into rows `n + 3` apart; the odd phase of one row for all.
                let mut back = vec![f32::NAN; 2 * (n + 3) + n];
                interleave(isa, (&even, pitch), (&odd, 0), rows, &mut back, n, n + 3);
                for r in 0..rows {
                    for x in 0..n {
                        let want = if x % 2 == 0 { src[r * n + x] } else { src[x] };
                        assert_eq!(back[r * (n + 3) + x], want, "{isa:?} interleave {n}, row {r}");
                    }
                    if r + 1 < rows {
                        assert!(back[r * (n + 3) + n..(r + 1) * (n + 3)]
                            .iter()
                            .all(|v| v.is_nan()));
                    }
                }
            }
        }
    }

    /// Every tile shape of every implementation against plain loops, with full
    /// and partial segments, reading consecutive inputs and every second one.
    #[test]
    fn tiles_match_plain_loops() {
        for step in [1, 2] {
            tiles_match_plain_loops_at(step);
        }
    }

    fn tiles_match_plain_loops_at(step: usize) {
        let isas = Isa::supported();
        // Rows 17 and 33: dW tiles of one and two 512-bit vectors of channels
        // plus an 8-channel rest; 14 taps: a whole 12-tap AVX-512 block and 2.
        for rows in (1..=9).chain([17, 33]) {
            for k in [1, 2, 5, 9, 14] {
                let src = random(800, rows as u32 * 31 + k as u32);
                let w = random(rows * k, 7);
                let mut taps = Taps::default();
                (0..k).for_each(|i| taps.push(i * 13 % 40));
                let mut segs = Segments::default();
                segs.reset(step);
                // Three AVX-512 tiles of 8 segments whose pairs are: one run
                // in the source and whole, end to end, in the output; one run
                // in the source, one pair partial; whole in the output only.
                segs.push_run(260, 120, 64);
                segs.push_run(330, 184, 29); // 8 + 8 + 8 + 5
                segs.push_run(370, 213, 32);
                for i in 0..8 {
                    segs.push_run(420 + 20 * i, 245 + 8 * i, 8);
                }
                segs.push_run(3, 0, 21); // 8 + 8 + 5
                segs.push_run(60, 21, 11); // 8 + 3
                segs.push_run(100, 32, 2);
                // 10 more: one whole AVX-512 tile of 8 segments (one of them
                // partial) and 2 left for the AVX2 tiles.
                segs.push_run(150, 40, 43); // 8 × 5 + 3
                segs.push_run(200, 83, 33); // 8 × 4 + 1
                let pitch = 320;
                let mut packed = HostVec::new();
                pack_panels(rows, k, |r, kk| w[r * k + kk], &mut packed);
                let init = random(rows, 3);
                let dy = random(rows * pitch, 11);
                for &isa in &isas {
                    let mut out = vec![0.0f32; rows * pitch];
                    correlate(
                        isa,
                        &packed,
                        rows,
                        &taps,
                        &src,
                        &segs,
                        Some(&init),
                        &mut out,
                        pitch,
                        &dy,
                    );
                    // dW from dY transposed into rows of `cols` channels.
                    let cols = rows.next_multiple_of(LANES);
                    let mut dyt = vec![0.0f32; pitch * cols];
                    transpose_into(isa, &dy, (1, rows, pitch), 0, &mut dyt, cols);
                    let mut dwt = vec![0.0f32; k * cols];
                    weight_grad(isa, &dyt, cols, &taps, &src, &segs, &mut dwt, &src);
                    let dw: Vec<f32> = (0..rows * k).map(|i| dwt[(i % k) * cols + i / k]).collect();
                    let mut want_dw = vec![0.0f32; rows * k];
                    for r in 0..rows {
                        for s in &segs.list {
                            for l in 0..s.len {
                                let mut acc = init[r];
                                for (kk, &t) in taps.offsets.iter().enumerate() {
                                    let x = src[t + s.src + step * l];
                                    acc += w[r * k + kk] * x;
                                    want_dw[r * k + kk] += dy[r * pitch + s.dst + l] * x;
                                }
                                let got = out[r * pitch + s.dst + l];
                                assert!(
                                    (got - acc).abs() < 1e-4,
                                    "{isa:?} step {step} rows {rows} k {k}: {got} vs {acc}"
                                );
                            }
                        }
                    }
                    for (g, w) in dw.iter().zip(&want_dw) {
                        assert!(
                            (g - w).abs() < 1e-4,
                            "{isa:?} step {step} dW rows {rows} k {k}: {g} vs {w}"
                        );
                    }
                    // The AVX-512 variant, and only it, has the lane tile.
                    assert_eq!(has_lanes_dw(isa), isa.kind() == Kind::Avx512);
                    if step == 1 && has_lanes_dw(isa) {
                        lanes_match_plain_loops(isa, &dy, (rows, pitch), &taps, &src, &segs, false);
                        // Runs that pair whole, one after the other in both.
                        let mut whole = Segments::default();
                        whole.push_run(260, 120, 64);
                        whole.push_run(3, 0, 16);
                        lanes_match_plain_loops(isa, &dy, (rows, pitch), &taps, &src, &whole, true);
                    }
                }
            }
        }
    }

    /// [`weight_grad_lanes`] over `segs` against plain loops; `whole`: whether
    /// its pairs take the plain-load path.
    fn lanes_match_plain_loops(
        isa: Isa,
        dy: &[f32],
        (rows, ch): (usize, usize),
        taps: &Taps,
        src: &[f32],
        segs: &Segments,
        whole: bool,
    ) {
        let k = taps.len();
        let mut pairs = Pairs::default();
        pairs.build(segs);
        assert_eq!(pairs.whole, whole);
        // A sentinel after the output: the tile must stay inside its rows.
        let mut part = vec![0.0f32; rows * k * 2 * LANES + 1];
        part[rows * k * 2 * LANES] = 7.0;
        weight_grad_lanes(isa, dy, (rows, ch), taps, src, &pairs, &mut part, dy);
        assert_eq!(part[rows * k * 2 * LANES], 7.0);
        for r in 0..rows {
            for (kk, &t) in taps.offsets.iter().enumerate() {
                let mut want = 0.0f32;
                for s in &segs.list {
                    for l in 0..s.len {
                        want += dy[r * ch + s.dst + l] * src[t + s.src + l];
                    }
                }
                let got: f32 = part[(r * k + kk) * 2 * LANES..][..2 * LANES].iter().sum();
                assert!(
                    (got - want).abs() < 1e-4,
                    "{isa:?} lanes (whole: {whole}) dW rows {rows} row {r} tap {kk}: {got} vs {want}"
                );
            }
        }
    }
}
