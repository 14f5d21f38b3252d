//! Fused execution (`exec::fuse`): the executor runs `SpatialBN → Relu`,
//! `Sum → Relu`, `ReluGradient → SpatialBNGradient` and the weight decay
//! before a momentum update (`WeightedSum → MomentumSGDUpdate`) as one kernel
//! each, and every blob a user can fetch holds the same bits as when the ops
//! run apart.

mod common;

use common::{cnn_batch, random, small_cnn_parallelize, trained_small_cnn};
use dpm::parallel::ForwardBuilder;
use dpm::prelude::*;
use dpm::proto::NetDef;

/// `net` with the `dpm_fuse` argument set to `on`.
fn fusing(net: &NetDef, on: bool) -> NetDef {
    let mut n = Net::from_proto(net.clone());
    n.set_arg("dpm_fuse", i64::from(on));
    n.into_proto()
}

/// Every blob of `a`, bitwise equal in `b`.
fn same_blobs(a: &Workspace, b: &Workspace) {
    let names = a.blob_names();
    assert_eq!(names, b.blob_names());
    for n in &names {
        let (x, y) = (a.fetch(n).unwrap(), b.fetch(n).unwrap());
        assert!(x.bitwise_eq(&y), "blob `{n}` differs");
    }
}

fn op_types(ws: &Workspace) -> Vec<String> {
    ws.op_times().into_iter().map(|(t, _)| t).collect()
}

/// Trains what `build` makes for `steps` steps, fused and apart; checks
/// every blob is bitwise the same and returns the op types each ran.
fn train_fused_and_apart(build: impl Fn() -> Parallelize, steps: usize) -> (Vec<String>, Vec<String>) {
    let run = |fuse: bool| {
        let mut t = build().fuse_ops(fuse).build().unwrap();
        t.run_init().unwrap();
        t.workspace().set_profiling(true);
        t.run(steps).unwrap();
        t
    };
    let (fused, apart) = (run(true), run(false));
    same_blobs(fused.workspace(), apart.workspace());
    (op_types(fused.workspace()), op_types(apart.workspace()))
}

#[test]
fn training_with_fused_batch_norm_and_relu_gives_the_same_bits() {
    // small_cnn on 2 CPU devices, 4 steps, with each executor.
    for net_type in ["dag", "simple"] {
        let (f, a) = train_fused_and_apart(|| small_cnn_parallelize(net_type, 5), 4);
        for t in ["SpatialBN+Relu", "ReluGradient+SpatialBNGradient"] {
            assert!(
                f.iter().any(|x| x == t) && !a.iter().any(|x| x == t),
                "{t}: {f:?}"
            );
        }
        for t in ["Relu", "ReluGradient"] {
            assert!(
                !f.iter().any(|x| x == t) && a.iter().any(|x| x == t),
                "{t}: {f:?}"
            );
        }
    }
}

#[test]
fn inference_with_fused_batch_norm_and_relu_gives_the_same_bits() {
    // The exported predictor: batch norm in inference mode, then relu.
    let t = trained_small_cnn();
    let (init, predict) = t.export_predictor().unwrap();
    let run = |fuse: bool| {
        let ws = Workspace::new();
        ws.set_profiling(true);
        ws.run_net_once(&init).unwrap();
        let (_, x) = cnn_batch(9, 6).remove(0);
        ws.feed("data", x);
        ws.run_net_once(&fusing(&predict, fuse)).unwrap();
        ws
    };
    let (fused, apart) = (run(true), run(false));
    same_blobs(&fused, &apart);
    assert!(op_types(&fused).iter().any(|x| x == "SpatialBN+Relu"));
    assert!(op_types(&apart).iter().any(|x| x == "Relu"));
}

