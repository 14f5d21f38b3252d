//! Convolution, batch norm, pooling and reshaping: gradients against finite
//! differences, and results against naive reference loops on random shapes.

mod common;

use common::{gradcheck, op_net, random};
use dpm::ops::cpu::rng::Rng;
use dpm::prelude::*;

/// Distinct, well-separated values (no ties for max pooling, no kinks crossed).
fn separated(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 0.05).collect();
    let mut rng = Rng::new(seed);
    for i in (1..n).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    Tensor::from_vec(shape.to_vec(), v).unwrap()
}

fn conv_case(x: [usize; 4], m: usize, k: usize, args: &[(&str, i64)], bias: bool) {
    let g = args
        .iter()
        .find(|(n, _)| *n == "group")
        .map_or(1, |a| a.1 as usize);
    let mut inputs = vec!["x", "w"];
    let mut feeds = vec![
        ("x", random(&x, 1, -1.0, 1.0, 0.0)),
        ("w", random(&[m, x[1] / g, k, k], 2, -1.0, 1.0, 0.0)),
    ];
    if bias {
        inputs.push("b");
        feeds.push(("b", random(&[m], 3, -1.0, 1.0, 0.0)));
    }
    let mut all_args = vec![("kernel", k as i64)];
    all_args.extend_from_slice(args);
    let net = op_net("Conv", &inputs, &["y"], &all_args);
    gradcheck(&net, &feeds, &["y"], &inputs);
}

#[test]
fn conv_gradients() {
    conv_case([2, 3, 5, 5], 4, 3, &[("pad", 1)], true); // 3×3, padded
    conv_case([2, 2, 7, 6], 3, 3, &[("stride", 2), ("pad", 1)], false); // strided
    conv_case([2, 4, 4, 4], 3, 1, &[], true); // 1×1 (no im2col)
    conv_case([1, 4, 6, 6], 5, 1, &[("stride", 2)], false); // 1×1 strided (ResNet shortcut)
    conv_case([2, 4, 5, 5], 6, 3, &[("group", 2), ("pad", 1)], true); // grouped
    conv_case(
        [1, 2, 6, 5],
        2,
        2,
        &[("pad_t", 1), ("pad_l", 0), ("pad_b", 0), ("pad_r", 1)],
        true,
    ); // asymmetric pad
}

#[test]
fn spatial_bn_gradients_in_both_modes() {
    let c = 3;
    let feeds = [
        ("x", random(&[4, c, 3, 2], 4, -2.0, 2.0, 0.0)),
        ("scale", random(&[c], 5, 0.5, 1.5, 0.0)),
        ("bias", random(&[c], 6, -1.0, 1.0, 0.0)),
        ("rm", random(&[c], 7, -0.5, 0.5, 0.0)),
        ("rv", random(&[c], 8, 0.5, 1.5, 0.0)),
    ];
    let train = op_net(
        "SpatialBN",
        &["x", "scale", "bias", "rm", "rv"],
        &["y", "rm", "rv", "sm", "siv"],
        &[],
    );
    gradcheck(&train, &feeds, &["y"], &["x", "scale", "bias"]);
    let test = op_net(
        "SpatialBN",
        &["x", "scale", "bias", "rm", "rv"],
        &["y"],
        &[("is_test", 1)],
    );
    gradcheck(&test, &feeds, &["y"], &["x", "scale", "bias"]);
}

