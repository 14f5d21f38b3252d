//! In-process collectives over buffers in shared memory.
//!
//! The all-reduce is bandwidth-optimal: the buffers are cut into one slice per
//! thread; each thread sums its slice across all buffers (in device order, so
//! every replica gets the same bits) and writes the sum back to every buffer, a
//! cache-sized block at a time, so each byte is read once and written once.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::graph::Args;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;
use crate::tensor::{flat, Tensor};

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
    let threads = crate::exec::cores().min(bufs.len().max(2));
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

/// Checks the blobs of each tensor (one per device) have one shape.
pub(crate) fn same_shapes(ctx: &mut OpContext<'_>, devices: usize) -> Result<()> {
    for first in (0..ctx.num_outputs()).step_by(devices) {
        let shape = ctx.output(first).shape().clone();
        for o in first + 1..first + devices {
            let t = ctx.output(o);
            if t.shape() != &shape {
                let got = t.shape().clone();
                return Err(Error::shape(ctx.output_name(o), shape.to_string(), &got));
            }
        }
    }
    Ok(())
}

/// Devices per tensor of a collective over `num_tensors` tensors (default 1):
/// its blobs are tensor-major, `[t0@d0, t0@d1, …, t1@d0, …]`, so several
/// tensors travel in one op (the gradient buckets across hosts).
pub(crate) fn devices_per_tensor(op: &OperatorDef) -> Result<usize> {
    let k = Args(&op.arg).usize("num_tensors", 1)?;
    if k == 0 || !op.input.len().is_multiple_of(k) {
        return Err(Error::arg(
            "num_tensors",
            format!(
                "{k} does not divide the {} blobs into one per device",
                op.input.len()
            ),
        ));
    }
    Ok(op.input.len() / k)
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
pub struct Allreduce(AllreduceSpec);

/// What an all-reduce op says (the in-process, MPI and NCCL kernels read it
/// alike): its in-place pairs, devices per tensor, and whether it averages.
pub(crate) struct AllreduceSpec {
    pub pairs: Vec<(usize, usize)>,
    pub devices: usize,
    pub average: bool,
    /// Whether the op has packed its tensors into flat buffers (once: should a
    /// producer keep replacing a gradient's storage, the op does not copy the
    /// bucket every step, it reduces tensor by tensor).
    pub packed: AtomicBool,
}

/// Parses and checks an all-reduce op: in place over one blob per device (per
/// tensor).
pub(crate) fn allreduce_spec(op: &OperatorDef) -> Result<AllreduceSpec> {
    Ok(AllreduceSpec {
        pairs: in_place_pairs(op)?,
        devices: devices_per_tensor(op)?,
        average: Args(&op.arg).int("average", 0)? != 0,
        packed: AtomicBool::new(false),
    })
}

impl Allreduce {
    /// Checks the op is in place over one blob per device (per tensor).
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Allreduce(allreduce_spec(op)?)))
    }
}

/// Sums each tensor over this process's devices, in place (every device's blob
/// gets the sum, times `scale`).
///
/// A bucket (several tensors) whose tensors lie end to end in one flat buffer
/// per device is reduced as one buffer; otherwise tensor by tensor, after which
/// the tensors are packed into such buffers (the first time, see
/// [`AllreduceSpec::packed`]). Either way each element is summed in device
/// order, so the bits are the same.
pub(crate) fn reduce_local(ctx: &mut OpContext<'_>, spec: &AllreduceSpec, scale: f32) -> Result<()> {
    let devices = spec.devices;
    same_shapes(ctx, devices)?;
    let n = ctx.num_outputs();
    let bucket = n / devices > 1;
    if bucket {
        let mut per_device = by_device(ctx.outputs(), devices);
        let flat: Option<Vec<&mut [f32]>> = per_device.iter_mut().map(|ts| flat::contiguous(ts)).collect();
        if let Some(mut bufs) = flat {
            allreduce_in_place(&mut bufs, scale);
            return Ok(());
        }
    }
    let names = &ctx.def().output[..n];
    for (outs, names) in ctx.outputs().chunks_mut(devices).zip(names.chunks(devices)) {
        let mut bufs = Vec::with_capacity(devices);
        for (t, name) in outs.iter_mut().zip(names) {
            bufs.push(t.data_mut::<f32>().map_err(|e| e.for_blob(name))?);
        }
        allreduce_in_place(&mut bufs, scale);
    }
    if bucket && !spec.packed.swap(true, Ordering::Relaxed) {
        for mut ts in by_device(ctx.outputs(), devices) {
            flat::pack(&mut ts);
        }
    }
    Ok(())
}

/// A collective's tensors (tensor-major: `[t0@d0, t0@d1, …, t1@d0, …]`) per
/// device, each device's in tensor order.
fn by_device<'a>(outs: &'a mut [&mut Tensor], devices: usize) -> Vec<Vec<&'a mut Tensor>> {
    let mut per: Vec<Vec<&'a mut Tensor>> = (0..devices).map(|_| Vec::new()).collect();
    for (i, t) in outs.iter_mut().enumerate() {
        per[i % devices].push(&mut **t);
    }
    per
}

impl Kernel for Allreduce {
    fn in_place(&self) -> &[(usize, usize)] {
        &self.0.pairs
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let scale = if self.0.average {
            1.0 / self.0.devices as f32
        } else {
            1.0
        };
        reduce_local(ctx, &self.0, scale)
    }
}

/// `Broadcast(x_0, …, x_n) → (x_0, …, x_n)`: every `x_i` becomes a copy of
/// `x_root` (any element type; shapes follow the root).
pub struct Broadcast(BroadcastSpec);

/// What a `Broadcast` op says: its in-place pairs, devices per tensor, and the
/// root device.
pub(crate) struct BroadcastSpec {
    pub pairs: Vec<(usize, usize)>,
    pub devices: usize,
    pub root: usize,
}

impl Broadcast {
    /// Checks the op is in place and `root` names one of its devices.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Broadcast(broadcast_spec(op)?)))
    }
}

/// Parses and checks a `Broadcast` op.
pub(crate) fn broadcast_spec(op: &OperatorDef) -> Result<BroadcastSpec> {
    let pairs = in_place_pairs(op)?;
    let devices = devices_per_tensor(op)?;
    let root = Args(&op.arg).usize("root", 0)?;
    if root >= devices {
        return Err(Error::arg(
            "root",
            format!("{root} is not below the {devices} devices"),
        ));
    }
    Ok(BroadcastSpec { pairs, devices, root })
}

/// Copies each tensor's `root` blob to its other devices.
pub(crate) fn broadcast_local(ctx: &mut OpContext<'_>, devices: usize, root: usize) -> Result<()> {
    for group in ctx.outputs().chunks_mut(devices) {
        let (before, rest) = group.split_at_mut(root);
        let (root, after) = rest.split_first_mut().expect("root < devices");
        for t in before.iter_mut().chain(after.iter_mut()) {
            t.copy_from(root)?;
        }
    }
    Ok(())
}

impl Kernel for Broadcast {
    fn in_place(&self) -> &[(usize, usize)] {
        &self.0.pairs
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        broadcast_local(ctx, self.0.devices, self.0.root)
    }
}
