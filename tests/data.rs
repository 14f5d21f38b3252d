//! `InMemory`, the general batch source: epochs, shuffling, normalisation, the
//! last short batch, resuming, errors, and training from it.

mod common;

use std::collections::HashSet;

use common::{blobs_dataset, mlp_forward};
use dpm::data::{InMemory, LastBatch};
use dpm::parallel::InputSource;
use dpm::prelude::*;

/// Sample i's single feature is i, so a batch shows which samples it holds.
fn numbered(n: usize) -> InMemory {
    InMemory::from_f32((0..n).map(|i| i as f32).collect(), [1], (0..n as i32).collect()).unwrap()
}

fn ids(src: &mut InMemory) -> Vec<usize> {
    let b = src.next_batch().unwrap();
    let (x, y) = (b[0].1.data::<f32>().unwrap(), b[1].1.data::<i32>().unwrap());
    // Features and labels stay paired.
    assert!(x.iter().zip(y).all(|(a, l)| *a as i32 == *l));
    x.iter().map(|v| *v as usize).collect()
}

#[test]
fn epochs_are_shuffled_per_seed_and_cover_the_data() {
    // Drop: 10 samples, batches of 4 → 2 steps an epoch, 8 distinct samples.
    let mut src = numbered(10).batch_size(4).shuffle(3);
    assert_eq!(src.steps_per_epoch(), 2);
    let epoch = |s: &mut InMemory| -> Vec<usize> { (0..2).flat_map(|_| ids(s)).collect() };
    let (e0, e1) = (epoch(&mut src), epoch(&mut src));
    for e in [&e0, &e1] {
        assert_eq!(e.iter().collect::<HashSet<_>>().len(), 8, "{e:?}");
    }
    assert_ne!(e0, e1, "every epoch is drawn in a new order");
    assert_ne!(e0, (0..8).collect::<Vec<_>>(), "shuffled");
    // Same seed, same batches; another seed, others.
    let mut again = numbered(10).batch_size(4).shuffle(3);
    assert_eq!(epoch(&mut again), e0);
    assert_ne!(epoch(&mut numbered(10).batch_size(4).shuffle(4)), e0);
    // Without shuffle, the stored order.
    let mut plain = numbered(10).batch_size(4);
    assert_eq!(epoch(&mut plain), (0..8).collect::<Vec<_>>());
    // Pad: 3 steps, every sample each epoch, the last batch completed from the epoch's start.
    let mut pad = numbered(10).batch_size(4).shuffle(3).last_batch(LastBatch::Pad);
    assert_eq!(pad.steps_per_epoch(), 3);
    let e: Vec<usize> = (0..3).flat_map(|_| ids(&mut pad)).collect();
    assert_eq!(e.iter().collect::<HashSet<_>>().len(), 10);
    assert_eq!(e[10..], e[..2]);
    // Resuming at step 5 gives what steps 5 and 6 would have given.
    let mut full = numbered(10).batch_size(4).shuffle(9);
    let run: Vec<Vec<usize>> = (0..7).map(|_| ids(&mut full)).collect();
    let mut resumed = numbered(10).batch_size(4).shuffle(9).start_at(5);
    assert_eq!(
        [ids(&mut resumed), ids(&mut resumed)],
        [run[5].clone(), run[6].clone()]
    );
}

#[test]
fn bytes_and_floats_are_normalised_per_channel_and_names_are_configurable() {
    // Two samples of 2 channels × 2 values.
    let pixels: Vec<u8> = vec![0, 255, 51, 102, 255, 0, 204, 153];
    let mut src = InMemory::from_u8(pixels.clone(), [2, 1, 2], vec![0, 1])
        .unwrap()
        .batch_size(2)
        .normalize(&[0.5, 0.2], &[0.5, 0.1])
        .names("img", "cls");
    let b = src.next_batch().unwrap();
    assert_eq!((b[0].0.as_str(), b[1].0.as_str()), ("img", "cls"));
    assert_eq!(b[0].1.dims(), [2, 2, 1, 2]);
    let want: Vec<f32> = pixels
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let c = (i / 2) % 2;
            (f32::from(p) / 255.0 - [0.5, 0.2][c]) / [0.5, 0.1][c]
        })
        .collect();
    let got = b[0].1.data::<f32>().unwrap();
    assert!(
        got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6),
        "{got:?} vs {want:?}"
    );
    // One mean and std for all channels, on floats.
    let mut f = InMemory::from_f32(vec![1.0, 3.0, 5.0, 7.0], [2], vec![0, 1])
        .unwrap()
        .batch_size(2)
        .normalize(&[4.0], &[2.0]);
    assert_eq!(
        f.next_batch().unwrap()[0].1.data::<f32>().unwrap(),
        [-1.5, -0.5, 0.5, 1.5]
    );
}

#[test]
fn bad_configurations_are_clear_errors() {
    let msg = |r: Result<Vec<(String, Tensor)>>| r.unwrap_err().to_string();
    let e = InMemory::from_f32(vec![0.0; 7], [2], vec![0, 1, 2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("7 values") && e.contains("3 samples"), "{e}");
    assert!(msg(numbered(3).batch_size(0).next_batch()).contains("at least 1"));
    let e = msg(numbered(3).batch_size(4).next_batch());
    assert!(
        e.contains("no whole batch") && e.contains("LastBatch::Pad"),
        "{e}"
    );
    assert!(numbered(3)
        .batch_size(4)
        .last_batch(LastBatch::Pad)
        .next_batch()
        .is_ok());
    let img = || {
        InMemory::from_u8(vec![0; 12], [3, 2, 2], vec![0])
            .unwrap()
            .batch_size(1)
    };
    assert!(
        msg(img().normalize(&[0.5, 0.5], &[1.0, 1.0]).next_batch()).contains("2 mean values for 3 channels")
    );
    assert!(msg(img().normalize(&[0.5], &[0.0]).next_batch()).contains("std > 0"));
}

#[test]
fn a_trainer_learns_from_in_memory_data_on_two_devices() {
    let (x, y) = blobs_dataset(200, 8, 4, 1.0, 21);
    let src = InMemory::from_f32(
        x.data::<f32>().unwrap().to_vec(),
        [8],
        y.data::<i32>().unwrap().to_vec(),
    )
    .unwrap()
    .batch_size(16)
    .shuffle(1)
    .last_batch(LastBatch::Pad);
    let mut t = Parallelize::new(ModelHelper::new("mlp"))
        .devices([Device::cpu(0), Device::cpu(1)])
        .input(src)
        .forward(mlp_forward)
        .update(Sgd::new(0.1).momentum(0.9))
        .build()
        .unwrap();
    t.run_init().unwrap();
    t.step().unwrap();
    let first = t.loss().unwrap();
    t.run(60).unwrap();
    let last = t.loss().unwrap();
    assert!(last < 0.5 * first, "loss {first} → {last}");
}