#[test]
fn spatial_bn_normalises_and_tracks_running_statistics() {
    let x = random(&[8, 2, 4, 4], 9, -3.0, 5.0, 0.0);
    let ws = Workspace::new();
    ws.feed("x", x.clone());
    ws.feed("scale", Tensor::from_vec([2], vec![1.0f32, 1.0]).unwrap());
    ws.feed("bias", Tensor::from_vec([2], vec![0.0f32, 0.0]).unwrap());
    ws.feed("rm", Tensor::from_vec([2], vec![0.0f32, 0.0]).unwrap());
    ws.feed("rv", Tensor::from_vec([2], vec![1.0f32, 1.0]).unwrap());
    let mut net = op_net(
        "SpatialBN",
        &["x", "scale", "bias", "rm", "rv"],
        &["y", "rm", "rv", "sm", "siv"],
        &[],
    );
    net.proto_mut().op[0]
        .arg
        .push(dpm::graph::ArgValue::Float(0.5).to_proto("momentum"));
    ws.run_net_once(net.proto()).unwrap();
    let y = ws.fetch("y").unwrap();
    let yd = y.data::<f32>().unwrap();
    let xd = x.data::<f32>().unwrap();
    for ch in 0..2 {
        let vals: Vec<f32> = (0..8)
            .flat_map(|n| yd[(n * 2 + ch) * 16..(n * 2 + ch + 1) * 16].to_vec())
            .collect();
        let mean: f32 = vals.iter().sum::<f32>() / vals.len() as f32;
        let var: f32 = vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / vals.len() as f32;
        assert!(
            mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3,
            "channel {ch}: mean {mean} var {var}"
        );
        let raw: Vec<f32> = (0..8)
            .flat_map(|n| xd[(n * 2 + ch) * 16..(n * 2 + ch + 1) * 16].to_vec())
            .collect();
        let m: f32 = raw.iter().sum::<f32>() / raw.len() as f32;
        let rm = ws.fetch("rm").unwrap().data::<f32>().unwrap()[ch];
        assert!((rm - 0.5 * m).abs() < 1e-5, "running mean {rm} vs {}", 0.5 * m);
        // The running variance tracks the unbiased batch variance (n / (n − 1)),
        // as Caffe2's SpatialBN and PyTorch do; normalisation uses the biased one.
        let v: f32 = raw.iter().map(|x| (x - m).powi(2)).sum::<f32>() / raw.len() as f32;
        let rv = ws.fetch("rv").unwrap().data::<f32>().unwrap()[ch];
        let n = raw.len() as f32;
        let want = 0.5 * 1.0 + 0.5 * v * n / (n - 1.0);
        assert!((rv - want).abs() < 1e-4 * want, "running variance {rv} vs {want}");
        // The saved statistics are the batch's: mean and 1 / sqrt(var + epsilon).
        let sm = ws.fetch("sm").unwrap().data::<f32>().unwrap()[ch];
        let siv = ws.fetch("siv").unwrap().data::<f32>().unwrap()[ch];
        assert!((sm - m).abs() < 1e-5 && (siv - 1.0 / (v + 1e-5).sqrt()).abs() < 1e-4 * siv);
    }
}

#[test]
fn pooling_and_reshape_gradients() {
    let x = separated(&[2, 3, 6, 5], 10);
    let feeds = [("x", x)];
    for args in [
        vec![("kernel", 2), ("stride", 2)],
        vec![("kernel", 3), ("stride", 2), ("pad", 1)],
    ] {
        gradcheck(&op_net("MaxPool", &["x"], &["y"], &args), &feeds, &["y"], &["x"]);
        gradcheck(
            &op_net("AveragePool", &["x"], &["y"], &args),
            &feeds,
            &["y"],
            &["x"],
        );
    }
    gradcheck(
        &op_net("AveragePool", &["x"], &["y"], &[("global_pooling", 1)]),
        &feeds,
        &["y"],
        &["x"],
    );
    gradcheck(
        &op_net("MaxPool", &["x"], &["y"], &[("global_pooling", 1)]),
        &feeds,
        &["y"],
        &["x"],
    );
    gradcheck(&op_net("Flatten", &["x"], &["y"], &[]), &feeds, &["y"], &["x"]);
    let mut reshape = Net::new("r");
    reshape
        .op("Reshape")
        .input("x")
        .output("y")
        .arg("shape", vec![0i64, -1, 5])
        .build();
    gradcheck(&reshape, &feeds, &["y"], &["x"]);
}

// ---------- naive references ----------

struct ConvCase {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    m: usize,
    k: (usize, usize),
    s: (usize, usize),
    p: usize,
    g: usize,
}

