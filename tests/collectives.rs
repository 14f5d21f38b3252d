//! The in-process collectives, on every path: 1–8 devices (the fused loops for
//! 2–4 and the general one beyond), buffers on both sides of the threading
//! threshold, sum and average, broadcast from any root, and bad input.

mod common;

use common::random;
use dpm::comm::local::allreduce_in_place;
use dpm::prelude::*;

/// The sum in device order (0, 1, 2, …), then the scale: the bits every
/// replica must end with.
fn reference(bufs: &[Vec<f32>], scale: f32) -> Vec<f32> {
    let mut acc = bufs[0].clone();
    for b in &bufs[1..] {
        acc.iter_mut().zip(b).for_each(|(a, &x)| *a += x);
    }
    if scale != 1.0 {
        acc.iter_mut().for_each(|a| *a *= scale);
    }
    acc
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn allreduce_gives_every_buffer_the_device_order_sum_on_every_path() {
    // 65_536 floats is where the work is split across threads; 2048 the block.
    let lengths = [0usize, 1, 7, 2048, 2049, 65_535, 65_536, 3 * 65_536 + 2049];
    for devices in 1..=8usize {
        for &len in &lengths {
            for scale in [1.0f32, 1.0 / devices as f32] {
                let bufs: Vec<Vec<f32>> = (0..devices)
                    .map(|d| {
                        let t = random(&[len], (devices * 1000 + d) as u64 + len as u64, -1.0, 1.0, 0.0);
                        t.data::<f32>().unwrap().to_vec()
                    })
                    .collect();
                let want = bits(&reference(&bufs, scale));
                let mut got = bufs.clone();
                let mut views: Vec<&mut [f32]> = got.iter_mut().map(Vec::as_mut_slice).collect();
                allreduce_in_place(&mut views, scale);
                for (d, g) in got.iter().enumerate() {
                    assert!(
                        bits(g) == want,
                        "{devices} devices × {len} floats, scale {scale}: device {d} differs"
                    );
                }
            }
        }
    }
}

/// A net of one collective over `name` on `n` devices (`cpu_d/name`).
fn collective(op: &str, name: &str, n: u32, args: &[(&str, i64)]) -> Net {
    let blobs: Vec<String> = (0..n).map(|d| format!("cpu_{d}/{name}")).collect();
    common::op_net(
        op,
        &blobs.iter().map(String::as_str).collect::<Vec<_>>(),
        &blobs.iter().map(String::as_str).collect::<Vec<_>>(),
        args,
    )
}

#[test]
fn allreduce_op_sums_or_averages_large_and_small_gradients() {
    for (n, len) in [(2u32, 10usize), (3, 70_000), (5, 1000), (8, 65_536)] {
        for average in [0i64, 1] {
            let ws = Workspace::new();
            let parts: Vec<Tensor> = (0..n)
                .map(|d| random(&[len / 2, 2], u64::from(d) + 7, -2.0, 2.0, 0.0))
                .collect();
            for (d, t) in parts.iter().enumerate() {
                ws.feed(format!("cpu_{d}/g"), t.clone());
            }
            ws.run_net_once(collective("Allreduce", "g", n, &[("average", average)]).proto())
                .unwrap();
            let vecs: Vec<Vec<f32>> = parts.iter().map(|t| t.data::<f32>().unwrap().to_vec()).collect();
            let scale = if average == 1 { 1.0 / n as f32 } else { 1.0 };
            let want = bits(&reference(&vecs, scale));
            for d in 0..n {
                let got = ws.fetch(format!("cpu_{d}/g")).unwrap();
                assert_eq!(got.dims(), [len / 2, 2]);
                assert!(
                    bits(got.data::<f32>().unwrap()) == want,
                    "{n} devices, {len} floats, average {average}: cpu_{d} differs"
                );
            }
        }
    }
}

#[test]
fn broadcast_copies_the_root_to_every_device_whatever_its_type_and_shape() {
    for root in 0..4u32 {
        let ws = Workspace::new();
        for d in 0..4u32 {
            // Different shapes per device: after the broadcast all take the root's.
            let n = 3 + d as usize;
            let v: Vec<i64> = (0..n as i64).map(|i| i * 10 + i64::from(d)).collect();
            ws.feed(format!("cpu_{d}/it"), Tensor::from_vec([n], v).unwrap());
            ws.feed(
                format!("cpu_{d}/w"),
                random(&[2, n], u64::from(d), -1.0, 1.0, 0.0),
            );
        }
        let root_it = ws.fetch(format!("cpu_{root}/it")).unwrap();
        let root_w = ws.fetch(format!("cpu_{root}/w")).unwrap();
        for name in ["it", "w"] {
            ws.run_net_once(collective("Broadcast", name, 4, &[("root", i64::from(root))]).proto())
                .unwrap();
        }
        for d in 0..4u32 {
            assert!(
                ws.fetch(format!("cpu_{d}/it")).unwrap().bitwise_eq(&root_it),
                "root {root}, cpu_{d}"
            );
            assert!(
                ws.fetch(format!("cpu_{d}/w")).unwrap().bitwise_eq(&root_w),
                "root {root}, cpu_{d}"
            );
        }
    }
}

#[test]
fn collectives_reject_bad_input() {
    let ws = Workspace::new();
    // A root that is not one of the devices.
    let err = ws
        .create_net(collective("Broadcast", "w", 2, &[("root", 2)]).proto())
        .unwrap_err();
    assert!(err.to_string().contains("root"), "{err}");
    // Not in place.
    let err = ws
        .create_net(
            common::op_net("Allreduce", &["cpu_0/a", "cpu_1/a"], &["cpu_0/b", "cpu_1/b"], &[]).proto(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("in place"), "{err}");
    // Shapes that differ between devices.
    ws.feed("cpu_0/g", Tensor::zeros::<f32>([4]));
    ws.feed("cpu_1/g", Tensor::zeros::<f32>([5]));
    let err = ws
        .run_net_once(collective("Allreduce", "g", 2, &[]).proto())
        .unwrap_err();
    assert!(err.to_string().contains("cpu_1/g"), "{err}");
    // Integers cannot be all-reduced.
    ws.feed("cpu_0/i", Tensor::zeros::<i64>([4]));
    ws.feed("cpu_1/i", Tensor::zeros::<i64>([4]));
    let err = ws
        .run_net_once(collective("Allreduce", "i", 2, &[]).proto())
        .unwrap_err();
    assert!(err.to_string().contains("cpu_0/i"), "{err}");
    // Nothing was changed by the failed reductions.
    assert!(ws
        .fetch("cpu_1/g")
        .unwrap()
        .bitwise_eq(&Tensor::zeros::<f32>([5])));
}

#[test]
fn collectives_update_every_blob_in_place() {
    // Declared in place, the executor hands each buffer over without a copy.
    for op in ["Allreduce", "Broadcast"] {
        let net = collective(op, "g", 3, &[]);
        let kernel = dpm::ops::Registry::global()
            .create(&net.proto().op[0], DeviceType::Cpu)
            .unwrap();
        assert_eq!(kernel.in_place(), [(0, 0), (1, 1), (2, 2)], "{op}");
    }
}
