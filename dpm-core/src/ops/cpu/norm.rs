//! `SpatialBN` (batch normalisation over N, H, W per channel) and its gradient.
//!
//! Training (`is_test = 0`): `(X, scale, bias, running_mean, running_var) →
//! (Y, running_mean, running_var, saved_mean, saved_inv_std)`, the running
//! statistics updated in place as `r ← momentum·r + (1 − momentum)·batch` (the
//! variance unbiased, `n / (n − 1)`, as in Caffe2 and PyTorch).
//! Inference (`is_test = 1`): `(X, scale, bias, mean, var) → Y`.
//!
//! Synchronous batch norm (Caffe2's `num_batches`): training with two more
//! inputs, the per-channel `Σx` and `Σx²` summed over `num_batches` equal
//! batches (`ChannelStats` on each, then an all-reduce), normalises with the
//! statistics of all of them; its gradient likewise takes `Σ dY·x̂` and `Σ dY`
//! over all batches (`ChannelBackpropStats`, then an all-reduce) and returns its
//! share, `1 / num_batches`, of the scale and bias gradients.

use std::ops::Range;

use smallvec::{smallvec, SmallVec};

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;
use crate::tensor::{Shape, Tensor};

use super::elementwise::{add, relu_grad, relu_into, same_shape};
use super::isa::{vectorized, Isa};
use super::prefetch;

vectorized! {
    /// `(Σ a, Σ a·(b − shift))` over one plane, in 32 f32 lanes so the loop
    /// vectorises into several independent chains of adds (one chain would wait on
    /// the add latency); planes are combined in f64 by the callers. With `b − shift`
    /// of the data's own scale (shift = a sample, or the mean) no cancellation occurs.
    fn plane_sums(a: &[f32], b: &[f32], a_shift: f32, b_shift: f32) -> (f64, f64) {
        const L: usize = 32;
        let (mut s, mut p) = ([0.0f32; L], [0.0f32; L]);
        let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
        let (ar, br) = (ac.remainder(), bc.remainder());
        for (x, y) in ac.zip(bc) {
            for l in 0..L {
                let xa = x[l] - a_shift;
                s[l] += xa;
                p[l] += xa * (y[l] - b_shift);
            }
        }
        let mut sum: f64 = s.iter().map(|&v| f64::from(v)).sum();
        let mut prod: f64 = p.iter().map(|&v| f64::from(v)).sum();
        for (&x, &y) in ar.iter().zip(br) {
            let xa = f64::from(x - a_shift);
            sum += xa;
            prod += xa * f64::from(y - b_shift);
        }
        (sum, prod)
    }

    /// `y = x·a + b` over one plane: the batch norm's output.
    fn affine(y: &mut [f32], x: &[f32], a: f32, b: f32) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * a + b;
        }
    }

    /// `dy = dR·[R > 0]`, the relu's gradient, over one plane.
    fn mask(dy: &mut [f32], r: &[f32], dr: &[f32]) {
        for ((d, &r), &g) in dy.iter_mut().zip(r).zip(dr) {
            *d = relu_grad(r, g);
        }
    }

    /// dX of a training batch norm over one plane of channel `k`:
    /// `scale·inv_std·(dY − Σ dY / n − x̂·Σ dY·x̂ / n)`.
    fn train_dx(dx: &mut [f32], dy: &[f32], x: &[f32], k: Channel) {
        for ((d, &g), &x) in dx.iter_mut().zip(dy).zip(x) {
            let xhat = (x - k.mean) * k.inv_std;
            *d = k.scale * k.inv_std * (g - k.db - xhat * k.ds);
        }
    }

    /// dX of an inference batch norm over one plane: `dY·scale·inv_std`.
    fn test_dx(dx: &mut [f32], dy: &[f32], scale: f32, inv_std: f32) {
        for (d, &g) in dx.iter_mut().zip(dy) {
            *d = g * scale * inv_std;
        }
    }
}

/// What [`train_dx`] needs of one channel: its statistics, its scale, and
/// `Σ dY / n`, `Σ dY·x̂ / n`.
#[derive(Clone, Copy)]
struct Channel {
    mean: f32,
    inv_std: f32,
    scale: f32,
    db: f32,
    ds: f32,
}

/// Parsed arguments of both directions (shared with the CUDA kernels).
#[derive(Clone, Copy)]
pub(crate) struct Params {
    pub is_test: bool,
    pub epsilon: f32,
    pub momentum: f32,
    /// Batches whose statistics are combined (1: this one alone).
    pub num_batches: usize,
}