impl ConvCase {
    fn out(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.p - self.k.0) / self.s.0 + 1,
            (self.w + 2 * self.p - self.k.1) / self.s.1 + 1,
        )
    }

    /// Direct loops: forward Y, and for a given dY the gradients dX, dW.
    fn reference(&self, x: &[f32], wt: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (oh, ow) = self.out();
        let (cg, mg) = (self.c / self.g, self.m / self.g);
        let mut y = vec![0.0f32; self.n * self.m * oh * ow];
        let mut dx = vec![0.0f32; x.len()];
        let mut dw = vec![0.0f32; wt.len()];
        for n in 0..self.n {
            for m in 0..self.m {
                let g = m / mg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let yi = ((n * self.m + m) * oh + oy) * ow + ox;
                        for ci in 0..cg {
                            let c = g * cg + ci;
                            for ki in 0..self.k.0 {
                                for kj in 0..self.k.1 {
                                    let iy = (oy * self.s.0 + ki) as isize - self.p as isize;
                                    let ix = (ox * self.s.1 + kj) as isize - self.p as isize;
                                    if iy < 0 || ix < 0 || iy >= self.h as isize || ix >= self.w as isize {
                                        continue;
                                    }
                                    let xi = ((n * self.c + c) * self.h + iy as usize) * self.w + ix as usize;
                                    let wi = ((m * cg + ci) * self.k.0 + ki) * self.k.1 + kj;
                                    y[yi] += x[xi] * wt[wi];
                                    dx[xi] += dy[yi] * wt[wi];
                                    dw[wi] += dy[yi] * x[xi];
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dx, dw)
    }
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
    }
}

/// Runs Conv and ConvGradient on random data, with each engine (dpm's choice,
/// `DIRECT` and `IM2COL`), and compares with the naive loops.
fn check_against_reference(c: &ConvCase, seed: u64) {
    check_with_threads(c, seed, 1);
}

/// The three engines, their kernels splitting the batch over `threads`.
fn check_with_threads(c: &ConvCase, seed: u64, threads: usize) {
    for engine in ["", "DIRECT", "IM2COL"] {
        check_engine(c, seed, engine, threads);
    }
}

fn check_engine(c: &ConvCase, seed: u64, engine: &str, threads: usize) {
    let (oh, ow) = c.out();
    let (k, g) = (c.k, c.g);
    let x = random(&[c.n, c.c, c.h, c.w], seed, -1.0, 1.0, 0.0);
    let wt = random(&[c.m, c.c / g, k.0, k.1], seed + 100, -1.0, 1.0, 0.0);
    let dy = random(&[c.n, c.m, oh, ow], seed + 200, -1.0, 1.0, 0.0);
    let (ry, rdx, rdw) = c.reference(x.data().unwrap(), wt.data().unwrap(), dy.data().unwrap());
    let ws = Workspace::new();
    ws.set_kernel_threads(threads);
    ws.feed("x", x);
    ws.feed("w", wt);
    ws.feed("dy", dy);
    let mut net = Net::new("c");
    fn args<'n>(b: dpm::graph::OpBuilder<'n>, c: &ConvCase, engine: &str) -> dpm::graph::OpBuilder<'n> {
        b.engine(engine)
            .arg("kernel_h", c.k.0)
            .arg("kernel_w", c.k.1)
            .arg("stride_h", c.s.0)
            .arg("stride_w", c.s.1)
            .arg("pad", c.p)
            .arg("group", c.g)
    }
    args(net.op("Conv").inputs(["x", "w"]).output("y"), c, engine).build();
    args(
        net.op("ConvGradient")
            .inputs(["x", "w", "dy"])
            .outputs(["dw", "dx"])
            .arg("no_bias", 1i64),
        c,
        engine,
    )
    .build();
    ws.run_net_once(net.proto()).unwrap();
    let what = format!(
        "seed {seed}, engine {engine:?}, {threads} threads: N{} C{} {}×{} M{} k{:?} s{:?} p{} g{}",
        c.n, c.c, c.h, c.w, c.m, k, c.s, c.p, g
    );
    close(ws.fetch("y").unwrap().data().unwrap(), &ry, &format!("{what} y"));
    close(
        ws.fetch("dx").unwrap().data().unwrap(),
        &rdx,
        &format!("{what} dx"),
    );
    close(
        ws.fetch("dw").unwrap().data().unwrap(),
        &rdw,
        &format!("{what} dw"),
    );
}

