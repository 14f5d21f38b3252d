//! Helpers shared by the integration tests.
#![allow(dead_code)]

use dpm::autodiff::add_gradient_ops_seeded;
use dpm::ops::cpu::rng::Rng;
use dpm::prelude::*;

/// A tensor of `shape` with elements uniform in `[lo, hi)`, away from zero by
/// `gap` (so kinks such as ReLU's are not straddled by finite differences).
pub fn random(shape: &[usize], seed: u64, lo: f32, hi: f32, gap: f32) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v = (0..n)
        .map(|_| loop {
            let x = lo + (hi - lo) * rng.uniform() as f32;
            if x.abs() >= gap {
                break x;
            }
        })
        .collect();
    Tensor::from_vec(shape.to_vec(), v).unwrap()
}

/// Checks the gradients that autodiff builds for `net` against central finite
/// differences of `L = Σ w ⊙ y` over the net's `outputs` (w random), with respect
/// to each blob of `wrt`. Returns the largest relative error seen.
pub fn gradcheck(net: &Net, feeds: &[(&str, Tensor)], outputs: &[&str], wrt: &[&str]) -> f64 {
    let ws = Workspace::new();
    for (n, t) in feeds {
        ws.feed(n, t.clone());
    }
    ws.run_net_once(net.proto()).expect("forward");
    let weights: Vec<Tensor> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let y = ws.fetch(o).unwrap();
            random(y.dims(), 1000 + i as u64, -1.0, 1.0, 0.0)
        })
        .collect();
    let loss = |ws: &Workspace| -> f64 {
        ws.run_net_once(net.proto()).expect("forward");
        outputs
            .iter()
            .zip(&weights)
            .map(|(o, w)| {
                let y = ws.fetch(o).unwrap();
                y.data::<f32>()
                    .unwrap()
                    .iter()
                    .zip(w.data::<f32>().unwrap())
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>()
            })
            .sum()
    };
    let mut backward = net.clone();
    let seeds: Vec<(BlobRef, BlobRef)> = outputs
        .iter()
        .map(|o| (BlobRef::new(*o), BlobRef::new(format!("{o}_seed"))))
        .collect();
    for ((_, s), w) in seeds.iter().zip(&weights) {
        ws.feed(s, w.clone());
    }
    let wrt_refs: Vec<BlobRef> = wrt.iter().map(|w| BlobRef::new(*w)).collect();
    let grads = add_gradient_ops_seeded(&mut backward, &seeds, &wrt_refs).expect("autodiff");
    ws.run_net_once(backward.proto()).expect("backward");
    let mut worst = 0.0f64;
    for w in &wrt_refs {
        let g = grads.get(w).unwrap_or_else(|| panic!("no gradient for {w}"));
        let analytic = ws.fetch(g).unwrap();
        let base = ws.fetch(w).unwrap();
        let eps = 1e-2f32;
        let mut numeric = Vec::with_capacity(base.numel());
        for i in 0..base.numel() {
            let mut t = base.clone();
            t.data_mut::<f32>().unwrap()[i] += eps;
            ws.feed(w, t.clone());
            let up = loss(&ws);
            t.data_mut::<f32>().unwrap()[i] -= 2.0 * eps;
            ws.feed(w, t);
            let down = loss(&ws);
            numeric.push((up - down) / (2.0 * f64::from(eps)));
        }
        ws.feed(w, base);
        let a: Vec<f64> = analytic
            .data::<f32>()
            .unwrap()
            .iter()
            .map(|&x| x.into())
            .collect();
        assert_eq!(a.len(), numeric.len(), "gradient of {w} has the wrong size");
        let diff: f64 = a
            .iter()
            .zip(&numeric)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        let scale = a
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt()
            .max(numeric.iter().map(|x| x * x).sum::<f64>().sqrt())
            .max(1e-3);
        let rel = diff / scale;
        assert!(
            rel < 1e-2,
            "gradient of {w}: relative error {rel:.2e}\nanalytic {a:?}\nnumeric  {numeric:?}"
        );
        worst = worst.max(rel);
    }
    worst
}

/// A learnable synthetic classification set: `n` points in `dim` dimensions around
/// `classes` random centres, with Gaussian noise. Returns (data [n, dim], labels [n]).
pub fn blobs_dataset(n: usize, dim: usize, classes: usize, noise: f32, seed: u64) -> (Tensor, Tensor) {
    let mut rng = Rng::new(seed);
    let centres: Vec<f32> = (0..classes * dim).map(|_| 2.0 * rng.normal() as f32).collect();
    let mut x = Vec::with_capacity(n * dim);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % classes;
        y.push(c as i32);
        for d in 0..dim {
            x.push(centres[c * dim + d] + noise * rng.normal() as f32);
        }
    }
    (
        Tensor::from_vec([n, dim], x).unwrap(),
        Tensor::from_vec([n], y).unwrap(),
    )
}