impl Params {
    pub(crate) fn parse(op: &OperatorDef) -> Result<Params> {
        let a = Args(&op.arg);
        let p = Params {
            is_test: a.int("is_test", 0)? != 0,
            epsilon: a.float("epsilon", 1e-5)?,
            momentum: a.float("momentum", 0.9)?,
            num_batches: a.usize("num_batches", 1)?,
        };
        if a.string("order", "NCHW")? != "NCHW" {
            return Err(Error::arg("order", "only NCHW is supported"));
        }
        if p.num_batches == 0 {
            return Err(Error::arg("num_batches", "must be ≥ 1"));
        }
        if p.epsilon <= 0.0 {
            return Err(Error::arg("epsilon", "must be > 0"));
        }
        if !(0.0..=1.0).contains(&p.momentum) {
            return Err(Error::arg("momentum", "must be in [0, 1]"));
        }
        Ok(p)
    }
}

/// (N, C, H·W) of input 0, checking inputs `per_channel` hold C elements (from
/// the shapes alone: the CUDA kernels use it too).
pub(crate) fn dims(ctx: &OpContext<'_>, per_channel: &[usize]) -> Result<(usize, usize, usize)> {
    let x = ctx.input(0)?;
    if x.shape().rank() < 2 {
        return Err(Error::shape(ctx.input_name(0), "[N, C, …]", x.shape()));
    }
    let (n, c) = (x.dims()[0], x.dims()[1]);
    let hw = x.dims()[2..].iter().product();
    for &i in per_channel {
        let t = ctx.input(i)?;
        if t.numel() != c {
            return Err(Error::shape(
                ctx.input_name(i),
                format!("[{c}] (one per channel)"),
                t.shape(),
            ));
        }
    }
    Ok((n, c, hw))
}

/// `SpatialBN`; fused with the `Relu` that reads its output (the executor's
/// `SpatialBN+Relu`, see `exec::fuse`), one more output: `relu(Y)`, written
/// plane by plane with Y while Y is in cache. Fused with the residual sum
/// that reads Y and the relu after it (`SpatialBN+Sum+Relu`), one more input,
/// the sum's other term O, and two more outputs, `S = Y + O` and `relu(S)`,
/// written plane by plane with Y (addition commutes: Y's place in the sum
/// does not matter).
pub struct SpatialBn {
    p: Params,
    pairs: Vec<(usize, usize)>,
    then: Then,
}

/// What a batch norm writes besides Y, plane by plane.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    Nothing,
    /// `relu(Y)`.
    Relu,
    /// `S = Y + O` and `relu(S)`.
    SumRelu,
}

impl Then {
    /// Outputs written after the batch norm's own.
    fn outputs(self) -> usize {
        match self {
            Then::Nothing => 0,
            Then::Relu => 1,
            Then::SumRelu => 2,
        }
    }
}

impl SpatialBn {
    /// Parses `is_test`, `epsilon`, `momentum`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Self::with(op, Then::Nothing)
    }

    /// `SpatialBN+Relu`: `SpatialBN`'s inputs, its outputs and then `relu(Y)`.
    pub fn create_fused(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Self::with(op, Then::Relu)
    }

    /// `SpatialBN+Sum+Relu`: `SpatialBN`'s inputs and O, its outputs and then
    /// S and `relu(S)`.
    pub fn create_residual(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Self::with(op, Then::SumRelu)
    }

    fn with(op: &OperatorDef, then: Then) -> Result<Box<dyn Kernel>> {
        let p = Params::parse(op)?;
        let pairs = if p.is_test { vec![] } else { vec![(3, 1), (4, 2)] };
        Ok(Box::new(SpatialBn { p, pairs, then }))
    }
}