#[test]
fn conv_matches_the_naive_reference_on_random_shapes() {
    let mut rng = Rng::new(42);
    let mut pick = |lo: usize, hi: usize| lo + (rng.next_u64() % (hi - lo + 1) as u64) as usize;
    for case in 0..40 {
        let g = [1, 1, 2, 3][pick(0, 3)];
        let k = (pick(1, 3), pick(1, 3));
        let c = ConvCase {
            n: pick(1, 3),
            c: g * pick(1, 3),
            h: pick(k.0.max(2), 9),
            w: pick(k.1.max(2), 9),
            m: g * pick(1, 4),
            k,
            s: (pick(1, 2), pick(1, 2)),
            p: pick(0, 1),
            g,
        };
        check_against_reference(&c, case);
    }
}

/// Shapes that fill whole register tiles and leave remainders (more than 6 output
/// channels, rows wider than 8 pixels), strides larger than the kernel (phases no
/// tap reads), long reductions, and the multi-threaded split of the batch.
#[test]
fn conv_matches_the_naive_reference_on_larger_shapes_and_threads() {
    let case = |n, c, h, w, m, k, s, p, g| ConvCase {
        n,
        c,
        h,
        w,
        m,
        k,
        s,
        p,
        g,
    };
    let cases = [
        case(3, 5, 19, 19, 13, (3, 3), (2, 2), 1, 1),
        case(2, 16, 12, 20, 7, (3, 3), (1, 1), 1, 1),
        case(2, 6, 11, 17, 14, (1, 1), (1, 1), 0, 2),
        case(3, 4, 13, 10, 9, (1, 1), (3, 2), 0, 1),
        case(2, 3, 16, 16, 8, (5, 5), (3, 3), 2, 1),
        case(4, 4, 10, 18, 6, (2, 2), (2, 2), 0, 1),
        case(5, 9, 8, 8, 12, (3, 3), (1, 1), 1, 3),
        // 1×1 stride-2 shortcuts, whose tiles read x (and dX's read dY) in
        // place: channels 4 KiB apart (the forward lays them out, dW reads in
        // place), 1 KiB apart (both in place), 6 KiB apart with rows of three
        // segments; rows of part-filled segments (laid out, dY copied); stride
        // 2 across only; and two groups.
        case(3, 16, 32, 32, 32, (1, 1), (2, 2), 0, 1),
        case(3, 12, 16, 16, 20, (1, 1), (2, 2), 0, 1),
        case(2, 7, 32, 48, 9, (1, 1), (2, 2), 0, 1),
        case(2, 5, 28, 28, 7, (1, 1), (2, 2), 0, 1),
        case(2, 6, 8, 32, 10, (1, 1), (1, 2), 0, 1),
        case(2, 8, 16, 16, 12, (1, 1), (2, 2), 0, 2),
        // Long reductions, forward and for dX.
        case(2, 17, 10, 10, 18, (3, 3), (2, 2), 1, 1),
        case(1, 60, 6, 6, 8, (3, 3), (1, 1), 1, 1),
        case(1, 8, 6, 6, 60, (3, 3), (1, 1), 1, 1),
    ];
    // The workspace's kernel threads, not the calling thread's setting, are
    // what its nets' kernels get.
    for threads in [1, 3] {
        for (i, c) in cases.iter().enumerate() {
            check_with_threads(c, 1000 + i as u64, threads);
        }
    }
}

#[test]
fn pooling_matches_the_naive_reference() {
    let x = random(&[2, 3, 7, 6], 77, -1.0, 1.0, 0.0);
    let xd = x.data::<f32>().unwrap().to_vec();
    let ws = Workspace::new();
    ws.feed("x", x);
    let mut net = Net::new("p");
    net.op("MaxPool")
        .input("x")
        .output("mx")
        .arg("kernel", 3i64)
        .arg("stride", 2i64)
        .arg("pad", 1i64)
        .build();
    net.op("AveragePool")
        .input("x")
        .output("av")
        .arg("kernel", 3i64)
        .arg("stride", 2i64)
        .arg("pad", 1i64)
        .build();
    ws.run_net_once(net.proto()).unwrap();
    let (mx, av) = (ws.fetch("mx").unwrap(), ws.fetch("av").unwrap());
    assert_eq!(mx.dims(), &[2, 3, 4, 3]);
    for plane in 0..6usize {
        for oy in 0..4usize {
            for ox in 0..3usize {
                let mut vals = Vec::new();
                for iy in (oy * 2).saturating_sub(1)..(oy * 2 + 2).min(7) {
                    for ix in (ox * 2).saturating_sub(1)..(ox * 2 + 2).min(6) {
                        vals.push(xd[plane * 42 + iy * 6 + ix]);
                    }
                }
                let i = plane * 12 + oy * 3 + ox;
                let max = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mean = vals.iter().sum::<f32>() / vals.len() as f32;
                assert_eq!(mx.data::<f32>().unwrap()[i], max);
                assert!((av.data::<f32>().unwrap()[i] - mean).abs() < 1e-6);
            }
        }
    }
}