#[test]
fn a_failing_fused_op_is_named_by_its_place_in_the_users_net() {
    // A scale of the wrong size: the error names the batch norm's index in
    // the net as built, though the fused op ran in its place.
    let mut net = Net::new("bad");
    net.op("SpatialBN")
        .inputs(["x", "s", "b", "m", "v"])
        .output("y")
        .arg("is_test", 1i64)
        .build();
    net.op("Relu").input("y").output("r").build();
    let ws = Workspace::new();
    ws.feed("x", Tensor::from_vec([1, 2, 1, 1], vec![1.0f32, -1.0]).unwrap());
    ws.feed("s", Tensor::from_vec([3], vec![1.0f32; 3]).unwrap());
    for b in ["b", "m", "v"] {
        ws.feed(b, Tensor::from_vec([2], vec![0.5f32; 2]).unwrap());
    }
    let e = ws.run_net_once(net.proto()).unwrap_err().to_string();
    assert!(e.contains("op #0 `SpatialBN+Relu`") && e.contains("`s`"), "{e}");
    ws.feed("s", Tensor::from_vec([2], vec![1.0f32; 2]).unwrap());
    ws.run_net_once(net.proto()).unwrap();
    let r = ws.fetch("r").unwrap();
    let y = ws.fetch("y").unwrap();
    assert_eq!(r.data::<f32>().unwrap()[1], 0.0);
    assert!(
        y.data::<f32>().unwrap()[1] < 0.0,
        "Y keeps the values before the relu"
    );
}

/// `forward` on 2 CPU devices, 8 of [`cnn_batch`]'s images each, SGD with
/// momentum.
fn two_cpus(forward: impl ForwardBuilder + 'static, net_type: &str) -> Parallelize {
    let mut step = 0u64;
    Parallelize::new(ModelHelper::new("m"))
        .devices([Device::cpu(0), Device::cpu(1)])
        .input(move || {
            step += 1;
            Ok(cnn_batch(step, 8))
        })
        .forward(forward)
        .update(Sgd::new(0.1).momentum(0.9))
        .net_type(net_type)
}

/// A residual block on [`cnn_batch`]'s images: `relu(bn(conv(x)) + x)`.
#[dpm::data_parallel]
fn residual_cnn(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [3, 8, 8]);
    let label = m.input("label");
    let c = m.conv("c1", data, 4, 3).pad(1).build()?;
    let b = m.spatial_bn("bn1", c)?;
    let x = m.relu(b)?;
    let c = m.conv("c2", x, 4, 3).pad(1).build()?;
    let b = m.spatial_bn("bn2", c)?;
    let s = m.add("block_sum", b, x)?;
    let r = m.relu(s)?;
    let g = m.global_average_pool(r)?;
    let logits = m.fc("fc", g, 3)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

#[test]
fn training_a_residual_block_with_its_batch_norm_sum_and_relu_fused_gives_the_same_bits() {
    for net_type in ["dag", "simple"] {
        let build = || two_cpus(residual_cnn, net_type);
        let (f, a) = train_fused_and_apart(build, 3);
        // bn2 → add → relu is one op; bn1 → relu another.
        for t in ["SpatialBN+Sum+Relu", "SpatialBN+Relu"] {
            assert!(
                f.iter().any(|x| x == t) && !a.iter().any(|x| x == t),
                "{t}: {f:?}"
            );
        }
        assert!(
            !f.iter()
                .any(|x| ["Relu", "Add", "SpatialBN", "Sum+Relu"].contains(&x.as_str())),
            "{f:?}"
        );
    }
}