impl Kernel for SpatialBn {
    fn in_place(&self) -> &[(usize, usize)] {
        &self.pairs
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let isa = Isa::best();
        let synced = !self.p.is_test && self.p.num_batches > 1;
        let summed = self.then == Then::SumRelu;
        let inputs = if synced { 7 } else { 5 } + usize::from(summed);
        ctx.expect_inputs(inputs..=inputs)?;
        let own = if self.p.is_test { 1 } else { 5 };
        let outputs = own + self.then.outputs();
        ctx.expect_outputs(outputs..=outputs)?;
        let per_channel: &[usize] = match (self.p.is_test, synced) {
            (true, _) => &[1, 2, 3, 4],
            (false, true) => &[1, 2, 5, 6],
            (false, false) => &[1, 2],
        };
        let (n, c, hw) = dims(ctx, per_channel)?;
        let (x, xd) = ctx.input_f32(0)?;
        // The sum's other term, checked as the sum checks it.
        let other = if summed {
            same_shape(ctx, inputs - 1, x.shape())?;
            Some(ctx.input_data::<f32>(inputs - 1)?)
        } else {
            None
        };
        let (_, scale) = ctx.input_f32(1)?;
        let (_, bias) = ctx.input_f32(2)?;
        let count = (self.p.num_batches * n * hw) as f64;
        // Pass 2's mean and 1/σ: given (inference), else made a group at a time.
        let (mut mean, mut inv_std) = (vec![0.0f32; c], vec![0.0f32; c]);
        // Training: the moments of x − shift per channel, shift = the
        // channel's first sample (no cancellation however large the mean is
        // against the spread); synced, Σx and Σx² of every batch (shift 0).
        let (mut shift, mut sum, mut sq) = (vec![0.0f32; c], vec![0.0f64; c], vec![0.0f64; c]);
        if self.p.is_test {
            let (_, m) = ctx.input_f32(3)?;
            let (_, v) = ctx.input_f32(4)?;
            mean.copy_from_slice(m);
            for (i, &v) in inv_std.iter_mut().zip(v) {
                *i = 1.0 / (v + self.p.epsilon).sqrt();
            }
        } else if count == 0.0 {
            return Err(Error::shape(ctx.input_name(0), "a non-empty batch", x.shape()));
        } else if synced {
            let (_, s) = ctx.input_f32(5)?;
            let (_, q) = ctx.input_f32(6)?;
            for ((d, &s), (e, &q)) in sum.iter_mut().zip(s).zip(sq.iter_mut().zip(q)) {
                (*d, *e) = (f64::from(s), f64::from(q));
            }
        } else {
            for (ch, sh) in shift.iter_mut().enumerate() {
                *sh = xd[ch * hw];
            }
        }
        let names = &ctx.def().output;
        let (y_t, rest) = ctx.outputs().split_first_mut().expect("≥ 1 output");
        let (own_outs, rest) = rest.split_at_mut(own - 1);
        // Training: the running statistics, updated in place, and the saved
        // ones, all checked and sized before any of them changes.
        let mut stats = match own_outs {
            [rm, rv, sm, si] => Some([
                running_stat(rm, &names[1], c)?,
                running_stat(rv, &names[2], c)?,
                sm.resize::<f32>(Shape::from([c]))
                    .map_err(|e| e.with_blob(&names[3]))?,
                si.resize::<f32>(Shape::from([c]))
                    .map_err(|e| e.with_blob(&names[4]))?,
            ]),
            _ => None,
        };
        let y = y_t.resize::<f32>(x.shape()).map_err(|e| e.with_blob(&names[0]))?;
        // The outputs after the batch norm's own: S (if summed), then R.
        let mut extras = rest
            .iter_mut()
            .zip(&names[own..])
            .map(|(t, name)| t.resize::<f32>(x.shape()).map_err(|e| e.with_blob(name)));
        let (mut sum_out, mut r) = match self.then {
            Then::Nothing => (None, None),
            Then::Relu => (None, extras.next().transpose()?),
            Then::SumRelu => (extras.next().transpose()?, extras.next().transpose()?),
        };
        let mom = f64::from(self.p.momentum);
        // The running variance is the unbiased estimate (n / (n − 1)), as in
        // Caffe2 and PyTorch; the batch is normalised with the biased one.
        let unbias = if count > 1.0 { count / (count - 1.0) } else { 1.0 };
        // Two passes over the whole tensor, not a group of channels at a time
        // as the gradient does: X mostly comes from the L2 of the op that
        // has just written it, and the step measured slower in groups.
        let every = || planes(n, c, hw, 0..c);
        // Pass 1 (training): the statistics, and the running ones moved.
        if let Some([rm, rv, sm, si]) = stats.as_mut() {
            if !synced {
                for (ch, at) in every() {
                    let (s, q) = plane_sums(isa, &xd[at.clone()], &xd[at], shift[ch], shift[ch]);
                    sum[ch] += s;
                    sq[ch] += q;
                }
            }
            for ch in 0..c {
                let shifted = sum[ch] / count;
                let var = (sq[ch] / count - shifted * shifted).max(0.0);
                let m = shifted + f64::from(shift[ch]);
                rm[ch] = (mom * f64::from(rm[ch]) + (1.0 - mom) * m) as f32;
                rv[ch] = (mom * f64::from(rv[ch]) + (1.0 - mom) * var * unbias) as f32;
                mean[ch] = m as f32;
                inv_std[ch] = (1.0 / (var + f64::from(self.p.epsilon)).sqrt()) as f32;
                (sm[ch], si[ch]) = (mean[ch], inv_std[ch]);
            }
        }
        // Pass 2: Y and what follows it, a plane at a time.
        for (ch, at) in every() {
            let a = scale[ch] * inv_std[ch];
            let b = bias[ch] - mean[ch] * a;
            let yp = &mut y[at.clone()];
            affine(isa, yp, &xd[at.clone()], a, b);
            // What the relu reads: Y, or the sum written here.
            let pre: &[f32] = match (sum_out.as_deref_mut(), other) {
                (Some(s), Some(o)) => {
                    let sp = &mut s[at.clone()];
                    add(isa, sp, yp, &o[at.clone()]);
                    sp
                }
                _ => yp,
            };
            if let Some(r) = r.as_deref_mut() {
                relu_into(isa, &mut r[at], pre);
            }
        }
        Ok(())
    }
}

