//! Checkpoints of a data-parallel trainer with batch norm: what the file holds
//! (params, momenta, `ITER`, running statistics), resuming exactly, and saving
//! atomically.

mod common;

use std::path::PathBuf;

use common::random;
use dpm::checkpoint;
use dpm::prelude::*;

/// conv → batch norm → relu → global pool → fc → softmax loss, on 2×6×6 images.
#[data_parallel]
fn convnet(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [2, 6, 6]);
    let label = m.input("label");
    let x = m.conv("conv", data, 4, 3).pad(1).build()?;
    let x = m.spatial_bn("bn", x)?;
    let x = m.relu(x)?;
    let x = m.global_average_pool(x)?;
    let logits = m.fc("fc", x, 3)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

/// Batches of 8 images that depend on the step only, from step `start`.
fn images(start: u64) -> impl FnMut() -> Result<Vec<(String, Tensor)>> {
    let mut step = start;
    move || {
        step += 1;
        // Channel means far from 0 and 1, so running statistics move visibly.
        let mut x = random(&[8, 2, 6, 6], step, -1.0, 3.0, 0.0);
        x.data_mut::<f32>()
            .unwrap()
            .iter_mut()
            .for_each(|v| *v = 2.0 * *v + 1.5);
        let y: Vec<i32> = (0..8).map(|i| ((i as u64 + step) % 3) as i32).collect();
        Ok(vec![
            ("data".to_owned(), x),
            ("label".to_owned(), Tensor::from_vec([8], y).unwrap()),
        ])
    }
}

fn trainer(start: u64, seed: u64) -> Trainer {
    let mut model = ModelHelper::new("convnet");
    model.set_seed(seed);
    let mut t = Parallelize::new(model)
        .devices([Device::cpu(0), Device::cpu(1)])
        .input(images(start))
        .forward(convnet)
        .update(Sgd::new(0.05).momentum(0.9).weight_decay(1e-4))
        .build()
        .unwrap();
    t.run_init().unwrap();
    t
}

const PARAMS: [&str; 6] = ["bn_b", "bn_s", "conv_b", "conv_w", "fc_b", "fc_w"];
const RUNNING: [&str; 2] = ["bn_riv", "bn_rm"];

