//! `Trainer::summary`: layers, output shapes, parameter counts and FLOPs per
//! sample, checked against a hand count of a small CNN.

mod common;

use dpm::prelude::*;

#[test]
fn the_summary_of_a_small_cnn_matches_a_hand_count() {
    let t = common::trained_small_cnn();
    let s = t.summary().unwrap();
    assert_eq!(s.inputs, [("data".to_string(), vec![3, 8, 8])]);
    let row = |name: &str| {
        s.layers
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let conv = row("c1");
    assert_eq!(
        (conv.op_type.as_str(), conv.output_shape.as_slice()),
        ("Conv", &[4, 8, 8][..])
    );
    assert_eq!(
        conv.params,
        [
            ("c1_w".to_string(), vec![4, 3, 3, 3]),
            ("c1_b".to_string(), vec![4])
        ]
    );
    assert_eq!(conv.param_count, 4 * 27 + 4);
    // Each of the 4·8·8 outputs: 3·3·3 multiply-accumulates.
    assert_eq!(conv.flops, 2 * 4 * 8 * 8 * 27);
    let bn = row("bn1");
    assert_eq!(bn.param_count, 4 * 4);
    let fc = row("fc");
    assert_eq!(
        (fc.output_shape.as_slice(), fc.param_count, fc.flops),
        (&[3][..], 4 * 3 + 3, 2 * 4 * 3)
    );
    assert_eq!(s.layers.last().unwrap().op_type, "Softmax");
    assert_eq!(s.flops_per_sample, 2 * 4 * 8 * 8 * 27 + 2 * 4 * 3);
    // Trainable = what the optimiser updates; the rest = running statistics.
    let trained: usize = t
        .param_groups()
        .iter()
        .map(|g| t.fetch(&g.name, Device::cpu(0)).unwrap().numel())
        .sum();
    assert_eq!((s.trainable, s.non_trainable), (trained, 8));
    assert_eq!(trained, 112 + 8 + 15);
    let text = s.to_string();
    assert!(
        text.contains("Parameters: 143 (0.00 MiB as f32): 135 trained, 8 running statistics"),
        "{text}"
    );
    assert!(text.contains("FLOPs per sample, forward: 13.85 K"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("c1 ")
            && l.contains("Conv")
            && l.contains("[4, 8, 8]")
            && l.contains("112")),
        "{text}"
    );
}
