//! Ops whose CUDA kernel is their CPU kernel: fills (drawn on the host with the
//! CPU generator, then copied to the device, so CPU and CUDA replicas start from
//! the same parameters), host-side counters (`Iter`, `LearningRate`: Caffe2 keeps
//! them on the host too) and the shape ops and copies, which only move whole
//! tensors and so work on any device.

use std::sync::OnceLock;

use super::op_gpu;
use crate::error::Result;
use crate::graph::DeviceType;
use crate::ops::{Kernel, OpContext, Registry};
use crate::proto::OperatorDef;
use crate::tensor::Tensor;

/// The CPU kernels, apart from the global registry (whose lock is held while a
/// CUDA kernel is created).
fn cpu_kernel(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
    static CPU: OnceLock<Registry> = OnceLock::new();
    CPU.get_or_init(|| {
        let mut r = Registry::default();
        crate::ops::cpu::register(&mut r);
        r
    })
    .create(op, DeviceType::Cpu)
}

/// The CPU kernel, run as is.
pub(super) fn on_host(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
    cpu_kernel(op)
}

/// The CPU kernel writing host tensors, which are then copied to the op's GPU.
pub(super) fn uploaded(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(Uploaded(cpu_kernel(op)?)))
}

struct Uploaded(Box<dyn Kernel>);

impl Kernel for Uploaded {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let gpu = op_gpu(ctx)?;
        let mut host: Vec<Tensor> = (0..ctx.num_outputs()).map(|_| Tensor::default()).collect();
        {
            let inner = OpContext::new(ctx.def(), ctx.input_refs(), host.iter_mut().collect());
            let mut inner = inner.on(ctx.device(), ctx.threads());
            self.0.run(&mut inner)?;
        }
        for (o, t) in host.into_iter().enumerate() {
            *ctx.output(o) = t.to_device(gpu.device())?;
        }
        Ok(())
    }
}
