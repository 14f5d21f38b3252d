//! The `resnet` example's own code path, at a tiny size: it trains on two
//! devices, resumes exactly from a checkpoint, reads CIFAR-10 files, and turns
//! bad input into errors.

#[path = "../examples/resnet.rs"]
#[allow(dead_code)]
mod resnet;

use std::path::{Path, PathBuf};

use clap::Parser;
use dpm::data::{read_cifar10, read_cifar10_file, CIFAR10_RECORD};

fn args(extra: &[&str]) -> resnet::Args {
    let base = [
        "resnet",
        "--quiet",
        "--depth",
        "8",
        "--batch-per-device",
        "8",
        "--train-images",
        "256",
        "--heldout-images",
        "40",
    ];
    // One parse: clap's `update_from` would put every flag not repeated back to
    // its default (10,000 training images instead of 256).
    let a = resnet::Args::try_parse_from(base.iter().chain(extra)).unwrap();
    assert_eq!((a.train_images, a.heldout_images), (256, 40));
    a
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dpm-resnet-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len() as f32
}

#[test]
fn tiny_resnet_trains_on_two_devices_and_its_loss_decreases() {
    let dir = scratch("train");
    let json = dir.join("summary.json");
    let s = resnet::run(&args(&[
        "--iters",
        "80",
        "--lr",
        "0.05",
        "--summary-json",
        json.to_str().unwrap(),
        "--export-caffe2",
        dir.join("model").to_str().unwrap(),
        "--export-onnx",
        dir.join("model.onnx").to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(s.devices, ["cpu:0", "cpu:1"]);
    assert_eq!(s.losses.len(), 80);
    let (first, last) = (mean(&s.losses[..5]), mean(&s.losses[75..]));
    assert!(last < 0.8 * first, "loss {first} → {last}");
    assert_eq!(s.final_loss, s.losses[79]);
    // The held-out accuracy is a count of the 40 held-out images.
    let correct = s.heldout_accuracy * 40.0;
    assert!((correct - correct.round()).abs() < 1e-3, "{correct} of 40 images");
    // The JSON says what the summary says.
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(json["depth"], 8);
    assert_eq!(json["devices"], serde_json::json!(["cpu:0", "cpu:1"]));
    assert_eq!(json["batch_per_device"], 8);
    assert_eq!(json["iters"], 80);
    assert_eq!(json["final_loss"].as_f64(), Some(f64::from(s.final_loss)));
    assert_eq!(
        json["heldout_accuracy"].as_f64(),
        Some(f64::from(s.heldout_accuracy))
    );
    assert!((json["images_per_sec"].as_f64().unwrap() - s.images_per_sec).abs() < 1e-9 * s.images_per_sec);
    let median = s.median_step_seconds.expect("80 steps have a steady state");
    assert!(median > 0.0 && median.is_finite(), "{median}");
    assert_eq!(json["median_step_seconds"].as_f64(), Some(median));
    assert_eq!(json["losses"].as_array().map(Vec::len), Some(80));
    // The exported predictor and ONNX model load and give probabilities.
    let p = dpm::Predictor::load(dir.join("model/init_net.pb"), dir.join("model/predict_net.pb")).unwrap();
    let images = dpm::tensor::Tensor::zeros::<f32>([2, 3, 32, 32]);
    let probs = &p.run(&[("data", images)]).unwrap()[0].1;
    assert_eq!(probs.dims(), [2, 10]);
    for row in probs.data::<f32>().unwrap().chunks(10) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    let onnx = dpm::deploy::onnx::read_model(dir.join("model.onnx")).unwrap();
    let graph = onnx.graph.unwrap();
    assert_eq!(graph.output[0].name, p.net().external_output[0]);
    assert_eq!(
        graph.node.iter().filter(|n| n.op_type == "Conv").count(),
        9,
        "ResNet-8: 7 convolutions and 2 projection shortcuts"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn resume_continues_the_same_loss_curve() {
    let dir = scratch("resume");
    let ckpt = dir.join("ckpt.safetensors");
    let ck = ckpt.to_str().unwrap();
    let same = ["--augment", "--lr-decay-at", "6"];
    let run = |extra: &[&str]| resnet::run(&args(&[&same[..], extra].concat())).unwrap();
    let straight = run(&["--iters", "8"]);
    let first = run(&["--iters", "4", "--save", ck]);
    let resumed = run(&["--iters", "8", "--resume", ck]);
    assert_eq!(first.losses[..], straight.losses[..4]);
    assert_eq!(resumed.first_iter, 4);
    assert_eq!(resumed.losses[..], straight.losses[4..], "resumed curve differs");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bad_input_is_a_readable_error() {
    let err = |extra: &[&str]| resnet::run(&args(extra)).unwrap_err().to_string();
    assert!(err(&["--devices", "cuda:0"]).contains("CUDA"));
    assert!(err(&["--devices", "tpu:0"]).contains("tpu:0"));
    assert!(err(&["--depth", "21"]).contains("--depth 21"));
    assert!(err(&["--data", "/nonexistent/cifar"]).contains("not a directory"));
    assert!(err(&["--net-type", "async"]).contains("async"));
    let dir = scratch("bad");
    let corrupt = dir.join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    assert!(err(&["--resume", corrupt.to_str().unwrap()]).contains("checkpoint"));
    assert!(resnet::Args::try_parse_from(["resnet", "--iters", "many"]).is_err());
    // Sizes and output paths are refused before anything is built or trained.
    for (flag, value) in [
        ("--train-images", "100000000000000"),
        ("--batch-per-device", "100000000000000"),
        ("--image-size", "4000000000"),
    ] {
        let a = resnet::Args::try_parse_from(["resnet", "--quiet", "--depth", "8", flag, value]).unwrap();
        let e = resnet::run(&a).unwrap_err().to_string();
        assert!(e.contains("cannot allocate"), "{flag}: {e}");
    }
    assert!(err(&["--save", "/nonexistent/dir/c.safetensors"]).contains("/nonexistent/dir"));
    assert!(err(&["--summary-json", "/nonexistent/s.json"]).contains("/nonexistent"));
    // A diverging run stops, rather than report an accuracy.
    assert!(err(&["--lr", "1e30", "--iters", "20"]).contains("the loss diverged"));
    // A checkpoint at or past --iters has nothing to train.
    let ckpt = dir.join("done.safetensors");
    resnet::run(&args(&["--iters", "2", "--save", ckpt.to_str().unwrap()])).unwrap();
    let e = err(&["--iters", "2", "--resume", ckpt.to_str().unwrap()]);
    assert!(e.contains("nothing to train"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

/// Writes `n` CIFAR-10 records whose pixels encode their index.
fn write_records(path: &Path, n: usize, first_label: u8) {
    let mut bytes = Vec::with_capacity(n * CIFAR10_RECORD);
    for i in 0..n {
        bytes.push((first_label + i as u8) % 10);
        bytes.extend((0..CIFAR10_RECORD - 1).map(|p| ((i * 7 + p) % 251) as u8));
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn cifar10_reader_on_generated_files() {
    let dir = scratch("cifar");
    for b in 1..=5 {
        write_records(&dir.join(format!("data_batch_{b}.bin")), 8, b as u8);
    }
    write_records(&dir.join("test_batch.bin"), 6, 0);
    let (train, test) = read_cifar10(&dir).unwrap();
    assert_eq!((train.len(), test.len(), train.shape), (40, 6, [3, 32, 32]));
    assert_eq!(train.labels[..3], [1, 2, 3]);
    assert_eq!(train.image(1)[..3], [7, 8, 9]);
    // The example trains on it.
    let s = resnet::run(&args(&[
        "--iters",
        "2",
        "--data",
        dir.to_str().unwrap(),
        "--batch-per-device",
        "4",
    ]))
    .unwrap();
    assert_eq!(s.losses.len(), 2);
    // A truncated file is named in the error.
    let full = std::fs::read(dir.join("data_batch_3.bin")).unwrap();
    std::fs::write(dir.join("data_batch_3.bin"), &full[..full.len() - 100]).unwrap();
    let e = read_cifar10(&dir).unwrap_err().to_string();
    assert!(e.contains("data_batch_3.bin") && e.contains("truncated"), "{e}");
    // So is a bad label, and a missing file.
    let mut bad = full.clone();
    bad[0] = 42;
    std::fs::write(dir.join("bad.bin"), bad).unwrap();
    assert!(read_cifar10_file(&dir.join("bad.bin"))
        .unwrap_err()
        .to_string()
        .contains("label 42"));
    std::fs::remove_file(dir.join("test_batch.bin")).unwrap();
    std::fs::write(dir.join("data_batch_3.bin"), &full).unwrap();
    assert!(read_cifar10(&dir)
        .unwrap_err()
        .to_string()
        .contains("test_batch.bin"));
    std::fs::remove_dir_all(dir).ok();
}

/// The README's list of the example's flags is the list clap knows.
#[test]
fn the_readme_lists_every_flag_of_the_example() {
    use clap::CommandFactory;
    let readme = include_str!("../README.md");
    let start = readme
        .find("--help` lists the flags")
        .expect("the README lists the flags");
    let para = &readme[start..start + readme[start..].find("\n\n").unwrap()];
    let mut listed: Vec<String> = para
        .split("`--")
        .skip(1)
        .map(|s| {
            s.chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                .collect()
        })
        .collect();
    listed.sort();
    listed.dedup();
    let mut flags: Vec<String> = resnet::Args::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .filter(|l| l != "help")
        .collect();
    flags.sort();
    assert_eq!(listed, flags, "the README's flag list and `--help` differ");
}