#[test]
fn bad_convolutions_are_clear_errors() {
    let ws = Workspace::new();
    ws.feed("x", Tensor::zeros::<f32>([1, 3, 4, 4]));
    ws.feed("w", Tensor::zeros::<f32>([8, 2, 3, 3]));
    let net = op_net("Conv", &["x", "w"], &["y"], &[("kernel", 3)]);
    let e = ws.run_net_once(net.proto()).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("[8, 2, 3, 3]"), "{e}");
    let net = op_net("Conv", &["x", "w"], &["y"], &[("kernel", 9)]);
    assert!(ws.run_net_once(net.proto()).is_err());
    assert!(ws
        .create_net(op_net("Conv", &["x", "w"], &["y"], &[]).proto())
        .unwrap_err()
        .to_string()
        .contains("kernel"));
    assert!(ws
        .create_net(op_net("Conv", &["x", "w"], &["y"], &[("kernel", 3), ("dilation", 2)]).proto())
        .is_err());
    // No input channel, or no output channel: refused, forward and backward
    // (the kernels once panicked or left dX unwritten).
    for (x, w, blob) in [
        ([1, 0, 4, 4], [8, 0, 3, 3], "`x`"),
        ([1, 3, 4, 4], [0, 3, 3, 3], "`w`"),
    ] {
        ws.feed("x", Tensor::zeros::<f32>(x));
        ws.feed("w", Tensor::zeros::<f32>(w));
        ws.feed("dy", Tensor::zeros::<f32>([1, w[0], 2, 2]));
        let fwd = op_net("Conv", &["x", "w"], &["y"], &[("kernel", 3)]);
        let bwd = op_net(
            "ConvGradient",
            &["x", "w", "dy"],
            &["dw", "dx"],
            &[("kernel", 3), ("no_bias", 1)],
        );
        for net in [fwd, bwd] {
            let e = ws.run_net_once(net.proto()).unwrap_err().to_string();
            assert!(e.contains(blob) && e.contains("≥ 1"), "{e}");
        }
    }
}

#[test]
fn spatial_bn_is_accurate_when_the_mean_dwarfs_the_spread() {
    let noise = random(&[16, 1, 8, 8], 31, -0.05, 0.05, 0.0);
    let x: Vec<f32> = noise.data::<f32>().unwrap().iter().map(|v| 1000.0 + v).collect();
    let ws = Workspace::new();
    ws.feed("x", Tensor::from_vec([16, 1, 8, 8], x).unwrap());
    ws.feed("scale", Tensor::from_vec([1], vec![1.0f32]).unwrap());
    ws.feed("bias", Tensor::from_vec([1], vec![0.0f32]).unwrap());
    ws.feed("rm", Tensor::from_vec([1], vec![0.0f32]).unwrap());
    ws.feed("rv", Tensor::from_vec([1], vec![1.0f32]).unwrap());
    let net = op_net(
        "SpatialBN",
        &["x", "scale", "bias", "rm", "rv"],
        &["y", "rm", "rv", "sm", "siv"],
        &[],
    );
    ws.run_net_once(net.proto()).unwrap();
    let y = ws.fetch("y").unwrap();
    let yd = y.data::<f32>().unwrap();
    let mean = yd.iter().sum::<f32>() / yd.len() as f32;
    let var = yd.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / yd.len() as f32;
    assert!(
        mean.abs() < 1e-2 && (var - 1.0).abs() < 2e-2,
        "mean {mean} var {var}"
    );
}

