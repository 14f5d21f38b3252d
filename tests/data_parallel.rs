//! `#[data_parallel]`: an annotated forward function trains exactly like the
//! equivalent closure-based builder.

mod common;

use common::{cycling_source, mlp_forward};
use dpm::prelude::*;

/// The MLP of `common::mlp_forward`, written once for one device.
#[data_parallel]
fn forward(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [8]);
    let label = m.input("label");
    let h = m.fc("fc1", data, 16)?;
    let h = m.relu(h)?;
    let logits = m.fc("fc2", h, 4)?;
    let (p, loss) = m.softmax_with_loss("loss", logits, label)?;
    m.accuracy("accuracy", p, label);
    Ok(loss.into())
}

#[data_parallel(update)]
fn update(m: &mut DeviceModel<'_>) -> Result<()> {
    Sgd::new(0.1).momentum(0.9).weight_decay(1e-4).build(m.model())
}

fn train(p: Parallelize) -> Trainer {
    let mut t = p
        .devices([Device::cpu(0), Device::cpu(1)])
        .input(cycling_source(8, 0))
        .build()
        .unwrap();
    t.run_init().unwrap();
    t.run(10).unwrap();
    t
}

#[test]
fn annotated_function_trains_like_the_closure_builder() {
    let annotated = train(
        Parallelize::new(ModelHelper::new("mlp"))
            .forward(forward)
            .update(update),
    );
    let closure = train(
        Parallelize::new(ModelHelper::new("mlp"))
            .forward(mlp_forward)
            .update(Sgd::new(0.1).momentum(0.9).weight_decay(1e-4)),
    );
    assert_eq!(annotated.model().net().proto(), closure.model().net().proto());
    for g in closure.param_groups() {
        for d in [Device::cpu(0), Device::cpu(1)] {
            let (a, b) = (
                annotated.fetch(&g.name, d).unwrap(),
                closure.fetch(&g.name, d).unwrap(),
            );
            assert!(a.bitwise_eq(&b), "{} on {d}", g.name);
        }
    }
}

#[test]
fn runtime_errors_inside_the_function_surface_from_build() {
    #[data_parallel]
    fn unshaped(m: &mut DeviceModel<'_>) -> Result<Blob<'_>> {
        let data = m.input("data");
        m.fc("fc", data, 4)
    }
    let err = Parallelize::new(ModelHelper::new("m"))
        .devices([Device::cpu(0)])
        .forward(unshaped)
        .build()
        .err()
        .unwrap();
    assert!(err.to_string().contains("input_with_shape"), "{err}");
}

#[test]
fn errors_of_input_and_update_functions_surface_from_build() {
    #[data_parallel(input)]
    fn no_reader(_m: &mut DeviceModel<'_>) -> Result<()> {
        Err(Error::Config("the reader is not there".into()))
    }
    #[data_parallel(update)]
    fn no_optimizer(_m: &mut DeviceModel<'_>) -> Result<()> {
        Err(Error::Config("no optimizer today".into()))
    }
    let build = |p: Parallelize| p.devices([Device::cpu(0)]).build().err().unwrap().to_string();
    let e = build(
        Parallelize::new(ModelHelper::new("m"))
            .input_builder(no_reader)
            .forward(forward),
    );
    assert!(e.contains("the reader is not there"), "{e}");
    let e = build(
        Parallelize::new(ModelHelper::new("m"))
            .forward(forward)
            .update(no_optimizer),
    );
    assert!(e.contains("no optimizer today"), "{e}");
}