/// `SpatialBNGradient(X, scale, dY, saved_mean, saved_inv_std) → (dX, dscale, dbias)`;
/// with `is_test = 1` the last two inputs are the running mean and variance.
///
/// Fused with the `ReluGradient` that computes its dY (the executor's
/// `ReluGradient+SpatialBNGradient`, see `exec::fuse`): input 2 is the relu's output
/// gradient dR, one more input (last) the relu's output R, and, unless no one
/// could see it, one more output (last) dY = dR·[R > 0], each plane of which
/// is summed while in cache. Fused also with the two-term `Sum` that makes dR
/// (`Sum+ReluGradient+SpatialBNGradient`): input 2 is the sum's first term
/// and one more input (after R) its second, added a plane at a time.
pub struct SpatialBnGradient {
    p: Params,
    fused: Fused,
    /// In-place pairs: fused, dR (or a term of its sum) in dX's blob, a
    /// term in dY's.
    pairs: Vec<(usize, usize)>,
}

/// What a batch norm gradient runs with.
#[derive(Clone, Copy, PartialEq)]
enum Fused {
    Nothing,
    /// The relu gradient that makes dY.
    Relu,
    /// The residual sum that makes the relu's dR, and the relu gradient.
    SumRelu,
}

impl SpatialBnGradient {
    /// Parses `is_test`, `epsilon`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Self::with(op, Fused::Nothing)
    }

    /// `ReluGradient+SpatialBNGradient(X, scale, dR, mean, inv_std, [Σ…], R) → (dX,
    /// dscale, dbias[, dY])`.
    pub fn create_fused(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Self::with(op, Fused::Relu)
    }

    /// `Sum+ReluGradient+SpatialBNGradient(X, scale, A, mean, inv_std, [Σ…], R, B)
    /// → (dX, dscale, dbias[, dY])`, dR = A + B.
    pub fn create_residual(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Self::with(op, Fused::SumRelu)
    }

    fn with(op: &OperatorDef, fused: Fused) -> Result<Box<dyn Kernel>> {
        let pairs = match fused {
            Fused::Nothing => vec![],
            Fused::Relu => vec![(2, 0)],
            // Each term may be dX's blob or dY's (shared gradient memory):
            // the pairs the op's names make.
            Fused::SumRelu => {
                let last = op.input.len().saturating_sub(1);
                [2, last]
                    .into_iter()
                    .filter_map(|t| {
                        let name = op.input.get(t)?;
                        [0, 3]
                            .into_iter()
                            .find(|&o| op.output.get(o) == Some(name))
                            .map(|o| (t, o))
                    })
                    .collect()
            }
        };
        Ok(Box::new(SpatialBnGradient {
            p: Params::parse(op)?,
            fused,
            pairs,
        }))
    }
}

impl Kernel for SpatialBnGradient {
    /// Fused, dX may be dR's own blob (gradient memory shared: the relu's
    /// input gradient is dead once dY is made), and a term of dR's sum dX's
    /// or dY's: each plane of them is read before that plane is written.
    fn in_place(&self) -> &[(usize, usize)] {
        &self.pairs
    }