/// A two-layer MLP train model (fc → relu → fc → softmax loss, plus accuracy)
/// with momentum SGD, reading `data` and `label`.
pub fn mlp(dim: usize, hidden: usize, classes: usize, sgd: Sgd) -> ModelHelper {
    let mut m = ModelHelper::new("mlp");
    let data = m.blob("data");
    let label = m.blob("label");
    let h = m.fc("fc1", &data, dim, hidden).unwrap();
    let h = m.relu(&h, "fc1_relu");
    let logits = m.fc("fc2", &h, hidden, classes).unwrap();
    let (p, loss) = m.softmax_with_loss(&logits, &label, "loss");
    m.accuracy(&p, &label, "accuracy");
    m.add_gradient_ops(&[loss]).unwrap();
    sgd.build(&mut m).unwrap();
    m
}

/// The MLP forward pass as a per-device builder: fc(8→16) → relu → fc(16→4) →
/// softmax loss, plus accuracy.
pub fn mlp_forward(m: &mut ModelHelper) -> Result<Vec<BlobRef>> {
    let data = m.blob("data");
    let label = m.blob("label");
    let h = m.fc("fc1", &data, 8, 16)?;
    let h = m.relu(&h, "fc1_relu");
    let logits = m.fc("fc2", &h, 16, 4)?;
    let (p, loss) = m.softmax_with_loss(&logits, &label, "loss");
    m.accuracy(&p, &label, "accuracy");
    Ok(vec![loss])
}

/// A source cycling through a fixed data set, `batch` rows per step, from step `start`.
pub fn cycling_source(batch: usize, start: usize) -> impl FnMut() -> Result<Vec<(String, Tensor)>> + 'static {
    let (x, y) = blobs_dataset(240, 8, 4, 1.0, 5);
    let mut step = start;
    move || {
        let n = 240;
        let xs = x.data::<f32>().unwrap();
        let ys = y.data::<i32>().unwrap();
        let mut bx = Vec::with_capacity(batch * 8);
        let mut by = Vec::with_capacity(batch);
        for r in 0..batch {
            let i = (step * batch + r) % n;
            bx.extend_from_slice(&xs[i * 8..i * 8 + 8]);
            by.push(ys[i]);
        }
        step += 1;
        Ok(vec![
            ("data".to_owned(), Tensor::from_vec([batch, 8], bx).unwrap()),
            ("label".to_owned(), Tensor::from_vec([batch], by).unwrap()),
        ])
    }
}

/// A net of one op with the given inputs, outputs and integer arguments.
pub fn op_net(op: &str, inputs: &[&str], outputs: &[&str], args: &[(&str, i64)]) -> Net {
    let mut net = Net::new(op);
    let mut b = net
        .op(op)
        .inputs(inputs.iter().copied())
        .outputs(outputs.iter().copied());
    for (k, v) in args {
        b = b.arg(k, *v);
    }
    b.build();
    net
}

/// A small CNN with every layer kind a predictor export treats specially
/// (conv, batch norm, dropout, pooling, FC, softmax with loss, accuracy).
#[dpm::data_parallel]
pub fn small_cnn(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [3, 8, 8]);
    let label = m.input("label");
    let c = m.conv("c1", data, 4, 3).pad(1).build()?;
    let b = m.spatial_bn("bn1", c)?;
    let r = m.relu(b)?;
    let d = m.dropout("drop", r, 0.2)?;
    let p = m.max_pool(d, 2, 2, 0)?;
    let g = m.global_average_pool(p)?;
    let logits = m.fc("fc", g, 3)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    m.accuracy("accuracy", logits, label);
    Ok(loss.into())
}

/// A batch of `n` random 3×8×8 images and labels 0, 1, 2, 0, ….
pub fn cnn_batch(seed: u64, n: usize) -> Vec<(String, Tensor)> {
    let x = random(&[n, 3, 8, 8], seed, -1.0, 1.0, 0.0);
    let y: Vec<i32> = (0..n as i32).map(|i| i % 3).collect();
    vec![
        ("data".into(), x),
        ("label".into(), Tensor::from_vec([n], y).unwrap()),
    ]
}

/// A trainer of [`small_cnn`] on 2 CPU devices × 8 images (a new batch each
/// step), momentum SGD, initialised, with executor `net_type`.
pub fn small_cnn_trainer(net_type: &str, seed: u64) -> Trainer {
    let mut t = small_cnn_parallelize(net_type, seed).build().unwrap();
    t.run_init().unwrap();
    t
}

/// The builder of [`small_cnn_trainer`], to add settings to.
pub fn small_cnn_parallelize(net_type: &str, seed: u64) -> Parallelize {
    let mut step = 0u64;
    let mut model = ModelHelper::new("cnn");
    model.set_seed(seed);
    Parallelize::new(model)
        .devices([Device::cpu(0), Device::cpu(1)])
        .input(move || {
            step += 1;
            Ok(cnn_batch(step, 16))
        })
        .forward(small_cnn)
        .update(Sgd::new(0.1).momentum(0.9))
        .net_type(net_type)
}

/// [`small_cnn`] trained 4 steps on 2 CPU devices, with its test net added.
pub fn trained_small_cnn() -> Trainer {
    let mut t = small_cnn_trainer("dag", 4);
    t.run(4).unwrap();
    t.add_test_net(small_cnn).unwrap();
    t
}
