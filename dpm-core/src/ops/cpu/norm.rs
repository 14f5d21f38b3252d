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

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;
use crate::tensor::Shape;

use super::elementwise::{relu, relu_grad, same_shape};

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
        let (mean, inv_std): (Vec<f32>, Vec<f32>) = if self.p.is_test {
            let (_, m) = ctx.input_f32(3)?;
            let (_, v) = ctx.input_f32(4)?;
            (
                m.to_vec(),
                v.iter().map(|&v| 1.0 / (v + self.p.epsilon).sqrt()).collect(),
            )
        } else {
            if count == 0.0 {
                return Err(Error::shape(ctx.input_name(0), "a non-empty batch", x.shape()));
            }
            let (shift, sum, sq) = if synced {
                // Σx and Σx² of every batch: the moments about 0.
                let (_, s) = ctx.input_f32(5)?;
                let (_, q) = ctx.input_f32(6)?;
                let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
                (vec![0.0f32; c], wide(s), wide(q))
            } else {
                // One pass for the moments of x − shift, shift = the channel's first
                // sample: no cancellation however large the mean is against the spread.
                let shift: Vec<f32> = (0..c).map(|ch| xd[ch * hw]).collect();
                let mut sum = vec![0.0f64; c];
                let mut sq = vec![0.0f64; c];
                for (i, plane) in xd.chunks_exact(hw.max(1)).enumerate() {
                    let sh = shift[i % c];
                    let (s, q) = plane_sums(plane, plane, sh, sh);
                    sum[i % c] += s;
                    sq[i % c] += q;
                }
                (shift, sum, sq)
            };
            let shifted: Vec<f64> = sum.iter().map(|s| s / count).collect();
            let var: Vec<f64> = sq
                .iter()
                .zip(&shifted)
                .map(|(q, m)| (q / count - m * m).max(0.0))
                .collect();
            let mean: Vec<f64> = shifted
                .iter()
                .zip(&shift)
                .map(|(m, &s)| m + f64::from(s))
                .collect();
            let names = [ctx.output_name(1).to_owned(), ctx.output_name(2).to_owned()];
            let mom = f64::from(self.p.momentum);
            // The running variance is the unbiased estimate (n / (n − 1)), as in
            // Caffe2 and PyTorch; the batch is normalised with the biased one.
            let unbias = if count > 1.0 { count / (count - 1.0) } else { 1.0 };
            let unbiased: Vec<f64> = var.iter().map(|v| v * unbias).collect();
            for (o, stat) in [(1, &mean), (2, &unbiased)] {
                let r = ctx.output_data::<f32>(o)?;
                if r.len() != c {
                    return Err(Error::value(
                        &names[o - 1],
                        format!("running statistic must hold {c} values"),
                    ));
                }
                for (r, &s) in r.iter_mut().zip(stat.iter()) {
                    *r = (mom * f64::from(*r) + (1.0 - mom) * s) as f32;
                }
            }
            let inv: Vec<f32> = var
                .iter()
                .map(|v| (1.0 / (v + f64::from(self.p.epsilon)).sqrt()) as f32)
                .collect();
            let mean: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
            ctx.resize_output::<f32>(3, [c])?.copy_from_slice(&mean);
            ctx.resize_output::<f32>(4, [c])?.copy_from_slice(&inv);
            (mean, inv)
        };
        let names = &ctx.def().output;
        let (y_t, rest) = ctx.outputs().split_first_mut().expect("≥ 1 output");
        let y = y_t.resize::<f32>(x.shape()).map_err(|e| e.with_blob(&names[0]))?;
        // The outputs after the batch norm's own: S (if summed), then R.
        let mut extras = rest[own - 1..]
            .iter_mut()
            .zip(&names[own..])
            .map(|(t, name)| t.resize::<f32>(x.shape()).map_err(|e| e.with_blob(name)));
        let (mut sum, mut r) = match self.then {
            Then::Nothing => (None, None),
            Then::Relu => (None, extras.next().transpose()?),
            Then::SumRelu => (extras.next().transpose()?, extras.next().transpose()?),
        };
        let hw1 = hw.max(1);
        for (i, (yp, xp)) in y.chunks_exact_mut(hw1).zip(xd.chunks_exact(hw1)).enumerate() {
            let ch = i % c;
            let a = scale[ch] * inv_std[ch];
            let b = bias[ch] - mean[ch] * a;
            for (y, &x) in yp.iter_mut().zip(xp) {
                *y = x * a + b;
            }
            let at = i * hw1..(i + 1) * hw1;
            // What the relu reads: Y, or the sum written here.
            let pre: &[f32] = match (sum.as_deref_mut(), other) {
                (Some(s), Some(o)) => {
                    let sp = &mut s[at.clone()];
                    for ((s, &y), &o) in sp.iter_mut().zip(&*yp).zip(&o[at.clone()]) {
                        *s = y + o;
                    }
                    sp
                }
                _ => yp,
            };
            if let Some(r) = r.as_deref_mut() {
                for (r, &v) in r[at].iter_mut().zip(pre) {
                    *r = relu(v);
                }
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
/// gradient dR, one more input (last) the relu's output R, and one more output
/// (last) dY = dR·[R > 0], each plane of which is summed while in cache.
pub struct SpatialBnGradient {
    p: Params,
    relu: bool,
}

impl SpatialBnGradient {
    /// Parses `is_test`, `epsilon`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(SpatialBnGradient {
            p: Params::parse(op)?,
            relu: false,
        }))
    }

    /// `ReluGradient+SpatialBNGradient(X, scale, dR, mean, inv_std, [Σ…], R) → (dX,
    /// dscale, dbias, dY)`.
    pub fn create_fused(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(SpatialBnGradient {
            p: Params::parse(op)?,
            relu: true,
        }))
    }
}