    /// dR apart from dX is read where it is, not copied into dX first.
    fn reads_in_place_source(&self) -> bool {
        true
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let isa = Isa::best();
        let synced = !self.p.is_test && self.p.num_batches > 1;
        let extra = match self.fused {
            Fused::Nothing => 0,
            Fused::Relu => 1,
            Fused::SumRelu => 2,
        };
        let inputs = if synced { 7 } else { 5 } + extra;
        ctx.expect_inputs(inputs..=inputs)?;
        ctx.expect_outputs(3..=3 + usize::from(extra > 0))?;
        let (n, c, hw) = dims(ctx, if synced { &[1, 3, 4, 5, 6] } else { &[1, 3, 4] })?;
        let (x, xd) = ctx.input_f32(0)?;
        let (_, scale) = ctx.input_f32(1)?;
        // Input `i`, of X's shape; `None` where it is already in an output
        // (see `in_place`).
        let own = |i: usize| -> Result<Option<&[f32]>> {
            let pair = self.pairs.iter().any(|&(t, _)| t == i);
            match ctx.in_place_input(i) {
                None if pair => Ok(None),
                _ => {
                    let (t, d) = ctx.input_f32(i)?;
                    if t.shape() != x.shape() {
                        return Err(Error::shape(ctx.input_name(i), x.shape().to_string(), t.shape()));
                    }
                    Ok(Some(d))
                }
            }
        };
        // Input 2: dY, fused dR, or dR's first term; fused, R (and the second term).
        let input2 = own(2)?;
        let r_in = match self.fused {
            Fused::Nothing => None,
            _ => own(if synced { 7 } else { 5 })?,
        };
        let second = match self.fused {
            Fused::SumRelu => Some(own(inputs - 1)?),
            _ => None,
        };
        let (_, mean) = ctx.input_f32(3)?;
        let (_, s) = ctx.input_f32(4)?;
        let inv_std: Vec<f32> = if self.p.is_test {
            s.iter().map(|&v| 1.0 / (v + self.p.epsilon).sqrt()).collect()
        } else {
            s.to_vec()
        };
        // dbias = Σ dY, dscale = Σ dY·x̂ per channel: given when synced (over
        // every batch), else summed below.
        let given = if synced {
            let (_, ds) = ctx.input_f32(5)?;
            let (_, db) = ctx.input_f32(6)?;
            let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
            Some((wide(ds), wide(db)))
        } else {
            None
        };
        let (names, input_names) = (&ctx.def().output, &ctx.def().input);
        // Where each input in place lies: (input, output).
        let pairs = &self.pairs;
        let dr = match (self.fused, second) {
            (Fused::SumRelu, Some(b)) => Some(Dr::Sum(
                Src::of(input2, pairs.contains(&(2, 3))),
                Src::of(b, pairs.contains(&(inputs - 1, 3))),
            )),
            (Fused::Relu, _) => Some(Dr::One(input2)),
            _ => None,
        };
        let outs = ctx.outputs();
        let (outs, masked) = outs.split_at_mut(3);
        let dx = writable(
            outs[0],
            &names[0],
            x.shape(),
            dr.as_ref().is_some_and(Dr::reads_dx),
        )?;
        // dY as given, or fused, made here from dR and R (and written to
        // output 3 if there is one; a term in place there keeps its data).
        let mut grad = match (r_in, dr, input2) {
            (Some(r), Some(dr), _) => Grad::Fused {
                dy: match masked.first_mut() {
                    Some(t) => Some(writable(t, &names[3], x.shape(), dr.reads_dy())?),
                    None => None,
                },
                r,
                dr,
            },
            (None, _, Some(dy)) => Grad::Given(dy),
            _ => {
                return Err(Error::MissingBlob {
                    name: input_names[2].clone(),
                })
            }
        };
        // (A term in place in dY is declared only where dY is an output.)
        let missing_dy = || Error::MissingBlob {
            name: input_names[2].clone(),
        };
        // dY's plane when output 3 is not kept, and dR's when it is a sum.
        let fused = self.fused != Fused::Nothing;
        let mut plane = vec![0.0f32; if fused { hw } else { 0 }];
        let mut sum = vec![0.0f32; if self.fused == Fused::SumRelu { hw } else { 0 }];
        let (mut dscale, mut dbias) = given.unwrap_or_else(|| (vec![0.0f64; c], vec![0.0f64; c]));
        let count = (self.p.num_batches * n * hw) as f32;
        // Pass 1 visits planes out of memory order: what it reads of the next
        // plane is asked for while it works on this one (`prefetch`).
        let reads = grad.reads(xd, dx.as_ptr());
        let mut upcoming = channel_groups(n, c, hw).flat_map(|g| planes(n, c, hw, g)).skip(1);
        for chans in channel_groups(n, c, hw) {
            // Pass 1: dY (fused), and unless given, the channels' sums.
            for (ch, at) in planes(n, c, hw, chans.clone()) {
                if let Some((_, next)) = upcoming.next() {
                    for &t in &reads {
                        prefetch::lines(t.wrapping_add(next.start), next.len());
                    }
                }
                let gp: &[f32] = match &mut grad {
                    Grad::Given(dy) => &dy[at.clone()],
                    Grad::Fused { dy, r, dr } => {
                        // dR's plane is read before dX's is written (pass 2),
                        // and its terms' before dY's.
                        let drp = dr
                            .plane(isa, at.clone(), dx, dy.as_deref(), &mut sum)
                            .ok_or_else(missing_dy)?;
                        let dp = match dy {
                            Some(dy) => &mut dy[at.clone()],
                            None => &mut plane[..],
                        };
                        mask(isa, dp, &r[at.clone()], drp);
                        dp
                    }
                };
                if !synced {
                    let (sb, sgx) = backprop_sums(isa, gp, &xd[at], mean[ch], inv_std[ch]);
                    dbias[ch] += sb;
                    dscale[ch] += sgx;
                }
            }
            // Pass 2: dX, from dY (or dR and R again) and X while the group's
            // planes are in cache.
            for (ch, at) in planes(n, c, hw, chans) {
                let gp: &[f32] = match &grad {
                    Grad::Given(dy) => &dy[at.clone()],
                    Grad::Fused { dy: Some(dy), .. } => &dy[at.clone()],
                    Grad::Fused { dy: None, r, dr } => {
                        let drp = dr
                            .plane(isa, at.clone(), dx, None, &mut sum)
                            .ok_or_else(missing_dy)?;
                        mask(isa, &mut plane, &r[at.clone()], drp);
                        &plane
                    }
                };
                let (m, is, sc) = (mean[ch], inv_std[ch], scale[ch]);
                let dxp = &mut dx[at.clone()];
                if self.p.is_test {
                    test_dx(isa, dxp, gp, sc, is);
                } else {
                    let (db, ds) = (dbias[ch] as f32 / count, dscale[ch] as f32 / count);
                    let k = Channel {
                        mean: m,
                        inv_std: is,
                        scale: sc,
                        db,
                        ds,
                    };
                    train_dx(isa, dxp, gp, &xd[at], k);
                }
            }
        }
        // Synced: this batch's share; the all-reduce of parameter gradients adds
        // the shares of every batch back into the whole.
        let share = 1.0 / self.p.num_batches as f64;
        let to32 = |v: &[f64]| v.iter().map(|&x| (x * share) as f32).collect::<Vec<_>>();
        outs[1]
            .resize::<f32>(Shape::from([c]))
            .map_err(|e| e.with_blob(&names[1]))?
            .copy_from_slice(&to32(&dscale));
        outs[2]
            .resize::<f32>(Shape::from([c]))
            .map_err(|e| e.with_blob(&names[2]))?
            .copy_from_slice(&to32(&dbias));
        Ok(())
    }
}

