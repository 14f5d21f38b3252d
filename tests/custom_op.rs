//! An op from outside the crate (the `custom_op` example's Swish): registered
//! once with its kernels and gradient rule, its gradient matches finite
//! differences, and a `#[data_parallel]` model using it trains.

#[path = "../examples/custom_op.rs"]
#[allow(dead_code)]
mod custom_op;

use dpm::ops::Registry;

#[test]
fn an_op_registered_outside_dpm_differentiates_and_trains() {
    let (err, first, last) = custom_op::run().unwrap();
    assert!(err < 5e-3, "Swish's gradient is {err:.1e} off finite differences");
    assert!(last < 0.5 * first, "loss {first} → {last}");
    // It is a registered differentiable op like the built-ins.
    let r = Registry::global();
    assert!(r.differentiable_ops().contains(&"Swish"));
    assert!(!r.differentiable_ops().contains(&"SwishGradient"));
}

#[test]
fn its_schema_checks_the_arity_when_a_net_is_created() {
    custom_op::register();
    let mut net = dpm::prelude::Net::new("bad");
    net.op("Swish").inputs(["a", "b"]).output("y").build();
    let e = dpm::prelude::Workspace::new()
        .run_net_once(net.proto())
        .unwrap_err();
    assert!(e.to_string().contains("inputs: expected 1, got 2"), "{e}");
}
