//! CUDA devices. On every machine: the errors a user gets without the `cuda`
//! feature, or with it but without a driver, and (with the feature) that every
//! CUDA C kernel compiles. On a GPU (`scripts/device-check.sh`): each CUDA kernel
//! against its CPU twin, forward and gradient; ResNet-20 on `cuda:0` against
//! `cpu:0`; checkpoints of CUDA replicas; and bad input (a missing GPU, a batch
//! too large for the device's memory).
//!
//! Tests that need a GPU report themselves skipped, by name, on stderr (outside
//! the test harness's capture) when the machine has none.

#[path = "../examples/resnet.rs"]
#[allow(dead_code)]
mod resnet;

mod common;

use clap::Parser;
use dpm::prelude::*;

/// A CUDA replica of a one-op model, for the error paths.
#[data_parallel]
fn tiny(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let x = m.input_with_shape("data", [4]);
    let label = m.input("label");
    let logits = m.fc("fc", x, 3)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

fn build_on(device: Device) -> Result<Trainer> {
    Parallelize::new(ModelHelper::new("tiny"))
        .devices([device])
        .forward(tiny)
        .update(Sgd::new(0.1))
        .build()
}

/// A net that fills a blob on `device`.
fn fill_net(device: Device) -> NetDef {
    let mut net = Net::new("fill");
    net.op("ConstantFill")
        .output("x")
        .arg("shape", vec![2i64])
        .arg("value", 1.0f32)
        .device(device)
        .build();
    net.into_proto()
}

fn example_error(devices: &str) -> String {
    let args = resnet::Args::try_parse_from([
        "resnet",
        "--quiet",
        "--devices",
        devices,
        "--depth",
        "8",
        "--iters",
        "1",
        "--train-images",
        "16",
        "--heldout-images",
        "0",
    ])
    .unwrap();
    resnet::run(&args)
        .expect_err("the example must refuse")
        .to_string()
}

/// `ModelHelper::set_deterministic` reaches every convolution and, through
/// autodiff, its gradient (the CUDA kernels then pick only deterministic cuDNN
/// algorithms); without it no op carries the argument.
#[test]
fn set_deterministic_marks_every_convolution_and_its_gradient() {
    for on in [true, false] {
        let cfg = resnet::ResNetConfig {
            depth: 8,
            classes: 10,
            image: [3, 8, 8],
        };
        let mut model = ModelHelper::new("resnet");
        model.set_deterministic(on);
        let t = Parallelize::new(model)
            .devices([Device::cpu(0), Device::cpu(1)])
            .forward(resnet::resnet(cfg))
            .update(Sgd::new(0.1))
            .build()
            .unwrap();
        let convs: Vec<_> = t
            .model()
            .net()
            .ops()
            .iter()
            .filter(|o| o.op_type().starts_with("Conv"))
            .collect();
        assert!(convs.iter().any(|o| o.op_type() == "ConvGradient"));
        assert_eq!(
            convs.len(),
            2 * 2 * 9,
            "9 convolutions × 2 devices, forward and gradient"
        );
        for o in convs {
            let arg = o.find_arg("deterministic").and_then(|a| a.i);
            assert_eq!(arg, on.then_some(1), "{} {:?}", o.op_type(), o.output);
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod without_the_feature {
    use super::*;

    const REMEDY: &str = "this build has no CUDA support: rebuild with `--features cuda`";

    #[test]
    fn every_way_to_a_cuda_device_says_to_rebuild_with_the_feature() {
        let e = build_on(Device::cuda(0)).err().expect("no CUDA in this build");
        assert!(matches!(e, Error::NotCompiledWithCuda(_)), "{e:?}");
        assert!(e.to_string().contains(REMEDY), "{e}");

        let ws = Workspace::new();
        let e = ws.run_net_once(&fill_net(Device::cuda(0))).unwrap_err();
        assert!(matches!(e.root(), Error::NotCompiledWithCuda(_)), "{e:?}");
        assert!(e.to_string().contains(REMEDY), "{e}");
        assert!(!ws.has_blob("x"), "nothing ran");

        let e = Tensor::scalar(1.0f32).to_device(Device::cuda(0)).unwrap_err();
        assert!(e.to_string().contains(REMEDY), "{e}");
        assert!(dpm::cuda::device_count()
            .unwrap_err()
            .to_string()
            .contains(REMEDY));
        assert!(!dpm::cuda::is_available());

        let e = example_error("cuda:0");
        assert!(e.contains(REMEDY), "{e}");
    }
}

#[cfg(feature = "cuda")]
mod with_the_feature {
    use super::*;
    use std::io::Write;

    /// Whether a GPU is here; if not, says which test is skipped.
    pub(super) fn gpu(test: &str) -> bool {
        match dpm::cuda::device_count() {
            Ok(n) if n > 0 => true,
            r => {
                let why = r.map_or_else(|e| e.to_string(), |_| "the driver reports no device".into());
                // Straight to the file descriptor: the harness captures `eprintln!`.
                let _ = writeln!(std::io::stderr(), "skipped {test}: no CUDA GPU ({why})");
                false
            }
        }
    }

    #[test]
    fn without_a_driver_every_way_to_a_cuda_device_is_a_clear_error() {
        if dpm::cuda::device_count().is_ok() {
            let _ = writeln!(
                std::io::stderr(),
                "skipped without_a_driver_every_way_to_a_cuda_device_is_a_clear_error: this machine has a CUDA driver"
            );
            return;
        }
        const NO_DRIVER: &str = "no CUDA driver found (libcuda.so): ";
        let e = build_on(Device::cuda(0)).err().expect("no driver");
        assert!(matches!(e, Error::NoCudaDriver(_)), "{e:?}");
        assert!(e.to_string().starts_with(NO_DRIVER), "{e}");

        let ws = Workspace::new();
        let e = ws.run_net_once(&fill_net(Device::cuda(0))).unwrap_err();
        assert!(matches!(e.root(), Error::NoCudaDriver(_)), "{e:?}");
        assert!(!ws.has_blob("x"), "nothing ran");

        let e = Tensor::scalar(1.0f32).to_device(Device::cuda(0)).unwrap_err();
        assert!(e.to_string().starts_with(NO_DRIVER), "{e}");
        assert!(!dpm::cuda::is_available());

        let e = example_error("cuda:0");
        assert!(e.contains(NO_DRIVER), "{e}");
        // CPU devices are unaffected by the missing driver.
        assert!(build_on(Device::cpu(0)).is_ok());
    }

    #[test]
    fn every_cuda_c_kernel_compiles_for_sm_90() {
        if !dpm::cuda::kernels::nvrtc_available() {
            assert!(
                std::env::var_os("DPM_REQUIRE_NVRTC").is_none(),
                "DPM_REQUIRE_NVRTC is set but libnvrtc.so.13 cannot be loaded (LD_LIBRARY_PATH?)"
            );
            let _ = writeln!(
                std::io::stderr(),
                "skipped every_cuda_c_kernel_compiles_for_sm_90: libnvrtc not found"
            );
            return;
        }
        let ptx =
            dpm::cuda::kernels::ptx(9, 0).unwrap_or_else(|log| panic!("kernels.cu does not compile:\n{log}"));
        let names = dpm::cuda::kernels::names();
        assert!(names.len() >= 13, "{names:?}");
        for n in names {
            assert!(
                ptx.contains(&format!(".entry {n}(")),
                "kernel `{n}` missing from the PTX"
            );
        }
    }

    /// The nets of the ResNet example (CIFAR and ImageNet style) and of the
    /// README's MLP, built for `cpu:0`; the CUDA kernels take the same arguments.
    fn example_nets() -> Vec<NetDef> {
        let mut nets = Vec::new();
        for (depth, size) in [(20, 32), (50, 64)] {
            let cfg = resnet::ResNetConfig {
                depth,
                classes: 10,
                image: [3, size, size],
            };
            let t = Parallelize::new(ModelHelper::new("resnet"))
                .devices([Device::cpu(0)])
                .forward(resnet::resnet(cfg))
                .update(
                    Sgd::new(0.1)
                        .momentum(0.9)
                        .weight_decay(1e-4)
                        .step_schedule(10, 0.1),
                )
                .build()
                .unwrap();
            nets.push(t.model().init_net().proto().clone());
            nets.push(t.model().net().proto().clone());
        }
        for sgd in [
            Sgd::new(0.1),
            Sgd::new(0.1).momentum(0.9).nesterov(true).weight_decay(1e-4),
        ] {
            let m = super::common::mlp(8, 16, 4, sgd);
            nets.push(m.init_net().proto().clone());
            nets.push(m.net().proto().clone());
        }
        nets
    }

    #[test]
    fn every_op_of_the_example_and_the_mlp_has_a_cuda_kernel_taking_its_arguments() {
        let registry = dpm::ops::Registry::global();
        let mut seen = std::collections::BTreeSet::new();
        for net in example_nets() {
            for op in &net.op {
                // Creating a kernel parses its arguments; no GPU is touched.
                if let Err(e) = registry.create(op, DeviceType::Cuda) {
                    panic!("{} `{}`: {e}", op.op_type(), op.output.join(", "));
                }
                seen.insert(op.op_type().to_owned());
            }
        }
        // The test net runs batch norm on running statistics.
        let mut test_bn = Net::new("test_bn");
        test_bn
            .op("SpatialBN")
            .inputs(["x", "s", "b", "m", "v"])
            .output("y")
            .arg("is_test", 1i64)
            .build();
        registry.create(&test_bn.proto().op[0], DeviceType::Cuda).unwrap();
        for needed in [
            "Conv",
            "ConvGradient",
            "SpatialBN",
            "SpatialBNGradient",
            "MaxPool",
            "MaxPoolGradient",
            "AveragePool",
            "AveragePoolGradient",
            "FC",
            "FCGradient",
            "Relu",
            "ReluGradient",
            "Sum",
            "Scale",
            "SoftmaxWithLoss",
            "SoftmaxWithLossGradient",
            "Accuracy",
            "MomentumSGDUpdate",
            "WeightedSum",
            "ConstantFill",
            "MSRAFill",
            "XavierFill",
            "LearningRate",
            "Iter",
        ] {
            assert!(
                seen.contains(needed),
                "the example nets no longer use {needed}: update this list ({seen:?})"
            );
        }
    }

    #[test]
    fn a_missing_gpu_is_named_with_the_ones_there_are() {
        if !gpu("a_missing_gpu_is_named_with_the_ones_there_are") {
            return;
        }
        let count = dpm::cuda::device_count().unwrap();
        let missing = Device::cuda(count as u32);
        let e = build_on(missing).err().expect("no such GPU");
        assert!(matches!(e, Error::NoSuchDevice { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains(&missing.to_string()) && text.contains("cuda:0"),
            "{text}"
        );
        let e = example_error(&missing.to_string());
        assert!(e.contains("does not exist"), "{e}");
        let e = Workspace::new().run_net_once(&fill_net(missing)).unwrap_err();
        assert!(matches!(e.root(), Error::NoSuchDevice { .. }), "{e:?}");
    }
}

#[cfg(feature = "cuda")]
mod on_a_gpu {
    use super::common::random;
    use super::with_the_feature::gpu;
    use super::*;

    const GPU: Device = Device::Cuda(0);

    /// ‖a − b‖ / ‖b‖, and whether every element is finite.
    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.shape(), b.shape());
        let (a, b) = (a.data::<f32>().unwrap(), b.data::<f32>().unwrap());
        assert!(a.iter().all(|v| v.is_finite()), "non-finite CUDA output");
        let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
        if den == 0.0 {
            num.sqrt()
        } else {
            (num / den).sqrt()
        }
    }

    /// Runs `net` on the CPU and on `cuda:0` from the same inputs (`host` ones stay
    /// in host memory on both) and checks each of `outputs` within `rtol`.
    fn parity(
        build: impl Fn(&mut Net),
        feeds: &[(&str, Tensor)],
        host: &[(&str, Tensor)],
        outputs: &[&str],
        rtol: f64,
    ) {
        let mut net = Net::new("parity");
        build(&mut net);
        let cpu_net = net.proto().clone();
        let mut gpu_net = cpu_net.clone();
        gpu_net.device_option = Some(GPU.to_proto());
        let (cpu, cuda) = (Workspace::new(), Workspace::new());
        for (n, t) in feeds {
            cpu.feed(n, t.clone());
            cuda.feed(n, t.to_device(GPU).unwrap());
        }
        for (n, t) in host {
            cpu.feed(n, t.clone());
            cuda.feed(n, t.clone());
        }
        cpu.run_net_once(&cpu_net).unwrap();
        cuda.run_net_once(&gpu_net).unwrap();
        for o in outputs {
            let (c, g) = (cpu.fetch(o).unwrap(), cuda.fetch(o).unwrap());
            if c.dtype() == DataType::F32 {
                let e = rel_err(&g, &c);
                assert!(e <= rtol, "`{o}`: relative error {e:.2e} > {rtol:.0e}");
            } else {
                assert!(g.bitwise_eq(&c), "`{o}` differs");
            }
        }
    }

    fn r(shape: &[usize], seed: u64) -> Tensor {
        random(shape, seed, -1.0, 1.0, 0.05)
    }

    #[test]
    fn fc_and_its_gradient_match_the_cpu() {
        if !gpu("fc_and_its_gradient_match_the_cpu") {
            return;
        }
        parity(
            |n| {
                n.op("FC").inputs(["x", "w", "b"]).output("y").build();
                n.op("FCGradient")
                    .inputs(["x", "w", "dy"])
                    .outputs(["dw", "db", "dx"])
                    .build();
            },
            &[
                ("x", r(&[7, 2, 5], 1)),
                ("w", r(&[6, 10], 2)),
                ("b", r(&[6], 3)),
                ("dy", r(&[7, 6], 4)),
            ],
            &[],
            &["y", "dw", "db", "dx"],
            1e-4,
        );
    }

    #[test]
    fn convolutions_and_their_gradients_match_the_cpu() {
        if !gpu("convolutions_and_their_gradients_match_the_cpu") {
            return;
        }
        // 3×3 stride 2 pad 1 with bias; 1×1 without; grouped 3×3.
        for (k, s, p, g, bias, m) in [
            (3, 2, 1, 1, true, 8),
            (1, 1, 0, 1, false, 6),
            (3, 1, 1, 2, true, 4),
        ] {
            let (n, c, h) = (3, 4, 9);
            let oh = (h + 2 * p - k) / s + 1;
            let mut feeds = vec![
                ("x", r(&[n, c, h, h], 10)),
                ("w", r(&[m, c / g, k, k], 11)),
                ("dy", r(&[n, m, oh, oh], 12)),
            ];
            if bias {
                feeds.push(("b", r(&[m], 13)));
            }
            parity(
                |net| {
                    let ins: Vec<&str> = if bias { vec!["x", "w", "b"] } else { vec!["x", "w"] };
                    let grads: Vec<&str> = if bias {
                        vec!["dw", "db", "dx"]
                    } else {
                        vec!["dw", "dx"]
                    };
                    let args = [
                        ("kernel", k as i64),
                        ("stride", s as i64),
                        ("pad", p as i64),
                        ("group", g as i64),
                        ("no_bias", i64::from(!bias)),
                    ];
                    let mut f = net.op("Conv").inputs(ins).output("y");
                    for (name, v) in args {
                        f = f.arg(name, v);
                    }
                    f.build();
                    let mut b = net.op("ConvGradient").inputs(["x", "w", "dy"]).outputs(grads);
                    for (name, v) in args {
                        b = b.arg(name, v);
                    }
                    b.build();
                },
                &feeds,
                &[],
                if bias {
                    &["y", "dw", "db", "dx"]
                } else {
                    &["y", "dw", "dx"]
                },
                1e-4,
            );
        }
    }

    #[test]
    fn batch_norm_training_inference_and_gradient_match_the_cpu() {
        if !gpu("batch_norm_training_inference_and_gradient_match_the_cpu") {
            return;
        }
        let c = 5;
        let mut x = r(&[6, c, 4, 3], 20);
        x.data_mut::<f32>()
            .unwrap()
            .iter_mut()
            .for_each(|v| *v = 3.0 * *v + 2.0);
        parity(
            |n| {
                n.op("SpatialBN")
                    .inputs(["x", "s", "b", "rm", "rv"])
                    .outputs(["y", "rm", "rv", "sm", "siv"])
                    .arg("momentum", 0.8f32)
                    .arg("epsilon", 1e-5f32)
                    .build();
                n.op("SpatialBNGradient")
                    .inputs(["x", "s", "dy", "sm", "siv"])
                    .outputs(["dx", "ds", "db"])
                    .arg("epsilon", 1e-5f32)
                    .build();
                n.op("SpatialBN")
                    .inputs(["x", "s", "b", "rm", "rv"])
                    .output("yt")
                    .arg("is_test", 1i64)
                    .build();
            },
            &[
                ("x", x.clone()),
                ("s", r(&[c], 21)),
                ("b", r(&[c], 22)),
                ("rm", r(&[c], 23)),
                ("rv", random(&[c], 24, 0.5, 2.0, 0.0)),
                ("dy", r(&[6, c, 4, 3], 25)),
            ],
            &[],
            &["y", "rm", "rv", "sm", "siv", "dx", "ds", "db", "yt"],
            1e-4,
        );
    }

    #[test]
    fn pooling_and_its_gradient_match_the_cpu() {
        if !gpu("pooling_and_its_gradient_match_the_cpu") {
            return;
        }
        // (op, arguments, output side for 9×9 inputs)
        for (op, args, side) in [
            ("MaxPool", vec![("kernel", 3i64), ("stride", 2), ("pad", 1)], 5),
            ("AveragePool", vec![("kernel", 3), ("stride", 2), ("pad", 1)], 5),
            ("AveragePool", vec![("global_pooling", 1)], 1),
            ("MaxPool", vec![("kernel", 2), ("stride", 2)], 4),
        ] {
            parity(
                |n| {
                    let mut f = n.op(op).input("x").output("y");
                    for (k, v) in &args {
                        f = f.arg(k, *v);
                    }
                    f.build();
                    let mut g = n
                        .op(&format!("{op}Gradient"))
                        .inputs(["x", "y", "dy"])
                        .output("dx");
                    for (k, v) in &args {
                        g = g.arg(k, *v);
                    }
                    g.build();
                },
                &[("x", r(&[2, 3, 9, 9], 30)), ("dy", r(&[2, 3, side, side], 31))],
                &[],
                &["y", "dx"],
                1e-5,
            );
        }
    }

    #[test]
    fn elementwise_ops_shape_ops_and_updates_match_the_cpu() {
        if !gpu("elementwise_ops_shape_ops_and_updates_match_the_cpu") {
            return;
        }
        parity(
            |n| {
                n.op("Relu").input("a").output("relu").build();
                n.op("ReluGradient").inputs(["relu", "b"]).output("drelu").build();
                n.op("Sum").inputs(["a", "b", "c"]).output("sum").build();
                n.op("Add").inputs(["a", "b"]).output("add").build();
                n.op("Scale")
                    .input("c")
                    .output("scaled")
                    .arg("scale", -0.3f32)
                    .build();
                n.op("Copy").input("a").output("copy").build();
                n.op("Flatten").input("a").output("flat").build();
                n.op("Reshape")
                    .input("b")
                    .output("reshaped")
                    .arg("shape", vec![-1i64, 6])
                    .build();
                n.op("WeightedSum")
                    .inputs(["g", "one", "p", "wd"])
                    .output("g")
                    .build();
                n.op("MomentumSGDUpdate")
                    .inputs(["g", "m", "lr", "p"])
                    .outputs(["g", "m", "p"])
                    .arg("momentum", 0.9f32)
                    .arg("weight_decay", 1e-4f32)
                    .build();
                n.op("MomentumSGDUpdate")
                    .inputs(["g2", "m2", "lr_dev", "p2"])
                    .outputs(["g2", "m2", "p2"])
                    .arg("momentum", 0.9f32)
                    .arg("nesterov", 1i64)
                    .build();
            },
            &[
                ("a", r(&[4, 3, 2], 40)),
                ("b", r(&[4, 3, 2], 41)),
                ("c", r(&[4, 3, 2], 42)),
                ("g", r(&[50], 43)),
                ("m", r(&[50], 44)),
                ("p", r(&[50], 45)),
                ("g2", r(&[33], 46)),
                ("m2", r(&[33], 47)),
                ("p2", r(&[33], 48)),
                ("lr_dev", Tensor::scalar(0.05f32)),
            ],
            &[
                ("one", Tensor::scalar(1.0f32)),
                ("wd", Tensor::scalar(0.01f32)),
                ("lr", Tensor::scalar(0.1f32)),
            ],
            &[
                "relu", "drelu", "sum", "add", "scaled", "copy", "flat", "reshaped", "g", "m", "p", "g2",
                "m2", "p2",
            ],
            1e-6,
        );
    }

    #[test]
    fn softmax_loss_its_gradient_and_accuracy_match_the_cpu() {
        if !gpu("softmax_loss_its_gradient_and_accuracy_match_the_cpu") {
            return;
        }
        for classes in [10, 1000] {
            let n = 9;
            let mut x = r(&[n, classes], 50);
            x.data_mut::<f32>().unwrap().iter_mut().for_each(|v| *v *= 8.0);
            let labels: Vec<i32> = (0..n).map(|i| ((i * 7 + 3) % classes) as i32).collect();
            parity(
                |net| {
                    net.op("SoftmaxWithLoss")
                        .inputs(["x", "label"])
                        .outputs(["p", "loss"])
                        .build();
                    net.op("SoftmaxWithLossGradient")
                        .inputs(["x", "label", "p", "dloss"])
                        .output("dx")
                        .build();
                    net.op("Accuracy").inputs(["x", "label"]).output("top1").build();
                    net.op("Accuracy")
                        .inputs(["x", "label"])
                        .output("top3")
                        .arg("top_k", 3i64)
                        .build();
                },
                &[
                    ("x", x),
                    ("label", Tensor::from_vec([n], labels).unwrap()),
                    ("dloss", Tensor::scalar(0.7f32)),
                ],
                &[],
                &["p", "loss", "dx", "top1", "top3"],
                1e-5,
            );
        }
    }

    /// NCCL with one GPU is a real communicator of world size 1: the all-reduce
    /// (sum and mean) and the broadcast leave the values as they are, through the
    /// communication stream and its events, and the result reads back correctly.
    #[test]
    fn nccl_collectives_run_on_one_gpu() {
        if !gpu("nccl_collectives_run_on_one_gpu") {
            return;
        }
        let x = r(&[1000, 3], 140);
        for (op, avg) in [
            ("NCCLAllreduce", 0i64),
            ("NCCLAllreduce", 1),
            ("NCCLBroadcast", 0),
        ] {
            let ws = Workspace::new();
            ws.feed("gpu_0/x", x.to_device(GPU).unwrap());
            let mut net = Net::new("nccl");
            let mut b = net.op(op).input("gpu_0/x").output("gpu_0/x").device(GPU);
            if op == "NCCLAllreduce" {
                b = b.arg("average", avg);
            }
            b.build();
            ws.create_net(net.proto()).unwrap();
            for _ in 0..3 {
                ws.run_net("nccl").unwrap();
            }
            let back = ws.fetch("gpu_0/x").unwrap();
            assert!(back.bitwise_eq(&x), "{op} average={avg} changed the values");
        }
        // An NCCL op over a host blob is an error naming it.
        let ws = Workspace::new();
        ws.feed("gpu_0/h", x.clone());
        let mut net = Net::new("bad");
        net.op("NCCLAllreduce")
            .input("gpu_0/h")
            .output("gpu_0/h")
            .device(GPU)
            .build();
        let e = ws.run_net_once(net.proto()).unwrap_err().to_string();
        assert!(e.contains("gpu_0/h") && e.contains("to_device"), "{e}");
    }

    #[test]
    fn fills_give_the_cpu_bits_and_host_counters_stay_on_the_host() {
        if !gpu("fills_give_the_cpu_bits_and_host_counters_stay_on_the_host") {
            return;
        }
        let fills = [
            "ConstantFill",
            "GaussianFill",
            "UniformFill",
            "XavierFill",
            "MSRAFill",
        ];
        parity(
            |n| {
                for (i, f) in fills.iter().enumerate() {
                    n.op(f)
                        .output(format!("f{i}"))
                        .arg("shape", vec![16i64, 3, 3, 3])
                        .build();
                }
                n.op("LearningRate")
                    .input("ITER")
                    .output("lr")
                    .arg("base_lr", 0.1f32)
                    .arg("policy", "step")
                    .arg("stepsize", 2i64)
                    .arg("gamma", 0.5f32)
                    .build();
                n.op("Iter").input("ITER").output("ITER").build();
            },
            &[],
            &[("ITER", Tensor::scalar(5i64))],
            &["f0", "f1", "f2", "f3", "f4", "lr", "ITER"],
            0.0,
        );
        let mut net = Net::new("where");
        net.op("GaussianFill")
            .output("w")
            .arg("shape", vec![4i64])
            .device(GPU)
            .build();
        let ws = Workspace::new();
        ws.run_net_once(net.proto()).unwrap();
        assert_eq!(ws.blob_device("w").unwrap(), GPU);
        let e = ws
            .with_blob("w", |t| t.data::<f32>().map(|_| ()).unwrap_err())
            .unwrap();
        assert_eq!(e, dpm::tensor::HostAccessError::NotOnHost(GPU));
    }

    #[test]
    fn a_bad_label_is_an_error_naming_the_blob() {
        if !gpu("a_bad_label_is_an_error_naming_the_blob") {
            return;
        }
        let mut net = Net::new("bad");
        net.op("SoftmaxWithLoss")
            .inputs(["x", "label"])
            .outputs(["p", "loss"])
            .device(GPU)
            .build();
        let ws = Workspace::new();
        ws.feed("x", r(&[2, 3], 60).to_device(GPU).unwrap());
        ws.feed(
            "label",
            Tensor::from_vec([2], vec![1i32, 3])
                .unwrap()
                .to_device(GPU)
                .unwrap(),
        );
        let e = ws.run_net_once(net.proto()).unwrap_err().to_string();
        assert!(
            e.contains("label") && e.contains("3 is not below the number of classes 3"),
            "{e}"
        );
        // A host tensor fed to a CUDA op is named, with the remedy.
        ws.feed("x", r(&[2, 3], 60));
        let e = ws.run_net_once(net.proto()).unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("to_device"), "{e}");
    }

    /// Deterministic convolutions: a rerun gives the same bits.
    fn resnet20(device: Device, seed: u64) -> Trainer {
        resnet20_at(device, seed, 0.1, true)
    }

    fn resnet20_at(device: Device, seed: u64, lr: f32, deterministic: bool) -> Trainer {
        resnet20_with(device, seed, lr, deterministic, false)
    }

    /// `collectives`: the data-parallel path on one device (NCCL on a GPU).
    fn resnet20_with(device: Device, seed: u64, lr: f32, deterministic: bool, collectives: bool) -> Trainer {
        let cfg = resnet::ResNetConfig {
            depth: 20,
            classes: 10,
            image: [3, 32, 32],
        };
        let data = dpm::data::Synthetic::new(10, 32, seed).generate(64, seed + 1);
        let mut step = 0usize;
        let source = move || {
            let ids: Vec<usize> = (0..16).map(|i| (step * 16 + i) % 64).collect();
            step += 1;
            Ok(dpm::data::batch_tensors(&data, &ids, None))
        };
        let mut model = ModelHelper::new("resnet");
        model.set_seed(seed).set_deterministic(deterministic);
        let mut t = Parallelize::new(model)
            .devices([device])
            .input(source)
            .forward(resnet::resnet(cfg))
            .update(Sgd::new(lr).momentum(0.9).weight_decay(1e-4))
            .collectives_on_one_device(collectives)
            .build()
            .unwrap();
        t.run_init().unwrap();
        t
    }

    /// The NCCL path (a world of one GPU: initial broadcast, computed-param
    /// broadcast, one all-reduce per gradient on the communication stream)
    /// trains ResNet-20 exactly as the plain single-GPU run does.
    #[test]
    fn resnet20_through_nccl_on_one_gpu_equals_the_plain_run() {
        if !gpu("resnet20_through_nccl_on_one_gpu_equals_the_plain_run") {
            return;
        }
        let mut plain = resnet20_with(GPU, 5, 0.1, true, false);
        let mut nccl = resnet20_with(GPU, 5, 0.1, true, true);
        let ops = |t: &Trainer| {
            t.model()
                .net()
                .proto()
                .op
                .iter()
                .filter(|o| o.op_type() == "NCCLAllreduce")
                .count()
        };
        assert_eq!(ops(&plain), 0);
        assert_eq!(ops(&nccl), nccl.grad_groups().len());
        for step in 1..=4 {
            plain.step().unwrap();
            nccl.step().unwrap();
            assert_eq!(
                plain.loss().unwrap().to_bits(),
                nccl.loss().unwrap().to_bits(),
                "loss at step {step}"
            );
        }
        for g in plain.param_groups().iter().chain(plain.computed_param_groups()) {
            let (a, b) = (
                plain.fetch(&g.name, GPU).unwrap(),
                nccl.fetch(&g.name, GPU).unwrap(),
            );
            assert!(a.bitwise_eq(&b), "`{}` differs after 4 steps", g.name);
        }
    }

    /// Every parameter of `a` and `b` (on their own devices) against each other:
    /// per name, and over all of them together.
    fn param_errors(a: &Trainer, b: &Trainer) -> (Vec<(String, f64)>, f64) {
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        let mut each = Vec::new();
        for g in a.param_groups().iter().chain(a.computed_param_groups()) {
            let x = a.fetch(&g.name, a.devices()[0]).unwrap();
            let y = b.fetch(&g.name, b.devices()[0]).unwrap();
            each.push((g.name.clone(), rel_err(&x, &y)));
            for (p, q) in x.data::<f32>().unwrap().iter().zip(y.data::<f32>().unwrap()) {
                diff += f64::from(p - q).powi(2);
                norm += f64::from(*q).powi(2);
            }
        }
        (each, (diff / norm).sqrt())
    }

    #[test]
    fn resnet20_on_cuda_follows_the_cpu_for_five_steps() {
        if !gpu("resnet20_on_cuda_follows_the_cpu_for_five_steps") {
            return;
        }
        let cpu0 = Device::cpu(0);
        let (mut cpu, mut cuda) = (
            resnet20_at(cpu0, 7, 0.01, false),
            resnet20_at(GPU, 7, 0.01, false),
        );
        // Same initial parameters, to the bit: fills draw on the host.
        for g in cpu.param_groups() {
            let name = g.name.clone();
            let (a, b) = (cpu.fetch(&name, cpu0).unwrap(), cuda.fetch(&name, GPU).unwrap());
            assert!(a.bitwise_eq(&b), "initial `{name}` differs");
        }
        // How far two FP32 runs may drift apart without either being wrong: the
        // CPU's own run with every weight moved by one part in 10^7 (a rounding
        // error). Measured on the CPU, this network's batch-norm parameters drift
        // by up to several percent in five steps from such a nudge, so each
        // tolerance is the larger of rtol 1e-3 and a few times that drift.
        let mut nudged = resnet20_at(cpu0, 7, 0.01, false);
        for g in nudged.param_groups().to_vec() {
            let t = nudged.fetch(&g.name, cpu0).unwrap();
            let v: Vec<f32> = t
                .data::<f32>()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, x)| x * if i % 2 == 0 { 1.0 + 1e-7 } else { 1.0 - 1e-7 })
                .collect();
            nudged
                .feed(&g.name, cpu0, Tensor::from_vec(t.shape().clone(), v).unwrap())
                .unwrap();
        }
        for step in 1..=5 {
            for t in [&mut cpu, &mut cuda, &mut nudged] {
                t.step().unwrap();
            }
            let (a, b, n) = (cpu.loss().unwrap(), cuda.loss().unwrap(), nudged.loss().unwrap());
            // The first loss comes from identical weights: rounding alone.
            let tol = if step == 1 {
                1e-4
            } else {
                (1e-3f32).max(4.0 * ((n - a) / a).abs())
            };
            assert!(
                ((a - b) / a).abs() <= tol,
                "step {step}: loss {b} on cuda:0, {a} on cpu:0 (nudged cpu:0 {n})"
            );
        }
        let (gpu_each, gpu_all) = param_errors(&cuda, &cpu);
        let (cpu_each, cpu_all) = param_errors(&nudged, &cpu);
        eprintln!("after 5 steps: all parameters {gpu_all:.2e} off on cuda:0, {cpu_all:.2e} off when nudged");
        assert!(
            gpu_all <= 1e-3f64.max(4.0 * cpu_all),
            "all parameters after 5 steps: relative error {gpu_all:.2e} (nudged cpu: {cpu_all:.2e})"
        );
        for ((name, e), (_, n)) in gpu_each.iter().zip(&cpu_each) {
            assert!(
                *e <= 1e-3f64.max(4.0 * n),
                "`{name}` after 5 steps: relative error {e:.2e} (nudged cpu: {n:.2e})"
            );
        }
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("dpm-cuda-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join("ckpt.safetensors")
    }

    #[test]
    fn cuda_checkpoints_resume_and_load_on_the_cpu() {
        if !gpu("cuda_checkpoints_resume_and_load_on_the_cpu") {
            return;
        }
        let path = scratch("resume");
        let mut a = resnet20(GPU, 3);
        a.run(2).unwrap();
        a.save(&path).unwrap();
        a.run(2).unwrap();
        let mut b = resnet20(GPU, 99);
        b.load(&path).unwrap();
        b.set_input({
            let data = dpm::data::Synthetic::new(10, 32, 3).generate(64, 4);
            let mut step = 2usize;
            move || {
                let ids: Vec<usize> = (0..16).map(|i| (step * 16 + i) % 64).collect();
                step += 1;
                Ok(dpm::data::batch_tensors(&data, &ids, None))
            }
        });
        b.run(2).unwrap();
        // Deterministic convolutions: the resumed run is the uninterrupted one, to the bit.
        for g in a.param_groups().iter().chain(a.computed_param_groups()) {
            let (x, y) = (b.fetch(&g.name, GPU).unwrap(), a.fetch(&g.name, GPU).unwrap());
            assert!(
                x.bitwise_eq(&y),
                "`{}` after resuming: relative error {:.2e}",
                g.name,
                rel_err(&x, &y)
            );
        }
        // The file is portable: a CPU replica loads it.
        let mut c = resnet20(Device::cpu(0), 5);
        c.load(&path).unwrap();
        let ck = dpm::checkpoint::load(&path).unwrap();
        let (_, w) = ck
            .tensors
            .iter()
            .find(|(k, _)| k == "conv1_w" || k.ends_with("_w"))
            .unwrap();
        assert!(w.is_on_host());
    }

    #[test]
    fn a_batch_too_large_for_the_gpu_is_an_error_and_the_checkpoint_survives() {
        if !gpu("a_batch_too_large_for_the_gpu_is_an_error_and_the_checkpoint_survives") {
            return;
        }
        #[data_parallel]
        fn wide(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
            let x = m.input_with_shape("data", [16]);
            let label = m.input("label");
            let h = m.fc("hidden", x, 8192)?;
            let logits = m.fc("out", h, 2)?;
            let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
            Ok(loss.into())
        }
        let batch = std::cell::Cell::new(8usize);
        let make = |rows: usize| {
            vec![
                ("data".to_owned(), Tensor::zeros::<f32>([rows, 16])),
                ("label".to_owned(), Tensor::zeros::<i32>([rows])),
            ]
        };
        let mut t = Parallelize::new(ModelHelper::new("wide"))
            .devices([GPU])
            .forward(wide)
            .update(Sgd::new(0.1))
            .build()
            .unwrap();
        t.run_init().unwrap();
        for (n, v) in make(batch.get()) {
            t.feed(&n, GPU, v).unwrap();
        }
        t.step().unwrap();
        let path = scratch("oom");
        t.save(&path).unwrap();
        let saved = t.fetch("hidden_w", GPU).unwrap();
        // 2^23 rows × 8192 hidden floats = 256 GiB of activations.
        batch.set(1 << 23);
        for (n, v) in make(batch.get()) {
            t.feed(&n, GPU, v).unwrap();
        }
        let e = t.step().unwrap_err();
        assert!(matches!(e.root(), Error::OutOfDeviceMemory { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("cuda:0") && text.contains("smaller batch"),
            "{text}"
        );
        let ck = dpm::checkpoint::load(&path).unwrap();
        let (_, w) = ck.tensors.iter().find(|(k, _)| k == "hidden_w").unwrap();
        assert!(w.bitwise_eq(&saved), "the checkpoint changed");
        // The failed step changed nothing on the GPU either (atomic steps).
        let now = t.fetch("hidden_w", GPU).unwrap();
        assert!(now.bitwise_eq(&saved), "the failed step changed the parameters");
    }
}