/// Channel `ch` of an `[n, c, …]` tensor, as an `[n, 1, …]` one.
fn channel(t: &Tensor, ch: usize) -> Tensor {
    let d = t.dims();
    let plane: usize = d[2..].iter().product();
    let v: Vec<f32> = t
        .data::<f32>()
        .unwrap()
        .chunks(plane)
        .skip(ch)
        .step_by(d[1])
        .flatten()
        .copied()
        .collect();
    let mut shape = d.to_vec();
    shape[1] = 1;
    Tensor::from_vec(shape, v).unwrap()
}

#[test]
fn batch_norm_of_a_large_tensor_gives_each_channel_the_bits_it_gets_alone() {
    // Tensors of 320 KiB, about 2 MiB in all that the passes touch: each channel is
    // normalised, and its gradient taken, with its own statistics only, summed
    // in the same order as for the channel alone. Forward and backward, fused
    // with relu and apart, training and inference.
    let (n, c, side) = (4, 5, 64);
    let full = [
        ("x", random(&[n, c, side, side], 41, -2.0, 3.0, 0.0)),
        ("scale", random(&[c], 42, 0.5, 1.5, 0.0)),
        ("bias", random(&[c], 43, -1.0, 1.0, 0.0)),
        ("rm", random(&[c], 44, -0.5, 0.5, 0.0)),
        ("rv", random(&[c], 45, 0.5, 1.5, 0.0)),
        ("dr", random(&[n, c, side, side], 46, -1.0, 1.0, 0.0)),
    ];
    for (is_test, fuse) in [(0i64, 1i64), (0, 0), (1, 1)] {
        let mut net = Net::new("bn");
        net.set_arg("dpm_fuse", fuse);
        let outs: &[&str] = if is_test == 1 {
            &["y"]
        } else {
            &["y", "rm", "rv", "sm", "siv"]
        };
        net.op("SpatialBN")
            .inputs(["x", "scale", "bias", "rm", "rv"])
            .outputs(outs.iter().copied())
            .arg("is_test", is_test)
            .build();
        net.op("Relu").input("y").output("r").build();
        net.op("ReluGradient").inputs(["r", "dr"]).output("dy").build();
        let stats = if is_test == 1 { ["rm", "rv"] } else { ["sm", "siv"] };
        net.op("SpatialBNGradient")
            .inputs(["x", "scale", "dy", stats[0], stats[1]])
            .outputs(["dx", "dscale", "dbias"])
            .arg("is_test", is_test)
            .build();
        let run = |feeds: &[(&str, Tensor)]| {
            let ws = Workspace::new();
            ws.set_profiling(true);
            for (k, v) in feeds {
                ws.feed(*k, v.clone());
            }
            ws.run_net_once(net.proto()).unwrap();
            ws
        };
        let whole = run(&full);
        let ran: Vec<String> = whole.op_times().into_iter().map(|(t, _)| t).collect();
        assert_eq!(ran.iter().any(|t| t.contains('+')), fuse == 1, "{ran:?}");
        for ch in 0..c {
            let one: Vec<(&str, Tensor)> = full
                .iter()
                .map(|(k, v)| {
                    let v = if v.dims().len() == 4 {
                        channel(v, ch)
                    } else {
                        Tensor::from_vec([1], vec![v.data::<f32>().unwrap()[ch]]).unwrap()
                    };
                    (*k, v)
                })
                .collect();
            let alone = run(&one);
            for blob in ["y", "r", "dy", "dx"] {
                let (w, a) = (
                    channel(&whole.fetch(blob).unwrap(), ch),
                    alone.fetch(blob).unwrap(),
                );
                assert!(
                    w.bitwise_eq(&a),
                    "is_test {is_test}, fuse {fuse}: `{blob}` of channel {ch}"
                );
            }
            let mut per_channel = vec!["dscale", "dbias"];
            if is_test == 0 {
                per_channel.extend(["rm", "rv", "sm", "siv"]);
            }
            for blob in per_channel {
                let w = whole.fetch(blob).unwrap().data::<f32>().unwrap()[ch];
                let a = alone.fetch(blob).unwrap().data::<f32>().unwrap()[0];
                assert_eq!(
                    w.to_bits(),
                    a.to_bits(),
                    "is_test {is_test}, fuse {fuse}: `{blob}`[{ch}]"
                );
            }
        }
    }
}