/// Three conv → batch norm → relu layers in a chain: with gradient memory
/// shared (as ResNet-20's example runs), batch norm gradients write their dX
/// over the blob their relu gradient read dR from.
#[dpm::data_parallel]
fn chain_cnn(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let mut x = m.input_with_shape("data", [3, 8, 8]);
    let label = m.input("label");
    for i in 0..3 {
        let c = m.conv(&format!("c{i}"), x, 4, 3).pad(1).build()?;
        let b = m.spatial_bn(&format!("bn{i}"), c)?;
        x = m.relu(b)?;
    }
    let g = m.global_average_pool(x)?;
    let logits = m.fc("fc", g, 3)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

#[test]
fn relu_gradients_fuse_where_the_batch_norm_gradient_writes_dx_over_dr() {
    for net_type in ["dag", "simple"] {
        let build = || two_cpus(chain_cnn, net_type).optimize_gradient_memory(true);
        // The premise: some batch norm gradient's dX is its relu's dR.
        let (_, net) = build().build_nets().unwrap();
        let aliased = net.op.iter().enumerate().filter(|(k, op)| {
            op.op_type() == "SpatialBNGradient"
                && net.op[..*k].iter().any(|rg| {
                    rg.op_type() == "ReluGradient"
                        && rg.output[0] == op.input[2]
                        && rg.input[1] == op.output[0]
                })
        });
        assert!(aliased.count() >= 2, "no dX written over dR");
        let (f, a) = train_fused_and_apart(build, 3);
        assert!(!f.iter().any(|x| x == "ReluGradient"), "{f:?}");
        assert!(a.iter().any(|x| x == "ReluGradient"), "{a:?}");
    }
}

#[test]
fn a_batch_norm_with_the_sum_and_relu_after_it_fused_gives_the_ops_bits() {
    // Training and inference batch norms, Y either term of the sum; a NaN in
    // X (its channel's statistics and outputs NaN), a NaN and ±0 in the other
    // term.
    for is_test in [0i64, 1] {
        for y_first in [true, false] {
            let mut net = Net::new("bn_sum");
            let outputs: &[&str] = if is_test == 1 {
                &["y"]
            } else {
                &["y", "rm", "riv", "sm", "siv"]
            };
            net.op("SpatialBN")
                .inputs(["x", "s", "b", "rm", "riv"])
                .outputs(outputs.iter().copied())
                .arg("is_test", is_test)
                .build();
            let terms = if y_first { ["y", "o"] } else { ["o", "y"] };
            net.op("Add").inputs(terms).output("sum").build();
            net.op("Relu").input("sum").output("r").build();
            let run = |fuse: bool| {
                let ws = Workspace::new();
                ws.set_profiling(true);
                let mut x = random(&[2, 3, 5, 7], 3, -1.0, 1.0, 0.0);
                x.data_mut::<f32>().unwrap()[40] = f32::NAN;
                ws.feed("x", x);
                let mut o = random(&[2, 3, 5, 7], 4, -1.0, 1.0, 0.0);
                let d = o.data_mut::<f32>().unwrap();
                (d[80], d[81], d[82]) = (f32::NAN, -0.0, 0.0);
                ws.feed("o", o);
                for (name, seed) in [("s", 5), ("b", 6), ("rm", 7)] {
                    ws.feed(name, random(&[3], seed, -1.0, 1.0, 0.0));
                }
                ws.feed("riv", random(&[3], 8, 0.5, 1.5, 0.0));
                ws.run_net_once(&fusing(net.proto(), fuse)).unwrap();
                ws
            };
            let (fused, apart) = (run(true), run(false));
            same_blobs(&fused, &apart);
            assert_eq!(op_types(&fused), ["SpatialBN+Sum+Relu"]);
            assert_eq!(op_types(&apart).len(), 3);
        }
    }
}

#[test]
fn a_fused_batch_norm_sum_and_relu_with_a_bad_term_fails_as_the_sum_before_any_statistic_moves() {
    // The other term of the wrong shape: the error names it and the sum's
    // place in the net, and the running statistics keep their values (the
    // term is checked before the batch norm updates them in place).
    let mut net = Net::new("bad_sum");
    net.op("SpatialBN")
        .inputs(["x", "s", "b", "rm", "riv"])
        .outputs(["y", "rm", "riv", "sm", "siv"])
        .build();
    net.op("Add").inputs(["y", "o"]).output("sum").build();
    net.op("Relu").input("sum").output("r").build();
    let ws = Workspace::new();
    ws.feed("x", random(&[2, 3, 4, 4], 1, -1.0, 1.0, 0.0));
    ws.feed("o", random(&[2, 3, 4, 5], 2, -1.0, 1.0, 0.0));
    for b in ["s", "b", "rm", "riv"] {
        ws.feed(b, Tensor::from_vec([3], vec![0.5f32; 3]).unwrap());
    }
    let e = ws.run_net_once(net.proto()).unwrap_err().to_string();
    assert!(
        e.contains("op #1 `SpatialBN+Sum+Relu`") && e.contains("`o`"),
        "{e}"
    );
    for b in ["rm", "riv"] {
        assert_eq!(ws.fetch(b).unwrap().data::<f32>().unwrap(), [0.5; 3]);
    }
}

#[test]
fn sums_of_one_to_three_inputs_and_their_relus_fused_give_the_same_bits() {
    // (Apart, each `Sum` writes a blob other than its first input: it reads
    // X0 itself and writes X0 + X1 in one pass, see `Kernel::reads_in_place_source`.)
    // Long enough for several blocks and a partial one; NaN, ±0 and both
    // signs among the inputs.
    let len = 5001;
    let mut net = Net::new("sums");
    let inputs = ["a", "b", "c"];
    for k in 1..=3 {
        let s = format!("s{k}");
        net.op("Sum")
            .inputs(inputs[..k].iter().copied())
            .output(&s)
            .build();
        net.op("Relu").input(&s).output(format!("r{k}")).build();
    }
    let run = |fuse: bool| {
        let ws = Workspace::new();
        ws.set_profiling(true);
        for (i, name) in inputs.iter().enumerate() {
            let mut x = random(&[len], 7 + i as u64, -1.0, 1.0, 0.0);
            let d = x.data_mut::<f32>().unwrap();
            d[17 * (i + 1)] = f32::NAN;
            d[100] = if i == 0 { -0.0 } else { 0.0 };
            ws.feed(*name, x);
        }
        ws.run_net_once(&fusing(net.proto(), fuse)).unwrap();
        ws
    };
    let (fused, apart) = (run(true), run(false));
    same_blobs(&fused, &apart);
    assert_eq!(op_types(&fused), ["Sum+Relu"]);
    // Against the definition too: the sums bitwise (in input order), the relu
    // of the last one.
    let get = |b: &str| fused.fetch(b).unwrap().data::<f32>().unwrap().to_vec();
    let (a, b, c) = (get("a"), get("b"), get("c"));
    let sums: [Vec<f32>; 3] = [
        a.clone(),
        (0..len).map(|i| a[i] + b[i]).collect(),
        (0..len).map(|i| a[i] + b[i] + c[i]).collect(),
    ];
    for (k, want) in sums.iter().enumerate() {
        let got = get(&format!("s{}", k + 1));
        for i in 0..len {
            assert!(
                got[i].to_bits() == want[i].to_bits() || (got[i].is_nan() && want[i].is_nan()),
                "s{}[{i}]: {} {}",
                k + 1,
                got[i],
                want[i]
            );
        }
    }
    for (i, &r) in get("r3").iter().enumerate() {
        let s = sums[2][i];
        let want = if s.is_nan() { s } else { s.max(0.0) };
        assert!(
            r.to_bits() == want.to_bits() || (r.is_nan() && want.is_nan()) || (r == 0.0 && want == 0.0),
            "{i}: {r} {want}"
        );
    }
}

#[test]
fn training_with_weight_decay_fused_into_the_momentum_update_gives_the_same_bits() {
    // small_cnn on 2 CPU devices, 4 steps, each executor, plain and Nesterov
    // momentum; biases and norms skipped by the decay in one of the runs.
    for (net_type, nesterov) in [("dag", false), ("simple", true)] {
        let build = || {
            let sgd = Sgd::new(0.1)
                .momentum(0.9)
                .nesterov(nesterov)
                .weight_decay(1e-2)
                .skip_decay_on_biases_and_norms(nesterov);
            small_cnn_parallelize(net_type, 5).update(sgd)
        };
        let (f, a) = train_fused_and_apart(build, 4);
        let t = "WeightedSum+MomentumSGDUpdate";
        assert!(f.iter().any(|x| x == t) && !a.iter().any(|x| x == t), "{f:?}");
        assert!(!f.iter().any(|x| x == "WeightedSum"), "{f:?}");
    }
}

/// The decay `g ← w0·g + wd·p` and a momentum update of `p` into `outputs`
/// (in place: `["g", "m", "p"]`).
fn decay_and_update(nesterov: bool, update_decay: f32, outputs: [&str; 3]) -> Net {
    let mut net = Net::new("update");
    net.op("WeightedSum")
        .inputs(["g", "w0", "p", "wd"])
        .output("g")
        .build();
    net.op("MomentumSGDUpdate")
        .inputs(["g", "m", "lr", "p"])
        .outputs(outputs)
        .arg("momentum", 0.9f32)
        .arg("nesterov", i64::from(nesterov))
        .arg("weight_decay", update_decay)
        .build();
    net
}

#[test]
fn the_fused_decay_and_update_give_the_ops_bits_on_every_kind_of_value() {
    // NaN, ±0 and ±∞ among gradients, moments and parameters; w0 of 1 (the
    // optimizers') and not; the update's own decay argument; long enough for
    // every vector width and a remainder.
    let len = 1037;
    for (nesterov, w0, update_decay) in [(false, 1.0, 0.0), (true, 1.0, 0.0), (false, 0.5, 1e-3)] {
        let net = decay_and_update(nesterov, update_decay, ["g", "m", "p"]);
        let run = |fuse: bool| {
            let ws = Workspace::new();
            ws.set_profiling(true);
            for (i, name) in ["g", "m", "p"].iter().enumerate() {
                let mut x = random(&[len], 11 + i as u64, -2.0, 2.0, 0.0);
                let d = x.data_mut::<f32>().unwrap();
                d[3 + i] = f32::NAN;
                d[10 + i] = f32::INFINITY;
                d[20 + i] = f32::NEG_INFINITY;
                d[30] = 0.0;
                d[31] = -0.0;
                d[32] = if i == 0 { -0.0 } else { 0.0 };
                ws.feed(*name, x);
            }
            for (name, v) in [("w0", w0), ("wd", 1e-2f32), ("lr", 0.1)] {
                ws.feed(name, Tensor::from_vec([1], vec![v]).unwrap());
            }
            ws.run_net_once(&fusing(net.proto(), fuse)).unwrap();
            ws
        };
        let (fused, apart) = (run(true), run(false));
        same_blobs(&fused, &apart);
        assert_eq!(op_types(&fused), ["WeightedSum+MomentumSGDUpdate"]);
        assert_eq!(op_types(&apart).len(), 2);
    }
}

#[test]
fn a_fused_update_that_fails_names_the_update_and_changes_nothing() {
    // A moment of the wrong size: the error names the update (whose place the
    // fused op takes), and the gradient, moment and parameter keep their values.
    let net = decay_and_update(false, 0.0, ["g", "m", "p"]);
    let ws = Workspace::new();
    ws.feed("g", Tensor::from_vec([3], vec![1.0f32, 2.0, 3.0]).unwrap());
    ws.feed("p", Tensor::from_vec([3], vec![4.0f32, 5.0, 6.0]).unwrap());
    ws.feed("m", Tensor::from_vec([2], vec![7.0f32, 8.0]).unwrap());
    for name in ["w0", "wd", "lr"] {
        ws.feed(name, Tensor::from_vec([1], vec![0.5f32]).unwrap());
    }
    let before: Vec<Tensor> = ["g", "m", "p"].iter().map(|b| ws.fetch(b).unwrap()).collect();
    let e = ws.run_net_once(net.proto()).unwrap_err().to_string();
    assert!(
        e.contains("op #1 `WeightedSum+MomentumSGDUpdate`") && e.contains("`m`"),
        "{e}"
    );
    for (b, t) in ["g", "m", "p"].iter().zip(&before) {
        assert!(ws.fetch(b).unwrap().bitwise_eq(t), "`{b}` changed");
    }
    // A parameter of another shape than its gradient: named as WeightedSum would.
    ws.feed("m", Tensor::from_vec([3], vec![0.0f32; 3]).unwrap());
    ws.feed("p", Tensor::from_vec([1, 3], vec![4.0f32, 5.0, 6.0]).unwrap());
    let e = ws.run_net_once(net.proto()).unwrap_err().to_string();
    assert!(e.contains("`p`"), "{e}");
    assert!(ws.fetch("g").unwrap().bitwise_eq(&before[0]), "`g` changed");
}

#[test]
fn updates_that_write_other_blobs_leave_their_inputs_and_compute_the_same() {
    // Caffe2 runs MomentumSGDUpdate only in place; dpm copies the inputs into
    // the outputs first, for the update and the fused kernel alike (a net may
    // name the fused type itself).
    let len = 37;
    let feed = |ws: &Workspace| {
        for (i, name) in ["g", "m", "p"].iter().enumerate() {
            ws.feed(*name, random(&[len], 21 + i as u64, -1.0, 1.0, 0.0));
        }
        for (name, v) in [("w0", 1.0f32), ("wd", 1e-2), ("lr", 0.1)] {
            ws.feed(name, Tensor::from_vec([1], vec![v]).unwrap());
        }
    };
    let in_place = Workspace::new();
    feed(&in_place);
    in_place
        .run_net_once(decay_and_update(false, 0.0, ["g", "m", "p"]).proto())
        .unwrap();
    for fused in [false, true] {
        let mut net = decay_and_update(false, 0.0, ["g2", "m2", "p2"]);
        if fused {
            net = Net::new("out_of_place");
            net.op("WeightedSum+MomentumSGDUpdate")
                .inputs(["g", "w0", "p", "wd", "m", "lr"])
                .outputs(["g2", "m2", "p2"])
                .arg("momentum", 0.9f32)
                .build();
        }
        let ws = Workspace::new();
        feed(&ws);
        let before: Vec<Tensor> = ["m", "p"].iter().map(|b| ws.fetch(b).unwrap()).collect();
        ws.run_net_once(&fusing(net.proto(), false)).unwrap();
        for (b, t) in ["m", "p"].iter().zip(&before) {
            assert!(ws.fetch(b).unwrap().bitwise_eq(t), "fused {fused}: `{b}` changed");
        }
        for (out, want) in [("g2", "g"), ("m2", "m"), ("p2", "p")] {
            assert!(
                ws.fetch(out).unwrap().bitwise_eq(&in_place.fetch(want).unwrap()),
                "fused {fused}: `{out}`"
            );
        }
    }
}

/// Per channel of `[N, C, …]` data: the f64 sums of `f(i)` over its elements.
fn channel_sums(shape: &[usize], f: impl Fn(usize) -> f64) -> Vec<f64> {
    let (c, hw): (usize, usize) = (shape[1], shape[2..].iter().product());
    let mut s = vec![0.0; c];
    for i in 0..shape.iter().product() {
        s[(i / hw) % c] += f(i);
    }
    s
}

#[test]
fn batch_norms_of_planes_larger_than_a_channel_group_match_the_formulas_fused_and_apart() {
    // The gradient passes over ~128 KiB of each tensor a group of channels at
    // a time: two channels a group and a last group of one ([4, 5, 64, 64]),
    // one channel a group ([40, 3, 32, 32]). Training, then back through the
    // relu with dX written over dR (the fused gradient's in-place case); the
    // forward with and without the residual sum; dY read at the end, or
    // overwritten unread (shared gradient memory: the fused kernel then
    // never writes it).
    for shape in [[4usize, 5, 64, 64], [40, 3, 32, 32]] {
        for (residual, dy_seen) in [(false, true), (true, true), (true, false)] {
            let c = shape[1];
            let mut net = Net::new("bn_large");
            net.op("SpatialBN")
                .inputs(["x", "s", "b", "rm", "rv"])
                .outputs(["y", "rm", "rv", "sm", "siv"])
                .build();
            let pre = if residual {
                net.op("Add").inputs(["y", "o"]).output("sum").build();
                "sum"
            } else {
                "y"
            };
            net.op("Relu").input(pre).output("r").build();
            net.op("ReluGradient").inputs(["r", "dr"]).output("dy").build();
            net.op("SpatialBNGradient")
                .inputs(["x", "s", "dy", "sm", "siv"])
                .outputs(["dr", "ds", "db"])
                .build();
            if !dy_seen {
                net.op("Copy").input("x").output("dy").build();
            }
            let (x, o, dr) = (
                random(&shape, 11, -1.0, 3.0, 0.0),
                random(&shape, 12, -1.0, 1.0, 0.0),
                random(&shape, 13, -1.0, 1.0, 0.0),
            );
            let (s, b) = (random(&[c], 14, 0.5, 1.5, 0.0), random(&[c], 15, -1.0, 1.0, 0.0));
            let run = |fuse: bool| {
                let ws = Workspace::new();
                ws.set_profiling(true);
                for (name, t) in [("x", &x), ("o", &o), ("dr", &dr), ("s", &s), ("b", &b)] {
                    ws.feed(name, t.clone());
                }
                ws.feed("rm", Tensor::zeros::<f32>([c]));
                ws.feed("rv", Tensor::from_vec([c], vec![1.0f32; c]).unwrap());
                ws.run_net_once(&fusing(net.proto(), fuse)).unwrap();
                ws
            };
            let (fused, apart) = (run(true), run(false));
            same_blobs(&fused, &apart);
            let fused_types = op_types(&fused);
            for t in [
                "ReluGradient+SpatialBNGradient",
                if residual {
                    "SpatialBN+Sum+Relu"
                } else {
                    "SpatialBN+Relu"
                },
            ] {
                assert!(fused_types.iter().any(|x| x == t), "{t}: {fused_types:?}");
            }

            // The formulas, in f64.
            let get = |name: &str| fused.fetch(name).unwrap().data::<f32>().unwrap().to_vec();
            let (xv, ov, drv, sv, bv) = (
                x.data::<f32>().unwrap(),
                o.data::<f32>().unwrap(),
                dr.data::<f32>().unwrap(),
                s.data::<f32>().unwrap(),
                b.data::<f32>().unwrap(),
            );
            let hw: usize = shape[2..].iter().product();
            let ch = |i: usize| (i / hw) % c;
            let count = (shape[0] * hw) as f64;
            let mean: Vec<f64> = channel_sums(&shape, |i| f64::from(xv[i]))
                .iter()
                .map(|s| s / count)
                .collect();
            let var: Vec<f64> = channel_sums(&shape, |i| (f64::from(xv[i]) - mean[ch(i)]).powi(2))
                .iter()
                .map(|s| s / count)
                .collect();
            let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
            let xhat = |i: usize| (f64::from(xv[i]) - mean[ch(i)]) * inv[ch(i)];
            let close = |name: &str, got: &[f32], want: &dyn Fn(usize) -> f64, tol: f64| {
                for (i, &g) in got.iter().enumerate() {
                    let w = want(i);
                    assert!(
                        (f64::from(g) - w).abs() <= tol * (1.0 + w.abs()),
                        "{name}[{i}]: {g} against {w}"
                    );
                }
            };
            close("sm", &get("sm"), &|k| mean[k], 1e-5);
            close("siv", &get("siv"), &|k| inv[k], 1e-5);
            close("rm", &get("rm"), &|k| 0.1 * mean[k], 1e-5);
            close(
                "rv",
                &get("rv"),
                &|k| 0.9 + 0.1 * var[k] * count / (count - 1.0),
                1e-5,
            );
            let y = |i: usize| xhat(i) * f64::from(sv[ch(i)]) + f64::from(bv[ch(i)]);
            close("y", &get("y"), &y, 1e-4);
            let pre = |i: usize| if residual { y(i) + f64::from(ov[i]) } else { y(i) };
            close("r", &get("r"), &|i| pre(i).max(0.0), 1e-4);
            let dy = |i: usize| if pre(i) > 0.0 { f64::from(drv[i]) } else { 0.0 };
            if dy_seen {
                close("dy", &get("dy"), &dy, 0.0);
            }
            let db = channel_sums(&shape, dy);
            let ds = channel_sums(&shape, |i| dy(i) * xhat(i));
            close("db", &get("db"), &|k| db[k], 1e-4);
            close("ds", &get("ds"), &|k| ds[k], 1e-4);
            let dx = |i: usize| {
                let k = ch(i);
                f64::from(sv[k]) * inv[k] * (dy(i) - db[k] / count - xhat(i) * ds[k] / count)
            };
            close("dx", &get("dr"), &dx, 1e-4);
        }
    }
}

#[test]
fn a_residual_gradient_sum_fused_with_the_relu_and_batch_norm_gradients_gives_the_ops_bits() {
    // A residual block's backward under shared gradient memory: the sum of
    // the two paths' gradients A + B is the relu's dR; the relu gradient
    // writes dY over A, the batch norm gradient dX over B, and the sum's
    // blob is overwritten unread. dY then read at the end, or overwritten
    // unread too (left unwritten by the fused op); training and inference;
    // several channel groups ([4, 5, 64, 64]) and one ([2, 3, 5, 7]).
    // Either term first (the first and the second term each in dY's blob).
    for shape in [[4usize, 5, 64, 64], [2, 3, 5, 7]] {
        for (dy_seen, is_test, terms) in [
            (true, 0i64, ["a", "b"]),
            (false, 0, ["a", "b"]),
            (true, 1, ["a", "b"]),
            (true, 0, ["b", "a"]),
        ] {
            let c = shape[1];
            let mut net = Net::new("residual_gradient");
            net.op("Sum").inputs(terms).output("s").build();
            net.op("ReluGradient").inputs(["r", "s"]).output("a").build();
            net.op("SpatialBNGradient")
                .inputs(["x", "sc", "a", "sm", "siv"])
                .outputs(["b", "ds", "db"])
                .arg("is_test", is_test)
                .build();
            net.op("Copy").input("x").output("s").build();
            if !dy_seen {
                net.op("Copy").input("r").output("a").build();
            }
            let run = |fuse: bool| {
                let ws = Workspace::new();
                ws.set_profiling(true);
                let mut r = random(&shape, 21, -1.0, 1.0, 0.0);
                r.data_mut::<f32>().unwrap()[5] = 0.0;
                ws.feed("r", r);
                let mut a = random(&shape, 22, -1.0, 1.0, 0.0);
                (a.data_mut::<f32>().unwrap()[7], a.data_mut::<f32>().unwrap()[8]) = (f32::NAN, -0.0);
                ws.feed("a", a);
                ws.feed("b", random(&shape, 23, -1.0, 1.0, 0.0));
                ws.feed("x", random(&shape, 24, -1.0, 3.0, 0.0));
                ws.feed("sc", random(&[c], 25, 0.5, 1.5, 0.0));
                ws.feed("sm", random(&[c], 26, 0.5, 1.5, 0.0));
                ws.feed("siv", random(&[c], 27, 0.5, 1.5, 0.0));
                ws.run_net_once(&fusing(net.proto(), fuse)).unwrap();
                ws
            };
            let (fused, apart) = (run(true), run(false));
            same_blobs(&fused, &apart);
            let types = op_types(&fused);
            assert!(
                types.iter().any(|t| t == "Sum+ReluGradient+SpatialBNGradient")
                    && !types.iter().any(|t| t == "Sum" || t == "ReluGradient"),
                "{types:?}"
            );
        }
    }
}