/// Every key a checkpoint of `convnet` with momentum SGD must hold, sorted.
fn expected_keys() -> Vec<String> {
    let mut keys: Vec<String> = PARAMS
        .iter()
        .flat_map(|p| [p.to_string(), format!("{p}_momentum")])
        .chain(RUNNING.iter().map(|s| s.to_string()))
        .chain(["ITER".to_owned()])
        .collect();
    keys.sort();
    keys
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dpm-ckpt-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_checkpoint_holds_params_momenta_iter_and_running_statistics() {
    let dir = scratch("contents");
    let path = dir.join("c.safetensors");
    let mut t = trainer(0, 1);
    t.run(3).unwrap();
    t.save(&path).unwrap();
    let contents = checkpoint::load(&path).unwrap();
    let keys: Vec<String> = contents.tensors.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(keys, expected_keys());
    assert_eq!(
        contents.metadata.get("model").map(String::as_str),
        Some("convnet")
    );
    for (key, saved) in &contents.tensors {
        let live = t.fetch(key, Device::cpu(0)).unwrap();
        assert!(
            saved.bitwise_eq(&live),
            "`{key}` in the file differs from cpu_0/{key}"
        );
    }
    let iter = &contents.tensors.iter().find(|(k, _)| k == "ITER").unwrap().1;
    assert_eq!(iter.data::<i64>().unwrap(), [3]);
    // The running statistics moved away from their initial 0 and 1.
    for (name, init) in [("bn_rm", 0.0f32), ("bn_riv", 1.0)] {
        let v = t.fetch(name, Device::cpu(0)).unwrap();
        assert!(
            v.data::<f32>().unwrap().iter().all(|&x| (x - init).abs() > 1e-3),
            "{name} was not updated: {:?}",
            v.data::<f32>()
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Every checkpointed blob on every device.
fn state(t: &Trainer) -> Vec<(String, Device, Tensor)> {
    let mut v = Vec::new();
    for key in expected_keys() {
        for &d in t.devices() {
            v.push((key.clone(), d, t.fetch(&key, d).unwrap()));
        }
    }
    v
}

#[test]
fn resuming_reproduces_an_uninterrupted_run_running_statistics_included() {
    let dir = scratch("resume");
    let path = dir.join("c.safetensors");
    let mut straight = trainer(0, 1);
    straight.run(8).unwrap();

    let mut first = trainer(0, 1);
    first.run(4).unwrap();
    first.save(&path).unwrap();
    drop(first);
    // Another seed: every blob differs until the checkpoint is loaded.
    let mut resumed = trainer(4, 2);
    resumed.load(&path).unwrap();
    resumed.run(4).unwrap();
    for ((key, d, a), (_, _, b)) in state(&straight).iter().zip(state(&resumed)) {
        assert!(a.bitwise_eq(&b), "{key} on {d} differs after resume");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn loading_puts_the_checkpoint_on_every_device() {
    let dir = scratch("load");
    let path = dir.join("c.safetensors");
    let mut a = trainer(0, 1);
    a.run(2).unwrap();
    a.save(&path).unwrap();
    let mut b = trainer(0, 2);
    b.run(1).unwrap();
    b.load(&path).unwrap();
    let saved = checkpoint::load(&path).unwrap();
    for (key, t) in &saved.tensors {
        for &d in b.devices() {
            assert!(
                b.fetch(key, d).unwrap().bitwise_eq(t),
                "{key} on {d} is not the checkpoint's"
            );
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn saving_is_atomic_and_leaves_no_temporary_files() {
    let dir = scratch("atomic");
    let path = dir.join("c.safetensors");
    let mut t = trainer(0, 1);
    t.save(&path).unwrap();
    let old = std::fs::read(&path).unwrap();
    t.run(1).unwrap();
    t.save(&path).unwrap();
    let new = std::fs::read(&path).unwrap();
    assert_ne!(old, new, "the second save did not replace the file");
    // A save that cannot complete (the target is a directory) is an error and
    // leaves what was there.
    let target = dir.join("taken");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"user data").unwrap();
    assert!(t.save(&target).is_err());
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"user data");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "temporary files left behind: {names:?}");
    // A file that is not a checkpoint is refused with the reason.
    std::fs::write(dir.join("bad"), b"definitely not safetensors").unwrap();
    let err = t.load(dir.join("bad")).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn checkpoint_files_round_trip_every_element_type() {
    let dir = scratch("types");
    let path = dir.join("t.safetensors");
    let tensors = vec![
        (
            "a".to_owned(),
            Tensor::from_vec([2, 3], vec![1.5f32, -2.0, 0.0, 3.25, f32::MAX, -0.0]).unwrap(),
        ),
        (
            "b".to_owned(),
            Tensor::from_vec([4], vec![1i32, -2, i32::MAX, i32::MIN]).unwrap(),
        ),
        (
            "c".to_owned(),
            Tensor::from_vec([1, 2], vec![i64::MIN, 7i64]).unwrap(),
        ),
    ];
    let meta = std::collections::HashMap::from([("model".to_owned(), "m".to_owned())]);
    checkpoint::save(&path, &tensors, meta).unwrap();
    let back = checkpoint::load(&path).unwrap();
    assert_eq!(back.tensors.len(), 3);
    for ((k, t), (k2, t2)) in tensors.iter().zip(&back.tensors) {
        assert_eq!(k, k2);
        assert!(t.bitwise_eq(t2), "{k}: {t:?} came back as {t2:?}");
    }
    assert_eq!(back.metadata.get("model").map(String::as_str), Some("m"));
    assert_eq!(
        back.metadata.get("format").map(String::as_str),
        Some("dpm-checkpoint-1")
    );
    // The bytes are plain safetensors: header length, JSON header, little-endian data.
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    for want in ["\"a\"", "\"F32\"", "\"I32\"", "\"I64\"", "[2,3]"] {
        assert!(header.contains(want), "{want} not in {header}");
    }
    assert_eq!(bytes[8 + n..].len(), 6 * 4 + 4 * 4 + 2 * 8);
    // A safetensors file of an element type dpm does not hold is refused by name.
    let f16 = r#"{"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#;
    let mut file = (f16.len() as u64).to_le_bytes().to_vec();
    file.extend(f16.as_bytes());
    file.extend([0u8; 4]);
    std::fs::write(dir.join("f16"), file).unwrap();
    let err = checkpoint::load(&dir.join("f16")).unwrap_err().to_string();
    assert!(err.contains("`h`") && err.contains("F16"), "{err}");
    // A path with no file name is refused before anything is written.
    assert!(checkpoint::save(&dir.join(".."), &tensors, Default::default()).is_err());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_checkpoint_that_does_not_fit_the_model_changes_nothing() {
    let dir = scratch("mismatch");
    let mut t = trainer(0, 1);
    t.run(1).unwrap();
    let good = dir.join("good.safetensors");
    t.save(&good).unwrap();
    let contents = checkpoint::load(&good).unwrap();
    let before = state(&t);
    type Named = Vec<(String, Tensor)>;
    let write = |name: &str, edit: &dyn Fn(&mut Named)| {
        let mut tensors = contents.tensors.clone();
        edit(&mut tensors);
        let p = dir.join(name);
        checkpoint::save(&p, &tensors, Default::default()).unwrap();
        p
    };
    let missing = write("missing", &|v| v.retain(|(k, _)| k != "bn_rm"));
    let extra = write("extra", &|v| v.push(("stranger".into(), Tensor::scalar(1.0f32))));
    let reshaped = write("reshaped", &|v| {
        let fc = v.iter_mut().find(|(k, _)| k == "fc_b").unwrap();
        fc.1 = Tensor::zeros::<f32>([4]);
    });
    let retyped = write("retyped", &|v| {
        let it = v.iter_mut().find(|(k, _)| k == "ITER").unwrap();
        it.1 = Tensor::from_vec([1], vec![3.0f32]).unwrap();
    });
    for (path, words) in [
        (missing, ["bn_rm", "needs"]),
        (extra, ["stranger", "does not have"]),
        (reshaped, ["fc_b", "[4]"]),
        (retyped, ["ITER", "I64"]),
    ] {
        let err = t.load(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Checkpoint { .. }), "{msg}");
        assert!(words.iter().all(|w| msg.contains(w)), "{msg}");
    }
    for ((key, d, a), (_, _, b)) in before.iter().zip(state(&t)) {
        assert!(a.bitwise_eq(&b), "{key} on {d} changed by a refused load");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn the_test_net_runs_inference_on_the_trained_parameters_and_changes_nothing() {
    let mut t = trainer(0, 1);
    assert!(t
        .run_test(Vec::new())
        .unwrap_err()
        .to_string()
        .contains("add_test_net"));
    t.run(3).unwrap();
    t.add_test_net(convnet).unwrap();
    assert_eq!(
        t.test_outputs().iter().map(BlobRef::name).collect::<Vec<_>>(),
        ["cpu_0/loss"]
    );
    let before = state(&t);
    let batch = images(100)().unwrap();
    t.run_test(batch.clone()).unwrap();
    let loss = t.fetch("loss", Device::cpu(0)).unwrap().data::<f32>().unwrap()[0];
    assert!(loss.is_finite() && loss > 0.0);
    // Inference reads the running statistics and updates nothing.
    for ((key, d, a), (_, _, b)) in before.iter().zip(state(&t)) {
        assert!(a.bitwise_eq(&b), "{key} on {d} changed by the test net");
    }
    // Batch norm normalised with the running statistics, not the batch's.
    let f = |name: &str| {
        t.fetch(name, Device::cpu(0))
            .unwrap()
            .data::<f32>()
            .unwrap()
            .to_vec()
    };
    let (conv, bn) = (f("conv"), f("bn"));
    let (rm, riv, sc, bias) = (f("bn_rm"), f("bn_riv"), f("bn_s"), f("bn_b"));
    for (i, (&x, &y)) in conv.iter().zip(&bn).enumerate() {
        let c = (i / 36) % 4;
        let want = (x - rm[c]) / (riv[c] + 1e-5).sqrt() * sc[c] + bias[c];
        assert!(
            (y - want).abs() < 1e-4 * (1.0 + want.abs()),
            "bn[{i}] {y} vs {want}"
        );
    }
    // Same batch, same answer.
    t.run_test(batch.clone()).unwrap();
    let again = t.fetch("loss", Device::cpu(0)).unwrap().data::<f32>().unwrap()[0];
    assert_eq!(loss.to_bits(), again.to_bits());
    // A test forward that uses a parameter the trained model lacks is refused.
    let mut t2 = trainer(0, 1);
    let err = t2
        .add_test_net(|m: &mut ModelHelper| {
            let x = m.blob("data");
            Ok(vec![m.fc("brand_new", &x, 72, 3)?])
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("brand_new"), "{err}");
}
