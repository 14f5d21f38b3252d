//! What the convolution benches share: ResNet-20's convolutions on CIFAR, each
//! set up as conv nets and as raw GEMMs of the same M×N×K.

use std::hint::black_box;

use dpm::ops::cpu::gemm::{sgemm, Mat};
use dpm::ops::cpu::rng::Rng;
use dpm::prelude::*;

/// Images per batch.
pub const BATCH: usize = 32;

/// Every distinct convolution of ResNet-20 on CIFAR: (name, in channels, out
/// channels, kernel, stride, input side). Padding is `kernel / 2`.
pub const SHAPES: [(&str, usize, usize, usize, usize, usize); 8] = [
    ("conv1_3x3_3to16_32px", 3, 16, 3, 1, 32),
    ("3x3_16to16_32px", 16, 16, 3, 1, 32),
    ("3x3s2_16to32_32px", 16, 32, 3, 2, 32),
    ("1x1s2_16to32_32px", 16, 32, 1, 2, 32),
    ("3x3_32to32_16px", 32, 32, 3, 1, 16),
    ("3x3s2_32to64_16px", 32, 64, 3, 2, 16),
    ("1x1s2_32to64_16px", 32, 64, 1, 2, 16),
    ("3x3_64to64_8px", 64, 64, 3, 1, 8),
];

/// One shape on random data: `Conv` and `ConvGradient` (dW and dX) over the
/// batch, and per image the GEMMs im2col would run (M = out channels, N =
/// output pixels, K = in channels × kernel area).
pub struct Case {
    ws: Workspace,
    /// FLOPs of the forward pass over the batch; the backward does twice as many.
    pub flops: u64,
    mnk: (usize, usize, usize),
    a: Vec<f32>,
    b: Vec<f32>,
    dy: Vec<f32>,
    out: (Vec<f32>, Vec<f32>, Vec<f32>),
}

impl Case {
    /// Sets up one entry of [`SHAPES`].
    pub fn new((_, cin, cout, k, s, side): (&str, usize, usize, usize, usize, usize)) -> Case {
        let pad = k / 2;
        let out = (side + 2 * pad - k) / s + 1;
        let (m, n, kk) = (cout, out * out, cin * k * k);
        let mut rng = Rng::new(1);
        let mut random = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.uniform() as f32 - 0.5).collect() };
        let ws = Workspace::new();
        for (name, shape) in [
            ("x", [BATCH, cin, side, side]),
            ("w", [cout, cin, k, k]),
            ("dy", [BATCH, cout, out, out]),
        ] {
            ws.feed(
                name,
                Tensor::from_vec(shape.to_vec(), random(shape.iter().product())).unwrap(),
            );
        }
        // `CONV_ENGINE=IM2COL` (or `DIRECT`) forces Caffe2's engine field.
        let engine = std::env::var("CONV_ENGINE").unwrap_or_default();
        let mut fwd = Net::new("fwd");
        let op = fwd.op("Conv").inputs(["x", "w"]).output("y").engine(&engine);
        op.arg("kernel", k).arg("stride", s).arg("pad", pad).build();
        let mut bwd = Net::new("bwd");
        let op = bwd
            .op("ConvGradient")
            .inputs(["x", "w", "dy"])
            .outputs(["dw", "dx"])
            .engine(&engine);
        op.arg("kernel", k)
            .arg("stride", s)
            .arg("pad", pad)
            .arg("no_bias", 1i64)
            .build();
        ws.create_net(fwd.proto()).unwrap();
        ws.create_net(bwd.proto()).unwrap();
        Case {
            ws,
            flops: (2 * BATCH * m * n * kk) as u64,
            mnk: (m, n, kk),
            a: random(m * kk),
            b: random(kk * n),
            dy: random(m * n),
            out: (vec![0.0; m * n], vec![0.0; m * kk], vec![0.0; kk * n]),
        }
    }

    /// The convolution over the batch.
    pub fn forward(&self) {
        self.ws.run_net("fwd").unwrap();
    }

    /// Its gradient, dW and dX, over the batch.
    pub fn backward(&self) {
        self.ws.run_net("bwd").unwrap();
    }

    /// `BATCH` GEMMs of the forward's M×N×K.
    pub fn gemm_forward(&mut self) {
        let (m, n, k) = self.mnk;
        for _ in 0..BATCH {
            sgemm(
                m,
                n,
                k,
                Mat::n(black_box(&self.a)),
                Mat::n(&self.b),
                0.0,
                &mut self.out.0,
            );
        }
    }

    /// `BATCH` pairs of GEMMs: dW (accumulated over the batch) and dX's columns.
    pub fn gemm_backward(&mut self) {
        let (m, n, k) = self.mnk;
        for i in 0..BATCH {
            let beta = if i == 0 { 0.0 } else { 1.0 };
            sgemm(
                m,
                k,
                n,
                Mat::n(black_box(&self.dy)),
                Mat::t(&self.b),
                beta,
                &mut self.out.1,
            );
            sgemm(k, n, m, Mat::t(&self.a), Mat::n(&self.dy), 0.0, &mut self.out.2);
        }
    }
}