/// Output `t` (blob `name`) as `shape`, for writing; if it `holds` an input
/// in place, with that input's data (it must have `shape` already).
fn writable<'t>(t: &'t mut Tensor, name: &str, shape: &Shape, holds: bool) -> Result<&'t mut [f32]> {
    if !holds {
        return t.resize::<f32>(shape.clone()).map_err(|e| e.with_blob(name));
    }
    if t.shape() != shape {
        return Err(Error::shape(name, shape.to_string(), t.shape()));
    }
    t.data_mut::<f32>().map_err(|e| e.for_blob(name))
}

/// A running statistic's elements, updated in place: `c` of them, or an error.
fn running_stat<'t>(t: &'t mut Tensor, name: &str, c: usize) -> Result<&'t mut [f32]> {
    let r = t.data_mut::<f32>().map_err(|e| e.for_blob(name))?;
    if r.len() != c {
        return Err(Error::value(
            name,
            format!("running statistic must hold {c} values"),
        ));
    }
    Ok(r)
}

/// A batch norm gradient's dY: an input, or fused, made from the relu's dR
/// and output R, and written to `dy` if the fused op keeps it (else made a
/// plane at a time, twice).
enum Grad<'a> {
    Given(&'a [f32]),
    Fused {
        dy: Option<&'a mut [f32]>,
        r: &'a [f32],
        dr: Dr<'a>,
    },
}

impl Grad<'_> {
    /// Where the tensors pass 1 reads start: X, and dY or R and dR's terms
    /// (a term held in place in dX's blob, at `dx`, or in dY's).
    fn reads(&self, x: &[f32], dx: *const f32) -> SmallVec<[*const f32; 4]> {
        let mut at: SmallVec<[*const f32; 4]> = smallvec![x.as_ptr()];
        match self {
            Grad::Given(dy) => at.push(dy.as_ptr()),
            Grad::Fused { dy, r, dr } => {
                at.push(r.as_ptr());
                let terms = match dr {
                    Dr::One(d) => [Some(d.map_or(Src::Dx, Src::Own)), None],
                    Dr::Sum(a, b) => [Some(*a), Some(*b)],
                };
                at.extend(terms.into_iter().flatten().filter_map(|t| match t {
                    Src::Own(d) => Some(d.as_ptr()),
                    Src::Dx => Some(dx),
                    Src::Dy => dy.as_deref().map(<[f32]>::as_ptr),
                }));
            }
        }
        at
    }
}

/// A fused gradient's dR: a blob (its own, or `None`: already in dX's), or
/// the sum of two terms.
enum Dr<'a> {
    One(Option<&'a [f32]>),
    Sum(Src<'a>, Src<'a>),
}

/// Where a term of dR's sum lies: its own blob, or an output's.
#[derive(Clone, Copy)]
enum Src<'a> {
    Own(&'a [f32]),
    Dx,
    Dy,
}

impl Dr<'_> {
    /// Whether some of dR lies in dX's blob.
    fn reads_dx(&self) -> bool {
        match self {
            Dr::One(d) => d.is_none(),
            Dr::Sum(a, b) => [a, b].iter().any(|s| matches!(s, Src::Dx)),
        }
    }

    /// Whether a term of dR lies in dY's blob.
    fn reads_dy(&self) -> bool {
        matches!(self, Dr::Sum(a, b) if [a, b].iter().any(|s| matches!(s, Src::Dy)))
    }

    /// dR's plane `at`, where it lies or added into `sum`; `dx` and `dy` hold
    /// what lies in them (`None` if a term lies in a `dy` that is not there).
    fn plane<'p>(
        &'p self,
        isa: Isa,
        at: Range<usize>,
        dx: &'p [f32],
        dy: Option<&[f32]>,
        sum: &'p mut [f32],
    ) -> Option<&'p [f32]> {
        match self {
            Dr::One(d) => Some(d.map_or(&dx[at.clone()], |d| &d[at])),
            Dr::Sum(a, b) => {
                add(isa, sum, a.plane(&at, dx, dy)?, b.plane(&at, dx, dy)?);
                Some(sum)
            }
        }
    }
}

