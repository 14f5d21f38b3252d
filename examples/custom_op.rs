//! An op defined outside dpm: Swish, `y = x·σ(x)`, with its CPU kernel, its
//! gradient op and its gradient rule, registered once with `Registry::register_op`
//! and then used from a `#[data_parallel]` model like any built-in op.
//!
//! ```sh
//! cargo run --release --example custom_op
//! ```
//!
//! It checks the gradient against finite differences, then trains a small MLP
//! with Swish on two CPU devices.

use dpm::autodiff::{add_gradient_ops_seeded, GradientContext, GradientOps};
use dpm::graph::DeviceType;
use dpm::ops::cpu::rng::Rng;
use dpm::ops::{Kernel, OpContext, OpSchema, Registry};
use dpm::prelude::*;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `Swish(X) → X·σ(X)`.
struct Swish;

impl Kernel for Swish {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let (x, xd) = ctx.input_f32(0)?;
        let y = ctx.resize_output::<f32>(0, x.shape())?;
        for (y, &x) in y.iter_mut().zip(xd) {
            *y = x * sigmoid(x);
        }
        Ok(())
    }
}

/// `SwishGradient(X, dY) → dX = dY·(σ(X) + X·σ(X)·(1 − σ(X)))`.
struct SwishGradient;

impl Kernel for SwishGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        let (x, xd) = ctx.input_f32(0)?;
        let (dy, dyd) = ctx.input_f32(1)?;
        if dy.shape() != x.shape() {
            return Err(Error::shape(ctx.input_name(1), x.shape().to_string(), dy.shape()));
        }
        let dx = ctx.resize_output::<f32>(0, x.shape())?;
        for ((d, &x), &g) in dx.iter_mut().zip(xd).zip(dyd) {
            let s = sigmoid(x);
            *d = g * (s + x * s * (1.0 - s));
        }
        Ok(())
    }
}

/// The backward of `Swish`: one `SwishGradient` writing the input's gradient.
fn swish_gradient(c: &GradientContext<'_>) -> Result<GradientOps> {
    let op = c.op(
        "SwishGradient",
        vec![c.input(0), c.g_out(0)?],
        vec![c.gradient_name(0)],
        vec![],
    );
    Ok(GradientOps {
        ops: vec![op],
        g_in: c.g_in_needed(),
    })
}

/// Registers `Swish` and `SwishGradient`: kernels, gradient rule, arity.
pub fn register() {
    Registry::register_op(
        OpSchema::new("Swish")
            .kernel(DeviceType::Cpu, |_| Ok(Box::new(Swish)))
            .gradient(swish_gradient)
            .arity(1..=1, 1..=1),
    );
    Registry::register_op(
        OpSchema::new("SwishGradient")
            .kernel(DeviceType::Cpu, |_| Ok(Box::new(SwishGradient)))
            .not_differentiable()
            .arity(2..=2, 1..=1),
    );
}

/// Swish as a layer of a `#[data_parallel]` model.
fn swish<'d>(m: &mut DeviceModel<'d>, x: Blob<'d>) -> Blob<'d> {
    let input = m.name(x).clone();
    let output = input.with_suffix("_swish");
    let shape = m.sample_shape(x).cloned();
    m.model()
        .net_mut()
        .op("Swish")
        .input(&input)
        .output(&output)
        .build();
    m.adopt(output, shape)
}

#[data_parallel]
fn mlp(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [8]);
    let label = m.input("label");
    let h = m.fc("fc1", data, 16)?;
    let h = swish(m, h);
    let logits = m.fc("fc2", h, 4)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

/// The largest relative error between Swish's gradient through autodiff and
/// central finite differences of `L = Σ w·Swish(x)`.
pub fn gradient_error() -> Result<f64> {
    let mut rng = Rng::new(7);
    let mut random =
        |n: usize| -> Vec<f32> { (0..n).map(|_| (2.0 * rng.uniform() - 1.0) as f32 * 2.0).collect() };
    let (x, w) = (random(12), random(12));
    let mut net = Net::new("swish");
    net.op("Swish").input("x").output("y").build();
    let ws = Workspace::new();
    ws.feed("x", Tensor::from_vec([3, 4], x.clone()).unwrap());
    ws.feed("w", Tensor::from_vec([3, 4], w.clone()).unwrap());
    let loss = |ws: &Workspace, x: &[f32]| -> Result<f64> {
        ws.feed("x", Tensor::from_vec([3, 4], x.to_vec()).unwrap());
        ws.run_net_once(net.proto())?;
        let y = ws.fetch("y")?;
        Ok(y.data::<f32>()?
            .iter()
            .zip(&w)
            .map(|(&a, &b)| f64::from(a * b))
            .sum())
    };
    let mut backward = net.clone();
    let grads = add_gradient_ops_seeded(
        &mut backward,
        &[(BlobRef::new("y"), BlobRef::new("w"))],
        &[BlobRef::new("x")],
    )?;
    ws.run_net_once(backward.proto())?;
    let dx = ws.fetch(grads.get(&BlobRef::new("x")).expect("x has a gradient"))?;
    let analytic = dx.data::<f32>()?.to_vec();
    let eps = 1e-3f32;
    let mut worst = 0.0f64;
    for i in 0..x.len() {
        let (mut up, mut down) = (x.clone(), x.clone());
        up[i] += eps;
        down[i] -= eps;
        let numeric = (loss(&ws, &up)? - loss(&ws, &down)?) / (2.0 * f64::from(eps));
        let err = (f64::from(analytic[i]) - numeric).abs() / numeric.abs().max(1e-2);
        worst = worst.max(err);
    }
    Ok(worst)
}

/// A learnable data set: 4 classes around random centres in 8 dimensions.
fn batches() -> impl FnMut() -> Result<Vec<(String, Tensor)>> {
    let mut rng = Rng::new(3);
    let centres: Vec<f32> = (0..4 * 8).map(|_| (2.0 * rng.normal()) as f32).collect();
    move || {
        let (mut x, mut y) = (Vec::with_capacity(32 * 8), Vec::with_capacity(32));
        for i in 0..32 {
            let c = i % 4;
            x.extend((0..8).map(|d| centres[c * 8 + d] + 0.5 * rng.normal() as f32));
            y.push(c as i32);
        }
        Ok(vec![
            ("data".to_owned(), Tensor::from_vec([32, 8], x).unwrap()),
            ("label".to_owned(), Tensor::from_vec([32], y).unwrap()),
        ])
    }
}

/// Registers Swish, checks its gradient, trains; returns (gradient error, first
/// loss, last loss).
pub fn run() -> Result<(f64, f32, f32)> {
    register();
    let err = gradient_error()?;
    let mut t = Parallelize::new(ModelHelper::new("swish_mlp"))
        .devices([Device::cpu(0), Device::cpu(1)])
        .input(batches())
        .forward(mlp)
        .update(Sgd::new(0.1).momentum(0.9))
        .build()?;
    t.run_init()?;
    t.step()?;
    let first = t.loss()?;
    t.run(60)?;
    Ok((err, first, t.loss()?))
}

#[allow(dead_code)] // the tests include this file as a module and call `run`
fn main() -> std::process::ExitCode {
    match run() {
        Ok((err, first, last)) => {
            println!(
                "Swish: gradient within {err:.1e} of finite differences; an MLP with it on 2 CPU devices: loss {first:.3} → {last:.3}"
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
