//! In-process collectives over buffers in shared memory.
//!
//! The all-reduce is bandwidth-optimal: the buffers are cut into one slice per
//! thread; each thread sums its slice across all buffers (in device order, so
//! every replica gets the same bits) and writes the sum back to every buffer, a
//! cache-sized block at a time, so each byte is read once and written once.

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

/// Floats per block: the block of every buffer stays in L1/L2 between the sum
/// and the write-back.
const BLOCK: usize = 2048;
/// Below this many floats per buffer, one thread does it all (spawning costs more).
const PARALLEL_MIN: usize = 1 << 16;

/// Sums `bufs` elementwise and writes the sum (times `scale`) into every buffer.
/// All buffers must have the same length.
pub fn allreduce_in_place(bufs: &mut [&mut [f32]], scale: f32) {
    let Some(len) = bufs.first().map(|b| b.len()) else {
        return;
    };
    assert!(
        bufs.iter().all(|b| b.len() == len),
        "allreduce: buffers differ in length"
    );
    // With one core there is one slice, reduced on this thread.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(bufs.len().max(2));
    if len < PARALLEL_MIN {
        let mut slices: Vec<&mut [f32]> = bufs.iter_mut().map(|b| &mut **b).collect();
        reduce_slice(&mut slices, scale);
        return;
    }
    // Slice boundaries on BLOCK multiples keep blocks aligned within a slice.
    let per = len.div_ceil(threads).div_ceil(BLOCK) * BLOCK;
    let mut slices: Vec<Vec<&mut [f32]>> = (0..len.div_ceil(per)).map(|_| Vec::new()).collect();
    for b in bufs.iter_mut() {
        for (s, piece) in b.chunks_mut(per).enumerate() {
            slices[s].push(piece);
        }
    }
    std::thread::scope(|s| {
        let mut it = slices.into_iter();
        let mine = it.next();
        for mut group in it {
            s.spawn(move || reduce_slice(&mut group, scale));
        }
        if let Some(mut group) = mine {
            reduce_slice(&mut group, scale);
        }
    });
}

/// Reduces one slice of every buffer, block by block.
fn reduce_slice(group: &mut [&mut [f32]], scale: f32) {
    let Some((first, rest)) = group.split_first_mut() else {
        return;
    };
    let len = first.len();
    let mut start = 0;
    while start < len {
        let end = (start + BLOCK).min(len);
        let acc = &mut first[start..end];
        // One fused pass for the common device counts; pairwise passes otherwise.
        // The sum order (device 0, 1, 2, …) is the same either way.
        match rest {
            [b] => acc.iter_mut().zip(&b[start..end]).for_each(|(a, &x)| *a += x),
            [b, c] => {
                for ((a, &x), &y) in acc.iter_mut().zip(&b[start..end]).zip(&c[start..end]) {
                    *a = *a + x + y;
                }
            }
            [b, c, d] => {
                let others = b[start..end].iter().zip(&c[start..end]).zip(&d[start..end]);
                for (a, ((&x, &y), &z)) in acc.iter_mut().zip(others) {
                    *a = *a + x + y + z;
                }
            }
            _ => {
                for other in rest.iter() {
                    for (a, &b) in acc.iter_mut().zip(&other[start..end]) {
                        *a += b;
                    }
                }
            }
        }
        if scale != 1.0 {
            acc.iter_mut().for_each(|a| *a *= scale);
        }
        for other in rest.iter_mut() {
            other[start..end].copy_from_slice(acc);
        }
        start = end;
    }
}

pub(crate) fn same_shapes(ctx: &mut OpContext<'_>) -> Result<()> {
    let shape = ctx.output(0).shape().clone();
    for o in 1..ctx.num_outputs() {
        let t = ctx.output(o);
        if t.shape() != &shape {
            let got = t.shape().clone();
            return Err(Error::shape(ctx.output_name(o), shape.to_string(), &got));
        }
    }
    Ok(())
}

pub(crate) fn in_place_pairs(op: &OperatorDef) -> Result<Vec<(usize, usize)>> {
    if op.input.is_empty() || op.input != op.output {
        return Err(Error::arg(
            "input/output",
            "a collective takes one blob per device and writes the same blobs in place",
        ));
    }
    Ok((0..op.input.len()).map(|i| (i, i)).collect())
}

/// `Allreduce(x_0, …, x_n) → (x_0, …, x_n)`: every `x_i` becomes the sum over
/// devices (the mean with `average = 1`).
pub struct Allreduce {
    pairs: Vec<(usize, usize)>,
    average: bool,
}

impl Allreduce {
    /// Checks the op is in place over one blob per device.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Allreduce {
            pairs: in_place_pairs(op)?,
            average: Args(&op.arg).int("average", 0)? != 0,
        }))
    }
}

impl Kernel for Allreduce {
    fn in_place(&self) -> &[(usize, usize)] {
        &self.pairs
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        same_shapes(ctx)?;
        let n = ctx.num_outputs();
        let names: Vec<String> = (0..n).map(|o| ctx.output_name(o).to_owned()).collect();
        let mut bufs = Vec::with_capacity(n);
        for (t, name) in ctx.outputs().iter_mut().zip(&names) {
            let got = t.dtype();
            bufs.push(t.data_mut::<f32>().ok().ok_or_else(|| Error::DataTypeMismatch {
                blob: name.clone(),
                expected: crate::tensor::DataType::F32,
                got,
            })?);
        }
        let scale = if self.average { 1.0 / n as f32 } else { 1.0 };
        allreduce_in_place(&mut bufs, scale);
        Ok(())
    }
}

/// `Broadcast(x_0, …, x_n) → (x_0, …, x_n)`: every `x_i` becomes a copy of
/// `x_root` (any element type; shapes follow the root).
pub struct Broadcast {
    pairs: Vec<(usize, usize)>,
    root: usize,
}

impl Broadcast {
    /// Checks the op is in place and `root` names one of its blobs.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        let pairs = in_place_pairs(op)?;
        let root = Args(&op.arg).usize("root", 0)?;
        if root >= pairs.len() {
            return Err(Error::arg(
                "root",
                format!("{root} is not below the {} devices", pairs.len()),
            ));
        }
        Ok(Box::new(Broadcast { pairs, root }))
    }
}

impl Kernel for Broadcast {
    fn in_place(&self) -> &[(usize, usize)] {
        &self.pairs
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let outs = ctx.outputs();
        let (before, rest) = outs.split_at_mut(self.root);
        let (root, after) = rest.split_first_mut().expect("root < len");
        for t in before.iter_mut().chain(after.iter_mut()) {
            t.copy_from(root)?;
        }
        Ok(())
    }
}