impl<'a> Src<'a> {
    /// An input's data, or where it lies when it is in place (`None`): dY's
    /// blob if `in_dy`, else dX's.
    fn of(d: Option<&'a [f32]>, in_dy: bool) -> Src<'a> {
        match d {
            Some(d) => Src::Own(d),
            None if in_dy => Src::Dy,
            None => Src::Dx,
        }
    }

    /// Plane `at` of the term.
    fn plane<'p>(self, at: &Range<usize>, dx: &'p [f32], dy: Option<&'p [f32]>) -> Option<&'p [f32]>
    where
        'a: 'p,
    {
        match self {
            Src::Own(d) => Some(&d[at.clone()]),
            Src::Dx => Some(&dx[at.clone()]),
            Src::Dy => dy.map(|d| &d[at.clone()]),
        }
    }
}

/// Elements of each tensor a batch norm gradient's channel group spans (128
/// KiB of f32): it passes over a group's planes twice (sums, then dX), and
/// the second pass finds them in L2. (Its inputs were written long before, so
/// the first pass reads them from L3 or memory, and a second pass over the
/// whole tensor would too.)
const GROUP_ELEMS: usize = 32 << 10;

/// The channels of an `[N, C, H·W]` tensor in groups of about
/// [`GROUP_ELEMS`] elements (at least one channel a group).
fn channel_groups(n: usize, c: usize, hw: usize) -> impl Iterator<Item = Range<usize>> {
    let k = (GROUP_ELEMS / (n * hw).max(1)).clamp(1, c.max(1));
    (0..c).step_by(k).map(move |c0| c0..(c0 + k).min(c))
}

/// `(channel, elements)` of the planes of channels `chans`, image by image
/// (so each channel's planes come in the order the sums have always used).
fn planes(n: usize, c: usize, hw: usize, chans: Range<usize>) -> impl Iterator<Item = (usize, Range<usize>)> {
    (0..n).flat_map(move |b| {
        chans
            .clone()
            .map(move |ch| (ch, (b * c + ch) * hw..(b * c + ch + 1) * hw))
    })
}

/// Per channel `(Σ dY·x̂, Σ dY)` of one batch, `x̂ = (x − mean)·inv_std`.
fn backprop_stats(
    xd: &[f32],
    dyd: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    c: usize,
    hw: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut dbias = vec![0.0f64; c];
    let mut dscale = vec![0.0f64; c];
    let isa = Isa::best();
    for (i, (gp, xp)) in dyd
        .chunks_exact(hw.max(1))
        .zip(xd.chunks_exact(hw.max(1)))
        .enumerate()
    {
        let (sb, sgx) = backprop_sums(isa, gp, xp, mean[i % c], inv_std[i % c]);
        dbias[i % c] += sb;
        dscale[i % c] += sgx;
    }
    (dscale, dbias)
}

/// A plane's `(Σ dY, Σ dY·x̂)`, `x̂ = (x − mean)·inv_std`.
fn backprop_sums(isa: Isa, dy: &[f32], x: &[f32], mean: f32, inv_std: f32) -> (f64, f64) {
    let (sb, sgx) = plane_sums(isa, dy, x, 0.0, mean);
    (sb, f64::from(inv_std) * sgx)
}

/// `ChannelStats(X) → (Σx, Σx²)` per channel of an `[N, C, …]` tensor: one
/// batch's part of a synchronous batch norm's statistics.
pub struct ChannelStats;

impl Kernel for ChannelStats {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(1..=1)?;
        ctx.expect_outputs(2..=2)?;
        let (_, c, hw) = dims(ctx, &[])?;
        let (_, xd) = ctx.input_f32(0)?;
        let mut sum = vec![0.0f64; c];
        let mut sq = vec![0.0f64; c];
        let isa = Isa::best();
        for (i, plane) in xd.chunks_exact(hw.max(1)).enumerate() {
            let (s, q) = plane_sums(isa, plane, plane, 0.0, 0.0);
            sum[i % c] += s;
            sq[i % c] += q;
        }
        for (o, v) in [(0, &sum), (1, &sq)] {
            let out = ctx.resize_output::<f32>(o, [c])?;
            for (o, &s) in out.iter_mut().zip(v.iter()) {
                *o = s as f32;
            }
        }
        Ok(())
    }
}

/// `ChannelBackpropStats(X, mean, inv_std, dY) → (Σ dY·x̂, Σ dY)` per channel:
/// one batch's part of a synchronous batch norm's scale and bias gradients.
pub struct ChannelBackpropStats;