impl Kernel for SpatialBnGradient {
    /// Fused, dX may be dR's own blob (gradient memory shared: the relu's
    /// input gradient is dead once dY is made): dR is then read from dX, all
    /// of it before any of dX is written.
    fn in_place(&self) -> &[(usize, usize)] {
        if self.relu {
            &[(2, 0)]
        } else {
            &[]
        }
    }

    /// dR apart from dX is read where it is, not copied into dX first.
    fn reads_in_place_source(&self) -> bool {
        true
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let synced = !self.p.is_test && self.p.num_batches > 1;
        let extra = usize::from(self.relu);
        let inputs = if synced { 7 } else { 5 } + extra;
        ctx.expect_inputs(inputs..=inputs)?;
        ctx.expect_outputs(3 + extra..=3 + extra)?;
        let (n, c, hw) = dims(ctx, if synced { &[1, 3, 4, 5, 6] } else { &[1, 3, 4] })?;
        let (x, xd) = ctx.input_f32(0)?;
        let (_, scale) = ctx.input_f32(1)?;
        // dY, or fused, dR: `None` when dR is already in dX (see `in_place`).
        let dy_in = match ctx.in_place_input(2) {
            None if self.relu => None,
            _ => {
                let (dy, dyd) = ctx.input_f32(2)?;
                if dy.shape() != x.shape() {
                    return Err(Error::shape(ctx.input_name(2), x.shape().to_string(), dy.shape()));
                }
                Some(dyd)
            }
        };
        // Fused: input 2 is dR, and dY (output 3) is made from it and R.
        let relu_out = if self.relu {
            let (r, rd) = ctx.input_f32(inputs - 1)?;
            if r.shape() != x.shape() {
                return Err(Error::shape(
                    ctx.input_name(inputs - 1),
                    x.shape().to_string(),
                    r.shape(),
                ));
            }
            Some(rd)
        } else {
            None
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
        let outs = ctx.outputs();
        let (outs, masked) = outs.split_at_mut(3);
        let dyd = match dy_in {
            Some(d) => d,
            None => {
                let dr = &*outs[0];
                if dr.shape() != x.shape() {
                    return Err(Error::shape(&input_names[2], x.shape().to_string(), dr.shape()));
                }
                dr.data::<f32>().map_err(|e| e.for_blob(&input_names[2]))?
            }
        };
        // Fused: dY = dR·[R > 0], a plane at a time, each summed while in cache.
        let mut dy_fused = match (relu_out, masked.first_mut()) {
            (Some(rd), Some(t)) => {
                let dy = t.resize::<f32>(x.shape()).map_err(|e| e.with_blob(&names[3]))?;
                Some((dy, rd))
            }
            _ => None,
        };
        let hw1 = hw.max(1);
        let (dscale, dbias) = if let Some(given) = given {
            if let Some((dy, rd)) = dy_fused.as_mut() {
                for ((d, &r), &g) in dy.iter_mut().zip(*rd).zip(dyd) {
                    *d = relu_grad(r, g);
                }
            }
            given
        } else {
            let mut dbias = vec![0.0f64; c];
            let mut dscale = vec![0.0f64; c];
            match dy_fused.as_mut() {
                Some((dy, rd)) => {
                    let planes = dy.chunks_exact_mut(hw1).zip(rd.chunks_exact(hw1));
                    for (i, ((dp, rp), (gp, xp))) in planes
                        .zip(dyd.chunks_exact(hw1).zip(xd.chunks_exact(hw1)))
                        .enumerate()
                    {
                        for ((d, &r), &g) in dp.iter_mut().zip(rp).zip(gp) {
                            *d = relu_grad(r, g);
                        }
                        add_plane_stats(i, dp, xp, mean, &inv_std, &mut dscale, &mut dbias);
                    }
                }
                None => {
                    for (i, (gp, xp)) in dyd.chunks_exact(hw1).zip(xd.chunks_exact(hw1)).enumerate() {
                        add_plane_stats(i, gp, xp, mean, &inv_std, &mut dscale, &mut dbias);
                    }
                }
            }
            (dscale, dbias)
        };
        // From here dY is read, never dR (whose blob may be dX's).
        let dyd: &[f32] = match &dy_fused {
            Some((dy, _)) => dy,
            None => dy_in.ok_or_else(|| Error::MissingBlob {
                name: input_names[2].clone(),
            })?,
        };
        let count = (self.p.num_batches * n * hw) as f32;
        let dx = outs[0]
            .resize::<f32>(x.shape())
            .map_err(|e| e.with_blob(&names[0]))?;
        for (i, ((dxp, gp), xp)) in dx
            .chunks_exact_mut(hw1)
            .zip(dyd.chunks_exact(hw1))
            .zip(xd.chunks_exact(hw1))
            .enumerate()
        {
            let ch = i % c;
            let (m, is, sc) = (mean[ch], inv_std[ch], scale[ch]);
            if self.p.is_test {
                for (d, &g) in dxp.iter_mut().zip(gp) {
                    *d = g * sc * is;
                }
            } else {
                let (db, ds) = (dbias[ch] as f32 / count, dscale[ch] as f32 / count);
                for ((d, &g), &x) in dxp.iter_mut().zip(gp).zip(xp) {
                    let xhat = (x - m) * is;
                    *d = sc * is * (g - db - xhat * ds);
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
    for (i, (gp, xp)) in dyd
        .chunks_exact(hw.max(1))
        .zip(xd.chunks_exact(hw.max(1)))
        .enumerate()
    {
        add_plane_stats(i, gp, xp, mean, inv_std, &mut dscale, &mut dbias);
    }
    (dscale, dbias)
}

/// Adds plane `i`'s `Σ dY·x̂` and `Σ dY` into its channel's sums.
fn add_plane_stats(
    i: usize,
    gp: &[f32],
    xp: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    dscale: &mut [f64],
    dbias: &mut [f64],
) {
    let ch = i % dbias.len();
    let (sb, sgx) = plane_sums(gp, xp, 0.0, mean[ch]);
    dbias[ch] += sb;
    dscale[ch] += f64::from(inv_std[ch]) * sgx;
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
        for (i, plane) in xd.chunks_exact(hw.max(1)).enumerate() {
            let (s, q) = plane_sums(plane, plane, 0.0, 0.0);
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