impl Kernel for ChannelBackpropStats {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(4..=4)?;
        ctx.expect_outputs(2..=2)?;
        let (_, c, hw) = dims(ctx, &[1, 2])?;
        let (x, xd) = ctx.input_f32(0)?;
        let (_, mean) = ctx.input_f32(1)?;
        let (_, inv_std) = ctx.input_f32(2)?;
        let (dy, dyd) = ctx.input_f32(3)?;
        if dy.shape() != x.shape() {
            return Err(Error::shape(ctx.input_name(3), x.shape().to_string(), dy.shape()));
        }
        let (dscale, dbias) = backprop_stats(xd, dyd, mean, inv_std, c, hw);
        for (o, v) in [(0, &dscale), (1, &dbias)] {
            let out = ctx.resize_output::<f32>(o, [c])?;
            for (o, &s) in out.iter_mut().zip(v.iter()) {
                *o = s as f32;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::isa::testing::{portable, same_bits, same_bits_into, values, Writes, LENGTHS};

    #[test]
    fn every_instruction_set_gives_the_portable_bits() {
        for n in LENGTHS {
            let (a, b, c) = (values(n, 1), values(n, 2), values(n, 3));
            let sums = |isa: Isa| {
                let (s, p) = plane_sums(isa, &a, &b, 0.25, -0.5);
                // f64 bits as two f32 halves, for `same_bits`.
                [s, p]
                    .iter()
                    .flat_map(|v| [(v.to_bits() >> 32) as u32, v.to_bits() as u32])
                    .map(f32::from_bits)
                    .collect::<Vec<f32>>()
            };
            same_bits("plane sums", &sums(portable()), sums);
            let k = Channel {
                mean: 0.3,
                inv_std: 1.7,
                scale: -0.9,
                db: 0.05,
                ds: -0.2,
            };
            let cases: [(&str, Writes<'_>); 4] = [
                ("affine", &|isa, y| affine(isa, y, &a, 1.3, -0.4)),
                ("mask", &|isa, y| mask(isa, y, &a, &b)),
                ("training dX", &|isa, y| train_dx(isa, y, &b, &c, k)),
                ("inference dX", &|isa, y| test_dx(isa, y, &b, -0.9, 1.7)),
            ];
            for (what, f) in cases {
                same_bits_into(what, n, f);
            }
        }
    }

    #[test]
    fn the_first_pass_prefetches_every_tensor_it_reads_wherever_it_lies() {
        let (x, dy, r, a, b) = ([0.0f32; 4], [0.0f32; 4], [0.0f32; 4], [0.0f32; 4], [0.0f32; 4]);
        let (mut dx, mut own_dy) = ([0.0f32; 4], [0.0f32; 4]);
        let dxp = dx.as_mut_ptr().cast_const();
        let dyp = own_dy.as_ptr();
        let reads = |g: &Grad<'_>| g.reads(&x, dxp).to_vec();
        assert_eq!(reads(&Grad::Given(&dy)), [x.as_ptr(), dy.as_ptr()]);
        let fused = |dy, dr| Grad::Fused { dy, r: &r, dr };
        assert_eq!(
            reads(&fused(None, Dr::One(Some(&a)))),
            [x.as_ptr(), r.as_ptr(), a.as_ptr()]
        );
        assert_eq!(reads(&fused(None, Dr::One(None))), [x.as_ptr(), r.as_ptr(), dxp]);
        assert_eq!(
            reads(&fused(None, Dr::Sum(Src::Own(&a), Src::Own(&b)))),
            [x.as_ptr(), r.as_ptr(), a.as_ptr(), b.as_ptr()]
        );
        assert_eq!(
            reads(&fused(Some(&mut own_dy), Dr::Sum(Src::Dx, Src::Dy))),
            [x.as_ptr(), r.as_ptr(), dxp, dyp]
        );
        // A term in a dY that is not kept is nowhere to prefetch.
        assert_eq!(
            reads(&fused(None, Dr::Sum(Src::Dy, Src::Own(&b)))),
            [x.as_ptr(), r.as_ptr(), b.as_ptr()]
        );
    }

    #[test]
    fn channel_groups_cover_every_plane_once_in_each_channels_order() {
        // (n, c, hw): one group, groups with a short last one, a channel a group.
        for (n, c, hw) in [
            (2, 7, 16),
            (4, 5, 4096),
            (40, 3, 1024),
            (3, 0, 8),
            (1, 4, 1 << 16),
        ] {
            let mut seen = vec![0usize; n * c * hw];
            let mut last = vec![None; c];
            let groups: Vec<_> = channel_groups(n, c, hw).collect();
            for g in &groups {
                assert!(!g.is_empty());
                let size = n * g.len() * hw;
                // At most GROUP_ELEMS, unless one channel alone is larger.
                assert!(size <= GROUP_ELEMS || g.len() == 1, "{g:?} of {n}×{c}×{hw}");
                for (ch, at) in planes(n, c, hw, g.clone()) {
                    assert!(g.contains(&ch) && at.len() == hw);
                    assert_eq!((at.start / hw) % c, ch);
                    // Image by image within a channel.
                    assert!(last[ch].is_none_or(|l| l < at.start));
                    last[ch] = Some(at.start);
                    for e in at {
                        seen[e] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{n}×{c}×{hw}");
            assert!(groups.into_iter().flatten().eq(0..c));
        }
    }
}
